//! Keeping a relay group's links on the first relay of their list that
//! answers.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use comsat_protocol::{LinkId, RelayId};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tracing::{Instrument, info, info_span, warn};

use crate::config::RelayEndpoint;
use crate::core::relay::{Backoff, Outcome, RelayList};
use crate::defaults;
use crate::group::{Busy, Runtimes};
use crate::link::{AckWake, LinkRt};
use crate::shared::Shared;

use super::conn::{ConnectError, close_endpoint, connect, local_ip_toward};
use super::control::{Ended, Moves};
use super::lane::Lane;

/// Keeps `links` on the first relay of `relays` that answers, forever;
/// `left` names a relay their peers left (the group moves off it if it is
/// on it); `connection` names their connection in logs (`default` when
/// none). With `lanes`, each relay connection has a lane beside it where
/// the relay offers one ([`super::lane`]).
pub(crate) async fn relay_loop(
    shared: Arc<Shared>,
    (relays, mut left): (Vec<RelayEndpoint>, watch::Receiver<Option<RelayId>>),
    connection: Option<String>,
    links: HashMap<LinkId, Arc<LinkRt>>,
    ack_notify: Arc<AckWake>,
    lanes: Option<(Runtimes, Arc<Busy>)>,
) {
    let candidates: Vec<(RelayEndpoint, quinn::ClientConfig)> = relays
        .iter()
        .filter_map(|r| match crate::tls::client_config(r, shared.keep_alive) {
            Ok(c) => Some((r.clone(), c)),
            Err(e) => {
                tracing::error!(relay = %r.addr, error = %e, "cannot configure TLS for relay; skipping it");
                None
            }
        })
        .collect();
    if candidates.is_empty() {
        tracing::error!("no usable relay for these links; they stay down");
        return;
    }
    let mut backoff = Backoff::new(defaults::RECONNECT_INITIAL, defaults::RECONNECT_MAX);
    let started = Instant::now();
    let mut list = RelayList::new(candidates.len());
    // Where each relay was last reached, to tell whether this machine still
    // has a route toward it when its connection is lost.
    let mut reached: Vec<Option<SocketAddr>> = vec![None; candidates.len()];
    loop {
        let (relay, client) = &candidates[list.current()];
        let span = info_span!(
            "relay",
            addr = %relay.addr,
            connection = %connection.as_deref().unwrap_or("default")
        );
        let ended = connect_and_serve(
            &shared,
            (relay, client),
            &links,
            &ack_notify,
            (list.can_hop(), list.hops()),
            lanes.as_ref(),
            &mut left,
        )
        .instrument(span)
        .await
        .map(|(ended, remote)| {
            reached[list.current()] = Some(remote);
            ended
        });
        // No route toward where the relay was: this machine's network is
        // down, not the relay (the kernel picks a route; nothing is sent).
        let offline = reached[list.current()].filter(|at| local_ip_toward(*at).is_none());
        let error = ended.as_ref().err().map(|e| format!("{}: {e}", relay.addr));
        for link in links.values() {
            link.set_ready(None, &shared.metrics);
            link.set_peer(false, &shared.metrics);
            link.pending().clear();
            link.set_relay(None, error.clone());
        }
        let how = match &ended {
            Ok(Ended::Silent) | Err(_) if offline.is_some() => Outcome::Offline,
            Ok(Ended::Closed) => Outcome::Closed,
            Ok(Ended::Silent | Ended::PeerMoved) => Outcome::Silent,
            Ok(Ended::Hop) => Outcome::Hop,
            Ok(Ended::Drained) => Outcome::Drained,
            Err(_) => Outcome::Failed,
        };
        let next = list.on_ended(how);
        let to = &candidates[next.relay].0.addr;
        match (how, ended) {
            (Outcome::Offline, _) => {
                shared.metrics.offline.increment(1);
                warn!(relay = %relay.addr, "no route toward the relay: this machine's network is down; its links wait for it and come back to this relay");
            }
            (Outcome::Drained, _) => {
                shared.metrics.relay_drains.increment(1);
                info!(from = %relay.addr, to = %to, "relay is draining; moving to the next relay");
            }
            (Outcome::Hop, _) => {
                info!(from = %relay.addr, to = %to, "peers absent here; trying the next relay");
            }
            (_, Ok(Ended::PeerMoved)) => {
                shared.metrics.peer_moves.increment(1);
                info!(from = %relay.addr, to = %to, "the peers left this relay, which stopped answering them: following them to the next relay");
            }
            (Outcome::Silent, _) if list.can_hop() => {
                tell_silent(&shared, relay);
                info!(from = %relay.addr, to = %to, "relay went silent; trying the next relay first");
            }
            (Outcome::Silent, _) => {
                tell_silent(&shared, relay);
                info!(relay = %relay.addr, "relay went silent; connecting again");
            }
            (_, Err(e)) => {
                shared.metrics.connect_failures.increment(1);
                if matches!(e, ConnectError::Refused(_))
                    && started.elapsed() < defaults::NEW_LINK_GRACE
                {
                    // A link the controller just created races its grant
                    // to the relay; the retry finds it there.
                    info!(relay = %relay.addr, error = %e, "relay connection refused; a new link's grant may still be on its way to the relay: retrying");
                } else {
                    warn!(relay = %relay.addr, error = %e, "relay connection failed");
                }
            }
            _ => {}
        }
        if next.reset_backoff {
            backoff.reset();
        }
        if next.wait {
            tokio::time::sleep(backoff.next_delay(rand::random::<f64>())).await;
        }
        if let Some(at) = offline {
            wait_for_route(at).await;
        }
    }
}

