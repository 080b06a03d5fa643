//! Two real sync nodes on loopback (real UDP, real QUIC, mutual TLS), for
//! integration tests and `sync-bench`. Node 0 dials, node 1 accepts.

use crate::sync::{RgRole, RoleMap, SyncConfig, SyncHandle, SyncIo, SyncNode};
use crate::tls::{self, GeneratedPki, TlsIdentity};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tandem_dataplane::delta::{DeltaConsumer, DeltaProducer, delta_queues};
use tandem_dataplane::session::{
    Clock, Millis, NewSession, SessionKey, SessionTable, SharedTable, SyncedSession, TableConfig,
    lock, monotonic_clock, shared,
};
use tandem_proto::{Epoch, NodeId, RgId};

/// The role channel a sync node and its election share.
pub type RoleChannel = watch::Sender<Arc<RoleMap>>;
use tokio::sync::watch;

pub const IDLE_TIMEOUT: Duration = Duration::from_secs(3);

pub struct TestNode {
    pub id: NodeId,
    pub table: SharedTable,
    pub producer: DeltaProducer,
    pub roles: RoleChannel,
    pub handle: Option<SyncHandle>,
    pub endpoint: quinn::Endpoint,
    pub clock: Clock,
    /// Delta consumers, handed to the sync node when it starts.
    consumers: Option<Vec<DeltaConsumer>>,
}

impl TestNode {
    pub fn sync(&self) -> &SyncHandle {
        self.handle.as_ref().expect("node started")
    }

    /// Creates a local session and queues its delta, as the dataplane does.
    pub fn create(&self, s: NewSession) -> SessionKey {
        let rg = s.owner_rg;
        let key = {
            let mut t = lock(&self.table);
            let h = t.insert(s, (self.clock)()).expect("test session fits");
            t.get(h).expect("just inserted").key
        };
        self.producer.push(rg, key);
        key
    }

    /// Closes a local session and queues its delete.
    pub fn close(&self, key: &SessionKey) {
        let rg = {
            let mut t = lock(&self.table);
            let h = t.lookup_forward(key).expect("session exists");
            let rg = t.get(h).expect("live").owner_rg;
            t.remove(h, tandem_dataplane::session::RemoveReason::Closed);
            rg
        };
        self.producer.push_delete(rg, *key);
    }

    /// The RG's sessions in peer form, sorted, ages zeroed (they differ by
    /// when each side is read).
    pub fn rg_sessions(&self, rg: RgId) -> Vec<SyncedSession> {
        let now = (self.clock)();
        let t = lock(&self.table);
        let mut v: Vec<SyncedSession> = t
            .export_synced(rg, now)
            .map(|mut s| {
                s.age_ms = 0;
                s.idle_ms = 0;
                s
            })
            .collect();
        v.sort_by_key(|s| s.key);
        v
    }

    pub fn set_roles(&self, roles: &[(RgId, bool, u64)]) {
        let map: RoleMap = roles
            .iter()
            .map(|&(rg, primary, epoch)| {
                (
                    rg,
                    RgRole {
                        primary,
                        epoch: Epoch(epoch),
                    },
                )
            })
            .collect();
        {
            let mut t = lock(&self.table);
            for &(rg, primary, _) in roles {
                if primary {
                    t.promote_rg(rg);
                } else {
                    t.demote_rg(rg);
                }
            }
        }
        self.roles.send_replace(Arc::new(map));
    }
}

pub struct Pair {
    pub pki: GeneratedPki,
    pub nodes: [TestNode; 2],
    pub cfgs: [SyncConfig; 2],
    pub ids: [TlsIdentity; 2],
}

pub const NAMES: [&str; 2] = ["node0", "node1"];

/// A name the cluster CA also certifies but neither node accepts as peer.
pub const INTRUDER: &str = "node7";

/// The witness's certificate name.
pub const WITNESS_NAME: &str = "witness";

/// The witness links' idle timeout: a third of the 1 s lease.
const LEASE_LINK_IDLE: Duration = Duration::from_millis(333);

