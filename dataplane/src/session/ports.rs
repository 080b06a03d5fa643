//! Source-NAT port reservations: one bitmap per (address, protocol).
//!
//! A reservation is a session companion: the table takes it inside the
//! insert transaction and releases it in the one removal function.

use super::key::{Addr, NatBinding};
use rustc_hash::FxHashMap;
use std::ops::RangeInclusive;

const WORDS: usize = 65536 / 64;

/// Ports in use on one (address, protocol); 8 KiB regardless of load.
struct PortMap {
    bits: Box<[u64; WORDS]>,
    in_use: u32,
    /// Where the next allocation scan starts (round robin spreads reuse).
    cursor: u16,
}

impl PortMap {
    fn new() -> PortMap {
        PortMap {
            bits: Box::new([0; WORDS]),
            in_use: 0,
            cursor: 0,
        }
    }

    fn is_set(&self, port: u16) -> bool {
        self.bits[usize::from(port >> 6)] & (1 << (port & 63)) != 0
    }

    fn set(&mut self, port: u16) {
        self.bits[usize::from(port >> 6)] |= 1 << (port & 63);
        self.in_use += 1;
    }

    fn clear(&mut self, port: u16) -> bool {
        let word = &mut self.bits[usize::from(port >> 6)];
        let mask = 1u64 << (port & 63);
        let was = *word & mask != 0;
        *word &= !mask;
        if was {
            self.in_use -= 1;
        }
        was
    }

    /// First free port in `range` at or after the cursor, wrapping once.
    fn find_free(&self, range: &RangeInclusive<u16>) -> Option<u16> {
        let (lo, hi) = (*range.start(), *range.end());
        let start = self.cursor.clamp(lo, hi);
        self.scan(start, hi).or_else(|| self.scan(lo, start))
    }

    /// Word-at-a-time scan of `[from, to]` for a clear bit.
    fn scan(&self, from: u16, to: u16) -> Option<u16> {
        let mut port = u32::from(from);
        let to = u32::from(to);
        while port <= to {
            let word_idx = (port >> 6) as usize;
            let bit = port & 63;
            let free = !self.bits[word_idx] & (u64::MAX << bit);
            if free != 0 {
                let candidate = (port & !63) + free.trailing_zeros();
                return (candidate <= to).then_some(candidate as u16);
            }
            port = (port & !63) + 64;
        }
        None
    }
}

/// Port reservations for every source-NAT address the table has seen.
#[derive(Default)]
pub struct PortAllocator {
    maps: FxHashMap<(Addr, u8), PortMap>,
}

impl PortAllocator {
    /// Reserves `preferred` if it is free and in range, else the next free
    /// port in `range`. `None` means the range is exhausted.
    pub fn allocate(
        &mut self,
        addr: Addr,
        proto: u8,
        range: RangeInclusive<u16>,
        preferred: Option<u16>,
    ) -> Option<u16> {
        let map = self.maps.entry((addr, proto)).or_insert_with(PortMap::new);
        let port = match preferred {
            Some(p) if range.contains(&p) && !map.is_set(p) => p,
            _ => map.find_free(&range)?,
        };
        map.set(port);
        map.cursor = port.wrapping_add(1);
        Some(port)
    }

    /// Reserves exactly this binding (a peer-synced session's port).
    /// Returns false when it is already taken.
    pub fn reserve(&mut self, b: NatBinding) -> bool {
        let map = self
            .maps
            .entry((b.addr, b.proto))
            .or_insert_with(PortMap::new);
        if map.is_set(b.port) {
            return false;
        }
        map.set(b.port);
        true
    }

    /// Returns false when the binding was not reserved (a table bug).
    pub fn release(&mut self, b: NatBinding) -> bool {
        let Some(map) = self.maps.get_mut(&(b.addr, b.proto)) else {
            return false;
        };
        let was = map.clear(b.port);
        if map.in_use == 0 {
            self.maps.remove(&(b.addr, b.proto));
        }
        was
    }

    pub fn is_reserved(&self, b: NatBinding) -> bool {
        self.maps
            .get(&(b.addr, b.proto))
            .is_some_and(|m| m.is_set(b.port))
    }

    /// Total reserved ports across all addresses.
    pub fn reserved(&self) -> u64 {
        self.maps.values().map(|m| u64::from(m.in_use)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn a() -> Addr {
        Addr::v4(Ipv4Addr::new(198, 51, 100, 1))
    }

    #[test]
    fn allocate_prefers_requested_port_when_free() {
        let mut p = PortAllocator::default();
        assert_eq!(p.allocate(a(), 6, 1024..=65535, Some(40000)), Some(40000));
        assert_ne!(p.allocate(a(), 6, 1024..=65535, Some(40000)), Some(40000));
    }

    #[test]
    fn allocate_exhausts_small_range_then_refuses() {
        let mut p = PortAllocator::default();
        let got: Vec<_> = (0..4)
            .map(|_| p.allocate(a(), 17, 100..=103, None))
            .collect();
        let mut ports: Vec<u16> = got.into_iter().map(Option::unwrap).collect();
        ports.sort_unstable();
        assert_eq!(ports, vec![100, 101, 102, 103]);
        assert_eq!(p.allocate(a(), 17, 100..=103, None), None);
        assert!(p.release(NatBinding {
            addr: a(),
            port: 102,
            proto: 17
        }));
        assert_eq!(p.allocate(a(), 17, 100..=103, None), Some(102));
    }

    #[test]
    fn protocols_have_separate_port_spaces() {
        let mut p = PortAllocator::default();
        assert_eq!(p.allocate(a(), 6, 5000..=5000, None), Some(5000));
        assert_eq!(p.allocate(a(), 17, 5000..=5000, None), Some(5000));
        assert_eq!(p.allocate(a(), 6, 5000..=5000, None), None);
    }

    #[test]
    fn scan_crosses_word_boundaries_and_range_end() {
        let mut p = PortAllocator::default();
        for _ in 60..=70 {
            assert!(p.allocate(a(), 6, 60..=70, None).is_some());
        }
        assert_eq!(p.allocate(a(), 6, 60..=70, None), None);
        assert_eq!(p.reserved(), 11);
    }

    #[test]
    fn release_of_unreserved_binding_reports_false() {
        let mut p = PortAllocator::default();
        assert!(!p.release(NatBinding {
            addr: a(),
            port: 1,
            proto: 6
        }));
    }
}
