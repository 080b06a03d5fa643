//! One test per election rule, on two state machines in simulated time.

use super::duo::{Duo, Record};
use super::*;

const RG1: RgId = RgId(1);
const T0: Millis = Millis(1_000_000);

fn cfg(node: u8, priority: u16, preempt: bool) -> ElectionConfig {
    let mut rg = RgConfig::new(RG1, priority);
    rg.preempt = preempt;
    rg.monitors = vec![MonitorConfig::interface("trust0", 255)];
    ElectionConfig {
        node: NodeId(node),
        cluster_id: 1,
        heartbeat_interval_ms: 100,
        heartbeat_threshold: 3,
        startup_grace_ms: 2000,
        transfer_timeout_ms: 1000,
        rgs: vec![rg],
        incarnation: 100 * u64::from(node) + 1,
    }
}

/// node0 priority 200, node1 priority 100; both booted together and past
/// the initial hold-down.
fn duo(preempt: bool) -> Duo {
    let mut d = Duo::new(cfg(0, 200, preempt), cfg(1, 100, preempt), T0);
    d.run(1500);
    d
}

fn assert_single_forwarder(d: &Duo) {
    assert_eq!(
        d.forwarders(RG1).len(),
        1,
        "exactly one forwarder: {:?}",
        d.forwarders(RG1)
    );
}

#[test]
fn cold_start_higher_priority_claims() {
    let d = duo(false);
    assert_eq!(d.state(0, RG1), RgState::Primary);
    assert_eq!(d.state(1, RG1), RgState::Secondary);
    assert_eq!(
        d.nodes[0].epoch(RG1),
        Some(Epoch(2)),
        "node0 claims even epochs"
    );
}

#[test]
fn tie_break_prefers_lower_node_id() {
    let mut d = Duo::new(cfg(0, 100, false), cfg(1, 100, false), T0);
    d.run(500);
    assert_eq!(d.state(0, RG1), RgState::Primary);
    assert_eq!(d.state(1, RG1), RgState::Secondary);
}

#[test]
fn startup_grace_never_steals_from_a_live_peer() {
    // node1 runs alone first and takes the RG after its grace.
    let mut d = Duo::new(cfg(0, 200, true), cfg(1, 100, true), T0);
    d.crash(0);
    d.run(2500);
    assert_eq!(d.state(1, RG1), RgState::Primary);
    // node0 boots with higher priority and preempt, but has not imported
    // the RG's sessions yet: it must not take the RG.
    d.synced[0] = false;
    d.restart(0);
    d.run(3000);
    assert_eq!(d.state(0, RG1), RgState::Secondary);
    assert_eq!(d.state(1, RG1), RgState::Primary);
    assert!(d.nodes[0].status(d.now).rgs[0].reason.contains("sync"));
    // Sessions imported: now it claims by preference.
    d.synced[0] = true;
    d.run(2000);
    assert_eq!(d.state(0, RG1), RgState::Primary);
    assert_eq!(d.state(1, RG1), RgState::Secondary);
}

#[test]
fn startup_grace_claims_when_peer_absent() {
    let mut d = Duo::new(cfg(0, 200, false), cfg(1, 100, false), T0);
    d.crash(1);
    d.run(1900);
    assert_eq!(
        d.state(0, RG1),
        RgState::Init,
        "still waiting inside the grace"
    );
    assert!(
        d.nodes[0]
            .status(d.now)
            .peer_reason
            .contains("startup grace")
    );
    d.run(200);
    assert_eq!(d.state(0, RG1), RgState::Primary);
}

#[test]
fn control_link_only_failure_is_not_peer_death() {
    let mut d = duo(false);
    d.set_path(Path::Control, false);
    d.run(5000);
    assert_eq!(d.state(0, RG1), RgState::Primary);
    assert_eq!(
        d.state(1, RG1),
        RgState::Secondary,
        "no takeover while fabric heartbeats arrive"
    );
    let st = d.nodes[1].status(d.now);
    assert!(st.peer_alive);
    assert_eq!(
        st.peer_reason,
        "control link down; peer alive on fabric (no takeover)"
    );
    // One fabric path is enough.
    d.set_path(Path::Fab0, false);
    d.run(2000);
    assert_eq!(d.state(1, RG1), RgState::Secondary);
    // All paths silent: the peer is lost.
    d.set_path(Path::Fab1, false);
    d.run(1000);
    assert_eq!(d.state(1, RG1), RgState::Primary);
}

