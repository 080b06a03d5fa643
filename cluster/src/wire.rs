//! Sessions on the wire: the one conversion between the session table's
//! peer form (`SyncedSession`, `SessionKey`) and the packed records that
//! `DeltaBatch` and `BulkChunk` carry (layout: docs/PROTOCOL.md, "Session
//! records").
//!
//! Records are fixed-layout, big-endian, one kind byte first. Every record
//! from the network is checked field by field and rejected with a reason
//! (and its byte offset), never truncated or guessed; the reader never
//! panics and never allocates.

use bytes::{BufMut, BytesMut};
use std::fmt;
use tandem_dataplane::session::{
    Addr, FlowCounters, InterfaceId, PolicyId, SessionKey, SyncedSession, TcpState, ZoneId,
};
use tandem_proto::RgId;

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

/// Record kinds: operation and address family.
pub const UPSERT_V4: u8 = 1;
pub const UPSERT_V6: u8 = 2;
pub const DELETE_V4: u8 = 3;
pub const DELETE_V6: u8 = 4;
/// An upsert of a SYN-proxied session: the same record followed by its
/// 4-byte sequence shift.
pub const UPSERT_SHIFTED_V4: u8 = 5;
pub const UPSERT_SHIFTED_V6: u8 = 6;

const fn key_len(v4: bool) -> usize {
    // src, dst, src_port, dst_port, proto, zone
    if v4 { 4 + 4 + 5 + 2 } else { 16 + 16 + 5 + 2 }
}

/// owner_rg, ingress_if, egress_if, policy, tcp_state, timeout_ms, age_ms,
/// idle_ms, four counters.
const SESSION_TAIL: usize = 2 + 2 + 2 + 4 + 1 + 4 + 8 + 8 + 4 * 8;

/// Bytes of one record of `kind` (kind byte included); `None` if unknown.
pub const fn record_len(kind: u8) -> Option<usize> {
    match kind {
        UPSERT_V4 => Some(1 + 2 * key_len(true) + SESSION_TAIL),
        UPSERT_V6 => Some(1 + 2 * key_len(false) + SESSION_TAIL),
        UPSERT_SHIFTED_V4 => Some(1 + 2 * key_len(true) + SESSION_TAIL + 4),
        UPSERT_SHIFTED_V6 => Some(1 + 2 * key_len(false) + SESSION_TAIL + 4),
        DELETE_V4 => Some(1 + key_len(true)),
        DELETE_V6 => Some(1 + key_len(false)),
        _ => None,
    }
}

/// The largest record: what a writer reserves per session.
pub const MAX_RECORD: usize = 1 + 2 * key_len(false) + SESSION_TAIL + 4;

/// One decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Upsert(SyncedSession),
    Delete(SessionKey),
}

fn put_addr(out: &mut BytesMut, a: &Addr, v4: bool) {
    out.put_slice(if v4 { &a.0[12..] } else { &a.0[..] });
}

fn put_key(out: &mut BytesMut, k: &SessionKey, v4: bool) {
    put_addr(out, &k.src, v4);
    put_addr(out, &k.dst, v4);
    out.put_u16(k.src_port);
    out.put_u16(k.dst_port);
    out.put_u8(k.proto);
    out.put_u16(k.zone.0);
}

/// Appends an upsert record for `s`.
pub fn put_upsert(out: &mut BytesMut, s: &SyncedSession) {
    let v4 = s.key.is_v4();
    out.put_u8(match (v4, s.seq_shift.is_some()) {
        (true, false) => UPSERT_V4,
        (false, false) => UPSERT_V6,
        (true, true) => UPSERT_SHIFTED_V4,
        (false, true) => UPSERT_SHIFTED_V6,
    });
    put_key(out, &s.key, v4);
    put_key(out, &s.reverse, v4);
    out.put_u16(s.owner_rg.0);
    out.put_u16(s.ingress_if.0);
    out.put_u16(s.egress_if.0);
    out.put_u32(s.policy.0);
    out.put_u8(s.tcp_state as u8);
    out.put_u32(s.timeout_ms);
    out.put_u64(s.age_ms);
    out.put_u64(s.idle_ms);
    out.put_u64(s.counters.fwd_packets);
    out.put_u64(s.counters.fwd_bytes);
    out.put_u64(s.counters.rev_packets);
    out.put_u64(s.counters.rev_bytes);
    if let Some(d) = s.seq_shift {
        out.put_u32(d);
    }
}

