//! The security log: collects the dataplane's flow events (workers' queues
//! and the table's close log), names them from the configuration, and
//! sends them to every configured output — RFC 5424 syslog over UDP or
//! TCP (octet-counted framing), structured or plain text, and a local
//! JSON-lines file with size-based rotation — and keeps the newest
//! [`RING`] for `show security log`.
//!
//! Bounds: a TCP collector has a queue of [`TCP_QUEUE`] messages (full:
//! dropped and counted) and reconnects with backoff from 100 ms to 5 s;
//! UDP sends never wait (a failed send is counted); the file rotates at
//! `max_bytes` keeping `keep` old files. Closes pass the same per-zone
//! limits as the workers' events, in the collector.

use crate::config::{LogFormat, LoggingSection, SyslogSection, SyslogTransport};
use crate::daemon::Node;
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tandem_dataplane::config::Compiled;
use tandem_dataplane::events::{EventDrop, EventKind, EventLimiter, EventStats, FlowEvent};
use tandem_dataplane::session::{self, SessionKey};
use tandem_proto::RoleMap;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tracing::{info, warn};

/// Recent events kept for `show security log`.
pub const RING: usize = 1024;
/// Messages a TCP collector's sender queues while (re)connecting.
pub const TCP_QUEUE: usize = 4096;
/// How often the collector drains the queues.
const TICK: Duration = Duration::from_millis(100);

/// Per-output counters.
#[derive(Debug, Default)]
pub struct OutputStats {
    pub sent: AtomicU64,
    pub dropped: AtomicU64,
}

/// What the log keeps for the operator: recent events and counters.
#[derive(Default)]
pub struct SecurityLog {
    pub ring: Mutex<VecDeque<Value>>,
    pub outputs: Vec<(String, Arc<OutputStats>)>,
}

