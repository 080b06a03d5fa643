//! Tandem wire vocabulary: the identifiers every crate shares and, with the
//! sync layer, the prost messages and length-delimited framing.
//!
//! This crate never does I/O and never makes a policy decision; it only says
//! what the bytes between two nodes mean.

pub mod ids;

pub use ids::{Epoch, NodeId, RgId};
