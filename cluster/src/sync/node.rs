//! The I/O shell around `RgSender` / `RgReceiver`: one QUIC connection to
//! the peer (mutual TLS, peer name pinned), a control stream for Hello,
//! acks and requests, and one unidirectional stream per RG from that RG's
//! primary, so RGs never block each other.
//!
//! Everything here takes time from tokio and the injected clock and gets
//! its endpoint from the caller, so turmoil can run it unchanged. Every
//! `select!` is `biased` for the same reason.

use super::{ResumePlan, RgReceiver, RgSender};
use crate::stats::{ConnSnapshot, ConnStats, RgSyncSnapshot, RgSyncStats, add, inc, set};
use bytes::BytesMut;
use quinn::{Connection, RecvStream, SendStream, VarInt};
use rustc_hash::FxHashMap;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tandem_dataplane::delta::{Delta, DeltaConsumer};
use tandem_dataplane::session::{Clock, SharedTable, Sliced, read};
use tandem_proto::pb::{self, envelope::Msg};
use tandem_proto::{Epoch, FrameDecoder, FrameError, NodeId, PROTOCOL_VERSION, RgId, encode_frame};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

/// Application close codes on the node-to-node connection.
pub mod close {
    pub const SHUTDOWN: u32 = 0;
    pub const REPLACED: u32 = 1;
    pub const PROTOCOL: u32 = 2;
    pub const HELLO: u32 = 3;
    pub const IDENTITY: u32 = 4;
}

pub use tandem_proto::{RgRole, RoleMap};

#[derive(Clone, Debug)]
pub struct SyncConfig {
    pub node: NodeId,
    pub peer: NodeId,
    pub cluster_id: u32,
    pub peer_addr: SocketAddr,
    /// The peer certificate's name (pinned).
    pub peer_name: String,
    /// This node opens the connection (by convention the lower node id).
    pub dial: bool,
    /// Random per start; tells the peer its delta stream restarted.
    pub incarnation: u64,
    /// Unacked bytes kept for replay, per RG. Beyond it the oldest batch is
    /// dropped and a reconnect that needs it gets a bulk instead.
    pub replay_cap_bytes: usize,
    /// Keys per delta batch (one frame of ~10-25 KiB).
    pub batch_keys: usize,
    /// Sessions per bulk chunk frame.
    pub bulk_chunk_sessions: usize,
    pub hello_timeout: Duration,
    pub redial_min: Duration,
    pub redial_max: Duration,
    /// Bound of the queue from stream readers to the control writer; when
    /// full, readers wait (backpressure onto QUIC flow control).
    pub control_queue: usize,
}

impl SyncConfig {
    pub fn new(
        node: NodeId,
        peer: NodeId,
        cluster_id: u32,
        peer_addr: SocketAddr,
        peer_name: &str,
    ) -> SyncConfig {
        SyncConfig {
            node,
            peer,
            cluster_id,
            peer_addr,
            peer_name: peer_name.to_string(),
            dial: node < peer,
            incarnation: rand::random(),
            replay_cap_bytes: 32 << 20,
            batch_keys: 256,
            bulk_chunk_sessions: 512,
            hello_timeout: Duration::from_secs(5),
            redial_min: Duration::from_millis(100),
            redial_max: Duration::from_secs(2),
            control_queue: 4096,
        }
    }
}

/// Per-RG and connection counters of one node.
#[derive(Default)]
pub struct SyncStats {
    pub conn: ConnStats,
    rgs: Mutex<BTreeMap<RgId, Arc<RgSyncStats>>>,
}

