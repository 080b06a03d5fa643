//! Security events the dataplane produces (session create, close, policy
//! deny), as fixed-size records: what a packet path can afford.
//!
//! Producers never block. A worker pushes into its own bounded queue
//! ([`EVENT_QUEUE`] events); a full queue drops the event and counts it,
//! and so does a queue whose collector is gone. Before that, a GCRA limiter
//! per (kind, ingress zone) — and for denies also one total budget — keeps
//! a deny storm from taking the room session creates and closes need.
//! Closes come from the session table's one removal path (the table keeps
//! a bounded log of them, drained by the collector), so every way a
//! session ends is seen. Formatting and sending (syslog, files) is the
//! daemon's: nothing here does I/O.
//!
//! HA: only the primary of a session's RG creates and expires it, so only
//! it logs those; a session's id is derived from its forward key, which
//! both nodes hold, so the close a new primary logs after a failover
//! carries the id the old primary's create did.

use crate::screen::ScreenKind;
use crate::session::{
    FlowCounters, InterfaceId, Millis, Nat, PolicyId, RemoveReason, SessionKey, SessionRecord,
    TcpState, ZoneId, nat_of,
};
use rustc_hash::FxHashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use tandem_proto::RgId;

/// Events one worker's queue holds before it drops (about 300 KiB).
pub const EVENT_QUEUE: usize = 2048;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    SessionCreate = 0,
    SessionClose = 1,
    PolicyDeny = 2,
    /// A packet a zone's screen refused ([`crate::screen`]).
    ScreenDrop = 3,
}

impl EventKind {
    pub const ALL: [EventKind; 4] = [
        EventKind::SessionCreate,
        EventKind::SessionClose,
        EventKind::PolicyDeny,
        EventKind::ScreenDrop,
    ];

    /// The Junos RT_FLOW message id it corresponds to.
    pub fn msgid(self) -> &'static str {
        match self {
            EventKind::SessionCreate => "RT_FLOW_SESSION_CREATE",
            EventKind::SessionClose => "RT_FLOW_SESSION_CLOSE",
            EventKind::PolicyDeny => "RT_FLOW_SESSION_DENY",
            EventKind::ScreenDrop => "RT_SCREEN",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::SessionCreate => "session-create",
            EventKind::SessionClose => "session-close",
            EventKind::PolicyDeny => "policy-deny",
            EventKind::ScreenDrop => "screen-drop",
        }
    }
}

/// Why a session ended, as logged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    TcpFin,
    TcpRst,
    IdleTimeout,
    /// Removed by this node's dataplane or operator.
    Cleared,
    /// A completed bulk from the RG's primary did not contain it.
    Reconcile,
    /// Dropped with the whole table (the dataplane stopped).
    Flushed,
    /// Evicted unestablished to make room above the high watermark.
    EarlyDrop,
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::TcpFin => "tcp-fin",
            CloseReason::TcpRst => "tcp-rst",
            CloseReason::IdleTimeout => "idle-timeout",
            CloseReason::Cleared => "cleared",
            CloseReason::Reconcile => "reconcile",
            CloseReason::Flushed => "flushed",
            CloseReason::EarlyDrop => "early-drop",
        }
    }

    /// What a removal is worth logging as; `None` for removals that end
    /// nothing (a copy replaced by the peer's newer one) or that the
    /// owner logs itself (its delete reaching the peer).
    pub fn of(removal: RemoveReason, state: TcpState) -> Option<CloseReason> {
        Some(match removal {
            RemoveReason::Expired => match state {
                TcpState::FinWait | TcpState::CloseWait | TcpState::TimeWait => CloseReason::TcpFin,
                TcpState::Closed => CloseReason::TcpRst,
                _ => CloseReason::IdleTimeout,
            },
            RemoveReason::Closed => CloseReason::Cleared,
            RemoveReason::Reconciled => CloseReason::Reconcile,
            RemoveReason::Flushed => CloseReason::Flushed,
            RemoveReason::EarlyDropped => CloseReason::EarlyDrop,
            RemoveReason::PeerDelete | RemoveReason::Replaced => return None,
        })
    }
}

