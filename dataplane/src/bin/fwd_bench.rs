//! fwd-bench: forwarding rates, each against its baseline in the same run.
//!
//! `cargo run --release -p tandem-dataplane --bin fwd-bench -- --json`
//! prints one `{"name":..,"value":..,"unit":..}` object per line. Every
//! core figure runs the real worker ([`Worker::burst`]: read lock per
//! burst, prefetch, packet core) on frames from memory, in bursts of 32.
//!
//! - `core_pps_per_core`: established, source-NATed UDP flows (1,024) on
//!   one core.
//! - `core_fabric_redirect_pps`: the same frames entering the node that is
//!   not primary: classified, encapsulated for the fabric, decapsulated and
//!   processed by the owner (both nodes' work on one core), and
//!   `fabric_redirect_cost_ratio` = direct / redirected.
//! - `core_pps_fragmented`: 2,988-byte UDP datagrams of 341 established
//!   flows, each in 3 fragments (1,500, 1,500, 28 bytes of IP), fragments
//!   per second through virtual reassembly (the first fragment's session
//!   and NAT for all three, a tracking entry per datagram); baseline in the
//!   same run `core_pps_1500b`, the same flows as unfragmented 1,500-byte
//!   datagrams, and `fragment_cost_ratio` = 1,500-byte pps / fragment pps.
//! - `core_pps_1m_sessions` and `core_pps_1m_sessions_prefetch`: 1,000,000
//!   established sessions (no NAT: one SNAT address has only 64k ports),
//!   random flows, without and with the burst prefetch;
//!   `burst_prefetch_speedup` is their ratio.
//! - `core_pps_1_worker`, `core_pps_2_workers`, `worker_scaling_2`: the
//!   same 1M-session table shared by one, then two worker threads (pinned
//!   to CPUs 0 and 1), each forwarding its half of the flows.
//!   (Forwarding latency while the node applies or exports a bulk is
//!   measured with the real sync in `sync-bench --only latency`.)
//! - `core_instructions_per_created_session` (events off and on, and
//!   `event_instructions_per_created_session`, with `--instructions`):
//!   callgrind over `--count-creates[-events] N` for two N.
//! - `core_instructions_per_packet` (with `--instructions`, needs
//!   valgrind): instructions per established packet of the 1,024-flow
//!   core, counted by callgrind as the difference between two runs of
//!   different lengths (setup cancels out). Wall-clock pps differs up to
//!   2x between machines of this kind; instructions do not.
//! - root only, client -> firewall -> server over veth with 2 queues in
//!   network namespaces: `afxdp_fwd_pps_1_worker` (and mirrored, every
//!   frame copied out of a third port: `afxdp_fwd_pps_mirrored`,
//!   `mirror_forwarding_ratio`), `afxdp_fwd_pps`
//!   (2 workers) vs `kernel_nft_fwd_pps` (Linux forwarding, nftables
//!   conntrack + masquerade), same UDP generator (rates are frames arriving
//!   at the server, loss is against frames the client sent; the generator
//!   is the limit, see `*_offered_pps`); and `tcp_throughput_gbps` for
//!   Tandem (2 workers) vs `kernel_nft_tcp_throughput_gbps` (iperf3 -P 4,
//!   both with TX checksum offload off, which the AF_XDP path needs).

use arc_swap::ArcSwap;
use std::net::UdpSocket;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};
use tandem_dataplane::afxdp::IoStats;
use tandem_dataplane::afxdp::{FabricHook, FabricInbound};
use tandem_dataplane::config::Compiled;
use tandem_dataplane::core::{Arrival, Verdict};
use tandem_dataplane::delta::delta_queues;
use tandem_dataplane::events::{EventHub, EventKind, EventRates};
use tandem_dataplane::fabric_hook::FabricForwarder;
use tandem_dataplane::frames::{L4, build, fragments};
use tandem_dataplane::os;
use tandem_dataplane::packet::Mac;
use tandem_dataplane::session::{
    self, Addr, InterfaceId, Millis, SessionTable, TableConfig, lock, read,
};
use tandem_dataplane::tcp;
use tandem_dataplane::testbed::{
    Firewall, FirewallSpec, Topo, add_reth0_mirror, in_ns, sample_config, sh,
};
use tandem_dataplane::worker::{Shared, Worker};
use tandem_fabric::header::OVERHEAD;
use tandem_fabric::{FabricMap, Link, RgOwner};
use tandem_proto::{Epoch, RgId, RgRole, RoleMap};

const T: InterfaceId = InterfaceId(0);
const U: InterfaceId = InterfaceId(1);
const FAB: u16 = 2;
const VMAC_T: Mac = [0x02, 0, 0x5e, 0, 1, 1];
const VMAC_U: Mac = [0x02, 0, 0x5e, 0, 1, 2];
const CLIENT_MAC: Mac = [0xcc, 0, 0, 0, 0, 1];
const SERVER_MAC: Mac = [0x55, 0, 0, 0, 0, 1];
const NOW: Millis = Millis(10_000);
const BURST: usize = 32;

