//! A vector stored in fixed-size blocks: push and swap-remove are O(1)
//! and growing it never moves what it holds.
//!
//! The timer wheel's buckets and the per-RG member lists grow with the
//! sessions of one tick or one RG — a million sessions created in one
//! 250 ms tick, or a million-session bulk, in one of them. A `Vec` doubles
//! by copying: at a million 48-byte wheel entries that is a 24 MB copy
//! (and fresh huge pages to fault in) inside one slice of a writer, which
//! stalled the workers for 40 ms. Blocks of `B` elements grow by one
//! allocation of `B` at a time instead.

/// Elements per block (a power of two).
const SHIFT: usize = 10;
const B: usize = 1 << SHIFT;

#[derive(Clone, Debug)]
pub(super) struct SegVec<T> {
    /// Full-size blocks; only the first `len` elements are meaningful.
    blocks: Vec<Box<[T]>>,
    len: usize,
}

impl<T> Default for SegVec<T> {
    fn default() -> Self {
        SegVec {
            blocks: Vec::new(),
            len: 0,
        }
    }
}

impl<T: Copy + Default> SegVec<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[inline]
    pub fn push(&mut self, v: T) {
        let (block, at) = (self.len >> SHIFT, self.len & (B - 1));
        if block == self.blocks.len() {
            // A whole block at once, written now: its pages are faulted in
            // here, not one by one under later pushes.
            self.blocks.push(vec![T::default(); B].into_boxed_slice());
        }
        self.blocks[block][at] = v;
        self.len += 1;
    }

    #[inline]
    pub fn get(&self, i: usize) -> Option<&T> {
        (i < self.len).then(|| &self.blocks[i >> SHIFT][i & (B - 1)])
    }

    pub fn last(&self) -> Option<&T> {
        self.len.checked_sub(1).and_then(|i| self.get(i))
    }

    /// Removes element `i` by moving the last element into its place;
    /// returns the removed element (None if `i` is out of range).
    #[inline]
    pub fn swap_remove(&mut self, i: usize) -> Option<T> {
        if i >= self.len {
            return None;
        }
        self.len -= 1;
        let last = self.len;
        let tail = self.blocks[last >> SHIFT][last & (B - 1)];
        // Emptied blocks are kept for the next growth, as a `Vec` keeps its
        // capacity: memory is the largest size reached, and refilling
        // after churn neither allocates nor faults pages in.
        if i == last {
            return Some(tail);
        }
        Some(std::mem::replace(
            &mut self.blocks[i >> SHIFT][i & (B - 1)],
            tail,
        ))
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> + '_ {
        self.blocks.iter().flat_map(|b| b.iter()).take(self.len)
    }

    pub fn clear(&mut self) {
        self.blocks.clear();
        self.len = 0;
    }

    /// Elements the kept blocks hold room for.
    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.blocks.len() * B
    }
}

impl<T: Copy + Default> std::ops::Index<usize> for SegVec<T> {
    type Output = T;
    fn index(&self, i: usize) -> &T {
        self.get(i).expect("index within the length")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any sequence of pushes and swap-removes leaves the same elements
        /// in the same order as a `Vec` doing the same.
        #[test]
        fn behaves_like_a_vec(ops in proptest::collection::vec((any::<bool>(), any::<u16>()), 0..5000)) {
            let mut s = SegVec::default();
            let mut v = Vec::new();
            for (push, x) in ops {
                if push || v.is_empty() {
                    s.push(x);
                    v.push(x);
                } else {
                    let i = usize::from(x) % v.len();
                    prop_assert_eq!(s.swap_remove(i), Some(v.swap_remove(i)));
                }
                prop_assert_eq!(s.len(), v.len());
                prop_assert_eq!(s.last(), v.last());
            }
            prop_assert!(s.iter().copied().eq(v.iter().copied()));
            prop_assert_eq!(s.swap_remove(v.len()), None);
            prop_assert!(s.capacity() >= s.len());
        }
    }
}
