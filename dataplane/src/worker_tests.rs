//! The worker's burst rules: one lookup and its use under one borrow,
//! shared access for established traffic, exclusive access in order from
//! the first frame that needs it, shared neighbors, sliced expiry.

use super::*;
use crate::config::Compiled;
use crate::core::DropReason;
use crate::delta::{Delta, DeltaConsumer, delta_queues};
use crate::frames::{L4, build};
use crate::packet::{self, ETH_HLEN};
use crate::session::{
    FlowCounters, NewSession, PolicyId, RemoveReason, SessionHandle, SnatRequest, SyncedSession,
    TableConfig, TcpState, ZoneId, lock, read, reverse_key,
};
use crate::testbed::sample_config;
use proptest::prelude::*;
use rustc_hash::{FxHashMap, FxHashSet};
use std::cell::RefCell;
use std::net::Ipv4Addr;
use tandem_proto::{Epoch, RgRole};

const RG1: RgId = RgId(1);
const T: InterfaceId = InterfaceId(0);
const U: InterfaceId = InterfaceId(1);
const VMAC_T: Mac = [0x02, 0, 0x5e, 0, 1, 1];
const VMAC_U: Mac = [0x02, 0, 0x5e, 0, 1, 2];
const CLIENT_MAC: Mac = [0xcc, 0, 0, 0, 0, 1];
const SERVER_MAC: Mac = [0x55, 0, 0, 0, 0, 1];
const NOW: Millis = Millis(10_000);

fn v4(s: &str) -> Addr {
    s.parse::<Ipv4Addr>().unwrap().into()
}

/// A node primary for RG1 with the sample config (trust -> untrust
/// source-NATed to 192.0.2.1), static neighbors.
fn node() -> (Arc<Shared>, Vec<DeltaConsumer>) {
    let mut compiled = Compiled::new(&sample_config()).unwrap();
    compiled.ifaces[0].mac = [0xaa, 0, 0, 0, 0, 1];
    compiled.ifaces[1].mac = [0xaa, 0, 0, 0, 0, 2];
    let table = session::shared(SessionTable::new(TableConfig::default()));
    lock(&table).promote_rg(RG1);
    let roles = Arc::new(ArcSwap::from_pointee(RoleMap::from([(
        RG1,
        RgRole {
            primary: true,
            epoch: Epoch(2),
        },
    )])));
    let (deltas, consumers) = delta_queues(&[RG1, RgId(2)], 1 << 16);
    let shared = Arc::new(Shared::new(Arc::new(compiled), table, roles, deltas));
    shared.neighbors.insert(T, v4("10.1.0.10"), CLIENT_MAC);
    shared.neighbors.insert(U, v4("192.0.2.100"), SERVER_MAC);
    (shared, consumers)
}

fn tcp(flags: u8, sport: u16, dport: u16) -> L4 {
    L4::tcp(flags, sport, dport, b"x")
}

/// A frame of flow `port` (client 10.1.0.10:port -> server :443) from the
/// client.
fn from_client(port: u16, flags: u8) -> Vec<u8> {
    build(
        VMAC_T,
        CLIENT_MAC,
        v4("10.1.0.10"),
        v4("192.0.2.100"),
        64,
        &tcp(flags, port, 443),
    )
}

/// A reply of that flow from the server to the NAT address and `nat_port`.
fn from_server(nat_port: u16, flags: u8) -> Vec<u8> {
    build(
        VMAC_U,
        SERVER_MAC,
        v4("192.0.2.100"),
        v4("192.0.2.1"),
        64,
        &tcp(flags, 443, nat_port),
    )
}

/// A session of another client (10.1.0.20) that a writer creates.
fn intruder(port: u16) -> NewSession {
    NewSession {
        key: SessionKey::new(
            Ipv4Addr::new(10, 1, 0, 20),
            port,
            Ipv4Addr::new(192, 0, 2, 100),
            443,
            6,
            ZoneId(1),
        ),
        egress_zone: ZoneId(2),
        snat: Some(SnatRequest {
            addr: v4("192.0.2.1"),
            ports: 1024..=65535,
        }),
        dnat: None,
        ingress_if: T,
        egress_if: U,
        owner_rg: RG1,
        policy: PolicyId(1),
        tcp_state: TcpState::Established,
    }
}

fn ip_ports(f: &[u8]) -> (Addr, u16, Addr, u16) {
    let ip = packet::parse_ipv4(f, ETH_HLEN).unwrap();
    let (sp, dp) = packet::ports(f, &ip).unwrap();
    (Addr(ip.src), sp, Addr(ip.dst), dp)
}

