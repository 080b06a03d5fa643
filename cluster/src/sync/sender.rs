//! The sending side of one RG's replication stream, without I/O.
//!
//! It numbers deltas, keeps what the peer has not acknowledged in a bounded
//! replay buffer, decides after a reconnect whether replay is enough or a
//! bulk export is owed, and frames bulk markers and chunks. The I/O shell
//! writes the bytes it returns, in order, on the RG's stream.

use crate::wire::{MAX_RECORD, put_delete, put_upsert};
use bytes::{Bytes, BytesMut};
use rustc_hash::FxHashSet;
use std::collections::VecDeque;
use tandem_dataplane::delta::{Delta, DeltaKind};
use tandem_dataplane::session::{ExportCursor, Millis, SessionKey, SessionTable, SyncedSession};
use tandem_proto::pb::{self, envelope::Msg};
use tandem_proto::{Epoch, RgId, encode_frame};

struct SentBatch {
    last_seq: u64,
    frame: Bytes,
    sent_at: Millis,
}

/// What a (re)connected stream must start with.
#[derive(Debug, PartialEq, Eq)]
pub enum ResumePlan {
    /// The peer is current up to a point the replay buffer covers: re-send
    /// these frames (possibly none) and carry on.
    Replay(Vec<Bytes>),
    /// The peer's state cannot be trusted to be a prefix of ours: export the
    /// whole RG and let it reconcile.
    Bulk { reason: &'static str },
}

pub struct RgSender {
    rg: RgId,
    epoch: Epoch,
    incarnation: u64,
    next_seq: u64,
    replay: VecDeque<SentBatch>,
    replay_bytes: usize,
    replay_cap: usize,
    /// Highest seq that left the replay buffer without an ack.
    evicted_through: u64,
    acked: u64,
    bulk: Option<OutBulk>,
    next_bulk_id: u64,
    scratch: Vec<SyncedSession>,
    /// Packed records of the message being built.
    records: BytesMut,
}

struct OutBulk {
    id: u64,
    sent: u64,
    started: Millis,
}

/// Result of one `build_batch`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchInfo {
    pub deltas: u64,
    pub upserts: u64,
    pub deletes: u64,
    /// Deltas of TCP sessions still in their handshake, not sent.
    pub unreplicated: u64,
    /// Changes of sessions removed before this batch read them: nothing
    /// sent (the removal queued a delete if the peer may hold them).
    pub coalesced: u64,
    pub bytes: u64,
    /// Replay batches evicted to stay under the bound.
    pub evicted: u64,
}

impl RgSender {
    /// `incarnation` identifies this sender's sequence space: a peer whose
    /// applied state names another incarnation gets a bulk.
    pub fn new(rg: RgId, epoch: Epoch, incarnation: u64, replay_cap_bytes: usize) -> RgSender {
        RgSender {
            rg,
            epoch,
            incarnation,
            next_seq: 1,
            replay: VecDeque::new(),
            replay_bytes: 0,
            replay_cap: replay_cap_bytes,
            evicted_through: 0,
            acked: 0,
            bulk: None,
            next_bulk_id: 1,
            scratch: Vec::new(),
            records: BytesMut::new(),
        }
    }

