//! cps-bench: new connections per second through the whole HA path.
//!
//! `cargo run --release -p tandem-cluster --bin cps-bench -- --json`
//! prints `{"name":..,"value":..,"unit":..}` lines.
//!
//! **Pipeline, no I/O.** Frames from memory go through the real packet
//! core on two workers pinned to CPUs 0 and 1 (the daemon's default on
//! this machine): per TCP connection SYN, SYN-ACK, ACK, a data segment
//! each way, FIN each way and the last ACK (8 frames, source-NATed, the
//! window tracker checking every one), and per UDP flow a request and its
//! response (3 TCP connections to 1 UDP flow). Each new session is
//! policy-checked, gets a NAT port and is inserted with its companions;
//! its deltas go through the real sync sender over real QUIC with mutual
//! TLS on loopback to the real receiver, which applies them to the peer's
//! table (companions included) and acknowledges them — both nodes, the
//! workers and the sync on the same 2 CPUs.
//! - `new_sessions_per_s`: sessions created on the primary over the time
//!   the workers took (all frames forwarded);
//! - `synced_sessions_per_s`: the same sessions over the time until the
//!   peer held every one, in its final state, and every batch was acked;
//! - `nosync_new_sessions_per_s`: the same frames with sync disabled (no
//!   peer, the deltas discarded at the producer, as on a standalone node);
//!   `ha_cost_ratio` = sync off / sync on (creation), and
//!   `ha_cost_ratio_synced` = sync off / synced;
//! - `sync_lag_p99_ms_at_50pct` / `_at_90pct`: the age of the oldest
//!   unacknowledged batch, sampled every millisecond while the workers are
//!   paced at 50% and 90% of the measured `new_sessions_per_s`, with the
//!   housekeeping expiry running (TIME_WAIT sessions leave after 2 s and
//!   their deletes go to the peer);
//! - `primary_sessions_at_end` / `peer_sessions_at_end`, deltas per
//!   session on the wire, and the coalescing counters of the paced runs
//!   (`closed_before_sync`, `deltas_coalesced`).
//!
//! Every part runs in a process of its own (`--only nosync|sync|paced`).

use arc_swap::ArcSwap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::{Duration, Instant};
use tandem_cluster::sync::{RgRole, RoleMap};
use tandem_cluster::testkit::{Pair, eventually};
use tandem_dataplane::alloc::TandemAlloc;
use tandem_dataplane::config::{Compiled, SnatRule};
use tandem_dataplane::core::{Arrival, Verdict};
use tandem_dataplane::delta::DeltaProducer;
use tandem_dataplane::frames::{self, L4};
use tandem_dataplane::session::{
    InterfaceId, SessionTable, SharedTable, TableConfig, lock, monotonic_clock, read, shared,
};
use tandem_dataplane::testbed::sample_config;
use tandem_dataplane::worker::{self, FrameBurst, Shared, Worker};
use tandem_proto::{Epoch, RgId};

#[global_allocator]
static GLOBAL: TandemAlloc = TandemAlloc;

const RG1: RgId = RgId(1);
const WORKERS: usize = 2;
/// Source hosts (10.1.0.10 + i), each SNATed to its own pool address
/// (192.0.2.10 + i): 64,000 ports each per protocol.
const HOSTS: u32 = 16;
const PORTS_PER_HOST: u32 = 64_000;
const BURST: usize = 32;
const TCP_FRAMES: usize = 8;
const UDP_FRAMES: usize = 2;
/// Of every 4 chunks of 32 connections, 3 are TCP and 1 is UDP.
const CHUNK_CYCLE: u32 = 4;
const STRIDE: usize = 128;
const TCP_PSH: u8 = 0x08;
const CLIENT_MAC: [u8; 6] = [0xcc, 0, 0, 0, 0, 1];
const SERVER_MAC: [u8; 6] = [0x55, 0, 0, 0, 0, 1];
const VMAC_T: [u8; 6] = [0x02, 0, 0x5e, 0, 1, 1];
const VMAC_U: [u8; 6] = [0x02, 0, 0x5e, 0, 1, 2];

