//! Packet-core rules on crafted frames.

use super::*;
use crate::config::{
    DataplaneConfig, DnatRule, InterfaceConfig, PolicyAction, PolicyConfig, RethConfig, SnatRule,
};
use crate::core::{HOLD_MS, HOLD_PER_NEIGHBOR, HOLD_TOTAL};
use crate::delta::delta_queues;
use crate::frames::{L4, build, ip_packet, verify_checksums};
use crate::session::{Origin, SessionTable, TableConfig, lock, read, shared};
use crate::tcp::next_tcp_state;
use crate::worker::{self, Shared, Worker};
use arc_swap::ArcSwap;
use proptest::prelude::*;
use std::net::{Ipv4Addr, Ipv6Addr};
use tandem_proto::{Epoch, RgRole};

const RG1: RgId = RgId(1);
const T: InterfaceId = InterfaceId(0);
const U: InterfaceId = InterfaceId(1);
const NODE_MAC_T: Mac = [0xaa, 0, 0, 0, 0, 1];
const NODE_MAC_U: Mac = [0xaa, 0, 0, 0, 0, 2];
const VMAC_T: Mac = [0x02, 0, 0x5e, 0, 1, 1];
const VMAC_U: Mac = [0x02, 0, 0x5e, 0, 1, 2];
const CLIENT_MAC: Mac = [0xcc, 0, 0, 0, 0, 1];
const SERVER_MAC: Mac = [0x55, 0, 0, 0, 0, 1];
const NOW: Millis = Millis(10_000);

fn v4(s: &str) -> Addr {
    s.parse::<Ipv4Addr>().unwrap().into()
}
fn v6(s: &str) -> Addr {
    s.parse::<Ipv6Addr>().unwrap().into()
}

fn config() -> DataplaneConfig {
    let p = |s: &str| s.parse().unwrap();
    DataplaneConfig {
        interfaces: vec![
            InterfaceConfig {
                name: "reth0".into(),
                device: "t0".into(),
                zone: "trust".into(),
                addresses: vec![],
                reth: Some(RethConfig {
                    rg: 1,
                    vmac: "02:00:5e:00:01:01".into(),
                    vips: vec![p("10.1.0.1/24"), p("2001:db8:1::1/64")],
                }),
                mtu: None,
                vlan: None,
                tcp_mss: None,
            },
            InterfaceConfig {
                name: "reth1".into(),
                device: "u0".into(),
                zone: "untrust".into(),
                addresses: vec![],
                reth: Some(RethConfig {
                    rg: 1,
                    vmac: "02:00:5e:00:01:02".into(),
                    vips: vec![p("192.0.2.1/24"), p("2001:db8:2::1/64")],
                }),
                mtu: None,
                vlan: None,
                tcp_mss: None,
            },
        ],
        policies: vec![
            PolicyConfig {
                name: "web-in".into(),
                from_zone: "untrust".into(),
                to_zone: "trust".into(),
                source: vec![],
                destination: vec![p("10.1.0.10/32")],
                protocol: Some("tcp".into()),
                ports: vec!["80".into()],
                action: PolicyAction::Permit,
            },
            PolicyConfig {
                name: "no-dns-in".into(),
                from_zone: "untrust".into(),
                to_zone: "trust".into(),
                source: vec![],
                destination: vec![],
                protocol: Some("udp".into()),
                ports: vec!["53".into()],
                action: PolicyAction::Deny,
            },
            PolicyConfig {
                name: "out".into(),
                from_zone: "trust".into(),
                to_zone: "untrust".into(),
                source: vec![],
                destination: vec![],
                protocol: None,
                ports: vec![],
                action: PolicyAction::Permit,
            },
        ],
        snat: vec![SnatRule {
            name: "out".into(),
            from_zone: "trust".into(),
            to_zone: "untrust".into(),
            source: vec![],
            pool: None,
            port_low: 1024,
            port_high: 65535,
            filtering: Default::default(),
        }],
        dnat: vec![DnatRule {
            name: "web".into(),
            from_zone: "untrust".into(),
            destination: p("192.0.2.1/32"),
            protocol: "tcp".into(),
            port: 8080,
            to_address: p("10.1.0.10/32"),
            to_port: 80,
        }],
        routes: vec![],
        workers: None,
        icmp_rate: None,
        icmp_burst: None,
        garp_count: None,
        garp_interval_ms: None,
        mirror: vec![],
        screen: vec![],
    }
}

struct Rig {
    core: Node,
    roles: Arc<ArcSwap<RoleMap>>,
    consumers: Vec<crate::delta::DeltaConsumer>,
}

/// One worker over its own shared state: what the rules are tested on.
struct Node {
    w: Worker,
}

fn node(
    compiled: Compiled,
    table: crate::session::SharedTable,
    roles: Arc<ArcSwap<RoleMap>>,
    deltas: crate::delta::DeltaProducer,
) -> Node {
    Node {
        w: Worker::new(Arc::new(Shared {
            events: Some(crate::events::EventHub::new(Default::default())),
            ..Shared::new(Arc::new(compiled), table, roles, deltas)
        })),
    }
}

