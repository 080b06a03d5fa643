//! A SYN flood against the sample port forward (192.0.2.1:8080 ->
//! 10.1.0.10:80) while a legitimate client opens real TCP connections to
//! it: what the screen test asserts and the screen bench measures.
//!
//! The flood is `hping3 -S --rand-source` (bounded by `timeout`) from an
//! attacker namespace bridged onto the untrust segment, so the firewall's
//! answers to it (cookies, resets) go back towards the attacker as they
//! would towards an upstream router, not into the legitimate client's
//! stack; the service is a TCP server in the trust namespace answering
//! each connection's request; the client, in the untrust namespace,
//! connects, sends a request and waits for the answer, one connection
//! after the other, for the flood's duration.

use super::{Firewall, Topo, in_ns, sh};
use crate::session::read;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The port forward's public face and the server behind it.
pub const PUBLIC: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 8080);
pub const SERVER: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(10, 1, 0, 10)), 80);

/// How hard to flood: as fast as hping3 can (`None`), or one SYN every
/// `interval_us` microseconds.
#[derive(Clone, Copy, Debug)]
pub struct Flood {
    pub seconds: u64,
    pub interval_us: Option<u32>,
}

/// What one run saw.
#[derive(Clone, Debug, Default)]
pub struct FloodOutcome {
    pub attempts: u32,
    pub succeeded: u32,
    /// Legitimate connections completed per second of the run.
    pub per_s: f64,
    /// Connect-to-answer time of the successful ones (ms).
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Frames the firewall received during the run (the flood, mostly),
    /// per second.
    pub rx_per_s: f64,
    /// The most sessions the table held, and its high watermark.
    pub max_sessions: usize,
    pub high_watermark: usize,
    /// Keys queued for the peer during the run.
    pub deltas: Vec<crate::delta::Delta>,
}

impl FloodOutcome {
    pub fn success_rate(&self) -> f64 {
        f64::from(self.succeeded) / f64::from(self.attempts.max(1))
    }

    /// One line for logs (without the keys).
    pub fn summary(&self) -> String {
        format!(
            "{}/{} connections ({:.0}/s, p50 {:.2} ms, p99 {:.2} ms), {:.0} frames/s in, \
             at most {} sessions (high watermark {}), {} keys for the peer",
            self.succeeded,
            self.attempts,
            self.per_s,
            self.p50_ms,
            self.p99_ms,
            self.rx_per_s,
            self.max_sessions,
            self.high_watermark,
            self.deltas.len()
        )
    }
}

/// A request-answer server on [`SERVER`] in namespace `ns` until `stop`.
fn serve(ns: &str, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    in_ns(ns, move || {
        let l = TcpListener::bind(SERVER).expect("bind the service");
        l.set_nonblocking(true).expect("nonblocking");
        while !stop.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((mut s, _)) => {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
                    let mut buf = [0u8; 64];
                    if let Ok(n) = s.read(&mut buf)
                        && n > 0
                    {
                        let _ = s.write_all(b"ok\n");
                    }
                }
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    })
}

