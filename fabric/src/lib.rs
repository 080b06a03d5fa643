//! Fabric forwarding: where the owner of each RG is and which fabric link
//! reaches it. Filled in by the fabric issue; the crate exists now so the
//! workspace shows the data flow from the start.
