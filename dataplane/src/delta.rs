//! The delta queue: how the dataplane tells the sync layer "this session
//! changed" without ever blocking on the network.
//!
//! One bounded queue per RG carries session keys, not session state: the
//! sync sender reads the current record when it builds a batch, so repeated
//! updates of one session coalesce and a batch never carries state older
//! than the table. Each key says whether it is a change or a delete: a
//! change whose record is gone by the time the sender reads it sends
//! nothing (the removal queued a delete if, and only if, the peer may hold
//! the session), so a short-lived session that closes before its create was
//! sent costs nothing on the wire. A full queue drops the key, counts it and
//! marks the RG for a bulk export, so a drop is repaired by reconciliation
//! instead of diverging silently.

use crate::session::SessionKey;
use rustc_hash::FxHashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use tandem_proto::RgId;
use tokio::sync::{Notify, mpsc};

/// Default per-RG queue bound (deltas). At 42 bytes a delta, 2.8 MiB per RG.
pub const DEFAULT_QUEUE_CAPACITY: usize = 65_536;

/// What happened to a session, as the sender needs to know it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeltaKind {
    /// Created or changed: send its current state, if it still exists.
    Change,
    /// Removed after the peer may have received it: send a delete (or the
    /// current state, if the key was reused by a new session since).
    Delete,
}

/// One queued delta: a key and what happened to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delta {
    pub key: SessionKey,
    pub kind: DeltaKind,
}

impl Delta {
    pub fn change(key: SessionKey) -> Delta {
        Delta {
            key,
            kind: DeltaKind::Change,
        }
    }

    pub fn delete(key: SessionKey) -> Delta {
        Delta {
            key,
            kind: DeltaKind::Delete,
        }
    }
}

/// Counters and the repair flag shared by both ends of one RG's queue.
#[derive(Default, Debug)]
pub struct QueueStats {
    pub pushed: AtomicU64,
    pub dropped_full: AtomicU64,
    needs_bulk: AtomicBool,
    bulk_wanted: Notify,
}

impl QueueStats {
    /// True once after a drop: the caller owes this RG a bulk export.
    pub fn take_needs_bulk(&self) -> bool {
        self.needs_bulk.swap(false, Ordering::AcqRel)
    }

    /// Resolves when a drop has marked this RG for bulk.
    pub async fn bulk_wanted(&self) {
        if self.needs_bulk.load(Ordering::Acquire) {
            return;
        }
        self.bulk_wanted.notified().await;
    }

    fn drop_one(&self) {
        self.dropped_full.fetch_add(1, Ordering::Relaxed);
        if !self.needs_bulk.swap(true, Ordering::AcqRel) {
            self.bulk_wanted.notify_one();
        }
    }
}

/// The producing end of one RG's queue.
type RgQueueTx = (mpsc::Sender<Delta>, Arc<QueueStats>);

/// The dataplane's end: cheap to clone, never blocks.
#[derive(Clone, Default)]
pub struct DeltaProducer {
    queues: Arc<FxHashMap<RgId, RgQueueTx>>,
    unknown_rg: Arc<AtomicU64>,
}

impl DeltaProducer {
    /// Queues a change of `key` in `rg`. False when dropped (queue full, or
    /// an RG without a queue); a full queue marks the RG for bulk.
    pub fn push(&self, rg: RgId, key: SessionKey) -> bool {
        self.push_delta(rg, Delta::change(key))
    }

    /// Queues the delete of `key` in `rg` (see [`DeltaKind::Delete`]).
    pub fn push_delete(&self, rg: RgId, key: SessionKey) -> bool {
        self.push_delta(rg, Delta::delete(key))
    }

    fn push_delta(&self, rg: RgId, delta: Delta) -> bool {
        let Some((tx, stats)) = self.queues.get(&rg) else {
            self.unknown_rg.fetch_add(1, Ordering::Relaxed);
            return false;
        };
        match tx.try_send(delta) {
            Ok(()) => {
                stats.pushed.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(_) => {
                stats.drop_one();
                false
            }
        }
    }

    /// Keys pushed for an RG that has no queue (a configuration mismatch).
    pub fn dropped_unknown_rg(&self) -> u64 {
        self.unknown_rg.load(Ordering::Relaxed)
    }
}

/// The sync layer's end for one RG.
pub struct DeltaConsumer {
    rg: RgId,
    rx: mpsc::Receiver<Delta>,
    stats: Arc<QueueStats>,
}

impl DeltaConsumer {
    pub fn rg(&self) -> RgId {
        self.rg
    }

