//! The Linux-standard stack in the same lab, measured the same way: kernel
//! forwarding with nftables conntrack, SNAT to the VIP and the same DNAT
//! port-forward; keepalived (VRRPv3, 100 ms adverts, both VIPs in one sync
//! group, no preemption) moves the VIPs; conntrackd (FTFW over the control
//! link, external cache) replicates conntrack and commits it on takeover
//! (the stock primary-backup script's steps).
//!
//! The events mirror the Tandem demo: a manual failover (keepalived's
//! track file puts the primary into FAULT), a node failure (its data links
//! taken down and every process in its namespace SIGKILLed: the kernel
//! would otherwise keep forwarding, and keepalived's VRRP child would exit
//! gracefully), and the rejoin of that node with
//! a `conntrackd -n` resync. Every figure is prefixed `conntrackd_`.

use super::traffic::Traffic;
use super::{DIR, Figure, build_topology, down, kill_all_in, sh, step};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const NODES: [&str; 2] = ["tl-n0", "tl-n1"];

/// The binaries the comparison runs, and the Debian package of each.
pub const NEEDS: [(&str, &str); 4] = [
    ("keepalived", "keepalived"),
    ("conntrackd", "conntrackd"),
    ("conntrack", "conntrack"),
    ("nft", "nftables"),
];

fn missing() -> Vec<&'static str> {
    NEEDS
        .iter()
        .filter(|(bin, _)| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {bin}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .map(|(_, pkg)| *pkg)
        .collect()
}

fn nft_rules() -> &'static str {
    "table inet lab {
  chain forward {
    type filter hook forward priority 0; policy drop;
    ct state established,related accept
    iifname \"t0\" oifname \"u0\" accept
    iifname \"u0\" oifname \"t0\" ct status dnat accept
  }
}
table ip labnat {
  chain pre {
    type nat hook prerouting priority -100;
    iifname \"u0\" ip daddr 192.0.2.1 tcp dport 8080 dnat to 10.1.0.10:80
  }
  chain post {
    type nat hook postrouting priority 100;
    oifname \"u0\" snat to 192.0.2.1
  }
}
"
}

fn conntrackd_conf(n: usize) -> String {
    let (me, peer) = if n == 0 {
        ("10.255.0.1", "10.255.0.2")
    } else {
        ("10.255.0.2", "10.255.0.1")
    };
    format!(
        "Sync {{
    Mode FTFW {{
        DisableExternalCache Off
        ResendQueueSize 131072
    }}
    UDP {{
        IPv4_address {me}
        IPv4_Destination_Address {peer}
        Port 3780
        Interface ctl
        SndSocketBuffer 24985600
        RcvSocketBuffer 24985600
        Checksum on
    }}
}}
General {{
    Systemd off
    HashSize 32768
    HashLimit 262144
    LogFile {DIR}/ctd{n}.log
    Syslog off
    LockFile {DIR}/ctd{n}.lock
    UNIX {{
        Path {DIR}/ctd{n}.ctl
    }}
    NetlinkBufferSize 2097152
    NetlinkBufferSizeMaxGrowth 16777216
    NetlinkOverrunResync On
    Filter From Userspace {{
        Protocol Accept {{
            TCP
            UDP
            ICMP
        }}
        Address Ignore {{
            IPv4_address 127.0.0.1
            IPv4_address 10.255.0.0/30
            IPv4_address 10.254.0.0/23
        }}
    }}
}}
"
    )
}

fn keepalived_conf(n: usize) -> String {
    let prio = if n == 0 { 200 } else { 150 };
    let notify = format!("{DIR}/ka-notify.sh {DIR}/ctd{n}.conf");
    format!(
        "global_defs {{
    router_id tl-n{n}
    vrrp_version 3
    script_user root
    enable_script_security
}}
track_file manual {{
    file {DIR}/ka{n}.fault
    weight 0
    init_file 0
}}
vrrp_sync_group LAB {{
    group {{
        TRUST
        UNTRUST
    }}
    notify_master \"{notify} primary\"
    notify_backup \"{notify} backup\"
    notify_fault \"{notify} fault\"
}}
vrrp_instance TRUST {{
    state BACKUP
    nopreempt
    interface t0
    virtual_router_id 51
    priority {prio}
    advert_int 0.1
    virtual_ipaddress {{
        10.1.0.1/24 dev t0
    }}
    track_file {{
        manual weight 0
    }}
}}
vrrp_instance UNTRUST {{
    state BACKUP
    nopreempt
    interface u0
    virtual_router_id 52
    priority {prio}
    advert_int 0.1
    virtual_ipaddress {{
        192.0.2.1/24 dev u0
    }}
    track_file {{
        manual weight 0
    }}
}}
"
    )
}