/// One event: fixed size, no allocation. Names (zones, policy,
/// interfaces) are resolved from the configuration when it is formatted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowEvent {
    pub kind: EventKind,
    /// Closes only.
    pub reason: Option<CloseReason>,
    /// Screen drops only: what the screen refused.
    pub screen: Option<ScreenKind>,
    pub session_id: u64,
    /// The first packet as it arrived (pre-NAT, ingress zone).
    pub key: SessionKey,
    /// A reply as it will arrive (post-NAT, egress zone); for a deny, the
    /// zone the packet would have left by, addresses as `key`'s.
    pub reverse: SessionKey,
    /// 0: the default deny.
    pub policy: PolicyId,
    pub ingress_if: InterfaceId,
    pub egress_if: InterfaceId,
    pub owner_rg: RgId,
    pub counters: FlowCounters,
    pub created: Millis,
    pub at: Millis,
}

/// A session's id in logs: the same on both nodes (derived from the
/// forward key they share), never 0. A 5-tuple reused after its session
/// ended gets the same id again, as a new session.
pub fn session_id(key: &SessionKey) -> u64 {
    rustc_hash::FxBuildHasher.hash_one(key).max(1)
}

impl FlowEvent {
    /// The translation, derived from the two keys as for a session.
    pub fn nat(&self) -> Nat {
        nat_of(&self.key, &self.reverse)
    }

    /// Session length: first packet to the last one seen (closes), 0 for
    /// creates and denies.
    pub fn elapsed_ms(&self) -> u64 {
        match self.kind {
            EventKind::SessionClose => self.at.0.saturating_sub(self.created.0),
            _ => 0,
        }
    }

    /// The create or close event of a session.
    pub fn of_session(kind: EventKind, r: &SessionRecord, at: Millis) -> FlowEvent {
        FlowEvent {
            kind,
            reason: None,
            screen: None,
            session_id: session_id(&r.key),
            key: r.key,
            reverse: r.reverse,
            policy: r.policy,
            ingress_if: r.ingress_if,
            egress_if: r.egress_if,
            owner_rg: r.owner_rg,
            counters: r.counters(),
            created: r.created,
            at,
        }
    }
}

/// Generic cell rate algorithm (a virtual scheduler): `rate` events per
/// second on average, `burst` back to back. State is one number: the
/// theoretical arrival time of the next conforming event.
#[derive(Clone, Copy, Debug)]
pub struct Gcra {
    tat_us: u64,
}

impl Gcra {
    pub const fn new() -> Gcra {
        Gcra { tat_us: 0 }
    }

    /// Whether an event at `now_us` conforms (and if so, accounts it).
    /// `rate` 0 admits nothing.
    pub fn allow(&mut self, now_us: u64, rate: u32, burst: u32) -> bool {
        if rate == 0 {
            return false;
        }
        let interval = 1_000_000 / u64::from(rate).max(1);
        let tolerance = interval * u64::from(burst.max(1) - 1);
        let tat = self.tat_us.max(now_us);
        if tat > now_us + tolerance {
            return false;
        }
        self.tat_us = tat + interval;
        true
    }
}

impl Default for Gcra {
    fn default() -> Gcra {
        Gcra::new()
    }
}

/// Rates per second (and bursts) of each kind per ingress zone, per
/// worker, and the total denies may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventRates {
    pub session_rate: u32,
    pub session_burst: u32,
    pub deny_rate: u32,
    pub deny_burst: u32,
    /// All zones' denies together.
    pub deny_total_rate: u32,
}

impl Default for EventRates {
    fn default() -> EventRates {
        EventRates {
            session_rate: 20_000,
            session_burst: 2_000,
            deny_rate: 100,
            deny_burst: 50,
            deny_total_rate: 500,
        }
    }
}

/// Why an event was not delivered to the collector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventDrop {
    RateLimited = 0,
    QueueFull = 1,
    NoCollector = 2,
}

impl EventDrop {
    pub const ALL: [EventDrop; 3] = [
        EventDrop::RateLimited,
        EventDrop::QueueFull,
        EventDrop::NoCollector,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventDrop::RateLimited => "rate-limited",
            EventDrop::QueueFull => "queue-full",
            EventDrop::NoCollector => "no-collector",
        }
    }
}

/// Counters of one node's events, by kind: produced, queued, dropped by
/// reason. Shared by every producer and the collector.
#[derive(Debug, Default)]
pub struct EventStats {
    pub produced: [AtomicU64; EventKind::ALL.len()],
    pub queued: [AtomicU64; EventKind::ALL.len()],
    pub dropped: [[AtomicU64; EventKind::ALL.len()]; EventDrop::ALL.len()],
}

impl EventStats {
    pub fn count(&self, kind: EventKind) -> (u64, u64) {
        let k = kind as usize;
        (
            self.produced[k].load(Ordering::Relaxed),
            self.queued[k].load(Ordering::Relaxed),
        )
    }

