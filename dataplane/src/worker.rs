//! The shell around the packet core that every dataplane thread runs: one
//! [`Worker`] per thread, all of a node's workers over one [`Shared`].
//!
//! Per burst a worker takes the session table's shared (read) lock once,
//! loads the role map and the neighbor map once, prefetches the burst's
//! sessions, then runs the core over the frames in order. The first frame
//! that must change the table's structure (a new session, a TCP state
//! change) makes the worker trade the read lock for the write lock, and the
//! rest of the burst runs under it — in order, so a session one frame
//! creates is seen by the next. Established traffic therefore never takes
//! an exclusive lock: its per-packet updates are atomic
//! ([`crate::session::Activity`]). After the burst the worker hands what
//! the core produced to the shared state: deltas to the per-RG queues
//! (non-blocking, counted when full), learned neighbors to the shared map.
//!
//! Writers other than workers (sync, reconcile, expiry) hold the write lock
//! for one slice of at most [`crate::session::SLICE`] sessions; the lock is
//! writer-preferring, so a worker waits at most one slice plus one burst.

use crate::config::Compiled;
use crate::core::{
    Arrival, Core, CoreStats, Effects, Env, FabricOut, NeedsExclusive, NeighborMap, OUTBOX_LIMIT,
    TableView, Verdict, bump,
};
use crate::delta::DeltaProducer;
use crate::events::{EventHub, EventProducer};
use crate::icmp::TokenBucket;
use crate::packet::Mac;
use crate::session::{
    self, Addr, InterfaceId, Millis, SLICE, SessionKey, SessionTable, SharedTable,
};
use arc_swap::ArcSwap;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tandem_proto::{RgId, RoleMap};

/// Most neighbors a node learns; beyond it new ones are refused and
/// counted (a spoofed ARP flood cannot grow memory without bound).
pub const NEIGHBOR_LIMIT: usize = 16_384;

/// Next-hop MACs shared by a node's workers: loaded once per burst
/// (`ArcSwap`: no shared write on the read side), replaced copy-on-write
/// after a burst that learned something new or changed — rare, and bounded
/// by [`NEIGHBOR_LIMIT`].
#[derive(Debug, Default)]
pub struct Neighbors {
    map: ArcSwap<NeighborMap>,
    /// Learned neighbors refused because the map held [`NEIGHBOR_LIMIT`].
    pub refused: AtomicU64,
}

impl Neighbors {
    /// A static neighbor (tests, configuration); never refused.
    pub fn insert(&self, iface: InterfaceId, ip: Addr, mac: Mac) {
        self.map.rcu(|m| {
            let mut m = NeighborMap::clone(m);
            m.insert((iface, ip), mac);
            m
        });
    }

    pub fn get(&self, iface: InterfaceId, ip: Addr) -> Option<Mac> {
        self.map.load().get(&(iface, ip)).copied()
    }

    pub fn len(&self) -> usize {
        self.map.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn learn(&self, learned: &[((InterfaceId, Addr), Mac)]) {
        let mut refused = 0;
        self.map.rcu(|m| {
            refused = 0;
            let mut m = NeighborMap::clone(m);
            for (k, mac) in learned {
                if m.len() < NEIGHBOR_LIMIT || m.contains_key(k) {
                    m.insert(*k, *mac);
                } else {
                    refused += 1;
                }
            }
            m
        });
        self.refused.fetch_add(refused, Ordering::Relaxed);
    }
}

/// What all of a node's workers share.
pub struct Shared {
    pub cfg: Arc<Compiled>,
    pub table: SharedTable,
    pub roles: Arc<ArcSwap<RoleMap>>,
    pub neighbors: Arc<Neighbors>,
    pub deltas: DeltaProducer,
    /// The node's ICMP rate limit.
    pub icmp: Arc<TokenBucket>,
    /// Where security events go (`None`: logging off, the core's events
    /// are discarded).
    pub events: Option<Arc<EventHub>>,
}

impl Shared {
    /// A node's shared state with an empty neighbor map and the
    /// configuration's ICMP limit.
    pub fn new(
        cfg: Arc<Compiled>,
        table: SharedTable,
        roles: Arc<ArcSwap<RoleMap>>,
        deltas: DeltaProducer,
    ) -> Shared {
        Shared {
            icmp: Arc::new(TokenBucket::new(cfg.icmp_rate, cfg.icmp_burst)),
            cfg,
            table,
            roles,
            neighbors: Arc::default(),
            deltas,
            events: None,
        }
    }
}

/// How a worker gets at the table: the daemon's [`SharedTable`], or a
/// test's wrapper that does something between a worker's release of the
/// read lock and its taking of the write lock.
pub trait TableLock {
    fn read(&self) -> impl Deref<Target = SessionTable> + '_;
    fn write(&self) -> impl DerefMut<Target = SessionTable> + '_;
}

impl TableLock for SharedTable {
    fn read(&self) -> impl Deref<Target = SessionTable> + '_ {
        session::read(self)
    }