struct Args {
    json: bool,
    flows: u16,
    seconds: f64,
    skip_io: bool,
    /// Sessions of the big-table core benches (0: skip them).
    big: u32,
    instructions: bool,
    /// Internal: run exactly this many established packets and exit (what
    /// `--instructions` runs under callgrind).
    count_packets: Option<u64>,
    /// `--count-creates N` / `--count-creates-events N`: create N sessions
    /// (events off / on) and exit (what `--instructions` runs under
    /// callgrind).
    count_creates: Option<(u32, bool)>,
    /// `--count-packets` over tracked TCP flows instead of UDP ones.
    tcp: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        json: false,
        flows: 1024,
        seconds: 3.0,
        skip_io: false,
        big: 1_000_000,
        instructions: false,
        count_packets: None,
        count_creates: None,
        tcp: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        match x.as_str() {
            "--json" => a.json = true,
            "--core-only" => a.skip_io = true,
            "--instructions" => a.instructions = true,
            "--tcp" => a.tcp = true,
            flag @ ("--count-creates" | "--count-creates-events") => {
                let n = it
                    .next()
                    .and_then(|v| v.parse::<u32>().ok())
                    .filter(|n| (1..=60_000).contains(n))
                    .ok_or(format!("{flag} needs a number in 1..=60000"))?;
                a.count_creates = Some((n, flag == "--count-creates-events"));
            }
            "--count-packets" => {
                a.count_packets = Some(
                    it.next()
                        .and_then(|v| v.parse().ok())
                        .ok_or("--count-packets needs a number")?,
                );
            }
            "--flows" => {
                a.flows = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&n: &u16| n >= 1)
                    .ok_or("--flows needs a number in 1..=65535")?;
            }
            "--seconds" => {
                a.seconds = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&s: &f64| (0.2..=60.0).contains(&s))
                    .ok_or("--seconds needs a number in 0.2..=60")?;
            }
            "--big-sessions" => {
                a.big = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&n: &u32| n == 0 || (1024..=1_000_000).contains(&n))
                    .ok_or("--big-sessions needs 0 or a number in 1024..=1000000")?;
            }
            "-h" | "--help" => {
                return Err(
                    "usage: fwd-bench [--json] [--core-only] [--instructions] [--flows N] [--seconds S] [--big-sessions N]"
                        .into(),
                );
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(a)
}

fn emit(json: bool, name: &str, value: f64, unit: &str) {
    if json {
        println!("{{\"name\":\"{name}\",\"value\":{value:.3},\"unit\":\"{unit}\"}}");
    } else {
        println!("{name:<36} {value:>14.1} {unit}");
    }
}

fn v4(s: &str) -> Addr {
    s.parse::<std::net::Ipv4Addr>().expect("literal").into()
}

/// A node's shared state for the sample config, primary for RG1 or not.
fn node(primary: bool, snat: bool, table: TableConfig) -> Arc<Shared> {
    let mut compiled = Compiled::new(&sample_config()).expect("sample config");
    compiled.ifaces[0].mac = [0xaa, 0, 0, 0, 0, 1];
    compiled.ifaces[1].mac = [0xaa, 0, 0, 0, 0, 2];
    if !snat {
        compiled.snat.clear();
    }
    let table = session::shared(SessionTable::new(table));
    if primary {
        lock(&table).promote_rg(RgId(1));
    }
    let roles = Arc::new(ArcSwap::from_pointee(RoleMap::from([(
        RgId(1),
        RgRole {
            primary,
            epoch: Epoch(2),
        },
    )])));
    // The queue is never drained here: deltas past it are dropped and
    // counted, as when the sync layer falls behind (bounded by design).
    let (producer, consumers) = delta_queues(&[RgId(1)], 1 << 16);
    std::mem::forget(consumers);
    let shared = Arc::new(Shared::new(Arc::new(compiled), table, roles, producer));
    shared.neighbors.insert(T, v4("10.1.0.10"), CLIENT_MAC);
    shared.neighbors.insert(U, v4("192.0.2.100"), SERVER_MAC);
    shared
}

/// A frame from the client (10.1.0.10) to the server, as the trust side
/// sends it.
fn from_client(l4: &L4) -> Vec<u8> {
    build(
        VMAC_T,
        CLIENT_MAC,
        v4("10.1.0.10"),
        v4("192.0.2.100"),
        64,
        l4,
    )
}

/// A client UDP frame of `payload` bytes.
fn client_udp(sport: u16, dport: u16, payload: usize) -> Vec<u8> {
    from_client(&L4::Udp {
        sport,
        dport,
        payload: vec![0x5a; payload],
    })
}

/// Fragmented datagrams against the same flows' 1,500-byte datagrams.
fn fragment_benches(a: &Args) {
    const FLOWS: u16 = 341;
    let whole: Vec<Vec<u8>> = (0..FLOWS)
        .map(|i| client_udp(20_000 + i, 9000, 1472))
        .collect();
    let mut w = Worker::new(node(true, true, TableConfig::default()));
    create_sessions(&mut w, &whole);
    let base = rate(&mut w, &whole, a.seconds, None);
    emit(a.json, "core_pps_1500b", base, "pps");
    let frags: Vec<Vec<u8>> = (0..FLOWS)
        .flat_map(|i| fragments(&client_udp(20_000 + i, 9000, 2960), 1500, u32::from(i)))
        .collect();
    assert_eq!(frags.len(), 3 * usize::from(FLOWS));
    let mut w = Worker::new(node(true, true, TableConfig::default()));
    create_sessions(&mut w, &frags);
    let fragmented = rate(&mut w, &frags, a.seconds, None);
    // Completed datagrams are forgotten: at most the one the run stopped
    // in is still tracked.
    assert!(w.core().fragments_tracked() <= 1);
    emit(a.json, "core_pps_fragmented", fragmented, "pps");
    emit(a.json, "fragment_cost_ratio", base / fragmented, "ratio");
}

