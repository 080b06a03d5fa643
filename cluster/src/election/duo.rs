//! Two election state machines wired together in simulated time: per
//! direction and per path links that can be cut, node crashes and restarts,
//! and control messages with a fixed latency. Deterministic; used by the
//! rule tests and by `election-sim` for the timing figures.

use super::{Action, Election, ElectionConfig, Path, RgState};
use tandem_dataplane::session::Millis;
use tandem_proto::pb::{self, envelope::Msg};
use tandem_proto::{Epoch, RgId};

/// What happened, in order, for assertions and reports.
#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    Promote {
        at: Millis,
        node: usize,
        rg: RgId,
        epoch: Epoch,
        reason: String,
    },
    Demote {
        at: Millis,
        node: usize,
        rg: RgId,
        epoch: Epoch,
        reason: String,
    },
    Done {
        at: Millis,
        node: usize,
        rg: RgId,
        id: u64,
        result: Result<(), String>,
    },
}

pub struct Duo {
    pub nodes: [Election; 2],
    cfgs: [ElectionConfig; 2],
    pub now: Millis,
    /// `links[from][path]`: frames from `from` on `path` arrive.
    pub links: [[bool; 3]; 2],
    pub up: [bool; 2],
    /// Control-stream latency in ms.
    pub latency_ms: u64,
    pub log: Vec<Record>,
    inflight: Vec<(Millis, usize, Msg)>,
    next_hb: [Millis; 2],
    /// Sync readiness the sync layer would report, per node and RG.
    pub synced: [bool; 2],
    /// A paused node (SIGSTOP) neither ticks nor sends; what reaches it
    /// waits in its socket buffer, bounded like one.
    pub paused: [bool; 2],
    buffered: [Vec<(pb::Heartbeat, Path)>; 2],
}

/// Heartbeats a paused node's socket buffer holds; later ones are dropped.
const PAUSED_BUFFER: usize = 64;

impl Duo {
    pub fn new(cfg0: ElectionConfig, cfg1: ElectionConfig, start: Millis) -> Duo {
        Duo {
            nodes: [Election::new(cfg0.clone()), Election::new(cfg1.clone())],
            cfgs: [cfg0, cfg1],
            now: start,
            links: [[true; 3]; 2],
            up: [true; 2],
            latency_ms: 1,
            log: Vec::new(),
            inflight: Vec::new(),
            next_hb: [start; 2],
            synced: [true; 2],
            paused: [false; 2],
            buffered: [Vec::new(), Vec::new()],
        }
    }

    /// SIGSTOP: the node keeps its state and stops running.
    pub fn pause(&mut self, n: usize) {
        self.paused[n] = true;
    }

    /// SIGCONT: the node first runs its timers on its stale view (time
    /// jumped), then reads what queued in its socket buffer, oldest first.
    pub fn resume(&mut self, n: usize) {
        self.paused[n] = false;
        let a = self.nodes[n].tick(self.now);
        self.handle(n, a);
        for (hb, p) in std::mem::take(&mut self.buffered[n]) {
            let a = self.nodes[n].on_heartbeat(&hb, p, self.now);
            self.handle(n, a);
        }
    }

    /// Cuts or restores one path in both directions.
    pub fn set_path(&mut self, p: Path, up: bool) {
        self.links[0][p as usize] = up;
        self.links[1][p as usize] = up;
    }

    /// A crash: the node stops; on restart it boots a fresh state machine.
    pub fn crash(&mut self, n: usize) {
        self.up[n] = false;
        self.inflight.retain(|(_, to, _)| *to != n);
    }

    pub fn restart(&mut self, n: usize) {
        let mut cfg = self.cfgs[n].clone();
        cfg.incarnation += 1;
        self.cfgs[n] = cfg.clone();
        self.nodes[n] = Election::new(cfg);
        self.up[n] = true;
        self.next_hb[n] = self.now;
    }

    pub fn state(&self, n: usize, rg: RgId) -> RgState {
        self.nodes[n].state(rg).expect("configured RG")
    }

    /// Which nodes forward `rg` now.
    pub fn forwarders(&self, rg: RgId) -> Vec<usize> {
        (0..2)
            .filter(|&n| self.up[n] && !self.paused[n] && self.state(n, rg).forwards())
            .collect()
    }

