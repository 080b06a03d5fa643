//! The I/O shell of the election: feeds the state machine with heartbeats
//! (control link as QUIC datagrams, fab0/fab1 as HMAC-authenticated UDP),
//! time, sync readiness and operator commands, and carries out its
//! actions: promote/demote the session table, publish roles (watch for the
//! sync layer, arc-swap for the dataplane and fabric), send failover
//! messages, answer the operator.
//!
//! Time comes from the injected clock and tokio timers; sockets come from
//! the caller (`DatagramSocket`), so turmoil runs this unchanged.

use super::{Action, ClusterStatus, Election, Path};
use crate::sync::{RoleMap, SyncHandle};
use arc_swap::ArcSwap;
use bytes::BytesMut;
use ring::hmac;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tandem_dataplane::session::{Clock, Millis, SharedTable, lock};
use tandem_proto::pb::{self, envelope::Msg};
use tandem_proto::{Epoch, FrameDecoder, NodeId, RgId, encode_frame};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tracing::{info, warn};

/// A boxed socket operation.
pub type IoFuture<'a, T> = Pin<Box<dyn Future<Output = io::Result<T>> + Send + 'a>>;

/// A datagram socket (real UDP or simulated).
pub trait DatagramSocket: Send + Sync + 'static {
    fn send_to<'a>(&'a self, buf: &'a [u8], to: SocketAddr) -> IoFuture<'a, usize>;
    fn recv_from<'a>(&'a self, buf: &'a mut [u8]) -> IoFuture<'a, (usize, SocketAddr)>;
}

impl DatagramSocket for tokio::net::UdpSocket {
    fn send_to<'a>(&'a self, buf: &'a [u8], to: SocketAddr) -> IoFuture<'a, usize> {
        Box::pin(tokio::net::UdpSocket::send_to(self, buf, to))
    }
    fn recv_from<'a>(&'a self, buf: &'a mut [u8]) -> IoFuture<'a, (usize, SocketAddr)> {
        Box::pin(tokio::net::UdpSocket::recv_from(self, buf))
    }
}

/// One fabric heartbeat path: a socket bound on this node's fabric address
/// and the peer's fabric address.
pub struct FabricPath {
    pub path: Path,
    pub socket: Arc<dyn DatagramSocket>,
    pub peer: SocketAddr,
}

const TAG_LEN: usize = 32;
/// Largest heartbeat datagram accepted (a heartbeat with 255 RGs is ~7 KiB).
const MAX_HEARTBEAT: usize = 16 * 1024;

/// Authenticates datagrams between the cluster's parties (fabric
/// heartbeats, witness leases): `frame || HMAC-SHA256(key, frame)`.
#[derive(Clone)]
pub struct ClusterKey(hmac::Key);

impl ClusterKey {
    pub fn new(secret: &[u8]) -> ClusterKey {
        ClusterKey(hmac::Key::new(hmac::HMAC_SHA256, secret))
    }

    pub fn seal_msg(&self, msg: Msg) -> Vec<u8> {
        let mut out = BytesMut::new();
        encode_frame(&pb::Envelope { msg: Some(msg) }, &mut out);
        let tag = hmac::sign(&self.0, &out);
        out.extend_from_slice(tag.as_ref());
        out.to_vec()
    }

    /// The message of an authentic datagram holding exactly one frame.
    pub fn open_msg(&self, pkt: &[u8]) -> Option<Msg> {
        let body_len = pkt.len().checked_sub(TAG_LEN)?;
        let (body, tag) = pkt.split_at(body_len);
        hmac::verify(&self.0, body, tag).ok()?;
        let mut dec = FrameDecoder::new(MAX_HEARTBEAT);
        dec.push(body);
        match dec.next_frame() {
            Ok(Some(pb::Envelope { msg: Some(m) })) if dec.buffered() == 0 => Some(m),
            _ => None,
        }
    }

    fn seal(&self, hb: pb::Heartbeat) -> Vec<u8> {
        self.seal_msg(Msg::Heartbeat(hb))
    }

    fn open(&self, pkt: &[u8]) -> Option<pb::Heartbeat> {
        match self.open_msg(pkt)? {
            Msg::Heartbeat(hb) => Some(hb),
            _ => None,
        }
    }
}

