//! Building test and benchmark frames with valid checksums, and checking a
//! frame's checksums from scratch (so a test proves an incremental update
//! produced exactly what a full recomputation would).

use crate::packet::{self, ETH_HLEN, Family, Mac};
use crate::session::Addr;

/// A transport payload to build.
#[derive(Clone, Debug)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
        seq: u32,
        ack: u32,
        payload: Vec<u8>,
    },
    Udp {
        sport: u16,
        dport: u16,
        payload: Vec<u8>,
    },
    /// ICMP/ICMPv6 echo request (`reply: false`) or reply.
    Echo { id: u16, seq: u16, reply: bool },
    /// An ICMP error (type/code) quoting `quoted` (an IP packet, no
    /// Ethernet header).
    IcmpError { kind: u8, code: u8, quoted: Vec<u8> },
}

impl L4 {
    /// A TCP segment of a toy conversation in which both sides start at
    /// sequence number 1000 and every segment acknowledges a SYN carrying
    /// `payload`: segments of such a conversation, in any order, stay
    /// inside each other's windows.
    pub fn tcp(flags: u8, sport: u16, dport: u16, payload: &[u8]) -> L4 {
        L4::Tcp {
            sport,
            dport,
            flags,
            seq: 1000,
            ack: 1000 + payload.len() as u32 + 1,
            payload: payload.to_vec(),
        }
    }
}

/// An Ethernet + IPv4/IPv6 frame from `src` to `dst` with `ttl`.
pub fn build(dmac: Mac, smac: Mac, src: Addr, dst: Addr, ttl: u8, l4: &L4) -> Vec<u8> {
    let v4 = src.is_v4();
    let mut f = vec![0u8; ETH_HLEN];
    packet::set_macs(&mut f, dmac, smac);
    packet::put16(
        &mut f,
        12,
        if v4 {
            packet::ETHERTYPE_IPV4
        } else {
            packet::ETHERTYPE_IPV6
        },
    );
    let pkt = ip_packet(src, dst, ttl, l4);
    f.extend_from_slice(&pkt);
    if f.len() < 60 {
        f.resize(60, 0);
    }
    f
}

/// The IP packet alone (for quoting in ICMP errors).
pub fn ip_packet(src: Addr, dst: Addr, ttl: u8, l4: &L4) -> Vec<u8> {
    let v4 = src.is_v4();
    let (proto, body) = l4_bytes(l4, v4);
    let mut p = if v4 {
        let total = 20 + body.len();
        let mut h = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, ttl, proto, 0, 0];
        h[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        h.extend_from_slice(&src.0[12..16]);
        h.extend_from_slice(&dst.0[12..16]);
        packet::ipv4_header_checksum(&mut h, 0, 20);
        h
    } else {
        let mut h = vec![0x60, 0, 0, 0];
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.push(proto);
        h.push(ttl);
        h.extend_from_slice(&src.0);
        h.extend_from_slice(&dst.0);
        h
    };
    let l4_at = p.len();
    p.extend_from_slice(&body);
    // Checksum via a parsed view with an Ethernet-less offset.
    let mut framed = vec![0u8; ETH_HLEN];
    framed.extend_from_slice(&p);
    let ip = if v4 {
        packet::parse_ipv4(&framed, ETH_HLEN)
    } else {
        packet::parse_ipv6(&framed, ETH_HLEN)
    }
    .expect("well-formed");
    if let Some(at) = l4_checksum_at(proto, ip.l4) {
        let c = packet::l4_checksum(&framed, &ip, at);
        packet::put16(&mut framed, at, c);
    }
    p[l4_at..].copy_from_slice(&framed[ETH_HLEN + l4_at..]);
    p
}

fn l4_checksum_at(proto: u8, l4: usize) -> Option<usize> {
    match proto {
        6 => Some(l4 + 16),
        17 => Some(l4 + 6),
        1 | 58 => Some(l4 + 2),
        _ => None,
    }
}