/// Appends a delete record for the session whose forward key is `k`.
pub fn put_delete(out: &mut BytesMut, k: &SessionKey) {
    let v4 = k.is_v4();
    out.put_u8(if v4 { DELETE_V4 } else { DELETE_V6 });
    put_key(out, k, v4);
}

/// Fixed-offset reads inside one record whose length was checked first.
struct Fields<'a> {
    b: &'a [u8],
    at: usize,
}

impl Fields<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut v = [0u8; N];
        v.copy_from_slice(&self.b[self.at..self.at + N]);
        self.at += N;
        v
    }

    fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.take())
    }

    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.take())
    }

    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.take())
    }

    fn addr(&mut self, v4: bool) -> Addr {
        if v4 {
            let o: [u8; 4] = self.take();
            Addr::v4(o.into())
        } else {
            Addr(self.take())
        }
    }

    fn key(&mut self, v4: bool, what: &str) -> Result<SessionKey, WireError> {
        let key = SessionKey {
            src: self.addr(v4),
            dst: self.addr(v4),
            src_port: self.u16(),
            dst_port: self.u16(),
            proto: self.u8(),
            zone: ZoneId(self.u16()),
        };
        // An IPv6 record must not smuggle IPv4-mapped addresses: the
        // family of a key is its record kind, nothing else.
        if key.src.is_v4() != v4 || key.dst.is_v4() != v4 {
            return Err(bad(format!(
                "{what}: IPv4-mapped address in an IPv6 record"
            )));
        }
        Ok(key)
    }
}

fn session(f: &mut Fields<'_>, v4: bool, shifted: bool) -> Result<SyncedSession, WireError> {
    let key = f.key(v4, "key")?;
    let reverse = f.key(v4, "reverse")?;
    if key.proto != reverse.proto {
        return Err(bad("reverse key protocol differs from key"));
    }
    let owner_rg = RgId(f.u16());
    if !owner_rg.is_data() {
        return Err(bad(
            "owner_rg 0 is the control group; sessions belong to data RGs",
        ));
    }
    let ingress_if = InterfaceId(f.u16());
    let egress_if = InterfaceId(f.u16());
    let policy = PolicyId(f.u32());
    let state = f.u8();
    let tcp_state =
        TcpState::from_u8(state).ok_or_else(|| bad(format!("tcp_state {state} unknown")))?;
    if shifted && key.proto != 6 {
        return Err(bad("sequence shift on a session that is not TCP"));
    }
    Ok(SyncedSession {
        key,
        reverse,
        owner_rg,
        ingress_if,
        egress_if,
        policy,
        tcp_state,
        timeout_ms: f.u32(),
        age_ms: f.u64(),
        idle_ms: f.u64(),
        counters: FlowCounters {
            fwd_packets: f.u64(),
            fwd_bytes: f.u64(),
            rev_packets: f.u64(),
            rev_bytes: f.u64(),
        },
        seq_shift: shifted.then(|| f.u32()),
    })
}

/// Reads the records of one message. It yields exactly the records in the
/// buffer, then checks that their number is the message's `count`; the
/// first error ends the walk.
pub struct RecordReader<'a> {
    buf: &'a [u8],
    at: usize,
    read: u32,
    count: u32,
    failed: bool,
}

