//! RG ownership through a raft-rs group of three voters: node0, node1 and
//! the witness (raft ids 1, 2, 3), each driving a `RawNode` (the caller
//! ticks, steps messages and gets back what to send; this module persists
//! every `Ready` before anything it implies leaves).
//!
//! The log holds ownership entries: "RG r to node n at epoch e" (a claim;
//! the same claim again is a renewal) and "node n releases r". Applying
//! them in log order gives every voter the same owner per RG; a claim by
//! another node needs a higher epoch, so committed epochs only rise.
//!
//! Leases. A log has no clock, so time enters at two places only:
//! - the owner counts a lease from when it *sent* the request that the log
//!   then committed, for `lease_ms − margin` by its own clock;
//! - the leader logs a claim that moves an RG to another node only once a
//!   whole `lease_ms` has passed, by its clock, since it last logged or
//!   applied a claim of the RG's owner, and since it became leader (a new
//!   or restarted leader cannot know when the last renewal was sent).
//!
//! Every renewal is sent before the leader logs it, and the leader logs or
//! applies it before it could log a move, so the owner's lease ends before
//! any move can be logged (clock rates within the margin: ARCHITECTURE.md
//! "Witness mode"). A renewal logged after a move is not the owner's any
//! more and counts for nothing.

use super::VoterStore;
use prost::Message as _;
use prost011::Message as _;
use raft::eraftpb::{ConfState, Entry, EntryType, HardState, Message as RaftMsg, Snapshot};
use raft::{Config, GetEntriesContext, RaftState, RawNode, StateRole, Storage, StorageError};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use tandem_dataplane::session::Millis;
use tandem_proto::pb::{self, envelope::Msg};
use tandem_proto::{Epoch, NodeId, RgId};
use tracing::{debug, warn};

/// How often the caller ticks the group.
pub const TICK_MS: u64 = 20;
/// Raft heartbeat every 2 ticks; elections after 10 + 2·voter ticks
/// (200/240/280 ms): distinct per voter, so deterministic without a random
/// timeout and without repeated split votes.
const HEARTBEAT_TICKS: usize = 2;
const ELECTION_TICKS: usize = 10;
/// Applied entries kept before the log is compacted into a snapshot.
const COMPACT_AFTER: u64 = 128;
/// At most this many bytes of entries per append message (datagrams).
const MAX_MSG_BYTES: u64 = 8 * 1024;
/// A non-owner retries its claim this often while it is refused.
const CLAIM_RETRY_MS: u64 = 50;

/// Which voter sent `msg` (as it claims; the HMAC already vouched for
/// the cluster).
pub fn sender_of(msg: &Msg) -> Option<u32> {
    match msg {
        Msg::RaftMessage(m) => voter_of(RaftMsg::decode(&m.message[..]).ok()?.from),
        Msg::OwnershipRequest(r) => Some(r.node),
        _ => None,
    }
}

fn raft_id(voter: u32) -> u64 {
    u64::from(voter) + 1
}

fn voter_of(raft_id: u64) -> Option<u32> {
    match raft_id {
        1..=3 => Some((raft_id - 1) as u32),
        _ => None,
    }
}

/// The raft log and state as raft-rs reads them; the group keeps it on
/// disk through a `VoterStore`.
#[derive(Default)]
pub struct DiskLog {
    hard: HardState,
    conf: ConfState,
    snap: Snapshot,
    /// Entries after the snapshot, contiguous from `snap.index + 1`.
    entries: Vec<Entry>,
}

impl DiskLog {
    fn snap_index(&self) -> u64 {
        self.snap.get_metadata().index
    }

    fn first(&self) -> u64 {
        self.snap_index() + 1
    }

    fn last(&self) -> u64 {
        self.snap_index() + self.entries.len() as u64
    }

    fn encode(&self) -> Vec<u8> {
        pb::RaftDisk {
            hard_state: self.hard.encode_to_vec().into(),
            conf_state: self.conf.encode_to_vec().into(),
            snapshot: self.snap.encode_to_vec().into(),
            entries: self
                .entries
                .iter()
                .map(|e| e.encode_to_vec().into())
                .collect(),
        }
        .encode_to_vec()
    }

    fn decode(b: &[u8]) -> Result<DiskLog, String> {
        let d = pb::RaftDisk::decode(b).map_err(|e| format!("raft state: {e}"))?;
        let log = DiskLog {
            hard: HardState::decode(&d.hard_state[..]).map_err(|e| format!("hard state: {e}"))?,
            conf: ConfState::decode(&d.conf_state[..]).map_err(|e| format!("conf state: {e}"))?,
            snap: Snapshot::decode(&d.snapshot[..]).map_err(|e| format!("snapshot: {e}"))?,
            entries: d
                .entries
                .iter()
                .map(|e| Entry::decode(&e[..]).map_err(|e| format!("entry: {e}")))
                .collect::<Result<_, _>>()?,
        };
        for (i, e) in log.entries.iter().enumerate() {
            if e.index != log.first() + i as u64 {
                return Err(format!(
                    "entry {} out of place (expected {})",
                    e.index,
                    log.first() + i as u64
                ));
            }
        }
        Ok(log)
    }