/// A TCP segment of flow `port` (client 10.1.0.10:port <-> server :443,
/// source-NATed to 192.0.2.1 with the port kept).
fn tcp_segment(port: u16, client_side: bool, flags: u8, seq: u32, ack: u32, len: usize) -> Vec<u8> {
    let l4 = L4::Tcp {
        sport: if client_side { port } else { 443 },
        dport: if client_side { 443 } else { port },
        flags,
        seq,
        ack,
        payload: vec![0x5a; len],
    };
    if client_side {
        from_client(&l4)
    } else {
        build(
            VMAC_U,
            SERVER_MAC,
            v4("192.0.2.100"),
            v4("192.0.2.1"),
            64,
            &l4,
        )
    }
}

/// Established TCP flows with window tracking against the same number of
/// UDP flows (`core_pps_per_core`'s frames), same run: the cost of
/// tracking. Each flow's handshake goes through the worker; the measured
/// frames are in-window client data segments (18 bytes, as the UDP
/// frames), every check run in full.
fn tcp_benches(a: &Args, udp: f64) {
    let (mut w, data) = tcp_flows(a.flows);
    let pps = rate(&mut w, &data, a.seconds, None);
    emit(a.json, "core_pps_tcp_tracked", pps, "pps");
    emit(a.json, "tcp_tracking_cost_ratio", udp / pps, "ratio");
}

/// A worker with `flows` established TCP flows (handshakes through it) and
/// one in-window client data segment per flow.
fn tcp_flows(flows: u16) -> (Worker, Vec<Vec<u8>>) {
    const C: u32 = 1_000_000;
    const S: u32 = 5_000_000;
    let mut w = Worker::new(node(true, true, TableConfig::default()));
    let mut b = Bursts::new();
    let ports: Vec<u16> = (0..flows).map(|i| 30_000 + i).collect();
    let steps: [(bool, u8, u32, u32); 3] = [
        (true, tcp::SYN, C, 0),
        (false, tcp::SYN | tcp::ACK, S, C + 1),
        (true, tcp::ACK, C + 1, S + 1),
    ];
    for (from_client, flags, seq, ack) in steps {
        let frames: Vec<_> = ports
            .iter()
            .map(|&p| tcp_segment(p, from_client, flags, seq, ack, 0))
            .collect();
        let at = if from_client { T } else { U };
        for burst in frames.chunks(BURST) {
            assert_eq!(
                b.run(&mut w, burst, Arrival::Wire(at)),
                burst.len(),
                "handshake"
            );
        }
    }
    let data = ports
        .iter()
        .map(|&p| tcp_segment(p, true, tcp::ACK, C + 1, S + 1, 18))
        .collect();
    (w, data)
}

fn flow_frames(flows: u16) -> Vec<Vec<u8>> {
    (0..flows)
        .map(|i| client_udp(10_000 + i, 9000, 18))
        .collect()
}

/// Bursts of frames from memory through a worker: buffers reused, each
/// burst's frames copied in fresh (the wire would bring new bytes).
struct Bursts {
    bufs: Vec<(Vec<u8>, Arrival)>,
    verdicts: Vec<Verdict>,
}

impl Bursts {
    fn new() -> Bursts {
        Bursts {
            bufs: Vec::new(),
            verdicts: Vec::with_capacity(BURST),
        }
    }

    /// One burst of `frames`; the number of Tx verdicts.
    fn run(&mut self, w: &mut Worker, frames: &[Vec<u8>], arrival: Arrival) -> usize {
        self.bufs
            .resize_with(frames.len(), || (vec![0; 2048], arrival));
        for ((b, a), f) in self.bufs.iter_mut().zip(frames) {
            b.resize(f.len(), 0);
            b.copy_from_slice(f);
            *a = arrival;
        }
        w.burst(&mut self.bufs[..frames.len()], NOW, &mut self.verdicts);
        self.verdicts
            .iter()
            .filter(|v| matches!(v, Verdict::Tx { .. }))
            .count()
    }
}

/// Forwards `frames` in bursts of 32, round-robin, for `seconds` (or until
/// `stop`); frames per second. Every frame must be forwarded.
fn rate(w: &mut Worker, frames: &[Vec<u8>], seconds: f64, stop: Option<&AtomicBool>) -> f64 {
    let mut b = Bursts::new();
    let mut done = 0u64;
    let start = Instant::now();
    let limit = Duration::from_secs_f64(seconds);
    'outer: loop {
        for burst in frames.chunks(BURST) {
            let ok = b.run(w, burst, Arrival::Wire(T));
            assert_eq!(ok, burst.len(), "every frame was forwarded");
            done += burst.len() as u64;
            if done.is_multiple_of(4096)
                && (start.elapsed() >= limit || stop.is_some_and(|s| s.load(Ordering::Relaxed)))
            {
                break 'outer;
            }
        }
    }
    done as f64 / start.elapsed().as_secs_f64()
}

