//! The session table: one slab of records and FxHash indexes of handles.
//!
//! * `fwd`: forward key -> handle; `rev`: reverse (reply, post-NAT) key ->
//!   handle; `nat`: source-NAT binding (the un-SNAT "DNAT" companion) ->
//!   handle; `rgs`: owner RG -> member handles (per-RG export, demote,
//!   promote, reconcile).
//! * The indexes store only the 4-byte handle; the key lives once, in the
//!   record, and every index hit compares it. A handle whose slot was reused
//!   therefore never yields the wrong session, and an index costs ~10 bytes
//!   per session instead of ~90 for a key->handle map at this size.
//! * Companions of a session: its reverse entry, its NAT binding entry and
//!   its port reservation. `insert` takes them all or none; every removal
//!   (local close, expiry, peer delete, reconcile, replace) goes through
//!   [`SessionTable::remove`]'s one body, `remove_handle`.
//!
//! The table is a pure data structure: it takes `now` as an argument and
//! emits no I/O. Structure changes take `&mut self`; what a forwarded packet
//! of an established session changes (counters, last seen) is atomic and
//! takes `&self` ([`SessionTable::touch`]), so workers forward under a shared
//! lock. Every operation that walks many sessions (expiry, reconcile,
//! export) also exists as a bounded slice, so a caller can release the lock
//! between slices ([`SessionTable::expire_slice`],
//! [`SessionTable::reconcile_chunk`], [`SessionTable::export_chunk`]).

mod addr_counts;
mod index;
pub mod key;
pub mod ports;
pub mod record;
mod segvec;
mod shared;
mod slot_addr;
mod wheel;

#[cfg(test)]
mod tests;

pub use addr_counts::AddressCounts;
pub use key::{Addr, NatBinding, SessionKey, ZoneId, proto};
pub use record::{
    Activity, Direction, FlowCounters, InterfaceId, Millis, Nat, Origin, PolicyId, SessionRecord,
    SyncMark, TcpState, TcpTrack, Timeouts, establishes, nat_of, reverse_key,
};
pub use shared::{
    SLICE, SharedTable, Sliced, Slices, TableCell, lock, lock_between_bursts, lock_upgrade, read,
    shared,
};

use crate::events::{CloseReason, EventKind, FlowEvent};
use index::{HandleIndex, Tag};
use ports::{Allocated, NIL, NatMappings, SOLE, endpoint_tag};
pub use ports::{Endpoint, Mapping};
use record::snat_binding_of;
use rustc_hash::{FxHashMap, FxHashSet};
use segvec::SegVec;
use slab::Slab;
use slot_addr::SlotAddr;
use std::mem::{offset_of, size_of};
use std::ops::RangeInclusive;
use tandem_proto::RgId;
use wheel::{NOT_QUEUED, Wheel, WheelEntry};

/// Where the table's `now` comes from. Every user of one table must read
/// the same clock; simulations inject their simulated time.
pub type Clock = std::sync::Arc<dyn Fn() -> Millis + Send + Sync>;

/// Milliseconds since the first call in this process (CLOCK_MONOTONIC).
pub fn monotonic_clock() -> Clock {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let start = *START.get_or_init(std::time::Instant::now);
    // Offset so that time 0 is never a valid "last seen".
    std::sync::Arc::new(move || Millis(start.elapsed().as_millis() as u64 + 1_000))
}

/// Default session capacity: inserts beyond it are refused and counted.
pub const DEFAULT_CAPACITY: usize = 1 << 20;

/// A slot in the table. Valid until the session is removed; after that the
/// slot may hold another session, which [`SessionTable::resolve`] detects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SessionHandle(pub u32);

#[derive(Clone, Debug)]
pub struct TableConfig {
    pub capacity: usize,
    pub timeouts: Timeouts,
    /// Wheel granularity; sessions expire at most one tick late.
    pub wheel_tick_ms: u64,
    pub wheel_buckets: usize,
    pub watermarks: Watermarks,
    /// Keep live-session counts per source and destination address (for
    /// screens' session limits, [`AddressCounts`]).
    pub address_counts: bool,
    /// Allocate and touch the slab and indexes for `capacity` sessions at
    /// creation: the daemon's memory is then fixed at start, and no insert
    /// (a bulk from the peer, a SYN flood) ever waits on growth or on the
    /// kernel zeroing fresh pages. Off for small tables in tests.
    pub preallocate: bool,
}

impl Default for TableConfig {
    fn default() -> TableConfig {
        TableConfig {
            capacity: DEFAULT_CAPACITY,
            timeouts: Timeouts::default(),
            wheel_tick_ms: 250,
            wheel_buckets: 8192,
            watermarks: Watermarks::default(),
            address_counts: false,
            preallocate: false,
        }
    }
}

/// Source NAT for a new local session: translate to `addr` with the
/// source endpoint's live mapping (endpoint-independent), else a new one
/// keeping the original source port when it is free in `ports`, else the
/// next free one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnatRequest {
    pub addr: Addr,
    pub ports: RangeInclusive<u16>,
}

/// A session the local dataplane wants to create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewSession {
    pub key: SessionKey,
    pub egress_zone: ZoneId,
    pub snat: Option<SnatRequest>,
    /// Destination translation (address, port) of forward packets.
    pub dnat: Option<(Addr, u16)>,
    pub ingress_if: InterfaceId,
    pub egress_if: InterfaceId,
    pub owner_rg: RgId,
    pub policy: PolicyId,
    pub tcp_state: TcpState,
}

/// A session as the peer describes it: no node-local data (handles,
/// ifindexes, MACs) and times as ages, so clocks need not agree. This is the
/// table's side of the wire conversion (`tandem-cluster` maps it to proto).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncedSession {
    pub key: SessionKey,
    pub reverse: SessionKey,
    pub owner_rg: RgId,
    pub ingress_if: InterfaceId,
    pub egress_if: InterfaceId,
    pub policy: PolicyId,
    pub tcp_state: TcpState,
    pub timeout_ms: u32,
    /// Time since creation, at the sender, when it was sent.
    pub age_ms: u64,
    /// Time since the last packet, at the sender, when it was sent.
    pub idle_ms: u64,
    pub counters: FlowCounters,
    /// A SYN-proxied session's sequence translation ([`Proxy::Shift`]).
    pub seq_shift: Option<u32>,
}

impl SyncedSession {
    /// The translation this session applies (derived from its two keys).
    pub fn nat(&self) -> Nat {
        record::nat_of(&self.key, &self.reverse)
    }
}

impl SessionRecord {
    /// The one conversion from a record to its peer form (the table adds
    /// what it keeps beside the record: [`SessionTable::to_synced`]).
    fn synced(&self, now: Millis, seq_shift: Option<u32>) -> SyncedSession {
        SyncedSession {
            key: self.key,
            reverse: self.reverse,
            owner_rg: self.owner_rg,
            ingress_if: self.ingress_if,
            egress_if: self.egress_if,
            policy: self.policy,
            tcp_state: self.tcp_state,
            timeout_ms: self.timeout_ms,
            age_ms: now.saturating_sub(self.created),
            idle_ms: now.saturating_sub(self.last_seen()),
            counters: self.counters(),
            seq_shift,
        }
    }
}

/// A SYN-proxied session's sequence state ([`crate::screen`]): while the
/// firewall's handshake with the server runs, the cookie it gave the
/// client and the client's ISN; then the shift from the server's sequence
/// numbers to the ones the client knows (server ISN - cookie).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proxy {
    Pending { cookie: u32, client_isn: u32 },
    Shift(u32),
}

/// Table pressure: from `high_pct` percent of capacity new sessions first
/// evict an unestablished one (early drop) and the early-ageing pass
/// expires sessions idle longer than `early_ageout_ms`, until the table is
/// back at `low_pct`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Watermarks {
    pub high_pct: u8,
    pub low_pct: u8,
    pub early_ageout_ms: u32,
}

impl Default for Watermarks {
    fn default() -> Watermarks {
        Watermarks {
            high_pct: 90,
            low_pct: 80,
            early_ageout_ms: 20_000,
        }
    }
}

/// Slab slots an early drop looks at (sequentially from a rotating
/// cursor) once it has a candidate, at most while it has none, and
/// unestablished candidates it compares by age.
pub const EARLY_DROP_PROBES: usize = 64;
pub const EARLY_DROP_MAX_PROBES: usize = 1024;
/// Inserts that skip early drop after a scan found no candidate (a table
/// above its watermark full of established sessions must not pay a full
/// scan per insert).
pub const EARLY_DROP_BACKOFF: u32 = 256;
/// Client segments held for pending proxied sessions, table-wide (beyond:
/// dropped, the client retransmits).
pub const PROXY_HELD_LIMIT: usize = 4096;
pub const EARLY_DROP_CANDIDATES: usize = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InsertError {
    /// The table holds `capacity` sessions.
    Capacity,
    /// Addresses of mixed families, or a translation to the other family.
    InvalidKey,
    ForwardExists,
    ReverseExists,
    NatBindingExists,
    /// No free port in the SNAT range for that address and protocol.
    PortsExhausted,
    /// A peer upsert or delete hit a session this node owns (its RG is
    /// primary here): the local copy is authoritative and is kept.
    LocalOwnedConflict,
}

impl InsertError {
    pub fn as_str(self) -> &'static str {
        match self {
            InsertError::Capacity => "capacity",
            InsertError::InvalidKey => "invalid-key",
            InsertError::ForwardExists => "forward-exists",
            InsertError::ReverseExists => "reverse-exists",
            InsertError::NatBindingExists => "nat-binding-exists",
            InsertError::PortsExhausted => "ports-exhausted",
            InsertError::LocalOwnedConflict => "local-owned-conflict",
        }
    }
}

impl std::fmt::Display for InsertError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for InsertError {}

