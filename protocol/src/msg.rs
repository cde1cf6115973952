//! Control messages on the control stream between an agent and a relay.
//!
//! The control stream is the first bidirectional stream the agent opens on
//! a QUIC connection. Each message travels as a frame: `len: u32` (big
//! endian) followed by `len` bytes of a bincode-encoded [`AgentToRelay`] or
//! [`RelayToAgent`]. `len` is at most [`MAX_CONTROL_FRAME_LEN`].
//!
//! Call order on a connection: the agent sends [`AgentToRelay::Hello`]
//! first; the relay answers [`RelayToAgent::Welcome`] or closes the
//! connection with [`crate::CLOSE_REFUSED`]. Then the agent attaches links;
//! the relay tells each side when its peer is present, and forwards
//! [`PeerFrame`]s between the two sides of a paired link without reading
//! them. A second connection of the same agent may carry a side's flows
//! beside it ([`AgentToRelay::AttachLane`]).

use serde::{Deserialize, Serialize};

use crate::codec::{self, CodecError};
use crate::ids::{LinkId, NodeId, Side};
use crate::keys::{SignPublicKey, Signature, SigningKey};
use crate::limits::MAX_CONTROL_FRAME_LEN;

/// Signature domain of `Hello`, version 1.
pub const DOMAIN_SEP_HELLO: &[u8] = b"comsat hello v1\0";

/// Length of the frame header.
pub const FRAME_HEADER_LEN: usize = 4;

/// Something an agent sends to its peer through the relay, which the relay
/// forwards unread.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerFrame {
    /// A Noise handshake message.
    Handshake(Vec<u8>),
    /// A link-control record sealed with the link's Noise session on flow
    /// id 0 (acknowledgements, resets).
    Sealed {
        /// Record sequence number on flow 0.
        seq: u64,
        /// The ciphertext.
        ciphertext: Vec<u8>,
    },
    /// From side B: it holds no session for the link (it started afresh)
    /// and could not open a sealed message, so side A should start a
    /// handshake now rather than after its retry interval. Not
    /// authenticated: a relay can forge it, and gains nothing it could
    /// not by dropping a `Resume`; side A takes it once each time its peer
    /// (re)appears.
    NoSession,
}

/// Messages from an agent to a relay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentToRelay {
    /// Authenticates the connection: `signature` is the node key's signature
    /// over [`DOMAIN_SEP_HELLO`], the node id and the connection's TLS
    /// exporter output (see [`hello_transcript`]).
    Hello {
        /// The agent.
        node_id: NodeId,
        /// Channel-bound signature.
        signature: Signature,
    },
    /// Asks to hold `side` of `link` at `generation` on this connection.
    Attach {
        /// The link.
        link_id: LinkId,
        /// The generation the agent was configured with.
        generation: u64,
        /// The side it holds.
        side: Side,
    },
    /// Gives up a link on this connection.
    Detach {
        /// The link.
        link_id: LinkId,
    },
    /// To be forwarded to the peer of `link_id`.
    Peer {
        /// The link.
        link_id: LinkId,
        /// The opaque frame.
        frame: PeerFrame,
    },
    /// Asks to carry flows of `side` of `link` on this connection as well:
    /// a second connection (the *lane*) beside the one the side is
    /// attached on, for flows that must not queue behind bulk ones. The
    /// relay checks it like [`AgentToRelay::Attach`] and answers
    /// [`RelayToAgent::Attached`] or [`RelayToAgent::Error`]; a lane
    /// attachment never pairs a link nor carries peer frames, and a flow
    /// opened on it goes on to the peer's lane where the peer has one.
    AttachLane {
        /// The link.
        link_id: LinkId,
        /// The generation the agent was configured with.
        generation: u64,
        /// The side it holds.
        side: Side,
    },
}

/// Why a relay refused a request on an authenticated connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The relay holds no valid grant for this link and node and side.
    NotGranted,
    /// The side is already attached by another connection.
    AlreadyAttached,
    /// The generation is older than the one the relay holds.
    StaleGeneration,
    /// The link is not attached on this connection.
    NotAttached,
    /// The link was revoked.
    Revoked,
    /// The relay is draining: it takes no new attaches (move to the next
    /// relay of the grant).
    Draining,
    /// The relay holds as many links as its operator allows.
    RelayFull,
    /// The link's grant expired (`not_after` passed) and the relay holds no
    /// newer one: the link is torn down until the controller grants it
    /// anew.
    Expired,
}