impl SyncStats {
    pub fn rg(&self, rg: RgId) -> Arc<RgSyncStats> {
        self.rgs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(rg)
            .or_default()
            .clone()
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct SyncSnapshot {
    pub connected: bool,
    pub conn: ConnSnapshot,
    pub rgs: Vec<(u16, RgSyncSnapshot)>,
}

struct Shared {
    cfg: SyncConfig,
    table: SharedTable,
    clock: Clock,
    roles: watch::Receiver<Arc<RoleMap>>,
    stats: SyncStats,
    senders: Mutex<FxHashMap<RgId, Arc<Mutex<RgSender>>>>,
    receivers: Mutex<FxHashMap<RgId, RgReceiver>>,
    consumers: FxHashMap<RgId, Arc<tokio::sync::Mutex<DeltaConsumer>>>,
    bulk_requests: Mutex<FxHashMap<RgId, Arc<Notify>>>,
    connected: watch::Sender<bool>,
    current: Mutex<Option<Connection>>,
    /// The control writer of the current connection.
    control: Mutex<Option<mpsc::Sender<Msg>>>,
    /// Where heartbeats and failover messages from the peer go (election).
    election_sink: Option<mpsc::Sender<Msg>>,
}

fn guard<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn role(&self, rg: RgId) -> Option<RgRole> {
        self.roles.borrow().get(&rg).copied()
    }

    fn is_primary(&self, rg: RgId) -> bool {
        self.role(rg).is_some_and(|r| r.primary)
    }

    /// The sender for (rg, epoch); a new epoch starts a new sequence space.
    fn sender(&self, rg: RgId, epoch: Epoch) -> Arc<Mutex<RgSender>> {
        let mut senders = guard(&self.senders);
        let s = senders.entry(rg).or_insert_with(|| {
            Arc::new(Mutex::new(RgSender::new(
                rg,
                epoch,
                self.cfg.incarnation,
                self.cfg.replay_cap_bytes,
            )))
        });
        if guard(s).epoch() != epoch {
            *s = Arc::new(Mutex::new(RgSender::new(
                rg,
                epoch,
                self.cfg.incarnation,
                self.cfg.replay_cap_bytes,
            )));
        }
        s.clone()
    }

    fn bulk_request(&self, rg: RgId) -> Arc<Notify> {
        guard(&self.bulk_requests).entry(rg).or_default().clone()
    }

    fn hello(&self) -> pb::Hello {
        let roles = self.roles.borrow().clone();
        let receivers = guard(&self.receivers);
        let rgs = roles
            .iter()
            .map(|(rg, role)| {
                if role.primary {
                    pb::RgSyncState {
                        rg: rg.0.into(),
                        epoch: role.epoch.0,
                        role: pb::Role::Primary as i32,
                        ..Default::default()
                    }
                } else {
                    receivers
                        .get(rg)
                        .map(RgReceiver::sync_state)
                        .unwrap_or(pb::RgSyncState {
                            rg: rg.0.into(),
                            epoch: role.epoch.0,
                            role: pb::Role::Secondary as i32,
                            ..Default::default()
                        })
                }
            })
            .collect();
        pb::Hello {
            node_id: self.cfg.node.0.into(),
            cluster_id: self.cfg.cluster_id,
            protocol_version: PROTOCOL_VERSION,
            rgs,
            incarnation: self.cfg.incarnation,
        }
    }
}

/// Handle to a running sync node.
#[derive(Clone)]
pub struct SyncHandle {
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
}

impl SyncHandle {
    pub fn snapshot(&self) -> SyncSnapshot {
        let now = (self.shared.clock)();
        let rgs: Vec<RgId> = guard(&self.shared.stats.rgs).keys().copied().collect();
        for rg in &rgs {
            let sender = guard(&self.shared.senders).get(rg).cloned();
            if let Some(s) = sender {
                let s = guard(&s);
                let st = self.shared.stats.rg(*rg);
                let (batches, bytes) = s.replay_depth();
                set(&st.replay_depth_batches, batches as u64);
                set(&st.replay_depth_bytes, bytes as u64);
                set(&st.oldest_unacked_ms, s.oldest_unacked_ms(now));
            }
        }
        SyncSnapshot {
            connected: *self.shared.connected.borrow(),
            conn: self.shared.stats.conn.snapshot(),
            rgs: rgs
                .iter()
                .map(|rg| (rg.0, self.shared.stats.rg(*rg).snapshot()))
                .collect(),
        }
    }

    pub fn stats(&self, rg: RgId) -> Arc<RgSyncStats> {
        self.shared.stats.rg(rg)
    }

    pub fn conn_stats(&self) -> ConnSnapshot {
        self.shared.stats.conn.snapshot()
    }

    /// Resolves when the connection state equals `up`.
    pub async fn wait_connected(&self, up: bool) {
        let mut rx = self.shared.connected.subscribe();
        let _ = rx.wait_for(|c| *c == up).await;
    }

    pub fn is_connected(&self) -> bool {
        *self.shared.connected.borrow()
    }

    /// Whether this node's copy of `rg` is in sync with the peer's stream.
    pub fn rg_in_sync(&self, rg: RgId) -> bool {
        guard(&self.shared.receivers)
            .get(&rg)
            .is_some_and(RgReceiver::in_sync)
    }

    /// Unacked deltas of `rg` this node sent (0 when caught up).
    pub fn unacked(&self, rg: RgId) -> u64 {
        guard(&self.shared.senders).get(&rg).map_or(0, |s| {
            let s = guard(s);
            s.next_seq() - 1 - s.acked()
        })
    }

    /// As the sender of `rg`: (epoch, incarnation, highest acked seq).
    pub fn acked(&self, rg: RgId) -> Option<(Epoch, u64, u64)> {
        guard(&self.shared.senders).get(&rg).map(|s| {
            let s = guard(s);
            (s.epoch(), self.shared.cfg.incarnation, s.acked())
        })
    }

