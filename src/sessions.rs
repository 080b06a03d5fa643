//! Operator selections of sessions: the filters of `show security flow
//! session` and `clear security flow session`, the summary, and the clear
//! itself (on the primary, with companions, the deletes synced).

use serde_json::{Value, json};
use std::collections::BTreeMap;
use tandem_dataplane::config::Prefix;
use tandem_dataplane::delta::DeltaProducer;
use tandem_dataplane::session::{
    Origin, RemoveReason, SessionKey, SessionRecord, SessionTable, SharedTable, lock, proto, read,
};
use tandem_proto::pb;
use tandem_proto::{RgId, RoleMap};

/// Keys removed per hold of the table's write side: a large clear never
/// stalls forwarding for long.
const CLEAR_CHUNK: usize = 1024;

/// Which sessions an operator command is about. Matches the session as its
/// first packet arrived (before NAT): source, destination, protocol and
/// destination port of the forward key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionFilter {
    pub rg: Option<RgId>,
    pub source: Option<Prefix>,
    pub destination: Option<Prefix>,
    pub protocol: Option<u8>,
    pub destination_port: Option<u16>,
}

impl SessionFilter {
    /// From the control request (empty strings and zeros: no filter).
    pub fn from_query(q: &pb::SessionQuery) -> Result<SessionFilter, String> {
        let prefix = |s: &str| (!s.is_empty()).then(|| s.parse::<Prefix>()).transpose();
        Ok(SessionFilter {
            rg: match q.rg {
                0 => None,
                n => Some(RgId(
                    u16::try_from(n).map_err(|_| format!("redundancy group {n} out of range"))?,
                )),
            },
            source: prefix(&q.source_prefix)?,
            destination: prefix(&q.destination_prefix)?,
            protocol: match q.protocol {
                0 => None,
                p => Some(u8::try_from(p).map_err(|_| format!("protocol {p} out of range"))?),
            },
            destination_port: match q.destination_port {
                0 => None,
                p => Some(u16::try_from(p).map_err(|_| format!("port {p} out of range"))?),
            },
        })
    }

    pub fn is_empty(&self) -> bool {
        *self == SessionFilter::default()
    }

    pub fn matches_key(&self, rg: RgId, k: &SessionKey) -> bool {
        self.rg.is_none_or(|r| r == rg)
            && self.source.is_none_or(|p| p.contains(&k.src))
            && self.destination.is_none_or(|p| p.contains(&k.dst))
            && self.protocol.is_none_or(|p| p == k.proto)
            && self.destination_port.is_none_or(|p| p == k.dst_port)
    }

    pub fn matches(&self, r: &SessionRecord) -> bool {
        self.matches_key(r.owner_rg, &r.key)
    }

    /// The RGs the filter covers: its one RG, or every RG of the table.
    pub fn rgs(&self, t: &SessionTable) -> Vec<RgId> {
        self.rg.map_or_else(|| t.rgs(), |r| vec![r])
    }
}

/// Parses the CLI words after `flow session` into a query: `redundancy-group
/// N`, `source-prefix P`, `destination-prefix P`, `protocol tcp|udp|icmp|
/// icmp6|N`, `destination-port N`, and the bare words `summary` and `all`.
pub fn parse_words(words: &[&str]) -> Result<(pb::SessionQuery, bool), String> {
    let mut q = pb::SessionQuery::default();
    let mut all = false;
    let mut it = words.iter();
    while let Some(w) = it.next() {
        let mut value = || {
            it.next()
                .copied()
                .ok_or_else(|| format!("{w} needs a value"))
        };
        match *w {
            "redundancy-group" => {
                let v = value()?;
                q.rg = v
                    .parse()
                    .map_err(|_| format!("bad redundancy group {v:?}"))?;
            }
            "source-prefix" => {
                let v = value()?;
                v.parse::<Prefix>()?;
                q.source_prefix = v.to_string();
            }
            "destination-prefix" => {
                let v = value()?;
                v.parse::<Prefix>()?;
                q.destination_prefix = v.to_string();
            }
            "protocol" => {
                let v = value()?;
                q.protocol = match v {
                    "tcp" => u32::from(proto::TCP),
                    "udp" => u32::from(proto::UDP),
                    "icmp" => u32::from(proto::ICMP),
                    "icmp6" => u32::from(proto::ICMPV6),
                    n => n.parse::<u8>().map(u32::from).map_err(|_| {
                        format!("bad protocol {n:?} (tcp, udp, icmp, icmp6 or 0-255)")
                    })?,
                };
            }
            "destination-port" => {
                let v = value()?;
                q.destination_port = v
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0)
                    .map(u32::from)
                    .ok_or_else(|| format!("bad port {v:?}"))?;
            }
            "summary" => q.summary = true,
            "all" => all = true,
            other => {
                return Err(format!(
                    "unknown word {other:?}: expected redundancy-group, source-prefix, destination-prefix, protocol, destination-port, summary or all"
                ));
            }
        }
    }
    Ok((q, all))
}

