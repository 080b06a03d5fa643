//! A three-namespace test bed shared by the root tests and `fwd-bench`:
//!
//! ```text
//!   client ns            fw ns                             server ns
//!   c0 10.1.0.10/24 ---- t0 [reth0: VIP 10.1.0.1, 2001:db8:1::1]
//!   2001:db8:1::10/64       [reth1: VIP 192.0.2.1, 2001:db8:2::1]  u0 ---- s0 192.0.2.100/24
//!                                                                   2001:db8:2::100/64
//! ```
//! with the sample policy (trust -> untrust permitted and source-NATed,
//! 192.0.2.1:8080 port-forwarded to the client's port 80) and an AF_XDP
//! firewall dataplane to run in the middle namespace. Everything it creates
//! is named after the process and removed on drop.

use crate::afxdp::{FabricHook, NoFabric};
use crate::config::{
    Compiled, DataplaneConfig, DnatRule, InterfaceConfig, MirrorConfig, PolicyAction, PolicyConfig,
    RethConfig, SnatRule,
};
use crate::core::CoreStats;
use crate::delta::{DeltaConsumer, delta_queues};
use crate::fabric_hook::FabricForwarder;
use crate::os;
use crate::session::{self, InterfaceId, SessionTable, TableConfig, lock, monotonic_clock};
use crate::supervisor::{Dataplane, HookFactory, PoolConfig, PortSpec};
use crate::worker::Shared;
use crate::xdp::PortMode;
use arc_swap::ArcSwap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tandem_fabric::{FabricMap, FabricStats};
use tandem_proto::{Epoch, RgId, RgRole, RoleMap};

/// Runs a command; panics with its stderr when it fails (set-up only).
pub fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("run command");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Namespaces named after this process, deleted on drop.
pub struct Topo {
    /// client, firewall, server.
    pub ns: [String; 3],
}

impl Topo {
    /// Single-queue veth.
    pub fn new(tag: &str) -> Topo {
        Topo::with_queues(tag, 1)
    }

    /// veth pairs with `queues` RX and TX queues on every end: flows from
    /// the client's stack spread over the queues by flow hash, and native
    /// XDP on the firewall reports the sender's TX queue as the RX queue.
    pub fn with_queues(tag: &str, queues: u32) -> Topo {
        let q = queues.to_string();
        let p = std::process::id();
        let ns = [
            format!("tdc{tag}{p}"),
            format!("tdf{tag}{p}"),
            format!("tds{tag}{p}"),
        ];
        for n in &ns {
            sh(&["ip", "netns", "add", n]);
        }
        let [c, f, s] = &ns;
        for (a, an, b, bn) in [("c0", c, "t0", f), ("s0", s, "u0", f)] {
            sh(&[
                "ip",
                "link",
                "add",
                a,
                "numtxqueues",
                &q,
                "numrxqueues",
                &q,
                "netns",
                an,
                "type",
                "veth",
                "peer",
                "name",
                b,
                "numtxqueues",
                &q,
                "numrxqueues",
                &q,
                "netns",
                bn,
            ]);
        }
        for (n, dev) in [(c, "c0"), (f, "t0"), (f, "u0"), (s, "s0")] {
            sh(&["ip", "-n", n, "link", "set", dev, "up"]);
            sh(&["ip", "-n", n, "link", "set", "lo", "up"]);
            // The dataplane rewrites packets: checksums must be complete,
            // not left to offload.
            sh(&["ip", "netns", "exec", n, "ethtool", "-K", dev, "tx", "off"]);
        }
        sh(&["ip", "-n", c, "addr", "add", "10.1.0.10/24", "dev", "c0"]);
        sh(&["ip", "-n", c, "route", "add", "default", "via", "10.1.0.1"]);
        sh(&["ip", "-n", s, "addr", "add", "192.0.2.100/24", "dev", "s0"]);
        // IPv6 hosts (no duplicate-address wait); the firewall's kernel
        // keeps out of IPv6 on the dataplane's ports.
        for (n, dev, addr) in [
            (c, "c0", "2001:db8:1::10/64"),
            (s, "s0", "2001:db8:2::100/64"),
        ] {
            sh(&[
                "ip", "-n", n, "-6", "addr", "add", addr, "dev", dev, "nodad",
            ]);
        }
        sh(&[
            "ip",
            "-n",
            c,
            "-6",
            "route",
            "add",
            "default",
            "via",
            "2001:db8:1::1",
        ]);
        for dev in ["t0", "u0"] {
            sh(&[
                "ip",
                "netns",
                "exec",
                f,
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.{dev}.disable_ipv6=1"),
            ]);
        }
        Topo { ns }
    }
}

