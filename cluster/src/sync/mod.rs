//! Session replication between the two nodes.

mod node;
mod receiver;
mod sender;

pub use node::{
    RgRole, RoleMap, SyncConfig, SyncHandle, SyncIo, SyncNode, SyncSnapshot, SyncStats, close,
};
pub use receiver::{RgReceiver, RxError};
pub use sender::{BatchInfo, ResumePlan, RgSender};

#[cfg(test)]
mod tests;
