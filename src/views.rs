//! What the show commands and the metrics endpoint report, as JSON (the
//! CLI formats it for humans) and Prometheus text.

use crate::daemon::{Node, link_up};
use serde_json::{Value, json};
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tandem_dataplane::afxdp::IoStats;
use tandem_dataplane::config::{Compiled, format_mac};
use tandem_dataplane::core::{CoreStats, DropReason};
use tandem_dataplane::session::{Origin, RemoveReason, SyncedSession, proto, read};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub fn proto_name(p: u8) -> String {
    match p {
        proto::TCP => "tcp".into(),
        proto::UDP => "udp".into(),
        proto::ICMP => "icmp".into(),
        proto::ICMPV6 => "icmp6".into(),
        n => n.to_string(),
    }
}

/// One session as `show security flow session` prints it.
pub fn session_json(s: &SyncedSession, origin: Option<Origin>, cfg: &Compiled) -> Value {
    let nat = s.nat();
    let ep = |a: &tandem_dataplane::session::Addr, p: u16| format!("{a}:{p}");
    let iface = |i: tandem_dataplane::session::InterfaceId| {
        cfg.iface(i).map_or("?".to_string(), |x| x.name.clone())
    };
    json!({
        "rg": s.owner_rg.0,
        "proto": proto_name(s.key.proto),
        "source": ep(&s.key.src, s.key.src_port),
        "destination": ep(&s.key.dst, s.key.dst_port),
        "ingress_zone": cfg.zone_name(s.key.zone),
        "egress_zone": cfg.zone_name(s.reverse.zone),
        "snat": nat.snat.map(|(a, p)| ep(&a, p)),
        "dnat": nat.dnat.map(|(a, p)| ep(&a, p)),
        "state": s.tcp_state.name(),
        "origin": match origin { Some(Origin::LocalOwned) => "local", Some(Origin::PeerSynced) => "peer-synced", None => "gone" },
        "ingress_interface": iface(s.ingress_if),
        "egress_interface": iface(s.egress_if),
        "policy": cfg.policies.get((s.policy.0 as usize).wrapping_sub(1)).map(|p| p.name.clone()),
        "age_ms": s.age_ms,
        "idle_ms": s.idle_ms,
        "timeout_ms": s.timeout_ms,
        "packets": [s.counters.fwd_packets, s.counters.rev_packets],
        "bytes": [s.counters.fwd_bytes, s.counters.rev_bytes],
    })
}

pub async fn status(node: &Node) -> Value {
    let (st, _) = node
        .cluster
        .status()
        .await
        .unwrap_or_else(|| (empty_status(node), Vec::new()));
    let sessions: Vec<(u16, usize)> = {
        let t = read(&node.table);
        node.cfg
            .rgs()
            .iter()
            .map(|rg| (rg.0, t.rg_len(*rg)))
            .collect()
    };
    let mut v = serde_json::to_value(&st).unwrap_or(Value::Null);
    if let Some(rgs) = v.get_mut("rgs").and_then(Value::as_array_mut) {
        for rg in rgs {
            let id = rg["rg"].as_u64().unwrap_or(0) as u16;
            let n = sessions
                .iter()
                .find(|(r, _)| *r == id)
                .map_or(0, |(_, n)| *n);
            rg["sessions"] = json!(n);
            rg["in_sync"] = json!(node.sync.rg_in_sync(tandem_proto::RgId(id)));
        }
    }
    v["cluster_id"] = json!(node.cfg.node.cluster_id);
    v["sync_connected"] = json!(node.sync.is_connected());
    let (dp, error) = dataplane_status(node);
    v["dataplane"] = dp;
    v["dataplane_error"] = json!(error);
    v["uptime_ms"] = json!((node.clock)().0.saturating_sub(node.started_ms));
    v
}

fn empty_status(node: &Node) -> tandem_cluster::election::ClusterStatus {
    tandem_cluster::election::ClusterStatus {
        node: node.cfg.node.id,
        peer_alive: false,
        peer_reason: "election not running".into(),
        in_startup_grace: false,
        paths: Vec::new(),
        rgs: Vec::new(),
        witness: None,
    }
}

