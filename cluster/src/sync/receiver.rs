//! The receiving side of one RG's replication stream, without I/O.
//!
//! Applies delta batches and bulk chunks to the local table in stream
//! order, acknowledges only what is applied, fences older epochs, detects
//! sequence gaps, stamps every session a bulk (or a delta during it)
//! carries, and reconciles at `BulkEnd`. A bulk cut off before its end
//! deletes nothing.

use super::super::stats::{RgSyncStats, add, inc};
use crate::wire::{Record, RecordReader, WireError};
use std::fmt;
use std::sync::Arc;
use tandem_dataplane::session::{
    BulkMark, Millis, ReconcileReport, SLICE, SessionTable, Slices, SyncedSession,
};
use tandem_proto::pb::{self, envelope::Msg};
use tandem_proto::{Epoch, RgId};

/// Why a stream must be closed: the peer sent something that is not a
/// valid continuation of this RG's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RxError {
    Invalid(WireError),
    WrongRg { expected: RgId, got: u32 },
    Unexpected(&'static str),
}

impl fmt::Display for RxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RxError::Invalid(e) => write!(f, "invalid session: {e}"),
            RxError::WrongRg { expected, got } => {
                write!(f, "frame for rg{got} on the {expected} stream")
            }
            RxError::Unexpected(what) => write!(f, "unexpected {what}"),
        }
    }
}

impl std::error::Error for RxError {}

/// How many operations ahead of the one being applied the table is told
/// which index slots will be needed (their cache misses then overlap).
const PREFETCH_AHEAD: usize = 8;

/// Most sessions reserved ahead for one chunk on the word of its `count`
/// (a frame of 1 MiB holds fewer than 12k records anyway).
const MAX_CHUNK_RESERVE: u32 = 16_384;

struct InBulk {
    id: u64,
    mark: BulkMark,
    received: u64,
}

pub struct RgReceiver {
    rg: RgId,
    epoch: Epoch,
    sender_incarnation: u64,
    /// Next sequence number expected; `None` while not in sync.
    expected: Option<u64>,
    bulk: Option<InBulk>,
    next_mark: u32,
    bulk_requested: bool,
    stats: Arc<RgSyncStats>,
    /// Decoded records of the message being applied (kept for its
    /// allocation).
    ops: Vec<Record>,
    sessions: Vec<SyncedSession>,
}

impl RgReceiver {
    pub fn new(rg: RgId, stats: Arc<RgSyncStats>) -> RgReceiver {
        RgReceiver {
            rg,
            epoch: Epoch(0),
            sender_incarnation: 0,
            expected: None,
            bulk: None,
            next_mark: 1,
            bulk_requested: false,
            stats,
            ops: Vec::new(),
            sessions: Vec::new(),
        }
    }