fn client_key(port: u16) -> SessionKey {
    SessionKey::new(
        Ipv4Addr::new(10, 1, 0, 10),
        port,
        Ipv4Addr::new(192, 0, 2, 100),
        443,
        6,
        ZoneId(1),
    )
}

/// A table lock that runs `on_write` every time a worker takes the write
/// lock — between its release of the read lock and its re-run of the frame
/// that needed it: the one window in which anything else can change the
/// table during a burst.
struct Interleaved<'a> {
    table: &'a SharedTable,
    on_write: RefCell<Writer<'a>>,
}

type Writer<'a> = Box<dyn FnMut(&mut SessionTable) + 'a>;

impl TableLock for Interleaved<'_> {
    fn read(&self) -> impl Deref<Target = SessionTable> + '_ {
        read(self.table)
    }

    fn write(&self) -> impl DerefMut<Target = SessionTable> + '_ {
        let mut g = lock(self.table);
        (self.on_write.borrow_mut())(&mut g);
        g
    }
}

fn frames(v: Vec<Vec<u8>>) -> Vec<(Vec<u8>, Arrival)> {
    v.into_iter().map(|f| (f, Arrival::Wire(T))).collect()
}

#[test]
fn peer_delete_between_lookup_and_use_never_panics_or_reads_another_session() {
    let (shared, _c) = node();
    let mut w = Worker::new(shared.clone());
    // Flow A is established (SNAT keeps its port 40000).
    assert!(matches!(
        w.process(
            &mut from_client(40000, packet::TCP_SYN),
            Arrival::Wire(T),
            NOW
        ),
        Verdict::Tx { .. }
    ));
    let a = read(&shared.table)
        .lookup_forward(&client_key(40000))
        .unwrap();
    // The server's SYN-ACK needs the write lock (a state change). While the worker
    // waits for it, A is deleted (a peer delete, a reconcile, expiry) and
    // its slot reused by another client's session with another NAT port.
    let reused = RefCell::new(None::<SessionHandle>);
    let hook = Interleaved {
        table: &shared.table,
        on_write: RefCell::new(Box::new(|t: &mut SessionTable| {
            if reused.borrow().is_some() {
                return;
            }
            t.remove(a, RemoveReason::PeerDelete).expect("A was live");
            let mut b = intruder(40001);
            b.snat.as_mut().unwrap().ports = 50000..=50000;
            *reused.borrow_mut() = Some(t.insert(b, NOW).expect("B fits"));
        })),
    };
    let mut burst = [
        (
            from_server(40000, packet::TCP_SYN | packet::TCP_ACK),
            Arrival::Wire(U),
        ),
        (from_client(40000, packet::TCP_ACK), Arrival::Wire(T)),
    ];
    let mut verdicts = Vec::new();
    w.burst_with(&hook, &mut burst[..], NOW, &mut verdicts);
    assert_eq!(*reused.borrow(), Some(a), "B took A's slot");
    assert_eq!(
        verdicts,
        vec![
            // A reply to A's NAT port belongs to no session now: it is
            // traffic to the VIP itself.
            Verdict::Drop(DropReason::LocalDelivery),
            Verdict::Drop(DropReason::NoSession),
        ],
        "A's frames never use B's record"
    );
    let t = read(&shared.table);
    let b = t.get(a).unwrap();
    assert_eq!(b.key.src, v4("10.1.0.20"));
    assert_eq!(b.counters(), FlowCounters::default(), "B was not touched");
    assert_eq!(b.tcp_state, TcpState::Established, "B's state unchanged");
    t.verify_invariants().unwrap();
}

#[test]
fn established_bursts_forward_under_the_shared_lock_only() {
    let (shared, _c) = node();
    let mut w = Worker::new(shared.clone());
    let syns: Vec<_> = (0..8)
        .map(|i| from_client(41000 + i, packet::TCP_SYN))
        .collect();
    let mut verdicts = Vec::new();
    w.burst(&mut frames(syns)[..], NOW, &mut verdicts);
    assert!(verdicts.iter().all(|v| matches!(v, Verdict::Tx { .. })));
    let before = w.stats().exclusive_bursts.load(Ordering::Relaxed);
    assert_eq!(before, 1, "one upgrade for a burst of first packets");
    // Data of established flows: no state change, no write lock. A reader
    // holding the table meanwhile does not block the burst.
    let held = read(&shared.table);
    let data: Vec<_> = (0..8)
        .map(|i| from_client(41000 + i, packet::TCP_ACK))
        .collect();
    w.burst(&mut frames(data)[..], NOW, &mut verdicts);
    drop(held);
    assert!(verdicts.iter().all(|v| matches!(v, Verdict::Tx { .. })));
    assert_eq!(w.stats().exclusive_bursts.load(Ordering::Relaxed), before);
    let t = read(&shared.table);
    let r = t
        .get(t.lookup_forward(&client_key(41003)).unwrap())
        .unwrap();
    assert_eq!(
        r.counters().fwd_packets,
        2,
        "touched through the shared lock"
    );
}