/// The security log's cost: established flows with events on (nothing to
/// log, so the same work; `events_on_established_ratio`), and session
/// creation with every create queued (limits off) against creation with
/// logging off, each from an empty table (`core_new_sessions_per_s_*`,
/// `event_cost_ns_per_created_session`). The collector's formatting runs
/// on another thread in the daemon and is not in these figures.
fn event_benches(a: &Args, frames: &[Vec<u8>], off: f64) {
    let (mut w, hub) = with_events(TableConfig::default());
    create_sessions(&mut w, frames);
    let on = rate(&mut w, frames, a.seconds, None);
    emit(a.json, "core_pps_events_on", on, "pps");
    emit(a.json, "events_on_established_ratio", on / off, "ratio");
    drop(hub);
    let new_flows = new_flow_frames(60_000);
    let creation = |events: bool| {
        let mut best = 0f64;
        for _ in 0..3 {
            let start = Instant::now();
            let hub = create_flows(&new_flows, events);
            best = best.max(new_flows.len() as f64 / start.elapsed().as_secs_f64());
            if let Some(h) = &hub {
                let (produced, queued) = h.stats.count(EventKind::SessionCreate);
                assert_eq!((produced, queued), (60_000, 60_000), "every create queued");
            }
        }
        best
    };
    let off = creation(false);
    let on = creation(true);
    emit(
        a.json,
        "core_new_sessions_per_s_events_off",
        off,
        "sessions/s",
    );
    emit(
        a.json,
        "core_new_sessions_per_s_events_on",
        on,
        "sessions/s",
    );
    emit(
        a.json,
        "event_cost_ns_per_created_session",
        (1e9 / on - 1e9 / off).max(0.0),
        "ns",
    );
}

/// A primary worker whose events go to a hub that queues every create
/// (limits set far above any rate here).
fn with_events(table: TableConfig) -> (Worker, Arc<EventHub>) {
    let rates = EventRates {
        session_rate: 100_000_000,
        session_burst: 100_000_000,
        ..EventRates::default()
    };
    let base = node(true, true, table);
    let hub = EventHub::new(rates);
    let shared = Arc::new(Shared {
        events: Some(hub.clone()),
        neighbors: base.neighbors.clone(),
        ..Shared::new(
            base.cfg.clone(),
            base.table.clone(),
            base.roles.clone(),
            base.deltas.clone(),
        )
    });
    (Worker::new(shared), hub)
}

/// `n` (≤ 64,512) first packets of distinct UDP flows.
fn new_flow_frames(n: u32) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| client_udp(1024 + i as u16, 7000, 18))
        .collect()
}

/// Creates one session per frame into an empty table, with events queued
/// (and drained after each burst, as the collector would) or off.
fn create_flows(frames: &[Vec<u8>], events: bool) -> Option<Arc<EventHub>> {
    let table = TableConfig {
        capacity: 1 << 17,
        ..TableConfig::default()
    };
    let (mut w, hub) = if events {
        let (w, hub) = with_events(table);
        (w, Some(hub))
    } else {
        (Worker::new(node(true, true, table)), None)
    };
    let mut b = Bursts::new();
    let mut drained = Vec::new();
    for burst in frames.chunks(BURST) {
        assert_eq!(b.run(&mut w, burst, Arrival::Wire(T)), burst.len());
        if let Some(h) = &hub {
            h.drain(&mut drained);
            drained.clear();
        }
    }
    hub
}

/// Creates one session per frame (first packets through the worker).
fn create_sessions(w: &mut Worker, frames: &[Vec<u8>]) {
    let mut b = Bursts::new();
    for burst in frames.chunks(BURST) {
        assert_eq!(b.run(w, burst, Arrival::Wire(T)), burst.len(), "created");
    }
}

fn fabric_map(peer_owns: bool) -> Arc<ArcSwap<FabricMap>> {
    Arc::new(ArcSwap::from_pointee(FabricMap {
        rgs: [(
            RgId(1),
            RgOwner {
                peer_owns,
                epoch: Epoch(2),
            },
        )]
        .into(),
        links: vec![Link {
            port: FAB,
            up: true,
            local_mac: [0xfa, 0, 0, 0, 0, u8::from(peer_owns)],
            peer_mac: Some([0xfa, 0, 0, 0, 0, u8::from(!peer_owns)]),
        }],
        active: Some(0),
    }))
}

