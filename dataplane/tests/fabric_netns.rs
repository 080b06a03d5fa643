//! Active/active over a real fabric link, AF_XDP on every port:
//!
//! ```text
//!  client c0 10.1.0.10 ── br-t ──┬── t0 [n0] u0 ──┬── br-u ── s0 192.0.2.100 server
//!                                └── t0 [n1] u0 ──┘
//!                           n0 fab0 ──────── fab0 n1
//! ```
//! reth0 (trust) is in RG1, primary on n0; reth1 (untrust) is in RG2,
//! primary on n1. A session belongs to the RG of its egress reth, so the
//! client's flows enter n0, cross the fabric unprocessed, are processed
//! (SNAT) and sent by n1; the server's replies enter n1, are processed there
//! and cross the fabric for n0 to transmit on reth0. Needs root; skips with
//! the reason otherwise.

use arc_swap::ArcSwap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Duration;
use tandem_dataplane::os;
use tandem_dataplane::session::lock;
use tandem_dataplane::testbed::{FabricSpec, Firewall, FirewallSpec, in_ns, sample_config, sh};
use tandem_fabric::{FabricMap, FabricStats, Link, RgOwner};
use tandem_proto::{Epoch, RgId};

/// Namespaces named after this process, deleted on drop.
struct Pair {
    client: String,
    server: String,
    switch: String,
    nodes: [String; 2],
}

impl Pair {
    fn new() -> Pair {
        let p = std::process::id();
        let t = Pair {
            client: format!("tfc{p}"),
            server: format!("tfs{p}"),
            switch: format!("tfw{p}"),
            nodes: [format!("tf0n{p}"), format!("tf1n{p}")],
        };
        for n in t.all() {
            sh(&["ip", "netns", "add", n]);
            sh(&["ip", "-n", n, "link", "set", "lo", "up"]);
        }
        let sw = t.switch.as_str();
        for br in ["br-t", "br-u"] {
            sh(&["ip", "-n", sw, "link", "add", br, "type", "bridge"]);
            sh(&["ip", "-n", sw, "link", "set", br, "up"]);
        }
        let attach = [
            (t.client.as_str(), "c0", "sw-c", "br-t"),
            (t.nodes[0].as_str(), "t0", "sw-0t", "br-t"),
            (t.nodes[1].as_str(), "t0", "sw-1t", "br-t"),
            (t.server.as_str(), "s0", "sw-s", "br-u"),
            (t.nodes[0].as_str(), "u0", "sw-0u", "br-u"),
            (t.nodes[1].as_str(), "u0", "sw-1u", "br-u"),
        ];
        for (ns, dev, port, br) in attach {
            sh(&[
                "ip", "link", "add", dev, "netns", ns, "type", "veth", "peer", "name", port,
                "netns", sw,
            ]);
            sh(&["ip", "-n", sw, "link", "set", port, "master", br, "up"]);
            sh(&["ip", "-n", ns, "link", "set", dev, "up"]);
            // The dataplane rewrites packets: checksums must be complete.
            sh(&["ip", "netns", "exec", ns, "ethtool", "-K", dev, "tx", "off"]);
        }
        sh(&[
            "ip",
            "link",
            "add",
            "fab0",
            "netns",
            &t.nodes[0],
            "type",
            "veth",
            "peer",
            "name",
            "fab0",
            "netns",
            &t.nodes[1],
        ]);
        for n in &t.nodes {
            // Room for a full frame plus the fabric header.
            sh(&["ip", "-n", n, "link", "set", "fab0", "mtu", "1600", "up"]);
        }
        sh(&[
            "ip",
            "-n",
            &t.client,
            "addr",
            "add",
            "10.1.0.10/24",
            "dev",
            "c0",
        ]);
        sh(&[
            "ip", "-n", &t.client, "route", "add", "default", "via", "10.1.0.1",
        ]);
        sh(&[
            "ip",
            "-n",
            &t.server,
            "addr",
            "add",
            "192.0.2.100/24",
            "dev",
            "s0",
        ]);
        t
    }

    fn all(&self) -> Vec<&str> {
        let mut v = vec![
            self.client.as_str(),
            self.server.as_str(),
            self.switch.as_str(),
        ];
        v.extend(self.nodes.iter().map(String::as_str));
        v
    }

