//! Support code of the `comsat` binary that tests also use.
//!
//! [`dev`] writes a complete local setup (authority, CA, relay and two
//! agents, grants) until the controller does this over the network.

#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used)]

pub mod dev;
