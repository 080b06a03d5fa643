//! ICMP the firewall itself sends: time exceeded, destination unreachable,
//! fragmentation needed / packet too big, echo replies — built here, rate
//! limited by one token bucket per node (RFC 1812 §4.3.2.8, RFC 4443 §2.4).
//!
//! An error quotes the offending packet as it arrived (before any NAT), as
//! much of it as fits in 576 bytes (IPv4, RFC 1812) or 1280 (IPv6, RFC
//! 4443). No error is sent about an ICMP error, a fragment other than the
//! first, or a packet to or from a multicast or broadcast address.

use crate::packet::{self, ETH_HLEN, Family, Ip, Mac};
use crate::session::{Addr, Millis};
use std::sync::atomic::{AtomicU64, Ordering};

/// A token bucket shared by a node's workers, lock-free: one `u64` holds
/// the tokens (in thousandths) and the time of the last refill, updated by
/// compare-and-swap. A flood of packets that would each trigger an error
/// costs one atomic operation each, and at most `burst + rate × t` errors
/// go out in any `t`.
#[derive(Debug)]
pub struct TokenBucket {
    /// High 32 bits: refill time (ms, wrapping); low 32: milli-tokens.
    state: AtomicU64,
    rate_per_s: u32,
    burst: u32,
    pub sent: AtomicU64,
    pub suppressed: AtomicU64,
}

impl TokenBucket {
    pub fn new(rate_per_s: u32, burst: u32) -> TokenBucket {
        let burst = burst.max(1);
        TokenBucket {
            state: AtomicU64::new(u64::from(burst) * 1000),
            rate_per_s: rate_per_s.max(1),
            burst,
            sent: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Takes one token at `now` if there is one (counted either way).
    pub fn take(&self, now: Millis) -> bool {
        let now32 = now.0 as u32;
        let cap = u64::from(self.burst) * 1000;
        let mut cur = self.state.load(Ordering::Relaxed);
        loop {
            let (last, tokens) = ((cur >> 32) as u32, cur & 0xffff_ffff);
            let elapsed = u64::from(now32.wrapping_sub(last)).min(3_600_000);
            let refilled = (tokens + elapsed * u64::from(self.rate_per_s)).min(cap);
            let (ok, left) = if refilled >= 1000 {
                (true, refilled - 1000)
            } else {
                (false, refilled)
            };
            let next = (u64::from(now32) << 32) | left;
            match self
                .state
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => {
                    let c = if ok { &self.sent } else { &self.suppressed };
                    c.fetch_add(1, Ordering::Relaxed);
                    return ok;
                }
                Err(seen) => cur = seen,
            }
        }
    }
}

/// What an error is about (type and code per family).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IcmpError {
    /// TTL / hop limit exceeded in transit.
    TimeExceeded,
    /// No route to the destination.
    NoRoute,
    /// Too big for the egress MTU (the MTU is reported).
    TooBig { mtu: u16 },
    /// Refused by policy (administratively prohibited).
    Prohibited,
}

impl IcmpError {
    fn type_code(self, family: Family) -> (u8, u8) {
        match (self, family) {
            (IcmpError::TimeExceeded, Family::V4) => (11, 0),
            (IcmpError::TimeExceeded, Family::V6) => (3, 0),
            (IcmpError::NoRoute, Family::V4) => (3, 0),
            (IcmpError::NoRoute, Family::V6) => (1, 0),
            (IcmpError::TooBig { .. }, Family::V4) => (3, 4),
            (IcmpError::TooBig { .. }, Family::V6) => (2, 0),
            (IcmpError::Prohibited, Family::V4) => (3, 13),
            (IcmpError::Prohibited, Family::V6) => (1, 1),
        }
    }

    /// The 32-bit field after the checksum.
    fn rest(self, family: Family) -> u32 {
        match (self, family) {
            (IcmpError::TooBig { mtu }, Family::V4) => u32::from(mtu),
            (IcmpError::TooBig { mtu }, Family::V6) => u32::from(mtu),
            _ => 0,
        }
    }
}

