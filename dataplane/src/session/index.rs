//! A handle index: FxHash of a key -> slab handle. Open addressing with
//! linear probing over 8-byte slots `{handle, tag}`, where the tag is 32 bits
//! of the key's hash.
//!
//! Why not a `HashMap<Key, Handle>`: the key lives only in the record, so an
//! index costs 8 bytes per slot instead of ~45, and every hit is checked
//! against the record anyway (handles are reused). Why not hashbrown's raw
//! table: a burst lookup must know a probe's home slot to prefetch it, then
//! prefetch the candidate record, before comparing anything, so that the
//! cache misses of 32 lookups overlap; hashbrown does not expose the slot.
//!
//! The home slot and the tag come from the tag alone, so growing never
//! touches records. Deletion shifts followers back (no tombstones), so probe
//! lengths do not degrade with churn. Load stays at or below 3/4.

use rustc_hash::FxBuildHasher;
use std::hash::{BuildHasher, Hash};

const EMPTY: u32 = u32::MAX;

#[derive(Clone, Copy, Debug)]
struct Slot {
    handle: u32,
    tag: u32,
}

const VACANT: Slot = Slot {
    handle: EMPTY,
    tag: 0,
};

/// 32 bits of a key's FxHash.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Tag(u32);

impl Tag {
    #[inline]
    pub fn of<T: Hash + ?Sized>(key: &T) -> Tag {
        let h = FxBuildHasher.hash_one(key);
        Tag((h ^ (h >> 32)) as u32)
    }
}

pub(super) struct HandleIndex {
    slots: Vec<Slot>,
    /// log2 of the slot count.
    bits: u32,
    /// On a cache line of its own: every insert and removal writes it, and
    /// workers on other cores read `slots`/`bits` for every lookup.
    len: super::LineOf<usize>,
}

impl Default for HandleIndex {
    fn default() -> HandleIndex {
        HandleIndex::with_bits(4)
    }
}

impl HandleIndex {
    fn with_bits(bits: u32) -> HandleIndex {
        HandleIndex {
            slots: vec![VACANT; 1 << bits],
            bits,
            len: super::LineOf(0),
        }
    }

