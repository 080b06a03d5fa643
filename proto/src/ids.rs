//! Cluster-wide identifiers. They are newtypes so that a node id can never be
//! passed where a redundancy-group id is expected.

use std::fmt;

/// A redundancy group: the unit of failover. RG0 is the control-plane group,
/// RG1..N are data groups that own reth interfaces and sessions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct RgId(pub u16);

impl RgId {
    /// The control-plane redundancy group.
    pub const CONTROL: RgId = RgId(0);

    pub const fn is_data(self) -> bool {
        self.0 != 0
    }
}

impl fmt::Display for RgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rg{}", self.0)
    }
}

/// One of the two cluster members (`node0`, `node1`), or the witness.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct NodeId(pub u8);

impl NodeId {
    /// The other member of a two-node pair.
    pub const fn peer(self) -> NodeId {
        NodeId(self.0 ^ 1)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node{}", self.0)
    }
}

/// Per-RG ownership counter. It increases at every ownership change; anything
/// stamped with an older epoch than the receiver's is stale and dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct Epoch(pub u64);

impl Epoch {
    #[must_use]
    pub const fn next(self) -> Epoch {
        Epoch(self.0 + 1)
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "e{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_of_node0_is_node1_and_back() {
        assert_eq!(NodeId(0).peer(), NodeId(1));
        assert_eq!(NodeId(1).peer(), NodeId(0));
    }

    #[test]
    fn epoch_next_is_strictly_greater() {
        assert!(Epoch(7).next() > Epoch(7));
        assert_eq!(Epoch(7).next(), Epoch(8));
    }

    #[test]
    fn rg0_is_control_not_data() {
        assert!(!RgId::CONTROL.is_data());
        assert!(RgId(1).is_data());
    }
}

/// This node's role for one RG, as the election publishes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RgRole {
    /// This node forwards the RG's traffic.
    pub primary: bool,
    /// The RG's current epoch (the owner's, whichever node that is).
    pub epoch: Epoch,
}

/// Every configured RG's role.
pub type RoleMap = std::collections::BTreeMap<RgId, RgRole>;
