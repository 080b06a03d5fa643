//! Screens through the packet core: packet screens, flood thresholds,
//! session limits, and the SYN-cookie proxy end to end (cookie, ACK, the
//! proxy's own handshake with the server, translated sequence numbers);
//! half-open sessions stay off the delta queue.

use super::*;
use crate::events::EventKind;
use crate::screen::{COOKIE_MSS, ScreenConfig, ScreenKind, SynFloodConfig};
use crate::session::Proxy;

const OUTSIDE: &str = "192.0.2.100";
const PUBLIC: &str = "192.0.2.1";
const SERVER: &str = "10.1.0.10";

fn untrust_screen() -> ScreenConfig {
    ScreenConfig {
        land: true,
        syn_fin: true,
        tcp_no_flag: true,
        icmp_fragment: true,
        icmp_large: Some(1024),
        ..ScreenConfig::off("untrust-screen", "untrust")
    }
}

/// A rig whose untrust screen answers every SYN with a cookie.
fn cookie_rig() -> Rig {
    screened_rig(|s| {
        s.syn_flood = Some(SynFloodConfig {
            attack_threshold: 0,
            source_threshold: None,
        })
    })
}

fn screened_rig(change: impl FnOnce(&mut ScreenConfig)) -> Rig {
    let mut s = untrust_screen();
    change(&mut s);
    rig_with(true, |c| c.screen.push(s))
}

fn seg(flags: u8, sport: u16, dport: u16, seq: u32, ack: u32, payload: &[u8]) -> L4 {
    L4::Tcp {
        sport,
        dport,
        flags,
        seq,
        ack,
        payload: payload.to_vec(),
    }
}

/// A segment from the outside client to the port forward.
fn from_outside(sport: u16, flags: u8, seq: u32, ack: u32, payload: &[u8]) -> Vec<u8> {
    build(
        VMAC_U,
        SERVER_MAC,
        v4(OUTSIDE),
        v4(PUBLIC),
        64,
        &seg(flags, sport, 8080, seq, ack, payload),
    )
}

/// A segment from the server behind the port forward to the client.
fn from_server(sport: u16, flags: u8, seq: u32, ack: u32, payload: &[u8]) -> Vec<u8> {
    build(
        VMAC_T,
        CLIENT_MAC,
        v4(SERVER),
        v4(OUTSIDE),
        64,
        &seg(flags, 80, sport, seq, ack, payload),
    )
}

fn tcp_of(f: &[u8]) -> tcp::Segment {
    let ip = ip_of(f);
    tcp::Segment::parse(f, ip.l4, ip.end).unwrap()
}

fn screen_stats(r: &Rig) -> &crate::screen::ScreenStats {
    let zone = r.core.config().iface(U).unwrap().zone;
    &r.core.config().screen(zone).unwrap().state.stats
}

fn queued_deltas(r: &mut Rig) -> Vec<SessionKey> {
    let mut keys = Vec::new();
    r.consumers[0].try_recv_many(&mut keys, 1024);
    keys.into_iter()
        .map(|d: crate::delta::Delta| d.key)
        .collect()
}

#[test]
fn packet_screens_drop_land_syn_fin_no_flag_and_large_icmp_with_an_event_each() {
    let mut r = screened_rig(|_| {});
    let mut land = build(
        VMAC_U,
        SERVER_MAC,
        v4(PUBLIC),
        v4(PUBLIC),
        64,
        &seg(packet::TCP_SYN, 80, 80, 1, 0, b""),
    );
    let mut syn_fin = from_outside(40000, packet::TCP_SYN | packet::TCP_FIN, 1, 0, b"");
    let mut no_flag = from_outside(40001, 0, 1, 0, b"");
    let mut big_echo = build(
        VMAC_U,
        SERVER_MAC,
        v4(OUTSIDE),
        v4(SERVER),
        64,
        &L4::IcmpError {
            kind: 8,
            code: 0,
            quoted: vec![0; 1100],
        },
    );
    for f in [&mut land, &mut syn_fin, &mut no_flag, &mut big_echo] {
        assert_eq!(run(&mut r, f, U), Verdict::Drop(DropReason::Screen));
    }
    let s = screen_stats(&r);
    for k in [
        ScreenKind::Land,
        ScreenKind::SynFin,
        ScreenKind::TcpNoFlag,
        ScreenKind::IcmpLarge,
    ] {
        assert_eq!(s.dropped(k), 1, "{k:?}");
    }
    assert_eq!(r.core.stats().dropped(DropReason::Screen), 4);
    let events: Vec<_> = r
        .core
        .events()
        .into_iter()
        .filter(|e| e.kind == EventKind::ScreenDrop)
        .map(|e| e.screen)
        .collect();
    assert_eq!(
        events,
        [
            Some(ScreenKind::Land),
            Some(ScreenKind::SynFin),
            Some(ScreenKind::TcpNoFlag),
            Some(ScreenKind::IcmpLarge)
        ]
    );
    assert!(read(r.core.table()).is_empty());
    // The trust zone has no screen: the same SYN+FIN from inside is judged
    // by the TCP rules alone.
    let mut inside = build(
        VMAC_T,
        CLIENT_MAC,
        v4(SERVER),
        v4(OUTSIDE),
        64,
        &seg(packet::TCP_SYN | packet::TCP_FIN, 40000, 443, 1, 0, b""),
    );
    assert_ne!(
        run(&mut r, &mut inside, T),
        Verdict::Drop(DropReason::Screen)
    );
}