#[test]
fn a_session_one_frame_creates_is_seen_by_the_next_frame_of_the_burst() {
    let (shared, mut c) = node();
    let mut w = Worker::new(shared.clone());
    let udp = |sport| {
        build(
            VMAC_T,
            CLIENT_MAC,
            v4("10.1.0.10"),
            v4("192.0.2.100"),
            64,
            &L4::Udp {
                sport,
                dport: 53,
                payload: vec![1; 10],
            },
        )
    };
    let mut burst = frames(vec![udp(5000), udp(5000), udp(5001), udp(5000)]);
    let mut verdicts = Vec::new();
    w.burst(&mut burst[..], NOW, &mut verdicts);
    assert!(verdicts.iter().all(|v| matches!(v, Verdict::Tx { .. })));
    assert_eq!(w.stats().sessions_created.load(Ordering::Relaxed), 2);
    assert_eq!(read(&shared.table).len(), 2);
    let mut keys = Vec::new();
    c[0].try_recv_many(&mut keys, 10);
    assert_eq!(
        keys.len(),
        2,
        "one delta per created session, after the burst"
    );
}

#[test]
fn neighbors_one_worker_learns_serve_every_worker() {
    let (shared, _c) = node();
    let mut a = Worker::new(shared.clone());
    let mut b = Worker::new(shared.clone());
    // An ARP reply from a new host on the untrust side reaches worker a.
    let mac: Mac = [0x55, 0, 0, 0, 0, 9];
    let mut reply = crate::core::build_arp(2, mac, VMAC_U, &v4("192.0.2.9"), &v4("192.0.2.1"));
    let _ = a.process(&mut reply, Arrival::Wire(U), NOW);
    assert_eq!(shared.neighbors.get(U, v4("192.0.2.9")), Some(mac));
    // Worker b forwards to it without asking.
    let mut syn = build(
        VMAC_T,
        CLIENT_MAC,
        v4("10.1.0.10"),
        v4("192.0.2.9"),
        64,
        &tcp(packet::TCP_SYN, 42000, 22),
    );
    assert!(matches!(
        b.process(&mut syn, Arrival::Wire(T), NOW),
        Verdict::Tx { iface: U, .. }
    ));
    assert_eq!(packet::mac_at(&syn, 0).unwrap(), mac);
    assert!(b.outbox().is_empty(), "no ARP request");
}

#[test]
fn neighbor_map_is_bounded_and_counts_refusals() {
    let n = Neighbors::default();
    let learned: Vec<_> = (0..NEIGHBOR_LIMIT as u32 + 10)
        .map(|i| {
            (
                (U, Addr::v4(Ipv4Addr::from(0x0a00_0000 + i))),
                [2, 0, 0, 0, 0, 1],
            )
        })
        .collect();
    n.learn(&learned);
    assert_eq!(n.len(), NEIGHBOR_LIMIT);
    assert_eq!(n.refused.load(Ordering::Relaxed), 10);
    // A known neighbor's new MAC is still taken.
    n.learn(&[(learned[0].0, [2, 0, 0, 0, 0, 2])]);
    assert_eq!(n.get(U, (learned[0].0).1), Some([2, 0, 0, 0, 0, 2]));
}

