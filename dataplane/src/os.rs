//! Small OS helpers the dataplane needs: interface index and MAC, entering
//! a network namespace, privilege checks for tests.

use crate::packet::Mac;
use std::fs;
use std::io;
use std::os::fd::AsRawFd;

/// The index of `dev` in the calling thread's network namespace (sysfs
/// would show the namespace it was mounted in, not the thread's).
pub fn ifindex(dev: &str) -> io::Result<u32> {
    let name = std::ffi::CString::new(dev).map_err(io::Error::other)?;
    // SAFETY: `name` is a valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if i == 0 {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no interface {dev:?}"),
        ));
    }
    Ok(i)
}

/// The MAC address of `dev` in the calling thread's network namespace.
pub fn mac(dev: &str) -> io::Result<Mac> {
    if dev.len() >= libc::IFNAMSIZ {
        return Err(io::Error::other(format!("interface name {dev:?} too long")));
    }
    // SAFETY: a plain datagram socket used only for the ioctl below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(dev.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR reads into `req`, which outlives the call.
    let rc = unsafe { libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut req) };
    let err = io::Error::last_os_error();
    // SAFETY: `fd` is ours.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return Err(err);
    }
    // SAFETY: the kernel filled the hwaddr member of the union.
    let sa = unsafe { req.ifr_ifru.ifru_hwaddr };
    let mut m = [0u8; 6];
    for (d, s) in m.iter_mut().zip(sa.sa_data.iter()) {
        *d = *s as u8;
    }
    Ok(m)
}

/// One SIOCETHTOOL request on `dev`: `buf` is the ethtool struct (its
/// first word the command), read and written by the kernel.
fn ethtool(dev: &str, buf: &mut [u32]) -> io::Result<()> {
    if dev.len() >= libc::IFNAMSIZ {
        return Err(io::Error::other(format!("interface name {dev:?} too long")));
    }
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    // SAFETY: a plain datagram socket used only for the ioctl below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(dev.bytes()) {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_data = buf.as_mut_ptr().cast();
    // SAFETY: SIOCETHTOOL reads `req` and reads/writes the struct `buf`
    // holds (sized for the command by the caller); both outlive the call.
    let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL, &mut req) };
    let err = io::Error::last_os_error();
    // SAFETY: `fd` is ours.
    unsafe { libc::close(fd) };
    if rc != 0 { Err(err) } else { Ok(()) }
}

/// RX queues of `dev` in the calling thread's network namespace, from the
/// driver (ethtool channels: dedicated RX plus combined queues); 1 when
/// the driver does not say.
pub fn rx_queues(dev: &str) -> io::Result<u32> {
    const ETHTOOL_GCHANNELS: u32 = 0x3c;
    // struct ethtool_channels: cmd, then max_{rx,tx,other,combined}, then
    // {rx,tx,other,combined}_count.
    let mut ch = [0u32; 9];
    ch[0] = ETHTOOL_GCHANNELS;
    match ethtool(dev, &mut ch) {
        Ok(()) => Ok((ch[5] + ch[8]).max(1)),
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(1),
        Err(e) => Err(e),
    }
}

const ETHTOOL_GFLAGS: u32 = 0x25;
const ETHTOOL_SFLAGS: u32 = 0x26;
/// `ETH_FLAG_RXVLAN`: the device takes 802.1Q tags out of received frames
/// into metadata, where an XDP program does not see them.
const ETH_FLAG_RXVLAN: u32 = 1 << 8;

/// Whether `dev` strips received 802.1Q tags (receive VLAN offload).
pub fn rx_vlan_offload(dev: &str) -> io::Result<bool> {
    let mut v = [ETHTOOL_GFLAGS, 0];
    ethtool(dev, &mut v)?;
    Ok(v[1] & ETH_FLAG_RXVLAN != 0)
}

/// Turns receive VLAN offload on or off on `dev`.
pub fn set_rx_vlan_offload(dev: &str, on: bool) -> io::Result<()> {
    let mut v = [ETHTOOL_GFLAGS, 0];
    ethtool(dev, &mut v)?;
    let flags = if on {
        v[1] | ETH_FLAG_RXVLAN
    } else {
        v[1] & !ETH_FLAG_RXVLAN
    };
    if flags == v[1] {
        return Ok(());
    }
    let mut v = [ETHTOOL_SFLAGS, flags];
    ethtool(dev, &mut v)?;
    if rx_vlan_offload(dev)? != on {
        return Err(io::Error::other(format!(
            "{dev}: receive VLAN offload is fixed {}",
            if on { "off" } else { "on" }
        )));
    }
    Ok(())
}

/// Pins the calling thread to `cpu` (best effort: an error is returned,
/// the thread keeps running unpinned).
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes within it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The nice value of a dataplane worker thread. A worker that shares its
/// CPU with other processes (a small box, or the lab, where the traffic
/// generator runs beside both nodes) otherwise waits behind them for a
/// scheduler slice with frames in its ring: at nice 0 the lab's first-packet
/// latency was ~3 ms at p50 against ~0.3 ms for the kernel's softirq path.
/// On dedicated CPUs it changes nothing.
pub const WORKER_NICE: i32 = -10;

/// Sets the calling thread's nice value (Linux: per thread).
pub fn raise_priority(nice: i32) -> io::Result<()> {
    // SAFETY: plain syscalls on the calling thread's id.
    let rc = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, nice)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// CPUs this process may run on.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Moves the calling thread into the named network namespace
/// (`/var/run/netns/<name>`). Threads spawned afterwards inherit it.
pub fn enter_netns(name: &str) -> io::Result<()> {
    let f = fs::File::open(format!("/var/run/netns/{name}"))?;
    // SAFETY: setns with a valid namespace fd only changes this thread's
    // network namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether this process can create namespaces and load XDP programs: root
/// with CAP_NET_ADMIN and CAP_SYS_ADMIN / CAP_BPF. Tests that need it skip
/// with a message otherwise.
pub fn privileged() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not running as root".into());
    }
    let status = fs::read_to_string("/proc/self/status").map_err(|e| e.to_string())?;
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    const CAP_NET_ADMIN: u64 = 1 << 12;
    const CAP_SYS_ADMIN: u64 = 1 << 21;
    if eff & CAP_NET_ADMIN == 0 || eff & CAP_SYS_ADMIN == 0 {
        return Err("root without CAP_NET_ADMIN/CAP_SYS_ADMIN".into());
    }
    if std::process::Command::new("ip").arg("-V").output().is_err() {
        return Err("iproute2 (`ip`) not installed".into());
    }
    Ok(())
}