/// Every zone's screen: its profile's name and counters (what it dropped
/// by kind, SYN cookies and proxy outcomes).
pub fn screens(cfg: &tandem_dataplane::config::Compiled) -> Value {
    let list: Vec<Value> = cfg
        .screens
        .iter()
        .flatten()
        .map(|s| {
            let counters: serde_json::Map<String, Value> = s
                .state
                .stats
                .named()
                .into_iter()
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect();
            json!({
                "zone": cfg.zone_name(s.zone),
                "screen": s.name,
                "counters": counters,
            })
        })
        .collect();
    Value::Array(list)
}

pub fn statistics(node: &Node) -> Value {
    let sync = node.sync.snapshot();
    let driver = node.cluster.stats();
    let (table, live, capacity, wheel_entries, reserved_ports, marks, pressure) = {
        let t = read(&node.table);
        (
            t.counters().clone(),
            t.len(),
            t.config().capacity,
            t.wheel_entries(),
            t.reserved_ports(),
            t.watermark_sessions(),
            t.under_pressure(),
        )
    };
    let removed: serde_json::Map<String, Value> = RemoveReason::ALL
        .iter()
        .map(|r| (r.as_str().to_string(), json!(table.removed(*r))))
        .collect();
    let (workers, xdp) = {
        let slot = node.dataplane.lock().expect("lock");
        let workers = slot
            .health
            .as_ref()
            .map(|h| h.workers())
            .unwrap_or_default();
        (workers, slot.xdp_counters())
    };
    let core = CoreStats::zeroed(node.compiled.policies.len());
    let io = IoStats::default();
    for w in &workers {
        core.add(&w.core);
        io.add(&w.io);
    }
    let per_worker: Vec<Value> = workers
        .iter()
        .map(|w| {
            json!({
                "worker": w.index,
                "state": w.state,
                "sockets": w.sockets.iter().map(|(d, q)| format!("{d}:{q}")).collect::<Vec<_>>(),
                "dataplane": core_json(node, &w.core),
                "io": io_json(&w.io),
            })
        })
        .collect();
    let dataplane = (!workers.is_empty()).then(|| core_json(node, &core));
    let io = (!workers.is_empty()).then(|| io_json(&io));
    json!({
        "heartbeats": driver,
        "sync": sync,
        "sessions": {
            "live": live,
            "capacity": capacity,
            // One timer entry per session, always (a growing gap is a bug).
            "wheel_entries": wheel_entries,
            "reserved_nat_ports": reserved_ports,
            "inserted_local": table.inserted_local,
            "inserted_peer": table.inserted_peer,
            "updated_peer": table.updated_peer,
            "removed": removed,
            "refused_capacity": table.refused_capacity,
            "refused_conflict": table.refused_conflict,
            "refused_ports_exhausted": table.refused_ports_exhausted,
            "refused_local_owned": table.refused_local_owned,
            "evicted_by_peer": table.evicted_by_peer,
            "close_events_dropped": table.close_events_dropped,
            "high_watermark": marks.0,
            "low_watermark": marks.1,
            "under_pressure": u64::from(pressure),
            "pressure_entered": table.pressure_entered,
            "pressure_left": table.pressure_left,
            "early_dropped": table.early_dropped,
            "closed_before_sync": table.closed_before_sync,
            "early_aged": table.early_aged,
        },
        "screens": screens(&node.compiled),
        "dataplane": dataplane,
        "io": io,
        "workers": per_worker,
        "xdp": xdp,
        "fabric": node.fabric_stats.snapshot(),
        "events": events(node),
    })
}

