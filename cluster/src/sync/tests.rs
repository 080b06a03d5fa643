//! Sender and receiver state machines driven against each other without
//! I/O: frames go through the real framing, sessions through real tables.

use super::*;
use crate::stats::RgSyncStats;
use bytes::BytesMut;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use tandem_dataplane::delta::Delta;
use tandem_dataplane::session::*;
use tandem_proto::pb::envelope::Msg;
use tandem_proto::{Epoch, FrameDecoder, RgId, pb};

const RG1: RgId = RgId(1);
const RG2: RgId = RgId(2);
const NOW: Millis = Millis(50_000);

fn snat(rg: RgId, i: u32) -> NewSession {
    NewSession {
        key: SessionKey::new(
            Ipv4Addr::from(0x0a00_0000 | i),
            1000,
            Ipv4Addr::new(203, 0, 113, 1),
            443,
            proto::TCP,
            ZoneId(1),
        ),
        egress_zone: ZoneId(2),
        // One SNAT pool per RG, as the config requires.
        snat: Some(SnatRequest {
            addr: Ipv4Addr::new(198, 51, 100, rg.0 as u8).into(),
            ports: 1024..=65535,
        }),
        dnat: None,
        ingress_if: InterfaceId(1),
        egress_if: InterfaceId(2),
        owner_rg: rg,
        policy: PolicyId(1),
        tcp_state: TcpState::Established,
    }
}

struct Pair {
    primary: SessionTable,
    secondary: SessionTable,
    tx: RgSender,
    rx: RgReceiver,
    stats: Arc<RgSyncStats>,
    wire: BytesMut,
}

impl Pair {
    fn new(rg: RgId) -> Pair {
        let mut primary = SessionTable::default();
        primary.promote_rg(rg);
        let stats = Arc::new(RgSyncStats::default());
        let mut rx = RgReceiver::new(rg, stats.clone());
        rx.on_connect(77);
        let mut p = Pair {
            primary,
            secondary: SessionTable::default(),
            tx: RgSender::new(rg, Epoch(1), 77, 1 << 20),
            rx,
            stats,
            wire: BytesMut::new(),
        };
        // Every stream starts in sync through a bulk (empty here).
        p.bulk(rg, |_| {});
        p.deliver();
        p
    }

    fn insert(&mut self, rg: RgId, i: u32) -> SessionKey {
        let h = self.primary.insert(snat(rg, i), NOW).unwrap();
        self.primary.get(h).unwrap().key
    }

    /// Sends changes of `keys` (as the dataplane queues them).
    fn send_keys(&mut self, keys: &[SessionKey]) -> BatchInfo {
        let deltas: Vec<Delta> = keys.iter().copied().map(Delta::change).collect();
        self.send(&deltas)
    }

    fn send(&mut self, deltas: &[Delta]) -> BatchInfo {
        let mut out = BytesMut::new();
        let info = self.tx.build_batch(deltas, &self.primary, NOW, &mut out);
        self.wire.extend_from_slice(&out);
        info
    }

    /// Removes a local session and sends what its removal queues (a
    /// delete only if the peer may hold it, as the expiry does).
    fn close(&mut self, key: &SessionKey) -> BatchInfo {
        let h = self.primary.lookup_forward(key).unwrap();
        let r = self.primary.remove(h, RemoveReason::Closed).unwrap();
        if r.sent_to_peer() {
            self.send(&[Delta::delete(*key)])
        } else {
            BatchInfo::default()
        }
    }

    /// Delivers everything on the wire; feeds acks back to the sender.
    fn deliver(&mut self) -> Vec<Msg> {
        let mut dec = FrameDecoder::default();
        dec.push(&self.wire);
        self.wire.clear();
        let mut replies = Vec::new();
        while let Some(env) = dec.next_frame().unwrap() {
            let out = self
                .rx
                .on_message(&env.msg.unwrap(), &mut self.secondary, false, NOW)
                .unwrap();
            for m in &out {
                if let Msg::Ack(a) = m {
                    self.tx.on_ack(Epoch(a.epoch), a.seq);
                }
            }
            replies.extend(out);
        }
        replies
    }

