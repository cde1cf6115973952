//! Support code of the `comsat` binary that tests also use.
//!
//! [`dev`] writes a complete static local setup (authority, CA, relay and
//! two agents, grants). [`client`] talks to the controller API; [`node`]
//! enrols agents and relays and keeps them in step with the controller;
//! [`ctl`] is the operator's command line client; [`up`] runs it all in
//! one process; [`relay_ops`] handles a relay's signals and `relay drain`.

#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used)]

pub mod apply;
pub mod client;
pub mod ctl;
pub mod dev;
pub mod node;
pub mod relay_ops;
pub mod up;
