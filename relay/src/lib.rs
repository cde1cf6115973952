//! The comsat relay.
//!
//! Agents dial the relay over QUIC; the relay authenticates each with a
//! channel-bound `Hello` signed by a node key named in a grant it holds,
//! pairs the two sides of every granted link, and splices their flow
//! streams. It only ever sees ciphertext: the agents run Noise end to end.
//!
//! Entry points: [`RelayConfig::load`], then [`Relay::bind`] and
//! [`Relay::run`]. `comsat_node::admin` serves its metrics and health.

#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used)]

pub mod adversary;
pub mod config;
pub mod defaults;
pub mod enrolled;
pub mod error;
pub mod grants;
mod links;
pub mod metrics;
pub mod ops;
pub mod server;
mod table;
pub mod tls;
pub mod udp;
mod wire;

use std::sync::atomic::{AtomicI32, Ordering};

pub use config::RelayConfig;
pub use error::RelayError;
pub use server::{Relay, RelayHandle, ReloadError, Stop};

static BULK_NICE: AtomicI32 = AtomicI32::new(0);

/// How much nicer than the process the threads that carry bulk should be:
/// [`RelayConfig::bulk_nice`] once the interactive listener is bound, 0
/// before. The `comsat` binary's runtime applies it to its worker threads
/// as they next run (the lane's thread, started before, keeps the
/// process's niceness), so the kernel runs a lane first when it wakes.
pub fn bulk_nice() -> i32 {
    BULK_NICE.load(Ordering::Relaxed)
}

fn prefer_lanes(nice: u8) {
    BULK_NICE.fetch_max(i32::from(nice), Ordering::Relaxed);
}