/// Counters of the election shell.
#[derive(Default, Debug)]
pub struct DriverStats {
    pub heartbeats_sent: [AtomicU64; 3],
    pub heartbeats_received: [AtomicU64; 3],
    /// Fabric datagrams that failed authentication or decoding.
    pub heartbeats_rejected: AtomicU64,
    pub heartbeat_send_errors: AtomicU64,
    pub promotions: AtomicU64,
    pub demotions: AtomicU64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct DriverSnapshot {
    pub heartbeats_sent: [u64; 3],
    pub heartbeats_received: [u64; 3],
    pub heartbeats_rejected: u64,
    pub heartbeat_send_errors: u64,
    pub promotions: u64,
    pub demotions: u64,
}

impl DriverStats {
    pub fn snapshot(&self) -> DriverSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DriverSnapshot {
            heartbeats_sent: [0, 1, 2].map(|i| l(&self.heartbeats_sent[i])),
            heartbeats_received: [0, 1, 2].map(|i| l(&self.heartbeats_received[i])),
            heartbeats_rejected: l(&self.heartbeats_rejected),
            heartbeat_send_errors: l(&self.heartbeat_send_errors),
            promotions: l(&self.promotions),
            demotions: l(&self.demotions),
        }
    }
}

/// A role change, for the daemon's side effects (gratuitous ARP/NA, fabric
/// map, logs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoleChange {
    pub rg: RgId,
    pub primary: bool,
    pub epoch: Epoch,
    pub reason: String,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct EventRecord {
    pub at_ms: u64,
    pub rg: Option<u16>,
    pub text: String,
}

/// Bound of the event history kept for `show chassis cluster information`.
const EVENT_HISTORY: usize = 256;

enum Command {
    Failover {
        rg: RgId,
        target: NodeId,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Reset {
        rg: RgId,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Status {
        reply: oneshot::Sender<(ClusterStatus, Vec<EventRecord>)>,
    },
    /// Stop without resigning (a crash, as far as the peer can tell).
    Stop,
    /// A monitored interface's raw link state.
    Monitor { name: String, up: bool },
    /// Give up every RG at once (graceful shutdown): the peer sees this
    /// node ineligible in the next heartbeat, sent immediately.
    Resign { reply: oneshot::Sender<()> },
}

/// Operator and daemon access to a running election.
#[derive(Clone)]
pub struct ClusterHandle {
    commands: mpsc::Sender<Command>,
    roles: Arc<ArcSwap<RoleMap>>,
    changes: broadcast::Sender<RoleChange>,
    stats: Arc<DriverStats>,
}

impl ClusterHandle {
    /// `request chassis cluster failover redundancy-group N node M`:
    /// resolves when the transfer committed or was refused/aborted.
    pub async fn failover(&self, rg: RgId, target: NodeId) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Failover { rg, target, reply })
            .await
            .map_err(|_| "election stopped")?;
        rx.await.map_err(|_| "election stopped".to_string())?
    }

    pub async fn reset(&self, rg: RgId) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Reset { rg, reply })
            .await
            .map_err(|_| "election stopped")?;
        rx.await.map_err(|_| "election stopped".to_string())?
    }

    pub async fn status(&self) -> Option<(ClusterStatus, Vec<EventRecord>)> {
        let (reply, rx) = oneshot::channel();
        self.commands.send(Command::Status { reply }).await.ok()?;
        rx.await.ok()
    }

    /// The current role map (lock-free; what the dataplane reads).
    pub fn roles(&self) -> Arc<RoleMap> {
        self.roles.load_full()
    }

    pub fn role_swap(&self) -> Arc<ArcSwap<RoleMap>> {
        self.roles.clone()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<RoleChange> {
        self.changes.subscribe()
    }

    pub fn stats(&self) -> DriverSnapshot {
        self.stats.snapshot()
    }

    /// Stops the election loop at once: heartbeats cease, roles stay as
    /// they are (the peer sees a crash).
    pub async fn stop(&self) {
        let _ = self.commands.send(Command::Stop).await;
    }

    /// Reports a monitored interface's link state (dampened inside).
    pub async fn monitor(&self, name: &str, up: bool) {
        let _ = self
            .commands
            .send(Command::Monitor {
                name: name.to_string(),
                up,
            })
            .await;
    }

    /// Hands every RG to the peer now (graceful shutdown).
    pub async fn resign(&self) {
        let (reply, rx) = oneshot::channel();
        if self.commands.send(Command::Resign { reply }).await.is_ok() {
            let _ = rx.await;
        }
    }
}