#[test]
fn both_fabric_links_down_is_a_condition_not_peer_death() {
    let mut d = duo(false);
    d.run(1000);
    d.set_path(Path::Fab0, false);
    d.set_path(Path::Fab1, false);
    d.run(5000);
    assert_eq!(d.state(0, RG1), RgState::Primary);
    assert_eq!(d.state(1, RG1), RgState::Secondary, "no takeover");
    let st = d.nodes[1].status(d.now);
    assert!(st.peer_alive);
    assert_eq!(
        st.peer_reason,
        "peer alive on control; both fabric links down (no fabric forwarding)"
    );
    d.set_path(Path::Fab1, true);
    d.run(500);
    assert_eq!(d.nodes[1].status(d.now).peer_reason, "peer alive");
}

#[test]
fn crashed_peer_is_detected_and_replaced_within_threshold() {
    let mut d = duo(false);
    let crash_at = d.now;
    d.crash(0);
    let took = d
        .run_until(2000, |d| d.state(1, RG1) == RgState::Primary)
        .expect("promoted");
    // Threshold 3 x 100 ms, plus up to one heartbeat interval and a tick.
    assert!(took <= 410, "detection + promotion took {took} ms");
    // The last heartbeat may predate the crash by up to one interval.
    assert!(took >= 200, "not before threshold - interval: {took} ms");
    assert!(d.promoted_at(1, RG1, crash_at).is_some());
    assert_eq!(
        d.nodes[1].epoch(RG1),
        Some(Epoch(3)),
        "node1's next (odd) epoch"
    );
}

#[test]
fn preempt_off_incumbent_keeps_the_rg() {
    let mut d = duo(false);
    d.crash(0);
    d.run(1000);
    d.restart(0);
    d.run(5000);
    assert_eq!(
        d.state(1, RG1),
        RgState::Primary,
        "lower priority incumbent keeps it"
    );
    assert_eq!(d.state(0, RG1), RgState::Secondary);
    assert!(
        d.nodes[0].status(d.now).rgs[0]
            .reason
            .contains("peer is primary")
    );
}

#[test]
fn preempt_on_takes_back_after_sync_and_hold_down() {
    let mut d = duo(true);
    d.crash(0);
    d.run(1000);
    d.restart(0);
    let back = d.now;
    d.run_until(10_000, |d| d.state(0, RG1) == RgState::Primary)
        .expect("preempted");
    assert!(d.promoted_at(0, RG1, back).is_some());
    assert_eq!(d.state(1, RG1), RgState::Secondary);
}

#[test]
fn hold_down_delays_preempt() {
    let mut c0 = cfg(0, 200, true);
    c0.rgs[0].hold_down_ms = 3000;
    let mut d = Duo::new(c0, cfg(1, 100, true), T0);
    d.run(500);
    d.crash(0);
    d.run(1000);
    d.restart(0);
    // The RG moved when node1 took it (seen by node0 at boot as a new
    // epoch): hold-down counts from there.
    d.run(2500);
    assert_eq!(d.state(0, RG1), RgState::Secondary, "inside hold-down");
    assert!(d.nodes[0].status(d.now).rgs[0].reason.contains("hold-down"));
    d.run(1000);
    assert_eq!(d.state(0, RG1), RgState::Primary);
}

#[test]
fn monitor_weight_to_zero_moves_rg_to_peer() {
    let mut d = duo(false);
    d.set_monitor(0, "trust0", false);
    d.run(200);
    assert_eq!(d.state(0, RG1), RgState::Primary, "dampening: not yet");
    d.run(300);
    assert_eq!(d.state(0, RG1), RgState::Ineligible);
    assert_eq!(d.state(1, RG1), RgState::Primary);
    assert_eq!(
        d.nodes[0].status(d.now).rgs[0].failed_monitors,
        vec!["trust0".to_string()]
    );
}

