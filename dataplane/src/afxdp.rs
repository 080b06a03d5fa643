//! The AF_XDP I/O shell of one worker: one socket per (port, RX queue)
//! the worker serves, all on the worker's own UMEM, so a frame received on
//! one port is transmitted on another without a copy and no frame is ever
//! shared between threads. The worker runs its [`Worker`] over each
//! socket's received batch.
//!
//! Bounds: the UMEM holds `frames_per_socket` frames per socket (4 KiB
//! each). Each socket keeps half of its share in its fill ring; the rest
//! serves transmissions and frames the core builds (ARP, NA, GARP). When
//! no frame is free, a built frame is dropped and counted (`tx_no_frame`);
//! when a TX ring is full the frame is dropped and counted
//! (`tx_ring_full`).
//!
//! A worker transmits on a port through its own socket on that port. A
//! port with fewer queues than there are workers leaves some workers with
//! no socket on it; those hand such frames (copied) to the worker serving
//! the port's queue 0 through a bounded queue ([`HANDOFF_CAPACITY`]; full:
//! dropped and counted as `handoff_dropped`).
//!
//! Copy mode needs a kick (sendto) to transmit, and the kernel sends at
//! most 32 descriptors per kick, so TX goes out in chunks of 32.

use crate::config::{Compiled, Mirror};
use crate::core::{Arrival, CoreStats, DropReason, FabricOut, Verdict, bump};
use crate::packet;
use crate::session::{Clock, InterfaceId, Millis};
use crate::worker::{AnnounceSchedule, FrameBurst, Worker};
use crate::xdp::{PortMode, XdpMaps};
use std::num::NonZeroU32;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;
use tandem_fabric::header as fabric_header;
use tandem_proto::RgId;
use tracing::{info, warn};
use xsk_rs::config::{BindFlags, Interface, LibxdpFlags, QueueSize, SocketConfig, UmemConfig};
use xsk_rs::{CompQueue, FillQueue, FrameDesc, RxQueue, TxQueue, Umem};

/// Largest batch of frames taken from one RX ring at a time.
pub const BATCH: usize = 64;
/// Descriptors per TX kick (the copy-mode transmit limit).
const KICK: usize = 32;
/// Frames one worker may have queued for another's port.
pub const HANDOFF_CAPACITY: usize = 1024;

/// One socket a worker opens: RX queue `queue` of `device`, at `key` in
/// the XDP program's socket map.
#[derive(Clone, Debug)]
pub struct SocketSpec {
    pub iface: InterfaceId,
    pub device: String,
    pub mode: PortMode,
    pub queue: u32,
    pub key: u32,
}

#[derive(Clone, Debug)]
pub struct AfXdpConfig {
    pub frames_per_socket: u32,
    /// Try zero-copy first (drivers that support it); veth does not.
    pub zero_copy: bool,
}

impl Default for AfXdpConfig {
    fn default() -> Self {
        AfXdpConfig {
            frames_per_socket: 2048,
            zero_copy: false,
        }
    }
}

#[derive(Debug)]
pub struct AfXdpError(pub String);

impl std::fmt::Display for AfXdpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for AfXdpError {}

/// I/O counters of one worker's shell (the core counts forwarding
/// decisions). Only the worker writes them ([`bump`]).
#[derive(Debug, Default)]
pub struct IoStats {
    pub rx_frames: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_ring_full: AtomicU64,
    pub tx_no_frame: AtomicU64,
    pub fabric_unhandled: AtomicU64,
    pub wakeup_errors: AtomicU64,
    pub handoff_sent: AtomicU64,
    pub handoff_received: AtomicU64,
    pub handoff_dropped: AtomicU64,
    /// Frames for a port nobody can transmit on (no socket, no handoff).
    pub tx_no_socket: AtomicU64,
    /// Kernel drops on this worker's sockets (XDP_STATISTICS, summed):
    /// RX ring full and fill ring empty.
    pub kernel_rx_dropped: AtomicU64,
    pub kernel_rx_ring_full: AtomicU64,
    pub kernel_fill_ring_empty: AtomicU64,
    /// Port mirroring: copies sent, dropped because the frame pool was at
    /// its reserve for original traffic, dropped because the backlog was
    /// full, and frames not sampled (1 in N).
    pub mirror_admitted: AtomicU64,
    pub mirror_no_frame: AtomicU64,
    pub mirror_queue_full: AtomicU64,
    pub mirror_sampled_out: AtomicU64,
}