impl Node {
    fn add_neighbor(&self, iface: InterfaceId, ip: Addr, mac: Mac) {
        self.w.shared().neighbors.insert(iface, ip, mac);
    }
    fn process(&mut self, f: &mut [u8], ingress: InterfaceId, now: Millis) -> Verdict {
        self.w.process(f, Arrival::Wire(ingress), now)
    }
    fn process_from_fabric(&mut self, f: &mut [u8], ingress: InterfaceId, now: Millis) -> Verdict {
        self.w.process(f, Arrival::FabricIngress(ingress), now)
    }
    fn transmit_from_fabric(&mut self, f: &mut [u8], iface: InterfaceId, now: Millis) -> Verdict {
        self.w.process(f, Arrival::FabricEgress(iface), now)
    }
    fn table(&self) -> &crate::session::SharedTable {
        &self.w.shared().table
    }
    fn config(&self) -> &Compiled {
        self.w.config()
    }
    fn stats(&self) -> &CoreStats {
        self.w.stats()
    }
    fn outbox(&mut self) -> &mut Vec<(InterfaceId, Vec<u8>)> {
        self.w.outbox()
    }
    fn fabric_outbox(&mut self) -> &mut Vec<(FabricOut, Vec<u8>)> {
        self.w.fabric_outbox()
    }
    fn tick(&mut self, now: Millis) {
        self.w.tick(now)
    }
    fn announce(&mut self, rg: RgId) {
        self.w.announce(rg)
    }
    fn expire(&self, now: Millis) -> usize {
        worker::expire(self.w.shared(), now)
    }
    fn flow_key(&self, f: &[u8], ingress: InterfaceId) -> Option<SessionKey> {
        self.w.core().flow_key(f, ingress)
    }
    /// Security events the worker queued so far.
    fn events(&self) -> Vec<crate::events::FlowEvent> {
        let mut out = Vec::new();
        if let Some(hub) = &self.w.shared().events {
            hub.drain(&mut out);
        }
        out
    }
}

fn rig(primary: bool) -> Rig {
    rig_with(primary, |_| {})
}

/// A rig over the test config as `change` leaves it.
fn rig_with(primary: bool, change: impl FnOnce(&mut DataplaneConfig)) -> Rig {
    let mut cfg = config();
    change(&mut cfg);
    let mut compiled = Compiled::new(&cfg).unwrap();
    compiled.ifaces[0].mac = NODE_MAC_T;
    compiled.ifaces[1].mac = NODE_MAC_U;
    let table = shared(SessionTable::new(TableConfig::default()));
    if primary {
        lock(&table).promote_rg(RG1);
    }
    let roles = Arc::new(ArcSwap::from_pointee(RoleMap::from([(
        RG1,
        RgRole {
            primary,
            epoch: Epoch(2),
        },
    )])));
    let (producer, consumers) = delta_queues(&[RG1], 1024);
    let core = node(compiled, table, roles.clone(), producer);
    core.add_neighbor(T, v4("10.1.0.10"), CLIENT_MAC);
    core.add_neighbor(U, v4("192.0.2.100"), SERVER_MAC);
    core.add_neighbor(U, v4("192.0.2.200"), SERVER_MAC);
    core.add_neighbor(T, v6("2001:db8:1::10"), CLIENT_MAC);
    core.add_neighbor(U, v6("2001:db8:2::100"), SERVER_MAC);
    Rig {
        core,
        roles,
        consumers,
    }
}

fn tcp(flags: u8, sport: u16, dport: u16) -> L4 {
    L4::tcp(flags, sport, dport, b"hello")
}

fn ip_of(f: &[u8]) -> Ip {
    let e = packet::parse_eth(f).unwrap();
    if e.ethertype == packet::ETHERTYPE_IPV4 {
        packet::parse_ipv4(f, e.l3).unwrap()
    } else {
        packet::parse_ipv6(f, e.l3).unwrap()
    }
}

fn run(r: &mut Rig, f: &mut [u8], ingress: InterfaceId) -> Verdict {
    r.core.process(f, ingress, NOW)
}

#[test]
fn tcp_handshake_through_snat_and_back() {
    let mut r = rig(true);
    let mut syn = build(
        VMAC_T,
        CLIENT_MAC,
        v4("10.1.0.10"),
        v4("192.0.2.100"),
        64,
        &tcp(packet::TCP_SYN, 40000, 443),
    );
    assert_eq!(
        run(&mut r, &mut syn, T),
        Verdict::Tx {
            iface: U,
            len: syn.len().min(ip_of(&syn).end)
        }
    );
    let ip = ip_of(&syn);
    assert_eq!(
        Addr(ip.src),
        v4("192.0.2.1"),
        "source NATed to the egress reth VIP"
    );
    assert_eq!(
        packet::ports(&syn, &ip).unwrap(),
        (40000, 443),
        "original port kept when free"
    );
    assert_eq!(ip.ttl, 63);
    assert_eq!(packet::mac_at(&syn, 0).unwrap(), SERVER_MAC);
    assert_eq!(
        packet::mac_at(&syn, 6).unwrap(),
        VMAC_U,
        "sent from the reth's virtual MAC"
    );
    verify_checksums(&syn).unwrap();
    // SYN-ACK from the server to the NAT address comes back to the client.
    let mut synack = build(
        VMAC_U,
        SERVER_MAC,
        v4("192.0.2.100"),
        v4("192.0.2.1"),
        60,
        &tcp(packet::TCP_SYN | packet::TCP_ACK, 443, 40000),
    );
    assert!(matches!(
        run(&mut r, &mut synack, U),
        Verdict::Tx { iface: T, .. }
    ));
    let ip = ip_of(&synack);
    assert_eq!(Addr(ip.dst), v4("10.1.0.10"));
    assert_eq!(packet::ports(&synack, &ip).unwrap(), (443, 40000));
    verify_checksums(&synack).unwrap();
    let mut ack = build(
        VMAC_T,
        CLIENT_MAC,
        v4("10.1.0.10"),
        v4("192.0.2.100"),
        64,
        &tcp(packet::TCP_ACK, 40000, 443),
    );
    assert!(matches!(
        run(&mut r, &mut ack, T),
        Verdict::Tx { iface: U, .. }
    ));
    let t = lock(r.core.table());
    let key = SessionKey::new(
        Ipv4Addr::new(10, 1, 0, 10),
        40000,
        Ipv4Addr::new(192, 0, 2, 100),
        443,
        6,
        r.core.config().ifaces[0].zone,
    );
    let rec = t.get(t.lookup_forward(&key).unwrap()).unwrap();
    assert_eq!(rec.tcp_state, TcpState::Established);
    assert_eq!(rec.owner_rg, RG1);
    assert_eq!(t.origin(rec), Origin::LocalOwned);
    let c = rec.counters();
    assert_eq!((c.fwd_packets, c.rev_packets), (2, 1));
    drop(t);
    // The handshake's completion queued the one delta for RG1 (half-open
    // sessions are not synced).
    let mut keys = Vec::new();
    r.consumers[0].try_recv_many(&mut keys, 10);
    assert_eq!(keys, vec![crate::delta::Delta::change(key)]);
}

