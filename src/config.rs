//! The node configuration file (TOML) and its validation.
//!
//! `tandem config check FILE` reports syntax and type errors with line and
//! column (from the TOML parser) and semantic errors with the field path
//! (`redundancy_group[0].priority`), and the line where that table starts.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use tandem_dataplane::config::{Compiled, DataplaneConfig};
use tandem_dataplane::session::{TableConfig, Watermarks};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub node: NodeSection,
    pub control: ControlSection,
    pub tls: TlsSection,
    #[serde(default)]
    pub heartbeat: HeartbeatSection,
    #[serde(default)]
    pub fabric: Vec<FabricSection>,
    pub redundancy_group: Vec<RgSection>,
    #[serde(default)]
    pub witness: Option<WitnessSection>,
    #[serde(default)]
    pub sessions: SessionSection,
    #[serde(default)]
    pub logging: LoggingSection,
    pub dataplane: DataplaneConfig,
}

/// The security log: syslog collectors, a local file, and the event
/// limits (per ingress zone, per worker; see `tandem_dataplane::events`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingSection {
    pub syslog: Vec<SyslogSection>,
    pub file: Option<LogFileSection>,
    /// Session creates (and closes) per second per zone, and burst.
    pub session_rate: u32,
    pub session_burst: u32,
    /// Denies per second per zone, burst, and per second over all zones.
    pub deny_rate: u32,
    pub deny_burst: u32,
    pub deny_total_rate: u32,
}

impl Default for LoggingSection {
    fn default() -> Self {
        let r = tandem_dataplane::events::EventRates::default();
        LoggingSection {
            syslog: Vec::new(),
            file: None,
            session_rate: r.session_rate,
            session_burst: r.session_burst,
            deny_rate: r.deny_rate,
            deny_burst: r.deny_burst,
            deny_total_rate: r.deny_total_rate,
        }
    }
}

impl LoggingSection {
    pub fn rates(&self) -> tandem_dataplane::events::EventRates {
        tandem_dataplane::events::EventRates {
            session_rate: self.session_rate,
            session_burst: self.session_burst,
            deny_rate: self.deny_rate,
            deny_burst: self.deny_burst,
            deny_total_rate: self.deny_total_rate,
        }
    }
}

/// One syslog collector.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyslogSection {
    pub address: SocketAddr,
    #[serde(default)]
    pub transport: SyslogTransport,
    #[serde(default)]
    pub format: LogFormat,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyslogTransport {
    #[default]
    Udp,
    Tcp,
}

/// RFC 5424 with the fields as structured data, or plain text only.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Structured,
    Text,
}

/// A JSON-lines file, rotated at `max_bytes` keeping `keep` old files.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogFileSection {
    pub path: PathBuf,
    #[serde(default = "default_log_max_bytes")]
    pub max_bytes: u64,
    #[serde(default = "default_log_keep")]
    pub keep: u32,
}

fn default_log_max_bytes() -> u64 {
    64 << 20
}

