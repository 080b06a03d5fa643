//! `tandem node`: wires the session table, the AF_XDP dataplane, the QUIC
//! sync, the election and the control API together.
//!
//! Threads: the tokio runtime (sync, election, control API, metrics,
//! monitors) and the dataplane (a worker per set of RX queues and its
//! supervisor, `tandem_dataplane::supervisor`). The dataplane's health on
//! each reth member is an election monitor at full weight
//! (`dataplane:<device>`): a node whose dataplane does not run there is
//! ineligible for that reth's RG. Shutdown (SIGTERM/SIGINT): resign every
//! RG (the peer takes over at its next heartbeat, not after the detection
//! timeout), stop the workers, detach XDP.

use crate::config::NodeConfig;
use crate::control;
use crate::fabric::{self, FabricPort};
use crate::logging::{self, SecurityLog};
use crate::views;
use arc_swap::ArcSwap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tandem_cluster::election::driver::{
    ClusterHandle, ClusterKey, DatagramSocket, DriverConfig, FabricPath, spawn,
};
use tandem_cluster::election::{ElectionConfig, MonitorConfig, Path as HbPath, RgConfig};
use tandem_cluster::sync::{SyncConfig, SyncHandle, SyncIo, SyncNode};
use tandem_cluster::tls::{self, TlsIdentity};
use tandem_cluster::witness::{FileStore, WitnessConfig};
use tandem_dataplane::afxdp::FabricHook;
use tandem_dataplane::config::Compiled;
use tandem_dataplane::delta::{DeltaConsumer, DeltaProducer, delta_queues};
use tandem_dataplane::events::EventHub;
use tandem_dataplane::fabric_hook::FabricForwarder;
use tandem_dataplane::os;
use tandem_dataplane::session::{Clock, InterfaceId, SessionTable, SharedTable, monotonic_clock};
use tandem_dataplane::supervisor::{Dataplane, Health, HookFactory, PoolConfig, PortSpec};
use tandem_dataplane::worker::{Neighbors, Shared};
use tandem_dataplane::xdp::{PortMode, XdpCounters};
use tandem_fabric::{FabricMap, FabricStats};
use tandem_proto::{NodeId, RgId, RoleMap};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

/// Everything the control API and metrics read.
pub struct Node {
    pub cfg: NodeConfig,
    pub compiled: Arc<Compiled>,
    pub table: SharedTable,
    pub sync: SyncHandle,
    pub cluster: ClusterHandle,
    pub clock: Clock,
    pub dataplane: Mutex<DataplaneSlot>,
    /// Delta queues' producer side, for every (re)start of the dataplane.
    pub deltas: DeltaProducer,
    /// Next-hop MACs, kept across dataplane restarts.
    pub neighbors: Arc<Neighbors>,
    pub started_ms: u64,
    /// Fabric links in the dataplane (fab0 first), the map the worker
    /// forwards by, and the worker's fabric counters.
    pub fabric_ports: Vec<FabricPort>,
    pub fabric_map: Arc<ArcSwap<FabricMap>>,
    pub fabric_stats: Arc<FabricStats>,
    /// Where workers' security events go (kept across dataplane restarts).
    pub events: Arc<EventHub>,
    pub security_log: Arc<SecurityLog>,
}

/// The dataplane as the daemon holds it: running or not, and why not.
#[derive(Default)]
pub struct DataplaneSlot {
    pub running: Option<Dataplane>,
    /// Health of the running (or last) dataplane.
    pub health: Option<Arc<Health>>,
    /// Why it is not running (start failure, operator stop).
    pub error: Option<String>,
    /// XDP counters read when the last dataplane stopped.
    pub last_xdp: XdpCounters,
}

impl DataplaneSlot {
    pub fn xdp_counters(&self) -> XdpCounters {
        self.running
            .as_ref()
            .map_or(self.last_xdp, Dataplane::xdp_counters)
    }
}

/// Fabric devices become dataplane ports numbered after the data
/// interfaces (fab0 before fab1).
fn fabric_ports(cfg: &NodeConfig, compiled: &Compiled) -> Vec<FabricPort> {
    let first = compiled
        .ifaces
        .iter()
        .map(|i| i.id.0 + 1)
        .max()
        .unwrap_or(0);
    let mut sections: Vec<_> = cfg.fabric.iter().collect();
    sections.sort_by(|a, b| a.name.cmp(&b.name));
    sections
        .into_iter()
        .zip(first..)
        .map(|(f, port)| FabricPort {
            name: f.name.clone(),
            device: f.device.clone(),
            port,
            peer: f.peer.ip(),
        })
        .collect()
}

