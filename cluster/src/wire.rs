//! The one conversion between the session table's peer form
//! (`SyncedSession`) and the wire (`pb::Session`), with validation: a
//! session from the network is checked field by field and rejected with a
//! reason, never truncated or guessed.

use std::fmt;
use tandem_dataplane::session::{
    Addr, FlowCounters, InterfaceId, PolicyId, SessionKey, SyncedSession, TcpState, ZoneId,
};
use tandem_proto::{RgId, pb};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireError(pub String);

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for WireError {}

fn bad(what: impl Into<String>) -> WireError {
    WireError(what.into())
}

fn addr_to_wire(a: &Addr) -> (u64, u64) {
    let (hi, lo) = a.0.split_at(8);
    (
        u64::from_be_bytes(hi.try_into().expect("8 bytes")),
        u64::from_be_bytes(lo.try_into().expect("8 bytes")),
    )
}

fn addr_from_wire(hi: u64, lo: u64) -> Addr {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&hi.to_be_bytes());
    b[8..].copy_from_slice(&lo.to_be_bytes());
    Addr(b)
}

fn narrow<T: TryFrom<u32>>(v: u32, field: &str) -> Result<T, WireError> {
    T::try_from(v).map_err(|_| bad(format!("{field}: {v} out of range")))
}

pub fn key_to_wire(k: &SessionKey) -> pb::FlowKey {
    let (src_hi, src_lo) = addr_to_wire(&k.src);
    let (dst_hi, dst_lo) = addr_to_wire(&k.dst);
    pb::FlowKey {
        src_hi,
        src_lo,
        dst_hi,
        dst_lo,
        src_port: k.src_port.into(),
        dst_port: k.dst_port.into(),
        proto: k.proto.into(),
        zone: k.zone.0.into(),
    }
}

pub fn key_from_wire(k: &pb::FlowKey) -> Result<SessionKey, WireError> {
    let key = SessionKey {
        src: addr_from_wire(k.src_hi, k.src_lo),
        dst: addr_from_wire(k.dst_hi, k.dst_lo),
        src_port: narrow(k.src_port, "key.src_port")?,
        dst_port: narrow(k.dst_port, "key.dst_port")?,
        proto: narrow(k.proto, "key.proto")?,
        zone: ZoneId(narrow(k.zone, "key.zone")?),
    };
    if !key.is_consistent() {
        return Err(bad("key: source and destination of different families"));
    }
    Ok(key)
}

pub fn session_to_wire(s: &SyncedSession) -> pb::Session {
    pb::Session {
        key: Some(key_to_wire(&s.key)),
        reverse: Some(key_to_wire(&s.reverse)),
        owner_rg: s.owner_rg.0.into(),
        ingress_if: s.ingress_if.0.into(),
        egress_if: s.egress_if.0.into(),
        policy: s.policy.0,
        tcp_state: s.tcp_state as u32,
        timeout_ms: s.timeout_ms,
        age_ms: s.age_ms,
        idle_ms: s.idle_ms,
        fwd_packets: s.counters.fwd_packets,
        fwd_bytes: s.counters.fwd_bytes,
        rev_packets: s.counters.rev_packets,
        rev_bytes: s.counters.rev_bytes,
    }
}

