use tandem_dataplane::screen::{ScreenConfig, SynFloodConfig};
use tandem_dataplane::session::{read, TableConfig};
use tandem_dataplane::testbed::flood::{self, Flood};
use tandem_dataplane::testbed::{Firewall, FirewallSpec, Topo};
use std::sync::atomic::Ordering::Relaxed;
#[test]
fn dbg() {
    let topo = Topo::new("dbg");
    let mut spec = FirewallSpec { workers: Some(1), table: TableConfig { capacity: 16384, ..TableConfig::default() }, ..FirewallSpec::sample() };
    spec.config.screen.push(ScreenConfig { syn_flood: Some(SynFloodConfig { attack_threshold: 500, source_threshold: None }), ..ScreenConfig::off("s", "untrust") });
    let fw = Firewall::start_with(&topo.ns[1], spec);
    let out = flood::run(&topo, &fw, Flood { seconds: 4, interval_us: Some(50) });
    eprintln!("attempts {} ok {} p50 {} p99 {}", out.attempts, out.succeeded, out.p50_ms, out.p99_ms);
    let zone = fw.shared.cfg.iface_by_device("u0").unwrap().zone;
    eprintln!("{:?}", fw.shared.cfg.screen(zone).unwrap().state.stats.named());
    for (h, r) in read(&fw.table).iter().filter(|(_, r)| r.key.src == std::net::Ipv4Addr::new(192,0,2,100).into()) { eprintln!("{:?} {:?} {:?}", r.key, r.tcp_state, read(&fw.table).proxy(h)); }
    eprintln!("nb u {:?} t {:?}", fw.shared.neighbors.get(tandem_dataplane::session::InterfaceId(1), std::net::Ipv4Addr::new(192,0,2,100).into()), fw.shared.neighbors.get(tandem_dataplane::session::InterfaceId(0), std::net::Ipv4Addr::new(10,1,0,10).into()));
    let c = fw.stop();
    eprintln!("held {} sent {} outbox_dropped {}", c.held.load(Relaxed), c.held_sent.load(Relaxed), c.outbox_dropped.load(Relaxed));
    for r in tandem_dataplane::core::DropReason::ALL { let n = c.dropped(r); if n > 0 { eprintln!("drop {} {n}", r.as_str()); } }
    eprintln!("tx {} rx {}", c.tx.load(Relaxed), c.rx.load(Relaxed));
}
