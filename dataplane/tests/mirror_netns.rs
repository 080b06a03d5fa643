//! Port mirroring through a real AF_XDP firewall: frames the client sends
//! to the firewall's trust port are copied, exactly as they arrived, out of
//! a third port, where a capture in another namespace sees them
//! byte-identical; the originals are forwarded as ever. Needs root
//! (network namespaces, XDP); skips with the reason otherwise.

use std::time::{Duration, Instant};
use tandem_dataplane::frames::{L4, build};
use tandem_dataplane::os;
use tandem_dataplane::testbed::{Firewall, FirewallSpec, Topo, add_reth0_mirror, in_ns, sh};

fn skip() -> bool {
    if let Err(why) = os::privileged() {
        eprintln!("SKIPPED: mirror netns test needs root with CAP_NET_ADMIN/CAP_SYS_ADMIN: {why}");
        return true;
    }
    false
}

/// A raw AF_PACKET socket on `dev` (all protocols), in the calling
/// thread's namespace.
fn packet_socket(dev: &str) -> i32 {
    let ifindex = os::ifindex(dev).expect("ifindex") as i32;
    unsafe {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto));
        assert!(
            fd >= 0,
            "packet socket: {}",
            std::io::Error::last_os_error()
        );
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex;
        let rc = libc::bind(
            fd,
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        );
        fd
    }
}

/// The sample firewall plus a port `mon0` on device m0, and a mirror of
/// reth0's port to it, 1 in `rate`.
fn mirror_spec(rate: u32) -> FirewallSpec {
    let mut spec = FirewallSpec::sample();
    add_reth0_mirror(&mut spec.config, rate);
    spec
}

/// Frames received on m1 (the mirror port's far end) for `secs`.
fn capture(mon: &str, secs: u64) -> std::thread::JoinHandle<Vec<Vec<u8>>> {
    in_ns(mon, move || {
        let fd = packet_socket("m1");
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut buf = vec![0u8; 4096];
        while Instant::now() < deadline {
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n > 0 {
                got.push(buf[..n as usize].to_vec());
            }
        }
        unsafe { libc::close(fd) };
        got
    })
}

/// `n` marked UDP frames sent from the client's c0 to reth0's VIP MAC
/// through a raw socket (so their bytes are known); returns them.
fn send_marked(client: &str, n: u16) -> Vec<Vec<u8>> {
    in_ns(client, move || {
        let mac = os::mac("c0").expect("c0 mac");
        let fd = packet_socket("c0");
        let vmac = [0x02, 0, 0x5e, 0, 1, 1];
        let frames: Vec<Vec<u8>> = (0..n)
            .map(|i| {
                build(
                    vmac,
                    mac,
                    "10.1.0.10".parse::<std::net::Ipv4Addr>().unwrap().into(),
                    "192.0.2.100".parse::<std::net::Ipv4Addr>().unwrap().into(),
                    64,
                    &L4::Udp {
                        sport: 41000 + i,
                        dport: 7000,
                        payload: format!("mirror-me-{i:02}").into_bytes(),
                    },
                )
            })
            .collect();
        for f in &frames {
            let sent = unsafe { libc::send(fd, f.as_ptr().cast(), f.len(), 0) };
            assert_eq!(sent as usize, f.len());
            std::thread::sleep(Duration::from_millis(5));
        }
        unsafe { libc::close(fd) };
        frames
    })
    .join()
    .unwrap()
}

fn marked(frames: &[Vec<u8>]) -> Vec<&Vec<u8>> {
    frames
        .iter()
        .filter(|f| f.windows(10).any(|w| w == b"mirror-me-"))
        .collect()
}

/// Summed mirror counters of the running firewall's workers, and the
/// frames its reth0 port (t0) received.
fn mirror_counters(fw: &Firewall) -> ([u64; 4], u64) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut c = [0u64; 4];
    let mut t0 = 0;
    for w in fw.dataplane().health.workers() {
        c[0] += w.io.mirror_admitted.load(Relaxed);
        c[1] += w.io.mirror_sampled_out.load(Relaxed);
        c[2] += w.io.mirror_queue_full.load(Relaxed);
        c[3] += w.io.mirror_no_frame.load(Relaxed);
        t0 += w
            .sockets
            .iter()
            .zip(&w.socket_rx)
            .filter(|((name, _), _)| name.starts_with("t0"))
            .map(|(_, n)| n)
            .sum::<u64>();
    }
    (c, t0)
}

#[test]
fn mirrored_frames_are_byte_identical_to_what_arrived_and_originals_still_flow() {
    if skip() {
        return;
    }
    let topo = Topo::new("m");
    let [client, fw_ns, _server] = &topo.ns;
    let mon = format!("tdm{}", std::process::id());
    sh(&["ip", "netns", "add", &mon]);
    sh(&[
        "ip", "link", "add", "m0", "netns", fw_ns, "type", "veth", "peer", "name", "m1", "netns",
        &mon,
    ]);
    for (n, dev) in [(fw_ns.as_str(), "m0"), (mon.as_str(), "m1")] {
        sh(&["ip", "-n", n, "link", "set", dev, "up"]);
    }
    // Every frame (rate 1): the copies are the frames as they arrived.
    let fw = Firewall::start_with(fw_ns, mirror_spec(1));
    let cap = capture(&mon, 3);
    std::thread::sleep(Duration::from_millis(300));
    let sent = send_marked(client, 20);
    let got = cap.join().unwrap();
    let copies = marked(&got);
    assert_eq!(copies.len(), 20, "every frame mirrored once (rate 1)");
    for (m, s) in copies.iter().zip(&sent) {
        assert_eq!(
            m.as_slice(),
            s.as_slice(),
            "the copy is the frame as it arrived"
        );
    }
    let ([admitted, sampled_out, full, no_frame], _) = mirror_counters(&fw);
    assert!(admitted >= 20, "admitted counted: {admitted}");
    assert_eq!((sampled_out, full, no_frame), (0, 0, 0));
    let stats = fw.stop();
    assert!(
        stats
            .sessions_created
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 20,
        "the originals were forwarded (each created its SNAT session)"
    );
    // 1 in 4: a quarter of what t0 received is copied, and every frame
    // t0 received is accounted for as admitted or sampled out.
    let fw = Firewall::start_with(fw_ns, mirror_spec(4));
    let cap = capture(&mon, 3);
    std::thread::sleep(Duration::from_millis(300));
    let sent = send_marked(client, 40);
    let got = cap.join().unwrap();
    let ([admitted, sampled_out, full, no_frame], t0) = mirror_counters(&fw);
    assert_eq!((full, no_frame), (0, 0));
    assert_eq!(admitted + sampled_out, t0, "every received frame accounted");
    assert_eq!(admitted, t0 / 4, "1 in 4 of {t0}");
    let copies = marked(&got);
    assert!(
        (8..=12).contains(&copies.len()),
        "{} of 40 marked frames",
        copies.len()
    );
    for m in copies {
        assert!(
            sent.contains(m),
            "a copy is one of the frames sent, byte for byte"
        );
    }
    fw.stop();
    sh(&["ip", "netns", "del", &mon]);
}
