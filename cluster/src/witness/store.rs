//! A voter's grants on disk, so that no restart forgets whom it voted for.
//!
//! The record holds, per RG, the node this voter last granted the lease
//! to (and that node's epoch). It is written before the grant is answered
//! whenever the holder changes (a renewal changes nothing on disk), so the
//! record is never behind what any node was promised.
//!
//! Format (little-endian): `TNDV`, version 1, cluster id u32, voter id u32,
//! entry count u32, entries of (rg u32, holder u32, epoch u64), then the
//! first 8 bytes of the SHA-256 of everything before them.

use ring::digest;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

const MAGIC: &[u8; 4] = b"TNDV";
const VERSION: u8 = 1;
const HEADER: usize = 4 + 1 + 4 + 4 + 4;
const ENTRY: usize = 4 + 4 + 8;
const CHECK: usize = 8;
/// More RGs than any configuration can hold: a larger count is corruption.
const MAX_ENTRIES: usize = 4096;

/// What a voter remembers: RG -> (holder, epoch).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VoterRecord {
    pub cluster_id: u32,
    pub voter: u32,
    pub holders: BTreeMap<u32, (u32, u64)>,
}

impl VoterRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER + self.holders.len() * ENTRY + CHECK);
        b.extend_from_slice(MAGIC);
        b.push(VERSION);
        b.extend_from_slice(&self.cluster_id.to_le_bytes());
        b.extend_from_slice(&self.voter.to_le_bytes());
        b.extend_from_slice(&(self.holders.len() as u32).to_le_bytes());
        for (rg, (holder, epoch)) in &self.holders {
            b.extend_from_slice(&rg.to_le_bytes());
            b.extend_from_slice(&holder.to_le_bytes());
            b.extend_from_slice(&epoch.to_le_bytes());
        }
        let sum = digest::digest(&digest::SHA256, &b);
        b.extend_from_slice(&sum.as_ref()[..CHECK]);
        b
    }

    pub fn decode(b: &[u8]) -> Result<VoterRecord, String> {
        if b.len() < HEADER + CHECK {
            return Err(format!("{} bytes: shorter than a header", b.len()));
        }
        let (body, sum) = b.split_at(b.len() - CHECK);
        if digest::digest(&digest::SHA256, body).as_ref()[..CHECK] != *sum {
            return Err("checksum mismatch (torn or corrupted write)".into());
        }
        if &body[..4] != MAGIC {
            return Err("not a voter record (bad magic)".into());
        }
        if body[4] != VERSION {
            return Err(format!(
                "record version {} (this build reads {VERSION})",
                body[4]
            ));
        }
        let u32_at = |i: usize| u32::from_le_bytes(body[i..i + 4].try_into().expect("4 bytes"));
        let count = u32_at(13) as usize;
        if count > MAX_ENTRIES || body.len() != HEADER + count * ENTRY {
            return Err(format!("{count} entries do not fit {} bytes", body.len()));
        }
        let mut holders = BTreeMap::new();
        for i in 0..count {
            let at = HEADER + i * ENTRY;
            let epoch = u64::from_le_bytes(body[at + 8..at + 16].try_into().expect("8 bytes"));
            holders.insert(u32_at(at), (u32_at(at + 4), epoch));
        }
        Ok(VoterRecord {
            cluster_id: u32_at(5),
            voter: u32_at(9),
            holders,
        })
    }
}

/// Durable storage for one voter record.
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
    /// A disk already holding an empty record for `voter`: the voter starts
    /// as one that restarted with nothing granted.
    pub fn formatted(cluster_id: u32, voter: u32) -> MemoryStore {
        let s = MemoryStore::default();
        let rec = VoterRecord {
            cluster_id,
            voter,
            holders: BTreeMap::new(),
        };
        *s.bytes.lock().expect("store") = Some(rec.encode());
        s
    }

    /// Overwrites the stored bytes (tests: a corrupted record).
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

    fn record() -> VoterRecord {
        VoterRecord {
            cluster_id: 7,
            voter: 2,
            holders: [(1, (0, 4)), (2, (1, 9))].into_iter().collect(),
        }
    }

    #[test]
    fn record_round_trips() {
        let r = record();
        assert_eq!(VoterRecord::decode(&r.encode()), Ok(r));
    }

    #[test]
    fn torn_truncated_or_foreign_records_are_refused_with_a_reason() {
        let b = record().encode();
        let mut flipped = b.clone();
        flipped[20] ^= 1;
        assert!(
            VoterRecord::decode(&flipped)
                .unwrap_err()
                .contains("checksum")
        );
        assert!(
            VoterRecord::decode(&b[..10])
                .unwrap_err()
                .contains("shorter")
        );
        assert!(VoterRecord::decode(&b[..b.len() - 1]).is_err());
        let mut other = b.clone();
        other[0] = b'X';
        let n = other.len() - CHECK;
        let sum = digest::digest(&digest::SHA256, &other[..n]);
        other[n..].copy_from_slice(&sum.as_ref()[..CHECK]);
        assert!(VoterRecord::decode(&other).unwrap_err().contains("magic"));
    }

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