    /// Bulk-exports the whole RG (optionally with work between chunks).
    fn bulk(&mut self, rg: RgId, mut between: impl FnMut(&mut Pair)) {
        let mut out = BytesMut::new();
        self.tx.begin_bulk(NOW, 0, &mut out);
        self.wire.extend_from_slice(&out);
        let mut cur = self.primary.begin_export(rg);
        loop {
            let mut out = BytesMut::new();
            let (_, more) = self
                .tx
                .bulk_chunk(&self.primary, &mut cur, 3, NOW, &mut out);
            self.wire.extend_from_slice(&out);
            between(self);
            if !more {
                break;
            }
        }
        let mut out = BytesMut::new();
        self.tx.end_bulk(&mut out);
        self.wire.extend_from_slice(&out);
    }

    fn converged(&self, rg: RgId) -> bool {
        let mut a: Vec<SyncedSession> = self.primary.export_synced(rg, NOW).collect();
        let mut b: Vec<SyncedSession> = self.secondary.export_synced(rg, NOW).collect();
        a.sort_by_key(|s| s.key);
        b.sort_by_key(|s| s.key);
        a == b
    }
}

#[test]
fn deltas_on_a_stream_never_synced_request_a_bulk() {
    let mut p = Pair::new(RG1);
    p.rx = RgReceiver::new(RG1, p.stats.clone());
    let k = p.insert(RG1, 1);
    p.send_keys(&[k]);
    let replies = p.deliver();
    assert!(
        matches!(replies.as_slice(), [Msg::BulkRequest(_)]),
        "no ack without a sync point"
    );
    assert_eq!(p.secondary.len(), 1, "the data is applied anyway");
}

#[test]
fn deltas_are_acked_only_after_apply_and_converge() {
    let mut p = Pair::new(RG1);
    let keys: Vec<_> = (0..10).map(|i| p.insert(RG1, i)).collect();
    p.send_keys(&keys);
    assert_eq!(p.tx.acked(), 0, "nothing acked before delivery");
    let replies = p.deliver();
    assert_eq!(
        replies,
        vec![Msg::Ack(pb::Ack {
            rg: 1,
            epoch: 1,
            seq: 10
        })]
    );
    assert_eq!(p.tx.acked(), 10);
    assert_eq!(p.tx.replay_depth(), (0, 0), "acked batches leave replay");
    assert!(p.converged(RG1));
    p.secondary.verify_invariants().unwrap();
}

#[test]
fn delete_during_bulk_wins_over_older_bulk_entry() {
    let mut p = Pair::new(RG1);
    let keys: Vec<_> = (0..9).map(|i| p.insert(RG1, i)).collect();
    let mut victim = None;
    p.bulk(RG1, |p| {
        if victim.is_none() {
            // A session the first chunk carried closes locally.
            let carried = keys.iter().copied().find(|k| {
                let h = p.primary.lookup_forward(k).unwrap();
                p.primary.get(h).unwrap().sent_to_peer()
            });
            let k = carried.expect("the first chunk marked what it carried");
            let info = p.close(&k);
            assert_eq!(
                info.deletes, 1,
                "the bulk carried it: the peer is owed a delete"
            );
            victim = Some(k);
        }
    });
    let victim = victim.expect("closed during the bulk");
    let replies = p.deliver();
    assert!(
        replies
            .iter()
            .any(|m| matches!(m, Msg::BulkAck(a) if a.applied == 9))
    );
    assert_eq!(p.secondary.lookup_forward(&victim), None, "the delete won");
    assert!(p.converged(RG1));
    assert_eq!(p.secondary.reserved_ports(), 8);
}

