//! What the dataplane forwards by: interfaces and zones, reths, policies,
//! NAT rules and static routes. The daemon deserializes these from its TOML
//! config; `Compiled` is the lookup form the packet core reads.

use crate::packet::Mac;
use crate::screen::{Screen, ScreenConfig};
use crate::session::{Addr, InterfaceId, PolicyId, SessionKey, ZoneId};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use tandem_proto::RgId;

/// An address with a prefix length ("10.1.0.1/24", "2001:db8::1/64").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Prefix {
    pub addr: Addr,
    /// Length in the address's own family (0..=32 for IPv4).
    pub len: u8,
}

impl Prefix {
    pub fn is_v4(&self) -> bool {
        self.addr.is_v4()
    }

    /// Length in the 128-bit (mapped) space.
    fn len128(&self) -> u32 {
        u32::from(self.len) + if self.is_v4() { 96 } else { 0 }
    }

    pub fn contains(&self, a: &Addr) -> bool {
        if a.is_v4() != self.is_v4() {
            return false;
        }
        let bits = self.len128();
        let (x, y) = (u128::from_be_bytes(self.addr.0), u128::from_be_bytes(a.0));
        bits == 0 || (x ^ y) >> (128 - bits) == 0
    }

    pub fn host(addr: Addr) -> Prefix {
        Prefix {
            addr,
            len: if addr.is_v4() { 32 } else { 128 },
        }
    }
}

impl FromStr for Prefix {
    type Err = String;
    fn from_str(s: &str) -> Result<Prefix, String> {
        let (a, l) = s.split_once('/').unwrap_or((s, ""));
        let ip: IpAddr = a
            .parse()
            .map_err(|_| format!("{a:?} is not an IP address"))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let len = if l.is_empty() {
            max
        } else {
            l.parse::<u8>()
                .map_err(|_| format!("bad prefix length {l:?}"))?
        };
        if len > max {
            return Err(format!("prefix length {len} exceeds {max}"));
        }
        Ok(Prefix {
            addr: ip.into(),
            len,
        })
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl Serialize for Prefix {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Prefix {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Prefix, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

pub fn parse_mac(s: &str) -> Result<Mac, String> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(format!("{s:?} is not a MAC address"));
    }
    let mut m = [0u8; 6];
    for (b, p) in m.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16).map_err(|_| format!("{s:?} is not a MAC address"))?;
    }
    Ok(m)
}

pub fn format_mac(m: &Mac) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A redundant interface: one member port per node, addresses and a
/// virtual MAC owned by whichever node is primary for the RG.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RethConfig {
    pub rg: u16,
    /// Shared by both nodes; only the primary sends and answers with it.
    pub vmac: String,
    pub vips: Vec<Prefix>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceConfig {
    /// Logical name (`reth1`, `ge-0/0/1`), shown in the CLI.
    pub name: String,
    /// The Linux interface this node forwards on (the reth member here).
    pub device: String,
    pub zone: String,
    /// Addresses this node owns on the interface (not failed over).
    #[serde(default)]
    pub addresses: Vec<Prefix>,
    #[serde(default)]
    pub reth: Option<RethConfig>,
    /// Largest IP packet sent on the interface (default 1500). A larger
    /// packet is answered with fragmentation needed (IPv4 with DF) or
    /// packet too big (IPv6).
    #[serde(default)]
    pub mtu: Option<u16>,
    /// 802.1Q unit: frames of this VLAN id on `device` are this logical
    /// interface (its own zone, addresses, VIPs and RG), and frames it
    /// sends carry the tag. Without it: the device's untagged frames.
    #[serde(default)]
    pub vlan: Option<u16>,
    /// TCP MSS clamp: SYNs and SYN-ACKs entering or leaving the interface
    /// carry an MSS option of at most this (IPv4; IPv6 gets 20 less, its
    /// header being 20 bytes longer). For links with a smaller MTU
    /// behind them (PPPoE 1452, tunnels).
    #[serde(default)]
    pub tcp_mss: Option<u16>,
}