fn read_key(cfg: &NodeConfig) -> Result<ClusterKey, String> {
    match &cfg.heartbeat.key_file {
        Some(p) => std::fs::read(p)
            .map(|k| ClusterKey::new(&k))
            .map_err(|e| format!("heartbeat key {}: {e}", p.display())),
        None => {
            warn!(
                "no heartbeat.key_file: fabric heartbeats are authenticated with a key derived from the cluster id only"
            );
            Ok(ClusterKey::new(
                format!("tandem-cluster-{}", cfg.node.cluster_id).as_bytes(),
            ))
        }
    }
}

fn election_config(cfg: &NodeConfig) -> ElectionConfig {
    let me = usize::from(cfg.node.id);
    ElectionConfig {
        node: NodeId(cfg.node.id),
        cluster_id: cfg.node.cluster_id,
        heartbeat_interval_ms: cfg.heartbeat.interval_ms,
        heartbeat_threshold: cfg.heartbeat.threshold,
        startup_grace_ms: cfg.heartbeat.startup_grace_ms,
        transfer_timeout_ms: 1000,
        rgs: cfg
            .redundancy_group
            .iter()
            .map(|r| {
                let mut c = RgConfig::new(RgId(r.id), r.priority[me]);
                c.preempt = r.preempt;
                c.hold_down_ms = r.hold_down_ms;
                c.monitors = r
                    .monitor
                    .iter()
                    .map(|m| MonitorConfig::interface(&m.interface, m.weight))
                    .chain(
                        rg_devices(cfg, RgId(r.id))
                            .iter()
                            .map(|d| MonitorConfig::dataplane(d)),
                    )
                    .collect();
                c
            })
            .collect(),
        incarnation: rand::random(),
    }
}

/// The reth member devices of `rg` on this node.
fn rg_devices(cfg: &NodeConfig, rg: RgId) -> Vec<String> {
    cfg.dataplane
        .interfaces
        .iter()
        .filter(|i| i.reth.as_ref().is_some_and(|r| r.rg == rg.0))
        .map(|i| i.device.clone())
        .collect()
}

/// Runs the node until a termination signal.
pub async fn run(cfg: NodeConfig) -> Result<(), String> {
    let compiled = Arc::new(Compiled::new(&cfg.dataplane)?);
    let clock = monotonic_clock();
    let table: SharedTable = tandem_dataplane::session::shared(SessionTable::new(
        cfg.sessions.table(compiled.needs_address_counts()),
    ));
    let (producer, consumers) = delta_queues(&cfg.rgs(), cfg.sessions.delta_queue);
    let (sync, cluster) = start_cluster(&cfg, table.clone(), consumers, clock.clone()).await?;
    tandem_dataplane::session::lock(&table).set_close_log(true);
    let events = EventHub::new(cfg.logging.rates());
    let collector = logging::Collector::new(&cfg.logging, cfg.logging.rates());
    let node = Arc::new(Node {
        compiled: compiled.clone(),
        table: table.clone(),
        sync: sync.clone(),
        cluster: cluster.clone(),
        clock: clock.clone(),
        dataplane: Mutex::new(DataplaneSlot::default()),
        deltas: producer,
        neighbors: Arc::default(),
        started_ms: clock().0,
        fabric_ports: fabric_ports(&cfg, &compiled),
        fabric_map: Arc::default(),
        fabric_stats: Arc::default(),
        events,
        security_log: collector.log.clone(),
        cfg,
    });
    tokio::spawn(logging::run(node.clone(), collector));
    if let Err(e) = start_dataplane(&node) {
        error!(error = %e, "dataplane not started: this node is ineligible for its RGs");
    }
    tokio::spawn(watch_dataplane(node.clone()));
    tokio::spawn(watch_monitors(node.clone()));
    tokio::spawn(fabric::publish(
        node.clone(),
        node.fabric_ports.clone(),
        node.fabric_map.clone(),
        node.cfg.heartbeat.fabric_return_hold_down_ms,
    ));
    let socket = node.cfg.node.socket.clone();
    let listener =
        control::bind(&socket).map_err(|e| format!("control socket {}: {e}", socket.display()))?;
    tokio::spawn(control::serve(listener, node.clone()));
    if let Some(addr) = node.cfg.node.metrics {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => {
                tokio::spawn(views::serve_metrics(l, node.clone()));
            }
            Err(e) => warn!(%addr, error = %e, "metrics endpoint"),
        }
    }
    info!(node = node.cfg.node.id, socket = %socket.display(), "tandem node running");
    wait_for_signal().await;
    info!("shutting down: resigning every RG");
    cluster.resign().await;
    tokio::time::sleep(Duration::from_millis(2 * node.cfg.heartbeat.interval_ms)).await;
    let n = node.clone();
    let _ = tokio::task::spawn_blocking(move || stop_dataplane(&n, "shutting down")).await;
    sync.shutdown();
    let _ = std::fs::remove_file(&socket);
    info!("stopped");
    Ok(())
}