impl IoStats {
    /// Adds `other`'s counts to `self` (merging workers for display).
    pub fn add(&self, o: &IoStats) {
        let pairs = [
            (&self.rx_frames, &o.rx_frames),
            (&self.tx_frames, &o.tx_frames),
            (&self.tx_ring_full, &o.tx_ring_full),
            (&self.tx_no_frame, &o.tx_no_frame),
            (&self.fabric_unhandled, &o.fabric_unhandled),
            (&self.wakeup_errors, &o.wakeup_errors),
            (&self.handoff_sent, &o.handoff_sent),
            (&self.handoff_received, &o.handoff_received),
            (&self.handoff_dropped, &o.handoff_dropped),
            (&self.tx_no_socket, &o.tx_no_socket),
            (&self.kernel_rx_dropped, &o.kernel_rx_dropped),
            (&self.kernel_rx_ring_full, &o.kernel_rx_ring_full),
            (&self.kernel_fill_ring_empty, &o.kernel_fill_ring_empty),
            (&self.mirror_admitted, &o.mirror_admitted),
            (&self.mirror_no_frame, &o.mirror_no_frame),
            (&self.mirror_queue_full, &o.mirror_queue_full),
            (&self.mirror_sampled_out, &o.mirror_sampled_out),
        ];
        for (a, b) in pairs {
            a.fetch_add(b.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }
}

/// Where the fabric layer sends a frame: a fabric port, and the bytes
/// (Ethernet + fabric header) the worker writes in front of the frame in
/// its own buffer — no copy of the frame, no allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FabricTx {
    pub port: InterfaceId,
    pub prefix: [u8; fabric_header::OVERHEAD],
}

/// What a frame that arrived over the fabric is for; the inner frame
/// follows the first `fabric_header::OVERHEAD` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FabricInbound {
    /// Process it as if it had arrived on this node's member of `iface`.
    Process { iface: InterfaceId },
    /// Transmit it, already processed, on `iface`.
    Transmit { iface: InterfaceId },
}

/// The fabric layer's hook into the worker (frames for RGs this node is not
/// primary for, and frames arriving on fabric ports). `None` means dropped
/// (counted by the hook).
pub trait FabricHook: Send {
    /// A frame of `rg` that arrived on `ingress` and must go to the owner
    /// unprocessed.
    fn to_owner(&mut self, rg: RgId, ingress: InterfaceId) -> Option<FabricTx>;
    /// A processed frame that must leave on `iface`, whose RG the peer owns.
    fn egress_to_owner(&mut self, rg: RgId, iface: InterfaceId) -> Option<FabricTx>;
    /// A frame that arrived on fabric port `port`.
    fn arrived_on_fabric(&mut self, frame: &[u8], port: InterfaceId) -> Option<FabricInbound>;
}

/// For nodes without fabric links: every fabric frame is dropped (and
/// counted by the worker).
pub struct NoFabric;

impl FabricHook for NoFabric {
    fn to_owner(&mut self, _: RgId, _: InterfaceId) -> Option<FabricTx> {
        None
    }
    fn egress_to_owner(&mut self, _: RgId, _: InterfaceId) -> Option<FabricTx> {
        None
    }
    fn arrived_on_fabric(&mut self, _: &[u8], _: InterfaceId) -> Option<FabricInbound> {
        None
    }
}

/// A frame one worker hands another for transmission on `iface`.
pub type Handoff = (InterfaceId, Vec<u8>);

/// What a worker's loop reports and obeys, shared with its supervisor.
#[derive(Debug, Default)]
pub struct WorkerLink {
    /// Clock time (ms) of the worker's last loop iteration: a worker whose
    /// heartbeat stops is hung.
    pub heartbeat: AtomicU64,
    /// Frames consumed from each of the worker's sockets, in the order of
    /// its specs (health: redirected to a socket but never consumed).
    pub socket_rx: Vec<AtomicU64>,
}

struct Socket {
    spec: SocketSpec,
    tx: TxQueue,
    rx: RxQueue,
    fq: FillQueue,
    cq: CompQueue,
    pending: Vec<FrameDesc>,
    in_fill: usize,
    fill_target: usize,
}

/// Where this worker transmits on an interface.
#[derive(Clone)]
enum TxRoute {
    Socket(usize),
    Handoff(mpsc::SyncSender<Handoff>),
    None,
}

