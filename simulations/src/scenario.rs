//! Scenarios and the runner: a timeline of network events applied to a
//! simulated cluster, with the invariants checked every 10 ms of simulated
//! time and again after the network heals and traffic quiesces.
//!
//! Invariants:
//! 1. forwarding overlap, checked at every 1 ms tick (`timeline`): never
//!    two nodes forwarding one RG in one epoch, in witness mode never two
//!    at all (outside witness mode the overlap is reported as a figure);
//!    every claim a node makes is in an epoch above all it forwarded under
//!    before, and no running node's epoch goes down;
//! 2. after heal and quiescence, per RG the secondary's synced sessions equal
//!    the primary's exactly (keys and NAT), and both tables pass
//!    `verify_invariants` (no orphan companion);
//! 3. no acknowledged delta is missing: whenever sender and receiver are on
//!    the same stream, the sender's acked seq never exceeds what the
//!    receiver applied (and 2. proves every delta was applied or
//!    superseded);
//! 4. replication lag (oldest unacknowledged batch) is under 1 s after heal;
//! 5. the same seed gives the same event log (checked by running twice).

use crate::timeline::Timeline;
use crate::world::{NodeView, RGS, World, host_name, run_node, run_witness};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tandem_cluster::election::Path;
use tandem_dataplane::session::{lock, read};
use tandem_proto::{NodeId, RgId, RgRole};

#[derive(Clone, Debug)]
pub enum Step {
    /// Cut or restore one path in both directions between two parties
    /// (0, 1: nodes; 2: witness).
    Path {
        path: Path,
        a: u8,
        b: u8,
        up: bool,
    },
    /// Cut every path from `from` to `to` (one direction).
    OneWay {
        from: u8,
        to: u8,
        up: bool,
    },
    /// Every path between the two nodes.
    Partition {
        up: bool,
    },
    /// Isolate a party from both others.
    Isolate {
        who: u8,
        up: bool,
    },
    Crash(u8),
    Restart(u8),
    Failover {
        rg: u16,
        node: u8,
        via: u8,
    },
    /// Random per-message latency up to `max_ms` (reordering), or back to
    /// a fixed 1 ms.
    Latency {
        max_ms: u64,
    },
}

#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: &'static str,
    pub witness: bool,
    pub skew_ms: [u64; 2],
    /// Clock rate error per node in parts per million.
    pub rate_ppm: [i64; 2],
    pub timeline: Vec<(u64, Step)>,
    /// Simulated ms the timeline runs before the heal.
    pub run_ms: u64,
    /// No RG may change hands in this window (e.g. control link cut).
    pub stable: Option<(u64, u64)>,
    /// Sabotage for the checks' own tests: every voter forgets its grants
    /// at each start (a voter without its record and without the restart
    /// quarantine). Never set by a scenario in `all()`.
    pub voter_amnesia: bool,
}

const QUIESCE_MS: u64 = 15_000;

fn flapping() -> Vec<(u64, Step)> {
    let mut t = Vec::new();
    let mut at = 8_000;
    while at < 14_000 {
        t.push((
            at,
            Step::Path {
                path: Path::Control,
                a: 0,
                b: 1,
                up: false,
            },
        ));
        t.push((
            at + 150,
            Step::Path {
                path: Path::Control,
                a: 0,
                b: 1,
                up: true,
            },
        ));
        at += 250;
    }
    t
}

