//! L3 rules: ICMP the firewall sends (time exceeded, unreachable, too big,
//! rate limit), the TTL of forwarded ICMP errors, IPv6 extension headers.

use super::*;

fn udp(sport: u16, dport: u16, payload: usize) -> L4 {
    L4::Udp {
        sport,
        dport,
        payload: vec![0x5a; payload],
    }
}

fn client_frame(ttl: u8, l4: &L4) -> Vec<u8> {
    build(
        VMAC_T,
        CLIENT_MAC,
        v4("10.1.0.10"),
        v4("192.0.2.100"),
        ttl,
        l4,
    )
}

/// The one frame the core queued, parsed as an ICMP message.
fn one_icmp(r: &mut Rig) -> (Vec<u8>, Ip) {
    let frames: Vec<_> = r.core.outbox().drain(..).collect();
    assert_eq!(frames.len(), 1, "one ICMP message queued");
    let (iface, f) = frames.into_iter().next().unwrap();
    assert_eq!(iface, T, "back out the ingress interface");
    let ip = ip_of(&f);
    verify_checksums(&f).unwrap();
    (f, ip)
}

#[test]
fn ttl_1_is_answered_with_time_exceeded_from_the_ingress_vip() {
    let mut r = rig(true);
    let mut f = client_frame(1, &tcp(packet::TCP_SYN, 40000, 443));
    let pristine = f.clone();
    assert_eq!(
        run(&mut r, &mut f, T),
        Verdict::Drop(DropReason::TtlExceeded)
    );
    let (icmp, ip) = one_icmp(&mut r);
    assert_eq!(ip.proto, proto::ICMP);
    assert_eq!((icmp[ip.l4], icmp[ip.l4 + 1]), (11, 0));
    assert_eq!(
        Addr(ip.src),
        v4("10.1.0.1"),
        "the hop traceroute shows: the VIP"
    );
    assert_eq!(Addr(ip.dst), v4("10.1.0.10"));
    assert_eq!(packet::mac_at(&icmp, 0).unwrap(), CLIENT_MAC);
    assert_eq!(packet::mac_at(&icmp, 6).unwrap(), VMAC_T);
    let quoted = &icmp[ip.l4 + 8..ip.end];
    assert_eq!(
        quoted,
        &pristine[ETH_HLEN..ip_of(&pristine).end],
        "the packet as sent"
    );
    assert!(
        lock(r.core.table()).is_empty(),
        "no session for an expired packet"
    );
}

#[test]
fn hop_limit_1_is_answered_with_icmpv6_time_exceeded() {
    let mut r = rig(true);
    let mut f = build(
        VMAC_T,
        CLIENT_MAC,
        v6("2001:db8:1::10"),
        v6("2001:db8:2::100"),
        1,
        &udp(5000, 53, 20),
    );
    assert_eq!(
        run(&mut r, &mut f, T),
        Verdict::Drop(DropReason::TtlExceeded)
    );
    let (icmp, ip) = one_icmp(&mut r);
    assert_eq!(ip.proto, proto::ICMPV6);
    assert_eq!(icmp[ip.l4], 3);
    assert_eq!(Addr(ip.src), v6("2001:db8:1::1"));
    assert_eq!(Addr(ip.dst), v6("2001:db8:1::10"));
}

#[test]
fn forwarded_icmp_error_with_ttl_1_is_dropped_unanswered() {
    let mut r = rig(true);
    let mut syn = client_frame(64, &tcp(packet::TCP_SYN, 40000, 443));
    assert!(matches!(run(&mut r, &mut syn, T), Verdict::Tx { .. }));
    // The server side's router reports the flow's packet as unreachable,
    // with TTL 1 left: it must not be forwarded with TTL 0 (or 255).
    let quoted = ip_packet(
        v4("192.0.2.1"),
        v4("192.0.2.100"),
        63,
        &tcp(packet::TCP_SYN, 40000, 443),
    );
    let mut err = build(
        VMAC_U,
        SERVER_MAC,
        v4("192.0.2.100"),
        v4("192.0.2.1"),
        1,
        &L4::IcmpError {
            kind: 3,
            code: 1,
            quoted,
        },
    );
    assert_eq!(
        run(&mut r, &mut err, U),
        Verdict::Drop(DropReason::TtlExceeded)
    );
    assert!(
        r.core.outbox().is_empty(),
        "never an ICMP error about an ICMP error"
    );
}