pub fn session_from_wire(s: &pb::Session) -> Result<SyncedSession, WireError> {
    let key = key_from_wire(s.key.as_ref().ok_or_else(|| bad("session without key"))?)?;
    let reverse = key_from_wire(
        s.reverse
            .as_ref()
            .ok_or_else(|| bad("session without reverse key"))?,
    )?;
    if key.is_v4() != reverse.is_v4() || key.proto != reverse.proto {
        return Err(bad("reverse key family or protocol differs from key"));
    }
    let tcp_state = u8::try_from(s.tcp_state)
        .ok()
        .and_then(TcpState::from_u8)
        .ok_or_else(|| bad(format!("tcp_state {} unknown", s.tcp_state)))?;
    let owner_rg = RgId(narrow(s.owner_rg, "owner_rg")?);
    if !owner_rg.is_data() {
        return Err(bad(
            "owner_rg 0 is the control group; sessions belong to data RGs",
        ));
    }
    Ok(SyncedSession {
        key,
        reverse,
        owner_rg,
        ingress_if: InterfaceId(narrow(s.ingress_if, "ingress_if")?),
        egress_if: InterfaceId(narrow(s.egress_if, "egress_if")?),
        policy: PolicyId(s.policy),
        tcp_state,
        timeout_ms: s.timeout_ms,
        age_ms: s.age_ms,
        idle_ms: s.idle_ms,
        counters: FlowCounters {
            fwd_packets: s.fwd_packets,
            fwd_bytes: s.fwd_bytes,
            rev_packets: s.rev_packets,
            rev_bytes: s.rev_bytes,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use tandem_dataplane::session::Addr;

    fn sample(v6: bool) -> SyncedSession {
        let (a, b): (Addr, Addr) = if v6 {
            (
                "2001:db8::1".parse::<Ipv6Addr>().unwrap().into(),
                "2001:db8::2".parse::<Ipv6Addr>().unwrap().into(),
            )
        } else {
            (
                Ipv4Addr::new(10, 0, 0, 1).into(),
                Ipv4Addr::new(10, 0, 0, 2).into(),
            )
        };
        let key = SessionKey::new(a, 1000, b, 80, 6, ZoneId(1));
        SyncedSession {
            key,
            reverse: SessionKey::new(b, 80, a, 1000, 6, ZoneId(2)),
            owner_rg: RgId(3),
            ingress_if: InterfaceId(1),
            egress_if: InterfaceId(2),
            policy: PolicyId(9),
            tcp_state: TcpState::Established,
            timeout_ms: 1_800_000,
            age_ms: 5,
            idle_ms: 1,
            counters: FlowCounters {
                fwd_packets: 1,
                fwd_bytes: 2,
                rev_packets: 3,
                rev_bytes: 4,
            },
        }
    }

    #[test]
    fn session_round_trips_v4_and_v6() {
        for v6 in [false, true] {
            let s = sample(v6);
            assert_eq!(session_from_wire(&session_to_wire(&s)).unwrap(), s);
        }
    }

    #[test]
    fn v4_addresses_omit_the_zero_high_half() {
        use prost::Message;
        let w = session_to_wire(&sample(false)).key.unwrap();
        assert_eq!((w.src_hi, w.dst_hi), (0, 0));
        // tag + fixed64 for each low half, varints for the rest.
        assert!(
            w.encoded_len() <= 2 * 9 + 4 * 4,
            "{} bytes",
            w.encoded_len()
        );
    }

    #[test]
    fn out_of_range_fields_are_rejected_with_the_field_name() {
        let mut w = session_to_wire(&sample(false));
        w.key.as_mut().unwrap().src_port = 70000;
        assert!(
            session_from_wire(&w)
                .unwrap_err()
                .0
                .contains("key.src_port")
        );
        let mut w = session_to_wire(&sample(false));
        w.tcp_state = 99;
        assert!(session_from_wire(&w).unwrap_err().0.contains("tcp_state"));
        let mut w = session_to_wire(&sample(false));
        w.reverse.as_mut().unwrap().dst_hi = 0x2001_0db8_0000_0000;
        assert!(
            session_from_wire(&w).unwrap_err().0.contains("families"),
            "a v6 address in a v4 key"
        );
        let mut w = session_to_wire(&sample(false));
        w.owner_rg = 0;
        assert!(session_from_wire(&w).is_err());
        let mut w = session_to_wire(&sample(false));
        w.reverse = Some(key_to_wire(&sample(true).reverse));
        assert!(session_from_wire(&w).is_err(), "mixed families");
        let w = pb::Session::default();
        assert!(session_from_wire(&w).is_err());
    }
}
