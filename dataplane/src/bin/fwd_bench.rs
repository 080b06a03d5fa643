//! fwd-bench: forwarding rates, each against its baseline in the same run.
//!
//! `cargo run --release -p tandem-dataplane --bin fwd-bench -- --json`
//! prints one `{"name":..,"value":..,"unit":..}` object per line:
//!
//! - `core_pps_per_core`: the packet core alone (no I/O) forwarding
//!   established, source-NATed UDP flows from memory on one core.
//! - `core_fabric_redirect_pps`: the same frames entering the node that is
//!   not primary: classified, encapsulated for the fabric, decapsulated and
//!   processed by the owner (both nodes' work on one core), and
//!   `fabric_redirect_cost_ratio` = direct / redirected.
//! - `core_pps_1m_sessions` and `core_pps_1m_sessions_prefetch`: the same
//!   core with 1,000,000 established sessions (no NAT: one SNAT address has
//!   only 64k ports), frames of random flows in bursts of 32, processed one
//!   by one as is, then with the worker's burst prefetch
//!   (`Core::prefetch_sessions`) first; `burst_prefetch_speedup` is their
//!   ratio.
//! - `afxdp_fwd_pps` vs `kernel_nft_fwd_pps` (root only): client -> firewall
//!   -> server over veth in network namespaces with the same UDP generator,
//!   through the AF_XDP dataplane and then through Linux forwarding with
//!   nftables conntrack + masquerade; rates are frames arriving at the
//!   server, loss is against frames the client sent.

use arc_swap::ArcSwap;
use std::hint::black_box;
use std::net::UdpSocket;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tandem_dataplane::afxdp::{FabricHook, FabricInbound};
use tandem_dataplane::config::Compiled;
use tandem_dataplane::core::{Core, Verdict};
use tandem_dataplane::delta::delta_queues;
use tandem_dataplane::fabric_hook::FabricForwarder;
use tandem_dataplane::frames::{L4, build};
use tandem_dataplane::os;
use tandem_dataplane::packet::Mac;
use tandem_dataplane::session::{Addr, InterfaceId, Millis, SessionTable, TableConfig, lock};
use tandem_dataplane::testbed::{Firewall, Topo, in_ns, sample_config, sh};
use tandem_fabric::header::OVERHEAD;
use tandem_fabric::{FabricMap, Link, RgOwner};
use tandem_proto::{Epoch, RgId, RgRole, RoleMap};

const T: InterfaceId = InterfaceId(0);
const U: InterfaceId = InterfaceId(1);
const FAB: u16 = 2;
const VMAC_T: Mac = [0x02, 0, 0x5e, 0, 1, 1];
const CLIENT_MAC: Mac = [0xcc, 0, 0, 0, 0, 1];
const SERVER_MAC: Mac = [0x55, 0, 0, 0, 0, 1];
const NOW: Millis = Millis(10_000);

struct Args {
    json: bool,
    flows: u16,
    seconds: f64,
    skip_io: bool,
    /// Sessions of the big-table core bench (0: skip it).
    big: u32,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        json: false,
        flows: 1024,
        seconds: 3.0,
        skip_io: false,
        big: 1_000_000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        match x.as_str() {
            "--json" => a.json = true,
            "--core-only" => a.skip_io = true,
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
                    "usage: fwd-bench [--json] [--core-only] [--flows N] [--seconds S] [--big-sessions N]"
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
        println!("{name:<28} {value:>14.1} {unit}");
    }
}

fn v4(s: &str) -> Addr {
    s.parse::<std::net::Ipv4Addr>().expect("literal").into()
}

/// A node's packet core for the sample config, primary for RG1 or not.
fn core(primary: bool) -> Core {
    core_with(primary, true, TableConfig::default())
}

fn core_with(primary: bool, snat: bool, table: TableConfig) -> Core {
    let mut compiled = Compiled::new(&sample_config()).expect("sample config");
    compiled.ifaces[0].mac = [0xaa, 0, 0, 0, 0, 1];
    compiled.ifaces[1].mac = [0xaa, 0, 0, 0, 0, 2];
    if !snat {
        compiled.snat.clear();
    }
    let table = Arc::new(Mutex::new(SessionTable::new(table)));
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
    let (producer, _consumers) = delta_queues(&[RgId(1)], 1 << 16);
    let mut c = Core::new(Arc::new(compiled), table, roles, producer);
    c.add_neighbor(T, v4("10.1.0.10"), CLIENT_MAC);
    c.add_neighbor(U, v4("192.0.2.100"), SERVER_MAC);
    c
}

/// A UDP frame from the client to the server, as the trust side sends it.
fn client_udp(sport: u16, dport: u16) -> Vec<u8> {
    build(
        VMAC_T,
        CLIENT_MAC,
        v4("10.1.0.10"),
        v4("192.0.2.100"),
        64,
        &L4::Udp {
            sport,
            dport,
            payload: vec![0x5a; 18],
        },
    )
}

fn flow_frames(flows: u16) -> Vec<Vec<u8>> {
    (0..flows).map(|i| client_udp(10_000 + i, 9000)).collect()
}

