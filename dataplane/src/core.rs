//! The packet core: one frame in, a verdict out. Independent of AF_XDP, so
//! every rule is unit-tested on crafted frames without root.
//!
//! Per frame: Ethernet (untagged), ARP and ICMPv6 neighbor discovery for the
//! node's and its primary RGs' addresses, IPv4/IPv6 with TCP/UDP/ICMP
//! (fragments follow their datagram's first, [`crate::frag`]);
//! session lookup (forward, reverse, and the embedded header of ICMP
//! errors); on a miss for a first packet: DNAT, route, zones and policy,
//! SNAT with a port from the table's allocator, session creation with its
//! owner RG; NAT rewrite with incremental checksums, TTL, next-hop MAC.
//! Sessions of an RG this node is not primary for are not forwarded here:
//! the verdict hands them to the fabric layer. Every drop has a reason and a
//! counter.
//!
//! The core owns no shared state and does no locking, like `quinn-proto`
//! under `quinn`: its driver (`crate::worker`) lends it, per burst, the
//! session table (shared or exclusive, [`TableView`]), the role map and the
//! neighbor map it loaded once ([`Env`]), and a buffer for what the burst
//! produces besides verdicts ([`Effects`]: deltas, learned neighbors,
//! frames to send). A frame looks its session up and uses the record under
//! the same borrow, so nothing can remove the session in between. A frame
//! that must change the table's structure (create a session, change its
//! TCP state) while the burst holds only shared access returns
//! [`NeedsExclusive`] before it has changed or counted anything, and the
//! driver runs it again with exclusive access.

use crate::config::{Compiled, Iface, NatFiltering, Snat};
use crate::events::{EventKind, FlowEvent};
use crate::frag::{DatagramKey, Fate, FragError, FragTable};
use crate::icmp::{self, IcmpError, TokenBucket};
use crate::packet::{self, ETH_HLEN, Family, Ip, Mac, ParseError};
use crate::screen::{self, Screen, ScreenKind};
use crate::session::{
    Addr, Direction, InsertError, InterfaceId, Mapping, Millis, Nat, NatBinding, NewSession,
    PolicyId, Proxy, SessionHandle, SessionKey, SessionTable, SnatRequest, TcpState, TcpTrack,
    establishes, proto,
};
use crate::tcp;
use rustc_hash::FxHashMap;
use std::cell::{Cell, RefCell};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tandem_proto::{RgId, RoleMap};

/// Why a frame was dropped. Each has a counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    Malformed,
    /// A fragment of a datagram whose first fragment was dropped (or that
    /// was poisoned by an overlap).
    Fragment,
    /// An 802.1Q tag (or an untagged frame) no unit is configured for on
    /// the port, or a second tag (the shell strips the one it knows).
    VlanTagged,
    UnsupportedEtherType,
    NotForUs,
    ArpNotForUs,
    LocalDelivery,
    TtlExceeded,
    NoRoute,
    NeighborMiss,
    NoSession,
    PolicyDeny,
    NoPolicy,
    SessionRefused,
    PortsExhausted,
    UnknownInterface,
    IcmpErrorNoSession,
    FabricUnavailable,
    /// An IPv6 extension header not walked, or too long a chain.
    ExtensionHeader,
    /// Larger than the egress interface's MTU (answered with
    /// fragmentation needed / packet too big where allowed).
    MtuExceeded,
    /// An echo request to the node beyond the ICMP rate limit.
    IcmpRateLimited,
    /// A fragment overlapping another of its datagram (RFC 5722).
    FragmentOverlap,
    /// A first fragment without its whole transport header, or an IPv4
    /// TCP fragment at offset 8 (RFC 1858).
    FragmentTiny,
    /// A datagram beyond 65535 bytes or of too many fragments.
    FragmentTooBig,
    /// No room to track the datagram or hold the fragment.
    FragmentTableFull,
    /// An early fragment whose first never came in time.
    FragmentTimeout,
    /// A TCP segment outside the session's window ([`crate::tcp`]).
    TcpOutOfWindow,
    /// A RST outside the receiver's window (a blind reset).
    TcpRstOutOfWindow,
    /// An in-window RST that was not exact: answered with a challenge ACK
    /// (RFC 5961), or dropped when the budget for them is spent.
    TcpRstChallenged,
    /// SYN with RST or FIN, or a segment without SYN, ACK or RST.
    TcpBadFlags,
    /// A SYN-ACK that does not acknowledge the session's SYN.
    TcpSynAckMismatch,
    /// An unsolicited packet to a source-NAT mapping that the SNAT rule's
    /// filtering does not admit (RFC 4787 REQ-8).
    NatFiltered,
    /// Refused by the ingress zone's screen (which one: its counters).
    Screen,
    /// A handshake segment the SYN proxy consumed (the client's cookie
    /// ACK, answered onward with the proxy's own SYN).
    SynProxyHandshake,
    /// A segment of a proxied session while the proxy's handshake with
    /// the server runs (the sender retransmits it).
    SynProxyPending,
}

impl DropReason {
    pub const ALL: [DropReason; 35] = [
        DropReason::Malformed,
        DropReason::Fragment,
        DropReason::VlanTagged,
        DropReason::UnsupportedEtherType,
        DropReason::NotForUs,
        DropReason::ArpNotForUs,
        DropReason::LocalDelivery,
        DropReason::TtlExceeded,
        DropReason::NoRoute,
        DropReason::NeighborMiss,
        DropReason::NoSession,
        DropReason::PolicyDeny,
        DropReason::NoPolicy,
        DropReason::SessionRefused,
        DropReason::PortsExhausted,
        DropReason::UnknownInterface,
        DropReason::IcmpErrorNoSession,
        DropReason::FabricUnavailable,
        DropReason::ExtensionHeader,
        DropReason::MtuExceeded,
        DropReason::IcmpRateLimited,
        DropReason::FragmentOverlap,
        DropReason::FragmentTiny,
        DropReason::FragmentTooBig,
        DropReason::FragmentTableFull,
        DropReason::FragmentTimeout,
        DropReason::TcpOutOfWindow,
        DropReason::TcpRstOutOfWindow,
        DropReason::TcpRstChallenged,
        DropReason::TcpBadFlags,
        DropReason::TcpSynAckMismatch,
        DropReason::NatFiltered,
        DropReason::Screen,
        DropReason::SynProxyHandshake,
        DropReason::SynProxyPending,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::Fragment => "fragment-of-dropped-datagram",
            DropReason::VlanTagged => "vlan-unknown",
            DropReason::UnsupportedEtherType => "unsupported-ethertype",
            DropReason::NotForUs => "not-for-us",
            DropReason::ArpNotForUs => "arp-not-for-us",
            DropReason::LocalDelivery => "local-delivery",
            DropReason::TtlExceeded => "ttl-exceeded",
            DropReason::NoRoute => "no-route",
            DropReason::NeighborMiss => "neighbor-miss",
            DropReason::NoSession => "no-session",
            DropReason::PolicyDeny => "policy-deny",
            DropReason::NoPolicy => "no-policy",
            DropReason::SessionRefused => "session-refused",
            DropReason::PortsExhausted => "ports-exhausted",
            DropReason::UnknownInterface => "unknown-interface",
            DropReason::IcmpErrorNoSession => "icmp-error-no-session",
            DropReason::FabricUnavailable => "fabric-unavailable",
            DropReason::ExtensionHeader => "extension-header",
            DropReason::MtuExceeded => "mtu-exceeded",
            DropReason::IcmpRateLimited => "icmp-rate-limited",
            DropReason::FragmentOverlap => "fragment-overlap",
            DropReason::FragmentTiny => "fragment-tiny",
            DropReason::FragmentTooBig => "fragment-too-big",
            DropReason::FragmentTableFull => "fragment-table-full",
            DropReason::FragmentTimeout => "fragment-timeout",
            DropReason::TcpOutOfWindow => "tcp-out-of-window",
            DropReason::TcpRstOutOfWindow => "tcp-rst-out-of-window",
            DropReason::TcpRstChallenged => "tcp-rst-challenged",
            DropReason::TcpBadFlags => "tcp-bad-flags",
            DropReason::TcpSynAckMismatch => "tcp-synack-mismatch",
            DropReason::NatFiltered => "nat-filtered",
            DropReason::Screen => "screen",
            DropReason::SynProxyHandshake => "syn-proxy-handshake",
            DropReason::SynProxyPending => "syn-proxy-pending",
        }
    }
}

/// What to do with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Transmit the rewritten frame (first `len` bytes) on `iface`.
    Tx {
        iface: InterfaceId,
        len: usize,
    },
    /// The frame was turned into a reply (ARP, NA, echo reply): transmit it
    /// back out the interface it came in on.
    Reply {
        len: usize,
    },
    /// This node is not primary for the session's owner RG: the fabric
    /// layer sends the (unmodified) frame to the owner.
    Fabric {
        rg: RgId,
    },
    /// The session is handled here but leaves by a reth whose RG the peer
    /// owns (split RGs): the processed frame (first `len` bytes) goes over
    /// the fabric for the owner to transmit on `iface`. A node never sends
    /// from a virtual MAC it does not own.
    FabricEgress {
        rg: RgId,
        iface: InterfaceId,
        len: usize,
    },
    /// Copied into the neighbor-resolution hold queue (sent when the
    /// next hop answers): the buffer is free.
    Held,
    Drop(DropReason),
}

