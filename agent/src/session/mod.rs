//! Relay sessions: one QUIC connection per relay, carrying all the links
//! this agent holds on it, reconnecting with jittered exponential backoff.
//!
//! Per link, the end-to-end Noise session outlives connections: after a
//! reconnect side A asks side B (sealed, so only B can answer) whether it
//! still holds the session; if so the link's flows resume on it, otherwise
//! a new handshake starts a new session and the old flows are reset (a
//! nonce is never reused). Side B takes the session of a handshake it
//! answered only once side A seals something under it, so a handshake
//! message replayed by a relay never replaces a working session.
//!
//! The decisions live in [`crate::core::link`], [`crate::core::relay`] and
//! [`crate::core::ack`]; these are their drivers: `relay` walks a group's
//! relay list, `conn` connects and carries the control stream, `control`
//! serves one connection, `peer` handles handshakes and sealed link
//! control, `accept` the flows the relay opens and the local listeners,
//! `lane` the second connection flows start on.

mod accept;
mod conn;
mod control;
mod lane;
mod peer;
mod relay;

pub(crate) use accept::serve_listener;
pub(crate) use relay::relay_loop;
