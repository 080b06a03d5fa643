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
//! docs/ARCHITECTURE.md "Witness mode" has the argument and its bound.
//!
//! Restarts: each voter persists whom it granted each RG to (`store`)
//! before it tells a new holder, and after a start treats what it may have
//! granted as running one whole `max_lease_ms` (see `LeaseVoter`).
//!
//! Cost: after a crash of the holder, the survivor waits for the lease
//! (default 1 s) to expire at the voters before it can take over. The raft
//! group the design card asks for is not built yet (ARCHITECTURE.md).
//!
//! The node pair without a witness stays the default.

mod group;
mod store;

pub use group::{GroupStart, GroupStatus, Outgoing, OwnershipGroup, RgOwnership, TICK_MS};

pub use store::{FileStore, MemoryStore, VoterRecord, VoterStore};

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

/// How a voter came up: what it could recover of its grants.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub enum VoterStart {
    /// The record was read: RGs granted before stay with their holder
    /// (renewals only) until a whole lease has passed.
    Recovered { rgs: usize },
    /// Nothing stored (first start, or a wiped disk: indistinguishable).
    Empty,
    /// The record could not be read; the reason.
    Unreadable(String),
}

/// One voter's lease register, per RG.
///
/// Restart rule: a voter cannot know how much of a lease it granted before
/// a restart is left (its clock restarted too), so every lease it may have
/// granted counts as running for `max_lease_ms` from its start. With a
/// readable record only the recorded RGs wait, and their holder may renew;
/// with none (empty or unreadable) it grants nothing at all for
/// `max_lease_ms`.
pub struct LeaseVoter {
    id: u32,
    cluster_id: u32,
    /// The longest lease it grants; also the restart quarantine.
    max_lease_ms: u32,
    leases: BTreeMap<u32, Lease>,
    /// Until then, grant nothing (no readable record at start).
    quarantine_until: Millis,
    store: Arc<dyn VoterStore>,
    pub started: VoterStart,
    /// Grants refused because the record could not be written.
    pub store_failures: u64,
}

impl std::fmt::Debug for LeaseVoter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseVoter")
            .field("id", &self.id)
            .field("leases", &self.leases)
            .field("quarantine_until", &self.quarantine_until)
            .field("started", &self.started)
            .finish()
    }
}

impl LeaseVoter {
    /// Starts a voter at `now` from what `store` holds (see the restart
    /// rule above).
    pub fn start(
        id: u32,
        cluster_id: u32,
        max_lease_ms: u32,
        store: Arc<dyn VoterStore>,
        now: Millis,
    ) -> LeaseVoter {
        let held_until = Millis(now.0 + u64::from(max_lease_ms));
        let mut leases = BTreeMap::new();
        let started = match store.load().and_then(|b| match b {
            None => Ok(None),
            Some(b) => VoterRecord::decode(&b).map(Some),
        }) {
            Ok(Some(rec)) if rec.cluster_id == cluster_id && rec.voter == id => {
                for (rg, (holder, epoch)) in rec.holders {
                    leases.insert(
                        rg,
                        Lease {
                            holder,
                            epoch,
                            expires: held_until,
                        },
                    );
                }
                VoterStart::Recovered { rgs: leases.len() }
            }
            Ok(Some(rec)) => VoterStart::Unreadable(format!(
                "record of voter {} in cluster {}, not voter {id} in cluster {cluster_id}",
                rec.voter, rec.cluster_id
            )),
            Ok(None) => VoterStart::Empty,
            Err(e) => VoterStart::Unreadable(e),
        };
        let quarantine_until = match started {
            VoterStart::Recovered { .. } => now,
            _ => held_until,
        };
        if let VoterStart::Unreadable(e) = &started {
            warn!(voter = id, error = %e, max_lease_ms, "voter record unreadable: granting nothing for one lease");
        }
        LeaseVoter {
            id,
            cluster_id,
            max_lease_ms,
            leases,
            quarantine_until,
            store,
            started,
            store_failures: 0,
        }
    }

    fn record(&self) -> VoterRecord {
        VoterRecord {
            cluster_id: self.cluster_id,
            voter: self.id,
            holders: self
                .leases
                .iter()
                .map(|(rg, l)| (*rg, (l.holder, l.epoch)))
                .collect(),
        }
    }

