//! Session-table invariants. Every family-dependent test runs for IPv4 and
//! IPv6 (`v4::name`, `v6::name`).

use super::*;
use proptest::prelude::*;
use std::net::{Ipv4Addr, Ipv6Addr};

const TRUST: ZoneId = ZoneId(1);
const UNTRUST: ZoneId = ZoneId(2);
const RG1: RgId = RgId(1);
const RG2: RgId = RgId(2);

trait Family {
    fn host(n: u32) -> Addr;
    fn nat_addr() -> Addr;
}

struct V4;
struct V6;

impl Family for V4 {
    fn host(n: u32) -> Addr {
        Addr::v4(Ipv4Addr::from(0x0a00_0000 | n))
    }
    fn nat_addr() -> Addr {
        Addr::v4(Ipv4Addr::new(198, 51, 100, 1))
    }
}

impl Family for V6 {
    fn host(n: u32) -> Addr {
        Addr::v6(Ipv6Addr::new(
            0x2001,
            0xdb8,
            0,
            0,
            0,
            0,
            (n >> 16) as u16,
            n as u16,
        ))
    }
    fn nat_addr() -> Addr {
        Addr::v6(Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1))
    }
}

fn key<F: Family>(client: u32, sport: u16, server: u32, dport: u16) -> SessionKey {
    SessionKey::new(
        F::host(client),
        sport,
        F::host(0x10_0000 | server),
        dport,
        proto::TCP,
        TRUST,
    )
}

fn snat_session<F: Family>(
    rg: RgId,
    client: u32,
    sport: u16,
    ports: RangeInclusive<u16>,
) -> NewSession {
    NewSession {
        key: key::<F>(client, sport, 1, 443),
        egress_zone: UNTRUST,
        snat: Some(SnatRequest {
            addr: F::nat_addr(),
            ports,
        }),
        dnat: None,
        ingress_if: InterfaceId(1),
        egress_if: InterfaceId(2),
        owner_rg: rg,
        policy: PolicyId(7),
        tcp_state: TcpState::SynSent,
    }
}

fn plain_session<F: Family>(rg: RgId, client: u32, sport: u16) -> NewSession {
    NewSession {
        snat: None,
        ..snat_session::<F>(rg, client, sport, 1024..=65535)
    }
}

fn dnat_session<F: Family>(rg: RgId, client: u32, sport: u16) -> NewSession {
    NewSession {
        key: SessionKey::new(
            F::host(client),
            sport,
            F::nat_addr(),
            8080,
            proto::TCP,
            UNTRUST,
        ),
        egress_zone: TRUST,
        snat: None,
        dnat: Some((F::host(0x20_0000), 80)),
        ..plain_session::<F>(rg, client, sport)
    }
}

fn now() -> Millis {
    Millis(1_000_000)
}

fn small_table(capacity: usize) -> SessionTable {
    SessionTable::new(TableConfig {
        capacity,
        ..TableConfig::default()
    })
}

fn ok(t: &SessionTable) {
    if let Err(e) = t.verify_invariants() {
        panic!("invariant broken: {e}");
    }
}

mod generic {
    use super::*;

    pub fn delete_removes_all_companions<F: Family>() {
        let mut t = SessionTable::default();
        let h = t
            .insert(snat_session::<F>(RG1, 1, 40000, 1024..=65535), now())
            .unwrap();
        let r = t.get(h).unwrap().clone();
        let b = r.snat_binding().expect("SNAT session has a binding");
        assert_eq!(b.port, 40000, "original source port kept when free");
        assert_eq!(t.lookup_reverse(&r.reverse), Some(h));
        assert_eq!(t.lookup_nat_binding(&b), Some(h));
        assert_eq!(t.reserved_ports(), 1);

        let removed = t.remove(h, RemoveReason::Closed).unwrap();
        assert_eq!(removed.key, r.key);
        assert_eq!(t.lookup_forward(&r.key), None);
        assert_eq!(t.lookup_reverse(&r.reverse), None);
        assert_eq!(t.lookup_nat_binding(&b), None);
        assert_eq!(t.reserved_ports(), 0);
        assert_eq!(t.rg_len(RG1), 0);
        assert_eq!(t.counters().removed(RemoveReason::Closed), 1);
        ok(&t);
        // The port is free again: the same session can be recreated with it.
        let h2 = t
            .insert(snat_session::<F>(RG1, 1, 40000, 1024..=65535), now())
            .unwrap();
        assert_eq!(t.get(h2).unwrap().snat_binding().unwrap().port, 40000);
    }

    pub fn reconcile_deletes_stale_with_dnat_companions<F: Family>() {
        let mut t = SessionTable::default();
        let mut synced = Vec::new();
        for i in 0..10u32 {
            let s = if i % 2 == 0 {
                snat_session::<F>(RG1, i, 30000 + i as u16, 1024..=65535)
            } else {
                dnat_session::<F>(RG1, i, 30000 + i as u16)
            };
            let h = t.insert(s, now()).unwrap();
            synced.push(t.to_synced(h, now()).unwrap());
        }
        // Receiver side: all ten arrive from the peer.
        let mut rx = SessionTable::default();
        for s in &synced {
            assert_eq!(
                rx.apply_peer_upsert(s, now(), None),
                Ok(PeerApply::Inserted)
            );
        }
        assert_eq!(rx.reserved_ports(), 5);
        // The bulk carries only the first six.
        let seen: FxHashSet<SessionKey> = synced[..6].iter().map(|s| s.key).collect();
        let report = rx.reconcile_rg_keys(RG1, &seen);
        assert_eq!(
            report,
            ReconcileReport {
                examined: 10,
                deleted: 4,
                deleted_with_nat: 2
            }
        );
        for s in &synced[6..] {
            assert_eq!(rx.lookup_forward(&s.key), None);
            assert_eq!(rx.lookup_reverse(&s.reverse), None);
            if let Some(b) = nat_companion(&s.key, &s.reverse) {
                assert_eq!(
                    rx.lookup_nat_binding(&b),
                    None,
                    "stale NAT binding left behind"
                );
            }
        }
        assert_eq!(rx.reserved_ports(), 3);
        assert_eq!(rx.len(), 6);
        assert_eq!(rx.counters().removed(RemoveReason::Reconciled), 4);
        ok(&rx);
    }

    pub fn reconcile_touches_only_its_rg<F: Family>() {
        let mut rx = SessionTable::default();
        let mut tx = SessionTable::default();
        for i in 0..6u32 {
            let rg = if i < 3 { RG1 } else { RG2 };
            let h = tx
                .insert(
                    snat_session::<F>(rg, i, 20000 + i as u16, 1024..=65535),
                    now(),
                )
                .unwrap();
            rx.apply_peer_upsert(&tx.to_synced(h, now()).unwrap(), now(), None)
                .unwrap();
        }
        // A local RG1 session on the receiver is authoritative: untouched.
        rx.promote_rg(RgId(3));
        rx.insert(plain_session::<F>(RgId(3), 99, 999), now())
            .unwrap();
        // An empty bulk for RG1 deletes RG1's synced sessions only.
        let report = rx.reconcile_rg_keys(RG1, &FxHashSet::default());
        assert_eq!(report.deleted, 3);
        assert_eq!(rx.rg_len(RG1), 0);
        assert_eq!(rx.rg_len(RG2), 3);
        assert_eq!(rx.rg_len(RgId(3)), 1);
        assert_eq!(rx.reserved_ports(), 3);
        ok(&rx);
    }