/// Whether an error may be sent about `ip` (RFC 1812 §4.3.2.7, RFC 4443
/// §2.4(e)): not about an ICMP error, not to or from multicast or
/// broadcast, not about a non-first fragment (the caller knows that).
pub fn may_answer(f: &[u8], ip: &Ip) -> bool {
    let icmp_error = (ip.proto == 1 || ip.proto == 58) && packet::is_icmp_error(f, ip);
    let bad = |a: &[u8; 16]| match ip.family {
        Family::V4 => a[12] >= 224 || a[12..16] == [0, 0, 0, 0] || a[12..16] == [255; 4],
        Family::V6 => a[0] == 0xff || *a == [0; 16],
    };
    // Never about a later fragment (RFC 1812 §4.3.2.7): it has no
    // transport header to quote.
    ip.has_l4() && !icmp_error && !bad(&ip.src) && !bad(&ip.dst)
}

/// An ICMP error from `src` to the sender of the packet `ip` in `f`,
/// addressed back to the frame's source MAC from `smac`.
pub fn build_error(f: &[u8], ip: &Ip, kind: IcmpError, src: &Addr, smac: Mac) -> Option<Vec<u8>> {
    let dmac = packet::mac_at(f, 6).ok()?;
    let (ty, code) = kind.type_code(ip.family);
    let (ip_hlen, max_total) = match ip.family {
        Family::V4 => (20, 576),
        Family::V6 => (40, 1280),
    };
    let quote_len = (ip.end - ip.l3).min(max_total - ip_hlen - 8);
    let quoted = f.get(ip.l3..ip.l3 + quote_len)?;
    let total = ip_hlen + 8 + quote_len;
    let mut out = vec![0u8; ETH_HLEN + total];
    packet::set_macs(&mut out, dmac, smac);
    let l3 = ETH_HLEN;
    match ip.family {
        Family::V4 => {
            packet::put16(&mut out, 12, packet::ETHERTYPE_IPV4);
            let h = &mut out[l3..l3 + 20];
            h[0] = 0x45;
            h[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            h[6] = 0x40; // DF
            h[8] = 64;
            h[9] = 1;
            h[12..16].copy_from_slice(&src.0[12..16]);
            h[16..20].copy_from_slice(&ip.src[12..16]);
            packet::ipv4_header_checksum(&mut out, l3, 20);
        }
        Family::V6 => {
            packet::put16(&mut out, 12, packet::ETHERTYPE_IPV6);
            let h = &mut out[l3..l3 + 40];
            h[0] = 0x60;
            h[4..6].copy_from_slice(&((8 + quote_len) as u16).to_be_bytes());
            h[6] = 58;
            h[7] = 64;
            h[8..24].copy_from_slice(&src.0);
            h[24..40].copy_from_slice(&ip.src);
        }
    }
    let l4 = l3 + ip_hlen;
    out[l4] = ty;
    out[l4 + 1] = code;
    out[l4 + 4..l4 + 8].copy_from_slice(&kind.rest(ip.family).to_be_bytes());
    out[l4 + 8..].copy_from_slice(quoted);
    let built = match ip.family {
        Family::V4 => packet::parse_ipv4(&out, l3),
        Family::V6 => packet::parse_ipv6(&out, l3),
    }
    .ok()?;
    packet::fix_icmp_checksum(&mut out, &built);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_the_burst_then_the_rate() {
        let b = TokenBucket::new(10, 5);
        let t = Millis(1_000);
        assert_eq!((0..20).filter(|_| b.take(t)).count(), 5, "burst");
        assert!(!b.take(t));
        // 100 ms at 10/s: one more.
        assert!(b.take(Millis(1_100)));
        assert!(!b.take(Millis(1_100)));
        // A long pause refills to the burst, not beyond.
        assert_eq!((0..20).filter(|_| b.take(Millis(100_000))).count(), 5);
        assert_eq!(b.sent.load(Ordering::Relaxed), 11);
        assert_eq!(b.suppressed.load(Ordering::Relaxed), 32);
    }
}
