//! Every scenario with fixed seeds must hold every invariant, and a seed
//! must replay identically. (`tandem-simulations --seeds N` runs more.)

use tandem_simulations::{all, run};

const SEEDS: [u64; 2] = [1, 2];

fn scenario(name: &str) {
    let sc = all()
        .into_iter()
        .find(|s| s.name == name)
        .expect("scenario exists");
    for seed in SEEDS {
        let o = run(&sc, seed);
        assert!(o.passed(), "{}", o.report());
        assert!(
            o.sessions > 1000,
            "the generator built up sessions: {}",
            o.sessions
        );
    }
}

#[test]
fn control_link_partition_moves_nothing_and_converges() {
    scenario("control-link-partition");
}

#[test]
fn full_partition_then_heal_resolves_to_one_primary_and_converges() {
    scenario("full-partition-heal");
}

#[test]
fn partitioned_boot_never_gives_two_primaries_one_epoch() {
    scenario("partitioned-boot");
}

#[test]
fn one_way_loss_converges() {
    scenario("one-way-loss");
}

#[test]
fn flapping_control_link_moves_nothing() {
    scenario("flapping-link");
}

#[test]
fn primary_crash_and_restart_converge() {
    scenario("primary-crash-restart");
}

#[test]
fn manual_failover_during_bulk_is_safe() {
    scenario("manual-failover-during-bulk");
}

#[test]
fn manual_failover_during_partition_fails_cleanly_then_succeeds() {
    scenario("manual-failover-during-partition");
}

#[test]
fn delayed_and_reordered_packets_converge() {
    scenario("delayed-reordered");
}

#[test]
fn clock_skew_between_nodes_converges() {
    scenario("clock-skew");
}

#[test]
fn witness_mode_never_has_two_forwarders_under_any_two_of_three_partition() {
    scenario("witness-partitions");
}

#[test]
fn restarted_witness_remembers_its_grants_during_a_partition() {
    scenario("witness-restart-during-partition");
}

#[test]
fn losing_the_witness_with_both_nodes_alive_moves_nothing() {
    scenario("witness-crash-both-alive");
}

#[test]
fn node_restart_within_its_lease_gives_no_second_forwarder() {
    scenario("node-restart-within-lease");
}

#[test]
fn all_three_voters_restarted_in_turn_under_traffic_stay_safe() {
    scenario("all-three-restarted-in-turn");
}

#[test]
fn clock_rate_drift_within_the_margin_keeps_leases_exclusive() {
    scenario("witness-clock-drift");
}

fn find(name: &str) -> tandem_simulations::Scenario {
    all()
        .into_iter()
        .find(|s| s.name == name)
        .expect("scenario exists")
}

/// The overlap check can fail: with voters that forget their grants at a
/// restart (no record, no quarantine), the restarted witness hands node1
/// the RG node0 still forwards.
#[test]
fn overlap_check_reports_a_witness_that_forgets_its_grants() {
    let mut sc = find("witness-restart-during-partition");
    sc.voter_amnesia = true;
    // Whether the stale holder hears its refusal before the new holder
    // starts depends on the seed's latencies: some seeds must show it.
    let runs: Vec<_> = (1..=6).map(|seed| run(&sc, seed)).collect();
    let caught = |what: &str| {
        runs.iter()
            .filter(|o| o.violations.iter().any(|v| v.contains(what)))
            .count()
    };
    assert!(
        caught("both nodes forward in witness mode") > 0,
        "no seed of 6 showed the overlap"
    );
    // The epoch-order check fails there too: a member that forgot the
    // log lets a node forward under an epoch already used.
    assert!(
        caught("forwarded under") > 0,
        "no seed showed a reused epoch"
    );
}

/// ... and a clock running slower than the lease margin allows makes the
/// holder forward past the voters' expiry: the check reports it.
#[test]
fn overlap_check_reports_clock_drift_beyond_the_lease_margin() {
    let mut sc = find("witness-clock-drift");
    sc.rate_ppm = [0, -200_000];
    let o = run(&sc, 1);
    assert!(
        o.violations
            .iter()
            .any(|v| v.contains("both nodes forward in witness mode")),
        "expected an overlap: {}",
        o.report()
    );
}

#[test]
fn same_seed_gives_the_same_event_log() {
    for name in ["full-partition-heal", "manual-failover-during-partition"] {
        let sc = all()
            .into_iter()
            .find(|s| s.name == name)
            .expect("scenario");
        let a = run(&sc, 7);
        let b = run(&sc, 7);
        assert!(a.passed() && b.passed());
        assert_eq!(a.log, b.log, "{name}: same seed, different timeline");
        assert_eq!(a.sessions, b.sessions);
    }
}
