//! The comsat protocol, sans IO.
//!
//! Everything two comsat components say to each other is defined here: ids,
//! key types and key files, signed grants, the control messages agents and
//! relays exchange ([`msg`]), the record framing of flow streams
//! ([`record`]) and the end-to-end Noise session between two agents
//! ([`noise`]). Nothing in this crate opens a socket or spawns a task: callers
//! hand in bytes and the current time, and get bytes and decisions back.
//!
//! Every decoder of untrusted bytes checks lengths against a named maximum in
//! [`limits`] before allocating, tells "incomplete" apart from "invalid", and
//! refuses trailing bytes.

#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used)]

pub mod api;
pub mod codec;
pub mod grant;
pub mod ids;
pub mod jwt;
pub mod keys;
pub mod limits;
pub mod link;
pub mod msg;
pub mod noise;
pub mod quantum;
pub mod record;
pub mod replay;
pub mod resume;

pub use grant::{Grant, GrantError, GrantSide, LinkLimits, SignedGrant};
pub use ids::{FlowId, LinkId, NodeId, RelayId, Side};
pub use keys::{KeyFileError, NoisePublicKey, NoiseSecretKey, SignPublicKey, SigningKey};

/// The ALPN protocol id spoken between agents and relays.
pub const ALPN: &[u8] = b"comsat/1";

/// Label of the TLS keying-material exporter that binds a `Hello` to one
/// QUIC connection (RFC 5705 / RFC 8446 section 7.5).
pub const HELLO_EXPORTER_LABEL: &[u8] = b"EXPORTER-comsat-hello-v1";

/// Length of the exported keying material signed in a `Hello`.
pub const HELLO_EXPORTER_LEN: usize = 32;

/// The one QUIC application close code a relay uses for every refusal.
///
/// A peer that fails authentication learns nothing about why; the relay
/// counts the real reason in its metrics.
pub const CLOSE_REFUSED: u32 = 0x10;

/// Close code for an orderly shutdown.
pub const CLOSE_NORMAL: u32 = 0x00;

/// Close code for a peer that broke the protocol after authenticating.
pub const CLOSE_PROTOCOL_ERROR: u32 = 0x11;

/// Stream error code with which a relay resets (or stops) one side of a
/// flow because the other side's connection went silent (idle timeout): the
/// outage began an idle timeout ago, not now.
pub const STREAM_PEER_SILENT: u32 = 3;

/// Stream error code with which a relay refuses a new flow because its link
/// already has the grant's `max_flows` concurrent flows open. The dialling
/// agent resets the application's connection; it does not retry.
pub const STREAM_FLOW_LIMIT: u32 = 4;

/// Stream error code with which an agent gives up a flow's stream because
/// it carries the flow on on another stream (a flow that turned bulk moves
/// from the lane to the main connection); the receiving agent takes the
/// new stream, the relay passes the code on as a refusal.
pub const STREAM_MOVED: u32 = 5;