    pub fn stats(&self) -> &Arc<QueueStats> {
        &self.stats
    }

    /// Waits for at least one key, then takes up to `limit`. `0` means
    /// every producer is gone.
    pub async fn recv_many(&mut self, buf: &mut Vec<Delta>, limit: usize) -> usize {
        self.rx.recv_many(buf, limit).await
    }

    /// Takes what is queued now, up to `limit`, without waiting.
    pub fn try_recv_many(&mut self, buf: &mut Vec<Delta>, limit: usize) -> usize {
        let mut n = 0;
        while n < limit {
            match self.rx.try_recv() {
                Ok(k) => {
                    buf.push(k);
                    n += 1;
                }
                Err(_) => break,
            }
        }
        n
    }

    /// True once after a drop: the caller owes this RG a bulk export.
    pub fn take_needs_bulk(&self) -> bool {
        self.stats.take_needs_bulk()
    }

    /// Keys waiting in the queue.
    pub fn len(&self) -> usize {
        self.rx.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }
}

/// One bounded queue per RG: the producer for the dataplane, a consumer per
/// RG for the sync layer.
pub fn delta_queues(rgs: &[RgId], capacity: usize) -> (DeltaProducer, Vec<DeltaConsumer>) {
    let mut map = FxHashMap::default();
    let mut consumers = Vec::with_capacity(rgs.len());
    for &rg in rgs {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let stats = Arc::new(QueueStats::default());
        map.insert(rg, (tx, stats.clone()));
        consumers.push(DeltaConsumer { rg, rx, stats });
    }
    (
        DeltaProducer {
            queues: Arc::new(map),
            unknown_rg: Arc::default(),
        },
        consumers,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::ZoneId;
    use std::net::Ipv4Addr;

    fn key(n: u16) -> SessionKey {
        SessionKey::new(
            Ipv4Addr::LOCALHOST,
            n,
            Ipv4Addr::LOCALHOST,
            80,
            6,
            ZoneId(1),
        )
    }

    #[test]
    fn full_queue_drops_counts_and_marks_rg_for_bulk() {
        let (p, mut c) = delta_queues(&[RgId(1), RgId(2)], 2);
        assert!(p.push(RgId(1), key(1)));
        assert!(p.push(RgId(1), key(2)));
        assert!(!p.push(RgId(1), key(3)), "third key exceeds the bound");
        assert!(p.push(RgId(2), key(3)), "other RGs are unaffected");
        let rg1 = &mut c[0];
        assert_eq!(rg1.stats().dropped_full.load(Ordering::Relaxed), 1);
        assert!(rg1.take_needs_bulk());
        assert!(!rg1.take_needs_bulk(), "flag is taken once");
        assert!(!c[1].take_needs_bulk());
        let mut buf = Vec::new();
        assert_eq!(c[0].try_recv_many(&mut buf, 10), 2);
        assert_eq!(buf, vec![Delta::change(key(1)), Delta::change(key(2))]);
    }

    #[test]
    fn deletes_queue_in_order_with_their_kind() {
        let (p, mut c) = delta_queues(&[RgId(1)], 4);
        assert!(p.push(RgId(1), key(1)));
        assert!(p.push_delete(RgId(1), key(1)));
        let mut buf = Vec::new();
        assert_eq!(c[0].try_recv_many(&mut buf, 10), 2);
        assert_eq!(buf, vec![Delta::change(key(1)), Delta::delete(key(1))]);
    }

    #[test]
    fn unknown_rg_is_counted_not_queued() {
        let (p, _c) = delta_queues(&[RgId(1)], 4);
        assert!(!p.push(RgId(9), key(1)));
        assert_eq!(p.dropped_unknown_rg(), 1);
    }
}