/// Adds `n` to a counter only one thread writes: a plain load and store,
/// not a locked read-modify-write (which would also stall the loads a
/// burst's prefetch started); readers see it a moment later.
#[inline]
pub fn bump(c: &AtomicU64, n: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

/// Counters of one worker's core, shared with the daemon (metrics, CLI),
/// which sums the workers. Only the worker writes them ([`bump`]).
#[derive(Debug)]
pub struct CoreStats {
    pub rx: AtomicU64,
    pub tx: AtomicU64,
    pub replies: AtomicU64,
    pub to_fabric: AtomicU64,
    pub sessions_created: AtomicU64,
    pub deltas_dropped: AtomicU64,
    /// Frames held for neighbor resolution, and of them sent once it
    /// resolved (the rest expired or found the queue full:
    /// `drops[neighbor-miss]`).
    pub held: AtomicU64,
    pub held_sent: AtomicU64,
    /// IP fragments handled; early ones (before their first) held, and of
    /// them released when it came (the rest: `drops[fragment-timeout]`).
    pub fragments: AtomicU64,
    pub fragments_held: AtomicU64,
    pub fragments_released: AtomicU64,
    /// Challenge ACKs sent for inexact RSTs (RFC 5961).
    pub tcp_challenge_acks: AtomicU64,
    /// Segments forwarded for the endpoint to judge, the session unchanged
    /// (a SYN inside a connection, a RST before the receiver is known).
    pub tcp_passed: AtomicU64,
    /// SYNs and SYN-ACKs whose MSS option was lowered (`tcp_mss`).
    pub tcp_mss_clamped: AtomicU64,
    /// Unsolicited packets to a NAT mapping that its rule's filtering
    /// admitted (each created a session).
    pub nat_filter_admitted: AtomicU64,
    /// Bursts that went from shared to exclusive table access.
    pub exclusive_bursts: AtomicU64,
    /// Frames the core wanted to send beyond [`OUTBOX_LIMIT`] (dropped).
    pub outbox_dropped: AtomicU64,
    pub drops: [AtomicU64; DropReason::ALL.len()],
    /// Hits per policy (index = policy id - 1), and default-deny hits.
    pub policy_hits: Vec<AtomicU64>,
}

impl CoreStats {
    fn new(policies: usize) -> CoreStats {
        CoreStats {
            rx: AtomicU64::new(0),
            tx: AtomicU64::new(0),
            replies: AtomicU64::new(0),
            to_fabric: AtomicU64::new(0),
            sessions_created: AtomicU64::new(0),
            deltas_dropped: AtomicU64::new(0),
            held: AtomicU64::new(0),
            held_sent: AtomicU64::new(0),
            fragments: AtomicU64::new(0),
            fragments_held: AtomicU64::new(0),
            fragments_released: AtomicU64::new(0),
            tcp_challenge_acks: AtomicU64::new(0),
            tcp_passed: AtomicU64::new(0),
            tcp_mss_clamped: AtomicU64::new(0),
            nat_filter_admitted: AtomicU64::new(0),
            exclusive_bursts: AtomicU64::new(0),
            outbox_dropped: AtomicU64::new(0),
            drops: std::array::from_fn(|_| AtomicU64::new(0)),
            policy_hits: (0..policies).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub fn dropped(&self, r: DropReason) -> u64 {
        self.drops[r as usize].load(Ordering::Relaxed)
    }

    /// Adds `other`'s counts to `self` (merging workers for display).
    pub fn add(&self, other: &CoreStats) {
        let pairs = [
            (&self.rx, &other.rx),
            (&self.tx, &other.tx),
            (&self.replies, &other.replies),
            (&self.to_fabric, &other.to_fabric),
            (&self.sessions_created, &other.sessions_created),
            (&self.deltas_dropped, &other.deltas_dropped),
            (&self.held, &other.held),
            (&self.held_sent, &other.held_sent),
            (&self.fragments, &other.fragments),
            (&self.fragments_held, &other.fragments_held),
            (&self.fragments_released, &other.fragments_released),
            (&self.tcp_challenge_acks, &other.tcp_challenge_acks),
            (&self.tcp_passed, &other.tcp_passed),
            (&self.tcp_mss_clamped, &other.tcp_mss_clamped),
            (&self.nat_filter_admitted, &other.nat_filter_admitted),
            (&self.exclusive_bursts, &other.exclusive_bursts),
            (&self.outbox_dropped, &other.outbox_dropped),
        ];
        let drops = self.drops.iter().zip(&other.drops);
        let hits = self.policy_hits.iter().zip(&other.policy_hits);
        for (a, b) in pairs.into_iter().chain(drops).chain(hits) {
            a.fetch_add(b.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }

    /// A zeroed set of counters for a config with `policies` policies.
    pub fn zeroed(policies: usize) -> CoreStats {
        CoreStats::new(policies)
    }
}

/// Frames the core wants sent besides the verdicts (ARP/NS requests,
/// gratuitous ARP / unsolicited NA), per burst. Bounded: beyond it they are
/// dropped and counted (resolution is retried by the next packet).
pub const OUTBOX_LIMIT: usize = 256;

/// Neighbors asked for recently, per worker. Bounded: when full it is
/// cleared (at worst a neighbor is asked for again).
const PENDING_LIMIT: usize = 4096;

/// Frames held while their next hop resolves: per neighbor, per worker in
/// total, and for how long (beyond: dropped as `neighbor-miss`).
pub const HOLD_PER_NEIGHBOR: usize = 4;
pub const HOLD_TOTAL: usize = 64;
pub const HOLD_MS: u64 = 1000;

/// A frame waiting for its next hop's MAC (TTL already decremented, source
/// MAC written).
#[derive(Debug)]
struct HeldFrame {
    iface: InterfaceId,
    hop: Addr,
    frame: Vec<u8>,
    since: Millis,
}

/// Next-hop MACs by (interface, address), shared by a node's workers.
pub type NeighborMap = FxHashMap<(InterfaceId, Addr), Mac>;

/// How a frame reached the core.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrival {
    /// From the wire of one of this node's interfaces.
    Wire(InterfaceId),
    /// From the peer over the fabric, to be processed as if it had arrived
    /// on this node's member of the interface (whose RG the peer owns).
    FabricIngress(InterfaceId),
    /// From the peer, already processed there (TTL decremented, NAT done),
    /// to be transmitted on the interface: only the link layer is left.
    FabricEgress(InterfaceId),
}

/// The session table as one burst holds it.
pub enum TableView<'t> {
    Shared(&'t SessionTable),
    Exclusive(&'t mut SessionTable),
}

impl TableView<'_> {
    fn get(&self) -> &SessionTable {
        match self {
            TableView::Shared(t) => t,
            TableView::Exclusive(t) => t,
        }
    }

    /// Exclusive access, or [`NeedsExclusive`] for the driver.
    fn exclusive(&mut self) -> Result<&mut SessionTable, NeedsExclusive> {
        match self {
            TableView::Shared(_) => Err(NeedsExclusive),
            TableView::Exclusive(t) => Ok(t),
        }
    }
}

/// A frame needs exclusive table access the burst does not hold. Nothing
/// was changed or counted for the frame: run it again with exclusive
/// access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NeedsExclusive;

/// What a burst reads besides the table, loaded once per burst.
pub struct Env<'e> {
    pub roles: &'e RoleMap,
    pub neighbors: &'e NeighborMap,
    /// The node's ICMP rate limit.
    pub icmp: &'e TokenBucket,
    pub now: Millis,
}

/// What a burst produced besides verdicts, for the driver to apply.
#[derive(Debug, Default)]
pub struct Effects {
    /// Changed sessions, for the RG's delta queue.
    pub deltas: Vec<(RgId, SessionKey)>,
    /// Neighbors learned (or whose MAC changed).
    pub learned: Vec<((InterfaceId, Addr), Mac)>,
    /// Frames to send (bounded by [`OUTBOX_LIMIT`]).
    pub frames: Vec<(InterfaceId, Vec<u8>)>,
    /// Frames for the peer over the fabric (released early fragments;
    /// bounded by [`OUTBOX_LIMIT`]).
    pub fabric: Vec<(FabricOut, Vec<u8>)>,
    /// Security events (at most one per frame).
    pub events: Vec<FlowEvent>,
}

impl Effects {
    pub fn clear(&mut self) {
        self.events.clear();
        self.deltas.clear();
        self.learned.clear();
        self.frames.clear();
        self.fabric.clear();
    }
}

/// Where a frame the core sends to the peer goes there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FabricOut {
    /// Unprocessed, for the owner of `rg` to process as arriving on its
    /// member of `ingress` (as [`Verdict::Fabric`]).
    ToOwner { rg: RgId, ingress: InterfaceId },
    /// Processed, for the owner of `rg` to transmit on `iface` (as
    /// [`Verdict::FabricEgress`]).
    Egress { rg: RgId, iface: InterfaceId },
}

/// One frame's borrowed world.
struct Cx<'a, 't, 'e> {
    table: &'a mut TableView<'t>,
    env: &'a Env<'e>,
    fx: &'a mut Effects,
}

impl Cx<'_, '_, '_> {
    fn is_primary(&self, rg: RgId) -> bool {
        self.env.roles.get(&rg).is_some_and(|r| r.primary)
    }

    fn neighbor(&self, iface: InterfaceId, a: Addr) -> Option<Mac> {
        // Learned in this burst, else as loaded for it.
        self.fx
            .learned
            .iter()
            .rev()
            .find(|(k, _)| *k == (iface, a))
            .map(|(_, m)| *m)
            .or_else(|| self.env.neighbors.get(&(iface, a)).copied())
    }
}

/// One worker's packet core. Its own state is small and lives in cells,
/// so every rule takes `&self` and borrows the configuration in place
/// (cloning the `Arc` per frame would write a line all workers share).
pub struct Core {
    cfg: Arc<Compiled>,
    /// Neighbors asked for recently, so a burst asks once (ms of the ask).
    pending: RefCell<FxHashMap<(InterfaceId, Addr), Millis>>,
    /// Frames waiting for their next hop (bounded, see [`HOLD_TOTAL`]).
    held: RefCell<Vec<HeldFrame>>,
    /// Datagrams whose fragments are in flight ([`crate::frag`]).
    frags: RefCell<FragTable>,
    /// When the fragment table was last expired.
    frags_expired: Cell<Millis>,
    pub stats: Arc<CoreStats>,
    /// Which fabric hand-off, if any, the frame in hand came by.
    fabric_stage: Cell<FabricStage>,
}

/// How the frame being handled reached this node.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum FabricStage {
    /// From the wire of one of this node's interfaces.
    Wire,
    /// From the peer, to be processed as if it had arrived on our member of
    /// its ingress interface (whose RG the peer owns).
    Ingress,
    /// From the peer, already processed there (TTL decremented, NAT done):
    /// only the link layer is left.
    Egress,
}

/// What a lookup of a frame in the table found.
struct Hit {
    handle: SessionHandle,
    dir: Direction,
}

impl Core {
    pub fn new(cfg: Arc<Compiled>) -> Core {
        let stats = Arc::new(CoreStats::new(cfg.policies.len()));
        Core {
            cfg,
            pending: RefCell::default(),
            held: RefCell::default(),
            frags: RefCell::default(),
            frags_expired: Cell::new(Millis(0)),
            stats,
            fabric_stage: Cell::new(FabricStage::Wire),
        }
    }

    pub fn config(&self) -> &Compiled {
        &self.cfg
    }

    fn drop(&self, r: DropReason) -> Verdict {
        bump(&self.stats.drops[r as usize], 1);
        Verdict::Drop(r)
    }

    /// Whether `a` is an address this node answers for on `ifc`: its own,
    /// or a VIP of a reth whose RG it is primary for.
    fn owns(&self, cx: &Cx, ifc: &Iface, a: &Addr) -> bool {
        ifc.addresses.iter().any(|p| p.addr == *a)
            || ifc.reth.as_ref().is_some_and(|(rg, _, vips)| {
                vips.iter().any(|p| p.addr == *a) && cx.is_primary(*rg)
            })
    }

    /// Records a neighbor's MAC (for the driver to share) unless known.
    fn learn(&self, cx: &mut Cx, iface: InterfaceId, a: Addr, mac: Mac) {
        if cx.neighbor(iface, a) != Some(mac) {
            cx.fx.learned.push(((iface, a), mac));
        }
        self.pending.borrow_mut().remove(&(iface, a));
    }

    fn owned_anywhere(&self, a: &Addr) -> bool {
        self.cfg
            .ifaces
            .iter()
            .any(|i| i.prefixes().any(|p| p.addr == *a))
    }

    fn mac_is_ours(&self, cx: &Cx, ifc: &Iface, mac: &Mac) -> Option<bool> {
        if *mac == ifc.mac || mac[0] & 1 == 1 {
            return Some(true);
        }
        match &ifc.reth {
            Some((rg, vmac, _)) if vmac == mac => Some(cx.is_primary(*rg)),
            _ => None,
        }
    }

    /// Starts loading the sessions a burst of received frames will look
    /// up, before any of them is processed: each frame's flow key is read
    /// (Ethernet, IPv4/IPv6, ports) and the table prefetches both
    /// directions' index slots and candidate records for the whole burst
    /// (`SessionTable::prefetch_lookups`). Frames are then processed one by
    /// one as before, their lookups hitting the cache; nothing here
    /// decides anything, and an unparsable frame is simply skipped.
    pub fn prefetch_sessions<'a>(
        &self,
        table: &SessionTable,
        frames: impl IntoIterator<Item = (&'a [u8], InterfaceId)>,
    ) {
        const MAX: usize = 64;
        let mut keys = [SessionKey::default(); MAX];
        let mut n = 0;
        for (f, ingress) in frames {
            if n == MAX {
                break;
            }
            if let Some(k) = self.flow_key(f, ingress) {
                keys[n] = k;
                n += 1;
            }
        }
        if n > 0 {
            table.prefetch_lookups(&keys[..n]);
        }
    }