    pub fn stale_handle_never_returns_wrong_session<F: Family>() {
        let mut t = SessionTable::default();
        let a = t.insert(plain_session::<F>(RG1, 1, 1111), now()).unwrap();
        let key_a = t.get(a).unwrap().key;
        t.remove(a, RemoveReason::Closed).unwrap();
        let b = t.insert(plain_session::<F>(RG1, 2, 2222), now()).unwrap();
        assert_eq!(a, b, "slab reuses the freed slot");
        assert!(
            t.resolve(a, &key_a).is_none(),
            "old handle resolves to nothing"
        );
        assert_eq!(t.lookup_forward(&key_a), None);
        let key_b = t.get(b).unwrap().key;
        assert_eq!(t.resolve(b, &key_b).map(|r| r.key), Some(key_b));
        ok(&t);
    }

    pub fn insert_is_atomic_on_port_exhaustion<F: Family>() {
        let mut t = SessionTable::default();
        for i in 0..4u32 {
            t.insert(snat_session::<F>(RG1, i, 5000, 5000..=5003), now())
                .unwrap();
        }
        assert_eq!(t.reserved_ports(), 4);
        let s = snat_session::<F>(RG1, 9, 5000, 5000..=5003);
        assert_eq!(t.insert(s.clone(), now()), Err(InsertError::PortsExhausted));
        assert_eq!(
            t.lookup_forward(&s.key),
            None,
            "no forward entry after refusal"
        );
        assert_eq!(t.len(), 4);
        assert_eq!(t.reserved_ports(), 4);
        assert_eq!(t.counters().refused_ports_exhausted, 1);
        ok(&t);
    }

    pub fn insert_conflict_releases_reserved_port<F: Family>() {
        let mut t = SessionTable::default();
        // Session A: plain, its reverse key is (server:443 -> client 1:7000).
        t.insert(plain_session::<F>(RG1, 1, 7000), now()).unwrap();
        // Session B from another zone SNATs onto client 1's address and port,
        // producing the same reverse key: refused, and its port released.
        let mut b = snat_session::<F>(RG1, 5, 7000, 7000..=7000);
        b.key.zone = ZoneId(9);
        b.snat.as_mut().unwrap().addr = F::host(1);
        assert_eq!(t.insert(b, now()), Err(InsertError::ReverseExists));
        assert_eq!(t.reserved_ports(), 0);
        assert_eq!(t.counters().refused_conflict, 1);
        ok(&t);
    }

    pub fn expiry_removes_companions<F: Family>() {
        let mut t = SessionTable::default();
        t.promote_rg(RG1); // local sessions expire here
        let h = t
            .insert(snat_session::<F>(RG1, 1, 1, 1024..=65535), now())
            .unwrap();
        let r = t.get(h).unwrap().clone();
        let opening = t.config().timeouts.tcp_opening_ms as u64;
        let mut seen = Vec::new();
        assert_eq!(
            t.expire(Millis(now().0 + opening - 1), |r| seen.push(r.key)),
            0
        );
        let late = Millis(now().0 + opening + t.config().wheel_tick_ms);
        assert_eq!(t.expire(late, |r| seen.push(r.key)), 1);
        assert_eq!(seen, vec![r.key]);
        assert_eq!(t.lookup_reverse(&r.reverse), None);
        assert_eq!(t.reserved_ports(), 0);
        assert_eq!(t.counters().removed(RemoveReason::Expired), 1);
        ok(&t);
    }
}

macro_rules! family_tests {
    ($m:ident, $fam:ty) => {
        mod $m {
            use super::*;

            #[test]
            fn delete_removes_all_companions() {
                generic::delete_removes_all_companions::<$fam>();
            }
            #[test]
            fn reconcile_deletes_stale_with_dnat_companions() {
                generic::reconcile_deletes_stale_with_dnat_companions::<$fam>();
            }
            #[test]
            fn reconcile_touches_only_its_rg() {
                generic::reconcile_touches_only_its_rg::<$fam>();
            }
            #[test]
            fn stale_handle_never_returns_wrong_session() {
                generic::stale_handle_never_returns_wrong_session::<$fam>();
            }
            #[test]
            fn insert_is_atomic_on_port_exhaustion() {
                generic::insert_is_atomic_on_port_exhaustion::<$fam>();
            }
            #[test]
            fn insert_conflict_releases_reserved_port() {
                generic::insert_conflict_releases_reserved_port::<$fam>();
            }
            #[test]
            fn expiry_removes_companions() {
                generic::expiry_removes_companions::<$fam>();
            }
        }
    };
}

family_tests!(v4, V4);
family_tests!(v6, V6);

#[test]
fn nat_is_derived_from_the_two_keys() {
    let mut t = SessionTable::default();
    let h = t.insert(dnat_session::<V4>(RG1, 1, 1234), now()).unwrap();
    let r = t.get(h).unwrap();
    assert_eq!(
        r.nat(),
        Nat {
            snat: None,
            dnat: Some((V4::host(0x20_0000), 80))
        }
    );
    assert_eq!(r.snat_binding(), None);
    assert_eq!(r.reverse.zone, TRUST);
    assert_eq!(t.lookup(&r.reverse.clone()), Some((h, Direction::Reverse)));
}

#[test]
fn mixed_family_insert_is_refused_and_counted() {
    let mut t = SessionTable::default();
    let mut s = snat_session::<V4>(RG1, 1, 1, 1024..=65535);
    s.snat.as_mut().unwrap().addr = V6::nat_addr();
    assert_eq!(t.insert(s, now()), Err(InsertError::InvalidKey));
    assert_eq!(t.counters().refused_invalid, 1);
    assert!(t.is_empty());
}

#[test]
fn capacity_refuses_and_counts() {
    let mut t = small_table(2);
    t.insert(plain_session::<V4>(RG1, 1, 1), now()).unwrap();
    t.insert(plain_session::<V4>(RG1, 2, 1), now()).unwrap();
    assert_eq!(
        t.insert(plain_session::<V4>(RG1, 3, 1), now()),
        Err(InsertError::Capacity)
    );
    assert_eq!(t.counters().refused_capacity, 1);
    assert_eq!(t.len(), 2);
}

#[test]
fn duplicate_forward_key_is_refused() {
    let mut t = SessionTable::default();
    t.insert(plain_session::<V4>(RG1, 1, 1), now()).unwrap();
    assert_eq!(
        t.insert(plain_session::<V4>(RG1, 1, 1), now()),
        Err(InsertError::ForwardExists)
    );
    ok(&t);
}

