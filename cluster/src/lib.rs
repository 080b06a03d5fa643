//! Cluster layer: RG election, heartbeats, QUIC session sync, bulk export and
//! reconcile. Filled in by the sync and election issues.