/// One legitimate connection: connect, request, answer.
fn connect_once() -> Option<Duration> {
    let t = Instant::now();
    let mut s = TcpStream::connect_timeout(&PUBLIC, Duration::from_secs(3)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    s.write_all(b"GET\n").ok()?;
    let mut buf = [0u8; 3];
    s.read_exact(&mut buf).ok()?;
    (&buf == b"ok\n").then(|| t.elapsed())
}

/// A namespace on the untrust segment (192.0.2.200), bridged with the
/// client's: removed on drop.
struct Attacker {
    ns: String,
}

impl Attacker {
    fn new(outside: &str) -> Attacker {
        let ns = outside.replacen("tds", "tda", 1);
        sh(&["ip", "netns", "add", &ns]);
        let o = outside;
        // The bridge stays in the untrust namespace between runs.
        let bridged = Command::new("ip")
            .args(["-n", o, "link", "show", "br0"])
            .output()
            .is_ok_and(|out| out.status.success());
        if !bridged {
            for c in [
                vec!["ip", "-n", o, "link", "add", "br0", "type", "bridge"],
                vec!["ip", "-n", o, "link", "set", "s0", "master", "br0"],
                vec!["ip", "-n", o, "addr", "del", "192.0.2.100/24", "dev", "s0"],
                vec!["ip", "-n", o, "addr", "add", "192.0.2.100/24", "dev", "br0"],
                vec!["ip", "-n", o, "link", "set", "br0", "up"],
                vec![
                    "ip", "netns", "exec", o, "ethtool", "-K", "br0", "tx", "off",
                ],
            ] {
                sh(&c);
            }
        }
        for c in [
            vec![
                "ip", "-n", o, "link", "add", "a1", "type", "veth", "peer", "name", "a0", "netns",
                &ns,
            ],
            vec!["ip", "-n", o, "link", "set", "a1", "master", "br0"],
            vec!["ip", "-n", o, "link", "set", "a1", "up"],
            vec!["ip", "-n", &ns, "link", "set", "a0", "up"],
            vec!["ip", "-n", &ns, "link", "set", "lo", "up"],
            vec![
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                "192.0.2.200/24",
                "dev",
                "a0",
            ],
        ] {
            sh(&c);
        }
        Attacker { ns }
    }
}

impl Drop for Attacker {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

fn start_flood(ns: &str, f: Flood) -> Child {
    let secs = f.seconds.to_string();
    let mut args = vec![
        "netns".to_string(),
        "exec".into(),
        ns.into(),
        "timeout".into(),
        secs,
        "hping3".into(),
        "-q".into(),
        "-S".into(),
        "--rand-source".into(),
        "-p".into(),
        "8080".into(),
    ];
    match f.interval_us {
        None => args.push("--flood".into()),
        Some(us) => args.extend(["-i".into(), format!("u{us}")]),
    }
    args.push("192.0.2.1".into());
    Command::new("ip")
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("hping3 (apt install hping3)")
}

/// Runs the flood and the legitimate client together through `fw`.
pub fn run(topo: &Topo, fw: &Firewall, f: Flood) -> FloodOutcome {
    let (inside, outside) = (&topo.ns[0], &topo.ns[2]);
    let attacker = Attacker::new(outside);
    // The service's SYN queue must not be what limits the run.
    sh(&[
        "ip",
        "netns",
        "exec",
        inside,
        "sysctl",
        "-qw",
        "net.ipv4.tcp_syncookies=1",
    ]);
    let stop = Arc::new(AtomicBool::new(false));
    let server = serve(inside, stop.clone());
    std::thread::sleep(Duration::from_millis(200));
    fw.take_deltas();
    let rx0 = fw.rx_frames();
    let started = Instant::now();
    let mut flood = start_flood(&attacker.ns, f);
    std::thread::sleep(Duration::from_millis(300));
    let until = started + Duration::from_secs(f.seconds) - Duration::from_millis(300);
    let client = in_ns(outside, move || {
        let mut times = Vec::new();
        let mut attempts = 0u32;
        while Instant::now() < until {
            attempts += 1;
            if let Some(t) = connect_once() {
                times.push(t);
            }
        }
        (attempts, times)
    });
    let mut max_sessions = 0;
    while !client.is_finished() {
        max_sessions = max_sessions.max(read(&fw.table).len());
        std::thread::sleep(Duration::from_millis(10));
    }
    let (attempts, mut times) = client.join().expect("client");
    let client_s = started.elapsed().as_secs_f64() - 0.3;
    let _ = flood.wait();
    let elapsed = started.elapsed().as_secs_f64();
    let rx = fw.rx_frames() - rx0;
    stop.store(true, Ordering::Relaxed);
    let _ = server.join();
    drop(attacker);
    times.sort();
    let pct = |p: f64| {
        times
            .get(((times.len() as f64 * p) as usize).min(times.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    FloodOutcome {
        attempts,
        succeeded: times.len() as u32,
        per_s: times.len() as f64 / client_s.max(0.1),
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        rx_per_s: rx as f64 / elapsed,
        max_sessions,
        high_watermark: read(&fw.table).watermark_sessions().0,
        deltas: fw.take_deltas(),
    }
}
