//! Zero-copy packet parsing and in-place rewriting on byte buffers.
//!
//! Every accessor checks lengths; a malformed frame yields a `ParseError`
//! (counted by the caller), never a panic. Checksums are updated
//! incrementally (RFC 1624) when one field changes, so a NAT rewrite costs a
//! few additions, not a pass over the payload.

use std::net::{Ipv4Addr, Ipv6Addr};

pub const ETH_HLEN: usize = 14;
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_ARP: u16 = 0x0806;
pub const ETHERTYPE_VLAN: u16 = 0x8100;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
/// Local experimental ethertype carrying fabric-redirected frames.
pub const ETHERTYPE_FABRIC: u16 = 0x88b5;

pub type Mac = [u8; 6];
pub const BROADCAST: Mac = [0xff; 6];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ParseError {
    Truncated,
    BadIpVersion,
    BadIpHeaderLength,
    BadIpTotalLength,
    /// A fragment header where it may not be (a second one in a chain).
    BadFragment,
    UnsupportedEtherType,
    /// An IPv6 extension header the dataplane does not walk (mobility,
    /// HIP, shim6, experimental), or a chain longer than
    /// [`MAX_EXTENSION_HEADERS`].
    UnsupportedExtensionHeader,
}

impl ParseError {
    pub fn as_str(self) -> &'static str {
        match self {
            ParseError::Truncated => "truncated",
            ParseError::BadIpVersion => "bad-ip-version",
            ParseError::BadIpHeaderLength => "bad-ip-header-length",
            ParseError::BadIpTotalLength => "bad-ip-total-length",
            ParseError::BadFragment => "bad-fragment",
            ParseError::UnsupportedEtherType => "unsupported-ethertype",
            ParseError::UnsupportedExtensionHeader => "unsupported-extension-header",
        }
    }
}

#[inline]
pub fn be16(b: &[u8], at: usize) -> Result<u16, ParseError> {
    b.get(at..at + 2)
        .map(|s| u16::from_be_bytes([s[0], s[1]]))
        .ok_or(ParseError::Truncated)
}

#[inline]
pub fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

pub fn mac_at(b: &[u8], at: usize) -> Result<Mac, ParseError> {
    b.get(at..at + 6)
        .map(|s| s.try_into().expect("6 bytes"))
        .ok_or(ParseError::Truncated)
}

// ----- checksums -----------------------------------------------------------

/// Ones'-complement sum of 16-bit words (an odd last byte padded with 0).
pub fn sum16(data: &[u8], mut acc: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(*last) << 8;
    }
    acc
}

pub fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// RFC 1624 eqn. 3: the checksum after a 16-bit field went `old` -> `new`.
#[inline]
pub fn csum_replace16(csum: u16, old: u16, new: u16) -> u16 {
    let mut acc = u32::from(!csum) + u32::from(!old) + u32::from(new);
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    !(acc as u16)
}

/// The checksum after a run of bytes changed (each 16-bit word replaced).
pub fn csum_replace_bytes(mut csum: u16, old: &[u8], new: &[u8]) -> u16 {
    debug_assert_eq!(old.len(), new.len());
    for (o, n) in old.chunks(2).zip(new.chunks(2)) {
        let w = |c: &[u8]| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]);
        csum = csum_replace16(csum, w(o), w(n));
    }
    csum
}

// ----- ethernet ------------------------------------------------------------

/// Where the L3 header starts and which ethertype it is (one VLAN tag is
/// stepped over).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Eth {
    pub dst: Mac,
    pub src: Mac,
    pub ethertype: u16,
    pub vlan: Option<u16>,
    pub l3: usize,
}

pub fn parse_eth(f: &[u8]) -> Result<Eth, ParseError> {
    let dst = mac_at(f, 0)?;
    let src = mac_at(f, 6)?;
    let mut ethertype = be16(f, 12)?;
    let mut l3 = ETH_HLEN;
    let mut vlan = None;
    if ethertype == ETHERTYPE_VLAN {
        vlan = Some(be16(f, 14)? & 0x0fff);
        ethertype = be16(f, 16)?;
        l3 = ETH_HLEN + 4;
    }
    Ok(Eth {
        dst,
        src,
        ethertype,
        vlan,
        l3,
    })
}

