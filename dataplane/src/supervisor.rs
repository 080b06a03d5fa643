//! A node's running dataplane: the XDP program on every port, one worker
//! thread per set of RX queues, and a housekeeping thread that expires
//! sessions in slices and watches the workers' health.
//!
//! Queues and workers: port `p` with `n(p)` RX queues has queue `q` served
//! by worker `q % W`, so every queue of every port has exactly one socket
//! (the XDP program redirects by `rx_queue_index`). `W` is the configured
//! count, or the most queues of any port, capped by the CPUs and by that
//! maximum (a worker with no queue would idle). Worker `w` is pinned to CPU
//! `w % cpus` and named `dp-worker-w`.
//!
//! Health ([`Health`]): a port is healthy while every one of its queues has
//! a socket whose worker runs. It is not when the socket failed to open,
//! its worker exited or panicked, the worker's loop stopped for
//! [`HUNG_AFTER_MS`], or the XDP program found no socket for frames of one
//! of its queues ([`XdpMaps::socket_counts`]). The daemon turns that into
//! the election's `dataplane:<device>` monitors.

use crate::afxdp::{AfXdp, AfXdpConfig, FabricHook, Handoff, IoStats, SocketSpec, WorkerLink};
use crate::core::CoreStats;
use crate::os;
use crate::session::{Clock, InterfaceId, Millis};
use crate::worker::{self, Shared, Worker};
use crate::xdp::{
    AttachMode, MAX_QUEUES, PortMode, XdpAttachment, XdpCounters, XdpMaps, socket_key,
};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;
use tracing::{error, info, warn};

/// A worker whose loop has not run for this long is hung.
pub const HUNG_AFTER_MS: u64 = 1000;
/// Expiry and health run this often.
const HOUSEKEEPING_MS: u64 = 100;

/// A dataplane port (data or fabric).
#[derive(Clone, Debug)]
pub struct PortSpec {
    pub iface: InterfaceId,
    pub device: String,
    pub mode: PortMode,
}

/// How a fabric hook is made for each worker.
pub type HookFactory = Arc<dyn Fn(usize) -> Box<dyn FabricHook> + Send + Sync>;

#[derive(Clone)]
pub struct PoolConfig {
    /// Worker threads (None: one per RX queue of the busiest port, capped
    /// by the CPUs).
    pub workers: Option<usize>,
    pub attach: AttachMode,
    pub afxdp: AfXdpConfig,
    /// Pin worker `w` to CPU `w % cpus`.
    pub pin: bool,
}

impl Default for PoolConfig {
    fn default() -> PoolConfig {
        PoolConfig {
            workers: None,
            attach: AttachMode::Auto,
            afxdp: AfXdpConfig::default(),
            pin: true,
        }
    }
}

/// Lifecycle of one worker.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WorkerState {
    Starting,
    Running,
    /// Its sockets could not be opened.
    Failed(String),
    /// It stopped (or panicked) while the dataplane was meant to run.
    Exited(String),
    Stopped,
}

/// What the daemon shows of one worker.
#[derive(Clone)]
pub struct WorkerView {
    pub index: usize,
    pub state: WorkerState,
    pub sockets: Vec<(String, u32)>,
    /// Frames consumed from each socket (same order as `sockets`).
    pub socket_rx: Vec<u64>,
    pub core: Arc<CoreStats>,
    pub io: Arc<IoStats>,
    pub heartbeat_ms: u64,
}

/// Per-port health, by device.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PortHealth {
    pub device: String,
    pub iface: u16,
    pub queues: u32,
    pub ok: bool,
    /// Why not (empty when ok).
    pub reason: String,
}

struct WorkerSlot {
    state: WorkerState,
    sockets: Vec<SocketSpec>,
    core: Arc<CoreStats>,
    io: Arc<IoStats>,
    link: Arc<WorkerLink>,
}

/// The dataplane's health and per-worker state, shared with the daemon.
pub struct Health {
    ports: Mutex<Vec<PortHealth>>,
    workers: Mutex<Vec<WorkerSlot>>,
    /// Why the dataplane as a whole is not running (attach failure...).
    error: Mutex<Option<String>>,
    running: AtomicBool,
}