/// Why a session left the table (a counter per reason).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RemoveReason {
    /// The local dataplane closed it (RST, policy change, operator clear).
    Closed = 0,
    Expired = 1,
    /// The owner RG's primary deleted it.
    PeerDelete = 2,
    /// A completed bulk did not contain it.
    Reconciled = 3,
    /// Superseded by a peer upsert with other keys or NAT.
    Replaced = 4,
    Flushed = 5,
    /// Evicted, unestablished, for a new session above the high watermark.
    EarlyDropped = 6,
}

impl RemoveReason {
    pub const ALL: [RemoveReason; 7] = [
        RemoveReason::Closed,
        RemoveReason::Expired,
        RemoveReason::PeerDelete,
        RemoveReason::Reconciled,
        RemoveReason::Replaced,
        RemoveReason::Flushed,
        RemoveReason::EarlyDropped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RemoveReason::Closed => "closed",
            RemoveReason::Expired => "expired",
            RemoveReason::PeerDelete => "peer-delete",
            RemoveReason::Reconciled => "reconciled",
            RemoveReason::Replaced => "replaced",
            RemoveReason::Flushed => "flushed",
            RemoveReason::EarlyDropped => "early-dropped",
        }
    }
}

/// Monotonic counters; every refusal has a reason.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableCounters {
    pub inserted_local: u64,
    pub inserted_peer: u64,
    pub updated_peer: u64,
    pub removed: [u64; RemoveReason::ALL.len()],
    pub refused_capacity: u64,
    pub refused_invalid: u64,
    pub refused_conflict: u64,
    pub refused_ports_exhausted: u64,
    /// Close events not logged: the close log was full.
    pub close_events_dropped: u64,
    pub refused_local_owned: u64,
    /// Peer-synced sessions evicted because a newer peer session claimed
    /// their reverse key or NAT binding.
    pub evicted_by_peer: u64,
    /// Unestablished sessions evicted for a new one above the high
    /// watermark, and sessions expired early (idle past the early-ageout)
    /// while above it.
    pub early_dropped: u64,
    pub early_aged: u64,
    /// Times the table went above its high watermark, and back to its low
    /// one.
    pub pressure_entered: u64,
    pub pressure_left: u64,
    /// Replicated sessions this node was authoritative for that were
    /// removed before the sender ever sent them: their create and delete
    /// coalesced into nothing on the control link.
    pub closed_before_sync: u64,
}

impl TableCounters {
    pub fn removed(&self, r: RemoveReason) -> u64 {
        self.removed[r as usize]
    }

    fn refuse(&mut self, e: InsertError) -> InsertError {
        let c = match e {
            InsertError::Capacity => &mut self.refused_capacity,
            InsertError::InvalidKey => &mut self.refused_invalid,
            InsertError::ForwardExists
            | InsertError::ReverseExists
            | InsertError::NatBindingExists => &mut self.refused_conflict,
            InsertError::PortsExhausted => &mut self.refused_ports_exhausted,
            InsertError::LocalOwnedConflict => &mut self.refused_local_owned,
        };
        *c += 1;
        e
    }
}

/// What a peer upsert did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerApply {
    Inserted,
    Updated,
    /// The key existed with other NAT or owner RG; old copy removed first.
    Replaced,
}

/// Identifies one bulk transfer; sessions it carries are stamped with it so
/// the reconcile at its end needs no separate key set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BulkMark(pub u32);

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Peer-synced sessions of the RG that were checked.
    pub examined: u64,
    pub deleted: u64,
    /// Sessions with companions among the deleted (NAT binding + port).
    pub deleted_with_nat: u64,
}

/// A position in a walk over one RG's member list (export, reconcile),
/// which may be interrupted by any change to the table between chunks.
///
/// The walk goes from the end of the list to its start; removal is a
/// swap-remove, which only ever moves the *last* member into the hole. So
/// a member not yet visited (below the cursor) never moves above it: every
/// session present for the whole walk is visited. A removal below the
/// cursor may move an already visited member below it, which is then
/// visited twice (harmless for an upsert or a reconcile check); sessions
/// added after the walk started are appended above it and not visited
/// (a bulk covers them with deltas). Holds no borrow and needs no ending.
#[derive(Debug)]
pub struct ExportCursor {
    rg: RgId,
    /// Members at indexes below this are still to visit.
    pos: usize,
}

impl ExportCursor {
    pub fn rg(&self) -> RgId {
        self.rg
    }
}

/// Keeps `T` on cache lines of its own.
#[derive(Clone, Copy, Debug, Default)]
#[repr(align(64))]
pub(crate) struct LineOf<T>(pub T);

/// The table's fields in two groups on separate cache lines: what workers
/// read for every lookup (slab, indexes, slot addresses, roles), then what
/// every insert or removal writes (counters, wheel, member lists, ports).
/// Mixed on one line, a bulk applied on one core would invalidate the
/// lines every lookup on the other core reads — measured: slices of 32
/// upserts took up to 4× longer and the worker's bursts 3× longer.
#[repr(C)]
pub struct SessionTable {
    slab: Slab<SessionRecord>,
    /// Where each slot's record lies, for prefetching without a read.
    slot_addr: SlotAddr,
    fwd: HandleIndex,
    rev: HandleIndex,
    primary_rgs: FxHashSet<RgId>,
    cfg: TableConfig,
    _written_below: LineOf<()>,
    /// Members of each owner RG (swap-remove on removal).
    rgs: FxHashMap<RgId, SegVec<u32>>,
    mappings: NatMappings,
    /// Per slot: (previous, next) session of the same NAT mapping, so a
    /// mapping's sessions can be walked (peer eviction, address-dependent
    /// filtering) without an index entry per session.
    mapping_links: Vec<[u32; 2]>,
    wheel: Wheel,
    /// Close events of sessions this node logs (see [`crate::events`]),
    /// at most [`CLOSE_LOG`], drained by the event collector; `None`:
    /// logging is off.
    closes: Option<Vec<FlowEvent>>,
    /// The wheel tick an interrupted expiry pass is in, and how many of its
    /// bucket's entries (a prefix) are still to examine.
    expiring: Option<(u64, usize)>,
    /// Sequence state of SYN-proxied sessions, by handle (a companion:
    /// removed with its session).
    proxies: FxHashMap<u32, Proxy>,
    /// A client segment per pending proxied session, held until the
    /// server's handshake completes (at most [`PROXY_HELD_LIMIT`]).
    proxy_held: FxHashMap<u32, Vec<u8>>,
    /// Live sessions per address, when kept (`TableConfig::address_counts`).
    address_counts: Option<Box<AddressCounts>>,
    /// Above the high watermark (until back at the low one).
    under_pressure: bool,
    /// Where the next early drop and early-ageing pass look (slab slots).
    early_drop_at: usize,
    /// Inserts left before early drop looks again (after a fruitless scan).
    early_drop_backoff: u32,
    ageing_at: usize,
    counters: TableCounters,
}

/// Bytes of a record a forward-key comparison reads: the key and the
/// slab's occupancy niche (`tcp_state`, right after it).
const FWD_KEY_SPAN: (usize, usize) = (
    offset_of!(SessionRecord, key),
    offset_of!(SessionRecord, tcp_state) + 1,
);
/// The same for a reverse-key comparison: `tcp_state`, then the reverse key.
const REV_KEY_SPAN: (usize, usize) = (
    offset_of!(SessionRecord, tcp_state),
    offset_of!(SessionRecord, reverse) + size_of::<SessionKey>(),
);

/// Close events the table holds for the collector before it drops and
/// counts them (`close_events_dropped`): 8,192 × 200 bytes.
pub const CLOSE_LOG: usize = 8192;

/// Members a walk (export, reconcile) takes and prefetches at a time.
const WALK_BATCH: usize = 32;

/// What one [`SessionTable::expire_slice`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExpireSlice {
    pub examined: usize,
    pub expired: usize,
    /// Every tick up to `now` has been processed.
    pub done: bool,
}

/// Outcome counts of [`SessionTable::apply_peer_upserts`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UpsertTally {
    pub applied: u64,
    /// Refused (each counted by reason in the table counters).
    pub refused: u64,
}

/// A session's index tags, hashed once per operation and used for its
/// prefetches, its probes and its index updates alike.
#[derive(Clone, Copy, Default)]
struct Probes {
    fwd: Tag,
    rev: Tag,
    nat: Option<NatBinding>,
    /// The mapping's endpoint-index tag (with `nat`).
    endpoint: Option<Tag>,
}

impl Probes {
    #[inline]
    fn of(key: &SessionKey, reverse: &SessionKey) -> Probes {
        let nat = nat_companion(key, reverse);
        Probes {
            fwd: Tag::of(key),
            rev: Tag::of(reverse),
            nat,
            endpoint: nat.map(|b| endpoint_tag(&internal_endpoint(key), b.addr, b.proto)),
        }
    }
}

/// The NAT binding that is a companion of a session: only port-multiplexed
/// protocols reserve a port and get an un-SNAT entry.
fn nat_companion(key: &SessionKey, reverse: &SessionKey) -> Option<NatBinding> {
    snat_binding_of(key, reverse).filter(|_| proto::has_ports(key.proto))
}

/// The inside end of a session's source-NAT mapping: its original source.
fn internal_endpoint(key: &SessionKey) -> Endpoint {
    Endpoint {
        addr: key.src,
        port: key.src_port,
        zone: key.zone,
    }
}

/// Starts loading the cache line holding `addr`: a hint that never faults
/// and never dereferences (the address carries no provenance).
#[inline]
pub(crate) fn prefetch_addr(addr: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetch is a hint; it never faults, even on a bad address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
            std::ptr::without_provenance(addr),
        );
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = addr;
}

#[inline]
pub(crate) fn prefetch<T>(r: Option<&T>) {
    #[cfg(target_arch = "x86_64")]
    if let Some(r) = r {
        // SAFETY: prefetch is a hint; it never faults, even on a bad address.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                (r as *const T).cast::<i8>(),
            );
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = r;
}