impl Drop for Topo {
    fn drop(&mut self) {
        for n in &self.ns {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

/// The policy an operator adds so trust can use the sample port forward
/// (192.0.2.1:8080 -> 10.1.0.10:80) through its public address: the
/// hairpinned session goes from trust to trust.
pub fn hairpin_web_policy() -> PolicyConfig {
    PolicyConfig {
        name: "hairpin-web".into(),
        from_zone: "trust".into(),
        to_zone: "trust".into(),
        source: vec![],
        destination: vec!["10.1.0.10/32".parse().expect("literal")],
        protocol: Some("tcp".into()),
        ports: vec!["80".into()],
        action: PolicyAction::Permit,
    }
}

/// Inside hosts may reach each other over UDP (trust -> trust): what
/// hairpinning between two inside hosts through their NAT mappings needs.
pub fn inside_udp_policy() -> PolicyConfig {
    PolicyConfig {
        name: "inside-udp".into(),
        from_zone: "trust".into(),
        to_zone: "trust".into(),
        source: vec![],
        destination: vec![],
        protocol: Some("udp".into()),
        ports: vec![],
        action: PolicyAction::Permit,
    }
}

/// A mirror output port: `mon0` on device `m0`, no addresses.
pub fn mirror_port() -> InterfaceConfig {
    InterfaceConfig {
        name: "mon0".into(),
        device: "m0".into(),
        zone: "trust".into(),
        addresses: vec![],
        reth: None,
        mtu: None,
        vlan: None,
        tcp_mss: None,
    }
}

/// Adds [`mirror_port`] and a mirror of reth0's port to it, 1 in `rate`.
pub fn add_reth0_mirror(cfg: &mut DataplaneConfig, rate: u32) {
    cfg.interfaces.push(mirror_port());
    cfg.mirror.push(MirrorConfig {
        name: "tap".into(),
        interface: "reth0".into(),
        rate,
        output: "mon0".into(),
    });
}

/// The sample policy of the diagram above.
pub fn sample_config() -> DataplaneConfig {
    let p = |s: &str| s.parse().unwrap();
    DataplaneConfig {
        interfaces: vec![
            InterfaceConfig {
                name: "reth0".into(),
                device: "t0".into(),
                zone: "trust".into(),
                addresses: vec![],
                reth: Some(RethConfig {
                    rg: 1,
                    vmac: "02:00:5e:00:01:01".into(),
                    vips: vec![p("10.1.0.1/24"), p("2001:db8:1::1/64")],
                }),
                mtu: None,
                vlan: None,
                tcp_mss: None,
            },
            InterfaceConfig {
                name: "reth1".into(),
                device: "u0".into(),
                zone: "untrust".into(),
                addresses: vec![],
                reth: Some(RethConfig {
                    rg: 1,
                    vmac: "02:00:5e:00:01:02".into(),
                    vips: vec![p("192.0.2.1/24"), p("2001:db8:2::1/64")],
                }),
                mtu: None,
                vlan: None,
                tcp_mss: None,
            },
        ],
        policies: vec![
            PolicyConfig {
                name: "out".into(),
                from_zone: "trust".into(),
                to_zone: "untrust".into(),
                source: vec![],
                destination: vec![],
                protocol: None,
                ports: vec![],
                action: PolicyAction::Permit,
            },
            PolicyConfig {
                name: "web-in".into(),
                from_zone: "untrust".into(),
                to_zone: "trust".into(),
                source: vec![],
                destination: vec![p("10.1.0.10/32")],
                protocol: Some("tcp".into()),
                ports: vec!["80".into()],
                action: PolicyAction::Permit,
            },
        ],
        snat: vec![SnatRule {
            name: "out".into(),
            from_zone: "trust".into(),
            to_zone: "untrust".into(),
            source: vec![],
            pool: None,
            port_low: 1024,
            port_high: 65535,
            filtering: Default::default(),
        }],
        dnat: vec![DnatRule {
            name: "web".into(),
            from_zone: "untrust".into(),
            destination: p("192.0.2.1/32"),
            protocol: "tcp".into(),
            port: 8080,
            to_address: p("10.1.0.10/32"),
            to_port: 80,
        }],
        routes: vec![],
        workers: None,
        icmp_rate: None,
        icmp_burst: None,
        garp_count: None,
        garp_interval_ms: None,
        mirror: vec![],
        screen: vec![],
    }
}

/// Runs `f` on a thread inside namespace `ns`.
pub fn in_ns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        os::enter_netns(&ns).expect("enter netns");
        f()
    })
}

