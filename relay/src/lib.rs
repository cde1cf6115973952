//! The comsat relay.
//!
//! Agents dial the relay over QUIC; the relay authenticates each with a
//! channel-bound `Hello` signed by a node key named in a grant it holds,
//! pairs the two sides of every granted link, and splices their flow
//! streams. It only ever sees ciphertext: the agents run Noise end to end.
//!
//! Entry points: [`RelayConfig::load`], then [`Relay::bind`] and
//! [`Relay::run`]. [`admin`] serves metrics and health.

#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used)]

pub mod admin;
pub mod config;
pub mod defaults;
pub mod error;
pub mod grants;
mod links;
pub mod metrics;
pub mod server;
pub mod tls;
pub mod udp;
mod wire;

pub use config::RelayConfig;
pub use error::RelayError;
pub use server::{Relay, RelayHandle, Stop};