    pub fn dropped(&self, kind: EventKind, why: EventDrop) -> u64 {
        self.dropped[why as usize][kind as usize].load(Ordering::Relaxed)
    }

    pub fn drop_one(&self, kind: EventKind, why: EventDrop) {
        self.dropped[why as usize][kind as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// Where workers' queues meet the collector: each worker takes a
/// [`EventProducer`] (its own bounded queue); the collector drains them
/// all.
#[derive(Default)]
pub struct EventHub {
    queues: Mutex<Vec<Receiver<FlowEvent>>>,
    pub stats: Arc<EventStats>,
    pub rates: EventRates,
}

impl EventHub {
    pub fn new(rates: EventRates) -> Arc<EventHub> {
        Arc::new(EventHub {
            queues: Mutex::default(),
            stats: Arc::default(),
            rates,
        })
    }

    /// A new worker's producer, with a queue of [`EVENT_QUEUE`] events.
    pub fn producer(&self) -> EventProducer {
        let (tx, rx) = sync_channel(EVENT_QUEUE);
        self.queues
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(rx);
        EventProducer {
            tx,
            stats: self.stats.clone(),
            limiter: EventLimiter::new(self.rates),
        }
    }

    /// Moves every queued event into `out` (queues of exited workers are
    /// dropped once empty).
    pub fn drain(&self, out: &mut Vec<FlowEvent>) {
        let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        queues.retain(|rx| {
            loop {
                match rx.try_recv() {
                    Ok(e) => out.push(e),
                    Err(std::sync::mpsc::TryRecvError::Empty) => break true,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => break false,
                }
            }
        });
    }
}

/// The limits of one producer: a GCRA per (kind, ingress zone), and one
/// total that denies must also pass (so creates and closes never compete
/// with a deny storm for it). Bounded: kinds × configured zones.
pub struct EventLimiter {
    rates: EventRates,
    limits: FxHashMap<(EventKind, ZoneId), Gcra>,
    deny_total: Gcra,
}

impl EventLimiter {
    pub fn new(rates: EventRates) -> EventLimiter {
        EventLimiter {
            rates,
            limits: FxHashMap::default(),
            deny_total: Gcra::new(),
        }
    }

    /// Whether `e` (ingress zone: `e.key.zone`, time: `e.at`) conforms.
    pub fn allow(&mut self, e: &FlowEvent) -> bool {
        let now_us = e.at.0.saturating_mul(1000);
        let r = self.rates;
        // Screen drops are denies: an attack's, limited the same way.
        let deny = matches!(e.kind, EventKind::PolicyDeny | EventKind::ScreenDrop);
        let (rate, burst) = if deny {
            (r.deny_rate, r.deny_burst)
        } else {
            (r.session_rate, r.session_burst)
        };
        let zone_ok = self
            .limits
            .entry((e.kind, e.key.zone))
            .or_default()
            .allow(now_us, rate, burst);
        zone_ok
            && (!deny
                || self
                    .deny_total
                    .allow(now_us, r.deny_total_rate, r.deny_burst))
    }
}

/// A worker's end: rate limits, then its bounded queue; never blocks.
pub struct EventProducer {
    tx: SyncSender<FlowEvent>,
    stats: Arc<EventStats>,
    limiter: EventLimiter,
}

impl EventProducer {
    /// Offers `e`; what is not queued is counted by reason.
    pub fn offer(&mut self, e: FlowEvent) {
        let k = e.kind as usize;
        self.stats.produced[k].fetch_add(1, Ordering::Relaxed);
        if !self.limiter.allow(&e) {
            self.stats.drop_one(e.kind, EventDrop::RateLimited);
            return;
        }
        match self.tx.try_send(e) {
            Ok(()) => {
                self.stats.queued[k].fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Full(_)) => self.stats.drop_one(e.kind, EventDrop::QueueFull),
            Err(TrySendError::Disconnected(_)) => {
                self.stats.drop_one(e.kind, EventDrop::NoCollector)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::Addr;
    use std::net::Ipv4Addr;

    fn event(kind: EventKind, zone: u16, at_ms: u64) -> FlowEvent {
        let key = SessionKey::new(
            Ipv4Addr::new(10, 1, 0, 10),
            40000,
            Ipv4Addr::new(192, 0, 2, 100),
            443,
            6,
            ZoneId(zone),
        );
        FlowEvent {
            kind,
            reason: None,
            screen: None,
            session_id: session_id(&key),
            key,
            reverse: key,
            policy: PolicyId(1),
            ingress_if: InterfaceId(0),
            egress_if: InterfaceId(1),
            owner_rg: RgId(1),
            counters: FlowCounters::default(),
            created: Millis(at_ms),
            at: Millis(at_ms),
        }
    }

    #[test]
    fn gcra_admits_the_burst_then_the_rate() {
        let mut g = Gcra::new();
        let now = 5_000_000;
        let burst = (0..20).filter(|_| g.allow(now, 10, 5)).count();
        assert_eq!(burst, 5);
        // 10/s: one more every 100 ms.
        assert!(!g.allow(now + 50_000, 10, 5));
        assert!(g.allow(now + 100_000, 10, 5));
        assert!(!g.allow(now + 150_000, 10, 5));
        let mut zero = Gcra::new();
        assert!(!zero.allow(now, 0, 5));
    }

    #[test]
    fn a_deny_storm_leaves_creates_and_closes_their_room() {
        let hub = EventHub::new(EventRates {
            session_rate: 1000,
            session_burst: 100,
            deny_rate: 10,
            deny_burst: 5,
            deny_total_rate: 10,
        });
        let mut p = hub.producer();
        // 1 s: 10,000 denies from one zone and 2,000 from another, with
        // 100 creates and 100 closes among them.
        for ms in 0..1000u64 {
            for _ in 0..10 {
                p.offer(event(EventKind::PolicyDeny, 2, 10_000 + ms));
            }
            if ms % 2 == 0 {
                p.offer(event(EventKind::PolicyDeny, 3, 10_000 + ms));
            }
            if ms % 10 == 0 {
                p.offer(event(EventKind::SessionCreate, 1, 10_000 + ms));
                p.offer(event(EventKind::SessionClose, 1, 10_000 + ms));
            }
        }
        let mut out = Vec::new();
        hub.drain(&mut out);
        let n = |k| out.iter().filter(|e| e.kind == k).count() as u64;
        assert_eq!(n(EventKind::SessionCreate), 100);
        assert_eq!(n(EventKind::SessionClose), 100);
        // Denies: the total budget (burst 5, then 10/s) over one second.
        let denies = n(EventKind::PolicyDeny);
        assert!((10..=16).contains(&denies), "{denies}");
        let s = &hub.stats;
        let (produced, queued) = s.count(EventKind::PolicyDeny);
        assert_eq!(produced, 10_500);
        assert_eq!(queued, denies);
        assert_eq!(
            s.dropped(EventKind::PolicyDeny, EventDrop::RateLimited),
            produced - denies,
            "every deny not queued is counted"
        );
    }

    #[test]
    fn a_full_queue_and_a_gone_collector_drop_and_count() {
        let hub = EventHub::new(EventRates {
            session_rate: 1_000_000,
            session_burst: 1_000_000,
            ..EventRates::default()
        });
        let mut p = hub.producer();
        for _ in 0..EVENT_QUEUE + 10 {
            p.offer(event(EventKind::SessionCreate, 1, 1));
        }
        let s = hub.stats.clone();
        assert_eq!(
            s.dropped(EventKind::SessionCreate, EventDrop::QueueFull),
            10
        );
        drop(hub);
        p.offer(event(EventKind::SessionCreate, 1, 2));
        assert_eq!(
            s.dropped(EventKind::SessionCreate, EventDrop::NoCollector),
            1
        );
    }

    #[test]
    fn close_reasons_follow_how_the_session_ended() {
        use RemoveReason as R;
        assert_eq!(
            CloseReason::of(R::Expired, TcpState::TimeWait),
            Some(CloseReason::TcpFin)
        );
        assert_eq!(
            CloseReason::of(R::Expired, TcpState::Closed),
            Some(CloseReason::TcpRst)
        );
        assert_eq!(
            CloseReason::of(R::Expired, TcpState::Established),
            Some(CloseReason::IdleTimeout)
        );
        assert_eq!(
            CloseReason::of(R::Reconciled, TcpState::None),
            Some(CloseReason::Reconcile)
        );
        assert_eq!(CloseReason::of(R::PeerDelete, TcpState::None), None);
        assert_eq!(CloseReason::of(R::Replaced, TcpState::None), None);
        let _ = Addr::default();
    }

    #[test]
    fn session_ids_are_the_same_for_the_same_key_and_never_zero() {
        let a = event(EventKind::SessionCreate, 1, 1);
        let b = event(EventKind::SessionClose, 1, 99);
        assert_eq!(a.session_id, b.session_id);
        assert_ne!(a.session_id, 0);
        assert_ne!(
            a.session_id,
            event(EventKind::SessionCreate, 2, 1).session_id
        );
    }
}
