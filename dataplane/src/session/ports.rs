//! Source-NAT mappings: which internal endpoint each public (address,
//! protocol, port) belongs to, and how many sessions use it.
//!
//! A mapping is endpoint-independent (RFC 4787 REQ-1, RFC 5382 REQ-1): an
//! internal address:port keeps its public port for every destination while
//! any session of it lives, and the port is the internal one when it is
//! free (port preservation). Every session using a mapping holds one
//! reference, taken inside the table's insert transaction and released in
//! its one removal function, so a mapping never outlives its last session
//! and never exists without one.
//!
//! Bounds: one [`PortMap`] per public (address, protocol) the table has
//! seen — 65,536 slots of 28 bytes plus an 8 KiB bitmap (1.8 MiB), and an
//! endpoint index of at most 65,536 entries; maps are kept once created
//! (the addresses are the configuration's, so they are few).

use super::key::{Addr, NatBinding, ZoneId};
use rustc_hash::FxHashMap;
use std::ops::RangeInclusive;

const WORDS: usize = 65536 / 64;
/// No session (the end of a mapping's session list).
pub const NIL: u32 = u32::MAX;

/// The inside end of a mapping: a session's original source.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub addr: Addr,
    pub port: u16,
    pub zone: ZoneId,
}

/// A live mapping as the table reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub internal: Endpoint,
    /// Sessions using it (≥ 1).
    pub sessions: u32,
    /// The most recently created of them (head of the session list).
    pub(super) head: u32,
}

/// Why a binding could not be taken for a given internal endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeldByOther(pub Endpoint);

#[derive(Clone, Copy)]
struct Slot {
    internal: Endpoint,
    refs: u32,
    head: u32,
}

const FREE: Slot = Slot {
    internal: Endpoint {
        addr: Addr([0; 16]),
        port: 0,
        zone: ZoneId(0),
    },
    refs: 0,
    head: NIL,
};

/// The mappings of one public (address, protocol).
struct PortMap {
    /// A bit per port with a mapping: allocation scans a word at a time.
    bits: Box<[u64; WORDS]>,
    slots: Box<[Slot]>,
    by_endpoint: FxHashMap<Endpoint, u16>,
    in_use: u32,
    /// Where the next allocation scan starts (round robin spreads reuse).
    cursor: u16,
}

impl PortMap {
    fn new() -> PortMap {
        PortMap {
            bits: Box::new([0; WORDS]),
            slots: vec![FREE; 65536].into_boxed_slice(),
            by_endpoint: FxHashMap::default(),
            in_use: 0,
            cursor: 0,
        }
    }

    fn is_set(&self, port: u16) -> bool {
        self.bits[usize::from(port >> 6)] & (1 << (port & 63)) != 0
    }

    fn open(&mut self, port: u16, internal: Endpoint) {
        self.bits[usize::from(port >> 6)] |= 1 << (port & 63);
        self.in_use += 1;
        self.slots[usize::from(port)] = Slot {
            internal,
            refs: 1,
            head: NIL,
        };
        self.by_endpoint.insert(internal, port);
    }