#[test]
fn monitor_flap_shorter_than_dampening_is_ignored() {
    let mut d = duo(false);
    for _ in 0..10 {
        d.set_monitor(0, "trust0", false);
        d.run(100);
        d.set_monitor(0, "trust0", true);
        d.run(100);
    }
    assert_eq!(d.state(0, RG1), RgState::Primary);
    assert!(!d.log.iter().any(|r| matches!(r, Record::Demote { .. })));
}

#[test]
fn monitor_recovery_waits_for_up_dampening() {
    let mut d = duo(true);
    d.set_monitor(0, "trust0", false);
    d.run(500);
    assert_eq!(d.state(1, RG1), RgState::Primary);
    d.set_monitor(0, "trust0", true);
    d.run(1500);
    assert_eq!(
        d.nodes[0].status(d.now).rgs[0].effective_priority,
        0,
        "up needs 2 s"
    );
    d.run(3000);
    assert_eq!(d.nodes[0].status(d.now).rgs[0].effective_priority, 200);
    assert_eq!(d.state(0, RG1), RgState::Primary, "preempt takes it back");
}

#[test]
fn both_ineligible_keeps_the_current_primary() {
    let mut d = duo(false);
    d.set_monitor(1, "trust0", false);
    d.run(500);
    d.set_monitor(0, "trust0", false);
    d.run(500);
    assert_eq!(d.state(0, RG1), RgState::Primary);
    assert!(d.nodes[0].status(d.now).rgs[0].reason.contains("degraded"));
    assert_eq!(d.state(1, RG1), RgState::Ineligible);
}

#[test]
fn manual_failover_moves_rg_and_is_sticky_until_reset() {
    let mut d = duo(true);
    let asked = d.now;
    let id = d.failover(1, RG1, 1).expect("accepted for processing");
    d.run(10);
    assert_eq!(d.state(1, RG1), RgState::Primary);
    assert_eq!(d.state(0, RG1), RgState::Secondary);
    let done = d.log.iter().find_map(|r| match r {
        Record::Done {
            at, id: i, result, ..
        } if *i == id => Some((*at, result.clone())),
        _ => None,
    });
    let (at, result) = done.expect("answered");
    assert_eq!(result, Ok(()));
    assert!(
        at.saturating_sub(asked) <= 3,
        "decision in {} ms",
        at.saturating_sub(asked)
    );
    // Sticky: node0 has preempt and higher priority, yet stays secondary.
    d.run(5000);
    assert_eq!(d.state(1, RG1), RgState::Primary);
    assert_eq!(d.nodes[0].status(d.now).rgs[0].manual, Some(1));
    // Reset: preempt brings it back.
    d.reset(1, RG1);
    d.run(3000);
    assert_eq!(d.state(0, RG1), RgState::Primary);
    assert_eq!(d.nodes[1].status(d.now).rgs[0].manual, None);
}

#[test]
fn manual_failover_never_leaves_the_rg_without_a_forwarder() {
    let mut d = duo(false);
    d.failover(1, RG1, 1).unwrap();
    for _ in 0..50 {
        d.run(1);
        assert!(!d.forwarders(RG1).is_empty(), "gap at {:?}", d.now);
    }
    assert_single_forwarder(&d);
    // A reset right after the commit, before any new heartbeat, must not
    // make either node act on its pre-failover view of the other.
    d.reset(1, RG1);
    for _ in 0..2000 {
        d.run(1);
        assert!(
            !d.forwarders(RG1).is_empty(),
            "gap after reset at {:?}",
            d.now
        );
    }
    assert_single_forwarder(&d);
    assert_eq!(
        d.forwarders(RG1),
        vec![1],
        "without preempt the RG stays after reset"
    );
}

