//! Counters for the sync layer. Each is an atomic the I/O tasks bump and a
//! plain snapshot the CLI and metrics read (serializable to JSON).

macro_rules! counters {
    ($(#[$doc:meta])* $name:ident / $snap:ident { $($(#[$fdoc:meta])* $field:ident),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Default, Debug)]
        pub struct $name {
            $($(#[$fdoc])* pub $field: std::sync::atomic::AtomicU64,)*
        }

        #[derive(Default, Debug, Clone, PartialEq, Eq, serde::Serialize)]
        pub struct $snap {
            $(pub $field: u64,)*
        }

        impl $name {
            pub fn snapshot(&self) -> $snap {
                $snap { $($field: self.$field.load(std::sync::atomic::Ordering::Relaxed),)* }
            }
        }
    };
}

/// Bumps a counter by one.
#[inline]
pub fn inc(c: &std::sync::atomic::AtomicU64) {
    c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

#[inline]
pub fn add(c: &std::sync::atomic::AtomicU64, n: u64) {
    c.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
}

#[inline]
pub fn set(c: &std::sync::atomic::AtomicU64, v: u64) {
    c.store(v, std::sync::atomic::Ordering::Relaxed);
}

counters!(
    /// Per-RG replication counters, both directions.
    RgSyncStats / RgSyncSnapshot {
        /// Sender: deltas written to the RG's stream.
        deltas_sent,
        batches_sent,
        bytes_sent,
        /// Sender: batches re-sent after a reconnect.
        replayed_batches,
        /// Sender: unacked batches dropped because the replay buffer was full.
        replay_evicted_batches,
        /// Sender: deltas of TCP sessions still in their handshake, not
        /// sent (their establishment sends them).
        deltas_unreplicated,
        /// Sender: changes of sessions removed before a batch read them,
        /// not sent (a session that closed before its create went out
        /// costs nothing on the wire).
        deltas_coalesced,
        /// Sender gauge: unacked batches and bytes held for replay.
        replay_depth_batches,
        replay_depth_bytes,
        /// Sender gauge: age of the oldest unacked batch (replication lag).
        oldest_unacked_ms,
        bulks_sent,
        bulk_sessions_sent,
        bulks_acked,
        /// Sender gauge: BulkBegin to BulkAck of the last completed bulk.
        last_bulk_ms,
        /// Receiver: deltas now in the local table.
        deltas_applied,
        /// Receiver: deltas of an older epoch than the RG's current one.
        dropped_stale_epoch,
        /// Receiver: deltas for an RG this node is primary for.
        dropped_not_secondary,
        /// Receiver: deltas already applied (overlap after a replay).
        dropped_duplicate,
        /// Receiver: deltas the table refused (capacity, local-owned conflict).
        dropped_apply_refused,
        /// Receiver: sequence gaps seen (each one requests a bulk).
        gaps,
        bulks_received,
        /// Receiver: bulks cut off before BulkEnd (nothing deleted).
        bulks_aborted,
        /// Receiver: BulkEnd count differed from sessions received.
        bulk_count_mismatch,
        bulk_sessions_applied,
        reconcile_deleted,
        bulk_requests_sent,
        bulk_requests_received,
    }
);

counters!(
    /// Connection-level counters.
    ConnStats / ConnSnapshot {
        connects,
        disconnects,
        /// A newer connection from the peer replaced the current one.
        replaced,
        dial_failures,
        /// TLS handshake refused (no certificate, other CA, bad ALPN).
        handshakes_refused,
        /// CA-valid certificate not issued to the configured peer name.
        peer_name_rejected,
        /// Hello with another cluster id, node id or protocol version.
        hello_rejected,
        /// Frames rejected, by kind; each closes the connection.
        frames_oversized,
        frames_malformed,
        frames_unknown,
        frames_truncated,
        /// Valid frames with invalid content (bad address, RG 0, ...).
        invalid_sessions,
        /// A message on a stream where it does not belong.
        unexpected_messages,
        heartbeats_received,
        /// Datagrams that were not a single valid heartbeat frame.
        bad_datagrams,
        /// Messages for the election dropped because its queue was full.
        election_dropped,
        /// Control messages not sent: disconnected or queue full.
        control_dropped,
        acks_received,
    }
);