    /// As the receiver of `rg`, when in sync: (epoch, sender incarnation,
    /// highest applied seq).
    pub fn applied(&self, rg: RgId) -> Option<(Epoch, u64, u64)> {
        guard(&self.shared.receivers)
            .get(&rg)
            .filter(|r| r.in_sync())
            .map(|r| r.sync_state())
            .map(|st| {
                (
                    Epoch(st.applied_epoch),
                    st.sender_incarnation,
                    st.applied_seq,
                )
            })
    }

    /// Oldest unacknowledged batch age of `rg`'s stream (ms).
    pub fn lag_ms(&self, rg: RgId) -> u64 {
        let now = (self.shared.clock)();
        guard(&self.shared.senders)
            .get(&rg)
            .map_or(0, |s| guard(s).oldest_unacked_ms(now))
    }

    /// Whether a bulk this node sent for `rg` is still unacknowledged.
    pub fn bulk_outstanding(&self, rg: RgId) -> bool {
        guard(&self.shared.senders)
            .get(&rg)
            .is_some_and(|s| guard(s).bulk_in_progress())
    }

    /// Asks this node (as primary) to re-export `rg` to the peer.
    pub fn request_bulk(&self, rg: RgId) {
        self.shared.bulk_request(rg).notify_one();
    }

    /// Queues a message on the control stream (failover messages). False
    /// when not connected or the control queue is full (counted).
    pub fn send_control(&self, msg: Msg) -> bool {
        let tx = guard(&self.shared.control).clone();
        let sent = tx.is_some_and(|tx| tx.try_send(msg).is_ok());
        if !sent {
            inc(&self.shared.stats.conn.control_dropped);
        }
        sent
    }

    /// Sends one unreliable datagram (a heartbeat) on the connection.
    pub fn send_datagram(&self, msg: Msg) -> bool {
        let conn = guard(&self.shared.current).clone();
        let Some(conn) = conn.filter(|c| c.close_reason().is_none()) else {
            return false;
        };
        let mut out = BytesMut::new();
        encode_frame(&pb::Envelope { msg: Some(msg) }, &mut out);
        conn.send_datagram(out.freeze()).is_ok()
    }

    /// Drops the current connection (operator "reset sync"; tests use it to
    /// cut a bulk short). The dialing side reconnects.
    pub fn disconnect(&self) {
        if let Some(c) = guard(&self.shared.current).as_ref() {
            c.close(VarInt::from_u32(close::SHUTDOWN), b"sync reset");
        }
    }

    /// Closes the connection and stops every task.
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }
}

/// What a sync node runs on, all provided by the caller so that tests and
/// simulations can substitute any part.
pub struct SyncIo {
    /// Bound to the control-link address, with a server config (real UDP
    /// or simulated).
    pub endpoint: quinn::Endpoint,
    pub client: quinn::ClientConfig,
    pub table: SharedTable,
    /// One per RG this node may be primary for.
    pub consumers: Vec<DeltaConsumer>,
    pub roles: watch::Receiver<Arc<RoleMap>>,
    pub clock: Clock,
    /// Where the peer's heartbeats and failover messages go.
    pub election_sink: Option<mpsc::Sender<Msg>>,
}

/// A node's replication service.
pub struct SyncNode;

impl SyncNode {
    /// Starts accepting (and, if configured, dialing) on the endpoint.
    pub fn spawn(cfg: SyncConfig, io: SyncIo) -> SyncHandle {
        let SyncIo {
            endpoint,
            client,
            table,
            consumers,
            roles,
            clock,
            election_sink,
        } = io;
        let consumers = consumers
            .into_iter()
            .map(|c| (c.rg(), Arc::new(tokio::sync::Mutex::new(c))))
            .collect();
        let shared = Arc::new(Shared {
            cfg,
            table,
            clock,
            roles,
            stats: SyncStats::default(),
            senders: Mutex::default(),
            receivers: Mutex::default(),
            consumers,
            bulk_requests: Mutex::default(),
            connected: watch::channel(false).0,
            current: Mutex::default(),
            control: Mutex::default(),
            election_sink,
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (conns_tx, conns_rx) = mpsc::channel(4);
        tokio::spawn(accept_loop(
            shared.clone(),
            endpoint.clone(),
            conns_tx.clone(),
            shutdown_rx.clone(),
        ));
        if shared.cfg.dial {
            tokio::spawn(dial_loop(
                shared.clone(),
                endpoint,
                client,
                conns_tx,
                shutdown_rx.clone(),
            ));
        }
        tokio::spawn(manage(shared.clone(), conns_rx, shutdown_rx));
        SyncHandle { shared, shutdown }
    }
}

/// A verified connection and which side opened it.
struct NewConn {
    conn: Connection,
    dialed: bool,
}

async fn accept_loop(
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    conns: mpsc::Sender<NewConn>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let incoming = tokio::select! {
            biased;
            _ = shutdown.changed() => return,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => return,
            },
        };
        let conn = match incoming.await {
            Ok(c) => c,
            Err(e) => {
                inc(&shared.stats.conn.handshakes_refused);
                warn!(error = %e, "refused connection: TLS handshake failed");
                continue;
            }
        };
        if let Err(e) = crate::tls::verify_peer_name(&conn, &shared.cfg.peer_name) {
            inc(&shared.stats.conn.peer_name_rejected);
            warn!(remote = %conn.remote_address(), error = %e, "refused connection: peer identity");
            conn.close(VarInt::from_u32(close::IDENTITY), b"peer identity rejected");
            continue;
        }
        if conns
            .send(NewConn {
                conn,
                dialed: false,
            })
            .await
            .is_err()
        {
            return;
        }
    }
}

