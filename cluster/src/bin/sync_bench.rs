//! sync-bench: the replication pipeline end to end on loopback.
//!
//! `cargo run --release -p tandem-cluster --bin sync-bench -- --json`
//! prints `{"name":..,"value":..,"unit":..}` lines:
//! - `delta_throughput_per_s`: session upserts (~200-byte class) pushed by
//!   the dataplane side until all are applied in the peer table, over QUIC
//!   with mutual TLS;
//! - `baseline_tcp_delta_throughput_per_s`: the same sender/receiver state
//!   machines and tables over one plain TCP connection, same run;
//! - `bulk_1m_sessions_s`: a 1M-session RG exported, applied and
//!   reconciled (BulkBegin to BulkAck);
//! - `lag_p99_ms`: replication lag (age of the oldest unacknowledged batch)
//!   sampled every millisecond under a steady 100k deltas/s.
//! - `fwd_latency_p99_us_idle`, `..._during_bulk`, `..._during_export`
//!   (with the longest single burst, `fwd_longest_burst_us_*`): a real
//!   dataplane worker on CPU 0 forwards 1M established flows of RG2 from
//!   memory, in bursts of 32, on node1's table; the time to forward one
//!   burst (lock waits included) is sampled alone, then while node1
//!   receives, applies and reconciles a 1M-session bulk of RG1 from node0,
//!   then while node1 exports its 1M RG2 sessions to node0 — the real sync
//!   over QUIC, on CPU 1.
//!
//! Each part runs in a process of its own (`--only deltas|bulk|lag` runs
//! one part in this process, e.g. under `perf record`).

use arc_swap::ArcSwap;
use bytes::BytesMut;
use std::sync::Arc;
use std::sync::atomic::AtomicU8;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};
use tandem_cluster::stats::RgSyncStats;
use tandem_cluster::sync::{RgReceiver, RgSender};
use tandem_cluster::sync::{RgRole, RoleMap};
use tandem_cluster::testkit::{Pair, eventually, snat_session};
use tandem_dataplane::alloc::TandemAlloc;
use tandem_dataplane::config::Compiled;
use tandem_dataplane::core::{Arrival, Verdict};
use tandem_dataplane::delta::delta_queues;
use tandem_dataplane::frames;
use tandem_dataplane::session::{InterfaceId, Millis};
use tandem_dataplane::session::{
    SessionKey, SessionTable, Sliced, TableConfig, lock, monotonic_clock, read, shared,
};
use tandem_dataplane::testbed::sample_config;
use tandem_dataplane::worker::{Shared, Worker};
use tandem_proto::pb::envelope::Msg;
use tandem_proto::{Epoch, FrameDecoder, RgId, encode_frame, pb};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[global_allocator]
static GLOBAL: TandemAlloc = TandemAlloc;

const RG1: RgId = RgId(1);

struct Args {
    json: bool,
    deltas: u32,
    bulk: u32,
    /// Run only this part (`deltas`, `bulk` or `lag`), e.g. to profile it.
    only: Option<String>,
}