#[test]
fn touch_extends_life_and_counts_both_directions() {
    let mut t = SessionTable::default();
    t.promote_rg(RG1); // local sessions expire here
    let h = t.insert(plain_session::<V4>(RG1, 1, 1), now()).unwrap();
    t.set_tcp_state(h, TcpState::Established, now());
    let est = t.config().timeouts.tcp_established_ms as u64;
    let mid = Millis(now().0 + est - 1000);
    t.touch(h, Direction::Forward, 100, mid);
    t.touch(h, Direction::Reverse, 1500, mid);
    assert_eq!(
        t.expire(Millis(now().0 + est + 1000), |_| {}),
        0,
        "touched session survives"
    );
    let r = t.get(h).unwrap();
    assert_eq!(
        r.counters(),
        FlowCounters {
            fwd_packets: 1,
            fwd_bytes: 100,
            rev_packets: 1,
            rev_bytes: 1500
        }
    );
    assert_eq!(t.expire(Millis(mid.0 + est + 1000), |_| {}), 1);
    ok(&t);
}

#[test]
fn shorter_timeout_after_fin_expires_early() {
    let mut t = SessionTable::default();
    t.promote_rg(RG1); // local sessions expire here
    let h = t.insert(plain_session::<V4>(RG1, 1, 1), now()).unwrap();
    t.set_tcp_state(h, TcpState::Established, now());
    t.set_tcp_state(h, TcpState::TimeWait, now());
    let tw = t.config().timeouts.tcp_time_wait_ms as u64;
    assert_eq!(
        t.wheel_entries(),
        1,
        "the earlier entry replaced the later one"
    );
    assert_eq!(t.expire(Millis(now().0 + tw + 500), |_| {}), 1);
    assert!(t.is_empty());
    assert_eq!(t.wheel_entries(), 0);
}

/// Closing connections must not leave timer entries behind: with lazy
/// deletion every closed connection kept an entry for up to the longest
/// timeout (30 min), so wheel memory grew with churn, not with sessions.
#[test]
fn closed_sessions_leave_no_wheel_entries_under_churn() {
    let mut t = small_table(1000);
    t.promote_rg(RG1); // local sessions expire here
    let mut live = std::collections::VecDeque::new();
    for i in 0..20_000u32 {
        let h = t
            .insert(snat_session::<V4>(RG1, i, 1, 1024..=65535), now())
            .unwrap();
        t.set_tcp_state(h, TcpState::Established, now());
        live.push_back(h);
        if live.len() == 500 {
            let old = live.pop_front().unwrap();
            // FIN shortens the timeout (a new, earlier entry), then the
            // session closes long before either entry is due.
            t.set_tcp_state(old, TcpState::FinWait, now());
            t.remove(old, RemoveReason::Closed).unwrap();
        }
        assert_eq!(t.wheel_entries(), t.len());
    }
    ok(&t);
    assert_eq!(t.len(), 499);
    assert_eq!(t.expire(Millis(now().0 + 10_000_000), |_| {}), 499);
    assert_eq!(t.wheel_entries(), 0);
    ok(&t);
}

#[test]
fn peer_synced_sessions_do_not_expire_on_the_secondary() {
    let mut tx = SessionTable::default();
    let h = tx.insert(plain_session::<V4>(RG1, 1, 1), now()).unwrap();
    let s = tx.to_synced(h, now()).unwrap();
    let mut rx = SessionTable::default();
    rx.apply_peer_upsert(&s, now(), None).unwrap();
    let later = Millis(now().0 + 10 * u64::from(s.timeout_ms));
    assert_eq!(rx.expire(later, |_| {}), 0);
    assert_eq!(rx.len(), 1);
    // After a takeover the copy is local and has a full timeout left.
    rx.promote_rg(RG1);
    let r = rx.get(rx.lookup_forward(&s.key).unwrap()).unwrap();
    assert!(r.expires_at() > later);
    assert_eq!(
        rx.expire(Millis(later.0 + u64::from(s.timeout_ms) + 1000), |_| {}),
        1
    );
    ok(&rx);
}

#[test]
fn first_expire_with_large_clock_does_not_walk_from_zero() {
    let mut t = SessionTable::default();
    t.promote_rg(RG1); // local sessions expire here
    let big = Millis(u64::MAX / 4);
    t.insert(plain_session::<V4>(RG1, 1, 1), big).unwrap();
    assert_eq!(t.expire(big, |_| {}), 0);
    assert_eq!(t.expire(Millis(big.0 + 3_600_000), |_| {}), 1);
}

#[test]
fn expiry_after_long_pause_visits_each_bucket_once() {
    let mut t = SessionTable::new(TableConfig {
        wheel_buckets: 16,
        wheel_tick_ms: 100,
        ..TableConfig::default()
    });
    t.promote_rg(RG1); // local sessions expire here
    for i in 0..50 {
        t.insert(plain_session::<V4>(RG1, i, 1), now()).unwrap();
    }
    assert_eq!(t.expire(Millis(now().0 + 100_000_000), |_| {}), 50);
    ok(&t);
}

#[test]
fn peer_upsert_never_overwrites_live_local_session() {
    let mut t = SessionTable::default();
    t.promote_rg(RG1);
    let h = t
        .insert(snat_session::<V4>(RG1, 1, 1, 1024..=65535), now())
        .unwrap();
    let mut s = t.to_synced(h, now()).unwrap();
    s.tcp_state = TcpState::Closed;
    assert_eq!(
        t.apply_peer_upsert(&s, now(), None),
        Err(InsertError::LocalOwnedConflict)
    );
    assert_eq!(
        t.apply_peer_delete(&s.key),
        Err(InsertError::LocalOwnedConflict)
    );
    assert_eq!(t.get(h).unwrap().tcp_state, TcpState::SynSent);
    assert_eq!(t.counters().refused_local_owned, 2);
    // Once demoted, the peer's copy wins.
    assert_eq!(t.demote_rg(RG1), 1);
    assert_eq!(t.apply_peer_upsert(&s, now(), None), Ok(PeerApply::Updated));
    assert_eq!(t.get(h).unwrap().tcp_state, TcpState::Closed);
    ok(&t);
}

#[test]
fn peer_upsert_with_new_nat_replaces_companions() {
    let mut tx = SessionTable::default();
    let h = tx
        .insert(snat_session::<V4>(RG1, 1, 1000, 1024..=65535), now())
        .unwrap();
    let mut s = tx.to_synced(h, now()).unwrap();
    let mut rx = SessionTable::default();
    rx.apply_peer_upsert(&s, now(), None).unwrap();
    let old_binding = nat_companion(&s.key, &s.reverse).unwrap();
    s.reverse.dst_port = 2000;
    assert_eq!(
        rx.apply_peer_upsert(&s, now(), None),
        Ok(PeerApply::Replaced)
    );
    assert_eq!(rx.lookup_nat_binding(&old_binding), None);
    assert_eq!(rx.reserved_ports(), 1);
    assert_eq!(rx.len(), 1);
    ok(&rx);
}