    /// The flow key `process` will look a frame up by, if it has one: the
    /// same parse and the same key as the IP path.
    pub fn flow_key(&self, f: &[u8], ingress: InterfaceId) -> Option<SessionKey> {
        let ifc = self.cfg.iface(ingress)?;
        let eth = packet::parse_eth(f).ok().filter(|e| e.vlan.is_none())?;
        if eth.ethertype == packet::ETHERTYPE_IPV4
            && let Some(h) = f.get(ETH_HLEN..ETH_HLEN + 24)
            && h[0] == 0x45
            && u16::from_be_bytes([h[6], h[7]]) & 0x3fff == 0
            && matches!(h[9], proto::TCP | proto::UDP)
        {
            // The common case without building an `Ip`: no options, not a
            // fragment, TCP or UDP. (A prefetch only: a frame the full
            // parse then refuses costs a wasted load, nothing else.)
            let v4 = |a: &[u8]| Addr::v4(std::net::Ipv4Addr::new(a[0], a[1], a[2], a[3]));
            return Some(SessionKey {
                src: v4(&h[12..16]),
                dst: v4(&h[16..20]),
                src_port: u16::from_be_bytes([h[20], h[21]]),
                dst_port: u16::from_be_bytes([h[22], h[23]]),
                proto: h[9],
                zone: ifc.zone,
            });
        }
        if eth.ethertype != packet::ETHERTYPE_IPV4 && eth.ethertype != packet::ETHERTYPE_IPV6 {
            return None;
        }
        let ip = parse_ip(f, eth.ethertype)
            .ok()
            .filter(|ip| ip.frag.is_none())?;
        let ports = packet::ports(f, &ip).ok()?;
        Some(packet_key(&ip, ports, ifc))
    }

    /// Processes one frame against the burst's table view and environment.
    /// `Err` only under shared access, before anything was changed or
    /// counted for this frame.
    pub fn process(
        &self,
        frame: &mut [u8],
        arrival: Arrival,
        table: &mut TableView,
        env: &Env,
        fx: &mut Effects,
    ) -> Result<Verdict, NeedsExclusive> {
        let mut cx = Cx { table, env, fx };
        let v = match arrival {
            Arrival::Wire(ingress) => self.wire(frame, ingress, &mut cx),
            Arrival::FabricIngress(ingress) => self.fabric_ingress(frame, ingress, &mut cx),
            Arrival::FabricEgress(iface) => self.transmit_from_fabric(frame, iface, &mut cx),
        };
        self.fabric_stage.set(FabricStage::Wire);
        let v = v?;
        bump(&self.stats.rx, 1);
        match v {
            Verdict::Tx { .. } => bump(&self.stats.tx, 1),
            Verdict::Reply { .. } => bump(&self.stats.replies, 1),
            _ => {}
        };
        Ok(v)
    }

    /// A frame from the wire (or, unwrapped, from the fabric) of `ingress`.
    fn wire(
        &self,
        frame: &mut [u8],
        ingress: InterfaceId,
        cx: &mut Cx,
    ) -> Result<Verdict, NeedsExclusive> {
        let cfg = &*self.cfg;
        let Some(ifc) = cfg.iface(ingress) else {
            return Ok(self.drop(DropReason::UnknownInterface));
        };
        let eth = match packet::parse_eth(frame) {
            Ok(e) => e,
            Err(_) => return Ok(self.drop(DropReason::Malformed)),
        };
        if eth.vlan.is_some() {
            return Ok(self.drop(DropReason::VlanTagged));
        }
        Ok(match eth.ethertype {
            packet::ETHERTYPE_ARP => self.arp(frame, ifc, cx),
            packet::ETHERTYPE_IPV4 | packet::ETHERTYPE_IPV6 => {
                match self.mac_is_ours(cx, ifc, &eth.dst) {
                    None => self.drop(DropReason::NotForUs),
                    Some(false) if self.fabric_stage.get() == FabricStage::Ingress => {
                        self.ip(frame, ifc, eth.ethertype, cx)?
                    }
                    Some(false) => {
                        // Sent to the RG's virtual MAC while the peer owns it.
                        let rg = ifc.rg().expect("virtual MAC implies a reth");
                        bump(&self.stats.to_fabric, 1);
                        Verdict::Fabric { rg }
                    }
                    Some(true) => self.ip(frame, ifc, eth.ethertype, cx)?,
                }
            }
            _ => self.drop(DropReason::UnsupportedEtherType),
        })
    }

    // ----- ARP -----------------------------------------------------------

    fn arp(&self, f: &mut [u8], ifc: &Iface, cx: &mut Cx) -> Verdict {
        let Some(a) = f.get(ETH_HLEN..ETH_HLEN + 28) else {
            return self.drop(DropReason::Malformed);
        };
        if a[0..2] != [0, 1] || a[2..4] != [8, 0] || a[4] != 6 || a[5] != 4 {
            return self.drop(DropReason::Malformed);
        }
        let op = u16::from_be_bytes([a[6], a[7]]);
        let sha: Mac = a[8..14].try_into().expect("6");
        let spa = Addr::v4(std::net::Ipv4Addr::new(a[14], a[15], a[16], a[17]));
        let tpa = Addr::v4(std::net::Ipv4Addr::new(a[24], a[25], a[26], a[27]));
        if ifc.prefixes().any(|p| p.contains(&spa)) && !self.owned_anywhere(&spa) {
            self.learn(cx, ifc.id, spa, sha);
        }
        if op != 1 || !self.owns(cx, ifc, &tpa) {
            return self.drop(DropReason::ArpNotForUs);
        }
        // Turn the request into the reply, in place.
        let mac = ifc.tx_mac();
        let tpa_bytes: [u8; 4] = f[ETH_HLEN + 24..ETH_HLEN + 28].try_into().expect("4");
        let spa_bytes: [u8; 4] = f[ETH_HLEN + 14..ETH_HLEN + 18].try_into().expect("4");
        packet::set_macs(f, sha, mac);
        let a = &mut f[ETH_HLEN..ETH_HLEN + 28];
        a[6..8].copy_from_slice(&2u16.to_be_bytes());
        a[8..14].copy_from_slice(&mac);
        a[14..18].copy_from_slice(&tpa_bytes);
        a[18..24].copy_from_slice(&sha);
        a[24..28].copy_from_slice(&spa_bytes);
        Verdict::Reply {
            len: (ETH_HLEN + 28).max(60).min(f.len()),
        }
    }

    // ----- IP ------------------------------------------------------------

    fn ip(
        &self,
        f: &mut [u8],
        ifc: &Iface,
        ethertype: u16,
        cx: &mut Cx,
    ) -> Result<Verdict, NeedsExclusive> {
        let mut ip = match parse_ip(f, ethertype) {
            Ok(ip) => ip,
            Err(ParseError::UnsupportedExtensionHeader) => {
                return Ok(self.drop(DropReason::ExtensionHeader));
            }
            Err(_) => return Ok(self.drop(DropReason::Malformed)),
        };
        if let Some(s) = self.cfg.screen(ifc.zone)
            && let Some(k) = s.check_packet(f, &ip)
        {
            return Ok(self.screened(s, k, f, &ip, ifc, cx));
        }
        if ip.frag.is_some() {
            return self.fragment(f, &mut ip, ifc, cx);
        }
        self.datagram(f, &mut ip, ifc, cx)
    }

    /// A packet with its transport header: a whole datagram, or the first
    /// fragment of one.
    fn datagram(
        &self,
        f: &mut [u8],
        ip: &mut Ip,
        ifc: &Iface,
        cx: &mut Cx,
    ) -> Result<Verdict, NeedsExclusive> {
        let dst = Addr(ip.dst);
        // ICMPv6 neighbor discovery addressed to us (or solicited-node
        // multicast) is answered here.
        if ip.family == Family::V6 && ip.proto == proto::ICMPV6 {
            match f.get(ip.l4) {
                Some(135) => return Ok(self.neighbor_solicitation(f, ip, ifc, cx)),
                Some(136) => {
                    self.neighbor_advertisement(f, ip, ifc, cx);
                    return Ok(self.drop(DropReason::ArpNotForUs));
                }
                Some(133 | 134) => return Ok(self.drop(DropReason::LocalDelivery)),
                _ => {}
            }
        }
        let ports = match packet::ports(f, ip) {
            Ok(p) => p,
            Err(_) => return Ok(self.drop(DropReason::Malformed)),
        };
        if (ip.proto == proto::ICMP || ip.proto == proto::ICMPV6) && packet::is_icmp_error(f, ip) {
            return Ok(self.icmp_error(f, ip, ifc, cx));
        }
        let key = packet_key(ip, ports, ifc);
        let hit = cx
            .table
            .get()
            .lookup(&key)
            .map(|(handle, dir)| Hit { handle, dir });
        // Sessions first: replies to a SNAT address (a VIP) are traffic to
        // forward, not to this node; so is traffic to a port forward or to
        // a live source-NAT mapping (filtered, or hairpinned).
        if hit.is_none()
            && self.owned_anywhere(&dst)
            && !self.dnat_matches(&key)
            && mapped(cx.table.get(), &key).is_none()
        {
            return Ok(self.local(f, ip, ifc, cx));
        }
        if ip.ttl <= 1 {
            self.answer(f, ip, ifc, IcmpError::TimeExceeded, cx);
            return Ok(self.drop(DropReason::TtlExceeded));
        }
        match hit {
            Some(h) => self.established(f, ip, ifc, h, cx),
            None => self.first_packet(f, ip, ifc, key, cx),
        }
    }

    // ----- fragments -----------------------------------------------------

    /// A fragment: the first goes through [`Core::datagram`] and fixes the
    /// datagram's fate; later ones follow it (held while it is unknown).
    fn fragment(
        &self,
        f: &mut [u8],
        ip: &mut Ip,
        ifc: &Iface,
        cx: &mut Cx,
    ) -> Result<Verdict, NeedsExclusive> {
        let fr = ip.frag.expect("a fragment");
        let range = ip.frag_range().expect("a fragment");
        let last = !fr.more;
        let data = range.1 - range.0;
        if data == 0 || (fr.more && !data.is_multiple_of(8)) {
            return Ok(self.drop(DropReason::Malformed));
        }
        // IPv4 counts its header in the 65535; IPv6 its fragmentable part.
        let header = if ip.family == Family::V4 {
            (fr.data - ip.l3) as u32
        } else {
            0
        };
        if range.1 + header > crate::frag::MAX_DATAGRAM {
            return Ok(self.drop(DropReason::FragmentTooBig));
        }
        if fr.is_first() && !whole_transport_header(ip) {
            return Ok(self.drop(DropReason::FragmentTiny));
        }
        // RFC 1858: offset 8 would rewrite a TCP header's flags.
        if ip.family == Family::V4 && ip.proto == proto::TCP && fr.offset == 8 {
            return Ok(self.drop(DropReason::FragmentTiny));
        }
        let key = DatagramKey {
            src: ip.src,
            dst: ip.dst,
            id: fr.id,
            proto: ip.proto,
            ingress: ifc.id,
        };
        let now = cx.env.now;
        let checked = self.frags.borrow().check(&key, range, last);
        let fate = match checked {
            Ok(fate) => fate,
            Err(e) => {
                let held = self.frags.borrow_mut().poison(key, now);
                bump(
                    &self.stats.drops[DropReason::Fragment as usize],
                    held as u64,
                );
                return Ok(self.drop(match e {
                    FragError::Overlap => DropReason::FragmentOverlap,
                    FragError::TooBig => DropReason::FragmentTooBig,
                    FragError::Full => DropReason::FragmentTableFull,
                }));
            }
        };
        if fate == Fate::Dropped {
            // Its first was dropped, or it was poisoned.
            self.track(key, range, last, fate, now);
            return Ok(self.drop(DropReason::Fragment));
        }
        if fr.is_first() {
            let flow = packet::ports(f, ip).ok().map(|p| packet_key(ip, p, ifc));
            // May return NeedsExclusive: nothing above changed anything.
            let v = self.datagram(f, ip, ifc, cx)?;
            bump(&self.stats.fragments, 1);
            let fate = match (v, flow) {
                (Verdict::Drop(_), _) | (_, None) => Fate::Dropped,
                (Verdict::Fabric { rg }, _) => Fate::Fabric(rg),
                (_, Some(k)) => Fate::Flow(k),
            };
            self.track(key, range, last, fate, now);
            self.release_fragments(key, fate, ifc, cx);
            return Ok(v);
        }
        match fate {
            Fate::Pending => {
                let via_fabric = self.fabric_stage.get() == FabricStage::Ingress;
                let held =
                    self.frags
                        .borrow_mut()
                        .hold(key, range, last, &f[..ip.end], via_fabric, now);
                Ok(match held {
                    Ok(()) => {
                        bump(&self.stats.fragments, 1);
                        bump(&self.stats.fragments_held, 1);
                        Verdict::Held
                    }
                    Err(_) => self.drop(DropReason::FragmentTableFull),
                })
            }
            fate => {
                let v = self.later_fragment(f, ip, ifc, fate, cx)?;
                bump(&self.stats.fragments, 1);
                self.track(key, range, last, fate, now);
                Ok(v)
            }
        }
    }

