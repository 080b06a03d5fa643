//! Redundancy-group election: a pure state machine.
//!
//! Inputs are events (peer heartbeats per path, monitor changes, sync
//! readiness, operator requests, the peer's failover messages) and the time
//! they happen at; outputs are actions (promote, demote, messages to send,
//! answers to the operator). Nothing here reads a clock, sleeps or does I/O,
//! so unit tests and turmoil drive it directly.
//!
//! Rules, in the order they are applied per RG (each has a test named after
//! it in `tests.rs`):
//! 1. A disabled RG stays disabled.
//! 2. Startup grace: until the peer has been heard or the grace has passed,
//!    a booting node claims nothing (it never steals from a live peer).
//! 3. The peer is lost only when every path (control link, fab0, fab1) has
//!    been silent for the threshold. A node whose peer is lost takes every
//!    RG it is eligible for, at once (hold-down does not delay a takeover).
//!    Control link down while a fabric path is alive is not peer loss.
//! 4. Effective priority = priority − weights of failed monitors (floor 0);
//!    0 is ineligible. An ineligible node yields to an eligible peer; if
//!    both are ineligible the current primary keeps the RG (degraded) rather
//!    than leave it with no primary. A node that becomes eligible claims
//!    an RG from an ineligible peer only on a heartbeat heard since then
//!    (the peer may have claimed it meanwhile: no dual primary at start).
//! 5. A manual override (from a committed manual failover) holds until
//!    reset or until its node fails (ineligible or lost).
//! 6. Two primaries (after a partition, or when a paused or restarted
//!    node resumes): the newer epoch keeps the RG and the other node
//!    yields, whatever the priorities; preempt may take it back by rule 7.
//!    In witness mode a primary holding a lease beats one without.
//! 7. With preempt, a secondary with higher effective priority that is
//!    synced and past hold-down takes the RG ("import state, then claim").
//!    Without preempt the incumbent keeps it.
//! 8. Neither primary: the higher effective priority claims it, then the
//!    lower node id.
//!
//! Epochs are per RG and node-distinct (node0 claims even epochs, node1
//! odd ones), so two primaries can never share an epoch even after a full
//! partition; every claim takes the next epoch above any seen.

pub mod driver;
pub mod duo;
mod rg;
#[cfg(test)]
mod tests;

pub use rg::{FULL_WEIGHT, MonitorConfig, RgConfig, RgState, RgStatus};

use rg::{RgElection, Transfer};
use std::collections::BTreeMap;
use tandem_dataplane::session::Millis;
use tandem_proto::pb;
use tandem_proto::{Epoch, MIN_HEARTBEAT_VERSION, NodeId, PROTOCOL_VERSION, RgId};

/// The three paths heartbeats travel on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Path {
    Control = 0,
    Fab0 = 1,
    Fab1 = 2,
}

impl Path {
    pub const ALL: [Path; 3] = [Path::Control, Path::Fab0, Path::Fab1];

    pub fn name(self) -> &'static str {
        match self {
            Path::Control => "control",
            Path::Fab0 => "fab0",
            Path::Fab1 => "fab1",
        }
    }

    pub fn from_wire(v: u32) -> Option<Path> {
        Path::ALL.get(v as usize).copied()
    }
}

#[derive(Clone, Debug)]
pub struct ElectionConfig {
    pub node: NodeId,
    pub cluster_id: u32,
    pub heartbeat_interval_ms: u64,
    /// Missed intervals after which a path is down.
    pub heartbeat_threshold: u32,
    /// How long a booting node waits to hear its peer before it may claim.
    pub startup_grace_ms: u64,
    /// A failover not committed within this time is aborted.
    pub transfer_timeout_ms: u64,
    pub rgs: Vec<RgConfig>,
    pub incarnation: u64,
}

impl ElectionConfig {
    pub fn path_timeout_ms(&self) -> u64 {
        self.heartbeat_interval_ms * u64::from(self.heartbeat_threshold)
    }
}