    fn mac(&self, node: usize, dev: &str) -> [u8; 6] {
        let out = Command::new("ip")
            .args(["-n", &self.nodes[node], "-j", "link", "show", dev])
            .output()
            .expect("ip link");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j");
        let s = v[0]["address"].as_str().expect("address");
        let mut mac = [0u8; 6];
        for (b, h) in mac.iter_mut().zip(s.split(':')) {
            *b = u8::from_str_radix(h, 16).expect("hex");
        }
        mac
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for n in self.all() {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

/// Node `n`'s fabric map: it owns RG `n + 1`, the peer the other.
fn fabric(t: &Pair, n: usize) -> FabricSpec {
    let owner = |rg: u16| RgOwner {
        peer_owns: usize::from(rg - 1) != n,
        epoch: Epoch(2),
    };
    FabricSpec {
        device: "fab0".into(),
        map: Arc::new(ArcSwap::from_pointee(FabricMap {
            rgs: [(RgId(1), owner(1)), (RgId(2), owner(2))].into(),
            links: vec![Link {
                // After the two data interfaces (0 and 1).
                port: 2,
                up: true,
                local_mac: t.mac(n, "fab0"),
                peer_mac: Some(t.mac(1 - n, "fab0")),
            }],
            active: Some(0),
        })),
        stats: Arc::new(FabricStats::default()),
    }
}

#[test]
fn active_active_flows_cross_the_fabric_both_ways_with_snat() {
    if let Err(why) = os::privileged() {
        eprintln!(
            "SKIPPED: fabric netns test needs root with CAP_NET_ADMIN/CAP_SYS_ADMIN and iproute2: {why}"
        );
        return;
    }
    let t = Pair::new();
    let mut config = sample_config();
    config.interfaces[1].reth.as_mut().expect("reth1").rg = 2;
    let specs: Vec<FirewallSpec> = (0..2)
        .map(|n| FirewallSpec {
            config: config.clone(),
            primary: vec![RgId(n as u16 + 1)],
            fabric: Some(fabric(&t, n)),
            ..FirewallSpec::sample()
        })
        .collect();
    let stats: Vec<Arc<FabricStats>> = specs
        .iter()
        .map(|s| s.fabric.as_ref().expect("fabric").stats.clone())
        .collect();
    let firewalls: Vec<Firewall> = specs
        .into_iter()
        .enumerate()
        .map(|(n, s)| Firewall::start_with(&t.nodes[n], s))
        .collect();

    let (seen_tx, seen_rx) = mpsc::channel::<SocketAddr>();
    let server = in_ns(&t.server, move || {
        let tcp = TcpListener::bind("0.0.0.0:8000").expect("bind");
        let udp = UdpSocket::bind("0.0.0.0:9000").expect("bind");
        udp.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let (mut s, peer) = tcp.accept().expect("accept");
        seen_tx.send(peer).expect("send");
        let mut buf = [0u8; 1024];
        for _ in 0..3 {
            let n = s.read(&mut buf).expect("read");
            s.write_all(&buf[..n]).expect("write");
        }
        let (n, from) = udp.recv_from(&mut buf).expect("udp");
        udp.send_to(&buf[..n], from).expect("udp echo");
        seen_tx.send(from).expect("send");
    });
    std::thread::sleep(Duration::from_millis(200));
    let client = in_ns(&t.client, || {
        let mut s = TcpStream::connect_timeout(
            &"192.0.2.100:8000".parse().expect("addr"),
            Duration::from_secs(10),
        )
        .expect("connect across the fabric");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut echoes = Vec::new();
        for msg in [&b"one"[..], b"two", b"three"] {
            s.write_all(msg).expect("write");
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).expect("read");
            echoes.push(buf[..n].to_vec());
        }
        let u = UdpSocket::bind("0.0.0.0:0").expect("bind");
        u.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut buf = [0u8; 64];
        let mut got = None;
        // The first datagram may meet an unresolved neighbor (dropped and
        // counted, as ARP resolution starts): retry a few times.
        for _ in 0..5 {
            u.send_to(b"udp across", "192.0.2.100:9000").expect("send");
            if let Ok(n) = u.recv(&mut buf) {
                got = Some(buf[..n].to_vec());
                break;
            }
        }
        (echoes, got)
    });
    let (echoes, udp) = client.join().expect("client");
    server.join().expect("server");
    assert_eq!(
        echoes,
        vec![b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]
    );
    assert_eq!(udp.as_deref(), Some(&b"udp across"[..]));
    assert_eq!(
        seen_rx.recv().expect("tcp peer").ip().to_string(),
        "192.0.2.1",
        "SNAT by n1"
    );
    assert_eq!(
        seen_rx.recv().expect("udp peer").ip().to_string(),
        "192.0.2.1"
    );

    // The sessions live on n1 (owner of the egress RG), none on n0.
    assert!(
        lock(&firewalls[1].table).len() >= 2,
        "sessions on the owner of RG2"
    );
    assert_eq!(lock(&firewalls[0].table).len(), 0, "no session on n0");
    let (s0, s1) = (stats[0].snapshot(), stats[1].snapshot());
    assert!(s0.sent[0] >= 5, "n0 sent the client's frames to n1: {s0:?}");
    assert!(s1.received[0] >= 5, "{s1:?}");
    assert!(
        s1.sent[0] >= 5,
        "n1 sent the replies to n0 for reth0: {s1:?}"
    );
    assert!(s0.received[0] >= 5, "{s0:?}");
    // Per RG: n0 handed over RG2's frames (the sessions' RG); n1 handed
    // back frames leaving by reth0 (RG1).
    let rg = |s: &tandem_fabric::map::FabricSnapshot, id: u16| {
        s.by_rg
            .iter()
            .find(|r| r.rg == id)
            .map(|r| (r.sent, r.received))
    };
    assert!(rg(&s0, 2).is_some_and(|(sent, _)| sent >= 5), "{s0:?}");
    assert!(rg(&s1, 1).is_some_and(|(sent, _)| sent >= 5), "{s1:?}");
    assert!(
        rg(&s1, 2).is_some_and(|(_, received)| received >= 5),
        "{s1:?}"
    );
    for s in [&s0, &s1] {
        assert_eq!(
            (s.drop_loop, s.drop_stale_epoch, s.drop_bad_header),
            (0, 0, 0),
            "{s:?}"
        );
    }
    let core: Vec<_> = firewalls.into_iter().map(Firewall::stop).collect();
    assert!(core[1].sessions_created.load(Ordering::Relaxed) >= 2);
    assert_eq!(core[0].sessions_created.load(Ordering::Relaxed), 0);
}