#[test]
fn interrupted_bulk_deletes_nothing_and_next_bulk_converges() {
    let mut p = Pair::new(RG1);
    // The secondary holds 5 sessions from before; 2 of them are stale.
    let keys: Vec<_> = (0..5).map(|i| p.insert(RG1, i)).collect();
    p.send_keys(&keys);
    p.deliver();
    for k in &keys[..2] {
        let h = p.primary.lookup_forward(k).unwrap();
        p.primary.remove(h, RemoveReason::Closed); // deletes lost: not sent
    }
    // A bulk that is cut off after its first chunk.
    let mut out = BytesMut::new();
    p.tx.begin_bulk(NOW, 0, &mut out);
    let mut cur = p.primary.begin_export(RG1);
    p.tx.bulk_chunk(&p.primary, &mut cur, 1, NOW, &mut out);
    p.wire.extend_from_slice(&out);
    p.deliver();
    p.rx.on_disconnect();
    p.tx.on_disconnect();
    assert_eq!(p.secondary.len(), 5, "interrupted bulk deleted nothing");
    assert_eq!(p.stats.bulks_aborted.load(Relaxed), 1);
    assert!(!p.rx.in_sync());
    // Reconnect: the receiver is not in sync, so the sender must bulk.
    p.rx.on_connect(77);
    assert!(matches!(
        p.tx.resume(Some(&p.rx.sync_state())),
        ResumePlan::Bulk { .. }
    ));
    p.bulk(RG1, |_| {});
    p.deliver();
    assert!(p.converged(RG1));
    assert_eq!(p.stats.reconcile_deleted.load(Relaxed), 2);
    p.secondary.verify_invariants().unwrap();
}

#[test]
fn reconcile_removes_stale_nat_companions_only_in_its_rg() {
    let mut p = Pair::new(RG1);
    let rg1: Vec<_> = (0..4).map(|i| p.insert(RG1, i)).collect();
    p.send_keys(&rg1);
    p.deliver();
    // RG2 sessions on the secondary, from its other peer stream.
    let mut other = Pair::new(RG2);
    let rg2: Vec<_> = (100..103).map(|i| other.insert(RG2, i)).collect();
    for k in &rg2 {
        let r = other
            .primary
            .to_synced(other.primary.lookup_forward(k).unwrap(), NOW)
            .unwrap();
        p.secondary.apply_peer_upsert(&r, NOW, None).unwrap();
    }
    let stale = p
        .secondary
        .get(p.secondary.lookup_forward(&rg1[0]).unwrap())
        .unwrap()
        .clone();
    let binding = stale.snat_binding().unwrap();
    let h = p.primary.lookup_forward(&rg1[0]).unwrap();
    p.primary.remove(h, RemoveReason::Closed);
    p.bulk(RG1, |_| {});
    p.deliver();
    assert_eq!(p.secondary.lookup_forward(&stale.key), None);
    assert_eq!(p.secondary.lookup_reverse(&stale.reverse), None);
    assert_eq!(
        p.secondary.lookup_nat_binding(&binding),
        None,
        "DNAT companion gone"
    );
    assert_eq!(p.secondary.rg_len(RG2), 3, "RG2 untouched");
    assert_eq!(p.secondary.reserved_ports(), 3 + 3);
    p.secondary.verify_invariants().unwrap();
}

#[test]
fn replay_after_reconnect_loses_nothing() {
    let mut p = Pair::new(RG1);
    let a: Vec<_> = (0..5).map(|i| p.insert(RG1, i)).collect();
    p.send_keys(&a);
    p.deliver();
    // Two batches are written but the connection drops before delivery.
    let b: Vec<_> = (5..8).map(|i| p.insert(RG1, i)).collect();
    p.send_keys(&b);
    let c: Vec<_> = (8..10).map(|i| p.insert(RG1, i)).collect();
    p.send_keys(&c);
    p.wire.clear();
    p.rx.on_disconnect();
    p.rx.on_connect(77);
    let state = p.rx.sync_state();
    assert_eq!((state.applied_epoch, state.applied_seq), (1, 5));
    let ResumePlan::Replay(frames) = p.tx.resume(Some(&state)) else {
        panic!("replay expected")
    };
    assert_eq!(frames.len(), 2);
    for f in frames {
        p.wire.extend_from_slice(&f);
    }
    p.deliver();
    assert!(p.converged(RG1));
    assert_eq!(p.secondary.len(), 10);
    assert_eq!(p.tx.acked(), 10);
}

#[test]
fn overlapping_replay_is_applied_once() {
    let mut p = Pair::new(RG1);
    let a: Vec<_> = (0..4).map(|i| p.insert(RG1, i)).collect();
    p.send_keys(&a);
    let frames_before = p.wire.clone();
    p.deliver();
    p.wire.extend_from_slice(&frames_before);
    let replies = p.deliver();
    assert_eq!(
        replies,
        vec![Msg::Ack(pb::Ack {
            rg: 1,
            epoch: 1,
            seq: 4
        })]
    );
    assert_eq!(p.stats.dropped_duplicate.load(Relaxed), 4);
    assert_eq!(p.stats.deltas_applied.load(Relaxed), 4);
}

