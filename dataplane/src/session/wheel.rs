//! Expiry timer wheel. Entries are keyed by session key, never by slab
//! handle: a handle is reused after removal, so a handle-keyed entry could
//! expire an unrelated session that inherited the slot.
//!
//! Each session has one live entry (the record's `wheel_due` names it);
//! touching a session only moves `last_seen`, and the entry re-buckets itself
//! when it pops early. Older entries left behind are recognised by a due tick
//! that no longer matches the record and are dropped.

use super::key::SessionKey;
use super::record::Millis;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct WheelEntry {
    pub key: SessionKey,
    pub due: u32,
}

pub(super) struct Wheel {
    buckets: Vec<Vec<WheelEntry>>,
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
            buckets: (0..n).map(|_| Vec::new()).collect(),
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

    pub fn push(&mut self, key: SessionKey, due: u32) {
        let idx = (u64::from(due) & self.mask) as usize;
        self.buckets[idx].push(WheelEntry { key, due });
        self.entries += 1;
    }

    /// Ticks to process to reach `now`: `(first, last)` inclusive, or None.
    pub fn pending_ticks(&mut self, now: Millis) -> Option<(u64, u64)> {
        let target = self.tick_of(now);
        (target > self.cursor).then_some((self.cursor + 1, target))
    }

    /// Takes the bucket for `tick` out of the wheel (the caller pushes back
    /// what must stay). Reuses the bucket's allocation via `spare`.
    pub fn take_bucket(&mut self, tick: u64, spare: &mut Vec<WheelEntry>) {
        let idx = (tick & self.mask) as usize;
        spare.clear();
        std::mem::swap(&mut self.buckets[idx], spare);
        self.entries -= spare.len();
    }

    pub fn set_cursor(&mut self, tick: u64) {
        self.cursor = tick;
    }

    pub fn len(&self) -> usize {
        self.entries
    }

    pub fn iter(&self) -> impl Iterator<Item = &WheelEntry> {
        self.buckets.iter().flatten()
    }

    pub fn clear(&mut self) {
        for b in &mut self.buckets {
            b.clear();
        }
        self.entries = 0;
    }
}
