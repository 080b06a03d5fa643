//! Witness mode: majority leases, so that no partition can produce two
//! forwarding primaries for one RG.
//!
//! Three voters — node0, node1 and the witness (`tandem witness`) — each
//! hold at most one unexpired lease per RG. A node forwards an RG only while
//! a majority (2 of 3, itself included) has granted it a lease that has not
//! expired by its own reckoning. Any two majorities share a voter, and a
//! voter never grants an RG to a second node before the first node's lease
//! has expired, so two nodes can never forward the same RG at once.
//!
//! Expiry: a voter's lease runs from when it granted; the holder counts its
//! lease from when it *sent* the request (earlier), minus a safety margin,
//! so the holder always stops first (clock rates are assumed equal within
//! the margin; offsets do not matter, as each side only measures durations).
//!
//! Why not raft-rs: a raft group would give the same guarantee, but raft-rs
//! 0.7 brings protobuf 2 (with an open advisory), a second prost, slog and
//! an unseedable RNG that breaks simulation determinism; a per-RG lease
//! register is a few hundred lines and fits the turmoil simulations as is.
//! Cost: after a crash of the holder, the survivor waits for the lease
//! (default 1 s) to expire at the voters before it can take over.
//!
//! The node pair without a witness stays the default.

use crate::election::driver::{ClusterKey, DatagramSocket};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use tandem_dataplane::session::Millis;
use tandem_proto::pb::{self, envelope::Msg};
use tandem_proto::{Epoch, NodeId, RgId};
use tracing::{debug, warn};

/// The witness's voter id.
pub const WITNESS_VOTER: u32 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Lease {
    holder: u32,
    epoch: u64,
    expires: Millis,
}

/// One voter's lease register, per RG.
#[derive(Debug)]
pub struct LeaseVoter {
    id: u32,
    cluster_id: u32,
    leases: BTreeMap<u32, Lease>,
}

impl LeaseVoter {
    pub fn new(id: u32, cluster_id: u32) -> LeaseVoter {
        LeaseVoter {
            id,
            cluster_id,
            leases: BTreeMap::new(),
        }
    }

    /// Grants if the RG is free, its lease expired, or the candidate already
    /// holds it (a renewal).
    pub fn on_request(&mut self, req: &pb::LeaseRequest, now: Millis) -> pb::LeaseReply {
        let mut reply = pb::LeaseReply {
            rg: req.rg,
            epoch: req.epoch,
            request_id: req.request_id,
            granted: false,
            holder: 0,
            voter: self.id,
        };
        if req.cluster_id != self.cluster_id || req.candidate > 1 {
            reply.holder = u32::MAX;
            return reply;
        }
        // Duration 0: the candidate gives its lease back.
        if req.duration_ms == 0 {
            if self
                .leases
                .get(&req.rg)
                .is_some_and(|l| l.holder == req.candidate)
            {
                self.leases.remove(&req.rg);
            }
            reply.holder = u32::MAX;
            return reply;
        }
        let free = match self.leases.get(&req.rg) {
            None => true,
            Some(l) => l.expires <= now || l.holder == req.candidate,
        };
        if free {
            self.leases.insert(
                req.rg,
                Lease {
                    holder: req.candidate,
                    epoch: req.epoch,
                    expires: Millis(now.0 + u64::from(req.duration_ms)),
                },
            );
            reply.granted = true;
            reply.holder = req.candidate;
        } else {
            reply.holder = self.leases[&req.rg].holder;
        }
        reply
    }

    pub fn holder(&self, rg: RgId, now: Millis) -> Option<u32> {
        self.leases
            .get(&u32::from(rg.0))
            .filter(|l| l.expires > now)
            .map(|l| l.holder)
    }
}

/// A node's side: which RGs it holds a majority lease for.
pub struct LeaseClient {
    node: NodeId,
    cluster_id: u32,
    duration_ms: u32,
    margin_ms: u64,
    next_request: u64,
    /// Request id -> (rg, sent at).
    sent: HashMap<u64, (RgId, Millis)>,
    /// Per RG: voter -> deadline of its lease as this node counts it.
    grants: BTreeMap<RgId, BTreeMap<u32, Millis>>,
    /// This node's own voter (it votes for itself, and for its peer).
    pub voter: LeaseVoter,
}

