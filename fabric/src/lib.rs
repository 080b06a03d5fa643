//! Fabric forwarding: how a frame that reached the node that does not own
//! its redundancy group gets to the node that does.
//!
//! * `header`: the versioned fabric header (magic, version, flags, RG,
//!   epoch, original ingress interface) and its Ethernet encapsulation.
//! * `map`: per RG where the owner is, which fabric link is active
//!   (fab0 preferred, fab1 backup, back to fab0 after a hold-down), the
//!   link MACs; published with arc-swap and read lock-free by the dataplane.
//!
//! Never does: decide who owns an RG (the cluster does), or look past its own
//! header into the frames it carries.

pub mod header;
pub mod map;

pub use header::{FabricHeader, HeaderError, Kind};
pub use map::{FabricMap, FabricStats, Link, LinkSelector, RgOwner};
