//! Ordinary tools through a real AF_XDP firewall (the test bed of
//! `afxdp_netns.rs`, both families): the first ping to a host the firewall
//! has never resolved, pings and UDP datagrams the hosts fragment,
//! traceroute's firewall hop and path-MTU discovery against a smaller
//! egress MTU. Needs root (network namespaces, XDP) and iputils
//! ping/tracepath and traceroute; skips with the reason otherwise.

use std::net::UdpSocket;
use std::process::{Command, Output};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Duration;
use tandem_dataplane::core::DropReason;
use tandem_dataplane::os;
use tandem_dataplane::packet;
use tandem_dataplane::testbed::{Firewall, FirewallSpec, Topo, in_ns};

fn skip() -> bool {
    if let Err(why) = os::privileged() {
        eprintln!("SKIPPED: L3 netns test needs root with CAP_NET_ADMIN/CAP_SYS_ADMIN: {why}");
        return true;
    }
    for tool in ["ping", "traceroute", "tracepath"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            eprintln!(
                "SKIPPED: L3 netns test needs {tool} (iputils-ping, iputils-tracepath, traceroute)"
            );
            return true;
        }
    }
    false
}

/// Runs a command inside a namespace.
fn run_in(ns: &str, args: &[&str]) -> Output {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .expect("run command")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn the_first_ping_to_a_never_resolved_host_is_answered_in_both_families() {
    if skip() {
        return;
    }
    let topo = Topo::new("n");
    let fw = Firewall::start(&topo.ns[1]);
    for (flag, server) in [("-4", "192.0.2.100"), ("-6", "2001:db8:2::100")] {
        let o = run_in(&topo.ns[0], &["ping", flag, "-c", "1", "-W", "3", server]);
        assert!(o.status.success(), "first ping to {server}: {}", text(&o));
    }
    let stats = fw.stop();
    assert!(
        stats.held_sent.load(Ordering::Relaxed) >= 2,
        "the echo requests waited for the server's MAC and went out"
    );
    assert_eq!(stats.dropped(DropReason::NeighborMiss), 0);
}

#[test]
fn pings_of_3000_bytes_pass_fragmented_through_snat_in_both_families() {
    if skip() {
        return;
    }
    let topo = Topo::new("g");
    let fw = Firewall::start(&topo.ns[1]);
    for (flag, server) in [("-4", "192.0.2.100"), ("-6", "2001:db8:2::100")] {
        let o = run_in(
            &topo.ns[0],
            &[
                "ping", flag, "-c", "3", "-i", "0.2", "-W", "3", "-s", "3000", server,
            ],
        );
        let out = text(&o);
        assert!(
            o.status.success() && out.contains("3 received"),
            "ping -s 3000 {server}: {out}"
        );
    }
    let stats = fw.stop();
    // 3 requests and 3 replies of 3 fragments each, per family.
    assert!(
        stats.fragments.load(Ordering::Relaxed) >= 2 * 18,
        "fragments: {}",
        stats.fragments.load(Ordering::Relaxed)
    );
    assert_eq!(stats.dropped(DropReason::FragmentOverlap), 0);
    assert_eq!(stats.dropped(DropReason::FragmentTimeout), 0);
}

#[test]
fn a_4000_byte_udp_datagram_passes_both_ways_through_snat_in_both_families() {
    if skip() {
        return;
    }
    let topo = Topo::new("d");
    let fw = Firewall::start(&topo.ns[1]);
    let (seen_tx, seen_rx) = mpsc::channel();
    let server = in_ns(&topo.ns[2], move || {
        let u = UdpSocket::bind("[::]:9000").unwrap();
        u.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = vec![0u8; 8192];
        for _ in 0..2 {
            let (n, from) = u.recv_from(&mut buf).unwrap();
            u.send_to(&buf[..n], from).unwrap();
            seen_tx.send((n, from)).unwrap();
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    let client = in_ns(&topo.ns[0], || {
        let mut echoes = Vec::new();
        for server in ["192.0.2.100:9000", "[2001:db8:2::100]:9000"] {
            let bind = if server.starts_with('[') {
                "[::]:0"
            } else {
                "0.0.0.0:0"
            };
            let u = UdpSocket::bind(bind).unwrap();
            u.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let msg: Vec<u8> = (0..4000u32).map(|i| (i * 31 % 251) as u8).collect();
            let mut buf = vec![0u8; 8192];
            // The first datagram may wait for the server's MAC; retry once
            // a second if nothing came back.
            let mut got = None;
            for _ in 0..3 {
                u.send_to(&msg, server).unwrap();
                if let Ok(n) = u.recv(&mut buf) {
                    got = Some(buf[..n].to_vec());
                    break;
                }
            }
            echoes.push((msg, got));
        }
        echoes
    });
    for (sent, got) in client.join().expect("client") {
        assert_eq!(got.as_deref(), Some(&sent[..]), "the whole datagram back");
    }
    server.join().expect("server");
    let mut peers: Vec<String> = (0..2)
        .map(|_| {
            let (n, from) = seen_rx.recv().unwrap();
            assert_eq!(n, 4000);
            from.ip().to_canonical().to_string()
        })
        .collect();
    peers.sort();
    assert_eq!(
        peers,
        ["192.0.2.1", "2001:db8:2::1"],
        "SNAT in both families"
    );
    let stats = fw.stop();
    assert!(stats.fragments.load(Ordering::Relaxed) >= 2 * 6);
}

#[test]
fn traceroute_shows_the_firewall_hop_in_both_families() {
    if skip() {
        return;
    }
    let topo = Topo::new("r");
    let fw = Firewall::start(&topo.ns[1]);
    for (flag, server, hop) in [
        ("-4", "192.0.2.100", "10.1.0.1"),
        ("-6", "2001:db8:2::100", "2001:db8:1::1"),
    ] {
        let o = run_in(
            &topo.ns[0],
            &[
                "traceroute",
                flag,
                "-n",
                "-q",
                "1",
                "-w",
                "3",
                "-m",
                "4",
                server,
            ],
        );
        let out = text(&o);
        let lines: Vec<&str> = out.lines().collect();
        let hop1 = lines
            .iter()
            .find(|l| l.trim_start().starts_with("1 "))
            .unwrap_or_else(|| panic!("no hop 1: {out}"));
        assert!(hop1.contains(hop), "hop 1 is the VIP: {out}");
        let hop2 = lines
            .iter()
            .find(|l| l.trim_start().starts_with("2 "))
            .unwrap_or_else(|| panic!("no hop 2: {out}"));
        assert!(hop2.contains(server), "hop 2 is the server: {out}");
    }
    let stats = fw.stop();
    assert!(stats.dropped(DropReason::TtlExceeded) >= 2);
}

#[test]
fn tracepath_learns_a_smaller_egress_mtu_from_the_firewall() {
    if skip() {
        return;
    }
    let topo = Topo::new("m");
    let mut spec = FirewallSpec::sample();
    spec.config.interfaces[1].mtu = Some(1400);
    let fw = Firewall::start_with(&topo.ns[1], spec);
    for (flag, server) in [("-4", "192.0.2.100"), ("-6", "2001:db8:2::100")] {
        let o = run_in(&topo.ns[0], &["tracepath", flag, "-n", "-m", "4", server]);
        let out = text(&o);
        assert!(out.contains("pmtu 1400"), "tracepath {server}: {out}");
    }
    let stats = fw.stop();
    assert!(stats.dropped(DropReason::MtuExceeded) >= 2);
}

/// A raw AF_PACKET socket on a device, reading each frame's 802.1Q tag
/// from the kernel's auxiliary data (the receive path moves an in-band
/// tag there).
struct RawPort {
    fd: i32,
}

impl RawPort {
    fn open(dev: &str) -> RawPort {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket calls on values built here; errors checked.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto));
            assert!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto;
            sll.sll_ifindex = os::ifindex(dev).unwrap() as i32;
            let rc = libc::bind(
                fd,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
            let on: i32 = 1;
            libc::setsockopt(
                fd,
                libc::SOL_PACKET,
                libc::PACKET_AUXDATA,
                (&on as *const i32).cast(),
                4,
            );
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
            RawPort { fd }
        }
    }

    fn send(&self, frame: &[u8]) {
        // SAFETY: `frame` is valid for its length.
        let n = unsafe { libc::send(self.fd, frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            n as usize,
            frame.len(),
            "send: {}",
            std::io::Error::last_os_error()
        );
    }

    /// The next frame received (not our own sends) and its VLAN id, within
    /// `wait`.
    fn recv_until(
        &self,
        wait: Duration,
        mut want: impl FnMut(&[u8], Option<u16>) -> bool,
    ) -> Option<(Vec<u8>, Option<u16>)> {
        let end = std::time::Instant::now() + wait;
        let mut buf = vec![0u8; 9000];
        let mut cmsg = [0u64; 16];
        while std::time::Instant::now() < end {
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            // SAFETY: msghdr is plain data; every pointer set below is
            // valid for the call.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_name = (&mut from as *mut libc::sockaddr_ll).cast();
            msg.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cmsg.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&cmsg);
            // SAFETY: as above.
            let n = unsafe { libc::recvmsg(self.fd, &mut msg, 0) };
            if n <= 0 || from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            let mut vlan = None;
            // SAFETY: walking the control messages the kernel wrote.
            unsafe {
                let mut c = libc::CMSG_FIRSTHDR(&msg);
                while !c.is_null() {
                    if (*c).cmsg_level == libc::SOL_PACKET && (*c).cmsg_type == libc::PACKET_AUXDATA
                    {
                        let aux = &*(libc::CMSG_DATA(c) as *const libc::tpacket_auxdata);
                        if aux.tp_status & libc::TP_STATUS_VLAN_VALID != 0 {
                            vlan = Some(aux.tp_vlan_tci & 0x0fff);
                        }
                    }
                    c = libc::CMSG_NXTHDR(&msg, c);
                }
            }
            let frame = &buf[..n as usize];
            if want(frame, vlan) {
                return Some((frame.to_vec(), vlan));
            }
        }
        None
    }
}

impl Drop for RawPort {
    fn drop(&mut self) {
        // SAFETY: ours.
        unsafe { libc::close(self.fd) };
    }
}

fn tagged(mut frame: Vec<u8>, vid: u16) -> Vec<u8> {
    let len = frame.len();
    frame.resize(len + 4, 0);
    let n = packet::insert_vlan(&mut frame, len, vid);
    frame.truncate(n);
    frame
}

/// A client segment on VLAN 100 of the trust port (`reth0.100`, zone
/// guest, VIP 10.100.0.1) beside the untagged one, driven with tagged
/// frames from a raw socket (this kernel may lack 802.1Q devices): ARP for
/// its VIP is answered on VLAN 100 with the unit's virtual MAC, its UDP to
/// the server is source-NATed and the answer comes back tagged 100, the
/// session keeps the unit as its interface, a tag no unit is configured
/// for (VLAN 200) is dropped and counted, and an untagged frame to the
/// unit's virtual MAC is not taken for the unit.
#[test]
fn a_vlan_unit_is_its_own_segment_and_unknown_tags_are_dropped() {
    use tandem_dataplane::config::{InterfaceConfig, PolicyAction, PolicyConfig, RethConfig};
    use tandem_dataplane::core::build_arp;
    use tandem_dataplane::frames::{L4, build};
    use tandem_dataplane::session::{Addr, InterfaceId, lock};
    if skip() {
        return;
    }
    let topo = Topo::new("v");
    let mut spec = FirewallSpec::sample();
    spec.config.interfaces.push(InterfaceConfig {
        name: "reth0.100".into(),
        device: "t0".into(),
        zone: "guest".into(),
        addresses: vec![],
        reth: Some(RethConfig {
            rg: 1,
            vmac: "02:00:5e:00:01:03".into(),
            vips: vec!["10.100.0.1/24".parse().unwrap()],
        }),
        mtu: None,
        vlan: Some(100),
        tcp_mss: None,
    });
    spec.config.policies.push(PolicyConfig {
        name: "guest-out".into(),
        from_zone: "guest".into(),
        to_zone: "untrust".into(),
        source: vec![],
        destination: vec![],
        protocol: None,
        ports: vec![],
        action: PolicyAction::Permit,
    });
    let mut snat = spec.config.snat[0].clone();
    snat.name = "guest-out".into();
    snat.from_zone = "guest".into();
    spec.config.snat.push(snat);
    let fw = Firewall::start_with(&topo.ns[1], spec);
    let (seen_tx, seen_rx) = mpsc::channel();
    let server = in_ns(&topo.ns[2], move || {
        let u = UdpSocket::bind("0.0.0.0:9000").unwrap();
        u.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = u.recv_from(&mut buf).unwrap();
        u.send_to(&buf[..n], from).unwrap();
        seen_tx.send(from).unwrap();
    });
    std::thread::sleep(Duration::from_millis(200));
    let client = in_ns(&topo.ns[0], || {
        let port = RawPort::open("c0");
        let cmac = os::mac("c0").unwrap();
        let me: Addr = "10.100.0.10".parse::<std::net::Ipv4Addr>().unwrap().into();
        let vip: Addr = "10.100.0.1".parse::<std::net::Ipv4Addr>().unwrap().into();
        let is_arp_reply = |f: &[u8], v: Option<u16>| {
            v == Some(100) && f.len() >= 42 && f[12..14] == [8, 6] && f[20..22] == [0, 2]
        };
        let mut vmac = None;
        for _ in 0..3 {
            port.send(&tagged(
                build_arp(1, cmac, packet::BROADCAST, &me, &vip),
                100,
            ));
            if let Some((f, _)) = port.recv_until(Duration::from_secs(1), is_arp_reply) {
                vmac = Some(packet::mac_at(&f, 22).unwrap());
                break;
            }
        }
        let vmac = vmac.expect("ARP for the guest VIP answered on VLAN 100");
        let server: Addr = "192.0.2.100".parse::<std::net::Ipv4Addr>().unwrap().into();
        let udp = build(
            vmac,
            cmac,
            me,
            server,
            64,
            &L4::Udp {
                sport: 40100,
                dport: 9000,
                payload: b"from vlan 100".to_vec(),
            },
        );
        let mut answer = None;
        for _ in 0..3 {
            port.send(&tagged(udp.clone(), 100));
            answer = port.recv_until(Duration::from_secs(1), |f, _| {
                f.len() > 42 && f[12..14] == [8, 0] && f[23] == 17 && f[26..30] == [192, 0, 2, 100]
            });
            if answer.is_some() {
                break;
            }
        }
        let (f, vlan) = answer.expect("the server's answer");
        // Unknown tag: nobody answers.
        let other: Addr = "10.200.0.1".parse::<std::net::Ipv4Addr>().unwrap().into();
        let me200: Addr = "10.200.0.10".parse::<std::net::Ipv4Addr>().unwrap().into();
        port.send(&tagged(
            build_arp(1, cmac, packet::BROADCAST, &me200, &other),
            200,
        ));
        port.send(&tagged(
            build_arp(1, cmac, packet::BROADCAST, &me200, &other),
            200,
        ));
        let answered_200 = port
            .recv_until(Duration::from_millis(500), |f, _| {
                f.len() >= 42 && f[12..14] == [8, 6] && f[20..22] == [0, 2]
            })
            .is_some();
        // Untagged, to the unit's virtual MAC: the trust unit's frame.
        port.send(&udp);
        (vmac, f, vlan, answered_200)
    });
    let (vmac, answer, vlan, answered_200) = client.join().expect("client");
    server.join().unwrap();
    assert_eq!(vmac, [0x02, 0, 0x5e, 0, 1, 3], "the unit's virtual MAC");
    assert_eq!(vlan, Some(100), "the answer carries the unit's tag");
    assert_eq!(&answer[30..34], &[10, 100, 0, 10]);
    assert_eq!(&answer[42..answer.len().min(55)], b"from vlan 100");
    assert_eq!(
        seen_rx.recv().unwrap().ip().to_string(),
        "192.0.2.1",
        "SNAT"
    );
    assert!(!answered_200, "no unit for VLAN 200");
    {
        let t = lock(&fw.table);
        let (_, rec) = t
            .iter()
            .find(|(_, r)| r.key.dst_port == 9000)
            .expect("the UDP session");
        assert_eq!(rec.ingress_if, InterfaceId(2), "the unit, not the port");
    }
    std::thread::sleep(Duration::from_millis(100));
    let stats = fw.stop();
    assert_eq!(
        stats.dropped(DropReason::VlanTagged),
        2,
        "the VLAN 200 ARPs"
    );
    assert!(
        stats.dropped(DropReason::NotForUs) >= 1,
        "untagged to the unit's MAC is not the unit's"
    );
}
