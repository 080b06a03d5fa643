//! Security events from the packet core and the table: creates with their
//! translations, denies by policy and by default, closes with the reason
//! and counters, all with one session id.

use super::*;
use crate::events::{CloseReason, EventKind, FlowEvent};

fn udp(sport: u16, dport: u16) -> L4 {
    L4::Udp {
        sport,
        dport,
        payload: b"query".to_vec(),
    }
}

fn only(events: &[FlowEvent], kind: EventKind) -> Vec<FlowEvent> {
    events.iter().filter(|e| e.kind == kind).copied().collect()
}

#[test]
fn a_snat_session_logs_its_create_with_the_translation_and_its_close_with_counters() {
    let mut r = rig(true);
    lock(r.core.table()).set_close_log(true);
    let mut out = build(
        VMAC_T,
        CLIENT_MAC,
        v4("10.1.0.10"),
        v4("192.0.2.100"),
        64,
        &udp(40000, 53),
    );
    assert!(matches!(
        run(&mut r, &mut out, T),
        Verdict::Tx { iface: U, .. }
    ));
    let mut back = build(
        VMAC_U,
        SERVER_MAC,
        v4("192.0.2.100"),
        v4("192.0.2.1"),
        64,
        &udp(53, 40000),
    );
    assert!(matches!(
        run(&mut r, &mut back, U),
        Verdict::Tx { iface: T, .. }
    ));
    let events = r.core.events();
    let creates = only(&events, EventKind::SessionCreate);
    assert_eq!(creates.len(), 1, "{events:?}");
    let c = creates[0];
    assert_eq!((c.key.src, c.key.src_port), (v4("10.1.0.10"), 40000));
    assert_eq!((c.key.dst, c.key.dst_port), (v4("192.0.2.100"), 53));
    assert_eq!(c.nat().snat, Some((v4("192.0.2.1"), 40000)));
    assert_eq!(c.nat().dnat, None);
    let cfg = r.core.config();
    assert_eq!(cfg.policies[(c.policy.0 - 1) as usize].name, "out");
    assert_eq!(cfg.zone_name(c.key.zone), "trust");
    assert_eq!(cfg.zone_name(c.reverse.zone), "untrust");
    assert_eq!((c.ingress_if, c.egress_if, c.owner_rg), (T, U, RG1));
    // Idle past the UDP timeout: the close, with both directions counted.
    let later = Millis(NOW.0 + 301_000);
    assert_eq!(r.core.expire(later), 1);
    let mut closes = Vec::new();
    lock(r.core.table()).drain_closes(&mut closes);
    assert_eq!(closes.len(), 1);
    let x = closes[0];
    assert_eq!(x.kind, EventKind::SessionClose);
    assert_eq!(x.reason, Some(CloseReason::IdleTimeout));
    assert_eq!(x.session_id, c.session_id, "one id from create to close");
    assert_eq!((x.counters.fwd_packets, x.counters.rev_packets), (1, 1));
    assert_eq!(
        x.counters.fwd_bytes,
        20 + 8 + 5,
        "IP bytes of the one datagram"
    );
    assert_eq!(x.nat(), c.nat());
}

#[test]
fn a_port_forward_logs_the_destination_translation() {
    let mut r = rig(true);
    let mut syn = build(
        VMAC_U,
        SERVER_MAC,
        v4("192.0.2.200"),
        v4("192.0.2.1"),
        64,
        &tcp(packet::TCP_SYN, 5555, 8080),
    );
    assert!(matches!(
        run(&mut r, &mut syn, U),
        Verdict::Tx { iface: T, .. }
    ));
    let creates = only(&r.core.events(), EventKind::SessionCreate);
    assert_eq!(creates.len(), 1);
    let c = creates[0];
    assert_eq!((c.key.dst, c.key.dst_port), (v4("192.0.2.1"), 8080));
    assert_eq!(c.nat().dnat, Some((v4("10.1.0.10"), 80)));
    assert_eq!(c.nat().snat, None);
    assert_eq!(
        r.core.config().policies[(c.policy.0 - 1) as usize].name,
        "web-in"
    );
}