    fn track(&self, key: DatagramKey, range: (u32, u32), last: bool, fate: Fate, now: Millis) {
        if self
            .frags
            .borrow_mut()
            .record(key, range, last, fate, now)
            .is_err()
        {
            // Handled all the same; the datagram's later fragments will be
            // held and time out.
            bump(&self.stats.drops[DropReason::FragmentTableFull as usize], 1);
        }
    }

    /// A fragment after the first, whose datagram's fate is known: the
    /// first's session (addresses translated, nothing of the transport
    /// header here), the fabric, or a drop. Never an ICMP error about it.
    fn later_fragment(
        &self,
        f: &mut [u8],
        ip: &mut Ip,
        ifc: &Iface,
        fate: Fate,
        cx: &mut Cx,
    ) -> Result<Verdict, NeedsExclusive> {
        let flow = match fate {
            Fate::Flow(k) => k,
            Fate::Fabric(rg) if self.fabric_stage.get() == FabricStage::Wire => {
                bump(&self.stats.to_fabric, 1);
                return Ok(Verdict::Fabric { rg });
            }
            Fate::Fabric(_) => return Ok(self.drop(DropReason::FabricUnavailable)),
            Fate::Pending | Fate::Dropped => return Ok(self.drop(DropReason::Fragment)),
        };
        if ip.ttl <= 1 {
            return Ok(self.drop(DropReason::TtlExceeded));
        }
        let hit = cx
            .table
            .get()
            .lookup(&flow)
            .map(|(handle, dir)| Hit { handle, dir });
        match hit {
            Some(h) => self.established(f, ip, ifc, h, cx),
            // Expired or deleted since its first fragment.
            None => Ok(self.drop(DropReason::NoSession)),
        }
    }

    /// The early fragments of a datagram whose first just went through
    /// (their ranges were checked and recorded when held): each is handled
    /// as if it arrived now, its output queued (frames to send, frames for
    /// the fabric) for the driver.
    fn release_fragments(&self, key: DatagramKey, fate: Fate, ifc: &Iface, cx: &mut Cx) {
        let held = self.frags.borrow_mut().take_held(&key);
        if held.is_empty() {
            return;
        }
        let stage = self.fabric_stage.get();
        for h in held {
            let mut frame = h.frame;
            let Some(mut ip) = packet::parse_eth(&frame)
                .ok()
                .and_then(|e| parse_ip(&frame, e.ethertype).ok())
                .filter(|ip| ip.frag.is_some())
            else {
                self.drop(DropReason::Malformed);
                continue;
            };
            self.fabric_stage.set(if h.via_fabric {
                FabricStage::Ingress
            } else {
                FabricStage::Wire
            });
            let v = self
                .later_fragment(&mut frame, &mut ip, ifc, fate, cx)
                .unwrap_or_else(|NeedsExclusive| {
                    // Later fragments change no table structure (no TCP
                    // flags to move a state): this cannot happen.
                    self.drop(DropReason::Fragment)
                });
            bump(&self.stats.fragments_released, 1);
            match v {
                Verdict::Tx { iface, len } => {
                    frame.truncate(len);
                    bump(&self.stats.tx, 1);
                    self.queue(cx.fx, iface, frame);
                }
                Verdict::Fabric { rg } => {
                    self.queue_fabric(
                        cx.fx,
                        FabricOut::ToOwner {
                            rg,
                            ingress: ifc.id,
                        },
                        frame,
                    );
                }
                Verdict::FabricEgress { rg, iface, len } => {
                    frame.truncate(len);
                    self.queue_fabric(cx.fx, FabricOut::Egress { rg, iface }, frame);
                }
                Verdict::Reply { .. } | Verdict::Held | Verdict::Drop(_) => {}
            }
        }
        self.fabric_stage.set(stage);
    }

    fn queue_fabric(&self, fx: &mut Effects, out: FabricOut, frame: Vec<u8>) {
        if fx.fabric.len() < OUTBOX_LIMIT {
            fx.fabric.push((out, frame));
        } else {
            bump(&self.stats.outbox_dropped, 1);
        }
    }

    /// Whether fragments are being tracked (the driver expires them).
    pub fn has_fragments(&self) -> bool {
        !self.frags.borrow().is_empty()
    }

    /// Datagrams tracked, and bytes of early fragments held.
    pub fn fragments_tracked(&self) -> usize {
        self.frags.borrow().len()
    }

    pub fn fragment_bytes_held(&self) -> usize {
        self.frags.borrow().held_bytes()
    }

    /// Forgets datagrams past [`crate::frag::TIMEOUT_MS`] (at most every
    /// 100 ms); their early fragments are dropped and counted.
    pub fn expire_fragments(&self, now: Millis) {
        if now.saturating_sub(self.frags_expired.get()) < 100 {
            return;
        }
        self.frags_expired.set(now);
        let gone = self.frags.borrow_mut().expire(now);
        bump(
            &self.stats.drops[DropReason::FragmentTimeout as usize],
            gone.held as u64,
        );
    }

    /// A port forward of `key`'s destination, from its zone or hairpinned
    /// from any other (see `first_packet`).
    fn dnat_matches(&self, key: &SessionKey) -> bool {
        self.cfg.dnat.iter().any(|d| d.matches(key))
    }

    /// Traffic to one of this node's addresses: echo requests are
    /// answered, the rest is not the dataplane's (control traffic uses the
    /// kernel's own interfaces).
    fn local(&self, f: &mut [u8], ip: &Ip, ifc: &Iface, cx: &Cx) -> Verdict {
        let dst = Addr(ip.dst);
        let echo = match ip.family {
            Family::V4 => ip.proto == proto::ICMP && f.get(ip.l4) == Some(&8),
            Family::V6 => ip.proto == proto::ICMPV6 && f.get(ip.l4) == Some(&128),
        };
        // A fragmented echo would need reassembly to answer: not ours.
        if !echo || ip.frag.is_some() || !self.owns(cx, ifc, &dst) {
            return self.drop(DropReason::LocalDelivery);
        }
        if !cx.env.icmp.take(cx.env.now) {
            return self.drop(DropReason::IcmpRateLimited);
        }
        let src = ip.src;
        let mut ip = *ip;
        // Swap addresses (checksum-neutral for the pseudo-header), set the
        // reply type, reset TTL.
        packet::set_addr(f, &mut ip, true, &src);
        packet::set_addr(f, &mut ip, false, &dst.0);
        let reply_type = if ip.family == Family::V4 { 0 } else { 129 };
        let old = packet::be16(f, ip.l4).expect("icmp header");
        f[ip.l4] = reply_type;
        let new = packet::be16(f, ip.l4).expect("icmp header");
        let c = packet::be16(f, ip.l4 + 2).expect("icmp header");
        packet::put16(f, ip.l4 + 2, packet::csum_replace16(c, old, new));
        let (dmac, smac) = (packet::mac_at(f, 6).expect("eth"), ifc.tx_mac());
        packet::set_macs(f, dmac, smac);
        Verdict::Reply { len: ip.end }
    }

    fn neighbor_solicitation(&self, f: &mut [u8], ip: &Ip, ifc: &Iface, cx: &mut Cx) -> Verdict {
        // type 135: 4 bytes header, 4 reserved, 16 target, options.
        let Some(target) = f
            .get(ip.l4 + 8..ip.l4 + 24)
            .map(|t| Addr(t.try_into().expect("16")))
        else {
            return self.drop(DropReason::Malformed);
        };
        let src = Addr(ip.src);
        let unspecified = ip.src == [0; 16];
        if let Some(mac) = nd_link_option(f, ip.l4 + 24, ip.end, 1)
            && !unspecified
            && ifc.prefixes().any(|p| p.contains(&src))
        {
            self.learn(cx, ifc.id, src, mac);
        }
        if !self.owns(cx, ifc, &target) || unspecified {
            return self.drop(DropReason::ArpNotForUs);
        }
        let requester = packet::mac_at(f, 6).expect("eth");
        let len = build_na(f, ifc.tx_mac(), requester, &target, &src, true);
        Verdict::Reply { len }
    }

    fn neighbor_advertisement(&self, f: &[u8], ip: &Ip, ifc: &Iface, cx: &mut Cx) {
        if let Some(target) = f
            .get(ip.l4 + 8..ip.l4 + 24)
            .map(|t| Addr(t.try_into().expect("16")))
            && let Some(mac) = nd_link_option(f, ip.l4 + 24, ip.end, 2)
            && ifc.prefixes().any(|p| p.contains(&target))
            && !self.owned_anywhere(&target)
        {
            self.learn(cx, ifc.id, target, mac);
        }
    }

    // ----- sessions ------------------------------------------------------

    fn established(
        &self,
        f: &mut [u8],
        ip: &mut Ip,
        ifc: &Iface,
        h: Hit,
        cx: &mut Cx,
    ) -> Result<Verdict, NeedsExclusive> {
        let now = cx.env.now;
        let r = cx
            .table
            .get()
            .get(h.handle)
            .expect("looked up under this borrow");
        let (key, nat, owner, state) = (r.key, r.nat(), r.owner_rg, r.tcp_state);
        let proxy = if r.proxied() {
            cx.table.get().proxy(h.handle)
        } else {
            None
        };
        let role = cx.env.roles.get(&owner).copied();
        let tag = tcp_tag(role.as_ref());
        let was = if key.proto == proto::TCP {
            r.tcp.load(tag)
        } else {
            tcp::Windows::default()
        };
        let out = match h.dir {
            Direction::Forward => r.egress_if,
            Direction::Reverse => r.ingress_if,
        };
        if owner.is_data() && !role.is_some_and(|r| r.primary) {
            bump(&self.stats.to_fabric, 1);
            return Ok(Verdict::Fabric { rg: owner });
        }
        if let Some(v) = self.mtu_check(f, ip, ifc, out, cx) {
            return Ok(v);
        }
        if let Some(Proxy::Pending { cookie, client_isn }) = proxy {
            return self.proxy_pending(f, ip, ifc, &h, (key, nat, owner), (cookie, client_isn), cx);
        }
        // A proxied session's server numbers its bytes from its own ISN,
        // the client from the cookie: tracked in the server's numbering,
        // the frame translated once nothing can refuse it any more.
        let shift = match proxy {
            Some(Proxy::Shift(d)) => d,
            _ => 0,
        };
        // TCP: the segment is judged against the session's windows (learned
        // in the owner RG's current epoch) before anything is changed.
        let mut w = was;
        let mut next = state;
        let mut flags = 0;
        if key.proto == proto::TCP && ip.has_l4() {
            let Some(mut seg) = tcp::Segment::parse(f, ip.l4, ip.end) else {
                return Ok(self.drop(DropReason::Malformed));
            };
            flags = seg.flags;
            if h.dir == Direction::Forward && seg.flags & tcp::ACK != 0 {
                seg.ack = seg.ack.wrapping_add(shift);
            }
            match tcp::track(&mut w, state, h.dir, &seg) {
                tcp::Outcome::Accept(n) => next = n,
                tcp::Outcome::Pass => bump(&self.stats.tcp_passed, 1),
                tcp::Outcome::Challenge(mut c) => {
                    if h.dir == Direction::Forward {
                        c.seq = c.seq.wrapping_sub(shift);
                    }
                    return Ok(self.challenge_ack(f, ip, ifc, c, cx));
                }
                tcp::Outcome::Invalid(why) => return Ok(self.drop(tcp_drop(why))),
            }
            if seg.flags & tcp::SYN != 0 {
                self.clamp_mss(f, ip, ifc, out);
            }
        }
        let len = (ip.end - ip.l3) as u32;
        if next != state {
            // The only change an established packet makes to the table's
            // structure (the timer may move): before the frame is touched.
            let t = cx.table.exclusive()?;
            t.set_tcp_state(h.handle, next, now);
            if owner.is_data() && t.get(h.handle).is_some_and(|r| r.is_replicated()) {
                cx.fx.deltas.push((owner, key));
            }
        }
        let t = cx.table.get();
        // `w` differs from `was` only for an accepted segment that taught
        // something (a retransmission teaches nothing).
        if key.proto == proto::TCP
            && w != was
            && let Some(r) = t.get(h.handle)
        {
            r.tcp.store(tag, &was, &w);
        }
        t.touch(h.handle, h.dir, len, now);
        if shift != 0 && ip.has_l4() {
            match h.dir {
                Direction::Forward if flags & tcp::ACK != 0 => tcp::shift_u32(f, ip.l4, 8, shift),
                Direction::Forward => {}
                Direction::Reverse => tcp::shift_u32(f, ip.l4, 4, shift.wrapping_neg()),
            }
        }
        translate(f, ip, h.dir, &key, nat);
        Ok(self.forward(f, ip, cx))
    }