impl LeaseClient {
    pub fn new(node: NodeId, cluster_id: u32, duration_ms: u32) -> LeaseClient {
        LeaseClient {
            node,
            cluster_id,
            duration_ms,
            margin_ms: u64::from(duration_ms / 10).max(20),
            next_request: 1,
            sent: HashMap::new(),
            grants: BTreeMap::new(),
            voter: LeaseVoter::new(u32::from(node.0), cluster_id),
        }
    }

    pub fn duration_ms(&self) -> u32 {
        self.duration_ms
    }

    /// Asks for (or renews) `rg`: grants itself if its own voter allows and
    /// returns the request for the other two voters.
    pub fn request(&mut self, rg: RgId, epoch: Epoch, now: Millis) -> pb::LeaseRequest {
        let id = self.next_request;
        self.next_request += 1;
        let req = pb::LeaseRequest {
            rg: rg.0.into(),
            epoch: epoch.0,
            candidate: self.node.0.into(),
            duration_ms: self.duration_ms,
            request_id: id,
            cluster_id: self.cluster_id,
        };
        self.sent.insert(id, (rg, now));
        let own = self.voter.on_request(&req, now);
        self.on_reply(&own, now);
        req
    }

    pub fn on_reply(&mut self, reply: &pb::LeaseReply, now: Millis) {
        let Some((rg, sent)) = self.sent.get(&reply.request_id).copied() else {
            return;
        };
        let g = self.grants.entry(rg).or_default();
        if reply.granted {
            let deadline =
                Millis((sent.0 + u64::from(self.duration_ms)).saturating_sub(self.margin_ms));
            let e = g.entry(reply.voter).or_insert(deadline);
            *e = (*e).max(deadline);
        } else {
            g.remove(&reply.voter);
        }
        // Forget requests older than a lease: their answers are useless.
        let horizon = u64::from(self.duration_ms);
        self.sent
            .retain(|_, (_, t)| now.saturating_sub(*t) <= horizon);
    }

    /// Whether this node holds a majority lease for `rg` at `now`.
    pub fn held(&self, rg: RgId, now: Millis) -> bool {
        self.grants
            .get(&rg)
            .is_some_and(|g| g.values().filter(|&&d| d > now).count() >= 2)
    }

    /// Gives up `rg` (demoted): stops counting its grants, frees this
    /// node's own vote, and returns the release for the other voters.
    pub fn release(&mut self, rg: RgId, epoch: Epoch, now: Millis) -> pb::LeaseRequest {
        self.grants.remove(&rg);
        let req = pb::LeaseRequest {
            rg: rg.0.into(),
            epoch: epoch.0,
            candidate: self.node.0.into(),
            duration_ms: 0,
            request_id: 0,
            cluster_id: self.cluster_id,
        };
        self.voter.on_request(&req, now);
        req
    }
}

/// `tandem witness`: answers lease requests from both nodes on one UDP
/// socket. Runs until the socket fails.
pub async fn serve(
    socket: Arc<dyn DatagramSocket>,
    key: ClusterKey,
    cluster_id: u32,
    clock: tandem_dataplane::session::Clock,
) {
    let mut voter = LeaseVoter::new(WITNESS_VOTER, cluster_id);
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "witness socket");
                return;
            }
        };
        let Some(Msg::LeaseRequest(req)) = key.open_msg(&buf[..n]) else {
            debug!(%from, "witness: dropped unauthenticated or unexpected datagram");
            continue;
        };
        let reply = voter.on_request(&req, clock());
        let pkt = key.seal_msg(Msg::LeaseReply(reply));
        let _ = socket.send_to(&pkt, from).await;
    }
}

/// Where a node sends its lease requests.
#[derive(Clone, Debug)]
pub struct WitnessConfig {
    /// The witness's address.
    pub witness: SocketAddr,
    /// The peer node's lease address.
    pub peer: SocketAddr,
    pub lease_ms: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    const RG1: RgId = RgId(1);

    fn t(ms: u64) -> Millis {
        Millis(1_000_000 + ms)
    }

    /// Delivers `req` to `voter` and the reply back to `client`.
    fn ask(
        client: &mut LeaseClient,
        voter: &mut LeaseVoter,
        req: &pb::LeaseRequest,
        now: Millis,
    ) -> bool {
        let r = voter.on_request(req, now);
        client.on_reply(&r, now);
        r.granted
    }