struct Args {
    json: bool,
    connections: u32,
    only: Option<String>,
    /// Paced runs: connections per second (total over both workers).
    rate: Option<f64>,
    /// Count the core's instructions per connection under callgrind.
    instructions: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        json: false,
        connections: 1_000_000,
        only: None,
        rate: None,
        instructions: false,
    };
    let max = 1_000_000;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--json" => a.json = true,
            "--instructions" => a.instructions = true,
            "--connections" => {
                a.connections = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|n| (10_000..=max).contains(n))
                    .ok_or(format!("--connections needs 10000..={max}"))?
            }
            "--only" => match it.next().as_deref() {
                Some(part @ ("nosync" | "nosync1" | "sync" | "paced" | "count" | "build")) => {
                    a.only = Some(part.into())
                }
                _ => return Err("--only needs nosync, nosync1, sync, paced, count or build".into()),
            },
            "--rate" => {
                a.rate = Some(
                    it.next()
                        .and_then(|v| v.parse().ok())
                        .filter(|r: &f64| *r >= 1000.0)
                        .ok_or("--rate needs a number >= 1000")?,
                )
            }
            "-h" | "--help" => {
                return Err(
                    "usage: cps-bench [--connections N] [--instructions] [--only nosync|nosync1|sync|paced --rate R] [--json]"
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
        println!("{name:<40} {value:>16.3} {unit}");
    }
}

fn v4(a: [u8; 4]) -> tandem_dataplane::session::Addr {
    std::net::Ipv4Addr::from(a).into()
}

fn client_ip(host: u32) -> [u8; 4] {
    [10, 1, 0, 10 + host as u8]
}

fn pool_ip(host: u32) -> [u8; 4] {
    [192, 0, 2, 10 + host as u8]
}

const SERVER: [u8; 4] = [192, 0, 2, 100];

/// The sample config with one SNAT rule per source host, each to its own
/// pool address (one address has 64k ports; the bench needs ~1M).
fn dataplane_config() -> Compiled {
    let mut cfg = sample_config();
    let template = cfg.snat[0].clone();
    cfg.snat = (0..HOSTS)
        .map(|h| SnatRule {
            name: format!("host{h}"),
            source: vec![
                format!("{}/32", std::net::Ipv4Addr::from(client_ip(h)))
                    .parse()
                    .expect("prefix"),
            ],
            pool: Some(
                format!("{}/32", std::net::Ipv4Addr::from(pool_ip(h)))
                    .parse()
                    .expect("prefix"),
            ),
            ..template.clone()
        })
        .collect();
    let mut compiled = Compiled::new(&cfg).expect("bench config");
    compiled.ifaces[0].mac = [0xaa, 0, 0, 0, 0, 1];
    compiled.ifaces[1].mac = [0xaa, 0, 0, 0, 0, 2];
    compiled
}

fn dataplane(table: SharedTable, deltas: DeltaProducer) -> Arc<Shared> {
    lock(&table).promote_rg(RG1);
    let roles = Arc::new(ArcSwap::from_pointee(RoleMap::from([(
        RG1,
        RgRole {
            primary: true,
            epoch: Epoch(1),
        },
    )])));
    let shared = Arc::new(Shared::new(
        Arc::new(dataplane_config()),
        table,
        roles,
        deltas,
    ));
    for h in 0..HOSTS {
        shared
            .neighbors
            .insert(InterfaceId(0), v4(client_ip(h)), CLIENT_MAC);
    }
    shared
        .neighbors
        .insert(InterfaceId(1), v4(SERVER), SERVER_MAC);
    shared
}

/// One worker's frames, in processing order: chunks of 32 connections,
/// each chunk phase by phase (all its SYNs, then all SYN-ACKs, ...), in
/// fixed 128-byte slots.
struct Script {
    buf: Vec<u8>,
    len: Vec<u16>,
    iface: Vec<u8>,
    /// Per burst: expected source address and first port of a first
    /// packet's translation (None for other phases).
    check: Vec<Option<([u8; 4], u16)>>,
    connections: u32,
}

impl Script {
    fn push(&mut self, frame: &[u8], iface: u8) {
        assert!(frame.len() <= STRIDE, "bench frames fit a slot");
        let at = self.buf.len();
        self.buf.resize(at + STRIDE, 0);
        self.buf[at..at + frame.len()].copy_from_slice(frame);
        self.len.push(frame.len() as u16);
        self.iface.push(iface);
    }