    /// Appends `ents`, replacing any conflicting suffix.
    fn append(&mut self, ents: &[Entry]) {
        let Some(first) = ents.first() else { return };
        if first.index < self.first() {
            return;
        }
        let keep = (first.index - self.first()) as usize;
        self.entries.truncate(keep);
        self.entries.extend_from_slice(ents);
    }

    fn apply_snapshot(&mut self, snap: &Snapshot) {
        let meta = snap.get_metadata();
        self.entries.retain(|e| e.index > meta.index);
        if self
            .entries
            .first()
            .is_some_and(|e| e.index != meta.index + 1)
        {
            self.entries.clear();
        }
        self.hard.commit = self.hard.commit.max(meta.index);
        self.hard.term = self.hard.term.max(meta.term);
        self.conf = meta.get_conf_state().clone();
        self.snap = snap.clone();
    }
}

impl Storage for DiskLog {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(self.hard.clone(), self.conf.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last() + 1 || low > high {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let off = self.first();
        let mut v = self.entries[(low - off) as usize..(high - off) as usize].to_vec();
        raft::util::limit_size(&mut v, max_size.into());
        Ok(v)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.snap_index() {
            return Ok(self.snap.get_metadata().term);
        }
        if idx < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(self.entries[(idx - self.first()) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, _request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        Ok(self.snap.clone())
    }
}

/// One RG's committed ownership.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Owner {
    /// None after a release.
    node: Option<u32>,
    epoch: u64,
}

/// A message for another voter (0, 1: nodes; 2: witness).
#[derive(Debug)]
pub struct Outgoing {
    pub to: u32,
    pub msg: Msg,
}

/// How the raft member came up.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub enum GroupStart {
    /// Its log and votes were read back (index of the last entry).
    Recovered { last_index: u64 },
    /// A new member (nothing stored).
    Fresh,
}

/// What `show chassis cluster status` shows of the raft group.
#[derive(Clone, Debug, serde::Serialize)]
pub struct GroupStatus {
    pub voter: String,
    pub term: u64,
    /// The leader as this member knows it.
    pub leader: Option<String>,
    pub role: String,
    pub commit_index: u64,
    pub applied_index: u64,
    pub started: GroupStart,
    /// The member stopped: its state could not be written, or did not fit
    /// the cluster's.
    pub failed: Option<String>,
    /// Messages dropped as not valid (wrong cluster, sender or recipient,
    /// undecodable).
    pub rejected_messages: u64,
    pub rgs: Vec<RgOwnership>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct RgOwnership {
    pub rg: u16,
    /// The committed owner (None: free).
    pub owner: Option<String>,
    pub epoch: u64,
    /// This node's lease (nodes only): ms left, 0 when not held.
    pub lease_left_ms: u64,
}

/// One voter's member of the ownership group.
pub struct OwnershipGroup {
    voter: u32,
    cluster_id: u32,
    lease_ms: u64,
    margin_ms: u64,
    node: RawNode<DiskLog>,
    store: Arc<dyn VoterStore>,
    pub started: GroupStart,
    /// Set when the state could not be written: the member stops taking
    /// part (as a crashed voter would) rather than act on state it may
    /// lose.
    failed: Option<String>,
    owners: BTreeMap<u32, Owner>,
    applied: u64,
    last_tick: Millis,
    // ---- as an owner ----
    next_request: u64,
    /// Our requests by id: RG and when sent.
    sent: HashMap<u64, (u32, Millis)>,
    /// Per RG: until when this node may forward (its lease).
    lease_until: BTreeMap<u32, Millis>,
    // ---- as the leader ----
    /// When this member, as leader, had applied an entry of its own term.
    leader_ready_at: Option<Millis>,
    /// Per (RG, node): when this member last logged (as leader) or applied
    /// a claim of that node for that RG.
    claim_seen_at: BTreeMap<(u32, u32), Millis>,
    /// As the ready leader: the owners once everything it logged commits
    /// (it is the only proposer of its term, and when it became ready
    /// every earlier entry was applied). Requests are judged against it.
    expected: Option<BTreeMap<u32, Owner>>,
    /// Drops of input that was not valid (`GroupStatus::rejected_messages`).
    rejected: u64,
}

impl OwnershipGroup {
    /// Starts voter `voter`'s member from what `store` holds. A stored
    /// state that cannot be read is an error: a voter that forgot its vote
    /// or its log must not take part.
    pub fn start(
        voter: u32,
        cluster_id: u32,
        lease_ms: u32,
        store: Arc<dyn VoterStore>,
        now: Millis,
    ) -> Result<OwnershipGroup, String> {
        let (log, started) = match store.load()? {
            Some(b) => {
                let log = DiskLog::decode(&b)?;
                let last_index = log.last();
                (log, GroupStart::Recovered { last_index })
            }
            None => {
                let mut log = DiskLog {
                    conf: ConfState::from((vec![1, 2, 3], vec![])),
                    ..Default::default()
                };
                log.snap.mut_metadata().set_conf_state(log.conf.clone());
                (log, GroupStart::Fresh)
            }
        };
        let owners = decode_state(&log.snap.data)?;
        let applied = log.snap_index();
        let min_election = ELECTION_TICKS + 2 * voter as usize;
        let cfg = Config {
            id: raft_id(voter),
            election_tick: ELECTION_TICKS,
            heartbeat_tick: HEARTBEAT_TICKS,
            min_election_tick: min_election,
            max_election_tick: min_election + 1,
            applied,
            check_quorum: true,
            pre_vote: true,
            max_size_per_msg: MAX_MSG_BYTES,
            max_inflight_msgs: 64,
            ..Default::default()
        };
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let node = RawNode::new(&cfg, log, &logger).map_err(|e| format!("raft: {e}"))?;
        Ok(OwnershipGroup {
            voter,
            cluster_id,
            lease_ms: u64::from(lease_ms),
            margin_ms: u64::from(lease_ms / 10).max(20),
            node,
            store,
            started,
            failed: None,
            owners,
            applied,
            last_tick: now,
            next_request: 1,
            sent: HashMap::new(),
            lease_until: BTreeMap::new(),
            leader_ready_at: None,
            claim_seen_at: BTreeMap::new(),
            expected: None,
            rejected: 0,
        })
    }