#[test]
fn peer_upsert_evicts_stale_synced_holder_of_its_binding() {
    // The peer deleted session A (delete lost) and reused A's NAT port for B.
    let mut rx = SessionTable::default();
    let mut tx = SessionTable::default();
    let a = tx
        .insert(snat_session::<V4>(RG1, 1, 3000, 3000..=3000), now())
        .unwrap();
    rx.apply_peer_upsert(&tx.to_synced(a, now()).unwrap(), now(), None)
        .unwrap();
    tx.remove(a, RemoveReason::Closed);
    let b = tx
        .insert(snat_session::<V4>(RG1, 2, 3000, 3000..=3000), now())
        .unwrap();
    let sb = tx.to_synced(b, now()).unwrap();
    assert_eq!(
        rx.apply_peer_upsert(&sb, now(), None),
        Ok(PeerApply::Inserted)
    );
    assert_eq!(rx.len(), 1);
    assert_eq!(rx.counters().evicted_by_peer, 1);
    ok(&rx);
}

#[test]
fn peer_times_are_rebased_from_ages() {
    let mut tx = SessionTable::default();
    let h = tx
        .insert(plain_session::<V4>(RG1, 1, 1), Millis(5_000))
        .unwrap();
    tx.touch(h, Direction::Forward, 1, Millis(8_000));
    let s = tx.to_synced(h, Millis(9_000)).unwrap();
    assert_eq!((s.age_ms, s.idle_ms), (4_000, 1_000));
    let mut rx = SessionTable::default();
    rx.apply_peer_upsert(&s, Millis(100_000), None).unwrap();
    let r = rx.get(rx.lookup_forward(&s.key).unwrap()).unwrap();
    assert_eq!((r.created, r.last_seen()), (Millis(96_000), Millis(99_000)));
}

#[test]
fn reconcile_by_bulk_mark_keeps_marked_sessions() {
    let mut tx = SessionTable::default();
    let mut rx = SessionTable::default();
    let mut all = Vec::new();
    for i in 0..4 {
        let h = tx.insert(plain_session::<V6>(RG1, i, 1), now()).unwrap();
        all.push(tx.to_synced(h, now()).unwrap());
    }
    for s in &all {
        rx.apply_peer_upsert(s, now(), None).unwrap();
    }
    let mark = BulkMark(7);
    rx.apply_peer_upsert(&all[0], now(), Some(mark)).unwrap();
    assert!(rx.mark(&all[1].key, mark));
    let r = rx.reconcile_rg_marked(RG1, mark);
    assert_eq!((r.examined, r.deleted), (4, 2));
    assert!(rx.lookup_forward(&all[0].key).is_some());
    assert!(rx.lookup_forward(&all[1].key).is_some());
}

/// The bulk path (`apply_peer_upserts`: keys hashed once, loads started
/// ahead) must do exactly what applying each upsert in turn does,
/// including updates, replacements, repeats within one chunk and refusals.
#[test]
fn batch_upserts_equal_one_by_one_including_updates_and_refusals() {
    let mut tx = SessionTable::default();
    let mut batch = Vec::new();
    for i in 0..40 {
        let h = tx
            .insert(snat_session::<V4>(RG1, i, 1, 1024..=65535), now())
            .unwrap();
        batch.push(tx.to_synced(h, now()).unwrap());
    }
    // Updates (new counters), a repeat, and a replacement: same key, a
    // different reply path.
    for s in batch.clone().iter().take(10) {
        let mut u = s.clone();
        u.counters.fwd_packets += 5;
        batch.push(u);
    }
    batch.push(batch[3].clone());
    let mut moved = batch[4].clone();
    moved.reverse.dst_port = moved.reverse.dst_port.wrapping_add(1);
    batch.push(moved);
    // The receiver is primary for RG2 and owns a session of it with
    // batch[7]'s key: that upsert is refused (counted), the others still
    // apply.
    let setup = || {
        let mut rx = SessionTable::default();
        let mut own = snat_session::<V4>(RG2, 7, 1, 40000..=40000);
        own.key = batch[7].key;
        rx.insert(own, now()).unwrap();
        rx.promote_rg(RG2);
        rx
    };
    let mut one_by_one = setup();
    let mut expect = UpsertTally::default();
    for s in &batch {
        match one_by_one.apply_peer_upsert(s, now(), Some(BulkMark(3))) {
            Ok(_) => expect.applied += 1,
            Err(_) => expect.refused += 1,
        }
    }
    let mut batched = setup();
    let tally = batched.apply_peer_upserts(&batch, now(), Some(BulkMark(3)));
    assert_eq!(tally, expect);
    assert_eq!(
        tally.refused, 2,
        "the original and the repeated batch[7] update"
    );
    let rows = |t: &SessionTable| {
        let mut v: Vec<_> = t.iter().map(|(_, r)| r.clone()).collect();
        v.sort_by_key(|r| r.key);
        v
    };
    assert_eq!(rows(&batched), rows(&one_by_one));
    assert_eq!(batched.counters(), one_by_one.counters());
    ok(&batched);
}

#[test]
fn promote_and_demote_flip_only_that_rg() {
    let mut t = SessionTable::default();
    let mut tx = SessionTable::default();
    for (i, rg) in [(1, RG1), (2, RG1), (3, RG2)] {
        let h = tx.insert(plain_session::<V4>(rg, i, 1), now()).unwrap();
        t.apply_peer_upsert(&tx.to_synced(h, now()).unwrap(), now(), None)
            .unwrap();
    }
    assert_eq!(t.promote_rg(RG1), 2);
    assert!(t.is_primary(RG1));
    let origins: Vec<(RgId, Origin)> = t.iter().map(|(_, r)| (r.owner_rg, t.origin(r))).collect();
    assert!(
        origins
            .iter()
            .all(|&(rg, o)| (rg == RG1) == (o == Origin::LocalOwned))
    );
    assert_eq!(t.promote_rg(RG1), 0, "idempotent");
    assert_eq!(t.demote_rg(RG1), 2);
    assert!(t.iter().all(|(_, r)| t.origin(r) == Origin::PeerSynced));
}

#[test]
fn export_cursor_is_stable_while_sessions_are_removed() {
    let mut t = SessionTable::default();
    let hs: Vec<_> = (0..100)
        .map(|i| t.insert(plain_session::<V4>(RG1, i, 1), now()).unwrap())
        .collect();
    let mut cur = t.begin_export(RG1);
    let mut out = Vec::new();
    assert!(t.export_chunk(&mut cur, 10, now(), &mut out, |_| true));
    // Remove sessions already exported: the walk goes down the member list
    // and a swap-remove only moves the last member, so nothing unvisited
    // moves into the visited part.
    let exported: Vec<SessionKey> = out.iter().map(|s| s.key).collect();
    for k in &exported {
        let h = t.lookup_forward(k).unwrap();
        t.remove(h, RemoveReason::Closed);
    }
    assert_eq!(hs.len(), 100);
    ok(&t);
    while t.export_chunk(&mut cur, 7, now(), &mut out, |_| true) {}
    assert_eq!(
        out.len(),
        100,
        "every session present at the start is exported once"
    );
    let distinct: FxHashSet<SessionKey> = out.iter().map(|s| s.key).collect();
    assert_eq!(distinct.len(), 100);
    assert_eq!(t.rg_len(RG1), 90);
    ok(&t);
}