/// One worker's sockets, UMEM and frame pool.
pub struct AfXdp {
    umem: Umem,
    free: Vec<FrameDesc>,
    sockets: Vec<Socket>,
    /// Transmit route by interface id.
    routes: Vec<TxRoute>,
    /// Frames other workers handed this one.
    inbox: Option<mpsc::Receiver<Handoff>>,
    /// Logical interfaces (802.1Q units) by port and tag, from the
    /// worker's configuration when it runs.
    units: Option<Arc<Compiled>>,
    /// Port mirrors of this worker's ports, each with its sample count.
    mirrors: Vec<(Mirror, u32)>,
    /// Copies waiting for the frames originals left (at most
    /// [`MIRROR_BACKLOG`]), and spent buffers for the next ones.
    mirror_backlog: Vec<(InterfaceId, Vec<u8>)>,
    mirror_spare: Vec<Vec<u8>>,
    /// Free frames kept for original traffic (and RX refills): copies are
    /// sent only above it.
    mirror_reserve: usize,
    pub io: Arc<IoStats>,
}

/// Mirror copies one worker holds between receiving and sending them.
pub const MIRROR_BACKLOG: usize = 256;

/// The frames of one received batch, as the core's driver takes them.
struct XskBurst<'a> {
    umem: &'a Umem,
    descs: &'a mut [FrameDesc],
    arrivals: &'a [Arrival],
}

impl FrameBurst for XskBurst<'_> {
    fn len(&self) -> usize {
        self.arrivals.len()
    }

    fn frame(&mut self, i: usize) -> (&mut [u8], Arrival) {
        // SAFETY: the descriptor was consumed from an RX ring (or belongs to
        // the pool) and is this worker's alone until queued or freed; the
        // UMEM outlives the burst, and each frame is lent once per borrow.
        let mut data = unsafe { self.umem.data_mut(&mut self.descs[i]) };
        let c = data.contents_mut();
        let (ptr, len) = (c.as_mut_ptr(), c.len());
        // SAFETY: `ptr..ptr+len` is the frame's data in the UMEM mapping
        // (see above); the returned borrow is tied to `&mut self`.
        (
            unsafe { std::slice::from_raw_parts_mut(ptr, len) },
            self.arrivals[i],
        )
    }
}

impl AfXdp {
    /// Binds one socket per spec on a new UMEM and registers each in the
    /// XDP program's socket map. `routes_to` says, for interfaces this
    /// worker has no socket on, which other worker's inbox takes its
    /// frames; `inbox` is this worker's own.
    pub fn open(
        specs: &[SocketSpec],
        cfg: &AfXdpConfig,
        maps: &XdpMaps,
        routes_to: &[(InterfaceId, mpsc::SyncSender<Handoff>)],
        inbox: Option<mpsc::Receiver<Handoff>>,
    ) -> Result<AfXdp, AfXdpError> {
        if specs.is_empty() {
            return Err(AfXdpError("a worker with no sockets".into()));
        }
        let e = |what: &str| {
            let what = what.to_string();
            move |err: &dyn std::fmt::Display| AfXdpError(format!("{what}: {err}"))
        };
        let total = cfg.frames_per_socket.saturating_mul(specs.len() as u32);
        let umem_cfg = UmemConfig::builder()
            .fill_queue_size(QueueSize::new(2048).map_err(|x| e("fill queue size")(&x))?)
            .comp_queue_size(QueueSize::new(2048).map_err(|x| e("completion queue size")(&x))?)
            .build()
            .map_err(|x| e("UMEM config")(&x))?;
        let (umem, mut free) = Umem::new(
            umem_cfg,
            NonZeroU32::new(total).ok_or_else(|| AfXdpError("zero UMEM frames".into()))?,
            false,
        )
        .map_err(|x| e("creating the UMEM (memlock limit? run as root)")(&x))?;
        let mut sockets = Vec::new();
        for s in specs {
            let iface = Interface::new(
                std::ffi::CString::new(s.device.clone()).map_err(|x| e("device name")(&x))?,
            );
            let modes: &[BindFlags] = if cfg.zero_copy {
                &[BindFlags::XDP_ZEROCOPY, BindFlags::XDP_COPY]
            } else {
                &[BindFlags::XDP_COPY]
            };
            let mut made = None;
            let mut last_err = String::new();
            for m in modes {
                let sock_cfg = SocketConfig::builder()
                    .rx_queue_size(QueueSize::new(2048).map_err(|x| e("rx queue size")(&x))?)
                    .tx_queue_size(QueueSize::new(2048).map_err(|x| e("tx queue size")(&x))?)
                    .libxdp_flags(LibxdpFlags::XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD)
                    .bind_flags(*m | BindFlags::XDP_USE_NEED_WAKEUP)
                    .build();
                // SAFETY: each (device, queue) is bound once, and our own
                // program is attached (INHIBIT_PROG_LOAD is set).
                match unsafe { xsk_rs::Socket::new(sock_cfg, &umem, &iface, s.queue) } {
                    Ok(x) => {
                        info!(device = %s.device, queue = s.queue,
                            copy = m.bits() == BindFlags::XDP_COPY.bits(), "AF_XDP socket bound");
                        made = Some(x);
                        break;
                    }
                    Err(err) => last_err = err.to_string(),
                }
            }
            let (tx, rx, rings) = made.ok_or_else(|| {
                AfXdpError(format!(
                    "AF_XDP socket on {} queue {}: {last_err}",
                    s.device, s.queue
                ))
            })?;
            let (fq, cq) = rings.ok_or_else(|| {
                AfXdpError(format!(
                    "{} queue {}: no fill/completion rings",
                    s.device, s.queue
                ))
            })?;
            sockets.push(Socket {
                spec: s.clone(),
                tx,
                rx,
                fq,
                cq,
                pending: Vec::with_capacity(BATCH),
                in_fill: 0,
                fill_target: (cfg.frames_per_socket / 2) as usize,
            });
        }
        for s in &sockets {
            maps.set_socket(s.spec.key, s.rx.fd())
                .map_err(|x| AfXdpError(x.0))?;
        }
        let max_iface = specs
            .iter()
            .map(|s| s.iface.0)
            .chain(routes_to.iter().map(|(i, _)| i.0))
            .max()
            .unwrap_or(0) as usize;
        let mut routes = vec![TxRoute::None; max_iface + 1];
        for (iface, tx) in routes_to {
            routes[iface.0 as usize] = TxRoute::Handoff(tx.clone());
        }
        // The first socket on a port transmits for it.
        for (i, s) in sockets.iter().enumerate().rev() {
            routes[s.spec.iface.0 as usize] = TxRoute::Socket(i);
        }
        free.reverse();
        let mut this = AfXdp {
            umem,
            free,
            sockets,
            routes,
            inbox,
            units: None,
            mirrors: Vec::new(),
            mirror_backlog: Vec::new(),
            mirror_spare: Vec::new(),
            mirror_reserve: total as usize / 4,
            io: Arc::default(),
        };
        this.refill();
        Ok(this)
    }

