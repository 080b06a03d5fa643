//! turmoil simulations of the real cluster code: the QUIC sync node (quinn
//! with mutual TLS on simulated UDP), the election driver with its three
//! heartbeat paths, witness leases, and real session tables fed by a
//! synthetic traffic generator, under partitions, loss, crashes, reordering,
//! clock skew and operator failovers. Deterministic per seed.

pub mod net;
pub mod scenario;
pub mod timeline;
pub mod world;

pub use scenario::{Outcome, Scenario, all, run};