/// Runs `one` over the frames round-robin for `seconds`; frames per second.
fn rate(frames: &[Vec<u8>], seconds: f64, mut one: impl FnMut(&mut [u8]) -> bool) -> f64 {
    let mut buf = vec![0u8; 2048];
    let mut done = 0u64;
    let mut ok = 0u64;
    let start = Instant::now();
    let limit = Duration::from_secs_f64(seconds);
    'outer: loop {
        for f in frames {
            buf[..f.len()].copy_from_slice(f);
            ok += u64::from(one(&mut buf[..f.len()]));
            done += 1;
            if done.is_multiple_of(4096) && start.elapsed() >= limit {
                break 'outer;
            }
        }
    }
    assert_eq!(ok, done, "every frame was forwarded");
    done as f64 / start.elapsed().as_secs_f64()
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
    let mut owner = core(true);
    // First packets create the sessions; the measured loop is established
    // forwarding (lookup, NAT rewrite, TTL, checksums, counters).
    for f in &frames {
        let mut b = f.clone();
        assert!(matches!(owner.process(&mut b, T, NOW), Verdict::Tx { .. }));
    }
    let direct = rate(&frames, a.seconds, |b| {
        matches!(black_box(owner.process(b, T, NOW)), Verdict::Tx { .. })
    });
    emit(a.json, "core_pps_per_core", direct, "pps");

    let mut other = core(false);
    let mut to_owner = FabricForwarder::new(fabric_map(true), Arc::default());
    let mut from_peer = FabricForwarder::new(fabric_map(false), Arc::default());
    let mut wire = vec![0u8; 2048];
    let redirected = rate(&frames, a.seconds, |b| {
        let Verdict::Fabric { rg } = other.process(b, T, NOW) else {
            return false;
        };
        // As the worker does it: the prefix written in front of the frame
        // in its buffer, validated and stripped in place at the owner.
        let Some(tx) = to_owner.to_owner(rg, T) else {
            return false;
        };
        let len = b.len();
        wire[OVERHEAD..OVERHEAD + len].copy_from_slice(b);
        wire[..OVERHEAD].copy_from_slice(&tx.prefix);
        let Some(FabricInbound::Process { iface }) =
            from_peer.arrived_on_fabric(&wire[..OVERHEAD + len], InterfaceId(FAB))
        else {
            return false;
        };
        wire.copy_within(OVERHEAD..OVERHEAD + len, 0);
        matches!(
            black_box(owner.process_from_fabric(&mut wire[..len], iface, NOW)),
            Verdict::Tx { .. }
        )
    });
    emit(a.json, "core_fabric_redirect_pps", redirected, "pps");
    emit(
        a.json,
        "fabric_redirect_cost_ratio",
        direct / redirected,
        "ratio",
    );
}

/// Established forwarding with `n` sessions in the table: random flows in
/// bursts of 32, without and with the worker's burst prefetch.
fn big_table_benches(a: &Args) {
    let n = a.big;
    let mut c = core_with(
        true,
        false,
        TableConfig {
            capacity: n as usize,
            preallocate: true,
            ..TableConfig::default()
        },
    );
    // Flow i: client port 1024 + i % 64000 to one of 16 server ports.
    let mut frames: Vec<Vec<u8>> = (0..n)
        .map(|i| client_udp(1024 + (i % 64_000) as u16, 9000 + (i / 64_000) as u16))
        .collect();
    for f in &frames {
        let mut b = f.clone();
        assert!(matches!(c.process(&mut b, T, NOW), Verdict::Tx { .. }));
    }
    assert_eq!(lock(c.table()).len(), n as usize, "one session per flow");
    // A fixed shuffle: every run measures the same access pattern.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in (1..frames.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        frames.swap(i, (x % (i as u64 + 1)) as usize);
    }
    let mut bufs = vec![vec![0u8; 128]; 32];
    let mut run = |prefetch: bool| {
        let mut done = 0u64;
        let start = Instant::now();
        let limit = Duration::from_secs_f64(a.seconds);
        'outer: loop {
            for burst in frames.chunks(32) {
                for (b, f) in bufs.iter_mut().zip(burst) {
                    b[..f.len()].copy_from_slice(f);
                }
                if prefetch {
                    c.prefetch_sessions(bufs.iter().zip(burst).map(|(b, f)| (&b[..f.len()], T)));
                }
                for (b, f) in bufs.iter_mut().zip(burst) {
                    let v = black_box(c.process(&mut b[..f.len()], T, NOW));
                    assert!(matches!(v, Verdict::Tx { .. }), "established");
                }
                done += burst.len() as u64;
                if start.elapsed() >= limit {
                    break 'outer;
                }
            }
        }
        done as f64 / start.elapsed().as_secs_f64()
    };
    let plain = run(false);
    let prefetched = run(true);
    emit(a.json, "core_pps_1m_sessions", plain, "pps");
    emit(a.json, "core_pps_1m_sessions_prefetch", prefetched, "pps");
    emit(
        a.json,
        "burst_prefetch_speedup",
        prefetched / plain,
        "ratio",
    );
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

fn io_benches(a: &Args) -> Result<(), String> {
    if let Err(why) = os::privileged() {
        return Err(format!(
            "skipping the AF_XDP vs kernel comparison: needs root (network namespaces, XDP): {why}"
        ));
    }
    let which = Command::new("sh")
        .args(["-c", "command -v nft"])
        .output()
        .map_err(|e| e.to_string())?;
    if !which.status.success() {
        return Err("skipping the AF_XDP vs kernel comparison: `nft` (apt package nftables) is not installed".into());
    }
    let topo = Topo::new("b");
    let fw = Firewall::start(&topo.ns[1]);
    let x = measure(&topo, a.flows.min(64), a.seconds);
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
    let k = measure(&topo, a.flows.min(64), a.seconds);
    emit(a.json, "kernel_nft_fwd_pps", k.pps, "pps");
    emit(a.json, "kernel_nft_fwd_loss_pct", k.loss_pct, "%");
    emit(a.json, "kernel_nft_offered_pps", k.offered_pps, "pps");
    emit(
        a.json,
        "afxdp_vs_kernel_nft_ratio",
        x.pps / k.pps.max(1.0),
        "ratio",
    );
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
    core_benches(&a);
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