fn guard<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Health {
    fn new() -> Health {
        Health {
            ports: Mutex::new(Vec::new()),
            workers: Mutex::new(Vec::new()),
            error: Mutex::new(None),
            running: AtomicBool::new(false),
        }
    }

    /// Every port with its health; empty before the dataplane attached.
    pub fn ports(&self) -> Vec<PortHealth> {
        guard(&self.ports).clone()
    }

    /// True once every worker runs and every port is healthy.
    pub fn running(&self) -> bool {
        self.running.load(Ordering::Relaxed)
    }

    pub fn error(&self) -> Option<String> {
        guard(&self.error).clone()
    }

    pub fn workers(&self) -> Vec<WorkerView> {
        guard(&self.workers)
            .iter()
            .enumerate()
            .map(|(index, w)| WorkerView {
                index,
                state: w.state.clone(),
                sockets: w
                    .sockets
                    .iter()
                    .map(|s| (s.device.clone(), s.queue))
                    .collect(),
                socket_rx: w
                    .link
                    .socket_rx
                    .iter()
                    .map(|c| c.load(Ordering::Relaxed))
                    .collect(),
                core: w.core.clone(),
                io: w.io.clone(),
                heartbeat_ms: w.link.heartbeat.load(Ordering::Relaxed),
            })
            .collect()
    }

    fn fail(&self, why: String) {
        error!(reason = %why, "dataplane");
        *guard(&self.error) = Some(why.clone());
        self.running.store(false, Ordering::Relaxed);
        for p in guard(&self.ports).iter_mut() {
            p.ok = false;
            p.reason = why.clone();
        }
    }

    fn set_worker(&self, w: usize, state: WorkerState) {
        if let Some(slot) = guard(&self.workers).get_mut(w) {
            slot.state = state;
        }
    }
}

/// A running dataplane. Dropping it stops the workers and detaches XDP.
pub struct Dataplane {
    stop: Arc<AtomicBool>,
    supervisor: Option<JoinHandle<()>>,
    pub health: Arc<Health>,
    maps: Arc<Mutex<Option<Arc<XdpMaps>>>>,
}

impl Dataplane {
    /// Starts the dataplane on `ports` in the calling thread's network
    /// namespace (threads inherit it). Returns at once; see
    /// [`Dataplane::wait_running`].
    pub fn start(
        ports: Vec<PortSpec>,
        cfg: PoolConfig,
        shared: Arc<Shared>,
        hooks: HookFactory,
        clock: Clock,
    ) -> Dataplane {
        let stop = Arc::new(AtomicBool::new(false));
        let health = Arc::new(Health::new());
        let maps = Arc::new(Mutex::new(None));
        let (s, h, m) = (stop.clone(), health.clone(), maps.clone());
        let supervisor = std::thread::Builder::new()
            .name("dp-supervisor".into())
            .spawn(move || supervise(ports, cfg, shared, hooks, clock, s, h, m))
            .expect("spawn dataplane supervisor");
        Dataplane {
            stop,
            supervisor: Some(supervisor),
            health,
            maps,
        }
    }