/// The VLAN id of a frame's 802.1Q tag, if it has one.
pub fn vlan_of(f: &[u8]) -> Option<u16> {
    (be16(f, 12).ok()? == ETHERTYPE_VLAN)
        .then(|| be16(f, 14).ok().map(|tci| tci & 0x0fff))
        .flatten()
}

/// Removes a frame's 802.1Q tag in place (what follows moves up 4
/// bytes); the new length. A frame without one is left as it is.
pub fn strip_vlan(f: &mut [u8]) -> usize {
    if f.len() < 18 || vlan_of(f).is_none() {
        return f.len();
    }
    f.copy_within(16.., 12);
    f.len() - 4
}

/// Inserts an 802.1Q tag for VLAN `vid` after the MACs of the `len`-byte
/// frame at the start of `buf` (which must hold `len + 4`); the new
/// length.
pub fn insert_vlan(buf: &mut [u8], len: usize, vid: u16) -> usize {
    debug_assert!(buf.len() >= len + 4 && len >= 12);
    buf.copy_within(12..len, 16);
    put16(buf, 12, ETHERTYPE_VLAN);
    put16(buf, 14, vid & 0x0fff);
    len + 4
}

pub fn set_macs(f: &mut [u8], dst: Mac, src: Mac) {
    f[0..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
}

// ----- IP ------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// An IP packet's header fields the dataplane uses, with offsets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ip {
    pub family: Family,
    pub l3: usize,
    /// Start of the transport header.
    pub l4: usize,
    /// End of the IP packet in the frame (padding after it is ignored).
    pub end: usize,
    pub proto: u8,
    pub ttl: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Set when the packet is a fragment of a larger datagram.
    pub frag: Option<Frag>,
}

/// Where a fragment sits in its datagram (IPv4 flags/offset, or the IPv6
/// fragment header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frag {
    /// Identification: 16 bits in IPv4, 32 in IPv6.
    pub id: u32,
    /// Offset of this fragment's data in the datagram's fragmentable part,
    /// in bytes (a multiple of 8).
    pub offset: u32,
    /// More fragments follow.
    pub more: bool,
    /// Where this fragment's data starts in the frame.
    pub data: usize,
}

impl Frag {
    pub fn is_first(&self) -> bool {
        self.offset == 0
    }
}

impl Ip {
    /// Whether the transport header is in this packet: not a fragment, or
    /// the first fragment. Later fragments carry only data: no ports, no
    /// flags, no transport checksum to keep.
    pub fn has_l4(&self) -> bool {
        self.frag.is_none_or(|f| f.is_first())
    }

    /// The fragment data's byte range in its datagram, if a fragment.
    pub fn frag_range(&self) -> Option<(u32, u32)> {
        self.frag.map(|f| {
            (
                f.offset,
                f.offset + (self.end.saturating_sub(f.data)) as u32,
            )
        })
    }

    pub fn src_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.src[12], self.src[13], self.src[14], self.src[15])
    }
    pub fn dst_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.dst[12], self.dst[13], self.dst[14], self.dst[15])
    }
}

fn mapped(a: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
}

#[inline]
pub fn parse_ipv4(f: &[u8], l3: usize) -> Result<Ip, ParseError> {
    let h = f.get(l3..l3 + 20).ok_or(ParseError::Truncated)?;
    if h[0] >> 4 != 4 {
        return Err(ParseError::BadIpVersion);
    }
    let ihl = usize::from(h[0] & 0x0f) * 4;
    if ihl < 20 {
        return Err(ParseError::BadIpHeaderLength);
    }
    let total = usize::from(u16::from_be_bytes([h[2], h[3]]));
    if total < ihl || l3 + total > f.len() {
        return Err(ParseError::BadIpTotalLength);
    }
    let flags = u16::from_be_bytes([h[6], h[7]]);
    let frag = (flags & 0x3fff != 0).then(|| Frag {
        id: u32::from(u16::from_be_bytes([h[4], h[5]])),
        offset: u32::from(flags & 0x1fff) * 8,
        more: flags & 0x2000 != 0,
        data: l3 + ihl,
    });
    Ok(Ip {
        family: Family::V4,
        l3,
        l4: l3 + ihl,
        end: l3 + total,
        proto: h[9],
        ttl: h[8],
        src: mapped([h[12], h[13], h[14], h[15]]),
        dst: mapped([h[16], h[17], h[18], h[19]]),
        frag,
    })
}

