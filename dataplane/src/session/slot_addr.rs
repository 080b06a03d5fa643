//! Where a slab slot's record lies, computed without reading the slot.
//!
//! The burst paths take a handle from an index and prefetch its record
//! before comparing any key, so the misses of a whole burst overlap.
//! `Slab::get` (and `get_unchecked`) first read the slot's occupancy, which
//! waits for the very miss the prefetch is meant to hide: perf put a
//! quarter of a burst lookup's samples on that read. A slot's address is
//! instead `base + handle * stride`, both taken from the slab itself.
//!
//! The address is only ever a prefetch hint: it is never dereferenced, so a
//! stale one (the slab's buffer moved since it was taken) makes a prefetch
//! useless, never wrong.

use super::record::SessionRecord;
use slab::Slab;

const LINE: usize = 64;

#[derive(Clone, Copy, Debug)]
pub(super) struct SlotAddr {
    /// Address of slot 0's record.
    base: usize,
    /// Bytes between consecutive slots (the slab's entry size).
    stride: usize,
}

impl SlotAddr {
    pub fn new() -> SlotAddr {
        // The entry size is a property of the type: measure it once on a
        // two-slot slab.
        let mut probe = Slab::with_capacity(2);
        let a = probe.insert(SessionRecord::blank());
        let b = probe.insert(SessionRecord::blank());
        SlotAddr {
            base: 0,
            stride: addr(&probe[b]) - addr(&probe[a]),
        }
    }

    /// Re-derives the base from occupied slot `h` (after an insert, which
    /// may have moved the buffer).
    #[inline]
    pub fn update(&mut self, slab: &Slab<SessionRecord>, h: usize) {
        let base = addr(&slab[h]).wrapping_sub(h.wrapping_mul(self.stride));
        // Written only when the buffer moved: workers on other cores read
        // this line for every prefetch.
        if base != self.base {
            self.base = base;
        }
    }

    /// Starts loading the `len` bytes at `offset` in slot `h`'s record:
    /// every cache line they touch.
    #[inline]
    pub fn prefetch(&self, h: u32, offset: usize, len: usize) {
        let start = self
            .base
            .wrapping_add((h as usize).wrapping_mul(self.stride))
            .wrapping_add(offset);
        let mut at = start;
        while at < start.wrapping_add(len.saturating_sub(1)) {
            super::prefetch_addr(at);
            at = at.wrapping_add(LINE);
        }
        super::prefetch_addr(start.wrapping_add(len.saturating_sub(1)));
    }

    #[cfg(test)]
    pub fn of(&self, h: usize) -> usize {
        self.base.wrapping_add(h.wrapping_mul(self.stride))
    }
}

fn addr(r: &SessionRecord) -> usize {
    std::ptr::from_ref(r).addr()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The burst lookups prefetch `key..=tcp_state` and `tcp_state..reverse
    /// end`; a reordered record would silently add a dependent miss per
    /// lookup.
    #[test]
    fn record_layout_keeps_each_key_next_to_the_slab_niche() {
        use super::super::key::SessionKey;
        use std::mem::{offset_of, size_of};
        let key = size_of::<SessionKey>();
        assert_eq!(offset_of!(SessionRecord, key), 0);
        assert_eq!(offset_of!(SessionRecord, tcp_state), key);
        assert!(offset_of!(SessionRecord, reverse) - offset_of!(SessionRecord, tcp_state) <= 8);
        // 192 bytes (160 + 32 of TCP windows): the slab entry is the
        // record (the niche holds the occupancy), part of the
        // 300-byte-per-session budget.
        assert_eq!(size_of::<SessionRecord>(), 192);
        assert_eq!(SlotAddr::new().stride, 192);
    }

    #[test]
    fn computed_addresses_match_the_slab_after_growth() {
        let mut slab = Slab::new();
        let mut at = SlotAddr::new();
        for _ in 0..1000 {
            let h = slab.insert(SessionRecord::blank());
            at.update(&slab, h);
        }
        slab.remove(10);
        for h in [0usize, 1, 9, 11, 999] {
            assert_eq!(at.of(h), addr(&slab[h]), "slot {h}");
        }
    }
}