/// The fabric side of a test node: the fabric device (a dataplane port
/// numbered after the data interfaces) and the map the worker forwards by.
pub struct FabricSpec {
    pub device: String,
    pub map: Arc<ArcSwap<FabricMap>>,
    pub stats: Arc<FabricStats>,
}

/// What a test node runs: its dataplane config, the RGs it is primary for
/// (every RG of the config is in its role map), optionally a fabric, and
/// how many workers.
pub struct FirewallSpec {
    pub config: DataplaneConfig,
    pub primary: Vec<RgId>,
    pub fabric: Option<FabricSpec>,
    pub workers: Option<usize>,
    /// Replaces the fabric hook of every worker (fault injection).
    pub hooks: Option<HookFactory>,
    /// The session table's bounds (address counts are turned on when a
    /// screen of the config needs them).
    pub table: TableConfig,
}

impl FirewallSpec {
    /// The sample config, primary for RG1, no fabric, default workers.
    pub fn sample() -> FirewallSpec {
        FirewallSpec {
            config: sample_config(),
            primary: vec![RgId(1)],
            fabric: None,
            workers: None,
            hooks: None,
            table: TableConfig::default(),
        }
    }
}

/// An AF_XDP dataplane forwarding between the config's interfaces (and its
/// fabric port) inside a namespace.
pub struct Firewall {
    dataplane: Option<Dataplane>,
    pub table: session::SharedTable,
    pub shared: Arc<Shared>,
    /// The per-RG delta queues: what would have gone to a peer.
    pub deltas: Mutex<Vec<DeltaConsumer>>,
}

impl Firewall {
    /// The sample config as primary of RG1.
    pub fn start(ns: &str) -> Firewall {
        Firewall::start_with(ns, FirewallSpec::sample())
    }