    /// Waits until every worker runs, or reports why not.
    pub fn wait_running(&self, timeout: Duration) -> Result<(), String> {
        let start = std::time::Instant::now();
        loop {
            if self.health.running() {
                return Ok(());
            }
            if let Some(e) = self.health.error() {
                return Err(e);
            }
            let failed: Vec<String> = self
                .health
                .workers()
                .into_iter()
                .filter_map(|w| match w.state {
                    WorkerState::Failed(e) | WorkerState::Exited(e) => {
                        Some(format!("worker {}: {e}", w.index))
                    }
                    _ => None,
                })
                .collect();
            if !failed.is_empty() {
                return Err(failed.join("; "));
            }
            if start.elapsed() >= timeout {
                return Err("dataplane did not start in time".into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The XDP program's counters (zero before it attached).
    pub fn xdp_counters(&self) -> XdpCounters {
        guard(&self.maps)
            .as_ref()
            .map(|m| m.counters())
            .unwrap_or_default()
    }

    /// Stops the workers, detaches XDP and returns the workers' final
    /// counters.
    pub fn stop(mut self) -> Vec<WorkerView> {
        self.shutdown();
        self.health.workers()
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.supervisor.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Which worker serves each queue of each port, and where the workers
/// without a socket on a port send its frames.
struct Plan {
    workers: usize,
    /// Per worker: its sockets.
    sockets: Vec<Vec<SocketSpec>>,
    /// Per worker: (interface, worker to hand its frames to).
    handoffs: Vec<Vec<(InterfaceId, usize)>>,
    queues: Vec<u32>,
}

fn plan(ports: &[PortSpec], queues: Vec<u32>, configured: Option<usize>, cpus: usize) -> Plan {
    let most = queues.iter().copied().max().unwrap_or(1).max(1) as usize;
    let workers = configured.unwrap_or(most.min(cpus)).clamp(1, most);
    let mut sockets = vec![Vec::new(); workers];
    let mut handoffs = vec![Vec::new(); workers];
    for (slot, (p, &n)) in ports.iter().zip(&queues).enumerate() {
        for q in 0..n {
            sockets[q as usize % workers].push(SocketSpec {
                iface: p.iface,
                device: p.device.clone(),
                mode: p.mode,
                queue: q,
                key: socket_key(slot as u32, q),
            });
        }
        for (w, h) in handoffs.iter_mut().enumerate().skip(n as usize) {
            // Worker w has no queue of this port: queue w % n's worker
            // (which is w % n itself) transmits for it.
            h.push((p.iface, w % n as usize));
        }
    }
    Plan {
        workers,
        sockets,
        handoffs,
        queues,
    }
}

#[allow(clippy::too_many_arguments)]
fn supervise(
    ports: Vec<PortSpec>,
    cfg: PoolConfig,
    shared: Arc<Shared>,
    hooks: HookFactory,
    clock: Clock,
    stop: Arc<AtomicBool>,
    health: Arc<Health>,
    maps_out: Arc<Mutex<Option<Arc<XdpMaps>>>>,
) {
    let mut indexes = Vec::new();
    let mut queues = Vec::new();
    for (slot, p) in ports.iter().enumerate() {
        let ifindex = match os::ifindex(&p.device) {
            Ok(i) => i,
            Err(e) => return health.fail(format!("interface {}: {e}", p.device)),
        };
        let n = match os::rx_queues(&p.device) {
            Ok(n) => n,
            Err(e) => return health.fail(format!("RX queues of {}: {e}", p.device)),
        };
        if n > MAX_QUEUES {
            return health.fail(format!(
                "{} has {n} RX queues; the dataplane serves at most {MAX_QUEUES}",
                p.device
            ));
        }
        indexes.push((ifindex, p.mode, slot as u32));
        queues.push(n);
    }
    // 802.1Q tags must reach the frames (a tagged frame must never look
    // untagged): receive VLAN offload off on data ports while the
    // dataplane runs; restored when this returns.
    let _offload = match VlanOffloadOff::apply(&ports) {
        Ok(g) => g,
        Err(e) => return health.fail(e),
    };
    *guard(&health.ports) = ports
        .iter()
        .zip(&queues)
        .map(|(p, &n)| PortHealth {
            device: p.device.clone(),
            iface: p.iface.0,
            queues: n,
            ok: false,
            reason: "starting".into(),
        })
        .collect();
    // Loaded, not attached yet: the workers bind and register their
    // sockets first, so no frame meets the program before its queue's
    // socket exists.
    let mut xdp = match XdpAttachment::load(&indexes) {
        Ok(x) => x,
        Err(e) => return health.fail(e.0),
    };
    let maps = xdp.maps().clone();
    *guard(&maps_out) = Some(maps.clone());
    let plan = plan(&ports, queues, cfg.workers, os::cpus());
    info!(workers = plan.workers, queues = ?plan.queues, "dataplane starting");
    // Inboxes for workers that transmit for others.
    let mut inboxes: Vec<Option<mpsc::Receiver<Handoff>>> = Vec::new();
    let mut senders = Vec::new();
    for _ in 0..plan.workers {
        let (tx, rx) = mpsc::sync_channel(crate::afxdp::HANDOFF_CAPACITY);
        senders.push(tx);
        inboxes.push(Some(rx));
    }
    *guard(&health.workers) = plan
        .sockets
        .iter()
        .map(|s| WorkerSlot {
            state: WorkerState::Starting,
            sockets: s.clone(),
            core: Arc::new(CoreStats::zeroed(shared.cfg.policies.len())),
            io: Arc::default(),
            link: Arc::new(WorkerLink {
                heartbeat: AtomicU64::new(0),
                socket_rx: s.iter().map(|_| AtomicU64::new(0)).collect(),
            }),
        })
        .collect();
    let mut threads = Vec::new();
    for w in 0..plan.workers {
        let specs = plan.sockets[w].clone();
        let routes: Vec<_> = plan.handoffs[w]
            .iter()
            .map(|(iface, to)| (*iface, senders[*to].clone()))
            .collect();
        let inbox = inboxes[w].take();
        let link = guard(&health.workers)[w].link.clone();
        let (shared, hooks, clock, stop, health, maps, afxdp) = (
            shared.clone(),
            hooks.clone(),
            clock.clone(),
            stop.clone(),
            health.clone(),
            maps.clone(),
            cfg.afxdp.clone(),
        );
        let pin = cfg.pin;
        let t = std::thread::Builder::new()
            .name(format!("dp-worker-{w}"))
            .spawn(move || {
                if pin && let Err(e) = os::pin_to_cpu(w % os::cpus()) {
                    warn!(worker = w, error = %e, "pinning");
                }
                if let Err(e) = os::raise_priority(os::WORKER_NICE) {
                    warn!(worker = w, error = %e, "worker priority (needs CAP_SYS_NICE)");
                }
                let _exit = ExitGuard {
                    health: health.clone(),
                    worker: w,
                    stop: stop.clone(),
                };
                let mut io = match AfXdp::open(&specs, &afxdp, &maps, &routes, inbox) {
                    Ok(io) => io,
                    Err(e) => {
                        error!(worker = w, error = %e, "dataplane worker");
                        health.set_worker(w, WorkerState::Failed(e.0));
                        return;
                    }
                };
                // Dropped before `io` on unwind: the worker is marked exited
                // before its sockets close, so the health check blames the
                // panic, not the frames that then find no socket.
                let _exit_before_sockets = ExitGuard {
                    health: health.clone(),
                    worker: w,
                    stop: stop.clone(),
                };
                let mut worker = Worker::new(shared);
                {
                    let mut ws = guard(&health.workers);
                    ws[w].core = worker.stats().clone();
                    ws[w].io = io.io.clone();
                }
                link.heartbeat.store(clock().0, Ordering::Relaxed);
                health.set_worker(w, WorkerState::Running);
                let mut hook = hooks(w);
                io.run(&mut worker, &mut *hook, &clock, &stop, &link, w == 0);
                io.unregister(&maps);
            })
            .expect("spawn dataplane worker");
        threads.push(t);
    }
    drop(senders);
    let bound = std::time::Instant::now();
    while guard(&health.workers)
        .iter()
        .any(|w| w.state == WorkerState::Starting)
        && bound.elapsed() < Duration::from_secs(30)
        && !stop.load(Ordering::Relaxed)
    {
        std::thread::sleep(Duration::from_millis(1));
    }
    // Attached even if a worker failed: the other ports (and RGs) still
    // work; health reports the failed ones.
    if let Err(e) = xdp.attach_all(&indexes, cfg.attach) {
        health.fail(e.0);
        stop.store(true, Ordering::Relaxed);
    }
    let mut watch = Watch::default();
    while !stop.load(Ordering::Relaxed) {
        let now = clock();
        worker::expire(&shared, now);
        watch.check(&health, &maps, &plan, now);
        std::thread::sleep(Duration::from_millis(HOUSEKEEPING_MS));
    }
    for t in threads {
        let _ = t.join();
    }
    for w in 0..plan.workers {
        health.set_worker(w, WorkerState::Stopped);
    }
    health.running.store(false, Ordering::Relaxed);
    drop(xdp);
    info!("dataplane stopped, XDP detached");
}

/// Receive VLAN offload turned off on data ports, turned back on when
/// dropped.
struct VlanOffloadOff {
    restore: Vec<String>,
}

impl VlanOffloadOff {
    fn apply(ports: &[PortSpec]) -> Result<VlanOffloadOff, String> {
        let mut g = VlanOffloadOff {
            restore: Vec::new(),
        };
        for p in ports.iter().filter(|p| p.mode == PortMode::Data) {
            match os::rx_vlan_offload(&p.device) {
                Ok(true) => {
                    os::set_rx_vlan_offload(&p.device, false).map_err(|e| {
                        format!(
                            "{}: cannot turn receive VLAN offload off ({e}): 802.1Q tags would not reach the dataplane",
                            p.device
                        )
                    })?;
                    info!(device = %p.device, "receive VLAN offload off while the dataplane runs");
                    g.restore.push(p.device.clone());
                }
                Ok(false) => {}
                // No such feature (no offload to turn off).
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
                Err(e) => warn!(device = %p.device, error = %e, "reading receive VLAN offload"),
            }
        }
        Ok(g)
    }
}

impl Drop for VlanOffloadOff {
    fn drop(&mut self) {
        for dev in &self.restore {
            if let Err(e) = os::set_rx_vlan_offload(dev, true) {
                warn!(device = %dev, error = %e, "restoring receive VLAN offload");
            }
        }
    }
}

/// Marks its worker exited when its thread ends while the dataplane was
/// meant to run (a return after a failure, or a panic).
struct ExitGuard {
    health: Arc<Health>,
    worker: usize,
    stop: Arc<AtomicBool>,
}

impl Drop for ExitGuard {
    fn drop(&mut self) {
        if self.stop.load(Ordering::Relaxed) {
            return;
        }
        let panicked = std::thread::panicking();
        let mut ws = guard(&self.health.workers);
        let Some(slot) = ws.get_mut(self.worker) else {
            return;
        };
        if matches!(slot.state, WorkerState::Failed(_) | WorkerState::Exited(_)) {
            return;
        }
        let why = if panicked { "panicked" } else { "exited" };
        error!(worker = self.worker, "dataplane worker {why}");
        slot.state = WorkerState::Exited(why.into());
    }
}

/// What the health check remembers between passes.
#[derive(Default)]
struct Watch {
    /// Unserved-frame counts per socket key at the last pass.
    unserved: Vec<(u32, u64)>,
}

impl Watch {
    fn check(&mut self, health: &Health, maps: &XdpMaps, plan: &Plan, now: Millis) {
        let workers = health.workers();
        // Why each worker cannot serve its queues, if it cannot.
        let trouble: Vec<Option<String>> = workers
            .iter()
            .map(|w| match &w.state {
                WorkerState::Starting => Some(format!("worker {} starting", w.index)),
                WorkerState::Failed(e) => Some(format!("worker {} failed: {e}", w.index)),
                WorkerState::Exited(e) => Some(format!("worker {} {e}", w.index)),
                WorkerState::Stopped => Some(format!("worker {} stopped", w.index)),
                WorkerState::Running => {
                    let idle = now.0.saturating_sub(w.heartbeat_ms);
                    (idle >= HUNG_AFTER_MS)
                        .then(|| format!("worker {} hung ({idle} ms without a loop)", w.index))
                }
            })
            .collect();
        let mut unserved = Vec::new();
        let mut ports = guard(&health.ports);
        for (slot, p) in ports.iter_mut().enumerate() {
            let mut reason = Vec::new();
            for q in 0..p.queues {
                let w = q as usize % plan.workers;
                if let Some(t) = &trouble[w] {
                    reason.push(format!("queue {q}: {t}"));
                    continue;
                }
                let key = socket_key(slot as u32, q);
                let (_, missed) = maps.socket_counts(key);
                let before = self
                    .unserved
                    .iter()
                    .find(|(k, _)| *k == key)
                    .map_or(missed, |(_, c)| *c);
                if missed > before {
                    reason.push(format!(
                        "queue {q}: {} frames found no socket",
                        missed - before
                    ));
                }
                unserved.push((key, missed));
            }
            p.ok = reason.is_empty();
            p.reason = reason.join("; ");
        }
        self.unserved = unserved;
        let all_ok = !ports.is_empty() && ports.iter().all(|p| p.ok);
        health.running.store(all_ok, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(i: u16, dev: &str) -> PortSpec {
        PortSpec {
            iface: InterfaceId(i),
            device: dev.into(),
            mode: PortMode::Data,
        }
    }

    #[test]
    fn every_queue_of_every_port_gets_exactly_one_socket() {
        let ports = [port(0, "a"), port(1, "b"), port(2, "fab0")];
        let p = plan(&ports, vec![4, 4, 1], None, 2);
        assert_eq!(p.workers, 2);
        let mut all: Vec<(String, u32)> = p
            .sockets
            .iter()
            .flatten()
            .map(|s| (s.device.clone(), s.queue))
            .collect();
        all.sort();
        let mut want: Vec<(String, u32)> = [("a", 4), ("b", 4), ("fab0", 1)]
            .into_iter()
            .flat_map(|(d, n)| (0..n).map(move |q| (d.to_string(), q)))
            .collect();
        want.sort();
        assert_eq!(all, want, "no queue unserved, none twice");
        assert_eq!(p.sockets[1].iter().filter(|s| s.device == "a").count(), 2);
        // Worker 1 has no socket on the 1-queue fabric port: worker 0
        // transmits for it.
        assert_eq!(p.handoffs[1], vec![(InterfaceId(2), 0)]);
        assert!(p.handoffs[0].is_empty());
        let keys: std::collections::BTreeSet<u32> =
            p.sockets.iter().flatten().map(|s| s.key).collect();
        assert_eq!(keys.len(), 9, "distinct socket keys");
    }

    #[test]
    fn worker_count_is_capped_by_queues_and_cpus() {
        let ports = [port(0, "a")];
        assert_eq!(plan(&ports, vec![8], None, 2).workers, 2, "by CPUs");
        assert_eq!(plan(&ports, vec![1], None, 2).workers, 1, "by queues");
        assert_eq!(
            plan(&ports, vec![2], Some(4), 8).workers,
            2,
            "a configured count beyond the queues would leave idle workers"
        );
        assert_eq!(plan(&ports, vec![4], Some(1), 8).workers, 1);
    }
}
