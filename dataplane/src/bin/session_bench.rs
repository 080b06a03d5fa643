//! session-bench: the session table at scale, against a naive
//! `std::collections::HashMap<SessionKey, SessionRecord>` in the same run.
//!
//! `cargo run --release -p tandem-dataplane --bin session-bench -- --sessions 1000000 --json`
//! prints one `{"name":..,"value":..,"unit":..}` object per line.

use rustc_hash::FxHashSet;
use std::collections::HashMap;
use std::hint::black_box;
use std::net::Ipv4Addr;
use std::time::Instant;
use tandem_dataplane::alloc::{TandemAlloc, live_bytes};
use tandem_dataplane::session::{
    Addr, BulkMark, InterfaceId, Millis, NewSession, PolicyId, RemoveReason, SessionKey,
    SessionRecord, SessionTable, SnatRequest, SyncedSession, TableConfig, TcpState, ZoneId, proto,
};
use tandem_proto::RgId;

#[global_allocator]
static GLOBAL: TandemAlloc = TandemAlloc;

const RG1: RgId = RgId(1);
const NAT_ADDRS: u32 = 32;

struct Args {
    sessions: usize,
    json: bool,
    rounds: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        sessions: 1_000_000,
        json: false,
        rounds: 5,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--sessions" => {
                args.sessions = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&n: &usize| n >= 1000)
                    .ok_or("--sessions needs a number >= 1000")?;
            }
            "--rounds" => {
                args.rounds = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&n: &usize| n >= 1)
                    .ok_or("--rounds needs a number >= 1")?;
            }
            "--json" => args.json = true,
            "-h" | "--help" => {
                return Err("usage: session-bench [--sessions N] [--rounds R] [--json]".into());
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(args)
}

/// Deterministic xorshift so every run measures the same access pattern.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, (self.next() % (i as u64 + 1)) as usize);
        }
    }
}

/// Session `i`: a distinct client behind SNAT to one of 32 addresses.
fn session(i: u32) -> NewSession {
    let client = Ipv4Addr::from(0x0a00_0000 | (i >> 4));
    let server = Ipv4Addr::new(203, 0, 113, (i % 200) as u8 + 1);
    NewSession {
        key: SessionKey::new(
            client,
            1024 + (i & 15) as u16,
            server,
            443,
            proto::TCP,
            ZoneId(1),
        ),
        egress_zone: ZoneId(2),
        snat: Some(SnatRequest {
            addr: Addr::v4(Ipv4Addr::from(0xc633_6400 | (i % NAT_ADDRS))),
            ports: 1024..=65535,
        }),
        dnat: None,
        ingress_if: InterfaceId(1),
        egress_if: InterfaceId(2),
        owner_rg: RG1,
        policy: PolicyId(1),
        tcp_state: TcpState::Established,
    }
}

struct Report {
    json: bool,
}

impl Report {
    fn emit(&self, name: &str, value: f64, unit: &str) {
        if self.json {
            println!("{{\"name\":\"{name}\",\"value\":{value:.3},\"unit\":\"{unit}\"}}");
        } else {
            println!("{name:<32} {value:>14.3} {unit}");
        }
    }
}

