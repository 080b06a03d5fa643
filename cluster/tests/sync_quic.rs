//! Session sync between two real nodes on loopback: real UDP, real QUIC,
//! mutual TLS, real session tables.

use bytes::BytesMut;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tandem_cluster::sync::close;
use tandem_cluster::testkit::{IDLE_TIMEOUT, INTRUDER, NAMES, Pair, eventually, now, snat_session};
use tandem_cluster::{tls, wire};
use tandem_dataplane::session::{TableConfig, lock};
use tandem_proto::pb::{self, envelope::Msg};
use tandem_proto::{PROTOCOL_VERSION, RgId, encode_frame};

const RG1: RgId = RgId(1);
const RG2: RgId = RgId(2);
const WAIT: Duration = Duration::from_secs(60);

/// A session the primary no longer has: its own SNAT address, so it can
/// only leave the secondary through reconcile, never as a superseded
/// holder of a live session's binding.
fn stale_session(rg: RgId, i: u32) -> tandem_dataplane::session::NewSession {
    let mut s = snat_session(rg, i);
    s.snat.as_mut().unwrap().addr = std::net::Ipv4Addr::new(192, 0, 2, rg.0 as u8).into();
    s
}

fn pair() -> Pair {
    Pair::new(&[RG1, RG2], 1 << 17, TableConfig::default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_thousand_sessions_converge_exactly() {
    let mut p = pair();
    p.nodes[0].set_roles(&[(RG1, true, 1)]);
    p.nodes[1].set_roles(&[(RG1, false, 1)]);
    // 50k exist before the peer connects (bulk) ...
    for i in 0..50_000 {
        p.nodes[0].create(snat_session(RG1, i));
    }
    p.start(1);
    p.start(0);
    p.nodes[0].sync().wait_connected(true).await;
    // ... 50k more arrive as deltas, during and after the bulk, and 5k of
    // all of them close again.
    let mut keys = Vec::new();
    for i in 50_000..100_000 {
        keys.push(p.nodes[0].create(snat_session(RG1, i)));
        if i % 5000 == 0 {
            tokio::task::yield_now().await;
        }
    }
    for k in keys.iter().step_by(10) {
        p.nodes[0].close(k);
    }
    assert!(p.converged(RG1, WAIT).await, "tables did not converge");
    assert_eq!(lock(&p.nodes[1].table).rg_len(RG1), 95_000);
    lock(&p.nodes[1].table).verify_invariants().unwrap();
    let rx = p.nodes[1].sync().stats(RG1);
    assert_eq!(rx.bulks_received.load(Relaxed), 1);
    assert_eq!(rx.dropped_apply_refused.load(Relaxed), 0);
    let tx = p.nodes[0].sync().stats(RG1);
    assert!(
        eventually(WAIT, || tx.bulks_acked.load(Relaxed) == 1).await,
        "bulk acknowledged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_killed_mid_bulk_deletes_nothing_and_next_bulk_converges() {
    let mut p = pair();
    p.cfgs[0].bulk_chunk_sessions = 64;
    p.nodes[0].set_roles(&[(RG1, true, 1)]);
    p.nodes[1].set_roles(&[(RG1, false, 1)]);
    for i in 0..300_000 {
        p.nodes[0].create(snat_session(RG1, i));
    }
    // The secondary holds 100 stale copies the primary no longer has.
    {
        let mut stale_src = tandem_dataplane::session::SessionTable::default();
        stale_src.promote_rg(RG1);
        let mut t = lock(&p.nodes[1].table);
        for i in 900_000..900_100 {
            let h = stale_src
                .insert(stale_session(RG1, i), now(&p.nodes[1]))
                .unwrap();
            t.apply_peer_upsert(
                &stale_src.to_synced(h, now(&p.nodes[1])).unwrap(),
                now(&p.nodes[1]),
                None,
            )
            .unwrap();
        }
    }
    p.start(1);
    p.start(0);
    let rx = p.nodes[1].sync().stats(RG1);
    while rx.bulk_sessions_applied.load(Relaxed) < 2_000 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    p.nodes[1].sync().disconnect();
    p.nodes[1].sync().wait_connected(false).await;
    assert_eq!(rx.bulks_received.load(Relaxed), 0, "bulk was cut short");
    assert_eq!(rx.bulks_aborted.load(Relaxed), 1);
    assert_eq!(rx.reconcile_deleted.load(Relaxed), 0);
    {
        let t = lock(&p.nodes[1].table);
        let stale = (900_000..900_100)
            .filter(|&i| t.lookup_forward(&stale_session(RG1, i).key).is_some())
            .count();
        assert_eq!(stale, 100, "an interrupted bulk deletes nothing");
    }
    // node0 redials; the secondary is not in sync, so it gets a new bulk.
    assert!(p.converged(RG1, WAIT).await);
    assert_eq!(rx.bulks_received.load(Relaxed), 1);
    assert_eq!(rx.reconcile_deleted.load(Relaxed), 100);
    assert_eq!(lock(&p.nodes[1].table).rg_len(RG1), 300_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_dnat_companions_are_reconciled_only_in_their_rg() {
    let mut p = pair();
    // Active/active: node0 primary for RG1, node1 primary for RG2.
    p.nodes[0].set_roles(&[(RG1, true, 1), (RG2, false, 1)]);
    p.nodes[1].set_roles(&[(RG1, false, 1), (RG2, true, 1)]);
    for i in 0..1000 {
        p.nodes[0].create(snat_session(RG1, i));
        p.nodes[1].create(snat_session(RG2, 10_000 + i));
    }
    // Stale RG1 copies on node1 with their NAT bindings and ports.
    let mut stale = Vec::new();
    {
        let mut src = tandem_dataplane::session::SessionTable::default();
        src.promote_rg(RG1);
        let mut t = lock(&p.nodes[1].table);
        for i in 500_000..500_050 {
            let h = src.insert(stale_session(RG1, i), now(&p.nodes[1])).unwrap();
            let s = src.to_synced(h, now(&p.nodes[1])).unwrap();
            stale.push(src.get(h).unwrap().clone());
            t.apply_peer_upsert(&s, now(&p.nodes[1]), None).unwrap();
        }
    }
    let ports_before = lock(&p.nodes[1].table).reserved_ports();
    p.start(1);
    p.start(0);
    assert!(p.converged(RG1, WAIT).await);
    assert!(p.converged(RG2, WAIT).await);
    let t = lock(&p.nodes[1].table);
    for r in &stale {
        assert_eq!(t.lookup_forward(&r.key), None);
        assert_eq!(t.lookup_reverse(&r.reverse), None);
        assert_eq!(
            t.lookup_nat_binding(&r.snat_binding().unwrap()),
            None,
            "stale DNAT companion"
        );
    }
    assert_eq!(t.rg_len(RG2), 1000, "node1's own RG untouched");
    assert_eq!(t.reserved_ports(), ports_before - 50 + 1000);
    t.verify_invariants().unwrap();
    assert_eq!(
        p.nodes[1].sync().stats(RG1).reconcile_deleted.load(Relaxed),
        50
    );
    assert_eq!(
        p.nodes[0].sync().stats(RG2).reconcile_deleted.load(Relaxed),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_after_reconnect_loses_nothing() {
    let mut p = pair();
    p.nodes[0].set_roles(&[(RG1, true, 1)]);
    p.nodes[1].set_roles(&[(RG1, false, 1)]);
    p.start(1);
    p.start(0);
    p.nodes[0].sync().wait_connected(true).await;
    // The stream starts with a bulk; a cut before it completes would
    // rightly need another one.
    let secondary = p.nodes[1].sync().clone();
    assert!(eventually(WAIT, || secondary.rg_in_sync(RG1)).await);
    let mut next = 0;
    for round in 0..5 {
        for _ in 0..2000 {
            p.nodes[0].create(snat_session(RG1, next));
            next += 1;
        }
        // Cut the connection while deltas may be unacked or queued.
        p.nodes[1].sync().disconnect();
        for _ in 0..2000 {
            p.nodes[0].create(snat_session(RG1, next));
            next += 1;
        }
        p.nodes[0].sync().wait_connected(true).await;
        assert!(p.converged(RG1, WAIT).await, "round {round}");
    }
    assert_eq!(lock(&p.nodes[1].table).rg_len(RG1), 20_000);
    let tx = p.nodes[0].sync().stats(RG1);
    assert!(
        tx.replayed_batches.load(Relaxed) > 0,
        "the cuts left unacked batches to replay"
    );
    assert_eq!(
        tx.bulks_sent.load(Relaxed),
        1,
        "reconnects resumed by replay, not bulk"
    );
    assert_eq!(p.nodes[1].sync().stats(RG1).gaps.load(Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_overflow_is_repaired_by_bulk() {
    let mut p = Pair::new(&[RG1], 64, TableConfig::default());
    p.nodes[0].set_roles(&[(RG1, true, 1)]);
    p.nodes[1].set_roles(&[(RG1, false, 1)]);
    p.start(1);
    p.start(0);
    p.nodes[0].sync().wait_connected(true).await;
    // Far more changes than the 64-key queue holds, without yielding.
    let keys: Vec<_> = (0..5000)
        .map(|i| p.nodes[0].create(snat_session(RG1, i)))
        .collect();
    for k in keys.iter().step_by(3) {
        p.nodes[0].close(k);
    }
    assert!(p.converged(RG1, WAIT).await);
    assert!(
        p.nodes[0].sync().stats(RG1).bulks_sent.load(Relaxed) >= 2,
        "overflow forced a bulk"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_with_certificate_from_another_ca_is_refused() {
    let mut p = pair();
    p.start(1);
    let rogue = tls::generate_pki("rogue", &NAMES).unwrap();
    let id = tls::identity_from_generated(&rogue, "node0", "node1").unwrap();
    let client = tls::client_config(&id, IDLE_TIMEOUT).unwrap();
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    // The client cannot verify node1 either; either side refuses.
    let r = ep
        .connect_with(client, p.nodes[1].endpoint.local_addr().unwrap(), "node1")
        .unwrap()
        .await;
    assert!(r.is_err(), "handshake with another CA must fail");
    // Same CA as the client sees it (trusts the real CA), but its own
    // certificate is from the rogue CA: node1 refuses the client.
    let mut id = tls::identity_from_generated(&rogue, "node0", "node1").unwrap();
    id.ca = p.ids[0].ca.clone();
    let client = tls::client_config(&id, IDLE_TIMEOUT).unwrap();
    let conn = ep
        .connect_with(client, p.nodes[1].endpoint.local_addr().unwrap(), "node1")
        .unwrap()
        .await;
    if let Ok(c) = conn {
        // TLS 1.3: the client may finish before the server rejects it.
        let _ = tokio::time::timeout(Duration::from_secs(5), c.closed()).await;
    }
    // Both attempts fail on node1's side too, and both are counted.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while p.nodes[1].sync().conn_stats().handshakes_refused < 2
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(p.nodes[1].sync().conn_stats().handshakes_refused, 2);
    assert!(!p.nodes[1].sync().is_connected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_with_valid_certificate_for_another_name_is_refused() {
    let mut p = Pair::new(&[RG1], 16, TableConfig::default());
    p.start(1);
    // A certificate from the cluster CA, issued to a name node1 never pins.
    let id = tls::identity_from_generated(&p.pki, INTRUDER, "node1").unwrap();
    let client = tls::client_config(&id, IDLE_TIMEOUT).unwrap();
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = ep
        .connect_with(client, p.nodes[1].endpoint.local_addr().unwrap(), "node1")
        .unwrap()
        .await
        .unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .unwrap();
    assert!(format!("{reason}").contains("peer identity"), "{reason}");
    assert_eq!(p.nodes[1].sync().conn_stats().peer_name_rejected, 1);
    assert!(!p.nodes[1].sync().is_connected());
}

/// A client with node0's real certificate that speaks garbage.
async fn rogue_session(
    p: &Pair,
    control: &[u8],
    rg_stream: Option<&[u8]>,
) -> quinn::ConnectionError {
    let client = tls::client_config(&p.ids[0], IDLE_TIMEOUT).unwrap();
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = ep
        .connect_with(client, p.nodes[1].endpoint.local_addr().unwrap(), "node1")
        .unwrap()
        .await
        .unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(control).await.unwrap();
    if let Some(data) = rg_stream {
        let mut u = conn.open_uni().await.unwrap();
        let _ = u.write_all(data).await;
        let _ = u.finish();
    }
    tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .expect("node closes the connection")
}

fn frame(msg: Msg) -> Vec<u8> {
    let mut out = BytesMut::new();
    encode_frame(&pb::Envelope { msg: Some(msg) }, &mut out);
    out.to_vec()
}

fn hello() -> Vec<u8> {
    frame(Msg::Hello(pb::Hello {
        node_id: 0,
        cluster_id: 7,
        protocol_version: PROTOCOL_VERSION,
        rgs: vec![],
        incarnation: 1,
    }))
}

fn protocol_close(e: &quinn::ConnectionError) -> bool {
    matches!(e, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == quinn::VarInt::from_u32(close::PROTOCOL))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_close_the_connection_and_the_node_keeps_working() {
    let mut p = pair();
    p.nodes[0].set_roles(&[(RG1, true, 1)]);
    p.nodes[1].set_roles(&[(RG1, false, 1)]);
    p.start(1);
    let mut oversized = (2u32 << 20).to_be_bytes().to_vec();
    oversized.extend([0u8; 16]);
    let garbage = {
        let mut v = 8u32.to_be_bytes().to_vec();
        v.extend([0xffu8; 8]);
        v
    };
    let empty_envelope = frame(Msg::Ack(pb::Ack::default()))
        .into_iter()
        .take(4)
        .chain([])
        .collect::<Vec<u8>>();
    let bad_session = {
        // A well-formed IPv4 upsert record whose owner RG is 0 (control).
        let len = wire::record_len(wire::UPSERT_V4).unwrap();
        let mut records = vec![0u8; len];
        records[0] = wire::UPSERT_V4;
        frame(Msg::DeltaBatch(pb::DeltaBatch {
            rg: 1,
            epoch: 1,
            first_seq: 1,
            count: 1,
            records: records.into(),
        }))
    };
    let ack_on_rg_stream = frame(Msg::Ack(pb::Ack {
        rg: 1,
        epoch: 1,
        seq: 1,
    }));
    // (case, control stream bytes, RG stream bytes)
    type Case<'a> = (&'a str, Vec<u8>, Option<Vec<u8>>);
    let cases: Vec<Case> = vec![
        ("oversized control frame", oversized.clone(), None),
        ("garbage control frame", garbage.clone(), None),
        (
            "first message not Hello",
            frame(Msg::Ack(pb::Ack::default())),
            None,
        ),
        ("garbage on an RG stream", hello(), Some(garbage)),
        ("oversized on an RG stream", hello(), Some(oversized)),
        ("invalid session", hello(), Some(bad_session)),
        (
            "control message on an RG stream",
            hello(),
            Some(ack_on_rg_stream),
        ),
        ("truncated RG stream", hello(), Some(empty_envelope)),
    ];
    for (name, control, rg) in &cases {
        let err = rogue_session(&p, control, rg.as_deref()).await;
        assert!(protocol_close(&err), "{name}: closed with {err}");
    }
    let c = p.nodes[1].sync().conn_stats();
    assert_eq!(c.frames_oversized, 2);
    assert_eq!(c.frames_malformed, 2);
    assert_eq!(c.frames_truncated, 1);
    assert_eq!(c.invalid_sessions, 1);
    assert_eq!(c.unexpected_messages, 2);
    assert!(
        lock(&p.nodes[1].table).is_empty(),
        "nothing of the garbage was applied"
    );
    // The real peer still syncs.
    for i in 0..100 {
        p.nodes[0].create(snat_session(RG1, i));
    }
    p.start(0);
    assert!(p.converged(RG1, WAIT).await);
    assert_eq!(lock(&p.nodes[1].table).rg_len(RG1), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_from_another_cluster_is_rejected() {
    let mut p = pair();
    p.start(1);
    let wrong = frame(Msg::Hello(pb::Hello {
        node_id: 0,
        cluster_id: 99,
        protocol_version: PROTOCOL_VERSION,
        rgs: vec![],
        incarnation: 1,
    }));
    let err = rogue_session(&p, &wrong, None).await;
    assert!(
        matches!(err, quinn::ConnectionError::ApplicationClosed(ref c) if c.error_code == quinn::VarInt::from_u32(close::HELLO)),
        "{err}"
    );
    assert_eq!(p.nodes[1].sync().conn_stats().hello_rejected, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epoch_change_starts_a_new_stream_with_bulk() {
    let mut p = pair();
    p.nodes[0].set_roles(&[(RG1, true, 1)]);
    p.nodes[1].set_roles(&[(RG1, false, 1)]);
    for i in 0..500 {
        p.nodes[0].create(snat_session(RG1, i));
    }
    p.start(1);
    p.start(0);
    assert!(p.converged(RG1, WAIT).await);
    // Failover: node1 becomes primary in epoch 2; node0 demoted.
    p.nodes[0].set_roles(&[(RG1, false, 2)]);
    p.nodes[1].set_roles(&[(RG1, true, 2)]);
    let k = p.nodes[1].create(snat_session(RG1, 7777));
    let gone = p.nodes[1].rg_sessions(RG1)[0].key;
    p.nodes[1].close(&gone);
    assert!(p.converged(RG1, WAIT).await);
    {
        let t = lock(&p.nodes[0].table);
        assert!(
            t.lookup_forward(&k).is_some(),
            "new primary's session reached the old one"
        );
        assert!(
            t.lookup_forward(&gone).is_none(),
            "new primary's delete reached the old one"
        );
    }
    let tx = p.nodes[1].sync().stats(RG1);
    assert!(
        eventually(WAIT, || tx.bulks_acked.load(Relaxed) == 1).await,
        "new primary bulked"
    );
}
