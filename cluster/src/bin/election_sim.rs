//! election-sim: detection-to-promotion and manual-failover decision times
//! of the election state machine, in simulated time (deterministic), with
//! the default timers (heartbeat 100 ms, threshold 3) and a 1 ms control
//! link. Prints JSON lines with `--json`.
//!
//! `cargo run --release -p tandem-cluster --bin election-sim -- --json`

use tandem_cluster::election::duo::{Duo, Record};
use tandem_cluster::election::{ElectionConfig, RgConfig, RgState};
use tandem_dataplane::session::Millis;
use tandem_proto::{NodeId, RgId};

const RG1: RgId = RgId(1);

fn cfg(node: u8, priority: u16) -> ElectionConfig {
    ElectionConfig {
        node: NodeId(node),
        cluster_id: 1,
        heartbeat_interval_ms: 100,
        heartbeat_threshold: 3,
        startup_grace_ms: 2000,
        transfer_timeout_ms: 1000,
        rgs: vec![RgConfig::new(RG1, priority)],
        incarnation: u64::from(node) + 1,
    }
}

fn emit(json: bool, name: &str, v: f64, unit: &str) {
    if json {
        println!("{{\"name\":\"{name}\",\"value\":{v:.3},\"unit\":\"{unit}\"}}");
    } else {
        println!("{name:<40} {v:>10.3} {unit}");
    }
}

fn main() {
    let json = std::env::args().any(|a| a == "--json");
    // Crash at every offset within a heartbeat interval (worst and best
    // case relative to the last heartbeat).
    let mut crash = Vec::new();
    for offset in 0..100 {
        let mut d = Duo::new(cfg(0, 200), cfg(1, 100), Millis(1_000_000));
        d.run(2000 + offset);
        d.crash(0);
        let took = d
            .run_until(5000, |d| d.state(1, RG1) == RgState::Primary)
            .expect("takeover");
        crash.push(took);
    }
    crash.sort_unstable();
    emit(json, "crash_detect_promote_ms_min", crash[0] as f64, "ms");
    emit(
        json,
        "crash_detect_promote_ms_max",
        *crash.last().expect("runs") as f64,
        "ms",
    );
    emit(
        json,
        "crash_detect_promote_ms_mean",
        crash.iter().sum::<u64>() as f64 / crash.len() as f64,
        "ms",
    );

    let mut manual = Vec::new();
    for offset in 0..100 {
        let mut d = Duo::new(cfg(0, 200), cfg(1, 100), Millis(1_000_000));
        d.run(2000 + offset);
        let asked = d.now;
        let id = d.failover(1, RG1, 1).expect("valid request");
        d.run(50);
        let decided = d
            .log
            .iter()
            .find_map(|r| match r {
                Record::Done {
                    at,
                    id: i,
                    result: Ok(()),
                    ..
                } if *i == id => Some(*at),
                _ => None,
            })
            .expect("committed");
        manual.push(decided.saturating_sub(asked));
        assert_eq!(d.forwarders(RG1), vec![1]);
    }
    manual.sort_unstable();
    // From the request reaching the target to its commit (includes one
    // prepare/answer round trip on the 1 ms control link).
    emit(
        json,
        "manual_failover_decision_ms_max",
        *manual.last().expect("runs") as f64,
        "ms",
    );
    emit(
        json,
        "manual_failover_decision_ms_min",
        manual[0] as f64,
        "ms",
    );
}