fn core_benches(a: &Args) {
    let frames = flow_frames(a.flows);
    let mut owner = Worker::new(node(true, true, TableConfig::default()));
    create_sessions(&mut owner, &frames);
    let direct = rate(&mut owner, &frames, a.seconds, None);
    emit(a.json, "core_pps_per_core", direct, "pps");
    tcp_benches(a, direct);
    event_benches(a, &frames, direct);

    let mut other = Worker::new(node(false, true, TableConfig::default()));
    let mut to_owner = FabricForwarder::new(fabric_map(true), Arc::default());
    let mut from_peer = FabricForwarder::new(fabric_map(false), Arc::default());
    let mut at_other = Bursts::new();
    let mut at_owner = Bursts::new();
    let mut inner: Vec<Vec<u8>> = (0..BURST).map(|_| Vec::with_capacity(2048)).collect();
    let mut done = 0u64;
    let start = Instant::now();
    let limit = Duration::from_secs_f64(a.seconds);
    'outer: loop {
        for burst in frames.chunks(BURST) {
            at_other.run(&mut other, burst, Arrival::Wire(T));
            // As the worker does it: the prefix written in front of the
            // frame in its buffer, validated and stripped in place at the
            // owner.
            let mut n = 0;
            for (i, v) in at_other.verdicts.iter().enumerate() {
                let Verdict::Fabric { rg } = *v else {
                    panic!("{v:?}: the peer owns RG1");
                };
                let tx = to_owner.to_owner(rg, T).expect("fabric link");
                let frame = &at_other.bufs[i].0;
                let wire = &mut inner[n];
                wire.clear();
                wire.extend_from_slice(&tx.prefix);
                wire.extend_from_slice(frame);
                let Some(FabricInbound::Process { iface }) =
                    from_peer.arrived_on_fabric(wire, InterfaceId(FAB))
                else {
                    panic!("fabric frame refused");
                };
                assert_eq!(iface, T);
                wire.drain(..OVERHEAD);
                n += 1;
            }
            let ok = at_owner.run(&mut owner, &inner[..n], Arrival::FabricIngress(T));
            assert_eq!(ok, n, "every redirected frame was forwarded by the owner");
            done += n as u64;
            if start.elapsed() >= limit {
                break 'outer;
            }
        }
    }
    let redirected = done as f64 / start.elapsed().as_secs_f64();
    emit(a.json, "core_fabric_redirect_pps", redirected, "pps");
    emit(
        a.json,
        "fabric_redirect_cost_ratio",
        direct / redirected,
        "ratio",
    );
}

/// `n` established flows (no NAT) in one table, frames of random flows.
fn big_table(n: u32, extra_capacity: usize) -> (Arc<Shared>, Vec<Vec<u8>>) {
    let shared = node(
        true,
        false,
        TableConfig {
            capacity: n as usize + extra_capacity,
            preallocate: true,
            // A forwarding figure: the table is filled on purpose, no
            // early drop of the (unanswered) flows.
            watermarks: session::Watermarks {
                high_pct: 100,
                low_pct: 100,
                ..session::Watermarks::default()
            },
            ..TableConfig::default()
        },
    );
    // Flow i: client port 1024 + i % 64000 to one of 16 server ports.
    let mut frames: Vec<Vec<u8>> = (0..n)
        .map(|i| client_udp(1024 + (i % 64_000) as u16, 9000 + (i / 64_000) as u16, 18))
        .collect();
    create_sessions(&mut Worker::new(shared.clone()), &frames);
    assert_eq!(
        read(&shared.table).len(),
        n as usize,
        "one session per flow"
    );
    // A fixed shuffle: every run measures the same access pattern.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in (1..frames.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        frames.swap(i, (x % (i as u64 + 1)) as usize);
    }
    (shared, frames)
}

/// `workers` threads, worker i pinned to CPU i and forwarding the i-th
/// share of `frames` for `seconds`; total frames per second.
fn parallel_rate(shared: &Arc<Shared>, frames: &[Vec<u8>], workers: usize, seconds: f64) -> f64 {
    let barrier = Arc::new(Barrier::new(workers + 1));
    let shares: Vec<Vec<Vec<u8>>> = (0..workers)
        .map(|w| frames.iter().skip(w).step_by(workers).cloned().collect())
        .collect();
    let threads: Vec<_> = shares
        .into_iter()
        .enumerate()
        .map(|(i, share)| {
            let (shared, barrier) = (shared.clone(), barrier.clone());
            std::thread::spawn(move || {
                let _ = os::pin_to_cpu(i % os::cpus());
                let mut w = Worker::new(shared);
                barrier.wait();
                rate(&mut w, &share, seconds, None)
            })
        })
        .collect();
    barrier.wait();
    threads
        .into_iter()
        .map(|t| t.join().expect("bench worker"))
        .sum()
}

/// Established forwarding with `n` sessions: prefetch off/on, then one and
/// two workers on one shared table.
fn big_table_benches(a: &Args) {
    let (shared, frames) = big_table(a.big, 0);
    let mut w = Worker::new(shared.clone());
    w.set_prefetch(false);
    let plain = rate(&mut w, &frames, a.seconds, None);
    w.set_prefetch(true);
    let prefetched = rate(&mut w, &frames, a.seconds, None);
    emit(a.json, "core_pps_1m_sessions", plain, "pps");
    emit(a.json, "core_pps_1m_sessions_prefetch", prefetched, "pps");
    emit(
        a.json,
        "burst_prefetch_speedup",
        prefetched / plain,
        "ratio",
    );
    let one = parallel_rate(&shared, &frames, 1, a.seconds);
    let two = parallel_rate(&shared, &frames, 2, a.seconds);
    emit(a.json, "core_pps_1_worker", one, "pps");
    emit(a.json, "core_pps_2_workers", two, "pps");
    emit(a.json, "worker_scaling_2", two / one, "ratio");
}