/// The steps of conntrack-tools' primary-backup.sh.
const NOTIFY: &str = "#!/bin/sh
CONF=$1
case \"$2\" in
primary)
    conntrackd -C \"$CONF\" -c
    conntrackd -C \"$CONF\" -f
    conntrackd -C \"$CONF\" -R
    conntrackd -C \"$CONF\" -B
    ;;
backup)
    conntrackd -C \"$CONF\" -n
    ;;
fault)
    conntrackd -C \"$CONF\" -t
    ;;
esac
";

fn write(path: &str, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("{path}: {e}"))
}

fn setup() -> Result<(), String> {
    build_topology()?;
    std::fs::create_dir_all(DIR).map_err(|e| e.to_string())?;
    write(&format!("{DIR}/nft.rules"), nft_rules())?;
    write(&format!("{DIR}/ka-notify.sh"), NOTIFY)?;
    sh(&["chmod", "0755", &format!("{DIR}/ka-notify.sh")])?;
    for (n, ns) in NODES.iter().enumerate() {
        write(&format!("{DIR}/ctd{n}.conf"), &conntrackd_conf(n))?;
        write(&format!("{DIR}/ka{n}.conf"), &keepalived_conf(n))?;
        write(&format!("{DIR}/ka{n}.fault"), "0\n")?;
        sh(&[
            "ip",
            "-n",
            ns,
            "addr",
            "add",
            &format!("10.1.0.{}/24", n + 2),
            "dev",
            "t0",
        ])?;
        sh(&[
            "ip",
            "-n",
            ns,
            "addr",
            "add",
            &format!("192.0.2.{}/24", n + 2),
            "dev",
            "u0",
        ])?;
        sh(&[
            "ip",
            "netns",
            "exec",
            ns,
            "nft",
            "-f",
            &format!("{DIR}/nft.rules"),
        ])?;
        for kv in [
            "net.ipv4.ip_forward=1",
            // Picking up mid-stream TCP and not enforcing windows after a
            // takeover: what conntrackd deployments set.
            "net.netfilter.nf_conntrack_tcp_loose=1",
            "net.netfilter.nf_conntrack_tcp_be_liberal=1",
        ] {
            sh(&["ip", "netns", "exec", ns, "sysctl", "-qw", kv])?;
        }
    }
    Ok(())
}

/// The two daemons of node `n`.
struct Daemons {
    conntrackd: Child,
    keepalived: Child,
}

fn spawn_in(ns: &str, args: &[&str], log: &str) -> Result<Child, String> {
    let log = std::fs::File::create(log).map_err(|e| e.to_string())?;
    Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("{}: {e}", args[0]))
}