#[test]
fn dnat_port_forward_reaches_the_server_and_replies_look_public() {
    let mut r = rig(true);
    let mut syn = build(
        VMAC_U,
        SERVER_MAC,
        v4("192.0.2.200"),
        v4("192.0.2.1"),
        64,
        &tcp(packet::TCP_SYN, 5555, 8080),
    );
    assert!(
        matches!(run(&mut r, &mut syn, U), Verdict::Tx { iface: T, .. }),
        "permitted by web-in after DNAT"
    );
    let ip = ip_of(&syn);
    assert_eq!(Addr(ip.dst), v4("10.1.0.10"));
    assert_eq!(packet::ports(&syn, &ip).unwrap(), (5555, 80));
    assert_eq!(Addr(ip.src), v4("192.0.2.200"), "no SNAT inbound");
    verify_checksums(&syn).unwrap();
    let mut reply = build(
        VMAC_T,
        CLIENT_MAC,
        v4("10.1.0.10"),
        v4("192.0.2.200"),
        64,
        &tcp(packet::TCP_SYN | packet::TCP_ACK, 80, 5555),
    );
    assert!(matches!(
        run(&mut r, &mut reply, T),
        Verdict::Tx { iface: U, .. }
    ));
    let ip = ip_of(&reply);
    assert_eq!(Addr(ip.src), v4("192.0.2.1"));
    assert_eq!(packet::ports(&reply, &ip).unwrap(), (8080, 5555));
    verify_checksums(&reply).unwrap();
    assert_eq!(r.core.stats().policy_hits[0].load(Ordering::Relaxed), 1);
}

#[test]
fn policy_deny_and_default_deny_drop_and_count() {
    let mut r = rig(true);
    let mut dns = build(
        VMAC_U,
        SERVER_MAC,
        v4("192.0.2.200"),
        v4("10.1.0.10"),
        64,
        &L4::Udp {
            sport: 999,
            dport: 53,
            payload: vec![1, 2],
        },
    );
    assert_eq!(
        run(&mut r, &mut dns, U),
        Verdict::Drop(DropReason::PolicyDeny)
    );
    assert_eq!(r.core.stats().policy_hits[1].load(Ordering::Relaxed), 1);
    let mut ssh = build(
        VMAC_U,
        SERVER_MAC,
        v4("192.0.2.200"),
        v4("10.1.0.10"),
        64,
        &tcp(packet::TCP_SYN, 999, 22),
    );
    assert_eq!(
        run(&mut r, &mut ssh, U),
        Verdict::Drop(DropReason::NoPolicy)
    );
    assert_eq!(r.core.stats().dropped(DropReason::PolicyDeny), 1);
    assert_eq!(r.core.stats().dropped(DropReason::NoPolicy), 1);
    assert!(
        lock(r.core.table()).is_empty(),
        "denied flows create no session"
    );
}

#[test]
fn icmp_error_with_embedded_header_is_translated_back_to_the_client() {
    let mut r = rig(true);
    let mut udp = build(
        VMAC_T,
        CLIENT_MAC,
        v4("10.1.0.10"),
        v4("192.0.2.100"),
        64,
        &L4::Udp {
            sport: 33000,
            dport: 9,
            payload: vec![7; 12],
        },
    );
    assert!(matches!(
        run(&mut r, &mut udp, T),
        Verdict::Tx { iface: U, .. }
    ));
    let sent = ip_of(&udp);
    let nat_port = packet::ports(&udp, &sent).unwrap().0;
    // The server answers "port unreachable", quoting what it received.
    let quoted = udp[sent.l3..sent.end].to_vec();
    let mut err = build(
        VMAC_U,
        SERVER_MAC,
        v4("192.0.2.100"),
        v4("192.0.2.1"),
        64,
        &L4::IcmpError {
            kind: 3,
            code: 3,
            quoted,
        },
    );
    assert!(matches!(
        run(&mut r, &mut err, U),
        Verdict::Tx { iface: T, .. }
    ));
    let outer = ip_of(&err);
    assert_eq!(
        Addr(outer.dst),
        v4("10.1.0.10"),
        "outer destination un-NATed"
    );
    let inner = packet::parse_ipv4_embedded(&err, outer.l4 + 8, outer.end).unwrap();
    assert_eq!(Addr(inner.src), v4("10.1.0.10"), "quoted source un-NATed");
    assert_eq!(packet::ports(&err, &inner).unwrap(), (33000, 9));
    assert_ne!(nat_port, 0);
    verify_checksums(&err).unwrap();
}