    /// Advances raft time; call every `TICK_MS`.
    pub fn tick(&mut self, now: Millis) -> Vec<Outgoing> {
        let mut out = Vec::new();
        if self.failed.is_some() {
            return out;
        }
        while self.last_tick.0 + TICK_MS <= now.0 {
            self.last_tick = Millis(self.last_tick.0 + TICK_MS);
            if self.guard(|n| n.tick()).is_none() {
                return out;
            }
        }
        self.drive(now, &mut out);
        out
    }

    /// A message from another voter: a raft message, or (as leader) a
    /// node's ownership request.
    pub fn on_message(&mut self, msg: &Msg, now: Millis) -> Vec<Outgoing> {
        let mut out = Vec::new();
        if self.failed.is_some() {
            return out;
        }
        match msg {
            Msg::RaftMessage(m) if m.cluster_id == self.cluster_id => {
                match RaftMsg::decode(&m.message[..]) {
                    Ok(rm)
                        if rm.to == raft_id(self.voter)
                            && voter_of(rm.from).is_some_and(|v| v != self.voter) =>
                    {
                        if let Some(Err(e)) = self.guard(|n| n.step(rm)) {
                            debug!(error = %e, "raft: message not stepped");
                        }
                    }
                    _ => self.rejected += 1,
                }
            }
            Msg::OwnershipRequest(r) if r.cluster_id == self.cluster_id && r.node <= 1 => {
                self.lead_request(r, now);
            }
            _ => self.rejected += 1,
        }
        self.drive(now, &mut out);
        out
    }

    /// This node (0 or 1) wants to forward `rg` in `epoch`: asks the log
    /// for it, or renews its lease when due. Cheap to call often.
    pub fn claim(&mut self, rg: RgId, epoch: Epoch, now: Millis) -> Vec<Outgoing> {
        let mut out = Vec::new();
        if self.failed.is_some() || self.voter > 1 {
            return out;
        }
        let rg32 = u32::from(rg.0);
        let mine = self
            .owners
            .get(&rg32)
            .is_some_and(|o| o.node == Some(self.voter) && o.epoch == epoch.0);
        // Since the last request for the RG (older ones than a lease are
        // pruned: they count as long ago).
        let last = self
            .sent
            .values()
            .filter(|(r, _)| *r == rg32)
            .map(|(_, t)| *t)
            .max();
        let since = last.map_or(u64::MAX, |t| now.saturating_sub(t));
        let due = if mine {
            // Renew once a quarter of the lease is used, no faster than an
            // eighth of a lease.
            let left = self
                .lease_until
                .get(&rg32)
                .map_or(0, |u| u.saturating_sub(now));
            left < self.lease_ms * 3 / 4 && since >= self.lease_ms / 8
        } else {
            since >= CLAIM_RETRY_MS
        };
        if due {
            self.request(
                rg32,
                epoch.0,
                pb::OwnershipKind::OwnershipClaim,
                now,
                &mut out,
            );
        }
        self.drive(now, &mut out);
        out
    }

