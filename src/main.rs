//! `tandem`: the chassis-cluster daemon, its CLI and the network-namespace
//! lab.
//!
//! ```text
//! tandem node --config FILE
//! tandem config check FILE
//! tandem show chassis cluster status|statistics|interfaces|information [--json]
//! tandem show security flow session [redundancy-group N] [--peer-diff --peer-socket PATH] [--json]
//! tandem request chassis cluster failover redundancy-group N node M
//! tandem request chassis cluster failover reset redundancy-group N
//! tandem request chassis dataplane stop|start|restart
//! tandem witness --listen ADDR --key-file FILE --cluster-id N --ca FILE --cert FILE --key FILE [--node-names node0,node1] [--state-dir DIR] [--lease-ms MS] [--init]
//! tandem lab up|down|demo [--peer-compare] [--json]
//! tandem lab peer-compare [--json]
//! tandem lab cps [--json]
//! ```
//! Show and request commands talk to the node's control socket
//! (`--socket PATH`, default /run/tandem/tandem.sock).

mod config;
mod control;
mod daemon;
mod fabric;
mod lab;
mod logging;
mod sessions;
mod views;

use serde_json::Value;
use std::path::PathBuf;
use std::process::ExitCode;
use tandem_dataplane::alloc::TandemAlloc;
use tandem_proto::pb;

#[global_allocator]
static GLOBAL: TandemAlloc = TandemAlloc;

const USAGE: &str = "usage:
  tandem node --config FILE
  tandem config check FILE
  tandem show chassis cluster status|statistics|interfaces|information [--json] [--socket PATH]
  tandem show security flow session [redundancy-group N] [source-prefix P] [destination-prefix P] [protocol X] [destination-port N] [summary] [--peer-diff --peer-socket PATH] [--json] [--socket PATH]
  tandem clear security flow session [redundancy-group N] [source-prefix P] [destination-prefix P] [protocol X] [destination-port N] | all [--json] [--socket PATH]
  tandem show security log [--follow] [--json] [--socket PATH]
  tandem show security screen statistics [zone Z] [--json] [--socket PATH]
  tandem request chassis cluster failover redundancy-group N node M [--socket PATH]
  tandem request chassis cluster failover reset redundancy-group N [--socket PATH]
  tandem request chassis dataplane stop|start|restart [--socket PATH]
  tandem witness --listen ADDR --key-file FILE --cluster-id N --ca FILE --cert FILE --key FILE [--node-names node0,node1] [--state-dir DIR] [--lease-ms MS] [--init]
  tandem lab up|down|demo [--peer-compare] [--json]
  tandem lab peer-compare [--json]
  tandem lab cps [--json]";

/// Options that may appear anywhere on the command line.
struct Opts {
    json: bool,
    socket: PathBuf,
    words: Vec<String>,
    flags: std::collections::HashMap<String, String>,
    peer_diff: bool,
    peer_compare: bool,
}

fn parse_opts() -> Result<Opts, String> {
    let mut o = Opts {
        json: false,
        socket: daemon::default_socket(),
        words: Vec::new(),
        flags: Default::default(),
        peer_diff: false,
        peer_compare: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--json" => o.json = true,
            "--peer-diff" => o.peer_diff = true,
            "--peer-compare" => o.peer_compare = true,
            // A switch without a value.
            "--init" => {
                o.flags.insert("init".into(), String::new());
            }
            "-h" | "--help" => return Err(USAGE.into()),
            f if f.starts_with("--") => {
                let v = it.next().ok_or_else(|| format!("{f} needs a value"))?;
                if f == "--socket" {
                    o.socket = PathBuf::from(&v);
                }
                o.flags.insert(f.trim_start_matches("--").to_string(), v);
            }
            _ => o.words.push(a),
        }
    }
    Ok(o)
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("TANDEM_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .try_init();
}

