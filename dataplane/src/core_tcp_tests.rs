//! TCP through the packet core: window tracking against blind resets and
//! out-of-window segments, challenge ACKs, relearning after a promotion,
//! and MSS clamping.

use super::*;

const C_ISN: u32 = 7_000;
const S_ISN: u32 = 90_000;
const CPORT: u16 = 40000;

/// A segment of the test connection (client 10.1.0.10:40000 -> server
/// 192.0.2.100:443, source-NATed to 192.0.2.1:40000), or of its IPv6 twin
/// (2001:db8:1::10 -> 2001:db8:2::100, NAT to 2001:db8:2::1).
fn segment(v6: bool, from_client: bool, flags: u8, seq: u32, ack: u32, payload: &[u8]) -> Vec<u8> {
    let (client, server, nat) = if v6 {
        (
            super::v6("2001:db8:1::10"),
            super::v6("2001:db8:2::100"),
            super::v6("2001:db8:2::1"),
        )
    } else {
        (v4("10.1.0.10"), v4("192.0.2.100"), v4("192.0.2.1"))
    };
    let l4 = L4::Tcp {
        sport: if from_client { CPORT } else { 443 },
        dport: if from_client { 443 } else { CPORT },
        flags,
        seq,
        ack,
        payload: payload.to_vec(),
    };
    if from_client {
        build(VMAC_T, CLIENT_MAC, client, server, 64, &l4)
    } else {
        build(VMAC_U, SERVER_MAC, server, nat, 64, &l4)
    }
}

fn send(r: &mut Rig, f: &mut [u8], from_client: bool) -> Verdict {
    run(r, f, if from_client { T } else { U })
}

/// SYN, SYN-ACK, ACK of the test connection; the session is established.
fn handshake(r: &mut Rig, v6: bool) {
    let steps = [
        (true, packet::TCP_SYN, C_ISN, 0),
        (false, packet::TCP_SYN | packet::TCP_ACK, S_ISN, C_ISN + 1),
        (true, packet::TCP_ACK, C_ISN + 1, S_ISN + 1),
    ];
    for (from_client, flags, seq, ack) in steps {
        let mut f = segment(v6, from_client, flags, seq, ack, b"");
        assert!(
            matches!(send(r, &mut f, from_client), Verdict::Tx { .. }),
            "handshake step {flags:#x}"
        );
    }
    assert_eq!(state(r, v6), TcpState::Established);
}

fn state(r: &Rig, v6: bool) -> TcpState {
    let t = read(r.core.table());
    let (c, s) = if v6 {
        (
            IpAddr::from("2001:db8:1::10".parse::<Ipv6Addr>().unwrap()),
            IpAddr::from("2001:db8:2::100".parse::<Ipv6Addr>().unwrap()),
        )
    } else {
        (
            IpAddr::from(Ipv4Addr::new(10, 1, 0, 10)),
            IpAddr::from(Ipv4Addr::new(192, 0, 2, 100)),
        )
    };
    let key = SessionKey::new(c, CPORT, s, 443, 6, r.core.config().ifaces[0].zone);
    t.get(t.lookup_forward(&key).expect("session"))
        .unwrap()
        .tcp_state
}

use std::net::IpAddr;

#[test]
fn blind_rst_with_a_wrong_sequence_number_leaves_the_connection_working() {
    let mut r = rig(true);
    handshake(&mut r, false);
    // An off-path attacker who knows the 4-tuple, not the sequence.
    let mut rst = segment(
        false,
        false,
        packet::TCP_RST,
        S_ISN + 1 + 0x4000_0000,
        0,
        b"",
    );
    assert_eq!(
        send(&mut r, &mut rst, false),
        Verdict::Drop(DropReason::TcpRstOutOfWindow)
    );
    assert_eq!(state(&r, false), TcpState::Established);
    assert_eq!(r.core.stats().dropped(DropReason::TcpRstOutOfWindow), 1);
    // Long after the closed-state timer, the connection still forwards.
    assert_eq!(r.core.expire(Millis(NOW.0 + 60_000)), 0);
    let mut data = segment(
        false,
        true,
        packet::TCP_ACK,
        C_ISN + 1,
        S_ISN + 1,
        b"still here",
    );
    assert!(matches!(
        send(&mut r, &mut data, true),
        Verdict::Tx { iface: U, .. }
    ));
}