    /// This node stops forwarding `rg`: its lease ends now, and the log is
    /// told so the peer need not wait for it.
    pub fn release(&mut self, rg: RgId, epoch: Epoch, now: Millis) -> Vec<Outgoing> {
        let mut out = Vec::new();
        let rg32 = u32::from(rg.0);
        self.lease_until.remove(&rg32);
        // A renewal still in the log must not give the lease back.
        self.sent.retain(|_, (r, _)| *r != rg32);
        if self.failed.is_some() || self.voter > 1 {
            return out;
        }
        if self
            .owners
            .get(&rg32)
            .is_some_and(|o| o.node == Some(self.voter))
        {
            self.request(
                rg32,
                epoch.0,
                pb::OwnershipKind::OwnershipRelease,
                now,
                &mut out,
            );
        }
        self.drive(now, &mut out);
        out
    }

    /// Whether this node may forward `rg` now.
    pub fn held(&self, rg: RgId, now: Millis) -> bool {
        let rg32 = u32::from(rg.0);
        self.failed.is_none()
            && self
                .owners
                .get(&rg32)
                .is_some_and(|o| o.node == Some(self.voter))
            && self.lease_until.get(&rg32).is_some_and(|u| *u > now)
    }

    /// Whether this node may forward `rg` in `epoch`: it holds the lease,
    /// and the log committed the RG to it in that very epoch (the epoch
    /// the dataplane and the sync stream are fenced with).
    pub fn forwards(&self, rg: RgId, epoch: Epoch, now: Millis) -> bool {
        self.held(rg, now) && self.committed_epoch(rg) == epoch
    }

    /// The committed owner and epoch of `rg`.
    pub fn owner(&self, rg: RgId) -> Option<(NodeId, Epoch)> {
        let o = self.owners.get(&u32::from(rg.0))?;
        Some((NodeId(o.node? as u8), Epoch(o.epoch)))
    }

    /// The highest committed epoch of `rg` (0: never claimed).
    pub fn committed_epoch(&self, rg: RgId) -> Epoch {
        Epoch(self.owners.get(&u32::from(rg.0)).map_or(0, |o| o.epoch))
    }

    pub fn status(&self, rgs: &[RgId], now: Millis) -> GroupStatus {
        let st = self.node.status();
        let name = |v: u32| super::voter_name(v);
        GroupStatus {
            voter: name(self.voter),
            term: st.hs.term,
            leader: voter_of(st.ss.leader_id).map(name),
            role: format!("{:?}", st.ss.raft_state).to_lowercase(),
            commit_index: st.hs.commit,
            applied_index: self.applied,
            started: self.started.clone(),
            failed: self.failed.clone(),
            rejected_messages: self.rejected,
            rgs: rgs
                .iter()
                .map(|&rg| {
                    let o = self.owners.get(&u32::from(rg.0)).copied();
                    RgOwnership {
                        rg: rg.0,
                        owner: o.and_then(|o| o.node).map(name),
                        epoch: o.map_or(0, |o| o.epoch),
                        lease_left_ms: if self.held(rg, now) {
                            self.lease_until[&u32::from(rg.0)].saturating_sub(now)
                        } else {
                            0
                        },
                    }
                })
                .collect(),
        }
    }

    fn is_leader(&self) -> bool {
        self.node.raft.state == StateRole::Leader
    }

    fn request(
        &mut self,
        rg: u32,
        epoch: u64,
        kind: pb::OwnershipKind,
        now: Millis,
        out: &mut Vec<Outgoing>,
    ) {
        let id = self.next_request;
        self.next_request += 1;
        self.sent.insert(id, (rg, now));
        // Requests older than a lease can no longer give a lease.
        let horizon = self.lease_ms;
        self.sent
            .retain(|_, (_, t)| now.saturating_sub(*t) <= horizon);
        let req = pb::OwnershipRequest {
            cluster_id: self.cluster_id,
            rg,
            node: self.voter,
            epoch,
            request_id: id,
            kind: kind as i32,
        };
        if self.is_leader() {
            self.lead_request(&req, now);
            return;
        }
        let leader = voter_of(self.node.raft.leader_id).filter(|v| *v != self.voter);
        let targets: Vec<u32> = match leader {
            Some(l) => vec![l],
            None => (0..3).filter(|v| *v != self.voter).collect(),
        };
        for to in targets {
            out.push(Outgoing {
                to,
                msg: Msg::OwnershipRequest(req),
            });
        }
    }

