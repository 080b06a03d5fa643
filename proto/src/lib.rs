//! Tandem wire vocabulary: the identifiers every crate shares, the prost
//! messages two nodes exchange (`proto/tandem.proto`) and their framing.
//!
//! This crate never does I/O and never makes a policy decision; it only says
//! what the bytes between two nodes mean. The wire spec is docs/PROTOCOL.md.

pub mod frame;
pub mod ids;

pub use frame::{FrameDecoder, FrameError, MAX_FRAME, encode_frame};
pub use ids::{Epoch, NodeId, RgId, RgRole, RoleMap};

/// Generated messages (package `tandem.v2`).
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/tandem.v2.rs"));
}

/// Version carried in `Hello` and `Heartbeat`; a peer with another version is
/// refused with a reason rather than misread.
pub const PROTOCOL_VERSION: u32 = 2;

/// Oldest peer version whose heartbeats this node understands. Heartbeats
/// have kept one meaning since version 1, so a pair mid-upgrade still sees
/// each other alive and never double-claims an RG; only session sync needs
/// equal versions.
pub const MIN_HEARTBEAT_VERSION: u32 = 1;

/// ALPN of the node-to-node QUIC connection.
pub const ALPN: &[u8] = b"tandem/2";
