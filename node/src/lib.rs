//! comsat on this machine: its keys, and the control-plane client through
//! which relays, agents and operators talk to the controller.
//!
//! [`keys`] makes fresh keys and ids from the OS random source and keeps
//! private key files (0600, written atomically): the half of the protocol's
//! key types that touches the machine, used by every component. [`client`] is the controller API client (a pinned CA, node JWTs or API
//! tokens, fallback controllers). [`state`] enrols a node and keeps its data
//! dir; [`relay`] and [`agent`] keep an enrolled relay or agent in step with
//! the controller, feeding it in process through a narrow trait
//! ([`relay::RelaySink`], [`agent::AgentSink`]) and caching what they got on
//! disk so a node restarts without the controller. [`ctl`] and [`apply`] are
//! the operator's side: `comsat ctl` and its declarative `apply`.
//!
//! This crate depends on `comsat-protocol` only: it knows the relay and the
//! agent by the traits they are fed through, never by their types.

#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used)]

pub mod admin;
pub mod agent;
pub mod apply;
pub mod client;
pub mod ctl;
pub mod keys;
mod memory;
mod metric_set;
pub mod relay;
mod retry;
pub mod state;
pub mod svid;

pub use memory::keep_freed_memory;
pub use state::{Enrolled, NodeState, enrol, read_at_most, read_token, write_atomic};

/// Unix time now, in seconds.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