#[test]
fn half_open_sessions_queue_no_delta_until_the_handshake_completes() {
    let mut r = rig(true);
    let mut syn = from_outside(40000, packet::TCP_SYN, 100, 0, b"");
    assert!(matches!(
        run(&mut r, &mut syn, U),
        Verdict::Tx { iface: T, .. }
    ));
    assert_eq!(read(r.core.table()).len(), 1);
    assert!(queued_deltas(&mut r).is_empty(), "SYN-SENT is not synced");
    let mut synack = from_server(40000, packet::TCP_SYN | packet::TCP_ACK, 900, 101, b"");
    assert!(matches!(
        run(&mut r, &mut synack, T),
        Verdict::Tx { iface: U, .. }
    ));
    assert!(
        queued_deltas(&mut r).is_empty(),
        "SYN-RECEIVED is not synced"
    );
    let mut ack = from_outside(40000, packet::TCP_ACK, 101, 901, b"");
    assert!(matches!(
        run(&mut r, &mut ack, U),
        Verdict::Tx { iface: T, .. }
    ));
    let keys = queued_deltas(&mut r);
    assert_eq!(keys.len(), 1, "established: queued once");
    // A UDP session is synced at once.
    let mut dns = build(
        VMAC_T,
        CLIENT_MAC,
        v4(SERVER),
        v4(OUTSIDE),
        64,
        &L4::Udp {
            sport: 5353,
            dport: 53,
            payload: b"q".to_vec(),
        },
    );
    assert!(matches!(run(&mut r, &mut dns, T), Verdict::Tx { .. }));
    assert_eq!(queued_deltas(&mut r).len(), 1);
}

#[test]
fn syn_source_threshold_drops_and_the_attack_threshold_turns_on_cookies() {
    let mut r = screened_rig(|s| {
        s.syn_flood = Some(SynFloodConfig {
            attack_threshold: 2,
            source_threshold: Some(4),
        })
    });
    let mut verdicts = Vec::new();
    for port in 0..6u16 {
        let mut syn = from_outside(40000 + port, packet::TCP_SYN, 7, 0, b"");
        verdicts.push(run(&mut r, &mut syn, U));
    }
    assert!(matches!(verdicts[0], Verdict::Tx { iface: T, .. }));
    assert!(matches!(verdicts[1], Verdict::Tx { iface: T, .. }));
    assert!(
        matches!(verdicts[2], Verdict::Reply { .. }),
        "third SYN to the destination: a cookie"
    );
    assert!(matches!(verdicts[3], Verdict::Reply { .. }));
    assert_eq!(
        verdicts[4],
        Verdict::Drop(DropReason::Screen),
        "fifth SYN from the source"
    );
    assert_eq!(verdicts[5], Verdict::Drop(DropReason::Screen));
    let s = screen_stats(&r);
    assert_eq!(s.cookies_sent.load(Ordering::Relaxed), 2);
    assert_eq!(s.dropped(ScreenKind::SynFloodSource), 2);
    assert_eq!(read(r.core.table()).len(), 2, "cookies create nothing");
    // The next second's window starts again.
    let mut later = from_outside(41000, packet::TCP_SYN, 7, 0, b"");
    let v = r.core.process(&mut later, U, Millis(NOW.0 + 1000));
    assert!(matches!(v, Verdict::Tx { iface: T, .. }), "{v:?}");
}

