//! What the table stores per session, and the timeouts that decide its life.

use super::key::{Addr, NatBinding, SessionKey, ZoneId, proto};
use crate::tcp::{Side as TcpSide, Windows};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use tandem_proto::RgId;

/// Milliseconds on the caller's monotonic clock. The table never reads a
/// clock itself, so tests and simulations drive time explicitly.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Millis(pub u64);

impl Millis {
    pub const fn saturating_sub(self, other: Millis) -> u64 {
        self.0.saturating_sub(other.0)
    }
}

/// A logical interface (reth or local port) by its cluster-wide config index.
/// Never an ifindex: ifindexes are node-local.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InterfaceId(pub u16);

/// The security policy that permitted the session.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyId(pub u32);

/// Who holds the authoritative copy of a session on this node. Not stored
/// per session: it is the role of the session's owner RG here
/// ([`super::SessionTable::origin`]), so a role change flips every session
/// of the RG at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Origin {
    /// This node is primary for the owner RG (or the RG is local-only):
    /// it emits the session's deltas and expires it.
    LocalOwned = 0,
    /// A copy of a session the peer is primary for.
    PeerSynced = 1,
}

/// TCP connection tracking state (`None` for other protocols).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum TcpState {
    None = 0,
    SynSent = 1,
    SynReceived = 2,
    Established = 3,
    FinWait = 4,
    CloseWait = 5,
    TimeWait = 6,
    Closed = 7,
}

impl TcpState {
    pub const ALL: [TcpState; 8] = [
        TcpState::None,
        TcpState::SynSent,
        TcpState::SynReceived,
        TcpState::Established,
        TcpState::FinWait,
        TcpState::CloseWait,
        TcpState::TimeWait,
        TcpState::Closed,
    ];

    /// Decodes the wire value; unknown values are rejected, never guessed.
    pub fn from_u8(v: u8) -> Option<TcpState> {
        TcpState::ALL.get(usize::from(v)).copied()
    }

    pub fn name(self) -> &'static str {
        match self {
            TcpState::None => "none",
            TcpState::SynSent => "syn-sent",
            TcpState::SynReceived => "syn-received",
            TcpState::Established => "established",
            TcpState::FinWait => "fin-wait",
            TcpState::CloseWait => "close-wait",
            TcpState::TimeWait => "time-wait",
            TcpState::Closed => "closed",
        }
    }
}

/// Record flag: a SYN proxy translates the session's sequence numbers.
pub const PROXIED: u8 = 1;
/// Record flag: the session is synced to the peer. Set for every session
/// but a TCP one whose handshake has not completed, and kept from then on
/// (a connection reset in its handshake never was synced, one reset later
/// was): a SYN flood must not cross the control link, and a failover
/// keeps established sessions.
pub const REPLICATED: u8 = 2;

/// Whether a session of `proto` entering `state` becomes replicated.
pub fn establishes(proto_num: u8, state: TcpState) -> bool {
    proto_num != proto::TCP
        || matches!(
            state,
            TcpState::Established | TcpState::FinWait | TcpState::CloseWait | TcpState::TimeWait
        )
}

/// Idle timeouts per protocol and TCP state, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp_opening_ms: u32,
    pub tcp_established_ms: u32,
    pub tcp_closing_ms: u32,
    pub tcp_time_wait_ms: u32,
    pub udp_ms: u32,
    pub icmp_ms: u32,
    pub other_ms: u32,
}

impl Default for Timeouts {
    /// Junos-like defaults: long-lived established TCP, short half-open.
    fn default() -> Timeouts {
        Timeouts {
            tcp_opening_ms: 20_000,
            tcp_established_ms: 1_800_000,
            tcp_closing_ms: 30_000,
            tcp_time_wait_ms: 2_000,
            // RFC 4787 REQ-5: a UDP mapping lives at least 2 minutes idle;
            // 5 is the recommended default.
            udp_ms: 300_000,
            icmp_ms: 60_000,
            other_ms: 30_000,
        }
    }
}