    fn bursts(&self) -> usize {
        self.len.len() / BURST
    }

    /// Builds `n` connections (a multiple of 32) from the hosts from
    /// `first_host` on (see [`hosts_for`]).
    fn build(first_host: u32, n: u32) -> Script {
        let mut s = Script {
            buf: Vec::with_capacity(n as usize * TCP_FRAMES * STRIDE),
            len: Vec::new(),
            iface: Vec::new(),
            check: Vec::new(),
            connections: n,
        };
        // Separate port spaces for TCP and UDP (their mappings differ).
        let (mut tcp_i, mut udp_i) = (0u32, 0u32);
        for chunk in 0..n / BURST as u32 {
            let udp = chunk % CHUNK_CYCLE == CHUNK_CYCLE - 1;
            let idx = if udp { &mut udp_i } else { &mut tcp_i };
            let first = *idx;
            *idx += BURST as u32;
            let ends: Vec<(u32, u16)> = (first..first + BURST as u32)
                .map(|i| {
                    let host = first_host + i / PORTS_PER_HOST;
                    (host, 1024 + (i % PORTS_PER_HOST) as u16)
                })
                .collect();
            let (host0, port0) = ends[0];
            if udp {
                s.udp_chunk(&ends);
            } else {
                s.tcp_chunk(&ends);
            }
            let phases = if udp { UDP_FRAMES } else { TCP_FRAMES };
            s.check.push(Some((pool_ip(host0), port0)));
            s.check.extend(std::iter::repeat_n(None, phases - 1));
        }
        s
    }

    fn tcp_chunk(&mut self, ends: &[(u32, u16)]) {
        const C: u32 = 1000;
        const S: u32 = 5000;
        const SYN: u8 = tandem_dataplane::packet::TCP_SYN;
        const ACK: u8 = tandem_dataplane::packet::TCP_ACK;
        const FIN: u8 = tandem_dataplane::packet::TCP_FIN;
        let data = vec![0x5a; 32];
        // (from client, flags, seq, ack, payload)
        let phases: [(bool, u8, u32, u32, &[u8]); TCP_FRAMES] = [
            (true, SYN, C, 0, &[]),
            (false, SYN | ACK, S, C + 1, &[]),
            (true, ACK, C + 1, S + 1, &[]),
            (true, ACK | TCP_PSH, C + 1, S + 1, &data),
            (false, ACK | TCP_PSH, S + 1, C + 33, &data),
            (true, FIN | ACK, C + 33, S + 33, &[]),
            (false, FIN | ACK, S + 33, C + 34, &[]),
            (true, ACK, C + 34, S + 34, &[]),
        ];
        for (client, flags, seq, ack, payload) in phases {
            for &(host, port) in ends {
                let (sport, dport) = if client { (port, 80) } else { (80, port) };
                let l4 = L4::Tcp {
                    sport,
                    dport,
                    flags,
                    seq,
                    ack,
                    payload: payload.to_vec(),
                };
                self.push_frame(client, host, &l4);
            }
        }
    }

    fn udp_chunk(&mut self, ends: &[(u32, u16)]) {
        for client in [true, false] {
            for &(host, port) in ends {
                let (sport, dport) = if client { (port, 53) } else { (53, port) };
                let l4 = L4::Udp {
                    sport,
                    dport,
                    payload: vec![0x5a; 24],
                };
                self.push_frame(client, host, &l4);
            }
        }
    }

    fn push_frame(&mut self, client: bool, host: u32, l4: &L4) {
        let f = if client {
            frames::build(VMAC_T, CLIENT_MAC, v4(client_ip(host)), v4(SERVER), 64, l4)
        } else {
            // Port preservation: the pool address keeps the client's port.
            frames::build(VMAC_U, SERVER_MAC, v4(SERVER), v4(pool_ip(host)), 64, l4)
        };
        self.push(&f, if client { 0 } else { 1 });
    }
}

/// Burst `b` of a script as the worker sees it.
struct ScriptBurst<'a> {
    buf: &'a mut [u8],
    len: &'a [u16],
    iface: &'a [u8],
}

