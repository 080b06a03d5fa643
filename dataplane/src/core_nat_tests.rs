//! NAT behaviour through the packet core (RFC 4787): endpoint-independent
//! mapping, each filtering mode of a SNAT rule, and hairpinning between
//! inside hosts through their mappings.

use super::*;
use crate::config::NatFiltering;

const A: &str = "10.1.0.10";
const B: &str = "10.1.0.11";
const B_MAC: Mac = [0xcc, 0, 0, 0, 0, 2];
const PUBLIC: &str = "192.0.2.1";
const STUN: &str = "192.0.2.100";
const OTHER: &str = "192.0.2.200";

fn udp(sport: u16, dport: u16) -> L4 {
    L4::Udp {
        sport,
        dport,
        payload: b"stun".to_vec(),
    }
}

/// The test config with `filtering` on the SNAT rule; host B beside A.
fn nat_rig(filtering: NatFiltering, change: impl FnOnce(&mut DataplaneConfig)) -> Rig {
    let r = rig_with(true, |c| {
        c.snat[0].filtering = filtering;
        change(c);
    });
    r.core.add_neighbor(T, v4(B), B_MAC);
    r
}

/// An inside host's datagram to `dst`: the verdict and the translated
/// (source, destination) endpoints.
fn out(
    r: &mut Rig,
    host: &str,
    sport: u16,
    dst: (&str, u16),
) -> (Verdict, (Addr, u16), (Addr, u16)) {
    let mac = if host == B { B_MAC } else { CLIENT_MAC };
    let mut f = build(VMAC_T, mac, v4(host), v4(dst.0), 64, &udp(sport, dst.1));
    let v = run(r, &mut f, T);
    endpoints(v, &f)
}

/// A datagram from outside, `src` to `dst`.
fn inbound(r: &mut Rig, src: (&str, u16), dst: (&str, u16)) -> (Verdict, (Addr, u16), (Addr, u16)) {
    let mut f = build(
        VMAC_U,
        SERVER_MAC,
        v4(src.0),
        v4(dst.0),
        64,
        &udp(src.1, dst.1),
    );
    let v = run(r, &mut f, U);
    endpoints(v, &f)
}

fn endpoints(v: Verdict, f: &[u8]) -> (Verdict, (Addr, u16), (Addr, u16)) {
    let ip = ip_of(f);
    let (sp, dp) = packet::ports(f, &ip).unwrap();
    if matches!(v, Verdict::Tx { .. }) {
        verify_checksums(f).unwrap();
    }
    (v, (Addr(ip.src), sp), (Addr(ip.dst), dp))
}

fn tx(iface: InterfaceId) -> impl Fn(&Verdict) -> bool {
    move |v| matches!(v, Verdict::Tx { iface: i, .. } if *i == iface)
}

fn mapping_sessions(r: &Rig, port: u16) -> Option<usize> {
    let t = read(r.core.table());
    t.verify_invariants().unwrap();
    let b = NatBinding {
        addr: v4(PUBLIC),
        port,
        proto: proto::UDP,
    };
    t.nat_mapping(&b).map(|_| t.mapping_len(&b))
}

#[test]
fn one_inside_endpoint_keeps_one_public_port_for_every_destination() {
    let mut r = nat_rig(NatFiltering::AddressAndPortDependent, |_| {});
    let (v, src, _) = out(&mut r, A, 40000, (STUN, 3478));
    assert!(tx(U)(&v));
    assert_eq!(src, (v4(PUBLIC), 40000), "port preserved");
    let (_, src, _) = out(&mut r, A, 40000, (OTHER, 3479));
    assert_eq!(
        src,
        (v4(PUBLIC), 40000),
        "same mapping for another destination"
    );
    // B uses the same source port: remapped once, then kept.
    let (_, b1, _) = out(&mut r, B, 40000, (STUN, 3478));
    assert_eq!(b1.0, v4(PUBLIC));
    assert_ne!(b1.1, 40000);
    let (_, b2, _) = out(&mut r, B, 40000, (OTHER, 3479));
    assert_eq!(b2, b1);
    assert_eq!(mapping_sessions(&r, 40000), Some(2));
    assert_eq!(mapping_sessions(&r, b1.1), Some(2));
}