    fn handle(&mut self, n: usize, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Promote { rg, epoch, reason } => self.log.push(Record::Promote {
                    at: self.now,
                    node: n,
                    rg,
                    epoch,
                    reason,
                }),
                Action::Demote { rg, epoch, reason } => self.log.push(Record::Demote {
                    at: self.now,
                    node: n,
                    rg,
                    epoch,
                    reason,
                }),
                Action::FailoverDone {
                    rg,
                    request_id,
                    result,
                } => self.log.push(Record::Done {
                    at: self.now,
                    node: n,
                    rg,
                    id: request_id,
                    result,
                }),
                Action::Send(msg) => {
                    if self.links[n][Path::Control as usize] {
                        self.inflight
                            .push((Millis(self.now.0 + self.latency_ms), 1 - n, msg));
                    }
                }
                Action::Event { .. } => {}
            }
        }
    }

    /// An operator request on node `n`; returns the request id or refusal.
    pub fn failover(&mut self, n: usize, rg: RgId, target: usize) -> Result<u64, String> {
        let target = self.nodes[target].node();
        match self.nodes[n].request_failover(rg, target, self.now) {
            Ok((id, actions)) => {
                self.handle(n, actions);
                Ok(id)
            }
            Err(r) => Err(r.0),
        }
    }

    pub fn reset(&mut self, n: usize, rg: RgId) {
        let actions = self.nodes[n]
            .reset_failover(rg, self.now)
            .expect("configured RG");
        self.handle(n, actions);
    }

    pub fn set_monitor(&mut self, n: usize, name: &str, up: bool) {
        let actions = self.nodes[n].on_monitor(name, up, self.now);
        self.handle(n, actions);
    }

    /// Advances time by `ms`, 1 ms at a time.
    pub fn run(&mut self, ms: u64) {
        for _ in 0..ms {
            self.now = Millis(self.now.0 + 1);
            self.step();
        }
    }

    /// Runs until `cond` holds (checked every ms) or `max_ms` passes;
    /// returns the elapsed ms.
    pub fn run_until(&mut self, max_ms: u64, mut cond: impl FnMut(&Duo) -> bool) -> Option<u64> {
        for t in 0..max_ms {
            if cond(self) {
                return Some(t);
            }
            self.now = Millis(self.now.0 + 1);
            self.step();
        }
        cond(self).then_some(max_ms)
    }

    fn step(&mut self) {
        let now = self.now;
        // Control messages due now.
        let due: Vec<(Millis, usize, Msg)> = {
            let (due, rest): (Vec<_>, Vec<_>) =
                self.inflight.drain(..).partition(|(t, _, _)| *t <= now);
            self.inflight = rest;
            due
        };
        for (at, to, msg) in due {
            if !self.up[to] {
                continue;
            }
            if self.paused[to] {
                self.inflight.push((at, to, msg));
                continue;
            }
            let actions = match &msg {
                Msg::FailoverRequest(r) => self.nodes[to].on_failover_request(r, now),
                Msg::FailoverResponse(r) => self.nodes[to].on_failover_response(r, now),
                _ => Vec::new(),
            };
            self.handle(to, actions);
        }
        for n in 0..2 {
            if !self.up[n] || self.paused[n] {
                continue;
            }
            let rgs: Vec<RgId> = self.cfgs[n].rgs.iter().map(|r| r.rg).collect();
            for rg in rgs {
                let ready = self.synced[n];
                let a = self.nodes[n].on_sync_ready(rg, ready, now);
                self.handle(n, a);
            }
            if now >= self.next_hb[n] {
                self.next_hb[n] = Millis(now.0 + self.cfgs[n].heartbeat_interval_ms);
                for p in Path::ALL {
                    let hb = self.nodes[n].heartbeat(p);
                    if !self.links[n][p as usize] || !self.up[1 - n] {
                        continue;
                    }
                    if self.paused[1 - n] {
                        if self.buffered[1 - n].len() < PAUSED_BUFFER {
                            self.buffered[1 - n].push((hb, p));
                        }
                    } else {
                        let a = self.nodes[1 - n].on_heartbeat(&hb, p, now);
                        self.handle(1 - n, a);
                    }
                }
            }
            if now.0.is_multiple_of(10) {
                let a = self.nodes[n].tick(now);
                self.handle(n, a);
            }
        }
    }

    /// First promotion of `rg` on `node` at or after `since`.
    pub fn promoted_at(&self, node: usize, rg: RgId, since: Millis) -> Option<Millis> {
        self.log.iter().find_map(|r| match r {
            Record::Promote {
                at, node: n, rg: g, ..
            } if *n == node && *g == rg && *at >= since => Some(*at),
            _ => None,
        })
    }
}
