//! The session table shared by a node's workers and its other writers.
//!
//! A reader-writer lock with the fairness the dataplane needs, and nothing
//! on any path that sleeps while it makes a worker wait:
//!
//! * Workers hold the read side for one burst ([`read`]) and take the write
//!   side only from the first frame of a burst that creates a session or
//!   changes one's state ([`lock_upgrade`]: announced and spun for, like a
//!   slice writer's).
//! * Every other writer — the sync receiver, reconcile, expiry — works in
//!   slices of at most [`SLICE`] sessions and takes the write side through
//!   [`lock_between_bursts`]: it lets waiting workers go first, announces
//!   itself (so workers do not start a new burst under it) and *spins* for
//!   the lock. A writer sleeping on the lock would hold readers out while
//!   it waits to be scheduled (tens of microseconds on an idle CPU, more
//!   on a busy VM); spinning, it takes the lock the moment the last burst
//!   ends.
//! * A worker that finds the lock taken, or a writer announced, spins too.
//!
//! Both sides cap their spinning ([`READER_YIELD_MAX`], [`WRITER_SPIN_MAX`])
//! and then fall back to waiting on the lock, so a descheduled thread costs
//! at most the cap, never a livelock. What a worker waits per burst is
//! therefore bounded by one burst of another worker plus one slice.

use super::SessionTable;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard, TryLockError};
use std::time::{Duration, Instant};

/// The table as the daemon shares it between the dataplane workers and the
/// sync layer.
pub type SharedTable = Arc<TableCell>;

/// A table behind the dataplane's reader-writer lock (see the module doc).
pub struct TableCell {
    rw: RwLock<SessionTable>,
    /// Workers waiting for the read side now.
    readers_waiting: AtomicU32,
    /// A slice writer is about to take the write side: workers hold off
    /// starting a burst (up to [`READER_YIELD_MAX`]).
    writer_waiting: AtomicBool,
}

/// Sessions a writer other than a worker handles per exclusive hold (a
/// slice of a bulk chunk, a reconcile, an expiry pass): with the burst in
/// flight, the bound on how long it makes a worker wait (32 × ~0.3 µs at
/// 1M sessions).
pub const SLICE: usize = 8;

/// Longest a worker holds off for an announced writer before it takes the
/// read side anyway (the writer may have been descheduled).
const READER_YIELD_MAX: Duration = Duration::from_micros(50);

/// Longest either side spins before it sleeps on the lock (something holds
/// it for long: a table reserve, a flush).
const WRITER_SPIN_MAX: Duration = Duration::from_millis(2);

/// A new shared table.
pub fn shared(t: SessionTable) -> SharedTable {
    Arc::new(TableCell {
        rw: RwLock::new(t),
        readers_waiting: AtomicU32::new(0),
        writer_waiting: AtomicBool::new(false),
    })
}

/// Exclusive access (a worker's upgrade, role changes, tests). A panic
/// while holding the lock cannot leave the table half-updated (every
/// mutation completes before it can observe an error), so a poisoned lock
/// is taken over rather than propagated.
pub fn lock(t: &SharedTable) -> RwLockWriteGuard<'_, SessionTable> {
    t.rw.write().unwrap_or_else(PoisonError::into_inner)
}

/// Exclusive access for one slice of a longer job by a writer that is not
/// a worker: first lets waiting workers in, then announces itself and
/// spins for the lock (see the module doc).
pub fn lock_between_bursts(t: &SharedTable) -> RwLockWriteGuard<'_, SessionTable> {
    let start = Instant::now();
    while t.readers_waiting.load(Ordering::Relaxed) > 0 && start.elapsed() < READER_YIELD_MAX {
        std::hint::spin_loop();
    }
    announce_and_spin(t, start)
}

/// A worker's upgrade from the read side to the write side in mid-burst:
/// like [`lock_between_bursts`] it announces itself and spins (another
/// worker's burst ends within microseconds; a futex sleep and wake-up per
/// upgrade made two workers creating sessions slower than one), but it
/// does not yield to waiting readers first (they are workers too, and it
/// is already in its burst).
pub fn lock_upgrade(t: &SharedTable) -> RwLockWriteGuard<'_, SessionTable> {
    announce_and_spin(t, Instant::now())
}