#[test]
fn icmp_error_without_session_is_dropped() {
    let mut r = rig(true);
    let quoted = ip_packet(
        v4("192.0.2.1"),
        v4("192.0.2.100"),
        64,
        &L4::Udp {
            sport: 1,
            dport: 2,
            payload: vec![],
        },
    );
    let mut err = build(
        VMAC_U,
        SERVER_MAC,
        v4("192.0.2.100"),
        v4("192.0.2.1"),
        64,
        &L4::IcmpError {
            kind: 3,
            code: 3,
            quoted,
        },
    );
    // Addressed to our VIP: it is a local delivery, not forwarded.
    assert_eq!(
        run(&mut r, &mut err, U),
        Verdict::Drop(DropReason::LocalDelivery)
    );
    let quoted = ip_packet(
        v4("198.51.100.7"),
        v4("192.0.2.100"),
        64,
        &L4::Udp {
            sport: 1,
            dport: 2,
            payload: vec![],
        },
    );
    let mut err = build(
        VMAC_U,
        SERVER_MAC,
        v4("192.0.2.100"),
        v4("10.1.0.10"),
        64,
        &L4::IcmpError {
            kind: 3,
            code: 3,
            quoted,
        },
    );
    assert_eq!(
        run(&mut r, &mut err, U),
        Verdict::Drop(DropReason::IcmpErrorNoSession)
    );
}

#[test]
fn ipv6_tcp_through_snat_and_back() {
    let mut r = rig(true);
    let mut syn = build(
        VMAC_T,
        CLIENT_MAC,
        v6("2001:db8:1::10"),
        v6("2001:db8:2::100"),
        64,
        &tcp(packet::TCP_SYN, 41000, 80),
    );
    assert!(matches!(
        run(&mut r, &mut syn, T),
        Verdict::Tx { iface: U, .. }
    ));
    let ip = ip_of(&syn);
    assert_eq!(Addr(ip.src), v6("2001:db8:2::1"));
    assert_eq!(ip.ttl, 63, "hop limit decremented");
    verify_checksums(&syn).unwrap();
    let mut back = build(
        VMAC_U,
        SERVER_MAC,
        v6("2001:db8:2::100"),
        v6("2001:db8:2::1"),
        64,
        &tcp(packet::TCP_SYN | packet::TCP_ACK, 80, 41000),
    );
    assert!(matches!(
        run(&mut r, &mut back, U),
        Verdict::Tx { iface: T, .. }
    ));
    assert_eq!(Addr(ip_of(&back).dst), v6("2001:db8:1::10"));
    verify_checksums(&back).unwrap();
}

#[test]
fn arp_for_a_vip_is_answered_only_by_the_primary() {
    for primary in [true, false] {
        let mut r = rig(primary);
        let mut req = build_arp(
            1,
            CLIENT_MAC,
            packet::BROADCAST,
            &v4("10.1.0.10"),
            &v4("10.1.0.1"),
        );
        let v = run(&mut r, &mut req, T);
        if primary {
            assert_eq!(v, Verdict::Reply { len: 60 });
            assert_eq!(packet::mac_at(&req, 0).unwrap(), CLIENT_MAC);
            assert_eq!(
                &req[ETH_HLEN + 8..ETH_HLEN + 14],
                &VMAC_T,
                "answered with the virtual MAC"
            );
            assert_eq!(&req[ETH_HLEN + 14..ETH_HLEN + 18], &[10, 1, 0, 1]);
        } else {
            assert_eq!(v, Verdict::Drop(DropReason::ArpNotForUs));
        }
    }
}

#[test]
fn neighbor_solicitation_for_a_vip_gets_an_advertisement() {
    let mut r = rig(true);
    let mut ns = build_ns(CLIENT_MAC, &v6("2001:db8:1::10"), &v6("2001:db8:1::1"));
    let v = run(&mut r, &mut ns, T);
    let Verdict::Reply { len } = v else {
        panic!("{v:?}")
    };
    ns.truncate(len);
    assert_eq!(ns[ETH_HLEN + 40], 136);
    assert_eq!(ns[ETH_HLEN + 44], 0xe0, "router, solicited, override");
    assert_eq!(
        &ns[ETH_HLEN + 40 + 8..ETH_HLEN + 40 + 24],
        &v6("2001:db8:1::1").0
    );
    verify_checksums(&ns).unwrap();
}

#[test]
fn first_packets_to_an_unresolved_next_hop_are_held_and_sent_when_it_answers() {
    let mut r = rig(true);
    let syn = |sport| {
        build(
            VMAC_T,
            CLIENT_MAC,
            v4("10.1.0.10"),
            v4("192.0.2.77"),
            64,
            &tcp(packet::TCP_SYN, sport, 443),
        )
    };
    assert_eq!(run(&mut r, &mut syn(40001), T), Verdict::Held);
    assert_eq!(run(&mut r, &mut syn(40002), T), Verdict::Held);
    assert_eq!(r.core.outbox().len(), 1, "asked once");
    let (iface, req) = r.core.outbox().pop().unwrap();
    assert_eq!(iface, U);
    assert_eq!(&req[ETH_HLEN + 24..ETH_HLEN + 28], &[192, 0, 2, 77]);
    // The answer releases both, in order, NATed, TTL decremented once.
    let mut reply = build_arp(2, [0x77; 6], VMAC_U, &v4("192.0.2.77"), &v4("192.0.2.1"));
    run(&mut r, &mut reply, U);
    let sent: Vec<_> = r.core.outbox().drain(..).collect();
    assert_eq!(sent.len(), 2, "the held frames went out");
    for ((iface, f), sport) in sent.iter().zip([40001, 40002]) {
        assert_eq!(*iface, U);
        assert_eq!(packet::mac_at(f, 0).unwrap(), [0x77; 6]);
        assert_eq!(packet::mac_at(f, 6).unwrap(), VMAC_U);
        let ip = ip_of(f);
        assert_eq!(ip.ttl, 63);
        assert_eq!(Addr(ip.src), v4("192.0.2.1"));
        assert_eq!(packet::ports(f, &ip).unwrap(), (sport, 443));
        verify_checksums(f).unwrap();
    }
    assert_eq!(r.core.stats().held_sent.load(Ordering::Relaxed), 2);
    // Known now: forwarded at once.
    let mut third = syn(40001);
    assert!(matches!(
        run(&mut r, &mut third, T),
        Verdict::Tx { iface: U, .. }
    ));
    assert_eq!(packet::mac_at(&third, 0).unwrap(), [0x77; 6]);
}

