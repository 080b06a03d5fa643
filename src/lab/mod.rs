//! `tandem lab`: a chassis-cluster pair in network namespaces.
//!
//! ```text
//!  tl-client            tl-sw (bridges)                 tl-server
//!  c0 10.1.0.10 ── br-trust ──┬── t0 [tl-n0] u0 ──┬── br-untrust ── s0 192.0.2.100
//!                             └── t0 [tl-n1] u0 ──┘
//!  tl-n0 ─ ctl 10.255.0.0/30 ─ tl-n1 (QUIC sync, heartbeat datagrams)
//!  tl-n0 ─ fab0 10.254.0.0/30 ─ tl-n1, fab1 10.254.1.0/30 (fabric heartbeats)
//! ```
//! reth0 (trust, VIP 10.1.0.1) and reth1 (untrust, VIP 192.0.2.1) belong to
//! RG1. The client's flows to the server are source-NATed to 192.0.2.1;
//! 192.0.2.1:8080 is port-forwarded to the client's port 80.
//!
//! fab0 and fab1 are dataplane ports too: frames that reach the node that
//! does not own their RG cross to the owner on the active one.
//!
//! `up` builds it and starts both daemons (embedded configs, fresh PKI),
//! `down` removes exactly the namespaces and files it created (the XDP
//! programs go with their interfaces), `demo` runs traffic through a manual
//! failover, a crash of the primary and its rejoin, and reports.

mod cps;
mod peer;
mod traffic;

use crate::control;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tandem_proto::pb;
use tokio::runtime::Runtime;
use traffic::Traffic;

pub const DIR: &str = "/run/tandem-lab";
pub const NS: [&str; 5] = ["tl-client", "tl-server", "tl-sw", "tl-n0", "tl-n1"];
const NODE_NS: [&str; 2] = ["tl-n0", "tl-n1"];
const CONFIGS: [&str; 2] = [include_str!("node0.toml"), include_str!("node1.toml")];

fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn ns_exists(n: &str) -> bool {
    Path::new(&format!("/var/run/netns/{n}")).exists()
}

fn socket(n: usize) -> PathBuf {
    PathBuf::from(format!("{DIR}/node{n}.sock"))
}

/// Progress output (stderr, so `--json` stdout stays machine-readable).
fn step(msg: &str) {
    eprintln!("[lab] {msg}");
}

pub fn main(cmd: &str, json: bool, peer_compare: bool, rt: &Runtime) -> Result<(), String> {
    tandem_dataplane::os::privileged().map_err(|e| format!("the lab needs root: {e}"))?;
    match cmd {
        "up" => {
            install_cleanup(rt);
            up(rt)?;
            let st = rt.block_on(status(0))?;
            print!("{}", crate::format_status(&st));
            step(&format!(
                "lab is up; sockets {DIR}/node0.sock and node1.sock; `tandem lab down` removes it"
            ));
            Ok(())
        }
        "down" => {
            down();
            step("lab removed");
            Ok(())
        }
        "demo" => {
            install_cleanup(rt);
            let r = demo(rt, json, peer_compare);
            down();
            r
        }
        "cps" => {
            install_cleanup(rt);
            let r = cps_compare(rt, json);
            down();
            r
        }
        "peer-compare" => {
            install_cleanup(rt);
            if NS.iter().any(|n| ns_exists(n)) || Path::new(DIR).exists() {
                down();
            }
            let report = peer::run()?;
            print_report(&report, &[], json);
            Ok(())
        }
        _ => Err(
            "usage: tandem lab up|down|demo [--peer-compare] [--json] | peer-compare [--json] | cps [--json]"
                .into(),
        ),
    }
}

/// On SIGINT/SIGTERM: remove the lab and exit, so an interrupted run
/// leaves no namespaces, daemons or XDP programs behind.
fn install_cleanup(rt: &Runtime) {
    rt.spawn(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT");
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        eprintln!("[lab] interrupted: removing the lab");
        down();
        std::process::exit(130);
    });
}