    pub fn rg(&self) -> RgId {
        self.rg
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// In sync: every delta up to `expected - 1` is applied and no bulk is
    /// half-way.
    pub fn in_sync(&self) -> bool {
        self.expected.is_some() && self.bulk.is_none()
    }

    /// What this node reports in its Hello for this RG.
    pub fn sync_state(&self) -> pb::RgSyncState {
        let (applied_epoch, applied_seq) = match self.expected {
            Some(e) if self.bulk.is_none() => (self.epoch.0, e - 1),
            _ => (0, 0),
        };
        pb::RgSyncState {
            rg: self.rg.0.into(),
            epoch: self.epoch.0,
            role: pb::Role::Secondary as i32,
            applied_epoch,
            applied_seq,
            sender_incarnation: self.sender_incarnation,
        }
    }

    /// A connection came up; `peer_incarnation` is from the peer's Hello.
    pub fn on_connect(&mut self, peer_incarnation: u64) {
        if peer_incarnation != self.sender_incarnation {
            self.sender_incarnation = peer_incarnation;
            self.expected = None;
        }
        self.bulk_requested = false;
    }

    /// The stream or connection ended. An unfinished bulk is abandoned and
    /// deletes nothing.
    pub fn on_disconnect(&mut self) {
        self.abort_bulk();
        self.bulk_requested = false;
    }

    /// Drops a half-received bulk: nothing is deleted for it, and the stream
    /// is no longer a known prefix of the sender's (its BulkBegin reset the
    /// sequence), so the next connection must bulk again.
    fn abort_bulk(&mut self) {
        if self.bulk.take().is_some() {
            inc(&self.stats.bulks_aborted);
            self.expected = None;
        }
    }

    /// Applies one message of this RG's stream. Returns the messages to send
    /// back on the control stream (acks, bulk acks, bulk requests).
    pub fn on_message(
        &mut self,
        msg: &Msg,
        table: &mut impl Slices,
        local_primary: bool,
        now: Millis,
    ) -> Result<Vec<Msg>, RxError> {
        match msg {
            Msg::DeltaBatch(b) => self.on_batch(b, table, local_primary, now),
            Msg::BulkBegin(b) => self.on_bulk_begin(b, table, local_primary),
            Msg::BulkChunk(c) => self.on_bulk_chunk(c, table, local_primary, now),
            Msg::BulkEnd(e) => self.on_bulk_end(e, table, local_primary),
            _ => Err(RxError::Unexpected("control message on an RG stream")),
        }
    }

    fn check_rg(&self, rg: u32) -> Result<(), RxError> {
        if rg == u32::from(self.rg.0) {
            Ok(())
        } else {
            Err(RxError::WrongRg {
                expected: self.rg,
                got: rg,
            })
        }
    }

    /// Fencing and ownership: true if a message of `epoch` may be applied.
    fn admit(&mut self, epoch: u64, local_primary: bool, n: u64) -> bool {
        if local_primary {
            add(&self.stats.dropped_not_secondary, n);
            return false;
        }
        if epoch < self.epoch.0 {
            add(&self.stats.dropped_stale_epoch, n);
            return false;
        }
        if epoch > self.epoch.0 {
            // A new primary epoch: what came before is not a prefix of it.
            self.epoch = Epoch(epoch);
            self.abort_bulk();
            self.expected = None;
        }
        true
    }

    fn on_batch(
        &mut self,
        b: &pb::DeltaBatch,
        table: &mut impl Slices,
        local_primary: bool,
        now: Millis,
    ) -> Result<Vec<Msg>, RxError> {
        self.check_rg(b.rg)?;
        let mut ops = std::mem::take(&mut self.ops);
        ops.clear();
        let result = self
            .decode_batch(b, &mut ops)
            .and_then(|()| self.apply_batch(b, &ops, table, local_primary, now));
        self.ops = ops;
        result
    }

    /// A batch's records, all validated before any is applied: upserts of
    /// this RG's sessions and deletes.
    fn decode_batch(&self, b: &pb::DeltaBatch, ops: &mut Vec<Record>) -> Result<(), RxError> {
        for r in RecordReader::new(&b.records, b.count) {
            let r = r.map_err(RxError::Invalid)?;
            if let Record::Upsert(s) = &r
                && s.owner_rg != self.rg
            {
                return Err(RxError::Invalid(WireError(format!(
                    "session of {} on the {} stream",
                    s.owner_rg, self.rg
                ))));
            }
            ops.push(r);
        }
        Ok(())
    }

    fn apply_batch(
        &mut self,
        b: &pb::DeltaBatch,
        ops: &[Record],
        table: &mut impl Slices,
        local_primary: bool,
        now: Millis,
    ) -> Result<Vec<Msg>, RxError> {
        let n = ops.len() as u64;
        if !self.admit(b.epoch, local_primary, n) {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        let mut skip = 0usize;
        match self.expected {
            Some(e) if b.first_seq + n <= e => {
                add(&self.stats.dropped_duplicate, n);
                return Ok(vec![self.ack(e - 1)]);
            }
            Some(e) if b.first_seq < e => {
                skip = (e - b.first_seq) as usize;
                add(&self.stats.dropped_duplicate, skip as u64);
            }
            Some(e) if b.first_seq > e => {
                inc(&self.stats.gaps);
                self.expected = None;
            }
            _ => {}
        }
        let mark = self.bulk.as_ref().map(|x| x.mark);
        let (mut applied, mut refused) = (0, 0);
        let mut at = skip;
        while at < ops.len() {
            let end = (at + SLICE).min(ops.len());
            table.slice(|table| {
                for i in at..end {
                    if let Some(ahead) = ops[..end].get(i + PREFETCH_AHEAD) {
                        match ahead {
                            Record::Upsert(s) => table.prefetch_for_upsert(s),
                            Record::Delete(k) => table.prefetch_for_key(k),
                        }
                    }
                    let ok = match &ops[i] {
                        Record::Upsert(s) => table.apply_peer_upsert(s, now, mark).is_ok(),
                        Record::Delete(k) => table.apply_peer_delete(k).is_ok(),
                    };
                    if ok {
                        applied += 1;
                    } else {
                        refused += 1;
                    }
                }
            });
            at = end;
        }
        add(&self.stats.deltas_applied, applied);
        add(&self.stats.dropped_apply_refused, refused);
        match &mut self.expected {
            Some(e) => {
                *e = b.first_seq + n;
                out.push(self.ack(b.first_seq + n - 1));
            }
            None => out.extend(self.request_bulk("sequence gap")),
        }
        Ok(out)
    }

    fn ack(&self, seq: u64) -> Msg {
        Msg::Ack(pb::Ack {
            rg: self.rg.0.into(),
            epoch: self.epoch.0,
            seq,
        })
    }

    fn request_bulk(&mut self, reason: &str) -> Option<Msg> {
        if self.bulk_requested || self.bulk.is_some() {
            return None;
        }
        self.bulk_requested = true;
        inc(&self.stats.bulk_requests_sent);
        Some(Msg::BulkRequest(pb::BulkRequest {
            rg: self.rg.0.into(),
            epoch: self.epoch.0,
            reason: reason.to_string(),
        }))
    }

    fn on_bulk_begin(
        &mut self,
        b: &pb::BulkBegin,
        table: &mut impl Slices,
        local_primary: bool,
    ) -> Result<Vec<Msg>, RxError> {
        self.check_rg(b.rg)?;
        if !self.admit(b.epoch, local_primary, 0) {
            return Ok(Vec::new());
        }
        self.abort_bulk();
        // Room for the whole bulk up front: no repeated growth mid-bulk
        // (a no-op for a preallocated table, the daemon's default).
        let rg = self.rg;
        table.slice(|table| {
            table.reserve(
                usize::try_from(b.count_hint)
                    .unwrap_or(usize::MAX)
                    .saturating_sub(table.rg_len(rg)),
            )
        });
        let mark = BulkMark(self.next_mark);
        // Ids wrap before SyncMark::SENT, which says "sent", not a bulk.
        self.next_mark = Some(self.next_mark + 1)
            .filter(|&m| m < tandem_dataplane::session::SyncMark::SENT)
            .unwrap_or(1);
        self.bulk = Some(InBulk {
            id: b.bulk_id,
            mark,
            received: 0,
        });
        self.expected = Some(b.next_seq);
        self.bulk_requested = false;
        Ok(Vec::new())
    }

    fn current_bulk(&self, id: u64, epoch: u64) -> Result<(), RxError> {
        match &self.bulk {
            Some(b) if b.id == id && epoch == self.epoch.0 => Ok(()),
            _ => Err(RxError::Unexpected(
                "bulk message outside its BulkBegin/BulkEnd",
            )),
        }
    }

    fn on_bulk_chunk(
        &mut self,
        c: &pb::BulkChunk,
        table: &mut impl Slices,
        local_primary: bool,
        now: Millis,
    ) -> Result<Vec<Msg>, RxError> {
        self.check_rg(c.rg)?;
        let mut sessions = std::mem::take(&mut self.sessions);
        sessions.clear();
        let decoded = self.decode_chunk(c, &mut sessions);
        let result =
            decoded.and_then(|()| self.apply_chunk(c, &sessions, table, local_primary, now));
        self.sessions = sessions;
        result
    }

    /// A chunk's records: upserts of this RG's sessions, nothing else.
    fn decode_chunk(
        &self,
        c: &pb::BulkChunk,
        sessions: &mut Vec<SyncedSession>,
    ) -> Result<(), RxError> {
        sessions.reserve(c.count.min(MAX_CHUNK_RESERVE) as usize);
        for r in RecordReader::new(&c.records, c.count) {
            match r.map_err(RxError::Invalid)? {
                Record::Upsert(s) if s.owner_rg == self.rg => sessions.push(s),
                Record::Upsert(s) => {
                    return Err(RxError::Invalid(WireError(format!(
                        "bulk session of {} in a {} bulk",
                        s.owner_rg, self.rg
                    ))));
                }
                Record::Delete(_) => {
                    return Err(RxError::Invalid(WireError(
                        "delete record in a bulk chunk".into(),
                    )));
                }
            }
        }
        Ok(())
    }

    fn apply_chunk(
        &mut self,
        c: &pb::BulkChunk,
        sessions: &[SyncedSession],
        table: &mut impl Slices,
        local_primary: bool,
        now: Millis,
    ) -> Result<Vec<Msg>, RxError> {
        if !self.admit(c.epoch, local_primary, sessions.len() as u64) {
            return Ok(Vec::new());
        }
        self.current_bulk(c.bulk_id, c.epoch)?;
        let bulk = self.bulk.as_mut().expect("checked");
        bulk.received += sessions.len() as u64;
        let mark = Some(bulk.mark);
        for slice in sessions.chunks(SLICE) {
            let tally = table.slice(|t| t.apply_peer_upserts(slice, now, mark));
            add(&self.stats.bulk_sessions_applied, tally.applied);
            add(&self.stats.dropped_apply_refused, tally.refused);
        }
        Ok(Vec::new())
    }

    fn on_bulk_end(
        &mut self,
        e: &pb::BulkEnd,
        table: &mut impl Slices,
        local_primary: bool,
    ) -> Result<Vec<Msg>, RxError> {
        self.check_rg(e.rg)?;
        if !self.admit(e.epoch, local_primary, 0) {
            return Ok(Vec::new());
        }
        self.current_bulk(e.bulk_id, e.epoch)?;
        let bulk = self.bulk.take().expect("checked");
        if bulk.received != e.count {
            inc(&self.stats.bulk_count_mismatch);
            self.expected = None;
            return Ok(self
                .request_bulk("bulk count mismatch")
                .into_iter()
                .collect());
        }
        // In slices: a 1M-session reconcile never holds the table for more
        // than SLICE sessions. Messages of this RG wait until it is done
        // (this stream is handled in order), so nothing applied after the
        // bulk can be mistaken for stale.
        let rg = self.rg;
        let mut cursor = table.slice(|t| t.begin_export(rg));
        let mut report = ReconcileReport::default();
        while table.slice(|t| {
            t.reconcile_chunk(&mut cursor, SLICE, &mut report, |r| {
                SessionTable::is_marked(r, bulk.mark)
            })
        }) {}
        inc(&self.stats.bulks_received);
        add(&self.stats.reconcile_deleted, report.deleted);
        Ok(vec![Msg::BulkAck(pb::BulkAck {
            rg: self.rg.0.into(),
            epoch: self.epoch.0,
            bulk_id: bulk.id,
            applied: bulk.received,
            reconciled_deleted: report.deleted,
        })])
    }
}