    fn write(&self) -> impl DerefMut<Target = SessionTable> + '_ {
        session::lock_upgrade(self)
    }
}

/// The frames of one burst, taken one at a time.
pub trait FrameBurst {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Frame `i` (`i < len`) and how it arrived.
    fn frame(&mut self, i: usize) -> (&mut [u8], Arrival);
}

/// Frames in plain buffers (tests, benchmarks).
impl<B: AsMut<[u8]>> FrameBurst for [(B, Arrival)] {
    fn len(&self) -> usize {
        <[_]>::len(self)
    }

    fn frame(&mut self, i: usize) -> (&mut [u8], Arrival) {
        let (b, a) = &mut self[i];
        (b.as_mut(), *a)
    }
}

/// `None` of the type `f` would return (names an opaque type without
/// calling `f`).
fn none_of<T>(_f: impl FnOnce() -> T) -> Option<T> {
    None
}

/// Largest burst the prefetch covers at once.
const PREFETCH_MAX: usize = 64;

/// One dataplane thread's core and scratch space.
pub struct Worker {
    shared: Arc<Shared>,
    state: BurstState,
}

/// Everything of a worker but its handle on the shared state (so a burst
/// borrows the two apart, without touching the `Arc`'s count: that line
/// is shared by every worker).
struct BurstState {
    core: Core,
    fx: Effects,
    keys: Vec<SessionKey>,
    /// Frames the core built (ARP/ND requests, announcements) for the I/O
    /// shell to send; at most [`OUTBOX_LIMIT`].
    outbox: Vec<(InterfaceId, Vec<u8>)>,
    /// Frames the core released for the peer (early fragments whose first
    /// went to the fabric); at most [`OUTBOX_LIMIT`].
    fabric_outbox: Vec<(FabricOut, Vec<u8>)>,
    /// This worker's event queue and limits.
    events: Option<EventProducer>,
    prefetch: bool,
}

impl Worker {
    pub fn new(shared: Arc<Shared>) -> Worker {
        Worker {
            state: BurstState {
                core: Core::new(shared.cfg.clone()),
                fx: Effects::default(),
                keys: Vec::with_capacity(PREFETCH_MAX),
                outbox: Vec::new(),
                fabric_outbox: Vec::new(),
                events: shared.events.as_ref().map(|hub| hub.producer()),
                prefetch: true,
            },
            shared,
        }
    }

    /// Turns the burst prefetch off or on (benchmarks measure its effect;
    /// results never depend on it).
    pub fn set_prefetch(&mut self, on: bool) {
        self.state.prefetch = on;
    }