    pub fn specs(&self) -> impl Iterator<Item = &SocketSpec> {
        self.sockets.iter().map(|s| &s.spec)
    }

    /// Takes this worker's sockets out of the XDP program's map.
    pub fn unregister(&self, maps: &XdpMaps) {
        for s in &self.sockets {
            maps.clear_socket(s.spec.key);
        }
    }

    fn refill(&mut self) {
        for p in &mut self.sockets {
            let want = p.fill_target.saturating_sub(p.in_fill).min(self.free.len());
            if want == 0 {
                continue;
            }
            let at = self.free.len() - want;
            // SAFETY: the descriptors come from the free pool: no one else
            // (kernel or user) holds their frames.
            let n = unsafe { p.fq.produce(&self.free[at..]) };
            self.free.truncate(self.free.len() - n);
            p.in_fill += n;
        }
    }

    /// Where frames of logical interface `id` leave: its port and its
    /// 802.1Q tag.
    fn egress_of(&self, id: InterfaceId) -> (InterfaceId, Option<u16>) {
        self.units
            .as_ref()
            .map_or((id, None), |cfg| cfg.egress_of(id))
    }

    /// A frame from data port `port`: the logical interface its tag (or
    /// its absence) names, the tag removed in place. `None` (counted) for
    /// a tag, or an untagged frame, that no unit is configured for: a
    /// tagged frame is never taken as untagged.
    fn wire_unit(
        &mut self,
        d: &mut FrameDesc,
        port: InterfaceId,
        stats: &CoreStats,
    ) -> Option<Arrival> {
        // SAFETY: `d` was just consumed from the RX ring: its frame is ours.
        let mut data = unsafe { self.umem.data_mut(d) };
        let vlan = packet::vlan_of(data.contents());
        let unit = match &self.units {
            Some(cfg) if cfg.ifaces.iter().any(|i| i.vlan.is_some()) => cfg.unit(port, vlan),
            _ => vlan.is_none().then_some(port),
        };
        let Some(unit) = unit else {
            bump(&stats.drops[DropReason::VlanTagged as usize], 1);
            return None;
        };
        if vlan.is_some() {
            let len = packet::strip_vlan(data.contents_mut());
            data.cursor().set_pos(len);
        }
        Some(Arrival::Wire(unit))
    }

