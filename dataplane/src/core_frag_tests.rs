//! IP fragments: virtual reassembly with the first fragment's session and
//! NAT, every arrival order, overlaps, tiny and oversized fragments,
//! timeouts, the fabric, and bounded memory under random input.

use super::*;
use crate::frag::{DATAGRAMS, HELD_BYTES, TIMEOUT_MS};
use crate::frames::{fragments, reassemble};

fn udp_frame(src: Addr, dst: Addr, sport: u16, dport: u16, len: usize) -> Vec<u8> {
    let from_server = src == v4("192.0.2.100") || src == v6("2001:db8:2::100");
    let (dmac, smac) = if from_server {
        (VMAC_U, SERVER_MAC)
    } else {
        (VMAC_T, CLIENT_MAC)
    };
    build(
        dmac,
        smac,
        src,
        dst,
        64,
        &L4::Udp {
            sport,
            dport,
            payload: (0..len).map(|i| (i * 7) as u8).collect(),
        },
    )
}

/// A 3000-byte UDP datagram from the client to the server, in three
/// fragments of at most 1500 bytes.
fn client_datagram(family: Family) -> Vec<Vec<u8>> {
    let (src, dst) = match family {
        Family::V4 => (v4("10.1.0.10"), v4("192.0.2.100")),
        Family::V6 => (v6("2001:db8:1::10"), v6("2001:db8:2::100")),
    };
    let f = fragments(&udp_frame(src, dst, 5000, 9000, 3000), 1500, 0x4242);
    assert_eq!(f.len(), 3);
    f
}

/// Runs `frames` in order from `ingress`; what left the core (sent at once
/// or released later), and the verdicts.
fn run_all(r: &mut Rig, frames: &[Vec<u8>], ingress: InterfaceId) -> (Vec<Vec<u8>>, Vec<Verdict>) {
    let mut out = Vec::new();
    let mut verdicts = Vec::new();
    for f in frames {
        let mut f = f.clone();
        let v = run(r, &mut f, ingress);
        if let Verdict::Tx { len, .. } = v {
            f.truncate(len);
            out.push(f);
        }
        verdicts.push(v);
    }
    out.extend(r.core.outbox().drain(..).map(|(_, f)| f));
    (out, verdicts)
}

fn snat_port(r: &Rig) -> u16 {
    let t = lock(r.core.table());
    let (_, rec) = t.iter().next().expect("one session");
    rec.nat().snat.expect("SNAT").1
}

#[test]
fn fragmented_udp_goes_through_snat_both_ways_on_one_session() {
    for family in [Family::V4, Family::V6] {
        let mut r = rig(true);
        let (out, verdicts) = run_all(&mut r, &client_datagram(family), T);
        assert!(
            verdicts
                .iter()
                .all(|v| matches!(v, Verdict::Tx { iface: U, .. })),
            "{family:?}: {verdicts:?}"
        );
        assert_eq!(r.core.stats().sessions_created.load(Ordering::Relaxed), 1);
        assert_eq!(r.core.stats().fragments.load(Ordering::Relaxed), 3);
        let (public, server) = match family {
            Family::V4 => (v4("192.0.2.1"), v4("192.0.2.100")),
            Family::V6 => (v6("2001:db8:2::1"), v6("2001:db8:2::100")),
        };
        for f in &out {
            let ip = ip_of(f);
            assert_eq!(Addr(ip.src), public, "every fragment translated");
            assert_eq!(ip.ttl, 63);
            assert_eq!(packet::mac_at(f, 0).unwrap(), SERVER_MAC);
            verify_checksums(f).unwrap();
        }
        let whole = reassemble(&out).expect("one datagram");
        verify_checksums(&whole).expect("the datagram's UDP checksum");
        let ip = ip_of(&whole);
        let port = snat_port(&r);
        assert_eq!(packet::ports(&whole, &ip).unwrap(), (port, 9000));
        assert!(!r.core.w.core().has_fragments(), "completed: forgotten");
        // The server's fragmented answer comes back the same way.
        let reply = fragments(&udp_frame(server, public, 9000, port, 3000), 1500, 7);
        let (back, verdicts) = run_all(&mut r, &reply, U);
        assert!(
            verdicts
                .iter()
                .all(|v| matches!(v, Verdict::Tx { iface: T, .. })),
            "{family:?}: {verdicts:?}"
        );
        let whole = reassemble(&back).expect("one datagram");
        verify_checksums(&whole).unwrap();
        let ip = ip_of(&whole);
        let client = if family == Family::V4 {
            v4("10.1.0.10")
        } else {
            v6("2001:db8:1::10")
        };
        assert_eq!(Addr(ip.dst), client);
        assert_eq!(packet::ports(&whole, &ip).unwrap(), (9000, 5000));
        assert_eq!(r.core.stats().sessions_created.load(Ordering::Relaxed), 1);
    }
}

