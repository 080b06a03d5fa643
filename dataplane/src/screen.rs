//! Screens: per-zone defences applied to what arrives from a zone before it
//! can create a session (the SRX feature of that name).
//!
//! * **Packet screens** drop, on every packet from the zone, what no
//!   endpoint sends: land (source address = destination address), SYN+FIN,
//!   TCP without flags, ICMP fragments, ICMP larger than a bound. A few
//!   compares per packet; teardrop (overlapping fragments) is refused for
//!   every zone by [`crate::frag`].
//! * **Flood screens** meter session-creating packets only (a session miss
//!   that would create one), so established traffic is never counted or
//!   refused: SYNs per destination address:port (above the attack
//!   threshold its SYNs are answered with SYN cookies, see below) and per
//!   source address (above the source threshold dropped); new UDP and ICMP
//!   sessions per destination address (above the threshold dropped).
//!   Rates are counted in one-second windows in a count-min sketch keyed
//!   by a secret hash ([`RateMeter`]): fixed memory whatever the number of
//!   addresses, shared by the workers; a collision can only overestimate.
//! * **Session limits** per source and per destination address count the
//!   live sessions of the whole table (the table keeps the counts,
//!   [`crate::session::AddressCounts`]); above the limit a new session from
//!   the zone is refused.
//!
//! **SYN cookies, then a SYN proxy.** Above the attack threshold a SYN is
//! answered by the firewall itself with a SYN-ACK whose sequence number is
//! a cookie (a keyed hash of the 4-tuple, the client's ISN and a 16 s time
//! slot, with the client's MSS in its low 3 bits): no session and no state
//! exist until the client's ACK proves the handshake with it. Only then is
//! the session created; the firewall opens the connection to the server
//! with the client's ISN and the cookie's MSS, completes the server's
//! handshake itself, and translates the server's sequence numbers (and the
//! client's acknowledgements) by the difference between the server's ISN
//! and the cookie for the rest of the connection; the difference is synced
//! with the session, so a proxied connection survives a failover. Cookies
//! rather than a stateful proxy: a flood of spoofed SYNs then costs no
//! table entry and nothing crosses the control link, which is what the
//! screen exists for. The price (as for Linux syncookies without
//! timestamps): the cookie handshake negotiates MSS only — no window
//! scaling, SACK or timestamps — for connections opened while the
//! destination is under attack; and a client segment that arrives while
//! the server's handshake is still running is dropped (counted) and
//! retransmitted by the client.

use crate::config::Prefix;
use crate::packet::{self, Family, Ip};
use crate::session::{Addr, Millis, SessionKey, ZoneId, proto};
use serde::{Deserialize, Serialize};
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// One screen profile (`[[dataplane.screen]]`), attached to an ingress
/// zone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScreenConfig {
    pub name: String,
    /// The zone whose arriving packets it screens.
    pub zone: String,
    #[serde(default)]
    pub land: bool,
    #[serde(default)]
    pub syn_fin: bool,
    #[serde(default)]
    pub tcp_no_flag: bool,
    #[serde(default)]
    pub icmp_fragment: bool,
    /// ICMP packets longer than this many IP bytes are dropped.
    #[serde(default)]
    pub icmp_large: Option<u16>,
    #[serde(default)]
    pub syn_flood: Option<SynFloodConfig>,
    /// New UDP sessions per second to one destination address.
    #[serde(default)]
    pub udp_flood: Option<u32>,
    /// New ICMP sessions (echo requests) per second to one destination.
    #[serde(default)]
    pub icmp_flood: Option<u32>,
    /// Live sessions per source address (all zones' sessions counted).
    #[serde(default)]
    pub source_session_limit: Option<u32>,
    /// Live sessions per (pre-NAT) destination address.
    #[serde(default)]
    pub destination_session_limit: Option<u32>,
    /// Addresses the flood screens and session limits never apply to
    /// (monitoring, the operator's own hosts).
    #[serde(default)]
    pub exempt: Vec<Prefix>,
}