    /// Copies a frame of logical interface `iface` into a free UMEM frame
    /// (tagged for its unit) and queues it on its port (frames the core
    /// built).
    fn send_copy(&mut self, iface: InterfaceId, frame: &[u8]) {
        let (port, vlan) = self.egress_of(iface);
        match vlan {
            None => self.send_raw(port, frame),
            Some(v) if frame.len() >= 12 => {
                let mut tagged = vec![0u8; frame.len() + 4];
                tagged[..frame.len()].copy_from_slice(frame);
                let len = packet::insert_vlan(&mut tagged, frame.len(), v);
                self.send_raw(port, &tagged[..len]);
            }
            Some(_) => bump(&self.io.tx_no_frame, 1),
        }
    }

    /// Copies a frame ready for the wire into a free UMEM frame and queues
    /// it on `port` (or hands it to the worker that has the port's socket).
    fn send_raw(&mut self, iface: InterfaceId, frame: &[u8]) {
        let route = self.route(iface);
        let sock = match route {
            TxRoute::Socket(s) => s,
            TxRoute::Handoff(tx) => {
                self.hand_off(&tx, iface, frame);
                return;
            }
            TxRoute::None => {
                bump(&self.io.tx_no_socket, 1);
                return;
            }
        };
        let Some(mut d) = self.free.pop() else {
            bump(&self.io.tx_no_frame, 1);
            return;
        };
        // SAFETY: `d` came from the free pool; its frame is ours alone.
        let mut data = unsafe { self.umem.data_mut(&mut d) };
        let mut cur = data.cursor();
        cur.set_pos(0);
        if std::io::Write::write_all(&mut cur, frame).is_err() {
            self.free.push(d);
            return;
        }
        self.sockets[sock].pending.push(d);
    }

    /// A frame the core released for the peer: wrapped and sent (copied)
    /// on the fabric port the hook names.
    fn send_copy_to_fabric(&mut self, out: FabricOut, frame: &[u8], fabric: &mut dyn FabricHook) {
        let tx = match out {
            FabricOut::ToOwner { rg, ingress } => fabric.to_owner(rg, ingress),
            FabricOut::Egress { rg, iface } => fabric.egress_to_owner(rg, iface),
        };
        let Some(tx) = tx else {
            bump(&self.io.fabric_unhandled, 1);
            return;
        };
        let mut wrapped = Vec::with_capacity(fabric_header::OVERHEAD + frame.len());
        wrapped.extend_from_slice(&tx.prefix);
        wrapped.extend_from_slice(frame);
        self.send_raw(tx.port, &wrapped);
    }

    fn hand_off(&self, tx: &mpsc::SyncSender<Handoff>, iface: InterfaceId, frame: &[u8]) {
        match tx.try_send((iface, frame.to_vec())) {
            Ok(()) => bump(&self.io.handoff_sent, 1),
            Err(_) => bump(&self.io.handoff_dropped, 1),
        };
    }

    fn route(&self, iface: InterfaceId) -> TxRoute {
        self.routes
            .get(iface.0 as usize)
            .cloned()
            .unwrap_or(TxRoute::None)
    }

    fn socket_of(&self, iface: InterfaceId) -> Option<usize> {
        match self.routes.get(iface.0 as usize) {
            Some(TxRoute::Socket(s)) => Some(*s),
            _ => None,
        }
    }

    fn flush_tx(&mut self) {
        for i in 0..self.sockets.len() {
            let pending = std::mem::take(&mut self.sockets[i].pending);
            for chunk in pending.chunks(KICK) {
                let p = &mut self.sockets[i];
                // SAFETY: every queued descriptor's frame is owned by the
                // worker and not touched again until its completion.
                let n = match unsafe { p.tx.produce_and_wakeup(chunk) } {
                    Ok(n) => n,
                    Err(_) => {
                        bump(&self.io.wakeup_errors, 1);
                        // SAFETY: as above.
                        unsafe { p.tx.produce(chunk) }
                    }
                };
                bump(&self.io.tx_frames, n as u64);
                if n < chunk.len() {
                    bump(&self.io.tx_ring_full, (chunk.len() - n) as u64);
                    self.free.extend_from_slice(&chunk[n..]);
                }
            }
            let mut recycled = pending;
            recycled.clear();
            self.sockets[i].pending = recycled;
        }
    }

    fn reap_completions(&mut self, scratch: &mut [FrameDesc]) {
        for p in &mut self.sockets {
            loop {
                // SAFETY: completed descriptors are handed back to us.
                let n = unsafe { p.cq.consume(scratch) };
                if n == 0 {
                    break;
                }
                self.free.extend_from_slice(&scratch[..n]);
            }
        }
    }