/// Median of `rounds` runs of `f`, which returns nanoseconds per operation.
fn median(rounds: usize, mut f: impl FnMut() -> f64) -> f64 {
    let mut v: Vec<f64> = (0..rounds).map(|_| f()).collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn ns_per(start: Instant, ops: usize) -> f64 {
    start.elapsed().as_nanos() as f64 / ops as f64
}

/// Transparent huge pages backing this process (context for the lookup
/// figures: with 4 KiB pages most random lookups also miss the TLB).
fn anon_huge_mib() -> f64 {
    std::fs::read_to_string("/proc/self/smaps_rollup")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("AnonHugePages:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

fn fill(n: usize, now: Millis) -> SessionTable {
    let mut t = SessionTable::new(TableConfig {
        capacity: n,
        // As the daemon runs it (`[sessions] preallocate`, default on):
        // slab and indexes sized, resident and huge-page backed at start.
        preallocate: true,
        ..TableConfig::default()
    });
    // Local sessions of an RG this node is primary for.
    t.promote_rg(RG1);
    for i in 0..n as u32 {
        t.insert(session(i), now).expect("bench session fits");
    }
    t
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let out = Report { json: args.json };
    let n = args.sessions;
    let now = Millis(10_000);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);

    let before = live_bytes();
    let start = Instant::now();
    let mut table = fill(n, now);
    out.emit("insert_ns", ns_per(start, n), "ns");
    let bytes = live_bytes() - before;
    out.emit("sessions", n as f64, "count");
    out.emit("bytes_per_session", bytes as f64 / n as f64, "bytes");
    out.emit("anon_huge_page_mib", anon_huge_mib(), "MiB");

    let mut fwd_keys: Vec<SessionKey> = table.iter().map(|(_, r)| r.key).collect();
    let mut rev_keys: Vec<SessionKey> = table.iter().map(|(_, r)| r.reverse).collect();
    rng.shuffle(&mut fwd_keys);
    rng.shuffle(&mut rev_keys);

    // The dataplane looks sessions up per RX burst; both forms are reported.
    let mut hits = vec![None; 32];
    let fwd = median(args.rounds, || {
        let start = Instant::now();
        for burst in fwd_keys.chunks(32) {
            table.lookup_forward_burst(burst, &mut hits[..burst.len()]);
            black_box(&hits);
        }
        ns_per(start, fwd_keys.len())
    });
    out.emit("lookup_forward_ns", fwd, "ns");
    let fwd_single = median(args.rounds, || {
        let start = Instant::now();
        for k in &fwd_keys {
            black_box(table.lookup_forward(black_box(k)));
        }
        ns_per(start, fwd_keys.len())
    });
    out.emit("lookup_forward_single_ns", fwd_single, "ns");
    let rev = median(args.rounds, || {
        let start = Instant::now();
        for burst in rev_keys.chunks(32) {
            table.lookup_reverse_burst(burst, &mut hits[..burst.len()]);
            black_box(&hits);
        }
        ns_per(start, rev_keys.len())
    });
    out.emit("lookup_reverse_nat_ns", rev, "ns");
    let rev_single = median(args.rounds, || {
        let start = Instant::now();
        for k in &rev_keys {
            black_box(table.lookup_reverse(black_box(k)));
        }
        ns_per(start, rev_keys.len())
    });
    out.emit("lookup_reverse_nat_single_ns", rev_single, "ns");

    // Baseline: the obvious std map of key to record, same keys, same order.
    let before = live_bytes();
    let baseline: HashMap<SessionKey, SessionRecord> =
        table.iter().map(|(_, r)| (r.key, r.clone())).collect();
    let baseline_bytes = live_bytes() - before;
    let base = median(args.rounds, || {
        let start = Instant::now();
        for k in &fwd_keys {
            black_box(baseline.get(black_box(k)));
        }
        ns_per(start, fwd_keys.len())
    });
    out.emit("baseline_lookup_forward_ns", base, "ns");
    out.emit(
        "baseline_bytes_per_session_fwd_only",
        baseline_bytes as f64 / n as f64,
        "bytes",
    );
    out.emit("lookup_forward_speedup_vs_baseline", base / fwd, "ratio");
    out.emit(
        "lookup_forward_single_speedup_vs_baseline",
        base / fwd_single,
        "ratio",
    );
    drop(baseline);

    // What a secondary does with a bulk: apply the primary's sessions (peer
    // form, every companion) into its own preallocated table in chunks of
    // 512, as the sync receiver does.
    let synced: Vec<SyncedSession> = table.export_synced(RG1, now).collect();
    let mut peer = SessionTable::new(TableConfig {
        capacity: n,
        preallocate: true,
        ..TableConfig::default()
    });
    let start = Instant::now();
    for chunk in synced.chunks(512) {
        let tally = peer.apply_peer_upserts(chunk, now, Some(BulkMark(1)));
        assert_eq!(tally.refused, 0, "every peer session fits");
    }
    out.emit("peer_apply_ns", ns_per(start, synced.len()), "ns");
    assert_eq!(peer.len(), n);
    drop(peer);
    drop(synced);

    let export = median(args.rounds, || {
        let start = Instant::now();
        let mut cursor = table.begin_export(RG1);
        let mut chunk: Vec<SyncedSession> = Vec::with_capacity(1024);
        let mut exported = 0usize;
        loop {
            chunk.clear();
            let more = table.export_chunk(&mut cursor, 1024, now, &mut chunk, |_| true);
            exported += black_box(&chunk).len();
            if !more {
                break;
            }
        }
        assert_eq!(exported, n);
        start.elapsed().as_secs_f64() * 1e3
    });
    out.emit("export_rg_ms", export, "ms");

    let start = Instant::now();
    assert_eq!(table.demote_rg(RG1), n);
    out.emit("demote_rg_ms", start.elapsed().as_secs_f64() * 1e3, "ms");
    let start = Instant::now();
    assert_eq!(table.promote_rg(RG1), n);
    out.emit("promote_rg_ms", start.elapsed().as_secs_f64() * 1e3, "ms");

    // Churn at full occupancy: delete the oldest session, insert a new one.
    // Each round churns `churn_ops` sessions; the median round is reported.
    let churn_ops = n.min(1_000_000);
    let mut oldest: std::collections::VecDeque<_> = table.iter().map(|(h, _)| h).collect();
    let mut next_id = n as u32;
    // `ahead`: what a batch remover (expiry, a peer's delete batch) does,
    // start the loads of operations a few ahead; without it, one operation
    // at a time (a caller that cannot batch), as context.
    let mut churn_round = |ahead: bool| {
        let start = Instant::now();
        for _ in 0..churn_ops {
            if ahead {
                if let Some(&h) = oldest.get(8) {
                    table.prefetch_record(h);
                }
                if let Some(&h) = oldest.get(4) {
                    table.prefetch_for_remove(h);
                }
                table.prefetch_for_insert(&session(next_id + 4));
            }
            let h = oldest.pop_front().expect("table is full");
            table.remove(h, RemoveReason::Closed).expect("live handle");
            let h = table.insert(session(next_id), now).expect("freed slot");
            next_id += 1;
            oldest.push_back(h);
        }
        ns_per(start, churn_ops)
    };
    let churn = median(args.rounds, || churn_round(true));
    out.emit("insert_delete_churn_ns", churn, "ns");
    let serial = median(args.rounds, || churn_round(false));
    out.emit("insert_delete_churn_serial_ns", serial, "ns");
    drop(oldest);

    // Reconcile: every session peer-synced, a bulk saw 90% of them.
    table.demote_rg(RG1);
    let mut keys: Vec<SessionKey> = table.export_rg(RG1).map(|r| r.key).collect();
    rng.shuffle(&mut keys);
    let stale = n / 10;
    let seen: FxHashSet<SessionKey> = keys[stale..].iter().copied().collect();
    let start = Instant::now();
    let report = table.reconcile_rg_keys(RG1, &seen);
    out.emit("reconcile_rg_ms", start.elapsed().as_secs_f64() * 1e3, "ms");
    assert_eq!(report.deleted as usize, stale);
    drop(seen);

    // Same with bulk marks (what the sync layer uses): refill to n first.
    let mut next = next_id;
    while table.len() < n {
        let _ = table.insert(session(next), now);
        next += 1;
    }
    table.demote_rg(RG1);
    let mark = BulkMark(1);
    let mut marked = 0;
    for k in &keys[stale..] {
        marked += usize::from(table.mark(k, mark));
    }
    let start = Instant::now();
    let report = table.reconcile_rg_marked(RG1, mark);
    out.emit(
        "reconcile_rg_marked_ms",
        start.elapsed().as_secs_f64() * 1e3,
        "ms",
    );
    assert_eq!(report.deleted as usize, n - marked);

    // Expiry removes local sessions only: make them local again.
    table.promote_rg(RG1);
    let live = table.len();
    let start = Instant::now();
    let expired = table.expire(Millis(now.0 + 4_000_000), |_| {});
    assert_eq!(expired, live, "every session expired");
    out.emit(
        "expire_all_ns_per_session",
        ns_per(start, expired.max(1)),
        "ns",
    );
    if let Err(e) = table.verify_invariants() {
        eprintln!("invariant broken after bench: {e}");
        std::process::exit(1);
    }
}