impl ScreenConfig {
    /// A profile for `zone` with every screen off.
    pub fn off(name: &str, zone: &str) -> ScreenConfig {
        ScreenConfig {
            name: name.into(),
            zone: zone.into(),
            land: false,
            syn_fin: false,
            tcp_no_flag: false,
            icmp_fragment: false,
            icmp_large: None,
            syn_flood: None,
            udp_flood: None,
            icmp_flood: None,
            source_session_limit: None,
            destination_session_limit: None,
            exempt: vec![],
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SynFloodConfig {
    /// SYNs per second to one destination address and port above which
    /// its SYNs are answered with cookies (0: always).
    pub attack_threshold: u32,
    /// SYNs per second from one source address above which its SYNs are
    /// dropped.
    #[serde(default)]
    pub source_threshold: Option<u32>,
}

/// What a screen refused (or answered, for a cookie), with a counter each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScreenKind {
    Land = 0,
    SynFin = 1,
    TcpNoFlag = 2,
    IcmpFragment = 3,
    IcmpLarge = 4,
    SynFloodSource = 5,
    UdpFlood = 6,
    IcmpFlood = 7,
    SourceSessionLimit = 8,
    DestinationSessionLimit = 9,
}

impl ScreenKind {
    pub const ALL: [ScreenKind; 10] = [
        ScreenKind::Land,
        ScreenKind::SynFin,
        ScreenKind::TcpNoFlag,
        ScreenKind::IcmpFragment,
        ScreenKind::IcmpLarge,
        ScreenKind::SynFloodSource,
        ScreenKind::UdpFlood,
        ScreenKind::IcmpFlood,
        ScreenKind::SourceSessionLimit,
        ScreenKind::DestinationSessionLimit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ScreenKind::Land => "land",
            ScreenKind::SynFin => "syn-fin",
            ScreenKind::TcpNoFlag => "tcp-no-flag",
            ScreenKind::IcmpFragment => "icmp-fragment",
            ScreenKind::IcmpLarge => "icmp-large",
            ScreenKind::SynFloodSource => "syn-flood-source",
            ScreenKind::UdpFlood => "udp-flood",
            ScreenKind::IcmpFlood => "icmp-flood",
            ScreenKind::SourceSessionLimit => "source-session-limit",
            ScreenKind::DestinationSessionLimit => "destination-session-limit",
        }
    }

    /// The Junos screen message it corresponds to.
    pub fn msgid(self) -> &'static str {
        match self {
            ScreenKind::Land
            | ScreenKind::SynFin
            | ScreenKind::TcpNoFlag
            | ScreenKind::SynFloodSource => "RT_SCREEN_TCP",
            ScreenKind::UdpFlood => "RT_SCREEN_UDP",
            ScreenKind::IcmpFragment | ScreenKind::IcmpLarge | ScreenKind::IcmpFlood => {
                "RT_SCREEN_ICMP"
            }
            ScreenKind::SourceSessionLimit | ScreenKind::DestinationSessionLimit => {
                "RT_SCREEN_SESSION_LIMIT"
            }
        }
    }
}

/// A screen's counters, shared by the workers (written only under attack:
/// the packets they count are refused or answered).
#[derive(Debug, Default)]
pub struct ScreenStats {
    pub dropped: [AtomicU64; ScreenKind::ALL.len()],
    /// SYNs answered with a cookie, ACKs whose cookie was valid (each
    /// opened a proxied session) and ACK misses whose cookie was not.
    pub cookies_sent: AtomicU64,
    pub cookies_valid: AtomicU64,
    pub cookies_invalid: AtomicU64,
    /// Proxied handshakes the server completed, refused (RST) and client
    /// segments dropped while the server's handshake ran.
    pub proxy_established: AtomicU64,
    pub proxy_refused: AtomicU64,
    pub proxy_early_segments: AtomicU64,
}