/// Default interface MTU.
pub const DEFAULT_MTU: u16 = 1500;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyAction {
    Permit,
    Deny,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyConfig {
    pub name: String,
    pub from_zone: String,
    pub to_zone: String,
    #[serde(default)]
    pub source: Vec<Prefix>,
    #[serde(default)]
    pub destination: Vec<Prefix>,
    /// "tcp", "udp", "icmp", "icmp6" or empty for any.
    #[serde(default)]
    pub protocol: Option<String>,
    /// Destination ports "80" or "8000-8080"; empty for any.
    #[serde(default)]
    pub ports: Vec<String>,
    pub action: PolicyAction,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnatRule {
    pub name: String,
    pub from_zone: String,
    pub to_zone: String,
    #[serde(default)]
    pub source: Vec<Prefix>,
    /// Translate to this address; absent: the egress interface's address
    /// (its reth VIP of the same family, else its first address).
    #[serde(default)]
    pub pool: Option<Prefix>,
    #[serde(default = "default_port_low")]
    pub port_low: u16,
    #[serde(default = "default_port_high")]
    pub port_high: u16,
    /// Which unsolicited UDP from outside reaches a mapping (RFC 4787
    /// REQ-8); mappings themselves are always endpoint-independent.
    #[serde(default)]
    pub filtering: NatFiltering,
}

/// Filtering of a source-NAT rule's mappings: which packets from outside,
/// arriving at a mapped public address:port without a session, are let in
/// to the internal endpoint (RFC 4787 section 5).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NatFiltering {
    /// From any remote endpoint ("full cone").
    EndpointIndependent,
    /// From a remote address the internal endpoint has a session with.
    AddressDependent,
    /// Only replies of an existing session (nothing unsolicited).
    #[default]
    AddressAndPortDependent,
}

fn default_port_low() -> u16 {
    1024
}
fn default_port_high() -> u16 {
    65535
}

/// Static destination NAT (a port forward).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnatRule {
    pub name: String,
    pub from_zone: String,
    /// The public address and port clients connect to.
    pub destination: Prefix,
    pub protocol: String,
    pub port: u16,
    /// Where it goes.
    pub to_address: Prefix,
    pub to_port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteConfig {
    pub destination: Prefix,
    pub gateway: Prefix,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataplaneConfig {
    pub interfaces: Vec<InterfaceConfig>,
    #[serde(default)]
    pub policies: Vec<PolicyConfig>,
    #[serde(default)]
    pub snat: Vec<SnatRule>,
    #[serde(default)]
    pub dnat: Vec<DnatRule>,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Dataplane worker threads (default: one per RX queue of the busiest
    /// port, capped by the CPUs). Each serves its share of every port's RX
    /// queues.
    #[serde(default)]
    pub workers: Option<usize>,
    /// ICMP messages the node sends (errors and echo replies), per second,
    /// and the burst above it (a token bucket shared by the workers).
    #[serde(default)]
    pub icmp_rate: Option<u32>,
    #[serde(default)]
    pub icmp_burst: Option<u32>,
    /// Gratuitous ARPs / unsolicited NAs sent for each VIP on becoming
    /// primary for an RG, and the interval between them (switches that
    /// missed the first, a peer's stale announcement racing it).
    #[serde(default)]
    pub garp_count: Option<u32>,
    #[serde(default)]
    pub garp_interval_ms: Option<u64>,
    /// Port mirrors: frames received on an interface's port, sampled, sent
    /// as received out of another port.
    #[serde(default)]
    pub mirror: Vec<MirrorConfig>,
    /// Screen profiles, one per ingress zone at most ([`crate::screen`]).
    #[serde(default)]
    pub screen: Vec<ScreenConfig>,
}

/// One port mirror (`[[dataplane.mirror]]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorConfig {
    pub name: String,
    /// Frames received on this interface's port are mirrored (before any
    /// rewriting, 802.1Q tags included).
    pub interface: String,
    /// 1 in `rate` frames (1: every frame).
    #[serde(default = "default_mirror_rate")]
    pub rate: u32,
    /// Where copies go (any dataplane interface; a VLAN unit tags them).
    pub output: String,
}

fn default_mirror_rate() -> u32 {
    1
}

/// A compiled mirror: the port whose received frames are sampled, one in
/// `every`, and the interface copies leave by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mirror {
    pub from_port: InterfaceId,
    pub every: u32,
    pub to: InterfaceId,
}

/// Port mirrors by interface name; an output that is also a mirrored
/// port would mirror its own copies (and loop): refused.
fn compile_mirrors(cfg: &[MirrorConfig], ifaces: &[Iface]) -> Result<Vec<Mirror>, String> {
    let named = |what: &str, name: &str| {
        ifaces
            .iter()
            .find(|i| i.name == name)
            .ok_or_else(|| format!("{what}: no interface named {name}"))
    };
    let mut out = Vec::new();
    for m in cfg {
        let what = format!("mirror {}", m.name);
        if m.rate == 0 {
            return Err(format!("{what}: rate must be at least 1 (1 in N frames)"));
        }
        out.push(Mirror {
            from_port: named(&what, &m.interface)?.port,
            every: m.rate,
            to: named(&what, &m.output)?.id,
        });
    }
    for (m, c) in out.iter().zip(cfg) {
        let to_port = ifaces.iter().find(|i| i.id == m.to).map(|i| i.port);
        if out.iter().any(|o| Some(o.from_port) == to_port) {
            return Err(format!(
                "mirror {}: output {} is also a mirrored input (its copies would be mirrored again)",
                c.name, c.output
            ));
        }
    }
    Ok(out)
}

/// Default ICMP rate limit: messages per second and burst (as Linux's
/// `icmp_msgs_per_sec` / `icmp_msgs_burst`).
pub const DEFAULT_ICMP_RATE: u32 = 1000;
pub const DEFAULT_ICMP_BURST: u32 = 50;

/// Default announcements on promotion: 4, a second apart (as SRX's
/// `gratuitous-arp-count`); at most [`MAX_GARP_COUNT`].
pub const DEFAULT_GARP_COUNT: u32 = 4;
pub const DEFAULT_GARP_INTERVAL_MS: u64 = 1000;
pub const MAX_GARP_COUNT: u32 = 16;

/// Most dataplane workers a configuration may ask for.
pub const MAX_WORKERS: usize = 64;

// ----- compiled form ---------------------------------------------------------

pub fn proto_number(name: &str) -> Result<u8, String> {
    match name {
        "tcp" => Ok(6),
        "udp" => Ok(17),
        "icmp" => Ok(1),
        "icmp6" | "ipv6-icmp" => Ok(58),
        n => n.parse().map_err(|_| format!("unknown protocol {n:?}")),
    }
}

fn parse_ports(p: &str) -> Result<(u16, u16), String> {
    let (a, b) = p.split_once('-').unwrap_or((p, p));
    let lo: u16 = a.trim().parse().map_err(|_| format!("bad port {p:?}"))?;
    let hi: u16 = b.trim().parse().map_err(|_| format!("bad port {p:?}"))?;
    if lo > hi {
        return Err(format!("port range {p:?} is reversed"));
    }
    Ok((lo, hi))
}

#[derive(Clone, Debug)]
pub struct Iface {
    pub id: InterfaceId,
    pub name: String,
    pub device: String,
    pub zone: ZoneId,
    /// This node's MAC on the device (filled in by the I/O shell).
    pub mac: Mac,
    pub addresses: Vec<Prefix>,
    pub reth: Option<(RgId, Mac, Vec<Prefix>)>,
    pub mtu: u16,
    /// The 802.1Q tag of this unit (none: untagged).
    pub vlan: Option<u16>,
    /// MSS clamp for IPv4 (see [`InterfaceConfig::tcp_mss`]).
    pub tcp_mss: Option<u16>,
    /// The interface that stands for the device as a dataplane port: the
    /// first unit configured on it (itself for untagged-only devices).
    pub port: InterfaceId,
}

impl Iface {
    pub fn rg(&self) -> Option<RgId> {
        self.reth.as_ref().map(|r| r.0)
    }

    /// The source MAC frames leave with: the reth's virtual MAC, else the
    /// port's own.
    pub fn tx_mac(&self) -> Mac {
        self.reth.as_ref().map_or(self.mac, |r| r.1)
    }

    /// Every prefix configured on the interface (node and virtual).
    pub fn prefixes(&self) -> impl Iterator<Item = &Prefix> {
        self.addresses
            .iter()
            .chain(self.reth.iter().flat_map(|r| r.2.iter()))
    }
}

#[derive(Clone, Debug)]
pub struct Policy {
    pub id: PolicyId,
    pub name: String,
    pub from: ZoneId,
    pub to: ZoneId,
    pub source: Vec<Prefix>,
    pub destination: Vec<Prefix>,
    pub proto: Option<u8>,
    pub ports: Vec<(u16, u16)>,
    pub permit: bool,
}

impl Policy {
    pub fn matches(&self, src: &Addr, dst: &Addr, proto: u8, dport: u16) -> bool {
        (self.source.is_empty() || self.source.iter().any(|p| p.contains(src)))
            && (self.destination.is_empty() || self.destination.iter().any(|p| p.contains(dst)))
            && self.proto.is_none_or(|p| p == proto)
            && (self.ports.is_empty()
                || self
                    .ports
                    .iter()
                    .any(|&(lo, hi)| (lo..=hi).contains(&dport)))
    }
}

#[derive(Clone, Debug)]
pub struct Snat {
    pub from: ZoneId,
    pub to: ZoneId,
    pub source: Vec<Prefix>,
    pub pool: Option<Addr>,
    pub ports: (u16, u16),
    pub filtering: NatFiltering,
}

#[derive(Clone, Debug)]
pub struct Dnat {
    pub from: ZoneId,
    pub addr: Addr,
    pub proto: u8,
    pub port: u16,
    pub to: Addr,
    pub to_port: u16,
}

impl Dnat {
    /// `key` is addressed to this port forward's public address and port.
    pub fn matches(&self, key: &SessionKey) -> bool {
        self.addr == key.dst && self.proto == key.proto && self.port == key.dst_port
    }
}

#[derive(Clone, Debug)]
pub struct Route {
    pub dest: Prefix,
    /// None: directly connected.
    pub gateway: Option<Addr>,
    pub iface: InterfaceId,
}

/// The lookup form of a `DataplaneConfig`.
#[derive(Clone, Debug, Default)]
pub struct Compiled {
    pub ifaces: Vec<Iface>,
    pub zones: Vec<String>,
    pub policies: Vec<Policy>,
    pub snat: Vec<Snat>,
    pub dnat: Vec<Dnat>,
    /// Longest prefix first.
    pub routes: Vec<Route>,
    /// ICMP the node sends: per second, and burst.
    pub icmp_rate: u32,
    pub icmp_burst: u32,
    pub garp_count: u32,
    pub garp_interval_ms: u64,
    pub mirrors: Vec<Mirror>,
    /// Screens by ingress zone (index = zone id - 1).
    pub screens: Vec<Option<Screen>>,
}

impl Compiled {
    pub fn new(cfg: &DataplaneConfig) -> Result<Compiled, String> {
        if let Some(w) = cfg.workers
            && !(1..=MAX_WORKERS).contains(&w)
        {
            return Err(format!("workers: {w} is not in 1..={MAX_WORKERS}"));
        }
        for (i, c) in cfg.interfaces.iter().enumerate() {
            if let Some(v) = c.vlan
                && !(1..=4094).contains(&v)
            {
                return Err(format!("interface {}: vlan {v} is not in 1..=4094", c.name));
            }
            if let Some(other) = cfg.interfaces[..i]
                .iter()
                .find(|o| o.device == c.device && o.vlan == c.vlan)
            {
                return Err(format!(
                    "interface {}: device {} {} is interface {} already",
                    c.name,
                    c.device,
                    c.vlan.map_or("untagged".into(), |v| format!("vlan {v}")),
                    other.name
                ));
            }
            if let Some(m) = c.tcp_mss
                && !(536..=8960).contains(&m)
            {
                return Err(format!(
                    "interface {}: tcp_mss {m} is not in 536..=8960",
                    c.name
                ));
            }
            if let Some(m) = c.mtu
                && !(1280..=9000).contains(&m)
            {
                return Err(format!(
                    "interface {}: mtu {m} is not in 1280..=9000",
                    c.name
                ));
            }
        }
        if cfg.icmp_rate == Some(0) || cfg.icmp_burst == Some(0) {
            return Err("icmp_rate and icmp_burst must be positive".into());
        }
        if let Some(n) = cfg.garp_count
            && !(1..=MAX_GARP_COUNT).contains(&n)
        {
            return Err(format!("garp_count: {n} is not in 1..={MAX_GARP_COUNT}"));
        }
        if let Some(ms) = cfg.garp_interval_ms
            && !(100..=60_000).contains(&ms)
        {
            return Err(format!("garp_interval_ms: {ms} is not in 100..=60000"));
        }
        let mut zones: Vec<String> = Vec::new();
        let mut zone = |name: &str| -> ZoneId {
            let i = zones.iter().position(|z| z == name).unwrap_or_else(|| {
                zones.push(name.to_string());
                zones.len() - 1
            });
            ZoneId(i as u16 + 1)
        };
        let mut ifaces = Vec::new();
        for (i, c) in cfg.interfaces.iter().enumerate() {
            let reth = match &c.reth {
                None => None,
                Some(r) => {
                    if r.rg == 0 {
                        return Err(format!(
                            "interface {}: reth redundancy-group must be 1 or more",
                            c.name
                        ));
                    }
                    let vmac = parse_mac(&r.vmac)
                        .map_err(|e| format!("interface {}: vmac: {e}", c.name))?;
                    Some((RgId(r.rg), vmac, r.vips.clone()))
                }
            };
            let port = cfg
                .interfaces
                .iter()
                .position(|o| o.device == c.device)
                .expect("itself");
            ifaces.push(Iface {
                id: InterfaceId(i as u16),
                name: c.name.clone(),
                device: c.device.clone(),
                zone: zone(&c.zone),
                mac: [0; 6],
                addresses: c.addresses.clone(),
                reth,
                mtu: c.mtu.unwrap_or(DEFAULT_MTU),
                vlan: c.vlan,
                tcp_mss: c.tcp_mss,
                port: InterfaceId(port as u16),
            });
        }
        let known_zone = |z: &str, what: &str, zones: &[String]| -> Result<ZoneId, String> {
            zones
                .iter()
                .position(|n| n == z)
                .map(|i| ZoneId(i as u16 + 1))
                .ok_or_else(|| format!("{what}: zone {z:?} has no interface"))
        };
        let mut policies = Vec::new();
        for (i, p) in cfg.policies.iter().enumerate() {
            let what = format!("policy {}", p.name);
            policies.push(Policy {
                id: PolicyId(i as u32 + 1),
                name: p.name.clone(),
                from: known_zone(&p.from_zone, &what, &zones)?,
                to: known_zone(&p.to_zone, &what, &zones)?,
                source: p.source.clone(),
                destination: p.destination.clone(),
                proto: p
                    .protocol
                    .as_deref()
                    .map(proto_number)
                    .transpose()
                    .map_err(|e| format!("{what}: {e}"))?,
                ports: p
                    .ports
                    .iter()
                    .map(|s| parse_ports(s))
                    .collect::<Result<_, _>>()
                    .map_err(|e| format!("{what}: {e}"))?,
                permit: p.action == PolicyAction::Permit,
            });
        }
        let mut snat = Vec::new();
        for r in &cfg.snat {
            let what = format!("snat rule {}", r.name);
            if r.port_low > r.port_high || r.port_low == 0 {
                return Err(format!(
                    "{what}: port range {}-{} is invalid",
                    r.port_low, r.port_high
                ));
            }
            snat.push(Snat {
                from: known_zone(&r.from_zone, &what, &zones)?,
                to: known_zone(&r.to_zone, &what, &zones)?,
                source: r.source.clone(),
                pool: r.pool.map(|p| p.addr),
                ports: (r.port_low, r.port_high),
                filtering: r.filtering,
            });
        }
        let mut dnat = Vec::new();
        for r in &cfg.dnat {
            let what = format!("dnat rule {}", r.name);
            if r.destination.is_v4() != r.to_address.is_v4() {
                return Err(format!(
                    "{what}: destination and to-address are of different families"
                ));
            }
            dnat.push(Dnat {
                from: known_zone(&r.from_zone, &what, &zones)?,
                addr: r.destination.addr,
                proto: proto_number(&r.protocol).map_err(|e| format!("{what}: {e}"))?,
                port: r.port,
                to: r.to_address.addr,
                to_port: r.to_port,
            });
        }
        let mut routes = Vec::new();
        for ifc in &ifaces {
            for p in ifc.prefixes() {
                let net = Prefix {
                    addr: network(p),
                    len: p.len,
                };
                routes.push(Route {
                    dest: net,
                    gateway: None,
                    iface: ifc.id,
                });
            }
        }
        for r in &cfg.routes {
            let gw = r.gateway.addr;
            let via = routes
                .iter()
                .filter(|rt| rt.gateway.is_none() && rt.dest.contains(&gw))
                .max_by_key(|rt| rt.dest.len)
                .map(|rt| rt.iface)
                .ok_or_else(|| {
                    format!(
                        "route {}: gateway {gw} is not on a connected subnet",
                        r.destination
                    )
                })?;
            routes.push(Route {
                dest: Prefix {
                    addr: network(&r.destination),
                    len: r.destination.len,
                },
                gateway: Some(gw),
                iface: via,
            });
        }
        routes.sort_by_key(|r| std::cmp::Reverse(r.dest.len128()));
        let mirrors = compile_mirrors(&cfg.mirror, &ifaces)?;
        let mut screens: Vec<Option<Screen>> = vec![None; zones.len()];
        for c in &cfg.screen {
            let zone = known_zone(&c.zone, &format!("screen {}", c.name), &zones)?;
            let slot = &mut screens[usize::from(zone.0) - 1];
            if let Some(other) = slot {
                return Err(format!(
                    "screen {}: zone {} has screen {} already",
                    c.name, c.zone, other.name
                ));
            }
            *slot = Some(Screen::compile(c, zone)?);
        }
        Ok(Compiled {
            mirrors,
            screens,
            ifaces,
            zones,
            policies,
            snat,
            dnat,
            routes,
            icmp_rate: cfg.icmp_rate.unwrap_or(DEFAULT_ICMP_RATE),
            icmp_burst: cfg.icmp_burst.unwrap_or(DEFAULT_ICMP_BURST),
            garp_count: cfg.garp_count.unwrap_or(DEFAULT_GARP_COUNT),
            garp_interval_ms: cfg.garp_interval_ms.unwrap_or(DEFAULT_GARP_INTERVAL_MS),
        })
    }

    /// The screen of packets arriving from zone `z`, if it has one.
    #[inline]
    pub fn screen(&self, z: ZoneId) -> Option<&Screen> {
        self.screens
            .get(usize::from(z.0).wrapping_sub(1))
            .and_then(Option::as_ref)
    }

    /// Whether any screen limits sessions per address (the table must
    /// then keep address counts).
    pub fn needs_address_counts(&self) -> bool {
        self.screens
            .iter()
            .flatten()
            .any(Screen::has_session_limits)
    }

    pub fn zone_name(&self, z: ZoneId) -> &str {
        self.zones
            .get(usize::from(z.0).wrapping_sub(1))
            .map_or("?", String::as_str)
    }

    /// One interface per device: what the dataplane opens sockets on.
    pub fn ports(&self) -> impl Iterator<Item = &Iface> {
        self.ifaces.iter().filter(|i| i.port == i.id)
    }

    /// The logical interface a frame of `port` with 802.1Q tag `vlan` (none:
    /// untagged) arrived on, if one is configured.
    pub fn unit(&self, port: InterfaceId, vlan: Option<u16>) -> Option<InterfaceId> {
        self.ifaces
            .iter()
            .find(|i| i.port == port && i.vlan == vlan)
            .map(|i| i.id)
    }

    /// Where frames of interface `id` leave: its port and tag. Ids that are
    /// not interfaces (the fabric port) are their own port, untagged.
    pub fn egress_of(&self, id: InterfaceId) -> (InterfaceId, Option<u16>) {
        self.iface(id).map_or((id, None), |i| (i.port, i.vlan))
    }

    pub fn iface(&self, id: InterfaceId) -> Option<&Iface> {
        self.ifaces.get(usize::from(id.0))
    }

    pub fn iface_by_device(&self, dev: &str) -> Option<&Iface> {
        self.ifaces.iter().find(|i| i.device == dev)
    }

    pub fn route(&self, dst: &Addr) -> Option<&Route> {
        self.routes.iter().find(|r| r.dest.contains(dst))
    }

    pub fn policy(
        &self,
        from: ZoneId,
        to: ZoneId,
        src: &Addr,
        dst: &Addr,
        proto: u8,
        dport: u16,
    ) -> Option<&Policy> {
        self.policies
            .iter()
            .find(|p| p.from == from && p.to == to && p.matches(src, dst, proto, dport))
    }
}

fn network(p: &Prefix) -> Addr {
    let bits = p.len128();
    let x = u128::from_be_bytes(p.addr.0);
    let masked = if bits == 0 {
        0
    } else {
        x & (u128::MAX << (128 - bits))
    };
    Addr(masked.to_be_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_mirror(interface: &str, rate: u32, output: &str) -> Result<Compiled, String> {
        let mut cfg = crate::testbed::sample_config();
        cfg.interfaces.push(crate::testbed::mirror_port());
        cfg.mirror.push(MirrorConfig {
            name: "tap".into(),
            interface: interface.into(),
            rate,
            output: output.into(),
        });
        Compiled::new(&cfg)
    }

    #[test]
    fn a_mirror_compiles_to_ports() {
        let c = with_mirror("reth0", 4, "mon0").unwrap();
        let id = |n: &str| c.ifaces.iter().find(|i| i.name == n).unwrap().id;
        assert_eq!(
            c.mirrors,
            vec![Mirror {
                from_port: id("reth0"),
                every: 4,
                to: id("mon0"),
            }]
        );
    }

    #[test]
    fn a_mirror_into_its_own_input_or_nowhere_is_refused_with_the_reason() {
        let e = with_mirror("reth0", 1, "reth0").unwrap_err();
        assert!(
            e.contains("mirror tap: output reth0 is also a mirrored input"),
            "{e}"
        );
        let e = with_mirror("reth0", 0, "mon0").unwrap_err();
        assert!(e.contains("mirror tap: rate must be at least 1"), "{e}");
        let e = with_mirror("reth9", 1, "mon0").unwrap_err();
        assert_eq!(e, "mirror tap: no interface named reth9");
    }

    #[test]
    fn a_screen_of_an_unknown_zone_or_a_second_one_for_a_zone_is_refused() {
        let mut cfg = crate::testbed::sample_config();
        cfg.screen.push(ScreenConfig::off("a", "dmz"));
        let e = Compiled::new(&cfg).unwrap_err();
        assert!(e.contains("screen a") && e.contains("dmz"), "{e}");
        cfg.screen = vec![
            ScreenConfig::off("a", "untrust"),
            ScreenConfig::off("b", "untrust"),
        ];
        let e = Compiled::new(&cfg).unwrap_err();
        assert!(
            e.contains("screen b: zone untrust has screen a already"),
            "{e}"
        );
        cfg.screen.pop();
        let c = Compiled::new(&cfg).unwrap();
        let untrust = c.iface_by_device("u0").unwrap().zone;
        assert_eq!(c.screen(untrust).map(|s| s.name.as_str()), Some("a"));
        assert!(c.screen(c.iface_by_device("t0").unwrap().zone).is_none());
        assert!(!c.needs_address_counts());
    }

    #[test]
    fn prefix_parse_contains_and_family() {
        let p: Prefix = "10.1.0.1/24".parse().unwrap();
        assert!(p.contains(&"10.1.0.200".parse::<std::net::Ipv4Addr>().unwrap().into()));
        assert!(!p.contains(&"10.1.1.1".parse::<std::net::Ipv4Addr>().unwrap().into()));
        let v6: Prefix = "2001:db8:1::1/64".parse().unwrap();
        assert!(
            v6.contains(
                &"2001:db8:1::99"
                    .parse::<std::net::Ipv6Addr>()
                    .unwrap()
                    .into()
            )
        );
        assert!(!v6.contains(&"10.1.0.200".parse::<std::net::Ipv4Addr>().unwrap().into()));
        assert!("10.0.0.0/33".parse::<Prefix>().is_err());
        assert!("nonsense".parse::<Prefix>().is_err());
        assert_eq!(p.to_string(), "10.1.0.1/24");
    }

    #[test]
    fn mac_parse_and_format_round_trip() {
        let m = parse_mac("02:00:5e:00:01:01").unwrap();
        assert_eq!(format_mac(&m), "02:00:5e:00:01:01");
        assert!(parse_mac("02:00:5e:00:01").is_err());
        assert!(parse_mac("zz:00:5e:00:01:01").is_err());
    }

    fn unit(name: &str, device: &str, zone: &str, vlan: Option<u16>) -> InterfaceConfig {
        InterfaceConfig {
            name: name.into(),
            device: device.into(),
            zone: zone.into(),
            addresses: vec![],
            reth: None,
            mtu: None,
            vlan,
            tcp_mss: None,
        }
    }

    #[test]
    fn vlan_units_share_a_port_and_map_tags_to_their_interface() {
        let cfg = DataplaneConfig {
            interfaces: vec![
                unit("reth0", "eth0", "trust", None),
                unit("reth1", "eth1", "untrust", None),
                unit("reth0.100", "eth0", "guest", Some(100)),
                unit("reth1.200", "eth1", "dmz", Some(200)),
            ],
            ..Default::default()
        };
        let c = Compiled::new(&cfg).unwrap();
        let ports: Vec<&str> = c.ports().map(|i| i.name.as_str()).collect();
        assert_eq!(ports, ["reth0", "reth1"], "one port per device");
        assert_eq!(c.unit(InterfaceId(0), Some(100)), Some(InterfaceId(2)));
        assert_eq!(c.unit(InterfaceId(0), None), Some(InterfaceId(0)));
        assert_eq!(c.unit(InterfaceId(0), Some(200)), None, "eth1's tag");
        assert_eq!(c.unit(InterfaceId(1), Some(200)), Some(InterfaceId(3)));
        assert_eq!(c.egress_of(InterfaceId(3)), (InterfaceId(1), Some(200)));
        assert_eq!(
            c.egress_of(InterfaceId(9)),
            (InterfaceId(9), None),
            "fabric"
        );
        // Tagged only: untagged frames have no unit.
        let cfg = DataplaneConfig {
            interfaces: vec![unit("trunk.10", "eth0", "a", Some(10))],
            ..Default::default()
        };
        let c = Compiled::new(&cfg).unwrap();
        assert_eq!(c.ports().count(), 1);
        assert_eq!(c.unit(InterfaceId(0), None), None);
    }

    #[test]
    fn bad_vlan_units_are_refused_with_their_interface() {
        for (units, want) in [
            (
                vec![unit("a", "eth0", "z", Some(0))],
                "interface a: vlan 0 is not in 1..=4094",
            ),
            (
                vec![unit("a", "eth0", "z", Some(4095))],
                "interface a: vlan 4095 is not in 1..=4094",
            ),
            (
                vec![
                    unit("a", "eth0", "z", Some(7)),
                    unit("b", "eth0", "y", Some(7)),
                ],
                "interface b: device eth0 vlan 7 is interface a already",
            ),
            (
                vec![unit("a", "eth0", "z", None), unit("b", "eth0", "y", None)],
                "interface b: device eth0 untagged is interface a already",
            ),
        ] {
            let cfg = DataplaneConfig {
                interfaces: units,
                ..Default::default()
            };
            assert_eq!(Compiled::new(&cfg).unwrap_err(), want);
        }
    }

    #[test]
    fn bad_references_are_reported_with_their_rule() {
        let cfg = DataplaneConfig {
            interfaces: vec![InterfaceConfig {
                name: "reth1".into(),
                device: "eth1".into(),
                zone: "trust".into(),
                addresses: vec![],
                reth: None,
                mtu: None,
                vlan: None,
                tcp_mss: None,
            }],
            policies: vec![PolicyConfig {
                name: "p1".into(),
                from_zone: "trust".into(),
                to_zone: "dmz".into(),
                source: vec![],
                destination: vec![],
                protocol: None,
                ports: vec![],
                action: PolicyAction::Permit,
            }],
            ..Default::default()
        };
        assert_eq!(
            Compiled::new(&cfg).unwrap_err(),
            "policy p1: zone \"dmz\" has no interface"
        );
    }
}