#[test]
fn evicted_replay_forces_bulk() {
    let mut p = Pair::new(RG1);
    p.tx = RgSender::new(RG1, Epoch(1), 77, 300); // tiny replay bound
    for i in 0..10 {
        let k = p.insert(RG1, i);
        p.send_keys(&[k]);
    }
    p.wire.clear();
    assert!(p.tx.replay_depth().1 <= 300);
    let mut st = p.rx.sync_state();
    st.applied_epoch = 1;
    st.applied_seq = 0;
    st.sender_incarnation = 77;
    assert_eq!(
        p.tx.resume(Some(&st)),
        ResumePlan::Bulk {
            reason: "replay buffer no longer covers the gap"
        }
    );
}

#[test]
fn gap_requests_bulk_once() {
    let mut p = Pair::new(RG1);
    let k1 = p.insert(RG1, 1);
    p.send_keys(&[k1]);
    p.wire.clear(); // seq 1 lost without a reconnect (a bug upstream)
    let k2 = p.insert(RG1, 2);
    p.send_keys(&[k2]);
    let k3 = p.insert(RG1, 3);
    p.send_keys(&[k3]);
    let replies = p.deliver();
    let requests = replies
        .iter()
        .filter(|m| matches!(m, Msg::BulkRequest(_)))
        .count();
    assert_eq!(requests, 1);
    assert_eq!(p.stats.gaps.load(Relaxed), 1);
    assert_eq!(p.secondary.len(), 2, "later deltas are still applied");
}

#[test]
fn stale_epoch_and_own_rg_deltas_are_dropped_and_counted() {
    let mut p = Pair::new(RG1);
    let k = p.insert(RG1, 1);
    p.send_keys(&[k]);
    p.deliver();
    // The peer moved to epoch 2; an epoch-1 batch arrives late.
    let mut newer = RgSender::new(RG1, Epoch(2), 77, 1 << 20);
    let mut out = BytesMut::new();
    newer.begin_bulk(NOW, 0, &mut out);
    let mut dec = FrameDecoder::default();
    dec.push(&out);
    p.rx.on_message(
        &dec.next_frame().unwrap().unwrap().msg.unwrap(),
        &mut p.secondary,
        false,
        NOW,
    )
    .unwrap();
    let k2 = p.insert(RG1, 2);
    p.send_keys(&[k2]);
    assert!(p.deliver().is_empty(), "no ack for a stale epoch");
    assert_eq!(p.stats.dropped_stale_epoch.load(Relaxed), 1);
    // This node is primary for the RG: the peer's deltas are refused.
    let mut dec = FrameDecoder::default();
    let mut out = BytesMut::new();
    newer.build_batch(&[Delta::change(k2)], &p.primary, NOW, &mut out);
    dec.push(&out);
    let msg = dec.next_frame().unwrap().unwrap().msg.unwrap();
    assert!(
        p.rx.on_message(&msg, &mut p.secondary, true, NOW)
            .unwrap()
            .is_empty()
    );
    assert_eq!(p.stats.dropped_not_secondary.load(Relaxed), 1);
}

#[test]
fn session_of_another_rg_on_a_stream_is_a_protocol_error() {
    let mut p = Pair::new(RG1);
    let k = p.insert(RG1, 1);
    let mut s = p
        .primary
        .to_synced(p.primary.lookup_forward(&k).unwrap(), NOW)
        .unwrap();
    s.owner_rg = RG2;
    let msg = Msg::DeltaBatch(pb::DeltaBatch {
        rg: 1,
        epoch: 1,
        first_seq: 1,
        count: 1,
        records: {
            let mut r = bytes::BytesMut::new();
            crate::wire::put_upsert(&mut r, &s);
            r.freeze()
        },
    });
    assert!(matches!(
        p.rx.on_message(&msg, &mut p.secondary, false, NOW),
        Err(RxError::Invalid(_))
    ));
    assert!(
        p.secondary.is_empty(),
        "nothing of an invalid batch is applied"
    );
    let wrong = Msg::BulkEnd(pb::BulkEnd {
        rg: 2,
        epoch: 1,
        bulk_id: 1,
        count: 0,
    });
    assert!(matches!(
        p.rx.on_message(&wrong, &mut p.secondary, false, NOW),
        Err(RxError::WrongRg { .. })
    ));
}