impl FrameBurst for ScriptBurst<'_> {
    fn len(&self) -> usize {
        self.len.len()
    }

    fn frame(&mut self, i: usize) -> (&mut [u8], Arrival) {
        let at = i * STRIDE;
        (
            &mut self.buf[at..at + self.len[i] as usize],
            Arrival::Wire(InterfaceId(u16::from(self.iface[i]))),
        )
    }
}

#[derive(Default)]
struct WorkerOutcome {
    not_forwarded: u64,
    translation_mismatch: u64,
}

/// Runs `script` through a worker pinned to `cpu`, paced to `rate`
/// connections/s if given.
fn run_worker(
    shared: Arc<Shared>,
    mut script: Script,
    cpu: usize,
    rate: Option<f64>,
    start: Instant,
) -> WorkerOutcome {
    let _ = tandem_dataplane::os::pin_to_cpu(cpu % tandem_dataplane::os::cpus());
    let clock = monotonic_clock();
    let mut w = Worker::new(shared);
    let mut verdicts = Vec::with_capacity(BURST);
    let mut out = WorkerOutcome::default();
    let mut conns = 0u64;
    for b in 0..script.bursts() {
        let range = b * BURST..(b + 1) * BURST;
        let mut burst = ScriptBurst {
            buf: &mut script.buf[range.start * STRIDE..range.end * STRIDE],
            len: &script.len[range.clone()],
            iface: &script.iface[range.clone()],
        };
        w.burst(&mut burst, clock(), &mut verdicts);
        out.not_forwarded += verdicts
            .iter()
            .filter(|v| !matches!(v, Verdict::Tx { .. }))
            .count() as u64;
        if let Some((addr, port0)) = script.check[b] {
            // The first packets left translated to the host's pool
            // address with the client's port kept (what the replies use).
            for (i, v) in verdicts.iter().enumerate() {
                let f = &burst.buf[i * STRIDE..];
                let (src, sport) = (
                    [f[26], f[27], f[28], f[29]],
                    u16::from_be_bytes([f[34], f[35]]),
                );
                if !matches!(v, Verdict::Tx { .. }) || src != addr || sport != port0 + i as u16 {
                    out.translation_mismatch += 1;
                }
            }
            conns += BURST as u64;
            if let Some(r) = rate {
                let due = start + Duration::from_secs_f64(conns as f64 / r);
                if let Some(ahead) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(ahead);
                }
            }
        }
    }
    debug_assert_eq!(conns, u64::from(script.connections));
    out
}

fn table_cfg(n: u32) -> TableConfig {
    TableConfig {
        capacity: (n as usize * 2).max(1 << 20),
        preallocate: true,
        ..TableConfig::default()
    }
}

/// Hosts `n` connections need (TCP, 3 of 4, uses the most ports).
fn hosts_for(n: u32) -> u32 {
    (n * 3 / 4).div_ceil(PORTS_PER_HOST) + 1
}

/// The connections split over `workers` scripts, each from its own hosts.
fn scripts(n: u32, workers: u32) -> Vec<Script> {
    let per = n / workers / BURST as u32 * BURST as u32;
    let hosts = hosts_for(per);
    assert!(
        hosts * workers <= HOSTS,
        "{n} connections need more than {HOSTS} hosts"
    );
    (0..workers)
        .map(|w| Script::build(w * hosts, per))
        .collect()
}

/// Runs the scripts on the workers; returns the seconds they took.
fn forward_all(shared: &Arc<Shared>, scripts: Vec<Script>, rate: Option<f64>) -> f64 {
    let start = Instant::now();
    let per_worker = rate.map(|r| r / scripts.len() as f64);
    let handles: Vec<_> = scripts
        .into_iter()
        .enumerate()
        .map(|(cpu, s)| {
            let shared = shared.clone();
            std::thread::spawn(move || run_worker(shared, s, cpu, per_worker, start))
        })
        .collect();
    let mut total = WorkerOutcome::default();
    for h in handles {
        let o = h.join().expect("worker");
        total.not_forwarded += o.not_forwarded;
        total.translation_mismatch += o.translation_mismatch;
    }
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(total.not_forwarded, 0, "every bench frame is forwarded");
    assert_eq!(
        total.translation_mismatch, 0,
        "first packets keep their port on the host's pool address"
    );
    secs
}

fn check_table(t: &SessionTable, n: usize, who: &str) {
    assert_eq!(t.rg_len(RG1), n, "{who}: one session per connection");
    if let Err(e) = t.verify_invariants() {
        panic!("{who}: table invariants: {e}");
    }
}