async fn start_cluster(
    cfg: &NodeConfig,
    table: SharedTable,
    consumers: Vec<DeltaConsumer>,
    clock: Clock,
) -> Result<(SyncHandle, ClusterHandle), String> {
    let id = TlsIdentity::load(
        &cfg.tls.ca,
        &cfg.tls.cert,
        &cfg.tls.key,
        &cfg.control.peer_name,
    )
    .map_err(|e| e.to_string())?;
    let idle = Duration::from_millis(cfg.control.idle_timeout_ms);
    let server = tls::server_config(&id, idle).map_err(|e| e.to_string())?;
    let client = tls::client_config(&id, idle).map_err(|e| e.to_string())?;
    let endpoint = quinn::Endpoint::server(server, cfg.control.local)
        .map_err(|e| format!("QUIC endpoint on {}: {e}", cfg.control.local))?;
    let (roles_tx, roles_rx) = watch::channel(Arc::new(RoleMap::new()));
    let (sink_tx, sink_rx) = mpsc::channel(1024);
    let me = NodeId(cfg.node.id);
    let sync = SyncNode::spawn(
        SyncConfig::new(
            me,
            me.peer(),
            cfg.node.cluster_id,
            cfg.control.peer,
            &cfg.control.peer_name,
        ),
        SyncIo {
            endpoint,
            client,
            table: table.clone(),
            consumers,
            roles: roles_rx,
            clock: clock.clone(),
            election_sink: Some(sink_tx),
        },
    );
    let key = read_key(cfg)?;
    let mut fabric = Vec::new();
    for f in &cfg.fabric {
        let sock = tokio::net::UdpSocket::bind(f.local)
            .await
            .map_err(|e| format!("fabric {} heartbeat socket {}: {e}", f.name, f.local))?;
        let path = if f.name == "fab0" {
            HbPath::Fab0
        } else {
            HbPath::Fab1
        };
        fabric.push(FabricPath {
            path,
            socket: Arc::new(sock),
            peer: f.peer,
        });
    }
    let witness = match &cfg.witness {
        None => None,
        Some(w) => {
            // Raft traffic to the witness and the peer: QUIC with this
            // node's certificate, the witness's and the peer's names
            // checked.
            // Idle timeout a third of the lease: a restarted party's dead
            // connection is noticed and redialled before a lease runs out.
            let link_idle = Duration::from_millis(u64::from(w.lease_ms / 3));
            let server = tls::server_config(&id, link_idle).map_err(|e| e.to_string())?;
            let client = tls::client_config(&id, link_idle).map_err(|e| e.to_string())?;
            let ep = quinn::Endpoint::server(server, w.local)
                .map_err(|e| format!("witness link on {}: {e}", w.local))?;
            let link = tandem_cluster::witness::QuicLink::new(
                ep,
                Some(client),
                vec![
                    (w.address, w.witness_name.clone()),
                    (w.peer, cfg.control.peer_name.clone()),
                ],
                vec![cfg.control.peer_name.clone()],
            );
            let sock: Arc<dyn DatagramSocket> = Arc::new(link);
            Some((
                sock,
                WitnessConfig {
                    witness: w.address,
                    peer: w.peer,
                    lease_ms: w.lease_ms,
                    store: Arc::new(FileStore::new(&w.state_file)?),
                },
            ))
        }
    };
    let cluster = spawn(
        DriverConfig {
            election: election_config(cfg),
            fabric,
            key,
            witness,
        },
        sync.clone(),
        table,
        clock,
        roles_tx,
        sink_rx,
    );
    Ok((sync, cluster))
}

