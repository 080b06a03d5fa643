//! Session keys: the 5-tuple plus the zone it was seen in, one type for IPv4
//! and IPv6 so that every index and the timer wheel handle both families.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// IP protocol numbers the table gives special meaning to.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;

    /// Protocols whose key carries ports (for ICMP: the echo identifier), so
    /// source NAT can multiplex sessions on one address by port.
    pub const fn has_ports(p: u8) -> bool {
        matches!(p, TCP | UDP | ICMP | ICMPV6)
    }
}

/// An IPv4 or IPv6 address as 16 bytes; IPv4 is stored IPv4-mapped
/// (`::ffff:a.b.c.d`) so both families share one key layout.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Addr(pub [u8; 16]);

const V4_MAPPED_PREFIX: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];

impl Addr {
    pub const fn v4(a: Ipv4Addr) -> Addr {
        let o = a.octets();
        Addr([
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, o[0], o[1], o[2], o[3],
        ])
    }

    pub const fn v6(a: Ipv6Addr) -> Addr {
        Addr(a.octets())
    }

    pub fn is_v4(&self) -> bool {
        self.0[..12] == V4_MAPPED_PREFIX
    }

    pub fn ip(&self) -> IpAddr {
        if self.is_v4() {
            IpAddr::V4(Ipv4Addr::new(
                self.0[12], self.0[13], self.0[14], self.0[15],
            ))
        } else {
            IpAddr::V6(Ipv6Addr::from(self.0))
        }
    }

    #[inline]
    fn words(&self) -> (u64, u64) {
        let (hi, lo) = self.0.split_at(8);
        (
            u64::from_be_bytes(hi.try_into().expect("8 bytes")),
            u64::from_be_bytes(lo.try_into().expect("8 bytes")),
        )
    }
}

impl From<IpAddr> for Addr {
    fn from(ip: IpAddr) -> Addr {
        match ip {
            IpAddr::V4(a) => Addr::v4(a),
            IpAddr::V6(a) => Addr::v6(a),
        }
    }
}

impl From<Ipv4Addr> for Addr {
    fn from(a: Ipv4Addr) -> Addr {
        Addr::v4(a)
    }
}

impl From<Ipv6Addr> for Addr {
    fn from(a: Ipv6Addr) -> Addr {
        Addr::v6(a)
    }
}

impl Hash for Addr {
    #[inline]
    fn hash<H: Hasher>(&self, state: &mut H) {
        let (a, b) = self.words();
        state.write_u64(a);
        state.write_u64(b);
    }
}

impl fmt::Debug for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.ip())
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.ip())
    }
}

/// A security zone (or routing instance): part of every key, so identical
/// tuples in different zones are different sessions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ZoneId(pub u16);

/// A flow key as seen on the wire in one direction.
///
/// For a session, the forward key is the first packet as it arrived (before
/// any translation, in the ingress zone) and the reverse key is a reply as it
/// will arrive (after translation, in the egress zone).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct SessionKey {
    pub src: Addr,
    pub dst: Addr,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub zone: ZoneId,
}

impl SessionKey {
    pub fn new(
        src: impl Into<Addr>,
        src_port: u16,
        dst: impl Into<Addr>,
        dst_port: u16,
        proto: u8,
        zone: ZoneId,
    ) -> SessionKey {
        SessionKey {
            src: src.into(),
            dst: dst.into(),
            src_port,
            dst_port,
            proto,
            zone,
        }
    }

    /// Both addresses are of the same family.
    pub fn is_consistent(&self) -> bool {
        self.src.is_v4() == self.dst.is_v4()
    }

    pub fn is_v4(&self) -> bool {
        self.src.is_v4()
    }
}

impl Hash for SessionKey {
    #[inline]
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.src.hash(state);
        self.dst.hash(state);
        state.write_u64(
            u64::from(self.src_port)
                | (u64::from(self.dst_port) << 16)
                | (u64::from(self.proto) << 32)
                | (u64::from(self.zone.0) << 40),
        );
    }
}

impl fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{} -> {}:{} proto {} zone {}",
            self.src, self.src_port, self.dst, self.dst_port, self.proto, self.zone.0
        )
    }
}

/// A translated endpoint: the source address and port a source-NATed session
/// uses on the outside. The un-SNAT ("DNAT" / "DNATv6") companion index maps
/// it back to its session, and the port allocator reserves it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct NatBinding {
    pub addr: Addr,
    pub port: u16,
    pub proto: u8,
}