    /// Writes the register with `change` applied; only a durable change
    /// takes effect.
    fn commit(&mut self, rg: u32, change: Option<Lease>) -> bool {
        let before = self.leases.get(&rg).copied();
        match change {
            Some(l) => self.leases.insert(rg, l),
            None => self.leases.remove(&rg),
        };
        if let Err(e) = self.store.save(&self.record().encode()) {
            self.store_failures += 1;
            warn!(voter = self.id, error = %e, "voter record not written: grant refused");
            match before {
                Some(l) => self.leases.insert(rg, l),
                None => self.leases.remove(&rg),
            };
            return false;
        }
        true
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
        if req.cluster_id != self.cluster_id
            || req.candidate > 1
            || req.duration_ms > self.max_lease_ms
        {
            // A lease longer than this voter's restart quarantine could
            // outlive a restart: never granted.
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
                self.commit(req.rg, None);
            }
            reply.holder = u32::MAX;
            return reply;
        }
        let current = self.leases.get(&req.rg).copied();
        let renewal = current.is_some_and(|l| l.holder == req.candidate);
        let free =
            renewal || (now >= self.quarantine_until && current.is_none_or(|l| l.expires <= now));
        if !free {
            reply.holder = current.map_or(u32::MAX, |l| l.holder);
            return reply;
        }
        let lease = Lease {
            holder: req.candidate,
            epoch: req.epoch,
            expires: Millis(now.0 + u64::from(req.duration_ms)),
        };
        // Only a new holder (or epoch) changes the record; a renewal may
        // extend the expiry in memory, as a restart re-arms it anyway.
        let durable = if current.is_some_and(|l| l.holder == lease.holder && l.epoch == lease.epoch)
        {
            let expires = current.map_or(lease.expires, |l| l.expires.max(lease.expires));
            self.leases.insert(req.rg, Lease { expires, ..lease });
            true
        } else {
            self.commit(req.rg, Some(lease))
        };
        if durable {
            reply.granted = true;
            reply.holder = req.candidate;
        } else {
            reply.holder = current.map_or(u32::MAX, |l| l.holder);
        }
        reply
    }

    pub fn holder(&self, rg: RgId, now: Millis) -> Option<u32> {
        self.leases
            .get(&u32::from(rg.0))
            .filter(|l| l.expires > now)
            .map(|l| l.holder)
    }

    /// Time left of the restart quarantine (0: over).
    pub fn quarantine_left_ms(&self, now: Millis) -> u64 {
        self.quarantine_until.saturating_sub(now)
    }
}

/// One RG's lease as this node counts it (`show chassis cluster status`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct RgLeaseStatus {
    pub rg: u16,
    /// This node holds a majority lease: it may forward the RG.
    pub held: bool,
    /// Until the majority lapses without renewal (0 when not held).
    pub remaining_ms: u64,
    /// The voters whose grant still runs, with the ms left of each.
    pub votes: Vec<(String, u64)>,
    /// What this node's own voter grants the RG to now.
    pub own_vote_for: Option<String>,
}

/// Witness mode as this node sees it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LeaseStatus {
    pub witness: String,
    pub lease_ms: u32,
    /// ms since the witness last answered (None: never).
    pub witness_heard_ms_ago: Option<u64>,
    pub own_voter_start: VoterStart,
    pub own_voter_quarantine_left_ms: u64,
    pub own_voter_store_failures: u64,
    pub rgs: Vec<RgLeaseStatus>,
}