#[test]
fn bulk_count_mismatch_reconciles_nothing() {
    let mut p = Pair::new(RG1);
    let keys: Vec<_> = (0..3).map(|i| p.insert(RG1, i)).collect();
    p.send_keys(&keys);
    p.deliver();
    let msgs = [
        Msg::BulkBegin(pb::BulkBegin {
            rg: 1,
            epoch: 1,
            bulk_id: 9,
            next_seq: 4,
            count_hint: 5,
        }),
        Msg::BulkEnd(pb::BulkEnd {
            rg: 1,
            epoch: 1,
            bulk_id: 9,
            count: 5,
        }),
    ];
    let mut replies = Vec::new();
    for m in &msgs {
        replies.extend(p.rx.on_message(m, &mut p.secondary, false, NOW).unwrap());
    }
    assert_eq!(p.secondary.len(), 3, "no reconcile on a count mismatch");
    assert_eq!(p.stats.bulk_count_mismatch.load(Relaxed), 1);
    assert!(matches!(replies.as_slice(), [Msg::BulkRequest(_)]));
}

/// A bulk chunk carries upserts of its RG only: a delete record, a session
/// of another RG, or a count that disagrees with the records is a protocol
/// error, and nothing of that chunk is applied.
#[test]
fn invalid_bulk_chunks_are_rejected_whole() {
    let mut p = Pair::new(RG1);
    let k = p.insert(RG1, 1);
    let good = p
        .primary
        .to_synced(p.primary.lookup_forward(&k).unwrap(), NOW)
        .unwrap();
    let begin = Msg::BulkBegin(pb::BulkBegin {
        rg: 1,
        epoch: 1,
        bulk_id: 5,
        next_seq: 1,
        count_hint: 2,
    });
    p.rx.on_message(&begin, &mut p.secondary, false, NOW)
        .unwrap();
    let mut other_rg = good.clone();
    other_rg.key.src_port += 1;
    other_rg.owner_rg = RG2;
    let chunk = |records: BytesMut, count: u32| {
        Msg::BulkChunk(pb::BulkChunk {
            rg: 1,
            epoch: 1,
            bulk_id: 5,
            count,
            records: records.freeze(),
        })
    };
    let mut with_delete = BytesMut::new();
    crate::wire::put_upsert(&mut with_delete, &good);
    crate::wire::put_delete(&mut with_delete, &good.key);
    let mut with_other_rg = BytesMut::new();
    crate::wire::put_upsert(&mut with_other_rg, &good);
    crate::wire::put_upsert(&mut with_other_rg, &other_rg);
    let mut miscounted = BytesMut::new();
    crate::wire::put_upsert(&mut miscounted, &good);
    for (case, msg, why) in [
        ("delete", chunk(with_delete, 2), "delete record"),
        ("other rg", chunk(with_other_rg, 2), "rg2"),
        ("count", chunk(miscounted, 3), "count says 3"),
    ] {
        match p.rx.on_message(&msg, &mut p.secondary, false, NOW) {
            Err(RxError::Invalid(e)) => assert!(e.0.contains(why), "{case}: {e}"),
            other => panic!("{case}: {other:?}"),
        }
        assert!(p.secondary.is_empty(), "{case}: nothing applied");
    }
    assert_eq!(p.stats.bulk_sessions_applied.load(Relaxed), 0);
}

#[test]
fn half_open_sessions_are_neither_sent_nor_bulked_until_established() {
    let mut p = Pair::new(RG1);
    p.bulk(RG1, |_| {});
    p.deliver();
    let open = p.insert(RG1, 1);
    let h = p
        .primary
        .insert(
            NewSession {
                tcp_state: TcpState::SynSent,
                ..snat(RG1, 2)
            },
            NOW,
        )
        .unwrap();
    let half = p.primary.get(h).unwrap().key;
    let info = p.send_keys(&[open, half]);
    assert_eq!((info.upserts, info.unreplicated, info.deletes), (1, 1, 0));
    p.deliver();
    assert!(p.secondary.lookup_forward(&open).is_some());
    assert!(p.secondary.lookup_forward(&half).is_none());
    // A bulk leaves it out too; the reconcile keeps what was sent.
    p.bulk(RG1, |_| {});
    p.deliver();
    assert_eq!(p.secondary.len(), 1);
    // Established: the next delta carries it.
    p.primary.set_tcp_state(h, TcpState::Established, NOW);
    p.send_keys(&[half]);
    p.deliver();
    assert!(p.secondary.lookup_forward(&half).is_some());
    assert!(p.converged(RG1));
}