#[test]
fn export_rg_yields_only_that_rg() {
    let mut t = SessionTable::default();
    for i in 0..5 {
        t.insert(
            plain_session::<V4>(if i < 2 { RG1 } else { RG2 }, i, 1),
            now(),
        )
        .unwrap();
    }
    assert_eq!(t.export_rg(RG1).count(), 2);
    assert!(t.export_rg(RG2).all(|r| r.owner_rg == RG2));
    assert_eq!(t.rgs(), vec![RG1, RG2]);
}

#[test]
fn flush_empties_everything() {
    let mut t = SessionTable::default();
    for i in 0..20 {
        t.insert(snat_session::<V6>(RG1, i, 1, 1024..=65535), now())
            .unwrap();
    }
    assert_eq!(t.flush(), 20);
    assert_eq!(t.reserved_ports(), 0);
    assert!(t.rgs().is_empty());
    ok(&t);
}

#[derive(Clone, Debug)]
enum Op {
    InsertSnat {
        client: u8,
        port: u8,
        rg: u8,
        v6: bool,
    },
    InsertDnat {
        client: u8,
        port: u8,
        rg: u8,
        v6: bool,
    },
    Delete(u8),
    Touch(u8),
    Advance(u16),
    PeerUpsert {
        client: u8,
        port: u8,
        rg: u8,
        nat_port: u8,
    },
    PeerDelete {
        client: u8,
        port: u8,
    },
    Reconcile {
        rg: u8,
        keep_mod: u8,
    },
    Promote(u8),
    Demote(u8),
    ExportWalk {
        rg: u8,
        remove_during: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (any::<u8>(), 0u8..8, 1u8..4, any::<bool>()).prop_map(|(client, port, rg, v6)| {
            Op::InsertSnat {
                client,
                port,
                rg,
                v6,
            }
        }),
        (any::<u8>(), 0u8..8, 1u8..4, any::<bool>()).prop_map(|(client, port, rg, v6)| {
            Op::InsertDnat {
                client,
                port,
                rg,
                v6,
            }
        }),
        any::<u8>().prop_map(Op::Delete),
        any::<u8>().prop_map(Op::Touch),
        (0u16..5000).prop_map(Op::Advance),
        (any::<u8>(), 0u8..8, 1u8..4, 0u8..16).prop_map(|(client, port, rg, nat_port)| {
            Op::PeerUpsert {
                client,
                port,
                rg,
                nat_port,
            }
        }),
        (any::<u8>(), 0u8..8).prop_map(|(client, port)| Op::PeerDelete { client, port }),
        (1u8..4, 1u8..4).prop_map(|(rg, keep_mod)| Op::Reconcile { rg, keep_mod }),
        (1u8..4).prop_map(Op::Promote),
        (1u8..4).prop_map(Op::Demote),
        (1u8..4, any::<u8>()).prop_map(|(rg, remove_during)| Op::ExportWalk { rg, remove_during }),
    ]
}

fn nth_handle(t: &SessionTable, n: u8) -> Option<SessionHandle> {
    let len = t.len();
    (len > 0)
        .then(|| t.iter().nth(usize::from(n) % len).map(|(h, _)| h))
        .flatten()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Random insert/delete/expire/reconcile/sync sequences never leave an
    /// orphan index entry, a leaked port or a session without companions.
    #[test]
    fn random_operations_never_leave_orphan_index_entries(ops in proptest::collection::vec(op(), 1..120)) {
        let mut t = SessionTable::new(TableConfig {
            capacity: 64,
            timeouts: Timeouts { tcp_opening_ms: 3_000, ..Timeouts::default() },
            wheel_tick_ms: 100,
            wheel_buckets: 16,
            // Early drop from 57 sessions on, and address counts checked by
            // `verify_invariants` after every operation.
            watermarks: Watermarks::default(),
            address_counts: true,
            preallocate: false,
        });
        let mut clock = now();
        for op in ops {
            match op {
                Op::InsertSnat { client, port, rg, v6 } => {
                    let s = if v6 {
                        snat_session::<V6>(RgId(rg.into()), client.into(), port.into(), 100..=103)
                    } else {
                        snat_session::<V4>(RgId(rg.into()), client.into(), port.into(), 100..=103)
                    };
                    let _ = t.insert(s, clock);
                }
                Op::InsertDnat { client, port, rg, v6 } => {
                    let s = if v6 {
                        dnat_session::<V6>(RgId(rg.into()), client.into(), port.into())
                    } else {
                        dnat_session::<V4>(RgId(rg.into()), client.into(), port.into())
                    };
                    let _ = t.insert(s, clock);
                }
                Op::Delete(n) => {
                    if let Some(h) = nth_handle(&t, n) {
                        prop_assert!(t.remove(h, RemoveReason::Closed).is_some());
                    }
                }
                Op::Touch(n) => {
                    if let Some(h) = nth_handle(&t, n) {
                        t.touch(h, Direction::Forward, 60, clock);
                    }
                }
                Op::Advance(ms) => {
                    clock = Millis(clock.0 + u64::from(ms));
                    t.expire(clock, |_| {});
                }
                Op::PeerUpsert { client, port, rg, nat_port } => {
                    let k = key::<V4>(client.into(), port.into(), 1, 443);
                    let s = SyncedSession {
                        key: k,
                        reverse: reverse_key(&k, UNTRUST, Nat { snat: Some((V4::nat_addr(), 100 + u16::from(nat_port))), dnat: None }),
                        owner_rg: RgId(rg.into()),
                        ingress_if: InterfaceId(1),
                        egress_if: InterfaceId(2),
                        policy: PolicyId(1),
                        tcp_state: TcpState::Established,
                        timeout_ms: 2_000,
                        age_ms: 10,
                        idle_ms: 5,
                        counters: FlowCounters::default(),
                        seq_shift: (port % 3 == 0).then_some(u32::from(port) * 7919),
                    };
                    let _ = t.apply_peer_upsert(&s, clock, None);
                }
                Op::PeerDelete { client, port } => {
                    let _ = t.apply_peer_delete(&key::<V4>(client.into(), port.into(), 1, 443));
                }
                Op::Reconcile { rg, keep_mod } => {
                    let r = t.reconcile_rg(RgId(rg.into()), |r| r.key.src_port % u16::from(keep_mod) == 0);
                    prop_assert!(r.deleted <= r.examined);
                }
                Op::Promote(rg) => { t.promote_rg(RgId(rg.into())); }
                Op::Demote(rg) => { t.demote_rg(RgId(rg.into())); }
                Op::ExportWalk { rg, remove_during } => {
                    let rg = RgId(rg.into());
                    let before = t.rg_len(rg);
                    let present: Vec<SessionKey> = t.export_rg(rg).map(|r| r.key).collect();
                    let mut cur = t.begin_export(rg);
                    let mut out = Vec::new();
                    let mut more = t.export_chunk(&mut cur, 3, clock, &mut out, |_| true);
                    if let Some(h) = nth_handle(&t, remove_during) {
                        t.remove(h, RemoveReason::Closed);
                    }
                    prop_assert!(t.verify_invariants().is_ok());
                    while more {
                        more = t.export_chunk(&mut cur, 3, clock, &mut out, |_| true);
                    }
                    prop_assert!(out.len() >= before.saturating_sub(1) && out.len() <= before);
                    let exported: FxHashSet<SessionKey> = out.iter().map(|s| s.key).collect();
                    for k in present.iter().filter(|k| t.lookup_forward(k).is_some()) {
                        prop_assert!(exported.contains(k), "a session present for the whole walk was skipped");
                    }
                }
            }
            if let Err(e) = t.verify_invariants() {
                return Err(TestCaseError::fail(e));
            }
        }
        // Every local session eventually expires; only peer-synced copies
        // (removed by their owner's deletes or a reconcile) remain.
        t.expire(Millis(clock.0 + 10_000_000), |_| {});
        prop_assert!(t.iter().all(|(_, r)| t.origin(r) == Origin::PeerSynced));
        for rg in t.rgs() {
            t.reconcile_rg(rg, |_| false);
        }
        prop_assert_eq!(t.len(), 0);
        prop_assert_eq!(t.reserved_ports(), 0);
        prop_assert!(t.verify_invariants().is_ok());
    }
}