/// Returns once this machine has a route toward `at` again (looked at
/// every [`defaults::ROUTE_CHECK`]; nothing goes on the wire).
async fn wait_for_route(at: SocketAddr) {
    let waited = Instant::now();
    while local_ip_toward(at).is_none() {
        tokio::time::sleep(defaults::ROUTE_CHECK).await;
    }
    info!(
        after_ms = waited.elapsed().as_millis() as u64,
        "a route toward the relay again: reconnecting"
    );
}

/// Queues `relay`, which stopped answering, for the controller to tell the
/// peers (dropped if the queue is full or nobody reads it).
fn tell_silent(shared: &Shared, relay: &RelayEndpoint) {
    if let Some(id) = relay.relay_id {
        let _ = shared.silent.try_send(id);
    }
}

/// Connects, authenticates and serves until the connection ends. `Err` if
/// it was never established.
async fn connect_and_serve(
    shared: &Arc<Shared>,
    (relay, client): (&RelayEndpoint, &quinn::ClientConfig),
    links: &HashMap<LinkId, Arc<LinkRt>>,
    ack_notify: &AckWake,
    (can_hop, hops): (bool, u32),
    lanes: Option<&(Runtimes, Arc<Busy>)>,
    left: &mut watch::Receiver<Option<RelayId>>,
) -> Result<(Ended, SocketAddr), ConnectError> {
    let dialled = std::time::Instant::now();
    let (endpoint, conn, send, recv, decoder) =
        connect(shared, &relay.addr, &relay.server_name, client).await?;
    shared
        .metrics
        .relay_handshake
        .record(dialled.elapsed().as_secs_f64());
    shared.metrics.connects.increment(1);
    info!("connected to relay");
    for link in links.values() {
        link.set_relay(relay.relay_id, None);
    }
    let _roaming = super::conn::Roaming::start(shared, &endpoint, conn.remote_address());
    // Ends with this connection (dropped on return); tells it when the
    // relay went silent on the lane.
    let lane_silent = Arc::new(Notify::new());
    let _lane = lanes.and_then(|(rt, busy)| {
        Lane::start(
            shared,
            relay,
            client,
            links,
            (rt, busy),
            lane_silent.clone(),
        )
    });
    // A move the peers made before this connection is not about it.
    left.borrow_and_update();
    let mut ended = super::control::serve(
        shared,
        &conn,
        (send, recv, decoder),
        links,
        ack_notify,
        (can_hop, hops),
        Moves {
            left,
            here: relay.relay_id,
            lane_silent: &lane_silent,
        },
    )
    .await;
    if matches!(ended, Ended::Closed)
        && matches!(conn.close_reason(), Some(quinn::ConnectionError::TimedOut))
    {
        ended = Ended::Silent;
    }
    let stats = conn.stats();
    info!(
        sent_packets = stats.path.sent_packets,
        lost_packets = stats.path.lost_packets,
        congestion_events = stats.path.congestion_events,
        rtt_us = stats.path.rtt.as_micros() as u64,
        "relay connection ended"
    );
    let remote = conn.remote_address();
    conn.close(0u32.into(), b"bye");
    close_endpoint(endpoint);
    Ok((ended, remote))
}