#[test]
fn every_arrival_order_forwards_the_whole_datagram() {
    let orders = [
        [0, 1, 2],
        [0, 2, 1],
        [1, 0, 2],
        [1, 2, 0],
        [2, 0, 1],
        [2, 1, 0],
    ];
    for family in [Family::V4, Family::V6] {
        for order in orders {
            let mut r = rig(true);
            let frags = client_datagram(family);
            let shuffled: Vec<_> = order.iter().map(|&i| frags[i].clone()).collect();
            let (out, verdicts) = run_all(&mut r, &shuffled, T);
            let first_at = order.iter().position(|&i| i == 0).unwrap();
            for (i, v) in verdicts.iter().enumerate() {
                if i < first_at {
                    assert_eq!(*v, Verdict::Held, "{family:?} {order:?}: early fragment");
                } else {
                    assert!(
                        matches!(v, Verdict::Tx { iface: U, .. }),
                        "{family:?} {order:?}: {v:?}"
                    );
                }
            }
            assert_eq!(out.len(), 3, "{family:?} {order:?}");
            let whole = reassemble(&out).expect("one datagram");
            verify_checksums(&whole).unwrap();
            let ip = ip_of(&whole);
            assert_eq!(packet::ports(&whole, &ip).unwrap().0, snat_port(&r));
            let s = r.core.stats();
            assert_eq!(s.fragments_held.load(Ordering::Relaxed), first_at as u64);
            assert_eq!(
                s.fragments_released.load(Ordering::Relaxed),
                first_at as u64
            );
            assert!(!r.core.w.core().has_fragments());
        }
    }
}

/// Moves a fragment's offset (IPv4) by `delta` bytes.
fn shift_v4(f: &mut [u8], delta: i32) {
    let l3 = ETH_HLEN;
    let flags = u16::from_be_bytes([f[l3 + 6], f[l3 + 7]]);
    let off = ((flags & 0x1fff) as i32 + delta / 8) as u16;
    let flags = (flags & 0xe000) | off;
    f[l3 + 6..l3 + 8].copy_from_slice(&flags.to_be_bytes());
    packet::ipv4_header_checksum(f, l3, 20);
}

#[test]
fn an_overlapping_fragment_poisons_its_datagram() {
    let mut r = rig(true);
    let frags = client_datagram(Family::V4);
    let mut overlapping = frags[1].clone();
    shift_v4(&mut overlapping, -8);
    assert!(matches!(
        run(&mut r, &mut frags[0].clone(), T),
        Verdict::Tx { .. }
    ));
    assert_eq!(
        run(&mut r, &mut overlapping, T),
        Verdict::Drop(DropReason::FragmentOverlap)
    );
    for f in &frags[1..] {
        assert_eq!(
            run(&mut r, &mut f.clone(), T),
            Verdict::Drop(DropReason::Fragment)
        );
    }
    // A duplicate of the first is an overlap too.
    let mut r = rig(true);
    run(&mut r, &mut frags[0].clone(), T);
    assert_eq!(
        run(&mut r, &mut frags[0].clone(), T),
        Verdict::Drop(DropReason::FragmentOverlap)
    );
}

#[test]
fn an_overlap_drops_the_early_fragments_held_for_it() {
    let mut r = rig(true);
    let frags = client_datagram(Family::V6);
    assert_eq!(run(&mut r, &mut frags[2].clone(), T), Verdict::Held);
    // A second "last" fragment with another end contradicts the first.
    let mut other_end = frags[2].clone();
    let plen = u16::from_be_bytes([other_end[ETH_HLEN + 4], other_end[ETH_HLEN + 5]]);
    other_end[ETH_HLEN + 4..ETH_HLEN + 6].copy_from_slice(&(plen - 8).to_be_bytes());
    other_end.truncate(other_end.len() - 8);
    assert_eq!(
        run(&mut r, &mut other_end, T),
        Verdict::Drop(DropReason::FragmentOverlap)
    );
    assert_eq!(
        r.core.stats().dropped(DropReason::Fragment),
        1,
        "the held one"
    );
    assert_eq!(
        run(&mut r, &mut frags[0].clone(), T),
        Verdict::Drop(DropReason::Fragment)
    );
    assert!(r.core.outbox().is_empty());
    assert!(
        lock(r.core.table()).is_empty(),
        "no session for a poisoned datagram"
    );
}

