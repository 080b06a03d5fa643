//! turmoil simulations of the real cluster and sync code. Filled in by the
//! simulations issue.
