//! Session replication between the two nodes.

mod receiver;
mod sender;

pub use receiver::{RgReceiver, RxError};
pub use sender::{BatchInfo, ResumePlan, RgSender};

#[cfg(test)]
mod tests;