#[test]
fn tiny_first_fragments_and_tcp_at_offset_8_are_dropped() {
    let mut r = rig(true);
    let syn = build(
        VMAC_T,
        CLIENT_MAC,
        v4("10.1.0.10"),
        v4("192.0.2.100"),
        64,
        &L4::tcp(packet::TCP_SYN, 40000, 443, &[0; 64]),
    );
    // 16 bytes of TCP header in the first fragment: no flags to track.
    let frags = fragments(&syn, 36, 9);
    assert_eq!(
        run(&mut r, &mut frags[0].clone(), T),
        Verdict::Drop(DropReason::FragmentTiny)
    );
    let mut at8 = frags[1].clone();
    shift_v4(&mut at8, 8 - 16);
    assert_eq!(
        run(&mut r, &mut at8, T),
        Verdict::Drop(DropReason::FragmentTiny)
    );
    assert!(lock(r.core.table()).is_empty());
}

#[test]
fn a_datagram_beyond_65535_bytes_is_dropped() {
    let mut r = rig(true);
    let mut last = client_datagram(Family::V4)[2].clone();
    // Offset 65480 + 40 bytes of data + a 20-byte header > 65535.
    let l3 = ETH_HLEN;
    last[l3 + 6..l3 + 8].copy_from_slice(&(65480u16 / 8).to_be_bytes());
    last[l3 + 2..l3 + 4].copy_from_slice(&60u16.to_be_bytes());
    last.truncate(l3 + 60);
    packet::ipv4_header_checksum(&mut last, l3, 20);
    assert_eq!(
        run(&mut r, &mut last, T),
        Verdict::Drop(DropReason::FragmentTooBig)
    );
}

#[test]
fn early_fragments_whose_first_never_comes_time_out_with_a_counter() {
    let mut r = rig(true);
    let frags = client_datagram(Family::V4);
    assert_eq!(run(&mut r, &mut frags[1].clone(), T), Verdict::Held);
    assert_eq!(run(&mut r, &mut frags[2].clone(), T), Verdict::Held);
    r.core.tick(Millis(NOW.0 + TIMEOUT_MS - 1));
    assert!(r.core.w.core().has_fragments());
    r.core.tick(Millis(NOW.0 + TIMEOUT_MS + 100));
    assert!(!r.core.w.core().has_fragments());
    assert_eq!(r.core.stats().dropped(DropReason::FragmentTimeout), 2);
    assert!(r.core.outbox().is_empty());
}

#[test]
fn fragments_follow_their_first_over_the_fabric() {
    let mut r = rig(false);
    // To this node's own MAC (to the virtual MAC the whole frame goes to
    // the peer before any IP rule).
    let frags: Vec<_> = client_datagram(Family::V4)
        .into_iter()
        .map(|mut f| {
            f[0..6].copy_from_slice(&NODE_MAC_T);
            f
        })
        .collect();
    assert_eq!(run(&mut r, &mut frags[1].clone(), T), Verdict::Held);
    assert_eq!(
        run(&mut r, &mut frags[0].clone(), T),
        Verdict::Fabric { rg: RG1 }
    );
    let released: Vec<_> = r.core.fabric_outbox().drain(..).collect();
    assert_eq!(
        released,
        vec![(
            FabricOut::ToOwner {
                rg: RG1,
                ingress: T
            },
            frags[1].clone()
        )],
        "the early fragment, untouched, to the owner"
    );
    assert_eq!(
        run(&mut r, &mut frags[2].clone(), T),
        Verdict::Fabric { rg: RG1 }
    );
    assert!(lock(r.core.table()).is_empty());
}

#[test]
fn fragments_of_a_denied_datagram_are_dropped_with_it() {
    let mut r = rig(true);
    let dns = udp_frame(v4("192.0.2.100"), v4("10.1.0.10"), 5353, 53, 3000);
    let frags = fragments(&dns, 1500, 1);
    assert_eq!(
        run(&mut r, &mut frags[0].clone(), U),
        Verdict::Drop(DropReason::PolicyDeny)
    );
    for f in &frags[1..] {
        assert_eq!(
            run(&mut r, &mut f.clone(), U),
            Verdict::Drop(DropReason::Fragment)
        );
    }
}

#[test]
fn a_later_fragment_at_ttl_1_is_dropped_without_an_icmp_error() {
    let mut r = rig(true);
    let frags = client_datagram(Family::V4);
    run(&mut r, &mut frags[0].clone(), T);
    let mut f1 = frags[1].clone();
    let l3 = ETH_HLEN;
    f1[l3 + 8] = 1;
    packet::ipv4_header_checksum(&mut f1, l3, 20);
    assert_eq!(
        run(&mut r, &mut f1, T),
        Verdict::Drop(DropReason::TtlExceeded)
    );
    assert!(r.core.outbox().is_empty(), "no ICMP about a later fragment");
}