/// The dataplane part of the status, and the one-line error (None when it
/// runs and serves every port).
fn dataplane_status(node: &Node) -> (Value, Option<String>) {
    let ports = crate::daemon::dataplane_ports(node);
    let (running, error, workers) = {
        let slot = node.dataplane.lock().expect("lock");
        let workers = slot
            .health
            .as_ref()
            .map(|h| h.workers())
            .unwrap_or_default();
        (
            slot.running.as_ref().is_some_and(|d| d.health.running()),
            slot.error.clone(),
            workers,
        )
    };
    let failing: Vec<String> = ports
        .iter()
        .filter(|(_, ok, _)| !ok)
        .map(|(d, _, why)| format!("{d}: {why}"))
        .collect();
    let line = error
        .clone()
        .or_else(|| (!failing.is_empty()).then(|| failing.join("; ")));
    let v = json!({
        "running": running,
        "error": error,
        "workers": workers.iter().map(|w| json!({
            "worker": w.index,
            "state": w.state,
            "sockets": w.sockets.iter().map(|(d, q)| format!("{d}:{q}")).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "ports": ports.iter().map(|(d, ok, why)| json!({"device": d, "serving": ok, "reason": why})).collect::<Vec<_>>(),
    });
    (v, line)
}

fn core_json(node: &Node, c: &CoreStats) -> Value {
    let drops: serde_json::Map<String, Value> = DropReason::ALL
        .iter()
        .map(|r| (r.as_str().to_string(), json!(c.dropped(*r))))
        .collect();
    let policies: Vec<Value> = node
        .compiled
        .policies
        .iter()
        .zip(&c.policy_hits)
        .map(|(p, h)| json!({"policy": p.name, "hits": h.load(Ordering::Relaxed)}))
        .collect();
    json!({
        "rx": c.rx.load(Ordering::Relaxed),
        "tx": c.tx.load(Ordering::Relaxed),
        "replies": c.replies.load(Ordering::Relaxed),
        "to_fabric": c.to_fabric.load(Ordering::Relaxed),
        "sessions_created": c.sessions_created.load(Ordering::Relaxed),
        "deltas_dropped": c.deltas_dropped.load(Ordering::Relaxed),
        "held": c.held.load(Ordering::Relaxed),
        "held_sent": c.held_sent.load(Ordering::Relaxed),
        "fragments": c.fragments.load(Ordering::Relaxed),
        "fragments_held": c.fragments_held.load(Ordering::Relaxed),
        "fragments_released": c.fragments_released.load(Ordering::Relaxed),
        "tcp_challenge_acks": c.tcp_challenge_acks.load(Ordering::Relaxed),
        "tcp_passed": c.tcp_passed.load(Ordering::Relaxed),
        "tcp_mss_clamped": c.tcp_mss_clamped.load(Ordering::Relaxed),
        "nat_filter_admitted": c.nat_filter_admitted.load(Ordering::Relaxed),
        "exclusive_bursts": c.exclusive_bursts.load(Ordering::Relaxed),
        "outbox_dropped": c.outbox_dropped.load(Ordering::Relaxed),
        "drops": drops,
        "policies": policies,
    })
}

fn io_json(io: &IoStats) -> Value {
    let r = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    json!({
        "rx_frames": r(&io.rx_frames),
        "tx_frames": r(&io.tx_frames),
        "tx_ring_full": r(&io.tx_ring_full),
        "tx_no_frame": r(&io.tx_no_frame),
        "tx_no_socket": r(&io.tx_no_socket),
        "fabric_unhandled": r(&io.fabric_unhandled),
        "wakeup_errors": r(&io.wakeup_errors),
        "handoff_sent": r(&io.handoff_sent),
        "handoff_received": r(&io.handoff_received),
        "handoff_dropped": r(&io.handoff_dropped),
        "kernel_rx_dropped": r(&io.kernel_rx_dropped),
        "kernel_rx_ring_full": r(&io.kernel_rx_ring_full),
        "kernel_fill_ring_empty": r(&io.kernel_fill_ring_empty),
        "mirror_admitted": r(&io.mirror_admitted),
        "mirror_no_frame": r(&io.mirror_no_frame),
        "mirror_queue_full": r(&io.mirror_queue_full),
        "mirror_sampled_out": r(&io.mirror_sampled_out),
    })
}

pub async fn interfaces(node: &Node) -> Value {
    let roles = node.cluster.roles();
    let (st, _) = node
        .cluster
        .status()
        .await
        .unwrap_or_else(|| (empty_status(node), Vec::new()));
    let data: Vec<Value> = node
        .compiled
        .ifaces
        .iter()
        .map(|i| {
            let rg = i.rg();
            json!({
                "name": i.name,
                "device": i.device,
                "zone": node.compiled.zone_name(i.zone),
                "link_up": link_up(&i.device),
                "redundancy_group": rg.map(|r| r.0),
                "vmac": i.reth.as_ref().map(|r| format_mac(&r.1)),
                "addresses": i.prefixes().map(|p| p.to_string()).collect::<Vec<_>>(),
                "forwarding": rg.is_none_or(|r| roles.get(&r).is_some_and(|x| x.primary)),
            })
        })
        .collect();
    let map = node.fabric_map.load();
    let fstats = node.fabric_stats.snapshot();
    let fabric: Vec<Value> = node
        .fabric_ports
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let path = st.paths.iter().find(|p| p.path.name() == f.name);
            let link = map.links.get(i);
            json!({
                "name": f.name,
                "device": f.device,
                "link_up": link_up(&f.device),
                "heartbeat_up": path.is_some_and(|p| p.up),
                "last_heard_ms_ago": path.and_then(|p| p.last_heard_ms_ago),
                "forwarding_active": map.active == Some(i),
                "peer_mac": link.and_then(|l| l.peer_mac).map(|m| format_mac(&m)),
                "frames_sent": fstats.sent[i.min(1)],
                "frames_received": fstats.received[i.min(1)],
            })
        })
        .collect();
    let control = st.paths.iter().find(|p| p.path.name() == "control");
    json!({
        "control_link": {
            "local": node.cfg.control.local.to_string(),
            "peer": node.cfg.control.peer.to_string(),
            "sync_connected": node.sync.is_connected(),
            "heartbeat_up": control.is_some_and(|p| p.up),
        },
        "fabric": fabric,
        "interfaces": data,
    })
}

pub async fn information(node: &Node) -> Value {
    let (st, events) = node
        .cluster
        .status()
        .await
        .unwrap_or_else(|| (empty_status(node), Vec::new()));
    json!({"status": st, "events": events})
}

/// Minimal HTTP/1.0 endpoint serving Prometheus text on any path.
pub async fn serve_metrics(listener: tokio::net::TcpListener, node: Arc<Node>) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            continue;
        };
        let node = node.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), s.read(&mut buf)).await;
            let body = metrics(&node).await;
            let head = format!(
                "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(head.as_bytes()).await;
            let _ = s.write_all(body.as_bytes()).await;
        });
    }
}

