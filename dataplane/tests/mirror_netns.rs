//! Port mirroring through a real AF_XDP firewall: frames the client sends
//! to the firewall's trust port are copied, exactly as they arrived, out of
//! a third port, where a capture in another namespace sees them
//! byte-identical; the originals are forwarded as ever. Needs root
//! (network namespaces, XDP); skips with the reason otherwise.

use std::time::{Duration, Instant};
use tandem_dataplane::config::{InterfaceConfig, MirrorConfig};
use tandem_dataplane::frames::{L4, build};
use tandem_dataplane::os;
use tandem_dataplane::testbed::{Firewall, FirewallSpec, Topo, in_ns, sh};

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
    let mut spec = FirewallSpec::sample();
    spec.config.interfaces.push(InterfaceConfig {
        name: "mon0".into(),
        device: "m0".into(),
        zone: "trust".into(),
        addresses: vec![],
        reth: None,
        mtu: None,
        vlan: None,
        tcp_mss: None,
    });
    spec.config.mirror.push(MirrorConfig {
        name: "tap".into(),
        interface: "reth0".into(),
        rate: 1,
        output: "mon0".into(),
    });
    let fw = Firewall::start_with(fw_ns, spec);
    // The capture first, then the client's frames: UDP to the server
    // through the reth0 VIP's MAC, each with its own marker.
    let capture = in_ns(&mon, || {
        let fd = packet_socket("m1");
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(8);
        let mut buf = vec![0u8; 4096];
        while Instant::now() < deadline && got.len() < 64 {
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n > 0 {
                got.push(buf[..n as usize].to_vec());
            }
        }
        unsafe { libc::close(fd) };
        got
    });
    std::thread::sleep(Duration::from_millis(300));
    let sent = in_ns(client, || {
        let mac = os::mac("c0").expect("c0 mac");
        let fd = packet_socket("c0");
        let vmac = [0x02, 0, 0x5e, 0, 1, 1];
        let frames: Vec<Vec<u8>> = (0..20u16)
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
            let n = unsafe { libc::send(fd, f.as_ptr().cast(), f.len(), 0) };
            assert_eq!(n as usize, f.len());
            std::thread::sleep(Duration::from_millis(5));
        }
        unsafe { libc::close(fd) };
        frames
    })
    .join()
    .unwrap();
    let got = capture.join().unwrap();
    let marked: Vec<&Vec<u8>> = got
        .iter()
        .filter(|f| f.windows(10).any(|w| w == b"mirror-me-"))
        .collect();
    assert_eq!(marked.len(), 20, "every frame mirrored once (rate 1)");
    for (m, s) in marked.iter().zip(&sent) {
        assert_eq!(
            m.as_slice(),
            s.as_slice(),
            "the copy is the frame as it arrived"
        );
    }
    let io = fw
        .dataplane()
        .health
        .workers()
        .iter()
        .map(|w| {
            use std::sync::atomic::Ordering::Relaxed;
            (
                w.io.mirror_admitted.load(Relaxed),
                w.io.mirror_no_frame.load(Relaxed),
            )
        })
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    assert!(io.0 >= 20, "admitted counted: {io:?}");
    assert_eq!(io.1, 0);
    // The originals were forwarded (SNATed sessions exist for them).
    let stats = fw.stop();
    assert!(
        stats
            .sessions_created
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 20
    );
    sh(&["ip", "netns", "del", &mon]);
}