async fn dial_loop(
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    conns: mpsc::Sender<NewConn>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = shared.cfg.redial_min;
    loop {
        if *shutdown.borrow() {
            return;
        }
        let attempt = async {
            let connecting = endpoint
                .connect_with(client.clone(), shared.cfg.peer_addr, &shared.cfg.peer_name)
                .map_err(|e| e.to_string())?;
            connecting.await.map_err(|e| e.to_string())
        };
        let result = tokio::select! {
            biased;
            _ = shutdown.changed() => return,
            r = attempt => r,
        };
        match result {
            Ok(conn) => {
                backoff = shared.cfg.redial_min;
                let closed = conn.clone();
                if conns.send(NewConn { conn, dialed: true }).await.is_err() {
                    return;
                }
                tokio::select! {
                    biased;
                    _ = shutdown.changed() => return,
                    _ = closed.closed() => {}
                }
            }
            Err(e) => {
                inc(&shared.stats.conn.dial_failures);
                debug!(error = %e, peer = %shared.cfg.peer_addr, "dial failed");
            }
        }
        tokio::select! {
            biased;
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(shared.cfg.redial_max);
    }
}

/// Runs one connection at a time; a newer one replaces the current one
/// after the current one's tasks have fully stopped (so an RG never has two
/// senders or two readers).
async fn manage(
    shared: Arc<Shared>,
    mut conns: mpsc::Receiver<NewConn>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut current: Option<(Connection, tokio::task::JoinHandle<()>)> = None;
    loop {
        let next = tokio::select! {
            biased;
            _ = shutdown.changed() => None,
            c = conns.recv() => c,
        };
        if let Some((conn, task)) = current.take() {
            let code = if next.is_some() {
                close::REPLACED
            } else {
                close::SHUTDOWN
            };
            if next.is_some() && conn.close_reason().is_none() {
                inc(&shared.stats.conn.replaced);
            }
            conn.close(VarInt::from_u32(code), b"closed by peer manager");
            let _ = task.await;
        }
        let Some(NewConn { conn, dialed }) = next else {
            return;
        };
        let s = shared.clone();
        let c = conn.clone();
        current = Some((
            conn,
            tokio::spawn(async move { run_connection(s, c, dialed).await }),
        ));
    }
}

/// Why a connection ended, for the close frame and the log.
struct Close {
    code: u32,
    reason: String,
}

impl Close {
    fn protocol(reason: impl Into<String>) -> Close {
        Close {
            code: close::PROTOCOL,
            reason: reason.into(),
        }
    }
}

fn count_frame_error(stats: &ConnStats, e: &FrameError) {
    let c = match e {
        FrameError::Oversized { .. } => &stats.frames_oversized,
        FrameError::Malformed(_) => &stats.frames_malformed,
        FrameError::Unknown => &stats.frames_unknown,
        FrameError::Truncated { .. } => &stats.frames_truncated,
    };
    inc(c);
}

/// Frames of one stream, decoded as they arrive.
struct FrameReader {
    shared: Arc<Shared>,
    recv: RecvStream,
    dec: FrameDecoder,
}

impl FrameReader {
    fn new(shared: Arc<Shared>, recv: RecvStream) -> Self {
        FrameReader {
            shared,
            recv,
            dec: FrameDecoder::default(),
        }
    }

    /// The next message; `None` at a clean end of stream.
    async fn next(&mut self) -> Result<Option<Msg>, Close> {
        loop {
            match self.dec.next_frame() {
                Ok(Some(env)) => return Ok(env.msg),
                Ok(None) => {}
                Err(e) => return Err(self.frame_error(e)),
            }
            match self.recv.read_chunk(64 * 1024, true).await {
                Ok(Some(chunk)) => self.dec.push(&chunk.bytes),
                Ok(None) => {
                    return self
                        .dec
                        .finish()
                        .map(|()| None)
                        .map_err(|e| self.frame_error(e));
                }
                Err(e) => {
                    return Err(Close {
                        code: close::SHUTDOWN,
                        reason: format!("stream: {e}"),
                    });
                }
            }
        }
    }

    fn frame_error(&self, e: FrameError) -> Close {
        count_frame_error(&self.shared.stats.conn, &e);
        Close::protocol(e.to_string())
    }
}

async fn write_msg(send: &mut SendStream, msg: Msg) -> Result<(), Close> {
    let mut out = BytesMut::new();
    encode_frame(&pb::Envelope { msg: Some(msg) }, &mut out);
    send.write_all(&out).await.map_err(|e| Close {
        code: close::SHUTDOWN,
        reason: format!("write: {e}"),
    })
}

async fn run_connection(shared: Arc<Shared>, conn: Connection, dialed: bool) {
    let remote = conn.remote_address();
    *guard(&shared.current) = Some(conn.clone());
    let result = connection_body(&shared, &conn, dialed).await;
    *guard(&shared.control) = None;
    for r in guard(&shared.receivers).values_mut() {
        r.on_disconnect();
    }
    for s in guard(&shared.senders).values() {
        guard(s).on_disconnect();
    }
    inc(&shared.stats.conn.disconnects);
    // Published last: whoever sees "disconnected" sees its consequences.
    shared.connected.send_replace(false);
    match result {
        Err(c) => {
            if c.code == close::PROTOCOL || c.code == close::HELLO {
                warn!(%remote, reason = %c.reason, "closing peer connection");
            } else {
                info!(%remote, reason = %c.reason, "peer connection ended");
            }
            conn.close(VarInt::from_u32(c.code), c.reason.as_bytes());
        }
        Ok(()) => info!(%remote, "peer connection ended"),
    }
}

async fn connection_body(
    shared: &Arc<Shared>,
    conn: &Connection,
    dialed: bool,
) -> Result<(), Close> {
    let (mut ctl_send, ctl_recv) = if dialed {
        conn.open_bi().await
    } else {
        conn.accept_bi().await
    }
    .map_err(|e| Close {
        code: close::SHUTDOWN,
        reason: format!("control stream: {e}"),
    })?;
    write_msg(&mut ctl_send, Msg::Hello(shared.hello())).await?;
    let mut ctl_frames = FrameReader::new(shared.clone(), ctl_recv);
    let first = tokio::time::timeout(shared.cfg.hello_timeout, ctl_frames.next())
        .await
        .map_err(|_| Close {
            code: close::HELLO,
            reason: "no Hello from peer".into(),
        })??;
    let Some(Msg::Hello(peer_hello)) = first else {
        inc(&shared.stats.conn.unexpected_messages);
        return Err(Close::protocol("first control message is not Hello"));
    };
    // Frames after the Hello that arrived in the same read stay buffered in
    // the decoder; hand the reader on rather than the raw stream.
    let ctl_recv = ctl_frames;
    if let Err(reason) = check_hello(&shared.cfg, &peer_hello) {
        inc(&shared.stats.conn.hello_rejected);
        return Err(Close {
            code: close::HELLO,
            reason,
        });
    }
    for r in guard(&shared.receivers).values_mut() {
        r.on_connect(peer_hello.incarnation);
    }
    let peer_states: Arc<FxHashMap<RgId, pb::RgSyncState>> = Arc::new(
        peer_hello
            .rgs
            .iter()
            .filter_map(|s| Some((RgId(u16::try_from(s.rg).ok()?), *s)))
            .collect(),
    );
    inc(&shared.stats.conn.connects);
    shared.connected.send_replace(true);
    info!(peer = %conn.remote_address(), incarnation = peer_hello.incarnation, "peer connected");

    let (ctl_tx, ctl_rx) = mpsc::channel::<Msg>(shared.cfg.control_queue);
    *guard(&shared.control) = Some(ctl_tx.clone());
    let mut tasks: JoinSet<Result<(), Close>> = JoinSet::new();
    tasks.spawn(read_datagrams(shared.clone(), conn.clone()));
    tasks.spawn(control_writer(ctl_send, ctl_rx));
    tasks.spawn(control_reader(shared.clone(), ctl_recv));
    tasks.spawn(accept_rg_streams(
        shared.clone(),
        conn.clone(),
        ctl_tx.clone(),
        peer_hello.incarnation,
    ));
    tasks.spawn(supervise_senders(shared.clone(), conn.clone(), peer_states));
    // The first task to end decides; the rest are aborted when `tasks`
    // drops.
    let first = tasks.join_next().await;
    match first {
        Some(Ok(r)) => r,
        Some(Err(e)) => Err(Close {
            code: close::SHUTDOWN,
            reason: format!("task failed: {e}"),
        }),
        None => Ok(()),
    }
}

fn check_hello(cfg: &SyncConfig, h: &pb::Hello) -> Result<(), String> {
    if h.protocol_version != PROTOCOL_VERSION {
        return Err(format!(
            "peer speaks protocol {} (this node {PROTOCOL_VERSION})",
            h.protocol_version
        ));
    }
    if h.cluster_id != cfg.cluster_id {
        return Err(format!(
            "peer is in cluster {} (this node {})",
            h.cluster_id, cfg.cluster_id
        ));
    }
    if h.node_id != u32::from(cfg.peer.0) {
        return Err(format!(
            "peer says it is node{} (expected {})",
            h.node_id, cfg.peer
        ));
    }
    Ok(())
}

async fn control_writer(mut send: SendStream, mut rx: mpsc::Receiver<Msg>) -> Result<(), Close> {
    let mut msgs = Vec::with_capacity(256);
    let mut out = BytesMut::new();
    while rx.recv_many(&mut msgs, 256).await > 0 {
        out.clear();
        for m in msgs.drain(..) {
            encode_frame(&pb::Envelope { msg: Some(m) }, &mut out);
        }
        send.write_all(&out).await.map_err(|e| Close {
            code: close::SHUTDOWN,
            reason: format!("control write: {e}"),
        })?;
    }
    Ok(())
}

async fn control_reader(shared: Arc<Shared>, mut frames: FrameReader) -> Result<(), Close> {
    let s = &*shared;
    let rg_of = |rg: u32| {
        u16::try_from(rg)
            .map(RgId)
            .map_err(|_| Close::protocol(format!("rg {rg} out of range")))
    };
    while let Some(msg) = frames.next().await? {
        match msg {
            Msg::Ack(a) => {
                inc(&s.stats.conn.acks_received);
                let rg = rg_of(a.rg)?;
                let sender = guard(&s.senders).get(&rg).cloned();
                if let Some(sender) = sender {
                    guard(&sender).on_ack(Epoch(a.epoch), a.seq);
                }
            }
            Msg::BulkAck(a) => {
                let rg = rg_of(a.rg)?;
                let sender = guard(&s.senders).get(&rg).cloned();
                let took = sender.and_then(|sender| {
                    guard(&sender).on_bulk_ack(Epoch(a.epoch), a.bulk_id, (s.clock)())
                });
                if let Some(took) = took {
                    let st = s.stats.rg(rg);
                    inc(&st.bulks_acked);
                    set(&st.last_bulk_ms, took);
                    info!(%rg, applied = a.applied, deleted = a.reconciled_deleted, ms = took, "peer reconciled bulk");
                }
            }
            Msg::BulkRequest(r) => {
                let rg = rg_of(r.rg)?;
                inc(&s.stats.rg(rg).bulk_requests_received);
                info!(%rg, reason = %r.reason, "peer requested a bulk");
                s.bulk_request(rg).notify_one();
            }
            m @ (Msg::Heartbeat(_) | Msg::FailoverRequest(_) | Msg::FailoverResponse(_)) => {
                if matches!(m, Msg::Heartbeat(_)) {
                    inc(&s.stats.conn.heartbeats_received);
                }
                to_election(s, m);
            }
            _ => {
                inc(&s.stats.conn.unexpected_messages);
                return Err(Close::protocol("unexpected message on the control stream"));
            }
        }
    }
    Err(Close {
        code: close::SHUTDOWN,
        reason: "peer closed the control stream".into(),
    })
}

/// Hands a message to the election; a full election queue drops and counts
/// (heartbeats are periodic, failover requests time out and are retried).
fn to_election(s: &Shared, m: Msg) {
    if let Some(sink) = &s.election_sink
        && sink.try_send(m).is_err()
    {
        inc(&s.stats.conn.election_dropped);
    }
}

/// Heartbeats on the control link arrive as QUIC datagrams.
async fn read_datagrams(shared: Arc<Shared>, conn: Connection) -> Result<(), Close> {
    loop {
        let d = conn.read_datagram().await.map_err(|e| Close {
            code: close::SHUTDOWN,
            reason: format!("datagrams: {e}"),
        })?;
        let mut dec = FrameDecoder::default();
        dec.push(&d);
        match dec.next_frame() {
            Ok(Some(pb::Envelope {
                msg: Some(m @ Msg::Heartbeat(_)),
            })) => {
                inc(&shared.stats.conn.heartbeats_received);
                to_election(&shared, m);
            }
            Ok(_) | Err(_) => inc(&shared.stats.conn.bad_datagrams),
        }
    }
}

async fn accept_rg_streams(
    shared: Arc<Shared>,
    conn: Connection,
    ctl: mpsc::Sender<Msg>,
    peer_incarnation: u64,
) -> Result<(), Close> {
    let mut readers: JoinSet<Result<(), Close>> = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            Some(done) = readers.join_next() => {
                if let Ok(Err(c)) = done {
                    return Err(c);
                }
            }
            s = conn.accept_uni() => {
                let recv = s.map_err(|e| Close { code: close::SHUTDOWN, reason: format!("connection: {e}") })?;
                readers.spawn(read_rg_stream(shared.clone(), recv, ctl.clone(), peer_incarnation));
            }
        }
    }
}

