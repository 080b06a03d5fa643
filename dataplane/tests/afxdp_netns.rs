//! Real AF_XDP forwarding in network namespaces:
//!
//! ```text
//!   client ns            fw ns (AF_XDP dataplane)          server ns
//!   c0 10.1.0.10/24 ---- t0 [reth0: VIP 10.1.0.1]
//!                           [reth1: VIP 192.0.2.1]  u0 ---- s0 192.0.2.100/24
//! ```
//! TCP and UDP from the client to the server go through SNAT (the server
//! sees 192.0.2.1); a TCP connection from the server side to
//! 192.0.2.1:8080 is port-forwarded to the client's port 80. Needs root
//! (network namespaces, XDP); skips with the reason otherwise.

use arc_swap::ArcSwap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;
use tandem_dataplane::afxdp::{AfXdp, AfXdpConfig, NoFabric, PortSpec};
use tandem_dataplane::config::{
    Compiled, DataplaneConfig, DnatRule, InterfaceConfig, PolicyAction, PolicyConfig, RethConfig,
    SnatRule,
};
use tandem_dataplane::core::Core;
use tandem_dataplane::delta::delta_queues;
use tandem_dataplane::session::{SessionTable, TableConfig, lock, monotonic_clock};
use tandem_dataplane::xdp::PortMode;
use tandem_dataplane::{os, session};
use tandem_proto::{Epoch, RgId, RgRole, RoleMap};

fn sh(args: &[&str]) {
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
struct Topo {
    ns: [String; 3],
}

impl Topo {
    fn new(tag: &str) -> Topo {
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
        sh(&[
            "ip", "link", "add", "c0", "netns", c, "type", "veth", "peer", "name", "t0", "netns", f,
        ]);
        sh(&[
            "ip", "link", "add", "s0", "netns", s, "type", "veth", "peer", "name", "u0", "netns", f,
        ]);
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

fn config() -> DataplaneConfig {
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
                    vips: vec![p("10.1.0.1/24")],
                }),
            },
            InterfaceConfig {
                name: "reth1".into(),
                device: "u0".into(),
                zone: "untrust".into(),
                addresses: vec![],
                reth: Some(RethConfig {
                    rg: 1,
                    vmac: "02:00:5e:00:01:02".into(),
                    vips: vec![p("192.0.2.1/24")],
                }),
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
    }
}

/// Runs `f` on a thread inside namespace `ns`.
fn in_ns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        os::enter_netns(&ns).expect("enter netns");
        f()
    })
}

struct Firewall {
    stop: Arc<AtomicBool>,
    worker: Option<std::thread::JoinHandle<Arc<tandem_dataplane::core::CoreStats>>>,
    table: session::SharedTable,
}

impl Firewall {
    fn start(ns: &str) -> Firewall {
        let stop = Arc::new(AtomicBool::new(false));
        let table: session::SharedTable =
            Arc::new(Mutex::new(SessionTable::new(TableConfig::default())));
        lock(&table).promote_rg(RgId(1));
        let (ready_tx, ready_rx) = mpsc::channel();
        let (s, t) = (stop.clone(), table.clone());
        let worker = in_ns(ns, move || {
            let mut compiled = Compiled::new(&config()).expect("valid config");
            for i in &mut compiled.ifaces {
                i.mac = os::mac(&i.device).expect("device MAC");
            }
            let roles = Arc::new(ArcSwap::from_pointee(RoleMap::from([(
                RgId(1),
                RgRole {
                    primary: true,
                    epoch: Epoch(2),
                },
            )])));
            let (producer, _consumers) = delta_queues(&[RgId(1)], 65536);
            let ports: Vec<PortSpec> = compiled
                .ifaces
                .iter()
                .map(|i| PortSpec {
                    iface: i.id,
                    device: i.device.clone(),
                    mode: PortMode::Data,
                })
                .collect();
            let mut core = Core::new(Arc::new(compiled), t, roles.clone(), producer);
            let mut io = match AfXdp::open(&ports, &AfXdpConfig::default()) {
                Ok(io) => io,
                Err(e) => {
                    ready_tx.send(Err(e.0)).unwrap();
                    return core.stats.clone();
                }
            };
            ready_tx.send(Ok(())).unwrap();
            let clock = monotonic_clock();
            io.run(&mut core, &roles, &mut NoFabric, &clock, &s);
            core.stats.clone()
        });
        ready_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("worker started")
            .expect("AF_XDP up");
        Firewall {
            stop,
            worker: Some(worker),
            table,
        }
    }