/// Counts of the matching sessions: per RG, TCP state, protocol, NAT kind
/// and origin.
pub fn summary(t: &SessionTable, filter: &SessionFilter) -> Value {
    let mut by: BTreeMap<&str, BTreeMap<String, u64>> = BTreeMap::new();
    let mut total = 0u64;
    let rgs = filter.rgs(t);
    for rg in rgs {
        for r in t.export_rg(rg).filter(|r| filter.matches(r)) {
            total += 1;
            let nat = r.nat();
            let kind = match (nat.snat.is_some(), nat.dnat.is_some()) {
                (false, false) => "none",
                (true, false) => "snat",
                (false, true) => "dnat",
                (true, true) => "snat+dnat",
            };
            let origin = match t.origin(r) {
                Origin::LocalOwned => "local",
                Origin::PeerSynced => "peer-synced",
            };
            for (axis, v) in [
                ("redundancy_group", rg.0.to_string()),
                ("state", r.tcp_state.name().to_string()),
                ("protocol", crate::views::proto_name(r.key.proto)),
                ("nat", kind.to_string()),
                ("origin", origin.to_string()),
            ] {
                *by.entry(axis).or_default().entry(v).or_default() += 1;
            }
        }
    }
    json!({ "sessions": total, "by": by })
}

/// What a clear did.
#[derive(Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Cleared {
    /// Sessions removed (each with its companions).
    pub cleared: u64,
    /// Of those, deletes queued to the peer (the rest it never held).
    pub deletes_synced: u64,
    /// Deletes the full delta queue could not take: the peer converges at
    /// the next bulk.
    pub deletes_dropped: u64,
    /// RGs left alone because this node is not their primary.
    pub not_primary: Vec<u16>,
}