#[test]
fn a_cookie_handshake_opens_a_proxied_session_translated_both_ways_and_synced_with_its_shift() {
    let mut r = cookie_rig();
    let client_isn = 5_000;
    let mut syn = from_outside(40000, packet::TCP_SYN, client_isn, 0, b"");
    let Verdict::Reply { len } = run(&mut r, &mut syn, U) else {
        panic!("SYN answered with a cookie");
    };
    let synack = &syn[..len];
    verify_checksums(synack).unwrap();
    let ip = ip_of(synack);
    assert_eq!((Addr(ip.src), Addr(ip.dst)), (v4(PUBLIC), v4(OUTSIDE)));
    assert_eq!(packet::mac_at(synack, 6).unwrap(), VMAC_U);
    let cookie_seg = tcp_of(synack);
    assert_eq!(cookie_seg.flags, packet::TCP_SYN | packet::TCP_ACK);
    assert_eq!(cookie_seg.ack, client_isn + 1);
    assert_eq!(crate::screen::syn_mss(synack, ip.l4, ip.end), Some(1460));
    assert!(read(r.core.table()).is_empty());
    let cookie = cookie_seg.seq;
    assert_eq!(COOKIE_MSS[(cookie & 7) as usize], 536, "no MSS option: 536");

    // The client's ACK: the session exists, the proxy's SYN goes to the
    // server with the client's ISN; the ACK itself is consumed.
    let mut ack = from_outside(40000, packet::TCP_ACK, client_isn + 1, cookie + 1, b"");
    assert_eq!(
        run(&mut r, &mut ack, U),
        Verdict::Drop(DropReason::SynProxyHandshake)
    );
    let out = std::mem::take(r.core.outbox());
    assert_eq!(out.len(), 1);
    let (iface, proxy_syn) = &out[0];
    assert_eq!(*iface, T);
    verify_checksums(proxy_syn).unwrap();
    let ip = ip_of(proxy_syn);
    assert_eq!((Addr(ip.src), Addr(ip.dst)), (v4(OUTSIDE), v4(SERVER)));
    assert_eq!(packet::ports(proxy_syn, &ip).unwrap(), (40000, 80));
    let s = tcp_of(proxy_syn);
    assert_eq!((s.flags, s.seq), (packet::TCP_SYN, client_isn));
    assert_eq!(crate::screen::syn_mss(proxy_syn, ip.l4, ip.end), Some(536));
    let key = {
        let t = read(r.core.table());
        let (h, r0) = t.iter().next().unwrap();
        assert_eq!(r0.tcp_state, TcpState::SynSent);
        assert!(matches!(t.proxy(h), Some(Proxy::Pending { .. })));
        r0.key
    };
    assert!(queued_deltas(&mut r).is_empty(), "pending: not synced");

    // Data from the client before the server answered is held (one
    // segment); a second waits for the client's retransmission.
    let mut early = from_outside(40000, packet::TCP_ACK, client_isn + 1, cookie + 1, b"GET");
    assert_eq!(run(&mut r, &mut early, U), Verdict::Held);
    let mut more = from_outside(40000, packet::TCP_ACK, client_isn + 4, cookie + 1, b" /");
    assert_eq!(
        run(&mut r, &mut more, U),
        Verdict::Drop(DropReason::SynProxyPending)
    );

    // The server's SYN-ACK is answered by the proxy's ACK.
    let server_isn = 3_000_000_000u32;
    let mut ssa = from_server(
        40000,
        packet::TCP_SYN | packet::TCP_ACK,
        server_isn,
        client_isn + 1,
        b"",
    );
    let Verdict::Reply { len } = run(&mut r, &mut ssa, T) else {
        panic!("SYN-ACK answered");
    };
    let pack = &ssa[..len];
    verify_checksums(pack).unwrap();
    let ip = ip_of(pack);
    assert_eq!((Addr(ip.src), Addr(ip.dst)), (v4(OUTSIDE), v4(SERVER)));
    let a = tcp_of(pack);
    assert_eq!(
        (a.flags, a.seq, a.ack),
        (packet::TCP_ACK, client_isn + 1, server_isn + 1)
    );
    let shift = server_isn.wrapping_sub(cookie);
    // ... and the held segment follows it, in the server's numbering.
    let out = std::mem::take(r.core.outbox());
    assert_eq!(out.len(), 1);
    let (iface, held) = &out[0];
    assert_eq!(*iface, T);
    verify_checksums(held).unwrap();
    let ip = ip_of(held);
    assert_eq!((Addr(ip.src), Addr(ip.dst)), (v4(OUTSIDE), v4(SERVER)));
    let d = tcp_of(held);
    assert_eq!((d.seq, d.ack, d.len), (client_isn + 1, server_isn + 1, 3));
    {
        let t = read(r.core.table());
        let h = t.lookup_forward(&key).unwrap();
        assert_eq!(t.get(h).unwrap().tcp_state, TcpState::Established);
        assert_eq!(t.proxy(h), Some(Proxy::Shift(shift)));
        assert_eq!(t.to_synced(h, NOW).unwrap().seq_shift, Some(shift));
    }
    assert_eq!(queued_deltas(&mut r), [key], "established: synced");

    // Server data reaches the client in the cookie's numbering.
    let mut data = from_server(
        40000,
        packet::TCP_ACK,
        server_isn + 1,
        client_isn + 1,
        b"hello",
    );
    assert!(matches!(
        run(&mut r, &mut data, T),
        Verdict::Tx { iface: U, .. }
    ));
    verify_checksums(&data).unwrap();
    let d = tcp_of(&data);
    assert_eq!((d.seq, d.ack), (cookie + 1, client_isn + 1));
    let ip = ip_of(&data);
    assert_eq!(Addr(ip.src), v4(PUBLIC));
    // The client's acknowledgment reaches the server in its numbering.
    let mut cack = from_outside(40000, packet::TCP_ACK, client_isn + 1, cookie + 6, b"GET /");
    assert!(matches!(
        run(&mut r, &mut cack, U),
        Verdict::Tx { iface: T, .. }
    ));
    verify_checksums(&cack).unwrap();
    let c = tcp_of(&cack);
    assert_eq!((c.seq, c.ack), (client_isn + 1, server_isn + 6));
    let st = screen_stats(&r);
    assert_eq!(st.cookies_valid.load(Ordering::Relaxed), 1);
    assert_eq!(st.proxy_established.load(Ordering::Relaxed), 1);
    assert_eq!(st.proxy_early_segments.load(Ordering::Relaxed), 2);
    read(r.core.table()).verify_invariants().unwrap();
}