fn start(n: usize) -> Result<Daemons, String> {
    let _ = std::fs::remove_file(format!("{DIR}/ctd{n}.lock"));
    let _ = std::fs::remove_file(format!("{DIR}/ctd{n}.ctl"));
    let conntrackd = spawn_in(
        NODES[n],
        &["conntrackd", "-C", &format!("{DIR}/ctd{n}.conf")],
        &format!("{DIR}/ctd{n}.out"),
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let keepalived = spawn_in(
        NODES[n],
        &[
            "keepalived",
            "--vrrp",
            "--dont-fork",
            "--log-console",
            "-f",
            &format!("{DIR}/ka{n}.conf"),
            "-p",
            &format!("{DIR}/ka{n}.pid"),
            "-r",
            &format!("{DIR}/ka{n}-vrrp.pid"),
        ],
        &format!("{DIR}/ka{n}.log"),
    )?;
    Ok(Daemons {
        conntrackd,
        keepalived,
    })
}

impl Daemons {
    fn kill(&mut self) {
        for c in [&mut self.keepalived, &mut self.conntrackd] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Daemons {
    /// Also on an early error return: nothing outlives the comparison.
    fn drop(&mut self) {
        self.kill();
    }
}

fn has_vip(n: usize) -> bool {
    Command::new("ip")
        .args(["-n", NODES[n], "-4", "addr", "show", "dev", "t0"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("10.1.0.1/"))
}

/// An event's outcome on the peer stack: waits (10 s at most) for `cond`
/// (the takeover), lets traffic run 3 s more, and returns the time from
/// `t0` to the takeover, the largest probe gap since `t0` and, if traffic
/// stopped, a note saying so (reported, not fatal: the comparison records
/// what the peer stack lost).
fn takeover(
    traffic: &Traffic,
    t0: Instant,
    what: &str,
    after: &str,
    cond: impl Fn() -> bool,
) -> Result<(Duration, f64, String), String> {
    wait_until(what, Duration::from_secs(10), cond)?;
    let took = t0.elapsed();
    std::thread::sleep(Duration::from_secs(3));
    let note = traffic
        .check_flowing(&format!("peer stack, {after}"))
        .err()
        .map(|e| format!(" ({e})"))
        .unwrap_or_default();
    Ok((took, traffic.largest_gap_since(t0), note))
}

fn wait_until(what: &str, timeout: Duration, cond: impl Fn() -> bool) -> Result<(), String> {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > timeout {
            return Err(format!("peer stack: timed out waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn conntrackd_cli(n: usize, flag: &str) -> String {
    Command::new("ip")
        .args(["netns", "exec", NODES[n], "conntrackd", "-C"])
        .arg(format!("{DIR}/ctd{n}.conf"))
        .arg(flag)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Entries in node `n`'s conntrackd external cache (what it would commit).
fn external_entries(n: usize) -> u64 {
    conntrackd_cli(n, "-e").lines().count() as u64
}

/// Entries in node `n`'s kernel conntrack table.
fn kernel_entries(n: usize) -> u64 {
    Command::new("ip")
        .args(["netns", "exec", NODES[n], "conntrack", "-C"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(0)
}

/// The connection-rate run through the peer stack (the lab must be
/// down; removes what it built): the outcome, then the master's kernel
/// conntrack entries and the backup's external cache entries 1 s after.
pub fn cps_run() -> Result<(super::cps::CpsOutcome, u64, u64), String> {
    let missing = missing();
    if !missing.is_empty() {
        return Err(format!(
            "the peer comparison needs the Debian packages: {} (`./dev.sh demo` installs them)",
            missing.join(" ")
        ));
    }
    let r = (|| {
        setup()?;
        let _daemons = [start(0)?, start(1)?];
        wait_until("a keepalived master", Duration::from_secs(10), || {
            has_vip(0) || has_vip(1)
        })?;
        let master = if has_vip(0) { 0 } else { 1 };
        super::cps::prepare_client()?;
        step(&format!(
            "cps: {} s of new TCP connections through nftables conntrack + conntrackd FTFW (node{master} master)",
            super::CPS_SECONDS
        ));
        let out = super::cps::generate(super::CPS_SECONDS)?;
        std::thread::sleep(Duration::from_secs(1));
        Ok((out, kernel_entries(master), external_entries(1 - master)))
    })();
    down();
    r
}

/// Runs the comparison; the lab must be down. Removes what it built.
pub fn run() -> Result<Vec<Figure>, String> {
    let missing = missing();
    if !missing.is_empty() {
        return Err(format!(
            "the peer comparison needs the Debian packages: {} (`./dev.sh demo` installs them)",
            missing.join(" ")
        ));
    }
    step(
        "peer comparison: the same lab with nftables + conntrackd (FTFW) + keepalived (VRRPv3, 100 ms adverts)",
    );
    let r = measure();
    down();
    r
}

fn measure() -> Result<Vec<Figure>, String> {
    setup()?;
    let mut daemons = vec![start(0)?, start(1)?];
    wait_until("a keepalived master", Duration::from_secs(10), || {
        has_vip(0) || has_vip(1)
    })?;
    let first = if has_vip(0) { 0 } else { 1 };
    let second = 1 - first;
    step(&format!("peer: node{first} is keepalived master"));
    let stop = Arc::new(AtomicBool::new(false));
    // IPv4 only: the peer stack's keepalived/conntrackd set-up is IPv4.
    let traffic = Traffic::start(stop.clone(), false)?;
    std::thread::sleep(Duration::from_secs(3));
    traffic.check_flowing("peer stack, before failover")?;
    let mut report = Vec::new();
    let mut fig = |name: &'static str, value: f64, unit: &'static str| {
        report.push(Figure { name, value, unit });
    };
    let synced = external_entries(second);
    step(&format!(
        "peer: {synced} entries in node{second}'s conntrackd external cache (node{first}'s kernel has {})",
        kernel_entries(first)
    ));
    fig("conntrackd_sessions_synced", synced as f64, "count");

    step(&format!(
        "peer: manual failover (node{first} to FAULT by its track file)"
    ));
    let t1 = Instant::now();
    write(&format!("{DIR}/ka{first}.fault"), "1\n")?;
    let (decided, manual_gap, note) = takeover(
        &traffic,
        t1,
        "the backup to take the VIPs",
        "after the manual failover",
        || has_vip(second),
    )?;
    step(&format!(
        "peer: VIPs moved in {} ms; largest probe gap {manual_gap:.1} ms{note}",
        decided.as_millis()
    ));
    fig(
        "conntrackd_manual_failover_decision_ms",
        decided.as_secs_f64() * 1e3,
        "ms",
    );
    fig("conntrackd_manual_failover_gap_ms", manual_gap, "ms");
    // Clear the fault: node `first` returns as backup (no preemption).
    write(&format!("{DIR}/ka{first}.fault"), "0\n")?;
    std::thread::sleep(Duration::from_secs(2));
    fig(
        "conntrackd_sessions_synced_before_crash",
        external_entries(first) as f64,
        "count",
    );

    // Whoever holds the VIPs now fails (clearing the fault may have let
    // keepalived move them back despite nopreempt: say so).
    let (first, second) = if has_vip(second) {
        (first, second)
    } else {
        step(&format!(
            "peer: node{first} took the VIPs back when its fault cleared (nopreempt did not hold)"
        ));
        (second, first)
    };
    step(&format!(
        "peer: node{second} fails (t0/u0 down, every process in it SIGKILLed)"
    ));
    let t2 = Instant::now();
    for dev in ["t0", "u0"] {
        sh(&["ip", "-n", NODES[second], "link", "set", dev, "down"])?;
    }
    // Every process of the node at once (keepalived's VRRP child would
    // otherwise exit gracefully with a priority-0 advert: not a crash).
    kill_all_in(NODES[second]);
    daemons[second].kill();
    let (took, crash_gap, note) = takeover(
        &traffic,
        t2,
        "the survivor to take the VIPs",
        "after the crash",
        || has_vip(first),
    )?;
    step(&format!(
        "peer: node{first} took the VIPs in {} ms; largest probe gap {crash_gap:.1} ms{note}",
        took.as_millis()
    ));
    fig(
        "conntrackd_crash_takeover_ms",
        took.as_secs_f64() * 1e3,
        "ms",
    );
    fig("conntrackd_crash_failover_gap_ms", crash_gap, "ms");

    step(&format!(
        "peer: node{second} rejoins: conntrackd restarted empty, `conntrackd -n` resync"
    ));
    for dev in ["t0", "u0"] {
        sh(&["ip", "-n", NODES[second], "link", "set", dev, "up"])?;
    }
    let _ = std::fs::remove_file(format!("{DIR}/ka{second}.fault"));
    write(&format!("{DIR}/ka{second}.fault"), "0\n")?;
    daemons[second] = start(second)?;
    let target = kernel_entries(first);
    let t3 = Instant::now();
    let _ = conntrackd_cli(second, "-n");
    let resynced = wait_until("the resync", Duration::from_secs(20), || {
        external_entries(second) * 100 >= target * 95
    });
    let rejoin = t3.elapsed();
    step(&format!(
        "peer: node{second}'s external cache reached {} of {target} entries in {} ms",
        external_entries(second),
        rejoin.as_millis()
    ));
    if resynced.is_ok() {
        fig(
            "conntrackd_rejoin_bulk_ms",
            rejoin.as_secs_f64() * 1e3,
            "ms",
        );
    }
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let result = traffic.finish();
    fig(
        "conntrackd_tcp_connections_survived_pct",
        result.survived_pct,
        "%",
    );
    fig(
        "conntrackd_tcp_connections",
        result.connections as f64,
        "count",
    );
    fig(
        "conntrackd_udp_probes_sent",
        result.probes_sent as f64,
        "count",
    );
    fig(
        "conntrackd_udp_probes_lost",
        result.probes_lost as f64,
        "count",
    );
    for note in &result.notes {
        step(&format!("peer: {note}"));
    }
    for d in &mut daemons {
        d.kill();
    }
    Ok(report)
}
