//! A voter's raft state on disk, so that no restart forgets a vote or a
//! grant: replaced atomically (temporary file, fsync, rename, fsync of the
//! directory) before anything it implies is sent.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Durable storage for one voter's raft state.
pub trait VoterStore: Send + Sync {
    /// The stored record's bytes; `None` when nothing was ever stored.
    fn load(&self) -> Result<Option<Vec<u8>>, String>;
    /// Replaces the record; returns only once it is durable.
    fn save(&self, bytes: &[u8]) -> Result<(), String>;
}

/// A file, replaced atomically: written to a temporary file, fsync'd,
/// renamed over the record, and the directory fsync'd.
pub struct FileStore {
    path: PathBuf,
}

impl FileStore {
    /// Creates the parent directory (mode 0700) if needed.
    pub fn new(path: impl Into<PathBuf>) -> Result<FileStore, String> {
        let path = path.into();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        Ok(FileStore { path })
    }
}

impl VoterStore for FileStore {
    fn load(&self) -> Result<Option<Vec<u8>>, String> {
        match std::fs::read(&self.path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", self.path.display())),
        }
    }

    fn save(&self, bytes: &[u8]) -> Result<(), String> {
        use std::os::unix::fs::OpenOptionsExt;
        let err = |e: std::io::Error| format!("{}: {e}", self.path.display());
        let tmp = self.path.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(err)?;
        f.write_all(bytes).map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, &self.path).map_err(err)?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(err)?;
        }
        Ok(())
    }
}

/// A disk in memory that outlives the voter using it: the simulations give
/// each party one that survives its crash and restart.
#[derive(Clone, Default)]
pub struct MemoryStore {
    bytes: Arc<Mutex<Option<Vec<u8>>>>,
    /// Every `save` fails while set (a full or read-only disk).
    pub failing: Arc<std::sync::atomic::AtomicBool>,
}

impl MemoryStore {
    /// Overwrites the stored bytes (tests: a corrupted or wiped record).
    pub fn put(&self, bytes: Option<Vec<u8>>) {
        *self.bytes.lock().expect("store") = bytes;
    }
}

impl VoterStore for MemoryStore {
    fn load(&self) -> Result<Option<Vec<u8>>, String> {
        Ok(self.bytes.lock().expect("store").clone())
    }

    fn save(&self, bytes: &[u8]) -> Result<(), String> {
        if self.failing.load(std::sync::atomic::Ordering::Relaxed) {
            return Err("simulated write failure".into());
        }
        *self.bytes.lock().expect("store") = Some(bytes.to_vec());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_store_replaces_the_record_durably() {
        let dir = std::env::temp_dir().join(format!("tandem-voter-{}", std::process::id()));
        let s = FileStore::new(dir.join("sub/voter.state")).unwrap();
        assert_eq!(s.load(), Ok(None));
        s.save(b"one").unwrap();
        s.save(b"two").unwrap();
        assert_eq!(s.load(), Ok(Some(b"two".to_vec())));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("sub/voter.state"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