    /// As the leader: logs the request if the lease rule allows it.
    fn lead_request(&mut self, r: &pb::OwnershipRequest, now: Millis) {
        let (Some(ready), Some(expected)) = (self.leader_ready_at, self.expected.as_ref()) else {
            return;
        };
        let cur = expected.get(&r.rg).copied();
        let release = r.kind == pb::OwnershipKind::OwnershipRelease as i32;
        let allowed = match cur {
            _ if release => cur.is_some_and(|o| o.node == Some(r.node)),
            // The owner renewing, or re-claiming above its epoch.
            Some(o) if o.node == Some(r.node) => r.epoch >= o.epoch,
            Some(o) if r.epoch <= o.epoch => false,
            // Free (never claimed, or released: its owner stopped first).
            None | Some(Owner { node: None, .. }) => true,
            // Another node's: only a whole lease after this leader last
            // logged or applied that node's claim (the node may count a
            // lease from it), and a whole lease after this leader became
            // ready (it cannot know when the previous leader logged one).
            Some(Owner { node: Some(n), .. }) => {
                let quiet = self
                    .claim_seen_at
                    .get(&(r.rg, n))
                    .is_none_or(|t| now.saturating_sub(*t) >= self.lease_ms);
                quiet && now.saturating_sub(ready) >= self.lease_ms
            }
        };
        if !allowed {
            return;
        }
        let entry = pb::OwnershipEntry {
            rg: r.rg,
            node: r.node,
            epoch: r.epoch,
            request_id: r.request_id,
            kind: r.kind,
        };
        match self.guard(|n| n.propose(vec![], entry.encode_to_vec())) {
            None => {}
            Some(Ok(())) => {
                if !release {
                    self.claim_seen_at.insert((r.rg, r.node), now);
                }
                if let Some(x) = self.expected.as_mut() {
                    apply_entry(x, &entry);
                }
            }
            Some(Err(e)) => debug!(error = %e, "raft: proposal dropped"),
        }
    }

    /// Handles every pending `Ready`: persist, send, apply.
    fn drive(&mut self, now: Millis, out: &mut Vec<Outgoing>) {
        while self.failed.is_none() && self.node.has_ready() {
            let Some(mut rd) = self.guard(|n| n.ready()) else {
                return;
            };
            self.send(rd.take_messages(), out);
            let mut dirty = false;
            if !rd.snapshot().is_empty() {
                let snap = rd.snapshot().clone();
                self.node.mut_store().apply_snapshot(&snap);
                match decode_state(&snap.data) {
                    Ok(o) => self.owners = o,
                    Err(e) => warn!(error = %e, "raft: snapshot data unreadable"),
                }
                self.applied = snap.get_metadata().index;
                self.lease_until.clear();
                dirty = true;
            }
            let committed = rd.take_committed_entries();
            if !rd.entries().is_empty() {
                self.node.mut_store().append(rd.entries());
                dirty = true;
            }
            if let Some(hs) = rd.hs() {
                self.node.mut_store().hard = hs.clone();
                dirty = true;
            }
            if dirty && !self.persist() {
                return;
            }
            self.send(rd.take_persisted_messages(), out);
            self.apply(committed, now);
            let Some(mut light) = self.guard(|n| n.advance(rd)) else {
                return;
            };
            if let Some(c) = light.commit_index() {
                // Written with the next persisted Ready, not fsync'd on its
                // own: a commit index is recomputed from the leader after a
                // restart, so a stale one on disk costs nothing but replay.
                self.node.mut_store().hard.commit = c;
            }
            self.send(light.take_messages(), out);
            self.apply(light.take_committed_entries(), now);
            if self.guard(|n| n.advance_apply()).is_none() {
                return;
            }
        }
        if !self.is_leader() {
            self.leader_ready_at = None;
            self.expected = None;
        }
        self.compact();
    }