/// Applies one RG stream to the table. The first frame fixes the stream's
/// RG; any frame of another RG closes the connection.
async fn read_rg_stream(
    shared: Arc<Shared>,
    recv: RecvStream,
    ctl: mpsc::Sender<Msg>,
    peer_incarnation: u64,
) -> Result<(), Close> {
    let s = &*shared;
    let mut frames = FrameReader::new(shared.clone(), recv);
    let mut stream_rg: Option<RgId> = None;
    while let Some(msg) = frames.next().await? {
        let rg_num = match &msg {
            Msg::DeltaBatch(b) => b.rg,
            Msg::BulkBegin(b) => b.rg,
            Msg::BulkChunk(b) => b.rg,
            Msg::BulkEnd(b) => b.rg,
            _ => {
                inc(&s.stats.conn.unexpected_messages);
                return Err(Close::protocol("control message on an RG stream"));
            }
        };
        let rg = RgId(
            u16::try_from(rg_num)
                .map_err(|_| Close::protocol(format!("rg {rg_num} out of range")))?,
        );
        if *stream_rg.get_or_insert(rg) != rg {
            inc(&s.stats.conn.unexpected_messages);
            return Err(Close::protocol(format!(
                "frame for {rg} on another RG's stream"
            )));
        }
        let local_primary = s.is_primary(rg);
        let now = (s.clock)();
        let replies = {
            let mut receivers = guard(&s.receivers);
            let rx = receivers.entry(rg).or_insert_with(|| {
                let mut r = RgReceiver::new(rg, s.stats.rg(rg));
                r.on_connect(peer_incarnation);
                r
            });
            // The receiver takes the write lock one slice at a time.
            rx.on_message(&msg, &mut Sliced(&s.table), local_primary, now)
                .map_err(|e| {
                    inc(&s.stats.conn.invalid_sessions);
                    Close::protocol(e.to_string())
                })?
        };
        for r in replies {
            ctl.send(r).await.map_err(|_| Close {
                code: close::SHUTDOWN,
                reason: "control writer gone".into(),
            })?;
        }
    }
    Ok(())
}