impl Pair {
    /// Binds two endpoints on 127.0.0.1 with a fresh PKI; nodes are not
    /// started yet. `rgs` get delta queues of `queue` keys on both nodes.
    pub fn new(rgs: &[RgId], queue: usize, table: TableConfig) -> Pair {
        let pki =
            tls::generate_pki("test", &[NAMES[0], NAMES[1], INTRUDER, WITNESS_NAME]).expect("pki");
        let ids = [0, 1]
            .map(|i| tls::identity_from_generated(&pki, NAMES[i], NAMES[1 - i]).expect("identity"));
        let endpoints = [0, 1].map(|i| {
            let sc = tls::server_config(&ids[i], IDLE_TIMEOUT).expect("server config");
            quinn::Endpoint::server(sc, SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).expect("bind")
        });
        let addrs = [0, 1].map(|i| endpoints[i].local_addr().expect("addr"));
        let cfgs = [0, 1].map(|i| {
            let mut c = SyncConfig::new(
                NodeId(i as u8),
                NodeId(1 - i as u8),
                7,
                addrs[1 - i],
                NAMES[1 - i],
            );
            c.redial_min = Duration::from_millis(20);
            c.redial_max = Duration::from_millis(200);
            c
        });
        let mut eps = endpoints.into_iter();
        let nodes = [0u8, 1].map(|i| {
            let (producer, consumers) = delta_queues(rgs, queue);
            TestNode {
                consumers: Some(consumers),
                id: NodeId(i),
                table: shared(SessionTable::new(table.clone())),
                producer,
                roles: watch::channel(Arc::new(RoleMap::new())).0,
                handle: None,
                endpoint: eps.next().expect("two endpoints"),
                clock: monotonic_clock(),
            }
        });
        Pair {
            pki,
            nodes,
            cfgs,
            ids,
        }
    }

    pub fn start(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        let consumers = n.consumers.take().expect("a node starts once");
        let client = tls::client_config(&self.ids[i], IDLE_TIMEOUT).expect("client config");
        n.handle = Some(SyncNode::spawn(
            self.cfgs[i].clone(),
            SyncIo {
                endpoint: n.endpoint.clone(),
                client,
                table: n.table.clone(),
                consumers,
                roles: n.roles.subscribe(),
                clock: n.clock.clone(),
                election_sink: None,
            },
        ));
    }