#[test]
fn a_server_refusing_the_proxy_syn_resets_the_client_in_its_numbering() {
    let mut r = cookie_rig();
    let mut syn = from_outside(40000, packet::TCP_SYN, 77, 0, b"");
    let Verdict::Reply { len } = run(&mut r, &mut syn, U) else {
        panic!("cookie");
    };
    let cookie = tcp_of(&syn[..len]).seq;
    let mut ack = from_outside(40000, packet::TCP_ACK, 78, cookie + 1, b"");
    run(&mut r, &mut ack, U);
    let mut rst = from_server(40000, packet::TCP_RST | packet::TCP_ACK, 0, 78, b"");
    assert!(matches!(
        run(&mut r, &mut rst, T),
        Verdict::Tx { iface: U, .. }
    ));
    verify_checksums(&rst).unwrap();
    let s = tcp_of(&rst);
    assert_eq!(s.seq, cookie + 1, "in the client's window");
    let t = read(r.core.table());
    let (_, rec) = t.iter().next().unwrap();
    assert_eq!(rec.tcp_state, TcpState::Closed);
    assert_eq!(screen_stats(&r).proxy_refused.load(Ordering::Relaxed), 1);
}

#[test]
fn an_ack_with_a_wrong_or_expired_cookie_is_no_session_and_counted() {
    let mut r = cookie_rig();
    let mut syn = from_outside(40000, packet::TCP_SYN, 77, 0, b"");
    let Verdict::Reply { len } = run(&mut r, &mut syn, U) else {
        panic!("cookie");
    };
    let cookie = tcp_of(&syn[..len]).seq;
    let mut forged = from_outside(40000, packet::TCP_ACK, 78, (cookie ^ 0x100) + 1, b"");
    assert_eq!(
        run(&mut r, &mut forged, U),
        Verdict::Drop(DropReason::NoSession)
    );
    let mut other_port = from_outside(40001, packet::TCP_ACK, 78, cookie + 1, b"");
    assert_eq!(
        run(&mut r, &mut other_port, U),
        Verdict::Drop(DropReason::NoSession)
    );
    // Two time slots later (over 32 s) the cookie is no longer accepted.
    let mut late = from_outside(40000, packet::TCP_ACK, 78, cookie + 1, b"");
    let v = r.core.process(&mut late, U, Millis(NOW.0 + 40_000));
    assert_eq!(v, Verdict::Drop(DropReason::NoSession));
    assert_eq!(screen_stats(&r).cookies_invalid.load(Ordering::Relaxed), 3);
    assert!(read(r.core.table()).is_empty());
}