/// Keeps exactly one sender task per RG this node is primary for, restarted
/// when the RG's epoch changes and stopped when the node is demoted.
async fn supervise_senders(
    shared: Arc<Shared>,
    conn: Connection,
    peer_states: Arc<FxHashMap<RgId, pb::RgSyncState>>,
) -> Result<(), Close> {
    let mut roles = shared.roles.clone();
    let mut running: FxHashMap<RgId, (Epoch, tokio::task::AbortHandle)> = FxHashMap::default();
    let mut tasks: JoinSet<Result<(), Close>> = JoinSet::new();
    loop {
        let map = roles.borrow_and_update().clone();
        running.retain(|rg, (epoch, handle)| {
            let keep = map.get(rg).is_some_and(|r| r.primary && r.epoch == *epoch);
            if !keep {
                handle.abort();
            }
            keep
        });
        for (rg, role) in map.iter().filter(|(_, r)| r.primary) {
            if running.contains_key(rg) {
                continue;
            }
            let h = tasks.spawn(send_rg(
                shared.clone(),
                conn.clone(),
                *rg,
                role.epoch,
                peer_states.get(rg).copied(),
            ));
            running.insert(*rg, (role.epoch, h));
        }
        tokio::select! {
            biased;
            Some(done) = tasks.join_next() => {
                if let Ok(Err(c)) = done {
                    return Err(c);
                }
            }
            changed = roles.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
            }
        }
    }
}