    #[inline]
    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    /// Fibonacci hashing of the tag: the top bits of the product pick the
    /// home slot, so every tag bit contributes.
    #[inline]
    fn home(&self, tag: Tag) -> usize {
        (u64::from(tag.0).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - self.bits)) as usize
    }

    /// Starts loading the cache line a probe for `tag` begins at.
    #[inline]
    pub fn prefetch(&self, tag: Tag) {
        super::prefetch(self.slots.get(self.home(tag)));
    }

    /// [`HandleIndex::prefetch`] plus the next line when the run's first
    /// slots cross into it: for probes that walk the run rather than stop
    /// at a hit — an insert's probe to the empty slot it fills, a removal's
    /// backward shift reading the follower (perf put a third of removal
    /// time on that miss). A hit lookup stops at its slot and skips it.
    #[inline]
    pub fn prefetch_run(&self, tag: Tag) {
        let home = self.home(tag);
        super::prefetch(self.slots.get(home));
        super::prefetch(self.slots.get((home + 2) & self.mask()));
    }

    /// The handle under `tag` for which `is_key` (a record comparison)
    /// holds.
    #[inline]
    pub fn find(&self, tag: Tag, mut is_key: impl FnMut(u32) -> bool) -> Option<u32> {
        let mask = self.mask();
        let mut i = self.home(tag);
        loop {
            let s = self.slots[i];
            if s.handle == EMPTY {
                return None;
            }
            if s.tag == tag.0 && is_key(s.handle) {
                return Some(s.handle);
            }
            i = (i + 1) & mask;
        }
    }

    /// The first handle whose tag matches, unverified: the caller compares
    /// the record's key and falls back to [`HandleIndex::find`].
    #[inline]
    pub fn candidate(&self, tag: Tag) -> Option<u32> {
        self.find(tag, |_| true)
    }

    /// Makes room for `additional` more entries without growing later.
    pub fn reserve(&mut self, additional: usize) {
        let need = self.len.0 + additional;
        let mut bits = self.bits;
        while need * 4 > (1usize << bits) * 3 {
            bits += 1;
        }
        if bits != self.bits {
            let old = std::mem::replace(&mut self.slots, vec![VACANT; 1 << bits]);
            self.bits = bits;
            for s in old.into_iter().filter(|s| s.handle != EMPTY) {
                self.place(s);
            }
        }
    }

    pub fn insert(&mut self, tag: Tag, handle: u32) {
        debug_assert_ne!(handle, EMPTY, "handle space exhausted");
        if (self.len.0 + 1) * 4 > self.slots.len() * 3 {
            self.grow();
        }
        self.place(Slot { handle, tag: tag.0 });
        self.len.0 += 1;
    }

    fn place(&mut self, slot: Slot) {
        let mask = self.mask();
        let mut i = self.home(Tag(slot.tag));
        while self.slots[i].handle != EMPTY {
            i = (i + 1) & mask;
        }
        self.slots[i] = slot;
    }

    fn grow(&mut self) {
        self.reserve(self.slots.len() * 3 / 4 + 1 - self.len.0);
    }

    /// Removes exactly this (tag, handle) entry; false if it was not there.
    pub fn remove(&mut self, tag: Tag, handle: u32) -> bool {
        let mask = self.mask();
        let mut hole = self.home(tag);
        loop {
            let s = self.slots[hole];
            if s.handle == EMPTY {
                return false;
            }
            // The tag too: values need not be unique across tags (the
            // remapped-endpoint index holds ports).
            if s.handle == handle && s.tag == tag.0 {
                break;
            }
            hole = (hole + 1) & mask;
        }
        // Backward shift: pull each follower whose home is not strictly
        // between the hole and itself into the hole.
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            let s = self.slots[j];
            if s.handle == EMPTY {
                break;
            }
            let home = self.home(Tag(s.tag));
            let dist_home = j.wrapping_sub(home) & mask;
            let dist_hole = j.wrapping_sub(hole) & mask;
            if dist_home >= dist_hole {
                self.slots[hole] = s;
                hole = j;
            }
        }
        self.slots[hole] = VACANT;
        self.len.0 -= 1;
        true
    }

    pub fn len(&self) -> usize {
        self.len.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_find_remove_with_colliding_tags() {
        let mut ix = HandleIndex::default();
        // Same tag for many handles: all in one probe run.
        for h in 0..40 {
            ix.insert(Tag(7), h);
        }
        for h in 0..40 {
            assert_eq!(ix.find(Tag(7), |x| x == h), Some(h));
        }
        for h in (0..40).step_by(2) {
            assert!(ix.remove(Tag(7), h));
        }
        assert!(!ix.remove(Tag(7), 0), "second removal reports absence");
        for h in 0..40 {
            assert_eq!(ix.find(Tag(7), |x| x == h).is_some(), h % 2 == 1);
        }
        assert_eq!(ix.len(), 20);
    }

    #[test]
    fn removal_takes_the_value_under_its_own_tag_only() {
        // Two entries with one value (a port) under tags sharing a run.
        let mut ix = HandleIndex::with_bits(3);
        let tags: Vec<Tag> = (0u32..)
            .map(Tag)
            .filter(|&t| ix.home(t) == 2)
            .take(2)
            .collect();
        ix.insert(tags[0], 100);
        ix.insert(tags[1], 100);
        assert!(ix.remove(tags[1], 100));
        assert_eq!(ix.find(tags[0], |_| true), Some(100));
        assert_eq!(ix.find(tags[1], |_| true), None);
    }

    #[test]
    fn backward_shift_keeps_wrapped_runs_reachable() {
        let mut ix = HandleIndex::with_bits(3);
        // Find tags whose home is the last slot, so runs wrap to slot 0.
        let tags: Vec<Tag> = (0u32..)
            .map(Tag)
            .filter(|&t| ix.home(t) == 7)
            .take(4)
            .collect();
        for (h, &t) in tags.iter().enumerate() {
            ix.insert(t, h as u32);
        }
        assert!(ix.remove(tags[0], 0));
        for (h, &t) in tags.iter().enumerate().skip(1) {
            assert_eq!(ix.find(t, |x| x == h as u32), Some(h as u32));
        }
    }

    #[test]
    fn growth_keeps_every_entry() {
        let mut ix = HandleIndex::default();
        for h in 0..10_000u32 {
            ix.insert(Tag::of(&h), h);
        }
        assert!(ix.slots.len() * 3 >= ix.len() * 4);
        for h in 0..10_000u32 {
            assert_eq!(ix.find(Tag::of(&h), |x| x == h), Some(h));
        }
    }
}
