//! Loading and attaching the XDP program (libbpf-rs skeleton).
//!
//! Attach detaches whatever program a crashed run left on the interfaces
//! first; dropping the attachment detaches ours. Native (driver) mode is
//! tried first, generic (skb) mode is the fallback.
//!
//! The program redirects a frame to the AF_XDP socket of its (port, RX
//! queue) — key [`socket_key`] in the XSKMAP — so every queue of every
//! port can have its own socket and worker. The maps are reachable from
//! any thread through [`XdpMaps`] (file descriptors), so workers register
//! their own sockets and the daemon reads the counters while they run.

use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{MapCore, MapFlags, MapHandle, Xdp, XdpFlags};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use tracing::{info, warn};

/// Bits of the RX queue in a socket key (must match the BPF program).
pub const QUEUE_BITS: u32 = 6;
/// RX queues per port the program can redirect.
pub const MAX_QUEUES: u32 = 1 << QUEUE_BITS;
/// Ports (data and fabric) the program can serve.
pub const MAX_PORTS: u32 = 32;

/// The XSKMAP key of the socket for RX queue `queue` of port `slot`.
pub fn socket_key(slot: u32, queue: u32) -> u32 {
    (slot << QUEUE_BITS) | queue
}

mod skel {
    #![allow(clippy::all, dead_code, unsafe_op_in_unsafe_fn, non_camel_case_types)]
    include!(concat!(env!("OUT_DIR"), "/tandem.skel.rs"));
}

use skel::{TandemSkel, TandemSkelBuilder};

/// What the program does with an interface's frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortMode {
    /// IPv4, IPv6 and ARP to the dataplane.
    Data = 1,
    /// Only fabric-encapsulated frames to the dataplane.
    Fabric = 2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// Native if the driver supports it, else generic.
    Auto,
    Native,
    Generic,
}

#[derive(Debug)]
pub struct XdpError(pub String);

impl std::fmt::Display for XdpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for XdpError {}

fn err(what: &str) -> impl FnOnce(libbpf_rs::Error) -> XdpError + '_ {
    move |e| XdpError(format!("{what}: {e}"))
}

/// Frames the program redirected / passed, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct XdpCounters {
    pub redirected: u64,
    pub passed_not_ours: u64,
    pub passed_unknown_interface: u64,
    pub too_short: u64,
    /// Dataplane frames whose queue had no socket (passed to the kernel:
    /// lost to the dataplane).
    pub passed_no_socket: u64,
    /// Dataplane frames on a queue beyond [`MAX_QUEUES`] (passed).
    pub passed_queue_out_of_range: u64,
}

/// The program's maps, usable from any thread.
pub struct XdpMaps {
    xsks: MapHandle,
    counters: MapHandle,
    redirected: MapHandle,
    unserved: MapHandle,
}

fn sum_percpu(map: &MapHandle, i: u32) -> u64 {
    map.lookup_percpu(&i.to_ne_bytes(), MapFlags::ANY)
        .ok()
        .flatten()
        .map_or(0, |per_cpu| {
            per_cpu
                .iter()
                .map(|v| u64::from_ne_bytes(v[..8].try_into().unwrap_or([0; 8])))
                .sum()
        })
}

impl XdpMaps {
    /// Puts an AF_XDP socket into the XSKMAP at `key` ([`socket_key`]).
    pub fn set_socket(&self, key: u32, fd: &impl AsRawFd) -> Result<(), XdpError> {
        let fd = fd.as_raw_fd() as u32;
        self.xsks
            .update(&key.to_ne_bytes(), &fd.to_ne_bytes(), MapFlags::ANY)
            .map_err(err("writing xsks"))
    }

    /// Takes a socket out of the XSKMAP (its worker is stopping).
    pub fn clear_socket(&self, key: u32) {
        let _ = self.xsks.delete(&key.to_ne_bytes());
    }

    pub fn counters(&self) -> XdpCounters {
        let read = |i| sum_percpu(&self.counters, i);
        XdpCounters {
            redirected: read(0),
            passed_not_ours: read(1),
            passed_unknown_interface: read(2),
            too_short: read(3),
            passed_no_socket: read(4),
            passed_queue_out_of_range: read(5),
        }
    }

    /// Frames redirected to the socket at `key`, and frames of its queue
    /// that found no socket there.
    pub fn socket_counts(&self, key: u32) -> (u64, u64) {
        (
            sum_percpu(&self.redirected, key),
            sum_percpu(&self.unserved, key),
        )
    }
}

/// The loaded program, attached to a set of interfaces.
pub struct XdpAttachment {
    skel: TandemSkel<'static>,
    attached: Vec<(i32, u32)>,
    maps: Arc<XdpMaps>,
}

impl XdpAttachment {
    /// Loads the program and attaches it to each `(ifindex, mode, slot)`.
    pub fn attach(
        ports: &[(u32, PortMode, u32)],
        mode: AttachMode,
    ) -> Result<XdpAttachment, XdpError> {
        let mut this = XdpAttachment::load(ports)?;
        this.attach_all(ports, mode)?;
        Ok(this)
    }