#[test]
fn local_snat_never_takes_a_port_reserved_by_a_peer_synced_session() {
    // The peer is primary for RG1 and source-NATed client 1 to port 3000;
    // this node, primary for another RG, then NATs client 2 whose own port
    // is 3000 to the same address: it must get another port, or the
    // replies of one would reach the other after the next failover.
    let mut tx = SessionTable::default();
    let a = tx
        .insert(snat_session::<V4>(RG1, 1, 3000, 1024..=65535), now())
        .unwrap();
    let mut rx = SessionTable::default();
    rx.apply_peer_upsert(&tx.to_synced(a, now()).unwrap(), now(), None)
        .unwrap();
    rx.promote_rg(RG2);
    let b = rx
        .insert(snat_session::<V4>(RG2, 2, 3000, 1024..=65535), now())
        .unwrap();
    let nat = rx.get(b).unwrap().nat().snat.unwrap();
    assert_eq!(nat.0, V4::nat_addr());
    assert_ne!(nat.1, 3000, "3000 is the peer's mapping");
    assert_eq!(rx.reserved_ports(), 2);
    // With 3000 the only port of the range, the local session is refused.
    assert_eq!(
        rx.insert(snat_session::<V4>(RG2, 3, 3000, 3000..=3000), now()),
        Err(InsertError::PortsExhausted)
    );
    ok(&rx);
}

fn snat_port(t: &SessionTable, h: SessionHandle) -> u16 {
    t.get(h).unwrap().nat().snat.unwrap().1
}

fn to_server<F: Family>(client: u32, sport: u16, server: u32) -> NewSession {
    NewSession {
        key: key::<F>(client, sport, server, 443),
        ..snat_session::<F>(RG1, client, sport, 1024..=65535)
    }
}

mod mapping {
    use super::*;

    pub fn one_endpoint_keeps_its_public_port_for_every_destination<F: Family>() {
        let mut t = SessionTable::default();
        let first: Vec<u16> = (1..=3)
            .map(|server| {
                let h = t_insert(&mut t, to_server::<F>(1, 40000, server));
                snat_port(&t, h)
            })
            .collect();
        assert_eq!(first, vec![40000; 3], "port preserved, then reused");
        // Another host with the same source port is remapped once ...
        let other = t_insert(&mut t, to_server::<F>(2, 40000, 1));
        let remapped = snat_port(&t, other);
        assert_ne!(remapped, 40000);
        // ... and keeps its remapped port for its other destinations.
        let again = t_insert(&mut t, to_server::<F>(2, 40000, 9));
        assert_eq!(snat_port(&t, again), remapped);
        let b = |port| NatBinding {
            addr: F::nat_addr(),
            port,
            proto: proto::TCP,
        };
        let m = t.nat_mapping(&b(40000)).unwrap();
        assert_eq!(
            (m.internal.addr, m.internal.port, t.mapping_len(&b(40000))),
            (F::host(1), 40000, 3)
        );
        assert_eq!(t.mapping_len(&b(remapped)), 2);
        assert_eq!(t.reserved_ports(), 2);
        ok(&t);
    }

    pub fn mapping_lives_until_its_last_session_leaves<F: Family>() {
        let mut t = SessionTable::default();
        let hs: Vec<SessionHandle> = (1..=3)
            .map(|server| t_insert(&mut t, to_server::<F>(1, 5000, server)))
            .collect();
        let b = NatBinding {
            addr: F::nat_addr(),
            port: 5000,
            proto: proto::TCP,
        };
        let m = t.nat_mapping(&b).unwrap();
        let newest_first: Vec<SessionHandle> = t.mapping_sessions(&m).collect();
        assert_eq!(newest_first, vec![hs[2], hs[1], hs[0]]);
        for (i, h) in hs.iter().enumerate() {
            assert_eq!(t.mapping_len(&b), 3 - i);
            t.remove(*h, RemoveReason::Closed).unwrap();
            ok(&t);
        }
        assert_eq!(t.nat_mapping(&b), None);
        assert_eq!(t.lookup_nat_binding(&b), None);
        assert_eq!(t.reserved_ports(), 0);
        // A new session of another host may now take the port.
        let h = t_insert(&mut t, to_server::<F>(7, 5000, 1));
        assert_eq!(snat_port(&t, h), 5000);
        ok(&t);
    }

    pub fn peer_sessions_of_one_endpoint_share_its_mapping_across_failover<F: Family>() {
        let mut tx = SessionTable::default();
        let mut rx = SessionTable::default();
        for server in 1..=2 {
            let h = t_insert(&mut tx, to_server::<F>(1, 6000, server));
            rx.apply_peer_upsert(&tx.to_synced(h, now()).unwrap(), now(), None)
                .unwrap();
        }
        let b = NatBinding {
            addr: F::nat_addr(),
            port: 6000,
            proto: proto::TCP,
        };
        assert_eq!(rx.mapping_len(&b), 2);
        assert_eq!(rx.reserved_ports(), 1);
        ok(&rx);
        // After the failover the new primary maps the endpoint's next
        // destination to the same public port.
        rx.promote_rg(RG1);
        let h = t_insert(&mut rx, to_server::<F>(1, 6000, 3));
        assert_eq!(snat_port(&rx, h), 6000);
        assert_eq!(rx.mapping_len(&b), 3);
        ok(&rx);
    }
}