#[test]
fn address_and_port_dependent_filtering_refuses_everything_unsolicited() {
    let mut r = nat_rig(NatFiltering::AddressAndPortDependent, |_| {});
    out(&mut r, A, 40000, (STUN, 3478));
    for src in [(STUN, 9999), (OTHER, 3478)] {
        let (v, _, _) = inbound(&mut r, src, (PUBLIC, 40000));
        assert_eq!(v, Verdict::Drop(DropReason::NatFiltered), "from {src:?}");
    }
    // The session's own reply still comes in.
    let (v, _, dst) = inbound(&mut r, (STUN, 3478), (PUBLIC, 40000));
    assert!(tx(T)(&v));
    assert_eq!(dst, (v4(A), 40000));
    assert_eq!(mapping_sessions(&r, 40000), Some(1));
    assert_eq!(r.core.stats().dropped(DropReason::NatFiltered), 2);
}

#[test]
fn address_dependent_filtering_admits_only_addresses_the_endpoint_talked_to() {
    let mut r = nat_rig(NatFiltering::AddressDependent, |_| {});
    out(&mut r, A, 40000, (STUN, 3478));
    // Another port of the same server: the server's "change port" test.
    let (v, src, dst) = inbound(&mut r, (STUN, 3479), (PUBLIC, 40000));
    assert!(tx(T)(&v), "{v:?}");
    assert_eq!((src, dst), ((v4(STUN), 3479), (v4(A), 40000)));
    let (v, _, _) = inbound(&mut r, (OTHER, 3478), (PUBLIC, 40000));
    assert_eq!(v, Verdict::Drop(DropReason::NatFiltered));
    // The admitted flow is a session of A's mapping: A's answer leaves
    // from the mapped endpoint.
    let (v, src, dst) = out(&mut r, A, 40000, (STUN, 3479));
    assert!(tx(U)(&v));
    assert_eq!((src, dst), ((v4(PUBLIC), 40000), (v4(STUN), 3479)));
    assert_eq!(mapping_sessions(&r, 40000), Some(2));
    assert_eq!(
        r.core.stats().nat_filter_admitted.load(Ordering::Relaxed),
        1
    );
    // Created, then synced like any session: two deltas, one per session.
    let mut keys = Vec::new();
    r.consumers[0].try_recv_many(&mut keys, 10);
    assert_eq!(keys.len(), 2);
    assert_eq!(
        (keys[1].key.src, keys[1].key.dst, keys[1].key.dst_port),
        (v4(A), v4(STUN), 3479)
    );
}

#[test]
fn endpoint_independent_filtering_admits_any_remote_to_a_live_mapping() {
    let mut r = nat_rig(NatFiltering::EndpointIndependent, |_| {});
    // No mapping yet: nothing to admit, the address is the node's.
    let (v, _, _) = inbound(&mut r, (OTHER, 7777), (PUBLIC, 40000));
    assert!(matches!(v, Verdict::Drop(_)) && !tx(T)(&v));
    out(&mut r, A, 40000, (STUN, 3478));
    let (v, src, dst) = inbound(&mut r, (OTHER, 7777), (PUBLIC, 40000));
    assert!(tx(T)(&v), "{v:?}");
    assert_eq!((src, dst), ((v4(OTHER), 7777), (v4(A), 40000)));
    let (v, src, _) = out(&mut r, A, 40000, (OTHER, 7777));
    assert!(tx(U)(&v));
    assert_eq!(src, (v4(PUBLIC), 40000));
    // Another port of the address has no mapping.
    let (v, _, _) = inbound(&mut r, (OTHER, 7777), (PUBLIC, 40001));
    assert!(!tx(T)(&v));
    assert_eq!(mapping_sessions(&r, 40000), Some(2));
}