#[test]
fn udp_flood_threshold_refuses_new_flows_and_never_an_established_one() {
    let mut r = rig_with(true, |c| {
        let mut s = untrust_screen();
        s.udp_flood = Some(2);
        c.screen.push(s);
        c.policies.insert(
            0,
            PolicyConfig {
                name: "udp-in".into(),
                from_zone: "untrust".into(),
                to_zone: "trust".into(),
                source: vec![],
                destination: vec![],
                protocol: Some("udp".into()),
                ports: vec!["5000".into()],
                action: PolicyAction::Permit,
            },
        );
    });
    let udp = |r: &mut Rig, sport: u16| {
        let mut f = build(
            VMAC_U,
            SERVER_MAC,
            v4(OUTSIDE),
            v4(SERVER),
            64,
            &L4::Udp {
                sport,
                dport: 5000,
                payload: b"q".to_vec(),
            },
        );
        run(r, &mut f, U)
    };
    let v: Vec<Verdict> = (0..4).map(|p| udp(&mut r, 3000 + p)).collect();
    assert!(matches!(v[0], Verdict::Tx { iface: T, .. }));
    assert!(matches!(v[1], Verdict::Tx { iface: T, .. }));
    assert_eq!(v[2], Verdict::Drop(DropReason::Screen));
    assert_eq!(v[3], Verdict::Drop(DropReason::Screen));
    // The two established flows go on however many packets they send.
    for _ in 0..10 {
        assert!(matches!(udp(&mut r, 3000), Verdict::Tx { iface: T, .. }));
        assert!(matches!(udp(&mut r, 3001), Verdict::Tx { iface: T, .. }));
    }
    assert_eq!(screen_stats(&r).dropped(ScreenKind::UdpFlood), 2);
    assert_eq!(read(r.core.table()).len(), 2);
}

#[test]
fn session_limits_refuse_the_session_past_the_limit_and_count_what_leaves() {
    let mut r = rig_with(true, |c| {
        let mut s = untrust_screen();
        s.source_session_limit = Some(2);
        c.screen.push(s);
    });
    // The rig's table does not keep address counts; a table that does:
    let table = shared(SessionTable::new(TableConfig {
        address_counts: true,
        ..TableConfig::default()
    }));
    lock(&table).promote_rg(RG1);
    let mut r2 = {
        let (producer, consumers) = delta_queues(&[RG1], 1024);
        let compiled = r.core.config().clone();
        let core = node(compiled, table, r.roles.clone(), producer);
        core.add_neighbor(T, v4(SERVER), CLIENT_MAC);
        Rig {
            core,
            roles: r.roles.clone(),
            consumers,
        }
    };
    let mut v = Vec::new();
    for port in 0..3u16 {
        let mut syn = from_outside(40000 + port, packet::TCP_SYN, 1, 0, b"");
        v.push(run(&mut r2, &mut syn, U));
    }
    assert!(matches!(v[0], Verdict::Tx { .. }) && matches!(v[1], Verdict::Tx { .. }));
    assert_eq!(v[2], Verdict::Drop(DropReason::Screen));
    assert_eq!(screen_stats(&r2).dropped(ScreenKind::SourceSessionLimit), 1);
    // One session leaves: the source may open another.
    {
        let mut t = lock(r2.core.table());
        let h = t.iter().next().unwrap().0;
        t.remove(h, crate::session::RemoveReason::Closed);
    }
    let mut syn = from_outside(40010, packet::TCP_SYN, 1, 0, b"");
    assert!(matches!(run(&mut r2, &mut syn, U), Verdict::Tx { .. }));
    // Without counts in the table the limit cannot apply (the daemon
    // turns them on whenever a screen limits sessions).
    let mut syn = from_outside(40020, packet::TCP_SYN, 1, 0, b"");
    assert!(matches!(run(&mut r, &mut syn, U), Verdict::Tx { .. }));
    lock(r2.core.table()).verify_invariants().unwrap();
}
