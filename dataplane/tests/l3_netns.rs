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