#[test]
fn df_packet_over_the_egress_mtu_gets_fragmentation_needed() {
    let mut r = rig_with(true, |c| c.interfaces[1].mtu = Some(1280));
    let mut big = client_frame(64, &udp(5000, 9000, 1400));
    let df = ip_of(&big).l3 + 6;
    big[df] |= 0x40;
    packet::ipv4_header_checksum(&mut big, ETH_HLEN, 20);
    assert_eq!(
        run(&mut r, &mut big, T),
        Verdict::Drop(DropReason::MtuExceeded)
    );
    let (icmp, ip) = one_icmp(&mut r);
    assert_eq!((icmp[ip.l4], icmp[ip.l4 + 1]), (3, 4));
    assert_eq!(
        packet::be16(&icmp, ip.l4 + 6).unwrap(),
        1280,
        "next-hop MTU"
    );
    assert!(ip.end - ip.l3 <= 576, "quote bounded by RFC 1812");
    // The same size without DF: dropped (counted), nothing to say.
    let mut big = client_frame(64, &udp(5001, 9000, 1400));
    big[df] &= !0x40;
    packet::ipv4_header_checksum(&mut big, ETH_HLEN, 20);
    assert_eq!(
        run(&mut r, &mut big, T),
        Verdict::Drop(DropReason::MtuExceeded)
    );
    assert!(r.core.outbox().is_empty());
    // Within the MTU: forwarded.
    let mut ok = client_frame(64, &udp(5002, 9000, 1200));
    assert!(matches!(run(&mut r, &mut ok, T), Verdict::Tx { .. }));
}

#[test]
fn ipv6_over_the_egress_mtu_gets_packet_too_big_on_an_established_flow_too() {
    let mut r = rig_with(true, |c| c.interfaces[1].mtu = Some(1280));
    let frame = |len| {
        build(
            VMAC_T,
            CLIENT_MAC,
            v6("2001:db8:1::10"),
            v6("2001:db8:2::100"),
            64,
            &udp(5000, 9000, len),
        )
    };
    assert!(matches!(
        run(&mut r, &mut frame(100), T),
        Verdict::Tx { .. }
    ));
    let mut big = frame(1300);
    let pristine = big.clone();
    assert_eq!(
        run(&mut r, &mut big, T),
        Verdict::Drop(DropReason::MtuExceeded)
    );
    let (icmp, ip) = one_icmp(&mut r);
    assert_eq!(icmp[ip.l4], 2);
    assert_eq!(packet::be16(&icmp, ip.l4 + 6).unwrap(), 1280);
    // The quote is the packet as the client sent it: before the SNAT.
    let quoted_src = &icmp[ip.l4 + 8 + 8..ip.l4 + 8 + 24];
    assert_eq!(quoted_src, &pristine[ETH_HLEN + 8..ETH_HLEN + 24]);
}

#[test]
fn no_route_is_answered_with_destination_unreachable() {
    let mut r = rig(true);
    let mut f = build(
        VMAC_T,
        CLIENT_MAC,
        v4("10.1.0.10"),
        v4("203.0.113.9"),
        64,
        &tcp(packet::TCP_SYN, 40000, 443),
    );
    assert_eq!(run(&mut r, &mut f, T), Verdict::Drop(DropReason::NoRoute));
    let (icmp, ip) = one_icmp(&mut r);
    assert_eq!((icmp[ip.l4], icmp[ip.l4 + 1]), (3, 0));
}

#[test]
fn icmp_the_node_sends_is_rate_limited() {
    let mut r = rig_with(true, |c| {
        c.icmp_rate = Some(1);
        c.icmp_burst = Some(5);
    });
    for _ in 0..20 {
        let mut f = client_frame(1, &udp(5000, 9000, 10));
        assert_eq!(
            run(&mut r, &mut f, T),
            Verdict::Drop(DropReason::TtlExceeded)
        );
    }
    assert_eq!(r.core.outbox().len(), 5, "the burst, then nothing");
    let bucket = &r.core.w.shared().icmp;
    assert_eq!(bucket.suppressed.load(Ordering::Relaxed), 15);
    // Echo requests to the node share the limit.
    let mut ping = build(
        VMAC_T,
        CLIENT_MAC,
        v4("10.1.0.10"),
        v4("10.1.0.1"),
        64,
        &L4::Echo {
            id: 7,
            seq: 1,
            reply: false,
        },
    );
    assert_eq!(
        run(&mut r, &mut ping, T),
        Verdict::Drop(DropReason::IcmpRateLimited)
    );
}

