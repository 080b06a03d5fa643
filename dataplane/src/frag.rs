//! Virtual reassembly of IP fragments, as SRX does it: fragments are
//! forwarded as they come, never rebuilt into one datagram. The first
//! fragment (the only one with ports) goes through the session path like
//! any packet; its fate — the session's flow key, the fabric, or a drop —
//! is remembered per datagram (source, destination, protocol,
//! identification, ingress interface), and every later fragment follows
//! it: the same session, the same NAT (addresses only — the transport
//! checksum lives in the first fragment), the same owner. Later fragments
//! that arrive before their first are held, a few per datagram, until it
//! comes or the datagram times out.
//!
//! Each worker has its own table: RSS hashes fragments on addresses only
//! (ports are absent from all but the first), so a datagram's fragments
//! meet on one queue; the fabric keeps their order.
//!
//! Every bound is a constant here; at each, the fragment is dropped and
//! counted, never queued without limit: [`DATAGRAMS`] tracked datagrams,
//! [`PIECES`] fragments per datagram, [`HELD_PER_DATAGRAM`] and
//! [`HELD_BYTES`] for early fragments, [`TIMEOUT_MS`] for a datagram's
//! life. Overlapping fragments (RFC 5722) and datagrams beyond 65535
//! bytes poison the whole datagram.

use crate::session::{InterfaceId, Millis, SessionKey};
use rustc_hash::FxHashMap;
use tandem_proto::RgId;

/// Datagrams tracked at once per worker.
pub const DATAGRAMS: usize = 4096;
/// Fragments one datagram may have (64 KiB in 1280-byte fragments is 52).
pub const PIECES: usize = 64;
/// Early fragments held per datagram.
pub const HELD_PER_DATAGRAM: usize = 16;
/// Bytes of early fragments held per worker.
pub const HELD_BYTES: usize = 512 * 1024;
/// How long a datagram is tracked after its first fragment was seen.
pub const TIMEOUT_MS: u64 = 3000;
/// Largest datagram payload an IP header can describe.
pub const MAX_DATAGRAM: u32 = 65_535;

/// One datagram's identity (addresses in the table's 16-byte form).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DatagramKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub id: u32,
    pub proto: u8,
    pub ingress: InterfaceId,
}

/// What the first fragment's processing decided for the datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// Not known yet: the first fragment has not come.
    Pending,
    /// Forwarded with the session of this flow key.
    Flow(SessionKey),
    /// Handed to the peer over the fabric (it owns the RG).
    Fabric(RgId),
    /// Dropped: so is the rest.
    Dropped,
}

/// Why a fragment was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FragError {
    /// It overlaps a fragment already seen, or contradicts the known end.
    Overlap,
    /// Beyond 65535 bytes, or more than [`PIECES`] fragments.
    TooBig,
    /// No room: [`DATAGRAMS`] tracked, or the held-bytes bound.
    Full,
}

/// An early fragment waiting for its first (the frame as it arrived).
#[derive(Debug)]
pub struct HeldFragment {
    pub frame: Vec<u8>,
    /// It came over the fabric (to be processed as from the peer).
    pub via_fabric: bool,
}

#[derive(Debug)]
struct Datagram {
    fate: Fate,
    since: Millis,
    /// Byte ranges seen, sorted and merged.
    ranges: Vec<(u32, u32)>,
    pieces: usize,
    /// End of the datagram, once its last fragment was seen.
    end: Option<u32>,
    held: Vec<HeldFragment>,
    /// An overlap or an oversize was seen: everything after is dropped.
    poisoned: bool,
}

impl Datagram {
    fn new(now: Millis) -> Datagram {
        Datagram {
            fate: Fate::Pending,
            since: now,
            ranges: Vec::new(),
            pieces: 0,
            end: None,
            held: Vec::new(),
            poisoned: false,
        }
    }

    fn admits(&self, (start, end): (u32, u32), last: bool) -> Result<(), FragError> {
        if self.pieces >= PIECES {
            return Err(FragError::TooBig);
        }
        if self.ranges.iter().any(|&(s, e)| start < e && s < end) {
            return Err(FragError::Overlap);
        }
        match self.end {
            Some(known) if end > known || (last && end != known) => Err(FragError::Overlap),
            None if last && self.ranges.last().is_some_and(|&(_, e)| e > end) => {
                Err(FragError::Overlap)
            }
            _ => Ok(()),
        }
    }

    fn add(&mut self, (start, end): (u32, u32), last: bool) {
        self.pieces += 1;
        if last {
            self.end = Some(end);
        }
        let at = self.ranges.partition_point(|&(s, _)| s < start);
        self.ranges.insert(at, (start, end));
        // Merge with the neighbours it touches.
        let mut merged: Vec<(u32, u32)> = Vec::with_capacity(self.ranges.len());
        for &(s, e) in &self.ranges {
            match merged.last_mut() {
                Some((_, pe)) if *pe == s => *pe = e,
                _ => merged.push((s, e)),
            }
        }
        self.ranges = merged;
    }

