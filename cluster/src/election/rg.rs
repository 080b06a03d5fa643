//! One RG's election state and the rules that decide its role.

use super::Action;
use super::Refusal;
use std::collections::BTreeMap;
use tandem_dataplane::session::Millis;
use tandem_proto::pb;
use tandem_proto::{Epoch, NodeId, RgId};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MonitorConfig {
    /// Interface name (or `ip:<addr>` for a reachability probe, or
    /// `dataplane:<device>` for the dataplane's health on a port).
    pub name: String,
    pub weight: u16,
    /// The state assumed before the first report.
    pub initially_up: bool,
    /// Dampening overrides for this monitor (else the RG's).
    pub down_after_ms: Option<u64>,
    pub up_after_ms: Option<u64>,
}

/// The weight that makes a node ineligible whatever its priority.
pub const FULL_WEIGHT: u16 = u16::MAX;

impl MonitorConfig {
    /// An interface link monitor: up until told otherwise, dampened.
    pub fn interface(name: &str, weight: u16) -> MonitorConfig {
        MonitorConfig {
            name: name.into(),
            weight,
            initially_up: true,
            down_after_ms: None,
            up_after_ms: None,
        }
    }

    /// The dataplane's health on `device`: at full weight, down until the
    /// dataplane reports it running, and undampened (a dead worker does
    /// not flap, and a node must not forward one moment longer than its
    /// dataplane runs).
    pub fn dataplane(device: &str) -> MonitorConfig {
        MonitorConfig {
            name: format!("dataplane:{device}"),
            weight: FULL_WEIGHT,
            initially_up: false,
            down_after_ms: Some(0),
            up_after_ms: Some(0),
        }
    }
}

#[derive(Clone, Debug)]
pub struct RgConfig {
    pub rg: RgId,
    /// This node's configured priority (1..=255; 0 disables the RG here).
    pub priority: u16,
    pub preempt: bool,
    /// Minimum time between two ownership changes of this RG caused by
    /// preference (preempt, manual failover). Peer loss ignores it.
    pub hold_down_ms: u64,
    pub monitors: Vec<MonitorConfig>,
    /// A monitor must stay down this long before its weight counts.
    pub monitor_down_after_ms: u64,
    /// ... and up this long before its weight is given back.
    pub monitor_up_after_ms: u64,
}

impl RgConfig {
    pub fn new(rg: RgId, priority: u16) -> RgConfig {
        RgConfig {
            rg,
            priority,
            preempt: false,
            hold_down_ms: 1000,
            monitors: Vec::new(),
            monitor_down_after_ms: 300,
            monitor_up_after_ms: 2000,
        }
    }
}

/// What a decision knows about the peer.
#[derive(Clone, Copy, Debug)]
pub struct PeerView<'a> {
    /// Heard on some path within the threshold.
    pub alive: bool,
    /// This node is still in its startup grace.
    pub in_grace: bool,
    /// The peer's last report for this RG.
    pub heartbeat: Option<&'a pb::RgHeartbeat>,
    /// That report came after this node's last ownership change.
    pub fresh: bool,
    /// ... and after this node last became eligible.
    pub since_eligible: bool,
}

/// Role of this node for one RG.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum RgState {
    /// Booting: waiting to hear the peer (startup grace).
    Init,
    Secondary,
    Primary,
    /// Primary that agreed to hand over and waits for the peer's commit:
    /// still forwarding, so there is never a moment with no forwarder.
    SecondaryHold,
    /// Effective priority 0.
    Ineligible,
    Disabled,
}

impl RgState {
    /// Whether this node forwards the RG's traffic in this state.
    pub fn forwards(self) -> bool {
        matches!(self, RgState::Primary | RgState::SecondaryHold)
    }