pub struct DriverConfig {
    pub election: super::ElectionConfig,
    pub fabric: Vec<FabricPath>,
    pub key: ClusterKey,
    /// Witness mode: a socket for lease traffic and where to send it.
    pub witness: Option<(Arc<dyn DatagramSocket>, crate::witness::WitnessConfig)>,
}

/// A request forwarded to us by the peer's operator, answered when done.
struct Forwarded {
    peer_request: u64,
    rg: RgId,
}

struct Driver {
    election: Election,
    sync: SyncHandle,
    table: SharedTable,
    clock: Clock,
    roles_tx: watch::Sender<Arc<RoleMap>>,
    roles: Arc<ArcSwap<RoleMap>>,
    changes: broadcast::Sender<RoleChange>,
    stats: Arc<DriverStats>,
    fabric: Vec<FabricPath>,
    key: ClusterKey,
    events: VecDeque<EventRecord>,
    /// Local operator requests by our request id.
    pending: HashMap<u64, oneshot::Sender<Result<(), String>>>,
    /// Operator requests we forwarded to the peer, by our forward id.
    forwarded_out: BTreeMap<u64, (Millis, oneshot::Sender<Result<(), String>>)>,
    next_forward: u64,
    /// Requests the peer forwarded to us, by our request id.
    forwarded_in: HashMap<u64, Forwarded>,
    witness: Option<WitnessState>,
    /// The last reason given for each RG's role, for change notices.
    reasons: HashMap<RgId, String>,
}

struct WitnessState {
    socket: Arc<dyn DatagramSocket>,
    cfg: crate::witness::WitnessConfig,
    /// This node's raft member; an error when its stored state could not
    /// be read (the node then never forwards in witness mode).
    group: Result<crate::witness::OwnershipGroup, String>,
}

impl WitnessState {
    fn forwards(&self, rg: RgId, epoch: Epoch, now: Millis) -> bool {
        self.group
            .as_ref()
            .is_ok_and(|g| g.forwards(rg, epoch, now))
    }

    /// Seals and sends what the raft member wants sent.
    fn send(&self, key: &ClusterKey, out: Vec<crate::witness::Outgoing>, me: NodeId) {
        if out.is_empty() {
            return;
        }
        let pkts: Vec<(Vec<u8>, SocketAddr)> = out
            .into_iter()
            .filter_map(|o| {
                let to = match o.to {
                    crate::witness::WITNESS_VOTER => self.cfg.witness,
                    v if v == u32::from(me.peer().0) => self.cfg.peer,
                    _ => return None,
                };
                Some((key.seal_msg(o.msg), to))
            })
            .collect();
        let socket = self.socket.clone();
        tokio::spawn(async move {
            for (pkt, to) in pkts {
                let _ = socket.send_to(&pkt, to).await;
            }
        });
    }
}

