//! A simulated cluster: two nodes (and optionally the witness) running the
//! real sync node and election driver on turmoil hosts, each with a real
//! session table fed by a synthetic traffic generator.

use crate::net::{Links, Resolver, SimDatagram, SimRuntime, SimUdp};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tandem_cluster::election::driver::{
    ClusterHandle, ClusterKey, DatagramSocket, DriverConfig, FabricPath, spawn,
};
use tandem_cluster::election::{ElectionConfig, Path, RgConfig};
use tandem_cluster::sync::{SyncConfig, SyncHandle, SyncIo, SyncNode};
use tandem_cluster::tls::{self, GeneratedPki};
use tandem_cluster::witness::{
    MemoryStore, OwnershipGroup, QuicLink, WITNESS_VOTER, WitnessConfig,
};
use tandem_dataplane::delta::{DeltaProducer, delta_queues};
use tandem_dataplane::session::{
    Clock, InterfaceId, Millis, NewSession, PolicyId, RemoveReason, SessionKey, SessionTable,
    SharedTable, SnatRequest, TableConfig, TcpState, ZoneId, lock, proto, shared,
};
use tandem_proto::{NodeId, RgId};

pub const RGS: [RgId; 2] = [RgId(1), RgId(2)];
pub const QUIC_PORT: u16 = 4785;
pub const FAB_PORTS: [u16; 2] = [4786, 4787];
pub const LEASE_PORT: u16 = 4790;
/// Sessions per RG the generator keeps around.
const TARGET_SESSIONS: usize = 1500;

/// What the scenario runner can see of a running node.
#[derive(Clone)]
pub struct NodeView {
    pub table: SharedTable,
    pub sync: SyncHandle,
    pub cluster: ClusterHandle,
}

pub struct World {
    pub seed: u64,
    pub links: Arc<Links>,
    pub pki: GeneratedPki,
    pub key: ClusterKey,
    pub witness: bool,
    /// Clock offset per node (clock skew scenario).
    pub skew_ms: [u64; 2],
    /// Clock rate error per node, parts per million (drift scenario).
    pub rate_ppm: [i64; 2],
    pub nodes: Mutex<[Option<NodeView>; 2]>,
    /// Starts per node (a restart is a new generation: new incarnation,
    /// fresh table, new session address space).
    pub generation: Mutex<[u64; 2]>,
    /// Each party's disk for its voter record (node0, node1, witness): it
    /// survives the party's crash and restart, as a file would.
    pub disks: [MemoryStore; 3],
    /// See `Scenario::voter_amnesia`.
    pub voter_amnesia: bool,
}

impl World {
    pub fn new(seed: u64, sc: &crate::scenario::Scenario) -> Arc<World> {
        let (witness, skew_ms, rate_ppm, voter_amnesia) =
            (sc.witness, sc.skew_ms, sc.rate_ppm, sc.voter_amnesia);
        Arc::new(World {
            seed,
            links: Arc::default(),
            pki: tls::generate_pki("sim", &["node0", "node1", "witness"]).expect("pki"),
            key: ClusterKey::new(b"simulation key"),
            witness,
            skew_ms,
            rate_ppm,
            nodes: Mutex::new([None, None]),
            generation: Mutex::new([0, 0]),
            disks: Default::default(),
            voter_amnesia,
        })
    }

    /// Party `n`'s raft disk as it starts (sabotage: wiped, so the member
    /// forgets its votes and log).
    fn voter_disk(&self, n: usize) -> Arc<MemoryStore> {
        if self.voter_amnesia {
            self.disks[n].put(None);
        }
        Arc::new(self.disks[n].clone())
    }

    pub fn view(&self, n: usize) -> Option<NodeView> {
        self.nodes.lock().expect("nodes")[n].clone()
    }
}

pub fn host_name(n: u8) -> String {
    if n == 2 {
        "witness".into()
    } else {
        format!("node{n}")
    }
}