#[inline]
pub fn parse_ipv6(f: &[u8], l3: usize) -> Result<Ip, ParseError> {
    let h = f.get(l3..l3 + 40).ok_or(ParseError::Truncated)?;
    if h[0] >> 4 != 6 {
        return Err(ParseError::BadIpVersion);
    }
    let payload = usize::from(u16::from_be_bytes([h[4], h[5]]));
    if l3 + 40 + payload > f.len() {
        return Err(ParseError::BadIpTotalLength);
    }
    let end = l3 + 40 + payload;
    let (proto, l4, frag) = walk_extension_headers(f, h[6], l3 + 40, end)?;
    Ok(Ip {
        family: Family::V6,
        l3,
        l4,
        end,
        proto,
        ttl: h[7],
        src: h[8..24].try_into().expect("16 bytes"),
        dst: h[24..40].try_into().expect("16 bytes"),
        frag,
    })
}

/// Longest IPv6 extension-header chain walked; a longer one is dropped.
pub const MAX_EXTENSION_HEADERS: usize = 8;

/// Walks IPv6 extension headers (RFC 8200) from `next` at `at` to the
/// upper-layer protocol: hop-by-hop options (0), routing (43), destination
/// options (60) and authentication (51) are stepped over; an atomic
/// fragment header (offset 0, no more fragments) too. The first fragment
/// of a datagram is walked on to its transport header (RFC 7112: the whole
/// chain is in the first fragment) and reported in the [`Frag`]; a later
/// fragment ends the walk at its fragment header (its data follows, its
/// protocol is the header's next-header). ESP (50) and "no next header"
/// (59) end the walk as upper layers without ports. Headers not walked
/// (mobility 135, HIP 139, shim6 140, experimental 253/254) are refused,
/// as is a chain longer than [`MAX_EXTENSION_HEADERS`], one running past
/// `end`, or a second fragment header.
#[inline]
pub fn walk_extension_headers(
    f: &[u8],
    mut next: u8,
    mut at: usize,
    end: usize,
) -> Result<(u8, usize, Option<Frag>), ParseError> {
    let mut frag = None;
    for _ in 0..MAX_EXTENSION_HEADERS {
        let len = match next {
            0 | 43 | 60 => {
                let h = f
                    .get(at..at + 2)
                    .filter(|_| at + 2 <= end)
                    .ok_or(ParseError::Truncated)?;
                (usize::from(h[1]) + 1) * 8
            }
            51 => {
                let h = f
                    .get(at..at + 2)
                    .filter(|_| at + 2 <= end)
                    .ok_or(ParseError::Truncated)?;
                (usize::from(h[1]) + 2) * 4
            }
            44 => {
                let h = f
                    .get(at..at + 8)
                    .filter(|_| at + 8 <= end)
                    .ok_or(ParseError::Truncated)?;
                let off_m = u16::from_be_bytes([h[2], h[3]]);
                let this = Frag {
                    id: u32::from_be_bytes([h[4], h[5], h[6], h[7]]),
                    offset: u32::from(off_m & 0xfff8),
                    more: off_m & 1 != 0,
                    data: at + 8,
                };
                if frag.is_some() {
                    return Err(ParseError::BadFragment);
                }
                if this.offset != 0 {
                    return Ok((h[0], at + 8, Some(this)));
                }
                // Offset 0 and no more fragments: an atomic fragment, the
                // whole datagram (RFC 6946).
                frag = this.more.then_some(this);
                8
            }
            135 | 139 | 140 | 253 | 254 => return Err(ParseError::UnsupportedExtensionHeader),
            proto => return Ok((proto, at, frag)),
        };
        if at + len > end {
            return Err(ParseError::Truncated);
        }
        next = f[at];
        at += len;
    }
    Err(ParseError::UnsupportedExtensionHeader)
}

