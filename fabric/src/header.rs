//! The fabric header, after an Ethernet header with ethertype 0x88b5:
//!
//! ```text
//!  0      2      3      4      6         8                16
//!  | magic | ver | flags | rg  | ingress |     epoch       | inner frame ...
//!  "TN"     1            u16    u16        u64 (big endian)
//! ```
//! `flags` bit 0 (`EGRESS`): the inner frame was fully processed by the
//! sender (sessions, NAT, TTL) and only needs transmitting on interface
//! `ingress` of the receiver; otherwise the receiver processes it as if it
//! had arrived on its own member of interface `ingress`.

use tandem_proto::{Epoch, RgId};

pub const ETHERTYPE: u16 = 0x88b5;
pub const MAGIC: [u8; 2] = *b"TN";
pub const VERSION: u8 = 1;
/// Ethernet header + fabric header.
pub const OVERHEAD: usize = 14 + LEN;
pub const LEN: usize = 16;
const FLAG_EGRESS: u8 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Process as arrived on `iface`.
    Ingress,
    /// Transmit on `iface` (already processed).
    Egress,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FabricHeader {
    pub kind: Kind,
    pub rg: RgId,
    pub epoch: Epoch,
    /// A logical interface id (same config on both nodes).
    pub iface: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderError {
    Truncated,
    NotFabric,
    BadMagic,
    UnknownVersion(u8),
    UnknownFlags(u8),
}

impl HeaderError {
    pub fn as_str(&self) -> &'static str {
        match self {
            HeaderError::Truncated => "truncated",
            HeaderError::NotFabric => "not-fabric",
            HeaderError::BadMagic => "bad-magic",
            HeaderError::UnknownVersion(_) => "unknown-version",
            HeaderError::UnknownFlags(_) => "unknown-flags",
        }
    }
}

impl FabricHeader {
    /// The bytes that go in front of an inner frame: `dst`/`src` MACs,
    /// the ethertype, then the header (the dataplane writes them in place,
    /// in front of the frame in its buffer).
    pub fn prefix(&self, dst: [u8; 6], src: [u8; 6]) -> [u8; OVERHEAD] {
        let mut p = [0u8; OVERHEAD];
        p[0..6].copy_from_slice(&dst);
        p[6..12].copy_from_slice(&src);
        p[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
        p[14..16].copy_from_slice(&MAGIC);
        p[16] = VERSION;
        p[17] = if self.kind == Kind::Egress {
            FLAG_EGRESS
        } else {
            0
        };
        p[18..20].copy_from_slice(&self.rg.0.to_be_bytes());
        p[20..22].copy_from_slice(&self.iface.to_be_bytes());
        p[22..30].copy_from_slice(&self.epoch.0.to_be_bytes());
        p
    }

    /// The prefix followed by `inner`, as one buffer.
    pub fn encapsulate(&self, dst: [u8; 6], src: [u8; 6], inner: &[u8]) -> Vec<u8> {
        let mut f = Vec::with_capacity(OVERHEAD + inner.len());
        f.extend_from_slice(&self.prefix(dst, src));
        f.extend_from_slice(inner);
        f
    }

    /// The header and the inner frame of a fabric frame.
    pub fn decapsulate(frame: &[u8]) -> Result<(FabricHeader, &[u8]), HeaderError> {
        if frame.len() < OVERHEAD {
            return Err(HeaderError::Truncated);
        }
        if frame[12..14] != ETHERTYPE.to_be_bytes() {
            return Err(HeaderError::NotFabric);
        }
        let h = &frame[14..OVERHEAD];
        if h[0..2] != MAGIC {
            return Err(HeaderError::BadMagic);
        }
        if h[2] != VERSION {
            return Err(HeaderError::UnknownVersion(h[2]));
        }
        if h[3] & !FLAG_EGRESS != 0 {
            return Err(HeaderError::UnknownFlags(h[3]));
        }
        let header = FabricHeader {
            kind: if h[3] & FLAG_EGRESS != 0 {
                Kind::Egress
            } else {
                Kind::Ingress
            },
            rg: RgId(u16::from_be_bytes([h[4], h[5]])),
            iface: u16::from_be_bytes([h[6], h[7]]),
            epoch: Epoch(u64::from_be_bytes(h[8..16].try_into().expect("8 bytes"))),
        };
        Ok((header, &frame[OVERHEAD..]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn header_round_trips_both_kinds() {
        for kind in [Kind::Ingress, Kind::Egress] {
            let h = FabricHeader {
                kind,
                rg: RgId(7),
                epoch: Epoch(41),
                iface: 3,
            };
            let f = h.encapsulate([1; 6], [2; 6], b"inner frame");
            assert_eq!(f.len(), OVERHEAD + 11);
            let (back, inner) = FabricHeader::decapsulate(&f).unwrap();
            assert_eq!(back, h);
            assert_eq!(inner, b"inner frame");
        }
    }

    #[test]
    fn malformed_headers_are_typed_errors() {
        let good = FabricHeader {
            kind: Kind::Ingress,
            rg: RgId(1),
            epoch: Epoch(2),
            iface: 0,
        }
        .encapsulate([1; 6], [2; 6], b"x");
        assert_eq!(
            FabricHeader::decapsulate(&good[..OVERHEAD - 1]),
            Err(HeaderError::Truncated)
        );
        let mut f = good.clone();
        f[12] = 0x08;
        assert_eq!(FabricHeader::decapsulate(&f), Err(HeaderError::NotFabric));
        let mut f = good.clone();
        f[14] = b'X';
        assert_eq!(FabricHeader::decapsulate(&f), Err(HeaderError::BadMagic));
        let mut f = good.clone();
        f[16] = 9;
        assert_eq!(
            FabricHeader::decapsulate(&f),
            Err(HeaderError::UnknownVersion(9))
        );
        let mut f = good;
        f[17] = 0x80;
        assert_eq!(
            FabricHeader::decapsulate(&f),
            Err(HeaderError::UnknownFlags(0x80))
        );
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = FabricHeader::decapsulate(&data);
        }
    }
}