impl Default for SessionTable {
    fn default() -> Self {
        SessionTable::new(TableConfig::default())
    }
}

impl SessionTable {
    pub fn new(cfg: TableConfig) -> SessionTable {
        let mut t = SessionTable::empty(cfg);
        if t.cfg.preallocate {
            t.reserve(t.cfg.capacity);
            // The mappings' endpoint index too: grown on demand, a
            // million-session bulk of NATed sessions would rehash it inside
            // one writer's slice (tens of ms with the workers waiting).
            t.mappings.reserve(t.cfg.capacity);
            t.prefault_slab();
        }
        t
    }

    /// Writes every slab slot once so its pages are resident.
    fn prefault_slab(&mut self) {
        let blank = SessionRecord::blank();
        while self.slab.len() < self.slab.capacity() {
            self.slab.insert(blank.clone());
        }
        self.refresh_slot_addr();
        self.slab.clear();
    }

    fn empty(mut cfg: TableConfig) -> SessionTable {
        // Handles stay below the head slots' SOLE flag.
        cfg.capacity = cfg.capacity.min(SOLE as usize - 1);
        SessionTable {
            slab: Slab::new(),
            slot_addr: SlotAddr::new(),
            fwd: HandleIndex::default(),
            rev: HandleIndex::default(),
            rgs: FxHashMap::default(),
            primary_rgs: FxHashSet::default(),
            mappings: NatMappings::default(),
            mapping_links: Vec::new(),
            closes: None,
            wheel: Wheel::new(cfg.wheel_buckets, cfg.wheel_tick_ms),
            expiring: None,
            _written_below: LineOf(()),
            proxies: FxHashMap::default(),
            proxy_held: FxHashMap::default(),
            address_counts: cfg.address_counts.then(Box::default),
            under_pressure: false,
            early_drop_at: 0,
            early_drop_backoff: 0,
            ageing_at: 0,
            cfg,
            counters: TableCounters::default(),
        }
    }

    /// The session count at which pressure starts, and where it ends.
    fn watermarks(&self) -> (usize, usize) {
        let w = self.cfg.watermarks;
        let at = |pct: u8| self.cfg.capacity * usize::from(pct.min(100)) / 100;
        (at(w.high_pct).max(1), at(w.low_pct.min(w.high_pct)))
    }

    /// Slab slots a full pass over the table visits.
    pub fn capacity_slots(&self) -> usize {
        self.slab.capacity()
    }

    /// The high and low watermarks in sessions.
    pub fn watermark_sessions(&self) -> (usize, usize) {
        self.watermarks()
    }

    /// Whether the table is above its high watermark (and not yet back
    /// at its low one).
    pub fn under_pressure(&self) -> bool {
        self.under_pressure
    }

    fn update_pressure(&mut self) {
        let (high, low) = self.watermarks();
        let n = self.slab.len();
        if !self.under_pressure && n >= high {
            self.under_pressure = true;
            self.counters.pressure_entered += 1;
        } else if self.under_pressure && n <= low {
            self.under_pressure = false;
            self.counters.pressure_left += 1;
        }
    }

    /// Live sessions from `src` and to `dst`, if the table keeps counts.
    pub fn address_counts(&self, src: &Addr, dst: &Addr) -> Option<(u32, u32)> {
        self.address_counts.as_ref().map(|c| c.get(src, dst))
    }

    /// The SYN proxy's state of session `h`, if it is proxied.
    pub fn proxy(&self, h: SessionHandle) -> Option<Proxy> {
        let r = self.slab.get(h.0 as usize)?;
        if !r.proxied() {
            return None;
        }
        self.proxies.get(&h.0).copied()
    }

    /// Sets the SYN proxy's state of session `h`.
    pub fn set_proxy(&mut self, h: SessionHandle, p: Proxy) {
        if let Some(r) = self.slab.get_mut(h.0 as usize) {
            r.flags |= record::PROXIED;
            self.proxies.insert(h.0, p);
        }
    }

    /// Holds `frame` (a client segment) until session `h`'s proxy
    /// handshake completes; false if it is not pending, already holds one,
    /// or the table holds [`PROXY_HELD_LIMIT`].
    pub fn hold_proxy_segment(&mut self, h: SessionHandle, frame: &[u8]) -> bool {
        let pending = matches!(self.proxy(h), Some(Proxy::Pending { .. }));
        if !pending
            || self.proxy_held.len() >= PROXY_HELD_LIMIT
            || self.proxy_held.contains_key(&h.0)
        {
            return false;
        }
        self.proxy_held.insert(h.0, frame.to_vec());
        true
    }

    /// The client segment held for session `h`, if any.
    pub fn take_proxy_segment(&mut self, h: SessionHandle) -> Option<Vec<u8>> {
        self.proxy_held.remove(&h.0)
    }

    /// Session `h` in peer form: the one conversion, record and what the
    /// table keeps beside it.
    pub fn to_synced(&self, h: SessionHandle, now: Millis) -> Option<SyncedSession> {
        let r = self.slab.get(h.0 as usize)?;
        Some(r.synced(now, self.seq_shift(h.0, r)))
    }

    fn seq_shift(&self, h: u32, r: &SessionRecord) -> Option<u32> {
        match r.proxied().then(|| self.proxies.get(&h)).flatten() {
            Some(Proxy::Shift(d)) => Some(*d),
            _ => None,
        }
    }

    /// Makes room for one session above the high watermark: evicts the
    /// oldest unestablished authoritative session among the first
    /// [`EARLY_DROP_CANDIDATES`] found in [`EARLY_DROP_PROBES`] slots from
    /// a rotating cursor (looking on, up to [`EARLY_DROP_MAX_PROBES`],
    /// while none is found). Bounded work per insert; false when none was
    /// found (the insert then proceeds up to capacity).
    fn early_drop(&mut self) -> bool {
        if self.early_drop_backoff > 0 {
            self.early_drop_backoff -= 1;
            return false;
        }
        let slots = self.slab.capacity().max(1);
        let mut best: Option<(Millis, usize)> = None;
        let mut found = 0;
        for probe in 0..EARLY_DROP_MAX_PROBES.min(slots) {
            if probe >= EARLY_DROP_PROBES && found > 0 {
                break;
            }
            let i = self.early_drop_at % slots;
            self.early_drop_at = i + 1;
            let Some(r) = self.slab.get(i) else { continue };
            if !r.is_unestablished() || !self.is_authoritative(r) {
                continue;
            }
            if best.is_none_or(|(c, _)| r.created < c) {
                best = Some((r.created, i));
            }
            found += 1;
            if found == EARLY_DROP_CANDIDATES {
                break;
            }
        }
        let Some((_, h)) = best else {
            self.early_drop_backoff = EARLY_DROP_BACKOFF;
            return false;
        };
        self.remove_handle(h as u32, RemoveReason::EarlyDropped);
        self.counters.early_dropped += 1;
        true
    }

    /// While under pressure, one slice of the early-ageing pass: up to
    /// `budget` slab slots from where the last slice stopped; authoritative
    /// sessions idle longer than the early-ageout (or their own timeout)
    /// go, `on_expired` seeing each first (for its delete delta).
    pub fn early_age_slice(
        &mut self,
        now: Millis,
        budget: usize,
        mut on_expired: impl FnMut(&SessionRecord),
    ) -> ExpireSlice {
        let mut out = ExpireSlice {
            done: true,
            ..ExpireSlice::default()
        };
        if !self.under_pressure {
            return out;
        }
        let slots = self.slab.capacity().max(1);
        let ageout = u64::from(self.cfg.watermarks.early_ageout_ms);
        for _ in 0..budget.min(slots) {
            let i = self.ageing_at % slots;
            self.ageing_at = i + 1;
            out.examined += 1;
            let Some(r) = self.slab.get(i) else { continue };
            let idle = now.saturating_sub(r.last_seen());
            if !self.is_authoritative(r) || idle < ageout.min(u64::from(r.timeout_ms)) {
                continue;
            }
            on_expired(r);
            self.remove_handle(i as u32, RemoveReason::Expired);
            self.counters.early_aged += 1;
            out.expired += 1;
            if !self.under_pressure || out.expired == SLICE {
                break;
            }
        }
        out.done = !self.under_pressure || self.ageing_at.is_multiple_of(slots);
        out
    }

    /// Re-derives the slot addresses after the slab's buffer may have moved
    /// without an insert (a reserve).
    fn refresh_slot_addr(&mut self) {
        if let Some((h, _)) = self.slab.iter().next() {
            self.slot_addr.update(&self.slab, h);
        }
    }

    pub fn config(&self) -> &TableConfig {
        &self.cfg
    }

    pub fn len(&self) -> usize {
        self.slab.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slab.is_empty()
    }

    pub fn counters(&self) -> &TableCounters {
        &self.counters
    }

    /// Sessions owned by `rg` (local and peer-synced).
    pub fn rg_len(&self, rg: RgId) -> usize {
        self.rgs.get(&rg).map_or(0, SegVec::len)
    }

    /// RGs that currently have sessions, sorted.
    pub fn rgs(&self) -> Vec<RgId> {
        let mut v: Vec<RgId> = self.rgs.keys().copied().collect();
        v.sort_unstable();
        v
    }

    pub fn is_primary(&self, rg: RgId) -> bool {
        self.primary_rgs.contains(&rg)
    }

    /// Whether this node holds the authoritative copy of `r`: it is primary
    /// for the session's owner RG, or the RG is local-only (RG0).
    #[inline]
    pub fn is_authoritative(&self, r: &SessionRecord) -> bool {
        !r.owner_rg.is_data() || self.primary_rgs.contains(&r.owner_rg)
    }

