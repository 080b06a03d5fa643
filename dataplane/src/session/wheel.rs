//! Expiry timer wheel: exactly one entry per session, removed with it.
//!
//! An entry names its session by handle (8 bytes with its due tick: no
//! copy of the key, whose check guarded slot reuse when entries outlived
//! their sessions; now the record's own `wheel_due`/`wheel_pos` naming the
//! entry is the check, and `verify_invariants` proves the wheel 1:1).
//! Each record stores where
//! its entry is (`wheel_due` picks the bucket, `wheel_pos` the position),
//! so removing a session removes its entry at once (swap-remove; the
//! caller re-points the entry moved into the hole). The wheel's memory is
//! therefore the live session count, whatever the churn: leaving removed
//! sessions' entries to pop on their own would hold one entry per closed
//! connection for up to the longest timeout (30 min of churn).
//!
//! Touching a session only moves `last_seen`; its entry re-buckets itself
//! when it pops early. A shorter timeout moves the entry earlier.

use super::record::Millis;
use super::segvec::SegVec;

/// `wheel_pos` of a record whose entry is out of the wheel (being
/// looked at by an expiry pass).
pub(super) const NOT_QUEUED: u32 = u32::MAX;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct WheelEntry {
    pub handle: u32,
    pub due: u32,
}

pub(super) struct Wheel {
    /// Segmented: a bucket of a million entries (one tick's sessions)
    /// grows without a copy.
    buckets: Vec<SegVec<WheelEntry>>,
    mask: u64,
    tick_ms: u64,
    /// Absolute tick of the first time seen; ticks are counted from it so a
    /// large monotonic clock neither overflows a u32 due tick nor makes the
    /// first pass walk from zero. At the default 250 ms tick a u32 lasts 34
    /// years.
    origin: Option<u64>,
    /// Every tick up to and including this one has been processed.
    cursor: u64,
    entries: usize,
}

impl Wheel {
    pub fn new(buckets: usize, tick_ms: u64) -> Wheel {
        let n = buckets.next_power_of_two().max(2);
        Wheel {
            buckets: (0..n).map(|_| SegVec::default()).collect(),
            mask: (n - 1) as u64,
            tick_ms: tick_ms.max(1),
            origin: None,
            cursor: 0,
            entries: 0,
        }
    }

    fn tick_of(&mut self, t: Millis) -> u64 {
        let abs = t.0 / self.tick_ms;
        abs.saturating_sub(*self.origin.get_or_insert(abs))
    }

    pub fn span(&self) -> u64 {
        self.mask + 1
    }

    /// The due tick for a session expiring at `expires`, seen at `now`: the
    /// end of the tick containing `expires`, never a tick already processed.
    pub fn due_tick_for(&mut self, now: Millis, expires: Millis) -> u32 {
        self.tick_of(now);
        let due = (self.tick_of(expires) + 1).max(self.cursor + 1);
        u32::try_from(due).unwrap_or(u32::MAX)
    }

    fn bucket_of(&self, due: u32) -> usize {
        (u64::from(due) & self.mask) as usize
    }

    /// Queues an entry; returns its position in its bucket.
    pub fn push(&mut self, handle: u32, due: u32) -> u32 {
        let idx = self.bucket_of(due);
        let b = &mut self.buckets[idx];
        b.push(WheelEntry { handle, due });
        self.entries += 1;
        u32::try_from(b.len() - 1).expect("a bucket holds fewer than 2^32 entries")
    }

    /// Removes the entry at `pos` of `due`'s bucket. Returns the entry
    /// moved into `pos` (its record's `wheel_pos` must become `pos`).
    pub fn remove(&mut self, due: u32, pos: u32) -> Option<WheelEntry> {
        let idx = self.bucket_of(due);
        let b = &mut self.buckets[idx];
        let pos = pos as usize;
        debug_assert!(
            pos < b.len() && b[pos].due == due,
            "entry where its record says"
        );
        if pos >= b.len() {
            return None;
        }
        b.swap_remove(pos);
        self.entries -= 1;
        b.get(pos).copied()
    }

    /// Starts loading the entry at `pos` of `due`'s bucket and the bucket's
    /// last entry (what a removal touches).
    pub fn prefetch(&self, due: u32, pos: u32) {
        let b = &self.buckets[self.bucket_of(due)];
        super::prefetch(b.get(pos as usize));
        super::prefetch(b.last());
    }

    pub fn at(&self, due: u32, pos: u32) -> Option<&WheelEntry> {
        self.buckets[self.bucket_of(due)].get(pos as usize)
    }

    /// Ticks to process to reach `now`: `(first, last)` inclusive, or None.
    pub fn pending_ticks(&mut self, now: Millis) -> Option<(u64, u64)> {
        let target = self.tick_of(now);
        (target > self.cursor).then_some((self.cursor + 1, target))
    }

    /// Entries in the bucket of `tick`.
    pub fn bucket_len(&self, tick: u64) -> usize {
        self.buckets[(tick & self.mask) as usize].len()
    }

    /// The entry at `pos` in the bucket of `tick` (`pos < bucket_len`).
    pub fn entry(&self, tick: u64, pos: usize) -> WheelEntry {
        self.buckets[(tick & self.mask) as usize][pos]
    }

    /// Marks every tick up to `tick` processed: entries queued from now on
    /// are due after it.
    pub fn set_cursor(&mut self, tick: u64) {
        self.cursor = tick;
    }

    pub fn len(&self) -> usize {
        self.entries
    }

    pub fn clear(&mut self) {
        for b in &mut self.buckets {
            b.clear();
        }
        self.entries = 0;
    }
}