    // ----- screens and the SYN proxy ------------------------------------

    /// Drops a packet a screen refused: counted (by screen and reason) and
    /// logged as a screen event.
    fn screened(
        &self,
        s: &Screen,
        k: ScreenKind,
        f: &[u8],
        ip: &Ip,
        ifc: &Iface,
        cx: &mut Cx,
    ) -> Verdict {
        s.state.stats.count(k);
        let (src_port, dst_port) = if ip.has_l4() {
            packet::ports(f, ip).unwrap_or((0, 0))
        } else {
            (0, 0)
        };
        let key = packet_key(ip, (src_port, dst_port), ifc);
        cx.fx.events.push(FlowEvent {
            kind: EventKind::ScreenDrop,
            reason: None,
            screen: Some(k),
            session_id: 0,
            key,
            reverse: key,
            policy: PolicyId(0),
            ingress_if: ifc.id,
            egress_if: ifc.id,
            owner_rg: ifc.rg().unwrap_or(RgId(0)),
            counters: Default::default(),
            created: cx.env.now,
            at: cx.env.now,
        });
        self.drop(DropReason::Screen)
    }

    /// Answers a SYN to a destination under attack with a cookie SYN-ACK
    /// from the destination it was sent to; nothing is created. MSS is the
    /// only option offered (and only when the frame has room for it).
    fn syn_cookie(
        &self,
        s: &Screen,
        f: &mut [u8],
        ip: &Ip,
        ifc: &Iface,
        key: &SessionKey,
        cx: &Cx,
    ) -> Verdict {
        let Some(seg) = tcp::Segment::parse(f, ip.l4, ip.end) else {
            return self.drop(DropReason::Malformed);
        };
        let mss = screen::syn_mss(f, ip.l4, ip.end);
        let cookie = s.cookie(key, seg.seq, mss, cx.env.now);
        let family_overhead = if ip.family == Family::V4 { 40 } else { 60 };
        let ours = ifc.mtu.saturating_sub(family_overhead).min(1460);
        let reply = |mss| tcp::Bare {
            seq: cookie,
            ack: seg.seq.wrapping_add(1),
            flags: tcp::SYN | tcp::ACK,
            win: 65_535,
            mss,
        };
        let smac = ifc.tx_mac();
        let Some(len) = tcp::build_reply(f, ip, smac, &reply(Some(ours)))
            .or_else(|| tcp::build_reply(f, ip, smac, &reply(None)))
        else {
            return self.drop(DropReason::Malformed);
        };
        s.state.stats.cookies_sent.fetch_add(1, Ordering::Relaxed);
        Verdict::Reply { len }
    }

    /// A bare ACK with no session: whether it completes a cookie handshake
    /// (counted when it does not).
    fn cookie_ack(
        &self,
        s: &Screen,
        f: &[u8],
        ip: &Ip,
        key: &SessionKey,
        now: Millis,
    ) -> Option<CookieAck> {
        let seg = tcp::Segment::parse(f, ip.l4, ip.end)?;
        if seg.flags & (tcp::SYN | tcp::RST | tcp::FIN | tcp::ACK) != tcp::ACK {
            return None;
        }
        let client_isn = seg.seq.wrapping_sub(1);
        let cookie = seg.ack.wrapping_sub(1);
        let Some(mss) = s.check_cookie(key, client_isn, cookie, now) else {
            s.state
                .stats
                .cookies_invalid
                .fetch_add(1, Ordering::Relaxed);
            return None;
        };
        Some(CookieAck {
            cookie,
            client_isn,
            mss,
            win: seg.win,
        })
    }

    /// The session of a valid cookie ACK exists: the proxy now opens the
    /// connection to the server with the client's ISN and the cookie's
    /// MSS. The ACK itself is consumed.
    #[allow(clippy::too_many_arguments)]
    fn proxy_open(
        &self,
        s: &Screen,
        h: SessionHandle,
        c: CookieAck,
        f: &[u8],
        ip: &Ip,
        owner: RgId,
        cx: &mut Cx,
    ) -> Verdict {
        if let Ok(t) = cx.table.exclusive() {
            t.set_proxy(
                h,
                Proxy::Pending {
                    cookie: c.cookie,
                    client_isn: c.client_isn,
                },
            );
        }
        s.state.stats.cookies_valid.fetch_add(1, Ordering::Relaxed);
        let syn = tcp::Bare {
            seq: c.client_isn,
            ack: 0,
            flags: tcp::SYN,
            win: c.win,
            mss: Some(c.mss),
        };
        self.proxy_send(f, ip, &syn, Some((h, owner)), cx);
        self.drop(DropReason::SynProxyHandshake)
    }

    /// Sends segment `b` onward in the direction of the frame `f` carries
    /// (already translated), routed like it; `learn`: the session whose
    /// windows learn it (the proxy's SYN).
    fn proxy_send(
        &self,
        f: &[u8],
        ip: &Ip,
        b: &tcp::Bare,
        learn: Option<(SessionHandle, RgId)>,
        cx: &mut Cx,
    ) {
        let l4 = ip.l3 + if ip.family == Family::V4 { 20 } else { 40 };
        let mut v = vec![0u8; l4 + 24];
        let n = ip.end.min(v.len());
        v[..n].copy_from_slice(&f[..n]);
        let Some(len) = tcp::build_onward(&mut v, ip, b) else {
            return;
        };
        v.truncate(len);
        let Ok(out_ip) = parse_ip(&v, packet::be16(&v, 12).unwrap_or(0)) else {
            return;
        };
        if let Some((h, owner)) = learn
            && let Some(seg) = tcp::Segment::parse(&v, out_ip.l4, out_ip.end)
            && let Some(r) = cx.table.get().get(h)
        {
            let mut w = tcp::Windows::default();
            if let tcp::Outcome::Accept(_) =
                tcp::track(&mut w, TcpState::None, Direction::Forward, &seg)
            {
                r.tcp
                    .store(tcp_tag(cx.env.roles.get(&owner)), &Default::default(), &w);
            }
        }
        self.send_built(v, &out_ip, cx);
    }

    /// Routes and queues a frame the core built (or held): out of the
    /// node, or over the fabric to the egress owner.
    fn send_built(&self, mut v: Vec<u8>, ip: &Ip, cx: &mut Cx) {
        match self.forward(&mut v, ip, cx) {
            Verdict::Tx { iface, len } => {
                v.truncate(len);
                self.queue(cx.fx, iface, v);
            }
            Verdict::FabricEgress { rg, iface, len } => {
                v.truncate(len);
                self.queue_fabric(cx.fx, FabricOut::Egress { rg, iface }, v);
            }
            _ => {}
        }
    }

    /// A segment of a proxied session whose server handshake runs: the
    /// server's SYN-ACK completes it (answered with the proxy's ACK, the
    /// shift fixed, the session established and synced); its RST is passed
    /// to the client in the client's numbering and closes the session;
    /// anything else waits (dropped, retransmitted by its sender).
    #[allow(clippy::too_many_arguments)]
    fn proxy_pending(
        &self,
        f: &mut [u8],
        ip: &mut Ip,
        ifc: &Iface,
        h: &Hit,
        (key, nat, owner): (SessionKey, Nat, RgId),
        (cookie, client_isn): (u32, u32),
        cx: &mut Cx,
    ) -> Result<Verdict, NeedsExclusive> {
        let now = cx.env.now;
        let stats = self.cfg.screen(key.zone).map(|s| &s.state.stats);
        let seg = match tcp::Segment::parse(f, ip.l4, ip.end) {
            Some(seg) if ip.has_l4() && h.dir == Direction::Reverse => seg,
            Some(seg) => {
                // The client's first data (or FIN) waits for the server's
                // handshake; anything else, or beyond one, is dropped.
                let carries = seg.len > 0 || seg.flags & tcp::FIN != 0;
                let held = carries
                    && cx
                        .table
                        .exclusive()?
                        .hold_proxy_segment(h.handle, &f[..ip.end]);
                if let Some(st) = stats {
                    st.proxy_early_segments.fetch_add(1, Ordering::Relaxed);
                }
                if held {
                    return Ok(Verdict::Held);
                }
                return Ok(self.drop(DropReason::SynProxyPending));
            }
            None => return Ok(self.drop(DropReason::Malformed)),
        };
        let answers_syn = seg.flags & tcp::ACK != 0 && seg.ack == client_isn.wrapping_add(1);
        let synack = seg.flags & (tcp::SYN | tcp::ACK | tcp::RST | tcp::FIN) == tcp::SYN | tcp::ACK;
        if answers_syn && seg.flags & tcp::RST != 0 {
            let t = cx.table.exclusive()?;
            t.set_tcp_state(h.handle, TcpState::Closed, now);
            if let Some(st) = stats {
                st.proxy_refused.fetch_add(1, Ordering::Relaxed);
            }
            // The client's numbering: the RST lands on the cookie's next.
            tcp::shift_u32(f, ip.l4, 4, cookie.wrapping_add(1).wrapping_sub(seg.seq));
            translate(f, ip, Direction::Reverse, &key, nat);
            return Ok(self.forward(f, ip, cx));
        }
        if !(answers_syn && synack) {
            return Ok(self.drop(DropReason::SynProxyPending));
        }
        let t = cx.table.exclusive()?;
        let shift = seg.seq.wrapping_sub(cookie);
        t.set_proxy(h.handle, Proxy::Shift(shift));
        let held = t.take_proxy_segment(h.handle);
        t.set_tcp_state(h.handle, TcpState::Established, now);
        t.touch(h.handle, h.dir, (ip.end - ip.l3) as u32, now);
        if owner.is_data() {
            cx.fx.deltas.push((owner, key));
        }
        if let Some(st) = stats {
            st.proxy_established.fetch_add(1, Ordering::Relaxed);
        }
        // The windows learn the server's SYN-ACK and the proxy's ACK.
        let tag = tcp_tag(cx.env.roles.get(&owner));
        let r = cx.table.get().get(h.handle);
        let was = r.map(|r| r.tcp.load(tag)).unwrap_or_default();
        let mut w = was;
        let _ = tcp::track(&mut w, TcpState::SynSent, Direction::Reverse, &seg);
        let ack = tcp::Bare {
            seq: client_isn.wrapping_add(1),
            ack: seg.seq.wrapping_add(1),
            flags: tcp::ACK,
            win: w.sides[0].win,
            mss: None,
        };
        let Some(len) = tcp::build_reply(f, ip, ifc.tx_mac(), &ack) else {
            return Ok(self.drop(DropReason::Malformed));
        };
        let l4 = ip.l3 + if ip.family == Family::V4 { 20 } else { 40 };
        if let Some(a) = tcp::Segment::parse(f, l4, len) {
            let _ = tcp::track(&mut w, TcpState::SynReceived, Direction::Forward, &a);
        }
        // The client segment held while the server's handshake ran goes
        // now, translated and tracked like every later one.
        let released = held.and_then(|mut v| {
            let ip = parse_ip(&v, packet::be16(&v, 12).ok()?).ok()?;
            if packet::tcp_flags(&v, &ip) & tcp::ACK != 0 {
                tcp::shift_u32(&mut v, ip.l4, 8, shift);
            }
            let s = tcp::Segment::parse(&v, ip.l4, ip.end)?;
            let _ = tcp::track(&mut w, TcpState::Established, Direction::Forward, &s);
            Some((v, ip))
        });
        if let Some(r) = r {
            r.tcp.store(tag, &was, &w);
        }
        if let Some((mut v, mut ip)) = released {
            translate(&mut v, &mut ip, Direction::Forward, &key, nat);
            self.send_built(v, &ip, cx);
        }
        Ok(Verdict::Reply { len })
    }