fn default_log_keep() -> u32 {
    4
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// 0 or 1.
    pub id: u8,
    pub cluster_id: u32,
    /// The control API socket.
    pub socket: PathBuf,
    /// Prometheus endpoint (a loopback address).
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlSection {
    /// QUIC on the control link: this node's address and the peer's.
    pub local: SocketAddr,
    pub peer: SocketAddr,
    /// Name on the peer's certificate.
    pub peer_name: String,
    #[serde(default = "default_idle_ms")]
    pub idle_timeout_ms: u64,
}

fn default_idle_ms() -> u64 {
    3000
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatSection {
    pub interval_ms: u64,
    pub threshold: u32,
    pub startup_grace_ms: u64,
    /// File with the secret that authenticates fabric heartbeats and
    /// witness leases (same on both nodes and the witness).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// How long fab0 must be healthy again before forwarding returns to it
    /// from fab1 (a flapping fab0 does not bounce traffic).
    #[serde(default = "default_fabric_hold_down")]
    pub fabric_return_hold_down_ms: u64,
}

fn default_fabric_hold_down() -> u64 {
    2000
}

impl Default for HeartbeatSection {
    fn default() -> Self {
        HeartbeatSection {
            interval_ms: 100,
            threshold: 3,
            startup_grace_ms: 2000,
            key_file: None,
            fabric_return_hold_down_ms: default_fabric_hold_down(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FabricSection {
    /// "fab0" or "fab1".
    pub name: String,
    /// The Linux interface of this node's fabric link.
    pub device: String,
    /// Heartbeat UDP: this node's fabric address and the peer's.
    pub local: SocketAddr,
    pub peer: SocketAddr,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitorSection {
    pub interface: String,
    pub weight: u16,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RgSection {
    pub id: u16,
    /// Priority of node0 and node1 (1..=255; 0 disables the RG on a node).
    pub priority: [u16; 2],
    #[serde(default)]
    pub preempt: bool,
    #[serde(default = "default_hold_down")]
    pub hold_down_ms: u64,
    #[serde(default)]
    pub monitor: Vec<MonitorSection>,
}

fn default_hold_down() -> u64 {
    1000
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WitnessSection {
    pub address: SocketAddr,
    /// This node's lease socket; the peer's.
    pub local: SocketAddr,
    pub peer: SocketAddr,
    #[serde(default = "default_lease")]
    pub lease_ms: u32,
    /// This node's raft member state (votes, log, snapshot) for witness mode
    /// (fsync'd before anything it implies is sent).
    #[serde(default = "default_raft_state")]
    pub state_file: std::path::PathBuf,
    /// Name on the witness's certificate (issued by the cluster CA).
    #[serde(default = "default_witness_name")]
    pub witness_name: String,
}

fn default_witness_name() -> String {
    "witness".into()
}

/// The shortest witness lease: twice the longest raft election.
pub const MIN_WITNESS_LEASE_MS: u32 = 600;

fn default_lease() -> u32 {
    1000
}

fn default_raft_state() -> std::path::PathBuf {
    "/var/lib/tandem/raft.state".into()
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionSection {
    pub capacity: usize,
    pub preallocate: bool,
    /// Per-RG delta queue bound (keys).
    pub delta_queue: usize,
    /// Table pressure, in percent of capacity: from the high watermark new
    /// sessions evict unestablished ones first and sessions idle longer
    /// than `early_ageout_ms` expire, until the table is back at the low
    /// one.
    #[serde(default = "default_high_watermark")]
    pub high_watermark: u8,
    #[serde(default = "default_low_watermark")]
    pub low_watermark: u8,
    #[serde(default = "default_early_ageout_ms")]
    pub early_ageout_ms: u32,
}

fn default_high_watermark() -> u8 {
    Watermarks::default().high_pct
}
fn default_low_watermark() -> u8 {
    Watermarks::default().low_pct
}
fn default_early_ageout_ms() -> u32 {
    Watermarks::default().early_ageout_ms
}

impl SessionSection {
    /// The table configuration these bounds give.
    pub fn table(&self, address_counts: bool) -> TableConfig {
        TableConfig {
            capacity: self.capacity,
            preallocate: self.preallocate,
            watermarks: Watermarks {
                high_pct: self.high_watermark,
                low_pct: self.low_watermark,
                early_ageout_ms: self.early_ageout_ms,
            },
            address_counts,
            ..TableConfig::default()
        }
    }
}

impl Default for SessionSection {
    fn default() -> Self {
        SessionSection {
            capacity: 1 << 20,
            preallocate: true,
            delta_queue: 65_536,
            high_watermark: default_high_watermark(),
            low_watermark: default_low_watermark(),
            early_ageout_ms: default_early_ageout_ms(),
        }
    }
}

/// A configuration error with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub field: Option<String>,
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

impl NodeConfig {
    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: None,
            field: None,
            message: e.to_string(),
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<NodeConfig, ConfigError> {
        let cfg: NodeConfig = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            ConfigError {
                file: path.to_path_buf(),
                line,
                field: None,
                message: e.message().to_string(),
            }
        })?;
        cfg.validate().map_err(|(field, message)| ConfigError {
            file: path.to_path_buf(),
            line: line_of(text, &field),
            field: Some(field),
            message,
        })?;
        Ok(cfg)
    }

    /// Semantic checks: each error names the field.
    fn validate(&self) -> Result<(), (String, String)> {
        let bad = |f: &str, m: String| Err((f.to_string(), m));
        if self.node.id > 1 {
            return bad("node.id", format!("{} is not 0 or 1", self.node.id));
        }
        if let Some(m) = self.node.metrics
            && !m.ip().is_loopback()
        {
            return bad("node.metrics", format!("{m} is not a loopback address"));
        }
        if self.heartbeat.interval_ms == 0 || self.heartbeat.threshold == 0 {
            return bad(
                "heartbeat",
                "interval_ms and threshold must be positive".into(),
            );
        }
        if let Some(w) = &self.witness
            && w.lease_ms < MIN_WITNESS_LEASE_MS
        {
            return bad(
                "witness.lease_ms",
                format!(
                    "{} ms is shorter than {MIN_WITNESS_LEASE_MS} ms: an owner must be able to renew through a new raft leader (elections take up to 300 ms) before its lease runs out",
                    w.lease_ms
                ),
            );
        }
        let mut fabrics = std::collections::BTreeSet::new();
        for (i, f) in self.fabric.iter().enumerate() {
            if f.name != "fab0" && f.name != "fab1" {
                return bad(
                    &format!("fabric[{i}].name"),
                    format!("{:?} is not fab0 or fab1", f.name),
                );
            }
            if !fabrics.insert(f.name.clone()) {
                return bad(
                    &format!("fabric[{i}].name"),
                    format!("{} configured twice", f.name),
                );
            }
            if !f.peer.is_ipv4() || !f.local.is_ipv4() {
                // The peer's fabric MAC is learned from the IPv4 neighbor
                // table the heartbeats keep fresh.
                return bad(
                    &format!("fabric[{i}]"),
                    "local and peer must be IPv4 socket addresses".into(),
                );
            }
            if self
                .dataplane
                .interfaces
                .iter()
                .any(|d| d.device == f.device)
            {
                return bad(
                    &format!("fabric[{i}].device"),
                    format!("{} is also a data interface", f.device),
                );
            }
        }
        if self.redundancy_group.is_empty() {
            return bad(
                "redundancy_group",
                "at least one redundancy group is required".into(),
            );
        }
        let mut ids = std::collections::BTreeSet::new();
        for (i, rg) in self.redundancy_group.iter().enumerate() {
            let at = |f: &str| format!("redundancy_group[{i}].{f}");
            if rg.id == 0 {
                return bad(
                    &at("id"),
                    "RG0 is the control group; data RGs start at 1".into(),
                );
            }
            if !ids.insert(rg.id) {
                return bad(
                    &at("id"),
                    format!("redundancy group {} configured twice", rg.id),
                );
            }
            if let Some(p) = rg.priority.iter().find(|&&p| p > 255) {
                return bad(&at("priority"), format!("{p} exceeds 255"));
            }
            for (j, m) in rg.monitor.iter().enumerate() {
                if m.weight == 0 {
                    return bad(
                        &at(&format!("monitor[{j}].weight")),
                        "weight 0 has no effect".into(),
                    );
                }
            }
        }
        let compiled = Compiled::new(&self.dataplane).map_err(|e| ("dataplane".to_string(), e))?;
        for (i, ifc) in compiled.ifaces.iter().enumerate() {
            if let Some(rg) = ifc.rg()
                && !ids.contains(&rg.0)
            {
                return bad(
                    &format!("dataplane.interfaces[{i}].reth.rg"),
                    format!("redundancy group {} is not configured", rg.0),
                );
            }
        }
        if self.sessions.capacity == 0 || self.sessions.delta_queue == 0 {
            return bad(
                "sessions",
                "capacity and delta_queue must be positive".into(),
            );
        }
        Ok(())
    }

    pub fn rgs(&self) -> Vec<tandem_proto::RgId> {
        self.redundancy_group
            .iter()
            .map(|r| tandem_proto::RgId(r.id))
            .collect()
    }
}

/// The line where the TOML table holding `field` starts: for
/// `dataplane.interfaces[1].reth.rg`, the second `[[dataplane.interfaces]]`
/// header; for `heartbeat.threshold`, `[heartbeat]`.
fn line_of(text: &str, field: &str) -> Option<usize> {
    let mut name = String::new();
    let mut index = None;
    for part in field.split('.') {
        let (p, i) = match part.split_once('[') {
            Some((p, rest)) => (p, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (part, None),
        };
        if !name.is_empty() {
            name.push('.');
        }
        name.push_str(p);
        if i.is_some() {
            index = i;
            break;
        }
    }
    let mut seen = 0;
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if l == format!("[[{name}]]") {
            if index.is_none_or(|n| n == seen) {
                return Some(i + 1);
            }
            seen += 1;
        } else if l == format!("[{name}]") && index.is_none() {
            return Some(i + 1);
        }
    }
    // A field of a table given by its first component only.
    let head = name.split('.').next()?;
    (head != name).then(|| line_of(text, head)).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub const SAMPLE: &str = include_str!("lab/node0.toml");

    #[test]
    fn lab_config_is_valid() {
        let cfg = NodeConfig::parse(SAMPLE, Path::new("node0.toml")).unwrap();
        assert_eq!(cfg.node.id, 0);
        assert_eq!(cfg.rgs().len(), 1);
    }

    #[test]
    fn witness_lease_shorter_than_two_raft_elections_is_refused() {
        let text = format!(
            "{SAMPLE}\n[witness]\naddress = \"10.9.0.3:4790\"\nlocal = \"10.9.0.1:4790\"\npeer = \"10.9.0.2:4790\"\nlease_ms = 300\n"
        );
        let e = NodeConfig::parse(&text, Path::new("n.toml")).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("witness.lease_ms"), "{e}");
        assert!(e.message.contains("raft leader"), "{e}");
        let ok = text.replace("lease_ms = 300", "lease_ms = 1000");
        let cfg = NodeConfig::parse(&ok, Path::new("n.toml")).unwrap();
        assert_eq!(
            cfg.witness.unwrap().state_file,
            std::path::PathBuf::from("/var/lib/tandem/raft.state")
        );
    }

    #[test]
    fn unknown_field_is_reported_with_its_line() {
        let text = SAMPLE.replace("cluster_id = 1", "cluster_id = 1\nclusterid = 2");
        let e = NodeConfig::parse(&text, Path::new("n.toml")).unwrap_err();
        assert!(e.message.contains("unknown field `clusterid`"), "{e}");
        let want = text
            .lines()
            .position(|l| l.starts_with("clusterid"))
            .unwrap()
            + 1;
        assert_eq!(e.line, Some(want));
    }

    #[test]
    fn wrong_type_is_reported_with_its_line() {
        let text = SAMPLE.replace("cluster_id = 1", "cluster_id = \"one\"");
        let e = NodeConfig::parse(&text, Path::new("n.toml")).unwrap_err();
        let want = text
            .lines()
            .position(|l| l.starts_with("cluster_id"))
            .unwrap()
            + 1;
        assert_eq!(e.line, Some(want), "{e}");
    }

    #[test]
    fn semantic_error_names_the_field_and_its_table() {
        let text = SAMPLE.replace("id = 1\npriority", "id = 0\npriority");
        let e = NodeConfig::parse(&text, Path::new("n.toml")).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("redundancy_group[0].id"), "{e}");
        let want = text
            .lines()
            .position(|l| l.trim() == "[[redundancy_group]]")
            .unwrap()
            + 1;
        assert_eq!(e.line, Some(want));
    }

    #[test]
    fn ipv6_fabric_address_is_refused() {
        let text = SAMPLE.replace("peer = \"10.254.0.2:4786\"", "peer = \"[fd00::2]:4786\"");
        let e = NodeConfig::parse(&text, Path::new("n.toml")).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("fabric[0]"), "{e}");
    }

    #[test]
    fn fabric_device_that_is_also_a_data_interface_is_refused() {
        let text = SAMPLE.replace("device = \"fab1\"", "device = \"u0\"");
        let e = NodeConfig::parse(&text, Path::new("n.toml")).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("fabric[1].device"), "{e}");
        assert!(e.message.contains("u0 is also a data interface"), "{e}");
    }

    #[test]
    fn reth_of_an_unconfigured_rg_is_refused_at_its_interface() {
        let text = SAMPLE.replace("rg = 1", "rg = 7");
        let e = NodeConfig::parse(&text, Path::new("n.toml")).unwrap_err();
        assert!(
            e.to_string()
                .contains("redundancy group 7 is not configured"),
            "{e}"
        );
        assert_eq!(e.field.as_deref(), Some("dataplane.interfaces[0].reth.rg"));
        let want = text
            .lines()
            .position(|l| l.trim() == "[[dataplane.interfaces]]")
            .unwrap()
            + 1;
        assert_eq!(e.line, Some(want));
    }
}