fn main() -> ExitCode {
    let opts = match parse_opts() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let words: Vec<&str> = opts.words.iter().map(String::as_str).collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result: Result<(), String> = match words.as_slice() {
        ["node"] => {
            init_tracing();
            let Some(path) = opts.flags.get("config") else {
                eprintln!("tandem node needs --config FILE");
                return ExitCode::from(2);
            };
            match config::NodeConfig::load(path.as_ref()) {
                Ok(cfg) => rt.block_on(daemon::run(cfg)),
                Err(e) => Err(e.to_string()),
            }
        }
        ["config", "check", file] => match config::NodeConfig::load(file.as_ref()) {
            Ok(cfg) => {
                println!(
                    "{file}: OK (node{}, cluster {}, {} redundancy groups, {} interfaces)",
                    cfg.node.id,
                    cfg.node.cluster_id,
                    cfg.redundancy_group.len(),
                    cfg.dataplane.interfaces.len()
                );
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        },
        ["show", "chassis", "cluster", what] => rt.block_on(show_cluster(&opts, what)),
        ["show", "security", "log"] => rt.block_on(show_security_log(&opts, false)),
        ["show", "security", "log", "--follow"] => rt.block_on(show_security_log(&opts, true)),
        ["show", "security", "screen", "statistics"] => {
            rt.block_on(show_screen_statistics(&opts, None))
        }
        ["show", "security", "screen", "statistics", "zone", zone] => {
            rt.block_on(show_screen_statistics(&opts, Some(zone)))
        }
        ["show", "security", "flow", "session", rest @ ..] => {
            rt.block_on(show_sessions(&opts, rest))
        }
        ["clear", "security", "flow", "session", rest @ ..] => {
            rt.block_on(clear_sessions(&opts, rest))
        }
        [
            "request",
            "chassis",
            "cluster",
            "failover",
            "redundancy-group",
            rg,
            "node",
            n,
        ] => rt.block_on(request_failover(&opts, rg, Some(n))),
        [
            "request",
            "chassis",
            "cluster",
            "failover",
            "reset",
            "redundancy-group",
            rg,
        ] => rt.block_on(request_failover(&opts, rg, None)),
        ["request", "chassis", "dataplane", action] => {
            rt.block_on(request_dataplane(&opts, action))
        }
        ["witness"] => {
            init_tracing();
            rt.block_on(witness(&opts))
        }
        ["lab", cmd] => {
            init_tracing();
            lab::main(cmd, opts.json, opts.peer_compare, &rt)
        }
        _ => Err(USAGE.into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn req(cmd: pb::control_request::Cmd) -> pb::ControlRequest {
    pb::ControlRequest { cmd: Some(cmd) }
}

async fn one(opts: &Opts, r: pb::ControlRequest) -> Result<Value, String> {
    let mut out = String::new();
    control::request(&opts.socket, r, |j| out.push_str(j)).await?;
    serde_json::from_str(&out).map_err(|e| format!("bad reply: {e}"))
}

/// The screens' counters (of one zone, or all), from the statistics:
/// JSON, or one block per zone.
async fn show_screen_statistics(opts: &Opts, zone: Option<&str>) -> Result<(), String> {
    let v = one(
        opts,
        req(pb::control_request::Cmd::Statistics(pb::Empty {})),
    )
    .await?;
    let screens: Vec<&Value> = v["screens"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| zone.is_none_or(|z| s["zone"] == z))
        .collect();
    if let Some(z) = zone
        && screens.is_empty()
    {
        return Err(format!("zone {z} has no screen"));
    }
    if opts.json {
        println!("{}", Value::Array(screens.into_iter().cloned().collect()));
        return Ok(());
    }
    print!("{}", format_screens(&screens));
    Ok(())
}

/// Human form of screen statistics, in the SRX layout.
pub fn format_screens(screens: &[&Value]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    for sc in screens {
        let _ = writeln!(
            s,
            "Screen statistics:\n  Zone: {}    Screen: {}\n  {:<32} {:>14}",
            sc["zone"].as_str().unwrap_or("?"),
            sc["screen"].as_str().unwrap_or("?"),
            "IDS attack type",
            "Statistics"
        );
        for (k, n) in sc["counters"].as_object().into_iter().flatten() {
            let _ = writeln!(s, "  {k:<32} {:>14}", n.as_u64().unwrap_or(0));
        }
    }
    s
}

/// The daemon's recent security events: JSON, or one line each; with
/// `follow`, new ones as they come (by their sequence numbers).
async fn show_security_log(opts: &Opts, follow: bool) -> Result<(), String> {
    let mut last = 0u64;
    loop {
        let v = one(
            opts,
            req(pb::control_request::Cmd::SecurityLog(pb::Empty {})),
        )
        .await?;
        if opts.json && !follow {
            println!("{v}");
            return Ok(());
        }
        for e in v.as_array().into_iter().flatten() {
            let seq = e["seq"].as_u64().unwrap_or(0);
            if seq <= last {
                continue;
            }
            last = seq;
            if opts.json {
                println!("{e}");
            } else {
                print_log_line(e);
            }
        }
        if !follow {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// One security-log record as a line.
fn print_log_line(e: &serde_json::Value) {
    let get = |k: &str| e.get(k).and_then(|x| x.as_str()).unwrap_or("-");
    if get("event") == "TANDEM_RG_FAILOVER" {
        println!(
            "{} {} redundancy-group {} {} -> {} epoch {} -> {}",
            get("time"),
            get("event"),
            get("redundancy-group"),
            get("old-primary"),
            get("new-primary"),
            get("old-epoch"),
            get("new-epoch"),
        );
        return;
    }
    println!(
        "{} {} {}/{} -> {}/{} nat {}/{} -> {}/{} {} {} -> {} session {}{}",
        get("time"),
        get("event"),
        get("source-address"),
        get("source-port"),
        get("destination-address"),
        get("destination-port"),
        get("nat-source-address"),
        get("nat-source-port"),
        get("nat-destination-address"),
        get("nat-destination-port"),
        get("policy-name"),
        get("source-zone-name"),
        get("destination-zone-name"),
        get("session-id"),
        e.get("reason")
            .and_then(|x| x.as_str())
            .map(|r| format!(" reason {r}"))
            .unwrap_or_default(),
    );
}

async fn show_cluster(opts: &Opts, what: &str) -> Result<(), String> {
    use pb::control_request::Cmd;
    let cmd = match what {
        "status" => Cmd::Status(pb::Empty {}),
        "statistics" => Cmd::Statistics(pb::Empty {}),
        "interfaces" => Cmd::Interfaces(pb::Empty {}),
        "information" => Cmd::Information(pb::Empty {}),
        _ => return Err(USAGE.into()),
    };
    let v = one(opts, req(cmd)).await?;
    if opts.json {
        println!("{v}");
    } else {
        match what {
            "status" => print!("{}", format_status(&v)),
            _ => println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default()),
        }
    }
    Ok(())
}

/// Human form of `show chassis cluster status`, in the SRX layout.
pub fn format_status(v: &Value) -> String {
    let mut s = String::new();
    use std::fmt::Write;
    let _ = writeln!(
        s,
        "Cluster ID: {}    Node: node{}    Peer: {}",
        v["cluster_id"],
        v["node"],
        v["peer_reason"].as_str().unwrap_or("?")
    );
    let paths: Vec<String> = v["paths"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            format!(
                "{} {}",
                p["path"].as_str().unwrap_or("?").to_lowercase(),
                if p["up"] == true { "up" } else { "down" }
            )
        })
        .collect();
    let _ = writeln!(
        s,
        "Heartbeat paths: {}    Sync: {}",
        paths.join(", "),
        if v["sync_connected"] == true {
            "connected"
        } else {
            "down"
        }
    );
    if let Some(e) = v["dataplane_error"].as_str() {
        let _ = writeln!(s, "Dataplane not serving: {e}");
    }
    let w = &v["witness"];
    let raft = &w["raft"];
    if w.is_object() {
        let member = if let Some(e) = w["error"].as_str() {
            format!("not running ({e})")
        } else {
            format!(
                "{} of term {}, leader {}, commit {}, applied {}{}",
                raft["role"].as_str().unwrap_or("?"),
                raft["term"],
                raft["leader"].as_str().unwrap_or("none"),
                raft["commit_index"],
                raft["applied_index"],
                raft["failed"]
                    .as_str()
                    .map_or(String::new(), |f| format!(", STOPPED: {f}"))
            )
        };
        let _ = writeln!(
            s,
            "Witness: {}    Lease: {} ms    Raft: {member}",
            w["witness"].as_str().unwrap_or("?"),
            w["lease_ms"],
        );
    }
    let _ = writeln!(s);
    for rg in v["rgs"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "Redundancy group: {}   Failover count: {}   Epoch: {}",
            rg["rg"], rg["failovers"], rg["epoch"]
        );
        let _ = writeln!(
            s,
            "  Node     Priority  Status          Preempt  Manual  Sessions"
        );
        let manual = rg["manual"]
            .as_u64()
            .map_or("no".to_string(), |n| format!("node{n}"));
        let _ = writeln!(
            s,
            "  {:<8} {:<9} {:<15} {:<8} {:<7} {}",
            format!("node{}", v["node"]),
            format!("{}/{}", rg["effective_priority"], rg["priority"]),
            rg["state"].as_str().unwrap_or("?").to_lowercase(),
            if rg["preempt"] == true { "yes" } else { "no" },
            manual,
            rg["sessions"],
        );
        if let Some(ps) = rg["peer_state"].as_str() {
            let _ = writeln!(
                s,
                "  {:<8} {:<9} {:<15}",
                format!("node{}", 1 - v["node"].as_u64().unwrap_or(0)),
                rg["peer_priority"],
                ps
            );
        }
        let _ = writeln!(s, "  Reason: {}", rg["reason"].as_str().unwrap_or(""));
        let blockers = |k: &str| -> String {
            let b: Vec<&str> = rg[k]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            if b.is_empty() {
                "yes".into()
            } else {
                format!("no ({})", b.join("; "))
            }
        };
        let _ = writeln!(s, "  Takeover ready: {}", blockers("takeover_blockers"));
        let _ = writeln!(s, "  Transfer ready: {}", blockers("transfer_blockers"));
        let _ = writeln!(
            s,
            "  Sessions in sync: {}",
            if rg["in_sync"] == true { "yes" } else { "no" }
        );
        if let Some(l) = raft["rgs"]
            .as_array()
            .and_then(|a| a.iter().find(|l| l["rg"] == rg["rg"]))
        {
            let left = l["lease_left_ms"].as_u64().unwrap_or(0);
            let _ = writeln!(
                s,
                "  Owner (raft log): {} at e{}    Lease: {}",
                l["owner"].as_str().unwrap_or("none"),
                l["epoch"],
                if left > 0 {
                    format!("held, {left} ms left")
                } else {
                    "not held here".into()
                }
            );
        }
        let _ = writeln!(s);
    }
    s
}

async fn show_sessions(opts: &Opts, rest: &[&str]) -> Result<(), String> {
    let (query, all) = sessions::parse_words(rest)?;
    if all {
        return Err("`all` is for clear security flow session".into());
    }
    if opts.peer_diff {
        return peer_diff(opts, query.rg).await;
    }
    let summary = query.summary;
    let q = req(pb::control_request::Cmd::Sessions(query));
    if summary {
        let v = one(opts, q).await?;
        if opts.json {
            println!("{v}");
        } else {
            println!("Sessions: {}", v["sessions"]);
            for (axis, counts) in v["by"].as_object().into_iter().flatten() {
                let parts: Vec<String> = counts
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, n)| format!("{k} {n}"))
                    .collect();
                println!("  {axis}: {}", parts.join(", "));
            }
        }
        return Ok(());
    }
    let json = opts.json;
    control::request(&opts.socket, q, |chunk| {
        for line in chunk.lines() {
            if json {
                println!("{line}");
            } else if let Ok(v) = serde_json::from_str::<Value>(line) {
                if v.get("source").is_some() {
                    println!(
                        "rg{} {} {} -> {} [{}] snat {} dnat {} {} {} pkts {}/{}",
                        v["rg"],
                        v["proto"].as_str().unwrap_or(""),
                        v["source"].as_str().unwrap_or(""),
                        v["destination"].as_str().unwrap_or(""),
                        v["state"].as_str().unwrap_or(""),
                        v["snat"].as_str().unwrap_or("-"),
                        v["dnat"].as_str().unwrap_or("-"),
                        v["origin"].as_str().unwrap_or(""),
                        v["policy"].as_str().unwrap_or(""),
                        v["packets"][0],
                        v["packets"][1],
                    );
                } else {
                    println!("{line}");
                }
            }
        }
    })
    .await
}

/// `clear security flow session FILTERS|all`: on the primary of each RG,
/// with companions; the deletes are synced to the peer.
async fn clear_sessions(opts: &Opts, rest: &[&str]) -> Result<(), String> {
    let (query, all) = sessions::parse_words(rest)?;
    let filter = sessions::SessionFilter::from_query(&query)?;
    if filter.is_empty() && !all {
        return Err("clear security flow session needs a filter (redundancy-group, source-prefix, destination-prefix, protocol, destination-port) or `all`".into());
    }
    let v = one(opts, req(pb::control_request::Cmd::ClearSessions(query))).await?;
    if opts.json {
        println!("{v}");
    } else {
        println!(
            "{} sessions cleared ({} deletes synced to the peer{})",
            v["cleared"],
            v["deletes_synced"],
            match v["deletes_dropped"].as_u64() {
                Some(n) if n > 0 => format!(", {n} left to the next bulk: delta queue full"),
                _ => String::new(),
            }
        );
        if let Some(rgs) = v["not_primary"].as_array().filter(|a| !a.is_empty()) {
            let names: Vec<String> = rgs.iter().map(|r| format!("rg{r}")).collect();
            println!(
                "not primary here, left alone: {} (clear them on the peer)",
                names.join(", ")
            );
        }
    }
    Ok(())
}

/// Compares this node's export of an RG with the peer's (both sockets
/// reachable from here, as in the lab): sessions only on one side, and
/// sessions whose NAT or state differ.
async fn peer_diff(opts: &Opts, rg: u32) -> Result<(), String> {
    let Some(peer) = opts.flags.get("peer-socket") else {
        return Err("--peer-diff needs --peer-socket PATH (the peer node's control socket)".into());
    };
    async fn collect(
        path: &std::path::Path,
        rg: u32,
    ) -> Result<std::collections::BTreeMap<String, Value>, String> {
        let mut m = std::collections::BTreeMap::new();
        let q = req(pb::control_request::Cmd::Sessions(pb::SessionQuery {
            rg,
            ..Default::default()
        }));
        control::request(path, q, |chunk| {
            for line in chunk.lines() {
                if let Ok(v) = serde_json::from_str::<Value>(line)
                    && v.get("source").is_some()
                {
                    let k = format!(
                        "{} {} {} {}",
                        v["proto"], v["source"], v["destination"], v["ingress_zone"]
                    );
                    m.insert(k, v);
                }
            }
        })
        .await?;
        Ok(m)
    }
    let mine = collect(&opts.socket, rg).await?;
    let theirs = collect(PathBuf::from(peer).as_path(), rg).await?;
    let only_here: Vec<&String> = mine.keys().filter(|k| !theirs.contains_key(*k)).collect();
    let only_peer: Vec<&String> = theirs.keys().filter(|k| !mine.contains_key(*k)).collect();
    let differ: Vec<&String> = mine
        .iter()
        .filter(|(k, v)| {
            theirs.get(*k).is_some_and(|t| {
                t["snat"] != v["snat"] || t["dnat"] != v["dnat"] || t["state"] != v["state"]
            })
        })
        .map(|(k, _)| k)
        .collect();
    let report = serde_json::json!({
        "rg": rg,
        "local_sessions": mine.len(),
        "peer_sessions": theirs.len(),
        "only_local": only_here,
        "only_peer": only_peer,
        "differ": differ,
        "identical": only_here.is_empty() && only_peer.is_empty() && differ.is_empty(),
    });
    if opts.json {
        println!("{report}");
    } else {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    }
    Ok(())
}

async fn request_failover(opts: &Opts, rg: &str, node: Option<&str>) -> Result<(), String> {
    let rg: u32 = rg
        .parse()
        .map_err(|_| format!("bad redundancy group {rg:?}"))?;
    let cmd = match node {
        Some(n) => {
            let node: u32 = n.parse().map_err(|_| format!("bad node {n:?}"))?;
            pb::control_request::Cmd::Failover(pb::FailoverCommand { rg, node })
        }
        None => pb::control_request::Cmd::Reset(pb::ResetCommand { rg }),
    };
    let v = one(opts, req(cmd)).await?;
    if opts.json {
        println!("{v}");
    } else {
        match node {
            Some(n) => println!("redundancy group {rg}: failover to node{n} committed"),
            None => println!("redundancy group {rg}: manual failover reset"),
        }
    }
    Ok(())
}

async fn request_dataplane(opts: &Opts, action: &str) -> Result<(), String> {
    use pb::dataplane_command::Action;
    let action = match action {
        "stop" => Action::Stop,
        "start" => Action::Start,
        "restart" => Action::Restart,
        _ => return Err(USAGE.into()),
    };
    let v = one(
        opts,
        req(pb::control_request::Cmd::Dataplane(pb::DataplaneCommand {
            action: action as i32,
        })),
    )
    .await?;
    if opts.json {
        println!("{v}");
    } else {
        println!("dataplane {}", v["dataplane"].as_str().unwrap_or("?"));
    }
    Ok(())
}

async fn witness(opts: &Opts) -> Result<(), String> {
    let listen: std::net::SocketAddr = opts
        .flags
        .get("listen")
        .ok_or("tandem witness needs --listen ADDR")?
        .parse()
        .map_err(|e| format!("--listen: {e}"))?;
    let key_file = opts
        .flags
        .get("key-file")
        .ok_or("tandem witness needs --key-file FILE")?;
    let key = std::fs::read(key_file).map_err(|e| format!("{key_file}: {e}"))?;
    let cluster_id: u32 = opts
        .flags
        .get("cluster-id")
        .ok_or("tandem witness needs --cluster-id N")?
        .parse()
        .map_err(|e| format!("--cluster-id: {e}"))?;
    let lease_ms: u32 = opts
        .flags
        .get("lease-ms")
        .map_or(Ok(1000), |v| v.parse())
        .map_err(|e| format!("--lease-ms: {e}"))?;
    if lease_ms < config::MIN_WITNESS_LEASE_MS {
        return Err(format!(
            "--lease-ms {lease_ms}: at least {} ms (an owner renews through a new raft leader within a lease)",
            config::MIN_WITNESS_LEASE_MS
        ));
    }
    let state_dir = opts
        .flags
        .get("state-dir")
        .map_or("/var/lib/tandem/witness", String::as_str);
    let state_file = std::path::Path::new(state_dir).join("raft.state");
    if !state_file.exists() && !opts.flags.contains_key("init") {
        return Err(format!(
            "{}: no raft state. On the first start of a new cluster's witness pass --init; never after this directory was lost (a voter that forgot its votes can elect a leader without the committed log: rebuild the cluster instead, docs/OPERATIONS.md)",
            state_file.display()
        ));
    }
    let store = tandem_cluster::witness::FileStore::new(&state_file)?;
    // Its own certificate from the cluster CA; only the nodes' names are
    // accepted on the link.
    let path = |f: &str| -> Result<std::path::PathBuf, String> {
        opts.flags
            .get(f)
            .map(std::path::PathBuf::from)
            .ok_or_else(|| format!("tandem witness needs --{f} FILE (PEM)"))
    };
    let nodes: Vec<String> = opts
        .flags
        .get("node-names")
        .map_or("node0,node1", String::as_str)
        .split(',')
        .map(str::to_string)
        .collect();
    let id = tandem_cluster::tls::TlsIdentity::load(
        &path("ca")?,
        &path("cert")?,
        &path("key")?,
        &nodes[0],
    )
    .map_err(|e| e.to_string())?;
    let link_idle = std::time::Duration::from_millis(u64::from(lease_ms / 3));
    let server = tandem_cluster::tls::server_config(&id, link_idle).map_err(|e| e.to_string())?;
    let endpoint = quinn::Endpoint::server(server, listen).map_err(|e| format!("{listen}: {e}"))?;
    let sock = tandem_cluster::witness::QuicLink::new(endpoint, None, Vec::new(), nodes);
    let clock = tandem_dataplane::session::monotonic_clock();
    let voter = tandem_cluster::witness::OwnershipGroup::start(
        tandem_cluster::witness::WITNESS_VOTER,
        cluster_id,
        lease_ms,
        std::sync::Arc::new(store),
        clock(),
    )
    .map_err(|e| format!("{state_dir}/raft.state: {e}"))?;
    tracing::info!(%listen, cluster_id, state_dir, lease_ms, start = ?voter.started, "witness running");
    tandem_cluster::witness::serve(
        std::sync::Arc::new(sock),
        tandem_cluster::election::driver::ClusterKey::new(&key),
        voter,
        clock,
    )
    .await;
    Err("witness socket failed".into())
}
