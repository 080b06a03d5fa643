//! Forwarding permission and epochs per node and RG, observed at every
//! tick of simulated time, and the invariants over them:
//!
//! - **overlap**: two nodes forwarding one RG at the same instant. In
//!   witness mode any overlap is a violation; without a witness a partition
//!   may give two primaries, but never in one epoch (a violation), and the
//!   overlap's length is reported as a figure;
//! - **epochs**: whenever a node starts forwarding (or takes a new epoch
//!   while forwarding) it is in the newest epoch it forwarded under or a
//!   newer one (resuming its claim after a lapse keeps its epoch); in
//!   witness mode, where claims are totally ordered, in the newest epoch
//!   anyone forwarded under, and its own. The epoch a running node
//!   publishes never goes down.
//!
//! Pure: the runner feeds it what each node publishes, tests feed it
//! made-up timelines to see each check fail.

use tandem_proto::{Epoch, RgId, RgRole};

/// One RG's observed state.
#[derive(Default)]
struct RgTrack {
    /// Per node: what it published at the last observation (None: down).
    last: [Option<RgRole>; 2],
    /// The last node to start forwarding and its epoch (across restarts:
    /// an epoch names one claim for the whole cluster's life).
    last_forwarder: Option<(usize, Epoch)>,
    /// Per node: the newest epoch it forwarded under.
    own_last: [Option<Epoch>; 2],
    /// The current overlap: since when, and whether already reported.
    overlap_since: Option<u64>,
    overlap_reported: bool,
}

/// The whole run's timeline.
pub struct Timeline {
    witness: bool,
    rgs: Vec<(RgId, RgTrack)>,
    /// Total ms with two forwarders, over all RGs.
    pub overlap_ms: u64,
    /// The longest single overlap (ms).
    pub max_overlap_ms: u64,
    pub violations: Vec<(u64, String)>,
    /// Role changes, for the run's log.
    pub changes: Vec<(u64, String)>,
    /// Instants at which some node started or stopped forwarding.
    pub moves: Vec<u64>,
}

impl Timeline {
    pub fn new(witness: bool, rgs: &[RgId]) -> Timeline {
        Timeline {
            witness,
            rgs: rgs.iter().map(|&rg| (rg, RgTrack::default())).collect(),
            overlap_ms: 0,
            max_overlap_ms: 0,
            violations: Vec::new(),
            changes: Vec::new(),
            moves: Vec::new(),
        }
    }

    /// What both nodes publish for `rg` at `t` (ms; one call per tick).
    pub fn observe(&mut self, t: u64, rg: RgId, roles: [Option<RgRole>; 2]) {
        let witness = self.witness;
        let Some((_, tr)) = self.rgs.iter_mut().find(|(r, _)| *r == rg) else {
            return;
        };
        let mut violations = Vec::new();
        for (n, &now) in roles.iter().enumerate() {
            let before = tr.last[n];
            if before == now {
                continue;
            }
            self.changes.push((
                t,
                match now {
                    Some(r) => format!(
                        "node{n} {rg} {} {}",
                        if r.primary { "primary" } else { "secondary" },
                        r.epoch
                    ),
                    None => format!("node{n} {rg} down"),
                },
            ));
            if before.map(|r| r.primary) != now.map(|r| r.primary) {
                self.moves.push(t);
            }
            if let (Some(b), Some(a)) = (before, now)
                && a.epoch < b.epoch
            {
                violations.push(format!(
                    "{rg}: node{n}'s epoch went down from {} to {}",
                    b.epoch, a.epoch
                ));
            }
            // Forwarding (re)starts, or its epoch changes: it must be in
            // the newest epoch anyone forwarded under, and that epoch must
            // be this node's (resuming its own claim after a lapse is fine;
            // an older epoch, or another node's, is not).
            let start = now
                .filter(|r| r.primary)
                .filter(|r| before.is_none_or(|b| !b.primary || b.epoch != r.epoch));
            if let Some(r) = start {
                // Without a witness, partitioned nodes claim concurrently:
                // the order holds per node only.
                let last = if witness {
                    tr.last_forwarder
                } else {
                    tr.own_last[n].map(|e| (n, e))
                };
                if let Some((m, h)) = last
                    && (r.epoch < h || (r.epoch == h && m != n))
                {
                    violations.push(format!(
                        "{rg}: node{n} forwards under {} after node{m} forwarded under {h}",
                        r.epoch
                    ));
                }
                if tr.last_forwarder.is_none_or(|(_, h)| r.epoch >= h) {
                    tr.last_forwarder = Some((n, r.epoch));
                }
                if tr.own_last[n].is_none_or(|h| r.epoch >= h) {
                    tr.own_last[n] = Some(r.epoch);
                }
            }
            tr.last[n] = now;
        }
        match roles {
            [Some(a), Some(b)] if a.primary && b.primary => {
                tr.overlap_since.get_or_insert(t);
                if !tr.overlap_reported && (witness || a.epoch == b.epoch) {
                    tr.overlap_reported = true;
                    violations.push(if witness {
                        format!("{rg}: both nodes forward in witness mode")
                    } else {
                        format!("{rg}: both nodes forward in one epoch, {}", a.epoch)
                    });
                }
            }
            _ => {
                if let Some(since) = tr.overlap_since.take() {
                    let len = t - since;
                    self.overlap_ms += len;
                    self.max_overlap_ms = self.max_overlap_ms.max(len);
                }
                tr.overlap_reported = false;
            }
        }
        self.violations
            .extend(violations.into_iter().map(|v| (t, v)));
    }

