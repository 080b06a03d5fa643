//! The fabric forwarding map: per RG the owner and epoch, per link its
//! state, and the active link. `LinkSelector` is the pure state machine that
//! picks the active link from link health and time.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use tandem_proto::{Epoch, RgId};

/// One fabric link as the dataplane uses it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Link {
    /// The dataplane port (logical interface id) of the fabric device.
    pub port: u16,
    pub up: bool,
    pub local_mac: [u8; 6],
    /// Learned from the kernel's neighbor table for the peer's fabric
    /// address; `None` until known.
    pub peer_mac: Option<[u8; 6]>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RgOwner {
    /// The peer owns the RG: frames of it go over the fabric.
    pub peer_owns: bool,
    pub epoch: Epoch,
}

/// What the dataplane reads (through an `ArcSwap`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct FabricMap {
    pub rgs: BTreeMap<RgId, RgOwner>,
    /// fab0, fab1 (absent when not configured).
    pub links: Vec<Link>,
    /// Index into `links` of the link frames go out on.
    pub active: Option<usize>,
}

impl FabricMap {
    pub fn active_link(&self) -> Option<&Link> {
        self.active.and_then(|i| self.links.get(i))
    }
}

/// Chooses the active link: fab0 while it is up; fab1 when fab0 is down;
/// back to fab0 once it has been up for `hold_down_ms` (so a flapping fab0
/// does not bounce traffic between links).
#[derive(Clone, Debug)]
pub struct LinkSelector {
    hold_down_ms: u64,
    active: Option<usize>,
    /// When fab0 last came up.
    fab0_up_since: Option<u64>,
}

impl LinkSelector {
    pub fn new(hold_down_ms: u64) -> LinkSelector {
        LinkSelector {
            hold_down_ms,
            active: None,
            fab0_up_since: None,
        }
    }

    /// Feeds link health (index 0 = fab0) at `now_ms`; returns the active
    /// link.
    pub fn update(&mut self, up: &[bool], now_ms: u64) -> Option<usize> {
        let fab0 = up.first().copied().unwrap_or(false);
        let fab1 = up.get(1).copied().unwrap_or(false);
        match (fab0, self.fab0_up_since) {
            (true, None) => self.fab0_up_since = Some(now_ms),
            (false, Some(_)) => self.fab0_up_since = None,
            _ => {}
        }
        let fab0_settled = self
            .fab0_up_since
            .is_some_and(|t| now_ms.saturating_sub(t) >= self.hold_down_ms);
        self.active = match self.active {
            // Staying on fab0 while it is up.
            Some(0) if fab0 => Some(0),
            // On fab1 (or nothing): return to fab0 only once it settled,
            // or at once if fab1 is down too.
            Some(1) if fab1 && !fab0_settled => Some(1),
            _ if fab0 && (fab0_settled || !fab1 || self.active.is_none()) => Some(0),
            _ if fab1 => Some(1),
            _ => None,
        };
        self.active
    }
}

/// RGs 1..RG_COUNTERS-1 have their own frame counters; higher ids share
/// the last slot (the bound keeps the counters a fixed array).
pub const RG_COUNTERS: usize = 64;

/// Fabric counters, per link and per RG.
#[derive(Debug)]
pub struct FabricStats {
    pub sent: [AtomicU64; 2],
    pub received: [AtomicU64; 2],
    pub sent_by_rg: [AtomicU64; RG_COUNTERS],
    pub received_by_rg: [AtomicU64; RG_COUNTERS],
    pub drop_no_link: AtomicU64,
    pub drop_no_peer_mac: AtomicU64,
    pub drop_stale_epoch: AtomicU64,
    pub drop_bad_header: AtomicU64,
    /// A frame for an RG this node does not own arrived over the fabric:
    /// never sent back (loop guard).
    pub drop_loop: AtomicU64,
    pub drop_not_owner_map: AtomicU64,
}

impl Default for FabricStats {
    fn default() -> Self {
        FabricStats {
            sent: Default::default(),
            received: Default::default(),
            sent_by_rg: std::array::from_fn(|_| AtomicU64::new(0)),
            received_by_rg: std::array::from_fn(|_| AtomicU64::new(0)),
            drop_no_link: Default::default(),
            drop_no_peer_mac: Default::default(),
            drop_stale_epoch: Default::default(),
            drop_bad_header: Default::default(),
            drop_loop: Default::default(),
            drop_not_owner_map: Default::default(),
        }
    }
}