pub fn all() -> Vec<Scenario> {
    let sc = |name, timeline, run_ms| Scenario {
        name,
        witness: false,
        skew_ms: [0, 0],
        rate_ppm: [0, 0],
        timeline,
        run_ms,
        stable: None,
        voter_amnesia: false,
    };
    vec![
        Scenario {
            stable: Some((8_000, 18_000)),
            ..sc(
                "control-link-partition",
                vec![
                    (
                        8_000,
                        Step::Path {
                            path: Path::Control,
                            a: 0,
                            b: 1,
                            up: false,
                        },
                    ),
                    (
                        18_000,
                        Step::Path {
                            path: Path::Control,
                            a: 0,
                            b: 1,
                            up: true,
                        },
                    ),
                ],
                22_000,
            )
        },
        sc(
            "full-partition-heal",
            vec![
                (8_000, Step::Partition { up: false }),
                (13_000, Step::Partition { up: true }),
            ],
            18_000,
        ),
        // Both nodes boot cut off from each other: each claims every RG
        // after its startup grace, from the same starting epoch.
        sc(
            "partitioned-boot",
            vec![
                (0, Step::Partition { up: false }),
                (6_000, Step::Partition { up: true }),
            ],
            12_000,
        ),
        sc(
            "one-way-loss",
            vec![
                (
                    8_000,
                    Step::OneWay {
                        from: 0,
                        to: 1,
                        up: false,
                    },
                ),
                (
                    13_000,
                    Step::OneWay {
                        from: 0,
                        to: 1,
                        up: true,
                    },
                ),
            ],
            18_000,
        ),
        Scenario {
            stable: Some((8_000, 14_000)),
            ..sc("flapping-link", flapping(), 16_000)
        },
        sc(
            "primary-crash-restart",
            vec![(8_000, Step::Crash(0)), (12_000, Step::Restart(0))],
            20_000,
        ),
        sc(
            "manual-failover-during-bulk",
            vec![
                (6_000, Step::Crash(1)),
                (8_000, Step::Restart(1)),
                (
                    8_020,
                    Step::Failover {
                        rg: 1,
                        node: 1,
                        via: 0,
                    },
                ),
                (
                    14_000,
                    Step::Failover {
                        rg: 1,
                        node: 1,
                        via: 0,
                    },
                ),
            ],
            18_000,
        ),
        sc(
            "manual-failover-during-partition",
            vec![
                (
                    8_000,
                    Step::Path {
                        path: Path::Control,
                        a: 0,
                        b: 1,
                        up: false,
                    },
                ),
                (
                    9_000,
                    Step::Failover {
                        rg: 1,
                        node: 1,
                        via: 1,
                    },
                ),
                (
                    14_000,
                    Step::Path {
                        path: Path::Control,
                        a: 0,
                        b: 1,
                        up: true,
                    },
                ),
                (
                    17_000,
                    Step::Failover {
                        rg: 1,
                        node: 1,
                        via: 1,
                    },
                ),
            ],
            20_000,
        ),
        sc(
            "delayed-reordered",
            vec![
                (8_000, Step::Latency { max_ms: 40 }),
                (14_000, Step::Latency { max_ms: 1 }),
                (
                    15_000,
                    Step::Failover {
                        rg: 2,
                        node: 0,
                        via: 0,
                    },
                ),
            ],
            18_000,
        ),
        Scenario {
            skew_ms: [0, 3_600_000],
            ..sc(
                "clock-skew",
                vec![
                    (
                        10_000,
                        Step::Failover {
                            rg: 1,
                            node: 1,
                            via: 1,
                        },
                    ),
                    (14_000, Step::Crash(1)),
                    (16_000, Step::Restart(1)),
                ],
                22_000,
            )
        },
        Scenario {
            witness: true,
            ..sc(
                "witness-partitions",
                vec![
                    (8_000, Step::Isolate { who: 0, up: false }),
                    (13_000, Step::Isolate { who: 0, up: true }),
                    (18_000, Step::Isolate { who: 1, up: false }),
                    (23_000, Step::Isolate { who: 1, up: true }),
                    (28_000, Step::Isolate { who: 2, up: false }),
                    (33_000, Step::Isolate { who: 2, up: true }),
                    (36_000, Step::Partition { up: false }),
                    (40_000, Step::Partition { up: true }),
                ],
                44_000,
            )
        },
        // node0 holds RG1 through {node0, witness} while cut off from
        // node1, which asks for RG1 too (and node1 RG2, node0 asking); the
        // witness restarts meanwhile. A witness that forgot its grants
        // would give each RG to the asker at once.
        Scenario {
            witness: true,
            ..sc(
                "witness-restart-during-partition",
                vec![
                    (8_000, Step::Partition { up: false }),
                    // Replies arrive out of step: a refusal no longer
                    // reaches the old holder in the tick of the new grant.
                    (9_000, Step::Latency { max_ms: 40 }),
                    (10_000, Step::Crash(2)),
                    (10_200, Step::Restart(2)),
                    (16_000, Step::Partition { up: true }),
                ],
                20_000,
            )
        },
        // Losing the witness with both nodes alive changes nothing.
        Scenario {
            witness: true,
            stable: Some((8_000, 16_000)),
            ..sc(
                "witness-crash-both-alive",
                vec![(8_000, Step::Crash(2)), (12_000, Step::Restart(2))],
                18_000,
            )
        },
        // node0's daemon restarts within its lease while the witness
        // cannot reach node1: node0's fresh voter must not hand node1 a
        // majority that overlaps what node0 may still count.
        Scenario {
            witness: true,
            ..sc(
                "node-restart-within-lease",
                vec![
                    (
                        7_000,
                        Step::Path {
                            path: Path::Control,
                            a: 1,
                            b: 2,
                            up: false,
                        },
                    ),
                    (8_000, Step::Crash(0)),
                    (8_200, Step::Restart(0)),
                    (
                        14_000,
                        Step::Path {
                            path: Path::Control,
                            a: 1,
                            b: 2,
                            up: true,
                        },
                    ),
                ],
                20_000,
            )
        },
        // Clock rates off by 5% in opposite directions (crystals are off
        // by 0.01%; the lease margin covers 10% less latency): the holder
        // still stops before any voter grants again.
        Scenario {
            witness: true,
            rate_ppm: [50_000, -50_000],
            ..sc(
                "witness-clock-drift",
                vec![
                    (8_000, Step::Isolate { who: 0, up: false }),
                    (12_000, Step::Isolate { who: 0, up: true }),
                    (16_000, Step::Isolate { who: 1, up: false }),
                    (20_000, Step::Isolate { who: 1, up: true }),
                ],
                24_000,
            )
        },
        Scenario {
            witness: true,
            ..sc(
                "all-three-restarted-in-turn",
                vec![
                    (8_000, Step::Crash(0)),
                    (8_300, Step::Restart(0)),
                    (13_000, Step::Crash(2)),
                    (13_300, Step::Restart(2)),
                    (18_000, Step::Crash(1)),
                    (18_300, Step::Restart(1)),
                ],
                26_000,
            )
        },
    ]
}