#[test]
fn the_hold_queue_is_bounded_and_expires_with_a_counter() {
    let mut r = rig(true);
    let to = |host: u8, sport| {
        build(
            VMAC_T,
            CLIENT_MAC,
            v4("10.1.0.10"),
            Addr::v4(std::net::Ipv4Addr::new(192, 0, 2, host)),
            64,
            &L4::Udp {
                sport,
                dport: 9,
                payload: vec![1; 8],
            },
        )
    };
    let verdicts: Vec<_> = (0..6)
        .map(|i| run(&mut r, &mut to(77, 1000 + i), T))
        .collect();
    assert_eq!(
        verdicts.iter().filter(|v| **v == Verdict::Held).count(),
        HOLD_PER_NEIGHBOR,
        "{verdicts:?}"
    );
    assert_eq!(r.core.stats().dropped(DropReason::NeighborMiss), 2);
    // 70 more hosts; 192.0.2.100 is a known neighbor (the server),
    // forwarded at once. Of the other 69, 60 fit under HOLD_TOTAL.
    for host in 80..150u8 {
        run(&mut r, &mut to(host, 2000), T);
    }
    assert_eq!(
        r.core.stats().held.load(Ordering::Relaxed) as usize,
        HOLD_TOTAL
    );
    assert_eq!(r.core.stats().dropped(DropReason::NeighborMiss), 2 + 9);
    // Nobody answers: after HOLD_MS they are dropped and counted.
    r.core.w.tick(Millis(NOW.0 + HOLD_MS));
    assert!(!r.core.w.core().has_held());
    assert_eq!(r.core.stats().held_sent.load(Ordering::Relaxed), 0);
    assert_eq!(
        r.core.stats().dropped(DropReason::NeighborMiss),
        2 + 9 + HOLD_TOTAL as u64,
        "every held frame that expired is counted"
    );
}

#[test]
fn sessions_of_a_secondary_rg_go_to_the_fabric() {
    let mut r = rig(false);
    // To the virtual MAC while the peer owns it.
    let mut syn = build(
        VMAC_T,
        CLIENT_MAC,
        v4("10.1.0.10"),
        v4("192.0.2.100"),
        64,
        &tcp(packet::TCP_SYN, 40000, 443),
    );
    assert_eq!(run(&mut r, &mut syn, T), Verdict::Fabric { rg: RG1 });
    // To this node's own MAC: the session would belong to RG1 too.
    let mut syn = build(
        NODE_MAC_T,
        CLIENT_MAC,
        v4("10.1.0.10"),
        v4("192.0.2.100"),
        64,
        &tcp(packet::TCP_SYN, 40000, 443),
    );
    assert_eq!(run(&mut r, &mut syn, T), Verdict::Fabric { rg: RG1 });
    assert!(
        lock(r.core.table()).is_empty(),
        "the owner creates sessions, not this node"
    );
    r.roles.store(Arc::new(RoleMap::from([(
        RG1,
        RgRole {
            primary: true,
            epoch: Epoch(3),
        },
    )])));
    let mut syn = build(
        VMAC_T,
        CLIENT_MAC,
        v4("10.1.0.10"),
        v4("192.0.2.100"),
        64,
        &tcp(packet::TCP_SYN, 40000, 443),
    );
    assert!(matches!(run(&mut r, &mut syn, T), Verdict::Tx { .. }));
}

#[test]
fn ttl_expiry_and_non_first_packets_are_dropped() {
    let mut r = rig(true);
    let mut old = build(
        VMAC_T,
        CLIENT_MAC,
        v4("10.1.0.10"),
        v4("192.0.2.100"),
        1,
        &tcp(packet::TCP_SYN, 40000, 443),
    );
    assert_eq!(
        run(&mut r, &mut old, T),
        Verdict::Drop(DropReason::TtlExceeded)
    );
    let mut mid = build(
        VMAC_T,
        CLIENT_MAC,
        v4("10.1.0.10"),
        v4("192.0.2.100"),
        64,
        &tcp(packet::TCP_ACK, 40000, 443),
    );
    assert_eq!(
        run(&mut r, &mut mid, T),
        Verdict::Drop(DropReason::NoSession),
        "no session from a mid-stream ACK"
    );
    let mut stranger = build(
        [2, 2, 3, 4, 5, 6],
        CLIENT_MAC,
        v4("10.1.0.10"),
        v4("192.0.2.100"),
        64,
        &tcp(packet::TCP_SYN, 1, 2),
    );
    assert_eq!(
        run(&mut r, &mut stranger, T),
        Verdict::Drop(DropReason::NotForUs)
    );
}