    #[test]
    fn majority_lease_is_exclusive_under_every_two_of_three_partition() {
        for reachable_by_0 in [[true, true], [true, false], [false, true], [false, false]] {
            let mut n0 = LeaseClient::new(NodeId(0), 1, 1000);
            let mut n1 = LeaseClient::new(NodeId(1), 1, 1000);
            let mut w = LeaseVoter::new(WITNESS_VOTER, 1);
            // node0 asks first, reaching the witness and/or node1.
            let req = n0.request(RG1, Epoch(2), t(0));
            if reachable_by_0[0] {
                ask(&mut n0, &mut w, &req, t(1));
            }
            if reachable_by_0[1] {
                ask(&mut n0, &mut n1.voter, &req, t(1));
            }
            // node1 asks everything it can reach: its own voter and the
            // witness (always), node0 only if node0 reached node1.
            let req = n1.request(RG1, Epoch(3), t(2));
            ask(&mut n1, &mut w, &req, t(3));
            if reachable_by_0[1] {
                ask(&mut n1, &mut n0.voter, &req, t(3));
            }
            for ms in (0..3000).step_by(7) {
                assert!(
                    !(n0.held(RG1, t(ms)) && n1.held(RG1, t(ms))),
                    "two holders at {ms} ms with reachability {reachable_by_0:?}"
                );
            }
        }
    }

    #[test]
    fn holder_stops_before_any_voter_would_grant_again() {
        let mut n0 = LeaseClient::new(NodeId(0), 1, 1000);
        let mut w = LeaseVoter::new(WITNESS_VOTER, 1);
        let req = n0.request(RG1, Epoch(2), t(0));
        ask(&mut n0, &mut w, &req, t(50)); // granted late: the voter's lease runs longer
        assert!(n0.held(RG1, t(899)));
        assert!(
            !n0.held(RG1, t(900)),
            "holder counts from sending, minus margin"
        );
        let other = pb::LeaseRequest {
            rg: 1,
            epoch: 3,
            candidate: 1,
            duration_ms: 1000,
            request_id: 9,
            cluster_id: 1,
        };
        assert!(
            !w.on_request(&other, t(1049)).granted,
            "still node0's at the witness"
        );
        assert!(w.on_request(&other, t(1050)).granted);
    }

    #[test]
    fn renewal_extends_and_loss_of_majority_ends_the_lease() {
        let mut n0 = LeaseClient::new(NodeId(0), 1, 1000);
        let mut w = LeaseVoter::new(WITNESS_VOTER, 1);
        for round in 0..5 {
            let now = t(round * 300);
            let req = n0.request(RG1, Epoch(2), now);
            ask(&mut n0, &mut w, &req, now);
            assert!(n0.held(RG1, now));
        }
        // Witness unreachable from now on: own vote alone is no majority.
        let last = t(4 * 300);
        assert!(n0.held(RG1, Millis(last.0 + 899)));
        let req = n0.request(RG1, Epoch(2), Millis(last.0 + 950));
        let _ = req;
        assert!(!n0.held(RG1, Millis(last.0 + 901)));
    }

    #[test]
    fn released_lease_can_be_granted_to_the_other_node_at_once() {
        let mut n0 = LeaseClient::new(NodeId(0), 1, 1000);
        let mut w = LeaseVoter::new(WITNESS_VOTER, 1);
        let req = n0.request(RG1, Epoch(2), t(0));
        ask(&mut n0, &mut w, &req, t(0));
        let other = pb::LeaseRequest {
            rg: 1,
            epoch: 3,
            candidate: 1,
            duration_ms: 1000,
            request_id: 9,
            cluster_id: 1,
        };
        assert!(!w.on_request(&other, t(10)).granted);
        let release = n0.release(RG1, Epoch(2), t(20));
        assert!(!n0.held(RG1, t(20)));
        w.on_request(&release, t(21));
        assert!(
            w.on_request(&other, t(22)).granted,
            "free right after the release"
        );
        assert_eq!(n0.voter.holder(RG1, t(22)), None, "own vote released too");
        // A release by a node that does not hold the lease changes nothing.
        let stray = pb::LeaseRequest {
            candidate: 0,
            duration_ms: 0,
            ..other
        };
        w.on_request(&stray, t(23));
        assert_eq!(w.holder(RG1, t(23)), Some(1));
    }

    #[test]
    fn requests_from_other_clusters_are_refused() {
        let mut w = LeaseVoter::new(WITNESS_VOTER, 1);
        let req = pb::LeaseRequest {
            rg: 1,
            epoch: 3,
            candidate: 1,
            duration_ms: 1000,
            request_id: 9,
            cluster_id: 2,
        };
        assert!(!w.on_request(&req, t(0)).granted);
        assert_eq!(w.holder(RG1, t(0)), None);
    }
}
