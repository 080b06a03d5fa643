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
//!
//! Each part runs in a process of its own (`--only deltas|bulk|lag` runs
//! one part in this process, e.g. under `perf record`).

use bytes::BytesMut;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};
use tandem_cluster::stats::RgSyncStats;
use tandem_cluster::sync::{RgReceiver, RgSender};
use tandem_cluster::testkit::{Pair, eventually, snat_session};
use tandem_dataplane::alloc::TandemAlloc;
use tandem_dataplane::delta::delta_queues;
use tandem_dataplane::session::{
    SessionKey, SessionTable, Sliced, TableConfig, lock, monotonic_clock, read, shared,
};
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
                Some(part @ ("deltas" | "bulk" | "lag")) => a.only = Some(part.to_string()),
                _ => return Err("--only needs deltas, bulk or lag".into()),
            },
            "-h" | "--help" => {
                return Err(
                    "usage: sync-bench [--deltas N] [--bulk N] [--only deltas|bulk|lag] [--json]"
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

/// Runs each part in a fresh process, as a daemon starts: within one
/// process the ~1 GiB of tables an earlier part freed comes back to the
/// next part's allocations as already-faulted small pages, which made the
/// bulk 20-40% slower than it is for a daemon that sizes its table once.
fn run_parts_in_own_processes() {
    let exe = std::env::current_exe().expect("own executable");
    let passthrough: Vec<String> = std::env::args().skip(1).collect();
    for part in ["deltas", "bulk", "lag"] {
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
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
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
        if args.runs("lag") {
            let (p99, max) = lag_p99_ms(100_000, 5).await;
            emit(args.json, "lag_p99_ms", p99, "ms");
            emit(args.json, "lag_max_ms", max, "ms");
        }
    });
}