#[test]
fn exact_rst_closes_the_session() {
    let mut r = rig(true);
    handshake(&mut r, false);
    let mut rst = segment(false, false, packet::TCP_RST, S_ISN + 1, 0, b"");
    assert!(matches!(
        send(&mut r, &mut rst, false),
        Verdict::Tx { iface: T, .. }
    ));
    assert_eq!(state(&r, false), TcpState::Closed);
}

#[test]
fn inexact_in_window_rst_is_answered_with_a_challenge_ack() {
    for v6 in [false, true] {
        let mut r = rig(true);
        handshake(&mut r, v6);
        let mut rst = segment(v6, false, packet::TCP_RST, S_ISN + 1 + 100, 0, b"");
        let Verdict::Reply { len } = send(&mut r, &mut rst, false) else {
            panic!("challenge ACK expected (v6 {v6})");
        };
        rst.truncate(len.max(60));
        verify_checksums(&rst).unwrap();
        let ip = ip_of(&rst);
        let nat = if v6 {
            super::v6("2001:db8:2::1")
        } else {
            v4("192.0.2.1")
        };
        let server = if v6 {
            super::v6("2001:db8:2::100")
        } else {
            v4("192.0.2.100")
        };
        // From the client's public face to the RST's sender.
        assert_eq!((Addr(ip.src), Addr(ip.dst)), (nat, server));
        assert_eq!(packet::ports(&rst, &ip).unwrap(), (CPORT, 443));
        assert_eq!(packet::mac_at(&rst, 0).unwrap(), SERVER_MAC);
        let seg = tcp::Segment::parse(&rst, ip.l4, ip.end).unwrap();
        assert_eq!(
            (seg.flags, seg.seq, seg.ack, seg.len),
            (tcp::ACK, C_ISN + 1, S_ISN + 1, 0),
            "the client's SND.NXT and RCV.NXT"
        );
        assert_eq!(state(&r, v6), TcpState::Established);
        assert_eq!(r.core.stats().tcp_challenge_acks.load(Ordering::Relaxed), 1);
        assert_eq!(r.core.stats().dropped(DropReason::TcpRstChallenged), 1);
    }
}

#[test]
fn data_outside_the_window_is_dropped_and_counted() {
    let mut r = rig(true);
    handshake(&mut r, false);
    let mut f = segment(
        false,
        true,
        packet::TCP_ACK,
        C_ISN + 0x8000_0000,
        S_ISN + 1,
        b"x",
    );
    assert_eq!(
        send(&mut r, &mut f, true),
        Verdict::Drop(DropReason::TcpOutOfWindow)
    );
    // Acknowledging data the server never sent.
    let mut f = segment(
        false,
        true,
        packet::TCP_ACK,
        C_ISN + 1,
        S_ISN + 1_000_000,
        b"",
    );
    assert_eq!(
        send(&mut r, &mut f, true),
        Verdict::Drop(DropReason::TcpOutOfWindow)
    );
    assert_eq!(r.core.stats().dropped(DropReason::TcpOutOfWindow), 2);
    assert_eq!(state(&r, false), TcpState::Established);
}

#[test]
fn syn_fin_never_creates_a_session() {
    let mut r = rig(true);
    let mut f = segment(
        false,
        true,
        packet::TCP_SYN | packet::TCP_FIN,
        C_ISN,
        0,
        b"",
    );
    assert_eq!(
        send(&mut r, &mut f, true),
        Verdict::Drop(DropReason::TcpBadFlags)
    );
    assert!(read(r.core.table()).is_empty());
}

