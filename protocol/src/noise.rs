//! The end-to-end Noise session between the two agents of a link.
//!
//! Pattern `KK`: each agent knows the other's static key from its link
//! configuration (the controller vouches for it), so the handshake is one
//! round trip through the relay and authenticates both ends. Side A
//! initiates, side B responds. The prologue binds the session to the link
//! id, so a handshake for one link is useless on another.
//!
//! The handshake always runs [`NOISE_PARAMS`]. Each handshake message
//! carries a three-byte payload, encrypted and authenticated by the
//! handshake itself ([`Params`]): whether its sender prefers AES-GCM (it
//! has AES hardware), how many records it lets one key seal, and how many
//! flow ids a generation holds. The transport uses AES-256-GCM when both
//! prefer it and ChaCha20-Poly1305 otherwise, and the lower of the two
//! limits (a relay cannot change either: the payloads are authenticated).
//! So a small ARM board without AES instructions never runs software AES,
//! and two x86 agents get hardware AES without asking the controller.
//!
//! After the handshake every record is sealed with a key of its own flow
//! and key epoch: HKDF-SHA256 of the direction's key from Noise's split,
//! over the flow's generation and id and `seq >> records_per_key_log2`
//! ([`Session::flow`]). So no key seals more than
//! [`Params::records_per_key`] records, whatever a flow carries, a long
//! flow moves to its next key without a message on the wire and with every
//! record still in place, and records of many flows are sealed concurrently
//! without a shared lock. Each record carries its own nonce
//! `(flow_id << 40) | seq` (encoded as Noise encodes nonces for the cipher
//! in use), so it can be sent again after a reconnect. The receiver must
//! accept each `(generation, flow_id, seq)` at most once (the flow code
//! enforces strictly increasing `seq`, and the side that accepts flows
//! takes each flow id once per generation: [`crate::replay`]), and the
//! sender must never reuse a flow id within a generation. When a dialling
//! side has used a generation's ids, it starts the next generation with
//! the same ids under new keys; open flows keep theirs. Records are sealed
//! and opened in place ([`Sealer::seal_record_in_place`],
//! [`Opener::open_record_in_place`]): the bytes read from a socket are
//! encrypted where they lie.
//!
//! A link's UDP flows travel as datagrams, each sealed on its own under
//! keys of their own and taken at most once by a sliding window of their
//! numbers ([`Session::datagrams`]; see the `datagram` module).
//!
//! Call order: side A [`initiate`]s and sends the message through the relay;
//! side B [`respond`]s and sends its answer back; side A hands it to
//! [`ExpectResponse::handle_response`]. Both then hold a [`Session`]. Each
//! side draws its ephemeral key from the [`NoiseRng`] it passes in: this
//! crate never reads the OS random source (`comsat-node` provides it).

use crate::limits::{MAX_HANDSHAKE_LEN, MAX_RECORD_PAYLOAD_LEN};
use crate::record::{RECORD_HEADER_LEN, RecordError};

/// The Noise protocol of the handshake.
pub const NOISE_PARAMS: &str = "Noise_KK_25519_ChaChaPoly_BLAKE2s";

/// Prologue label, version 2 (per-flow keys); followed by the link id. A
/// peer of version 1 fails the handshake instead of misreading records.
pub const PROLOGUE_LABEL: &[u8] = b"comsat noise v2\0";

/// Bytes in front of a record's payload: the record header and the kind.
pub const RECORD_PREFIX_LEN: usize = RECORD_HEADER_LEN + 1;

/// Handshake payload flag: the sender prefers AES-GCM.
const PREFERS_AES: u8 = 1;

/// Label of the HKDF that derives every record key from a direction's key.
const KEY_LABEL: &[u8] = b"comsat record key v2";

/// Records one key seals by default: `2^20`. With records of up to 2^12
/// AES blocks, AES-GCM's confidentiality bound `(q * l)^2 / 2^129` stays
/// at 2^-65 (RFC 9001 section 6.6 and the CFRG's AEAD limits, which QUIC's
/// per-packet limits come from); ChaCha20-Poly1305's is far higher.
pub const DEFAULT_RECORDS_PER_KEY_LOG2: u8 = 20;

/// Flow ids per generation by default: `2^22 - 1` per dialling side (odd
/// ids for side A, even ones for side B, below 2^24).
pub const DEFAULT_FLOW_IDS_LOG2: u8 = 22;

/// The smallest values an agent may state (for tests of rekeying).
pub const MIN_LOG2: u8 = 2;

mod datagram;
mod handshake;
mod params;
mod rng;
mod session;
#[cfg(test)]
pub(crate) mod tests;

pub use datagram::{
    DATAGRAM_HEADER_LEN, DATAGRAM_OVERHEAD, DATAGRAM_WINDOW, DatagramError, DatagramOpener,
    DatagramSealer, MAX_DATAGRAM_LEN, UdpFlowId,
};
pub use handshake::{
    ExpectResponse, initiate, initiate_preferring, initiate_with_params, respond,
    respond_preferring, respond_with_params,
};
pub use params::{Cipher, Params};
pub use rng::NoiseRng;
pub use session::{Opener, Sealer, Session};

/// A Noise operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NoiseError {
    /// The Noise library refused (bad message, bad tag, wrong key).
    #[error("noise: {0}")]
    Snow(#[from] snow::Error),
    /// A handshake message is too long.
    #[error("handshake message of {0} bytes exceeds {MAX_HANDSHAKE_LEN}")]
    HandshakeTooLong(usize),
    /// A handshake payload is not the three bytes of [`Params`] (a peer of
    /// another version).
    #[error("handshake payload of {0} bytes (expected 3: a peer of another comsat version?)")]
    HandshakePayload(usize),
    /// A peer stated limits out of range.
    #[error("handshake states records per key 2^{0} and flow ids 2^{1}: out of range")]
    Params(u8, u8),
    /// A record value is out of range.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// A payload is too long for one record.
    #[error("record payload of {0} bytes exceeds {MAX_RECORD_PAYLOAD_LEN}")]
    PayloadTooLong(usize),
    /// A buffer to seal in place lacks the room for the record header.
    #[error("record buffer of {0} bytes lacks the {RECORD_PREFIX_LEN}-byte prefix")]
    NoPrefix(usize),
    /// A record or control message failed to decrypt (wrong key, flow or
    /// sequence number, or altered bytes).
    #[error("decryption failed")]
    Decrypt,
}