#[test]
fn tcp_mappings_admit_no_unsolicited_syn_whatever_the_filtering() {
    let mut r = nat_rig(NatFiltering::EndpointIndependent, |_| {});
    let mut syn = build(
        VMAC_T,
        CLIENT_MAC,
        v4(A),
        v4(STUN),
        64,
        &L4::tcp(packet::TCP_SYN, 40000, 443, b""),
    );
    assert!(tx(U)(&run(&mut r, &mut syn, T)));
    let mut probe = build(
        VMAC_U,
        SERVER_MAC,
        v4(OTHER),
        v4(PUBLIC),
        64,
        &L4::tcp(packet::TCP_SYN, 5555, 40000, b""),
    );
    assert_eq!(
        run(&mut r, &mut probe, U),
        Verdict::Drop(DropReason::NatFiltered)
    );
    assert_eq!(read(r.core.table()).len(), 1);
}

/// Hairpinned traffic stays inside: the policy between the two hosts'
/// zones governs it.
fn inside_udp(c: &mut DataplaneConfig) {
    c.policies.push(crate::testbed::inside_udp_policy());
}

#[test]
fn snat_hairpin_reaches_an_inside_endpoint_from_the_others_mapping() {
    let mut r = nat_rig(NatFiltering::AddressAndPortDependent, inside_udp);
    out(&mut r, A, 40000, (STUN, 3478));
    // B's own mapping is remapped (A holds 40000) ...
    let (_, b_public, _) = out(&mut r, B, 40000, (STUN, 3478));
    assert_ne!(b_public.1, 40000);
    // ... and B, dialling A's public endpoint, reaches A, which sees B's
    // public endpoint (RFC 4787 REQ-9b), not B's inside address.
    let (v, src, dst) = out(&mut r, B, 40000, (PUBLIC, 40000));
    assert!(tx(T)(&v), "{v:?}");
    assert_eq!((src, dst), (b_public, (v4(A), 40000)));
    // A answers B's public endpoint; B sees it from A's public endpoint.
    let (v, src, dst) = out(&mut r, A, 40000, b_public_str(&b_public));
    assert!(tx(T)(&v), "{v:?}");
    assert_eq!((src, dst), ((v4(PUBLIC), 40000), (v4(B), 40000)));
    // The hairpinned session is one more session of B's mapping.
    assert_eq!(mapping_sessions(&r, b_public.1), Some(2));
    assert_eq!(mapping_sessions(&r, 40000), Some(1));
}

fn b_public_str(e: &(Addr, u16)) -> (&'static str, u16) {
    assert_eq!(e.0, v4(PUBLIC));
    (PUBLIC, e.1)
}

#[test]
fn snat_hairpin_still_needs_a_policy_between_the_inside_zones() {
    let mut r = nat_rig(NatFiltering::EndpointIndependent, |_| {});
    out(&mut r, A, 40000, (STUN, 3478));
    let (v, _, _) = out(&mut r, B, 6000, (PUBLIC, 40000));
    assert_eq!(v, Verdict::Drop(DropReason::NoPolicy));
    assert_eq!(mapping_sessions(&r, 40000), Some(1));
}

#[test]
fn a_mapping_of_a_backup_rg_hands_unsolicited_packets_to_the_owner() {
    let mut r = nat_rig(NatFiltering::EndpointIndependent, |_| {});
    out(&mut r, A, 40000, (STUN, 3478));
    // This node loses RG1: the peer decides (it holds the same mapping).
    r.roles.store(Arc::new(RoleMap::from([(
        RG1,
        RgRole {
            primary: false,
            epoch: Epoch(3),
        },
    )])));
    lock(r.core.table()).demote_rg(RG1);
    let (v, _, _) = inbound(&mut r, (OTHER, 7777), (PUBLIC, 40000));
    assert_eq!(v, Verdict::Fabric { rg: RG1 });
    assert_eq!(mapping_sessions(&r, 40000), Some(1));
}