async fn write_out(send: &mut SendStream, out: &mut BytesMut) -> Result<(), Close> {
    if out.is_empty() {
        return Ok(());
    }
    let bytes = out.split().freeze();
    send.write_chunk(bytes).await.map_err(|e| Close {
        code: close::SHUTDOWN,
        reason: format!("rg stream write: {e}"),
    })
}

/// One RG's stream for one connection and one epoch: resume (replay or
/// bulk), then deltas as the dataplane produces them, with a bulk whenever
/// the peer asks or the delta queue overflowed.
async fn send_rg(
    shared: Arc<Shared>,
    conn: Connection,
    rg: RgId,
    epoch: Epoch,
    peer_state: Option<pb::RgSyncState>,
) -> Result<(), Close> {
    let stats = shared.stats.rg(rg);
    let sender = shared.sender(rg, epoch);
    let consumer = shared.consumers.get(&rg).cloned();
    let mut consumer = match &consumer {
        Some(c) => Some(c.lock().await),
        None => None,
    };
    let bulk_request = shared.bulk_request(rg);
    let mut send = conn.open_uni().await.map_err(|e| Close {
        code: close::SHUTDOWN,
        reason: format!("open {rg} stream: {e}"),
    })?;
    let plan = guard(&sender).resume(peer_state.as_ref());
    let mut bulk_wanted = consumer.as_ref().is_some_and(|c| c.take_needs_bulk());
    match plan {
        ResumePlan::Replay(frames) => {
            add(&stats.replayed_batches, frames.len() as u64);
            if !frames.is_empty() {
                info!(%rg, batches = frames.len(), "replaying unacked deltas");
            }
            for f in frames {
                send.write_chunk(f).await.map_err(|e| Close {
                    code: close::SHUTDOWN,
                    reason: format!("replay: {e}"),
                })?;
            }
        }
        ResumePlan::Bulk { reason } => {
            info!(%rg, %epoch, reason, "bulk export");
            bulk_wanted = true;
        }
    }
    let mut keys: Vec<Delta> = Vec::with_capacity(shared.cfg.batch_keys);
    let mut out = BytesMut::new();
    loop {
        if bulk_wanted {
            bulk_wanted = false;
            run_bulk(&shared, &sender, rg, &mut consumer, &mut keys, &mut send).await?;
            continue;
        }
        let Some(c) = consumer.as_mut() else {
            // No delta queue for this RG: only bulks.
            bulk_request.notified().await;
            bulk_wanted = true;
            continue;
        };
        let queue = c.stats().clone();
        tokio::select! {
            biased;
            _ = bulk_request.notified() => bulk_wanted = true,
            _ = queue.bulk_wanted() => {
                queue.take_needs_bulk();
                warn!(%rg, "delta queue overflowed: bulk export");
                bulk_wanted = true;
            }
            n = c.recv_many(&mut keys, shared.cfg.batch_keys) => {
                if n == 0 {
                    return Ok(()); // the dataplane is gone
                }
                send_deltas(&shared, &sender, &stats, &mut keys, &mut out);
                write_out(&mut send, &mut out).await?;
            }
        }
    }
}