#[test]
fn session_closed_before_its_create_was_sent_costs_nothing_on_the_wire() {
    let mut p = Pair::new(RG1);
    let short = p.insert(RG1, 1);
    let kept = p.insert(RG1, 2);
    // Closed before the sender read its create: no delete is owed.
    assert_eq!(p.close(&short), BatchInfo::default());
    assert_eq!(p.primary.counters().closed_before_sync, 1);
    // The queued create finds no record: nothing is written for it.
    let info = p.send_keys(&[short, kept]);
    assert_eq!(
        (info.coalesced, info.upserts, info.deletes, info.deltas),
        (1, 1, 0, 1)
    );
    p.deliver();
    assert_eq!(p.secondary.lookup_forward(&short), None);
    assert!(p.converged(RG1));
    // A batch of nothing but such changes puts no frame on the wire.
    let mut out = BytesMut::new();
    let info =
        p.tx.build_batch(&[Delta::change(short)], &p.primary, NOW, &mut out);
    assert_eq!((info.coalesced, info.deltas), (1, 0));
    assert!(out.is_empty());
}

#[test]
fn session_closed_after_it_was_sent_gets_exactly_one_delete() {
    let mut p = Pair::new(RG1);
    let k = p.insert(RG1, 1);
    p.send_keys(&[k]);
    p.deliver();
    assert!(p.secondary.lookup_forward(&k).is_some());
    let h = p.primary.lookup_forward(&k).unwrap();
    assert!(p.primary.get(h).unwrap().sent_to_peer());
    // A later change of it still queued, then its delete: one delete.
    let h = p.primary.lookup_forward(&k).unwrap();
    p.primary.remove(h, RemoveReason::Closed);
    let info = p.send(&[Delta::change(k), Delta::delete(k), Delta::delete(k)]);
    assert_eq!((info.coalesced, info.deletes, info.upserts), (1, 1, 0));
    assert_eq!(p.primary.counters().closed_before_sync, 0);
    p.deliver();
    assert_eq!(p.secondary.lookup_forward(&k), None);
    assert!(p.converged(RG1));
}

#[test]
fn delete_of_a_reused_key_sends_the_new_session() {
    let mut p = Pair::new(RG1);
    let k = p.insert(RG1, 1);
    p.send_keys(&[k]);
    p.deliver();
    let h = p.primary.lookup_forward(&k).unwrap();
    p.primary.remove(h, RemoveReason::Closed);
    // Same 5-tuple, a new session before the delete was read.
    assert_eq!(p.insert(RG1, 1), k);
    let info = p.send(&[Delta::delete(k)]);
    assert_eq!((info.upserts, info.deletes), (1, 0));
    p.deliver();
    assert!(p.converged(RG1));
}

#[test]
fn bulk_and_peer_copies_count_as_held_by_the_peer() {
    let mut p = Pair::new(RG1);
    let k = p.insert(RG1, 1);
    let h = p.primary.lookup_forward(&k).unwrap();
    assert!(!p.primary.get(h).unwrap().sent_to_peer());
    p.bulk(RG1, |_| {});
    p.deliver();
    // The bulk carried it: its removal owes a delete.
    assert!(p.primary.get(h).unwrap().sent_to_peer());
    // The peer's copy too (a failover makes the peer authoritative).
    let hp = p.secondary.lookup_forward(&k).unwrap();
    assert!(p.secondary.get(hp).unwrap().sent_to_peer());
    let k2 = p.insert(RG1, 2);
    p.send_keys(&[k2]);
    p.deliver();
    let hp = p.secondary.lookup_forward(&k2).unwrap();
    assert!(p.secondary.get(hp).unwrap().sent_to_peer());
}