#[test]
fn a_fragment_flood_is_bounded_and_counted() {
    let mut r = rig(true);
    let whole = udp_frame(v4("10.1.0.10"), v4("192.0.2.100"), 5000, 9000, 3000);
    let extra = 10;
    for id in 0..(DATAGRAMS + extra) as u32 {
        let first = fragments(&whole, 1500, id).swap_remove(0);
        assert!(matches!(
            run(&mut r, &mut first.clone(), T),
            Verdict::Tx { .. }
        ));
    }
    assert_eq!(r.core.w.core().fragments_tracked(), DATAGRAMS);
    assert_eq!(
        r.core.stats().dropped(DropReason::FragmentTableFull),
        extra as u64
    );
    // Once they time out there is room again.
    r.core.tick(Millis(NOW.0 + TIMEOUT_MS));
    assert_eq!(r.core.w.core().fragments_tracked(), 0);
}

#[test]
fn fragments_beyond_the_egress_mtu_are_dropped_without_df_answers() {
    let mut r = rig_with(true, |c| c.interfaces[1].mtu = Some(1280));
    let frags = client_datagram(Family::V4);
    assert_eq!(
        run(&mut r, &mut frags[0].clone(), T),
        Verdict::Drop(DropReason::MtuExceeded)
    );
    assert!(r.core.outbox().is_empty(), "no DF: no fragmentation needed");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Random fragments (ids, offsets, lengths, flags, protocols, order,
    /// both families): never a panic, the table and its held bytes within
    /// their bounds, every frame accounted for by a verdict.
    #[test]
    fn random_fragments_never_panic_and_stay_bounded(
        frags in proptest::collection::vec(
            (any::<bool>(), 0u32..4, 0u16..200, 1usize..1400, any::<bool>(), 0u8..3),
            1..120,
        )
    ) {
        let mut r = rig(true);
        for (i, (v6_, id, off8, len, more, proto_pick)) in frags.into_iter().enumerate() {
            let proto = [17u8, 6, 1][proto_pick as usize];
            let mut f = raw_fragment(v6_, id, off8, len, more, proto);
            let v = run(&mut r, &mut f, T);
            prop_assert!(!matches!(v, Verdict::Reply { .. }), "{v:?}");
            if i % 17 == 0 {
                r.core.tick(Millis(NOW.0 + i as u64 * 50));
            }
            let core = r.core.w.core();
            prop_assert!(core.fragments_tracked() <= DATAGRAMS);
            prop_assert!(core.fragment_bytes_held() <= HELD_BYTES);
        }
    }
}

/// A fragment built by hand: `len` bytes of data at `off8` * 8.
fn raw_fragment(v6_: bool, id: u32, off8: u16, len: usize, more: bool, proto: u8) -> Vec<u8> {
    let (src, dst) = if v6_ {
        (v6("2001:db8:1::10"), v6("2001:db8:2::100"))
    } else {
        (v4("10.1.0.10"), v4("192.0.2.100"))
    };
    let mut data = vec![0u8; len];
    if off8 == 0 && len >= 4 {
        data[0..2].copy_from_slice(&5000u16.to_be_bytes());
        data[2..4].copy_from_slice(&9000u16.to_be_bytes());
    }
    let mut f = vec![0u8; ETH_HLEN];
    packet::set_macs(&mut f, VMAC_T, CLIENT_MAC);
    if v6_ {
        packet::put16(&mut f, 12, packet::ETHERTYPE_IPV6);
        let mut h = vec![0x60, 0, 0, 0];
        h.extend_from_slice(&((8 + len) as u16).to_be_bytes());
        h.extend_from_slice(&[44, 64]);
        h.extend_from_slice(&src.0);
        h.extend_from_slice(&dst.0);
        h.extend_from_slice(&[proto, 0]);
        h.extend_from_slice(&((off8 << 3) | u16::from(more)).to_be_bytes());
        h.extend_from_slice(&id.to_be_bytes());
        f.extend_from_slice(&h);
    } else {
        packet::put16(&mut f, 12, packet::ETHERTYPE_IPV4);
        let mut h = vec![0x45, 0, 0, 0, 0, id as u8, 0, 0, 64, proto, 0, 0];
        h[2..4].copy_from_slice(&((20 + len) as u16).to_be_bytes());
        let flags = (off8 & 0x1fff) | if more { 0x2000 } else { 0 };
        h[6..8].copy_from_slice(&flags.to_be_bytes());
        h.extend_from_slice(&src.0[12..16]);
        h.extend_from_slice(&dst.0[12..16]);
        packet::ipv4_header_checksum(&mut h, 0, 20);
        f.extend_from_slice(&h);
    }
    f.extend_from_slice(&data);
    if f.len() < 60 {
        f.resize(60, 0);
    }
    f
}
