//! Cluster layer: RG election, heartbeats, QUIC session sync, bulk export and
//! reconcile.
//!
//! The protocol logic lives in plain state machines (`sync::RgSender`,
//! `sync::RgReceiver`) that take messages, the session table and time as
//! inputs; `sync::SyncNode` is the thin tokio/quinn shell around them, and
//! the turmoil simulations drive the same shell over simulated UDP.
//!
//! Never does: touch packets. It drives the session table through its
//! methods.

pub mod election;
pub mod stats;
pub mod sync;
pub mod testkit;
pub mod tls;
pub mod wire;
pub mod witness;