fn nosync(args: &Args, workers: u32) {
    let scripts = scripts(args.connections, workers);
    let n: u32 = scripts.iter().map(|s| s.connections).sum();
    let table = shared(SessionTable::new(table_cfg(n)));
    let shared = dataplane(table.clone(), DeltaProducer::default());
    let secs = forward_all(&shared, scripts, None);
    check_table(&read(&table), n as usize, "standalone");
    let rate = f64::from(n) / secs;
    if workers == 1 {
        emit(
            args.json,
            "nosync_new_sessions_per_s_1_worker",
            rate,
            "sessions/s",
        );
    } else {
        emit(args.json, "nosync_new_sessions_per_s", rate, "sessions/s");
        emit(args.json, "connections", f64::from(n), "count");
    }
}

/// What `--instructions` runs under callgrind: the 1-worker scripts
/// built and, unless `build_only`, forwarded (no checks after).
fn count(args: &Args, build_only: bool) {
    let scripts = scripts(args.connections, 1);
    let n: u32 = scripts.iter().map(|s| s.connections).sum();
    let table = shared(SessionTable::new(table_cfg(n)));
    let shared = dataplane(table, DeltaProducer::default());
    if !build_only {
        forward_all(&shared, scripts, None);
    }
}

/// Instructions per connection of the packet core (one worker, sync
/// off): callgrind over 10,016 and 30,016 connections, minus what building
/// their frames costs (counted the same way), over the 20,000 more.
fn instruction_count(json: bool) -> Result<(), String> {
    let (few, many) = ("10016", "30016");
    let run = |part: &str, n: &str| {
        tandem_dataplane::testbed::callgrind_instructions(
            "cps-bench",
            &["--only", part, "--connections", n],
        )
    };
    let forwarded = run("count", many)? as f64 - run("count", few)? as f64;
    let built = run("build", many)? as f64 - run("build", few)? as f64;
    emit(
        json,
        "core_instructions_per_connection",
        (forwarded - built) / 20_000.0,
        "instructions",
    );
    Ok(())
}

/// A primary with its peer on loopback, in sync for RG1 (empty).
async fn pair(n: u32) -> Pair {
    let mut p = Pair::new(
        &[RG1],
        tandem_dataplane::delta::DEFAULT_QUEUE_CAPACITY,
        table_cfg(n),
    );
    p.nodes[0].set_roles(&[(RG1, true, 1)]);
    p.nodes[1].set_roles(&[(RG1, false, 1)]);
    p.start(1);
    p.start(0);
    let rx = p.nodes[1].sync().clone();
    assert!(eventually(Duration::from_secs(30), || rx.rg_in_sync(RG1)).await);
    p
}

fn oldest_unacked_ms(p: &Pair) -> u64 {
    let snap = p.nodes[0].sync().snapshot();
    snap.rgs
        .iter()
        .find(|(rg, _)| *rg == 1)
        .map_or(0, |(_, s)| s.oldest_unacked_ms)
}