impl ScreenStats {
    pub fn count(&self, k: ScreenKind) {
        self.dropped[k as usize].fetch_add(1, Relaxed);
    }

    pub fn dropped(&self, k: ScreenKind) -> u64 {
        self.dropped[k as usize].load(Relaxed)
    }

    /// Every counter by name (statistics, metrics).
    pub fn named(&self) -> Vec<(&'static str, u64)> {
        let mut v: Vec<(&'static str, u64)> = ScreenKind::ALL
            .iter()
            .map(|k| (k.as_str(), self.dropped(*k)))
            .collect();
        for (name, c) in [
            ("syn-cookies-sent", &self.cookies_sent),
            ("syn-cookies-valid", &self.cookies_valid),
            ("syn-cookies-invalid", &self.cookies_invalid),
            ("syn-proxy-established", &self.proxy_established),
            ("syn-proxy-refused", &self.proxy_refused),
            ("syn-proxy-early-segments", &self.proxy_early_segments),
        ] {
            v.push((name, c.load(Relaxed)));
        }
        v
    }
}

/// Slots per row of a [`RateMeter`] (two rows).
pub const METER_SLOTS: usize = 4096;

/// Events per key per one-second window, as a count-min sketch: two rows
/// of `(second << 32) | count` slots, each key counted in one slot of each
/// row, its estimate the smaller. Fixed memory (64 KiB); a window's count
/// restarts with the first event of the next second. Collisions only
/// overestimate, and the slots are chosen by a secret hash, so a sender
/// cannot aim its flood at another key's slots.
#[derive(Debug)]
pub struct RateMeter {
    slots: Box<[AtomicU64]>,
}

impl Default for RateMeter {
    fn default() -> RateMeter {
        RateMeter {
            slots: (0..2 * METER_SLOTS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl RateMeter {
    /// Counts one event of the key hashed to `h` in second `now_s`; the
    /// estimated count in this second, this one included.
    pub fn hit(&self, h: u64, now_s: u32) -> u32 {
        let mut est = u32::MAX;
        for row in 0..2 {
            let i = row * METER_SLOTS + ((h >> (row * 32)) as usize % METER_SLOTS);
            let s = &self.slots[i];
            let v = s.load(Relaxed);
            let n = if (v >> 32) as u32 == now_s {
                (s.fetch_add(1, Relaxed) as u32).saturating_add(1)
            } else {
                match s.compare_exchange(v, u64::from(now_s) << 32 | 1, Relaxed, Relaxed) {
                    Ok(_) => 1,
                    Err(_) => (s.fetch_add(1, Relaxed) as u32).saturating_add(1),
                }
            };
            est = est.min(n);
        }
        est
    }
}

/// MSS values a cookie can carry (its low 3 bits index this table): the
/// largest not above the client's is chosen.
pub const COOKIE_MSS: [u16; 8] = [536, 1220, 1300, 1360, 1400, 1440, 1452, 1460];

/// Cookie time slots are 2^14 ms (16.4 s); the current and the previous
/// slot are accepted.
const COOKIE_SLOT_SHIFT: u32 = 14;

/// A screen's state shared by all workers: its meters, counters and the
/// secret its hashes are keyed with (per node, random at start).
#[derive(Debug, Default)]
pub struct ScreenState {
    pub syn_dst: RateMeter,
    pub syn_src: RateMeter,
    pub udp_dst: RateMeter,
    pub icmp_dst: RateMeter,
    pub stats: ScreenStats,
    secret: RandomState,
}

/// A compiled screen: the profile of one zone, and its shared state.
#[derive(Clone, Debug)]
pub struct Screen {
    pub name: String,
    pub zone: ZoneId,
    pub land: bool,
    pub syn_fin: bool,
    pub tcp_no_flag: bool,
    pub icmp_fragment: bool,
    pub icmp_large: Option<u16>,
    pub syn_attack: Option<u32>,
    pub syn_source: Option<u32>,
    pub udp_flood: Option<u32>,
    pub icmp_flood: Option<u32>,
    pub source_limit: Option<u32>,
    pub destination_limit: Option<u32>,
    pub exempt: Vec<Prefix>,
    pub state: Arc<ScreenState>,
}

impl Screen {
    /// Validates `c` for `zone`.
    pub fn compile(c: &ScreenConfig, zone: ZoneId) -> Result<Screen, String> {
        let what = format!("screen {}", c.name);
        let positive = |v: Option<u32>, field: &str| match v {
            Some(0) => Err(format!("{what}: {field} must be positive")),
            _ => Ok(()),
        };
        positive(c.udp_flood, "udp_flood")?;
        positive(c.icmp_flood, "icmp_flood")?;
        positive(c.source_session_limit, "source_session_limit")?;
        positive(c.destination_session_limit, "destination_session_limit")?;
        positive(
            c.syn_flood.as_ref().and_then(|s| s.source_threshold),
            "syn_flood.source_threshold",
        )?;
        if let Some(n) = c.icmp_large
            && n < 64
        {
            return Err(format!("{what}: icmp_large {n} is below 64 bytes"));
        }
        Ok(Screen {
            name: c.name.clone(),
            zone,
            land: c.land,
            syn_fin: c.syn_fin,
            tcp_no_flag: c.tcp_no_flag,
            icmp_fragment: c.icmp_fragment,
            icmp_large: c.icmp_large,
            syn_attack: c.syn_flood.as_ref().map(|s| s.attack_threshold),
            syn_source: c.syn_flood.as_ref().and_then(|s| s.source_threshold),
            udp_flood: c.udp_flood,
            icmp_flood: c.icmp_flood,
            source_limit: c.source_session_limit,
            destination_limit: c.destination_session_limit,
            exempt: c.exempt.clone(),
            state: Arc::default(),
        })
    }

    pub fn has_session_limits(&self) -> bool {
        self.source_limit.is_some() || self.destination_limit.is_some()
    }

    fn exempt(&self, a: &Addr) -> bool {
        self.exempt.iter().any(|p| p.contains(a))
    }

    /// The packet screens, for every packet from the zone (fragments
    /// included): what to drop it as, if anything.
    pub fn check_packet(&self, f: &[u8], ip: &Ip) -> Option<ScreenKind> {
        if self.land && ip.src == ip.dst {
            return Some(ScreenKind::Land);
        }
        let icmp = ip.proto == proto::ICMP || ip.proto == proto::ICMPV6;
        if icmp {
            if self.icmp_fragment && ip.frag.is_some() {
                return Some(ScreenKind::IcmpFragment);
            }
            if let Some(max) = self.icmp_large
                && ip.end - ip.l3 > usize::from(max)
            {
                return Some(ScreenKind::IcmpLarge);
            }
        } else if ip.proto == proto::TCP && ip.has_l4() && (self.syn_fin || self.tcp_no_flag) {
            let flags = packet::tcp_flags(f, ip);
            let syn_fin = packet::TCP_SYN | packet::TCP_FIN;
            if self.syn_fin && flags & syn_fin == syn_fin {
                return Some(ScreenKind::SynFin);
            }
            // FIN, SYN, RST, PSH, ACK, URG all clear.
            if self.tcp_no_flag && flags & 0x3f == 0 {
                return Some(ScreenKind::TcpNoFlag);
            }
        }
        None
    }

    /// The flood screens and session limits for a packet that would create
    /// a session with forward key `key` (`flags`: its TCP flags). `Ok`:
    /// go on, with whether a SYN must be answered with a cookie; `Err`:
    /// drop as that. `counts`: the table's live sessions of (source,
    /// destination), when it keeps them.
    pub fn check_new(
        &self,
        key: &SessionKey,
        counts: Option<(u32, u32)>,
        now: Millis,
    ) -> Result<bool, ScreenKind> {
        if !self.exempt.is_empty() && (self.exempt(&key.src) || self.exempt(&key.dst)) {
            return Ok(false);
        }
        let s = &*self.state;
        let now_s = (now.0 / 1000) as u32;
        let over = |m: &RateMeter, limit: Option<u32>, h: &dyn Fn() -> u64| {
            limit.is_some_and(|l| m.hit(h(), now_s) > l)
        };
        let mut cookie = false;
        match key.proto {
            proto::TCP => {
                if over(&s.syn_src, self.syn_source, &|| s.secret.hash_one(key.src)) {
                    return Err(ScreenKind::SynFloodSource);
                }
                cookie = match self.syn_attack {
                    Some(0) => true,
                    Some(l) => {
                        let h = s.secret.hash_one((key.dst, key.dst_port));
                        s.syn_dst.hit(h, now_s) > l
                    }
                    None => false,
                };
            }
            proto::UDP if over(&s.udp_dst, self.udp_flood, &|| s.secret.hash_one(key.dst)) => {
                return Err(ScreenKind::UdpFlood);
            }
            proto::ICMP | proto::ICMPV6
                if over(&s.icmp_dst, self.icmp_flood, &|| s.secret.hash_one(key.dst)) =>
            {
                return Err(ScreenKind::IcmpFlood);
            }
            _ => {}
        }
        if let Some((src, dst)) = counts {
            if self.source_limit.is_some_and(|l| src >= l) {
                return Err(ScreenKind::SourceSessionLimit);
            }
            if self.destination_limit.is_some_and(|l| dst >= l) {
                return Err(ScreenKind::DestinationSessionLimit);
            }
        }
        Ok(cookie)
    }

    fn cookie_hash(&self, key: &SessionKey, client_isn: u32, slot: u64) -> u32 {
        let t = (
            key.src,
            key.dst,
            key.src_port,
            key.dst_port,
            client_isn,
            slot,
        );
        self.state.secret.hash_one(t) as u32 & !7
    }

    /// The cookie (our ISN) answering the SYN of `key` with `client_isn`
    /// and MSS option `mss` (`None`: absent, 536 assumed).
    pub fn cookie(&self, key: &SessionKey, client_isn: u32, mss: Option<u16>, now: Millis) -> u32 {
        let mss = mss.unwrap_or(536);
        let idx = COOKIE_MSS.iter().rposition(|m| *m <= mss).unwrap_or(0);
        self.cookie_hash(key, client_isn, now.0 >> COOKIE_SLOT_SHIFT) | idx as u32
    }

    /// Whether `cookie` is one this screen gave the SYN of `key` with
    /// `client_isn` in the current or the previous time slot; the MSS it
    /// carries if so.
    pub fn check_cookie(
        &self,
        key: &SessionKey,
        client_isn: u32,
        cookie: u32,
        now: Millis,
    ) -> Option<u16> {
        let slot = now.0 >> COOKIE_SLOT_SHIFT;
        [slot, slot.wrapping_sub(1)]
            .into_iter()
            .any(|s| self.cookie_hash(key, client_isn, s) == cookie & !7)
            .then(|| COOKIE_MSS[(cookie & 7) as usize])
    }
}

/// The MSS option of the SYN at `l4` (segment ending at `end`), if any.
pub fn syn_mss(f: &[u8], l4: usize, end: usize) -> Option<u16> {
    let doff = usize::from(*f.get(l4 + 12)? >> 4) * 4;
    if doff < 20 || l4 + doff > end {
        return None;
    }
    let opts = &f[l4 + 20..l4 + doff];
    crate::tcp::Options::new(opts)
        .find(|(kind, data)| *kind == 2 && data.len() == 2)
        .map(|(_, d)| u16::from_be_bytes([opts[d.start], opts[d.start + 1]]))
}

/// The family's default MSS when a SYN carries none.
pub fn default_mss(family: Family) -> u16 {
    match family {
        Family::V4 => 536,
        Family::V6 => 1220,
    }
}

#[cfg(test)]
#[path = "screen_tests.rs"]
mod tests;