fn voter_name(v: u32) -> String {
    match v {
        WITNESS_VOTER => "witness".into(),
        n => format!("node{n}"),
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
    /// When each voter last answered.
    last_reply: BTreeMap<u32, Millis>,
}

impl LeaseClient {
    /// A node's lease side starting at `now`; its own voter recovers from
    /// `store` and grants leases of at most `duration_ms` (both nodes run
    /// the same lease length).
    pub fn start(
        node: NodeId,
        cluster_id: u32,
        duration_ms: u32,
        store: Arc<dyn VoterStore>,
        now: Millis,
    ) -> LeaseClient {
        LeaseClient {
            node,
            cluster_id,
            duration_ms,
            margin_ms: u64::from(duration_ms / 10).max(20),
            next_request: 1,
            sent: HashMap::new(),
            grants: BTreeMap::new(),
            voter: LeaseVoter::start(u32::from(node.0), cluster_id, duration_ms, store, now),
            last_reply: BTreeMap::new(),
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
        self.last_reply.insert(reply.voter, now);
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

    /// What `show chassis cluster status` shows of witness mode.
    pub fn status(&self, witness: SocketAddr, rgs: &[RgId], now: Millis) -> LeaseStatus {
        LeaseStatus {
            witness: witness.to_string(),
            lease_ms: self.duration_ms,
            witness_heard_ms_ago: self
                .last_reply
                .get(&WITNESS_VOTER)
                .map(|t| now.saturating_sub(*t)),
            own_voter_start: self.voter.started.clone(),
            own_voter_quarantine_left_ms: self.voter.quarantine_left_ms(now),
            own_voter_store_failures: self.voter.store_failures,
            rgs: rgs
                .iter()
                .map(|&rg| {
                    let mut left: Vec<(u32, u64)> = self
                        .grants
                        .get(&rg)
                        .into_iter()
                        .flatten()
                        .filter(|(_, d)| **d > now)
                        .map(|(v, d)| (*v, d.saturating_sub(now)))
                        .collect();
                    left.sort_by_key(|v| std::cmp::Reverse(v.1));
                    let held = self.held(rg, now);
                    RgLeaseStatus {
                        rg: rg.0,
                        held,
                        // The majority lapses with its second-longest vote.
                        remaining_ms: if held { left[1].1 } else { 0 },
                        votes: left.iter().map(|(v, ms)| (voter_name(*v), *ms)).collect(),
                        own_vote_for: self.voter.holder(rg, now).map(voter_name),
                    }
                })
                .collect(),
        }
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
    mut voter: LeaseVoter,
    clock: tandem_dataplane::session::Clock,
) {
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

/// Where a node sends its lease requests, and where its own voter keeps
/// its grants.
#[derive(Clone)]
pub struct WitnessConfig {
    /// The witness's address.
    pub witness: SocketAddr,
    /// The peer node's lease address.
    pub peer: SocketAddr,
    pub lease_ms: u32,
    pub store: Arc<dyn VoterStore>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const RG1: RgId = RgId(1);

    fn t(ms: u64) -> Millis {
        Millis(1_000_000 + ms)
    }

    /// A node's lease side on a disk that holds an empty record (its voter
    /// grants at once).
    fn client(n: u8) -> LeaseClient {
        let disk = Arc::new(MemoryStore::formatted(1, u32::from(n)));
        LeaseClient::start(NodeId(n), 1, 1000, disk, t(0))
    }

    fn witness() -> LeaseVoter {
        witness_on(&MemoryStore::formatted(1, WITNESS_VOTER), t(0))
    }

    fn witness_on(disk: &MemoryStore, now: Millis) -> LeaseVoter {
        LeaseVoter::start(WITNESS_VOTER, 1, 1000, Arc::new(disk.clone()), now)
    }

    fn lease_req(candidate: u32, epoch: u64, id: u64) -> pb::LeaseRequest {
        pb::LeaseRequest {
            rg: 1,
            epoch,
            candidate,
            duration_ms: 1000,
            request_id: id,
            cluster_id: 1,
        }
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
            let mut n0 = client(0);
            let mut n1 = client(1);
            let mut w = witness();
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
        let mut n0 = client(0);
        let mut w = witness();
        let req = n0.request(RG1, Epoch(2), t(0));
        ask(&mut n0, &mut w, &req, t(50)); // granted late: the voter's lease runs longer
        assert!(n0.held(RG1, t(899)));
        assert!(
            !n0.held(RG1, t(900)),
            "holder counts from sending, minus margin"
        );
        let other = lease_req(1, 3, 9);
        assert!(
            !w.on_request(&other, t(1049)).granted,
            "still node0's at the witness"
        );
        assert!(w.on_request(&other, t(1050)).granted);
    }

    #[test]
    fn renewal_extends_and_loss_of_majority_ends_the_lease() {
        let mut n0 = client(0);
        let mut w = witness();
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
        let mut n0 = client(0);
        let mut w = witness();
        let req = n0.request(RG1, Epoch(2), t(0));
        ask(&mut n0, &mut w, &req, t(0));
        let other = lease_req(1, 3, 9);
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
        let mut w = witness();
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

    #[test]
    fn restarted_witness_keeps_its_grant_for_the_holder_and_refuses_the_other_node() {
        // node0 holds RG1 through {node0, witness}; node1 is cut off from
        // node0. The witness restarts: a fresh register would grant node1
        // at once (two forwarders for up to a lease).
        let disk = MemoryStore::formatted(1, WITNESS_VOTER);
        let mut w = witness_on(&disk, t(0));
        assert!(w.on_request(&lease_req(0, 2, 1), t(10)).granted);
        let mut w = witness_on(&disk, t(500));
        assert_eq!(w.started, VoterStart::Recovered { rgs: 1 });
        assert!(
            !w.on_request(&lease_req(1, 3, 2), t(501)).granted,
            "node1 refused"
        );
        assert!(
            w.on_request(&lease_req(0, 2, 3), t(600)).granted,
            "holder renews"
        );
        assert!(!w.on_request(&lease_req(1, 3, 4), t(1499)).granted);
        // node0 stops renewing: free one lease after its last renewal.
        assert!(!w.on_request(&lease_req(1, 3, 5), t(1599)).granted);
        assert!(w.on_request(&lease_req(1, 3, 6), t(1600)).granted);
    }

    #[test]
    fn restarted_voter_without_a_readable_record_grants_nothing_for_one_lease() {
        for stored in [None, Some(b"garbage".to_vec())] {
            let disk = MemoryStore::default();
            disk.put(stored.clone());
            let mut w = witness_on(&disk, t(0));
            assert!(
                matches!(w.started, VoterStart::Empty | VoterStart::Unreadable(_)),
                "{:?}",
                w.started
            );
            for (i, ms) in [0, 500, 999].into_iter().enumerate() {
                assert!(
                    !w.on_request(&lease_req(1, 3, i as u64), t(ms)).granted,
                    "{stored:?}: granted at {ms} ms into the quarantine"
                );
            }
            assert_eq!(w.quarantine_left_ms(t(999)), 1);
            assert!(w.on_request(&lease_req(1, 3, 9), t(1000)).granted);
        }
    }

    #[test]
    fn record_of_another_voter_or_cluster_is_not_recovered() {
        let disk = MemoryStore::formatted(1, 0);
        let w = witness_on(&disk, t(0));
        assert!(matches!(w.started, VoterStart::Unreadable(ref e) if e.contains("voter 0")));
    }

    #[test]
    fn grant_is_refused_when_the_record_cannot_be_written() {
        let disk = MemoryStore::formatted(1, WITNESS_VOTER);
        let mut w = witness_on(&disk, t(0));
        disk.failing
            .store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(!w.on_request(&lease_req(0, 2, 1), t(1)).granted);
        assert_eq!(w.store_failures, 1);
        assert_eq!(
            w.holder(RG1, t(1)),
            None,
            "nothing promised in memory either"
        );
        disk.failing
            .store(false, std::sync::atomic::Ordering::Relaxed);
        assert!(w.on_request(&lease_req(0, 2, 2), t(2)).granted);
        // Renewals write nothing: a failing disk does not end the lease.
        disk.failing
            .store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(w.on_request(&lease_req(0, 2, 3), t(300)).granted);
        // ... but a release that cannot be written keeps the RG held.
        let mut release = lease_req(0, 2, 0);
        release.duration_ms = 0;
        w.on_request(&release, t(301));
        assert_eq!(w.holder(RG1, t(301)), Some(0));
    }

    #[test]
    fn leases_longer_than_the_voters_quarantine_are_refused() {
        let mut w = witness();
        let mut long = lease_req(0, 2, 1);
        long.duration_ms = 1001;
        let r = w.on_request(&long, t(0));
        assert!(!r.granted);
        assert_eq!(r.holder, u32::MAX);
    }

    #[test]
    fn restarted_node_voter_does_not_hand_its_own_lease_to_the_peer() {
        // node0 held RG1 with its own vote and the witness's; node0's
        // daemon restarts within the lease while the witness cannot reach
        // node0 any more. node1 asks node0's fresh voter: refused until the
        // lease node0 may still count has run out.
        let disk = Arc::new(MemoryStore::formatted(1, 0));
        let mut n0 = LeaseClient::start(NodeId(0), 1, 1000, disk.clone(), t(0));
        n0.request(RG1, Epoch(2), t(0));
        let mut n0 = LeaseClient::start(NodeId(0), 1, 1000, disk, t(200));
        assert!(!n0.voter.on_request(&lease_req(1, 3, 7), t(201)).granted);
        assert!(!n0.voter.on_request(&lease_req(1, 3, 8), t(1199)).granted);
        assert!(n0.voter.on_request(&lease_req(1, 3, 9), t(1200)).granted);
    }
}