#[test]
fn expiry_in_slices_emits_deletes_and_lets_workers_in_between() {
    let (shared, mut c) = node();
    let mut w = Worker::new(shared.clone());
    let mut verdicts = Vec::new();
    // UDP flows: synced from their first datagram.
    let flows: Vec<_> = (0..200)
        .map(|i| {
            build(
                VMAC_T,
                CLIENT_MAC,
                v4("10.1.0.10"),
                v4("192.0.2.100"),
                64,
                &L4::Udp {
                    sport: 43000 + i,
                    dport: 53,
                    payload: b"q".to_vec(),
                },
            )
        })
        .collect();
    w.burst(&mut frames(flows)[..], NOW, &mut verdicts);
    let mut keys = Vec::new();
    c[0].try_recv_many(&mut keys, 1000);
    assert_eq!(keys.len(), 200);
    {
        // The sender read the first 150; 50 close before it reads them.
        let t = read(&shared.table);
        for d in &keys[..150] {
            t.get(t.lookup_forward(&d.key).expect("live"))
                .expect("live")
                .mark_sent();
        }
    }
    let udp = read(&shared.table).config().timeouts.udp_ms as u64;
    assert_eq!(expire(&shared, Millis(NOW.0 + udp + 1000)), 200);
    let sent: Vec<_> = keys[..150].iter().map(|d| Delta::delete(d.key)).collect();
    keys.clear();
    c[0].try_recv_many(&mut keys, 1000);
    keys.sort_by_key(|d| d.key);
    let mut want = sent;
    want.sort_by_key(|d| d.key);
    assert_eq!(keys, want, "a delete per expired session the peer may hold");
    let t = read(&shared.table);
    assert!(t.is_empty());
    assert_eq!(t.counters().closed_before_sync, 50);
}

/// What a property run does between bursts or at a worker's upgrade.
#[derive(Clone, Debug)]
enum Step {
    /// Frames of flows (index, kind) through the worker.
    Burst(Vec<(u8, u8)>),
}

#[derive(Clone, Debug)]
enum Change {
    RemoveFlow(u8),
    Intrude(u16),
    PeerUpsertRg2(u16),
    RemoveAny(u8),
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        (0u8..16).prop_map(Change::RemoveFlow),
        (1024u16..1100).prop_map(Change::Intrude),
        (0u16..64).prop_map(Change::PeerUpsertRg2),
        any::<u8>().prop_map(Change::RemoveAny),
    ]
}

fn apply_change(t: &mut SessionTable, c: &Change) {
    match c {
        Change::RemoveFlow(i) => {
            if let Some(h) = t.lookup_forward(&client_key(44000 + u16::from(*i))) {
                t.remove(h, RemoveReason::Closed);
            }
        }
        Change::Intrude(p) => {
            // Another client's session, wanting the same NAT port range.
            let mut s = intruder(*p);
            s.snat.as_mut().unwrap().ports = 44000..=44031;
            let _ = t.insert(s, NOW);
        }
        Change::PeerUpsertRg2(i) => {
            let key = SessionKey::new(
                Ipv4Addr::new(10, 9, 0, 1),
                *i,
                Ipv4Addr::new(192, 0, 2, 100),
                443,
                6,
                ZoneId(1),
            );
            let s = SyncedSession {
                key,
                reverse: reverse_key(&key, ZoneId(2), crate::session::Nat::NONE),
                owner_rg: RgId(2),
                ingress_if: T,
                egress_if: U,
                policy: PolicyId(1),
                tcp_state: TcpState::Established,
                timeout_ms: 60_000,
                age_ms: 1,
                idle_ms: 1,
                counters: FlowCounters::default(),
                seq_shift: None,
            };
            let _ = t.apply_peer_upsert(&s, NOW, None);
        }
        Change::RemoveAny(n) => {
            let h = t
                .iter()
                .map(|(h, _)| h)
                .nth(usize::from(*n) % t.len().max(1));
            if let Some(h) = h {
                t.remove(h, RemoveReason::Reconciled);
            }
        }
    }
}

fn step() -> impl Strategy<Value = Step> {
    proptest::collection::vec((0u8..16, 0u8..5), 1..24).prop_map(Step::Burst)
}