fn send_deltas(
    shared: &Shared,
    sender: &Mutex<RgSender>,
    stats: &RgSyncStats,
    keys: &mut Vec<Delta>,
    out: &mut BytesMut,
) {
    if keys.is_empty() {
        return;
    }
    let now = (shared.clock)();
    let info = {
        let table = read(&shared.table);
        guard(sender).build_batch(keys, &table, now, out)
    };
    keys.clear();
    add(&stats.deltas_unreplicated, info.unreplicated);
    add(&stats.deltas_coalesced, info.coalesced);
    if info.deltas > 0 {
        add(&stats.deltas_sent, info.deltas);
        inc(&stats.batches_sent);
        add(&stats.bytes_sent, info.bytes);
        add(&stats.replay_evicted_batches, info.evicted);
    }
}

async fn run_bulk(
    shared: &Shared,
    sender: &Mutex<RgSender>,
    rg: RgId,
    consumer: &mut Option<tokio::sync::MutexGuard<'_, DeltaConsumer>>,
    keys: &mut Vec<Delta>,
    send: &mut SendStream,
) -> Result<(), Close> {
    let stats = shared.stats.rg(rg);
    let mut out = BytesMut::new();
    let (mut cursor, count_hint) = {
        let t = read(&shared.table);
        let hint = t.rg_len(rg) as u64;
        (t.begin_export(rg), hint)
    };
    guard(sender).begin_bulk((shared.clock)(), count_hint, &mut out);
    inc(&stats.bulks_sent);
    loop {
        // Deltas produced meanwhile go first, in stream order, so a delete
        // after a chunk that carried the session is applied after it.
        if let Some(c) = consumer.as_mut() {
            c.try_recv_many(keys, shared.cfg.batch_keys);
            send_deltas(shared, sender, &stats, keys, &mut out);
        }
        let (n, more) = {
            // Shared access: exporting never stalls the workers.
            let table = read(&shared.table);
            guard(sender).bulk_chunk(
                &table,
                &mut cursor,
                shared.cfg.bulk_chunk_sessions,
                (shared.clock)(),
                &mut out,
            )
        };
        add(&stats.bulk_sessions_sent, n);
        write_out(send, &mut out).await?;
        if !more {
            break;
        }
    }
    let count = guard(sender).end_bulk(&mut out);
    write_out(send, &mut out).await?;
    debug!(%rg, sessions = count, "bulk export written");
    Ok(())
}
