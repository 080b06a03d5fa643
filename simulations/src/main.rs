//! `cargo run --release -p tandem-simulations -- --scenario NAME|all --seeds N [--first-seed S]`
//!
//! One line per run; exit status 1 if any invariant was violated (with the
//! report of each failing run: seed, timeline, first violation).

use std::process::ExitCode;
use tandem_simulations::{all, run};

fn main() -> ExitCode {
    let mut scenario = "all".to_string();
    let mut seeds = 1u64;
    let mut first = 1u64;
    let verbose = std::env::args().any(|a| a == "--verbose");
    // Sabotage, to see the checks fail: voters forget their grants.
    let amnesia = std::env::args().any(|a| a == "--voter-amnesia");
    let mut it = std::env::args()
        .skip(1)
        .filter(|a| a != "--verbose" && a != "--voter-amnesia");
    while let Some(a) = it.next() {
        let v = it.next();
        match (a.as_str(), v) {
            ("--scenario", Some(v)) => scenario = v,
            ("--seeds", Some(v)) => seeds = v.parse().unwrap_or(1),
            ("--first-seed", Some(v)) => first = v.parse().unwrap_or(1),
            _ => {
                eprintln!(
                    "usage: tandem-simulations --scenario NAME|all --seeds N [--first-seed S] [--verbose] [--voter-amnesia]"
                );
                for s in all() {
                    eprintln!("  {}", s.name);
                }
                return ExitCode::from(2);
            }
        }
    }
    let scenarios: Vec<_> = all()
        .into_iter()
        .filter(|s| scenario == "all" || s.name == scenario)
        .map(|mut s| {
            s.voter_amnesia = amnesia;
            s
        })
        .collect();
    if scenarios.is_empty() {
        eprintln!("unknown scenario {scenario:?}");
        return ExitCode::from(2);
    }
    let mut failed = 0;
    let (mut sim_ms, mut wall) = (0u64, 0f64);
    let (mut overlap_ms, mut max_overlap_ms) = (0u64, 0u64);
    for sc in &scenarios {
        for seed in first..first + seeds {
            let o = run(sc, seed);
            sim_ms += o.sim_ms;
            wall += o.wall.as_secs_f64();
            overlap_ms += o.overlap_ms;
            max_overlap_ms = max_overlap_ms.max(o.max_overlap_ms);
            println!(
                "{:<34} seed {:>5} {} sessions {:>5} overlap {:>5} ms sim {:>5.1}s wall {:>6.2}s",
                sc.name,
                seed,
                if o.passed() { "PASS" } else { "FAIL" },
                o.sessions,
                o.overlap_ms,
                o.sim_ms as f64 / 1e3,
                o.wall.as_secs_f64()
            );
            if !o.passed() {
                failed += 1;
                eprintln!("{}", o.report());
            } else if verbose {
                println!("{}", o.report());
            }
        }
    }
    println!(
        "{} runs, {failed} failed, {:.1} simulated s per wall s; two forwarders at once (a violation in witness mode): {overlap_ms} ms in total, longest {max_overlap_ms} ms",
        scenarios.len() as u64 * seeds,
        sim_ms as f64 / 1e3 / wall.max(1e-9)
    );
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