#[test]
fn echo_to_a_vip_is_answered() {
    let mut r = rig(true);
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
    let Verdict::Reply { len } = run(&mut r, &mut ping, T) else {
        panic!()
    };
    ping.truncate(len.max(60));
    let ip = ip_of(&ping);
    assert_eq!(
        (Addr(ip.src), Addr(ip.dst)),
        (v4("10.1.0.1"), v4("10.1.0.10"))
    );
    assert_eq!(ping[ip.l4], 0);
    verify_checksums(&ping).unwrap();
}

#[test]
fn rst_closes_and_expiry_emits_a_delete_delta() {
    let mut r = rig(true);
    let mut syn = build(
        VMAC_T,
        CLIENT_MAC,
        v4("10.1.0.10"),
        v4("192.0.2.100"),
        64,
        &tcp(packet::TCP_SYN, 40000, 443),
    );
    run(&mut r, &mut syn, T);
    let mut rst = build(
        VMAC_U,
        SERVER_MAC,
        v4("192.0.2.100"),
        v4("192.0.2.1"),
        64,
        &tcp(packet::TCP_RST | packet::TCP_ACK, 443, 40000),
    );
    assert!(matches!(run(&mut r, &mut rst, U), Verdict::Tx { .. }));
    let mut keys = Vec::new();
    r.consumers[0].try_recv_many(&mut keys, 10);
    assert!(keys.is_empty(), "reset in its handshake: never synced");
    assert_eq!(
        r.core.expire(Millis(NOW.0 + 60_000)),
        1,
        "closed sessions go after the short timeout"
    );
    r.consumers[0].try_recv_many(&mut keys, 10);
    assert!(keys.is_empty(), "no delete for what the peer never had");
    // An established connection was synced: its expiry reaches the peer.
    let handshake = [
        (
            T,
            build(
                VMAC_T,
                CLIENT_MAC,
                v4("10.1.0.10"),
                v4("192.0.2.100"),
                64,
                &tcp(packet::TCP_SYN, 40001, 443),
            ),
        ),
        (
            U,
            build(
                VMAC_U,
                SERVER_MAC,
                v4("192.0.2.100"),
                v4("192.0.2.1"),
                64,
                &tcp(packet::TCP_SYN | packet::TCP_ACK, 443, 40001),
            ),
        ),
        (
            T,
            build(
                VMAC_T,
                CLIENT_MAC,
                v4("10.1.0.10"),
                v4("192.0.2.100"),
                64,
                &tcp(packet::TCP_ACK, 40001, 443),
            ),
        ),
    ];
    for (i, mut f) in handshake {
        assert!(matches!(run(&mut r, &mut f, i), Verdict::Tx { .. }));
    }
    r.consumers[0].try_recv_many(&mut keys, 10);
    assert_eq!(keys.len(), 1, "established");
    {
        // The sender read it (the peer may hold it now).
        let t = lock(r.core.table());
        let h = t.lookup_forward(&keys[0].key).expect("established");
        t.get(h).expect("live").mark_sent();
    }
    assert_eq!(r.core.expire(Millis(NOW.0 + 2_000_000)), 1);
    let established = keys[0].key;
    keys.clear();
    r.consumers[0].try_recv_many(&mut keys, 10);
    assert_eq!(keys, vec![crate::delta::Delta::delete(established)]);
    let t = lock(r.core.table());
    assert!(t.is_empty());
    assert_eq!(t.counters().closed_before_sync, 0);
}

#[test]
fn tcp_state_machine_transitions() {
    use Direction::*;
    use TcpState::*;
    let s = next_tcp_state(SynSent, Reverse, packet::TCP_SYN | packet::TCP_ACK);
    assert_eq!(s, SynReceived);
    assert_eq!(next_tcp_state(s, Forward, packet::TCP_ACK), Established);
    assert_eq!(
        next_tcp_state(Established, Forward, packet::TCP_FIN | packet::TCP_ACK),
        FinWait
    );
    assert_eq!(
        next_tcp_state(FinWait, Reverse, packet::TCP_FIN | packet::TCP_ACK),
        TimeWait
    );
    assert_eq!(
        next_tcp_state(Established, Reverse, packet::TCP_FIN),
        CloseWait
    );
    assert_eq!(
        next_tcp_state(CloseWait, Forward, packet::TCP_FIN),
        TimeWait
    );
    assert_eq!(
        next_tcp_state(Established, Reverse, packet::TCP_RST),
        Closed
    );
    assert_eq!(
        next_tcp_state(SynSent, Forward, packet::TCP_SYN),
        SynSent,
        "retransmitted SYN"
    );
}

#[test]
fn announce_sends_garp_and_unsolicited_na_from_the_virtual_mac() {
    let mut r = rig(true);
    r.core.announce(RG1);
    let frames: Vec<_> = r.core.outbox().drain(..).collect();
    assert_eq!(frames.len(), 4, "two v4 and two v6 VIPs");
    let garp = &frames[0].1;
    assert_eq!(packet::mac_at(garp, 6).unwrap(), VMAC_T);
    assert_eq!(
        &garp[ETH_HLEN + 14..ETH_HLEN + 18],
        &garp[ETH_HLEN + 24..ETH_HLEN + 28],
        "gratuitous: sender = target"
    );
    verify_checksums(&frames[1].1).unwrap();
    let na = frames
        .iter()
        .map(|(_, f)| f)
        .find(|f| packet::parse_eth(f).unwrap().ethertype == packet::ETHERTYPE_IPV6)
        .expect("an unsolicited NA");
    assert_eq!(na[ETH_HLEN + 40], 136);
    assert_eq!(
        na[ETH_HLEN + 44],
        0xa0,
        "router and override, not solicited: hosts keep the VIP as their router"
    );
}

