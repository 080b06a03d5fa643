//! Live sessions per source and per destination address, for the screens'
//! session limits: two count-min sketches (two rows of [`ROW`] counters
//! each, 1 MiB together), incremented when a session enters the table and
//! decremented when it leaves by the one removal path, so they count
//! exactly what the table holds. An address's estimate is the smaller of
//! its two counters: never below the truth, above it only when both
//! counters are shared with other addresses (slots chosen by a secret
//! hash, so a sender cannot aim at another address's slots).

use super::key::{Addr, SessionKey};
use std::hash::{BuildHasher, RandomState};

/// Counters per row.
pub const ROW: usize = 1 << 16;

#[derive(Debug)]
pub struct AddressCounts {
    src: Box<[u32]>,
    dst: Box<[u32]>,
    secret: RandomState,
}

impl Default for AddressCounts {
    fn default() -> AddressCounts {
        AddressCounts {
            src: vec![0; 2 * ROW].into_boxed_slice(),
            dst: vec![0; 2 * ROW].into_boxed_slice(),
            secret: RandomState::new(),
        }
    }
}

impl AddressCounts {
    fn slots(&self, a: &Addr) -> [usize; 2] {
        let h = self.secret.hash_one(a);
        [(h as usize) % ROW, ROW + ((h >> 32) as usize) % ROW]
    }

    /// A session of `key` entered the table.
    pub fn add(&mut self, key: &SessionKey) {
        for i in self.slots(&key.src) {
            self.src[i] = self.src[i].saturating_add(1);
        }
        for i in self.slots(&key.dst) {
            self.dst[i] = self.dst[i].saturating_add(1);
        }
    }

    /// A session of `key` left the table.
    pub fn remove(&mut self, key: &SessionKey) {
        for i in self.slots(&key.src) {
            self.src[i] = self.src[i].saturating_sub(1);
        }
        for i in self.slots(&key.dst) {
            self.dst[i] = self.dst[i].saturating_sub(1);
        }
    }

    /// Live sessions from `src` and to `dst` (estimates, never low).
    pub fn get(&self, src: &Addr, dst: &Addr) -> (u32, u32) {
        let est = |row: &[u32], a: &Addr| self.slots(a).map(|i| row[i]).into_iter().min();
        (
            est(&self.src, src).unwrap_or(0),
            est(&self.dst, dst).unwrap_or(0),
        )
    }

    /// Whether the counters are exactly those of a table holding `keys`.
    pub fn matches<'a>(&self, keys: impl Iterator<Item = &'a SessionKey>) -> bool {
        let mut fresh = AddressCounts {
            src: vec![0; 2 * ROW].into_boxed_slice(),
            dst: vec![0; 2 * ROW].into_boxed_slice(),
            secret: self.secret.clone(),
        };
        for k in keys {
            fresh.add(k);
        }
        fresh.src == self.src && fresh.dst == self.dst
    }
}
