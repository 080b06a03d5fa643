//! The AF_XDP I/O shell: one socket per dataplane port, all on one UMEM,
//! so a frame received on one port is transmitted on another without a
//! copy. One worker thread runs the packet core over batches of frames.
//!
//! Bounds: the UMEM holds `frames_per_port` frames per port (4 KiB each).
//! Each port keeps half of its share in its fill ring; the rest serves
//! transmissions and frames the core builds (ARP, NA, GARP). When no frame
//! is free, a built frame is dropped and counted (`tx_no_frame`); when a TX
//! ring is full the frame is dropped and counted (`tx_ring_full`).
//!
//! Copy mode needs a kick (sendto) to transmit, and the kernel sends at
//! most 32 descriptors per kick, so TX goes out in chunks of 32.

use crate::core::{Core, Verdict};
use crate::session::{Clock, InterfaceId};
use crate::xdp::{AttachMode, PortMode, XdpAttachment, XdpCounters};
use std::num::NonZeroU32;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tandem_fabric::header as fabric_header;
use tandem_proto::{RgId, RoleMap};
use tracing::{info, warn};
use xsk_rs::config::{BindFlags, Interface, LibxdpFlags, QueueSize, SocketConfig, UmemConfig};
use xsk_rs::{CompQueue, FillQueue, FrameDesc, RxQueue, Socket, TxQueue, Umem};

/// Largest batch of frames taken from one RX ring at a time.
pub const BATCH: usize = 64;
/// Descriptors per TX kick (the copy-mode transmit limit).
const KICK: usize = 32;

#[derive(Clone, Debug)]
pub struct PortSpec {
    pub iface: InterfaceId,
    pub device: String,
    pub mode: PortMode,
}

#[derive(Clone, Debug)]
pub struct AfXdpConfig {
    pub frames_per_port: u32,
    pub attach: AttachMode,
    /// Try zero-copy first (drivers that support it); veth does not.
    pub zero_copy: bool,
}