    pub fn stats(&self) -> &Arc<CoreStats> {
        &self.state.core.stats
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub fn config(&self) -> &Compiled {
        self.state.core.config()
    }

    /// The core (its flow keys, for tests and benchmarks).
    pub fn core(&self) -> &Core {
        &self.state.core
    }

    /// Runs one burst against the node's table; one verdict per frame, in
    /// order, in `verdicts` (cleared first).
    pub fn burst<F: FrameBurst + ?Sized>(
        &mut self,
        frames: &mut F,
        now: Millis,
        verdicts: &mut Vec<Verdict>,
    ) {
        let Worker { shared, state } = self;
        state.burst(shared, &shared.table, frames, now, verdicts);
    }

    /// [`Worker::burst`] against any [`TableLock`].
    pub fn burst_with<L: TableLock, F: FrameBurst + ?Sized>(
        &mut self,
        lock: &L,
        frames: &mut F,
        now: Millis,
        verdicts: &mut Vec<Verdict>,
    ) {
        let Worker { shared, state } = self;
        state.burst(shared, lock, frames, now, verdicts);
    }

    /// One frame as a burst of one (tests, the slow path).
    pub fn process(&mut self, frame: &mut [u8], arrival: Arrival, now: Millis) -> Verdict {
        let mut verdicts = Vec::with_capacity(1);
        self.burst(&mut [(frame, arrival)][..], now, &mut verdicts);
        verdicts[0]
    }

    /// Between bursts: sends held frames whose next hop another worker
    /// learned meanwhile, expires the rest and old fragment datagrams.
    /// Cheap when nothing is held.
    pub fn tick(&mut self, now: Millis) {
        let s = &mut self.state;
        if s.core.has_fragments() {
            s.core.expire_fragments(now);
        }
        if !s.core.has_held() {
            return;
        }
        s.fx.clear();
        let neighbors = self.shared.neighbors.map.load();
        s.core.release_held(&neighbors, now, &mut s.fx);
        s.take_frames();
    }

    /// Queues gratuitous ARP / unsolicited NA for `rg`'s VIPs (on becoming
    /// primary; one worker of the node does it).
    pub fn announce(&mut self, rg: RgId) {
        let s = &mut self.state;
        s.fx.frames.clear();
        s.core.announce(rg, &mut s.fx);
        s.take_frames();
    }

    /// Frames the core built, for the I/O shell to send.
    pub fn outbox(&mut self) -> &mut Vec<(InterfaceId, Vec<u8>)> {
        &mut self.state.outbox
    }

    /// Frames the core released for the peer, for the I/O shell to wrap
    /// and send on the fabric.
    pub fn fabric_outbox(&mut self) -> &mut Vec<(FabricOut, Vec<u8>)> {
        &mut self.state.fabric_outbox
    }
}

impl BurstState {
    fn burst<L: TableLock, F: FrameBurst + ?Sized>(
        &mut self,
        shared: &Shared,
        lock: &L,
        frames: &mut F,
        now: Millis,
        verdicts: &mut Vec<Verdict>,
    ) {
        verdicts.clear();
        self.fx.clear();
        let roles = shared.roles.load();
        let neighbors = shared.neighbors.map.load();
        let env = Env {
            roles: &roles,
            neighbors: &neighbors,
            icmp: &shared.icmp,
            now,
        };
        // The burst holds the read lock, or — from the first frame that
        // needs it — the write lock, never both.
        let mut read = Some(lock.read());
        let mut write = none_of(|| lock.write());
        if let Some(t) = &read
            && self.prefetch
        {
            self.prefetch(t, frames);
        }
        for i in 0..frames.len() {
            let (f, arrival) = frames.frame(i);
            let v = loop {
                let mut view = match (&mut write, &read) {
                    (Some(w), _) => TableView::Exclusive(w),
                    (None, Some(r)) => TableView::Shared(r),
                    (None, None) => unreachable!("a lock is held for the whole burst"),
                };
                match self.core.process(f, arrival, &mut view, &env, &mut self.fx) {
                    Ok(v) => break v,
                    Err(NeedsExclusive) => {
                        // Release the read lock before asking for the write
                        // lock (the same thread holding both deadlocks).
                        read = None;
                        write = Some(lock.write());
                        bump(&self.core.stats.exclusive_bursts, 1);
                    }
                }
            };
            verdicts.push(v);
        }
        drop(read);
        drop(write);
        if self.core.has_held() {
            self.core.release_held(&neighbors, now, &mut self.fx);
        }
        self.apply_effects(shared);
    }

    /// Starts the loads of the burst's sessions (frames from the wire only:
    /// fabric frames are rewritten before their lookup).
    fn prefetch<F: FrameBurst + ?Sized>(&mut self, table: &SessionTable, frames: &mut F) {
        self.keys.clear();
        for i in 0..frames.len().min(PREFETCH_MAX) {
            let (f, arrival) = frames.frame(i);
            if let Arrival::Wire(ingress) = arrival
                && let Some(k) = self.core.flow_key(f, ingress)
            {
                self.keys.push(k);
            }
        }
        if !self.keys.is_empty() {
            table.prefetch_lookups(&self.keys);
        }
    }

    fn apply_effects(&mut self, shared: &Shared) {
        for (rg, key) in self.fx.deltas.drain(..) {
            if !shared.deltas.push(rg, key) {
                bump(&self.core.stats.deltas_dropped, 1);
            }
        }
        if !self.fx.learned.is_empty() {
            shared.neighbors.learn(&self.fx.learned);
        }
        match &mut self.events {
            Some(p) => self.fx.events.drain(..).for_each(|e| p.offer(e)),
            None => self.fx.events.clear(),
        }
        self.take_frames();
    }