    /// Reads the kernel's per-socket drop counters into `io` (absolute
    /// sums over this worker's sockets).
    fn read_kernel_stats(&self) {
        let (mut dropped, mut full, mut empty) = (0, 0, 0);
        for s in &self.sockets {
            if let Ok(st) = s.rx.fd().xdp_statistics() {
                dropped += st.rx_dropped();
                full += st.rx_ring_full();
                empty += st.rx_fill_ring_empty_descs();
            }
        }
        self.io.kernel_rx_dropped.store(dropped, Ordering::Relaxed);
        self.io.kernel_rx_ring_full.store(full, Ordering::Relaxed);
        self.io
            .kernel_fill_ring_empty
            .store(empty, Ordering::Relaxed);
    }

    /// Waits up to `timeout` for any socket to have frames.
    fn wait(&self, timeout: Duration) {
        let mut fds: Vec<libc::pollfd> = self
            .sockets
            .iter()
            .map(|p| libc::pollfd {
                fd: p.rx.fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of pollfd for the duration.
        unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                timeout.as_millis() as i32,
            )
        };
    }

    /// Runs the worker until `stop` is set. With `announce`, sends GARP/NA
    /// for every RG that becomes primary (one worker per node does).
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &mut self,
        worker: &mut Worker,
        fabric: &mut dyn FabricHook,
        clock: &Clock,
        stop: &AtomicBool,
        link: &WorkerLink,
        announce: bool,
    ) {
        let mut descs = vec![FrameDesc::default(); BATCH];
        let mut scratch = vec![FrameDesc::default(); BATCH];
        let mut arrivals: Vec<Arrival> = Vec::with_capacity(BATCH);
        let mut verdicts: Vec<Verdict> = Vec::with_capacity(BATCH);
        let roles = worker.shared().roles.clone();
        self.units = Some(worker.shared().cfg.clone());
        self.mirrors = worker
            .shared()
            .cfg
            .mirrors
            .iter()
            .filter(|m| self.sockets.iter().any(|s| s.spec.iface == m.from_port))
            .map(|m| (m.clone(), 0))
            .collect();
        let mut schedule =
            AnnounceSchedule::new(worker.config().garp_count, worker.config().garp_interval_ms);
        let mut last_stats = Millis(0);
        while !stop.load(Ordering::Relaxed) {
            let now = clock();
            link.heartbeat.store(now.0, Ordering::Relaxed);
            if announce {
                for rg in schedule.due(&roles.load_full(), now) {
                    worker.announce(rg);
                }
            }
            let mut received = 0;
            for si in 0..self.sockets.len() {
                // SAFETY: descriptors consumed from RX are ours until we
                // queue them for TX or fill.
                let n = unsafe { self.sockets[si].rx.consume(&mut descs) };
                if n == 0 {
                    continue;
                }
                received += n;
                let s = &mut self.sockets[si];
                s.in_fill -= n.min(s.in_fill);
                if let Some(c) = link.socket_rx.get(si) {
                    bump(c, n as u64);
                }
                bump(&self.io.rx_frames, n as u64);
                self.batch(
                    si,
                    &mut descs[..n],
                    &mut arrivals,
                    &mut verdicts,
                    worker,
                    fabric,
                    now,
                );
            }
            worker.tick(now);
            let built = std::mem::take(worker.outbox());
            for (iface, frame) in &built {
                self.send_copy(*iface, frame);
            }
            let mut recycled = built;
            recycled.clear();
            *worker.outbox() = recycled;
            self.send_mirror_copies();
            if !worker.fabric_outbox().is_empty() {
                let released = std::mem::take(worker.fabric_outbox());
                for (out, frame) in &released {
                    self.send_copy_to_fabric(*out, frame, fabric);
                }
                let mut recycled = released;
                recycled.clear();
                *worker.fabric_outbox() = recycled;
            }
            let handed = self.drain_inbox();
            self.flush_tx();
            self.reap_completions(&mut scratch);
            self.refill();
            if now.saturating_sub(last_stats) >= 1000 {
                self.read_kernel_stats();
                last_stats = now;
            }
            if received == 0 && handed == 0 && worker.outbox().is_empty() {
                self.wait(Duration::from_millis(1));
            }
        }
        self.read_kernel_stats();
        info!(sockets = ?self.specs().map(|s| (&s.device, s.queue)).collect::<Vec<_>>(), "dataplane worker stopped");
    }

    fn drain_inbox(&mut self) -> usize {
        let Some(inbox) = self.inbox.take() else {
            return 0;
        };
        let mut n = 0;
        while n < BATCH {
            let Ok((iface, frame)) = inbox.try_recv() else {
                break;
            };
            n += 1;
            bump(&self.io.handoff_received, 1);
            match self.socket_of(iface) {
                Some(_) => self.send_raw(iface, &frame),
                None => {
                    bump(&self.io.tx_no_socket, 1);
                }
            }
        }
        self.inbox = Some(inbox);
        n
    }

    /// One received batch of socket `si`: fabric frames validated and
    /// unwrapped, then the whole batch through the worker as one burst,
    /// then each frame sent (or freed) as its verdict says.
    #[allow(clippy::too_many_arguments)]
    fn batch(
        &mut self,
        si: usize,
        descs: &mut [FrameDesc],
        arrivals: &mut Vec<Arrival>,
        verdicts: &mut Vec<Verdict>,
        worker: &mut Worker,
        fabric: &mut dyn FabricHook,
        now: Millis,
    ) {
        let (iface, mode) = (self.sockets[si].spec.iface, self.sockets[si].spec.mode);
        arrivals.clear();
        let mut kept = 0;
        for i in 0..descs.len() {
            if mode == PortMode::Data && !self.mirrors.is_empty() {
                self.sample_for_mirrors(&mut descs[i], iface);
            }
            let arrival = match mode {
                PortMode::Data => self.wire_unit(&mut descs[i], iface, worker.stats()),
                PortMode::Fabric => self.unwrap_fabric(&mut descs[i], iface, fabric),
            };
            match arrival {
                Some(a) => {
                    descs.swap(kept, i);
                    arrivals.push(a);
                    kept += 1;
                }
                None => self.free.push(descs[i]),
            }
        }
        let descs = &mut descs[..kept];
        worker.burst(
            &mut XskBurst {
                umem: &self.umem,
                descs: &mut *descs,
                arrivals: &arrivals[..],
            },
            now,
            verdicts,
        );
        for i in 0..kept {
            let reply_iface = match arrivals[i] {
                Arrival::Wire(i) | Arrival::FabricIngress(i) | Arrival::FabricEgress(i) => i,
            };
            let from_wire = matches!(arrivals[i], Arrival::Wire(_));
            self.dispatch(verdicts[i], &mut descs[i], reply_iface, fabric, from_wire);
        }
    }

    /// Copies a frame just received on `port`, as it arrived, into the
    /// mirror backlog of every mirror of that port that samples it.
    fn sample_for_mirrors(&mut self, d: &mut FrameDesc, port: InterfaceId) {
        for mi in 0..self.mirrors.len() {
            let (m, seen) = &mut self.mirrors[mi];
            if m.from_port != port {
                continue;
            }
            *seen = seen.wrapping_add(1);
            if *seen % m.every != 0 {
                bump(&self.io.mirror_sampled_out, 1);
                continue;
            }
            if self.mirror_backlog.len() >= MIRROR_BACKLOG {
                bump(&self.io.mirror_queue_full, 1);
                continue;
            }
            let to = m.to;
            // SAFETY: `d` was just consumed from the RX ring: its frame is ours.
            let data = unsafe { self.umem.data_mut(d) };
            let mut copy = self.mirror_spare.pop().unwrap_or_default();
            copy.clear();
            copy.extend_from_slice(data.contents());
            self.mirror_backlog.push((to, copy));
        }
    }

    /// Sends the backlog's copies with the frames original traffic left:
    /// at or below the reserve, a copy is dropped (counted), never an
    /// original.
    fn send_mirror_copies(&mut self) {
        let mut backlog = std::mem::take(&mut self.mirror_backlog);
        for (to, frame) in backlog.drain(..) {
            if self.free.len() > self.mirror_reserve {
                self.send_copy(to, &frame);
                bump(&self.io.mirror_admitted, 1);
            } else {
                bump(&self.io.mirror_no_frame, 1);
            }
            self.mirror_spare.push(frame);
        }
        self.mirror_backlog = backlog;
    }

    /// A frame from the peer: validated by the hook and unwrapped in place;
    /// `None` (counted) when the hook refuses it.
    fn unwrap_fabric(
        &mut self,
        d: &mut FrameDesc,
        port: InterfaceId,
        fabric: &mut dyn FabricHook,
    ) -> Option<Arrival> {
        // SAFETY: `d` was just consumed from the RX ring: its frame is ours.
        let mut data = unsafe { self.umem.data_mut(d) };
        let Some(inbound) = fabric.arrived_on_fabric(data.contents(), port) else {
            bump(&self.io.fabric_unhandled, 1);
            return None;
        };
        let len = data.contents().len();
        data.contents_mut()
            .copy_within(fabric_header::OVERHEAD..len, 0);
        data.cursor().set_pos(len - fabric_header::OVERHEAD);
        Some(match inbound {
            FabricInbound::Process { iface } => Arrival::FabricIngress(iface),
            FabricInbound::Transmit { iface } => Arrival::FabricEgress(iface),
        })
    }

    /// Sends (or frees) the frame in `d` as the core decided. A hand-off of
    /// an unprocessed frame is only allowed for frames from the wire: one
    /// that came over the fabric is never sent back (the core already
    /// turns that into a drop; this is the second guard).
    fn dispatch(
        &mut self,
        verdict: Verdict,
        d: &mut FrameDesc,
        reply_iface: InterfaceId,
        fabric: &mut dyn FabricHook,
        from_wire: bool,
    ) {
        match verdict {
            Verdict::Tx { iface: out, len } => self.transmit(d, out, len),
            // A reply goes out where the frame came in (for a fabric frame:
            // where it would have).
            Verdict::Reply { len } => self.transmit(d, reply_iface, len),
            Verdict::Fabric { rg } if from_wire => {
                // SAFETY: the frame in `d` is ours until queued or freed.
                let len = unsafe { self.umem.data(d) }.contents().len();
                let tx = fabric.to_owner(rg, reply_iface);
                self.send_to_fabric(tx, d, len);
            }
            Verdict::FabricEgress { rg, iface, len } => {
                let tx = fabric.egress_to_owner(rg, iface);
                self.send_to_fabric(tx, d, len);
            }
            Verdict::Fabric { .. } => {
                bump(&self.io.fabric_unhandled, 1);
                self.free.push(*d);
            }
            Verdict::Drop(_) | Verdict::Held => self.free.push(*d),
        }
    }

    /// Queues the first `len` bytes of `d` on `out`'s port (tagged for an
    /// 802.1Q unit): on this worker's own socket without a copy, else
    /// handed (copied) to the worker that has one.
    fn transmit(&mut self, d: &mut FrameDesc, out: InterfaceId, len: usize) {
        let (port, vlan) = self.egress_of(out);
        // SAFETY: the frame in `d` is ours until queued or freed.
        let mut data = unsafe { self.umem.data_mut(d) };
        let len = match vlan {
            None => len,
            Some(v) => {
                data.cursor().set_pos(len + 4);
                if data.contents().len() != len + 4 || len < 12 {
                    bump(&self.io.tx_no_frame, 1);
                    self.free.push(*d);
                    return;
                }
                packet::insert_vlan(data.contents_mut(), len, v)
            }
        };
        data.cursor().set_pos(len);
        let out = port;
        match self.route(out) {
            TxRoute::Socket(s) => self.sockets[s].pending.push(*d),
            TxRoute::Handoff(tx) => {
                // SAFETY: as above.
                let bytes = unsafe { self.umem.data(d) }.contents();
                self.hand_off(&tx, out, bytes);
                self.free.push(*d);
            }
            TxRoute::None => {
                bump(&self.io.tx_no_socket, 1);
                self.free.push(*d);
            }
        }
    }

    /// Wraps the first `len` bytes of the frame in `d` for the fabric in
    /// place (shifted right by the prefix) and queues it on the fabric port.
    fn send_to_fabric(&mut self, tx: Option<FabricTx>, d: &mut FrameDesc, len: usize) {
        let Some(tx) = tx else {
            bump(&self.io.fabric_unhandled, 1);
            self.free.push(*d);
            return;
        };
        let total = len + fabric_header::OVERHEAD;
        // SAFETY: the frame in `d` is ours until queued or freed.
        let mut data = unsafe { self.umem.data_mut(d) };
        data.cursor().set_pos(total);
        if data.contents().len() != total {
            // Does not fit the UMEM frame (cannot happen for frames within
            // the data MTU): drop and count.
            bump(&self.io.fabric_unhandled, 1);
            self.free.push(*d);
            return;
        }
        let buf = data.contents_mut();
        buf.copy_within(0..len, fabric_header::OVERHEAD);
        buf[..fabric_header::OVERHEAD].copy_from_slice(&tx.prefix);
        self.transmit(d, tx.port, total);
    }
}

impl Drop for AfXdp {
    fn drop(&mut self) {
        if self.sockets.iter().any(|p| p.in_fill > 0) {
            warn!("dataplane stopped with frames in fill rings (freed with the UMEM)");
        }
    }
}