#[test]
fn manual_failover_refusals_give_reasons() {
    let mut d = duo(false);
    assert_eq!(
        d.failover(0, RG1, 0).unwrap_err(),
        "already primary on this node"
    );
    d.synced[1] = false;
    d.run(10);
    assert!(d.failover(1, RG1, 1).unwrap_err().contains("not synced"));
    d.synced[1] = true;
    d.run(10);
    d.failover(1, RG1, 1).unwrap();
    d.run(10);
    // Straight back is inside node0's hold-down.
    assert!(d.failover(0, RG1, 0).unwrap_err().contains("hold-down"));
    assert!(
        d.failover(0, RgId(9), 0)
            .unwrap_err()
            .contains("not configured")
    );
    assert!(
        d.failover(0, RG1, 1)
            .unwrap_err()
            .contains("handled by node1")
    );
}

#[test]
fn manual_failover_aborts_when_the_primary_does_not_answer() {
    let mut d = duo(false);
    d.links[0][Path::Control as usize] = false; // node0's answers are lost
    let id = d.failover(1, RG1, 1).unwrap();
    d.run(1500);
    let refused = d
        .log
        .iter()
        .any(|r| matches!(r, Record::Done { id: i, result: Err(_), .. } if *i == id));
    assert!(refused, "requester told the transfer failed");
    assert_eq!(d.state(1, RG1), RgState::Secondary);
    assert_eq!(
        d.state(0, RG1),
        RgState::Primary,
        "old primary restored after its timeout"
    );
    assert_single_forwarder(&d);
}

#[test]
fn manual_override_is_cleared_when_its_node_fails() {
    let mut d = duo(true);
    d.failover(1, RG1, 1).unwrap();
    d.run(100);
    d.crash(1);
    d.run(1000);
    assert_eq!(d.state(0, RG1), RgState::Primary);
    assert_eq!(d.nodes[0].status(d.now).rgs[0].manual, None);
}

/// Cuts every path for `ms`: both nodes end up primary in distinct epochs.
fn partition(d: &mut Duo, ms: u64) -> (Epoch, Epoch) {
    for p in Path::ALL {
        d.set_path(p, false);
    }
    d.run(ms);
    assert_eq!(
        d.forwarders(RG1),
        vec![0, 1],
        "both primary while partitioned"
    );
    let (e0, e1) = (
        d.nodes[0].epoch(RG1).unwrap(),
        d.nodes[1].epoch(RG1).unwrap(),
    );
    assert_ne!(
        e0, e1,
        "node-distinct epochs: never two primaries in one epoch"
    );
    for p in Path::ALL {
        d.set_path(p, true);
    }
    (e0, e1)
}

#[test]
fn dual_primary_after_partition_resolves_to_the_newer_epoch() {
    let mut d = duo(false);
    let (e0, e1) = partition(&mut d, 1000);
    assert!(
        e1 > e0,
        "node1 claimed during the partition: {e1:?} > {e0:?}"
    );
    let healed = d.now;
    d.run(500);
    assert_eq!(
        d.state(1, RG1),
        RgState::Primary,
        "the newer claim keeps the RG although node0 has the higher priority"
    );
    assert_eq!(d.state(0, RG1), RgState::Secondary);
    assert_eq!(d.nodes[1].epoch(RG1), Some(e1), "no new epoch was needed");
    assert_eq!(d.promoted_at(1, RG1, healed), None, "no second claim");
    assert_eq!(d.nodes[0].epoch(RG1), Some(e1), "loser adopted the epoch");
    assert_single_forwarder(&d);
    d.run(5000);
    assert_eq!(
        d.state(1, RG1),
        RgState::Primary,
        "without preempt it stays"
    );
}

#[test]
fn dual_primary_with_preempt_yields_first_then_takes_back_after_sync_and_hold_down() {
    let mut d = duo(true);
    let (_, e1) = partition(&mut d, 1000);
    d.synced[0] = false;
    let healed = d.now;
    d.run(100);
    assert_eq!(
        d.state(0, RG1),
        RgState::Secondary,
        "the older claim yields"
    );
    assert_eq!(d.state(1, RG1), RgState::Primary);
    d.run(3000);
    assert_eq!(
        d.state(0, RG1),
        RgState::Secondary,
        "preempt waits for the sessions to sync"
    );
    d.synced[0] = true;
    let synced = d.now;
    d.run(1500);
    assert_eq!(d.state(0, RG1), RgState::Primary, "then preempt claims");
    let at = d.promoted_at(0, RG1, healed).unwrap();
    assert!(at >= synced, "not before the sync: {at:?} < {synced:?}");
    assert!(d.nodes[0].epoch(RG1).unwrap() > e1);
    assert_single_forwarder(&d);
}