    fn complete(&self) -> bool {
        self.end.is_some_and(|end| self.ranges == [(0, end)])
    }

    fn held_bytes(&self) -> usize {
        self.held.iter().map(|h| h.frame.len()).sum()
    }
}

/// What [`FragTable::expire`] removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Expired {
    pub datagrams: usize,
    /// Early fragments dropped with their datagram.
    pub held: usize,
}

/// One worker's fragment-tracking table.
#[derive(Debug, Default)]
pub struct FragTable {
    map: FxHashMap<DatagramKey, Datagram>,
    held_bytes: usize,
}

impl FragTable {
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Bytes of early fragments held.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// The datagram's fate if the fragment `range` (`last`: no more
    /// fragments follow) may join it; nothing is changed.
    pub fn check(
        &self,
        key: &DatagramKey,
        range: (u32, u32),
        last: bool,
    ) -> Result<Fate, FragError> {
        if range.1 > MAX_DATAGRAM {
            return Err(FragError::TooBig);
        }
        match self.map.get(key) {
            Some(d) if d.poisoned => Ok(Fate::Dropped),
            Some(d) => d.admits(range, last).map(|()| d.fate),
            None => Ok(Fate::Pending),
        }
    }

    /// Records a fragment that was handled (forwarded or dropped with its
    /// datagram). A completed datagram is forgotten at once. `Full` when a
    /// new datagram finds no room (the fragment was handled all the same;
    /// later ones will be held and time out).
    pub fn record(
        &mut self,
        key: DatagramKey,
        range: (u32, u32),
        last: bool,
        fate: Fate,
        now: Millis,
    ) -> Result<(), FragError> {
        self.expire_if_full(now);
        if !self.map.contains_key(&key) && self.map.len() >= DATAGRAMS {
            return Err(FragError::Full);
        }
        let d = self.map.entry(key).or_insert_with(|| Datagram::new(now));
        d.add(range, last);
        if fate != Fate::Pending {
            d.fate = fate;
        }
        if d.complete() && d.held.is_empty() && !d.poisoned {
            self.map.remove(&key);
        }
        Ok(())
    }

    /// Keeps a copy of an early fragment and records its range (`check`ed
    /// before), so later fragments are checked against it too.
    pub fn hold(
        &mut self,
        key: DatagramKey,
        range: (u32, u32),
        last: bool,
        frame: &[u8],
        via_fabric: bool,
        now: Millis,
    ) -> Result<(), FragError> {
        self.expire_if_full(now);
        if self.held_bytes + frame.len() > HELD_BYTES
            || (!self.map.contains_key(&key) && self.map.len() >= DATAGRAMS)
        {
            return Err(FragError::Full);
        }
        let d = self.map.entry(key).or_insert_with(|| Datagram::new(now));
        if d.held.len() >= HELD_PER_DATAGRAM {
            return Err(FragError::Full);
        }
        d.add(range, last);
        d.held.push(HeldFragment {
            frame: frame.to_vec(),
            via_fabric,
        });
        self.held_bytes += frame.len();
        Ok(())
    }

    /// The early fragments of `key`, to be handled now that its first came
    /// (their ranges are recorded already); a datagram complete with them
    /// is forgotten.
    pub fn take_held(&mut self, key: &DatagramKey) -> Vec<HeldFragment> {
        let Some(d) = self.map.get_mut(key) else {
            return Vec::new();
        };
        let held = std::mem::take(&mut d.held);
        self.held_bytes -= held.iter().map(|h| h.frame.len()).sum::<usize>();
        if d.complete() && !d.poisoned {
            self.map.remove(key);
        }
        held
    }

    /// Marks the datagram dropped (an overlap or an oversize): later
    /// fragments follow; its early fragments are returned, for counting.
    pub fn poison(&mut self, key: DatagramKey, now: Millis) -> usize {
        self.expire_if_full(now);
        if !self.map.contains_key(&key) && self.map.len() >= DATAGRAMS {
            return 0;
        }
        let d = self.map.entry(key).or_insert_with(|| Datagram::new(now));
        d.fate = Fate::Dropped;
        d.poisoned = true;
        self.take_held(&key).len()
    }

    /// Forgets datagrams older than [`TIMEOUT_MS`].
    pub fn expire(&mut self, now: Millis) -> Expired {
        let mut out = Expired::default();
        let mut freed = 0;
        self.map.retain(|_, d| {
            if now.saturating_sub(d.since) < TIMEOUT_MS {
                return true;
            }
            out.datagrams += 1;
            out.held += d.held.len();
            freed += d.held_bytes();
            false
        });
        self.held_bytes -= freed;
        out
    }

