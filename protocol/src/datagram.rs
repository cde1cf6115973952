//! A datagram of a link's UDP flows as the relay reads it: the link it
//! belongs to, then what the link's agents sealed for each other
//! ([`crate::noise::DatagramSealer`]), which the relay cannot read.
//!
//! ```text
//! link id (16 bytes) || sealed datagram
//! ```
//!
//! It travels as a QUIC datagram on the sender's connection to the relay.
//! The relay forwards it unchanged on the connection of the link's other
//! side when the sending connection holds a side of that link and the peer
//! is attached; otherwise (or over the link's rate) it drops it and counts
//! why. Datagrams are never held for a peer that is away.

use crate::ids::LinkId;

/// Bytes in front of the sealed datagram: the link id.
pub const LINK_TAG_LEN: usize = 16;

/// The link `datagram` names and the sealed datagram after it; `None` if
/// it is shorter than a link id.
pub fn split(datagram: &[u8]) -> Option<(LinkId, &[u8])> {
    let (tag, sealed) = datagram.split_first_chunk::<LINK_TAG_LEN>()?;
    Some((LinkId(*tag), sealed))
}

/// Appends the tag of `link` to `out` (the sealed datagram goes after it).
pub fn tag(link: LinkId, out: &mut Vec<u8>) {
    out.extend_from_slice(&link.0);
}