impl Timeouts {
    pub fn for_session(&self, proto_num: u8, state: TcpState) -> u32 {
        match proto_num {
            proto::TCP => match state {
                TcpState::Established => self.tcp_established_ms,
                TcpState::FinWait | TcpState::CloseWait => self.tcp_closing_ms,
                TcpState::TimeWait | TcpState::Closed => self.tcp_time_wait_ms,
                TcpState::None | TcpState::SynSent | TcpState::SynReceived => self.tcp_opening_ms,
            },
            proto::UDP => self.udp_ms,
            proto::ICMP | proto::ICMPV6 => self.icmp_ms,
            _ => self.other_ms,
        }
    }
}

/// Packet and byte counters per direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCounters {
    pub fwd_packets: u64,
    pub fwd_bytes: u64,
    pub rev_packets: u64,
    pub rev_bytes: u64,
}

/// What every packet of an established session updates: its counters and
/// its last-seen time. Workers write it through a shared reference (relaxed
/// atomics), so forwarding an established flow needs no exclusive access to
/// the table; everything else in a record changes only under `&mut`.
///
/// Updates are plain loads and stores, not locked read-modify-writes: a
/// locked instruction per packet would cost more than the rest of the
/// update and stall the loads a burst's prefetch started. One direction of
/// a flow arrives on one RX queue (RSS hashes the 5-tuple), so one worker
/// writes each direction's counters and they are exact; only if two
/// workers count the same direction of the same session at the same
/// instant (a flow moving between the wire and the fabric) can one
/// increment be lost. `last_seen` moves forward only, and is stored only
/// when the millisecond changes.
#[derive(Debug, Default)]
pub struct Activity {
    last_seen: AtomicU64,
    fwd_packets: AtomicU64,
    fwd_bytes: AtomicU64,
    rev_packets: AtomicU64,
    rev_bytes: AtomicU64,
}

impl Activity {
    pub(super) fn new(last_seen: Millis, c: FlowCounters) -> Activity {
        Activity {
            last_seen: AtomicU64::new(last_seen.0),
            fwd_packets: AtomicU64::new(c.fwd_packets),
            fwd_bytes: AtomicU64::new(c.fwd_bytes),
            rev_packets: AtomicU64::new(c.rev_packets),
            rev_bytes: AtomicU64::new(c.rev_bytes),
        }
    }

    #[inline]
    pub(super) fn touch(&self, dir: Direction, bytes: u32, now: Millis) {
        let (packets, octets) = match dir {
            Direction::Forward => (&self.fwd_packets, &self.fwd_bytes),
            Direction::Reverse => (&self.rev_packets, &self.rev_bytes),
        };
        packets.store(packets.load(Relaxed).wrapping_add(1), Relaxed);
        octets.store(octets.load(Relaxed).wrapping_add(u64::from(bytes)), Relaxed);
        self.advance(now);
    }

    #[inline]
    pub(super) fn advance(&self, now: Millis) {
        if self.last_seen.load(Relaxed) < now.0 {
            self.last_seen.store(now.0, Relaxed);
        }
    }

    pub fn last_seen(&self) -> Millis {
        Millis(self.last_seen.load(Relaxed))
    }

    pub(super) fn set_last_seen(&self, t: Millis) {
        self.last_seen.store(t.0, Relaxed);
    }

    pub fn counters(&self) -> FlowCounters {
        FlowCounters {
            fwd_packets: self.fwd_packets.load(Relaxed),
            fwd_bytes: self.fwd_bytes.load(Relaxed),
            rev_packets: self.rev_packets.load(Relaxed),
            rev_bytes: self.rev_bytes.load(Relaxed),
        }
    }

    pub(super) fn set_counters(&self, c: FlowCounters) {
        self.fwd_packets.store(c.fwd_packets, Relaxed);
        self.fwd_bytes.store(c.fwd_bytes, Relaxed);
        self.rev_packets.store(c.rev_packets, Relaxed);
        self.rev_bytes.store(c.rev_bytes, Relaxed);
    }
}