fn resolver() -> Resolver {
    Arc::new(|to: SocketAddr| (0u8..3).find(|n| turmoil::lookup(host_name(*n).as_str()) == to.ip()))
}

/// Binds a simulated UDP port. After a crash, turmoil drops the old
/// software's sockets only when the restarted runtime first runs its
/// cancelled tasks, so a restart retries for a few ticks.
async fn bind(port: u16) -> std::io::Result<turmoil::net::UdpSocket> {
    let mut tries = 0;
    loop {
        match turmoil::net::UdpSocket::bind((IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)).await {
            Ok(s) => return Ok(s),
            Err(_) if tries < 100 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

fn addr(n: u8, port: u16) -> SocketAddr {
    SocketAddr::new(turmoil::lookup(host_name(n).as_str()), port)
}

/// A quinn endpoint on simulated UDP (control path) at `port`, seeded from
/// the world's seed, party and `salt` (deterministic handshakes).
async fn sim_endpoint(
    world: &World,
    me: u8,
    port: u16,
    salt: u8,
    server: quinn::ServerConfig,
) -> Result<quinn::Endpoint, Box<dyn std::error::Error>> {
    let seed_byte = (world.seed as u8).wrapping_add(me).wrapping_add(salt);
    let mut ep_cfg = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        &[seed_byte; 64],
    )));
    ep_cfg.rng_seed(Some([seed_byte; 32]));
    let sock = bind(port).await?;
    let udp = SimUdp::new(sock, world.links.clone(), Path::Control, me, resolver());
    Ok(quinn::Endpoint::new_with_abstract_socket(
        ep_cfg,
        Some(server),
        Arc::new(udp),
        Arc::new(SimRuntime),
    )?)
}

/// The witness link of party `me` (0, 1: nodes; 2: witness) on the lease
/// port: QUIC with mutual TLS over simulated UDP on the control path (cut
/// with it), as the daemon and `tandem witness` run it.
async fn witness_link(
    world: &World,
    me: u8,
) -> Result<Arc<dyn DatagramSocket>, Box<dyn std::error::Error>> {
    let peer = if me == 2 {
        host_name(0)
    } else {
        host_name(1 - me)
    };
    let id = tls::identity_from_generated(&world.pki, &host_name(me), &peer)?;
    // A third of the lease: a dead connection (a restarted party) is
    // noticed and redialled before the owner's lease runs out.
    let idle = Duration::from_millis(333);
    let server = tls::server_config(&id, idle)?;
    let endpoint = sim_endpoint(world, me, LEASE_PORT, 100, server).await?;
    let link = if me == 2 {
        QuicLink::new(endpoint, None, Vec::new(), vec![host_name(0), host_name(1)])
    } else {
        let client = tls::client_config(&id, idle)?;
        QuicLink::new(
            endpoint,
            Some(client),
            vec![
                (addr(2, LEASE_PORT), host_name(2)),
                (addr(1 - me, LEASE_PORT), host_name(1 - me)),
            ],
            vec![host_name(1 - me)],
        )
    };
    Ok(Arc::new(link))
}

/// Simulated time (tokio's paused clock) plus this node's skew.
/// A clock running `rate_ppm` fast (or slow, negative) reads durations that
/// much longer (shorter): the lease arithmetic sees the drift. (Tokio's
/// timers, which pace heartbeats, keep the true rate.)
fn sim_clock(skew_ms: u64, rate_ppm: i64) -> Clock {
    let base = tokio::time::Instant::now();
    Arc::new(move || {
        let us = base.elapsed().as_micros() as i128;
        let read = us * (1_000_000 + i128::from(rate_ppm)) / 1_000_000_000;
        Millis(1_000 + skew_ms + read.max(0) as u64)
    })
}