/// `f` with IPv6 extension headers `(type, bytes)` inserted after the
/// fixed header (each header's next-header byte is set here).
fn with_ext(mut f: Vec<u8>, ext: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let l3 = ETH_HLEN;
    let upper = f[l3 + 6];
    let mut chain = Vec::new();
    for (i, (_, bytes)) in ext.iter().enumerate() {
        let mut b = bytes.clone();
        b[0] = ext.get(i + 1).map_or(upper, |e| e.0);
        chain.extend_from_slice(&b);
    }
    f[l3 + 6] = ext[0].0;
    let payload = packet::be16(&f, l3 + 4).unwrap() as usize + chain.len();
    packet::put16(&mut f, l3 + 4, payload as u16);
    let at = l3 + 40;
    f.splice(at..at, chain);
    f
}

fn opts(len8: u8) -> Vec<u8> {
    let mut b = vec![0u8; (usize::from(len8) + 1) * 8];
    b[1] = len8;
    b[2] = 1; // PadN
    b[3] = (b.len() - 4) as u8;
    b
}

#[test]
fn ipv6_extension_headers_are_walked_to_the_transport_and_nat_keeps_its_checksum() {
    let mut r = rig(true);
    let plain = build(
        VMAC_T,
        CLIENT_MAC,
        v6("2001:db8:1::10"),
        v6("2001:db8:2::100"),
        64,
        &tcp(packet::TCP_SYN, 40000, 443),
    );
    let mut f = with_ext(plain, &[(0, opts(0)), (60, opts(1))]);
    verify_checksums(&f).expect("a valid frame to start with");
    let Verdict::Tx { iface, len } = run(&mut r, &mut f, T) else {
        panic!("forwarded")
    };
    assert_eq!(iface, U);
    let out = &f[..len];
    let ip = ip_of(out);
    assert_eq!((ip.proto, ip.l4 - ip.l3), (proto::TCP, 40 + 8 + 16));
    assert_eq!(Addr(ip.src), v6("2001:db8:2::1"), "source NATed");
    verify_checksums(out).unwrap();
    let t = lock(r.core.table());
    let key = t.iter().next().expect("one session").1.key;
    assert_eq!(
        (key.proto, key.src_port, key.dst_port),
        (proto::TCP, 40000, 443)
    );
}

#[test]
fn unwalked_or_runaway_extension_headers_are_dropped_and_counted() {
    let mut r = rig(true);
    let plain = || {
        build(
            VMAC_T,
            CLIENT_MAC,
            v6("2001:db8:1::10"),
            v6("2001:db8:2::100"),
            64,
            &udp(5000, 53, 8),
        )
    };
    // Mobility header (135): not walked.
    let mut f = with_ext(plain(), &[(0, opts(0)), (135, opts(0))]);
    assert_eq!(
        run(&mut r, &mut f, T),
        Verdict::Drop(DropReason::ExtensionHeader)
    );
    // Nine destination-options headers: past the chain bound.
    let nine: Vec<_> = (0..9).map(|_| (60, opts(0))).collect();
    let mut f = with_ext(plain(), &nine);
    assert_eq!(
        run(&mut r, &mut f, T),
        Verdict::Drop(DropReason::ExtensionHeader)
    );
    // A header claiming more bytes than the packet has.
    let mut f = with_ext(plain(), &[(60, opts(0))]);
    f[ETH_HLEN + 41] = 200;
    assert_eq!(run(&mut r, &mut f, T), Verdict::Drop(DropReason::Malformed));
    assert_eq!(r.core.stats().dropped(DropReason::ExtensionHeader), 2);
    assert!(lock(r.core.table()).is_empty());
}

proptest! {
    /// Any chain of extension headers, mutated anywhere: a typed drop or a
    /// verdict, never a panic; sessions only for ports it really found.
    #[test]
    fn random_extension_header_chains_never_panic(
        kinds in proptest::collection::vec(prop_oneof![Just(0u8), Just(43), Just(44), Just(51), Just(60), Just(135), any::<u8>()], 1..12),
        pos in 0usize..160,
        val in any::<u8>(),
    ) {
        let mut r = rig(true);
        let ext: Vec<_> = kinds.iter().map(|&k| (k, opts(0))).collect();
        let mut f = with_ext(
            build(VMAC_T, CLIENT_MAC, v6("2001:db8:1::10"), v6("2001:db8:2::100"), 64, &udp(5000, 53, 8)),
            &ext,
        );
        if let Some(b) = f.get_mut(ETH_HLEN + pos) {
            *b = val;
        }
        let _ = run(&mut r, &mut f, T);
        prop_assert!(lock(r.core.table()).verify_invariants().is_ok());
    }
}