impl Clone for Activity {
    fn clone(&self) -> Activity {
        Activity::new(self.last_seen(), self.counters())
    }
}

impl PartialEq for Activity {
    fn eq(&self, o: &Activity) -> bool {
        self.last_seen() == o.last_seen() && self.counters() == o.counters()
    }
}

impl Eq for Activity {}

/// Whether the peer may hold a session, and which bulk carried it here.
///
/// 0: never sent (a local session the sender has not read yet). A bulk id
/// (from 1): a peer copy the bulk with that id carried (what reconcile
/// compares). [`SyncMark::SENT`]: a local session the sender put in a
/// batch or a bulk, or a peer copy a delta brought. Nonzero means its
/// removal owes the peer a delete; zero means the removal sends nothing.
/// The sender stores `SENT` through a shared reference while it holds the
/// table's read lock (an atomic, so no `&mut` is needed); removals read it
/// under the write lock, so the lock orders the two.
#[derive(Debug, Default)]
pub struct SyncMark(AtomicU32);

impl SyncMark {
    /// Never a bulk id (the receiver's ids wrap before it).
    pub const SENT: u32 = u32::MAX;

    pub(super) fn new(v: u32) -> SyncMark {
        SyncMark(AtomicU32::new(v))
    }

    pub(super) fn get(&self) -> u32 {
        self.0.load(Relaxed)
    }

    pub(super) fn set(&mut self, v: u32) {
        *self.0.get_mut() = v;
    }

    /// Marks a session as possibly held by the peer (a bulk id stays: it
    /// already says so).
    fn mark_sent(&self) {
        if self.get() == 0 {
            self.0.store(Self::SENT, Relaxed);
        }
    }
}

impl Clone for SyncMark {
    fn clone(&self) -> SyncMark {
        SyncMark::new(self.get())
    }
}

impl PartialEq for SyncMark {
    fn eq(&self, o: &SyncMark) -> bool {
        self.get() == o.get()
    }
}

impl Eq for SyncMark {}

/// The session's TCP windows ([`crate::tcp::Windows`]) in 32 bytes,
/// written by workers through a shared reference like [`Activity`]. Each
/// side has one writer as long as each direction is handled by one worker:
/// a segment writes its own side only (what it teaches of the other side
/// is written only while that side is still unseen). Each side carries the
/// tag of the owner RG's epoch it was learned in: a side of another epoch
/// is stale (the peer forwarded the session meanwhile) and reads as
/// unknown, so a promotion relearns windows without touching each session.
///
/// When one direction briefly arrives at two workers (the wire and the
/// fabric while a switch moves a MAC) their stores may interleave and one
/// update be lost: the side then lags by a segment until its next one
/// (an ACK beyond the lagging edge is refused once, and retransmitted by
/// TCP), never a wrong session's state.
#[derive(Debug, Default)]
pub struct TcpTrack {
    sides: [TcpSideCells; 2],
}

#[derive(Debug, Default)]
struct TcpSideCells {
    end: AtomicU32,
    ack: AtomicU32,
    /// win | maxwin << 16 | scale << 32 | flags << 40 | tag << 48.
    meta: AtomicU64,
}

impl TcpTrack {
    /// The tag of windows learned while the owner RG is in `epoch` (never
    /// 0: 0 is "nothing learned").
    pub fn tag_of(epoch: u64) -> u16 {
        (epoch as u16).wrapping_add(1).max(1)
    }

    /// The windows learned under `tag`; sides of another tag are unknown.
    pub fn load(&self, tag: u16) -> Windows {
        let mut w = Windows::default();
        for (c, s) in self.sides.iter().zip(w.sides.iter_mut()) {
            let meta = c.meta.load(Relaxed);
            if (meta >> 48) as u16 == tag {
                *s = TcpSide {
                    end: c.end.load(Relaxed),
                    ack: c.ack.load(Relaxed),
                    win: meta as u16,
                    maxwin: (meta >> 16) as u16,
                    scale: (meta >> 32) as u8,
                    flags: (meta >> 40) as u8,
                };
            }
        }
        w
    }

