//! Publishes the fabric forwarding map the dataplane worker reads: per RG
//! whether the peer owns it (and its epoch), per fabric link its health and
//! MACs, and the active link (fab0 preferred; see `LinkSelector`).
//!
//! A link is healthy when its device is up here *and* the peer's heartbeats
//! arrive on it: the first catches a local failure at once, the second a
//! failure anywhere along the path. The peer's fabric MAC comes from the
//! kernel's neighbor table, which the heartbeats keep fresh.

use crate::daemon::{Node, link_up};
use arc_swap::ArcSwap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;
use tandem_cluster::election::ClusterStatus;
use tandem_dataplane::os;
use tandem_fabric::{FabricMap, Link, LinkSelector, RgOwner};
use tandem_proto::RoleMap;
use tracing::{info, warn};

/// How often the map is rebuilt from the local link states and the role
/// map: the bound on how long the dataplane uses a link that went down
/// here, or a stale owner.
pub const PUBLISH_INTERVAL: Duration = Duration::from_millis(10);

/// Heartbeat health changes at heartbeat granularity; asking the election
/// for it every tenth rebuild is enough.
const STATUS_EVERY: u32 = 10;

/// One configured fabric link as the dataplane sees it.
#[derive(Clone, Debug)]
pub struct FabricPort {
    pub name: String,
    pub device: String,
    /// The dataplane's logical interface id for the device.
    pub port: u16,
    pub peer: IpAddr,
}

/// The pure part: the map for the given roles and link states.
pub fn build_map(roles: &RoleMap, links: Vec<Link>, active: Option<usize>) -> FabricMap {
    FabricMap {
        rgs: roles
            .iter()
            .map(|(rg, r)| {
                (
                    *rg,
                    RgOwner {
                        peer_owns: !r.primary,
                        epoch: r.epoch,
                    },
                )
            })
            .collect(),
        links,
        active,
    }
}

/// Whether the peer's heartbeats arrive on the fabric path `name`.
fn heartbeat_up(st: &ClusterStatus, name: &str) -> bool {
    st.paths.iter().any(|p| p.path.name() == name && p.up)
}

/// The MAC of `ip` in this namespace's IPv4 neighbor table, if complete.
pub fn neighbor_mac(arp_table: &str, ip: Ipv4Addr, device: &str) -> Option<[u8; 6]> {
    // IP address  HW type  Flags  HW address  Mask  Device
    arp_table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let flags = u32::from_str_radix(f.get(2)?.trim_start_matches("0x"), 16).ok()?;
        if f.len() < 6 || f[0].parse::<Ipv4Addr>().ok()? != ip || f[5] != device || flags & 2 == 0 {
            return None;
        }
        let mut mac = [0u8; 6];
        let mut parts = f[3].split(':');
        for b in &mut mac {
            *b = u8::from_str_radix(parts.next()?, 16).ok()?;
        }
        (mac != [0; 6]).then_some(mac)
    })
}

/// Rebuilds and publishes the map every `PUBLISH_INTERVAL` (only when it
/// changed, so the worker's loads stay cheap).
pub async fn publish(
    node: Arc<Node>,
    ports: Vec<FabricPort>,
    map: Arc<ArcSwap<FabricMap>>,
    hold_down_ms: u64,
) {
    let mut selector = LinkSelector::new(hold_down_ms);
    let mut tick = tokio::time::interval(PUBLISH_INTERVAL);
    let mut last_active = None;
    let mut status: Option<ClusterStatus> = None;
    let mut arp = String::new();
    let mut local_macs = Vec::new();
    for round in 0u32.. {
        tick.tick().await;
        if round.is_multiple_of(STATUS_EVERY) || status.is_none() {
            let Some((st, _)) = node.cluster.status().await else {
                return;
            };
            status = Some(st);
            arp = std::fs::read_to_string("/proc/net/arp").unwrap_or_default();
            local_macs = ports
                .iter()
                .map(|p| os::mac(&p.device).unwrap_or([0; 6]))
                .collect();
        }
        let st = status.as_ref().expect("set above");
        let links: Vec<Link> = ports
            .iter()
            .zip(&local_macs)
            .map(|(p, mac)| Link {
                port: p.port,
                up: link_up(&p.device) && heartbeat_up(st, &p.name),
                local_mac: *mac,
                peer_mac: match p.peer {
                    IpAddr::V4(ip) => neighbor_mac(&arp, ip, &p.device),
                    IpAddr::V6(_) => None,
                },
            })
            .collect();
        let up: Vec<bool> = links.iter().map(|l| l.up).collect();
        let active = selector.update(&up, (node.clock)().0);
        if active != last_active {
            match active.and_then(|i| ports.get(i)) {
                Some(p) => info!(link = %p.name, "fabric forwarding link"),
                None if !ports.is_empty() => {
                    warn!("no fabric link usable: frames for peer-owned RGs are dropped")
                }
                None => {}
            }
            last_active = active;
        }
        let next = build_map(&node.cluster.roles(), links, active);
        if **map.load() != next {
            map.store(Arc::new(next));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_proto::{Epoch, RgId, RgRole};

    const ARP: &str =
        "IP address       HW type     Flags       HW address            Mask     Device
10.99.0.2        0x1         0x2         0e:11:22:33:44:55     *        fab0
10.99.1.2        0x1         0x0         00:00:00:00:00:00     *        fab1
10.99.2.2        0x1         0x2         0e:aa:bb:cc:dd:ee     *        other
";

    #[test]
    fn neighbor_mac_reads_complete_entries_of_the_device_only() {
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(
            neighbor_mac(ARP, ip("10.99.0.2"), "fab0"),
            Some([0x0e, 0x11, 0x22, 0x33, 0x44, 0x55])
        );
        assert_eq!(
            neighbor_mac(ARP, ip("10.99.1.2"), "fab1"),
            None,
            "incomplete"
        );
        assert_eq!(
            neighbor_mac(ARP, ip("10.99.2.2"), "fab0"),
            None,
            "other device"
        );
        assert_eq!(neighbor_mac(ARP, ip("10.99.9.9"), "fab0"), None, "absent");
        assert_eq!(
            neighbor_mac("garbage\n1 2\n", ip("10.99.0.2"), "fab0"),
            None
        );
    }

    #[test]
    fn map_marks_rgs_this_node_does_not_lead_as_peer_owned() {
        let roles: RoleMap = [
            (
                RgId(1),
                RgRole {
                    primary: true,
                    epoch: Epoch(7),
                },
            ),
            (
                RgId(2),
                RgRole {
                    primary: false,
                    epoch: Epoch(4),
                },
            ),
        ]
        .into();
        let m = build_map(&roles, Vec::new(), None);
        assert_eq!(
            m.rgs[&RgId(1)],
            RgOwner {
                peer_owns: false,
                epoch: Epoch(7)
            }
        );
        assert_eq!(
            m.rgs[&RgId(2)],
            RgOwner {
                peer_owns: true,
                epoch: Epoch(4)
            }
        );
    }
}