/// Starts the election. `roles_tx` is the channel the sync node was given;
/// `control_rx` receives what the sync node routes to the election.
pub fn spawn(
    cfg: DriverConfig,
    sync: SyncHandle,
    table: SharedTable,
    clock: Clock,
    roles_tx: watch::Sender<Arc<RoleMap>>,
    control_rx: mpsc::Receiver<Msg>,
) -> ClusterHandle {
    let (commands, cmd_rx) = mpsc::channel(64);
    let roles = Arc::new(ArcSwap::from_pointee(RoleMap::new()));
    let (changes, _) = broadcast::channel(256);
    let stats = Arc::new(DriverStats::default());
    let interval = Duration::from_millis(cfg.election.heartbeat_interval_ms.max(1));
    let witness = cfg.witness.map(|(socket, wcfg)| {
        let group = crate::witness::OwnershipGroup::start(
            u32::from(cfg.election.node.0),
            cfg.election.cluster_id,
            wcfg.lease_ms,
            wcfg.store.clone(),
            clock(),
        );
        if let Err(e) = &group {
            warn!(error = %e, "witness mode: this node's raft state is unreadable; it will not forward");
        }
        WitnessState {
            group,
            socket,
            cfg: wcfg,
        }
    });
    let mut d = Driver {
        election: Election::new(cfg.election),
        sync,
        table,
        clock,
        roles_tx,
        roles: roles.clone(),
        changes: changes.clone(),
        stats: stats.clone(),
        fabric: cfg.fabric,
        key: cfg.key,
        events: VecDeque::new(),
        pending: HashMap::new(),
        forwarded_out: BTreeMap::new(),
        next_forward: 1,
        forwarded_in: HashMap::new(),
        witness,
        reasons: HashMap::new(),
    };
    d.publish();
    let (fab_tx, fab_rx) = mpsc::channel(1024);
    for f in &d.fabric {
        tokio::spawn(recv_datagrams(
            f.socket.clone(),
            Source::Fabric(f.path),
            fab_tx.clone(),
        ));
    }
    if let Some(w) = &d.witness {
        tokio::spawn(recv_datagrams(
            w.socket.clone(),
            Source::Lease,
            fab_tx.clone(),
        ));
    }
    tokio::spawn(async move { d.run(interval, cmd_rx, control_rx, fab_rx).await });
    ClusterHandle {
        commands,
        roles,
        changes,
        stats,
    }
}

/// Which socket a datagram came in on.
#[derive(Clone, Copy, Debug)]
enum Source {
    Fabric(Path),
    Lease,
}