    /// Loads the program and configures the ports without attaching it:
    /// sockets can be bound and registered first, so no frame reaches the
    /// program before its queue's socket exists.
    pub fn load(ports: &[(u32, PortMode, u32)]) -> Result<XdpAttachment, XdpError> {
        // The skeleton borrows its open object for as long as it lives; the
        // daemon loads once, so the object is simply kept for the process.
        let obj = Box::leak(Box::new(MaybeUninit::uninit()));
        let open = TandemSkelBuilder::default()
            .open(obj)
            .map_err(err("opening the XDP object"))?;
        let skel = open
            .load()
            .map_err(err("loading the XDP program (root, BTF)"))?;
        let handle = |m: &libbpf_rs::Map, what: &str| {
            MapHandle::try_from(m).map_err(|e| XdpError(format!("map {what}: {e}")))
        };
        let maps = Arc::new(XdpMaps {
            xsks: handle(&skel.maps.xsks, "xsks")?,
            counters: handle(&skel.maps.counters, "counters")?,
            redirected: handle(&skel.maps.per_socket_redirected, "per_socket_redirected")?,
            unserved: handle(&skel.maps.per_socket_unserved, "per_socket_unserved")?,
        });
        let this = XdpAttachment {
            skel,
            attached: Vec::new(),
            maps,
        };
        if ports.len() > MAX_PORTS as usize {
            return Err(XdpError(format!(
                "{} ports: the XDP program serves at most {MAX_PORTS}",
                ports.len()
            )));
        }
        for &(ifindex, m, slot) in ports {
            let value = (slot << 8) | m as u32;
            this.skel
                .maps
                .if_mode
                .update(&ifindex.to_ne_bytes(), &value.to_ne_bytes(), MapFlags::ANY)
                .map_err(err("writing if_mode"))?;
        }
        Ok(this)
    }

    /// Attaches the loaded program to every port.
    pub fn attach_all(
        &mut self,
        ports: &[(u32, PortMode, u32)],
        mode: AttachMode,
    ) -> Result<(), XdpError> {
        for &(ifindex, _, _) in ports {
            self.attach_one(ifindex as i32, mode)?;
        }
        Ok(())
    }

    fn attach_one(&mut self, ifindex: i32, mode: AttachMode) -> Result<(), XdpError> {
        let xdp = Xdp::new(self.skel.progs.xdp_tandem.as_fd());
        // A program left by a crashed run would make the attach fail.
        for f in [XdpFlags::DRV_MODE, XdpFlags::SKB_MODE] {
            let _ = xdp.detach(ifindex, f);
        }
        let tries: &[XdpFlags] = match mode {
            AttachMode::Auto => &[XdpFlags::DRV_MODE, XdpFlags::SKB_MODE],
            AttachMode::Native => &[XdpFlags::DRV_MODE],
            AttachMode::Generic => &[XdpFlags::SKB_MODE],
        };
        let mut last = None;
        for f in tries {
            match xdp.attach(ifindex, XdpFlags::from_bits_truncate(f.bits())) {
                Ok(()) => {
                    info!(
                        ifindex,
                        mode = if f.bits() == XdpFlags::DRV_MODE.bits() {
                            "native"
                        } else {
                            "generic"
                        },
                        "XDP attached"
                    );
                    self.attached.push((ifindex, f.bits()));
                    return Ok(());
                }
                Err(e) => last = Some(e),
            }
        }
        Err(XdpError(format!(
            "attaching XDP to ifindex {ifindex}: {}",
            last.map_or("no mode".into(), |e| e.to_string())
        )))
    }

    /// The maps, for workers (sockets) and the daemon (counters).
    pub fn maps(&self) -> &Arc<XdpMaps> {
        &self.maps
    }
}

impl Drop for XdpAttachment {
    fn drop(&mut self) {
        let xdp = Xdp::new(self.skel.progs.xdp_tandem.as_fd());
        for &(ifindex, bits) in &self.attached {
            if let Err(e) = xdp.detach(ifindex, XdpFlags::from_bits_truncate(bits)) {
                warn!(ifindex, error = %e, "detaching XDP");
            }
        }
    }
}

/// Detaches any XDP program from `ifindex` (crash recovery, `lab down`).
pub fn detach_all(ifindex: u32) {
    // Any program fd works for a detach by flags; load ours to get one.
    let obj = Box::leak(Box::new(MaybeUninit::uninit()));
    let Ok(open) = TandemSkelBuilder::default().open(obj) else {
        return;
    };
    let Ok(skel) = open.load() else { return };
    let xdp = Xdp::new(skel.progs.xdp_tandem.as_fd());
    for f in [XdpFlags::DRV_MODE, XdpFlags::SKB_MODE] {
        let _ = xdp.detach(ifindex as i32, f);
    }
}