impl SecurityLog {
    pub fn recent(&self) -> Vec<Value> {
        self.ring
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

/// The Junos RT_FLOW field names, in their order, with their values.
pub fn fields(
    e: &FlowEvent,
    cfg: &Compiled,
    roles: &RoleMap,
    node: u8,
) -> Vec<(&'static str, String)> {
    let nat = e.nat();
    let (nsa, nsp) = nat.snat.unwrap_or((e.key.src, e.key.src_port));
    let (nda, ndp) = nat.dnat.unwrap_or((e.key.dst, e.key.dst_port));
    let policy = match e.policy.0 {
        0 => "default-deny".to_string(),
        n => cfg
            .policies
            .get(n as usize - 1)
            .map_or_else(|| format!("policy-{n}"), |p| p.name.clone()),
    };
    let iface = |id| cfg.iface(id).map_or("?", |i| i.name.as_str()).to_string();
    let epoch = roles.get(&e.owner_rg).map_or(0, |r| r.epoch.0);
    let mut f = vec![
        ("source-address", e.key.src.to_string()),
        ("source-port", e.key.src_port.to_string()),
        ("destination-address", e.key.dst.to_string()),
        ("destination-port", e.key.dst_port.to_string()),
        ("protocol-id", e.key.proto.to_string()),
        ("nat-source-address", nsa.to_string()),
        ("nat-source-port", nsp.to_string()),
        ("nat-destination-address", nda.to_string()),
        ("nat-destination-port", ndp.to_string()),
        ("policy-name", policy),
        ("source-zone-name", cfg.zone_name(e.key.zone).to_string()),
        (
            "destination-zone-name",
            cfg.zone_name(e.reverse.zone).to_string(),
        ),
        ("session-id", e.session_id.to_string()),
        ("packet-incoming-interface", iface(e.ingress_if)),
    ];
    if e.kind == EventKind::SessionClose {
        let c = e.counters;
        f.extend([
            (
                "reason",
                e.reason.map_or("unknown", |r| r.as_str()).to_string(),
            ),
            ("packets-from-client", c.fwd_packets.to_string()),
            ("bytes-from-client", c.fwd_bytes.to_string()),
            ("packets-from-server", c.rev_packets.to_string()),
            ("bytes-from-server", c.rev_bytes.to_string()),
            ("elapsed-time", (e.elapsed_ms() / 1000).to_string()),
        ]);
    }
    f.extend([
        ("node", format!("node{node}")),
        ("redundancy-group", e.owner_rg.0.to_string()),
        ("epoch", epoch.to_string()),
    ]);
    f
}

fn endpoint(a: impl std::fmt::Display, p: u16) -> String {
    format!("{a}/{p}")
}

/// The human sentence of an event (the plain-text form, and the MSG part
/// of the structured one).
pub fn text(e: &FlowEvent, f: &[(&'static str, String)]) -> String {
    let get = |k: &str| {
        f.iter()
            .find(|(n, _)| *n == k)
            .map_or("", |(_, v)| v.as_str())
    };
    let flow = |k: &SessionKey| endpoint(k.src, k.src_port) + "->" + &endpoint(k.dst, k.dst_port);
    let nat = format!(
        "{}->{}",
        endpoint(
            get("nat-source-address"),
            get("nat-source-port").parse().unwrap_or(0)
        ),
        endpoint(
            get("nat-destination-address"),
            get("nat-destination-port").parse().unwrap_or(0)
        )
    );
    let head = match e.kind {
        EventKind::SessionCreate => "session created".to_string(),
        EventKind::SessionClose => format!("session closed {}:", get("reason")),
        EventKind::PolicyDeny => "session denied".to_string(),
        EventKind::ScreenDrop => format!("screen {} dropped", get("attack-name")),
    };
    let mut s = format!(
        "{head} {} {nat} protocol {} policy {} {}->{} session {} on {}",
        flow(&e.key),
        get("protocol-id"),
        get("policy-name"),
        get("source-zone-name"),
        get("destination-zone-name"),
        get("session-id"),
        get("packet-incoming-interface"),
    );
    if e.kind == EventKind::SessionClose {
        s += &format!(
            " {}({}) {}({}) {}s",
            get("packets-from-client"),
            get("bytes-from-client"),
            get("packets-from-server"),
            get("bytes-from-server"),
            get("elapsed-time"),
        );
    }
    s + &format!(" {} rg {}", get("node"), get("redundancy-group"))
}

/// RFC 5424 PARAM-VALUE escaping: `"`, `\` and `]`.
fn sd_escape(v: &str) -> String {
    let mut o = String::with_capacity(v.len());
    for c in v.chars() {
        if matches!(c, '"' | '\\' | ']') {
            o.push('\\');
        }
        o.push(c);
    }
    o
}

/// The private SD-ID of Tandem's events (32473 is the enterprise number
/// RFC 5612 reserves for documentation: no vendor's is claimed).
pub const SD_ID: &str = "tandem@32473";

/// A message of the security log, whatever produced it: its syslog
/// priority and MSGID, its named fields, its sentence.
pub struct Record {
    pub pri: u8,
    pub msgid: &'static str,
    pub fields: Vec<(&'static str, String)>,
    pub text: String,
}

/// Facility user (1); severity info (6) or notice (5).
const PRI_INFO: u8 = 8 + 6;
const PRI_NOTICE: u8 = 8 + 5;

impl Record {
    pub fn of_event(e: &FlowEvent, cfg: &Compiled, roles: &RoleMap, node: u8) -> Record {
        if let Some(kind) = e.screen {
            return screen_record(e, kind, cfg, node);
        }
        let fields = fields(e, cfg, roles, node);
        Record {
            pri: if e.kind == EventKind::PolicyDeny {
                PRI_NOTICE
            } else {
                PRI_INFO
            },
            msgid: e.kind.msgid(),
            text: text(e, &fields),
            fields,
        }
    }
}

/// A screen drop as Junos logs it (RT_SCREEN_TCP/UDP/ICMP/SESSION_LIMIT:
/// attack, packet, zone, interface, action).
fn screen_record(
    e: &FlowEvent,
    kind: tandem_dataplane::screen::ScreenKind,
    cfg: &Compiled,
    node: u8,
) -> Record {
    let zone = cfg.zone_name(e.key.zone).to_string();
    let iface = cfg
        .iface(e.ingress_if)
        .map_or("?", |i| i.name.as_str())
        .to_string();
    let screen = cfg
        .screen(e.key.zone)
        .map_or("?", |s| s.name.as_str())
        .to_string();
    let fields = vec![
        ("attack-name", kind.as_str().to_string()),
        ("source-address", e.key.src.to_string()),
        ("source-port", e.key.src_port.to_string()),
        ("destination-address", e.key.dst.to_string()),
        ("destination-port", e.key.dst_port.to_string()),
        ("protocol-id", e.key.proto.to_string()),
        ("source-zone-name", zone.clone()),
        ("interface-name", iface.clone()),
        ("screen-name", screen),
        ("action", "drop".to_string()),
        ("node", format!("node{node}")),
    ];
    let text = format!(
        "screen {} dropped {}/{}->{}/{} protocol {} zone {zone} on {iface} node{node}",
        kind.as_str(),
        e.key.src,
        e.key.src_port,
        e.key.dst,
        e.key.dst_port,
        e.key.proto,
    );
    Record {
        pri: PRI_NOTICE,
        msgid: kind.msgid(),
        fields,
        text,
    }
}

/// The session table crossing a watermark, as a log record: above the
/// high one (early drop and early ageing start) or back at the low one.
pub fn table_pressure(
    entered: bool,
    sessions: usize,
    (high, low): (usize, usize),
    node: u8,
) -> Record {
    let (state, mark) = if entered {
        ("high", high)
    } else {
        ("low", low)
    };
    Record {
        pri: if entered { PRI_NOTICE } else { PRI_INFO },
        msgid: "TANDEM_SESSION_TABLE_PRESSURE",
        fields: vec![
            ("watermark", state.to_string()),
            ("watermark-sessions", mark.to_string()),
            ("sessions", sessions.to_string()),
            ("node", format!("node{node}")),
        ],
        text: if entered {
            format!(
                "session table above its high watermark ({sessions} >= {high}): early drop and early ageing on node{node}"
            )
        } else {
            format!(
                "session table back at its low watermark ({sessions} <= {low}): early drop and early ageing off node{node}"
            )
        },
    }
}

/// Role changes between two role maps as log records: this node became
/// primary or secondary for an RG, with the old and new owner and epoch.
pub fn role_changes(before: &RoleMap, after: &RoleMap, node: u8) -> Vec<Record> {
    let peer = 1 - node.min(1);
    let mut out = Vec::new();
    for (rg, now) in after {
        let was = before.get(rg);
        if was.is_some_and(|w| w.primary) == now.primary {
            continue;
        }
        let (old, new) = if now.primary {
            (peer, node)
        } else {
            (node, peer)
        };
        let fields = vec![
            ("redundancy-group", rg.0.to_string()),
            ("old-primary", format!("node{old}")),
            ("new-primary", format!("node{new}")),
            ("old-epoch", was.map_or(0, |w| w.epoch.0).to_string()),
            ("new-epoch", now.epoch.0.to_string()),
            ("node", format!("node{node}")),
        ];
        let text = format!(
            "redundancy group {} moved from node{old} to node{new} (epoch {})",
            rg.0, now.epoch.0
        );
        out.push(Record {
            pri: PRI_NOTICE,
            msgid: "TANDEM_RG_FAILOVER",
            fields,
            text,
        });
    }
    out
}

/// One RFC 5424 message.
pub fn rfc5424(r: &Record, format: LogFormat, host: &str, wall_ms: u64) -> String {
    let sd = match format {
        LogFormat::Structured => {
            let params: Vec<String> = r
                .fields
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", sd_escape(v)))
                .collect();
            format!("[{SD_ID} {}]", params.join(" "))
        }
        LogFormat::Text => "-".to_string(),
    };
    format!(
        "<{}>1 {} {host} tandem {} {} {sd} {}",
        r.pri,
        rfc3339(wall_ms),
        std::process::id(),
        r.msgid,
        r.text
    )
}

/// The JSON form (file, ring, `show security log --json`).
pub fn to_json(r: &Record, wall_ms: u64) -> Value {
    let mut m = serde_json::Map::new();
    m.insert("time".into(), json!(rfc3339(wall_ms)));
    m.insert("event".into(), json!(r.msgid));
    for (k, v) in &r.fields {
        m.insert((*k).into(), json!(v));
    }
    Value::Object(m)
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` of a Unix time in ms (days to civil date,
/// proleptic Gregorian).
pub fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "-".into())
}

/// A JSON-lines file that rotates at `max_bytes`, keeping `keep` old ones
/// (`path.1` newest).
pub struct RotatingFile {
    path: std::path::PathBuf,
    max_bytes: u64,
    keep: u32,
    file: Option<std::fs::File>,
    size: u64,
}

impl RotatingFile {
    pub fn new(path: std::path::PathBuf, max_bytes: u64, keep: u32) -> RotatingFile {
        let size = std::fs::metadata(&path).map_or(0, |m| m.len());
        RotatingFile {
            path,
            max_bytes,
            keep,
            file: None,
            size,
        }
    }

    pub fn write_line(&mut self, line: &str) -> std::io::Result<()> {
        if self.size > 0 && self.size + line.len() as u64 + 1 > self.max_bytes {
            self.rotate()?;
        }
        if self.file.is_none() {
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            self.file = Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.path)?,
            );
        }
        let f = self.file.as_mut().expect("opened");
        f.write_all(line.as_bytes())?;
        f.write_all(b"\n")?;
        self.size += line.len() as u64 + 1;
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.file = None;
        let name = |i: u32| {
            let mut p = self.path.clone().into_os_string();
            p.push(format!(".{i}"));
            std::path::PathBuf::from(p)
        };
        if self.keep == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            let _ = std::fs::remove_file(name(self.keep));
            for i in (1..self.keep).rev() {
                let _ = std::fs::rename(name(i), name(i + 1));
            }
            std::fs::rename(&self.path, name(1))?;
        }
        self.size = 0;
        Ok(())
    }
}

enum Sink {
    Udp(UdpSocket, SocketAddr),
    Tcp(mpsc::Sender<String>),
}

struct Output {
    format: LogFormat,
    sink: Sink,
    stats: Arc<OutputStats>,
}

fn open_output(s: &SyslogSection) -> std::io::Result<Output> {
    let stats = Arc::new(OutputStats::default());
    let sink = match s.transport {
        SyslogTransport::Udp => {
            let bind: SocketAddr = if s.address.is_ipv4() {
                "0.0.0.0:0".parse().expect("literal")
            } else {
                "[::]:0".parse().expect("literal")
            };
            let sock = UdpSocket::bind(bind)?;
            sock.set_nonblocking(true)?;
            Sink::Udp(sock, s.address)
        }
        SyslogTransport::Tcp => {
            let (tx, rx) = mpsc::channel(TCP_QUEUE);
            tokio::spawn(tcp_sender(s.address, rx, stats.clone()));
            Sink::Tcp(tx)
        }
    };
    Ok(Output {
        format: s.format,
        sink,
        stats,
    })
}

/// Sends queued messages to a TCP collector, octet-counted (RFC 6587
/// 3.4.1), reconnecting with backoff; a message being written when the
/// connection fails is counted as dropped.
async fn tcp_sender(addr: SocketAddr, mut rx: mpsc::Receiver<String>, stats: Arc<OutputStats>) {
    let mut backoff = Duration::from_millis(100);
    let mut pending: Option<String> = None;
    loop {
        let mut conn = match tokio::net::TcpStream::connect(addr).await {
            Ok(c) => {
                backoff = Duration::from_millis(100);
                c
            }
            Err(e) => {
                warn!(%addr, error = %e, "syslog collector unreachable; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        loop {
            let msg = match pending.take() {
                Some(m) => m,
                None => match rx.recv().await {
                    Some(m) => m,
                    None => return,
                },
            };
            let framed = format!("{} {msg}", msg.len());
            if let Err(e) = conn.write_all(framed.as_bytes()).await {
                warn!(%addr, error = %e, "syslog collector connection lost");
                stats.dropped.fetch_add(1, Ordering::Relaxed);
                break;
            }
            stats.sent.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The collector: every [`TICK`], drains the workers' queues and the
/// table's close log, then formats and sends.
pub struct Collector {
    outputs: Vec<Output>,
    file: Option<RotatingFile>,
    close_limits: EventLimiter,
    host: String,
    /// Sequence number of the last record in the ring (`--follow`).
    seq: u64,
    pub log: Arc<SecurityLog>,
}

impl Collector {
    pub fn new(cfg: &LoggingSection, rates: tandem_dataplane::events::EventRates) -> Collector {
        let mut outputs = Vec::new();
        let mut names = Vec::new();
        for s in &cfg.syslog {
            match open_output(s) {
                Ok(o) => {
                    names.push((format!("{:?} {}", s.transport, s.address), o.stats.clone()));
                    outputs.push(o);
                }
                Err(e) => warn!(address = %s.address, error = %e, "syslog output not opened"),
            }
        }
        Collector {
            outputs,
            file: cfg
                .file
                .as_ref()
                .map(|f| RotatingFile::new(f.path.clone(), f.max_bytes, f.keep)),
            close_limits: EventLimiter::new(rates),
            host: hostname(),
            seq: 0,
            log: Arc::new(SecurityLog {
                ring: Mutex::default(),
                outputs: names,
            }),
        }
    }

    /// Formats and delivers `events` (closes are rate-limited here).
    pub fn deliver(
        &mut self,
        events: &[FlowEvent],
        cfg: &Compiled,
        roles: &RoleMap,
        node: u8,
        stats: &EventStats,
    ) {
        let wall = wall_ms();
        for e in events {
            if e.kind == EventKind::SessionClose {
                stats.produced[e.kind as usize].fetch_add(1, Ordering::Relaxed);
                if !self.close_limits.allow(e) {
                    stats.drop_one(e.kind, EventDrop::RateLimited);
                    continue;
                }
                stats.queued[e.kind as usize].fetch_add(1, Ordering::Relaxed);
            }
            self.emit(&Record::of_event(e, cfg, roles, node), wall);
        }
    }

    /// Sends one record to every output, the file and the ring.
    pub fn emit(&mut self, r: &Record, wall: u64) {
        for o in &self.outputs {
            let msg = rfc5424(r, o.format, &self.host, wall);
            let ok = match &o.sink {
                Sink::Udp(sock, to) => sock.send_to(msg.as_bytes(), to).is_ok(),
                Sink::Tcp(tx) => tx.try_send(msg).is_ok(),
            };
            if !ok {
                o.stats.dropped.fetch_add(1, Ordering::Relaxed);
            } else if matches!(o.sink, Sink::Udp(..)) {
                o.stats.sent.fetch_add(1, Ordering::Relaxed);
            }
        }
        let j = to_json(r, wall);
        if let Some(file) = &mut self.file
            && let Err(err) = file.write_line(&j.to_string())
        {
            warn!(error = %err, "security log file");
        }
        let mut ring = self.log.ring.lock().unwrap_or_else(|e| e.into_inner());
        if ring.len() == RING {
            ring.pop_front();
        }
        let mut j = j;
        self.seq += 1;
        j["seq"] = json!(self.seq);
        ring.push_back(j);
    }
}

/// Runs the collector for a node until the process ends.
pub async fn run(node: Arc<Node>, mut collector: Collector) {
    let mut buf = Vec::new();
    let mut tick = tokio::time::interval(TICK);
    let mut roles_seen = RoleMap::default();
    let mut pressure_seen = false;
    loop {
        tick.tick().await;
        let (pressure, sessions, marks) = {
            let t = session::read(&node.table);
            (t.under_pressure(), t.len(), t.watermark_sessions())
        };
        if pressure != pressure_seen {
            let r = table_pressure(pressure, sessions, marks, node.cfg.node.id);
            if pressure {
                warn!(
                    sessions,
                    high = marks.0,
                    "session table pressure: early drop and ageing on"
                );
            } else {
                info!(sessions, low = marks.1, "session table pressure over");
            }
            collector.emit(&r, wall_ms());
            pressure_seen = pressure;
        }
        let roles_now = node.cluster.role_swap().load_full();
        for r in role_changes(&roles_seen, &roles_now, node.cfg.node.id) {
            collector.emit(&r, wall_ms());
        }
        roles_seen = (*roles_now).clone();
        buf.clear();
        node.events.drain(&mut buf);
        session::lock_between_bursts(&node.table).drain_closes(&mut buf);
        if buf.is_empty() {
            continue;
        }
        let roles = node.cluster.role_swap().load_full();
        collector.deliver(
            &buf,
            &node.compiled,
            &roles,
            node.cfg.node.id,
            &node.events.stats,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::process::{Child, Command, Stdio};
    use tandem_dataplane::events::{CloseReason, EventRates};
    use tandem_dataplane::session::{
        Millis, NewSession, PolicyId, RemoveReason, SessionTable, SnatRequest, TcpState,
    };
    use tandem_proto::{Epoch, RgId, RgRole};

    /// A real rsyslogd on loopback (UDP and TCP inputs) writing what it
    /// received, one `MSGID [structured-data] MSG` line per message.
    struct Rsyslog {
        child: Child,
        dir: std::path::PathBuf,
        udp: u16,
        tcp: u16,
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port")
    }

    impl Rsyslog {
        fn start() -> Option<Rsyslog> {
            if Command::new("sh")
                .args(["-c", "command -v rsyslogd"])
                .stdout(Stdio::null())
                .status()
                .map_or(true, |s| !s.success())
            {
                eprintln!(
                    "SKIPPED: rsyslogd not installed (Debian package rsyslog; ./dev.sh installs it)"
                );
                return None;
            }
            let dir = std::env::temp_dir().join(format!("tandem-rsyslog-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let (udp, tcp) = (free_port(), free_port());
            let conf = format!(
                r#"global(workDirectory="{d}")
module(load="imudp")
module(load="imtcp")
input(type="imudp" address="127.0.0.1" port="{udp}")
input(type="imtcp" address="127.0.0.1" port="{tcp}")
template(name="t" type="string" string="%inputname% %msgid% %structured-data% %msg%\n")
*.* action(type="omfile" file="{d}/out.log" template="t")
"#,
                d = dir.display()
            );
            std::fs::write(dir.join("rsyslog.conf"), conf).unwrap();
            let child = Command::new("rsyslogd")
                .arg("-n")
                .arg("-f")
                .arg(dir.join("rsyslog.conf"))
                .arg("-i")
                .arg(dir.join("pid"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start rsyslogd");
            // Ready once its TCP input accepts.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect(("127.0.0.1", tcp)).is_err() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "rsyslogd did not listen"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            Some(Rsyslog {
                child,
                dir,
                udp,
                tcp,
            })
        }

        fn lines(&self) -> Vec<String> {
            std::fs::read_to_string(self.dir.join("out.log"))
                .unwrap_or_default()
                .lines()
                .map(str::to_string)
                .collect()
        }
    }

    impl Drop for Rsyslog {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// `k="v"` pairs of a structured-data element, unescaped.
    fn params(sd: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut rest = sd;
        while let Some(eq) = rest.find("=\"") {
            let key = rest[..eq].rsplit(' ').next().unwrap_or("").to_string();
            let mut val = String::new();
            let mut chars = rest[eq + 2..].char_indices();
            let mut end = 0;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            val.push(n);
                        }
                    }
                    '"' => {
                        end = eq + 2 + i + 1;
                        break;
                    }
                    c => val.push(c),
                }
            }
            out.push((key, val));
            rest = &rest[end..];
        }
        out
    }

    fn sessions() -> (Compiled, Vec<FlowEvent>) {
        let cfg = Compiled::new(&tandem_dataplane::testbed::sample_config()).unwrap();
        let zone = |n: &str| {
            tandem_dataplane::session::ZoneId(
                cfg.zones.iter().position(|z| z == n).unwrap() as u16 + 1,
            )
        };
        let (trust, untrust) = (zone("trust"), zone("untrust"));
        let mut t = SessionTable::default();
        t.promote_rg(RgId(1));
        t.set_close_log(true);
        let now = Millis(50_000);
        let snat = t
            .insert(
                NewSession {
                    key: SessionKey::new(
                        Ipv4Addr::new(10, 1, 0, 10),
                        40000,
                        Ipv4Addr::new(192, 0, 2, 100),
                        443,
                        6,
                        trust,
                    ),
                    egress_zone: untrust,
                    snat: Some(SnatRequest {
                        addr: Ipv4Addr::new(192, 0, 2, 1).into(),
                        ports: 1024..=65535,
                    }),
                    dnat: None,
                    ingress_if: tandem_dataplane::session::InterfaceId(0),
                    egress_if: tandem_dataplane::session::InterfaceId(1),
                    owner_rg: RgId(1),
                    policy: PolicyId(1),
                    tcp_state: TcpState::Established,
                },
                now,
            )
            .unwrap();
        let dnat = t
            .insert(
                NewSession {
                    key: SessionKey::new(
                        Ipv4Addr::new(192, 0, 2, 200),
                        5555,
                        Ipv4Addr::new(192, 0, 2, 1),
                        8080,
                        6,
                        untrust,
                    ),
                    egress_zone: trust,
                    snat: None,
                    dnat: Some((Ipv4Addr::new(10, 1, 0, 10).into(), 80)),
                    ingress_if: tandem_dataplane::session::InterfaceId(1),
                    egress_if: tandem_dataplane::session::InterfaceId(0),
                    owner_rg: RgId(1),
                    policy: PolicyId(2),
                    tcp_state: TcpState::Established,
                },
                now,
            )
            .unwrap();
        let mut events = vec![
            FlowEvent::of_session(EventKind::SessionCreate, t.get(snat).unwrap(), now),
            FlowEvent::of_session(EventKind::SessionCreate, t.get(dnat).unwrap(), now),
        ];
        // Traffic, then the SNAT session ends.
        let later = Millis(now.0 + 7_000);
        t.touch(
            snat,
            tandem_dataplane::session::Direction::Forward,
            1200,
            later,
        );
        t.touch(
            snat,
            tandem_dataplane::session::Direction::Reverse,
            3400,
            later,
        );
        t.remove(snat, RemoveReason::Closed).unwrap();
        t.drain_closes(&mut events);
        let mut deny = events[1];
        deny.kind = EventKind::PolicyDeny;
        deny.policy = PolicyId(0);
        deny.session_id = 0;
        deny.key.dst_port = 23;
        deny.reverse.src_port = 23;
        deny.reverse.src = deny.key.dst;
        events.push(deny);
        (cfg, events)
    }

    #[test]
    fn rsyslog_receives_create_close_and_deny_with_their_fields_over_udp_and_tcp() {
        let Some(rs) = Rsyslog::start() else {
            return;
        };
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (cfg, events) = sessions();
        assert_eq!(events.len(), 4);
        assert_eq!(events[2].reason, Some(CloseReason::Cleared));
        let logging = LoggingSection {
            syslog: vec![
                SyslogSection {
                    address: SocketAddr::from(([127, 0, 0, 1], rs.udp)),
                    transport: SyslogTransport::Udp,
                    format: LogFormat::Structured,
                },
                SyslogSection {
                    address: SocketAddr::from(([127, 0, 0, 1], rs.tcp)),
                    transport: SyslogTransport::Tcp,
                    format: LogFormat::Structured,
                },
            ],
            ..LoggingSection::default()
        };
        let roles = RoleMap::from([(
            RgId(1),
            RgRole {
                primary: true,
                epoch: Epoch(7),
            },
        )]);
        let stats = EventStats::default();
        rt.block_on(async {
            let mut c = Collector::new(&logging, EventRates::default());
            c.deliver(&events, &cfg, &roles, 0, &stats);
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while rs.lines().len() < 8 && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let lines = rs.lines();
        assert_eq!(lines.len(), 8, "{lines:#?}");
        for input in ["imudp", "imtcp"] {
            let got: Vec<(String, Vec<(String, String)>)> = lines
                .iter()
                .filter(|l| l.starts_with(input))
                .map(|l| {
                    let mut it = l.splitn(3, ' ');
                    let _ = it.next();
                    let msgid = it.next().unwrap().to_string();
                    (msgid, params(it.next().unwrap()))
                })
                .collect();
            let ids: Vec<&str> = got.iter().map(|(m, _)| m.as_str()).collect();
            assert_eq!(
                ids,
                [
                    "RT_FLOW_SESSION_CREATE",
                    "RT_FLOW_SESSION_CREATE",
                    "RT_FLOW_SESSION_CLOSE",
                    "RT_FLOW_SESSION_DENY"
                ],
                "{input}"
            );
            let field = |i: usize, k: &str| {
                got[i]
                    .1
                    .iter()
                    .find(|(n, _)| n == k)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_else(|| panic!("{input} event {i} has no {k}: {:?}", got[i].1))
            };
            // SNAT create.
            assert_eq!(field(0, "source-address"), "10.1.0.10");
            assert_eq!(field(0, "destination-address"), "192.0.2.100");
            assert_eq!(field(0, "destination-port"), "443");
            assert_eq!(field(0, "nat-source-address"), "192.0.2.1");
            assert_eq!(field(0, "nat-source-port"), "40000");
            assert_eq!(field(0, "nat-destination-address"), "192.0.2.100");
            assert_eq!(field(0, "source-zone-name"), "trust");
            assert_eq!(field(0, "destination-zone-name"), "untrust");
            assert_eq!(field(0, "protocol-id"), "6");
            assert_eq!(field(0, "node"), "node0");
            assert_eq!(field(0, "redundancy-group"), "1");
            assert_eq!(field(0, "epoch"), "7");
            // DNAT create.
            assert_eq!(field(1, "destination-address"), "192.0.2.1");
            assert_eq!(field(1, "destination-port"), "8080");
            assert_eq!(field(1, "nat-destination-address"), "10.1.0.10");
            assert_eq!(field(1, "nat-destination-port"), "80");
            assert_eq!(field(1, "nat-source-address"), "192.0.2.200");
            // Close of the SNAT session, with its counters and id.
            assert_eq!(field(2, "session-id"), field(0, "session-id"));
            assert_eq!(field(2, "reason"), "cleared");
            assert_eq!(field(2, "packets-from-client"), "1");
            assert_eq!(field(2, "bytes-from-client"), "1200");
            assert_eq!(field(2, "packets-from-server"), "1");
            assert_eq!(field(2, "bytes-from-server"), "3400");
            assert_eq!(field(2, "elapsed-time"), "7");
            // The deny.
            assert_eq!(field(3, "policy-name"), "default-deny");
            assert_eq!(field(3, "destination-port"), "23");
            assert_eq!(field(3, "source-zone-name"), "untrust");
        }
    }

    #[test]
    fn role_flips_are_logged_once_with_old_and_new_owner() {
        let role = |primary, epoch| RgRole {
            primary,
            epoch: Epoch(epoch),
        };
        let empty = RoleMap::default();
        let secondary = RoleMap::from([(RgId(1), role(false, 2))]);
        let primary = RoleMap::from([(RgId(1), role(true, 3))]);
        assert!(
            role_changes(&empty, &secondary, 1).is_empty(),
            "starting secondary"
        );
        assert!(role_changes(&primary, &primary, 1).is_empty(), "no change");
        let up = role_changes(&secondary, &primary, 1);
        assert_eq!(up.len(), 1);
        let get = |r: &Record, k: &str| {
            r.fields
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        assert_eq!(up[0].msgid, "TANDEM_RG_FAILOVER");
        assert_eq!(get(&up[0], "old-primary"), "node0");
        assert_eq!(get(&up[0], "new-primary"), "node1");
        assert_eq!(
            (get(&up[0], "old-epoch"), get(&up[0], "new-epoch")),
            ("2".into(), "3".into())
        );
        let down = role_changes(&primary, &RoleMap::from([(RgId(1), role(false, 4))]), 1);
        assert_eq!(get(&down[0], "new-primary"), "node0");
    }

    #[test]
    fn rfc3339_dates_are_civil() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_796_256_000_000), "2026-12-03T00:00:00.000Z");
    }

    #[test]
    fn structured_data_values_are_escaped() {
        assert_eq!(sd_escape(r#"a"b\c]d"#), r#"a\"b\\c\]d"#);
    }

    #[test]
    fn the_file_rotates_at_its_size_keeping_the_configured_count() {
        let dir = std::env::temp_dir().join(format!("tandem-log-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("security.json");
        let mut f = RotatingFile::new(path.clone(), 100, 2);
        for i in 0..10 {
            f.write_line(&format!("{{\"n\":{i},\"pad\":\"{}\"}}", "x".repeat(30)))
                .unwrap();
        }
        let len = |p: &std::path::Path| std::fs::metadata(p).map_or(0, |m| m.len());
        assert!(len(&path) <= 100);
        assert!(len(&dir.join("security.json.1")) > 0);
        assert!(len(&dir.join("security.json.2")) > 0);
        assert!(!dir.join("security.json.3").exists());
        let last = std::fs::read_to_string(&path).unwrap();
        assert!(last.contains("\"n\":9"), "{last}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
