//! Datagrams of the links' UDP flows ([`comsat_protocol::datagram`]):
//! forwarded from one side's connection to the other's as they come,
//! within the link's rate, and never held: a datagram that cannot go on
//! at once is dropped and counted by why.

use std::sync::Arc;
use tokio::time::Instant;

use bytes::Bytes;
use comsat_protocol::datagram;

use super::State;
use crate::table::{ConnId, Role};

/// Why a datagram was dropped (the `reason` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Dropped {
    /// Shorter than a link id.
    Malformed,
    /// The connection holds no side of the link it names (or holds it as
    /// a lane, which carries flows only).
    NotAttached,
    /// The link's other side is not attached here now.
    PeerAway,
    /// Over the link's rate limit.
    RateLimit,
    /// Larger than the peer's connection takes in one datagram.
    TooLarge,
}

impl Dropped {
    pub(super) fn label(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::NotAttached => "not_attached",
            Self::PeerAway => "peer_away",
            Self::RateLimit => "rate_limit",
            Self::TooLarge => "too_large",
        }
    }
}

/// Forwards what connection `conn_id` sends as datagrams until it closes.
pub(super) async fn forward_datagrams(state: Arc<State>, conn_id: ConnId, conn: quinn::Connection) {
    while let Ok(d) = conn.read_datagram().await {
        match forward(&state, conn_id, d) {
            Ok(()) => state.metrics.datagrams_forwarded.increment(1),
            Err(why) => state.metrics.datagram_dropped(why.label()),
        }
    }
}

fn forward(state: &State, conn_id: ConnId, d: Bytes) -> Result<(), Dropped> {
    let (link_id, _) = datagram::split(&d).ok_or(Dropped::Malformed)?;
    let (peer, stats, side) = {
        let links = state.links();
        let route = links
            .table
            .route(link_id, conn_id)
            .filter(|r| r.role == Role::Main)
            .ok_or(Dropped::NotAttached)?;
        let peer = links
            .conn(route.peer)
            .ok_or(Dropped::PeerAway)?
            .conn
            .clone();
        let stats = links
            .table
            .data(link_id)
            .ok_or(Dropped::NotAttached)?
            .stats
            .clone();
        (peer, stats, route.side)
    };
    let n = d.len();
    if !stats.throttle(side).admit(n, Instant::now()) {
        return Err(Dropped::RateLimit);
    }
    match peer.send_datagram(d) {
        Ok(()) => {
            stats.add_bytes(side, n as u64);
            Ok(())
        }
        Err(quinn::SendDatagramError::TooLarge) => Err(Dropped::TooLarge),
        Err(_) => Err(Dropped::PeerAway),
    }
}