    /// Where the authoritative copy of `r` is (derived from its RG's role).
    pub fn origin(&self, r: &SessionRecord) -> Origin {
        if self.is_authoritative(r) {
            Origin::LocalOwned
        } else {
            Origin::PeerSynced
        }
    }

    /// Public ports with a live mapping (each held by one or more
    /// sessions of one internal endpoint).
    pub fn reserved_ports(&self) -> u64 {
        self.mappings.reserved()
    }

    // ----- lookups -------------------------------------------------------

    #[inline]
    pub fn lookup_forward(&self, key: &SessionKey) -> Option<SessionHandle> {
        self.find_forward(key, Tag::of(key))
    }

    #[inline]
    pub fn lookup_reverse(&self, key: &SessionKey) -> Option<SessionHandle> {
        self.find_reverse(key, Tag::of(key))
    }

    /// The un-SNAT ("DNAT"/"DNATv6") lookup: the newest session holding
    /// this translated source endpoint.
    #[inline]
    pub fn lookup_nat_binding(&self, b: &NatBinding) -> Option<SessionHandle> {
        self.nat_mapping(b).map(|m| SessionHandle(m.head))
    }

    /// The live mapping of a public (address, port, protocol): its
    /// internal endpoint and newest session.
    #[inline]
    pub fn nat_mapping(&self, b: &NatBinding) -> Option<Mapping> {
        let raw = self.mappings.head(b);
        (raw != NIL).then(|| Mapping {
            internal: self.endpoint_of(raw & !SOLE),
            head: raw & !SOLE,
            sole: raw & SOLE != 0,
        })
    }

    /// Sessions using the mapping of `b` (O(sessions): for display and
    /// tests).
    pub fn mapping_len(&self, b: &NatBinding) -> usize {
        self.nat_mapping(b)
            .map_or(0, |m| self.mapping_sessions(&m).count())
    }

    /// The public port `internal` is mapped to on (`addr`, `proto`).
    pub fn mapped_port(&self, addr: Addr, proto: u8, internal: &Endpoint) -> Option<u16> {
        let slab = &self.slab;
        self.mappings.port_of(addr, proto, internal, |h| {
            internal_endpoint(&slab[h as usize].key)
        })
    }

    /// The internal endpoint of session `h`'s mapping.
    fn endpoint_of(&self, h: u32) -> Endpoint {
        internal_endpoint(&self.slab[h as usize].key)
    }