    /// Closes an overlap still running at the end.
    pub fn finish(&mut self, t: u64) {
        for (_, tr) in &mut self.rgs {
            if let Some(since) = tr.overlap_since.take() {
                let len = t - since;
                self.overlap_ms += len;
                self.max_overlap_ms = self.max_overlap_ms.max(len);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RG1: RgId = RgId(1);

    fn p(e: u64) -> Option<RgRole> {
        Some(RgRole {
            primary: true,
            epoch: Epoch(e),
        })
    }

    fn s(e: u64) -> Option<RgRole> {
        Some(RgRole {
            primary: false,
            epoch: Epoch(e),
        })
    }

    fn run(witness: bool, steps: &[(u64, [Option<RgRole>; 2])]) -> Timeline {
        let mut tl = Timeline::new(witness, &[RG1]);
        for (t, roles) in steps {
            tl.observe(*t, RG1, *roles);
        }
        tl
    }

    #[test]
    fn a_clean_failover_has_no_overlap_and_no_violation() {
        let tl = run(
            false,
            &[(0, [p(2), s(2)]), (10, [s(2), s(2)]), (11, [s(2), p(3)])],
        );
        assert!(tl.violations.is_empty(), "{:?}", tl.violations);
        assert_eq!(tl.overlap_ms, 0);
        assert_eq!(tl.moves, vec![0, 0, 10, 11], "both came up, then the move");
    }

    #[test]
    fn any_overlap_in_witness_mode_is_a_violation() {
        let tl = run(
            true,
            &[(0, [p(2), s(2)]), (5, [p(2), p(3)]), (9, [s(3), p(3)])],
        );
        assert_eq!(tl.violations.len(), 1, "reported once per overlap");
        assert!(tl.violations[0].1.contains("witness mode"));
        assert_eq!((tl.violations[0].0, tl.overlap_ms), (5, 4));
    }

    #[test]
    fn overlap_in_distinct_epochs_without_witness_is_a_figure_not_a_violation() {
        let tl = run(false, &[(0, [p(2), p(3)]), (300, [s(3), p(3)])]);
        assert!(tl.violations.is_empty());
        assert_eq!((tl.overlap_ms, tl.max_overlap_ms), (300, 300));
    }

    #[test]
    fn overlap_in_one_epoch_is_a_violation_even_without_witness() {
        let tl = run(false, &[(0, [p(2), s(2)]), (7, [p(2), p(2)])]);
        assert_eq!(tl.violations.len(), 1, "{:?}", tl.violations);
        assert!(
            tl.violations[0]
                .1
                .contains("both nodes forward in one epoch, e2")
        );
    }

    #[test]
    fn forwarding_in_an_epoch_older_than_one_already_used_is_a_violation() {
        // node0 forwarded under 4, restarted (down), then claimed 2 again.
        let steps = [(0, [p(4), s(4)]), (5, [None, s(4)]), (9, [p(2), s(4)])];
        let tl = run(false, &steps);
        assert_eq!(tl.violations.len(), 1, "{:?}", tl.violations);
        let want = "node0 forwards under e2 after node0 forwarded under e4";
        assert!(tl.violations[0].1.contains(want), "{:?}", tl.violations);
    }

    #[test]
    fn in_witness_mode_a_node_taking_the_others_epoch_is_a_violation() {
        let steps = [(0, [p(2), s(2)]), (5, [s(2), s(2)]), (9, [s(2), p(2)])];
        let tl = run(true, &steps);
        assert_eq!(tl.violations.len(), 1, "{:?}", tl.violations);
        let want = "node1 forwards under e2 after node0 forwarded under e2";
        assert!(tl.violations[0].1.contains(want), "{:?}", tl.violations);
    }

    #[test]
    fn resuming_ones_own_claim_is_fine_but_not_after_the_other_node_used_the_epoch() {
        // node0's lease lapses and comes back, same epoch: fine.
        let steps = [(0, [p(2), s(2)]), (5, [s(2), s(2)]), (9, [p(2), s(2)])];
        let tl = run(true, &steps);
        assert!(tl.violations.is_empty(), "{:?}", tl.violations);
        // node1 takes over in e3, then node0 forwards again in e2.
        let steps = [(0, [p(2), s(2)]), (5, [s(2), p(3)]), (9, [p(2), s(3)])];
        let tl = run(true, &steps);
        assert_eq!(tl.violations.len(), 1, "{:?}", tl.violations);
        let want = "node0 forwards under e2 after node1 forwarded under e3";
        assert!(tl.violations[0].1.contains(want), "{:?}", tl.violations);
    }

    #[test]
    fn a_published_epoch_going_down_is_a_violation() {
        let tl = run(false, &[(0, [s(5), p(5)]), (3, [s(3), p(5)])]);
        assert_eq!(tl.violations.len(), 1);
        assert!(tl.violations[0].1.contains("went down from e5 to e3"));
    }
}
