//! Source-NAT mappings: which internal endpoint each public (address,
//! protocol, port) belongs to.
//!
//! A mapping is endpoint-independent (RFC 4787 REQ-1, RFC 5382 REQ-1): an
//! internal address:port keeps its public port for every destination while
//! any session of it lives, and the port is the internal one when it is
//! free (port preservation). A mapping is a session companion: it is
//! opened inside the insert transaction of its first session and closed in
//! the one removal function with its last, so it never exists without a
//! session.
//!
//! What is stored is small because most of a mapping is its sessions: per
//! public (address, protocol) a bit and the newest session's handle per
//! port (8 KiB + 256 KiB, kept once created: the addresses are the
//! configuration's), the rest of the session list is linked through the
//! table (`mapping_links`), and the internal endpoint is read from the
//! newest session's key. An index (endpoint, address, protocol) -> port
//! finds an endpoint's mapping in one probe: its 32-bit tag spares the
//! record read for every endpoint that has no mapping yet.

use super::index::{HandleIndex, Tag};
use super::key::{Addr, NatBinding, ZoneId};
use rustc_hash::FxHashMap;
use std::ops::RangeInclusive;

const WORDS: usize = 65536 / 64;
/// No session (the end of a mapping's session list).
pub const NIL: u32 = u32::MAX;
/// Flag on a head slot: the mapping has this one session, whose list
/// links were never written (most mappings: no link traffic for them).
pub const SOLE: u32 = 1 << 31;

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
    /// The newest of its sessions (head of the session list).
    pub(super) head: u32,
    /// `head` is its only session (and has no links).
    pub(super) sole: bool,
}

/// The binding is another endpoint's, or the endpoint has another port on
/// the address (one endpoint, one mapping per public address).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Taken;

/// What [`NatMappings::allocate`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allocated {
    /// The endpoint's live mapping.
    Joined(u16),
    /// A new mapping (closed again with [`NatMappings::close`] if the
    /// insert fails).
    Opened(u16),
}

impl Allocated {
    pub fn port(self) -> u16 {
        match self {
            Allocated::Joined(p) | Allocated::Opened(p) => p,
        }
    }
}

/// The mappings of one public (address, protocol).
struct PortMap {
    /// A bit per port with a mapping: allocation scans a word at a time.
    bits: Box<[u64; WORDS]>,
    /// Newest session of each mapped port ([`NIL`] only while the first
    /// session's insert is in progress).
    heads: Box<[u32]>,
    in_use: u32,
    /// Where the next allocation scan starts (round robin spreads reuse).
    cursor: u16,
}

impl PortMap {
    fn new() -> PortMap {
        PortMap {
            bits: Box::new([0; WORDS]),
            heads: vec![NIL; 65536].into_boxed_slice(),
            in_use: 0,
            cursor: 0,
        }
    }

    fn open(&mut self, port: u16) {
        self.bits[usize::from(port >> 6)] |= 1 << (port & 63);
        self.in_use += 1;
        self.heads[usize::from(port)] = NIL;
    }