#[test]
fn syn_ack_not_acking_the_syn_is_dropped() {
    let mut r = rig(true);
    let mut syn = segment(false, true, packet::TCP_SYN, C_ISN, 0, b"");
    send(&mut r, &mut syn, true);
    let mut f = segment(
        false,
        false,
        packet::TCP_SYN | packet::TCP_ACK,
        S_ISN,
        12345,
        b"",
    );
    assert_eq!(
        send(&mut r, &mut f, false),
        Verdict::Drop(DropReason::TcpSynAckMismatch)
    );
    assert_eq!(state(&r, false), TcpState::SynSent);
}

#[test]
fn syn_inside_an_established_session_reaches_the_endpoint_unchanged() {
    let mut r = rig(true);
    handshake(&mut r, false);
    let mut f = segment(false, true, packet::TCP_SYN, 123, 0, b"");
    assert!(matches!(
        send(&mut r, &mut f, true),
        Verdict::Tx { iface: U, .. }
    ));
    assert_eq!(state(&r, false), TcpState::Established);
    assert_eq!(r.core.stats().tcp_passed.load(Ordering::Relaxed), 1);
}

#[test]
fn a_new_epoch_relearns_windows_so_a_failover_never_kills_the_connection() {
    let mut r = rig(true);
    handshake(&mut r, false);
    // The peer forwarded the connection for a while (the sequence moved
    // far on), then this node became primary again in a new epoch.
    r.roles.store(Arc::new(RoleMap::from([(
        RG1,
        RgRole {
            primary: true,
            epoch: Epoch(4),
        },
    )])));
    let (c, s) = (C_ISN + 0x9000_0000, S_ISN + 0x7000_0000);
    let mut f = segment(false, true, packet::TCP_ACK, c, s, b"after failover");
    assert!(matches!(send(&mut r, &mut f, true), Verdict::Tx { .. }));
    let mut f = segment(false, false, packet::TCP_ACK, s, c + 14, b"reply");
    assert!(matches!(send(&mut r, &mut f, false), Verdict::Tx { .. }));
    // Both sides seen again: a blind RST is refused.
    let mut rst = segment(
        false,
        false,
        packet::TCP_RST,
        s.wrapping_add(0x8000_0000),
        0,
        b"",
    );
    assert_eq!(
        send(&mut r, &mut rst, false),
        Verdict::Drop(DropReason::TcpRstOutOfWindow)
    );
    assert_eq!(state(&r, false), TcpState::Established);
}

/// A SYN (or SYN-ACK) carrying an MSS option.
fn with_mss(mut f: Vec<u8>, mss: u16) -> Vec<u8> {
    let ip = ip_of(&f);
    assert_eq!(ip.end - ip.l4, 24, "built with a 4-byte payload");
    f[ip.l4 + 12] = 6 << 4;
    f[ip.l4 + 20..ip.l4 + 24].copy_from_slice(&[2, 4, (mss >> 8) as u8, mss as u8]);
    let c = packet::l4_checksum(&f, &ip, ip.l4 + 16);
    packet::put16(&mut f, ip.l4 + 16, c);
    f
}

fn mss_of(f: &[u8]) -> u16 {
    let ip = ip_of(f);
    packet::be16(f, ip.l4 + 22).unwrap()
}