    fn take_frames(&mut self) {
        for f in self.fx.frames.drain(..) {
            if self.outbox.len() < OUTBOX_LIMIT {
                self.outbox.push(f);
            } else {
                bump(&self.core.stats.outbox_dropped, 1);
            }
        }
        for f in self.fx.fabric.drain(..) {
            if self.fabric_outbox.len() < OUTBOX_LIMIT {
                self.fabric_outbox.push(f);
            } else {
                bump(&self.core.stats.outbox_dropped, 1);
            }
        }
    }
}

/// When to announce (gratuitous ARP / unsolicited NA) each RG's VIPs:
/// at once on becoming primary, then `count - 1` more times `interval_ms`
/// apart, for as long as the node stays primary at the same epoch (a
/// demotion or a new epoch cancels the rest; a new promotion starts over).
pub struct AnnounceSchedule {
    count: u32,
    interval_ms: u64,
    last: Arc<RoleMap>,
    pending: Vec<PendingAnnounce>,
}

struct PendingAnnounce {
    rg: RgId,
    epoch: tandem_proto::Epoch,
    left: u32,
    next: Millis,
}

impl AnnounceSchedule {
    pub fn new(count: u32, interval_ms: u64) -> AnnounceSchedule {
        AnnounceSchedule {
            count: count.max(1),
            interval_ms,
            last: Arc::new(RoleMap::new()),
            pending: Vec::new(),
        }
    }

    /// The RGs to announce now, given the current role map.
    pub fn due(&mut self, roles: &Arc<RoleMap>, now: Millis) -> Vec<RgId> {
        if !Arc::ptr_eq(roles, &self.last) {
            for (rg, r) in roles.iter() {
                let was = self
                    .last
                    .get(rg)
                    .is_some_and(|o| o.primary && o.epoch == r.epoch);
                if r.primary && !was {
                    self.pending.retain(|p| p.rg != *rg);
                    self.pending.push(PendingAnnounce {
                        rg: *rg,
                        epoch: r.epoch,
                        left: self.count,
                        next: now,
                    });
                }
            }
            self.last = roles.clone();
        }
        self.pending.retain(|p| {
            roles
                .get(&p.rg)
                .is_some_and(|r| r.primary && r.epoch == p.epoch)
        });
        let mut due = Vec::new();
        for p in &mut self.pending {
            if now >= p.next {
                due.push(p.rg);
                p.left -= 1;
                p.next = Millis(now.0 + self.interval_ms);
            }
        }
        self.pending.retain(|p| p.left > 0);
        due
    }
}

/// Slab slots one early-ageing slice looks at (it removes at most
/// [`SLICE`] of them: a lock hold like every writer's).
const AGEING_SLICE: usize = 256;

/// Expires idle sessions of `shared`'s table in slices of
/// [`SLICE`] entries, releasing the write lock between slices so workers
/// proceed; a delete delta goes out for each expired session of a data RG.
/// Returns how many expired.
pub fn expire(shared: &Shared, now: Millis) -> usize {
    let delete = |r: &session::SessionRecord| {
        // A session the peer cannot hold (a TCP handshake, or one that
        // closed before the sender read it) needs no delete. A full queue
        // marks the RG for a bulk, which repairs it.
        if r.owner_rg.is_data() && r.sent_to_peer() {
            let _ = shared.deltas.push_delete(r.owner_rg, r.key);
        }
    };
    let mut expired = 0;
    loop {
        let slice = session::lock_between_bursts(&shared.table).expire_slice(now, SLICE, delete);
        expired += slice.expired;
        if slice.done {
            break;
        }
    }
    // Under table pressure, early ageing: a tenth of the slab per call (a
    // pass a second at the supervisor's 100 ms), in slices.
    let mut budget = session::lock_between_bursts(&shared.table)
        .capacity_slots()
        .div_ceil(10);
    while budget > 0 {
        let mut t = session::lock_between_bursts(&shared.table);
        let slice = t.early_age_slice(now, AGEING_SLICE.min(budget), delete);
        drop(t);
        expired += slice.expired;
        budget = budget.saturating_sub(slice.examined.max(1));
        if slice.done {
            break;
        }
    }
    expired
}

#[cfg(test)]
#[path = "worker_tests.rs"]
mod tests;