/// `--count-packets N`: the 1,024-flow core forwarding exactly N packets.
/// With `--tcp`: the 1,024 tracked TCP flows of `core_pps_tcp_tracked`.
fn count_packets(n: u64, tcp: bool) {
    let (mut w, frames) = if tcp {
        tcp_flows(1024)
    } else {
        let frames = flow_frames(1024);
        let mut w = Worker::new(node(true, true, TableConfig::default()));
        create_sessions(&mut w, &frames);
        (w, frames)
    };
    let mut b = Bursts::new();
    let mut done = 0;
    while done < n {
        for burst in frames.chunks(BURST) {
            b.run(&mut w, burst, Arrival::Wire(T));
            done += burst.len() as u64;
            if done >= n {
                break;
            }
        }
    }
}

/// Instructions of this binary run with `--count-packets n` under callgrind.
fn callgrind_instructions(n: u64, tcp: bool) -> Result<u64, String> {
    let n = n.to_string();
    let mut args = vec!["--count-packets", &n];
    if tcp {
        args.push("--tcp");
    }
    callgrind_run(&args)
}

/// Instructions of this binary run with `args` under callgrind.
fn callgrind_run(args: &[&str]) -> Result<u64, String> {
    tandem_dataplane::testbed::callgrind_instructions("fwd-bench", args)
}

fn instruction_bench(a: &Args) -> Result<(), String> {
    // Session creation, events off and on: 10,000 vs 40,000 new flows.
    let (few, many) = (10_000u64, 40_000u64);
    let mut per = [0f64; 2];
    for (i, events) in [false, true].into_iter().enumerate() {
        let mode = if events {
            "--count-creates-events"
        } else {
            "--count-creates"
        };
        let i0 = callgrind_run(&[mode, &few.to_string()])?;
        let i1 = callgrind_run(&[mode, &many.to_string()])?;
        per[i] = i1.saturating_sub(i0) as f64 / (many - few) as f64;
    }
    emit(
        a.json,
        "core_instructions_per_created_session",
        per[0],
        "instructions",
    );
    emit(
        a.json,
        "core_instructions_per_created_session_events_on",
        per[1],
        "instructions",
    );
    emit(
        a.json,
        "event_instructions_per_created_session",
        per[1] - per[0],
        "instructions",
    );
    let (small, large) = (100_000u64, 400_000u64);
    for (tcp, name) in [
        (false, "core_instructions_per_packet"),
        (true, "core_instructions_per_tcp_packet"),
    ] {
        let i0 = callgrind_instructions(small, tcp)?;
        let i1 = callgrind_instructions(large, tcp)?;
        emit(
            a.json,
            name,
            (i1.saturating_sub(i0)) as f64 / (large - small) as f64,
            "instructions",
        );
    }
    Ok(())
}

/// Packet counter of `dev` in namespace `ns` (`rx` or `tx`).
fn link_packets(ns: &str, dev: &str, dir: &str) -> u64 {
    let out = Command::new("ip")
        .args(["-n", ns, "-s", "-j", "link", "show", dev])
        .output()
        .expect("ip -s link");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v[0]["stats64"][dir]["packets"].as_u64().unwrap_or(0)
}

struct Measured {
    pps: f64,
    loss_pct: f64,
    offered_pps: f64,
}

/// The generator: `flows` UDP sockets in the client namespace sending
/// 18-byte datagrams round-robin as fast as they can; the server has a
/// socket bound (so no ICMP errors come back) that nobody reads. After a
/// warm-up (ARP, session creation), frames are counted on the client's
/// and the server's interfaces for `seconds`.
fn measure(topo: &Topo, flows: u16, seconds: f64) -> Measured {
    let [c, _, s] = topo.ns.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let (sink_tx, sink_rx) = std::sync::mpsc::channel();
    let sink_stop = stop.clone();
    let sink = in_ns(&s, move || {
        let sock = UdpSocket::bind("0.0.0.0:9000").expect("bind sink");
        sink_tx.send(()).expect("ready");
        while !sink_stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
        }
        drop(sock);
    });
    sink_rx.recv().expect("sink ready");
    let gen_stop = stop.clone();
    let generator = in_ns(&c, move || {
        let socks: Vec<UdpSocket> = (0..flows)
            .map(|_| {
                let u = UdpSocket::bind("0.0.0.0:0").expect("bind");
                u.connect("192.0.2.100:9000").expect("connect");
                u
            })
            .collect();
        while !gen_stop.load(Ordering::Relaxed) {
            for u in &socks {
                send_batch(u);
            }
        }
    });
    std::thread::sleep(Duration::from_secs(1));
    let (tx0, rx0, t0) = (
        link_packets(&c, "c0", "tx"),
        link_packets(&s, "s0", "rx"),
        Instant::now(),
    );
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let (tx1, rx1, dt) = (
        link_packets(&c, "c0", "tx"),
        link_packets(&s, "s0", "rx"),
        t0.elapsed().as_secs_f64(),
    );
    stop.store(true, Ordering::Relaxed);
    generator.join().expect("generator");
    sink.join().expect("sink");
    let sent = tx1.saturating_sub(tx0) as f64;
    let got = rx1.saturating_sub(rx0) as f64;
    Measured {
        pps: got / dt,
        loss_pct: if sent > 0.0 {
            100.0 * (1.0 - got / sent).max(0.0)
        } else {
            0.0
        },
        offered_pps: sent / dt,
    }
}