/// Starts the dataplane on every data interface and fabric link: AF_XDP
/// workers per RX queue set (`[dataplane] workers`). Errors (a missing
/// device, AF_XDP refused) are recorded in the status; the health watcher
/// keeps the node ineligible until the dataplane runs.
pub fn start_dataplane(node: &Arc<Node>) -> Result<(), String> {
    let mut slot = node.dataplane.lock().expect("lock");
    if slot.running.is_some() {
        return Err("the dataplane is already running".into());
    }
    let fail = |slot: &mut DataplaneSlot, msg: String| {
        slot.error = Some(msg.clone());
        slot.health = None;
        Err(msg)
    };
    let mut compiled = (*node.compiled).clone();
    for i in &mut compiled.ifaces {
        match os::mac(&i.device) {
            Ok(m) => i.mac = m,
            Err(e) => {
                return fail(
                    &mut slot,
                    format!("interface {} ({}): {e}", i.name, i.device),
                );
            }
        }
    }
    let ports: Vec<PortSpec> = compiled
        .ports()
        .map(|i| PortSpec {
            iface: i.id,
            device: i.device.clone(),
            mode: PortMode::Data,
        })
        .chain(node.fabric_ports.iter().map(|f| PortSpec {
            iface: InterfaceId(f.port),
            device: f.device.clone(),
            mode: PortMode::Fabric,
        }))
        .collect();
    let shared = Arc::new(Shared {
        neighbors: node.neighbors.clone(),
        events: Some(node.events.clone()),
        ..Shared::new(
            Arc::new(compiled),
            node.table.clone(),
            node.cluster.role_swap(),
            node.deltas.clone(),
        )
    });
    let (map, stats) = (node.fabric_map.clone(), node.fabric_stats.clone());
    let hooks: HookFactory = Arc::new(move |_| {
        Box::new(FabricForwarder::new(map.clone(), stats.clone())) as Box<dyn FabricHook>
    });
    let dp = Dataplane::start(
        ports,
        PoolConfig {
            workers: node.cfg.dataplane.workers,
            ..PoolConfig::default()
        },
        shared,
        hooks,
        node.clock.clone(),
    );
    slot.health = Some(dp.health.clone());
    slot.error = None;
    slot.running = Some(dp);
    info!("dataplane started");
    Ok(())
}

/// Stops the dataplane (blocking: joins the workers, detaches XDP). The
/// node is ineligible for its RGs until it runs again.
pub fn stop_dataplane(node: &Node, why: &str) -> bool {
    let dp = {
        let mut slot = node.dataplane.lock().expect("lock");
        slot.error = Some(format!("dataplane stopped: {why}"));
        slot.running.take()
    };
    let Some(dp) = dp else {
        return false;
    };
    let last = dp.xdp_counters();
    let health = dp.health.clone();
    drop(dp);
    let mut slot = node.dataplane.lock().expect("lock");
    slot.last_xdp = last;
    slot.health = Some(health);
    info!(reason = why, "dataplane stopped");
    true
}

/// Per reth member device: whether the dataplane serves it, and why not.
pub fn dataplane_ports(node: &Node) -> Vec<(String, bool, String)> {
    let slot = node.dataplane.lock().expect("lock");
    let health = slot.running.as_ref().map(|d| d.health.ports());
    node.compiled
        .ifaces
        .iter()
        .map(|i| {
            let (ok, why) = match (&health, &slot.error) {
                (Some(ports), _) => ports
                    .iter()
                    .find(|p| p.device == i.device)
                    .map_or((false, "starting".into()), |p| (p.ok, p.reason.clone())),
                (None, Some(e)) => (false, e.clone()),
                (None, None) => (false, "not started".into()),
            };
            (i.device.clone(), ok, why)
        })
        .collect()
}

/// Reports the dataplane's health per reth member to the election
/// (monitor `dataplane:<device>`, full weight) every 10 ms, on change; a
/// change is logged with its reason.
async fn watch_dataplane(node: Arc<Node>) {
    let mut last: std::collections::HashMap<String, bool> = std::collections::HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    loop {
        tick.tick().await;
        for (dev, ok, why) in dataplane_ports(&node) {
            if last.insert(dev.clone(), ok) != Some(ok) {
                if ok {
                    info!(device = %dev, "dataplane serves the port");
                } else {
                    warn!(device = %dev, reason = %why, "dataplane does not serve the port");
                }
                node.cluster.monitor(&format!("dataplane:{dev}"), ok).await;
            }
        }
    }
}

/// Polls the link state of every monitored interface (100 ms) and reports
/// changes to the election (which dampens them).
async fn watch_monitors(node: Arc<Node>) {
    let names: Vec<String> = node
        .cfg
        .redundancy_group
        .iter()
        .flat_map(|r| r.monitor.iter().map(|m| m.interface.clone()))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut last: std::collections::HashMap<String, bool> = std::collections::HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        for n in &names {
            let up = link_up(n);
            if last.insert(n.clone(), up) != Some(up) {
                node.cluster.monitor(n, up).await;
            }
        }
    }
}

/// Operational state from sysfs (the daemon runs in its namespace).
pub fn link_up(dev: &str) -> bool {
    std::fs::read_to_string(format!("/sys/class/net/{dev}/operstate")).is_ok_and(|s| {
        let s = s.trim();
        s == "up" || s == "unknown"
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        biased;
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Where a node's files are by default (the lab overrides with its config).
pub fn default_socket() -> PathBuf {
    PathBuf::from("/run/tandem/tandem.sock")
}