proptest! {
    /// Nothing panics on any bytes, on any interface.
    #[test]
    fn random_frames_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200), iface in 0u16..3) {
        let mut r = rig(true);
        let mut f = data.clone();
        let _ = r.core.process(&mut f, InterfaceId(iface), NOW);
    }

    /// Valid frames with random bytes flipped never panic, and what is
    /// forwarded has valid checksums.
    #[test]
    fn mutated_frames_never_panic(pos in 0usize..80, val in any::<u8>(), which in 0u8..4) {
        let mut r = rig(true);
        let base = match which {
            0 => build(VMAC_T, CLIENT_MAC, v4("10.1.0.10"), v4("192.0.2.100"), 64, &tcp(packet::TCP_SYN, 40000, 443)),
            1 => build(VMAC_T, CLIENT_MAC, v6("2001:db8:1::10"), v6("2001:db8:2::100"), 64, &L4::Udp { sport: 1, dport: 2, payload: vec![0; 8] }),
            2 => build_arp(1, CLIENT_MAC, packet::BROADCAST, &v4("10.1.0.10"), &v4("10.1.0.1")),
            _ => build(VMAC_U, SERVER_MAC, v4("192.0.2.100"), v4("192.0.2.1"), 64, &L4::IcmpError { kind: 3, code: 1, quoted: ip_packet(v4("192.0.2.1"), v4("192.0.2.100"), 9, &L4::Udp { sport: 5, dport: 6, payload: vec![] }) }),
        };
        let mut f = base.clone();
        if pos < f.len() {
            f[pos] = val;
        }
        let _ = r.core.process(&mut f, if which == 3 { U } else { T }, NOW);
    }

    /// Frames from the fabric are input from the network too: mutated,
    /// on any interface id, for processing or for transmission only, split
    /// RG ownership included, they never panic.
    #[test]
    fn mutated_fabric_frames_never_panic(pos in 0usize..80, val in any::<u8>(), iface in 0u16..4, split in any::<bool>()) {
        let mut r = if split { split_rig(&[2]) } else { rig(true) };
        let base = build(VMAC_T, CLIENT_MAC, v4("10.1.0.10"), v4("192.0.2.100"), 64, &tcp(packet::TCP_SYN, 40000, 443));
        let mut f = base.clone();
        if pos < f.len() {
            f[pos] = val;
        }
        let mut g = f.clone();
        let _ = r.core.process_from_fabric(&mut f, InterfaceId(iface), NOW);
        let _ = r.core.transmit_from_fabric(&mut g, InterfaceId(iface), NOW);
    }
}

/// reth0 (trust) in RG1, reth1 (untrust) in RG2; this node primary for
/// the RGs in `primary`.
fn split_rig(primary: &[u16]) -> Rig {
    let mut cfg = config();
    cfg.interfaces[1].reth.as_mut().unwrap().rg = 2;
    let mut compiled = Compiled::new(&cfg).unwrap();
    compiled.ifaces[0].mac = NODE_MAC_T;
    compiled.ifaces[1].mac = NODE_MAC_U;
    let table = shared(SessionTable::new(TableConfig::default()));
    let roles: RoleMap = [1u16, 2]
        .into_iter()
        .map(|rg| {
            (
                RgId(rg),
                RgRole {
                    primary: primary.contains(&rg),
                    epoch: Epoch(2),
                },
            )
        })
        .collect();
    for rg in primary {
        lock(&table).promote_rg(RgId(*rg));
    }
    let roles = Arc::new(ArcSwap::from_pointee(roles));
    let (producer, consumers) = delta_queues(&[RG1, RgId(2)], 1024);
    let core = node(compiled, table, roles.clone(), producer);
    core.add_neighbor(T, v4("10.1.0.10"), CLIENT_MAC);
    core.add_neighbor(U, v4("192.0.2.100"), SERVER_MAC);
    Rig {
        core,
        roles,
        consumers,
    }
}

#[test]
fn split_rg_session_leaves_through_the_owner_of_the_egress_reth() {
    // node A owns RG2 (egress) only... the session belongs to RG2, so the
    // frame entering A's RG1 member goes to B unprocessed; B (owner of RG2
    // but not RG1) processes it.
    let mut a = split_rig(&[1]);
    let mut syn = build(
        VMAC_T,
        CLIENT_MAC,
        v4("10.1.0.10"),
        v4("192.0.2.100"),
        64,
        &tcp(packet::TCP_SYN, 40000, 443),
    );
    assert_eq!(
        run(&mut a, &mut syn, T),
        Verdict::Fabric { rg: RgId(2) },
        "owner of the session's RG is the peer"
    );
    let mut b = split_rig(&[2]);
    let v = b.core.process_from_fabric(&mut syn, T, NOW);
    let Verdict::Tx { iface, len } = v else {
        panic!("{v:?}")
    };
    assert_eq!(iface, U);
    let ip = ip_of(&syn[..len]);
    assert_eq!(ip.ttl, 63, "decremented once");
    assert_eq!(Addr(ip.src), v4("192.0.2.1"));
    verify_checksums(&syn[..len]).unwrap();
    // The reply enters B (owner of RG2), leaves by reth0 (RG1, owned by A):
    // processed on B, transmitted by A.
    let mut reply = build(
        VMAC_U,
        SERVER_MAC,
        v4("192.0.2.100"),
        v4("192.0.2.1"),
        60,
        &tcp(packet::TCP_SYN | packet::TCP_ACK, 443, 40000),
    );
    let v = run(&mut b, &mut reply, U);
    let Verdict::FabricEgress { rg, iface, len } = v else {
        panic!("{v:?}")
    };
    assert_eq!((rg, iface), (RgId(1), T));
    assert_eq!(ip_of(&reply[..len]).ttl, 59);
    let v = a.core.transmit_from_fabric(&mut reply[..len], T, NOW);
    assert!(matches!(v, Verdict::Tx { iface: T, .. }), "{v:?}");
    let ip = ip_of(&reply[..len]);
    assert_eq!(ip.ttl, 59, "no second TTL decrement");
    assert_eq!(Addr(ip.dst), v4("10.1.0.10"));
    assert_eq!(packet::mac_at(&reply, 0).unwrap(), CLIENT_MAC);
    assert_eq!(
        packet::mac_at(&reply, 6).unwrap(),
        VMAC_T,
        "sent by the owner of reth0's virtual MAC"
    );
    verify_checksums(&reply[..len]).unwrap();
}

