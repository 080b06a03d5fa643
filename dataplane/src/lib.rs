//! Tandem dataplane: everything that touches packets and the per-node session
//! state they create. The session table is the source of every sync delta.
//!
//! Never does: network sync, election. Those live in `tandem-cluster`, which
//! drives this crate through plain method calls.

pub mod afxdp;
pub mod alloc;
pub mod config;
pub mod core;
pub mod delta;
pub mod events;
pub mod fabric_hook;
pub mod frag;
pub mod frames;
pub mod icmp;
pub mod os;
pub mod packet;
pub mod screen;
pub mod session;
pub mod supervisor;
pub mod tcp;
pub mod testbed;
pub mod worker;
pub mod xdp;
