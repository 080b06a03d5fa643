use super::*;
use crate::frames::{L4, build};
use crate::packet::parse_ipv4;
use std::net::Ipv4Addr;

fn profile() -> ScreenConfig {
    ScreenConfig::off("s", "untrust")
}

fn screen(change: impl FnOnce(&mut ScreenConfig)) -> Screen {
    let mut c = profile();
    change(&mut c);
    Screen::compile(&c, ZoneId(2)).unwrap()
}

fn key(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, proto: u8) -> SessionKey {
    SessionKey::new(
        Ipv4Addr::from(src),
        sport,
        Ipv4Addr::from(dst),
        dport,
        proto,
        ZoneId(2),
    )
}

const NOW: Millis = Millis(100_000);

#[test]
fn rate_meter_counts_one_second_windows_and_restarts_in_the_next() {
    let m = RateMeter::default();
    for n in 1..=5 {
        assert_eq!(m.hit(42, 7), n);
    }
    assert_eq!(m.hit(43, 7), 1, "another key has its own count");
    assert_eq!(m.hit(42, 8), 1, "a new second starts again");
}

#[test]
fn rate_meter_estimate_is_never_below_the_truth_under_collisions() {
    let m = RateMeter::default();
    // 20,000 keys in 4,096 slots per row: collisions are certain.
    let keys: Vec<u64> = (0..20_000u64)
        .map(|k| k.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .collect();
    for k in &keys {
        m.hit(*k, 1);
    }
    for k in &keys[..100] {
        assert!(m.hit(*k, 1) >= 2, "counted its two hits at least");
    }
}

#[test]
fn compile_refuses_zero_thresholds_and_tiny_icmp_bounds() {
    for (c, what) in [
        (
            ScreenConfig {
                udp_flood: Some(0),
                ..profile()
            },
            "udp_flood",
        ),
        (
            ScreenConfig {
                source_session_limit: Some(0),
                ..profile()
            },
            "source_session_limit",
        ),
        (
            ScreenConfig {
                icmp_large: Some(20),
                ..profile()
            },
            "icmp_large",
        ),
    ] {
        let e = Screen::compile(&c, ZoneId(1)).unwrap_err();
        assert!(e.contains(what), "{e}");
    }
}

#[test]
fn cookie_carries_the_mss_and_fails_for_another_tuple_isn_or_slot() {
    let s = screen(|_| {});
    let k = key([198, 51, 100, 7], 40000, [192, 0, 2, 1], 8080, 6);
    let c = s.cookie(&k, 1000, Some(1400), NOW);
    assert_eq!(s.check_cookie(&k, 1000, c, NOW), Some(1400));
    assert_eq!(
        s.check_cookie(&k, 1000, c, Millis(NOW.0 + 16_000)),
        Some(1400),
        "next slot"
    );
    assert_eq!(
        s.check_cookie(&k, 1000, c, Millis(NOW.0 + 40_000)),
        None,
        "expired"
    );
    assert_eq!(s.check_cookie(&k, 1001, c, NOW), None, "other ISN");
    let other = key([198, 51, 100, 7], 40001, [192, 0, 2, 1], 8080, 6);
    assert_eq!(s.check_cookie(&other, 1000, c, NOW), None, "other tuple");
    assert_eq!(s.check_cookie(&k, 1000, c ^ 0x80, NOW), None, "forged bits");
    // The MSS rounds down to a value the cookie can carry.
    let c = s.cookie(&k, 9, Some(1450), NOW);
    assert_eq!(s.check_cookie(&k, 9, c, NOW), Some(1440));
    let c = s.cookie(&k, 9, None, NOW);
    assert_eq!(s.check_cookie(&k, 9, c, NOW), Some(536));
    // Another node's secret gives other cookies.
    assert_ne!(
        screen(|_| {}).cookie(&k, 1000, Some(1400), NOW),
        s.cookie(&k, 1000, Some(1400), NOW)
    );
}

#[test]
fn syn_thresholds_count_per_destination_port_and_per_source() {
    let s = screen(|c| {
        c.syn_flood = Some(SynFloodConfig {
            attack_threshold: 3,
            source_threshold: Some(5),
        })
    });
    let to_web = |src: u8, sport| key([198, 51, 100, src], sport, [192, 0, 2, 1], 443, 6);
    let v: Vec<_> = (0..5)
        .map(|i| s.check_new(&to_web(i, 1000), None, NOW))
        .collect();
    assert_eq!(v, [Ok(false), Ok(false), Ok(false), Ok(true), Ok(true)]);
    // Another port of the destination is not under attack.
    let ssh = key([198, 51, 100, 9], 1000, [192, 0, 2, 1], 22, 6);
    assert_eq!(s.check_new(&ssh, None, NOW), Ok(false));
    // One source beyond 5 SYNs a second is dropped, whatever the target.
    let from_one = |dport| key([203, 0, 113, 5], 999, [192, 0, 2, 50], dport, 6);
    let v: Vec<_> = (0..7)
        .map(|p| s.check_new(&from_one(p), None, NOW))
        .collect();
    assert_eq!(&v[..5], &[Ok(false); 5]);
    assert_eq!(&v[5..], &[Err(ScreenKind::SynFloodSource); 2]);
}

#[test]
fn session_limits_and_exempt_addresses() {
    let s = screen(|c| {
        c.source_session_limit = Some(10);
        c.destination_session_limit = Some(100);
        c.udp_flood = Some(1);
        c.exempt = vec!["198.51.100.0/24".parse().unwrap()];
    });
    let k = key([203, 0, 113, 1], 1, [10, 1, 0, 10], 53, 17);
    assert_eq!(s.check_new(&k, Some((9, 99)), NOW), Ok(false));
    assert_eq!(
        s.check_new(&k, Some((10, 0)), Millis(NOW.0 + 1000)),
        Err(ScreenKind::SourceSessionLimit)
    );
    assert_eq!(
        s.check_new(&k, Some((0, 100)), Millis(NOW.0 + 2000)),
        Err(ScreenKind::DestinationSessionLimit)
    );
    let exempt = key([198, 51, 100, 1], 1, [10, 1, 0, 10], 53, 17);
    for _ in 0..5 {
        assert_eq!(s.check_new(&exempt, Some((1000, 1000)), NOW), Ok(false));
    }
}

#[test]
fn packet_screens_classify_what_no_endpoint_sends() {
    let s = screen(|c| {
        c.land = true;
        c.syn_fin = true;
        c.tcp_no_flag = true;
        c.icmp_large = Some(100);
    });
    let frame = |src: [u8; 4], l4: L4| {
        build(
            [0; 6],
            [0; 6],
            Ipv4Addr::from(src).into(),
            Ipv4Addr::new(192, 0, 2, 1).into(),
            64,
            &l4,
        )
    };
    let tcp = |flags| L4::Tcp {
        sport: 1,
        dport: 2,
        flags,
        seq: 1,
        ack: 0,
        payload: vec![],
    };
    let check = |f: &[u8]| s.check_packet(f, &parse_ipv4(f, 14).unwrap());
    assert_eq!(
        check(&frame([192, 0, 2, 1], tcp(packet::TCP_SYN))),
        Some(ScreenKind::Land)
    );
    assert_eq!(
        check(&frame([1, 2, 3, 4], tcp(packet::TCP_SYN | packet::TCP_FIN))),
        Some(ScreenKind::SynFin)
    );
    assert_eq!(
        check(&frame([1, 2, 3, 4], tcp(0))),
        Some(ScreenKind::TcpNoFlag)
    );
    assert_eq!(check(&frame([1, 2, 3, 4], tcp(packet::TCP_SYN))), None);
    let echo = |n| L4::IcmpError {
        kind: 8,
        code: 0,
        quoted: vec![0; n],
    };
    assert_eq!(check(&frame([1, 2, 3, 4], echo(40))), None);
    assert_eq!(
        check(&frame([1, 2, 3, 4], echo(200))),
        Some(ScreenKind::IcmpLarge)
    );
}

#[test]
fn icmp_flood_counts_new_echo_sessions_per_destination() {
    let s = screen(|c| c.icmp_flood = Some(2));
    let echo = |dst: u8| key([203, 0, 113, 1], 7, [10, 1, 0, dst], 0, proto::ICMP);
    let v: Vec<_> = (0..3).map(|_| s.check_new(&echo(10), None, NOW)).collect();
    assert_eq!(v, [Ok(false), Ok(false), Err(ScreenKind::IcmpFlood)]);
    assert_eq!(
        s.check_new(&echo(11), None, NOW),
        Ok(false),
        "another destination"
    );
    // TCP and UDP are not metered by the ICMP screen.
    let udp = key([203, 0, 113, 1], 7, [10, 1, 0, 10], 53, proto::UDP);
    assert_eq!(s.check_new(&udp, None, NOW), Ok(false));
}

#[test]
fn icmp_fragments_are_refused_by_the_icmp_fragment_screen() {
    let s = screen(|c| c.icmp_fragment = true);
    let f = build(
        [0; 6],
        [0; 6],
        Ipv4Addr::new(1, 2, 3, 4).into(),
        Ipv4Addr::new(192, 0, 2, 1).into(),
        64,
        &L4::IcmpError {
            kind: 8,
            code: 0,
            quoted: vec![0; 64],
        },
    );
    let mut frag = f.clone();
    // More fragments: a first fragment of a larger echo.
    frag[14 + 6] |= 0x20;
    packet::ipv4_header_checksum(&mut frag, 14, 20);
    let ip = parse_ipv4(&frag, 14).unwrap();
    assert!(ip.frag.is_some());
    assert_eq!(s.check_packet(&frag, &ip), Some(ScreenKind::IcmpFragment));
    assert_eq!(s.check_packet(&f, &parse_ipv4(&f, 14).unwrap()), None);
}