pub async fn metrics(node: &Node) -> String {
    let mut m = String::new();
    let st = status(node).await;
    let stats = statistics(node);
    let mut line = |name: &str, labels: &str, v: u64| {
        let _ = writeln!(m, "tandem_{name}{{{labels}}} {v}");
    };
    for rg in st["rgs"].as_array().into_iter().flatten() {
        let l = format!("rg=\"{}\"", rg["rg"]);
        let primary = u64::from(rg["state"] == "Primary" || rg["state"] == "SecondaryHold");
        line("rg_primary", &l, primary);
        line("rg_epoch", &l, rg["epoch"].as_u64().unwrap_or(0));
        line("rg_sessions", &l, rg["sessions"].as_u64().unwrap_or(0));
        line("rg_in_sync", &l, u64::from(rg["in_sync"] == true));
    }
    line("peer_alive", "", u64::from(st["peer_alive"] == true));
    for (rg, s) in stats["sync"]["rgs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| Some((x.get(0)?, x.get(1)?)))
    {
        for (k, v) in s.as_object().into_iter().flatten() {
            line(
                &format!("sync_{k}"),
                &format!("rg=\"{rg}\""),
                v.as_u64().unwrap_or(0),
            );
        }
    }
    for (k, v) in stats["sync"]["conn"].as_object().into_iter().flatten() {
        line(&format!("conn_{k}"), "", v.as_u64().unwrap_or(0));
    }
    for (k, v) in stats["dataplane"]["drops"]
        .as_object()
        .into_iter()
        .flatten()
    {
        line("drops", &format!("reason=\"{k}\""), v.as_u64().unwrap_or(0));
    }
    for k in [
        "rx",
        "tx",
        "replies",
        "to_fabric",
        "sessions_created",
        "deltas_dropped",
    ] {
        line(
            &format!("dataplane_{k}"),
            "",
            stats["dataplane"][k].as_u64().unwrap_or(0),
        );
    }
    // Security events: produced / queued / dropped by reason, per kind;
    // per output sent / dropped.
    for (kind, c) in stats["events"]["kinds"].as_object().into_iter().flatten() {
        let l = format!("kind=\"{kind}\"");
        line("events_produced", &l, c["produced"].as_u64().unwrap_or(0));
        line("events_queued", &l, c["queued"].as_u64().unwrap_or(0));
        for (why, n) in c["dropped"].as_object().into_iter().flatten() {
            line(
                "events_dropped",
                &format!("{l},reason=\"{why}\""),
                n.as_u64().unwrap_or(0),
            );
        }
    }
    for sc in stats["screens"].as_array().into_iter().flatten() {
        let zone = sc["zone"].as_str().unwrap_or("");
        for (k, n) in sc["counters"].as_object().into_iter().flatten() {
            line(
                "screen",
                &format!("zone=\"{zone}\",counter=\"{k}\""),
                n.as_u64().unwrap_or(0),
            );
        }
    }
    for o in stats["events"]["outputs"].as_array().into_iter().flatten() {
        let l = format!("output=\"{}\"", o["output"].as_str().unwrap_or(""));
        line("log_sent", &l, o["sent"].as_u64().unwrap_or(0));
        line("log_dropped", &l, o["dropped"].as_u64().unwrap_or(0));
    }
    for (k, v) in stats["sessions"].as_object().into_iter().flatten() {
        match v.as_object() {
            // Removals by reason.
            Some(by) => {
                for (reason, n) in by {
                    line(
                        &format!("sessions_{k}"),
                        &format!("reason=\"{reason}\""),
                        n.as_u64().unwrap_or(0),
                    );
                }
            }
            None => line(&format!("sessions_{k}"), "", v.as_u64().unwrap_or(0)),
        }
    }
    for w in stats["workers"].as_array().into_iter().flatten() {
        let l = format!("worker=\"{}\"", w["worker"]);
        for k in [
            "rx",
            "tx",
            "to_fabric",
            "sessions_created",
            "exclusive_bursts",
        ] {
            line(
                &format!("worker_{k}"),
                &l,
                w["dataplane"][k].as_u64().unwrap_or(0),
            );
        }
        line("worker_running", &l, u64::from(w["state"] == "running"));
    }
    for p in st["dataplane"]["ports"].as_array().into_iter().flatten() {
        line(
            "dataplane_port_serving",
            &format!("device={}", p["device"]),
            u64::from(p["serving"] == true),
        );
    }
    for (k, v) in stats["xdp"].as_object().into_iter().flatten() {
        line(&format!("xdp_{k}"), "", v.as_u64().unwrap_or(0));
    }
    for (k, v) in stats["io"].as_object().into_iter().flatten() {
        line(&format!("io_{k}"), "", v.as_u64().unwrap_or(0));
    }
    let f = node.fabric_stats.snapshot();
    for (i, link) in ["fab0", "fab1"].iter().enumerate() {
        let l = format!("link=\"{link}\"");
        line("fabric_frames_sent", &l, f.sent[i]);
        line("fabric_frames_received", &l, f.received[i]);
    }
    for r in &f.by_rg {
        let l = format!("rg=\"{}\"", r.rg);
        line("fabric_rg_frames_sent", &l, r.sent);
        line("fabric_rg_frames_received", &l, r.received);
    }
    for (reason, v) in [
        ("no_link", f.drop_no_link),
        ("no_peer_mac", f.drop_no_peer_mac),
        ("stale_epoch", f.drop_stale_epoch),
        ("bad_header", f.drop_bad_header),
        ("loop", f.drop_loop),
        ("not_owner_map", f.drop_not_owner_map),
    ] {
        line("fabric_drops", &format!("reason=\"{reason}\""), v);
    }
    for (i, path) in ["control", "fab0", "fab1"].iter().enumerate() {
        let l = format!("path=\"{path}\"");
        line(
            "heartbeats_sent",
            &l,
            stats["heartbeats"]["heartbeats_sent"][i]
                .as_u64()
                .unwrap_or(0),
        );
        line(
            "heartbeats_received",
            &l,
            stats["heartbeats"]["heartbeats_received"][i]
                .as_u64()
                .unwrap_or(0),
        );
    }
    m
}

/// Security-event counters: per kind produced, queued and dropped by
/// reason; per output sent and dropped.
fn events(node: &Node) -> Value {
    use tandem_dataplane::events::{EventDrop, EventKind};
    let stats = &node.events.stats;
    let kinds: serde_json::Map<String, Value> = EventKind::ALL
        .iter()
        .map(|&k| {
            let (produced, queued) = stats.count(k);
            let dropped: serde_json::Map<String, Value> = EventDrop::ALL
                .iter()
                .map(|&d| (d.as_str().to_string(), json!(stats.dropped(k, d))))
                .collect();
            (
                k.as_str().to_string(),
                json!({"produced": produced, "queued": queued, "dropped": dropped}),
            )
        })
        .collect();
    let outputs: Vec<Value> = node
        .security_log
        .outputs
        .iter()
        .map(|(name, s)| {
            json!({
                "output": name,
                "sent": s.sent.load(Ordering::Relaxed),
                "dropped": s.dropped.load(Ordering::Relaxed),
            })
        })
        .collect();
    json!({"kinds": kinds, "outputs": outputs})
}

/// `show security log`: the newest events, oldest first.
pub fn security_log(node: &Node) -> Value {
    Value::Array(node.security_log.recent())
}
