//! Real AF_XDP forwarding in network namespaces:
//!
//! ```text
//!   client ns            fw ns (AF_XDP dataplane)          server ns
//!   c0 10.1.0.10/24 ---- t0 [reth0: VIP 10.1.0.1]
//!                           [reth1: VIP 192.0.2.1]  u0 ---- s0 192.0.2.100/24
//! ```
//! TCP and UDP from the client to the server go through SNAT (the server
//! sees 192.0.2.1); a TCP connection from the server side to
//! 192.0.2.1:8080 is port-forwarded to the client's port 80. Needs root
//! (network namespaces, XDP); skips with the reason otherwise.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};
use std::time::Duration;
use tandem_dataplane::afxdp::{FabricHook, FabricInbound, FabricTx};
use tandem_dataplane::os;
use tandem_dataplane::session::{InterfaceId, lock};
use tandem_dataplane::testbed::{Firewall, FirewallSpec, Topo, in_ns, sh};
use tandem_proto::RgId;

fn skip() -> bool {
    if let Err(why) = os::privileged() {
        eprintln!(
            "SKIPPED: AF_XDP netns test needs root with CAP_NET_ADMIN/CAP_SYS_ADMIN and iproute2: {why}"
        );
        return true;
    }
    false
}

#[test]
fn tcp_and_udp_pass_through_afxdp_with_snat_and_a_dnat_port_forward() {
    if skip() {
        return;
    }
    let topo = Topo::new("a");
    let fw = Firewall::start(&topo.ns[1]);
    // Server: TCP echo that reports the peer it saw, UDP echo.
    let (seen_tx, seen_rx) = mpsc::channel::<SocketAddr>();
    let server = in_ns(&topo.ns[2], move || {
        let tcp = TcpListener::bind("0.0.0.0:8000").unwrap();
        let udp = UdpSocket::bind("0.0.0.0:9000").unwrap();
        udp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let (mut s, peer) = tcp.accept().unwrap();
        seen_tx.send(peer).unwrap();
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).unwrap();
        s.write_all(&buf[..n]).unwrap();
        let (n, from) = udp.recv_from(&mut buf).unwrap();
        udp.send_to(&buf[..n], from).unwrap();
        seen_tx.send(from).unwrap();
    });
    std::thread::sleep(Duration::from_millis(200));
    let client = in_ns(&topo.ns[0], || {
        let mut s = TcpStream::connect_timeout(
            &"192.0.2.100:8000".parse().unwrap(),
            Duration::from_secs(10),
        )
        .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"through the firewall").unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap();
        let tcp_echo = buf[..n].to_vec();
        let u = UdpSocket::bind("0.0.0.0:0").unwrap();
        u.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        u.send_to(b"udp probe", "192.0.2.100:9000").unwrap();
        let n = u.recv(&mut buf).unwrap();
        (tcp_echo, buf[..n].to_vec())
    });
    let (tcp_echo, udp_echo) = client.join().expect("client");
    server.join().expect("server");
    assert_eq!(tcp_echo, b"through the firewall");
    assert_eq!(udp_echo, b"udp probe");
    let tcp_peer = seen_rx.recv().unwrap();
    let udp_peer = seen_rx.recv().unwrap();
    assert_eq!(
        tcp_peer.ip().to_string(),
        "192.0.2.1",
        "server saw the SNAT address"
    );
    assert_eq!(udp_peer.ip().to_string(), "192.0.2.1");
    assert!(lock(&fw.table).len() >= 2, "sessions were created");

    // Port forward: the server side connects to the VIP's 8080.
    let listener = in_ns(&topo.ns[0], || {
        let l = TcpListener::bind("0.0.0.0:80").unwrap();
        let (mut s, peer) = l.accept().unwrap();
        s.write_all(b"hello from inside").unwrap();
        peer
    });
    std::thread::sleep(Duration::from_millis(200));
    let outside = in_ns(&topo.ns[2], || {
        let mut s =
            TcpStream::connect_timeout(&"192.0.2.1:8080".parse().unwrap(), Duration::from_secs(10))
                .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap();
        buf[..n].to_vec()
    });
    assert_eq!(outside.join().unwrap(), b"hello from inside");
    assert_eq!(
        listener.join().unwrap().ip().to_string(),
        "192.0.2.100",
        "no SNAT inbound"
    );
    let stats = fw.stop();
    assert!(stats.tx.load(Ordering::Relaxed) > 10);
    assert!(stats.sessions_created.load(Ordering::Relaxed) >= 3);
}