#[test]
fn denies_log_the_denying_policy_or_the_default_deny() {
    let mut r = rig(true);
    // no-dns-in denies UDP 53 from untrust.
    let mut dns = build(
        VMAC_U,
        SERVER_MAC,
        v4("192.0.2.200"),
        v4("10.1.0.10"),
        64,
        &udp(5000, 53),
    );
    assert_eq!(
        run(&mut r, &mut dns, U),
        Verdict::Drop(DropReason::PolicyDeny)
    );
    // Nothing permits UDP 123 from untrust: the default deny.
    let mut ntp = build(
        VMAC_U,
        SERVER_MAC,
        v4("192.0.2.200"),
        v4("10.1.0.10"),
        64,
        &udp(5000, 123),
    );
    assert_eq!(
        run(&mut r, &mut ntp, U),
        Verdict::Drop(DropReason::NoPolicy)
    );
    let denies = only(&r.core.events(), EventKind::PolicyDeny);
    assert_eq!(denies.len(), 2);
    let cfg = r.core.config();
    assert_eq!(
        cfg.policies[(denies[0].policy.0 - 1) as usize].name,
        "no-dns-in"
    );
    assert_eq!(denies[1].policy, PolicyId(0));
    for d in &denies {
        assert_eq!((d.key.src, d.key.dst), (v4("192.0.2.200"), v4("10.1.0.10")));
        assert_eq!(cfg.zone_name(d.key.zone), "untrust");
        assert_eq!(cfg.zone_name(d.reverse.zone), "trust");
        assert_eq!(d.nat().snat, None);
    }
    assert!(read(r.core.table()).is_empty());
}

#[test]
fn a_deny_flood_leaves_every_create_and_close_and_accounts_for_every_event() {
    // 100k denied packets/s for 5 s (simulated time) from untrust, with a
    // new outbound UDP session every 100 ms among them.
    let mut r = rig(true);
    lock(r.core.table()).set_close_log(true);
    let mut denied = 0u64;
    let mut created = 0u16;
    for ms in 0..5_000u64 {
        let now = Millis(NOW.0 + ms);
        for i in 0..100u16 {
            let mut f = build(
                VMAC_U,
                SERVER_MAC,
                v4("192.0.2.200"),
                v4("10.1.0.10"),
                64,
                &udp(1024 + i, 53),
            );
            assert_eq!(
                r.core.process(&mut f, U, now),
                Verdict::Drop(DropReason::PolicyDeny)
            );
            denied += 1;
        }
        if ms % 100 == 0 {
            let mut f = build(
                VMAC_T,
                CLIENT_MAC,
                v4("10.1.0.10"),
                v4("192.0.2.100"),
                64,
                &udp(30000 + created, 53),
            );
            assert!(matches!(r.core.process(&mut f, T, now), Verdict::Tx { .. }));
            created += 1;
        }
    }
    let events = r.core.events();
    assert_eq!(
        only(&events, EventKind::SessionCreate).len(),
        usize::from(created)
    );
    let denies = only(&events, EventKind::PolicyDeny).len() as u64;
    // The deny budget: burst 50, then 100/s per zone, and 500/s overall.
    let rates = crate::events::EventRates::default();
    assert!(denies <= u64::from(rates.deny_rate) * 5 + u64::from(rates.deny_burst) + 1);
    assert!(denies >= u64::from(rates.deny_rate) * 5);
    let hub = r.core.w.shared().events.clone().unwrap();
    let s = &hub.stats;
    for kind in [EventKind::PolicyDeny, EventKind::SessionCreate] {
        let (produced, queued) = s.count(kind);
        let dropped: u64 = crate::events::EventDrop::ALL
            .iter()
            .map(|&d| s.dropped(kind, d))
            .sum();
        assert_eq!(
            produced,
            queued + dropped,
            "{kind:?}: every event accounted"
        );
    }
    assert_eq!(s.count(EventKind::PolicyDeny).0, denied);
    // Every session's close arrives too, after its idle timeout.
    assert_eq!(r.core.expire(Millis(NOW.0 + 400_000)), usize::from(created));
    let mut closes = Vec::new();
    lock(r.core.table()).drain_closes(&mut closes);
    assert_eq!(closes.len(), usize::from(created));
}