    fn close(&mut self, port: u16) {
        self.bits[usize::from(port >> 6)] &= !(1u64 << (port & 63));
        self.in_use -= 1;
        let s = std::mem::replace(&mut self.slots[usize::from(port)], FREE);
        self.by_endpoint.remove(&s.internal);
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

/// Mappings for every source-NAT address the table has seen.
#[derive(Default)]
pub struct NatMappings {
    maps: FxHashMap<(Addr, u8), PortMap>,
    /// References over all mappings (one per NAT session).
    refs: u64,
}

impl NatMappings {
    /// A port on `addr` for a new session of `internal`: the endpoint's
    /// live mapping when its port is in `range` (endpoint-independent
    /// mapping), else a new one on `internal.port` when free and in range,
    /// else on the next free port. Takes one reference. `None`: the range
    /// is exhausted, or the endpoint's live mapping lies outside it.
    pub fn allocate(
        &mut self,
        addr: Addr,
        proto: u8,
        range: RangeInclusive<u16>,
        internal: Endpoint,
    ) -> Option<u16> {
        let map = self.maps.entry((addr, proto)).or_insert_with(PortMap::new);
        if let Some(&port) = map.by_endpoint.get(&internal) {
            // One endpoint, one mapping per address: a rule whose range
            // excludes the live one cannot give it a second.
            if !range.contains(&port) {
                return None;
            }
            map.slots[usize::from(port)].refs += 1;
            self.refs += 1;
            return Some(port);
        }
        let port = if range.contains(&internal.port) && !map.is_set(internal.port) {
            internal.port
        } else {
            map.find_free(&range)?
        };
        map.open(port, internal);
        map.cursor = port.wrapping_add(1);
        self.refs += 1;
        Some(port)
    }

    /// Takes a reference on exactly this binding for `internal` (a
    /// peer-synced session): joins its mapping or opens it. Refused when
    /// another endpoint holds the binding, or when `internal` already has
    /// another port on this address (one endpoint, one mapping).
    pub fn take(&mut self, b: NatBinding, internal: Endpoint) -> Result<(), HeldByOther> {
        let map = self
            .maps
            .entry((b.addr, b.proto))
            .or_insert_with(PortMap::new);
        if map.is_set(b.port) {
            let slot = &mut map.slots[usize::from(b.port)];
            if slot.internal != internal {
                return Err(HeldByOther(slot.internal));
            }
            slot.refs += 1;
        } else {
            if map.by_endpoint.contains_key(&internal) {
                return Err(HeldByOther(internal));
            }
            map.open(b.port, internal);
        }
        self.refs += 1;
        Ok(())
    }

    /// Drops one reference; the mapping closes with its last. Returns
    /// false when the binding had no mapping (a table bug).
    pub fn release(&mut self, b: NatBinding) -> bool {
        let Some(map) = self.maps.get_mut(&(b.addr, b.proto)) else {
            return false;
        };
        if !map.is_set(b.port) {
            return false;
        }
        let slot = &mut map.slots[usize::from(b.port)];
        slot.refs -= 1;
        if slot.refs == 0 {
            map.close(b.port);
        }
        self.refs -= 1;
        true
    }

    pub fn get(&self, b: &NatBinding) -> Option<Mapping> {
        let map = self.maps.get(&(b.addr, b.proto))?;
        map.is_set(b.port).then(|| {
            let s = &map.slots[usize::from(b.port)];
            Mapping {
                internal: s.internal,
                sessions: s.refs,
                head: s.head,
            }
        })
    }

    /// The public port `internal` is mapped to on (`addr`, `proto`).
    pub fn port_of(&self, addr: Addr, proto: u8, internal: &Endpoint) -> Option<u16> {
        self.maps
            .get(&(addr, proto))?
            .by_endpoint
            .get(internal)
            .copied()
    }

    /// Sets the head of the binding's session list (the table keeps the
    /// links); no-op without a mapping.
    pub(super) fn set_head(&mut self, b: &NatBinding, head: u32) {
        if let Some(map) = self.maps.get_mut(&(b.addr, b.proto))
            && map.is_set(b.port)
        {
            map.slots[usize::from(b.port)].head = head;
        }
    }

    pub fn is_reserved(&self, b: NatBinding) -> bool {
        self.maps
            .get(&(b.addr, b.proto))
            .is_some_and(|m| m.is_set(b.port))
    }

    /// Ports with a mapping, across all addresses.
    pub fn reserved(&self) -> u64 {
        self.maps.values().map(|m| u64::from(m.in_use)).sum()
    }

    /// References over all mappings: the number of NAT sessions.
    pub fn references(&self) -> u64 {
        self.refs
    }

    /// Every live mapping (O(ports); for the self check).
    pub fn iter(&self) -> impl Iterator<Item = (NatBinding, Mapping)> + '_ {
        self.maps.iter().flat_map(|(&(addr, proto), m)| {
            (0..=u16::MAX).filter(|&p| m.is_set(p)).map(move |port| {
                let s = &m.slots[usize::from(port)];
                (
                    NatBinding { addr, port, proto },
                    Mapping {
                        internal: s.internal,
                        sessions: s.refs,
                        head: s.head,
                    },
                )
            })
        })
    }

    /// Checks the endpoint index against the slots.
    pub fn verify(&self) -> Result<(), String> {
        for (&(addr, proto), m) in &self.maps {
            if m.by_endpoint.len() != m.in_use as usize {
                return Err(format!(
                    "{addr}/{proto}: {} endpoints for {} mappings",
                    m.by_endpoint.len(),
                    m.in_use
                ));
            }
            for (ep, &port) in &m.by_endpoint {
                let s = &m.slots[usize::from(port)];
                if !m.is_set(port) || s.internal != *ep || s.refs == 0 {
                    return Err(format!(
                        "{addr}/{proto}: endpoint {ep:?} -> {port} is stale"
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn a() -> Addr {
        Addr::v4(Ipv4Addr::new(198, 51, 100, 1))
    }

    fn inside(host: u8, port: u16) -> Endpoint {
        Endpoint {
            addr: Addr::v4(Ipv4Addr::new(10, 0, 0, host)),
            port,
            zone: ZoneId(1),
        }
    }

    fn binding(port: u16, proto: u8) -> NatBinding {
        NatBinding {
            addr: a(),
            port,
            proto,
        }
    }

    #[test]
    fn allocate_preserves_the_internal_port_when_free() {
        let mut p = NatMappings::default();
        assert_eq!(
            p.allocate(a(), 6, 1024..=65535, inside(2, 40000)),
            Some(40000)
        );
        assert_ne!(
            p.allocate(a(), 6, 1024..=65535, inside(3, 40000)),
            Some(40000)
        );
    }

    #[test]
    fn one_endpoint_keeps_its_port_for_every_session_and_frees_it_with_the_last() {
        let mut p = NatMappings::default();
        // Another host holds 5000 first, so host 2 is remapped ...
        assert_eq!(
            p.allocate(a(), 17, 1024..=65535, inside(3, 5000)),
            Some(5000)
        );
        let port = p.allocate(a(), 17, 1024..=65535, inside(2, 5000)).unwrap();
        assert_ne!(port, 5000);
        // ... and keeps that remapped port for its next sessions.
        for _ in 0..3 {
            assert_eq!(
                p.allocate(a(), 17, 1024..=65535, inside(2, 5000)),
                Some(port)
            );
        }
        let m = p.get(&binding(port, 17)).unwrap();
        assert_eq!((m.internal, m.sessions), (inside(2, 5000), 4));
        assert_eq!((p.reserved(), p.references()), (2, 5));
        for left in (0..4).rev() {
            assert!(p.release(binding(port, 17)));
            assert_eq!(
                p.get(&binding(port, 17)).map(|m| m.sessions),
                (left > 0).then_some(left)
            );
        }
        assert_eq!(p.port_of(a(), 17, &inside(2, 5000)), None);
        assert_eq!((p.reserved(), p.references()), (1, 1));
        p.verify().unwrap();
    }

    #[test]
    fn a_mapping_outside_the_rules_range_is_not_reused() {
        let mut p = NatMappings::default();
        assert_eq!(p.allocate(a(), 17, 100..=200, inside(2, 150)), Some(150));
        // The same endpoint under a rule with another range: a port of that
        // range is needed, and the endpoint already has one here, so none.
        assert_eq!(p.allocate(a(), 17, 300..=400, inside(2, 150)), None);
    }

    #[test]
    fn allocate_exhausts_small_range_then_refuses() {
        let mut p = NatMappings::default();
        let ports: Vec<u16> = (1..=4)
            .map(|h| p.allocate(a(), 17, 100..=103, inside(h, 9)).unwrap())
            .collect();
        let mut sorted = ports.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, vec![100, 101, 102, 103]);
        assert_eq!(p.allocate(a(), 17, 100..=103, inside(5, 9)), None);
        assert!(p.release(binding(102, 17)));
        assert_eq!(p.allocate(a(), 17, 100..=103, inside(5, 9)), Some(102));
    }

    #[test]
    fn protocols_have_separate_port_spaces() {
        let mut p = NatMappings::default();
        assert_eq!(p.allocate(a(), 6, 5000..=5000, inside(2, 1)), Some(5000));
        assert_eq!(p.allocate(a(), 17, 5000..=5000, inside(2, 1)), Some(5000));
        assert_eq!(p.allocate(a(), 6, 5000..=5000, inside(3, 1)), None);
    }

    #[test]
    fn scan_crosses_word_boundaries_and_range_end() {
        let mut p = NatMappings::default();
        for h in 60..=70 {
            assert!(p.allocate(a(), 6, 60..=70, inside(h, 1)).is_some());
        }
        assert_eq!(p.allocate(a(), 6, 60..=70, inside(99, 1)), None);
        assert_eq!(p.reserved(), 11);
    }

    #[test]
    fn take_joins_the_same_endpoint_and_refuses_another() {
        let mut p = NatMappings::default();
        assert_eq!(p.take(binding(7000, 17), inside(2, 7000)), Ok(()));
        assert_eq!(p.take(binding(7000, 17), inside(2, 7000)), Ok(()));
        assert_eq!(
            p.take(binding(7000, 17), inside(3, 7000)),
            Err(HeldByOther(inside(2, 7000)))
        );
        // One endpoint, one mapping per address and protocol.
        assert_eq!(
            p.take(binding(7001, 17), inside(2, 7000)),
            Err(HeldByOther(inside(2, 7000)))
        );
        assert_eq!(p.get(&binding(7000, 17)).unwrap().sessions, 2);
        assert_eq!(p.references(), 2);
        p.verify().unwrap();
    }

    #[test]
    fn release_of_unreserved_binding_reports_false() {
        let mut p = NatMappings::default();
        assert!(!p.release(binding(1, 6)));
        assert_eq!(p.references(), 0);
    }
}