/// veth with 4 RX queues on every end and 2 workers: flows from many
/// source ports spread over the queues (the client's stack hashes them to
/// its TX queues, which native XDP reports as the firewall's RX queues),
/// every queue has a socket, and every flow is forwarded with SNAT both
/// ways whichever worker and queue it lands on. The XDP program's
/// counters account for every frame the workers received.
#[test]
fn flows_spread_over_four_queues_are_all_forwarded_by_two_workers() {
    if skip() {
        return;
    }
    let topo = Topo::with_queues("q", 4);
    let fw = Firewall::start_with(
        &topo.ns[1],
        FirewallSpec {
            workers: Some(2),
            ..FirewallSpec::sample()
        },
    );
    const UDP_FLOWS: usize = 64;
    const TCP_FLOWS: usize = 8;
    let (seen_tx, seen_rx) = mpsc::channel::<SocketAddr>();
    // TCP first: its retransmissions ride out the first packet to a new
    // neighbor, which the dataplane drops while it resolves the MAC.
    let server = in_ns(&topo.ns[2], move || {
        let udp = UdpSocket::bind("0.0.0.0:9000").unwrap();
        udp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let tcp = TcpListener::bind("0.0.0.0:8000").unwrap();
        let mut buf = [0u8; 256];
        for _ in 0..TCP_FLOWS {
            let (mut s, peer) = tcp.accept().unwrap();
            seen_tx.send(peer).unwrap();
            let n = s.read(&mut buf).unwrap();
            s.write_all(&buf[..n]).unwrap();
        }
        for _ in 0..UDP_FLOWS {
            let (n, from) = udp.recv_from(&mut buf).unwrap();
            udp.send_to(&buf[..n], from).unwrap();
            seen_tx.send(from).unwrap();
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    let client = in_ns(&topo.ns[0], || {
        let mut echoed = 0;
        let mut buf = [0u8; 64];
        for i in 0..TCP_FLOWS {
            let mut s = TcpStream::connect_timeout(
                &"192.0.2.100:8000".parse().unwrap(),
                Duration::from_secs(10),
            )
            .unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let msg = format!("tcp flow {i}");
            s.write_all(msg.as_bytes()).unwrap();
            let n = s.read(&mut buf).unwrap();
            assert_eq!(&buf[..n], msg.as_bytes());
            echoed += 1;
        }
        let socks: Vec<UdpSocket> = (0..UDP_FLOWS)
            .map(|_| {
                let u = UdpSocket::bind("0.0.0.0:0").unwrap();
                u.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                u.connect("192.0.2.100:9000").unwrap();
                u
            })
            .collect();
        for (i, u) in socks.iter().enumerate() {
            let msg = format!("udp flow {i}");
            u.send(msg.as_bytes()).unwrap();
            let n = u.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], msg.as_bytes(), "echo of flow {i}");
            echoed += 1;
        }
        echoed
    });
    assert_eq!(client.join().expect("client"), UDP_FLOWS + TCP_FLOWS);
    server.join().expect("server");
    for _ in 0..UDP_FLOWS + TCP_FLOWS {
        let peer = seen_rx.recv().unwrap();
        assert_eq!(peer.ip().to_string(), "192.0.2.1", "source NATed");
    }
    let xdp = fw.dataplane().xdp_counters();
    let workers = fw.dataplane().health.workers();
    assert_eq!(workers.len(), 2);
    let mut queues_used = std::collections::BTreeSet::new();
    let mut rx_total = 0;
    for w in &workers {
        assert_eq!(w.sockets.len(), 4, "2 of the 4 queues of t0 and u0 each");
        let rx = w.io.rx_frames.load(Ordering::Relaxed);
        assert!(
            rx > 0,
            "worker {} received nothing: {:?}",
            w.index,
            w.socket_rx
        );
        rx_total += rx;
        for ((dev, q), n) in w.sockets.iter().zip(&w.socket_rx) {
            if *n > 0 {
                queues_used.insert((dev.clone(), *q));
            }
        }
    }
    assert!(
        queues_used.iter().filter(|(d, _)| d == "t0").count() >= 2,
        "client flows on at least two queues: {queues_used:?}"
    );
    assert_eq!(xdp.passed_no_socket, 0, "every queue is served");
    assert!(
        xdp.redirected >= rx_total && rx_total >= 2 * (UDP_FLOWS + TCP_FLOWS) as u64,
        "XDP redirected {} frames, workers received {rx_total}",
        xdp.redirected
    );
    let stats = fw.stop();
    assert_eq!(
        stats.sessions_created.load(Ordering::Relaxed),
        (UDP_FLOWS + TCP_FLOWS) as u64
    );
}

/// A worker that panics takes its queues with it: the dataplane reports
/// every port it served as not served, with the reason, and is no longer
/// running (what makes the daemon's node ineligible).
#[test]
fn a_panicking_worker_is_reported_with_its_ports() {
    if skip() {
        return;
    }
    struct Bomb;
    impl FabricHook for Bomb {
        fn to_owner(&mut self, _: RgId, _: InterfaceId) -> Option<FabricTx> {
            panic!("injected worker fault")
        }
        fn egress_to_owner(&mut self, _: RgId, _: InterfaceId) -> Option<FabricTx> {
            None
        }
        fn arrived_on_fabric(&mut self, _: &[u8], _: InterfaceId) -> Option<FabricInbound> {
            None
        }
    }
    let topo = Topo::new("p");
    // Secondary for RG1: the first client frame goes to the fabric hook.
    let fw = Firewall::start_with(
        &topo.ns[1],
        FirewallSpec {
            primary: vec![],
            hooks: Some(Arc::new(|_| Box::new(Bomb) as Box<dyn FabricHook>)),
            ..FirewallSpec::sample()
        },
    );
    assert!(fw.dataplane().health.running());
    // The node does not answer ARP for a VIP it is not primary for: the
    // client is given the virtual MAC.
    sh(&[
        "ip",
        "-n",
        &topo.ns[0],
        "neigh",
        "replace",
        "10.1.0.1",
        "lladdr",
        "02:00:5e:00:01:01",
        "dev",
        "c0",
        "nud",
        "permanent",
    ]);
    let _ = in_ns(&topo.ns[0], || {
        let u = UdpSocket::bind("0.0.0.0:0").unwrap();
        for _ in 0..5 {
            let _ = u.send_to(b"x", "192.0.2.100:9000");
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .join();
    let health = &fw.dataplane().health;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while (health.running()
        || !health
            .ports()
            .iter()
            .all(|p| p.reason.contains("worker 0 panicked")))
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !health.running(),
        "a dead worker stops the dataplane's health"
    );
    let ports = health.ports();
    assert!(ports.iter().all(|p| !p.ok), "{ports:?}");
    assert!(
        ports.iter().all(|p| p.reason.contains("worker 0 panicked")),
        "{ports:?}"
    );
    fw.stop();
}