fn announce_and_spin(t: &SharedTable, start: Instant) -> RwLockWriteGuard<'_, SessionTable> {
    t.writer_waiting.store(true, Ordering::Relaxed);
    let g = loop {
        match t.rw.try_write() {
            Ok(g) => break g,
            Err(TryLockError::Poisoned(p)) => break p.into_inner(),
            Err(TryLockError::WouldBlock) => {}
        }
        if start.elapsed() > WRITER_SPIN_MAX {
            break lock(t);
        }
        std::hint::spin_loop();
    };
    t.writer_waiting.store(false, Ordering::Relaxed);
    g
}

/// Shared access (a worker's burst, export, show). Spins while the lock
/// is taken or a slice writer is announced, instead of sleeping: a writer
/// holds it for one slice (microseconds), while a futex sleep and wake-up
/// would cost tens of microseconds.
pub fn read(t: &SharedTable) -> RwLockReadGuard<'_, SessionTable> {
    if !t.writer_waiting.load(Ordering::Relaxed)
        && let Ok(g) = t.rw.try_read()
    {
        return g;
    }
    t.readers_waiting.fetch_add(1, Ordering::Relaxed);
    let start = Instant::now();
    let g = loop {
        let spun = start.elapsed();
        if spun > READER_YIELD_MAX || !t.writer_waiting.load(Ordering::Relaxed) {
            match t.rw.try_read() {
                Ok(g) => break g,
                Err(TryLockError::Poisoned(p)) => break p.into_inner(),
                Err(TryLockError::WouldBlock) => {}
            }
        }
        if spun > WRITER_SPIN_MAX {
            break t.rw.read().unwrap_or_else(PoisonError::into_inner);
        }
        std::hint::spin_loop();
    };
    t.readers_waiting.fetch_sub(1, Ordering::Relaxed);
    g
}

/// Exclusive access to a table one bounded slice of work at a time: a
/// caller that applies or walks many sessions (the sync receiver) does it
/// in calls of at most [`SLICE`] sessions, and a shared table is unlocked
/// between calls so workers proceed.
pub trait Slices {
    fn slice<R>(&mut self, f: impl FnOnce(&mut SessionTable) -> R) -> R;
}

impl Slices for SessionTable {
    fn slice<R>(&mut self, f: impl FnOnce(&mut SessionTable) -> R) -> R {
        f(self)
    }
}

/// A [`SharedTable`] as [`Slices`]: the write lock per slice.
pub struct Sliced<'a>(pub &'a SharedTable);

impl Slices for Sliced<'_> {
    fn slice<R>(&mut self, f: impl FnOnce(&mut SessionTable) -> R) -> R {
        f(&mut lock_between_bursts(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::TableConfig;

    #[test]
    fn readers_share_and_a_slice_writer_gets_in_between_bursts() {
        let t = shared(SessionTable::new(TableConfig::default()));
        let a = read(&t);
        let b = read(&t);
        drop((a, b));
        let stop = Arc::new(AtomicBool::new(false));
        let bursts = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let reader = {
            let (t, stop, bursts) = (t.clone(), stop.clone(), bursts.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let g = read(&t);
                    std::hint::black_box(g.len());
                    drop(g);
                    bursts.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        while bursts.load(Ordering::Relaxed) == 0 {
            std::thread::yield_now();
        }
        // A writer taking slices while a reader bursts back to back
        // neither starves nor is starved: both make progress together.
        let before = bursts.load(Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut slices = 0u64;
        while (slices < 1000 || bursts.load(Ordering::Relaxed) - before < 1000)
            && Instant::now() < deadline
        {
            let g = lock_between_bursts(&t);
            std::hint::black_box(g.len());
            drop(g);
            slices += 1;
        }
        let during = bursts.load(Ordering::Relaxed) - before;
        stop.store(true, Ordering::Relaxed);
        reader.join().unwrap();
        assert!(
            slices >= 1000 && during >= 1000,
            "writer slices {slices}, reader bursts {during}"
        );
    }
}