#[test]
fn paused_primary_yields_to_the_newer_epoch_on_resume() {
    // The lab's SIGSTOP of the primary's daemon for 1.5 s: the peer takes
    // over; the resumed node, still primary on its stale view, must not
    // take the RG back (a second failover and two primaries).
    let mut d = duo(false);
    let e0 = d.nodes[0].epoch(RG1).unwrap();
    d.pause(0);
    d.run(1500);
    assert_eq!(d.state(1, RG1), RgState::Primary, "peer took over");
    let e1 = d.nodes[1].epoch(RG1).unwrap();
    assert!(e1 > e0);
    let resumed = d.now;
    d.resume(0);
    let overlap = d.run_until(1000, |d| d.state(0, RG1) == RgState::Secondary);
    assert!(overlap.is_some(), "the resumed node yielded");
    d.run(3000);
    assert_eq!(
        d.state(1, RG1),
        RgState::Primary,
        "no takeback without preempt"
    );
    assert_eq!(d.nodes[1].epoch(RG1), Some(e1), "no further epoch");
    assert_eq!(
        d.promoted_at(0, RG1, resumed),
        None,
        "node0 never re-claimed"
    );
    assert_eq!(
        d.promoted_at(1, RG1, resumed),
        None,
        "node1 never re-claimed"
    );
    assert_single_forwarder(&d);
}

#[test]
fn epochs_increase_at_every_ownership_change() {
    // Without preempt a reset leaves the RG where it is.
    let mut d = duo(false);
    let mut last = d.nodes[0].epoch(RG1).unwrap();
    for round in 0..4 {
        let target = (round + 1) % 2;
        d.run(1500); // past hold-down
        d.failover(target, RG1, target).unwrap();
        d.run(50);
        let e = d.nodes[target].epoch(RG1).unwrap();
        assert!(e > last, "round {round}: {e:?} after {last:?}");
        assert_eq!(e.0 % 2, target as u64, "parity of the claiming node");
        last = e;
        d.reset(target, RG1);
        d.run(10);
    }
}

#[test]
fn heartbeats_from_another_cluster_or_self_are_ignored() {
    let mut e = Election::new(cfg(0, 100, false));
    let mut other = Election::new(ElectionConfig {
        cluster_id: 99,
        ..cfg(1, 100, false)
    });
    let hb = other.heartbeat(Path::Control);
    e.on_heartbeat(&hb, Path::Control, T0);
    let mut me = Election::new(cfg(0, 100, false));
    e.on_heartbeat(&me.heartbeat(Path::Fab0), Path::Fab0, T0);
    assert_eq!(e.rejected_heartbeats(), 2);
    assert!(!e.peer_alive(T0));
}

#[test]
fn restarted_peer_does_not_take_back_without_preempt() {
    let mut d = duo(false);
    d.crash(0);
    d.run(1000);
    d.restart(0);
    d.run(3000);
    assert_eq!(d.state(1, RG1), RgState::Primary);
    assert_single_forwarder(&d);
}

#[test]
fn peer_view_is_rebuilt_from_each_heartbeat() {
    let mut e = Election::new(cfg(0, 100, false));
    let mut peer = Election::new(cfg(1, 100, false));
    e.on_heartbeat(&peer.heartbeat(Path::Control), Path::Control, T0);
    assert!(e.peer_rg(RG1, T0).is_some());
    // The peer stops reporting RG1 (reconfigured): it must disappear.
    let mut hb = peer.heartbeat(Path::Control);
    hb.rgs.clear();
    e.on_heartbeat(&hb, Path::Control, Millis(T0.0 + 1));
    assert!(e.peer_rg(RG1, Millis(T0.0 + 1)).is_none());
}