/// Frames one RG sent and received over the fabric.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RgFrames {
    /// The RG id; the last counter slot is shared by every id from
    /// `RG_COUNTERS - 1` up and reported under that id.
    pub rg: u16,
    pub sent: u64,
    pub received: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct FabricSnapshot {
    pub sent: [u64; 2],
    pub received: [u64; 2],
    /// RGs with traffic only.
    pub by_rg: Vec<RgFrames>,
    pub drop_no_link: u64,
    pub drop_no_peer_mac: u64,
    pub drop_stale_epoch: u64,
    pub drop_bad_header: u64,
    pub drop_loop: u64,
    pub drop_not_owner_map: u64,
}

impl FabricStats {
    fn rg_slot(rg: RgId) -> usize {
        usize::from(rg.0).min(RG_COUNTERS - 1)
    }

    /// Counts a frame of `rg` sent on link `link` (0 = fab0).
    pub fn count_sent(&self, link: usize, rg: RgId) {
        self.sent[link.min(1)].fetch_add(1, Ordering::Relaxed);
        self.sent_by_rg[Self::rg_slot(rg)].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a frame of `rg` accepted from link `link`.
    pub fn count_received(&self, link: usize, rg: RgId) {
        self.received[link.min(1)].fetch_add(1, Ordering::Relaxed);
        self.received_by_rg[Self::rg_slot(rg)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> FabricSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FabricSnapshot {
            sent: [l(&self.sent[0]), l(&self.sent[1])],
            received: [l(&self.received[0]), l(&self.received[1])],
            by_rg: (0..RG_COUNTERS)
                .map(|i| RgFrames {
                    rg: i as u16,
                    sent: l(&self.sent_by_rg[i]),
                    received: l(&self.received_by_rg[i]),
                })
                .filter(|r| r.sent + r.received > 0)
                .collect(),
            drop_no_link: l(&self.drop_no_link),
            drop_no_peer_mac: l(&self.drop_no_peer_mac),
            drop_stale_epoch: l(&self.drop_stale_epoch),
            drop_bad_header: l(&self.drop_bad_header),
            drop_loop: l(&self.drop_loop),
            drop_not_owner_map: l(&self.drop_not_owner_map),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fab0_preferred_while_up() {
        let mut s = LinkSelector::new(2000);
        assert_eq!(s.update(&[true, true], 0), Some(0));
        assert_eq!(s.update(&[true, true], 10_000), Some(0));
    }

    #[test]
    fn fab0_failure_switches_to_fab1_at_once() {
        let mut s = LinkSelector::new(2000);
        s.update(&[true, true], 0);
        assert_eq!(s.update(&[false, true], 100), Some(1));
    }

    #[test]
    fn return_to_fab0_waits_for_hold_down() {
        let mut s = LinkSelector::new(2000);
        s.update(&[true, true], 0);
        s.update(&[false, true], 100);
        assert_eq!(s.update(&[true, true], 200), Some(1), "fab0 just came back");
        assert_eq!(s.update(&[true, true], 2100), Some(1), "1.9 s of fab0 up");
        assert_eq!(s.update(&[true, true], 2200), Some(0), "settled");
    }

    #[test]
    fn flapping_fab0_does_not_bounce_traffic() {
        let mut s = LinkSelector::new(2000);
        s.update(&[true, true], 0);
        let mut t = 100;
        let mut switches = 0;
        let mut last = s.update(&[false, true], t);
        for i in 0..40 {
            t += 250;
            let a = s.update(&[i % 2 == 0, true], t);
            switches += usize::from(a != last);
            last = a;
        }
        assert_eq!(switches, 0, "stays on fab1 while fab0 flaps");
    }

    #[test]
    fn both_down_has_no_link_and_either_returning_is_used_at_once() {
        let mut s = LinkSelector::new(2000);
        s.update(&[true, true], 0);
        assert_eq!(s.update(&[false, false], 100), None);
        assert_eq!(
            s.update(&[true, false], 200),
            Some(0),
            "only fab0: no hold-down"
        );
        assert_eq!(s.update(&[false, false], 300), None);
        assert_eq!(s.update(&[false, true], 400), Some(1));
    }
}