/// Sends `BATCH` 18-byte datagrams on the connected socket in one
/// `sendmmsg` call (errors such as a full queue just count as not sent).
fn send_batch(u: &UdpSocket) {
    use std::os::fd::AsRawFd;
    const BATCH: usize = 32;
    let payload = [0x5au8; 18];
    let mut iov = [libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: payload.len(),
    }; BATCH];
    // SAFETY: an all-zero mmsghdr is valid (no name, no control data).
    let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    for (m, v) in msgs.iter_mut().zip(iov.iter_mut()) {
        m.msg_hdr.msg_iov = v;
        m.msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: `msgs` points at BATCH valid headers whose iovecs point at
    // `payload`; all outlive the call. The kernel only reads them.
    unsafe {
        libc::sendmmsg(u.as_raw_fd(), msgs.as_mut_ptr(), BATCH as u32, 0);
    }
}

/// Linux forwarding in the firewall namespace: the same addresses on the
/// interfaces, conntrack with established/related accepted, new flows
/// trust -> untrust accepted and masqueraded.
fn configure_kernel(topo: &Topo) {
    let [c, f, s] = &topo.ns;
    sh(&["ip", "-n", f, "addr", "add", "10.1.0.1/24", "dev", "t0"]);
    sh(&["ip", "-n", f, "addr", "add", "192.0.2.1/24", "dev", "u0"]);
    sh(&[
        "ip",
        "netns",
        "exec",
        f,
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
    ]);
    let rules = "table inet tandem_bench {
  chain forward { type filter hook forward priority 0; policy drop;
    ct state established,related accept
    iifname \"t0\" oifname \"u0\" accept;
  }
  chain postrouting { type nat hook postrouting priority 100;
    oifname \"u0\" masquerade;
  }
}";
    let path = std::env::temp_dir().join(format!("fwd-bench-{}.nft", std::process::id()));
    std::fs::write(&path, rules).expect("write nft rules");
    sh(&[
        "ip",
        "netns",
        "exec",
        f,
        "nft",
        "-f",
        path.to_str().expect("utf-8 path"),
    ]);
    let _ = std::fs::remove_file(&path);
    // The client and server learned the dataplane's virtual MACs.
    sh(&["ip", "-n", c, "neigh", "flush", "all"]);
    sh(&["ip", "-n", s, "neigh", "flush", "all"]);
}

/// iperf3 -P 4 from the client to the server for `seconds`: Gbit/s
/// received.
fn tcp_throughput(topo: &Topo, seconds: f64) -> Result<f64, String> {
    let [c, _, s] = &topo.ns;
    let mut server = Command::new("ip")
        .args(["netns", "exec", s, "iperf3", "-s", "-1", "-p", "5201"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("iperf3 server: {e}"))?;
    std::thread::sleep(Duration::from_millis(300));
    let secs = format!("{}", seconds.ceil().max(1.0) as u64);
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            c,
            "iperf3",
            "-c",
            "192.0.2.100",
            "-p",
            "5201",
            "-P",
            "4",
            "-t",
            &secs,
            "-J",
        ])
        .output()
        .map_err(|e| format!("iperf3 client: {e}"))?;
    let _ = server.kill();
    let _ = server.wait();
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("iperf3 output: {e}"))?;
    if let Some(e) = v["error"].as_str() {
        return Err(format!("iperf3: {e}"));
    }
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .ok_or_else(|| "iperf3 reported no throughput".into())
}

fn afxdp(topo: &Topo, workers: usize) -> Firewall {
    Firewall::start_with(
        &topo.ns[1],
        FirewallSpec {
            workers: Some(workers),
            ..FirewallSpec::sample()
        },
    )
}

/// The same flood with the frames the client sends mirrored out of a
/// third port, every frame and 1 in 10: `afxdp_fwd_pps_mirrored[_1_in_10]`
/// against the run without (`mirror_forwarding_ratio[_1_in_10]`), and what
/// the mirror admitted and dropped (copies drop first when frames run
/// short; what they cost otherwise is CPU, which this 2-CPU VM's
/// generator shares with the worker).
fn mirror_bench(a: &Args, topo: &Topo, flows: u16, plain: f64) {
    for (rate, suffix) in [(1u32, ""), (10, "_1_in_10")] {
        mirror_run(a, topo, flows, plain, rate, suffix);
    }
}