    fn first_packet(
        &self,
        f: &mut [u8],
        ip: &mut Ip,
        ifc: &Iface,
        key: SessionKey,
        cx: &mut Cx,
    ) -> Result<Verdict, NeedsExclusive> {
        let now = cx.env.now;
        let flags = packet::tcp_flags(f, ip);
        let cfg = &*self.cfg;
        // Destination NAT first: policy and routing see the real server.
        // A rule's own zone is preferred; from any other zone the public
        // address is reached by hairpinning (RFC 4787 REQ-9, RFC 5382
        // REQ-8): an inside client using the port forward's public face.
        let dnat_rule = cfg
            .dnat
            .iter()
            .find(|d| d.matches(&key) && d.from == ifc.zone)
            .map(|d| (d, false))
            .or_else(|| cfg.dnat.iter().find(|d| d.matches(&key)).map(|d| (d, true)));
        let mut dnat = dnat_rule.map(|(d, _)| (d.to, d.to_port));
        let mut hairpin = dnat_rule.and_then(|(d, h)| h.then_some(d.addr));
        // A live source-NAT mapping at the destination: from the outside
        // its rule's filtering decides; from inside it is hairpinned to
        // the internal endpoint like a port forward (RFC 4787 REQ-9).
        if dnat_rule.is_none()
            && let Some((b, m)) = mapped(cx.table.get(), &key)
        {
            match cfg.snat.iter().find(|r| {
                r.to == ifc.zone
                    && r.from == m.internal.zone
                    && (r.source.is_empty()
                        || r.source.iter().any(|p| p.contains(&m.internal.addr)))
            }) {
                Some(rule) => return self.unsolicited(f, ip, ifc, key, (b, m), rule, cx),
                None => {
                    dnat = Some((m.internal.addr, m.internal.port));
                    hairpin = Some(b.addr);
                }
            }
        }
        let (dst, dport) = dnat.unwrap_or((key.dst, key.dst_port));
        let Some(out) = cfg.route(&dst).and_then(|r| cfg.iface(r.iface)) else {
            self.answer(f, ip, ifc, IcmpError::NoRoute, cx);
            return Ok(self.drop(DropReason::NoRoute));
        };
        // The session belongs to the RG of its egress reth (else ingress).
        // When the peer owns it, the peer decides everything else (it may
        // hold the session this node has no copy of): hand the frame over
        // before judging it.
        let owner = out.rg().or(ifc.rg()).unwrap_or(RgId(0));
        if owner.is_data() && !cx.is_primary(owner) {
            bump(&self.stats.to_fabric, 1);
            return Ok(Verdict::Fabric { rg: owner });
        }
        // Only a flow's first packet creates a session: a bare SYN, an echo
        // request, or any UDP / other datagram.
        let starts = match key.proto {
            proto::TCP => {
                flags & (packet::TCP_SYN | packet::TCP_ACK | packet::TCP_RST) == packet::TCP_SYN
            }
            proto::ICMP => f.get(ip.l4) == Some(&8),
            proto::ICMPV6 => f.get(ip.l4) == Some(&128),
            _ => true,
        };
        let screen = cfg.screen(ifc.zone);
        // A bare ACK to a destination its zone's screen answers SYNs of
        // with cookies may complete a cookie handshake.
        let cookie_ack = match screen {
            Some(s) if !starts && s.syn_attack.is_some() && key.proto == proto::TCP => {
                self.cookie_ack(s, f, ip, &key, now)
            }
            _ => None,
        };
        if !starts && cookie_ack.is_none() {
            return Ok(self.drop(DropReason::NoSession));
        }
        // A SYN's windows are learned from it (and a SYN no endpoint sends
        // is refused) before anything is created.
        let syn = if cookie_ack.is_none() && key.proto == proto::TCP && ip.has_l4() {
            let Some(seg) = tcp::Segment::parse(f, ip.l4, ip.end) else {
                return Ok(self.drop(DropReason::Malformed));
            };
            let mut w = tcp::Windows::default();
            match tcp::track(&mut w, TcpState::None, Direction::Forward, &seg) {
                tcp::Outcome::Accept(_) => Some(w),
                tcp::Outcome::Invalid(why) => return Ok(self.drop(tcp_drop(why))),
                _ => return Ok(self.drop(DropReason::NoSession)),
            }
        } else {
            None
        };
        let policy = cfg.policy(ifc.zone, out.zone, &key.src, &dst, key.proto, dport);
        let deny = |policy| FlowEvent {
            kind: EventKind::PolicyDeny,
            reason: None,
            screen: None,
            session_id: 0,
            key,
            reverse: SessionKey {
                src: dst,
                src_port: dport,
                dst: key.src,
                dst_port: key.src_port,
                proto: key.proto,
                zone: out.zone,
            },
            policy,
            ingress_if: ifc.id,
            egress_if: out.id,
            owner_rg: owner,
            counters: Default::default(),
            created: now,
            at: now,
        };
        let Some(policy) = policy else {
            cx.fx.events.push(deny(PolicyId(0)));
            return Ok(self.drop(DropReason::NoPolicy));
        };
        let hits = &self.stats.policy_hits[(policy.id.0 - 1) as usize];
        if !policy.permit {
            bump(hits, 1);
            cx.fx.events.push(deny(policy.id));
            return Ok(self.drop(DropReason::PolicyDeny));
        }
        if let Some(v) = self.mtu_check(f, ip, ifc, out.id, cx) {
            return Ok(v);
        }
        // Creating the session is the first change: from here on the
        // frame needs exclusive access. The screen meters it only now, so
        // a frame run again with exclusive access is counted once.
        let counts = cx.table.exclusive()?.address_counts(&key.src, &key.dst);
        if let Some(s) = screen
            && cookie_ack.is_none()
        {
            match s.check_new(&key, counts, now) {
                Err(k) => return Ok(self.screened(s, k, f, ip, ifc, cx)),
                Ok(true) if syn.is_some() => return Ok(self.syn_cookie(s, f, ip, ifc, &key, cx)),
                Ok(_) => {}
            }
        }
        let t = cx.table.exclusive()?;
        bump(hits, 1);
        let snat = cfg
            .snat
            .iter()
            .find(|r| {
                r.from == ifc.zone
                    && r.to == out.zone
                    && (r.source.is_empty() || r.source.iter().any(|p| p.contains(&key.src)))
            })
            .and_then(|r| {
                let addr = r.pool.or_else(|| egress_address(out, key.src.is_v4()))?;
                Some(SnatRequest {
                    addr,
                    ports: r.ports.0..=r.ports.1,
                })
            })
            // A hairpinned session is also source-NATed to the public
            // address, so the server answers through the firewall (not
            // straight to a client on its own segment) and sees the
            // address the client used.
            .or(hairpin.map(|addr| SnatRequest {
                addr,
                ports: HAIRPIN_PORTS,
            }));
        let new_state = if key.proto == proto::TCP {
            TcpState::SynSent
        } else {
            TcpState::None
        };
        let new = NewSession {
            key,
            egress_zone: out.zone,
            snat,
            dnat,
            ingress_if: ifc.id,
            egress_if: out.id,
            owner_rg: owner,
            policy: policy.id,
            tcp_state: new_state,
        };
        let inserted = t.insert(new, now).map(|h| {
            let r = t.get(h).expect("inserted");
            let created = FlowEvent::of_session(EventKind::SessionCreate, r, now);
            (h, r.nat(), created)
        });
        let (handle, nat, created) = match inserted {
            Ok(x) => x,
            Err(InsertError::PortsExhausted) => return Ok(self.drop(DropReason::PortsExhausted)),
            Err(_) => return Ok(self.drop(DropReason::SessionRefused)),
        };
        bump(&self.stats.sessions_created, 1);
        cx.fx.events.push(created);
        // A TCP session is synced once its handshake completes (its state
        // change queues it then).
        if owner.is_data() && establishes(key.proto, new_state) {
            cx.fx.deltas.push((owner, key));
        }
        translate(f, ip, Direction::Forward, &key, nat);
        t.touch(handle, Direction::Forward, (ip.end - ip.l3) as u32, now);
        if let (Some(s), Some(c)) = (screen, cookie_ack) {
            return Ok(self.proxy_open(s, handle, c, f, ip, owner, cx));
        }
        if let Some(w) = syn {
            let tag = tcp_tag(cx.env.roles.get(&owner));
            if let Some(r) = cx.table.get().get(handle) {
                r.tcp.store(tag, &tcp::Windows::default(), &w);
            }
            self.clamp_mss(f, ip, ifc, out.id);
        }
        Ok(self.forward(f, ip, cx))
    }

    /// A packet from outside to a live mapping, no session: admitted by the
    /// SNAT rule's filtering (UDP only: TCP and ICMP mappings take replies
    /// of their sessions alone), it becomes a session of the internal
    /// endpoint towards this remote, on the same mapping, and is delivered
    /// as that session's reply. The session inherits the owner RG, inside
    /// interface and policy of one of the mapping's sessions out of this
    /// zone: the rule's filtering is what admits it, not a zone policy.
    #[allow(clippy::too_many_arguments)]
    fn unsolicited(
        &self,
        f: &mut [u8],
        ip: &mut Ip,
        ifc: &Iface,
        key: SessionKey,
        (b, m): (NatBinding, Mapping),
        rule: &Snat,
        cx: &mut Cx,
    ) -> Result<Verdict, NeedsExclusive> {
        let now = cx.env.now;
        let exemplar = {
            let table = cx.table.get();
            let out_this_way = |h: SessionHandle| {
                table.get(h).filter(|r| {
                    self.cfg
                        .iface(r.egress_if)
                        .is_some_and(|o| o.zone == ifc.zone)
                })
            };
            let mut sessions = table.mapping_sessions(&m).take(FILTER_WALK);
            match rule.filtering {
                _ if key.proto != proto::UDP => None,
                NatFiltering::AddressAndPortDependent => None,
                NatFiltering::EndpointIndependent => sessions.find_map(out_this_way),
                NatFiltering::AddressDependent => {
                    sessions.find_map(|h| out_this_way(h).filter(|r| r.reverse.src == key.src))
                }
            }
            .map(|r| (r.owner_rg, r.ingress_if, r.policy))
        };
        let Some((owner, inside_if, policy)) = exemplar else {
            return Ok(self.drop(DropReason::NatFiltered));
        };
        if owner.is_data() && !cx.is_primary(owner) {
            bump(&self.stats.to_fabric, 1);
            return Ok(Verdict::Fabric { rg: owner });
        }
        if let Some(v) = self.mtu_check(f, ip, ifc, inside_if, cx) {
            return Ok(v);
        }
        let t = cx.table.exclusive()?;
        let inner = SessionKey {
            src: m.internal.addr,
            src_port: m.internal.port,
            dst: key.src,
            dst_port: key.src_port,
            proto: key.proto,
            zone: m.internal.zone,
        };
        let new = NewSession {
            key: inner,
            egress_zone: ifc.zone,
            snat: Some(SnatRequest {
                addr: b.addr,
                ports: b.port..=b.port,
            }),
            dnat: None,
            ingress_if: inside_if,
            egress_if: ifc.id,
            owner_rg: owner,
            policy,
            tcp_state: TcpState::None,
        };
        let handle = match t.insert(new, now) {
            Ok(h) => h,
            Err(InsertError::PortsExhausted) => return Ok(self.drop(DropReason::PortsExhausted)),
            Err(_) => return Ok(self.drop(DropReason::SessionRefused)),
        };
        bump(&self.stats.sessions_created, 1);
        bump(&self.stats.nat_filter_admitted, 1);
        if let Some(r) = t.get(handle) {
            cx.fx
                .events
                .push(FlowEvent::of_session(EventKind::SessionCreate, r, now));
        }
        if owner.is_data() {
            cx.fx.deltas.push((owner, inner));
        }
        packet::set_addr(f, ip, true, &inner.src.0);
        packet::set_port(f, ip, true, inner.src_port);
        t.touch(handle, Direction::Reverse, (ip.end - ip.l3) as u32, now);
        Ok(self.forward(f, ip, cx))
    }