/// Stops the daemons and removes the namespaces and files of the lab.
pub fn down() {
    for n in 0..2 {
        let pid_file = format!("{DIR}/node{n}.pid");
        if let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            // SAFETY: signalling a pid we started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    for n in NS {
        if ns_exists(n) {
            // Whatever still runs inside (the peer comparison's daemons, a
            // daemon started by hand) would keep the namespace alive.
            kill_all_in(n);
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
    let _ = std::fs::remove_dir_all(DIR);
}

/// SIGKILLs every process in namespace `ns` (never this process).
fn kill_all_in(ns: &str) {
    let pids = Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let me = std::process::id() as i32;
    for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        if pid != me {
            // SAFETY: signalling processes of a lab namespace we created.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

fn build_topology() -> Result<(), String> {
    for n in NS {
        sh(&["ip", "netns", "add", n])?;
        sh(&["ip", "-n", n, "link", "set", "lo", "up"])?;
    }
    sh(&[
        "ip", "-n", "tl-sw", "link", "add", "br-trust", "type", "bridge",
    ])?;
    sh(&[
        "ip",
        "-n",
        "tl-sw",
        "link",
        "add",
        "br-untrust",
        "type",
        "bridge",
    ])?;
    // (namespace, device, switch-side device, bridge)
    let attach = [
        ("tl-client", "c0", "sw-c", "br-trust"),
        ("tl-n0", "t0", "sw-n0t", "br-trust"),
        ("tl-n1", "t0", "sw-n1t", "br-trust"),
        ("tl-server", "s0", "sw-s", "br-untrust"),
        ("tl-n0", "u0", "sw-n0u", "br-untrust"),
        ("tl-n1", "u0", "sw-n1u", "br-untrust"),
    ];
    for (ns, dev, sw, br) in attach {
        // The reth members have 2 RX queues (flows spread over them by
        // hash), so each node runs 2 dataplane workers; the fabric links
        // keep 1, so one worker hands its fabric frames to the other.
        let q = if NODE_NS.contains(&ns) { "2" } else { "1" };
        sh(&[
            "ip",
            "link",
            "add",
            dev,
            "numtxqueues",
            q,
            "numrxqueues",
            q,
            "netns",
            ns,
            "type",
            "veth",
            "peer",
            "name",
            sw,
            "numtxqueues",
            q,
            "numrxqueues",
            q,
            "netns",
            "tl-sw",
        ])?;
        sh(&["ip", "-n", "tl-sw", "link", "set", sw, "master", br, "up"])?;
        sh(&["ip", "-n", ns, "link", "set", dev, "up"])?;
        // The dataplane rewrites packets: checksums must be complete.
        sh(&["ip", "netns", "exec", ns, "ethtool", "-K", dev, "tx", "off"])?;
    }
    for br in ["br-trust", "br-untrust"] {
        sh(&["ip", "-n", "tl-sw", "link", "set", br, "up"])?;
    }
    // Node-to-node links: control, fab0, fab1.
    for (dev, net) in [
        ("ctl", "10.255.0"),
        ("fab0", "10.254.0"),
        ("fab1", "10.254.1"),
    ] {
        sh(&[
            "ip", "link", "add", dev, "netns", "tl-n0", "type", "veth", "peer", "name", dev,
            "netns", "tl-n1",
        ])?;
        for (i, ns) in NODE_NS.iter().enumerate() {
            sh(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{net}.{}/30", i + 1),
                "dev",
                dev,
            ])?;
            if dev != "ctl" {
                // Room for a full-size frame plus the fabric header.
                sh(&["ip", "-n", ns, "link", "set", dev, "mtu", "1600"])?;
            }
            sh(&["ip", "-n", ns, "link", "set", dev, "up"])?;
        }
    }
    // Reth members carry no kernel addresses; keep IPv6 autoconfiguration
    // off them.
    for ns in NODE_NS {
        for dev in ["t0", "u0"] {
            sh(&[
                "ip",
                "netns",
                "exec",
                ns,
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.{dev}.disable_ipv6=1"),
            ])?;
        }
    }
    sh(&[
        "ip",
        "-n",
        "tl-client",
        "addr",
        "add",
        "10.1.0.10/24",
        "dev",
        "c0",
    ])?;
    sh(&[
        "ip",
        "-n",
        "tl-client",
        "route",
        "add",
        "default",
        "via",
        "10.1.0.1",
    ])?;
    sh(&[
        "ip",
        "-n",
        "tl-server",
        "addr",
        "add",
        "192.0.2.100/24",
        "dev",
        "s0",
    ])?;
    // Dual stack: IPv6 hosts (no duplicate-address wait) behind the VIPs
    // 2001:db8:1::1 and 2001:db8:2::1.
    for (ns, dev, addr) in [
        ("tl-client", "c0", "2001:db8:1::10/64"),
        ("tl-server", "s0", "2001:db8:2::100/64"),
    ] {
        sh(&[
            "ip", "-n", ns, "-6", "addr", "add", addr, "dev", dev, "nodad",
        ])?;
    }
    sh(&[
        "ip",
        "-n",
        "tl-client",
        "-6",
        "route",
        "add",
        "default",
        "via",
        "2001:db8:1::1",
    ])?;
    Ok(())
}

fn write_files() -> Result<(), String> {
    std::fs::create_dir_all(format!("{DIR}/pki")).map_err(|e| e.to_string())?;
    let pki =
        tandem_cluster::tls::generate_pki("lab", &["node0", "node1"]).map_err(|e| e.to_string())?;
    tandem_cluster::tls::write_pki(Path::new(&format!("{DIR}/pki")), &pki)
        .map_err(|e| e.to_string())?;
    let key: [u8; 32] = rand::random();
    std::fs::write(format!("{DIR}/heartbeat.key"), key).map_err(|e| e.to_string())?;
    for (n, cfg) in CONFIGS.iter().enumerate() {
        std::fs::write(format!("{DIR}/node{n}.toml"), cfg).map_err(|e| e.to_string())?;
        // A fresh security log per lab.
        let _ = std::fs::remove_file(security_log_path(n));
    }
    Ok(())
}

fn security_log_path(n: usize) -> String {
    format!("{DIR}/node{n}-security.json")
}

/// The HA promise of the security log, checked on the lab's TCP streams
/// (created before any failover, closed at the end of the demo after
/// three changes of primary): across both nodes' logs each has exactly
/// one create, logged by the node primary when it opened, and exactly one
/// close, logged by the node primary when it ended, with the same
/// session id. Waits up to 40 s for the closes (the closing timers).
fn security_log_phase(
    rt: &Runtime,
    creator: usize,
    report: &mut Vec<Figure>,
) -> Result<(), String> {
    let closer = if rt.block_on(status(0)).as_ref().is_ok_and(is_primary) {
        0
    } else {
        1
    };
    step(&format!(
        "security log: each TCP stream's create by node{creator}, its close by node{closer}, one session id"
    ));
    let stream = |e: &Value| {
        e["protocol-id"] == "6"
            && (e["destination-port"] == "5001" || e["destination-port"] == "8080")
    };
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let mut per_id: std::collections::BTreeMap<String, Vec<(String, String)>> =
            Default::default();
        for n in 0..2 {
            let text = std::fs::read_to_string(security_log_path(n)).unwrap_or_default();
            for e in text
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            {
                if stream(&e) && e["event"] != "RT_FLOW_SESSION_DENY" {
                    per_id
                        .entry(e["session-id"].as_str().unwrap_or("").to_string())
                        .or_default()
                        .push((
                            e["event"].as_str().unwrap_or("").to_string(),
                            e["node"].as_str().unwrap_or("").to_string(),
                        ));
                }
            }
        }
        let want = |id_events: &Vec<(String, String)>| {
            let mut v = id_events.clone();
            v.sort();
            v == vec![
                ("RT_FLOW_SESSION_CLOSE".to_string(), format!("node{closer}")),
                (
                    "RT_FLOW_SESSION_CREATE".to_string(),
                    format!("node{creator}"),
                ),
            ]
        };
        let ok = per_id.values().filter(|v| want(v)).count();
        if ok == 7 && per_id.len() == 7 {
            step("security log: 7 streams, 7 creates and 7 closes, each once, ids matching");
            report.push(Figure {
                name: "security_log_streams_create_close_once",
                value: ok as f64,
                unit: "count",
            });
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "security log: {ok} of 7 TCP streams logged one create (node{creator}) and one close (node{closer}): {per_id:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Half-open sessions of the port forward (192.0.2.1:8080) in node `n`'s
/// export of RG1.
fn half_open_to_port_forward(rt: &Runtime, n: usize) -> Result<u64, String> {
    let q = pb::ControlRequest {
        cmd: Some(pb::control_request::Cmd::Sessions(pb::SessionQuery {
            rg: 1,
            ..Default::default()
        })),
    };
    let mut count = 0;
    rt.block_on(control::request(&socket(n), q, |chunk| {
        for v in chunk
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        {
            let half_open = v["state"] == "syn-sent" || v["state"] == "syn-received";
            if half_open && v["destination"] == "192.0.2.1:8080" {
                count += 1;
            }
        }
    }))?;
    Ok(count)
}

/// A SYN flood (hping3, random sources, 3 s) at the port forward from the
/// untrust side: the primary answers it with cookies above the screen's
/// threshold and holds the sessions under it as half-open; none of them
/// reaches the peer.
fn syn_flood_phase(rt: &Runtime, report: &mut Vec<Figure>) -> Result<(), String> {
    let primary = if rt.block_on(status(0)).as_ref().is_ok_and(is_primary) {
        0
    } else {
        1
    };
    let peer = 1 - primary;
    step(&format!(
        "SYN flood at the port forward (hping3 --rand-source, 3 s): node{primary} screens it, node{peer} must get none of it"
    ));
    let cookies = |rt: &Runtime| -> u64 {
        rt.block_on(statistics(primary))
            .ok()
            .and_then(|v| {
                v["screens"]
                    .as_array()?
                    .iter()
                    .find(|s| s["zone"] == "untrust")
                    .and_then(|s| s["counters"]["syn-cookies-sent"].as_u64())
            })
            .unwrap_or(0)
    };
    let before = cookies(rt);
    let flood = Command::new("ip")
        .args([
            "netns",
            "exec",
            "tl-server",
            "timeout",
            "3",
            "hping3",
            "-q",
            "-S",
            "--rand-source",
            "-i",
            "u50",
            "-p",
            "8080",
            "192.0.2.1",
        ])
        .output()
        .map_err(|e| format!("hping3: {e}"))?;
    // `timeout` ends hping3 with status 124: the flood ran its time.
    if !matches!(flood.status.code(), Some(0 | 124)) {
        return Err(format!(
            "hping3 failed ({}): {}",
            flood.status,
            String::from_utf8_lossy(&flood.stderr).trim()
        ));
    }
    // Whatever the primary would sync has had time to arrive.
    std::thread::sleep(Duration::from_secs(1));
    let sent = cookies(rt).saturating_sub(before);
    let on_primary = half_open_to_port_forward(rt, primary)?;
    let on_peer = half_open_to_port_forward(rt, peer)?;
    step(&format!(
        "flood: {sent} SYNs answered with cookies, {on_primary} half-open sessions on node{primary}, {on_peer} on node{peer}"
    ));
    for (name, value) in [
        ("syn_flood_cookies_sent", sent),
        ("syn_flood_half_open_on_primary", on_primary),
        ("syn_flood_half_open_on_peer", on_peer),
    ] {
        report.push(Figure {
            name,
            value: value as f64,
            unit: "count",
        });
    }
    if on_peer > 0 {
        return Err(format!(
            "{on_peer} half-open sessions of the flood reached node{peer}"
        ));
    }
    Ok(())
}

/// Starts node `n`'s daemon in its namespace, logging to `node<n>.log`.
pub fn start_node(n: usize) -> Result<u32, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let log = std::fs::File::create(format!("{DIR}/node{n}.log")).map_err(|e| e.to_string())?;
    let err = log.try_clone().map_err(|e| e.to_string())?;
    use std::os::unix::process::CommandExt;
    let child = Command::new("ip")
        .args(["netns", "exec", NODE_NS[n]])
        .arg(&exe)
        .args(["node", "--config", &format!("{DIR}/node{n}.toml")])
        .env("TANDEM_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("starting node{n}: {e}"))?;
    let pid = child.id();
    std::fs::write(format!("{DIR}/node{n}.pid"), pid.to_string()).map_err(|e| e.to_string())?;
    Ok(pid)
}

pub fn kill_node(n: usize) {
    signal_node(n, libc::SIGKILL);
}

/// Sends `sig` to node `n`'s daemon (the pid the lab recorded at start).
fn signal_node(n: usize, sig: libc::c_int) {
    if let Some(pid) = std::fs::read_to_string(format!("{DIR}/node{n}.pid"))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    {
        // SAFETY: signalling the daemon we started.
        unsafe { libc::kill(pid, sig) };
    }
}

/// The status fields the lab's waits look at, for a timeout report.
fn status_digest(st: Option<&Value>) -> String {
    let Some(st) = st else {
        return "no answer on the control socket".into();
    };
    let rgs: Vec<String> = st["rgs"]
        .as_array()
        .map(|v| v.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|r| {
            format!(
                "rg {} {} in_sync={} epoch={}",
                r["rg"], r["state"], r["in_sync"], r["epoch"]
            )
        })
        .collect();
    format!(
        "peer_alive={} dataplane={}\n{}",
        st["peer_alive"],
        st["dataplane"],
        rgs.join("\n")
    )
}

fn node_log_tail(n: usize) -> String {
    let s = std::fs::read_to_string(format!("{DIR}/node{n}.log")).unwrap_or_default();
    s.lines()
        .rev()
        .take(40)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n")
}

pub async fn status(n: usize) -> Result<Value, String> {
    let mut out = String::new();
    control::request(
        &socket(n),
        pb::ControlRequest {
            cmd: Some(pb::control_request::Cmd::Status(pb::Empty {})),
        },
        |j| out.push_str(j),
    )
    .await?;
    serde_json::from_str(&out).map_err(|e| e.to_string())
}

pub async fn statistics(n: usize) -> Result<Value, String> {
    let mut out = String::new();
    control::request(
        &socket(n),
        pb::ControlRequest {
            cmd: Some(pb::control_request::Cmd::Statistics(pb::Empty {})),
        },
        |j| out.push_str(j),
    )
    .await?;
    serde_json::from_str(&out).map_err(|e| e.to_string())
}

fn rg1(v: &Value) -> &Value {
    &v["rgs"][0]
}

fn is_primary(v: &Value) -> bool {
    rg1(v)["state"] == "Primary"
}

/// Polls until `cond(node0 status, node1 status)` or the timeout.
fn wait_for(
    rt: &Runtime,
    what: &str,
    timeout: Duration,
    cond: impl Fn(Option<&Value>, Option<&Value>) -> bool,
) -> Result<(), String> {
    let start = Instant::now();
    loop {
        let a = rt.block_on(status(0)).ok();
        let b = rt.block_on(status(1)).ok();
        if cond(a.as_ref(), b.as_ref()) {
            return Ok(());
        }
        if start.elapsed() > timeout {
            return Err(format!(
                "timed out waiting for {what}\n--- node0 status ---\n{}\n--- node1 status ---\n{}\n--- node0 log ---\n{}\n--- node1 log ---\n{}",
                status_digest(a.as_ref()),
                status_digest(b.as_ref()),
                node_log_tail(0),
                node_log_tail(1)
            ));
        }
        // 10 ms, as the peer stack's waits: the takeover figures compare.
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn up(rt: &Runtime) -> Result<(), String> {
    if NS.iter().any(|n| ns_exists(n)) || Path::new(DIR).exists() {
        step("removing a previous lab");
        down();
    }
    step("building namespaces: client, server, switch, node0, node1");
    build_topology()?;
    step("generating the cluster CA, node certificates and heartbeat key");
    write_files()?;
    step("starting node0 and node1 (AF_XDP on t0/u0, QUIC on ctl)");
    for n in 0..2 {
        start_node(n)?;
    }
    step("waiting for the election and the first bulk sync");
    let settled = |a: Option<&Value>, b: Option<&Value>| match (a, b) {
        (Some(a), Some(b)) => {
            a["peer_alive"] == true
                && b["peer_alive"] == true
                && a["dataplane"]["running"] == true
                && b["dataplane"]["running"] == true
                && (is_primary(a) != is_primary(b))
                && (rg1(a)["in_sync"] == true || rg1(b)["in_sync"] == true)
        }
        _ => false,
    };
    // Hosts differ 2x; a dual-primary start resolves and re-bulks.
    let what = "both dataplanes, a primary and a synced secondary";
    wait_for(rt, what, Duration::from_secs(60), settled)?;
    // A start where each node first saw no primary can still move RG1
    // once (a higher epoch wins): the phases need the primary that stays.
    let first = is_primary(&rt.block_on(status(0))?);
    std::thread::sleep(Duration::from_secs(1));
    wait_for(rt, what, Duration::from_secs(60), settled)?;
    if is_primary(&rt.block_on(status(0))?) != first {
        step("RG1 moved once after the start; waiting for it to settle");
        std::thread::sleep(Duration::from_secs(1));
        wait_for(rt, what, Duration::from_secs(60), settled)?;
    }
    Ok(())
}

/// One line of the report.
struct Figure {
    name: &'static str,
    value: f64,
    unit: &'static str,
}

fn demo(rt: &Runtime, json: bool, peer_compare: bool) -> Result<(), String> {
    up(rt)?;
    let st = rt.block_on(status(0))?;
    if !json {
        print!("{}", crate::format_status(&st));
    }
    let primary0 = is_primary(&st);
    let (first, second) = if primary0 { (0usize, 1usize) } else { (1, 0) };
    step(&format!("node{first} is primary for RG1"));
    step(
        "starting traffic: 4 TCP streams and 1000 UDP probes/s through SNAT, 1 TCP stream through the DNAT port-forward, 3000 short UDP flows; over IPv6, 2 TCP streams and 1000 UDP probes/s through SNAT66",
    );
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = Traffic::start(stop.clone(), true)?;
    std::thread::sleep(Duration::from_secs(3));
    traffic.check_flowing("before failover")?;
    let mut report = Vec::new();
    let synced = synced_sessions(rt, second)?;
    step(&format!("{synced} sessions synced to node{second}"));
    report.push(Figure {
        name: "sessions_synced",
        value: synced as f64,
        unit: "count",
    });
    fabric_phase(rt, &traffic, first, second, &mut report)?;

    // Manual failover of RG1 to the secondary.
    step(&format!(
        "request chassis cluster failover redundancy-group 1 node {second}"
    ));
    let t1 = Instant::now();
    let cmd = pb::ControlRequest {
        cmd: Some(pb::control_request::Cmd::Failover(pb::FailoverCommand {
            rg: 1,
            node: second as u32,
        })),
    };
    rt.block_on(control::request(&socket(first), cmd, |_| {}))?;
    let decided = t1.elapsed();
    std::thread::sleep(Duration::from_secs(3));
    traffic.check_flowing("after the manual failover")?;
    let manual_gap = traffic.largest_gap_since(t1);
    step(&format!(
        "manual failover committed in {} ms; largest probe gap {manual_gap:.1} ms",
        decided.as_millis()
    ));
    report.push(Figure {
        name: "manual_failover_decision_ms",
        value: decided.as_secs_f64() * 1e3,
        unit: "ms",
    });
    report.push(Figure {
        name: "manual_failover_gap_ms",
        value: manual_gap,
        unit: "ms",
    });
    push_v6_gap(&mut report, &traffic, "manual_failover_gap_v6_ms", t1);
    let synced = synced_sessions(rt, first)?;
    report.push(Figure {
        name: "sessions_synced_before_crash",
        value: synced as f64,
        unit: "count",
    });

    // Crash of the new primary.
    step(&format!(
        "killing node{second}'s daemon (SIGKILL) while it is primary"
    ));
    let t2 = Instant::now();
    kill_node(second);
    wait_for(
        rt,
        "the survivor to take over",
        Duration::from_secs(10),
        |a, b| {
            let s = if first == 0 { a } else { b };
            s.is_some_and(is_primary)
        },
    )?;
    let takeover = t2.elapsed();
    std::thread::sleep(Duration::from_secs(3));
    traffic.check_flowing("after the crash")?;
    let crash_gap = traffic.largest_gap_since(t2);
    step(&format!(
        "node{first} took over in {} ms; largest probe gap {crash_gap:.1} ms",
        takeover.as_millis()
    ));
    report.push(Figure {
        name: "crash_takeover_ms",
        value: takeover.as_secs_f64() * 1e3,
        unit: "ms",
    });
    report.push(Figure {
        name: "crash_failover_gap_ms",
        value: crash_gap,
        unit: "ms",
    });
    push_v6_gap(&mut report, &traffic, "crash_failover_gap_v6_ms", t2);

    // Rejoin: the restarted node imports the RG by bulk.
    step(&format!(
        "restarting node{second}: it rejoins as secondary and imports the sessions"
    ));
    let bulks_before = bulks_acked(rt, first);
    start_node(second)?;
    let t3 = Instant::now();
    wait_for(
        rt,
        "the rejoining node to be in sync",
        Duration::from_secs(30),
        |a, b| {
            let s = if second == 0 { a } else { b };
            s.is_some_and(|s| rg1(s)["in_sync"] == true)
        },
    )?;
    let rejoin = t3.elapsed();
    let bulk_ms = rt
        .block_on(statistics(first))
        .ok()
        .and_then(|v| rg_sync_stat(&v, "last_bulk_ms"))
        .filter(|_| bulks_acked(rt, first) > bulks_before)
        .unwrap_or(0);
    step(&format!(
        "node{second} in sync {} ms after restart (bulk {bulk_ms} ms)",
        rejoin.as_millis()
    ));
    report.push(Figure {
        name: "rejoin_bulk_ms",
        value: bulk_ms as f64,
        unit: "ms",
    });
    report.push(Figure {
        name: "rejoin_in_sync_ms",
        value: rejoin.as_secs_f64() * 1e3,
        unit: "ms",
    });
    dataplane_phase(rt, &traffic, first, second, &mut report)?;
    // The dataplane phase left RG1 on `second`.
    pause_phase(rt, &traffic, second, first, &mut report)?;
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let result = traffic.finish();
    security_log_phase(rt, first, &mut report)?;
    syn_flood_phase(rt, &mut report)?;
    report.push(Figure {
        name: "tcp_connections_survived_pct",
        value: result.survived_pct,
        unit: "%",
    });
    report.push(Figure {
        name: "tcp_connections",
        value: result.connections as f64,
        unit: "count",
    });
    report.push(Figure {
        name: "udp_probes_sent",
        value: result.probes_sent as f64,
        unit: "count",
    });
    report.push(Figure {
        name: "udp_probes_lost",
        value: result.probes_lost as f64,
        unit: "count",
    });
    if let Some((sent, lost)) = result.probes6 {
        report.push(Figure {
            name: "udp6_probes_sent",
            value: sent as f64,
            unit: "count",
        });
        report.push(Figure {
            name: "udp6_probes_lost",
            value: lost as f64,
            unit: "count",
        });
    }
    let mut notes = result.notes.clone();
    if peer_compare {
        down();
        match peer::run() {
            Ok(figures) => report.extend(figures),
            Err(e) => notes.push(format!("peer comparison not run: {e}")),
        }
    }
    print_report(&report, &notes, json);
    if result.survived_pct < 100.0 {
        return Err(format!(
            "only {:.0}% of TCP connections survived",
            result.survived_pct
        ));
    }
    Ok(())
}

/// The primary's dataplane stops (as if its workers died): the node must
/// give up the RG — it is ineligible while its dataplane does not serve
/// the reths — and the peer take over within the detection time, with the
/// reason in the first node's status. Started again, it comes back and is
/// eligible once its workers run.
fn dataplane_phase(
    rt: &Runtime,
    traffic: &Traffic,
    primary: usize,
    other: usize,
    report: &mut Vec<Figure>,
) -> Result<(), String> {
    step(&format!(
        "request chassis dataplane stop on node{primary} (primary): it must give up RG1"
    ));
    let dp = |action| pb::ControlRequest {
        cmd: Some(pb::control_request::Cmd::Dataplane(pb::DataplaneCommand {
            action: action as i32,
        })),
    };
    let t = Instant::now();
    rt.block_on(control::request(
        &socket(primary),
        dp(pb::dataplane_command::Action::Stop),
        |_| {},
    ))?;
    wait_for(
        rt,
        "the peer to take over from the node without a dataplane",
        Duration::from_secs(10),
        |a, b| {
            let (p, o) = if primary == 0 { (a, b) } else { (b, a) };
            o.is_some_and(is_primary) && p.is_some_and(|p| !is_primary(p))
        },
    )?;
    let takeover = t.elapsed();
    let st = rt.block_on(status(primary))?;
    let reason = rg1(&st)["reason"].as_str().unwrap_or("").to_string();
    let error = st["dataplane_error"].as_str().unwrap_or("").to_string();
    if !reason.contains("dataplane:") || !error.contains("stopped") {
        return Err(format!(
            "node{primary} does not say why it gave up RG1: reason {reason:?}, dataplane {error:?}"
        ));
    }
    std::thread::sleep(Duration::from_secs(2));
    traffic.check_flowing("after the primary's dataplane stopped")?;
    let gap = traffic.largest_gap_since(t);
    step(&format!(
        "node{other} took over in {} ms; node{primary} says: {reason} ({error}); largest probe gap {gap:.1} ms",
        takeover.as_millis()
    ));
    report.push(Figure {
        name: "dataplane_stop_takeover_ms",
        value: takeover.as_secs_f64() * 1e3,
        unit: "ms",
    });
    report.push(Figure {
        name: "dataplane_stop_gap_ms",
        value: gap,
        unit: "ms",
    });
    push_v6_gap(report, traffic, "dataplane_stop_gap_v6_ms", t);
    step(&format!("request chassis dataplane start on node{primary}"));
    rt.block_on(control::request(
        &socket(primary),
        dp(pb::dataplane_command::Action::Start),
        |_| {},
    ))?;
    wait_for(
        rt,
        "the restarted dataplane to run and its node to be eligible again",
        Duration::from_secs(10),
        |a, b| {
            let p = if primary == 0 { a } else { b };
            p.is_some_and(|p| {
                p["dataplane"]["running"] == true && rg1(p)["effective_priority"].as_u64() > Some(0)
            })
        },
    )?;
    traffic.check_flowing("after the dataplane restart")?;
    Ok(())
}

/// The primary's daemon is paused (SIGSTOP, as a VM freeze or a debugger
/// would) for longer than the detection time, then resumed: the peer takes
/// over once, and the resumed node, still primary on its stale view, must
/// yield to the newer epoch instead of taking RG1 back (a second failover).
fn pause_phase(
    rt: &Runtime,
    traffic: &Traffic,
    primary: usize,
    other: usize,
    report: &mut Vec<Figure>,
) -> Result<(), String> {
    step(&format!(
        "pausing node{primary}'s daemon (SIGSTOP) for 1.5 s while it is primary, then SIGCONT"
    ));
    let t = Instant::now();
    signal_node(primary, libc::SIGSTOP);
    // Only the running node answers its control socket meanwhile.
    let mut claimed = None;
    while t.elapsed() < Duration::from_millis(1500) {
        if claimed.is_none()
            && let Ok(o) = rt.block_on(status(other))
            && is_primary(&o)
        {
            claimed = Some(rg1(&o)["epoch"].clone());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    signal_node(primary, libc::SIGCONT);
    let Some(claimed) = claimed else {
        return Err(format!(
            "node{other} did not take over within 1.5 s of node{primary}'s pause"
        ));
    };
    let resumed = Instant::now();
    // Watch both for 3 s: how long both say primary, and whether the
    // resumed node ever claims a newer epoch.
    let mut both_ms = 0u64;
    let mut first_both: Option<Instant> = None;
    while resumed.elapsed() < Duration::from_secs(3) {
        let (a, b) = rt.block_on(async { tokio::join!(status(primary), status(other)) });
        if let (Ok(p), Ok(o)) = (&a, &b)
            && is_primary(p)
            && is_primary(o)
        {
            let at = *first_both.get_or_insert_with(Instant::now);
            both_ms = at.elapsed().as_millis() as u64 + 20;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let (p, o) = (rt.block_on(status(primary))?, rt.block_on(status(other))?);
    if is_primary(&p) || !is_primary(&o) || rg1(&o)["epoch"] != claimed {
        return Err(format!(
            "after the pause RG1 moved again: node{primary} {} e{}, node{other} {} e{} (took over at e{claimed})",
            rg1(&p)["state"],
            rg1(&p)["epoch"],
            rg1(&o)["state"],
            rg1(&o)["epoch"]
        ));
    }
    traffic.check_flowing("after the pause and resume")?;
    let gap = traffic.largest_gap_since(t);
    step(&format!(
        "node{other} took over at e{claimed} and keeps RG1; node{primary} resumed and yielded ({}); both said primary for {both_ms} ms; largest probe gap {gap:.1} ms",
        rg1(&p)["reason"].as_str().unwrap_or("")
    ));
    report.push(Figure {
        name: "pause_failover_gap_ms",
        value: gap,
        unit: "ms",
    });
    report.push(Figure {
        name: "pause_resume_both_primary_ms",
        value: both_ms as f64,
        unit: "ms",
    });
    Ok(())
}

/// The trust switch is made to deliver the client's frames to the node
/// that is *not* primary (a stale MAC table, as after a switch reboot):
/// they must reach the owner over fab0, then over fab1 once fab0 is cut,
/// without a connection noticing.
fn fabric_phase(
    rt: &Runtime,
    traffic: &Traffic,
    owner: usize,
    other: usize,
    report: &mut Vec<Figure>,
) -> Result<(), String> {
    let vmac = "02:00:5e:00:01:01";
    let port = format!("sw-n{other}t");
    step(&format!(
        "steering the client's frames for reth0's virtual MAC to node{other} (not primary): they cross the fabric"
    ));
    sh(&[
        "bridge", "-n", "tl-sw", "fdb", "replace", vmac, "dev", &port, "master", "static", "sticky",
    ])?;
    let before = fabric_sent(rt, other, 0);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    traffic.check_flowing("with traffic entering the non-owner node")?;
    let via_fab0 = fabric_sent(rt, other, 0).saturating_sub(before);
    if via_fab0 == 0 {
        return Err(format!(
            "node{other} redirected no frames over fab0\n--- node{other} log ---\n{}",
            node_log_tail(other)
        ));
    }
    let steer_gap = traffic.largest_gap_since(t0);
    step(&format!(
        "node{other} sent {via_fab0} frames to node{owner} over fab0 in 2 s; largest probe gap {steer_gap:.1} ms"
    ));
    step("cutting fab0 (ip link set fab0 down on node0)");
    let fab1_before = fabric_sent(rt, other, 1);
    let t1 = Instant::now();
    sh(&["ip", "-n", "tl-n0", "link", "set", "fab0", "down"])?;
    std::thread::sleep(Duration::from_secs(2));
    traffic.check_flowing("after fab0 was cut")?;
    let via_fab1 = fabric_sent(rt, other, 1).saturating_sub(fab1_before);
    let cut_gap = traffic.largest_gap_since(t1);
    if via_fab1 == 0 {
        return Err(format!(
            "node{other} did not switch to fab1\n--- node{other} log ---\n{}",
            node_log_tail(other)
        ));
    }
    step(&format!(
        "forwarding moved to fab1: {via_fab1} frames in 2 s; largest probe gap {cut_gap:.1} ms"
    ));
    sh(&["ip", "-n", "tl-n0", "link", "set", "fab0", "up"])?;
    sh(&[
        "bridge", "-n", "tl-sw", "fdb", "del", vmac, "dev", &port, "master", "static",
    ])?;
    // Frames from the owner re-teach the switch where the virtual MAC is.
    std::thread::sleep(Duration::from_secs(1));
    traffic.check_flowing("after the switch relearned the virtual MAC")?;
    report.push(Figure {
        name: "fabric_frames_via_fab0",
        value: via_fab0 as f64,
        unit: "count",
    });
    report.push(Figure {
        name: "fabric_steer_gap_ms",
        value: steer_gap,
        unit: "ms",
    });
    push_v6_gap(report, traffic, "fabric_steer_gap_v6_ms", t0);
    report.push(Figure {
        name: "fabric_frames_via_fab1",
        value: via_fab1 as f64,
        unit: "count",
    });
    report.push(Figure {
        name: "fabric_fab0_cut_gap_ms",
        value: cut_gap,
        unit: "ms",
    });
    push_v6_gap(report, traffic, "fabric_fab0_cut_gap_v6_ms", t1);
    Ok(())
}

/// The IPv6 probes' largest gap since `t`, beside the IPv4 figure (dual
/// stack).
fn push_v6_gap(report: &mut Vec<Figure>, traffic: &Traffic, name: &'static str, t: Instant) {
    if let Some(gap) = traffic.largest_v6_gap_since(t) {
        report.push(Figure {
            name,
            value: gap,
            unit: "ms",
        });
    }
}

/// Frames node `n` sent over fabric link `link` (0 = fab0).
fn fabric_sent(rt: &Runtime, n: usize, link: usize) -> u64 {
    rt.block_on(statistics(n))
        .ok()
        .and_then(|v| v["fabric"]["sent"][link].as_u64())
        .unwrap_or(0)
}

/// JSON lines, or a table with the conntrackd+keepalived figure beside
/// Tandem's where the comparison ran.
fn print_report(report: &[Figure], notes: &[String], json: bool) {
    if json {
        for f in report {
            println!(
                "{{\"name\":\"{}\",\"value\":{:.3},\"unit\":\"{}\"}}",
                f.name, f.value, f.unit
            );
        }
        return;
    }
    let compared = report.iter().any(|f| f.name.starts_with("conntrackd_"));
    println!("\nTandem chassis-cluster demo report");
    if compared {
        println!(
            "  {:<32} {:>10} {:>24}",
            "", "tandem", "conntrackd+keepalived"
        );
    }
    let ours: Vec<&Figure> = report
        .iter()
        .filter(|f| !f.name.starts_with("conntrackd_"))
        .collect();
    for f in &ours {
        let peer = report
            .iter()
            .find(|p| p.name.strip_prefix("conntrackd_") == Some(f.name));
        match (compared, peer) {
            (true, Some(p)) => println!(
                "  {:<32} {:>10.1} {:>24.1} {}",
                f.name, f.value, p.value, f.unit
            ),
            (true, None) => println!("  {:<32} {:>10.1} {:>24} {}", f.name, f.value, "-", f.unit),
            (false, _) => println!("  {:<32} {:>10.1} {}", f.name, f.value, f.unit),
        }
    }
    // Peer-only figures (e.g. `lab peer-compare` alone).
    for p in report.iter().filter(|p| {
        p.name
            .strip_prefix("conntrackd_")
            .is_some_and(|n| !ours.iter().any(|f| f.name == n))
    }) {
        println!("  {:<40} {:>24.1} {}", p.name, p.value, p.unit);
    }
    for line in notes {
        println!("  note: {line}");
    }
}

/// Seconds of each stack's connection-rate run.
const CPS_SECONDS: f64 = 5.0;

/// The wire half of cps-bench: the generator through the Tandem pair,
/// then through the peer stack in the same topology; sessions on each
/// node 1 s after the generator stopped.
fn cps_compare(rt: &Runtime, json: bool) -> Result<(), String> {
    up(rt)?;
    cps::prepare_client()?;
    let primary = if is_primary(&rt.block_on(status(0))?) {
        0
    } else {
        1
    };
    step(&format!(
        "cps: {CPS_SECONDS} s of new TCP connections through the Tandem pair (node{primary} primary)"
    ));
    let tandem = cps::generate(CPS_SECONDS)?;
    std::thread::sleep(Duration::from_secs(1));
    let t_primary = synced_sessions(rt, primary)?;
    let t_peer = synced_sessions(rt, 1 - primary)?;
    down();
    // What the run must show for its figures to mean anything.
    if tandem.completed == 0 || tandem.failed * 100 > tandem.completed {
        return Err(format!(
            "cps: {} connections completed through the Tandem pair, {} failed",
            tandem.completed, tandem.failed
        ));
    }
    if t_peer * 100 < t_primary * 99 {
        return Err(format!(
            "cps: the peer held {t_peer} sessions 1 s after the run, the primary {t_primary}"
        ));
    }
    let (peer, p_primary, p_peer) = peer::cps_run()?;
    let mut report = Vec::new();
    let mut fig = |name: &'static str, value: f64, unit: &'static str| {
        report.push(Figure { name, value, unit });
    };
    for (stack, o, primary, peer) in [
        ("tandem", &tandem, t_primary, t_peer),
        ("conntrackd", &peer, p_primary, p_peer),
    ] {
        let n = |s: &'static str| -> &'static str {
            Box::leak(format!("{stack}_{s}").into_boxed_str())
        };
        fig(n("connections_per_s"), o.per_second(), "conn/s");
        fig(n("connections_failed"), o.failed as f64, "count");
        fig(n("first_packet_latency_p50_us"), o.connect_p50_us, "us");
        fig(n("first_packet_latency_p99_us"), o.connect_p99_us, "us");
        fig(n("sessions_on_primary_1s_after"), primary as f64, "count");
        fig(n("sessions_on_peer_1s_after"), peer as f64, "count");
    }
    fig(
        "cps_tandem_vs_conntrackd",
        tandem.per_second() / peer.per_second().max(1.0),
        "ratio",
    );
    print_report(&report, &[], json);
    Ok(())
}

fn synced_sessions(rt: &Runtime, n: usize) -> Result<u64, String> {
    let st = rt.block_on(status(n))?;
    Ok(rg1(&st)["sessions"].as_u64().unwrap_or(0))
}

fn rg_sync_stat(stats: &Value, key: &str) -> Option<u64> {
    stats["sync"]["rgs"]
        .as_array()?
        .iter()
        .find(|x| x[0] == 1)
        .and_then(|x| x[1][key].as_u64())
}

fn bulks_acked(rt: &Runtime, n: usize) -> u64 {
    rt.block_on(statistics(n))
        .ok()
        .and_then(|v| rg_sync_stat(&v, "bulks_acked"))
        .unwrap_or(0)
}