fn t_insert(t: &mut SessionTable, s: NewSession) -> SessionHandle {
    t.insert(s, now()).expect("inserted")
}

macro_rules! mapping_tests {
    ($name:ident, $fam:ty) => {
        mod $name {
            use super::*;

            #[test]
            fn one_endpoint_keeps_its_public_port_for_every_destination() {
                mapping::one_endpoint_keeps_its_public_port_for_every_destination::<$fam>();
            }
            #[test]
            fn mapping_lives_until_its_last_session_leaves() {
                mapping::mapping_lives_until_its_last_session_leaves::<$fam>();
            }
            #[test]
            fn peer_sessions_of_one_endpoint_share_its_mapping_across_failover() {
                mapping::peer_sessions_of_one_endpoint_share_its_mapping_across_failover::<$fam>();
            }
        }
    };
}
mapping_tests!(mapping_v4, V4);
mapping_tests!(mapping_v6, V6);

#[test]
fn peer_upsert_evicts_every_stale_session_of_a_mapping_given_to_another_endpoint() {
    // Client 1's two sessions on port 3000 were deleted on the primary
    // (deletes lost), which then gave 3000 to client 2.
    let mut tx = SessionTable::default();
    let mut rx = SessionTable::default();
    let stale: Vec<SessionHandle> = (1..=2)
        .map(|server| {
            let h = t_insert(
                &mut tx,
                NewSession {
                    key: key::<V4>(1, 3000, server, 443),
                    ..snat_session::<V4>(RG1, 1, 3000, 3000..=3000)
                },
            );
            rx.apply_peer_upsert(&tx.to_synced(h, now()).unwrap(), now(), None)
                .unwrap();
            h
        })
        .collect();
    for h in stale {
        tx.remove(h, RemoveReason::Closed).unwrap();
    }
    let b = t_insert(&mut tx, snat_session::<V4>(RG1, 2, 3000, 3000..=3000));
    assert_eq!(
        rx.apply_peer_upsert(&tx.to_synced(b, now()).unwrap(), now(), None),
        Ok(PeerApply::Inserted)
    );
    assert_eq!(rx.len(), 1);
    assert_eq!(rx.counters().evicted_by_peer, 2);
    let b3000 = NatBinding {
        addr: V4::nat_addr(),
        port: 3000,
        proto: proto::TCP,
    };
    let m = rx.nat_mapping(&b3000).unwrap();
    assert_eq!((m.internal.addr, rx.mapping_len(&b3000)), (V4::host(2), 1));
    ok(&rx);
}

#[test]
fn peer_upsert_refuses_a_mapping_a_local_session_holds_for_another_endpoint() {
    // This node is primary for RG2 and maps client 1 to 3000; a peer
    // session of RG1 claiming 3000 for client 2 is refused, and nothing of
    // the local mapping changes.
    let mut rx = SessionTable::default();
    rx.promote_rg(RG2);
    t_insert(&mut rx, snat_session::<V4>(RG2, 1, 3000, 3000..=3000));
    let mut tx = SessionTable::default();
    let h = t_insert(
        &mut tx,
        NewSession {
            key: key::<V4>(2, 3000, 5, 443),
            ..snat_session::<V4>(RG1, 2, 3000, 3000..=3000)
        },
    );
    assert_eq!(
        rx.apply_peer_upsert(&tx.to_synced(h, now()).unwrap(), now(), None),
        Err(InsertError::NatBindingExists)
    );
    assert_eq!(rx.len(), 1);
    assert_eq!(rx.counters().refused_conflict, 1);
    ok(&rx);
}

#[test]
fn only_the_rgs_primary_logs_a_close_and_a_reconcile_logs_its_own() {
    use crate::events::{CloseReason, EventKind, session_id};
    let mut tx = SessionTable::default();
    let mut rx = SessionTable::default();
    rx.set_close_log(true);
    let synced: Vec<SyncedSession> = (0..3u32)
        .map(|i| {
            let h = t_insert(&mut tx, plain_session::<V4>(RG1, i, 30000 + i as u16));
            let s = tx.to_synced(h, now()).unwrap();
            rx.apply_peer_upsert(&s, now(), None).unwrap();
            s
        })
        .collect();
    let mut closes = Vec::new();
    // The primary's delete of its session: the primary logged the close.
    assert_eq!(rx.apply_peer_delete(&synced[0].key), Ok(true));
    rx.drain_closes(&mut closes);
    assert!(closes.is_empty(), "{closes:?}");
    // A bulk without session 1 removes it here: logged, as a reconcile.
    let seen: FxHashSet<SessionKey> = [synced[2].key].into_iter().collect();
    assert_eq!(rx.reconcile_rg_keys(RG1, &seen).deleted, 1);
    rx.drain_closes(&mut closes);
    assert_eq!(closes.len(), 1);
    assert_eq!(
        (closes[0].kind, closes[0].reason, closes[0].session_id),
        (
            EventKind::SessionClose,
            Some(CloseReason::Reconcile),
            session_id(&synced[1].key)
        )
    );
    // After a failover this node is the primary: session 2's expiry is
    // its close to log (with the id the old primary's create carried).
    closes.clear();
    rx.promote_rg(RG1);
    let late = Millis(now().0 + 3_600_000);
    assert_eq!(rx.expire(late, |_| {}), 1);
    rx.drain_closes(&mut closes);
    assert_eq!(closes.len(), 1);
    assert_eq!(closes[0].reason, Some(CloseReason::IdleTimeout));
    assert_eq!(closes[0].session_id, session_id(&synced[2].key));
    ok(&rx);
}

#[test]
fn a_full_close_log_drops_and_counts() {
    let mut t = SessionTable::default();
    t.set_close_log(true);
    t.promote_rg(RG1);
    let n = CLOSE_LOG + 5;
    let hs: Vec<SessionHandle> = (0..n as u32)
        .map(|i| {
            t_insert(
                &mut t,
                plain_session::<V4>(RG1, i, 1000 + (i % 60000) as u16),
            )
        })
        .collect();
    for h in hs {
        t.remove(h, RemoveReason::Closed).unwrap();
    }
    assert_eq!(t.counters().close_events_dropped, 5);
    let mut closes = Vec::new();
    t.drain_closes(&mut closes);
    assert_eq!(closes.len(), CLOSE_LOG);
}

/// Table pressure (watermarks, early drop, early ageing), address counts
/// and the SYN proxy's companion state.
mod pressure {
    use super::*;

    /// A primary table of 10 sessions: high watermark 8, low 5.
    fn table() -> SessionTable {
        let mut t = SessionTable::new(TableConfig {
            capacity: 10,
            watermarks: Watermarks {
                high_pct: 80,
                low_pct: 50,
                early_ageout_ms: 5_000,
            },
            address_counts: true,
            ..TableConfig::default()
        });
        t.promote_rg(RG1);
        t
    }

