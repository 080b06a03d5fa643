//! TCP window tracking through a real AF_XDP firewall: a blind RST from
//! off the path, with a sequence number the attacker had to guess, must
//! not end a live connection, even after an idle pause longer than the
//! closed-state timer; and an inside client reaches a port forward through
//! its public address (hairpinning). Needs root (network namespaces, XDP); skips with
//! the reason otherwise.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::Duration;
use tandem_dataplane::core::DropReason;
use tandem_dataplane::frames::{L4, ip_packet};
use tandem_dataplane::os;
use tandem_dataplane::session::{Addr, TcpState, Timeouts, lock};
use tandem_dataplane::tcp;
use tandem_dataplane::testbed::{Firewall, FirewallSpec, Topo, hairpin_web_policy, in_ns};

fn skip() -> bool {
    if let Err(why) = os::privileged() {
        eprintln!("SKIPPED: TCP netns test needs root with CAP_NET_ADMIN/CAP_SYS_ADMIN: {why}");
        return true;
    }
    false
}

/// Sends `packet` (an IPv4 packet, header included) from the calling
/// thread's namespace through a raw socket: the kernel routes it and
/// resolves the next hop, as any host on the segment could.
fn send_raw_ipv4(packet: &[u8], dst: Ipv4Addr) {
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW);
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(dst).to_be(),
            },
            sin_zero: [0; 8],
        };
        let n = libc::sendto(
            fd,
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&sin as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        );
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        assert_eq!(n as usize, packet.len(), "sendto: {err}");
    }
}

fn echo(s: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    s.write_all(msg).unwrap();
    let mut buf = vec![0u8; msg.len()];
    s.read_exact(&mut buf).unwrap();
    buf
}

#[test]
fn blind_rsts_with_guessed_sequence_numbers_leave_a_live_connection_working() {
    if skip() {
        return;
    }
    let topo = Topo::new("k");
    let fw = Firewall::start(&topo.ns[1]);
    let (peer_tx, peer_rx) = mpsc::channel::<SocketAddr>();
    let (bound_tx, bound_rx) = mpsc::channel::<()>();
    let server = in_ns(&topo.ns[2], move || {
        let l = TcpListener::bind("0.0.0.0:7000").unwrap();
        bound_tx.send(()).unwrap();
        let (mut s, from) = l.accept().unwrap();
        peer_tx.send(from).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut buf = [0u8; 256];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => s.write_all(&buf[..n]).unwrap(),
            }
        }
    });
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    // The client connects only once the server listens (a SYN before
    // that is refused by the server's kernel).
    bound_rx.recv_timeout(Duration::from_secs(15)).unwrap();
    let client = in_ns(&topo.ns[0], move || {
        let mut s = TcpStream::connect_timeout(
            &"192.0.2.100:7000".parse().unwrap(),
            Duration::from_secs(10),
        )
        .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        assert_eq!(echo(&mut s, b"before"), b"before");
        done_tx.send(()).unwrap();
        go_rx.recv().unwrap();
        echo(&mut s, b"after the resets")
    });
    let public = peer_rx.recv_timeout(Duration::from_secs(15)).unwrap();
    assert_eq!(public.ip().to_string(), "192.0.2.1", "source NAT");
    done_rx.recv_timeout(Duration::from_secs(15)).unwrap();
    // From the server's segment, as the server: sequence numbers spread
    // over the whole space, none of them the connection's.
    let port = public.port();
    let injector = in_ns(&topo.ns[2], move || {
        for i in 0..8u32 {
            let rst = ip_packet(
                Addr::from(Ipv4Addr::new(192, 0, 2, 100)),
                Addr::from(Ipv4Addr::new(192, 0, 2, 1)),
                64,
                &L4::Tcp {
                    sport: 7000,
                    dport: port,
                    flags: tcp::RST,
                    seq: 0x1357_9bdf_u32.wrapping_add(i.wrapping_mul(0x2000_0000)),
                    ack: 0,
                    payload: vec![],
                },
            );
            send_raw_ipv4(&rst, Ipv4Addr::new(192, 0, 2, 1));
        }
    });
    injector.join().unwrap();
    // Idle past the closed-state timer: a session the RST had closed would
    // be gone by now.
    std::thread::sleep(Duration::from_millis(
        u64::from(Timeouts::default().tcp_time_wait_ms) + 1500,
    ));
    {
        let t = lock(&fw.table);
        let (_, rec) = t
            .iter()
            .find(|(_, r)| r.key.dst_port == 7000)
            .expect("the session is still there");
        assert_eq!(rec.tcp_state, TcpState::Established);
    }
    go_tx.send(()).unwrap();
    assert_eq!(client.join().expect("client"), b"after the resets");
    server.join().unwrap();
    let stats = fw.stop();
    let refused =
        stats.dropped(DropReason::TcpRstOutOfWindow) + stats.dropped(DropReason::TcpRstChallenged);
    assert_eq!(refused, 8, "every forged RST was refused");
    assert_eq!(stats.dropped(DropReason::NoSession), 0);
}

#[test]
fn an_inside_client_reaches_the_port_forward_through_the_public_address() {
    if skip() {
        return;
    }
    let topo = Topo::new("h");
    let mut spec = FirewallSpec::sample();
    spec.config.policies.push(hairpin_web_policy());
    let fw = Firewall::start_with(&topo.ns[1], spec);
    // The port forward's target is the client host itself (port 80): the
    // hairpin goes out the interface it came in on.
    let client = in_ns(&topo.ns[0], || {
        let l = TcpListener::bind("0.0.0.0:80").unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, from) = l.accept().unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).unwrap();
            s.write_all(&buf).unwrap();
            from
        });
        let mut s =
            TcpStream::connect_timeout(&"192.0.2.1:8080".parse().unwrap(), Duration::from_secs(10))
                .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let got = echo(&mut s, b"hello");
        (got, server.join().unwrap())
    });
    let (got, seen_from) = client.join().expect("client");
    assert_eq!(got, b"hello");
    assert_eq!(
        seen_from.ip().to_string(),
        "192.0.2.1",
        "the server sees the public address"
    );
    fw.stop();
}
