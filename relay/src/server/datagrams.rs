//! Datagrams of the links' UDP flows ([`comsat_protocol::datagram`]):
//! forwarded from one side's connection to the other's as they come,
//! within the link's rate, and never held: a datagram that cannot go on
//! at once is dropped and counted by why.

use std::sync::Arc;
use tokio::time::Instant;

use bytes::Bytes;
use comsat_protocol::{LinkId, Side, datagram};

use super::State;
use crate::links::LinkStats;
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
    /// The peer's connection holds as many datagrams as it may, unsent:
    /// its path is busy.
    Congested,
    /// Received, but dropped for room before the relay read it (it read
    /// the connection's datagrams slower than they came).
    Overflow,
}

impl Dropped {
    pub(super) fn label(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::NotAttached => "not_attached",
            Self::PeerAway => "peer_away",
            Self::RateLimit => "rate_limit",
            Self::TooLarge => "too_large",
            Self::Congested => "congested",
            Self::Overflow => "overflow",
        }
    }
}

/// Forwards what connection `conn_id` sends as datagrams until it closes.
pub(super) async fn forward_datagrams(state: Arc<State>, conn_id: ConnId, conn: quinn::Connection) {
    let mut overflow = 0;
    while let Ok(d) = conn.read_datagram().await {
        match forward(&state, conn_id, d) {
            Ok(()) => state.metrics.datagrams_forwarded.increment(1),
            Err(why) => state.metrics.datagram_dropped(why.label(), 1),
        }
        count_overflow(&state, &conn, &mut overflow);
    }
    count_overflow(&state, &conn, &mut overflow);
}

/// Counts the datagrams `conn` dropped for room since `counted` of them.
fn count_overflow(state: &State, conn: &quinn::Connection, counted: &mut u64) {
    let dropped = conn.datagrams_dropped();
    if dropped > *counted {
        state
            .metrics
            .datagram_dropped(Dropped::Overflow.label(), dropped - *counted);
        *counted = dropped;
    }
}

fn forward(state: &State, conn_id: ConnId, d: Bytes) -> Result<(), Dropped> {
    let route = route(state, conn_id, &d)?;
    let n = d.len();
    if !route.stats.throttle(route.side).admit(n, Instant::now()) {
        return Err(Dropped::RateLimit);
    }
    let out = match state.adversary.get() {
        Some(adversary) => adversary.datagram(route.link_id, route.side, d),
        None => vec![d],
    };
    for d in out {
        match route.peer.try_send_datagram(d) {
            Ok(()) => route.stats.add_bytes(route.side, n as u64),
            Err(quinn::SendDatagramError::TooLarge) => return Err(Dropped::TooLarge),
            Err(quinn::SendDatagramError::Blocked) => return Err(Dropped::Congested),
            Err(_) => return Err(Dropped::PeerAway),
        }
    }
    Ok(())
}

/// Where a datagram goes on.
struct Route {
    link_id: LinkId,
    /// The connection of the link's other side.
    peer: quinn::Connection,
    stats: Arc<LinkStats>,
    /// The side that sent it.
    side: Side,
}

/// The route of datagram `d` from connection `conn_id`.
fn route(state: &State, conn_id: ConnId, d: &[u8]) -> Result<Route, Dropped> {
    let (link_id, _) = datagram::split(d).ok_or(Dropped::Malformed)?;
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
    Ok(Route {
        link_id,
        peer,
        stats,
        side: route.side,
    })
}
