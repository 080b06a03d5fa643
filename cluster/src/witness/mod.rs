//! Witness mode: RG ownership through a raft group of three voters —
//! node0, node1 and the witness (`tandem witness`) — so that no partition,
//! crash or restart can produce two forwarding primaries for one RG.
//!
//! A node forwards an RG only while the committed log says the RG is its
//! own and it holds a lease derived from the log (`group`): the lease runs
//! from when the node sent the request the log committed, and the leader
//! logs a move to another node only a whole lease after it last logged or
//! applied the owner's claim and after it became leader. Hard state and
//! log are persisted (`store`) before anything they imply is sent, so no
//! restart forgets a vote or a grant. docs/ARCHITECTURE.md "Witness mode"
//! has the argument and its clock assumption (bounded rate drift; offsets
//! do not matter, each side measures only durations).
//!
//! Cost: after a crash of the owner, the survivor waits for the lease
//! (default 1 s) before the log gives it the RG.
//!
//! The node pair without a witness stays the default.

mod group;
mod link;
mod store;

pub use group::{GroupStart, GroupStatus, Outgoing, OwnershipGroup, RgOwnership, TICK_MS};
pub use link::{LinkStats, QuicLink};
pub use store::{FileStore, MemoryStore, VoterStore};

use crate::election::driver::{ClusterKey, DatagramSocket};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, warn};

/// The witness's voter id (node0 and node1 are voters 0 and 1).
pub const WITNESS_VOTER: u32 = 2;

fn voter_name(v: u32) -> String {
    match v {
        WITNESS_VOTER => "witness".into(),
        n => format!("node{n}"),
    }
}

/// Witness mode as a node sees it (`show chassis cluster status`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct WitnessStatus {
    pub witness: String,
    pub lease_ms: u32,
    /// This node's raft member could not start (its state unreadable).
    pub error: Option<String>,
    pub raft: Option<GroupStatus>,
}

/// `tandem witness`: the third raft member. It learns each node's address
/// from the node's authenticated datagrams and answers there. Runs until
/// the socket fails.
pub async fn serve(
    socket: Arc<dyn DatagramSocket>,
    key: ClusterKey,
    mut group: OwnershipGroup,
    clock: tandem_dataplane::session::Clock,
) {
    let mut nodes: [Option<SocketAddr>; 2] = [None, None];
    let mut buf = vec![0u8; 64 * 1024];
    let mut tick = tokio::time::interval(Duration::from_millis(TICK_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let out = tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok((n, from)) => {
                    let Some(msg) = key.open_msg(&buf[..n]) else {
                        debug!(%from, "witness: dropped unauthenticated or unexpected datagram");
                        continue;
                    };
                    if let Some(v) = group::sender_of(&msg).filter(|v| *v < 2) {
                        nodes[v as usize] = Some(from);
                    }
                    group.on_message(&msg, clock())
                }
                Err(e) => {
                    warn!(error = %e, "witness socket");
                    return;
                }
            },
            _ = tick.tick() => group.tick(clock()),
        };
        for o in out {
            let Some(to) = nodes.get(o.to as usize).copied().flatten() else {
                continue;
            };
            let _ = socket.send_to(&key.seal_msg(o.msg), to).await;
        }
    }
}

/// Where a node sends its raft traffic, and where it keeps its raft state.
#[derive(Clone)]
pub struct WitnessConfig {
    /// The witness's address.
    pub witness: SocketAddr,
    /// The peer node's lease address.
    pub peer: SocketAddr,
    pub lease_ms: u32,
    pub store: Arc<dyn VoterStore>,
}