#[test]
fn fabric_frame_for_an_interface_this_node_does_not_own_is_not_bounced() {
    let mut a = split_rig(&[1]);
    let mut f = build(
        VMAC_U,
        SERVER_MAC,
        v4("192.0.2.100"),
        v4("10.1.0.10"),
        60,
        &tcp(packet::TCP_ACK, 1, 2),
    );
    assert_eq!(
        a.core.transmit_from_fabric(&mut f, U, NOW),
        Verdict::Drop(DropReason::FabricUnavailable)
    );
}

#[test]
fn fabric_frame_whose_session_the_peer_owns_is_dropped_not_bounced() {
    // Roles moved while the frame crossed: A (RG1 only) receives for
    // processing a frame of an RG2 session.
    let mut a = split_rig(&[1]);
    let mut syn = build(
        VMAC_T,
        CLIENT_MAC,
        v4("10.1.0.10"),
        v4("192.0.2.100"),
        64,
        &tcp(packet::TCP_SYN, 40000, 443),
    );
    assert_eq!(
        a.core.process_from_fabric(&mut syn, T, NOW),
        Verdict::Drop(DropReason::FabricUnavailable)
    );
    assert_eq!(
        a.core.stats().drops[DropReason::FabricUnavailable as usize].load(Ordering::Relaxed),
        1
    );
}

#[test]
fn mid_flow_packet_of_a_peer_owned_flow_goes_to_the_owner_not_dropped() {
    // A has no copy of the session (RG2, egress reth1, owned by B): an ACK
    // mid-stream must reach B, which holds it, rather than die here as
    // "no session".
    let mut a = split_rig(&[1]);
    let mut ack = build(
        VMAC_T,
        CLIENT_MAC,
        v4("10.1.0.10"),
        v4("192.0.2.100"),
        64,
        &tcp(packet::TCP_ACK, 40000, 443),
    );
    assert_eq!(run(&mut a, &mut ack, T), Verdict::Fabric { rg: RgId(2) });
    assert_eq!(
        a.core.stats().drops[DropReason::NoSession as usize].load(Ordering::Relaxed),
        0
    );
    // When this node owns the flow's RG, the same packet is dropped here.
    let mut b = split_rig(&[1, 2]);
    let mut ack = build(
        VMAC_T,
        CLIENT_MAC,
        v4("10.1.0.10"),
        v4("192.0.2.100"),
        64,
        &tcp(packet::TCP_ACK, 40000, 443),
    );
    assert_eq!(
        run(&mut b, &mut ack, T),
        Verdict::Drop(DropReason::NoSession)
    );
}

/// The burst prefetch must compute the very keys `process` looks frames up
/// by, in both directions and both families: a different key would make
/// every prefetch useless without any test noticing the slowdown.
#[test]
fn burst_prefetch_keys_are_the_lookup_keys_both_ways() {
    let mut r = rig(true);
    for (client, server) in [
        (v4("10.1.0.10"), v4("192.0.2.100")),
        (v6("2001:db8:1::10"), v6("2001:db8:2::100")),
    ] {
        let mut syn = build(
            VMAC_T,
            CLIENT_MAC,
            client,
            server,
            64,
            &tcp(packet::TCP_SYN, 40000, 443),
        );
        let pristine = syn.clone();
        assert!(matches!(run(&mut r, &mut syn, T), Verdict::Tx { .. }));
        let out = ip_of(&syn);
        let reply = build(
            VMAC_U,
            SERVER_MAC,
            server,
            Addr(out.src),
            60,
            &tcp(
                packet::TCP_SYN | packet::TCP_ACK,
                443,
                packet::ports(&syn, &out).unwrap().0,
            ),
        );
        let t = lock(r.core.table());
        let fwd = r.core.flow_key(&pristine, T).expect("a flow key");
        let rev = r.core.flow_key(&reply, U).expect("a flow key");
        let h = t
            .lookup_forward(&fwd)
            .expect("the forward key is the session's");
        assert_eq!(
            t.lookup_reverse(&rev),
            Some(h),
            "the reply's key is its reverse"
        );
        drop(t);
        // Prefetching a burst with unparsable frames in it is harmless.
        r.core.w.core().prefetch_sessions(
            &read(r.core.table()),
            [(&pristine[..], T), (&[0u8; 3][..], T), (&reply[..], U)],
        );
    }
    assert!(r.core.flow_key(&[0u8; 10], T).is_none());
}

#[path = "core_l3_tests.rs"]
mod l3;

#[path = "core_frag_tests.rs"]
mod frag;

#[path = "core_tcp_tests.rs"]
mod tcp_tracking;

#[path = "core_nat_tests.rs"]
mod nat_behaviour;

#[path = "core_event_tests.rs"]
mod events;

#[path = "core_screen_tests.rs"]
mod screens;