    /// Lowers the MSS option of a SYN or SYN-ACK to the clamp of the
    /// interface it came in on or leaves by (the smaller), keeping the
    /// TCP checksum. IPv6 gets 20 bytes less than the configured value.
    fn clamp_mss(&self, f: &mut [u8], ip: &Ip, ifc: &Iface, out: InterfaceId) {
        let clamp = ifc
            .tcp_mss
            .into_iter()
            .chain(self.cfg.iface(out).and_then(|o| o.tcp_mss))
            .min();
        let Some(mut mss) = clamp else {
            return;
        };
        if ip.family == Family::V6 {
            mss = mss.saturating_sub(20);
        }
        if tcp::clamp_mss(f, ip.l4, ip.end, mss) {
            bump(&self.stats.tcp_mss_clamped, 1);
        }
    }

    /// Turns an inexact in-window RST into the challenge ACK RFC 5961
    /// answers it with, sent back to the RST's sender as if by its peer
    /// (within the node's ICMP budget, which covers everything the
    /// firewall itself originates on the data path).
    fn challenge_ack(
        &self,
        f: &mut [u8],
        ip: &Ip,
        ifc: &Iface,
        c: tcp::Challenge,
        cx: &Cx,
    ) -> Verdict {
        if !cx.env.icmp.take(cx.env.now) {
            return self.drop(DropReason::TcpRstChallenged);
        }
        let Some(len) = tcp::build_challenge_ack(f, ip, ifc.tx_mac(), c) else {
            return self.drop(DropReason::TcpRstChallenged);
        };
        bump(&self.stats.drops[DropReason::TcpRstChallenged as usize], 1);
        bump(&self.stats.tcp_challenge_acks, 1);
        Verdict::Reply { len }
    }

    /// An ICMP error about a packet of a session: translate the outer
    /// destination and the embedded header back, then forward like the
    /// session's reverse (or forward) traffic.
    fn icmp_error(&self, f: &mut [u8], outer: &mut Ip, ifc: &Iface, cx: &mut Cx) -> Verdict {
        let inner_l3 = outer.l4 + 8;
        let inner = match outer.family {
            Family::V4 => packet::parse_ipv4_embedded(f, inner_l3, outer.end),
            Family::V6 => packet::parse_ipv6_embedded(f, inner_l3, outer.end),
        };
        let Some(mut inner) = inner else {
            return self.drop(DropReason::Malformed);
        };
        let Ok((isport, idport)) = packet::ports(f, &inner) else {
            return self.drop(DropReason::Malformed);
        };
        // The embedded packet went the other way: its reversal is what
        // would have arrived here.
        let probe = SessionKey {
            src: Addr(inner.dst),
            dst: Addr(inner.src),
            src_port: idport,
            dst_port: isport,
            proto: inner.proto,
            zone: ifc.zone,
        };
        let t = cx.table.get();
        let found = t.lookup(&probe).map(|(h, dir)| {
            let r = t.get(h).expect("looked up under this borrow");
            (dir, r.key, r.nat(), r.owner_rg)
        });
        let Some((dir, key, nat, owner)) = found else {
            if self.owned_anywhere(&Addr(outer.dst)) {
                return self.local(f, outer, ifc, cx);
            }
            return self.drop(DropReason::IcmpErrorNoSession);
        };
        if owner.is_data() && !cx.is_primary(owner) {
            bump(&self.stats.to_fabric, 1);
            return Verdict::Fabric { rg: owner };
        }
        // The embedded packet is the session's traffic in `dir.opposite`
        // after translation; restore its pre-translation form, and send the
        // error to whoever sent it.
        match dir {
            Direction::Reverse => {
                // Error from the far side about a forward packet.
                if nat.snat.is_some() {
                    packet::set_embedded_addr(f, &mut inner, false, &key.src.0);
                    packet::set_embedded_port(f, &inner, false, key.src_port);
                    packet::set_addr(f, outer, true, &key.src.0);
                }
                if let Some((target, _)) = nat.dnat {
                    packet::set_embedded_addr(f, &mut inner, true, &key.dst.0);
                    packet::set_embedded_port(f, &inner, true, key.dst_port);
                    // An error from the real server shows the public address.
                    if outer.src == target.0 {
                        packet::set_addr(f, outer, false, &key.dst.0);
                    }
                }
            }
            Direction::Forward => {
                // Error from the client side about a reply packet.
                if let Some((a, p)) = nat.dnat {
                    packet::set_embedded_addr(f, &mut inner, false, &a.0);
                    packet::set_embedded_port(f, &inner, false, p);
                    packet::set_addr(f, outer, true, &a.0);
                }
                if let Some((a, p)) = nat.snat {
                    packet::set_embedded_addr(f, &mut inner, true, &a.0);
                    packet::set_embedded_port(f, &inner, true, p);
                    packet::set_addr(f, outer, false, &a.0);
                }
            }
        }
        // Forwarded like any packet: its TTL must allow it (never an ICMP
        // error about an ICMP error, RFC 1812 §4.3.2.7).
        if outer.ttl <= 1 {
            return self.drop(DropReason::TtlExceeded);
        }
        packet::fix_icmp_checksum(f, outer);
        self.forward(f, outer, cx)
    }

    /// An ICMP error about the packet `ip` in `f` (as it arrived, before
    /// any rewrite) back to its sender, from this node's address on the
    /// ingress interface, if the rate limit and RFC 1812 / 4443 allow.
    /// Frames that came over the fabric are not answered here (the
    /// interface they name is the peer's).
    fn answer(&self, f: &[u8], ip: &Ip, ifc: &Iface, kind: IcmpError, cx: &mut Cx) {
        if self.fabric_stage.get() != FabricStage::Wire || !icmp::may_answer(f, ip) {
            return;
        }
        let Some(src) = egress_address(ifc, ip.family == Family::V4) else {
            return;
        };
        if !cx.env.icmp.take(cx.env.now) {
            return;
        }
        if let Some(frame) = icmp::build_error(f, ip, kind, &src, ifc.tx_mac()) {
            self.queue(cx.fx, ifc.id, frame);
        }
    }

    /// A packet larger than `out`'s MTU is dropped (counted); with DF (and
    /// always for IPv6) its sender is told the MTU (fragmentation needed /
    /// packet too big), so path-MTU discovery works through the pair.
    fn mtu_check(
        &self,
        f: &[u8],
        ip: &Ip,
        ifc: &Iface,
        out: InterfaceId,
        cx: &mut Cx,
    ) -> Option<Verdict> {
        let mtu = self.cfg.iface(out)?.mtu;
        if ip.end - ip.l3 <= usize::from(mtu) {
            return None;
        }
        let df = ip.family == Family::V6 || f.get(ip.l3 + 6).is_some_and(|b| b & 0x40 != 0);
        if df {
            self.answer(f, ip, ifc, IcmpError::TooBig { mtu }, cx);
        }
        Some(self.drop(DropReason::MtuExceeded))
    }

    /// Routes the (translated) packet by its destination: egress port,
    /// next hop, neighbor MAC, TTL.
    fn forward(&self, f: &mut [u8], ip: &Ip, cx: &mut Cx) -> Verdict {
        let cfg = &*self.cfg;
        let dst = Addr(ip.dst);
        let Some(route) = cfg.route(&dst) else {
            return self.drop(DropReason::NoRoute);
        };
        let Some(out) = cfg.iface(route.iface) else {
            return self.drop(DropReason::NoRoute);
        };
        if let Some(rg) = out.rg()
            && !cx.is_primary(rg)
        {
            packet::dec_ttl(f, ip);
            bump(&self.stats.to_fabric, 1);
            return Verdict::FabricEgress {
                rg,
                iface: out.id,
                len: ip.end,
            };
        }
        self.link_out(f, ip, out, route.gateway.unwrap_or(dst), cx)
    }

    /// Next-hop MAC and transmit on `out`.
    fn link_out(&self, f: &mut [u8], ip: &Ip, out: &Iface, hop: Addr, cx: &mut Cx) -> Verdict {
        let mac = cx.neighbor(out.id, hop);
        if self.fabric_stage.get() != FabricStage::Egress {
            packet::dec_ttl(f, ip);
        }
        let Some(mac) = mac else {
            self.resolve(out, hop, cx);
            packet::set_macs(f, packet::BROADCAST, out.tx_mac());
            return self.hold(out.id, hop, &f[..ip.end], cx.env.now);
        };
        packet::set_macs(f, mac, out.tx_mac());
        Verdict::Tx {
            iface: out.id,
            len: ip.end,
        }
    }

    /// A frame the peer sent over the fabric to be processed as if it had
    /// arrived on this node's member of `ingress`. Its destination MAC was
    /// the peer's; it is taken as addressed to this node.
    fn fabric_ingress(
        &self,
        frame: &mut [u8],
        ingress: InterfaceId,
        cx: &mut Cx,
    ) -> Result<Verdict, NeedsExclusive> {
        let Some(ifc) = self.cfg.iface(ingress) else {
            return Ok(self.drop(DropReason::UnknownInterface));
        };
        self.fabric_stage.set(FabricStage::Ingress);
        // Only the first run of a frame may rewrite it: a re-run (after
        // NeedsExclusive) sees the same bytes.
        if frame.len() >= 6 {
            let mac = ifc.tx_mac();
            frame[0..6].copy_from_slice(&mac);
        }
        Ok(match self.wire(frame, ingress, cx)? {
            // The peer sent it because it does not own the session; neither
            // do we (roles moved meanwhile): never bounce it back.
            Verdict::Fabric { .. } => self.drop(DropReason::FabricUnavailable),
            v => v,
        })
    }

    /// A frame the peer processed (sessions, NAT, TTL) for this node to
    /// transmit on `iface`, which it owns: only the link layer is done here.
    fn transmit_from_fabric(
        &self,
        frame: &mut [u8],
        iface: InterfaceId,
        cx: &mut Cx,
    ) -> Result<Verdict, NeedsExclusive> {
        let cfg = &*self.cfg;
        let Some(out) = cfg.iface(iface) else {
            return Ok(self.drop(DropReason::UnknownInterface));
        };
        if out.rg().is_some_and(|rg| !cx.is_primary(rg)) {
            // Not ours either (roles moved meanwhile): never bounce back.
            return Ok(self.drop(DropReason::FabricUnavailable));
        }
        let ip = match packet::parse_eth(frame).map(|e| e.ethertype) {
            Ok(packet::ETHERTYPE_IPV4) => packet::parse_ipv4(frame, ETH_HLEN),
            Ok(packet::ETHERTYPE_IPV6) => packet::parse_ipv6(frame, ETH_HLEN),
            _ => return Ok(self.drop(DropReason::Malformed)),
        };
        let Ok(ip) = ip else {
            return Ok(self.drop(DropReason::Malformed));
        };
        let dst = Addr(ip.dst);
        let hop = cfg.route(&dst).and_then(|r| r.gateway).unwrap_or(dst);
        self.fabric_stage.set(FabricStage::Egress);
        Ok(self.link_out(frame, &ip, out, hop, cx))
    }

    /// Asks for `hop`'s MAC (at most every 100 ms per neighbor).
    fn resolve(&self, out: &Iface, hop: Addr, cx: &mut Cx) {
        let now = cx.env.now;
        if self
            .pending
            .borrow()
            .get(&(out.id, hop))
            .is_some_and(|t| now.saturating_sub(*t) < 100)
        {
            return;
        }
        let Some(src) = egress_address(out, hop.is_v4()) else {
            return;
        };
        let mut pending = self.pending.borrow_mut();
        if pending.len() >= PENDING_LIMIT {
            pending.clear();
        }
        pending.insert((out.id, hop), now);
        drop(pending);
        let frame = if hop.is_v4() {
            build_arp(1, out.tx_mac(), packet::BROADCAST, &src, &hop)
        } else {
            build_ns(out.tx_mac(), &src, &hop)
        };
        self.queue(cx.fx, out.id, frame);
    }