/// Mid-upgrade the peer speaks another protocol version. It is alive all
/// the same: rejecting its heartbeats would make both nodes primary.
#[test]
fn heartbeats_of_another_protocol_version_keep_the_peer_alive() {
    let mut e = Election::new(cfg(0, 100, false));
    let mut peer = Election::new(cfg(1, 100, false));
    let mut hb = peer.heartbeat(Path::Fab0);
    hb.protocol_version = PROTOCOL_VERSION + 1;
    e.on_heartbeat(&hb, Path::Fab0, T0);
    assert!(e.peer_alive(T0));
    assert_eq!(e.rejected_heartbeats(), 0);
    let reason = e.status(T0).peer_reason;
    assert!(reason.contains("no session sync"), "{reason}");
    let mut ancient = peer.heartbeat(Path::Fab1);
    ancient.protocol_version = 0;
    e.on_heartbeat(&ancient, Path::Fab1, T0);
    assert_eq!(e.rejected_heartbeats(), 1, "below the oldest understood");
}

/// Both nodes start with their dataplane not yet running (a full-weight
/// monitor that starts down) and come up a few ms apart, between two
/// heartbeats: each last heard the other as ineligible. Neither may claim
/// the RG on that stale report (both would: two forwarders); each waits,
/// as an eligible secondary, for a heartbeat sent since, and the normal
/// priority rule picks one.
#[test]
fn becoming_eligible_claims_only_on_a_peer_heartbeat_heard_since() {
    let with_dataplane = |node, prio| {
        let mut c = cfg(node, prio, false);
        c.rgs[0].monitors.push(MonitorConfig::dataplane("t0"));
        c
    };
    for (first, gap) in [(1, 30), (0, 30), (1, 0), (0, 5)] {
        let mut d = Duo::new(with_dataplane(0, 200), with_dataplane(1, 100), T0);
        // Heartbeats go out at T0 + 1 + 100 k.
        d.run(2450);
        assert!(d.forwarders(RG1).is_empty(), "nobody eligible yet");
        assert_eq!(d.state(0, RG1), RgState::Ineligible);
        d.set_monitor(first, "dataplane:t0", true);
        assert_eq!(d.state(first, RG1), RgState::Secondary, "eligible, waiting");
        d.run(gap);
        d.set_monitor(1 - first, "dataplane:t0", true);
        for _ in 0..1000 {
            d.run(1);
            assert!(
                d.forwarders(RG1).len() <= 1,
                "two forwarders at {:?} (first {first}, gap {gap})",
                d.now
            );
        }
        assert_single_forwarder(&d);
        assert_eq!(d.state(0, RG1), RgState::Primary, "higher priority");
    }
}

/// A dataplane monitor counts at full weight, without dampening.
#[test]
fn dead_dataplane_makes_the_node_ineligible_at_once() {
    let mut a = cfg(0, 200, false);
    a.rgs[0].monitors.push(MonitorConfig {
        initially_up: true,
        ..MonitorConfig::dataplane("t0")
    });
    let mut d = Duo::new(a, cfg(1, 100, false), T0);
    d.run(1500);
    assert_eq!(d.state(0, RG1), RgState::Primary);
    d.set_monitor(0, "dataplane:t0", false);
    d.run(1);
    assert_eq!(d.state(0, RG1), RgState::Ineligible, "no dampening");
    let st = &d.nodes[0].status(d.now).rgs[0];
    assert_eq!(st.effective_priority, 0);
    assert!(st.reason.contains("dataplane:t0"), "{}", st.reason);
    d.run(300);
    assert_eq!(d.state(1, RG1), RgState::Primary);
}

#[test]
fn status_names_the_peer_state_as_the_operator_reads_it() {
    let d = duo(false);
    let st = d.nodes[1].status(d.now);
    assert_eq!(
        st.rgs[0].peer_state.as_deref(),
        Some("primary"),
        "not the wire enum's name"
    );
    let st = d.nodes[0].status(d.now);
    assert_eq!(st.rgs[0].peer_state.as_deref(), Some("secondary"));
    for s in [
        RgState::Init,
        RgState::Secondary,
        RgState::Primary,
        RgState::SecondaryHold,
        RgState::Ineligible,
        RgState::Disabled,
    ] {
        assert_eq!(
            RgState::from_wire(s.to_wire()),
            s,
            "one round trip per state"
        );
    }
}
