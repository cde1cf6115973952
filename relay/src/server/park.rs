//! Parking: a flow whose peer is away is read into memory within its
//! link's `buffer_limit` and the relay's budget until the peer attaches.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use comsat_protocol::{LinkId, Side};
use tokio::sync::watch;
use tracing::debug;

use super::State;
use super::splice::read_joined;
use crate::defaults;
use crate::links::LinkStats;
use crate::table::{ConnId, ParkId, Role};

/// Bytes held by the relay for a parked flow (counted in the [`Table`] and
/// in the link's stats), released on drop.
pub(super) struct Hold {
    pub(super) park: ParkId,
    pub(super) bytes: u64,
    pub(super) link: Arc<LinkStats>,
    pub(super) state: Arc<State>,
}

impl Hold {
    fn add(&mut self, n: u64) {
        self.bytes += n;
        self.link.buffered.fetch_add(n, Ordering::Relaxed);
        let total = self.state.links().table.hold(self.park, n);
        self.state.set_parked(total);
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.link.buffered.fetch_sub(self.bytes, Ordering::Relaxed);
        let (_, total) = self.state.links().table.unpark(self.park);
        self.state.set_parked(total);
    }
}

/// A flow whose peer side is away: what the relay read of it so far.
pub(super) struct Parked {
    pub(super) chunks: Vec<Bytes>,
    pub(super) finished: bool,
    pub(super) held: Hold,
}

/// Where a new flow stream goes.
pub(super) struct Route {
    pub(super) side: Side,
    /// How the connection the flow came on holds the side.
    pub(super) role: Role,
    pub(super) peer: Option<quinn::Connection>,
    pub(super) revoked: watch::Receiver<bool>,
    pub(super) pair: watch::Receiver<u64>,
    pub(super) stats: Arc<LinkStats>,
    pub(super) buffer_limit: u64,
    /// The grant's concurrent-flow limit, as of now (an updated grant
    /// applies to the next flow).
    pub(super) max_flows: Option<u32>,
}

pub(super) fn route(state: &State, conn_id: ConnId, link_id: LinkId) -> Option<Route> {
    let (buffer_limit, max_flows) = state
        .grants
        .snapshot()
        .link(&link_id)
        .map_or((0, Some(0)), |g| (g.buffer_limit, g.limits.max_flows));
    let links = state.links();
    let found = links.table.route(link_id, conn_id)?;
    let link = links.table.data(link_id)?;
    Some(Route {
        side: found.side,
        role: found.role,
        peer: links.conn(found.peer).map(|a| a.conn.clone()),
        revoked: link.revoked.subscribe(),
        pair: link.pair.subscribe(),
        stats: link.stats.clone(),
        buffer_limit,
        max_flows,
    })
}

/// Holds a flow whose peer is away: reads it into memory while the link's
/// `buffer_limit` and the relay's budget allow (then stops reading, so QUIC
/// flow control pushes back on the sender), until the peer attaches.
/// `None` if the flow ended or the link went away meanwhile.
pub(super) async fn park(
    state: &Arc<State>,
    link_id: LinkId,
    route: &mut Route,
    recv: &mut quinn::RecvStream,
) -> Option<(quinn::Connection, Parked)> {
    let park = state.links().table.park(link_id)?;
    let mut parked = Parked {
        chunks: Vec::new(),
        finished: false,
        held: Hold {
            park,
            bytes: 0,
            link: route.stats.clone(),
            state: state.clone(),
        },
    };
    state.metrics.flows_parked.increment(1);
    debug!("flow parked: peer away");
    let mut frames = Vec::new();
    loop {
        let budget = state.park_budget();
        let (peer, room) = {
            let links = state.links();
            let peer = links.table.peer(link_id, route.side, route.role);
            let room = !parked.finished && links.table.room(park, route.buffer_limit, budget);
            (links.conn(peer).map(|a| a.conn.clone()), room)
        };
        if let Some(peer) = peer {
            return Some((peer, parked));
        }
        tokio::select! {
            changed = route.pair.changed() => {
                if changed.is_err() {
                    return None;
                }
            }
            _ = route.revoked.wait_for(|r| *r) => return None,
            chunk = read_joined(recv, defaults::SPLICE_CHUNK, &mut frames), if room => match chunk {
                Ok(Some(c)) => {
                    parked.held.add(c.len() as u64);
                    state.tap(&c);
                    parked.chunks.push(c);
                }
                Ok(None) => parked.finished = true,
                Err(_) => return None,
            },
            () = tokio::time::sleep(defaults::PARK_RECHECK), if !room => {}
        }
    }
}