    fn stop(mut self) -> Arc<tandem_dataplane::core::CoreStats> {
        self.stop.store(true, Ordering::Relaxed);
        self.worker.take().unwrap().join().expect("worker")
    }
}

fn skip() -> bool {
    if let Err(why) = os::privileged() {
        eprintln!(
            "SKIPPED: AF_XDP netns test needs root with CAP_NET_ADMIN/CAP_SYS_ADMIN and iproute2: {why}"
        );
        return true;
    }
    false
}

#[test]
fn tcp_and_udp_pass_through_afxdp_with_snat_and_a_dnat_port_forward() {
    if skip() {
        return;
    }
    let topo = Topo::new("a");
    let fw = Firewall::start(&topo.ns[1]);
    // Server: TCP echo that reports the peer it saw, UDP echo.
    let (seen_tx, seen_rx) = mpsc::channel::<SocketAddr>();
    let server = in_ns(&topo.ns[2], move || {
        let tcp = TcpListener::bind("0.0.0.0:8000").unwrap();
        let udp = UdpSocket::bind("0.0.0.0:9000").unwrap();
        udp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let (mut s, peer) = tcp.accept().unwrap();
        seen_tx.send(peer).unwrap();
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).unwrap();
        s.write_all(&buf[..n]).unwrap();
        let (n, from) = udp.recv_from(&mut buf).unwrap();
        udp.send_to(&buf[..n], from).unwrap();
        seen_tx.send(from).unwrap();
    });
    std::thread::sleep(Duration::from_millis(200));
    let client = in_ns(&topo.ns[0], || {
        let mut s = TcpStream::connect_timeout(
            &"192.0.2.100:8000".parse().unwrap(),
            Duration::from_secs(10),
        )
        .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"through the firewall").unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap();
        let tcp_echo = buf[..n].to_vec();
        let u = UdpSocket::bind("0.0.0.0:0").unwrap();
        u.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        u.send_to(b"udp probe", "192.0.2.100:9000").unwrap();
        let n = u.recv(&mut buf).unwrap();
        (tcp_echo, buf[..n].to_vec())
    });
    let (tcp_echo, udp_echo) = client.join().expect("client");
    server.join().expect("server");
    assert_eq!(tcp_echo, b"through the firewall");
    assert_eq!(udp_echo, b"udp probe");
    let tcp_peer = seen_rx.recv().unwrap();
    let udp_peer = seen_rx.recv().unwrap();
    assert_eq!(
        tcp_peer.ip().to_string(),
        "192.0.2.1",
        "server saw the SNAT address"
    );
    assert_eq!(udp_peer.ip().to_string(), "192.0.2.1");
    assert!(lock(&fw.table).len() >= 2, "sessions were created");

    // Port forward: the server side connects to the VIP's 8080.
    let listener = in_ns(&topo.ns[0], || {
        let l = TcpListener::bind("0.0.0.0:80").unwrap();
        let (mut s, peer) = l.accept().unwrap();
        s.write_all(b"hello from inside").unwrap();
        peer
    });
    std::thread::sleep(Duration::from_millis(200));
    let outside = in_ns(&topo.ns[2], || {
        let mut s =
            TcpStream::connect_timeout(&"192.0.2.1:8080".parse().unwrap(), Duration::from_secs(10))
                .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap();
        buf[..n].to_vec()
    });
    assert_eq!(outside.join().unwrap(), b"hello from inside");
    assert_eq!(
        listener.join().unwrap().ip().to_string(),
        "192.0.2.100",
        "no SNAT inbound"
    );
    let stats = fw.stop();
    assert!(stats.tx.load(Ordering::Relaxed) > 10);
    assert!(stats.sessions_created.load(Ordering::Relaxed) >= 3);
}