impl<'a> RecordReader<'a> {
    pub fn new(buf: &'a [u8], count: u32) -> RecordReader<'a> {
        RecordReader {
            buf,
            at: 0,
            read: 0,
            count,
            failed: false,
        }
    }

    fn fail(&mut self, e: String) -> Option<Result<Record, WireError>> {
        self.failed = true;
        Some(Err(bad(format!(
            "record {} at byte {}: {e}",
            self.read, self.at
        ))))
    }

    fn next_record(&mut self) -> Option<Result<Record, WireError>> {
        let rest = &self.buf[self.at..];
        let Some(&kind) = rest.first() else {
            if self.read != self.count {
                let (read, count) = (self.read, self.count);
                return self.fail(format!("{read} records where count says {count}"));
            }
            return None;
        };
        if self.read == self.count {
            return self.fail(format!("bytes after the {} counted records", self.count));
        }
        let Some(len) = record_len(kind) else {
            return self.fail(format!("unknown record kind {kind}"));
        };
        if rest.len() < len {
            return self.fail(format!(
                "truncated: kind {kind} needs {len} bytes, {} left",
                rest.len()
            ));
        }
        let mut f = Fields {
            b: &rest[..len],
            at: 1,
        };
        let rec = match kind {
            UPSERT_V4 | UPSERT_V6 | UPSERT_SHIFTED_V4 | UPSERT_SHIFTED_V6 => {
                let v4 = kind == UPSERT_V4 || kind == UPSERT_SHIFTED_V4;
                let shifted = kind >= UPSERT_SHIFTED_V4;
                session(&mut f, v4, shifted).map(Record::Upsert)
            }
            _ => f.key(kind == DELETE_V4, "key").map(Record::Delete),
        };
        match rec {
            Ok(r) => {
                self.at += len;
                self.read += 1;
                Some(Ok(r))
            }
            Err(e) => self.fail(e.0),
        }
    }
}

impl Iterator for RecordReader<'_> {
    type Item = Result<Record, WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        self.next_record()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

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
            seq_shift: None,
        }
    }

    fn read_all(buf: &[u8], count: u32) -> Result<Vec<Record>, WireError> {
        RecordReader::new(buf, count).collect()
    }

    #[test]
    fn records_round_trip_v4_and_v6_with_their_exact_lengths() {
        for v6 in [false, true] {
            let s = sample(v6);
            let mut out = BytesMut::new();
            put_upsert(&mut out, &s);
            put_delete(&mut out, &s.key);
            let (up, del) = if v6 {
                (UPSERT_V6, DELETE_V6)
            } else {
                (UPSERT_V4, DELETE_V4)
            };
            assert_eq!(
                out.len(),
                record_len(up).unwrap() + record_len(del).unwrap()
            );
            assert_eq!(
                read_all(&out, 2).unwrap(),
                vec![Record::Upsert(s.clone()), Record::Delete(s.key)]
            );
        }
        assert_eq!(record_len(UPSERT_V4), Some(94));
        assert_eq!(record_len(UPSERT_V6), Some(142));
        assert_eq!(record_len(UPSERT_SHIFTED_V6), Some(146));
        assert_eq!(MAX_RECORD, 146);
    }

    fn upsert_bytes(s: &SyncedSession) -> Vec<u8> {
        let mut out = BytesMut::new();
        put_upsert(&mut out, s);
        out.to_vec()
    }

    fn err_of(buf: &[u8], count: u32) -> String {
        read_all(buf, count).unwrap_err().0
    }

    #[test]
    fn invalid_records_are_rejected_with_the_reason_and_offset() {
        let good = upsert_bytes(&sample(false));
        // kind, key (15), reverse key (15): owner_rg at 31, tcp_state at 41.
        let mut rg0 = good.clone();
        rg0[31..33].copy_from_slice(&[0, 0]);
        assert!(err_of(&rg0, 1).contains("owner_rg 0"));
        let mut state = good.clone();
        state[41] = 99;
        assert!(err_of(&state, 1).contains("tcp_state 99"));
        let mut proto = good.clone();
        proto[1 + 15 + 12] = 17;
        assert!(err_of(&proto, 1).contains("protocol differs"));
        let mut kind = good.clone();
        kind[0] = 9;
        assert!(err_of(&kind, 1).contains("unknown record kind 9"));
        assert!(err_of(&good[..50], 1).contains("truncated"));
        assert!(err_of(&good, 2).contains("1 records where count says 2"));
        assert!(err_of(&good, 0).contains("bytes after the 0 counted"));
        let two = [good.clone(), good[..10].to_vec()].concat();
        assert!(
            err_of(&two, 2).starts_with("record 1 at byte 94: truncated"),
            "{}",
            err_of(&two, 2)
        );
        assert_eq!(read_all(&[], 0).unwrap(), vec![]);
    }

    #[test]
    fn shifted_upsert_round_trips_and_a_shift_on_udp_is_refused() {
        for v6 in [false, true] {
            let s = SyncedSession {
                seq_shift: Some(0xdead_beef),
                ..sample(v6)
            };
            let mut b = BytesMut::new();
            put_upsert(&mut b, &s);
            assert_eq!(
                b[0],
                if v6 {
                    UPSERT_SHIFTED_V6
                } else {
                    UPSERT_SHIFTED_V4
                }
            );
            assert_eq!(Some(b.len()), record_len(b[0]));
            let got: Vec<_> = RecordReader::new(&b, 1).collect();
            assert_eq!(got, vec![Ok(Record::Upsert(s))]);
        }
        let mut udp = SyncedSession {
            seq_shift: Some(1),
            ..sample(false)
        };
        udp.key.proto = 17;
        udp.reverse.proto = 17;
        let mut b = BytesMut::new();
        put_upsert(&mut b, &udp);
        let got: Vec<_> = RecordReader::new(&b, 1).collect();
        assert!(
            matches!(&got[..], [Err(e)] if e.0.contains("sequence shift")),
            "{got:?}"
        );
    }

    #[test]
    fn ipv6_record_with_ipv4_mapped_address_is_rejected() {
        let mut s = sample(true);
        s.key.src = Ipv4Addr::new(10, 0, 0, 1).into();
        let mut out = BytesMut::new();
        // Written by hand: the writer picks the family from the source.
        out.put_u8(UPSERT_V6);
        put_key(&mut out, &s.key, false);
        put_key(&mut out, &s.reverse, false);
        out.put_slice(&upsert_bytes(&sample(true))[1 + 2 * 39..]);
        assert!(err_of(&out, 1).contains("IPv4-mapped"));
    }

    #[test]
    fn reader_stops_after_the_first_error() {
        let mut buf = vec![0xffu8];
        buf.extend(upsert_bytes(&sample(false)));
        let mut r = RecordReader::new(&buf, 2);
        assert!(r.next().unwrap().is_err());
        assert!(r.next().is_none());
    }

    use proptest::prelude::*;

    fn any_session() -> impl Strategy<Value = SyncedSession> {
        (
            any::<bool>(),
            any::<[u8; 16]>(),
            any::<[u8; 16]>(),
            any::<(u16, u16, u8, u16, u16)>(),
            1u16..,
            any::<(u16, u16, u32, u32, u64, u64)>(),
            any::<[u64; 4]>(),
            0u8..=10,
        )
            .prop_filter_map(
                "a known TCP state",
                |(v6, a, b, (sp, dp, pr, z1, z2), rg, (i, e, pol, to, age, idle), c, st)| {
                    let addr = |x: [u8; 16]| -> Addr {
                        if v6 {
                            let mut x = x;
                            x[0] = 0x20; // never IPv4-mapped
                            Addr(x)
                        } else {
                            Ipv4Addr::from([x[0], x[1], x[2], x[3]]).into()
                        }
                    };
                    Some(SyncedSession {
                        key: SessionKey::new(addr(a), sp, addr(b), dp, pr, ZoneId(z1)),
                        reverse: SessionKey::new(addr(b), dp, addr(a), sp, pr, ZoneId(z2)),
                        owner_rg: RgId(rg),
                        ingress_if: InterfaceId(i),
                        egress_if: InterfaceId(e),
                        policy: PolicyId(pol),
                        tcp_state: TcpState::from_u8(st)?,
                        timeout_ms: to,
                        age_ms: age,
                        idle_ms: idle,
                        counters: FlowCounters {
                            fwd_packets: c[0],
                            fwd_bytes: c[1],
                            rev_packets: c[2],
                            rev_bytes: c[3],
                        },
                        // A shift on TCP only (the reader refuses others).
                        seq_shift: (pr == 6 && to % 2 == 0).then_some(age as u32),
                    })
                },
            )
    }

    proptest! {
        #[test]
        fn any_valid_session_round_trips(s in any_session()) {
            let mut out = BytesMut::new();
            put_upsert(&mut out, &s);
            put_delete(&mut out, &s.reverse);
            prop_assert_eq!(
                read_all(&out, 2).unwrap(),
                vec![Record::Upsert(s.clone()), Record::Delete(s.reverse)]
            );
        }

        /// Arbitrary bytes from the network: an error or records, never a
        /// panic, and never more records than the buffer can hold.
        #[test]
        fn random_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..400), count in 0u32..8) {
            let n = RecordReader::new(&buf, count).filter(Result::is_ok).count();
            prop_assert!(n * record_len(DELETE_V4).unwrap() <= buf.len());
        }

        /// A valid record with one byte flipped decodes to an error or to a
        /// record that encodes back to exactly those bytes (nothing is
        /// read past a record or silently normalised).
        #[test]
        fn corrupted_records_fail_cleanly(s in any_session(), at in 0usize..142, x in 1u8..) {
            let mut out = BytesMut::new();
            put_upsert(&mut out, &s);
            let mut buf = out.to_vec();
            let at = at % buf.len();
            buf[at] ^= x;
            if let Ok(recs) = read_all(&buf, 1) {
                let mut again = BytesMut::new();
                for r in &recs {
                    match r {
                        Record::Upsert(s) => put_upsert(&mut again, s),
                        Record::Delete(k) => put_delete(&mut again, k),
                    }
                }
                prop_assert_eq!(again.to_vec(), buf);
            }
        }
    }
}