    /// Runs `f` on the raft node; raft-rs panics on state it cannot
    /// reconcile (a member whose log was lost hearing the leader's commit
    /// index): the member then stops, as a crashed voter would, with the
    /// reason in its status, instead of taking the daemon down.
    fn guard<T>(&mut self, f: impl FnOnce(&mut RawNode<DiskLog>) -> T) -> Option<T> {
        let node = &mut self.node;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(node))) {
            Ok(v) => Some(v),
            Err(p) => {
                let why = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "raft-rs panicked".into());
                warn!(voter = self.voter, reason = %why, "raft member stopped: its state does not fit the cluster's (was its state file lost?)");
                self.failed = Some(format!("raft state inconsistent with the cluster: {why}"));
                None
            }
        }
    }

    fn persist(&mut self) -> bool {
        let bytes = self.node.store().encode();
        if let Err(e) = self.store.save(&bytes) {
            warn!(voter = self.voter, error = %e, "raft state not written: this voter stops");
            self.failed = Some(e);
            return false;
        }
        true
    }

    fn send(&self, msgs: Vec<RaftMsg>, out: &mut Vec<Outgoing>) {
        for m in msgs {
            let Some(to) = voter_of(m.to) else { continue };
            out.push(Outgoing {
                to,
                msg: Msg::RaftMessage(pb::RaftMessage {
                    cluster_id: self.cluster_id,
                    message: m.encode_to_vec().into(),
                }),
            });
        }
    }

    fn apply(&mut self, entries: Vec<Entry>, now: Millis) {
        for e in entries {
            if e.index <= self.applied {
                continue;
            }
            self.applied = e.index;
            if self.is_leader() && self.leader_ready_at.is_none() && e.term == self.node.raft.term {
                // Everything before this entry is applied: the owners are
                // current, and this leader logs from here on.
                self.leader_ready_at = Some(now);
                self.expected = Some(self.owners.clone());
            }
            if e.get_entry_type() != EntryType::EntryNormal || e.data.is_empty() {
                continue;
            }
            let Ok(o) = pb::OwnershipEntry::decode(&e.data[..]) else {
                self.rejected += 1;
                continue;
            };
            if apply_entry(&mut self.owners, &o) {
                self.on_applied(&o, now);
            }
        }
    }

    /// Lease bookkeeping for an entry that took effect.
    fn on_applied(&mut self, o: &pb::OwnershipEntry, now: Millis) {
        let claim = o.kind == pb::OwnershipKind::OwnershipClaim as i32;
        if claim {
            self.claim_seen_at.insert((o.rg, o.node), now);
        }
        if claim && o.node == self.voter {
            if let Some(&(rg, sent)) = self.sent.get(&o.request_id)
                && rg == o.rg
            {
                let until = Millis((sent.0 + self.lease_ms).saturating_sub(self.margin_ms));
                let e = self.lease_until.entry(o.rg).or_insert(until);
                *e = (*e).max(until);
            }
        } else {
            self.lease_until.remove(&o.rg);
        }
    }

    /// Folds the applied log into a snapshot once it grows.
    fn compact(&mut self) {
        if self.failed.is_some() {
            return;
        }
        let log = self.node.store();
        if self.applied < log.snap_index() + COMPACT_AFTER || self.applied > log.last() {
            return;
        }
        let Ok(term) = log.term(self.applied) else {
            return;
        };
        let mut snap = Snapshot {
            data: encode_state(&self.owners),
            ..Default::default()
        };
        let meta = snap.mut_metadata();
        meta.index = self.applied;
        meta.term = term;
        meta.set_conf_state(log.conf.clone());
        let log = self.node.mut_store();
        log.entries.retain(|e| e.index > snap.get_metadata().index);
        log.snap = snap;
        self.persist();
    }
}

/// Applies one entry to the ownership map; whether it took effect.
fn apply_entry(owners: &mut BTreeMap<u32, Owner>, o: &pb::OwnershipEntry) -> bool {
    let cur = owners.get(&o.rg).copied();
    if o.kind == pb::OwnershipKind::OwnershipRelease as i32 {
        return match cur {
            Some(c) if c.node == Some(o.node) => {
                owners.insert(
                    o.rg,
                    Owner {
                        node: None,
                        epoch: c.epoch,
                    },
                );
                true
            }
            _ => false,
        };
    }
    let ok = match cur {
        None => true,
        Some(c) if c.node == Some(o.node) => o.epoch >= c.epoch,
        Some(c) => o.epoch > c.epoch,
    };
    if ok {
        owners.insert(
            o.rg,
            Owner {
                node: Some(o.node),
                epoch: o.epoch,
            },
        );
    }
    ok
}

fn encode_state(owners: &BTreeMap<u32, Owner>) -> Vec<u8> {
    pb::OwnershipState {
        rgs: owners
            .iter()
            .map(|(rg, o)| pb::OwnershipEntry {
                rg: *rg,
                node: o.node.unwrap_or(0),
                epoch: o.epoch,
                request_id: 0,
                kind: if o.node.is_some() {
                    pb::OwnershipKind::OwnershipClaim as i32
                } else {
                    pb::OwnershipKind::OwnershipRelease as i32
                },
            })
            .collect(),
    }
    .encode_to_vec()
}