fn election_config(me: u8, incarnation: u64) -> ElectionConfig {
    ElectionConfig {
        node: NodeId(me),
        cluster_id: 1,
        heartbeat_interval_ms: 100,
        heartbeat_threshold: 3,
        startup_grace_ms: 2000,
        transfer_timeout_ms: 1000,
        rgs: RGS
            .iter()
            .map(|&rg| {
                // RG1 prefers node0, RG2 node1: both nodes are primary for
                // something (active/active).
                let preferred = (rg.0 - 1) as u8;
                let mut c = RgConfig::new(rg, if me == preferred { 200 } else { 100 });
                c.hold_down_ms = 1000;
                c
            })
            .collect(),
        incarnation,
    }
}

/// The host body of node `me`: builds its components, registers them, then
/// runs the traffic generator forever.
pub async fn run_node(world: Arc<World>, me: u8) -> Result<(), Box<dyn std::error::Error>> {
    let generation = {
        let mut g = world.generation.lock().expect("generation");
        g[me as usize] += 1;
        g[me as usize]
    };
    let incarnation = world
        .seed
        .wrapping_mul(31)
        .wrapping_add(u64::from(me) * 1000 + generation);
    let clock = sim_clock(world.skew_ms[me as usize], world.rate_ppm[me as usize]);
    let table: SharedTable = shared(SessionTable::new(TableConfig::default()));
    let (producer, consumers) = delta_queues(&RGS, 65_536);
    let id = tls::identity_from_generated(&world.pki, &host_name(me), &host_name(1 - me))?;
    let idle = Duration::from_secs(3);
    let server = tls::server_config(&id, idle)?;
    let client = tls::client_config(&id, idle)?;
    let endpoint = sim_endpoint(&world, me, QUIC_PORT, 0, server).await?;
    let (roles_tx, roles_rx) = tokio::sync::watch::channel(Arc::new(tandem_proto::RoleMap::new()));
    let (sink_tx, sink_rx) = tokio::sync::mpsc::channel(1024);
    let mut cfg = SyncConfig::new(
        NodeId(me),
        NodeId(1 - me),
        1,
        addr(1 - me, QUIC_PORT),
        &host_name(1 - me),
    );
    cfg.incarnation = incarnation;
    cfg.redial_min = Duration::from_millis(100);
    cfg.redial_max = Duration::from_millis(500);
    let sync = SyncNode::spawn(
        cfg,
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
    let mut fabric = Vec::new();
    for (i, path) in [Path::Fab0, Path::Fab1].into_iter().enumerate() {
        let s = bind(FAB_PORTS[i]).await?;
        let socket: Arc<dyn DatagramSocket> = Arc::new(SimDatagram::new(
            s,
            world.links.clone(),
            path,
            me,
            resolver(),
        ));
        fabric.push(FabricPath {
            path,
            socket,
            peer: addr(1 - me, FAB_PORTS[i]),
        });
    }
    let witness = if world.witness {
        let socket = witness_link(&world, me).await?;
        Some((
            socket,
            WitnessConfig {
                witness: addr(2, LEASE_PORT),
                peer: addr(1 - me, LEASE_PORT),
                lease_ms: 1000,
                store: world.voter_disk(me as usize),
            },
        ))
    } else {
        None
    };
    let cluster = spawn(
        DriverConfig {
            election: election_config(me, incarnation),
            fabric,
            key: world.key.clone(),
            witness,
        },
        sync.clone(),
        table.clone(),
        clock.clone(),
        roles_tx,
        sink_rx,
    );
    world.nodes.lock().expect("nodes")[me as usize] = Some(NodeView {
        table: table.clone(),
        sync,
        cluster: cluster.clone(),
    });
    let mut traffic = Generator {
        rng: StdRng::seed_from_u64(world.seed ^ (u64::from(me) << 32) ^ (generation << 40)),
        me,
        generation,
        next: 0,
        table,
        producer,
        clock,
    };
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    loop {
        tick.tick().await;
        let roles = cluster.roles();
        for rg in RGS {
            if roles.get(&rg).is_some_and(|r| r.primary) {
                traffic.step(rg);
            }
        }
    }
}

/// `tandem witness` on its own host.
pub async fn run_witness(world: Arc<World>) -> Result<(), Box<dyn std::error::Error>> {
    let socket = witness_link(&world, 2).await?;
    let clock = sim_clock(0, 0);
    let voter = OwnershipGroup::start(WITNESS_VOTER, 1, 1000, world.voter_disk(2), clock())?;
    tandem_cluster::witness::serve(socket, world.key.clone(), voter, clock).await;
    Ok(())
}

/// Creates, updates and deletes sessions of the RGs this node forwards,
/// as a dataplane would: table first, then the delta.
struct Generator {
    rng: StdRng,
    me: u8,
    generation: u64,
    next: u32,
    table: SharedTable,
    producer: DeltaProducer,
    clock: Clock,
}

impl Generator {
    fn new_session(&mut self, rg: RgId) -> NewSession {
        self.next += 1;
        let n = self.next;
        // Unique per node, start and counter.
        let client = Ipv4Addr::new(
            10,
            self.me * 64 + (self.generation % 64) as u8,
            (n >> 8) as u8,
            n as u8,
        );
        let dnat = self.rng.random_bool(0.3);
        let half_open = self.rng.random_bool(0.2);
        NewSession {
            key: SessionKey::new(
                client,
                1024 + (n % 60_000) as u16,
                Ipv4Addr::new(203, 0, 113, rg.0 as u8),
                443,
                proto::TCP,
                ZoneId(1),
            ),
            egress_zone: ZoneId(2),
            snat: (!dnat).then(|| SnatRequest {
                addr: Ipv4Addr::new(198, 51, 100, rg.0 as u8).into(),
                ports: 1024..=65535,
            }),
            dnat: dnat.then(|| {
                (
                    Ipv4Addr::new(10, 200, rg.0 as u8, (n % 250) as u8 + 1).into(),
                    80,
                )
            }),
            ingress_if: InterfaceId(1),
            egress_if: InterfaceId(2),
            owner_rg: rg,
            policy: PolicyId(1),
            // Most connections arrive established (their handshake seen);
            // a fifth stay half-open, which the peer never gets.
            tcp_state: if half_open {
                TcpState::SynSent
            } else {
                TcpState::Established
            },
        }
    }

    fn step(&mut self, rg: RgId) {
        let now = (self.clock)();
        let creates = self.rng.random_range(1..4);
        let mut changed = Vec::new();
        let mut deleted = Vec::new();
        let fresh: Vec<NewSession> = (0..creates).map(|_| self.new_session(rg)).collect();
        {
            let table = self.table.clone();
            let mut t = lock(&table);
            for s in fresh {
                if let Ok(h) = t.insert(s, now) {
                    changed.push(t.get(h).expect("inserted").key);
                }
            }
            let len = t.rg_len(rg);
            let keys: Vec<SessionKey> = if len > 0 {
                let picks = if len > TARGET_SESSIONS { 6 } else { 2 };
                let all: Vec<SessionKey> = t.export_rg(rg).map(|r| r.key).collect();
                (0..picks)
                    .map(|_| all[self.rng.random_range(0..all.len())])
                    .collect()
            } else {
                Vec::new()
            };
            for (i, k) in keys.into_iter().enumerate() {
                let Some(h) = t.lookup_forward(&k) else {
                    continue;
                };
                if i % 2 == 0 || len > TARGET_SESSIONS {
                    // As the expiry does: a delete only if the peer may
                    // hold it (one never sent coalesces into nothing).
                    if t.remove(h, RemoveReason::Closed)
                        .is_some_and(|r| r.sent_to_peer())
                    {
                        deleted.push(k);
                    }
                    continue;
                }
                t.touch(h, tandem_dataplane::session::Direction::Forward, 100, now);
                t.set_tcp_state(h, TcpState::Established, now);
                changed.push(k);
            }
        }
        for k in changed {
            self.producer.push(rg, k);
        }
        for k in deleted {
            self.producer.push_delete(rg, k);
        }
    }
}