/// Messages from a relay to an agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RelayToAgent {
    /// The `Hello` was accepted.
    Welcome,
    /// The link is attached on this connection.
    Attached {
        /// The link.
        link_id: LinkId,
    },
    /// Both sides of the link are attached.
    PeerPresent {
        /// The link.
        link_id: LinkId,
    },
    /// The peer side went away.
    PeerAbsent {
        /// The link.
        link_id: LinkId,
    },
    /// Forwarded from the peer of `link_id`.
    Peer {
        /// The link.
        link_id: LinkId,
        /// The opaque frame.
        frame: PeerFrame,
    },
    /// A request about `link_id` was refused.
    Error {
        /// The link.
        link_id: LinkId,
        /// Why.
        code: ErrorCode,
    },
    /// The relay is draining (shutting down or upgrading): move every link
    /// of this connection to the next relay of its grant, now. Both sides
    /// of a link are told at once, so they meet on the same next relay.
    GoAway,
}

/// The bytes a `Hello` signature covers after the domain label.
pub fn hello_transcript(node_id: &NodeId, exporter: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + exporter.len());
    out.extend_from_slice(&node_id.0);
    out.extend_from_slice(exporter);
    out
}

/// Builds the `Hello` for a connection whose TLS exporter gave `exporter`.
pub fn make_hello(node_id: NodeId, key: &SigningKey, exporter: &[u8]) -> AgentToRelay {
    let signature = key.sign(DOMAIN_SEP_HELLO, &hello_transcript(&node_id, exporter));
    AgentToRelay::Hello { node_id, signature }
}

/// Checks a `Hello` signature against the node's key and this connection's
/// exporter output.
pub fn verify_hello(
    node_id: &NodeId,
    signature: &Signature,
    key: &SignPublicKey,
    exporter: &[u8],
) -> bool {
    key.verify(
        DOMAIN_SEP_HELLO,
        &hello_transcript(node_id, exporter),
        signature,
    )
}

/// A control frame could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// The length prefix exceeds [`MAX_CONTROL_FRAME_LEN`].
    #[error("control frame of {0} bytes exceeds the maximum of {MAX_CONTROL_FRAME_LEN}")]
    TooLong(usize),
    /// The body is not a valid message.
    #[error("invalid control frame: {0}")]
    Body(#[from] CodecError),
}

/// A direction of control messages: implemented by [`AgentToRelay`] and
/// [`RelayToAgent`].
pub trait ControlMessage: Sized + Serialize + serde::de::DeserializeOwned {
    /// Appends this message as one frame to `out`.
    fn write_to(&self, out: &mut Vec<u8>) -> Result<(), CodecError> {
        let body = codec::encode(self)?;
        if body.len() > MAX_CONTROL_FRAME_LEN {
            return Err(CodecError::TooLong {
                len: body.len(),
                limit: MAX_CONTROL_FRAME_LEN,
            });
        }
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        Ok(())
    }

    /// The encoded frame length, header included.
    fn encoded_len(&self) -> Result<usize, CodecError> {
        Ok(FRAME_HEADER_LEN + codec::encode(self)?.len())
    }

    /// Decodes one frame from the front of `buf`.
    ///
    /// Returns `Ok(None)` when `buf` holds no complete frame yet (read more),
    /// `Ok(Some((msg, consumed)))` for a frame, and an error when the bytes
    /// can never form a valid frame (close the connection).
    fn decode_frame(buf: &[u8]) -> Result<Option<(Self, usize)>, FrameError> {
        let Some(header) = buf.get(..FRAME_HEADER_LEN) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        if len > MAX_CONTROL_FRAME_LEN {
            return Err(FrameError::TooLong(len));
        }
        let Some(body) = buf.get(FRAME_HEADER_LEN..FRAME_HEADER_LEN + len) else {
            return Ok(None);
        };
        let msg = codec::decode::<Self, MAX_CONTROL_FRAME_LEN>(body)?;
        Ok(Some((msg, FRAME_HEADER_LEN + len)))
    }
}

impl ControlMessage for AgentToRelay {}
impl ControlMessage for RelayToAgent {}

/// Reassembles control frames from the bytes of a stream, sans IO.
///
/// Feed it what the stream gives with [`Self::extend`], then take messages
/// with [`Self::next_message`] until it returns `Ok(None)`. It never holds more than
/// one partial frame plus the last chunk fed: a length prefix over
/// [`MAX_CONTROL_FRAME_LEN`] is refused before its body arrives.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    start: usize,
}

impl FrameDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the stream.
    pub fn extend(&mut self, data: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Whether a partial frame is pending (the stream must not end here).
    pub fn has_partial(&self) -> bool {
        self.start < self.buf.len()
    }

    /// The next complete message, if any.
    pub fn next_message<M: ControlMessage>(&mut self) -> Result<Option<M>, FrameError> {
        match M::decode_frame(&self.buf[self.start..])? {
            Some((msg, used)) => {
                self.start += used;
                if self.start == self.buf.len() {
                    self.buf.clear();
                    self.start = 0;
                }
                Ok(Some(msg))
            }
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests;
