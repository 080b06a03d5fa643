//! `tandem lab cps`: new TCP connections per second on the wire, through
//! the Tandem pair and then through nftables conntrack + conntrackd FTFW
//! in the same topology, same run (the wire half of cps-bench; the
//! pipeline half is `cps-bench` in tandem-cluster).
//!
//! The generator: `IN_FLIGHT` threads in the client namespace, each
//! connecting to server:5004 (SNATed on the way), waiting for the one byte
//! the server writes before it closes, closing, and starting over, until
//! the time is up (bounded: every connect and read has a 1 s timeout). A
//! connection completes when its byte arrived. The connect time (SYN sent
//! to SYN-ACK back, through the firewall's first-packet path) is its
//! first-packet latency. Both stacks see the same generator on the same 2
//! CPUs, so the figure is what the whole host completes — generator-bound
//! where the forwarding path leaves the generator CPU to spare.

use super::traffic::in_ns;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TARGET: &str = "192.0.2.100:5004";
const IN_FLIGHT: usize = 32;
const TIMEOUT: Duration = Duration::from_secs(1);

/// What one generator run measured.
pub struct CpsOutcome {
    pub completed: u64,
    pub failed: u64,
    pub seconds: f64,
    pub connect_p50_us: f64,
    pub connect_p99_us: f64,
}

impl CpsOutcome {
    pub fn per_second(&self) -> f64 {
        self.completed as f64 / self.seconds
    }
}

/// The server: accepts on :5004 in the server namespace, writes one byte
/// and closes each connection, until `stop` (a last self-connect wakes
/// the blocked accepts).
fn serve(stop: Arc<AtomicBool>) -> Vec<std::thread::JoinHandle<()>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let bind = in_ns("tl-server", move || {
        let _ = tx.send(TcpListener::bind("0.0.0.0:5004"));
    });
    let _ = bind.join();
    let Ok(Ok(listener)) = rx.recv() else {
        eprintln!("[lab] cps: cannot listen on server:5004");
        return Vec::new();
    };
    (0..2)
        .map(|_| {
            let l = listener.try_clone().expect("listener clone");
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Relaxed) {
                    if let Ok((mut s, _)) = l.accept() {
                        let _ = s.write_all(b"x");
                    }
                }
            })
        })
        .collect()
}

fn one_connection(target: &SocketAddr, latencies: &mut Vec<u32>) -> bool {
    let t = Instant::now();
    let Ok(mut s) = TcpStream::connect_timeout(target, TIMEOUT) else {
        return false;
    };
    latencies.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
    let _ = s.set_read_timeout(Some(TIMEOUT));
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Ok(1))
}

/// Runs the generator for `seconds` (the lab must be up, whichever stack).
pub fn generate(seconds: f64) -> Result<CpsOutcome, String> {
    let stop = Arc::new(AtomicBool::new(false));
    let servers = serve(stop.clone());
    if servers.is_empty() {
        return Err("cps: the server could not listen".into());
    }
    let target: SocketAddr = TARGET.parse().expect("literal");
    let completed = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let clients: Vec<_> = (0..IN_FLIGHT)
        .map(|_| {
            let (completed, failed, latencies) =
                (completed.clone(), failed.clone(), latencies.clone());
            in_ns("tl-client", move || {
                let mut mine = Vec::with_capacity(1 << 16);
                while Instant::now() < deadline {
                    if one_connection(&target, &mut mine) {
                        completed.fetch_add(1, Relaxed);
                    } else {
                        failed.fetch_add(1, Relaxed);
                    }
                }
                latencies.lock().expect("latencies").extend(mine);
            })
        })
        .collect();
    for c in clients {
        let _ = c.join();
    }
    let secs = start.elapsed().as_secs_f64();
    stop.store(true, Relaxed);
    // Wake each blocked accept once.
    for _ in &servers {
        let _ = in_ns("tl-client", move || {
            let _ = TcpStream::connect_timeout(&target, Duration::from_millis(200));
        })
        .join();
    }
    for s in servers {
        let _ = s.join();
    }
    let mut l = std::mem::take(&mut *latencies.lock().expect("latencies"));
    l.sort_unstable();
    let pct = |p: usize| {
        l.get((l.len() * p / 100).min(l.len().saturating_sub(1)))
            .copied()
    };
    Ok(CpsOutcome {
        completed: completed.load(Relaxed),
        failed: failed.load(Relaxed),
        seconds: secs,
        connect_p50_us: f64::from(pct(50).unwrap_or(0)),
        connect_p99_us: f64::from(pct(99).unwrap_or(0)),
    })
}

/// Widens the client's ephemeral ports (the generator reuses each one
/// every few seconds).
pub fn prepare_client() -> Result<(), String> {
    super::sh(&[
        "ip",
        "netns",
        "exec",
        "tl-client",
        "sysctl",
        "-qw",
        "net.ipv4.ip_local_port_range=1024 65000",
    ])
}