/// Waits until the peer holds as many RG1 sessions as the primary and the
/// sender has nothing unacknowledged, twice 10 ms apart with no delta
/// applied in between; returns when that state was first seen.
async fn settled(p: &Pair, timeout: Duration) -> Option<Instant> {
    let applied = p.nodes[1].sync().stats(RG1);
    let deadline = Instant::now() + timeout;
    let mut candidate: Option<(Instant, u64)> = None;
    while Instant::now() < deadline {
        let now = Instant::now();
        let same = read(&p.nodes[0].table).rg_len(RG1) == read(&p.nodes[1].table).rg_len(RG1);
        let idle = p.nodes[0]
            .sync()
            .stats(RG1)
            .replay_depth_batches
            .load(Relaxed)
            == 0;
        let count = applied.deltas_applied.load(Relaxed);
        match candidate {
            Some((at, c)) if same && idle && c == count => return Some(at),
            _ if same && idle => candidate = Some((now, count)),
            _ => candidate = None,
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

/// Sessions whose keys, NAT, owner, interfaces, policy, TCP state or
/// timeout differ between the two tables. Counters and times are left
/// out: a packet that changes no state (the last ACK) queues no delta, so
/// the peer's counters lag by design until the session's next change.
fn differing_sessions(p: &Pair) -> usize {
    let now = monotonic_clock()();
    let sessions = |i: usize| {
        let t = read(&p.nodes[i].table);
        let mut v: Vec<_> = t
            .export_synced(RG1, now)
            .map(|mut s| {
                (s.age_ms, s.idle_ms, s.counters) = (0, 0, Default::default());
                s
            })
            .collect();
        v.sort_by_key(|s| s.key);
        v
    };
    let (a, b) = (sessions(0), sessions(1));
    a.len().abs_diff(b.len()) + a.iter().zip(&b).filter(|(x, y)| x != y).count()
}

async fn sync_run(args: &Args) {
    let scripts = scripts(args.connections, WORKERS as u32);
    let n: u32 = scripts.iter().map(|s| s.connections).sum();
    let p = pair(n).await;
    let shared = dataplane(p.nodes[0].table.clone(), p.nodes[0].producer.clone());
    let start = Instant::now();
    let worker_shared = shared.clone();
    let fwd = tokio::task::spawn_blocking(move || forward_all(&worker_shared, scripts, None));
    let secs = fwd.await.expect("workers");
    let synced_at = settled(&p, Duration::from_secs(300))
        .await
        .expect("peer caught up");
    let synced_secs = synced_at.duration_since(start).as_secs_f64().max(secs);
    check_table(&read(&p.nodes[0].table), n as usize, "primary");
    check_table(&read(&p.nodes[1].table), n as usize, "peer");
    let differ = differing_sessions(&p);
    assert_eq!(differ, 0, "the peer holds every session in its final state");
    let tx = p.nodes[0].sync().stats(RG1);
    emit(
        args.json,
        "new_sessions_per_s",
        f64::from(n) / secs,
        "sessions/s",
    );
    emit(
        args.json,
        "synced_sessions_per_s",
        f64::from(n) / synced_secs,
        "sessions/s",
    );
    emit(
        args.json,
        "primary_sessions_at_end",
        read(&p.nodes[0].table).rg_len(RG1) as f64,
        "count",
    );
    emit(
        args.json,
        "peer_sessions_at_end",
        read(&p.nodes[1].table).rg_len(RG1) as f64,
        "count",
    );
    let deltas = tx.deltas_sent.load(Relaxed) as f64;
    emit(
        args.json,
        "deltas_per_session",
        deltas / f64::from(n),
        "ratio",
    );
    emit(
        args.json,
        "bulks_after_start",
        (tx.bulks_sent.load(Relaxed) - 1) as f64,
        "count",
    );
}

async fn paced(args: &Args, rate: f64) {
    let scripts = scripts(args.connections, WORKERS as u32);
    let n: u32 = scripts.iter().map(|s| s.connections).sum();
    let p = pair(n).await;
    let shared = dataplane(p.nodes[0].table.clone(), p.nodes[0].producer.clone());
    let stop = Arc::new(AtomicBool::new(false));
    // The housekeeping loops of both nodes (the daemon's 100 ms supervisor).
    let expired = Arc::new(AtomicU64::new(0));
    let peer = dataplane(p.nodes[1].table.clone(), DeltaProducer::default());
    let house = {
        let (stop, expired, shared, peer) = (stop.clone(), expired.clone(), shared.clone(), peer);
        std::thread::spawn(move || {
            let clock = monotonic_clock();
            while !stop.load(Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                let n = worker::expire(&shared, clock());
                expired.fetch_add(n as u64, Relaxed);
                let _ = worker::expire(&peer, clock());
            }
        })
    };
    let worker_shared = shared.clone();
    let fwd = tokio::task::spawn_blocking(move || forward_all(&worker_shared, scripts, Some(rate)));
    let mut samples = Vec::new();
    while !fwd.is_finished() {
        samples.push(oldest_unacked_ms(&p));
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let secs = fwd.await.expect("workers");
    stop.store(true, Relaxed);
    house.join().expect("housekeeping");
    samples.sort_unstable();
    let p99 = samples[(samples.len() * 99 / 100).min(samples.len().saturating_sub(1))] as f64;
    let pct = (rate / 1000.0).round();
    let tx = p.nodes[0].sync().stats(RG1);
    let label = |s: &str| format!("{s}_at_{}", args.rate_label());
    emit(args.json, &label("sync_lag_p99_ms"), p99, "ms");
    emit(
        args.json,
        &label("sync_lag_max_ms"),
        *samples.last().unwrap_or(&0) as f64,
        "ms",
    );
    emit(args.json, &label("paced_rate"), rate, "sessions/s");
    emit(
        args.json,
        &label("achieved_rate"),
        f64::from(n) / secs,
        "sessions/s",
    );
    emit(
        args.json,
        &label("expired_during_run"),
        expired.load(Relaxed) as f64,
        "count",
    );
    emit(
        args.json,
        &label("closed_before_sync"),
        read(&p.nodes[0].table).counters().closed_before_sync as f64,
        "count",
    );
    emit(
        args.json,
        &label("deltas_coalesced"),
        tx.deltas_coalesced.load(Relaxed) as f64,
        "count",
    );
    let _ = pct;
}

impl Args {
    fn rate_label(&self) -> String {
        std::env::var("CPS_BENCH_LABEL").unwrap_or_else(|_| "paced".into())
    }
}

/// Runs a part in a fresh process (its tables sized once, as a daemon's)
/// and returns its output lines, echoed.
fn run_part(part: &str, extra: &[String], env: Option<(&str, &str)>) -> Vec<String> {
    let exe = std::env::current_exe().expect("own executable");
    let mut cmd = std::process::Command::new(&exe);
    cmd.args(std::env::args().skip(1))
        .args(["--only", part])
        .args(extra);
    if let Some((k, v)) = env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run a part");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    print!("{text}");
    if !out.status.success() {
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        eprintln!("cps-bench part {part} failed: {}", out.status);
        std::process::exit(1);
    }
    text.lines().map(str::to_string).collect()
}

/// The value of `name` in a part's output (JSON or table form).
fn value_of(lines: &[String], name: &str) -> f64 {
    lines
        .iter()
        .find_map(|l| {
            if let Some(rest) = l.strip_prefix(&format!("{{\"name\":\"{name}\",\"value\":")) {
                rest.split(',').next()?.parse().ok()
            } else {
                let mut it = l.split_whitespace();
                (it.next() == Some(name)).then(|| it.next()?.parse().ok())?
            }
        })
        .unwrap_or_else(|| panic!("{name} missing from a part's output"))
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    match args.only.as_deref() {
        None if args.instructions => {
            if let Err(e) = instruction_count(args.json) {
                eprintln!("cps-bench --instructions: {e}");
                std::process::exit(1);
            }
        }
        None => {
            let one = run_part("nosync1", &[], None);
            let off = run_part("nosync", &[], None);
            emit(
                args.json,
                "nosync_worker_scaling_2",
                value_of(&off, "nosync_new_sessions_per_s")
                    / value_of(&one, "nosync_new_sessions_per_s_1_worker"),
                "ratio",
            );
            let on = run_part("sync", &[], None);
            let (off_rate, on_rate) = (
                value_of(&off, "nosync_new_sessions_per_s"),
                value_of(&on, "new_sessions_per_s"),
            );
            let synced = value_of(&on, "synced_sessions_per_s");
            emit(args.json, "ha_cost_ratio", off_rate / on_rate, "ratio");
            emit(
                args.json,
                "ha_cost_ratio_synced",
                off_rate / synced,
                "ratio",
            );
            for pct in [50, 90] {
                let rate = format!("{:.0}", on_rate * f64::from(pct) / 100.0);
                let label = format!("{pct}pct");
                run_part(
                    "paced",
                    &["--rate".into(), rate],
                    Some(("CPS_BENCH_LABEL", &label)),
                );
            }
        }
        Some("count") => count(&args, false),
        Some("build") => count(&args, true),
        Some("nosync") => nosync(&args, WORKERS as u32),
        Some("nosync1") => nosync(&args, 1),
        Some(part) => {
            let mut rt = tokio::runtime::Builder::new_multi_thread();
            rt.worker_threads(2).enable_all();
            let rt = rt.build().expect("runtime");
            rt.block_on(async {
                match part {
                    "sync" => sync_run(&args).await,
                    _ => paced(&args, args.rate.expect("--rate with --only paced")).await,
                }
            });
        }
    }
}