    /// Stores `new` under `tag`, writing only the sides and fields that
    /// differ from `was` (what [`TcpTrack::load`] returned).
    pub fn store(&self, tag: u16, was: &Windows, new: &Windows) {
        for ((c, o), n) in self.sides.iter().zip(&was.sides).zip(&new.sides) {
            let meta = |s: &TcpSide| {
                u64::from(s.win)
                    | u64::from(s.maxwin) << 16
                    | u64::from(s.scale) << 32
                    | u64::from(s.flags) << 40
                    | u64::from(tag) << 48
            };
            let (stored, m) = (c.meta.load(Relaxed), meta(n));
            let retag = (stored >> 48) as u16 != tag;
            if retag || o.end != n.end {
                c.end.store(n.end, Relaxed);
            }
            if retag || o.ack != n.ack {
                c.ack.store(n.ack, Relaxed);
            }
            if stored != m {
                c.meta.store(m, Relaxed);
            }
        }
    }

    fn snapshot(&self) -> [(u64, u32, u32); 2] {
        self.sides.each_ref().map(|c| {
            (
                c.meta.load(Relaxed),
                c.end.load(Relaxed),
                c.ack.load(Relaxed),
            )
        })
    }
}

impl Clone for TcpTrack {
    fn clone(&self) -> TcpTrack {
        let t = TcpTrack::default();
        for (c, (meta, end, ack)) in t.sides.iter().zip(self.snapshot()) {
            c.meta.store(meta, Relaxed);
            c.end.store(end, Relaxed);
            c.ack.store(ack, Relaxed);
        }
        t
    }
}

impl PartialEq for TcpTrack {
    fn eq(&self, o: &TcpTrack) -> bool {
        self.snapshot() == o.snapshot()
    }
}

impl Eq for TcpTrack {}

/// Direction of a packet relative to the session's first packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Forward,
    Reverse,
}

/// The address translation a session applies, derived from its two keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nat {
    /// Translated source (address, port) of forward packets.
    pub snat: Option<(Addr, u16)>,
    /// Translated destination (address, port) of forward packets.
    pub dnat: Option<(Addr, u16)>,
}

impl Nat {
    pub const NONE: Nat = Nat {
        snat: None,
        dnat: None,
    };
}

/// One session. Public fields are read-only from outside the table (the
/// table hands out `&SessionRecord`); mutations go through table methods so
/// the indexes stay consistent.
///
/// `repr(C)` fixes the layout a burst lookup prefetches: the forward key,
/// then `tcp_state`, then the reverse key, so one or two cache lines hold a
/// key *and* `tcp_state`. `tcp_state` is where the slab keeps a slot's
/// occupancy (its niche, the record's only one: the field every slab access
/// reads), so a lookup's key comparison touches no line the prefetch did
/// not load. The compiler would otherwise put the u64 fields first.
#[derive(Clone, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct SessionRecord {
    /// First packet as it arrived (pre-translation, ingress zone).
    pub key: SessionKey,
    pub tcp_state: TcpState,
    /// [`PROXIED`], [`REPLICATED`] (in the byte `tcp_state` leaves free).
    pub(super) flags: u8,
    pub owner_rg: RgId,
    pub ingress_if: InterfaceId,
    pub egress_if: InterfaceId,
    /// A reply as it will arrive (post-translation, egress zone). NAT is
    /// encoded here rather than stored twice.
    pub reverse: SessionKey,
    pub policy: PolicyId,
    pub timeout_ms: u32,
    pub created: Millis,
    /// Counters and last-seen time (see [`Activity`]).
    pub(super) activity: Activity,
    /// TCP windows (see [`TcpTrack`]); unknown for other protocols.
    pub tcp: TcpTrack,
    /// Position in the owner RG's member list.
    pub(super) rg_slot: u32,
    /// Due tick of this session's one timer-wheel entry (its bucket).
    pub(super) wheel_due: u32,
    /// The id of the last bulk that carried this session here, or
    /// [`SyncMark::SENT`] once the peer may hold it (see [`SyncMark`]).
    pub(super) bulk_mark: SyncMark,
    /// Position of the wheel entry in its bucket.
    pub(super) wheel_pos: u32,
}