/// What the driver must do.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Become primary for `rg` in `epoch`: start forwarding, promote the
    /// RG's sessions to local, announce (gratuitous ARP / NA). Also emitted
    /// when an existing primary takes a new epoch.
    Promote {
        rg: RgId,
        epoch: Epoch,
        reason: String,
    },
    /// Stop forwarding `rg` (publish first, then demote sessions).
    Demote {
        rg: RgId,
        epoch: Epoch,
        reason: String,
    },
    /// Send to the peer on the control stream.
    Send(pb::envelope::Msg),
    /// Answer to a local operator request.
    FailoverDone {
        rg: RgId,
        request_id: u64,
        result: Result<(), String>,
    },
    /// Something worth a line in the event history.
    Event { rg: Option<RgId>, text: String },
}

/// Why an operator request was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal(pub String);

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The peer as its latest heartbeat describes it (rebuilt from every
/// heartbeat, never merged, so an RG the peer stopped reporting is gone).
#[derive(Clone, Debug, Default)]
struct PeerView {
    /// When this view was last replaced by a newer heartbeat.
    heard_at: Millis,
    seq: u64,
    incarnation: u64,
    rgs: BTreeMap<RgId, pb::RgHeartbeat>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct PathStatus {
    pub path: Path,
    pub up: bool,
    pub last_heard_ms_ago: Option<u64>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ClusterStatus {
    pub node: u8,
    pub peer_alive: bool,
    pub peer_reason: String,
    pub in_startup_grace: bool,
    pub paths: Vec<PathStatus>,
    pub rgs: Vec<RgStatus>,
    /// Witness mode only (filled in by the driver).
    pub witness: Option<crate::witness::WitnessStatus>,
}

pub struct Election {
    cfg: ElectionConfig,
    started: Option<Millis>,
    last_heard: [Option<Millis>; 3],
    peer: Option<PeerView>,
    peer_ever_seen: bool,
    rgs: BTreeMap<RgId, RgElection>,
    hb_seq: u64,
    next_request: u64,
    rejected_heartbeats: u64,
    /// Protocol version of the peer's last accepted heartbeat.
    peer_protocol: Option<u32>,
}

impl Election {
    pub fn new(cfg: ElectionConfig) -> Election {
        let rgs = cfg
            .rgs
            .iter()
            .map(|c| (c.rg, RgElection::new(c.clone())))
            .collect();
        Election {
            cfg,
            started: None,
            last_heard: [None; 3],
            peer: None,
            peer_ever_seen: false,
            rgs,
            hb_seq: 0,
            next_request: 1,
            rejected_heartbeats: 0,
            peer_protocol: None,
        }
    }

    pub fn node(&self) -> NodeId {
        self.cfg.node
    }

    pub fn config(&self) -> &ElectionConfig {
        &self.cfg
    }

    fn peer_node(&self) -> NodeId {
        self.cfg.node.peer()
    }

    fn path_up(&self, p: Path, now: Millis) -> bool {
        self.last_heard[p as usize]
            .is_some_and(|t| now.saturating_sub(t) <= self.cfg.path_timeout_ms())
    }

    pub fn peer_alive(&self, now: Millis) -> bool {
        Path::ALL.iter().any(|&p| self.path_up(p, now))
    }

    fn in_grace(&self, now: Millis) -> bool {
        !self.peer_ever_seen
            && self
                .started
                .is_none_or(|s| now.saturating_sub(s) < self.cfg.startup_grace_ms)
    }

    fn start(&mut self, now: Millis) {
        self.started.get_or_insert(now);
    }

    /// Heartbeats from other clusters or from this node's own id (a
    /// misconfigured or looped path) that were ignored.
    pub fn rejected_heartbeats(&self) -> u64 {
        self.rejected_heartbeats
    }

    // ----- events --------------------------------------------------------

    /// Time passes: path and peer timeouts, grace, monitor dampening,
    /// transfer timeouts.
    pub fn tick(&mut self, now: Millis) -> Vec<Action> {
        self.start(now);
        let mut out = Vec::new();
        for r in self.rgs.values_mut() {
            r.tick_monitors(now, &mut out);
        }
        self.expire_transfers(now, &mut out);
        self.evaluate_all(now, &mut out);
        out
    }

    /// A heartbeat arrived on `path`.
    pub fn on_heartbeat(&mut self, hb: &pb::Heartbeat, path: Path, now: Millis) -> Vec<Action> {
        self.start(now);
        if hb.cluster_id != self.cfg.cluster_id
            || hb.node_id != u32::from(self.peer_node().0)
            || hb.protocol_version < MIN_HEARTBEAT_VERSION
        {
            self.rejected_heartbeats += 1;
            return Vec::new();
        }
        // Another version is alive all the same (an upgrade in progress):
        // treating it as silent would make both nodes primary.
        self.peer_protocol = Some(hb.protocol_version);
        let mut out = Vec::new();
        if !self.peer_alive(now) {
            out.push(Action::Event {
                rg: None,
                text: format!("peer heard on {}", path.name()),
            });
        }
        self.last_heard[path as usize] = Some(now);
        self.peer_ever_seen = true;
        let newer = match &self.peer {
            None => true,
            Some(v) => hb.incarnation != v.incarnation || hb.seq > v.seq,
        };
        if newer {
            if self
                .peer
                .as_ref()
                .is_some_and(|v| v.incarnation != hb.incarnation)
            {
                out.push(Action::Event {
                    rg: None,
                    text: "peer restarted (new incarnation)".into(),
                });
            }
            let rgs = hb
                .rgs
                .iter()
                .filter_map(|r| Some((RgId(u16::try_from(r.rg).ok()?), *r)))
                .collect();
            self.peer = Some(PeerView {
                heard_at: now,
                seq: hb.seq,
                incarnation: hb.incarnation,
                rgs,
            });
            self.absorb_peer_claims(now, &mut out);
        }
        self.evaluate_all(now, &mut out);
        out
    }

    /// A monitored interface changed (raw, before dampening).
    pub fn on_monitor(&mut self, name: &str, up: bool, now: Millis) -> Vec<Action> {
        self.start(now);
        let mut out = Vec::new();
        for r in self.rgs.values_mut() {
            r.monitor_raw(name, up, now);
            r.tick_monitors(now, &mut out);
        }
        self.evaluate_all(now, &mut out);
        out
    }

    /// The sync layer reports whether this node's copy of `rg` is complete
    /// (bulk received and in sync).
    pub fn on_sync_ready(&mut self, rg: RgId, ready: bool, now: Millis) -> Vec<Action> {
        self.start(now);
        let mut out = Vec::new();
        if let Some(r) = self.rgs.get_mut(&rg) {
            r.synced = ready;
        }
        self.evaluate_all(now, &mut out);
        out
    }

    pub fn set_disabled(&mut self, rg: RgId, disabled: bool, now: Millis) -> Vec<Action> {
        let mut out = Vec::new();
        if let Some(r) = self.rgs.get_mut(&rg) {
            r.disabled = disabled;
        }
        self.evaluate_all(now, &mut out);
        out
    }

    // ----- manual failover -----------------------------------------------

    /// `request chassis cluster failover redundancy-group N node M`, on
    /// node M (the driver forwards requests naming the other node). On
    /// success the transfer has started; its outcome arrives later as
    /// `FailoverDone` with the returned id.
    pub fn request_failover(
        &mut self,
        rg: RgId,
        target: NodeId,
        now: Millis,
    ) -> Result<(u64, Vec<Action>), Refusal> {
        self.start(now);
        if target != self.cfg.node {
            return Err(Refusal(format!("request must be handled by {target}")));
        }
        let peer_alive = self.peer_alive(now);
        let peer_rg = self.peer_rg(rg, now);
        let r = self
            .rgs
            .get(&rg)
            .ok_or_else(|| Refusal(format!("{rg} is not configured")))?;
        r.check_pull(now, peer_alive, peer_rg.as_ref())?;
        let id = self.next_request;
        self.next_request += 1;
        let r = self.rgs.get_mut(&rg).expect("checked");
        r.transfer = Some(Transfer::Pulling { id, since: now });
        let msg = pb::envelope::Msg::FailoverRequest(pb::FailoverRequest {
            request_id: id,
            rg: rg.0.into(),
            target_node: self.cfg.node.0.into(),
            phase: pb::FailoverPhase::Prepare as i32,
            epoch: r.epoch.0,
        });
        let out = vec![
            Action::Event {
                rg: Some(rg),
                text: format!("manual failover {id} to {}: prepare", self.cfg.node),
            },
            Action::Send(msg),
        ];
        Ok((id, out))
    }

    /// `request chassis cluster failover reset redundancy-group N`.
    pub fn reset_failover(&mut self, rg: RgId, now: Millis) -> Result<Vec<Action>, Refusal> {
        let r = self
            .rgs
            .get_mut(&rg)
            .ok_or_else(|| Refusal(format!("{rg} is not configured")))?;
        r.manual = None;
        let mut out = vec![
            Action::Event {
                rg: Some(rg),
                text: "manual failover reset".into(),
            },
            Action::Send(pb::envelope::Msg::FailoverRequest(pb::FailoverRequest {
                request_id: 0,
                rg: rg.0.into(),
                target_node: 0,
                phase: pb::FailoverPhase::Reset as i32,
                epoch: 0,
            })),
        ];
        self.evaluate_all(now, &mut out);
        Ok(out)
    }

    /// A failover message from the peer.
    pub fn on_failover_request(&mut self, req: &pb::FailoverRequest, now: Millis) -> Vec<Action> {
        self.start(now);
        let mut out = Vec::new();
        let Ok(rg) = u16::try_from(req.rg).map(RgId) else {
            return out;
        };
        let me = self.cfg.node;
        let Some(r) = self.rgs.get_mut(&rg) else {
            out.push(Self::respond(
                req,
                false,
                format!("{rg} is not configured on {me}"),
            ));
            return out;
        };
        match pb::FailoverPhase::try_from(req.phase) {
            Ok(pb::FailoverPhase::Prepare) => {
                let result = r.accept_yield(req.request_id, now);
                match result {
                    Ok(()) => {
                        out.push(Action::Event {
                            rg: Some(rg),
                            text: format!(
                                "manual failover {} to {}: accepted, transferring out",
                                req.request_id,
                                me.peer()
                            ),
                        });
                        out.push(Self::respond(req, true, String::new()));
                    }
                    Err(reason) => out.push(Self::respond(req, false, reason)),
                }
            }
            Ok(pb::FailoverPhase::Commit) => {
                let committed = matches!(r.transfer, Some(Transfer::Yielding { id, .. }) if id == req.request_id);
                if committed {
                    r.transfer = None;
                    r.manual = Some(me.peer());
                    r.epoch = r.epoch.max(Epoch(req.epoch));
                    r.set_state(RgState::Secondary, now);
                    out.push(Action::Demote {
                        rg,
                        epoch: r.epoch,
                        reason: format!(
                            "manual failover {} committed by {}",
                            req.request_id,
                            me.peer()
                        ),
                    });
                    self.note_peer_rg(rg, pb::RgState::Primary, Some(req.epoch));
                }
            }
            Ok(pb::FailoverPhase::Abort) => {
                if matches!(r.transfer, Some(Transfer::Yielding { id, .. }) if id == req.request_id)
                {
                    r.transfer = None;
                    r.set_state(RgState::Primary, now);
                    out.push(Action::Event {
                        rg: Some(rg),
                        text: format!("manual failover {} aborted by peer", req.request_id),
                    });
                }
            }
            Ok(pb::FailoverPhase::Reset) => {
                r.manual = None;
                out.push(Action::Event {
                    rg: Some(rg),
                    text: "manual failover reset by peer".into(),
                });
            }
            Ok(pb::FailoverPhase::Forward) | Err(_) => {}
        }
        self.evaluate_all(now, &mut out);
        out
    }

    /// What a failover message proves about the peer's role, recorded until
    /// its next heartbeat says the same (or something newer).
    fn note_peer_rg(&mut self, rg: RgId, state: pb::RgState, epoch: Option<u64>) {
        if let Some(p) = self.peer.as_mut().and_then(|v| v.rgs.get_mut(&rg)) {
            p.state = state as i32;
            if let Some(e) = epoch {
                p.epoch = p.epoch.max(e);
            }
        }
    }

    fn respond(req: &pb::FailoverRequest, accepted: bool, reason: String) -> Action {
        Action::Send(pb::envelope::Msg::FailoverResponse(pb::FailoverResponse {
            request_id: req.request_id,
            rg: req.rg,
            accepted,
            reason,
            phase: req.phase,
            epoch: 0,
        }))
    }

    /// The primary's answer to our Prepare.
    pub fn on_failover_response(
        &mut self,
        resp: &pb::FailoverResponse,
        now: Millis,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        let Ok(rg) = u16::try_from(resp.rg).map(RgId) else {
            return out;
        };
        let next = self.next_epoch(rg);
        let me = self.cfg.node;
        let Some(r) = self.rgs.get_mut(&rg) else {
            return out;
        };
        let Some(Transfer::Pulling { id, .. }) = r.transfer else {
            return out;
        };
        if id != resp.request_id {
            return out;
        }
        r.transfer = None;
        if !resp.accepted {
            out.push(Action::FailoverDone {
                rg,
                request_id: id,
                result: Err(format!("peer refused: {}", resp.reason)),
            });
            return out;
        }
        r.manual = Some(me);
        r.epoch = next;
        r.set_state(RgState::Primary, now);
        out.push(Action::Promote {
            rg,
            epoch: next,
            reason: format!("manual failover {id}"),
        });
        // The old primary demotes on our commit: stop treating it as one.
        self.note_peer_rg(rg, pb::RgState::Secondary, None);
        out.push(Action::Send(pb::envelope::Msg::FailoverRequest(
            pb::FailoverRequest {
                request_id: id,
                rg: rg.0.into(),
                target_node: me.0.into(),
                phase: pb::FailoverPhase::Commit as i32,
                epoch: next.0,
            },
        )));
        out.push(Action::FailoverDone {
            rg,
            request_id: id,
            result: Ok(()),
        });
        self.evaluate_all(now, &mut out);
        out
    }

    fn expire_transfers(&mut self, now: Millis, out: &mut Vec<Action>) {
        let timeout = self.cfg.transfer_timeout_ms;
        for (rg, r) in &mut self.rgs {
            match r.transfer {
                Some(Transfer::Pulling { id, since }) if now.saturating_sub(since) > timeout => {
                    r.transfer = None;
                    out.push(Action::FailoverDone {
                        rg: *rg,
                        request_id: id,
                        result: Err("peer did not answer".into()),
                    });
                    out.push(Action::Send(pb::envelope::Msg::FailoverRequest(
                        pb::FailoverRequest {
                            request_id: id,
                            rg: rg.0.into(),
                            target_node: self.cfg.node.0.into(),
                            phase: pb::FailoverPhase::Abort as i32,
                            epoch: 0,
                        },
                    )));
                }
                Some(Transfer::Yielding { id, since }) if now.saturating_sub(since) > timeout => {
                    r.transfer = None;
                    r.set_state(RgState::Primary, now);
                    out.push(Action::Event {
                        rg: Some(*rg),
                        text: format!("manual failover {id} not committed: keeping the RG"),
                    });
                }
                _ => {}
            }
        }
    }

    // ----- evaluation ----------------------------------------------------

    fn peer_rg(&self, rg: RgId, now: Millis) -> Option<pb::RgHeartbeat> {
        if !self.peer_alive(now) {
            return None;
        }
        self.peer.as_ref()?.rgs.get(&rg).copied()
    }

    /// The next epoch this node may claim for `rg`: above every epoch seen,
    /// with this node's parity.
    fn next_epoch(&self, rg: RgId) -> Epoch {
        let mine = self.rgs.get(&rg).map_or(0, |r| r.epoch.0);
        let peer = self
            .peer
            .as_ref()
            .and_then(|p| p.rgs.get(&rg))
            .map_or(0, |r| r.epoch);
        let floor = self.rgs.get(&rg).map_or(0, |r| r.epoch_floor);
        let mut e = mine.max(peer).max(floor) + 1;
        if e % 2 != u64::from(self.cfg.node.0 % 2) {
            e += 1;
        }
        Epoch(e)
    }

    /// Adopts the peer's epochs and manual flags, and treats a newer peer
    /// claim as the commit of a transfer we agreed to.
    fn absorb_peer_claims(&mut self, now: Millis, out: &mut Vec<Action>) {
        let me = self.cfg.node;
        let Some(view) = self.peer.clone() else {
            return;
        };
        for (rg, r) in &mut self.rgs {
            let Some(p) = view.rgs.get(rg) else { continue };
            let peer_primary = p.state == pb::RgState::Primary as i32;
            if peer_primary {
                r.observe_peer_epoch(p.epoch, now);
            }
            if peer_primary && p.epoch > r.epoch.0 {
                if let Some(Transfer::Yielding { id, .. }) = r.transfer
                    && r.state != RgState::Secondary
                {
                    r.transfer = None;
                    r.manual = Some(me.peer());
                    r.epoch = Epoch(p.epoch);
                    r.set_state(RgState::Secondary, now);
                    out.push(Action::Demote {
                        rg: *rg,
                        epoch: r.epoch,
                        reason: format!("manual failover {id} committed by peer"),
                    });
                    continue;
                }
                if r.state != RgState::Primary {
                    r.epoch = Epoch(p.epoch);
                }
            }
            if peer_primary && p.manual && r.manual.is_none() && r.transfer.is_none() {
                r.manual = Some(me.peer());
            }
            if !p.manual && r.manual == Some(me.peer()) && peer_primary {
                r.manual = None;
            }
        }
    }

    fn evaluate_all(&mut self, now: Millis, out: &mut Vec<Action>) {
        let rgs: Vec<RgId> = self.rgs.keys().copied().collect();
        for rg in rgs {
            self.evaluate(rg, now, out);
        }
    }

    fn evaluate(&mut self, rg: RgId, now: Millis, out: &mut Vec<Action>) {
        let peer_alive = self.peer_alive(now);
        let in_grace = self.in_grace(now);
        let peer = self.peer_rg(rg, now);
        let peer_heard_at = self.peer.as_ref().map(|v| v.heard_at);
        let next = self.next_epoch(rg);
        let me = self.cfg.node;
        let r = self.rgs.get_mut(&rg).expect("evaluated RGs exist");
        r.clear_failed_override(me, peer_alive, peer.as_ref(), out);
        // Evidence about the peer counts against our own ownership only if
        // it was reported after our last ownership change.
        let peer_fresh = match (peer_heard_at, r.last_own_change) {
            (Some(h), Some(m)) => h > m,
            (Some(_), None) => true,
            (None, _) => false,
        };
        let peer_since_eligible = match (peer_heard_at, r.eligible_since) {
            (Some(h), Some(e)) => h > e,
            (_, None) => true,
            (None, Some(_)) => false,
        };
        let view = rg::PeerView {
            alive: peer_alive,
            in_grace,
            heartbeat: peer.as_ref(),
            fresh: peer_fresh,
            since_eligible: peer_since_eligible,
        };
        let (want, reason) = r.decide(me, now, &view);
        r.reason = reason.clone();
        let was_primary = r.state.forwards();
        // A primary whose peer reports a higher epoch (it claimed the RG
        // during a partition, even if it has yielded since) re-announces
        // above it, or the peer would fence this node's stream as stale.
        let bump = want == RgState::Primary
            && r.state == RgState::Primary
            && (peer.as_ref().is_some_and(|p| p.epoch > r.epoch.0) || r.epoch_floor > r.epoch.0);
        if want == r.state && !bump {
            return;
        }
        if want.forwards() && (!was_primary || bump) {
            r.epoch = next;
            r.failovers += u64::from(!was_primary);
            r.set_state(want, now);
            out.push(Action::Promote {
                rg,
                epoch: next,
                reason,
            });
        } else if !want.forwards() && was_primary {
            r.set_state(want, now);
            out.push(Action::Demote {
                rg,
                epoch: r.epoch,
                reason,
            });
        } else {
            r.set_state(want, now);
            out.push(Action::Event {
                rg: Some(rg),
                text: format!("{} ({reason})", want.name()),
            });
        }
    }

    /// Witness mode: whether this node holds the ownership log's lease for `rg`
    /// (reported in heartbeats, so that a claim without one yields to the
    /// forwarding primary). Changes no role by itself.
    pub fn set_lease_held(&mut self, rg: RgId, held: bool) {
        if let Some(r) = self.rgs.get_mut(&rg) {
            r.awaiting_lease = !held;
        }
    }

    /// Witness mode: the ownership log committed `rg` to the other node in
    /// `epoch`; this node's next claim goes above it (a claim at or below
    /// it would never be logged). Takes effect at the next evaluation.
    pub fn raise_epoch_floor(&mut self, rg: RgId, epoch: Epoch) {
        if let Some(r) = self.rgs.get_mut(&rg) {
            r.epoch_floor = r.epoch_floor.max(epoch.0);
        }
    }

    // ----- outputs -------------------------------------------------------

    /// The heartbeat to send now on `path`.
    pub fn heartbeat(&mut self, path: Path) -> pb::Heartbeat {
        self.hb_seq += 1;
        pb::Heartbeat {
            node_id: self.cfg.node.0.into(),
            cluster_id: self.cfg.cluster_id,
            seq: self.hb_seq,
            rgs: self.rgs.values().map(RgElection::heartbeat).collect(),
            protocol_version: PROTOCOL_VERSION,
            incarnation: self.cfg.incarnation,
            path: path as u32,
        }
    }

    /// Roles for the sync layer, dataplane and fabric.
    pub fn roles(&self) -> crate::sync::RoleMap {
        self.rgs
            .iter()
            .map(|(rg, r)| {
                (
                    *rg,
                    crate::sync::RgRole {
                        primary: r.state.forwards(),
                        epoch: r.epoch,
                    },
                )
            })
            .collect()
    }

    pub fn state(&self, rg: RgId) -> Option<RgState> {
        self.rgs.get(&rg).map(|r| r.state)
    }

    pub fn epoch(&self, rg: RgId) -> Option<Epoch> {
        self.rgs.get(&rg).map(|r| r.epoch)
    }

    pub fn status(&self, now: Millis) -> ClusterStatus {
        let peer_alive = self.peer_alive(now);
        let paths: Vec<PathStatus> = Path::ALL
            .iter()
            .map(|&p| PathStatus {
                path: p,
                up: self.path_up(p, now),
                last_heard_ms_ago: self.last_heard[p as usize].map(|t| now.saturating_sub(t)),
            })
            .collect();
        let peer_reason = if !peer_alive {
            if self.peer_ever_seen {
                "peer lost: no heartbeat on any path".to_string()
            } else if self.in_grace(now) {
                "waiting for peer (startup grace)".to_string()
            } else {
                "peer never seen".to_string()
            }
        } else if let Some(v) = self.peer_protocol.filter(|&v| v != PROTOCOL_VERSION) {
            format!(
                "peer alive, speaking protocol {v} (this node {PROTOCOL_VERSION}): \
                 no session sync until both run one version"
            )
        } else if !self.path_up(Path::Control, now) {
            "control link down; peer alive on fabric (no takeover)".to_string()
        } else if (self.last_heard[Path::Fab0 as usize].is_some()
            || self.last_heard[Path::Fab1 as usize].is_some())
            && !self.path_up(Path::Fab0, now)
            && !self.path_up(Path::Fab1, now)
        {
            // A condition, not peer death: roles stay; frames that land on
            // the node not owning their RG cannot cross and are dropped.
            "peer alive on control; both fabric links down (no fabric forwarding)".to_string()
        } else {
            "peer alive".to_string()
        };
        ClusterStatus {
            node: self.cfg.node.0,
            peer_alive,
            peer_reason,
            in_startup_grace: self.in_grace(now),
            paths,
            rgs: self
                .rgs
                .iter()
                .map(|(rg, r)| r.status(*rg, now, self.peer_rg(*rg, now).as_ref(), peer_alive))
                .collect(),
            witness: None,
        }
    }
}