    fn established(t: &mut SessionTable, client: u32, at: Millis) -> SessionHandle {
        let h = t
            .insert(
                NewSession {
                    tcp_state: TcpState::Established,
                    ..plain_session::<V4>(RG1, client, 1000)
                },
                at,
            )
            .unwrap();
        assert!(t.get(h).unwrap().is_replicated());
        h
    }

    fn half_open(t: &mut SessionTable, client: u32, at: Millis) -> SessionHandle {
        let h = t
            .insert(plain_session::<V4>(RG1, client, 2000), at)
            .unwrap();
        assert!(!t.get(h).unwrap().is_replicated());
        h
    }

    #[test]
    fn above_the_high_watermark_a_new_session_evicts_the_oldest_unestablished_one() {
        let mut t = table();
        for c in 0..4 {
            established(&mut t, c, now());
        }
        for c in 0..4 {
            half_open(&mut t, 100 + c, Millis(now().0 + u64::from(c)));
        }
        assert_eq!(t.len(), 8);
        assert!(t.under_pressure());
        half_open(&mut t, 200, Millis(now().0 + 10));
        assert_eq!(t.len(), 8, "one out, one in");
        let gone = key::<V4>(100, 2000, 1, 443);
        assert!(
            t.lookup_forward(&gone).is_none(),
            "the oldest half-open went"
        );
        assert!(t.lookup_forward(&key::<V4>(101, 2000, 1, 443)).is_some());
        assert_eq!(t.counters().early_dropped, 1);
        assert_eq!(t.counters().removed(RemoveReason::EarlyDropped), 1);
        for c in 0..4 {
            assert!(t.lookup_forward(&key::<V4>(c, 1000, 1, 443)).is_some());
        }
        ok(&t);
    }

    #[test]
    fn established_sessions_are_never_early_dropped_and_the_capacity_still_holds() {
        let mut t = table();
        for c in 0..10 {
            established(&mut t, c, now());
        }
        assert_eq!(
            t.insert(plain_session::<V4>(RG1, 99, 1), now()),
            Err(InsertError::Capacity)
        );
        assert_eq!(t.counters().early_dropped, 0);
        assert_eq!(t.len(), 10);
        ok(&t);
    }

    #[test]
    fn peer_copies_are_not_early_dropped_here() {
        let mut t = table();
        t.demote_rg(RG1);
        for c in 0..8 {
            half_open(&mut t, c, now());
        }
        half_open(&mut t, 50, now());
        assert_eq!(t.len(), 9, "nothing of the peer's RG evicted");
        assert_eq!(t.counters().early_dropped, 0);
    }

    #[test]
    fn pressure_starts_at_the_high_watermark_and_ends_only_at_the_low_one() {
        let mut t = table();
        let hs: Vec<_> = (0..8).map(|c| established(&mut t, c, now())).collect();
        assert!(t.under_pressure());
        assert_eq!(t.counters().pressure_entered, 1);
        for h in &hs[..2] {
            t.remove(*h, RemoveReason::Closed);
        }
        assert_eq!(t.len(), 6);
        assert!(t.under_pressure(), "6 is above the low watermark");
        t.remove(hs[2], RemoveReason::Closed);
        assert!(!t.under_pressure(), "5: back at the low watermark");
        assert_eq!(t.counters().pressure_left, 1);
        assert_eq!(t.watermark_sessions(), (8, 5));
    }

    #[test]
    fn early_ageing_expires_idle_sessions_only_under_pressure() {
        let mut t = table();
        // Idle 6 s at `later`: past the 5 s early ageout, far from their own
        // 30 min timeout.
        for c in 0..4 {
            established(&mut t, c, now());
        }
        let later = Millis(now().0 + 6_000);
        let mut gone = Vec::new();
        let s = t.early_age_slice(later, 100, |r| gone.push(r.key));
        assert_eq!((s.expired, gone.len()), (0, 0), "no pressure: nothing");
        for c in 4..8 {
            established(&mut t, c, later);
        }
        assert!(t.under_pressure());
        let s = t.early_age_slice(later, 100, |r| gone.push(r.key));
        // Idle ones go until the table is back at its low watermark (5):
        // three of the four.
        assert_eq!(s.expired, 3);
        assert!(!t.under_pressure());
        assert_eq!(t.counters().early_aged, 3);
        assert!(gone.iter().all(|k| k.src_port == 1000));
        assert_eq!(t.len(), 5);
        ok(&t);
    }

    #[test]
    fn address_counts_follow_every_way_in_and_out() {
        let mut t = table();
        let a = half_open(&mut t, 1, now());
        established(&mut t, 1, now());
        let src = key::<V4>(1, 0, 1, 443).src;
        let dst = key::<V4>(1, 0, 1, 443).dst;
        assert_eq!(t.address_counts(&src, &dst), Some((2, 2)));
        t.remove(a, RemoveReason::Closed);
        assert_eq!(t.address_counts(&src, &dst), Some((1, 1)));
        // A peer session counts too, and leaves with its delete.
        let mut peer = small_table(10);
        peer.promote_rg(RG2);
        let h = peer
            .insert(
                NewSession {
                    tcp_state: TcpState::Established,
                    ..plain_session::<V4>(RG2, 1, 3000)
                },
                now(),
            )
            .unwrap();
        let s = peer.to_synced(h, now()).unwrap();
        t.apply_peer_upsert(&s, now(), None).unwrap();
        assert_eq!(t.address_counts(&src, &dst), Some((2, 2)));
        t.apply_peer_delete(&s.key).unwrap();
        assert_eq!(t.address_counts(&src, &dst), Some((1, 1)));
        ok(&t);
        assert_eq!(small_table(4).address_counts(&src, &dst), None);
    }

    #[test]
    fn a_proxy_shift_is_synced_and_leaves_with_its_session() {
        let mut t = table();
        let h = established(&mut t, 1, now());
        t.set_proxy(h, Proxy::Shift(12345));
        let s = t.to_synced(h, now()).unwrap();
        assert_eq!(s.seq_shift, Some(12345));
        assert_eq!(
            t.export_synced(RG1, now()).next().unwrap().seq_shift,
            Some(12345)
        );
        let mut peer = small_table(10);
        peer.apply_peer_upsert(&s, now(), None).unwrap();
        let ph = peer.lookup_forward(&s.key).unwrap();
        assert_eq!(peer.proxy(ph), Some(Proxy::Shift(12345)));
        // An update without the shift clears it.
        peer.apply_peer_upsert(
            &SyncedSession {
                seq_shift: None,
                ..s.clone()
            },
            now(),
            None,
        )
        .unwrap();
        assert_eq!(peer.proxy(ph), None);
        ok(&peer);
        t.remove(h, RemoveReason::Closed);
        ok(&t);
        let h2 = established(&mut t, 2, now());
        assert_eq!(t.proxy(h2), None, "a reused slot has no stale shift");
    }
}
