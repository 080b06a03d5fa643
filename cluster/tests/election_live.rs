//! Election over real links: QUIC control link (heartbeat datagrams and
//! failover messages) and UDP fabric heartbeats, on loopback.

use std::time::Duration;
use tandem_cluster::testkit::{ClusterPair, eventually, snat_session};
use tandem_dataplane::session::{Origin, lock};
use tandem_proto::{NodeId, RgId};

const RG1: RgId = RgId(1);
const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pair_elects_one_primary_and_replicates_its_sessions() {
    let c = ClusterPair::start(&[(RG1, 200, 100)], false).await;
    assert!(eventually(WAIT, || c.is_primary(0, RG1) && !c.is_primary(1, RG1)).await);
    for i in 0..500 {
        c.pair.nodes[0].create(snat_session(RG1, i));
    }
    assert!(c.pair.converged(RG1, WAIT).await);
    let deadline = tokio::time::Instant::now() + WAIT;
    let status = loop {
        let (status, _) = c.cluster(1).status().await.unwrap();
        if status.paths.iter().all(|p| p.up) || tokio::time::Instant::now() > deadline {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.peer_alive);
    assert!(
        status.paths.iter().all(|p| p.up),
        "control, fab0 and fab1 all heard: {:?}",
        status.paths
    );
    let stats = c.cluster(1).stats();
    assert!(
        stats.heartbeats_received.iter().all(|&n| n > 0),
        "{stats:?}"
    );
    assert_eq!(stats.heartbeats_rejected, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_failover_requested_on_the_old_primary_moves_rg_and_sessions() {
    let c = ClusterPair::start(&[(RG1, 200, 100)], true).await;
    assert!(eventually(WAIT, || c.is_primary(0, RG1)).await);
    for i in 0..300 {
        c.pair.nodes[0].create(snat_session(RG1, i));
    }
    assert!(c.pair.converged(RG1, WAIT).await);
    let secondary = c.pair.nodes[1].sync().clone();
    assert!(eventually(WAIT, || secondary.rg_in_sync(RG1)).await);
    tokio::time::sleep(Duration::from_millis(600)).await; // past hold-down
    // Asked on node0, executed by the target node1.
    c.cluster(0)
        .failover(RG1, NodeId(1))
        .await
        .expect("failover committed");
    assert!(eventually(WAIT, || c.is_primary(1, RG1) && !c.is_primary(0, RG1)).await);
    {
        let t = lock(&c.pair.nodes[1].table);
        assert_eq!(t.rg_len(RG1), 300);
        assert!(
            t.export_rg(RG1).all(|r| t.origin(r) == Origin::LocalOwned),
            "promoted on the new primary"
        );
    }
    // The new primary's new sessions reach the old one.
    let k = c.pair.nodes[1].create(snat_session(RG1, 9999));
    assert!(
        eventually(WAIT, || lock(&c.pair.nodes[0].table)
            .lookup_forward(&k)
            .is_some())
        .await
    );
    // Sticky despite preempt and priority, until reset.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(c.is_primary(1, RG1));
    c.cluster(1).reset(RG1).await.unwrap();
    assert!(
        eventually(WAIT, || c.is_primary(0, RG1)).await,
        "preempt after reset"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_failover_refusal_reaches_the_operator_with_its_reason() {
    let c = ClusterPair::start(&[(RG1, 200, 100)], false).await;
    assert!(eventually(WAIT, || c.is_primary(0, RG1)).await);
    // Node1 forwards the request to node0 over the control stream: without
    // it the refusal would be "cannot reach node0", not node0's reason.
    assert!(eventually(WAIT, || c.connected()).await);
    let err = c.cluster(1).failover(RG1, NodeId(0)).await.unwrap_err();
    assert!(err.contains("already primary"), "{err}");
    let err = c.cluster(0).failover(RgId(5), NodeId(1)).await.unwrap_err();
    assert!(err.contains("not configured"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_primary_is_replaced_and_sessions_survive() {
    let c = ClusterPair::start(&[(RG1, 200, 100)], false).await;
    assert!(eventually(WAIT, || c.is_primary(0, RG1)).await);
    for i in 0..1000 {
        c.pair.nodes[0].create(snat_session(RG1, i));
    }
    assert!(c.pair.converged(RG1, WAIT).await);
    c.cluster(0).stop().await;
    c.pair.nodes[0].sync().shutdown();
    let start = tokio::time::Instant::now();
    assert!(eventually(WAIT, || c.is_primary(1, RG1)).await);
    let took = start.elapsed();
    // Real time: threshold 300 ms + one interval + scheduling.
    assert!(took < Duration::from_millis(1500), "takeover took {took:?}");
    assert_eq!(
        lock(&c.pair.nodes[1].table).rg_len(RG1),
        1000,
        "synced sessions already in the table"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn witness_mode_forwards_only_with_a_majority_lease() {
    let c = ClusterPair::start_with(&[(RG1, 200, 100)], false, true).await;
    assert!(
        eventually(WAIT, || c.is_primary(0, RG1)).await,
        "node0 forwards once it holds a lease"
    );
    let raft = |st: &tandem_cluster::election::ClusterStatus| {
        st.witness
            .clone()
            .expect("witness mode shows its raft member")
            .raft
            .expect("the raft member runs")
    };
    let (st, _) = c.cluster(0).status().await.unwrap();
    let r = raft(&st);
    assert_eq!(r.rgs[0].owner.as_deref(), Some("node0"));
    assert!(r.rgs[0].lease_left_ms > 0);
    assert!(
        r.leader.is_some() && r.term > 0 && r.commit_index > 0,
        "{r:?}"
    );
    // Witness gone: node1 and node0 are still a majority of the log.
    c.witness.as_ref().unwrap().abort();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(c.is_primary(0, RG1), "two of three voters keep the lease");
    assert!(!c.is_primary(1, RG1));
    let (st, _) = c.cluster(0).status().await.unwrap();
    let r = raft(&st);
    assert!(r.rgs[0].lease_left_ms > 0, "renewed without the witness");
    assert_ne!(r.leader.as_deref(), Some("witness"));
    // node0 crashes: node1 alone is no majority: it must not forward, even
    // though its election says primary.
    c.cluster(0).stop().await;
    c.pair.nodes[0].sync().shutdown();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(!c.is_primary(1, RG1), "no majority, no forwarding");
    let (status, _) = c.cluster(1).status().await.unwrap();
    let r = raft(&status);
    assert_eq!(r.rgs[0].lease_left_ms, 0);
    assert_eq!(
        r.rgs[0].owner.as_deref(),
        Some("node0"),
        "no majority to log a move"
    );
    assert_eq!(
        status.rgs[0].state,
        tandem_cluster::election::RgState::Primary,
        "election wants it; the lease forbids it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn witness_mode_survivor_takes_over_after_the_lease_expires() {
    let c = ClusterPair::start_with(&[(RG1, 200, 100)], false, true).await;
    assert!(eventually(WAIT, || c.is_primary(0, RG1)).await);
    c.cluster(0).stop().await;
    c.pair.nodes[0].sync().shutdown();
    let start = tokio::time::Instant::now();
    assert!(
        eventually(WAIT, || c.is_primary(1, RG1)).await,
        "witness + own vote"
    );
    // Detection (~300 ms) plus the dead node's 1 s lease at the voters.
    assert!(
        start.elapsed() >= Duration::from_millis(700),
        "took over before the old lease ran out: {:?}",
        start.elapsed()
    );
}