pub struct Outcome {
    pub scenario: &'static str,
    pub seed: u64,
    pub violations: Vec<String>,
    pub log: Vec<String>,
    pub sim_ms: u64,
    pub wall: Duration,
    pub sessions: usize,
    /// Total and longest ms with two forwarders for one RG (distinct
    /// epochs; outside witness mode).
    pub overlap_ms: u64,
    pub max_overlap_ms: u64,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }

    /// A readable failure report: seed, timeline, first violation.
    pub fn report(&self) -> String {
        let mut s = format!(
            "scenario {} seed {}: {} violation(s)\n",
            self.scenario,
            self.seed,
            self.violations.len()
        );
        s.push_str(&format!(
            "first violation: {}\n",
            self.violations.first().map_or("-", String::as_str)
        ));
        s.push_str("timeline:\n");
        for l in &self.log {
            s.push_str("  ");
            s.push_str(l);
            s.push('\n');
        }
        s
    }
}

struct Checker {
    timeline: Timeline,
    violations: Vec<String>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Checker {
    fn note(&self, t: u64, what: String) {
        self.log
            .lock()
            .expect("log")
            .push(format!("{:>6}.{:03}s {what}", t / 1000, t % 1000));
    }

    fn violation(&mut self, t: u64, what: String) {
        self.note(t, format!("VIOLATION: {what}"));
        self.violations.push(format!("t={t}ms: {what}"));
    }

    /// Every tick: what each node publishes, into the timeline.
    fn observe_roles(&mut self, world: &World, t: u64) {
        let views: [Option<NodeView>; 2] = [world.view(0), world.view(1)];
        for rg in RGS {
            let roles: [Option<RgRole>; 2] = [0, 1].map(|n| {
                views[n]
                    .as_ref()
                    .and_then(|v| v.cluster.roles().get(&rg).copied())
            });
            let (changes, violations) =
                (self.timeline.changes.len(), self.timeline.violations.len());
            self.timeline.observe(t, rg, roles);
            for (t, c) in &self.timeline.changes[changes..] {
                self.note(*t, c.clone());
            }
            let found: Vec<(u64, String)> = self.timeline.violations[violations..].to_vec();
            for (t, v) in found {
                self.violation(t, v);
            }
        }
    }

    fn observe(&mut self, world: &World, t: u64) {
        let views: [Option<NodeView>; 2] = [world.view(0), world.view(1)];
        for rg in RGS.iter() {
            let roles: [Option<RgRole>; 2] = [0, 1].map(|n| {
                views[n]
                    .as_ref()
                    .and_then(|v| v.cluster.roles().get(rg).copied())
            });
            // Acked never exceeds applied on the same stream.
            for p in 0..2 {
                let (Some(pv), Some(sv)) = (&views[p], &views[1 - p]) else {
                    continue;
                };
                if !roles[p].is_some_and(|r| r.primary) {
                    continue;
                }
                if let (Some((e1, inc1, acked)), Some((e2, inc2, applied))) =
                    (pv.sync.acked(*rg), sv.sync.applied(*rg))
                    && e1 == e2
                    && inc1 == inc2
                    && acked > applied
                {
                    self.violation(
                        t,
                        format!(
                            "{rg}: {} acked seq {acked} but the peer applied only {applied}",
                            host_name(p as u8)
                        ),
                    );
                }
            }
        }
    }

    fn final_check(&mut self, world: &World, t: u64) -> usize {
        let (Some(v0), Some(v1)) = (world.view(0), world.view(1)) else {
            self.violation(t, "a node is not running at the end".into());
            return 0;
        };
        let views = [v0, v1];
        let mut sessions = 0;
        for rg in RGS {
            let prim: Vec<usize> = (0..2)
                .filter(|&n| views[n].cluster.roles().get(&rg).is_some_and(|r| r.primary))
                .collect();
            if prim.len() != 1 {
                self.violation(t, format!("{rg}: {} primaries after heal", prim.len()));
                continue;
            }
            let (p, s) = (prim[0], 1 - prim[0]);
            // What the peer gets: every session but a TCP one still in its
            // handshake (never synced, by design).
            let set = |n: usize| -> BTreeSet<_> {
                let tbl = read(&views[n].table);
                tbl.export_rg(rg)
                    .filter(|r| r.is_replicated())
                    .map(|r| (r.key, r.reverse))
                    .collect()
            };
            let (authoritative, copy) = (set(p), set(s));
            // Which copy is authoritative follows the table's role for the
            // RG: it must match the published role on both nodes.
            let strays = [(p, true), (s, false)]
                .into_iter()
                .filter(|&(n, primary)| read(&views[n].table).is_primary(rg) != primary)
                .count();
            sessions += authoritative.len();
            if authoritative != copy {
                let missing = authoritative.difference(&copy).count();
                let extra = copy.difference(&authoritative).count();
                self.violation(t, format!("{rg}: secondary differs from primary ({} sessions): {missing} missing, {extra} stale", authoritative.len()));
            }
            if strays > 0 {
                self.violation(
                    t,
                    format!("{rg}: {strays} tables whose authority differs from the role map"),
                );
            }
            let lag = views[p].sync.lag_ms(rg);
            if lag > 1000 {
                self.violation(t, format!("{rg}: replication lag {lag} ms after heal"));
            }
        }
        for (n, v) in views.iter().enumerate() {
            if let Err(e) = lock(&v.table).verify_invariants() {
                self.violation(t, format!("{}: table invariant: {e}", host_name(n as u8)));
            }
        }
        sessions
    }
}

/// Runs one scenario with one seed.
pub fn run(sc: &Scenario, seed: u64) -> Outcome {
    let started = Instant::now();
    let world = World::new(seed, sc);
    let total = sc.run_ms + QUIESCE_MS;
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .simulation_duration(Duration::from_millis(total + 10_000))
        .tick_duration(Duration::from_millis(1))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(1))
        .udp_capacity(16_384)
        .build();
    for n in 0..2u8 {
        let w = world.clone();
        sim.host(host_name(n), move || run_node(w.clone(), n));
    }
    if sc.witness {
        let w = world.clone();
        sim.host("witness", move || run_witness(w.clone()));
    }
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut checker = Checker {
        timeline: Timeline::new(sc.witness, &RGS),
        violations: Vec::new(),
        log: log.clone(),
    };
    let mut steps = sc.timeline.clone();
    steps.sort_by_key(|(t, _)| *t);
    let mut next = 0;
    let mut t = 0u64;
    let mut ops = 0;
    while t < total {
        while next < steps.len() && steps[next].0 <= t {
            let step = steps[next].1.clone();
            checker.note(t, format!("{step:?}"));
            apply(&mut sim, &world, &step, &log, t, &mut ops);
            next += 1;
        }
        if t == sc.run_ms {
            checker.note(t, "heal: every path restored".into());
            world.links.heal();
            sim.set_max_message_latency(Duration::from_millis(1));
        }
        if let Err(e) = sim.step() {
            checker.violation(t, format!("simulation error: {e}"));
            break;
        }
        t += 1;
        checker.observe_roles(&world, t);
        if t.is_multiple_of(10) {
            checker.observe(&world, t);
        }
    }
    checker.timeline.finish(t);
    if let Some((from, to)) = sc.stable
        && let Some(m) = checker
            .timeline
            .moves
            .iter()
            .find(|&&m| m > from + 50 && m < to)
    {
        let m = *m;
        checker.violation(
            m,
            format!(
                "an RG moved at {m} ms during the window {from}..{to} ms where no node was lost"
            ),
        );
    }
    let sessions = checker.final_check(&world, t);
    let violations = std::mem::take(&mut checker.violations);
    let log = log.lock().expect("log").clone();
    Outcome {
        scenario: sc.name,
        seed,
        violations,
        log,
        sim_ms: t,
        wall: started.elapsed(),
        sessions,
        overlap_ms: checker.timeline.overlap_ms,
        max_overlap_ms: checker.timeline.max_overlap_ms,
    }
}