/// Decrements TTL / hop limit (IPv4: incremental header checksum).
pub fn dec_ttl(f: &mut [u8], ip: &Ip) {
    match ip.family {
        Family::V4 => {
            let old = u16::from_be_bytes([f[ip.l3 + 8], f[ip.l3 + 9]]);
            f[ip.l3 + 8] -= 1;
            let new = u16::from_be_bytes([f[ip.l3 + 8], f[ip.l3 + 9]]);
            let c = be16(f, ip.l3 + 10).expect("parsed header");
            put16(f, ip.l3 + 10, csum_replace16(c, old, new));
        }
        Family::V6 => f[ip.l3 + 7] -= 1,
    }
}

pub fn ipv4_header_checksum(f: &mut [u8], l3: usize, ihl: usize) {
    put16(f, l3 + 10, 0);
    let c = fold(sum16(&f[l3..l3 + ihl], 0));
    put16(f, l3 + 10, c);
}

// ----- transport -------------------------------------------------------------

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Offset of the transport checksum field, if the protocol has one we keep
/// valid across rewrites (UDP with checksum 0 over IPv4 has none).
pub fn l4_checksum_offset(f: &[u8], ip: &Ip) -> Option<usize> {
    if !ip.has_l4() {
        return None;
    }
    let at = match ip.proto {
        6 => ip.l4 + 16,
        17 => {
            let at = ip.l4 + 6;
            if ip.family == Family::V4 && be16(f, at).ok()? == 0 {
                return None;
            }
            at
        }
        1 | 58 => ip.l4 + 2,
        _ => return None,
    };
    (at + 2 <= ip.end).then_some(at)
}

/// Ports (TCP/UDP) or the ICMP echo identifier, as the session key uses
/// them: `(src, dst)`. ICMP echo: request `(id, 0)`, reply `(0, id)`.
pub fn ports(f: &[u8], ip: &Ip) -> Result<(u16, u16), ParseError> {
    if !ip.has_l4() {
        return Ok((0, 0));
    }
    match ip.proto {
        6 | 17 => {
            if ip.l4 + 8 > ip.end {
                return Err(ParseError::Truncated);
            }
            Ok((be16(f, ip.l4)?, be16(f, ip.l4 + 2)?))
        }
        1 | 58 => {
            if ip.l4 + 8 > ip.end {
                return Err(ParseError::Truncated);
            }
            let ty = f[ip.l4];
            let id = be16(f, ip.l4 + 4)?;
            Ok(match (ip.proto, ty) {
                (1, 8) | (58, 128) => (id, 0),
                (1, 0) | (58, 129) => (0, id),
                _ => (0, 0),
            })
        }
        _ => Ok((0, 0)),
    }
}

pub fn tcp_flags(f: &[u8], ip: &Ip) -> u8 {
    if ip.proto == 6 && ip.has_l4() && ip.l4 + 14 <= ip.end {
        f[ip.l4 + 13]
    } else {
        0
    }
}

/// ICMP errors that carry an offending packet's header.
pub fn is_icmp_error(f: &[u8], ip: &Ip) -> bool {
    if !ip.has_l4() {
        return false;
    }
    let Some(&ty) = f.get(ip.l4) else {
        return false;
    };
    match ip.proto {
        1 => matches!(ty, 3 | 4 | 5 | 11 | 12),
        58 => matches!(ty, 1..=4),
        _ => false,
    }
}

/// Rewrites the source or destination address, keeping the IPv4 header
/// checksum and the transport checksum (pseudo-header) valid.
pub fn set_addr(f: &mut [u8], ip: &mut Ip, dst: bool, new: &[u8; 16]) {
    let (field_v4, field_v6) = if dst { (16, 24) } else { (12, 8) };
    // ICMPv4 has no pseudo-header: its checksum ignores addresses.
    let l4c = l4_checksum_offset(f, ip).filter(|_| ip.proto != 1);
    match ip.family {
        Family::V4 => {
            let at = ip.l3 + field_v4;
            let old: [u8; 4] = f[at..at + 4].try_into().expect("4 bytes");
            let newv4 = &new[12..16];
            f[at..at + 4].copy_from_slice(newv4);
            let c = be16(f, ip.l3 + 10).expect("parsed");
            put16(f, ip.l3 + 10, csum_replace_bytes(c, &old, newv4));
            if let Some(o) = l4c {
                let c = be16(f, o).expect("in packet");
                put16(f, o, csum_replace_bytes(c, &old, newv4));
            }
        }
        Family::V6 => {
            let at = ip.l3 + field_v6;
            let old: [u8; 16] = f[at..at + 16].try_into().expect("16 bytes");
            f[at..at + 16].copy_from_slice(new);
            if let Some(o) = l4c {
                let c = be16(f, o).expect("in packet");
                put16(f, o, csum_replace_bytes(c, &old, new));
            }
        }
    }
    if dst {
        ip.dst = *new;
    } else {
        ip.src = *new;
    }
}

