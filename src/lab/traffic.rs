//! Demo traffic, run on threads that entered the lab's namespaces:
//! - 4 long-lived TCP streams client -> server:5001 (SNAT), one 64-byte
//!   message and its echo every 10 ms;
//! - 1 TCP stream server -> 192.0.2.1:8080 (DNAT to client:80), same rhythm;
//! - UDP probes client -> server:5002 every 1 ms, echoed: the largest gap
//!   between echoes is the traffic gap of an event;
//! - 3000 one-datagram UDP flows (sessions to sync);
//! - dual stack: 2 more TCP streams and the same UDP probes over IPv6,
//!   client -> [2001:db8:2::100] (SNAT66 to 2001:db8:2::1), their gaps
//!   reported beside the IPv4 ones.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tandem_dataplane::os::enter_netns;

const MSG: usize = 64;

struct Stream {
    name: String,
    rx_times: Mutex<Vec<Instant>>,
    error: Mutex<Option<String>>,
}

/// One family's 1 ms UDP probes: when each echo came back, how many went.
#[derive(Default)]
struct Probes {
    rx: Arc<Mutex<Vec<Instant>>>,
    sent: Arc<AtomicU64>,
}

pub struct Traffic {
    stop: Arc<AtomicBool>,
    streams: Vec<Arc<Stream>>,
    probes: Probes,
    /// The IPv6 probes, when dual stack.
    probes6: Option<Probes>,
    threads: Vec<JoinHandle<()>>,
}

pub struct Outcome {
    pub connections: usize,
    pub survived_pct: f64,
    pub probes_sent: u64,
    pub probes_lost: u64,
    /// IPv6 probes (dual stack only).
    pub probes6: Option<(u64, u64)>,
    pub notes: Vec<String>,
}

/// Sends a probe to `target` every 1 ms from namespace `ns` and records
/// when each echo came back, until `stop`.
fn run_probes(target: &'static str, probes: &Probes, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    let (rx, sent) = (probes.rx.clone(), probes.sent.clone());
    in_ns("tl-client", move || {
        let bind = if target.starts_with('[') {
            "[::]:0"
        } else {
            "0.0.0.0:0"
        };
        let Ok(u) = UdpSocket::bind(bind) else {
            return;
        };
        if u.connect(target).is_err() {
            return;
        }
        let Ok(r) = u.try_clone() else { return };
        let s2 = stop.clone();
        let receiver = std::thread::spawn(move || {
            let _ = r.set_read_timeout(Some(Duration::from_millis(200)));
            let mut buf = [0u8; 16];
            while !s2.load(Ordering::Relaxed) {
                if r.recv(&mut buf).is_ok() {
                    rx.lock().expect("lock").push(Instant::now());
                }
            }
        });
        let start = Instant::now();
        let mut seq = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let _ = u.send(&seq.to_be_bytes());
            sent.fetch_add(1, Ordering::Relaxed);
            seq += 1;
            let due = start + Duration::from_millis(seq);
            if let Some(d) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(d);
            }
        }
        let _ = receiver.join();
    })
}

/// The largest interval between two consecutive echoes from just before
/// `t` until now, in ms.
fn largest_gap(rx: &Mutex<Vec<Instant>>, t: Instant) -> f64 {
    let rx = rx.lock().expect("lock");
    let from = t.checked_sub(Duration::from_millis(100)).unwrap_or(t);
    let times: Vec<&Instant> = rx.iter().filter(|x| **x >= from).collect();
    let mut gap = times
        .first()
        .map_or(0.0, |f| f.duration_since(t.min(**f)).as_secs_f64() * 1e3);
    for w in times.windows(2) {
        gap = f64::max(gap, w[1].duration_since(*w[0]).as_secs_f64() * 1e3);
    }
    gap
}