    pub fn start_with(ns: &str, spec: FirewallSpec) -> Firewall {
        let needs_counts = Compiled::new(&spec.config).is_ok_and(|c| c.needs_address_counts());
        let table = session::shared(SessionTable::new(TableConfig {
            address_counts: spec.table.address_counts || needs_counts,
            ..spec.table.clone()
        }));
        for rg in &spec.primary {
            lock(&table).promote_rg(*rg);
        }
        let t = table.clone();
        let started = in_ns(ns, move || {
            let mut compiled = Compiled::new(&spec.config).expect("valid config");
            for i in &mut compiled.ifaces {
                i.mac = os::mac(&i.device).expect("device MAC");
            }
            let rgs: Vec<RgId> = compiled.ifaces.iter().filter_map(|i| i.rg()).collect();
            let roles = Arc::new(ArcSwap::from_pointee(
                rgs.iter()
                    .map(|rg| {
                        let role = RgRole {
                            primary: spec.primary.contains(rg),
                            epoch: Epoch(2),
                        };
                        (*rg, role)
                    })
                    .collect::<RoleMap>(),
            ));
            // Nobody syncs here: the queues are kept (not drained) so that
            // pushes succeed until they are full, then count as dropped;
            // a test may read what would have gone to the peer.
            let (producer, consumers) = delta_queues(&rgs, 65536);
            let fabric_port = compiled
                .ifaces
                .iter()
                .map(|i| i.id.0 + 1)
                .max()
                .unwrap_or(0);
            let ports: Vec<PortSpec> = compiled
                .ports()
                .map(|i| PortSpec {
                    iface: i.id,
                    device: i.device.clone(),
                    mode: PortMode::Data,
                })
                .chain(spec.fabric.iter().map(|f| PortSpec {
                    iface: InterfaceId(fabric_port),
                    device: f.device.clone(),
                    mode: PortMode::Fabric,
                }))
                .collect();
            let shared = Arc::new(Shared::new(Arc::new(compiled), t, roles, producer));
            let hooks: HookFactory = match (spec.hooks, spec.fabric) {
                (Some(h), _) => h,
                (None, Some(f)) => Arc::new(move |_| {
                    Box::new(FabricForwarder::new(f.map.clone(), f.stats.clone()))
                        as Box<dyn FabricHook>
                }),
                (None, None) => Arc::new(|_| Box::new(NoFabric) as Box<dyn FabricHook>),
            };
            let dp = Dataplane::start(
                ports,
                PoolConfig {
                    workers: spec.workers,
                    ..PoolConfig::default()
                },
                shared.clone(),
                hooks,
                monotonic_clock(),
            );
            (dp, shared, consumers)
        })
        .join()
        .expect("start dataplane");
        let (dp, shared, deltas) = started;
        dp.wait_running(Duration::from_secs(30)).expect("AF_XDP up");
        Firewall {
            dataplane: Some(dp),
            table,
            shared,
            deltas: Mutex::new(deltas),
        }
    }

    pub fn dataplane(&self) -> &Dataplane {
        self.dataplane.as_ref().expect("running")
    }

    /// Takes every delta queued for the peer so far.
    pub fn take_deltas(&self) -> Vec<crate::delta::Delta> {
        let mut keys = Vec::new();
        for c in self
            .deltas
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter_mut()
        {
            c.try_recv_many(&mut keys, usize::MAX);
        }
        keys
    }

    /// Frames the workers have received so far.
    pub fn rx_frames(&self) -> u64 {
        self.dataplane()
            .health
            .workers()
            .iter()
            .map(|w| w.core.rx.load(std::sync::atomic::Ordering::Relaxed))
            .sum()
    }

    /// Stops the dataplane; the counters of every worker, summed.
    pub fn stop(mut self) -> Arc<CoreStats> {
        let workers = self.dataplane.take().expect("running").stop();
        let total = CoreStats::zeroed(self.shared.cfg.policies.len());
        for w in &workers {
            total.add(&w.core);
        }
        Arc::new(total)
    }
}

#[path = "testbed_flood.rs"]
pub mod flood;

/// Instructions the running binary executes when run again with `args`
/// under callgrind (`valgrind --tool=callgrind`, Debian package valgrind):
/// deterministic, so a bench compares hosts that differ 2x in speed by it.
/// `tag` names the temporary output file.
pub fn callgrind_instructions(tag: &str, args: &[&str]) -> Result<u64, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let out = std::env::temp_dir().join(format!(
        "{tag}-cg-{}-{}.out",
        std::process::id(),
        args.join("_").replace('-', "")
    ));
    let status = std::process::Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(&exe)
        .args(args)
        .output()
        .map_err(|e| format!("valgrind (apt package valgrind): {e}"))?;
    if !status.status.success() {
        return Err(format!(
            "valgrind failed: {}",
            String::from_utf8_lossy(&status.stderr)
        ));
    }
    let text = std::fs::read_to_string(&out).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(&out);
    text.lines()
        .find_map(|l| {
            l.strip_prefix("summary:")
                .or_else(|| l.strip_prefix("totals:"))
        })
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| "no totals in the callgrind output".into())
}