fn l4_bytes(l4: &L4, v4: bool) -> (u8, Vec<u8>) {
    match l4 {
        L4::Tcp {
            sport,
            dport,
            flags,
            seq,
            ack,
            payload,
        } => {
            let mut b = vec![0u8; 20];
            b[0..2].copy_from_slice(&sport.to_be_bytes());
            b[2..4].copy_from_slice(&dport.to_be_bytes());
            b[4..8].copy_from_slice(&seq.to_be_bytes());
            b[8..12].copy_from_slice(&ack.to_be_bytes());
            b[12] = 5 << 4;
            b[13] = *flags;
            b[14..16].copy_from_slice(&65535u16.to_be_bytes());
            b.extend_from_slice(payload);
            (6, b)
        }
        L4::Udp {
            sport,
            dport,
            payload,
        } => {
            let mut b = vec![0u8; 8];
            b[0..2].copy_from_slice(&sport.to_be_bytes());
            b[2..4].copy_from_slice(&dport.to_be_bytes());
            b[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
            b.extend_from_slice(payload);
            (17, b)
        }
        L4::Echo { id, seq, reply } => {
            let kind = match (v4, reply) {
                (true, false) => 8,
                (true, true) => 0,
                (false, false) => 128,
                (false, true) => 129,
            };
            let mut b = vec![kind, 0, 0, 0];
            b.extend_from_slice(&id.to_be_bytes());
            b.extend_from_slice(&seq.to_be_bytes());
            b.extend_from_slice(b"tandem-echo-data");
            (if v4 { 1 } else { 58 }, b)
        }
        L4::IcmpError { kind, code, quoted } => {
            let mut b = vec![*kind, *code, 0, 0, 0, 0, 0, 0];
            b.extend_from_slice(quoted);
            (if v4 { 1 } else { 58 }, b)
        }
    }
}

/// Checks every checksum of a frame from scratch: the IPv4 header, the
/// transport segment, and for ICMP errors the quoted IPv4 header. Returns
/// what is wrong.
pub fn verify_checksums(f: &[u8]) -> Result<(), String> {
    let eth = packet::parse_eth(f).map_err(|e| format!("{e:?}"))?;
    let ip = match eth.ethertype {
        packet::ETHERTYPE_IPV4 => packet::parse_ipv4(f, eth.l3),
        packet::ETHERTYPE_IPV6 => packet::parse_ipv6(f, eth.l3),
        _ => return Ok(()),
    }
    .map_err(|e| format!("{e:?}"))?;
    if ip.family == Family::V4 {
        let ihl = usize::from(f[ip.l3] & 0x0f) * 4;
        if packet::fold(packet::sum16(&f[ip.l3..ip.l3 + ihl], 0)) != 0 {
            return Err("IPv4 header checksum".into());
        }
    }
    // A fragment's transport checksum covers its whole datagram:
    // [`reassemble`] the fragments to check it.
    if let Some(at) = l4_checksum_at(ip.proto, ip.l4).filter(|_| ip.frag.is_none()) {
        let stored = packet::be16(f, at).map_err(|e| format!("{e:?}"))?;
        if !(ip.proto == 17 && ip.family == Family::V4 && stored == 0) {
            let want = packet::l4_checksum(f, &ip, at);
            if want != stored {
                return Err(format!(
                    "transport checksum {stored:#06x}, want {want:#06x}"
                ));
            }
        }
    }
    if ip.proto == 1 && packet::is_icmp_error(f, &ip) {
        let q = ip.l4 + 8;
        let ihl = usize::from(f[q] & 0x0f) * 4;
        if packet::fold(packet::sum16(&f[q..q + ihl], 0)) != 0 {
            return Err("quoted IPv4 header checksum".into());
        }
    }
    Ok(())
}

/// Splits a whole IPv4 or IPv6 frame into fragments whose IP packets are
/// at most `max_ip` bytes (IPv6: a fragment header is inserted after the
/// base header; extension headers of the original are not supported),
/// with identification `id`, in datagram order.
pub fn fragments(frame: &[u8], max_ip: usize, id: u32) -> Vec<Vec<u8>> {
    let eth = packet::parse_eth(frame).expect("a frame");
    let v4 = eth.ethertype == packet::ETHERTYPE_IPV4;
    let l3 = eth.l3;
    let (hlen, end) = if v4 {
        let ip = packet::parse_ipv4(frame, l3).expect("IPv4");
        (ip.l4 - l3, ip.end)
    } else {
        let ip = packet::parse_ipv6(frame, l3).expect("IPv6");
        (40, ip.end)
    };
    let payload = &frame[l3 + hlen..end];
    let frag_hlen = if v4 { hlen } else { 48 };
    let step = (max_ip - frag_hlen) / 8 * 8;
    let mut out = Vec::new();
    let mut off = 0;
    while off < payload.len() {
        let chunk = &payload[off..(off + step).min(payload.len())];
        let more = off + chunk.len() < payload.len();
        let mut f = frame[..l3 + hlen].to_vec();
        if v4 {
            let total = hlen + chunk.len();
            f[l3 + 2..l3 + 4].copy_from_slice(&(total as u16).to_be_bytes());
            f[l3 + 4..l3 + 6].copy_from_slice(&(id as u16).to_be_bytes());
            let flags = (off / 8) as u16 | if more { 0x2000 } else { 0 };
            f[l3 + 6..l3 + 8].copy_from_slice(&flags.to_be_bytes());
            packet::ipv4_header_checksum(&mut f, l3, hlen);
        } else {
            let next = f[l3 + 6];
            f[l3 + 6] = 44;
            let plen = 8 + chunk.len();
            f[l3 + 4..l3 + 6].copy_from_slice(&(plen as u16).to_be_bytes());
            let off_m = off as u16 | u16::from(more);
            f.extend_from_slice(&[next, 0]);
            f.extend_from_slice(&off_m.to_be_bytes());
            f.extend_from_slice(&id.to_be_bytes());
        }
        f.extend_from_slice(chunk);
        if f.len() < 60 {
            f.resize(60, 0);
        }
        out.push(f);
        off += chunk.len();
    }
    out
}

/// Rebuilds the whole frame from fragments (any order; as [`fragments`]
/// makes them, or as the dataplane rewrote them), so a test can check the
/// datagram's transport checksum. `None` if they do not make one datagram.
pub fn reassemble(frags: &[Vec<u8>]) -> Option<Vec<u8>> {
    let mut parts: Vec<(u32, bool, &[u8], &Vec<u8>)> = Vec::new();
    for f in frags {
        let eth = packet::parse_eth(f).ok()?;
        let ip = match eth.ethertype {
            packet::ETHERTYPE_IPV4 => packet::parse_ipv4(f, eth.l3),
            packet::ETHERTYPE_IPV6 => packet::parse_ipv6(f, eth.l3),
            _ => return None,
        }
        .ok()?;
        let fr = ip.frag?;
        parts.push((fr.offset, fr.more, &f[fr.data..ip.end], f));
    }
    parts.sort_by_key(|p| p.0);
    let first = parts.first()?.3;
    let eth = packet::parse_eth(first).ok()?;
    let l3 = eth.l3;
    let v4 = eth.ethertype == packet::ETHERTYPE_IPV4;
    let mut payload = Vec::new();
    for (off, _, data, _) in &parts {
        if *off as usize != payload.len() {
            return None;
        }
        payload.extend_from_slice(data);
    }
    if parts.last()?.1 {
        return None;
    }
    let mut f;
    if v4 {
        let hlen = usize::from(first[l3] & 0x0f) * 4;
        f = first[..l3 + hlen].to_vec();
        f[l3 + 2..l3 + 4].copy_from_slice(&((hlen + payload.len()) as u16).to_be_bytes());
        f[l3 + 6..l3 + 8].copy_from_slice(&[0, 0]);
        packet::ipv4_header_checksum(&mut f, l3, hlen);
    } else {
        f = first[..l3 + 40].to_vec();
        f[l3 + 6] = first[l3 + 40];
        f[l3 + 4..l3 + 6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    f.extend_from_slice(&payload);
    Some(f)
}
