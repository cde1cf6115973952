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
pub mod datagram;
pub mod endpoint;
pub mod grant;
pub mod half;
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
pub mod spiffe;
pub mod text;
pub mod workload;

pub use grant::{Grant, GrantError, GrantSide, LinkLimits, SignedGrant};
pub use ids::{FlowId, LinkId, NodeId, RelayId, Side};
pub use keys::{KeyTextError, NoisePublicKey, NoiseSecretKey, SignPublicKey, SigningKey};

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

/// The error codes with which relays and agents reset or stop a flow's
/// QUIC stream: the one list of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
#[non_exhaustive]
pub enum StreamCode {
    /// A relay refused the flow, or its link went away.
    Refused = 1,
    /// An agent's flow failed (its local socket, or the records it got).
    Failed = 2,
    /// A relay resets (or stops) one side of a flow because the other
    /// side's connection went silent (idle timeout): the outage began an
    /// idle timeout ago, not now.
    PeerSilent = 3,
    /// A relay refuses a new flow because its link already has the
    /// grant's `max_flows` concurrent flows open. The dialling agent resets
    /// the application's connection; it does not retry.
    FlowLimit = 4,
    /// An agent gives up a flow's stream because it carries the flow on on
    /// another stream (a flow that turned bulk moves from the lane to the
    /// main connection); the receiving agent takes the new stream, the
    /// relay passes the code on as a refusal.
    Moved = 5,
}

impl StreamCode {
    /// The code on the wire.
    pub const fn code(self) -> u32 {
        self as u32
    }

    /// The code `code` names, if any.
    pub const fn from_code(code: u64) -> Option<Self> {
        Some(match code {
            1 => Self::Refused,
            2 => Self::Failed,
            3 => Self::PeerSilent,
            4 => Self::FlowLimit,
            5 => Self::Moved,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::StreamCode;

    #[test]
    fn every_stream_code_reads_back_and_no_other_does() {
        let all = [
            StreamCode::Refused,
            StreamCode::Failed,
            StreamCode::PeerSilent,
            StreamCode::FlowLimit,
            StreamCode::Moved,
        ];
        for code in all {
            assert_eq!(StreamCode::from_code(code.code().into()), Some(code));
        }
        let mut codes: Vec<u32> = all.iter().map(|c| c.code()).collect();
        codes.dedup();
        assert_eq!(codes.len(), all.len(), "codes are distinct");
        assert_eq!(StreamCode::from_code(0), None);
        assert_eq!(StreamCode::from_code(6), None);
    }
}