    /// Keeps a copy of a ready frame until `hop` resolves (bounded).
    fn hold(&self, iface: InterfaceId, hop: Addr, frame: &[u8], now: Millis) -> Verdict {
        let mut held = self.held.borrow_mut();
        let same = held
            .iter()
            .filter(|h| h.iface == iface && h.hop == hop)
            .count();
        if held.len() >= HOLD_TOTAL || same >= HOLD_PER_NEIGHBOR {
            drop(held);
            return self.drop(DropReason::NeighborMiss);
        }
        held.push(HeldFrame {
            iface,
            hop,
            frame: frame.to_vec(),
            since: now,
        });
        bump(&self.stats.held, 1);
        Verdict::Held
    }

    /// Whether frames are waiting for a next hop.
    pub fn has_held(&self) -> bool {
        !self.held.borrow().is_empty()
    }

    /// Sends the held frames whose next hop is now known (`neighbors`, and
    /// what `fx` learned) and drops those held longer than [`HOLD_MS`].
    pub fn release_held(&self, neighbors: &NeighborMap, now: Millis, fx: &mut Effects) {
        let mut held = std::mem::take(&mut *self.held.borrow_mut());
        held.retain_mut(|h| {
            let mac = fx
                .learned
                .iter()
                .rev()
                .find(|(k, _)| *k == (h.iface, h.hop))
                .map(|(_, m)| *m)
                .or_else(|| neighbors.get(&(h.iface, h.hop)).copied());
            if let Some(mac) = mac {
                h.frame[0..6].copy_from_slice(&mac);
                self.queue(fx, h.iface, std::mem::take(&mut h.frame));
                bump(&self.stats.held_sent, 1);
                return false;
            }
            if now.saturating_sub(h.since) >= HOLD_MS {
                self.drop(DropReason::NeighborMiss);
                return false;
            }
            true
        });
        *self.held.borrow_mut() = held;
    }

    fn queue(&self, fx: &mut Effects, iface: InterfaceId, frame: Vec<u8>) {
        if fx.frames.len() < OUTBOX_LIMIT {
            fx.frames.push((iface, frame));
        } else {
            bump(&self.stats.outbox_dropped, 1);
        }
    }

    /// On becoming primary for `rg`: gratuitous ARP for every IPv4 VIP and
    /// an unsolicited NA for every IPv6 VIP, from the virtual MAC, so the
    /// segment's switches and hosts move to this node at once.
    pub fn announce(&self, rg: RgId, fx: &mut Effects) {
        let cfg = &*self.cfg;
        for ifc in cfg.ifaces.iter().filter(|i| i.rg() == Some(rg)) {
            let (_, vmac, vips) = ifc.reth.as_ref().expect("reth");
            for vip in vips {
                let frame = if vip.is_v4() {
                    build_arp(1, *vmac, packet::BROADCAST, &vip.addr, &vip.addr)
                } else {
                    let mut f = vec![0u8; 86];
                    let all_nodes =
                        Addr(std::net::Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1).octets());
                    let len = build_na(
                        &mut f,
                        *vmac,
                        [0x33, 0x33, 0, 0, 0, 1],
                        &vip.addr,
                        &all_nodes,
                        false,
                    );
                    f.truncate(len);
                    f
                };
                self.queue(fx, ifc.id, frame);
            }
        }
    }
}

/// The address a node sources from on `out`: the reth's VIP of the family,
/// else its own.
/// A cookie ACK that proved its handshake: what the proxy opens the
/// server's connection with.
#[derive(Clone, Copy, Debug)]
struct CookieAck {
    cookie: u32,
    client_isn: u32,
    mss: u16,
    win: u16,
}

/// Applies a session's NAT to a packet travelling in `dir`.
fn translate(f: &mut [u8], ip: &mut Ip, dir: Direction, key: &SessionKey, nat: Nat) {
    match dir {
        Direction::Forward => {
            if let Some((a, p)) = nat.snat {
                packet::set_addr(f, ip, false, &a.0);
                packet::set_port(f, ip, false, p);
            }
            if let Some((a, p)) = nat.dnat {
                packet::set_addr(f, ip, true, &a.0);
                packet::set_port(f, ip, true, p);
            }
        }
        Direction::Reverse => {
            if nat.snat.is_some() {
                packet::set_addr(f, ip, true, &key.src.0);
                packet::set_port(f, ip, true, key.src_port);
            }
            if nat.dnat.is_some() {
                packet::set_addr(f, ip, false, &key.dst.0);
                packet::set_port(f, ip, false, key.dst_port);
            }
        }
    }
}

fn egress_address(out: &Iface, v4: bool) -> Option<Addr> {
    out.reth
        .iter()
        .flat_map(|r| r.2.iter())
        .chain(out.addresses.iter())
        .find(|p| p.is_v4() == v4)
        .map(|p| p.addr)
}

/// The live source-NAT mapping a packet without a session is addressed
/// to, if any.
/// (TCP and UDP: an ICMP echo to the address stays the node's to answer.)
fn mapped(t: &SessionTable, key: &SessionKey) -> Option<(NatBinding, Mapping)> {
    if key.proto != proto::UDP && key.proto != proto::TCP {
        return None;
    }
    let b = NatBinding {
        addr: key.dst,
        port: key.dst_port,
        proto: key.proto,
    };
    t.nat_mapping(&b).map(|m| (b, m))
}

/// Sessions of a mapping that address-dependent filtering examines for
/// the remote's address (newest first): a bound on the work one
/// unsolicited packet can cause. A remote the endpoint talked to only
/// before its last 64 sessions is refused (`nat-filtered`).
const FILTER_WALK: usize = 64;

/// Ports a hairpinned session's source may be translated to (the client's
/// own port kept when free).
const HAIRPIN_PORTS: std::ops::RangeInclusive<u16> = 1024..=65535;

/// The tag of TCP windows learned now for a session whose owner RG has
/// `role` (its current epoch; see [`TcpTrack`]).
fn tcp_tag(role: Option<&tandem_proto::RgRole>) -> u16 {
    TcpTrack::tag_of(role.map_or(0, |r| r.epoch.0))
}

/// The drop reason of a segment the tracker refused.
fn tcp_drop(why: tcp::Invalid) -> DropReason {
    match why {
        tcp::Invalid::OutOfWindow => DropReason::TcpOutOfWindow,
        tcp::Invalid::RstOutOfWindow => DropReason::TcpRstOutOfWindow,
        tcp::Invalid::BadFlags => DropReason::TcpBadFlags,
        tcp::Invalid::SynAckMismatch => DropReason::TcpSynAckMismatch,
    }
}

/// Source/target link-layer address option (type 1/2) of an ND message.
fn nd_link_option(f: &[u8], mut at: usize, end: usize, kind: u8) -> Option<Mac> {
    while at + 8 <= end {
        let (t, len) = (f[at], usize::from(f[at + 1]) * 8);
        if len == 0 {
            return None;
        }
        if t == kind && len >= 8 {
            return f.get(at + 2..at + 8).map(|m| m.try_into().expect("6"));
        }
        at += len;
    }
    None
}

/// An ARP frame (op 1 request, 2 reply), padded to 60 bytes.
pub fn build_arp(op: u16, sha: Mac, dst: Mac, spa: &Addr, tpa: &Addr) -> Vec<u8> {
    let mut f = vec![0u8; 60];
    packet::set_macs(&mut f, dst, sha);
    packet::put16(&mut f, 12, packet::ETHERTYPE_ARP);
    let a = &mut f[ETH_HLEN..ETH_HLEN + 28];
    a[0..8].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 0]);
    a[6..8].copy_from_slice(&op.to_be_bytes());
    a[8..14].copy_from_slice(&sha);
    a[14..18].copy_from_slice(&spa.0[12..16]);
    a[24..28].copy_from_slice(&tpa.0[12..16]);
    f
}

fn ipv6_header(f: &mut [u8], src: &Addr, dst: &Addr, payload: usize) {
    let h = &mut f[ETH_HLEN..ETH_HLEN + 40];
    h[0] = 0x60;
    h[1..4].fill(0);
    h[4..6].copy_from_slice(&(payload as u16).to_be_bytes());
    h[6] = proto::ICMPV6;
    h[7] = 255;
    h[8..24].copy_from_slice(&src.0);
    h[24..40].copy_from_slice(&dst.0);
}

fn icmp6_checksum(f: &mut [u8], len: usize) {
    let ip = packet::parse_ipv6(&f[..len], ETH_HLEN).expect("built above");
    let c = packet::l4_checksum(&f[..len], &ip, ip.l4 + 2);
    packet::put16(f, ip.l4 + 2, c);
}

/// A neighbor advertisement for `target` into `f` (which must hold 86
/// bytes); returns its length.
fn build_na(
    f: &mut [u8],
    mac: Mac,
    dst_mac: Mac,
    target: &Addr,
    dst: &Addr,
    solicited: bool,
) -> usize {
    let len = ETH_HLEN + 40 + 32;
    if f.len() < len {
        return 0;
    }
    packet::set_macs(f, dst_mac, mac);
    packet::put16(f, 12, packet::ETHERTYPE_IPV6);
    ipv6_header(f, target, dst, 32);
    let m = &mut f[ETH_HLEN + 40..len];
    m.fill(0);
    m[0] = 136;
    // Router (the node routes for every address it answers for, and a
    // gateway VIP must be seen as a router, RFC 4861 §4.4), override, and
    // solicited when answering.
    m[4] = if solicited { 0xe0 } else { 0xa0 };
    m[8..24].copy_from_slice(&target.0);
    m[24] = 2;
    m[25] = 1;
    m[26..32].copy_from_slice(&mac);
    icmp6_checksum(f, len);
    len
}

/// A neighbor solicitation for `target` to its solicited-node address.
fn build_ns(mac: Mac, src: &Addr, target: &Addr) -> Vec<u8> {
    let len = ETH_HLEN + 40 + 32;
    let mut f = vec![0u8; len];
    let t = target.0;
    let snm = Addr([
        0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, t[13], t[14], t[15],
    ]);
    packet::set_macs(&mut f, [0x33, 0x33, 0xff, t[13], t[14], t[15]], mac);
    packet::put16(&mut f, 12, packet::ETHERTYPE_IPV6);
    ipv6_header(&mut f, src, &snm, 32);
    let m = &mut f[ETH_HLEN + 40..len];
    m[0] = 135;
    m[8..24].copy_from_slice(&t);
    m[24] = 1;
    m[25] = 1;
    m[26..32].copy_from_slice(&mac);
    icmp6_checksum(&mut f, len);
    f
}

/// The IP header of a frame whose ethertype is IPv4 or IPv6.
/// A first fragment must carry the transport header the session keys on
/// and the flags it tracks (TCP: all 20 bytes; UDP, ICMP: 8).
fn whole_transport_header(ip: &Ip) -> bool {
    let need = match ip.proto {
        proto::TCP => 20,
        proto::UDP | proto::ICMP | proto::ICMPV6 => 8,
        _ => 0,
    };
    ip.l4 + need <= ip.end
}

fn parse_ip(f: &[u8], ethertype: u16) -> Result<Ip, ParseError> {
    if ethertype == packet::ETHERTYPE_IPV4 {
        packet::parse_ipv4(f, ETH_HLEN)
    } else {
        packet::parse_ipv6(f, ETH_HLEN)
    }
}

/// A packet's session key: as it arrived, in its ingress zone.
fn packet_key(ip: &Ip, (src_port, dst_port): (u16, u16), ingress: &Iface) -> SessionKey {
    SessionKey {
        src: Addr(ip.src),
        dst: Addr(ip.dst),
        src_port,
        dst_port,
        proto: ip.proto,
        zone: ingress.zone,
    }
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