async fn recv_datagrams(
    socket: Arc<dyn DatagramSocket>,
    source: Source,
    tx: mpsc::Sender<(Source, Vec<u8>)>,
) {
    let mut buf = vec![0u8; MAX_HEARTBEAT + TAG_LEN];
    loop {
        match socket.recv_from(&mut buf).await {
            Ok((n, _)) => {
                if tx.send((source, buf[..n].to_vec())).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                warn!(?source, error = %e, "heartbeat/lease socket");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

impl Driver {
    fn now(&self) -> Millis {
        (self.clock)()
    }

    async fn run(
        &mut self,
        interval: Duration,
        mut cmds: mpsc::Receiver<Command>,
        mut control: mpsc::Receiver<Msg>,
        mut datagrams: mpsc::Receiver<(Source, Vec<u8>)>,
    ) {
        let mut hb = tokio::time::interval(interval);
        hb.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                c = cmds.recv() => match c {
                    Some(Command::Stop) | None => return,
                    Some(Command::Resign { reply }) => {
                        self.resign();
                        self.send_heartbeats().await;
                        let _ = reply.send(());
                    }
                    Some(c) => self.command(c),
                },
                Some(m) = control.recv() => self.control(m),
                Some((source, pkt)) = datagrams.recv() => match source {
                    Source::Fabric(path) => self.fabric(path, &pkt),
                    Source::Lease => self.lease_traffic(&pkt),
                },
                _ = hb.tick() => self.send_heartbeats().await,
                _ = tick.tick() => self.tick(),
            }
        }
    }

    fn tick(&mut self) {
        let now = self.now();
        self.expire_forwarded(now);
        let mut actions = self.election.tick(now);
        for rg in self
            .election
            .config()
            .rgs
            .iter()
            .map(|r| r.rg)
            .collect::<Vec<_>>()
        {
            let primary = self.roles.load().get(&rg).is_some_and(|r| r.primary);
            let ready = primary || self.sync.rg_in_sync(rg);
            actions.extend(self.election.on_sync_ready(rg, ready, now));
        }
        self.apply(actions);
        self.drive_witness(now);
        // A lease can lapse between events.
        self.publish_if_changed();
    }

    fn control(&mut self, m: Msg) {
        let now = self.now();
        let actions = match m {
            Msg::Heartbeat(hb) => {
                self.stats.heartbeats_received[Path::Control as usize]
                    .fetch_add(1, Ordering::Relaxed);
                self.election.on_heartbeat(&hb, Path::Control, now)
            }
            Msg::FailoverRequest(r) if r.phase == pb::FailoverPhase::Forward as i32 => {
                self.forwarded_request(&r);
                Vec::new()
            }
            Msg::FailoverResponse(r) if r.phase == pb::FailoverPhase::Forward as i32 => {
                if let Some((_, reply)) = self.forwarded_out.remove(&r.request_id) {
                    let _ = reply.send(if r.accepted { Ok(()) } else { Err(r.reason) });
                }
                Vec::new()
            }
            Msg::FailoverRequest(r) => self.election.on_failover_request(&r, now),
            Msg::FailoverResponse(r) => self.election.on_failover_response(&r, now),
            _ => Vec::new(),
        };
        self.apply(actions);
    }

    fn fabric(&mut self, path: Path, pkt: &[u8]) {
        let Some(hb) = self.key.open(pkt) else {
            self.stats
                .heartbeats_rejected
                .fetch_add(1, Ordering::Relaxed);
            return;
        };
        self.stats.heartbeats_received[path as usize].fetch_add(1, Ordering::Relaxed);
        let actions = self.election.on_heartbeat(&hb, path, self.now());
        self.apply(actions);
    }

    /// Raft traffic from the peer or the witness.
    fn lease_traffic(&mut self, pkt: &[u8]) {
        let now = self.now();
        let me = self.election.config().node;
        let Some(w) = self.witness.as_mut() else {
            return;
        };
        let msg = match self.key.open_msg(pkt) {
            Some(m @ (Msg::RaftMessage(_) | Msg::OwnershipRequest(_))) => m,
            _ => {
                self.stats
                    .heartbeats_rejected
                    .fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let Ok(g) = w.group.as_mut() else { return };
        let out = g.on_message(&msg, now);
        w.send(&self.key, out, me);
        self.publish_if_changed();
    }

    /// Witness mode: give `rg` back at once, so the node taking over need
    /// not wait for the lease to run out.
    fn release_lease(&mut self, rg: RgId, epoch: Epoch) {
        let now = self.now();
        let me = self.election.config().node;
        let Some(w) = self.witness.as_mut() else {
            return;
        };
        let Ok(g) = w.group.as_mut() else { return };
        let out = g.release(rg, epoch, now);
        w.send(&self.key, out, me);
    }

    /// Witness mode: ticks the raft member, asks the log for (or renews)
    /// every RG the election wants this node to forward, and lets the
    /// election claim above any epoch the log committed to another node.
    fn drive_witness(&mut self, now: Millis) {
        let me = self.election.config().node;
        let Some(w) = self.witness.as_mut() else {
            return;
        };
        let Ok(g) = w.group.as_mut() else { return };
        let mut out = g.tick(now);
        let roles = self.election.roles();
        for (rg, role) in roles.iter() {
            if let Some((owner, epoch)) = g.owner(*rg)
                && owner != me
            {
                self.election.raise_epoch_floor(*rg, epoch);
            }
            if role.primary {
                out.extend(g.claim(*rg, role.epoch, now));
            }
            self.election
                .set_lease_held(*rg, g.forwards(*rg, role.epoch, now));
        }
        w.send(&self.key, out, me);
    }

    async fn send_heartbeats(&mut self) {
        let hb = self.election.heartbeat(Path::Control);
        if self.sync.send_datagram(Msg::Heartbeat(hb)) {
            self.stats.heartbeats_sent[Path::Control as usize].fetch_add(1, Ordering::Relaxed);
        }
        for i in 0..self.fabric.len() {
            let path = self.fabric[i].path;
            let pkt = self.key.seal(self.election.heartbeat(path));
            let f = &self.fabric[i];
            match f.socket.send_to(&pkt, f.peer).await {
                Ok(_) => self.stats.heartbeats_sent[path as usize].fetch_add(1, Ordering::Relaxed),
                Err(_) => self
                    .stats
                    .heartbeat_send_errors
                    .fetch_add(1, Ordering::Relaxed),
            };
        }
    }

    fn command(&mut self, c: Command) {
        let now = self.now();
        match c {
            Command::Failover { rg, target, reply } => {
                if target == self.election.node() {
                    match self.election.request_failover(rg, target, now) {
                        Ok((id, actions)) => {
                            self.pending.insert(id, reply);
                            self.apply(actions);
                        }
                        Err(r) => {
                            let _ = reply.send(Err(r.0));
                        }
                    }
                } else {
                    // Failover is driven by the target: forward.
                    let id = self.next_forward;
                    self.next_forward += 1;
                    let msg = Msg::FailoverRequest(pb::FailoverRequest {
                        request_id: id,
                        rg: rg.0.into(),
                        target_node: target.0.into(),
                        phase: pb::FailoverPhase::Forward as i32,
                        epoch: 0,
                    });
                    if self.sync.send_control(msg) {
                        self.forwarded_out.insert(id, (now, reply));
                    } else {
                        let _ =
                            reply.send(Err(format!("cannot reach {target}: control link down")));
                    }
                }
            }
            Command::Reset { rg, reply } => match self.election.reset_failover(rg, now) {
                Ok(actions) => {
                    self.apply(actions);
                    let _ = reply.send(Ok(()));
                }
                Err(r) => {
                    let _ = reply.send(Err(r.0));
                }
            },
            Command::Status { reply } => {
                let mut status = self.election.status(now);
                if let Some(w) = &self.witness {
                    let rgs: Vec<RgId> = self.election.roles().keys().copied().collect();
                    status.witness = Some(crate::witness::WitnessStatus {
                        witness: w.cfg.witness.to_string(),
                        lease_ms: w.cfg.lease_ms,
                        error: w.group.as_ref().err().cloned(),
                        raft: w.group.as_ref().ok().map(|g| g.status(&rgs, now)),
                    });
                }
                let _ = reply.send((status, self.events.iter().cloned().collect()));
            }
            Command::Monitor { name, up } => {
                let actions = self.election.on_monitor(&name, up, now);
                self.apply(actions);
            }
            Command::Stop | Command::Resign { .. } => {}
        }
    }

    /// A forwarded request the peer never answered (it restarted, or the
    /// control link broke after the send) fails instead of hanging: the
    /// target's own transfer timeout plus a margin.
    fn expire_forwarded(&mut self, now: Millis) {
        let limit = self.election.config().transfer_timeout_ms * 2 + 1000;
        let node = self.election.node().peer();
        let expired: Vec<u64> = self
            .forwarded_out
            .iter()
            .filter(|(_, (sent, _))| now.saturating_sub(*sent) > limit)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some((_, reply)) = self.forwarded_out.remove(&id) {
                let _ = reply.send(Err(format!("no answer from {node}")));
            }
        }
    }

    fn resign(&mut self) {
        let now = self.now();
        let rgs: Vec<RgId> = self.election.config().rgs.iter().map(|r| r.rg).collect();
        for rg in rgs {
            let actions = self.election.set_disabled(rg, true, now);
            self.apply(actions);
        }
    }

    fn forwarded_request(&mut self, r: &pb::FailoverRequest) {
        let now = self.now();
        let respond = |sync: &SyncHandle, accepted: bool, reason: String| {
            sync.send_control(Msg::FailoverResponse(pb::FailoverResponse {
                request_id: r.request_id,
                rg: r.rg,
                accepted,
                reason,
                phase: pb::FailoverPhase::Forward as i32,
                epoch: 0,
            }));
        };
        let Ok(rg) = u16::try_from(r.rg).map(RgId) else {
            respond(&self.sync, false, format!("rg {} out of range", r.rg));
            return;
        };
        match self
            .election
            .request_failover(rg, self.election.node(), now)
        {
            Ok((id, actions)) => {
                self.forwarded_in.insert(
                    id,
                    Forwarded {
                        peer_request: r.request_id,
                        rg,
                    },
                );
                self.apply(actions);
            }
            Err(refusal) => respond(&self.sync, false, refusal.0),
        }
    }

    fn apply(&mut self, actions: Vec<Action>) {
        let mut roles_changed = false;
        for a in actions {
            match a {
                Action::Promote { rg, epoch, reason } => {
                    // Sessions become authoritative before forwarding starts.
                    lock(&self.table).promote_rg(rg);
                    roles_changed = true;
                    self.stats.promotions.fetch_add(1, Ordering::Relaxed);
                    info!(%rg, %epoch, %reason, "primary");
                    self.record(Some(rg), format!("primary in {epoch}: {reason}"));
                    let _ = self.changes.send(RoleChange {
                        rg,
                        primary: true,
                        epoch,
                        reason,
                    });
                }
                Action::Demote { rg, epoch, reason } => {
                    // Publish first so forwarding stops, then demote sessions.
                    self.release_lease(rg, epoch);
                    self.publish();
                    lock(&self.table).demote_rg(rg);
                    self.stats.demotions.fetch_add(1, Ordering::Relaxed);
                    info!(%rg, %epoch, %reason, "secondary");
                    self.record(Some(rg), format!("secondary in {epoch}: {reason}"));
                    let _ = self.changes.send(RoleChange {
                        rg,
                        primary: false,
                        epoch,
                        reason,
                    });
                }
                Action::Send(msg) => {
                    self.sync.send_control(msg);
                }
                Action::FailoverDone {
                    rg,
                    request_id,
                    result,
                } => {
                    if let Some(reply) = self.pending.remove(&request_id) {
                        let _ = reply.send(result.clone());
                    }
                    if let Some(f) = self.forwarded_in.remove(&request_id) {
                        let (accepted, reason) = match &result {
                            Ok(()) => (true, String::new()),
                            Err(e) => (false, e.clone()),
                        };
                        self.sync
                            .send_control(Msg::FailoverResponse(pb::FailoverResponse {
                                request_id: f.peer_request,
                                rg: f.rg.0.into(),
                                accepted,
                                reason,
                                phase: pb::FailoverPhase::Forward as i32,
                                epoch: 0,
                            }));
                    }
                    self.record(
                        Some(rg),
                        format!("manual failover {request_id}: {result:?}"),
                    );
                }
                Action::Event { rg, text } => {
                    info!(rg = rg.map(|r| r.0), "{text}");
                    self.record(rg, text);
                }
            }
        }
        if roles_changed {
            self.publish();
        }
        // Epoch adoption on secondaries changes the role map too.
        self.publish_if_changed();
    }

    /// The roles to publish: the election's, and in witness mode only the
    /// RGs this node also holds a lease from the ownership log for.
    fn forwarding_roles(&self) -> RoleMap {
        let now = self.now();
        let mut roles = self.election.roles();
        if let Some(w) = &self.witness {
            for (rg, r) in roles.iter_mut() {
                r.primary &= w.forwards(*rg, r.epoch, now);
            }
        }
        roles
    }

    fn publish_if_changed(&mut self) {
        if **self.roles.load() != self.forwarding_roles() {
            self.publish();
        }
    }

    /// Publishes the roles and tells subscribers about every RG whose
    /// forwarding or epoch changed.
    fn publish(&mut self) {
        let map = Arc::new(self.forwarding_roles());
        let old = self.roles.swap(map.clone());
        self.roles_tx.send_replace(map.clone());
        for (rg, r) in map.iter() {
            if old.get(rg) != Some(r) && (r.primary || old.get(rg).is_some_and(|o| o.primary)) {
                let reason = self.reasons.get(rg).cloned().unwrap_or_default();
                let _ = self.changes.send(RoleChange {
                    rg: *rg,
                    primary: r.primary,
                    epoch: r.epoch,
                    reason,
                });
            }
        }
    }

    fn record(&mut self, rg: Option<RgId>, text: String) {
        if self.events.len() == EVENT_HISTORY {
            self.events.pop_front();
        }
        self.events.push_back(EventRecord {
            at_ms: self.now().0,
            rg: rg.map(|r| r.0),
            text,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fabric_heartbeat_with_wrong_key_or_tampering_is_rejected() {
        let key = ClusterKey::new(b"cluster secret");
        let hb = pb::Heartbeat {
            node_id: 1,
            cluster_id: 7,
            seq: 9,
            ..Default::default()
        };
        let pkt = key.seal(hb.clone());
        assert_eq!(key.open(&pkt), Some(hb));
        assert_eq!(ClusterKey::new(b"other").open(&pkt), None);
        let mut bad = pkt.clone();
        bad[5] ^= 1;
        assert_eq!(key.open(&bad), None);
        assert_eq!(key.open(&pkt[..10]), None);
        assert_eq!(key.open(&[]), None);
    }
}