impl Args {
    /// Whether this process runs `part` (without `--only` the parts run in
    /// processes of their own).
    fn runs(&self, part: &str) -> bool {
        self.only.as_deref() == Some(part)
    }
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        json: false,
        deltas: 1_000_000,
        bulk: 1_000_000,
        only: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut num = |name: &str| -> Result<u32, String> {
            it.next()
                .and_then(|v| v.parse().ok())
                .filter(|&n| n >= 1000)
                .ok_or(format!("{name} needs a number >= 1000"))
        };
        match arg.as_str() {
            "--json" => a.json = true,
            "--deltas" => a.deltas = num("--deltas")?,
            "--bulk" => a.bulk = num("--bulk")?,
            "--only" => match it.next().as_deref() {
                Some(part @ ("deltas" | "bulk" | "lag" | "latency")) => {
                    a.only = Some(part.to_string())
                }
                _ => return Err("--only needs deltas, bulk, lag or latency".into()),
            },
            "-h" | "--help" => {
                return Err(
                    "usage: sync-bench [--deltas N] [--bulk N] [--only deltas|bulk|lag|latency] [--json]"
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

fn table_cfg(n: u32) -> TableConfig {
    TableConfig {
        capacity: (n as usize + 1024).max(1 << 20),
        // As the daemon runs them (`[sessions] preallocate`): slab and
        // indexes sized and resident before any traffic.
        preallocate: true,
        ..TableConfig::default()
    }
}

/// Fills `table` with `n` local RG1 sessions and returns their keys.
fn fill(table: &mut SessionTable, n: u32) -> Vec<SessionKey> {
    table.promote_rg(RG1);
    let now = monotonic_clock()();
    (0..n)
        .map(|i| {
            let h = table
                .insert(snat_session(RG1, i), now)
                .expect("bench session fits");
            table.get(h).expect("live").key
        })
        .collect()
}

async fn quic_delta_throughput(n: u32) -> f64 {
    let mut p = Pair::new(&[RG1], n as usize + 1, table_cfg(n));
    p.nodes[0].set_roles(&[(RG1, true, 1)]);
    p.nodes[1].set_roles(&[(RG1, false, 1)]);
    // Connect while the RG is empty, then create the sessions without
    // queuing deltas: the peer learns them only from the deltas measured.
    p.start(1);
    p.start(0);
    let rx = p.nodes[1].sync().clone();
    assert!(eventually(Duration::from_secs(30), || rx.rg_in_sync(RG1)).await);
    let snapshot = fill(&mut lock(&p.nodes[0].table), n);
    let applied = p.nodes[1].sync().stats(RG1);
    let start = Instant::now();
    let producer = p.nodes[0].producer.clone();
    let push = std::thread::spawn(move || {
        for k in snapshot {
            while !producer.push(RG1, k) {
                std::thread::yield_now();
            }
        }
    });
    let done = eventually(Duration::from_secs(120), || {
        applied.deltas_applied.load(Relaxed) >= u64::from(n)
    })
    .await;
    let secs = start.elapsed().as_secs_f64();
    push.join().expect("producer");
    assert!(
        done,
        "deltas applied: {}",
        applied.deltas_applied.load(Relaxed)
    );
    assert_eq!(
        p.nodes[0].sync().stats(RG1).bulks_sent.load(Relaxed),
        1,
        "no overflow bulk"
    );
    f64::from(n) / secs
}

/// The same pipeline (RgSender -> frames -> RgReceiver -> acks) over one
/// plain TCP connection.
async fn tcp_delta_throughput(n: u32) -> f64 {
    let mut primary = SessionTable::new(table_cfg(n));
    let keys = fill(&mut primary, n);
    let primary = shared(primary);
    let secondary = shared(SessionTable::new(table_cfg(n)));
    let (producer, mut consumers) = delta_queues(&[RG1], n as usize + 1);
    let mut consumer = consumers.pop().expect("one queue");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stats = Arc::new(RgSyncStats::default());
    let rx_stats = stats.clone();
    let sec = secondary.clone();
    let clock = monotonic_clock();
    let rx_clock = clock.clone();
    let receiver = tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.expect("accept");
        sock.set_nodelay(true).expect("nodelay");
        let mut rx = RgReceiver::new(RG1, rx_stats);
        rx.on_connect(1);
        let mut dec = FrameDecoder::default();
        let mut buf = vec![0u8; 256 * 1024];
        let mut out = BytesMut::new();
        loop {
            let r = sock.read(&mut buf).await.expect("read");
            if r == 0 {
                return;
            }
            dec.push(&buf[..r]);
            out.clear();
            while let Some(env) = dec.next_frame().expect("frame") {
                let msg = env.msg.expect("message");
                let replies = rx
                    .on_message(&msg, &mut Sliced(&sec), false, rx_clock())
                    .expect("valid");
                for m in replies {
                    encode_frame(&pb::Envelope { msg: Some(m) }, &mut out);
                }
            }
            sock.write_all(&out).await.expect("ack write");
        }
    });
    let sock = tokio::net::TcpStream::connect(addr).await.expect("connect");
    sock.set_nodelay(true).expect("nodelay");
    let (mut rd, mut wr) = sock.into_split();
    let sender = Arc::new(std::sync::Mutex::new(RgSender::new(
        RG1,
        Epoch(1),
        1,
        32 << 20,
    )));
    let acker = sender.clone();
    tokio::spawn(async move {
        let mut dec = FrameDecoder::default();
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(r) = rd.read(&mut buf).await {
            if r == 0 {
                return;
            }
            dec.push(&buf[..r]);
            while let Ok(Some(env)) = dec.next_frame() {
                if let Some(Msg::Ack(a)) = env.msg {
                    acker.lock().expect("sender").on_ack(Epoch(a.epoch), a.seq);
                }
            }
        }
    });
    let mut out = BytesMut::new();
    sender
        .lock()
        .expect("sender")
        .begin_bulk(clock(), 0, &mut out);
    sender.lock().expect("sender").end_bulk(&mut out);
    wr.write_all(&out).await.expect("write");
    let start = Instant::now();
    let push = std::thread::spawn(move || {
        for k in keys {
            while !producer.push(RG1, k) {
                std::thread::yield_now();
            }
        }
    });
    let mut batch = Vec::with_capacity(256);
    let mut sent = 0u64;
    while sent < u64::from(n) {
        consumer.recv_many(&mut batch, 256).await;
        out.clear();
        let info = {
            let t = read(&primary);
            sender
                .lock()
                .expect("sender")
                .build_batch(&batch, &t, clock(), &mut out)
        };
        batch.clear();
        sent += info.deltas;
        wr.write_all(&out).await.expect("write");
    }
    let done = eventually(Duration::from_secs(120), || {
        stats.deltas_applied.load(Relaxed) >= u64::from(n)
    })
    .await;
    let secs = start.elapsed().as_secs_f64();
    push.join().expect("producer");
    assert!(done);
    drop(wr);
    receiver.abort();
    f64::from(n) / secs
}

async fn bulk_seconds(n: u32) -> f64 {
    let mut p = Pair::new(&[RG1], 1024, table_cfg(n));
    p.nodes[0].set_roles(&[(RG1, true, 1)]);
    p.nodes[1].set_roles(&[(RG1, false, 1)]);
    fill(&mut lock(&p.nodes[0].table), n);
    p.start(1);
    p.start(0);
    let tx = p.nodes[0].sync().stats(RG1);
    assert!(
        eventually(Duration::from_secs(120), || tx.bulks_acked.load(Relaxed)
            == 1)
        .await
    );
    assert_eq!(lock(&p.nodes[1].table).rg_len(RG1), n as usize);
    tx.last_bulk_ms.load(Relaxed) as f64 / 1e3
}

async fn lag_p99_ms(rate: u32, secs: u32) -> (f64, f64) {
    let n = rate * secs;
    let mut p = Pair::new(&[RG1], 1 << 20, table_cfg(n));
    p.nodes[0].set_roles(&[(RG1, true, 1)]);
    p.nodes[1].set_roles(&[(RG1, false, 1)]);
    let keys = fill(&mut lock(&p.nodes[0].table), n);
    p.start(1);
    p.start(0);
    let tx = p.nodes[0].sync().stats(RG1);
    assert!(
        eventually(Duration::from_secs(60), || tx.bulks_acked.load(Relaxed)
            == 1)
        .await
    );
    let producer = p.nodes[0].producer.clone();
    let push = std::thread::spawn(move || {
        // 1 ms ticks of rate/1000 keys each.
        let per_tick = (rate / 1000) as usize;
        let start = Instant::now();
        for (tick, chunk) in keys.chunks(per_tick).enumerate() {
            let due = start + Duration::from_millis(tick as u64);
            if let Some(d) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(d);
            }
            for k in chunk {
                producer.push(RG1, *k);
            }
        }
    });
    let handle = p.nodes[0].sync().clone();
    let mut samples = Vec::new();
    while !push.is_finished() {
        let snap = handle.snapshot();
        samples.push(
            snap.rgs
                .iter()
                .find(|(rg, _)| *rg == 1)
                .map_or(0, |(_, s)| s.oldest_unacked_ms),
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    push.join().expect("producer");
    samples.sort_unstable();
    let p99 = samples[(samples.len() * 99 / 100).min(samples.len() - 1)] as f64;
    let max = *samples.last().unwrap_or(&0) as f64;
    (p99, max)
}

const RG2: RgId = RgId(2);

/// What the latency worker is measuring now.
const PHASE_IDLE: u8 = 0;
const PHASE_BULK: u8 = 1;
const PHASE_EXPORT: u8 = 2;
const PHASE_OTHER: u8 = 3;
const PHASE_STOP: u8 = 4;

/// node1's dataplane: the sample config with both reths in RG2, no NAT,
/// primary for RG2, over node1's table.
fn rg2_dataplane(table: tandem_dataplane::session::SharedTable) -> Arc<Shared> {
    let mut cfg = sample_config();
    for i in &mut cfg.interfaces {
        i.reth.as_mut().expect("reth").rg = 2;
    }
    let mut compiled = Compiled::new(&cfg).expect("sample config");
    compiled.ifaces[0].mac = [0xaa, 0, 0, 0, 0, 1];
    compiled.ifaces[1].mac = [0xaa, 0, 0, 0, 0, 2];
    compiled.snat.clear();
    lock(&table).promote_rg(RG2);
    let (deltas, consumers) = delta_queues(&[RG2], 1 << 16);
    // The worker's own delta queue is never drained (bounded; drops are
    // counted): node1 syncs RG2 from its table in the export phase.
    std::mem::forget(consumers);
    let roles = Arc::new(ArcSwap::from_pointee(RoleMap::from([(
        RG2,
        RgRole {
            primary: true,
            epoch: Epoch(1),
        },
    )])));
    let shared = Arc::new(Shared::new(Arc::new(compiled), table, roles, deltas));
    let ip = |s: &str| s.parse::<std::net::Ipv4Addr>().expect("literal").into();
    shared
        .neighbors
        .insert(InterfaceId(0), ip("10.1.0.10"), [0xcc, 0, 0, 0, 0, 1]);
    shared
        .neighbors
        .insert(InterfaceId(1), ip("192.0.2.100"), [0x55, 0, 0, 0, 0, 1]);
    shared
}

/// Frames of `n` UDP flows from the client, shuffled (a fixed order).
fn rg2_frames(n: u32) -> Vec<Vec<u8>> {
    let ip = |s: &str| s.parse::<std::net::Ipv4Addr>().expect("literal").into();
    let mut frames: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            frames::build(
                [0x02, 0, 0x5e, 0, 1, 1],
                [0xcc, 0, 0, 0, 0, 1],
                ip("10.1.0.10"),
                ip("192.0.2.100"),
                64,
                &frames::L4::Udp {
                    sport: 1024 + (i % 64_000) as u16,
                    dport: 9000 + (i / 64_000) as u16,
                    payload: vec![0x5a; 18],
                },
            )
        })
        .collect();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in (1..frames.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        frames.swap(i, (x % (i as u64 + 1)) as usize);
    }
    frames
}

/// Forwards `frames` in bursts of 32 on CPU 0 until the phase is STOP;
/// returns (phase, ns) per burst.
fn latency_worker(
    shared: Arc<Shared>,
    frames: Arc<Vec<Vec<u8>>>,
    phase: Arc<AtomicU8>,
) -> std::thread::JoinHandle<Vec<(u8, u64)>> {
    std::thread::spawn(move || {
        let _ = tandem_dataplane::os::pin_to_cpu(0);
        let mut w = Worker::new(shared);
        let mut bufs: Vec<(Vec<u8>, Arrival)> = Vec::new();
        let mut verdicts = Vec::with_capacity(32);
        let mut out = Vec::with_capacity(1 << 20);
        loop {
            for burst in frames.chunks(32) {
                let p = phase.load(Relaxed);
                if p == PHASE_STOP {
                    return out;
                }
                bufs.clear();
                bufs.extend(
                    burst
                        .iter()
                        .map(|f| (f.clone(), Arrival::Wire(InterfaceId(0)))),
                );
                let t = Instant::now();
                w.burst(&mut bufs[..], Millis(10_000), &mut verdicts);
                out.push((p, t.elapsed().as_nanos() as u64));
                assert!(
                    verdicts.iter().all(|v| matches!(v, Verdict::Tx { .. })),
                    "established RG2 flows are forwarded: {verdicts:?}"
                );
            }
        }
    })
}

fn p99_max_us(samples: &[(u8, u64)], phase: u8) -> (f64, f64, usize) {
    let mut v: Vec<u64> = samples
        .iter()
        .filter(|(p, _)| *p == phase)
        .map(|(_, ns)| *ns)
        .collect();
    if v.is_empty() {
        return (0.0, 0.0, 0);
    }
    v.sort_unstable();
    let p99 = v[(v.len() * 99 / 100).min(v.len() - 1)] as f64 / 1e3;
    (p99, *v.last().unwrap_or(&0) as f64 / 1e3, v.len())
}

async fn forwarding_latency(n: u32, json: bool) {
    let mut p = Pair::new(&[RG1, RG2], 1 << 16, table_cfg(2 * n));
    fill(&mut lock(&p.nodes[0].table), n);
    let shared = rg2_dataplane(p.nodes[1].table.clone());
    let frames = Arc::new(rg2_frames(n));
    {
        // Node1's RG2 sessions: first packets through the worker.
        let mut w = Worker::new(shared.clone());
        let mut verdicts = Vec::new();
        for burst in frames.chunks(32) {
            let mut bufs: Vec<(Vec<u8>, Arrival)> = burst
                .iter()
                .map(|f| (f.clone(), Arrival::Wire(InterfaceId(0))))
                .collect();
            w.burst(&mut bufs[..], Millis(10_000), &mut verdicts);
        }
    }
    assert_eq!(read(&shared.table).rg_len(RG2), n as usize);
    let phase = Arc::new(AtomicU8::new(PHASE_OTHER));
    let worker = latency_worker(shared, frames, phase.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    phase.store(PHASE_IDLE, Relaxed);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // node0 primary for RG1 exports its 1M sessions; node1 receives them.
    phase.store(PHASE_BULK, Relaxed);
    p.nodes[0].set_roles(&[(RG1, true, 1)]);
    p.nodes[1].set_roles(&[(RG1, false, 1)]);
    p.start(1);
    p.start(0);
    let t = Instant::now();
    let rx = p.nodes[1].sync().stats(RG1);
    assert!(
        eventually(Duration::from_secs(120), || rx.bulks_received.load(Relaxed)
            == 1)
        .await,
        "bulk received"
    );
    let bulk_s = t.elapsed().as_secs_f64();
    phase.store(PHASE_OTHER, Relaxed);
    assert_eq!(read(&p.nodes[1].table).rg_len(RG1), n as usize);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // node1 becomes primary for RG2 (it already forwards it): it exports
    // its 1M sessions to node0.
    phase.store(PHASE_EXPORT, Relaxed);
    let t = Instant::now();
    p.nodes[0].set_roles(&[(RG1, true, 1), (RG2, false, 1)]);
    p.nodes[1].set_roles(&[(RG1, false, 1), (RG2, true, 1)]);
    let tx = p.nodes[1].sync().stats(RG2);
    assert!(
        eventually(Duration::from_secs(120), || tx.bulks_acked.load(Relaxed)
            == 1)
        .await,
        "RG2 exported"
    );
    let export_s = t.elapsed().as_secs_f64();
    phase.store(PHASE_STOP, Relaxed);
    let samples = worker.join().expect("latency worker");
    let (idle, idle_max, _) = p99_max_us(&samples, PHASE_IDLE);
    let (bulk, bulk_max, bulk_n) = p99_max_us(&samples, PHASE_BULK);
    let (export, export_max, export_n) = p99_max_us(&samples, PHASE_EXPORT);
    emit(json, "fwd_latency_p99_us_idle", idle, "us");
    emit(json, "fwd_longest_burst_us_idle", idle_max, "us");
    emit(json, "fwd_latency_p99_us_during_bulk", bulk, "us");
    emit(json, "fwd_longest_burst_us_during_bulk", bulk_max, "us");
    emit(
        json,
        "fwd_latency_during_bulk_vs_idle",
        bulk / idle,
        "ratio",
    );
    emit(json, "fwd_bursts_during_bulk", bulk_n as f64, "count");
    emit(json, "bulk_1m_received_while_forwarding_s", bulk_s, "s");
    emit(json, "fwd_latency_p99_us_during_export", export, "us");
    emit(json, "fwd_longest_burst_us_during_export", export_max, "us");
    emit(
        json,
        "fwd_latency_during_export_vs_idle",
        export / idle,
        "ratio",
    );
    emit(json, "fwd_bursts_during_export", export_n as f64, "count");
    emit(json, "export_1m_while_forwarding_s", export_s, "s");
}

/// Runs each part in a fresh process, as a daemon starts: within one
/// process the ~1 GiB of tables an earlier part freed comes back to the
/// next part's allocations as already-faulted small pages, which made the
/// bulk 20-40% slower than it is for a daemon that sizes its table once.
fn run_parts_in_own_processes() {
    let exe = std::env::current_exe().expect("own executable");
    let passthrough: Vec<String> = std::env::args().skip(1).collect();
    for part in ["deltas", "bulk", "lag", "latency"] {
        let status = std::process::Command::new(&exe)
            .args(&passthrough)
            .args(["--only", part])
            .status()
            .expect("run a part");
        if !status.success() {
            eprintln!("sync-bench part {part} failed: {status}");
            std::process::exit(1);
        }
    }
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    if args.only.is_none() {
        run_parts_in_own_processes();
        return;
    }
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.worker_threads(2).enable_all();
    if args.runs("latency") {
        // The control plane on CPU 1, the measured worker alone on CPU 0;
        // one runtime thread, so no other runtime thread preempts one that
        // holds a slice of the table (see docs/PERFORMANCE.md).
        rt.worker_threads(1);
        rt.on_thread_start(|| {
            let _ = tandem_dataplane::os::pin_to_cpu(1 % tandem_dataplane::os::cpus());
        });
    }
    let rt = rt.build().expect("runtime");
    rt.block_on(async {
        if args.runs("deltas") {
            let quic = quic_delta_throughput(args.deltas).await;
            emit(args.json, "delta_throughput_per_s", quic, "deltas/s");
            let tcp = tcp_delta_throughput(args.deltas).await;
            emit(
                args.json,
                "baseline_tcp_delta_throughput_per_s",
                tcp,
                "deltas/s",
            );
            emit(
                args.json,
                "delta_throughput_quic_vs_tcp",
                quic / tcp,
                "ratio",
            );
        }
        if args.runs("bulk") {
            let bulk = bulk_seconds(args.bulk).await;
            emit(args.json, "bulk_1m_sessions_s", bulk, "s");
            emit(args.json, "bulk_sessions", f64::from(args.bulk), "count");
        }
        if args.runs("latency") {
            forwarding_latency(args.bulk, args.json).await;
        }
        if args.runs("lag") {
            let (p99, max) = lag_p99_ms(100_000, 5).await;
            emit(args.json, "lag_p99_ms", p99, "ms");
            emit(args.json, "lag_max_ms", max, "ms");
        }
    });
}