/// Rewrites a port (or the ICMP echo id), keeping the checksum valid.
pub fn set_port(f: &mut [u8], ip: &Ip, dst: bool, port: u16) {
    if !ip.has_l4() {
        return;
    }
    let at = match ip.proto {
        6 | 17 => ip.l4 + if dst { 2 } else { 0 },
        1 | 58 => ip.l4 + 4, // echo identifier
        _ => return,
    };
    let old = be16(f, at).expect("parsed");
    if old == port {
        return;
    }
    put16(f, at, port);
    if let Some(o) = l4_checksum_offset(f, ip) {
        let c = be16(f, o).expect("in packet");
        put16(f, o, csum_replace16(c, old, port));
    }
}

/// Full transport checksum (with pseudo-header), for frames the dataplane
/// builds or whose embedded headers it rewrote.
pub fn l4_checksum(f: &[u8], ip: &Ip, at: usize) -> u16 {
    let seg = &f[ip.l4..ip.end];
    let mut acc = 0;
    if ip.family == Family::V6 || ip.proto != 1 {
        let (s, d) = match ip.family {
            Family::V4 => (&ip.src[12..], &ip.dst[12..]),
            Family::V6 => (&ip.src[..], &ip.dst[..]),
        };
        acc = sum16(s, acc);
        acc = sum16(d, acc);
        acc += u32::from(ip.proto);
        acc += seg.len() as u32;
    }
    // Sum the segment with the checksum field taken as zero.
    let rel = at - ip.l4;
    acc = sum16(&seg[..rel], acc);
    acc = sum16(&seg[rel + 2..], acc);
    fold(acc)
}

pub fn ipv6_to_array(a: Ipv6Addr) -> [u8; 16] {
    a.octets()
}

pub fn ipv4_to_array(a: Ipv4Addr) -> [u8; 16] {
    mapped(a.octets())
}

// ----- ICMP errors -----------------------------------------------------------