    fn is_set(&self, port: u16) -> bool {
        self.bits[usize::from(port >> 6)] & (1 << (port & 63)) != 0
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

/// `internal`'s port in `map`, found through the endpoint index. A mapping
/// whose first session is still being inserted (head NIL) is the caller's
/// own: it is never looked up meanwhile.
fn find_port(
    index: &HandleIndex,
    map: &PortMap,
    tag: Tag,
    internal: &Endpoint,
    endpoint_of: impl Fn(u32) -> Endpoint,
) -> Option<u16> {
    index
        .find(tag, |p| {
            let port = p as u16;
            map.is_set(port) && {
                let h = map.heads[usize::from(port)];
                h != NIL && endpoint_of(h & !SOLE) == *internal
            }
        })
        .map(|p| p as u16)
}

/// Mappings for every source-NAT address the table has seen. Methods that
/// need a mapping's internal endpoint are given `endpoint_of`, which reads
/// it from a session (the table's records).
#[derive(Default)]
pub struct NatMappings {
    maps: FxHashMap<(Addr, u8), PortMap>,
    /// (endpoint, public address, protocol) -> port of every mapping.
    by_endpoint: HandleIndex,
}

/// The endpoint index's tag of `internal`'s mapping on (`addr`, `proto`).
pub(super) fn endpoint_tag(internal: &Endpoint, addr: Addr, proto: u8) -> Tag {
    Tag::of(&(internal, addr, proto))
}

impl NatMappings {
    /// Sizes the endpoint index for `n` mappings up front (a rehash
    /// inside a writer's slice would stall the workers).
    pub fn reserve(&mut self, n: usize) {
        self.by_endpoint.reserve(n);
    }

    /// Starts loading the endpoint-index run of a tag
    /// ([`endpoint_tag`]).
    #[inline]
    pub(super) fn prefetch_endpoint(&self, tag: Tag) {
        self.by_endpoint.prefetch_run(tag);
    }

    /// Starts loading the head slot of `b` (written when a session of it
    /// comes or goes).
    #[inline]
    pub fn prefetch_head(&self, b: &NatBinding) {
        if let Some(m) = self.maps.get(&(b.addr, b.proto)) {
            super::prefetch(m.heads.get(usize::from(b.port)));
        }
    }

    /// A port on `addr` for a new session of `internal`: the endpoint's
    /// live mapping when its port is in `range` (endpoint-independent
    /// mapping), else a new mapping on `internal.port` when free and in
    /// range, else on the next free port. `None`: the range is exhausted,
    /// or the endpoint's live mapping lies outside it.
    pub fn allocate(
        &mut self,
        addr: Addr,
        proto: u8,
        range: RangeInclusive<u16>,
        internal: Endpoint,
        endpoint_of: impl Fn(u32) -> Endpoint,
    ) -> Option<Allocated> {
        let tag = endpoint_tag(&internal, addr, proto);
        let map = self.maps.entry((addr, proto)).or_insert_with(PortMap::new);
        // The head slot a new mapping will write: the preserved port's,
        // else usually the scan's first (the cursor).
        super::prefetch(map.heads.get(usize::from(internal.port)));
        super::prefetch(map.heads.get(usize::from(map.cursor)));
        if let Some(port) = find_port(&self.by_endpoint, map, tag, &internal, &endpoint_of) {
            // One endpoint, one mapping per address: a rule whose range
            // excludes the live one cannot give it a second.
            return range.contains(&port).then_some(Allocated::Joined(port));
        }
        let port = if range.contains(&internal.port) && !map.is_set(internal.port) {
            internal.port
        } else {
            map.find_free(&range)?
        };
        map.cursor = port.wrapping_add(1);
        map.open(port);
        self.by_endpoint.insert(tag, u32::from(port));
        Some(Allocated::Opened(port))
    }

    /// Exactly this binding for `internal` (a peer-synced session): joins
    /// its mapping or opens it.
    pub fn take(
        &mut self,
        b: NatBinding,
        internal: Endpoint,
        endpoint_of: impl Fn(u32) -> Endpoint,
    ) -> Result<Allocated, Taken> {
        match self.port_of(b.addr, b.proto, &internal, &endpoint_of) {
            Some(p) if p == b.port => Ok(Allocated::Joined(p)),
            Some(_) => Err(Taken),
            None if self.is_reserved(b) => Err(Taken),
            None => {
                self.open(b, &internal);
                Ok(Allocated::Opened(b.port))
            }
        }
    }

    fn open(&mut self, b: NatBinding, internal: &Endpoint) {
        self.maps
            .entry((b.addr, b.proto))
            .or_insert_with(PortMap::new)
            .open(b.port);
        self.by_endpoint
            .insert(endpoint_tag(internal, b.addr, b.proto), u32::from(b.port));
    }

    /// Closes `b`'s mapping of `internal` (its last session left, or its
    /// first one's insert failed). Returns false when there was none.
    pub fn close(&mut self, b: NatBinding, internal: &Endpoint) -> bool {
        let Some(map) = self.maps.get_mut(&(b.addr, b.proto)) else {
            return false;
        };
        if !map.is_set(b.port) {
            return false;
        }
        map.bits[usize::from(b.port >> 6)] &= !(1u64 << (b.port & 63));
        map.in_use -= 1;
        map.heads[usize::from(b.port)] = NIL;
        self.by_endpoint
            .remove(endpoint_tag(internal, b.addr, b.proto), u32::from(b.port));
        true
    }

    /// The public port `internal` is mapped to on (`addr`, `proto`).
    pub fn port_of(
        &self,
        addr: Addr,
        proto: u8,
        internal: &Endpoint,
        endpoint_of: impl Fn(u32) -> Endpoint,
    ) -> Option<u16> {
        let map = self.maps.get(&(addr, proto))?;
        find_port(
            &self.by_endpoint,
            map,
            endpoint_tag(internal, addr, proto),
            internal,
            endpoint_of,
        )
    }

    /// The newest session of `b`'s mapping, with [`SOLE`] when it is the
    /// only one ([`NIL`] if none).
    pub fn head(&self, b: &NatBinding) -> u32 {
        self.maps
            .get(&(b.addr, b.proto))
            .filter(|m| m.is_set(b.port))
            .map_or(NIL, |m| m.heads[usize::from(b.port)])
    }

    /// The head slot of `b`'s mapping, if it has one.
    pub fn head_slot(&mut self, b: &NatBinding) -> Option<&mut u32> {
        self.maps
            .get_mut(&(b.addr, b.proto))
            .filter(|m| m.is_set(b.port))
            .map(|m| &mut m.heads[usize::from(b.port)])
    }

    /// Sets the newest session of `b`'s mapping; no-op without one.
    pub fn set_head(&mut self, b: &NatBinding, head: u32) {
        if let Some(map) = self.maps.get_mut(&(b.addr, b.proto))
            && map.is_set(b.port)
        {
            map.heads[usize::from(b.port)] = head;
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

    /// Entries of the endpoint index (one per mapping).
    pub fn indexed(&self) -> usize {
        self.by_endpoint.len()
    }

    /// Every mapped binding and its head slot (O(ports); for the self
    /// check).
    pub fn iter(&self) -> impl Iterator<Item = (NatBinding, u32)> + '_ {
        self.maps.iter().flat_map(|(&(addr, proto), m)| {
            (0..=u16::MAX)
                .filter(|&p| m.is_set(p))
                .map(move |port| (NatBinding { addr, port, proto }, m.heads[usize::from(port)]))
        })
    }
}

#[cfg(test)]
mod tests {
    //! Driven with a stand-in for the table: session handle -> endpoint.
    use super::*;
    use std::cell::RefCell;
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

    /// Mappings plus the "sessions" (one per opened mapping) that own them.
    #[derive(Default)]
    struct Rig {
        m: NatMappings,
        sessions: RefCell<Vec<Endpoint>>,
    }

    impl Rig {
        fn alloc(&mut self, proto: u8, range: RangeInclusive<u16>, ep: Endpoint) -> Option<u16> {
            let sessions = &self.sessions;
            let got = self
                .m
                .allocate(a(), proto, range, ep, |h| sessions.borrow()[h as usize])?;
            if let Allocated::Opened(p) = got {
                let h = sessions.borrow().len() as u32;
                sessions.borrow_mut().push(ep);
                self.m.set_head(&binding(p, proto), h);
            }
            Some(got.port())
        }

        fn port_of(&self, proto: u8, ep: Endpoint) -> Option<u16> {
            let sessions = &self.sessions;
            self.m
                .port_of(a(), proto, &ep, |h| sessions.borrow()[h as usize])
        }
    }

    #[test]
    fn allocate_preserves_the_internal_port_when_free() {
        let mut r = Rig::default();
        assert_eq!(r.alloc(6, 1024..=65535, inside(2, 40000)), Some(40000));
        assert_ne!(r.alloc(6, 1024..=65535, inside(3, 40000)), Some(40000));
    }

    #[test]
    fn a_remapped_endpoint_is_found_again_and_forgotten_when_closed() {
        let mut r = Rig::default();
        assert_eq!(r.alloc(17, 1024..=65535, inside(3, 5000)), Some(5000));
        let port = r.alloc(17, 1024..=65535, inside(2, 5000)).unwrap();
        assert_ne!(port, 5000);
        assert_eq!(r.alloc(17, 1024..=65535, inside(2, 5000)), Some(port));
        assert_eq!(r.port_of(17, inside(2, 5000)), Some(port));
        assert_eq!((r.m.reserved(), r.m.indexed()), (2, 2));
        assert!(r.m.close(binding(port, 17), &inside(2, 5000)));
        assert_eq!(r.port_of(17, inside(2, 5000)), None);
        assert_eq!(r.port_of(17, inside(3, 5000)), Some(5000));
        assert_eq!((r.m.reserved(), r.m.indexed()), (1, 1));
        assert!(!r.m.close(binding(port, 17), &inside(2, 5000)));
    }

    #[test]
    fn a_mapping_outside_the_rules_range_is_not_reused_nor_doubled() {
        let mut r = Rig::default();
        assert_eq!(r.alloc(17, 100..=200, inside(2, 150)), Some(150));
        assert_eq!(r.alloc(17, 300..=400, inside(2, 150)), None);
        assert_eq!(r.m.reserved(), 1);
    }

    #[test]
    fn allocate_exhausts_small_range_then_refuses() {
        let mut r = Rig::default();
        let mut ports: Vec<u16> = (1..=4)
            .map(|h| r.alloc(17, 100..=103, inside(h, 9)).unwrap())
            .collect();
        ports.sort_unstable();
        assert_eq!(ports, vec![100, 101, 102, 103]);
        assert_eq!(r.alloc(17, 100..=103, inside(5, 9)), None);
        let holder = r.sessions.borrow()[2];
        let port = r.port_of(17, holder).unwrap();
        assert!(r.m.close(binding(port, 17), &holder));
        assert_eq!(r.alloc(17, 100..=103, inside(5, 9)), Some(port));
    }

    #[test]
    fn protocols_have_separate_port_spaces() {
        let mut r = Rig::default();
        assert_eq!(r.alloc(6, 5000..=5000, inside(2, 1)), Some(5000));
        assert_eq!(r.alloc(17, 5000..=5000, inside(2, 1)), Some(5000));
        assert_eq!(r.alloc(6, 5000..=5000, inside(3, 1)), None);
    }

    #[test]
    fn scan_crosses_word_boundaries_and_range_end() {
        let mut r = Rig::default();
        for h in 60..=70 {
            assert!(r.alloc(6, 60..=70, inside(h, 1)).is_some());
        }
        assert_eq!(r.alloc(6, 60..=70, inside(99, 1)), None);
        assert_eq!(r.m.reserved(), 11);
    }

    #[test]
    fn take_joins_the_same_endpoint_and_refuses_another() {
        let mut r = Rig::default();
        r.alloc(17, 7000..=7000, inside(2, 7000));
        let sessions = &r.sessions;
        let of = |h: u32| sessions.borrow()[h as usize];
        assert_eq!(
            r.m.take(binding(7000, 17), inside(2, 7000), of),
            Ok(Allocated::Joined(7000))
        );
        assert_eq!(r.m.take(binding(7000, 17), inside(3, 7000), of), Err(Taken));
        // One endpoint, one mapping per address and protocol.
        assert_eq!(r.m.take(binding(7001, 17), inside(2, 7000), of), Err(Taken));
        assert_eq!(
            r.m.take(binding(7001, 17), inside(4, 1), of),
            Ok(Allocated::Opened(7001))
        );
    }
}