    /// Before refusing a new datagram for want of room, drop the expired
    /// ones (their early fragments are counted by the next `expire`'s
    /// caller as lost either way).
    fn expire_if_full(&mut self, now: Millis) {
        if self.map.len() >= DATAGRAMS {
            let mut freed = 0;
            self.map.retain(|_, d| {
                let keep = now.saturating_sub(d.since) < TIMEOUT_MS;
                if !keep {
                    freed += d.held_bytes();
                }
                keep
            });
            self.held_bytes -= freed;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: u32) -> DatagramKey {
        DatagramKey {
            src: [1; 16],
            dst: [2; 16],
            id,
            proto: 17,
            ingress: InterfaceId(0),
        }
    }

    #[test]
    fn a_completed_datagram_is_forgotten() {
        let mut t = FragTable::default();
        let flow = Fate::Dropped;
        t.record(key(1), (0, 1480), false, flow, Millis(0)).unwrap();
        assert_eq!(t.check(&key(1), (1480, 2960), false), Ok(flow));
        t.record(key(1), (1480, 2960), false, flow, Millis(0))
            .unwrap();
        assert_eq!(t.len(), 1);
        t.record(key(1), (2960, 3008), true, flow, Millis(0))
            .unwrap();
        assert!(t.is_empty());
    }

    #[test]
    fn overlapping_and_contradicting_fragments_are_refused() {
        let mut t = FragTable::default();
        t.record(key(1), (0, 1480), false, Fate::Dropped, Millis(0))
            .unwrap();
        assert_eq!(
            t.check(&key(1), (1472, 2000), false),
            Err(FragError::Overlap)
        );
        assert_eq!(t.check(&key(1), (0, 8), false), Err(FragError::Overlap));
        t.record(key(1), (2960, 3000), true, Fate::Pending, Millis(0))
            .unwrap();
        // Beyond the known end, or a second, different end.
        assert_eq!(
            t.check(&key(1), (3000, 3008), false),
            Err(FragError::Overlap)
        );
        assert_eq!(
            t.check(&key(1), (1480, 2000), true),
            Err(FragError::Overlap)
        );
        assert_eq!(t.check(&key(1), (1480, 2960), false), Ok(Fate::Dropped));
        assert_eq!(
            t.check(&key(2), (65_000, 65_536), true),
            Err(FragError::TooBig)
        );
    }

    #[test]
    fn a_last_fragment_before_a_later_range_is_refused() {
        let mut t = FragTable::default();
        t.record(key(1), (2960, 4000), false, Fate::Pending, Millis(0))
            .unwrap();
        assert_eq!(
            t.check(&key(1), (1480, 2960), true),
            Err(FragError::Overlap)
        );
    }

    #[test]
    fn held_fragments_are_bounded_per_datagram_and_in_bytes() {
        let mut t = FragTable::default();
        for _ in 0..HELD_PER_DATAGRAM {
            t.hold(key(1), (8, 16), false, &[0; 100], false, Millis(0))
                .unwrap();
        }
        assert_eq!(
            t.hold(key(1), (8, 16), false, &[0; 100], false, Millis(0)),
            Err(FragError::Full)
        );
        assert_eq!(t.held_bytes(), 100 * HELD_PER_DATAGRAM);
        let big = vec![0; 9000];
        let mut n = 0;
        while t
            .hold(key(100 + n), (8, 16), false, &big, false, Millis(0))
            .is_ok()
        {
            n += 1;
        }
        assert!(t.held_bytes() <= HELD_BYTES);
        assert_eq!(n as usize, (HELD_BYTES - 100 * HELD_PER_DATAGRAM) / 9000);
        assert_eq!(t.take_held(&key(1)).len(), HELD_PER_DATAGRAM);
        assert_eq!(t.held_bytes(), n as usize * 9000);
    }

    #[test]
    fn datagrams_expire_with_their_held_fragments() {
        let mut t = FragTable::default();
        t.hold(key(1), (8, 16), false, &[0; 64], true, Millis(0))
            .unwrap();
        t.record(key(2), (0, 8), false, Fate::Dropped, Millis(10))
            .unwrap();
        assert_eq!(t.expire(Millis(TIMEOUT_MS - 1)), Expired::default());
        assert_eq!(
            t.expire(Millis(TIMEOUT_MS)),
            Expired {
                datagrams: 1,
                held: 1
            }
        );
        assert_eq!(t.held_bytes(), 0);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn the_table_is_bounded_and_makes_room_from_expired_datagrams() {
        let mut t = FragTable::default();
        for id in 0..DATAGRAMS as u32 {
            t.record(key(id), (0, 8), false, Fate::Dropped, Millis(0))
                .unwrap();
        }
        assert_eq!(
            t.record(key(u32::MAX), (0, 8), false, Fate::Dropped, Millis(1)),
            Err(FragError::Full)
        );
        assert_eq!(t.len(), DATAGRAMS);
        t.record(
            key(u32::MAX),
            (0, 8),
            false,
            Fate::Dropped,
            Millis(TIMEOUT_MS),
        )
        .unwrap();
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn a_poisoned_datagram_refuses_everything_after() {
        let mut t = FragTable::default();
        t.hold(key(1), (8, 16), false, &[0; 64], false, Millis(0))
            .unwrap();
        assert_eq!(t.poison(key(1), Millis(0)), 1);
        assert_eq!(t.check(&key(1), (0, 16), false), Ok(Fate::Dropped));
        assert_eq!(t.held_bytes(), 0);
    }
}