/// Removes the matching sessions of the RGs this node is primary for:
/// each with its companions (reverse entry, DNAT entries, NAT port), a
/// delete delta for every one the peer may hold.
pub fn clear(
    table: &SharedTable,
    deltas: &DeltaProducer,
    roles: &RoleMap,
    filter: &SessionFilter,
) -> Cleared {
    let mut out = Cleared::default();
    let rgs = filter.rgs(&read(table));
    for rg in rgs {
        if !roles.get(&rg).is_some_and(|r| r.primary) {
            out.not_primary.push(rg.0);
            continue;
        }
        let keys: Vec<SessionKey> = read(table)
            .export_rg(rg)
            .filter(|r| filter.matches(r))
            .map(|r| r.key)
            .collect();
        for chunk in keys.chunks(CLEAR_CHUNK) {
            let mut sent = Vec::new();
            {
                let mut t = lock(table);
                for k in chunk {
                    let Some(h) = t.lookup_forward(k) else {
                        continue;
                    };
                    if let Some(r) = t.remove(h, RemoveReason::Closed) {
                        out.cleared += 1;
                        if r.sent_to_peer() {
                            sent.push(r.key);
                        }
                    }
                }
            }
            for k in sent {
                if deltas.push_delete(rg, k) {
                    out.deletes_synced += 1;
                } else {
                    out.deletes_dropped += 1;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use tandem_dataplane::delta::delta_queues;
    use tandem_dataplane::session::{
        InterfaceId, Millis, NewSession, PolicyId, SnatRequest, TableConfig, TcpState, ZoneId,
        shared,
    };
    use tandem_proto::{Epoch, RgRole};

    const RG1: RgId = RgId(1);

    fn session(src: [u8; 4], dport: u16, proto: u8, snat: bool, dnat: bool) -> NewSession {
        NewSession {
            key: SessionKey::new(
                Ipv4Addr::from(src),
                40000,
                Ipv4Addr::new(203, 0, 113, 9),
                dport,
                proto,
                ZoneId(1),
            ),
            egress_zone: ZoneId(2),
            snat: snat.then(|| SnatRequest {
                addr: Ipv4Addr::new(198, 51, 100, 1).into(),
                ports: 1024..=65535,
            }),
            dnat: dnat.then(|| (Ipv4Addr::new(10, 200, 0, 5).into(), 80)),
            ingress_if: InterfaceId(1),
            egress_if: InterfaceId(2),
            owner_rg: RG1,
            policy: PolicyId(1),
            tcp_state: TcpState::Established,
        }
    }

    #[test]
    fn prefix_filters_match_their_family_only() {
        let (q, _) = parse_words(&["source-prefix", "10.1.0.0/16"]).unwrap();
        let f = SessionFilter::from_query(&q).unwrap();
        let key = |src: std::net::IpAddr| {
            SessionKey::new(
                src,
                1,
                Ipv4Addr::new(203, 0, 113, 9),
                443,
                proto::TCP,
                ZoneId(1),
            )
        };
        assert!(f.matches_key(RG1, &key("10.1.200.3".parse().unwrap())));
        assert!(!f.matches_key(RG1, &key("10.2.0.1".parse().unwrap())));
        assert!(
            !f.matches_key(RG1, &key("2001:db8::1".parse().unwrap())),
            "v6 never matches a v4 prefix"
        );
        let (q, _) = parse_words(&[
            "destination-prefix",
            "2001:db8::/32",
            "redundancy-group",
            "2",
        ])
        .unwrap();
        let f = SessionFilter::from_query(&q).unwrap();
        let k = SessionKey::new(
            "2001:db8::5".parse::<std::net::IpAddr>().unwrap(),
            1,
            "2001:db8:1::9".parse::<std::net::IpAddr>().unwrap(),
            443,
            proto::TCP,
            ZoneId(1),
        );
        assert!(f.matches_key(RgId(2), &k));
        assert!(!f.matches_key(RG1, &k), "another RG");
        assert!(
            parse_words(&["source-prefix", "10.0.0.0/33"])
                .unwrap_err()
                .contains("exceeds 32")
        );
    }

    #[test]
    fn cli_words_become_a_query_and_bad_words_say_why() {
        let (q, all) = parse_words(&[
            "redundancy-group",
            "1",
            "source-prefix",
            "10.1.0.0/16",
            "protocol",
            "tcp",
            "destination-port",
            "443",
            "summary",
        ])
        .unwrap();
        assert_eq!(
            (
                q.rg,
                q.source_prefix.as_str(),
                q.protocol,
                q.destination_port,
                q.summary,
                all
            ),
            (1, "10.1.0.0/16", 6, 443, true, false)
        );
        assert!(
            parse_words(&["protocol", "sctpx"])
                .unwrap_err()
                .contains("bad protocol")
        );
        assert!(
            parse_words(&["destination-port"])
                .unwrap_err()
                .contains("needs a value")
        );
        assert!(parse_words(&["source-prefix", "10.0.0.0/40"]).is_err());
        assert!(
            parse_words(&["frobnicate"])
                .unwrap_err()
                .contains("unknown word")
        );
        assert!(parse_words(&["all"]).unwrap().1);
    }

    #[test]
    fn clear_removes_matching_sessions_with_companions_and_syncs_the_deletes() {
        let table = shared(SessionTable::new(TableConfig::default()));
        let (producer, mut consumers) = delta_queues(&[RG1], 1024);
        let now = Millis(1000);
        {
            let mut t = lock(&table);
            t.promote_rg(RG1);
            for i in 0..10u8 {
                let h = t
                    .insert(
                        session([10, 1, 0, i], 443, proto::TCP, i % 2 == 0, i % 3 == 0),
                        now,
                    )
                    .unwrap();
                if i < 5 {
                    t.get(h).unwrap().mark_sent();
                }
            }
            t.insert(session([10, 2, 0, 1], 443, proto::TCP, true, false), now)
                .unwrap();
            t.insert(session([10, 1, 0, 50], 53, proto::UDP, true, false), now)
                .unwrap();
        }
        let (q, _) = parse_words(&["source-prefix", "10.1.0.0/16", "protocol", "tcp"]).unwrap();
        let filter = SessionFilter::from_query(&q).unwrap();
        let st = summary(&read(&table), &filter);
        assert_eq!(st["sessions"], 10);
        assert_eq!(st["by"]["nat"]["snat"], 3, "{st}");
        let mut roles = RoleMap::new();
        roles.insert(
            RG1,
            RgRole {
                primary: true,
                epoch: Epoch(2),
            },
        );
        let out = clear(&table, &producer, &roles, &filter);
        assert_eq!(
            out,
            Cleared {
                cleared: 10,
                deletes_synced: 5,
                deletes_dropped: 0,
                not_primary: vec![]
            }
        );
        let t = read(&table);
        assert_eq!(
            t.rg_len(RG1),
            2,
            "the other prefix and the UDP session stay"
        );
        t.verify_invariants().expect("no companion left behind");
        drop(t);
        let mut deltas = Vec::new();
        consumers[0].try_recv_many(&mut deltas, 100);
        assert_eq!(deltas.len(), 5, "one delete per session the peer held");
    }

    #[test]
    fn clear_leaves_rgs_this_node_is_not_primary_for() {
        let table = shared(SessionTable::new(TableConfig::default()));
        let (producer, _consumers) = delta_queues(&[RG1], 16);
        lock(&table)
            .insert(
                session([10, 1, 0, 1], 443, proto::TCP, false, false),
                Millis(1),
            )
            .unwrap();
        let mut roles = RoleMap::new();
        roles.insert(
            RG1,
            RgRole {
                primary: false,
                epoch: Epoch(3),
            },
        );
        let out = clear(&table, &producer, &roles, &SessionFilter::default());
        assert_eq!((out.cleared, out.not_primary), (0, vec![1]));
        assert_eq!(read(&table).rg_len(RG1), 1);
    }
}