proptest! {
    /// Bursts of SYN/data/FIN/RST/replies of 16 flows, with the table
    /// changed by other writers (deletes, slot reuse by other clients'
    /// sessions with other NAT ports, peer upserts) every time a worker
    /// waits for the write lock: no panic, every forwarded client frame
    /// carries a translation its own flow held, every forwarded reply goes
    /// to its own client port, and the table's invariants hold.
    #[test]
    fn bursts_interleaved_with_table_writers_use_only_their_own_sessions(
        steps in proptest::collection::vec(step(), 1..12),
        changes in proptest::collection::vec(change(), 1..40),
    ) {
        let (shared, _c) = node();
        let mut w = Worker::new(shared.clone());
        // Every (address, port) each flow key was ever translated to.
        let held: RefCell<FxHashMap<SessionKey, FxHashSet<(Addr, u16)>>> = RefCell::default();
        let record = |t: &SessionTable| {
            let mut h = held.borrow_mut();
            for (_, r) in t.iter() {
                if let Some(s) = r.nat().snat {
                    h.entry(r.key).or_default().insert(s);
                }
            }
        };
        let next = RefCell::new(0usize);
        let hook = Interleaved {
            table: &shared.table,
            on_write: RefCell::new(Box::new(|t: &mut SessionTable| {
                record(t);
                let mut i = next.borrow_mut();
                if let Some(c) = changes.get(*i) {
                    apply_change(t, c);
                    *i += 1;
                }
                record(t);
            })),
        };
        let mut verdicts = Vec::new();
        for Step::Burst(fs) in &steps {
            let mut burst: Vec<(Vec<u8>, Arrival)> = fs.iter().map(|&(flow, kind)| {
                let port = 44000 + u16::from(flow);
                match kind {
                    0 => (from_client(port, packet::TCP_SYN), Arrival::Wire(T)),
                    1 => (from_client(port, packet::TCP_ACK), Arrival::Wire(T)),
                    2 => (from_client(port, packet::TCP_FIN | packet::TCP_ACK), Arrival::Wire(T)),
                    3 => (from_client(port, packet::TCP_RST), Arrival::Wire(T)),
                    _ => (from_server(port, packet::TCP_ACK), Arrival::Wire(U)),
                }
            }).collect();
            let originals: Vec<Vec<u8>> = burst.iter().map(|(f, _)| f.clone()).collect();
            w.burst_with(&hook, &mut burst[..], NOW, &mut verdicts);
            record(&read(&shared.table));
            for ((v, (out, _)), orig) in verdicts.iter().zip(&burst).zip(&originals) {
                let Verdict::Tx { iface, len } = *v else { continue };
                let (osrc, osport, _, odport) = ip_ports(orig);
                let (src, sport, dst, dport) = ip_ports(&out[..len]);
                if iface == U {
                    let key = client_key(osport);
                    prop_assert_eq!(osrc, v4("10.1.0.10"));
                    let ok = held.borrow().get(&key).is_some_and(|s| s.contains(&(src, sport)));
                    prop_assert!(ok, "client flow {} sent as {:?}:{}, never its translation", osport, src, sport);
                } else {
                    // A reply: to the client of the session holding the
                    // NAT port it was sent to.
                    prop_assert_eq!(iface, T);
                    prop_assert!(dst == v4("10.1.0.10") || dst == v4("10.1.0.20"));
                    if dst == v4("10.1.0.10") {
                        let key = client_key(dport);
                        let ok = held.borrow().get(&key).is_some_and(|s| s.contains(&(v4("192.0.2.1"), odport)));
                        prop_assert!(ok, "reply to NAT port {} delivered to client port {}", odport, dport);
                    }
                }
            }
            prop_assert!(read(&shared.table).verify_invariants().is_ok());
        }
    }
}

fn roles_of(entries: &[(u16, bool, u64)]) -> Arc<RoleMap> {
    Arc::new(
        entries
            .iter()
            .map(|&(rg, primary, epoch)| {
                (
                    RgId(rg),
                    tandem_proto::RgRole {
                        primary,
                        epoch: tandem_proto::Epoch(epoch),
                    },
                )
            })
            .collect(),
    )
}

#[test]
fn a_promotion_is_announced_count_times_an_interval_apart() {
    let mut s = AnnounceSchedule::new(3, 1000);
    let primary = roles_of(&[(1, true, 2), (2, false, 1)]);
    assert_eq!(s.due(&primary, Millis(5_000)), vec![RgId(1)]);
    assert!(s.due(&primary, Millis(5_999)).is_empty());
    assert_eq!(s.due(&primary, Millis(6_000)), vec![RgId(1)]);
    assert_eq!(s.due(&primary, Millis(7_000)), vec![RgId(1)]);
    assert!(s.due(&primary, Millis(8_000)).is_empty(), "three in all");
    // The same role map again (a new Arc, same epoch): not a promotion.
    let same = roles_of(&[(1, true, 2), (2, false, 1)]);
    assert!(s.due(&same, Millis(9_000)).is_empty());
}

#[test]
fn a_demotion_cancels_the_remaining_announcements_and_a_new_epoch_restarts_them() {
    let mut s = AnnounceSchedule::new(4, 1000);
    assert_eq!(s.due(&roles_of(&[(1, true, 2)]), Millis(0)), vec![RgId(1)]);
    let demoted = roles_of(&[(1, false, 3)]);
    assert!(s.due(&demoted, Millis(1_000)).is_empty());
    assert!(s.due(&demoted, Millis(2_000)).is_empty());
    let back = roles_of(&[(1, true, 4)]);
    assert_eq!(s.due(&back, Millis(2_500)), vec![RgId(1)]);
    assert_eq!(s.due(&back, Millis(3_500)), vec![RgId(1)]);
}
