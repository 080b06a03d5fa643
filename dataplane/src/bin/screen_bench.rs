//! screen-bench: legitimate connections under a SYN flood, screen on and
//! off, each against the unprotected table in the same run.
//!
//! `sudo cargo run --release -p tandem-dataplane --bin screen-bench -- --json`
//! (root: network namespaces, AF_XDP; needs hping3). One worker, a table
//! of 16,384 sessions; hping3 floods the sample port forward
//! (192.0.2.1:8080) with random-source SYNs from an attacker namespace
//! bridged onto the untrust segment, while a client on that segment opens
//! real TCP connections to the same service one after the other (connect,
//! request, answer). Per configuration:
//!
//! - `*_success_rate`: connections answered / attempted (3 s timeouts),
//! - `*_conn_per_s`: answered connections per second (sequential client:
//!   a latency figure as much as a rate),
//! - `*_p99_ms`: connect-to-answer time,
//! - `*_flood_pps`: frames the firewall received per second (the flood
//!   hping3 managed: generator-bound on this 2-CPU VM),
//! - `*_max_sessions`: most sessions the table held (high watermark 14,745).
//!
//! Configurations: `unprotected` (no screen, high watermark 100%: no early
//! drop: the table as it was before screens), `early_drop` (no screen,
//! default watermarks), `syn_cookies` (the untrust screen answers SYNs
//! above 500/s per destination with cookies); and `quiet` (no flood) as the
//! baseline of the ratios `syn_cookies_rate_vs_quiet` and
//! `early_drop_rate_vs_quiet`.
//!
//! Options: `--seconds N` per configuration (default 5), `--interval-us N`
//! (hping3 `-i uN`; default: `--flood`, as fast as it can).

use tandem_dataplane::os;
use tandem_dataplane::screen::{ScreenConfig, SynFloodConfig};
use tandem_dataplane::session::{TableConfig, Watermarks};
use tandem_dataplane::testbed::flood::{self, Flood, FloodOutcome};
use tandem_dataplane::testbed::{Firewall, FirewallSpec, Topo};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    let json = args.iter().any(|a| a == "--json");
    let seconds = flag("--seconds").unwrap_or(5).max(2);
    let interval_us = flag("--interval-us").map(|v| v as u32);
    if let Err(why) = os::privileged() {
        eprintln!("SKIPPED: screen-bench needs root (network namespaces, AF_XDP): {why}");
        return;
    }
    if std::process::Command::new("hping3")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: screen-bench needs hping3 (./dev.sh installs it)");
        return;
    }
    let emit = |name: &str, value: f64, unit: &str| {
        if json {
            println!(r#"{{"name":"{name}","value":{value:.3},"unit":"{unit}"}}"#);
        } else {
            println!("{name:<36} {value:>14.3} {unit}");
        }
    };
    let topo = Topo::new("sb");
    let run = |name: &str, screen: bool, high_pct: u8, flood_on: bool| -> FloodOutcome {
        let mut spec = FirewallSpec {
            workers: Some(1),
            table: TableConfig {
                capacity: 16_384,
                watermarks: Watermarks {
                    high_pct,
                    ..Watermarks::default()
                },
                ..TableConfig::default()
            },
            ..FirewallSpec::sample()
        };
        if screen {
            spec.config.screen.push(ScreenConfig {
                syn_flood: Some(SynFloodConfig {
                    attack_threshold: 500,
                    source_threshold: None,
                }),
                ..ScreenConfig::off("untrust-screen", "untrust")
            });
        }
        let fw = Firewall::start_with(&topo.ns[1], spec);
        // No flood: one SYN a second, the quiet baseline.
        let f = Flood {
            seconds,
            interval_us: if flood_on {
                interval_us
            } else {
                Some(1_000_000)
            },
        };
        let out = flood::run(&topo, &fw, f);
        fw.stop();
        eprintln!("{name}: {}", out.summary());
        emit(&format!("{name}_success_rate"), out.success_rate(), "ratio");
        emit(&format!("{name}_conn_per_s"), out.per_s, "conn/s");
        emit(&format!("{name}_p99_ms"), out.p99_ms, "ms");
        emit(&format!("{name}_flood_pps"), out.rx_per_s, "pps");
        emit(
            &format!("{name}_max_sessions"),
            out.max_sessions as f64,
            "sessions",
        );
        out
    };
    let quiet = run("quiet", false, 90, false);
    run("unprotected", false, 100, true);
    let early = run("early_drop", false, 90, true);
    let cookies = run("syn_cookies", true, 90, true);
    let ratio = |o: &FloodOutcome| o.per_s / quiet.per_s.max(0.001);
    emit("early_drop_rate_vs_quiet", ratio(&early), "ratio");
    emit("syn_cookies_rate_vs_quiet", ratio(&cookies), "ratio");
}