fn mirror_run(a: &Args, topo: &Topo, flows: u16, plain: f64, rate: u32, suffix: &str) {
    let (fw_ns, srv) = (&topo.ns[1], &topo.ns[2]);
    sh(&[
        "ip", "link", "add", "m0", "netns", fw_ns, "type", "veth", "peer", "name", "m1", "netns",
        srv,
    ]);
    for (n, dev) in [(fw_ns.as_str(), "m0"), (srv.as_str(), "m1")] {
        sh(&["ip", "-n", n, "link", "set", dev, "up"]);
    }
    let mut spec = FirewallSpec {
        workers: Some(1),
        ..FirewallSpec::sample()
    };
    add_reth0_mirror(&mut spec.config, rate);
    let fw = Firewall::start_with(fw_ns, spec);
    let m = measure(topo, flows, a.seconds);
    let io = fw.dataplane().health.workers();
    fw.stop();
    let sum = |f: fn(&IoStats) -> &std::sync::atomic::AtomicU64| {
        io.iter()
            .map(|w| f(&w.io).load(Ordering::Relaxed))
            .sum::<u64>() as f64
    };
    let name = |base: &str| format!("{base}{suffix}");
    emit(a.json, &name("afxdp_fwd_pps_mirrored"), m.pps, "pps");
    let ratio = m.pps / plain.max(1.0);
    emit(a.json, &name("mirror_forwarding_ratio"), ratio, "ratio");
    for (k, f) in [
        ("mirror_admitted", sum(|i| &i.mirror_admitted)),
        ("mirror_no_frame", sum(|i| &i.mirror_no_frame)),
        ("mirror_queue_full", sum(|i| &i.mirror_queue_full)),
    ] {
        emit(a.json, &name(k), f, "count");
    }
    sh(&["ip", "-n", fw_ns, "link", "del", "m0"]);
}

fn io_benches(a: &Args) -> Result<(), String> {
    if let Err(why) = os::privileged() {
        return Err(format!(
            "skipping the AF_XDP vs kernel comparison: needs root (network namespaces, XDP): {why}"
        ));
    }
    let has = |cmd: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {cmd}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !has("nft") {
        return Err("skipping the AF_XDP vs kernel comparison: `nft` (apt package nftables) is not installed".into());
    }
    let flows = a.flows.min(64);
    let topo = Topo::with_queues("b", 2);
    let fw = afxdp(&topo, 1);
    let one = measure(&topo, flows, a.seconds);
    let tcp_one = has("iperf3").then(|| tcp_throughput(&topo, a.seconds));
    fw.stop();
    emit(a.json, "afxdp_fwd_pps_1_worker", one.pps, "pps");
    emit(a.json, "afxdp_offered_pps_1_worker", one.offered_pps, "pps");
    if let Some(Ok(t)) = &tcp_one {
        emit(a.json, "tcp_throughput_gbps_1_worker", *t, "Gbit/s");
    }
    mirror_bench(a, &topo, flows, one.pps);
    let fw = afxdp(&topo, 2);
    let x = measure(&topo, flows, a.seconds);
    let tcp = has("iperf3").then(|| tcp_throughput(&topo, a.seconds));
    let stats = fw.stop();
    emit(a.json, "afxdp_fwd_pps", x.pps, "pps");
    emit(a.json, "afxdp_fwd_loss_pct", x.loss_pct, "%");
    emit(a.json, "afxdp_offered_pps", x.offered_pps, "pps");
    emit(
        a.json,
        "afxdp_sessions_created",
        stats.sessions_created.load(Ordering::Relaxed) as f64,
        "count",
    );
    configure_kernel(&topo);
    let k = measure(&topo, flows, a.seconds);
    emit(a.json, "kernel_nft_fwd_pps", k.pps, "pps");
    emit(a.json, "kernel_nft_fwd_loss_pct", k.loss_pct, "%");
    emit(a.json, "kernel_nft_offered_pps", k.offered_pps, "pps");
    emit(
        a.json,
        "afxdp_vs_kernel_nft_ratio",
        x.pps / k.pps.max(1.0),
        "ratio",
    );
    match tcp {
        None => eprintln!(
            "skipping the TCP throughput comparison: iperf3 (apt package iperf3) is not installed"
        ),
        Some(Err(e)) => eprintln!("TCP throughput through Tandem: {e}"),
        Some(Ok(t)) => {
            emit(a.json, "tcp_throughput_gbps", t, "Gbit/s");
            match tcp_throughput(&topo, a.seconds) {
                Ok(kt) => {
                    emit(a.json, "kernel_nft_tcp_throughput_gbps", kt, "Gbit/s");
                    emit(
                        a.json,
                        "tcp_throughput_vs_kernel_ratio",
                        t / kt.max(1e-9),
                        "ratio",
                    );
                    if let Some(Ok(t1)) = tcp_one {
                        emit(
                            a.json,
                            "tcp_throughput_1_worker_vs_kernel_ratio",
                            t1 / kt.max(1e-9),
                            "ratio",
                        );
                    }
                }
                Err(e) => eprintln!("TCP throughput through the kernel: {e}"),
            }
        }
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return std::process::ExitCode::from(2);
        }
    };
    if let Some(n) = a.count_packets {
        count_packets(n, a.tcp);
        return std::process::ExitCode::SUCCESS;
    }
    if let Some((n, events)) = a.count_creates {
        create_flows(&new_flow_frames(n), events);
        return std::process::ExitCode::SUCCESS;
    }
    core_benches(&a);
    fragment_benches(&a);
    if a.instructions
        && let Err(e) = instruction_bench(&a)
    {
        eprintln!("instructions per packet: {e}");
    }
    if a.big > 0 {
        big_table_benches(&a);
    }
    if !a.skip_io
        && let Err(e) = io_benches(&a)
    {
        eprintln!("{e}");
    }
    std::process::ExitCode::SUCCESS
}