impl SessionRecord {
    /// A record of zeros: what prefaulting writes into every slot.
    pub(super) fn blank() -> SessionRecord {
        SessionRecord {
            key: SessionKey::default(),
            reverse: SessionKey::default(),
            created: Millis(0),
            activity: Activity::default(),
            tcp: TcpTrack::default(),
            policy: PolicyId(0),
            timeout_ms: 0,
            ingress_if: InterfaceId(0),
            egress_if: InterfaceId(0),
            owner_rg: RgId(0),
            tcp_state: TcpState::None,
            flags: 0,
            rg_slot: 0,
            wheel_due: 0,
            bulk_mark: SyncMark::default(),
            wheel_pos: super::wheel::NOT_QUEUED,
        }
    }

    pub fn nat(&self) -> Nat {
        nat_of(&self.key, &self.reverse)
    }

    /// The source-NAT binding whose port this session reserves, if any.
    pub fn snat_binding(&self) -> Option<NatBinding> {
        snat_binding_of(&self.key, &self.reverse)
    }

    pub fn egress_zone(&self) -> ZoneId {
        self.reverse.zone
    }

    pub fn last_seen(&self) -> Millis {
        self.activity.last_seen()
    }

    pub fn counters(&self) -> FlowCounters {
        self.activity.counters()
    }

    /// Whether the peer gets this session: everything but a TCP session
    /// whose handshake has not completed (a SYN flood must not cross the
    /// control link; a failover keeps established sessions).
    pub fn is_replicated(&self) -> bool {
        self.flags & REPLICATED != 0
    }

    /// Whether the peer may hold this session: the sender has put it in a
    /// batch or a bulk, or it came from the peer. Its removal owes the peer
    /// a delete only then.
    pub fn sent_to_peer(&self) -> bool {
        self.bulk_mark.get() != 0
    }

    /// Records that the sender put this session in a batch or a bulk
    /// (through a shared reference: the sender holds the read lock).
    pub fn mark_sent(&self) {
        self.bulk_mark.mark_sent();
    }

    /// A SYN proxy opened it ([`crate::screen`]): the table holds its
    /// sequence translation.
    pub fn proxied(&self) -> bool {
        self.flags & PROXIED != 0
    }

    /// Whether this session is unestablished: a TCP handshake not
    /// completed, or another protocol's flow nothing has answered yet.
    /// What early drop evicts first under table pressure.
    pub fn is_unestablished(&self) -> bool {
        if self.key.proto == proto::TCP {
            !self.is_replicated()
        } else {
            self.activity.counters().rev_packets == 0
        }
    }

    pub fn expires_at(&self) -> Millis {
        Millis(self.last_seen().0 + u64::from(self.timeout_ms))
    }
}

pub fn nat_of(key: &SessionKey, reverse: &SessionKey) -> Nat {
    let snat = (reverse.dst != key.src || reverse.dst_port != key.src_port)
        .then_some((reverse.dst, reverse.dst_port));
    let dnat = (reverse.src != key.dst || reverse.src_port != key.dst_port)
        .then_some((reverse.src, reverse.src_port));
    Nat { snat, dnat }
}

pub(super) fn snat_binding_of(key: &SessionKey, reverse: &SessionKey) -> Option<NatBinding> {
    nat_of(key, reverse).snat.map(|(addr, port)| NatBinding {
        addr,
        port,
        proto: key.proto,
    })
}

/// The reverse key for a forward key, its egress zone and its translation.
pub fn reverse_key(key: &SessionKey, egress_zone: ZoneId, nat: Nat) -> SessionKey {
    let (dst, dst_port) = nat.snat.unwrap_or((key.src, key.src_port));
    let (src, src_port) = nat.dnat.unwrap_or((key.dst, key.dst_port));
    SessionKey {
        src,
        dst,
        src_port,
        dst_port,
        proto: key.proto,
        zone: egress_zone,
    }
}