impl Default for AfXdpConfig {
    fn default() -> Self {
        AfXdpConfig {
            frames_per_port: 4096,
            attach: AttachMode::Auto,
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

/// I/O counters of the shell (the core counts forwarding decisions).
#[derive(Debug, Default)]
pub struct IoStats {
    pub rx_frames: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_ring_full: AtomicU64,
    pub tx_no_frame: AtomicU64,
    pub fabric_unhandled: AtomicU64,
    pub wakeup_errors: AtomicU64,
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

struct Port {
    iface: InterfaceId,
    device: String,
    mode: PortMode,
    tx: TxQueue,
    rx: RxQueue,
    fq: FillQueue,
    cq: CompQueue,
    pending: Vec<FrameDesc>,
    in_fill: usize,
    fill_target: usize,
}

pub struct AfXdp {
    umem: Umem,
    free: Vec<FrameDesc>,
    ports: Vec<Port>,
    /// Port index by interface id.
    by_iface: Vec<Option<usize>>,
    xdp: XdpAttachment,
    pub io: Arc<IoStats>,
}

impl AfXdp {
    /// Loads the XDP program on every port's device and binds a socket to
    /// queue 0 of each (one queue per veth; see the module doc).
    pub fn open(specs: &[PortSpec], cfg: &AfXdpConfig) -> Result<AfXdp, AfXdpError> {
        if specs.is_empty() {
            return Err(AfXdpError("no dataplane ports".into()));
        }
        let e = |what: &str| {
            let what = what.to_string();
            move |err: &dyn std::fmt::Display| AfXdpError(format!("{what}: {err}"))
        };
        let total = cfg.frames_per_port.saturating_mul(specs.len() as u32);
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
        let mut indexes = Vec::new();
        for (slot, s) in specs.iter().enumerate() {
            let ifindex = crate::os::ifindex(&s.device)
                .map_err(|x| e(&format!("interface {}", s.device))(&x))?;
            indexes.push((ifindex, s.mode, slot as u32));
        }
        let xdp = XdpAttachment::attach(&indexes, cfg.attach).map_err(|x| AfXdpError(x.0))?;
        let mut ports = Vec::new();
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
                // SAFETY: each (device, queue 0) is bound once, and our own
                // program is attached (INHIBIT_PROG_LOAD is set).
                match unsafe { Socket::new(sock_cfg, &umem, &iface, 0) } {
                    Ok(x) => {
                        info!(device = %s.device, copy = m.bits() == BindFlags::XDP_COPY.bits(), "AF_XDP socket bound");
                        made = Some(x);
                        break;
                    }
                    Err(err) => last_err = err.to_string(),
                }
            }
            let (tx, rx, rings) = made
                .ok_or_else(|| AfXdpError(format!("AF_XDP socket on {}: {last_err}", s.device)))?;
            let (fq, cq) = rings
                .ok_or_else(|| AfXdpError(format!("{}: no fill/completion rings", s.device)))?;
            ports.push(Port {
                iface: s.iface,
                device: s.device.clone(),
                mode: s.mode,
                tx,
                rx,
                fq,
                cq,
                pending: Vec::with_capacity(BATCH),
                in_fill: 0,
                fill_target: (cfg.frames_per_port / 2) as usize,
            });
        }
        for (slot, p) in ports.iter().enumerate() {
            xdp.set_socket(slot as u32, p.rx.fd())
                .map_err(|x| AfXdpError(x.0))?;
        }
        let max_iface = specs.iter().map(|s| s.iface.0 as usize).max().unwrap_or(0);
        let mut by_iface = vec![None; max_iface + 1];
        for (i, s) in specs.iter().enumerate() {
            by_iface[s.iface.0 as usize] = Some(i);
        }
        free.reverse();
        let mut this = AfXdp {
            umem,
            free,
            ports,
            by_iface,
            xdp,
            io: Arc::default(),
        };
        this.refill();
        Ok(this)
    }

    pub fn xdp_counters(&self) -> XdpCounters {
        self.xdp.counters()
    }

    fn refill(&mut self) {
        for p in &mut self.ports {
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

    fn queue_tx(&mut self, port: usize, d: FrameDesc) {
        self.ports[port].pending.push(d);
    }

    /// Copies a frame the core built into a free UMEM frame and queues it.
    fn send_built(&mut self, iface: InterfaceId, frame: &[u8]) {
        let Some(port) = self.port_of(iface) else {
            return;
        };
        let Some(mut d) = self.free.pop() else {
            self.io.tx_no_frame.fetch_add(1, Ordering::Relaxed);
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
        self.queue_tx(port, d);
    }

    fn port_of(&self, iface: InterfaceId) -> Option<usize> {
        self.by_iface.get(iface.0 as usize).copied().flatten()
    }

    fn flush_tx(&mut self) {
        for i in 0..self.ports.len() {
            let pending = std::mem::take(&mut self.ports[i].pending);
            for chunk in pending.chunks(KICK) {
                let p = &mut self.ports[i];
                // SAFETY: every queued descriptor's frame is owned by the
                // worker and not touched again until its completion.
                let n = match unsafe { p.tx.produce_and_wakeup(chunk) } {
                    Ok(n) => n,
                    Err(_) => {
                        self.io.wakeup_errors.fetch_add(1, Ordering::Relaxed);
                        // SAFETY: as above.
                        unsafe { p.tx.produce(chunk) }
                    }
                };
                self.io.tx_frames.fetch_add(n as u64, Ordering::Relaxed);
                if n < chunk.len() {
                    self.io
                        .tx_ring_full
                        .fetch_add((chunk.len() - n) as u64, Ordering::Relaxed);
                    self.free.extend_from_slice(&chunk[n..]);
                }
            }
            let mut recycled = pending;
            recycled.clear();
            self.ports[i].pending = recycled;
        }
    }

    fn reap_completions(&mut self, scratch: &mut [FrameDesc]) {
        for p in &mut self.ports {
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

    /// Waits up to `timeout` for any port to have frames.
    fn wait(&self, timeout: Duration) {
        let mut fds: Vec<libc::pollfd> = self
            .ports
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

    /// Runs the worker until `stop` is set. Expires sessions every 100 ms
    /// and announces (GARP/NA) every RG that became primary.
    pub fn run(
        &mut self,
        core: &mut Core,
        roles: &arc_swap::ArcSwap<RoleMap>,
        fabric: &mut dyn FabricHook,
        clock: &Clock,
        stop: &AtomicBool,
    ) {
        let mut descs = vec![FrameDesc::default(); BATCH];
        let mut scratch = vec![FrameDesc::default(); BATCH];
        let mut last_expire = clock();
        let mut last_roles = roles.load_full();
        for (rg, r) in last_roles.iter() {
            if r.primary {
                core.announce(*rg);
            }
        }
        while !stop.load(Ordering::Relaxed) {
            let now = clock();
            let mut received = 0;
            for pi in 0..self.ports.len() {
                // SAFETY: descriptors consumed from RX are ours until we
                // queue them for TX or fill.
                let n = unsafe { self.ports[pi].rx.consume(&mut descs) };
                received += n;
                self.ports[pi].in_fill -= n.min(self.ports[pi].in_fill);
                self.io.rx_frames.fetch_add(n as u64, Ordering::Relaxed);
                if self.ports[pi].mode != PortMode::Fabric {
                    let iface = self.ports[pi].iface;
                    let umem = &self.umem;
                    // SAFETY: the descriptors were just consumed from RX:
                    // their frames are ours and nothing writes them yet.
                    core.prefetch_sessions(
                        descs[..n]
                            .iter()
                            .map(|d| (unsafe { umem.data(d) }.contents(), iface)),
                    );
                }
                for d in descs.iter_mut().take(n) {
                    self.handle(pi, d, core, fabric, now);
                }
            }
            for (iface, frame) in std::mem::take(&mut core.outbox) {
                self.send_built(iface, &frame);
            }
            self.flush_tx();
            self.reap_completions(&mut scratch);
            self.refill();
            let current = roles.load_full();
            if !Arc::ptr_eq(&current, &last_roles) {
                for (rg, r) in current.iter() {
                    let was = last_roles
                        .get(rg)
                        .is_some_and(|o| o.primary && o.epoch == r.epoch);
                    if r.primary && !was {
                        core.announce(*rg);
                    }
                }
                last_roles = current;
            }
            if now.saturating_sub(last_expire) >= 100 {
                core.expire(now);
                last_expire = now;
            }
            if received == 0 && core.outbox.is_empty() {
                self.wait(Duration::from_millis(1));
            }
        }
        info!(ports = ?self.ports.iter().map(|p| &p.device).collect::<Vec<_>>(), "dataplane worker stopped");
    }

    fn handle(
        &mut self,
        pi: usize,
        d: &mut FrameDesc,
        core: &mut Core,
        fabric: &mut dyn FabricHook,
        now: crate::session::Millis,
    ) {
        let iface = self.ports[pi].iface;
        if self.ports[pi].mode == PortMode::Fabric {
            self.handle_fabric(iface, d, core, fabric, now);
            return;
        }
        // SAFETY: `d` was just consumed from the RX ring: its frame is ours.
        let mut data = unsafe { self.umem.data_mut(d) };
        let verdict = core.process(data.contents_mut(), iface, now);
        self.dispatch(verdict, d, pi, fabric, true);
    }

    /// A frame from the peer: validated by the hook, unwrapped in place,
    /// then processed or only transmitted.
    fn handle_fabric(
        &mut self,
        port: InterfaceId,
        d: &mut FrameDesc,
        core: &mut Core,
        fabric: &mut dyn FabricHook,
        now: crate::session::Millis,
    ) {
        // SAFETY: `d` was just consumed from the RX ring: its frame is ours.
        let mut data = unsafe { self.umem.data_mut(d) };
        let Some(inbound) = fabric.arrived_on_fabric(data.contents(), port) else {
            self.io.fabric_unhandled.fetch_add(1, Ordering::Relaxed);
            self.free.push(*d);
            return;
        };
        let len = data.contents().len();
        data.contents_mut()
            .copy_within(fabric_header::OVERHEAD..len, 0);
        data.cursor().set_pos(len - fabric_header::OVERHEAD);
        let (iface, verdict) = match inbound {
            FabricInbound::Process { iface } => (
                iface,
                core.process_from_fabric(data.contents_mut(), iface, now),
            ),
            FabricInbound::Transmit { iface } => (
                iface,
                core.transmit_from_fabric(data.contents_mut(), iface, now),
            ),
        };
        match self.port_of(iface) {
            // A reply goes out where the frame would have come in.
            Some(reply_port) => self.dispatch(verdict, d, reply_port, fabric, false),
            None => self.free.push(*d),
        }
    }

    /// Sends (or frees) the frame in `d` as the core decided. A hand-off of
    /// an unprocessed frame is only allowed for frames from the wire: one
    /// that came over the fabric is never sent back (the core already
    /// turns that into a drop; this is the second guard).
    fn dispatch(
        &mut self,
        verdict: Verdict,
        d: &mut FrameDesc,
        reply_port: usize,
        fabric: &mut dyn FabricHook,
        from_wire: bool,
    ) {
        match verdict {
            Verdict::Tx { iface: out, len } => {
                // SAFETY: the frame in `d` is ours until queued or freed.
                unsafe { self.umem.data_mut(d) }.cursor().set_pos(len);
                match self.port_of(out) {
                    Some(po) => self.queue_tx(po, *d),
                    None => self.free.push(*d),
                }
            }
            Verdict::Reply { len } => {
                // SAFETY: as above.
                unsafe { self.umem.data_mut(d) }.cursor().set_pos(len);
                self.queue_tx(reply_port, *d);
            }
            Verdict::Fabric { rg } if from_wire => {
                let ingress = self.ports[reply_port].iface;
                // SAFETY: as above.
                let len = unsafe { self.umem.data(d) }.contents().len();
                let tx = fabric.to_owner(rg, ingress);
                self.send_to_fabric(tx, d, len);
            }
            Verdict::FabricEgress { rg, iface, len } => {
                let tx = fabric.egress_to_owner(rg, iface);
                self.send_to_fabric(tx, d, len);
            }
            Verdict::Fabric { .. } => {
                self.io.fabric_unhandled.fetch_add(1, Ordering::Relaxed);
                self.free.push(*d);
            }
            Verdict::Drop(_) => self.free.push(*d),
        }
    }

    /// Wraps the first `len` bytes of the frame in `d` for the fabric in
    /// place (shifted right by the prefix) and queues it on the fabric port.
    fn send_to_fabric(&mut self, tx: Option<FabricTx>, d: &mut FrameDesc, len: usize) {
        let Some((tx, port)) = tx.and_then(|t| Some((t, self.port_of(t.port)?))) else {
            self.io.fabric_unhandled.fetch_add(1, Ordering::Relaxed);
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
            self.io.fabric_unhandled.fetch_add(1, Ordering::Relaxed);
            self.free.push(*d);
            return;
        }
        let buf = data.contents_mut();
        buf.copy_within(0..len, fabric_header::OVERHEAD);
        buf[..fabric_header::OVERHEAD].copy_from_slice(&tx.prefix);
        self.queue_tx(port, *d);
    }
}

impl Drop for AfXdp {
    fn drop(&mut self) {
        if self.ports.iter().any(|p| p.in_fill > 0) {
            warn!("dataplane stopped with frames in fill rings (freed with the UMEM)");
        }
    }
}