    /// The sessions of a mapping, newest first.
    pub fn mapping_sessions(&self, m: &Mapping) -> impl Iterator<Item = SessionHandle> + '_ {
        let sole = m.sole;
        std::iter::successors(Some(m.head).filter(|&h| h != NIL), move |&h| {
            (!sole)
                .then(|| self.mapping_links[h as usize][1])
                .filter(|&n| n != NIL)
        })
        .map(SessionHandle)
    }

    #[inline]
    fn find_forward(&self, key: &SessionKey, tag: Tag) -> Option<SessionHandle> {
        self.fwd
            .find(tag, |h| self.slab[h as usize].key == *key)
            .map(SessionHandle)
    }

    #[inline]
    fn find_reverse(&self, key: &SessionKey, tag: Tag) -> Option<SessionHandle> {
        self.rev
            .find(tag, |h| self.slab[h as usize].reverse == *key)
            .map(SessionHandle)
    }

    /// Forward lookups for a burst of packets: candidates are found by tag
    /// for the whole burst and their records prefetched before any key is
    /// compared, so the memory latency of one lookup overlaps the others.
    /// Same results as calling [`SessionTable::lookup_forward`] per key.
    pub fn lookup_forward_burst(&self, keys: &[SessionKey], out: &mut [Option<SessionHandle>]) {
        self.burst(&self.fwd, keys, out, FWD_KEY_SPAN, |r| &r.key);
    }

    /// Reverse-key counterpart of [`SessionTable::lookup_forward_burst`].
    pub fn lookup_reverse_burst(&self, keys: &[SessionKey], out: &mut [Option<SessionHandle>]) {
        self.burst(&self.rev, keys, out, REV_KEY_SPAN, |r| &r.reverse);
    }

    #[inline]
    fn burst(
        &self,
        index: &HandleIndex,
        keys: &[SessionKey],
        out: &mut [Option<SessionHandle>],
        // Byte range of the record a key comparison reads.
        (from, to): (usize, usize),
        key_of: impl Fn(&SessionRecord) -> &SessionKey,
    ) {
        const BURST: usize = 32;
        assert_eq!(keys.len(), out.len(), "one output slot per key");
        for (keys, out) in keys.chunks(BURST).zip(out.chunks_mut(BURST)) {
            let mut tags = [Tag::default(); BURST];
            for (k, t) in keys.iter().zip(tags.iter_mut()) {
                *t = Tag::of(k);
                index.prefetch(*t);
            }
            for (o, t) in out.iter_mut().zip(tags) {
                *o = index.candidate(t).map(|h| {
                    self.slot_addr.prefetch(h, from, to - from);
                    SessionHandle(h)
                });
            }
            for ((k, o), t) in keys.iter().zip(out.iter_mut()).zip(tags) {
                if let Some(SessionHandle(h)) = *o
                    && key_of(&self.slab[h as usize]) != k
                {
                    // A tag collision: rare; take the exact path.
                    *o = index
                        .find(t, |h| key_of(&self.slab[h as usize]) == k)
                        .map(SessionHandle);
                }
            }
        }
    }

    /// Starts the loads the lookups of a burst of packets will wait for,
    /// in either direction, without answering them: every key's forward
    /// and reverse index slots, then the candidate records those slots
    /// name (whole: the packet goes on to update them). A caller that must look packets up one by one (each may
    /// create or end a session the next one sees) calls this first for
    /// the whole burst, so the single lookups that follow hit the cache.
    /// Results never depend on it: a wrong candidate costs a useless
    /// prefetch.
    pub fn prefetch_lookups(&self, keys: &[SessionKey]) {
        const BURST: usize = 32;
        for keys in keys.chunks(BURST) {
            let mut tags = [Tag::default(); BURST];
            for (k, t) in keys.iter().zip(tags.iter_mut()) {
                *t = Tag::of(k);
                self.fwd.prefetch(*t);
                self.rev.prefetch(*t);
            }
            // The whole record: the packet that looks it up goes on to
            // update its counters and timer.
            for &t in tags.iter().take(keys.len()) {
                if let Some(h) = self.fwd.candidate(t).or_else(|| self.rev.candidate(t)) {
                    self.prefetch_record(SessionHandle(h));
                }
            }
        }
    }

    /// Starts loading the record behind `h` without reading anything (for
    /// callers that know the handles they will touch next, e.g. a batch of
    /// removals): its keys, `tcp_state` and the fields removal reads.
    #[inline]
    pub fn prefetch_record(&self, h: SessionHandle) {
        self.slot_addr.prefetch(h.0, 0, size_of::<SessionRecord>());
    }

    /// A packet's key in either direction.
    #[inline]
    pub fn lookup(&self, key: &SessionKey) -> Option<(SessionHandle, Direction)> {
        self.lookup_forward(key)
            .map(|h| (h, Direction::Forward))
            .or_else(|| self.lookup_reverse(key).map(|h| (h, Direction::Reverse)))
    }

    pub fn get(&self, h: SessionHandle) -> Option<&SessionRecord> {
        self.slab.get(h.0 as usize)
    }

    /// The record behind a handle kept from an earlier lookup, only if the
    /// slot still holds the session with this forward or reverse key.
    pub fn resolve(&self, h: SessionHandle, key: &SessionKey) -> Option<&SessionRecord> {
        self.get(h).filter(|r| r.key == *key || r.reverse == *key)
    }

    pub fn iter(&self) -> impl Iterator<Item = (SessionHandle, &SessionRecord)> {
        self.slab.iter().map(|(h, r)| (SessionHandle(h as u32), r))
    }

    /// Every session of one owner RG (local and peer-synced).
    pub fn export_rg(&self, rg: RgId) -> impl Iterator<Item = &SessionRecord> {
        self.export_handles(rg).map(|h| &self.slab[h as usize])
    }

    /// The RG's sessions in peer form ([`SessionTable::to_synced`]).
    pub fn export_synced(&self, rg: RgId, now: Millis) -> impl Iterator<Item = SyncedSession> + '_ {
        self.export_handles(rg).map(move |h| {
            let r = &self.slab[h as usize];
            r.synced(now, self.seq_shift(h, r))
        })
    }

    /// Makes room for `additional` more sessions (up to the capacity bound)
    /// so a known burst of inserts (a bulk) does not grow and copy the slab
    /// and indexes repeatedly.
    pub fn reserve(&mut self, additional: usize) {
        let additional = additional.min(self.cfg.capacity.saturating_sub(self.slab.len()));
        self.slab.reserve(additional);
        self.refresh_slot_addr();
        self.fwd.reserve(additional);
        self.rev.reserve(additional);
    }

    /// Starts loading the index slots `apply_peer_upsert(s)` will probe.
    /// Issued a few operations ahead, it overlaps their cache misses.
    #[inline]
    pub fn prefetch_for_upsert(&self, s: &SyncedSession) {
        self.start_insert_loads(&Probes::of(&s.key, &s.reverse));
    }

    /// Starts loading the index slots an insert with `p` probes and fills.
    #[inline]
    fn start_insert_loads(&self, p: &Probes) {
        self.fwd.prefetch_run(p.fwd);
        self.rev.prefetch_run(p.rev);
        if let (Some(b), Some(tag)) = (p.nat, p.endpoint) {
            self.mappings.prefetch_endpoint(tag);
            self.mappings.prefetch_head(&b);
        }
    }

    /// Starts loading the forward index slot for `key`.
    #[inline]
    pub fn prefetch_for_key(&self, key: &SessionKey) {
        self.fwd.prefetch_run(Tag::of(key));
    }

    // ----- local inserts and updates -------------------------------------

    /// Starts the index loads inserting `s` will wait for, ahead of the
    /// insert (a burst of first packets). The reverse key of a port-NATed
    /// session depends on the port the insert allocates, so it is guessed
    /// as the preferred (source) port: a wrong guess costs one useless
    /// prefetch, nothing else.
    pub fn prefetch_for_insert(&self, s: &NewSession) {
        self.fwd.prefetch_run(Tag::of(&s.key));
        let snat = s.snat.as_ref().map(|r| (r.addr, s.key.src_port));
        let reverse = reverse_key(&s.key, s.egress_zone, Nat { snat, dnat: s.dnat });
        self.rev.prefetch_run(Tag::of(&reverse));
        if let Some(r) = &s.snat {
            let internal = internal_endpoint(&s.key);
            self.mappings
                .prefetch_endpoint(endpoint_tag(&internal, r.addr, s.key.proto));
        }
    }

    /// Creates a local session with all its companions, or nothing.
    pub fn insert(&mut self, s: NewSession, now: Millis) -> Result<SessionHandle, InsertError> {
        self.try_insert(s, now)
            .inspect(|_| self.counters.inserted_local += 1)
            .map_err(|e| self.counters.refuse(e))
    }

    fn try_insert(&mut self, s: NewSession, now: Millis) -> Result<SessionHandle, InsertError> {
        let v4 = s.key.is_v4();
        let family_ok = s.key.is_consistent()
            && s.snat.as_ref().is_none_or(|r| r.addr.is_v4() == v4)
            && s.dnat.is_none_or(|(a, _)| a.is_v4() == v4);
        if !family_ok {
            return Err(InsertError::InvalidKey);
        }
        if self.slab.len() >= self.watermarks().0 {
            self.early_drop();
        }
        if self.slab.len() >= self.cfg.capacity {
            return Err(InsertError::Capacity);
        }
        // The mapping is the only side effect before commit; every failure
        // after it closes a mapping it opened. It comes first because the
        // reverse key depends on its port; the forward probe and the
        // endpoint-index probe it makes are started together so their
        // misses overlap.
        self.fwd.prefetch_run(Tag::of(&s.key));
        if let Some(req) = &s.snat {
            let internal = internal_endpoint(&s.key);
            self.mappings
                .prefetch_endpoint(endpoint_tag(&internal, req.addr, s.key.proto));
        }
        let mut reserved = None;
        let snat = match &s.snat {
            None => None,
            Some(req) if proto::has_ports(s.key.proto) => {
                let slab = &self.slab;
                let got = self
                    .mappings
                    .allocate(
                        req.addr,
                        s.key.proto,
                        req.ports.clone(),
                        internal_endpoint(&s.key),
                        |h| internal_endpoint(&slab[h as usize].key),
                    )
                    .ok_or(InsertError::PortsExhausted)?;
                let port = got.port();
                let b = NatBinding {
                    addr: req.addr,
                    port,
                    proto: s.key.proto,
                };
                reserved = Some((b, got));
                Some((req.addr, port))
            }
            Some(req) => Some((req.addr, s.key.src_port)),
        };
        let reverse = reverse_key(&s.key, s.egress_zone, Nat { snat, dnat: s.dnat });
        let probes = Probes::of(&s.key, &reverse);
        debug_assert_eq!(probes.nat, reserved.map(|(b, _)| b));
        self.start_insert_loads(&probes);
        // The mapping cannot conflict: the allocator gave this endpoint its
        // own port or joined it to its own mapping.
        let conflict = if self.find_forward(&s.key, probes.fwd).is_some() {
            Some(InsertError::ForwardExists)
        } else if self.find_reverse(&reverse, probes.rev).is_some() {
            Some(InsertError::ReverseExists)
        } else {
            None
        };
        if let Some(e) = conflict {
            if let Some((b, Allocated::Opened(_))) = reserved {
                self.mappings.close(b, &internal_endpoint(&s.key));
            }
            return Err(e);
        }
        let timeout_ms = self.cfg.timeouts.for_session(s.key.proto, s.tcp_state);
        let rec = SessionRecord {
            key: s.key,
            flags: if establishes(s.key.proto, s.tcp_state) {
                record::REPLICATED
            } else {
                0
            },
            reverse,
            created: now,
            activity: Activity::new(now, FlowCounters::default()),
            tcp: TcpTrack::default(),
            policy: s.policy,
            timeout_ms,
            ingress_if: s.ingress_if,
            egress_if: s.egress_if,
            owner_rg: s.owner_rg,
            tcp_state: s.tcp_state,
            rg_slot: 0,
            wheel_due: 0,
            wheel_pos: NOT_QUEUED,
            bulk_mark: SyncMark::default(),
        };
        Ok(self.commit(rec, &probes, now))
    }

    /// Links a record whose keys and port reservation were checked into
    /// every index. Infallible by construction.
    /// `probes` are the record's own tags (`Probes::of(key, reverse)`).
    fn commit(&mut self, mut rec: SessionRecord, probes: &Probes, now: Millis) -> SessionHandle {
        let members = self.rgs.entry(rec.owner_rg).or_default();
        rec.rg_slot = members.len() as u32;
        let due = self.wheel.due_tick_for(now, rec.expires_at());
        rec.wheel_due = due;
        let owner_rg = rec.owner_rg;
        let h = self.slab.insert(rec);
        self.slot_addr.update(&self.slab, h);
        let h = h as u32;
        self.fwd.insert(probes.fwd, h);
        self.rev.insert(probes.rev, h);
        if let Some(b) = probes.nat {
            self.link_mapping(h, &b);
        }
        self.rgs.entry(owner_rg).or_default().push(h);
        self.enqueue(h, due);
        if let Some(c) = &mut self.address_counts {
            c.add(&self.slab[h as usize].key);
        }
        self.update_pressure();
        SessionHandle(h)
    }

    /// Puts session `h` at the head of its mapping's session list.
    fn link_mapping(&mut self, h: u32, b: &NatBinding) {
        let Some(slot) = self.mappings.head_slot(b) else {
            return;
        };
        let raw = std::mem::replace(slot, h);
        if raw == NIL {
            *slot = h | SOLE;
            return;
        }
        let head = raw & !SOLE;
        let need = h.max(head) as usize + 1;
        if self.mapping_links.len() < need {
            self.mapping_links.resize(need, [NIL, NIL]);
        }
        if raw & SOLE != 0 {
            self.mapping_links[head as usize] = [NIL, NIL];
        }
        self.mapping_links[h as usize] = [NIL, head];
        self.mapping_links[head as usize][0] = h;
    }

    /// Takes session `h` out of its mapping's session list, closing the
    /// mapping with its last session.
    fn unlink_mapping(&mut self, h: u32, b: &NatBinding) {
        if self.mappings.head(b) == h | SOLE {
            let internal = self.endpoint_of(h);
            self.mappings.close(*b, &internal);
            return;
        }
        let [prev, next] = self.mapping_links[h as usize];
        if prev == NIL && next == NIL {
            let internal = self.endpoint_of(h);
            self.mappings.close(*b, &internal);
        } else if prev == NIL {
            self.mappings.set_head(b, next);
        } else {
            self.mapping_links[prev as usize][1] = next;
        }
        if next != NIL {
            self.mapping_links[next as usize][0] = prev;
        }
        self.mapping_links[h as usize] = [NIL, NIL];
    }

    /// Accounts one packet and refreshes the idle timer. Shared access is
    /// enough (the fields are atomic): workers call it under the read lock.
    #[inline]
    pub fn touch(&self, h: SessionHandle, dir: Direction, bytes: u32, now: Millis) {
        if let Some(r) = self.slab.get(h.0 as usize) {
            r.activity.touch(dir, bytes, now);
        }
    }

    /// Moves a TCP session to `state` and applies that state's timeout.
    pub fn set_tcp_state(&mut self, h: SessionHandle, state: TcpState, now: Millis) {
        let timeouts = self.cfg.timeouts;
        let Some(r) = self.slab.get_mut(h.0 as usize) else {
            return;
        };
        r.tcp_state = state;
        if establishes(r.key.proto, state) {
            r.flags |= record::REPLICATED;
        }
        r.timeout_ms = timeouts.for_session(r.key.proto, state);
        r.activity.advance(now);
        self.reschedule_if_earlier(h.0, now);
    }

    /// A shorter timeout needs an earlier wheel entry; a longer one is found
    /// when the current entry pops and re-buckets.
    fn reschedule_if_earlier(&mut self, h: u32, now: Millis) {
        let r = &self.slab[h as usize];
        let due = self.wheel.due_tick_for(now, r.expires_at());
        if due < r.wheel_due {
            self.dequeue(h);
            self.enqueue(h, due);
        }
    }

    /// Queues session `h`'s one wheel entry and records where it is.
    fn enqueue(&mut self, h: u32, due: u32) {
        let pos = self.wheel.push(h, due);
        let r = &mut self.slab[h as usize];
        r.wheel_due = due;
        r.wheel_pos = pos;
    }

    /// Takes session `h`'s entry out of the wheel, if it is in it.
    fn dequeue(&mut self, h: u32) {
        let r = &mut self.slab[h as usize];
        let (due, pos) = (r.wheel_due, r.wheel_pos);
        if pos == NOT_QUEUED {
            return;
        }
        r.wheel_pos = NOT_QUEUED;
        if let Some(moved) = self.wheel.remove(due, pos) {
            self.slab[moved.handle as usize].wheel_pos = pos;
        }
    }

    // ----- removal: the one path -----------------------------------------

    /// Removes a session with all its companions.
    pub fn remove(&mut self, h: SessionHandle, reason: RemoveReason) -> Option<SessionRecord> {
        self.slab
            .contains(h.0 as usize)
            .then(|| self.remove_handle(h.0, reason))
    }

    /// The single removal body. Order: NAT binding and port, reverse entry,
    /// forward entry, RG membership, then the slot. Nothing between the
    /// first and last step can observe a partial session (`&mut self`).
    fn remove_handle(&mut self, h: u32, reason: RemoveReason) -> SessionRecord {
        self.log_close(h, reason);
        let r = &self.slab[h as usize];
        let (owner_rg, rg_slot) = (r.owner_rg, r.rg_slot);
        let probes = self.start_removal_loads(r);
        if let Some(b) = probes.nat {
            self.unlink_mapping(h, &b);
        }
        self.rev.remove(probes.rev, h);
        self.fwd.remove(probes.fwd, h);
        self.unlink_rg(owner_rg, rg_slot);
        self.dequeue(h);
        self.counters.removed[reason as usize] += 1;
        let r = self.slab.remove(h as usize);
        if r.owner_rg.is_data()
            && r.is_replicated()
            && !r.sent_to_peer()
            && self.is_authoritative(&r)
        {
            self.counters.closed_before_sync += 1;
        }
        if r.proxied() {
            self.proxies.remove(&h);
            self.proxy_held.remove(&h);
        }
        if let Some(c) = &mut self.address_counts {
            c.remove(&r.key);
        }
        self.update_pressure();
        r
    }

    /// Records the close event of session `h` if this node logs it: it is
    /// authoritative here (the RG's primary, which created or took it
    /// over), or a completed bulk removed it.
    fn log_close(&mut self, h: u32, removal: RemoveReason) {
        let Some(closes) = &self.closes else {
            return;
        };
        let r = &self.slab[h as usize];
        let Some(reason) = CloseReason::of(removal, r.tcp_state) else {
            return;
        };
        if reason != CloseReason::Reconcile && !self.is_authoritative(r) {
            return;
        }
        if closes.len() >= CLOSE_LOG {
            self.counters.close_events_dropped += 1;
            return;
        }
        let at = r.last_seen();
        let mut e = FlowEvent::of_session(EventKind::SessionClose, r, at);
        e.reason = Some(reason);
        if let Some(c) = &mut self.closes {
            c.push(e);
        }
    }

    /// Turns the close log on or off (off drops what it holds).
    pub fn set_close_log(&mut self, on: bool) {
        self.closes = on.then(Vec::new);
    }

    /// Moves the logged close events into `out`.
    pub fn drain_closes(&mut self, out: &mut Vec<FlowEvent>) {
        if let Some(c) = &mut self.closes {
            out.append(c);
        }
    }

    /// Starts every load that removing `r` will wait for (index slots, RG
    /// list slot and the record moved into it, wheel entry) so the misses
    /// overlap; returns the index tags it computed.
    fn start_removal_loads(&self, r: &SessionRecord) -> Probes {
        let probes = Probes::of(&r.key, &r.reverse);
        self.fwd.prefetch_run(probes.fwd);
        self.rev.prefetch_run(probes.rev);
        if let (Some(b), Some(tag)) = (probes.nat, probes.endpoint) {
            self.mappings.prefetch_endpoint(tag);
            self.mappings.prefetch_head(&b);
        }
        if let Some(m) = self.rgs.get(&r.owner_rg) {
            prefetch(m.get(r.rg_slot as usize));
            if let Some(&last) = m.last() {
                self.slot_addr
                    .prefetch(last, offset_of!(SessionRecord, rg_slot), 4);
            }
        }
        if r.wheel_pos != NOT_QUEUED {
            self.wheel.prefetch(r.wheel_due, r.wheel_pos);
        }
        probes
    }

    /// Starts the loads removing session `h` will wait for, ahead of the
    /// removal (callers that remove a known batch: expiry, churn). Reads
    /// the record, so prefetch it first ([`SessionTable::prefetch_record`]).
    pub fn prefetch_for_remove(&self, h: SessionHandle) {
        if let Some(r) = self.slab.get(h.0 as usize) {
            self.start_removal_loads(r);
        }
    }

    /// Swap-removes a member (what [`ExportCursor`] relies on: only the
    /// last member ever moves).
    fn unlink_rg(&mut self, rg: RgId, slot: u32) {
        let Some(m) = self.rgs.get_mut(&rg) else {
            return;
        };
        let slot = slot as usize;
        m.swap_remove(slot);
        if let Some(&moved) = m.get(slot) {
            self.slab[moved as usize].rg_slot = slot as u32;
        }
        if m.is_empty() {
            self.rgs.remove(&rg);
        }
    }

    /// Removes every session (config reload, shutdown).
    pub fn flush(&mut self) -> usize {
        let handles: Vec<u32> = self.slab.iter().map(|(h, _)| h as u32).collect();
        for &h in &handles {
            self.remove_handle(h, RemoveReason::Flushed);
        }
        self.wheel.clear();
        self.expiring = None;
        handles.len()
    }

    // ----- expiry --------------------------------------------------------

    /// Removes every authoritative session idle past its timeout at `now`
    /// (at most one wheel tick late), with companions. Peer-synced copies
    /// never expire here. `on_expired` sees each record before it goes, so
    /// the caller can emit a delete delta. One pass, unbounded: callers
    /// sharing the table use [`SessionTable::expire_slice`].
    pub fn expire(&mut self, now: Millis, mut on_expired: impl FnMut(&SessionRecord)) -> usize {
        self.expire_slice(now, usize::MAX, &mut on_expired).expired
    }

    /// At most `budget` wheel entries of an expiry pass up to `now`; the
    /// pass resumes where the last slice stopped (mid-bucket included).
    ///
    /// A bucket is worked in place from its end: the entries still to
    /// examine are a prefix of it. Whatever changes between slices cannot
    /// move an entry out of that prefix (a removal swap-removes, moving the
    /// bucket's *last* entry into the hole; entries re-queued into the same
    /// bucket, a later lap, go to its end), so none is missed; an entry
    /// moved into it is merely examined twice. While a tick is worked, new
    /// entries are due after it (the wheel's cursor already names it).
    pub fn expire_slice(
        &mut self,
        now: Millis,
        budget: usize,
        mut on_expired: impl FnMut(&SessionRecord),
    ) -> ExpireSlice {
        let mut out = ExpireSlice::default();
        loop {
            let (tick, remaining) = match self.expiring.take() {
                Some(x) => x,
                None => {
                    let Some((first, last)) = self.wheel.pending_ticks(now) else {
                        out.done = true;
                        return out;
                    };
                    // After a long pause every bucket is visited once.
                    let tick = first.max(last.saturating_sub(self.wheel.span() - 1));
                    self.wheel.set_cursor(tick);
                    (tick, self.wheel.bucket_len(tick))
                }
            };
            let mut remaining = remaining.min(self.wheel.bucket_len(tick));
            while remaining > 0 && out.examined < budget {
                remaining -= 1;
                out.examined += 1;
                // Records of one bucket are scattered: start their loads
                // (and then what removing them touches) a few entries ahead.
                if let Some(ahead) = remaining.checked_sub(8) {
                    self.prefetch_record(SessionHandle(self.wheel.entry(tick, ahead).handle));
                }
                if let Some(ahead) = remaining.checked_sub(4) {
                    self.prefetch_for_remove(SessionHandle(self.wheel.entry(tick, ahead).handle));
                }
                let e = self.wheel.entry(tick, remaining);
                if self.expire_entry(e, tick, remaining as u32, now, &mut on_expired) {
                    out.expired += 1;
                }
            }
            if remaining > 0 {
                self.expiring = Some((tick, remaining));
                return out;
            }
        }
    }

    /// Takes entry `e` (at `pos` in the bucket of `tick`) out of the wheel
    /// and expires or re-queues its session. True if it expired.
    fn expire_entry(
        &mut self,
        e: WheelEntry,
        tick: u64,
        pos: u32,
        now: Millis,
        on_expired: &mut impl FnMut(&SessionRecord),
    ) -> bool {
        let h = e.handle;
        let live = self
            .slab
            .get(h as usize)
            .is_some_and(|r| r.wheel_due == e.due && r.wheel_pos == pos);
        if !live {
            // Entries leave the wheel with their session; this is a broken
            // invariant, not a case to handle.
            debug_assert!(false, "wheel entry without its session: {e:?}");
            return false;
        }
        if let Some(moved) = self.wheel.remove(e.due, pos) {
            self.slab[moved.handle as usize].wheel_pos = pos;
        }
        self.slab[h as usize].wheel_pos = NOT_QUEUED;
        let r = &self.slab[h as usize];
        let due = if u64::from(e.due) > tick {
            e.due // a later lap
        } else if !self.is_authoritative(r) {
            // The owner decides when a synced copy goes (its delete delta,
            // or a reconcile): a copy only restarts its timer, so it has a
            // full timeout left if this node takes over.
            r.activity.advance(now);
            self.wheel.due_tick_for(now, r.expires_at())
        } else if r.expires_at() <= now {
            on_expired(r);
            self.remove_handle(h, RemoveReason::Expired);
            return true;
        } else {
            self.wheel.due_tick_for(now, r.expires_at())
        };
        self.enqueue(h, due);
        false
    }

    // ----- peer sync -----------------------------------------------------

    /// Applies a session from the primary of its owner RG. A live local
    /// session of an RG this node is primary for is never overwritten.
    pub fn apply_peer_upsert(
        &mut self,
        s: &SyncedSession,
        now: Millis,
        mark: Option<BulkMark>,
    ) -> Result<PeerApply, InsertError> {
        let res = self.try_peer_upsert(s, &Probes::of(&s.key, &s.reverse), now, mark);
        self.count_peer_upsert(res)
    }

    /// Applies a run of upserts (a bulk chunk) in order, starting each
    /// one's index loads a few sessions ahead and hashing each key once.
    /// Same effect as [`SessionTable::apply_peer_upsert`] on each in turn.
    pub fn apply_peer_upserts(
        &mut self,
        sessions: &[SyncedSession],
        now: Millis,
        mark: Option<BulkMark>,
    ) -> UpsertTally {
        const AHEAD: usize = 8;
        // Probes of the sessions between the one applied and the one
        // whose loads were just started.
        let mut ring = [Probes::default(); AHEAD + 1];
        let mut tally = UpsertTally::default();
        for next in 0..sessions.len() + AHEAD {
            if let Some(s) = sessions.get(next) {
                let p = Probes::of(&s.key, &s.reverse);
                self.start_insert_loads(&p);
                ring[next % ring.len()] = p;
            }
            let Some(i) = next.checked_sub(AHEAD) else {
                continue;
            };
            let res = self.try_peer_upsert(&sessions[i], &ring[i % ring.len()], now, mark);
            match self.count_peer_upsert(res) {
                Ok(_) => tally.applied += 1,
                Err(_) => tally.refused += 1,
            }
        }
        tally
    }

    fn count_peer_upsert(
        &mut self,
        res: Result<PeerApply, InsertError>,
    ) -> Result<PeerApply, InsertError> {
        match res {
            Ok(PeerApply::Updated) => self.counters.updated_peer += 1,
            Ok(_) => self.counters.inserted_peer += 1,
            Err(e) => {
                self.counters.refuse(e);
            }
        }
        res
    }

    fn try_peer_upsert(
        &mut self,
        s: &SyncedSession,
        probes: &Probes,
        now: Millis,
        mark: Option<BulkMark>,
    ) -> Result<PeerApply, InsertError> {
        let valid = s.key.is_consistent()
            && s.reverse.is_consistent()
            && s.key.is_v4() == s.reverse.is_v4()
            && s.key.proto == s.reverse.proto;
        if !valid {
            return Err(InsertError::InvalidKey);
        }
        if self.primary_rgs.contains(&s.owner_rg) || !s.owner_rg.is_data() {
            // This node is authoritative for the RG: the peer's copy is not.
            return Err(InsertError::LocalOwnedConflict);
        }
        let created = Millis(now.0.saturating_sub(s.age_ms));
        let last_seen = Millis(now.0.saturating_sub(s.idle_ms)).max(created);
        let mut outcome = PeerApply::Inserted;
        if let Some(SessionHandle(h)) = self.find_forward(&s.key, probes.fwd) {
            let r = &mut self.slab[h as usize];
            if self.primary_rgs.contains(&r.owner_rg) || !r.owner_rg.is_data() {
                return Err(InsertError::LocalOwnedConflict);
            }
            if r.reverse == s.reverse && r.owner_rg == s.owner_rg {
                r.ingress_if = s.ingress_if;
                r.egress_if = s.egress_if;
                r.policy = s.policy;
                r.tcp_state = s.tcp_state;
                r.timeout_ms = s.timeout_ms;
                r.activity.set_counters(s.counters);
                r.created = created;
                r.activity.set_last_seen(last_seen);
                if let Some(m) = mark {
                    r.bulk_mark.set(m.0);
                }
                self.set_seq_shift(h, s.seq_shift);
                self.reschedule_if_earlier(h, now);
                return Ok(PeerApply::Updated);
            }
            self.remove_handle(h, RemoveReason::Replaced);
            outcome = PeerApply::Replaced;
        }
        if self.slab.len() >= self.watermarks().0 {
            self.early_drop();
        }
        if self.slab.len() >= self.cfg.capacity {
            return Err(InsertError::Capacity);
        }
        // The peer is authoritative for its RG: a stale synced copy that
        // still holds this reverse key or binding (a missed delete) yields.
        self.evict_peer_conflicts(s, probes)?;
        if let Some(b) = probes.nat {
            let slab = &self.slab;
            let taken = self.mappings.take(b, internal_endpoint(&s.key), |h| {
                internal_endpoint(&slab[h as usize].key)
            });
            if taken.is_err() {
                return Err(InsertError::NatBindingExists);
            }
        }
        let h = self.commit_peer(s, probes, created, last_seen, mark, now);
        self.set_seq_shift(h.0, s.seq_shift);
        Ok(outcome)
    }

    /// A synced session's sequence translation (or none).
    fn set_seq_shift(&mut self, h: u32, shift: Option<u32>) {
        let r = &mut self.slab[h as usize];
        match shift {
            Some(_) => r.flags |= record::PROXIED,
            None => r.flags &= !record::PROXIED,
        }
        match shift {
            Some(d) => self.proxies.insert(h, Proxy::Shift(d)),
            None => self.proxies.remove(&h),
        };
    }

    fn evict_peer_conflicts(
        &mut self,
        s: &SyncedSession,
        probes: &Probes,
    ) -> Result<(), InsertError> {
        let mut evict: Vec<(SessionHandle, InsertError)> = self
            .find_reverse(&s.reverse, probes.rev)
            .map(|h| (h, InsertError::ReverseExists))
            .into_iter()
            .collect();
        // A mapping that gives this binding to another endpoint, or this
        // endpoint another port on the address: all its sessions go.
        if let Some(b) = probes.nat {
            let internal = internal_endpoint(&s.key);
            let mine = self.mapped_port(b.addr, b.proto, &internal);
            let other_port = mine
                .filter(|&p| p != b.port)
                .map(|port| NatBinding { port, ..b });
            let other_endpoint =
                (mine != Some(b.port) && self.mappings.is_reserved(b)).then_some(b);
            let stale = [other_endpoint, other_port]
                .into_iter()
                .flatten()
                .filter_map(|b| self.nat_mapping(&b));
            for m in stale.collect::<Vec<_>>() {
                evict.extend(
                    self.mapping_sessions(&m)
                        .map(|h| (h, InsertError::NatBindingExists)),
                );
            }
        }
        if let Some(&(_, err)) = evict.iter().find(|(h, _)| {
            self.slab
                .get(h.0 as usize)
                .is_some_and(|r| self.is_authoritative(r))
        }) {
            return Err(err);
        }
        for (h, _) in evict {
            if self.slab.contains(h.0 as usize) {
                self.remove_handle(h.0, RemoveReason::Replaced);
                self.counters.evicted_by_peer += 1;
            }
        }
        Ok(())
    }

    fn commit_peer(
        &mut self,
        s: &SyncedSession,
        probes: &Probes,
        created: Millis,
        last_seen: Millis,
        mark: Option<BulkMark>,
        now: Millis,
    ) -> SessionHandle {
        self.commit(
            SessionRecord {
                key: s.key,
                // What the peer sends is synced by definition.
                flags: record::REPLICATED,
                reverse: s.reverse,
                created,
                activity: Activity::new(last_seen, s.counters),
                tcp: TcpTrack::default(),
                policy: s.policy,
                timeout_ms: s.timeout_ms,
                ingress_if: s.ingress_if,
                egress_if: s.egress_if,
                owner_rg: s.owner_rg,
                tcp_state: s.tcp_state,
                rg_slot: 0,
                wheel_due: 0,
                wheel_pos: NOT_QUEUED,
                // A delta's copy is held by the peer as much as a bulk's.
                bulk_mark: SyncMark::new(mark.map_or(SyncMark::SENT, |m| m.0)),
            },
            probes,
            now,
        )
    }

    /// Applies a delete from the primary of the session's owner RG.
    pub fn apply_peer_delete(&mut self, key: &SessionKey) -> Result<bool, InsertError> {
        let Some(SessionHandle(h)) = self.lookup_forward(key) else {
            return Ok(false);
        };
        if self.is_authoritative(&self.slab[h as usize]) {
            return Err(self.counters.refuse(InsertError::LocalOwnedConflict));
        }
        self.remove_handle(h, RemoveReason::PeerDelete);
        Ok(true)
    }

    /// Stamps an existing session as carried by bulk `mark` (a bulk entry
    /// that was superseded by a newer delta still proves the key is live).
    pub fn mark(&mut self, key: &SessionKey, mark: BulkMark) -> bool {
        match self.lookup_forward(key) {
            Some(SessionHandle(h)) => {
                self.slab[h as usize].bulk_mark.set(mark.0);
                true
            }
            None => false,
        }
    }

    // ----- reconcile -----------------------------------------------------

    /// Deletes, with companions, every peer-synced session of `rg` for which
    /// `is_current` is false. Touches no other RG and no local session.
    /// One pass, unbounded: callers sharing the table use
    /// [`SessionTable::reconcile_chunk`].
    pub fn reconcile_rg(
        &mut self,
        rg: RgId,
        mut is_current: impl FnMut(&SessionRecord) -> bool,
    ) -> ReconcileReport {
        let mut cursor = self.begin_export(rg);
        let mut report = ReconcileReport::default();
        while self.reconcile_chunk(&mut cursor, usize::MAX, &mut report, &mut is_current) {}
        report
    }

    /// Examines up to `max` members of the walk's RG and deletes, with
    /// companions, the peer-synced ones for which `is_current` is false;
    /// adds to `report`. False when the walk is complete. Sessions of an RG
    /// this node has become primary for meanwhile are authoritative and
    /// kept.
    pub fn reconcile_chunk(
        &mut self,
        cursor: &mut ExportCursor,
        max: usize,
        report: &mut ReconcileReport,
        mut is_current: impl FnMut(&SessionRecord) -> bool,
    ) -> bool {
        let mut left = max;
        let mut batch = [0u32; WALK_BATCH];
        while left > 0 {
            // The next members, their records loading together; removing
            // one of them only moves members among these slots or from
            // above the cursor, and handles stay valid (see ExportCursor).
            let n = self.next_members(cursor, &mut batch[..left.min(WALK_BATCH)]);
            if n == 0 {
                return false;
            }
            left -= n;
            for &h in &batch[..n] {
                let r = &self.slab[h as usize];
                if self.is_authoritative(r) {
                    continue;
                }
                report.examined += 1;
                if is_current(r) {
                    continue;
                }
                if nat_companion(&r.key, &r.reverse).is_some() {
                    report.deleted_with_nat += 1;
                }
                self.remove_handle(h, RemoveReason::Reconciled);
                report.deleted += 1;
            }
        }
        cursor.pos > 0
    }

    /// Reconcile against an explicit set of keys seen in a bulk.
    pub fn reconcile_rg_keys(&mut self, rg: RgId, seen: &FxHashSet<SessionKey>) -> ReconcileReport {
        self.reconcile_rg(rg, |r| seen.contains(&r.key))
    }

    /// Reconcile against the sessions stamped by bulk `mark`.
    pub fn reconcile_rg_marked(&mut self, rg: RgId, mark: BulkMark) -> ReconcileReport {
        self.reconcile_rg(rg, |r| r.bulk_mark.get() == mark.0)
    }

    /// Whether a session carries bulk `mark` (for [`SessionTable::reconcile_chunk`]).
    pub fn is_marked(r: &SessionRecord, mark: BulkMark) -> bool {
        r.bulk_mark.get() == mark.0
    }

    fn export_handles(&self, rg: RgId) -> impl Iterator<Item = u32> + '_ {
        self.rgs
            .get(&rg)
            .into_iter()
            .flat_map(|m| m.iter().copied())
    }

    // ----- role changes --------------------------------------------------

    /// This node became primary for `rg`: its synced copies become local
    /// and authoritative — at once, whatever the RG's size, because origin
    /// is the RG's role ([`SessionTable::origin`]). Returns how many
    /// sessions changed origin.
    pub fn promote_rg(&mut self, rg: RgId) -> usize {
        if self.primary_rgs.insert(rg) && rg.is_data() {
            self.rg_len(rg)
        } else {
            0
        }
    }

    /// This node stopped being primary for `rg`: its sessions become copies
    /// that the new primary's deltas may overwrite (at once, as above).
    pub fn demote_rg(&mut self, rg: RgId) -> usize {
        if self.primary_rgs.remove(&rg) && rg.is_data() {
            self.rg_len(rg)
        } else {
            0
        }
    }

    // ----- streaming export ----------------------------------------------

    /// Starts a walk over `rg`'s sessions, in chunks (see [`ExportCursor`]).
    pub fn begin_export(&self, rg: RgId) -> ExportCursor {
        ExportCursor {
            rg,
            pos: self.rg_len(rg),
        }
    }

    /// Takes the next members of the walk into `out` (as many as fit) and
    /// starts loading their records; how many it took.
    fn next_members(&self, cursor: &mut ExportCursor, out: &mut [u32]) -> usize {
        let Some(m) = self.rgs.get(&cursor.rg) else {
            cursor.pos = 0;
            return 0;
        };
        cursor.pos = cursor.pos.min(m.len());
        let n = out.len().min(cursor.pos);
        for o in out.iter_mut().take(n) {
            cursor.pos -= 1;
            *o = m[cursor.pos];
            self.prefetch_record(SessionHandle(*o));
        }
        n
    }

    /// Appends up to `max` sessions for which `keep` holds to `out` in peer
    /// form; false when the walk is complete.
    pub fn export_chunk(
        &self,
        cursor: &mut ExportCursor,
        max: usize,
        now: Millis,
        out: &mut Vec<SyncedSession>,
        keep: impl Fn(&SessionRecord) -> bool,
    ) -> bool {
        let mut taken = 0;
        let mut batch = [0u32; WALK_BATCH];
        while taken < max {
            let n = self.next_members(cursor, &mut batch[..(max - taken).min(WALK_BATCH)]);
            if n == 0 {
                return false;
            }
            for &h in &batch[..n] {
                let r = &self.slab[h as usize];
                if keep(r) {
                    out.push(r.synced(now, self.seq_shift(h, r)));
                    taken += 1;
                }
            }
        }
        cursor.pos > 0
    }

    // ----- self check ----------------------------------------------------

    /// Checks every cross-index invariant: each index entry points at a live
    /// session holding that key, each session is in every index it belongs
    /// to, port reservations match NAT sessions, RG lists match owners and
    /// every session has its live wheel entry. O(n); for tests and the
    /// operator's `audit` command.
    pub fn verify_invariants(&self) -> Result<(), String> {
        let n = self.slab.len();
        if let Some(c) = &self.address_counts
            && !c.matches(self.slab.iter().map(|(_, r)| &r.key))
        {
            return Err("address counts differ from a recount of the table".into());
        }
        for &h in self.proxies.keys() {
            if !self.slab.get(h as usize).is_some_and(|r| r.proxied()) {
                return Err(format!(
                    "proxy state of slot {h} without its proxied session"
                ));
            }
        }
        if let Some(h) = self
            .proxy_held
            .keys()
            .find(|h| !matches!(self.proxies.get(h), Some(Proxy::Pending { .. })))
        {
            return Err(format!("segment held for slot {h}, not a pending proxy"));
        }
        let proxied = self.slab.iter().filter(|(_, r)| r.proxied()).count();
        if proxied != self.proxies.len() {
            return Err(format!(
                "{proxied} proxied sessions, {} proxy states",
                self.proxies.len()
            ));
        }
        let mut nat_sessions = 0usize;
        let mut per_binding: FxHashMap<NatBinding, u32> = FxHashMap::default();
        for (h, r) in self.slab.iter() {
            let h = h as u32;
            if self.lookup_forward(&r.key) != Some(SessionHandle(h)) {
                return Err(format!(
                    "session {h} missing from forward index: {:?}",
                    r.key
                ));
            }
            if self.lookup_reverse(&r.reverse) != Some(SessionHandle(h)) {
                return Err(format!(
                    "session {h} missing from reverse index: {:?}",
                    r.reverse
                ));
            }
            if let Some(b) = nat_companion(&r.key, &r.reverse) {
                nat_sessions += 1;
                *per_binding.entry(b).or_default() += 1;
                match self.nat_mapping(&b) {
                    None => return Err(format!("session {h} holds no NAT mapping: {b:?}")),
                    Some(m) if m.internal != internal_endpoint(&r.key) => {
                        return Err(format!(
                            "session {h} shares {b:?} with another endpoint {:?}",
                            m.internal
                        ));
                    }
                    Some(_) => {}
                }
            }
            let m = self
                .rgs
                .get(&r.owner_rg)
                .ok_or_else(|| format!("session {h} owner {} has no member list", r.owner_rg))?;
            if m.get(r.rg_slot as usize) != Some(&h) {
                return Err(format!("session {h} not at its slot in {}", r.owner_rg));
            }
        }
        let sizes = [("forward", self.fwd.len()), ("reverse", self.rev.len())];
        for (name, len) in sizes {
            if len != n {
                return Err(format!(
                    "{name} index has {len} entries for {n} sessions (orphans)"
                ));
            }
        }
        self.verify_mappings(&per_binding, nat_sessions)?;
        let members: usize = self.rgs.values().map(SegVec::len).sum();
        if members != n {
            return Err(format!("RG lists hold {members} sessions, table has {n}"));
        }
        for (rg, m) in &self.rgs {
            if m.is_empty() {
                return Err(format!("{rg} has an empty member list"));
            }
            for &h in m.iter() {
                let owner = self.slab.get(h as usize).map(|r| r.owner_rg);
                if owner != Some(*rg) {
                    return Err(format!("{rg} list holds {h} owned by {owner:?}"));
                }
            }
        }
        for (h, r) in self.slab.iter() {
            let at = self.wheel.at(r.wheel_due, r.wheel_pos);
            if at.is_none_or(|e| e.handle != h as u32) {
                return Err(format!("session {h} is not at its wheel entry"));
            }
        }
        if self.wheel.len() != n {
            return Err(format!(
                "wheel holds {} entries for {n} sessions (orphans)",
                self.wheel.len()
            ));
        }
        Ok(())
    }

    /// Each mapping: referenced once per session using it, its session
    /// list holding exactly those sessions; no mapping without a session.
    fn verify_mappings(
        &self,
        per_binding: &FxHashMap<NatBinding, u32>,
        nat_sessions: usize,
    ) -> Result<(), String> {
        if self.mappings.reserved() != per_binding.len() as u64 {
            return Err(format!(
                "{} mappings for {nat_sessions} NAT sessions on {} bindings (leak)",
                self.mappings.reserved(),
                per_binding.len()
            ));
        }
        for (b, raw) in self.mappings.iter() {
            let want = per_binding.get(&b).copied().unwrap_or(0);
            if raw == NIL || !self.slab.contains((raw & !SOLE) as usize) {
                return Err(format!("{b:?}: mapping without a session"));
            }
            let m = self.nat_mapping(&b).expect("head checked");
            let internal = m.internal;
            let mut listed = 0u32;
            let mut prev = NIL;
            for h in self.mapping_sessions(&m) {
                let r = self.slab.get(h.0 as usize);
                if r.and_then(|r| nat_companion(&r.key, &r.reverse)) != Some(b)
                    || r.map(|r| internal_endpoint(&r.key)) != Some(internal)
                    || (!m.sole && self.mapping_links[h.0 as usize][0] != prev)
                {
                    return Err(format!("{b:?}: session list holds {} wrongly", h.0));
                }
                prev = h.0;
                listed += 1;
                if listed > want {
                    break;
                }
            }
            if listed != want {
                return Err(format!("{b:?}: {listed} listed, {want} sessions"));
            }
            if self.mapped_port(b.addr, b.proto, &internal) != Some(b.port) {
                return Err(format!("{b:?}: {internal:?} cannot find its mapping"));
            }
        }
        if self.mappings.indexed() != per_binding.len() {
            return Err(format!(
                "endpoint index has {} entries for {} mappings",
                self.mappings.indexed(),
                per_binding.len()
            ));
        }
        Ok(())
    }

    /// Timer-wheel entries: one per session, always.
    pub fn wheel_entries(&self) -> usize {
        self.wheel.len()
    }
}