    /// Waits until both nodes hold identical copies of `rg` (or times out).
    pub async fn converged(&self, rg: RgId, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.nodes[0].rg_sessions(rg) == self.nodes[1].rg_sessions(rg) {
                return true;
            }
            if tokio::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A TCP session `i` of `rg`, SNATed to the RG's pool 198.51.100.<rg>.
pub fn snat_session(rg: RgId, i: u32) -> NewSession {
    use tandem_dataplane::session::*;
    NewSession {
        key: SessionKey::new(
            Ipv4Addr::from(0x0a00_0000 | i),
            1024 + (i % 50_000) as u16,
            Ipv4Addr::new(203, 0, 113, 1 + (i % 200) as u8),
            443,
            proto::TCP,
            ZoneId(1),
        ),
        egress_zone: ZoneId(2),
        snat: Some(SnatRequest {
            addr: Ipv4Addr::from(0xc633_6400 | (u32::from(rg.0) << 4) | (i % 16)).into(),
            ports: 1024..=65535,
        }),
        dnat: None,
        ingress_if: InterfaceId(1),
        egress_if: InterfaceId(2),
        owner_rg: rg,
        policy: PolicyId(1),
        tcp_state: TcpState::Established,
    }
}

/// Time on the table clock, for tests that build sessions by hand.
pub fn now(n: &TestNode) -> Millis {
    (n.clock)()
}

/// Polls `cond` every 10 ms until it holds or `timeout` passes.
pub async fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Two full cluster nodes on loopback: sync (QUIC) plus election with UDP
/// fabric heartbeats (fab0 and fab1 on 127.0.0.1).
pub struct ClusterPair {
    pub pair: Pair,
    pub clusters: [Option<crate::election::driver::ClusterHandle>; 2],
    /// The in-process witness (witness mode); abort it to "partition" it.
    pub witness: Option<tokio::task::JoinHandle<()>>,
}

impl ClusterPair {
    /// Priorities per node for each RG in `rgs`.
    pub async fn start(rgs: &[(RgId, u16, u16)], preempt: bool) -> ClusterPair {
        Self::start_with(rgs, preempt, false).await
    }

    /// As `start`, optionally in witness mode with a witness on loopback.
    pub async fn start_with(rgs: &[(RgId, u16, u16)], preempt: bool, witness: bool) -> ClusterPair {
        use crate::election::driver::{ClusterKey, DriverConfig, FabricPath, spawn};
        use crate::election::{ElectionConfig, Path, RgConfig};
        let ids: Vec<RgId> = rgs.iter().map(|r| r.0).collect();
        let mut pair = Pair::new(&ids, 1 << 16, TableConfig::default());
        // Fabric sockets: two paths per node.
        let mut socks = Vec::new();
        for _ in 0..4 {
            socks.push(Arc::new(
                tokio::net::UdpSocket::bind("127.0.0.1:0")
                    .await
                    .expect("udp"),
            ));
        }
        let addr = |i: usize| socks[i].local_addr().expect("addr");
        let key = ClusterKey::new(b"test key");
        // Witness mode: one mutual-TLS QUIC link per node plus the
        // witness's (it dials no one and accepts the two nodes).
        let mut lease_socks: Vec<Arc<crate::witness::QuicLink>> = Vec::new();
        let mut witness_task = None;
        if witness {
            let lease_ids = [
                pair.ids[0].clone(),
                pair.ids[1].clone(),
                tls::identity_from_generated(&pair.pki, WITNESS_NAME, NAMES[0]).expect("identity"),
            ];
            let endpoints = lease_ids.clone().map(|id| {
                let sc = tls::server_config(&id, LEASE_LINK_IDLE).expect("server config");
                quinn::Endpoint::server(sc, SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
                    .expect("bind")
            });
            let lease_addr = |i: usize| endpoints[i].local_addr().expect("addr");
            let addrs = [lease_addr(0), lease_addr(1), lease_addr(2)];
            for (i, ep) in endpoints.into_iter().enumerate() {
                let link = if i == 2 {
                    crate::witness::QuicLink::new(
                        ep,
                        None,
                        Vec::new(),
                        vec![NAMES[0].into(), NAMES[1].into()],
                    )
                } else {
                    let client =
                        tls::client_config(&lease_ids[i], LEASE_LINK_IDLE).expect("client");
                    crate::witness::QuicLink::new(
                        ep,
                        Some(client),
                        vec![
                            (addrs[2], WITNESS_NAME.into()),
                            (addrs[1 - i], NAMES[1 - i].into()),
                        ],
                        vec![NAMES[1 - i].into()],
                    )
                };
                lease_socks.push(Arc::new(link));
            }
            let w: Arc<dyn crate::election::driver::DatagramSocket> = lease_socks[2].clone();
            let clock = monotonic_clock();
            let voter = crate::witness::OwnershipGroup::start(
                crate::witness::WITNESS_VOTER,
                7,
                1000,
                Arc::new(crate::witness::MemoryStore::default()),
                clock(),
            )
            .expect("a fresh raft member");
            witness_task = Some(tokio::spawn(crate::witness::serve(
                w,
                key.clone(),
                voter,
                clock,
            )));
        }
        let mut clusters = [None, None];
        for n in 0..2 {
            let (sink_tx, sink_rx) = tokio::sync::mpsc::channel(1024);
            let node = &mut pair.nodes[n];
            let client = tls::client_config(&pair.ids[n], IDLE_TIMEOUT).expect("client config");
            let consumers = node.consumers.take().expect("a node starts once");
            let handle = SyncNode::spawn(
                pair.cfgs[n].clone(),
                SyncIo {
                    endpoint: node.endpoint.clone(),
                    client,
                    table: node.table.clone(),
                    consumers,
                    roles: node.roles.subscribe(),
                    clock: node.clock.clone(),
                    election_sink: Some(sink_tx),
                },
            );
            node.handle = Some(handle.clone());
            let election = ElectionConfig {
                node: NodeId(n as u8),
                cluster_id: 7,
                heartbeat_interval_ms: 100,
                heartbeat_threshold: 3,
                startup_grace_ms: 1000,
                transfer_timeout_ms: 1000,
                rgs: rgs
                    .iter()
                    .map(|&(rg, p0, p1)| {
                        let mut c = RgConfig::new(rg, if n == 0 { p0 } else { p1 });
                        c.preempt = preempt;
                        c.hold_down_ms = 500;
                        c
                    })
                    .collect(),
                incarnation: n as u64 + 1,
            };
            let fabric = vec![
                FabricPath {
                    path: Path::Fab0,
                    socket: socks[2 * n].clone(),
                    peer: addr(2 * (1 - n)),
                },
                FabricPath {
                    path: Path::Fab1,
                    socket: socks[2 * n + 1].clone(),
                    peer: addr(2 * (1 - n) + 1),
                },
            ];
            clusters[n] = Some(spawn(
                DriverConfig {
                    election,
                    fabric,
                    key: key.clone(),
                    witness: witness.then(|| {
                        let sock: Arc<dyn crate::election::driver::DatagramSocket> =
                            lease_socks[n].clone();
                        let cfg = crate::witness::WitnessConfig {
                            witness: lease_socks[2].local_addr().expect("addr"),
                            peer: lease_socks[1 - n].local_addr().expect("addr"),
                            lease_ms: 1000,
                            store: Arc::new(crate::witness::MemoryStore::default()),
                        };
                        (sock, cfg)
                    }),
                },
                handle,
                node.table.clone(),
                node.clock.clone(),
                node.roles.clone(),
                sink_rx,
            ));
        }
        ClusterPair {
            pair,
            clusters,
            witness: witness_task,
        }
    }

    pub fn cluster(&self, n: usize) -> &crate::election::driver::ClusterHandle {
        self.clusters[n].as_ref().expect("running")
    }

    pub fn is_primary(&self, n: usize, rg: RgId) -> bool {
        self.cluster(n).roles().get(&rg).is_some_and(|r| r.primary)
    }

    /// Both nodes' sync connections (and so the control stream that
    /// carries failover requests) are up.
    pub fn connected(&self) -> bool {
        self.pair
            .nodes
            .iter()
            .all(|n| n.handle.as_ref().is_some_and(|h| h.is_connected()))
    }
}
