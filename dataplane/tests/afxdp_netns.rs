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
use std::sync::mpsc;
use std::time::Duration;
use tandem_dataplane::os;
use tandem_dataplane::session::lock;
use tandem_dataplane::testbed::{Firewall, Topo, in_ns};

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
