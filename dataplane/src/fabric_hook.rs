//! The dataplane's side of fabric forwarding: addresses frames for the
//! owner of their RG on the active fabric link, and accepts frames from the
//! peer — fenced by epoch, never sent back (loop guard).

use crate::afxdp::{FabricHook, FabricInbound, FabricTx};
use crate::session::InterfaceId;
use arc_swap::ArcSwap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tandem_fabric::{FabricHeader, FabricMap, FabricStats, Kind};
use tandem_proto::RgId;

pub struct FabricForwarder {
    map: Arc<ArcSwap<FabricMap>>,
    pub stats: Arc<FabricStats>,
}

impl FabricForwarder {
    pub fn new(map: Arc<ArcSwap<FabricMap>>, stats: Arc<FabricStats>) -> FabricForwarder {
        FabricForwarder { map, stats }
    }

    fn send(&self, kind: Kind, rg: RgId, iface: InterfaceId) -> Option<FabricTx> {
        let map = self.map.load();
        let Some(owner) = map.rgs.get(&rg).filter(|o| o.peer_owns) else {
            self.stats
                .drop_not_owner_map
                .fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let Some((idx, link)) = map.active.and_then(|i| map.links.get(i).map(|l| (i, l))) else {
            self.stats.drop_no_link.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let Some(peer_mac) = link.peer_mac else {
            self.stats.drop_no_peer_mac.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let header = FabricHeader {
            kind,
            rg,
            epoch: owner.epoch,
            iface: iface.0,
        };
        self.stats.count_sent(idx, rg);
        Some(FabricTx {
            port: InterfaceId(link.port),
            prefix: header.prefix(peer_mac, link.local_mac),
        })
    }
}

impl FabricHook for FabricForwarder {
    fn to_owner(&mut self, rg: RgId, ingress: InterfaceId) -> Option<FabricTx> {
        self.send(Kind::Ingress, rg, ingress)
    }

    fn egress_to_owner(&mut self, rg: RgId, iface: InterfaceId) -> Option<FabricTx> {
        self.send(Kind::Egress, rg, iface)
    }

    fn arrived_on_fabric(&mut self, frame: &[u8], port: InterfaceId) -> Option<FabricInbound> {
        let (h, _inner) = match FabricHeader::decapsulate(frame) {
            Ok(x) => x,
            Err(_) => {
                self.stats.drop_bad_header.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        };
        let map = self.map.load();
        let Some(owner) = map.rgs.get(&h.rg) else {
            self.stats
                .drop_not_owner_map
                .fetch_add(1, Ordering::Relaxed);
            return None;
        };
        if owner.peer_owns {
            // This node does not own the RG either: never send it back.
            self.stats.drop_loop.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        if h.epoch < owner.epoch {
            self.stats.drop_stale_epoch.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let link = map.links.iter().position(|l| l.port == port.0).unwrap_or(0);
        self.stats.count_received(link, h.rg);
        let iface = InterfaceId(h.iface);
        Some(match h.kind {
            Kind::Ingress => FabricInbound::Process { iface },
            Kind::Egress => FabricInbound::Transmit { iface },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_fabric::{Link, RgOwner};
    use tandem_proto::Epoch;

    fn map(peer_owns: bool, epoch: u64, active: Option<usize>) -> Arc<ArcSwap<FabricMap>> {
        Arc::new(ArcSwap::from_pointee(FabricMap {
            rgs: [(
                RgId(1),
                RgOwner {
                    peer_owns,
                    epoch: Epoch(epoch),
                },
            )]
            .into(),
            links: vec![
                Link {
                    port: 10,
                    up: true,
                    local_mac: [0xa0; 6],
                    peer_mac: Some([0xb0; 6]),
                },
                Link {
                    port: 11,
                    up: true,
                    local_mac: [0xa1; 6],
                    peer_mac: Some([0xb1; 6]),
                },
            ],
            active,
        }))
    }

    fn pair(
        sender: Arc<ArcSwap<FabricMap>>,
        receiver: Arc<ArcSwap<FabricMap>>,
    ) -> (FabricForwarder, FabricForwarder) {
        (
            FabricForwarder::new(sender, Arc::default()),
            FabricForwarder::new(receiver, Arc::default()),
        )
    }

    /// What the worker puts on the wire for a hand-off: the prefix, then
    /// the frame.
    fn wire(tx: Option<FabricTx>, inner: &[u8]) -> (InterfaceId, Vec<u8>) {
        let tx = tx.expect("sent");
        let mut f = tx.prefix.to_vec();
        f.extend_from_slice(inner);
        (tx.port, f)
    }

    #[test]
    fn frame_for_a_peer_owned_rg_reaches_it_on_the_active_link() {
        let (mut tx, mut rx) = pair(map(true, 4, Some(1)), map(false, 4, Some(1)));
        let (port, frame) = wire(tx.to_owner(RgId(1), InterfaceId(0)), b"original frame");
        assert_eq!(port, InterfaceId(11), "fab1 is active");
        assert_eq!(&frame[0..6], &[0xb1; 6]);
        assert_eq!(&frame[6..12], &[0xa1; 6]);
        assert_eq!(
            rx.arrived_on_fabric(&frame, InterfaceId(11)),
            Some(FabricInbound::Process {
                iface: InterfaceId(0)
            }),
            "processed as arrived on its own member of the ingress reth"
        );
        assert_eq!(&frame[tandem_fabric::header::OVERHEAD..], b"original frame");
        assert_eq!(tx.stats.snapshot().sent, [0, 1]);
        assert_eq!(rx.stats.snapshot().received, [0, 1]);
    }

    #[test]
    fn egress_frames_are_transmitted_not_reprocessed() {
        let (mut tx, mut rx) = pair(map(true, 4, Some(0)), map(false, 4, Some(0)));
        let (_, frame) = wire(tx.egress_to_owner(RgId(1), InterfaceId(1)), b"processed");
        assert_eq!(
            rx.arrived_on_fabric(&frame, InterfaceId(10)),
            Some(FabricInbound::Transmit {
                iface: InterfaceId(1)
            })
        );
    }

    #[test]
    fn stale_epoch_frames_are_dropped_and_counted() {
        let (mut tx, mut rx) = pair(map(true, 3, Some(0)), map(false, 5, Some(0)));
        let (_, frame) = wire(tx.to_owner(RgId(1), InterfaceId(0)), b"x");
        assert!(rx.arrived_on_fabric(&frame, InterfaceId(10)).is_none());
        assert_eq!(rx.stats.snapshot().drop_stale_epoch, 1);
    }

    #[test]
    fn frames_for_an_rg_this_node_does_not_own_are_never_sent_back() {
        let (mut tx, mut rx) = pair(map(true, 4, Some(0)), map(true, 4, Some(0)));
        let (_, frame) = wire(tx.to_owner(RgId(1), InterfaceId(0)), b"x");
        assert!(rx.arrived_on_fabric(&frame, InterfaceId(10)).is_none());
        assert_eq!(rx.stats.snapshot().drop_loop, 1);
    }

    #[test]
    fn no_active_link_or_unknown_peer_mac_drops_with_a_reason() {
        let mut tx = FabricForwarder::new(map(true, 4, None), Arc::default());
        assert_eq!(tx.to_owner(RgId(1), InterfaceId(0)), None);
        assert_eq!(tx.stats.snapshot().drop_no_link, 1);
        let m = map(true, 4, Some(0));
        let mut inner = (*m.load_full()).clone();
        inner.links[0].peer_mac = None;
        m.store(Arc::new(inner));
        let mut tx = FabricForwarder::new(m, Arc::default());
        assert_eq!(tx.to_owner(RgId(1), InterfaceId(0)), None);
        assert_eq!(tx.stats.snapshot().drop_no_peer_mac, 1);
        let mut rx = FabricForwarder::new(map(false, 1, Some(0)), Arc::default());
        assert!(
            rx.arrived_on_fabric(
                b"garbage that is not a fabric frame at all",
                InterfaceId(10)
            )
            .is_none()
        );
        assert_eq!(rx.stats.snapshot().drop_bad_header, 1);
    }

    proptest::proptest! {
        /// Whatever arrives on a fabric port: a typed drop or a frame,
        /// never a panic.
        #[test]
        fn random_bytes_on_a_fabric_port_never_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..120), port in 9u16..12) {
            let mut rx = FabricForwarder::new(map(false, 4, Some(0)), Arc::default());
            let _ = rx.arrived_on_fabric(&data, InterfaceId(port));
            // A valid header followed by random bytes as well.
            let mut framed = tandem_fabric::FabricHeader { kind: Kind::Ingress, rg: RgId(1), epoch: Epoch(4), iface: 0 }
                .encapsulate([0xa0; 6], [0xb0; 6], &data);
            framed.truncate(framed.len().min(14 + data.len()));
            let _ = rx.arrived_on_fabric(&framed, InterfaceId(port));
        }
    }
}