#[test]
fn mss_is_clamped_on_syn_and_syn_ack_v4_and_v6() {
    for v6 in [false, true] {
        let mut r = rig_with(true, |c| c.interfaces[1].tcp_mss = Some(1400));
        let mut syn = with_mss(segment(v6, true, packet::TCP_SYN, C_ISN, 0, &[0; 4]), 1460);
        assert!(matches!(send(&mut r, &mut syn, true), Verdict::Tx { .. }));
        let want = if v6 { 1380 } else { 1400 };
        assert_eq!(mss_of(&syn), want, "v6 {v6}");
        verify_checksums(&syn).unwrap();
        let mut synack = with_mss(
            segment(
                v6,
                false,
                packet::TCP_SYN | packet::TCP_ACK,
                S_ISN,
                C_ISN + 1,
                &[0; 4],
            ),
            9000,
        );
        assert!(matches!(
            send(&mut r, &mut synack, false),
            Verdict::Tx { .. }
        ));
        assert_eq!(mss_of(&synack), want);
        verify_checksums(&synack).unwrap();
        assert_eq!(r.core.stats().tcp_mss_clamped.load(Ordering::Relaxed), 2);
    }
}

#[test]
fn a_smaller_mss_is_left_alone() {
    let mut r = rig_with(true, |c| c.interfaces[1].tcp_mss = Some(1400));
    let mut syn = with_mss(
        segment(false, true, packet::TCP_SYN, C_ISN, 0, &[0; 4]),
        1200,
    );
    assert!(matches!(send(&mut r, &mut syn, true), Verdict::Tx { .. }));
    assert_eq!(mss_of(&syn), 1200);
    assert_eq!(r.core.stats().tcp_mss_clamped.load(Ordering::Relaxed), 0);
}

/// The test config plus a policy letting trust reach the port-forwarded
/// server (which sits in trust) — what an operator adds for hairpinning.
fn hairpin_rig() -> Rig {
    rig_with(true, |c| {
        c.policies.push(crate::testbed::hairpin_web_policy())
    })
}

#[test]
fn dnat_hairpin_lets_an_inside_client_use_the_public_address() {
    let mut r = hairpin_rig();
    let mut syn = build(
        VMAC_T,
        CLIENT_MAC,
        v4("10.1.0.10"),
        v4("192.0.2.1"),
        64,
        &L4::tcp(packet::TCP_SYN, CPORT, 8080, b""),
    );
    assert!(matches!(
        send(&mut r, &mut syn, true),
        Verdict::Tx { iface: T, .. }
    ));
    let ip = ip_of(&syn);
    // To the real server, from the public address: the server answers
    // through the firewall.
    assert_eq!(
        (Addr(ip.src), Addr(ip.dst)),
        (v4("192.0.2.1"), v4("10.1.0.10"))
    );
    assert_eq!(packet::ports(&syn, &ip).unwrap(), (CPORT, 80));
    verify_checksums(&syn).unwrap();
    let mut synack = build(
        VMAC_T,
        CLIENT_MAC,
        v4("10.1.0.10"),
        v4("192.0.2.1"),
        64,
        &L4::tcp(packet::TCP_SYN | packet::TCP_ACK, 80, CPORT, b""),
    );
    assert!(matches!(
        send(&mut r, &mut synack, true),
        Verdict::Tx { iface: T, .. }
    ));
    let ip = ip_of(&synack);
    // Back to the client as if from the public address it dialled.
    assert_eq!(
        (Addr(ip.src), Addr(ip.dst)),
        (v4("192.0.2.1"), v4("10.1.0.10"))
    );
    assert_eq!(packet::ports(&synack, &ip).unwrap(), (8080, CPORT));
    verify_checksums(&synack).unwrap();
    let t = read(r.core.table());
    t.verify_invariants().unwrap();
    assert_eq!(t.len(), 1);
}

#[test]
fn dnat_hairpin_still_needs_a_policy() {
    let mut r = rig(true);
    let mut syn = build(
        VMAC_T,
        CLIENT_MAC,
        v4("10.1.0.10"),
        v4("192.0.2.1"),
        64,
        &L4::tcp(packet::TCP_SYN, CPORT, 8080, b""),
    );
    assert_eq!(
        send(&mut r, &mut syn, true),
        Verdict::Drop(DropReason::NoPolicy)
    );
}