/// The header of a packet embedded in an ICMP error: usually truncated
/// (only the first bytes of the original are quoted), so lengths are
/// checked against what is present, and the transport header must have at
/// least its first 8 bytes (ports or echo id).
pub fn parse_ipv4_embedded(f: &[u8], l3: usize, end: usize) -> Option<Ip> {
    let h = f.get(l3..l3 + 20)?;
    if h[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(h[0] & 0x0f) * 4;
    if ihl < 20 || l3 + ihl + 8 > end {
        return None;
    }
    Some(Ip {
        family: Family::V4,
        l3,
        l4: l3 + ihl,
        end,
        proto: h[9],
        ttl: h[8],
        src: mapped([h[12], h[13], h[14], h[15]]),
        dst: mapped([h[16], h[17], h[18], h[19]]),
        frag: None,
    })
}

pub fn parse_ipv6_embedded(f: &[u8], l3: usize, end: usize) -> Option<Ip> {
    let h = f.get(l3..l3 + 40)?;
    if h[0] >> 4 != 6 || l3 + 48 > end {
        return None;
    }
    // Extension headers are walked as far as they are quoted.
    let (proto, l4, frag) = walk_extension_headers(f, h[6], l3 + 40, end).ok()?;
    if l4 + 8 > end || frag.is_some_and(|f| !f.is_first()) {
        return None;
    }
    Some(Ip {
        family: Family::V6,
        l3,
        l4,
        end,
        proto,
        ttl: h[7],
        src: h[8..24].try_into().expect("16 bytes"),
        dst: h[24..40].try_into().expect("16 bytes"),
        frag: None,
    })
}

/// Rewrites an address of an embedded header (its IPv4 header checksum is
/// kept valid; its transport checksum covers data that is not quoted and
/// is left alone, as routers do).
pub fn set_embedded_addr(f: &mut [u8], ip: &mut Ip, dst: bool, new: &[u8; 16]) {
    match ip.family {
        Family::V4 => {
            let at = ip.l3 + if dst { 16 } else { 12 };
            let old: [u8; 4] = f[at..at + 4].try_into().expect("4 bytes");
            f[at..at + 4].copy_from_slice(&new[12..16]);
            let c = be16(f, ip.l3 + 10).expect("parsed");
            put16(f, ip.l3 + 10, csum_replace_bytes(c, &old, &new[12..16]));
        }
        Family::V6 => {
            let at = ip.l3 + if dst { 24 } else { 8 };
            f[at..at + 16].copy_from_slice(new);
        }
    }
    if dst {
        ip.dst = *new;
    } else {
        ip.src = *new;
    }
}

pub fn set_embedded_port(f: &mut [u8], ip: &Ip, dst: bool, port: u16) {
    let at = match ip.proto {
        6 | 17 => ip.l4 + if dst { 2 } else { 0 },
        1 | 58 => ip.l4 + 4,
        _ => return,
    };
    put16(f, at, port);
}

/// Recomputes an ICMP/ICMPv6 message's checksum after its quoted packet
/// was rewritten.
pub fn fix_icmp_checksum(f: &mut [u8], ip: &Ip) {
    let at = ip.l4 + 2;
    let c = l4_checksum(f, ip, at);
    put16(f, at, c);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incremental_checksum_matches_recomputation() {
        let mut hdr = [
            0x45u8, 0, 0, 60, 0x1c, 0x46, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 192, 168, 1, 1,
        ];
        ipv4_header_checksum(&mut hdr, 0, 20);
        let c = be16(&hdr, 10).unwrap();
        let old = [10u8, 0, 0, 1];
        let new = [198u8, 51, 100, 7];
        hdr[12..16].copy_from_slice(&new);
        let inc = csum_replace_bytes(c, &old, &new);
        ipv4_header_checksum(&mut hdr, 0, 20);
        assert_eq!(inc, be16(&hdr, 10).unwrap());
    }

    #[test]
    fn vlan_tags_strip_and_insert_back_to_the_same_frame() {
        let mut f: Vec<u8> = (0..64u8).collect();
        put16(&mut f, 12, ETHERTYPE_IPV4);
        let untagged = f.clone();
        let mut buf = f.clone();
        buf.resize(68, 0);
        let len = insert_vlan(&mut buf, 64, 100);
        assert_eq!(len, 68);
        assert_eq!(vlan_of(&buf), Some(100));
        assert_eq!(&buf[..12], &untagged[..12]);
        assert_eq!(&buf[16..], &untagged[12..]);
        let len = strip_vlan(&mut buf);
        assert_eq!(&buf[..len], &untagged[..]);
        assert_eq!(vlan_of(&untagged), None);
        let mut short = [0x81u8; 15];
        assert_eq!(strip_vlan(&mut short), 15, "too short to carry a tag");
    }

    #[test]
    fn truncated_inputs_are_errors_not_panics() {
        assert_eq!(parse_eth(&[0u8; 13]), Err(ParseError::Truncated));
        assert_eq!(parse_ipv4(&[0u8; 30], 14), Err(ParseError::Truncated));
        let mut f = vec![0u8; 34];
        f[14] = 0x45;
        f[16] = 0xff; // total length beyond the frame
        assert_eq!(parse_ipv4(&f, 14), Err(ParseError::BadIpTotalLength));
        f[14] = 0x44;
        assert_eq!(parse_ipv4(&f, 14), Err(ParseError::BadIpHeaderLength));
        f[14] = 0x65;
        assert_eq!(parse_ipv4(&f, 14), Err(ParseError::BadIpVersion));
        assert_eq!(parse_ipv6(&f, 14), Err(ParseError::Truncated));
    }
}