    pub fn rg(&self) -> RgId {
        self.rg
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    pub fn acked(&self) -> u64 {
        self.acked
    }

    pub fn replay_depth(&self) -> (usize, usize) {
        (self.replay.len(), self.replay_bytes)
    }

    /// Age of the oldest unacknowledged batch: the replication lag.
    pub fn oldest_unacked_ms(&self, now: Millis) -> u64 {
        self.replay
            .front()
            .map_or(0, |b| now.saturating_sub(b.sent_at))
    }

    pub fn bulk_in_progress(&self) -> bool {
        self.bulk.is_some()
    }

    /// Decides how to resume with a peer that reported `peer` in its Hello.
    pub fn resume(&self, peer: Option<&pb::RgSyncState>) -> ResumePlan {
        let Some(p) = peer else {
            return ResumePlan::Bulk {
                reason: "peer reports no state for this RG",
            };
        };
        if p.applied_epoch != self.epoch.0 {
            return ResumePlan::Bulk {
                reason: "peer applied another epoch",
            };
        }
        if p.sender_incarnation != self.incarnation {
            return ResumePlan::Bulk {
                reason: "peer applied another sender's stream",
            };
        }
        let applied = p.applied_seq;
        if applied >= self.next_seq {
            return ResumePlan::Bulk {
                reason: "peer claims deltas never sent",
            };
        }
        if applied < self.evicted_through {
            return ResumePlan::Bulk {
                reason: "replay buffer no longer covers the gap",
            };
        }
        // Everything after `applied` is in the buffer (acked batches are
        // dropped only when the peer acked them, so applied >= their seqs).
        let frames = self
            .replay
            .iter()
            .filter(|b| b.last_seq > applied)
            .map(|b| b.frame.clone())
            .collect();
        ResumePlan::Replay(frames)
    }

    /// Encodes one DeltaBatch for `keys` from the current table into `out`
    /// and keeps it for replay. A key whose session is gone becomes a
    /// delete; a session not locally owned by this RG is skipped (only the
    /// primary's authoritative copies are replicated).
    /// Builds one batch of `deltas` from the table's current records: a
    /// live record is sent once however often it is queued (and marked
    /// sent), a delete once per key, and a change whose record is gone is
    /// dropped (see [`tandem_dataplane::delta`]).
    pub fn build_batch(
        &mut self,
        deltas: &[Delta],
        table: &SessionTable,
        now: Millis,
        out: &mut BytesMut,
    ) -> BatchInfo {
        let mut info = BatchInfo::default();
        let mut seen = FxHashSet::default();
        let keys: Vec<SessionKey> = deltas.iter().map(|d| d.key).collect();
        let mut handles = vec![None; keys.len()];
        table.lookup_forward_burst(&keys, &mut handles);
        let records = &mut self.records;
        records.clear();
        records.reserve(keys.len() * MAX_RECORD);
        for (d, h) in deltas.iter().zip(handles) {
            let key = &d.key;
            let record = h.and_then(|h| table.get(h));
            if record.is_none() && d.kind == DeltaKind::Change {
                info.coalesced += 1;
                continue;
            }
            if !seen.insert(*key) {
                continue;
            }
            match record {
                None => {
                    info.deletes += 1;
                    put_delete(records, key);
                }
                // A TCP session still in its handshake is not replicated
                // (a SYN flood stays off the control link): its delta is
                // dropped here, and the one its completion queues sends it.
                Some(r) if !r.is_replicated() => {
                    info.unreplicated += 1;
                }
                Some(r) if r.owner_rg == self.rg && table.is_authoritative(r) => {
                    let Some(s) = h.and_then(|h| table.to_synced(h, now)) else {
                        continue;
                    };
                    info.upserts += 1;
                    r.mark_sent();
                    put_upsert(records, &s);
                }
                Some(_) => continue,
            }
        }
        info.deltas = info.upserts + info.deletes;
        if info.deltas == 0 {
            return info;
        }
        let first_seq = self.next_seq;
        self.next_seq += info.deltas;
        let env = pb::Envelope {
            msg: Some(Msg::DeltaBatch(pb::DeltaBatch {
                rg: self.rg.0.into(),
                epoch: self.epoch.0,
                first_seq,
                count: info.deltas as u32,
                records: self.records.split().freeze(),
            })),
        };
        let mut frame = BytesMut::new();
        encode_frame(&env, &mut frame);
        let frame = frame.freeze();
        info.bytes = frame.len() as u64;
        out.extend_from_slice(&frame);
        self.replay_bytes += frame.len();
        self.replay.push_back(SentBatch {
            last_seq: self.next_seq - 1,
            frame,
            sent_at: now,
        });
        while self.replay_bytes > self.replay_cap {
            let Some(old) = self.replay.pop_front() else {
                break;
            };
            self.replay_bytes -= old.frame.len();
            self.evicted_through = self.evicted_through.max(old.last_seq);
            info.evicted += 1;
        }
        info
    }

    /// A cumulative ack: batches up to `seq` are in the peer's table.
    pub fn on_ack(&mut self, epoch: Epoch, seq: u64) {
        if epoch != self.epoch || seq >= self.next_seq {
            return;
        }
        self.acked = self.acked.max(seq);
        while self.replay.front().is_some_and(|b| b.last_seq <= seq) {
            let b = self.replay.pop_front().expect("front exists");
            self.replay_bytes -= b.frame.len();
        }
    }

    /// Starts a bulk export of about `count_hint` sessions: writes
    /// BulkBegin. Unacked batches are dropped from replay: the bulk carries
    /// the current state of every session.
    pub fn begin_bulk(&mut self, now: Millis, count_hint: u64, out: &mut BytesMut) -> u64 {
        let id = self.next_bulk_id;
        self.next_bulk_id += 1;
        self.replay.clear();
        self.replay_bytes = 0;
        // A reconnect before this bulk completes must bulk again: nothing
        // before next_seq can be replayed.
        self.evicted_through = self.next_seq - 1;
        self.bulk = Some(OutBulk {
            id,
            sent: 0,
            started: now,
        });
        self.frame(
            Msg::BulkBegin(pb::BulkBegin {
                rg: self.rg.0.into(),
                epoch: self.epoch.0,
                bulk_id: id,
                next_seq: self.next_seq,
                count_hint,
            }),
            out,
        );
        id
    }

    /// Writes the next BulkChunk (up to `max` sessions) of the export that
    /// `cursor` walks; false when the walk is done.
    pub fn bulk_chunk(
        &mut self,
        table: &SessionTable,
        cursor: &mut ExportCursor,
        max: usize,
        now: Millis,
        out: &mut BytesMut,
    ) -> (u64, bool) {
        let Some(bulk) = &self.bulk else {
            return (0, false);
        };
        let id = bulk.id;
        let mut sessions = std::mem::take(&mut self.scratch);
        sessions.clear();
        // A bulk carries only what this node is authoritative for.
        let more = table.export_chunk(cursor, max, now, &mut sessions, |r| {
            let send = table.is_authoritative(r) && r.is_replicated();
            if send {
                r.mark_sent();
            }
            send
        });
        let n = sessions.len() as u64;
        if n > 0 {
            self.records.clear();
            self.records.reserve(sessions.len() * MAX_RECORD);
            for s in &sessions {
                put_upsert(&mut self.records, s);
            }
            let records = self.records.split().freeze();
            self.frame(
                Msg::BulkChunk(pb::BulkChunk {
                    rg: self.rg.0.into(),
                    epoch: self.epoch.0,
                    bulk_id: id,
                    count: n as u32,
                    records,
                }),
                out,
            );
        }
        self.scratch = sessions;
        if let Some(b) = &mut self.bulk {
            b.sent += n;
        }
        (n, more)
    }

    /// Writes BulkEnd with the number of sessions sent.
    pub fn end_bulk(&mut self, out: &mut BytesMut) -> u64 {
        let Some(b) = &self.bulk else { return 0 };
        let (id, count) = (b.id, b.sent);
        self.frame(
            Msg::BulkEnd(pb::BulkEnd {
                rg: self.rg.0.into(),
                epoch: self.epoch.0,
                bulk_id: id,
                count,
            }),
            out,
        );
        count
    }

    /// The peer applied and reconciled bulk `id`; returns its duration.
    pub fn on_bulk_ack(&mut self, epoch: Epoch, id: u64, now: Millis) -> Option<u64> {
        match &self.bulk {
            Some(b) if b.id == id && epoch == self.epoch => {
                let took = now.saturating_sub(b.started);
                self.bulk = None;
                Some(took)
            }
            _ => None,
        }
    }

    /// The stream broke: an unfinished bulk is abandoned (the peer deletes
    /// nothing for it; the next connection bulks again).
    pub fn on_disconnect(&mut self) {
        self.bulk = None;
    }

    fn frame(&self, msg: Msg, out: &mut BytesMut) {
        encode_frame(&pb::Envelope { msg: Some(msg) }, out);
    }
}