pub(super) fn in_ns(ns: &'static str, f: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
    std::thread::spawn(move || {
        if let Err(e) = enter_netns(ns) {
            eprintln!("[lab] cannot enter {ns}: {e}");
            return;
        }
        f()
    })
}

/// Echoes fixed-size messages on every accepted connection until `stop`.
fn echo_server(listener: TcpListener, stop: Arc<AtomicBool>) {
    listener
        .set_nonblocking(true)
        .expect("nonblocking listener");
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((mut s, _)) => {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                    let mut buf = [0u8; MSG];
                    while !stop.load(Ordering::Relaxed) {
                        match s.read_exact(&mut buf) {
                            Ok(()) => {
                                if s.write_all(&buf).is_err() {
                                    return;
                                }
                            }
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                                ) => {}
                            Err(_) => return,
                        }
                    }
                });
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn run_stream(st: Arc<Stream>, target: &'static str, stop: Arc<AtomicBool>) {
    let fail = |e: String| *st.error.lock().expect("lock") = Some(e);
    let mut s =
        match TcpStream::connect_timeout(&target.parse().expect("addr"), Duration::from_secs(10)) {
            Ok(s) => s,
            Err(e) => return fail(format!("connect: {e}")),
        };
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let _ = s.set_nodelay(true);
    let mut seq = 0u64;
    let mut buf = [0u8; MSG];
    while !stop.load(Ordering::Relaxed) {
        let mut msg = [0u8; MSG];
        msg[..8].copy_from_slice(&seq.to_be_bytes());
        if let Err(e) = s.write_all(&msg) {
            return fail(format!("write: {e}"));
        }
        if let Err(e) = s.read_exact(&mut buf) {
            return fail(format!("read: {e}"));
        }
        if buf != msg {
            return fail("echo mismatch".into());
        }
        st.rx_times.lock().expect("lock").push(Instant::now());
        seq += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Traffic {
    /// Starts the traffic; `dual_stack` adds the IPv6 streams and probes.
    pub fn start(stop: Arc<AtomicBool>, dual_stack: bool) -> Result<Traffic, String> {
        let mut threads = Vec::new();
        // Servers first (dual-stack sockets: IPv4 clients arrive mapped).
        let s = stop.clone();
        threads.push(in_ns("tl-server", move || {
            match TcpListener::bind("[::]:5001").or_else(|_| TcpListener::bind("0.0.0.0:5001")) {
                Ok(l) => echo_server(l, s),
                Err(e) => eprintln!("[lab] server tcp: {e}"),
            }
        }));
        let s = stop.clone();
        threads.push(in_ns("tl-server", move || {
            let Ok(u) = UdpSocket::bind("[::]:5002").or_else(|_| UdpSocket::bind("0.0.0.0:5002"))
            else {
                return;
            };
            let _ = u.set_read_timeout(Some(Duration::from_millis(200)));
            let mut buf = [0u8; 64];
            while !s.load(Ordering::Relaxed) {
                if let Ok((n, from)) = u.recv_from(&mut buf) {
                    let _ = u.send_to(&buf[..n], from);
                }
            }
        }));
        let s = stop.clone();
        threads.push(in_ns("tl-server", move || {
            let Ok(u) = UdpSocket::bind("0.0.0.0:5003") else {
                return;
            };
            let _ = u.set_read_timeout(Some(Duration::from_millis(200)));
            let mut buf = [0u8; 64];
            while !s.load(Ordering::Relaxed) {
                let _ = u.recv_from(&mut buf);
            }
        }));
        let s = stop.clone();
        threads.push(in_ns("tl-client", move || {
            match TcpListener::bind("0.0.0.0:80") {
                Ok(l) => echo_server(l, s),
                Err(e) => eprintln!("[lab] client tcp :80: {e}"),
            }
        }));
        std::thread::sleep(Duration::from_millis(300));
        let mut streams = Vec::new();
        let streams_v6 = if dual_stack { 2 } else { 0 };
        for i in 0..5 + streams_v6 {
            let (ns, target, name) = match i {
                0..4 => ("tl-client", "192.0.2.100:5001", format!("snat-{i}")),
                4 => ("tl-server", "192.0.2.1:8080", "dnat-0".to_string()),
                _ => (
                    "tl-client",
                    "[2001:db8:2::100]:5001",
                    format!("snat6-{}", i - 5),
                ),
            };
            let st = Arc::new(Stream {
                name,
                rx_times: Mutex::default(),
                error: Mutex::default(),
            });
            streams.push(st.clone());
            let s = stop.clone();
            threads.push(in_ns(ns, move || run_stream(st, target, s)));
        }
        let probes = Probes::default();
        threads.push(run_probes("192.0.2.100:5002", &probes, stop.clone()));
        let probes6 = dual_stack.then(Probes::default);
        if let Some(p6) = &probes6 {
            threads.push(run_probes("[2001:db8:2::100]:5002", p6, stop.clone()));
        }
        let s = stop.clone();
        threads.push(in_ns("tl-client", move || {
            for _ in 0..3000 {
                if s.load(Ordering::Relaxed) {
                    return;
                }
                if let Ok(u) = UdpSocket::bind("0.0.0.0:0") {
                    let _ = u.send_to(b"flow", "192.0.2.100:5003");
                }
                std::thread::sleep(Duration::from_micros(500));
            }
        }));
        Ok(Traffic {
            stop,
            streams,
            probes,
            probes6,
            threads,
        })
    }

    /// Every stream and the probes received something in the last second.
    pub fn check_flowing(&self, when: &str) -> Result<(), String> {
        let now = Instant::now();
        for st in &self.streams {
            if let Some(e) = st.error.lock().expect("lock").clone() {
                return Err(format!("{when}: TCP stream {} failed: {e}", st.name));
            }
            let last = st.rx_times.lock().expect("lock").last().copied();
            if last.is_none_or(|t| now.duration_since(t) > Duration::from_secs(1)) {
                return Err(format!("{when}: TCP stream {} is not flowing", st.name));
            }
        }
        for (family, p) in std::iter::once(("IPv4", &self.probes))
            .chain(self.probes6.as_ref().map(|p| ("IPv6", p)))
        {
            let last = p.rx.lock().expect("lock").last().copied();
            if last.is_none_or(|t| now.duration_since(t) > Duration::from_secs(1)) {
                return Err(format!("{when}: {family} UDP probes are not coming back"));
            }
        }
        Ok(())
    }

    /// [`Traffic::largest_gap_since`] of the IPv6 probes (dual stack).
    pub fn largest_v6_gap_since(&self, t: Instant) -> Option<f64> {
        self.probes6.as_ref().map(|p| largest_gap(&p.rx, t))
    }

    /// The largest interval between two consecutive probe echoes from just
    /// before `t` until now, in ms: the traffic gap of the event at `t`.
    pub fn largest_gap_since(&self, t: Instant) -> f64 {
        largest_gap(&self.probes.rx, t)
    }

    pub fn finish(self) -> Outcome {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        let mut notes = Vec::new();
        let survived = self
            .streams
            .iter()
            .filter(|st| match st.error.lock().expect("lock").clone() {
                Some(e) => {
                    notes.push(format!("TCP stream {} failed: {e}", st.name));
                    false
                }
                None => true,
            })
            .count();
        let count = |p: &Probes| {
            let sent = p.sent.load(Ordering::Relaxed);
            let got = p.rx.lock().expect("lock").len() as u64;
            (sent, sent.saturating_sub(got))
        };
        let (sent, lost) = count(&self.probes);
        Outcome {
            connections: self.streams.len(),
            survived_pct: 100.0 * survived as f64 / self.streams.len().max(1) as f64,
            probes_sent: sent,
            probes_lost: lost,
            probes6: self.probes6.as_ref().map(count),
            notes,
        }
    }
}