fn apply(
    sim: &mut turmoil::Sim<'_>,
    world: &Arc<World>,
    step: &Step,
    log: &Arc<Mutex<Vec<String>>>,
    t: u64,
    ops: &mut u32,
) {
    let links = &world.links;
    match *step {
        Step::Path { path, a, b, up } => links.set_both(path, a, b, up),
        Step::OneWay { from, to, up } => {
            for p in Path::ALL {
                links.set(p, from, to, up);
            }
        }
        Step::Partition { up } => {
            for p in Path::ALL {
                links.set_both(p, 0, 1, up);
            }
        }
        Step::Isolate { who, up } => {
            for other in (0..3).filter(|&x| x != who) {
                for p in Path::ALL {
                    links.set_both(p, who, other, up);
                }
            }
        }
        Step::Crash(n) => {
            // Drop the runner's view first: turmoil unbinds a socket only
            // when its last owner is dropped inside the simulation, which
            // the crashed runtime's teardown is.
            if let Some(v) = world.nodes.lock().expect("nodes").get_mut(n as usize) {
                *v = None;
            }
            sim.crash(host_name(n));
        }
        Step::Restart(n) => sim.bounce(host_name(n)),
        Step::Failover { rg, node, via } => {
            let Some(view) = world.view(via as usize) else {
                return;
            };
            let log = log.clone();
            *ops += 1;
            sim.client(format!("operator{ops}"), async move {
                let r = view.cluster.failover(RgId(rg), NodeId(node)).await;
                log.lock().expect("log").push(format!(
                    "{:>6}.{:03}s failover rg{rg} -> node{node} (asked on node{via}): {r:?}",
                    t / 1000,
                    t % 1000
                ));
                Ok(())
            });
        }
        Step::Latency { max_ms } => sim.set_max_message_latency(Duration::from_millis(max_ms)),
    }
}