fn decode_state(b: &[u8]) -> Result<BTreeMap<u32, Owner>, String> {
    let st = pb::OwnershipState::decode(b).map_err(|e| format!("ownership state: {e}"))?;
    Ok(st
        .rgs
        .into_iter()
        .map(|o| {
            let node = (o.kind == pb::OwnershipKind::OwnershipClaim as i32).then_some(o.node);
            (
                o.rg,
                Owner {
                    node,
                    epoch: o.epoch,
                },
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::witness::MemoryStore;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const RG1: RgId = RgId(1);
    const LEASE: u32 = 1000;

    /// Three members in simulated time with cuttable links and crashes.
    struct Net {
        members: [Option<OwnershipGroup>; 3],
        disks: [MemoryStore; 3],
        /// `links[a][b]`: messages from a reach b.
        links: [[bool; 3]; 3],
        inflight: Vec<(Millis, u32, Msg)>,
        now: Millis,
        rng: StdRng,
        max_latency: u64,
    }

    impl Net {
        fn new(seed: u64) -> Net {
            let now = Millis(1_000_000);
            let disks: [MemoryStore; 3] = Default::default();
            let members = [0, 1, 2].map(|v| {
                Some(
                    OwnershipGroup::start(v, 1, LEASE, Arc::new(disks[v as usize].clone()), now)
                        .unwrap(),
                )
            });
            Net {
                members,
                disks,
                links: [[true; 3]; 3],
                inflight: Vec::new(),
                now,
                rng: StdRng::seed_from_u64(seed),
                max_latency: 3,
            }
        }

        fn send(&mut self, from: u32, out: Vec<Outgoing>) {
            for o in out {
                if self.links[from as usize][o.to as usize] {
                    let at = Millis(self.now.0 + self.rng.random_range(1..=self.max_latency));
                    self.inflight.push((at, o.to, o.msg));
                }
            }
        }

        fn crash(&mut self, v: u32) {
            self.members[v as usize] = None;
            self.inflight.retain(|(_, to, _)| *to != v);
        }

        fn restart(&mut self, v: u32) {
            let g = OwnershipGroup::start(
                v,
                1,
                LEASE,
                Arc::new(self.disks[v as usize].clone()),
                self.now,
            )
            .unwrap();
            self.members[v as usize] = Some(g);
        }

        fn isolate(&mut self, v: u32, up: bool) {
            for o in 0..3 {
                if o != v as usize {
                    self.links[v as usize][o] = up;
                    self.links[o][v as usize] = up;
                }
            }
        }

        /// Nodes that want `rg` (node -> epoch) claim it every 100 ms.
        fn run(&mut self, ms: u64, wants: &[(u32, u64)], mut check: impl FnMut(&Net)) {
            for _ in 0..ms {
                self.now = Millis(self.now.0 + 1);
                let now = self.now;
                let (due, rest): (Vec<_>, Vec<_>) =
                    self.inflight.drain(..).partition(|(t, _, _)| *t <= now);
                self.inflight = rest;
                for (_, to, msg) in due {
                    if let Some(g) = self.members[to as usize].as_mut() {
                        let out = g.on_message(&msg, now);
                        self.send(to, out);
                    }
                }
                for v in 0..3u32 {
                    let Some(g) = self.members[v as usize].as_mut() else {
                        continue;
                    };
                    let mut out = Vec::new();
                    if now.0.is_multiple_of(TICK_MS) {
                        out.extend(g.tick(now));
                    }
                    if now.0.is_multiple_of(100) {
                        for &(n, e) in wants {
                            if n == v {
                                out.extend(g.claim(RG1, Epoch(e), now));
                            }
                        }
                    }
                    self.send(v, out);
                }
                check(self);
            }
        }

        fn held(&self, v: u32) -> bool {
            self.members[v as usize]
                .as_ref()
                .is_some_and(|g| g.held(RG1, self.now))
        }
    }

    fn never_both(n: &Net) {
        assert!(
            !(n.held(0) && n.held(1)),
            "both nodes hold RG1 at {:?}",
            n.now
        );
    }

    #[test]
    fn group_elects_a_leader_and_logs_the_first_claim() {
        let mut n = Net::new(1);
        n.run(1500, &[(0, 2)], never_both);
        assert!(n.held(0), "node0 holds RG1");
        let st = n.members[2].as_ref().unwrap().status(&[RG1], n.now);
        assert!(st.leader.is_some() && st.commit_index > 0, "{st:?}");
        assert_eq!(
            st.rgs[0].owner.as_deref(),
            Some("node0"),
            "the witness agrees"
        );
        assert_eq!(st.rgs[0].epoch, 2);
    }

    #[test]
    fn the_other_node_gets_the_rg_only_a_lease_after_the_owner_went_silent() {
        let mut n = Net::new(2);
        n.run(1500, &[(0, 2)], never_both);
        assert!(n.held(0));
        n.isolate(0, false);
        let cut = n.now;
        let mut first_held = None;
        n.run(4000, &[(0, 2), (1, 3)], |n| {
            never_both(n);
            if n.held(1) && first_held.is_none() {
                first_held = Some(n.now);
            }
        });
        let at = first_held.expect("node1 took RG1 over");
        assert!(
            at.saturating_sub(cut) >= u64::from(LEASE) - 100,
            "too early: {} ms",
            at.saturating_sub(cut)
        );
        assert!(!n.held(0), "the cut-off owner's lease ran out");
        // Healed: node0 cannot take it back with its old epoch.
        n.isolate(0, true);
        n.run(2000, &[(0, 2), (1, 3)], never_both);
        assert!(n.held(1) && !n.held(0));
    }

    #[test]
    fn owner_keeps_its_lease_through_a_leader_crash() {
        let mut n = Net::new(3);
        n.run(1500, &[(1, 3)], never_both);
        assert!(n.held(1));
        let leader = n.members[1].as_ref().unwrap().node.raft.leader_id;
        let leader = voter_of(leader).unwrap();
        if leader == 1 {
            // node1 leads: crash the witness instead; the lease needs a
            // majority only.
            n.crash(2);
        } else {
            n.crash(leader);
        }
        n.run(3000, &[(1, 3)], |n| {
            assert!(n.held(1), "node1 lost RG1 at {:?}", n.now)
        });
    }

    #[test]
    fn a_restarted_leader_waits_a_lease_before_moving_an_rg() {
        // node1 owns RG1. node0 restarts (it forgot when it last saw node1's
        // renewals) while node1 is cut off; node0 and the witness elect a
        // leader, node0 asks for RG1 at once: it must wait out node1's lease.
        let mut n = Net::new(6);
        // Long enough for node0's log to be compacted into a snapshot: the
        // replay after its restart then shows no renewal of node1's.
        n.run(1500, &[(1, 3)], never_both);
        let mut waited = 0;
        while !n.members[0]
            .as_ref()
            .is_some_and(|g| g.node.store().snap_index() > 0 && g.node.store().entries.is_empty())
        {
            n.run(1, &[(1, 3)], never_both);
            waited += 1;
            assert!(waited < 120_000, "node0 never compacted its log");
        }
        assert!(n.held(1));
        n.crash(0);
        n.isolate(1, false);
        n.restart(0);
        n.run(3000, &[(0, 4)], never_both);
        assert!(n.held(0), "node0 got RG1 after the lease");
    }

    #[test]
    fn restarted_members_keep_their_votes_and_log() {
        let mut n = Net::new(4);
        n.run(1500, &[(0, 2)], never_both);
        for v in [2, 1, 0, 2] {
            n.crash(v);
            n.run(300, &[(0, 2), (1, 3)], never_both);
            n.restart(v);
            n.run(1500, &[(0, 2), (1, 3)], never_both);
        }
        let st = n.members[2].as_ref().unwrap().status(&[RG1], n.now);
        assert!(matches!(st.started, GroupStart::Recovered { .. }), "{st:?}");
        assert!(st.rgs[0].owner.is_some());
    }

    #[test]
    fn random_partitions_crashes_and_latency_never_give_two_holders() {
        for seed in 0..12 {
            let mut n = Net::new(100 + seed);
            n.max_latency = 30;
            let mut rng = StdRng::seed_from_u64(seed);
            n.run(1500, &[(0, 2), (1, 3)], never_both);
            let (mut e0, mut e1) = (2u64, 3u64);
            for _ in 0..25 {
                match rng.random_range(0..5) {
                    0 => {
                        let v = rng.random_range(0..3);
                        let up = rng.random_bool(0.5);
                        n.isolate(v, up);
                    }
                    1 => {
                        let v = rng.random_range(0..3);
                        if n.members[v as usize].is_some() {
                            n.crash(v);
                        } else {
                            n.restart(v);
                        }
                    }
                    2 => e0 = e0.max(e1) + 1 + (e0.max(e1) % 2 == 1) as u64,
                    3 => e1 = e0.max(e1) + 1 + (e0.max(e1) % 2 == 0) as u64,
                    _ => n.links = [[true; 3]; 3],
                }
                let wants = [(0, e0), (1, e1)];
                n.run(rng.random_range(50..1500), &wants, never_both);
            }
            for v in 0..3 {
                if n.members[v as usize].is_none() {
                    n.restart(v);
                }
            }
            n.links = [[true; 3]; 3];
            n.run(4000, &[(0, e0.max(e1) + 1)], never_both);
            assert!(n.held(0), "seed {seed}: healed and asked, node0 gets RG1");
        }
    }

    #[test]
    fn unreadable_raft_state_keeps_the_member_from_starting() {
        let disk = MemoryStore::default();
        disk.put(Some(b"not a raft state".to_vec()));
        let e = OwnershipGroup::start(2, 1, LEASE, Arc::new(disk), Millis(0))
            .err()
            .unwrap();
        assert!(e.contains("raft state"), "{e}");
    }

    #[test]
    fn a_member_whose_state_cannot_be_written_stops_taking_part() {
        let mut n = Net::new(5);
        n.run(1500, &[(0, 2)], never_both);
        n.disks[2]
            .failing
            .store(true, std::sync::atomic::Ordering::Relaxed);
        n.run(1000, &[(0, 2)], never_both);
        let st = n.members[2].as_ref().unwrap().status(&[RG1], n.now);
        assert!(st.failed.is_some(), "{st:?}");
        assert!(n.held(0), "two voters still make a majority");
    }
}