    pub fn name(self) -> &'static str {
        match self {
            RgState::Init => "init",
            RgState::Secondary => "secondary",
            RgState::Primary => "primary",
            RgState::SecondaryHold => "secondary-hold",
            RgState::Ineligible => "ineligible",
            RgState::Disabled => "disabled",
        }
    }

    /// The inverse of [`RgState::to_wire`].
    pub fn from_wire(s: pb::RgState) -> RgState {
        match s {
            pb::RgState::Init => RgState::Init,
            pb::RgState::Secondary => RgState::Secondary,
            pb::RgState::Primary => RgState::Primary,
            pb::RgState::SecondaryHold => RgState::SecondaryHold,
            pb::RgState::Ineligible => RgState::Ineligible,
            pb::RgState::Disabled => RgState::Disabled,
        }
    }

    pub fn to_wire(self) -> pb::RgState {
        match self {
            RgState::Init => pb::RgState::Init,
            RgState::Secondary => pb::RgState::Secondary,
            RgState::Primary => pb::RgState::Primary,
            RgState::SecondaryHold => pb::RgState::SecondaryHold,
            RgState::Ineligible => pb::RgState::Ineligible,
            RgState::Disabled => pb::RgState::Disabled,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Transfer {
    /// We asked the primary to hand the RG to us.
    Pulling { id: u64, since: Millis },
    /// We agreed to hand the RG to the peer and wait for its commit.
    Yielding { id: u64, since: Millis },
}

#[derive(Clone, Debug)]
struct Monitor {
    weight: u16,
    /// Dampened state: what the weight calculation uses.
    up: bool,
    raw_up: bool,
    raw_since: Millis,
    down_after_ms: Option<u64>,
    up_after_ms: Option<u64>,
}

/// Operator view of one RG.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RgStatus {
    pub rg: u16,
    pub state: RgState,
    pub priority: u16,
    pub effective_priority: u16,
    pub preempt: bool,
    pub manual: Option<u8>,
    pub epoch: u64,
    pub synced: bool,
    pub reason: String,
    pub failovers: u64,
    pub failed_monitors: Vec<String>,
    /// Why this node could not take the RG by preference now (empty: it can).
    pub takeover_blockers: Vec<String>,
    /// Why a manual failover to this node would be refused now.
    pub transfer_blockers: Vec<String>,
    pub peer_state: Option<String>,
    pub peer_priority: Option<u32>,
}

pub(super) struct RgElection {
    pub cfg: RgConfig,
    pub state: RgState,
    pub epoch: Epoch,
    /// When the RG last moved between the nodes, as seen from here: this
    /// node started or stopped forwarding it, or the peer announced a new
    /// epoch. Hold-down counts from here.
    pub last_move: Option<Millis>,
    /// When this node last started or stopped forwarding the RG.
    pub last_own_change: Option<Millis>,
    pub synced: bool,
    pub manual: Option<NodeId>,
    pub transfer: Option<Transfer>,
    pub disabled: bool,
    pub reason: String,
    pub failovers: u64,
    monitors: BTreeMap<String, Monitor>,
    /// When the effective priority last rose from 0 (the node became
    /// eligible): what the peer reported before then describes a world in
    /// which this node could not compete.
    pub eligible_since: Option<Millis>,
    /// Witness mode: primary here, but without a lease from the log (so not
    /// forwarding). Always false without a witness.
    pub awaiting_lease: bool,
    /// Witness mode: the highest epoch the ownership log committed to the
    /// other node; a claim must go above it.
    pub epoch_floor: u64,
}

impl RgElection {
    pub fn new(cfg: RgConfig) -> RgElection {
        let monitors = cfg
            .monitors
            .iter()
            .map(|m| {
                (
                    m.name.clone(),
                    Monitor {
                        weight: m.weight,
                        up: m.initially_up,
                        raw_up: m.initially_up,
                        raw_since: Millis(0),
                        down_after_ms: m.down_after_ms,
                        up_after_ms: m.up_after_ms,
                    },
                )
            })
            .collect();
        RgElection {
            disabled: cfg.priority == 0,
            cfg,
            state: RgState::Init,
            epoch: Epoch(0),
            last_move: None,
            last_own_change: None,
            synced: false,
            manual: None,
            transfer: None,
            reason: "starting".into(),
            failovers: 0,
            monitors,
            eligible_since: None,
            awaiting_lease: false,
            epoch_floor: 0,
        }
    }

    pub fn set_state(&mut self, s: RgState, now: Millis) {
        if s.forwards() != self.state.forwards() {
            self.last_move = Some(now);
            self.last_own_change = Some(now);
        }
        self.state = s;
    }

    /// The peer announced a newer epoch: the RG moved.
    pub fn observe_peer_epoch(&mut self, epoch: u64, now: Millis) {
        if epoch > self.epoch.0 {
            self.last_move = Some(now);
        }
    }

    pub fn effective_priority(&self) -> u16 {
        let failed: u32 = self
            .monitors
            .values()
            .filter(|m| !m.up)
            .map(|m| u32::from(m.weight))
            .sum();
        u32::from(self.cfg.priority).saturating_sub(failed) as u16
    }

    /// The monitors whose weight counts now, comma-separated.
    fn failed_names(&self) -> String {
        let v: Vec<&str> = self
            .monitors
            .iter()
            .filter(|(_, m)| !m.up)
            .map(|(n, _)| n.as_str())
            .collect();
        if v.is_empty() {
            "monitors".into()
        } else {
            v.join(", ")
        }
    }

    fn hold_down_left(&self, now: Millis) -> u64 {
        self.last_move.map_or(0, |t| {
            self.cfg.hold_down_ms.saturating_sub(now.saturating_sub(t))
        })
    }

    pub fn monitor_raw(&mut self, name: &str, up: bool, now: Millis) {
        if let Some(m) = self.monitors.get_mut(name)
            && m.raw_up != up
        {
            m.raw_up = up;
            m.raw_since = now;
        }
    }

    /// Applies dampening: a raw change counts once it has lasted.
    pub fn tick_monitors(&mut self, now: Millis, out: &mut Vec<Action>) {
        let was_eligible = self.effective_priority() > 0;
        self.tick_monitor_states(now, out);
        if !was_eligible && self.effective_priority() > 0 {
            self.eligible_since = Some(now);
        }
    }

    fn tick_monitor_states(&mut self, now: Millis, out: &mut Vec<Action>) {
        let (down_after, up_after) = (self.cfg.monitor_down_after_ms, self.cfg.monitor_up_after_ms);
        for (name, m) in &mut self.monitors {
            let lasted = now.saturating_sub(m.raw_since);
            let settle = if m.raw_up {
                m.up_after_ms.unwrap_or(up_after)
            } else {
                m.down_after_ms.unwrap_or(down_after)
            };
            if m.up != m.raw_up && lasted >= settle {
                m.up = m.raw_up;
                out.push(Action::Event {
                    rg: Some(self.cfg.rg),
                    text: format!(
                        "monitor {name} {} (weight {})",
                        if m.up { "up" } else { "down" },
                        if m.weight == FULL_WEIGHT {
                            "full".to_string()
                        } else {
                            m.weight.to_string()
                        }
                    ),
                });
            }
        }
    }

    /// The role this RG should have now, and why.
    pub fn decide(&self, me: NodeId, now: Millis, view: &PeerView) -> (RgState, String) {
        let PeerView {
            alive: peer_alive,
            in_grace,
            heartbeat: peer,
            fresh: peer_fresh,
            since_eligible: peer_since_eligible,
        } = *view;
        use RgState::*;
        if self.disabled {
            return (Disabled, "disabled (priority 0 or by operator)".into());
        }
        let eff = self.effective_priority();
        if !peer_alive {
            if in_grace {
                return (Init, "waiting for peer (startup grace)".into());
            }
            if eff == 0 {
                return (
                    Ineligible,
                    format!("ineligible ({} down); peer lost", self.failed_names()),
                );
            }
            return (Primary, "peer lost".into());
        }
        let Some(p) = peer else {
            return if eff == 0 {
                (
                    Ineligible,
                    format!("ineligible: {} down", self.failed_names()),
                )
            } else {
                (Primary, "peer does not run this RG".into())
            };
        };
        let peer_eff = p.effective_priority as u16;
        let peer_primary =
            p.state == pb::RgState::Primary as i32 || p.state == pb::RgState::SecondaryHold as i32;
        let peer_eligible = peer_eff > 0
            && p.state != pb::RgState::Disabled as i32
            && p.state != pb::RgState::Ineligible as i32;
        let peer_node = me.peer();
        if eff == 0 {
            if !peer_eligible && self.state.forwards() {
                return (Primary, "degraded: no eligible node, keeping the RG".into());
            }
            return (
                Ineligible,
                format!("ineligible: {} down", self.failed_names()),
            );
        }
        if !peer_eligible {
            // The peer may have claimed the RG since it said so, when this
            // node could not compete: only a report heard since this node
            // became eligible may make it claim.
            if !self.state.forwards() && !peer_since_eligible {
                // Secondary, not ineligible: the peer must see this node
                // compete meanwhile.
                return (
                    Secondary,
                    "eligible: waiting for a peer heartbeat sent since".into(),
                );
            }
            return (Primary, "peer ineligible".into());
        }
        // A transfer we agreed to: keep forwarding until the peer commits.
        if let Some(Transfer::Yielding { .. }) = self.transfer {
            return (SecondaryHold, "transferring to peer".into());
        }
        // We asked for the RG and wait for the answer: unchanged.
        if let Some(Transfer::Pulling { .. }) = self.transfer {
            return (self.state, "failover to this node pending".into());
        }
        // The override holds as long as its node is alive and eligible
        // (checked above), even before the peer's next heartbeat shows it
        // as primary.
        match self.manual {
            Some(t) if t == me => return (Primary, "manual failover to this node".into()),
            Some(_) => return (Secondary, "manual failover to peer".into()),
            None => {}
        }
        let i_win = eff > peer_eff || (eff == peer_eff && me < peer_node);
        if self.state.forwards() && peer_primary {
            // The newer claim keeps the RG: it is the one the network was
            // last told about (its gratuitous ARP came last), and the node
            // with the older epoch was partitioned, paused or restarted
            // meanwhile. Preference (preempt) may take it back afterwards,
            // by rule 7: synced first, then past hold-down. Epochs are
            // node-distinct, so both nodes agree on who yields.
            // In witness mode a claim without a lease forwards nothing:
            // the one that forwards keeps the RG.
            let (mine_live, peer_live) = (!self.awaiting_lease, !p.awaiting_lease);
            let keep = if mine_live != peer_live {
                mine_live
            } else {
                self.epoch.0 > p.epoch
            };
            return if keep {
                (
                    Primary,
                    "both primary: this node's claim is newer or the one with a lease".into(),
                )
            } else if !peer_fresh {
                // Yielding on a view older than our own claim could leave
                // the RG with no forwarder: wait for a fresh heartbeat.
                (
                    self.state,
                    "both primary: waiting for a fresh peer heartbeat".into(),
                )
            } else {
                (
                    Secondary,
                    "both primary: the peer's claim is newer or the one with a lease".into(),
                )
            };
        }
        if peer_primary {
            if self.cfg.preempt && eff > peer_eff {
                if !self.synced {
                    return (
                        Secondary,
                        "peer is primary; preempt waits for sessions to sync".into(),
                    );
                }
                if self.hold_down_left(now) > 0 {
                    return (
                        Secondary,
                        "peer is primary; preempt waits for hold-down".into(),
                    );
                }
                return (Primary, "preempt: higher priority".into());
            }
            return (Secondary, "peer is primary".into());
        }
        if self.state.forwards() {
            return (Primary, "incumbent primary".into());
        }
        if i_win {
            (Primary, "no primary: this node has priority".into())
        } else {
            (Secondary, "no primary: peer has priority".into())
        }
    }

    /// A manual override ends when the node it names fails: it is lost or
    /// becomes ineligible.
    pub fn clear_failed_override(
        &mut self,
        me: NodeId,
        peer_alive: bool,
        peer: Option<&pb::RgHeartbeat>,
        out: &mut Vec<Action>,
    ) {
        let failed = match self.manual {
            Some(t) if t == me => self.effective_priority() == 0,
            Some(_) => !peer_alive || peer.is_none_or(|p| p.effective_priority == 0),
            None => false,
        };
        if failed {
            self.manual = None;
            out.push(Action::Event {
                rg: Some(self.cfg.rg),
                text: "manual failover override cleared: its node failed".into(),
            });
        }
    }

    /// Checks a manual failover to this node.
    pub fn check_pull(
        &self,
        now: Millis,
        peer_alive: bool,
        peer: Option<&pb::RgHeartbeat>,
    ) -> Result<(), Refusal> {
        let blockers = self.transfer_blockers(now, peer_alive, peer);
        match blockers.first() {
            None => Ok(()),
            Some(_) => Err(Refusal(blockers.join("; "))),
        }
    }

    fn transfer_blockers(
        &self,
        now: Millis,
        peer_alive: bool,
        peer: Option<&pb::RgHeartbeat>,
    ) -> Vec<String> {
        let mut b = Vec::new();
        if self.state.forwards() {
            b.push("already primary on this node".to_string());
        }
        if self.disabled {
            b.push("disabled".into());
        }
        if self.effective_priority() == 0 {
            b.push(format!("ineligible: {} down", self.failed_names()));
        }
        if !peer_alive {
            b.push("peer not reachable".into());
        } else if peer.is_none() {
            b.push("peer does not run this RG".into());
        }
        if !self.synced {
            b.push("not synced: sessions not yet imported".into());
        }
        let left = self.hold_down_left(now);
        if left > 0 {
            b.push(format!("hold-down: {left} ms left"));
        }
        if self.transfer.is_some() {
            b.push("a failover is already in progress".into());
        }
        b
    }

    /// The peer asks us (primary) to hand the RG over.
    pub fn accept_yield(&mut self, id: u64, now: Millis) -> Result<(), String> {
        if self.state != RgState::Primary {
            return Err(format!("not primary here ({})", self.state.name()));
        }
        if self.transfer.is_some() {
            return Err("a failover is already in progress".into());
        }
        self.transfer = Some(Transfer::Yielding { id, since: now });
        self.set_state(RgState::SecondaryHold, now);
        Ok(())
    }

    pub fn heartbeat(&self) -> pb::RgHeartbeat {
        pb::RgHeartbeat {
            rg: self.cfg.rg.0.into(),
            state: self.state.to_wire() as i32,
            priority: self.cfg.priority.into(),
            effective_priority: self.effective_priority().into(),
            epoch: self.epoch.0,
            preempt: self.cfg.preempt,
            manual: self.manual.is_some() && self.state.forwards(),
            ready: self.synced,
            awaiting_lease: self.state.forwards() && self.awaiting_lease,
        }
    }

    pub fn status(
        &self,
        rg: RgId,
        now: Millis,
        peer: Option<&pb::RgHeartbeat>,
        peer_alive: bool,
    ) -> RgStatus {
        let mut takeover = Vec::new();
        if !self.state.forwards() {
            if self.effective_priority() == 0 {
                takeover.push("ineligible".to_string());
            }
            if peer_alive && !self.synced {
                takeover.push("not synced".into());
            }
            let left = self.hold_down_left(now);
            if peer_alive && left > 0 {
                takeover.push(format!("hold-down {left} ms"));
            }
        }
        RgStatus {
            rg: rg.0,
            state: self.state,
            priority: self.cfg.priority,
            effective_priority: self.effective_priority(),
            preempt: self.cfg.preempt,
            manual: self.manual.map(|n| n.0),
            epoch: self.epoch.0,
            synced: self.synced,
            reason: self.reason.clone(),
            failovers: self.failovers,
            failed_monitors: self
                .monitors
                .iter()
                .filter(|(_, m)| !m.up)
                .map(|(n, _)| n.clone())
                .collect(),
            takeover_blockers: takeover,
            transfer_blockers: self.transfer_blockers(now, peer_alive, peer),
            peer_state: peer.map(|p| {
                pb::RgState::try_from(p.state)
                    .map_or("unknown", |s| RgState::from_wire(s).name())
                    .to_string()
            }),
            peer_priority: peer.map(|p| p.effective_priority),
        }
    }
}
