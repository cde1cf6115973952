//! A relay that attacks its own agents, for tests of the end-to-end layer.
//!
//! comsat promises that a relay only forwards ciphertext and can change
//! nothing that two applications say to each other: the agents run Noise
//! end to end and treat every relay as an adversary. These hooks let a test
//! play that adversary with the real relay: after a relay authenticated its
//! agents and paired their links like any other, an [`Adversary`] sees
//! every handshake and sealed message passing between two agents and every
//! chunk of every flow stream, and decides what is delivered instead
//! (nothing, the same twice, something changed, something recorded
//! earlier). Through [`RelayHandle::side_connection`] and
//! [`RelayHandle::send_peer_frame`] it can also open streams of its own to
//! an agent and send it frames that its peer never sent.
//!
//! Nothing in a relay's configuration installs an adversary: only code that
//! embeds the relay can ([`crate::Relay::set_adversary`]). A relay without
//! one forwards everything unchanged.
//!
//! [`RelayHandle::side_connection`]: crate::RelayHandle::side_connection
//! [`RelayHandle::send_peer_frame`]: crate::RelayHandle::send_peer_frame

use std::time::Duration;

use bytes::Bytes;
use comsat_protocol::msg::PeerFrame;
use comsat_protocol::{FlowId, LinkId, Side};

/// What a relay does with the traffic between two agents (see the module
/// docs). Every method has the honest relay's behaviour as its default.
pub trait Adversary: Send + Sync + 'static {
    /// A handshake or sealed message from side `from` of `link`, on its
    /// way to the other side: the frames to deliver instead, in order.
    fn peer_frame(&self, link: LinkId, from: Side, frame: PeerFrame) -> Vec<PeerFrame> {
        let _ = (link, from);
        vec![frame]
    }

    /// A flow stream from side `from` of `link` is being spliced to the
    /// other side: a [`Tamper`] for each direction (the stream's own, and
    /// the answer coming back), or `None` to forward both unchanged.
    fn flow(
        &self,
        link: LinkId,
        flow: FlowId,
        from: Side,
    ) -> Option<(Box<dyn Tamper>, Box<dyn Tamper>)> {
        let _ = (link, flow, from);
        None
    }

    /// A datagram of a UDP flow from side `from` of `link` (link id in
    /// front), on its way to the other side: the datagrams to send
    /// instead, in order.
    fn datagram(&self, link: LinkId, from: Side, datagram: Bytes) -> Vec<Bytes> {
        let _ = (link, from);
        vec![datagram]
    }
}

/// One direction of one spliced flow stream, in the adversary's hands.
pub trait Tamper: Send + 'static {
    /// A chunk read from the sending agent (the stream's bytes after the
    /// flow header, cut wherever QUIC cut them): what to write to the
    /// receiving agent instead.
    fn chunk(&mut self, chunk: Bytes) -> Tampered;

    /// The sender finished the stream: bytes to write before finishing it
    /// on the receiving side too (for example, records held back).
    fn finish(&mut self) -> Vec<Bytes> {
        Vec::new()
    }
}

/// What a [`Tamper`] does with a chunk.
#[derive(Debug)]
pub enum Tampered {
    /// Write these chunks (possibly none) and go on.
    Forward(Vec<Bytes>),
    /// Write these chunks, then finish the stream on the receiving side
    /// and stop reading the sender's.
    Finish(Vec<Bytes>),
    /// Wait this long (reading nothing meanwhile), then write these chunks
    /// and go on.
    Delay(Duration, Vec<Bytes>),
    /// Reset both directions of the stream.
    Reset,
}
