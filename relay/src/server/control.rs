//! An authenticated connection's control stream: attaching and detaching
//! link sides and lanes, telling peers who is present, and forwarding peer
//! frames.

use std::collections::HashSet;
use std::sync::Arc;

use comsat_protocol::msg::{AgentToRelay, ErrorCode, FrameDecoder, PeerFrame, RelayToAgent};
use comsat_protocol::{CLOSE_NORMAL, CLOSE_PROTOCOL_ERROR, LinkId, NodeId, Side};
use tracing::{debug, info};

use super::accept::read_message;
use super::ctl::CtlRx;
use super::datagrams::forward_datagrams;
use super::splice::accept_flows;
use super::{Attachment, LinkState, State};
use crate::grants::unix_now;
use crate::table::{ConnId, Refusal, Role};

async fn write_control(mut send: quinn::SendStream, mut rx: CtlRx) {
    while let Some(mut buf) = rx.recv().await {
        // What else is queued goes in the same write.
        while let Some(more) = rx.try_recv() {
            buf.extend_from_slice(&more);
        }
        if send.write_all(&buf).await.is_err() {
            return;
        }
    }
    let _ = send.finish();
}

pub(super) async fn serve_connection(
    state: &Arc<State>,
    conn_id: ConnId,
    node_id: NodeId,
    conn: quinn::Connection,
    send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    mut decoder: FrameDecoder,
) {
    let (ctl, rx) = super::ctl::channel(state.control_bytes.clone());
    let writer = tokio::spawn(write_control(send, rx));
    let att = Attachment {
        conn: conn.clone(),
        ctl,
    };
    state.send_or_close(&att, RelayToAgent::Welcome);
    state.links().conns.insert(conn_id, att.clone());
    let flows = tokio::spawn(accept_flows(state.clone(), conn_id, conn.clone()));
    let datagrams = tokio::spawn(forward_datagrams(state.clone(), conn_id, conn.clone()));
    let mut held: Held = HashSet::new();
    let mut draining = state.draining.subscribe();
    let mut told_to_go = false;
    loop {
        let msg = tokio::select! {
            msg = read_message::<AgentToRelay>(&mut recv, &mut decoder) => msg,
            _ = conn.closed() => break,
            _ = draining.wait_for(|d| *d), if !told_to_go => {
                // Every link of the connection moves to its next relay; the
                // agent closes the connection when it has left.
                told_to_go = true;
                debug!("draining: agent told to go away");
                state.send_or_close(&att, RelayToAgent::GoAway);
                continue;
            }
        };
        let msg = match msg {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(e) => {
                debug!(error = %e, "bad control stream");
                conn.close(CLOSE_PROTOCOL_ERROR.into(), b"protocol error");
                break;
            }
        };
        let ok = handle_control(state, conn_id, node_id, &att, &mut held, msg);
        if !ok {
            conn.close(CLOSE_PROTOCOL_ERROR.into(), b"protocol error");
            break;
        }
    }
    for (link_id, side, role) in held {
        detach(state, conn_id, link_id, side, role);
    }
    state.links().conns.remove(&conn_id);
    flows.abort();
    datagrams.abort();
    drop(att);
    let _ = writer.await;
}

/// The link sides one connection holds, and how.
type Held = HashSet<(LinkId, Side, Role)>;

/// Handles one control message; `false` closes the connection.
fn handle_control(
    state: &State,
    conn_id: ConnId,
    node_id: NodeId,
    att: &Attachment,
    held: &mut Held,
    msg: AgentToRelay,
) -> bool {
    let role = match msg {
        AgentToRelay::AttachLane { .. } => Role::Lane,
        _ => Role::Main,
    };
    match msg {
        AgentToRelay::Hello { .. } => false,
        AgentToRelay::Attach {
            link_id,
            generation,
            side,
        }
        | AgentToRelay::AttachLane {
            link_id,
            generation,
            side,
        } => {
            let reply = attach(state, conn_id, node_id, link_id, generation, side, role);
            if reply.is_ok() {
                held.insert((link_id, side, role));
            }
            state.send_or_close(
                att,
                match reply {
                    Ok(()) => RelayToAgent::Attached { link_id },
                    Err(code) => RelayToAgent::Error { link_id, code },
                },
            );
            // A lane never pairs a link.
            if reply.is_ok() && role == Role::Main {
                announce_pair(state, link_id);
            }
            true
        }
        AgentToRelay::Detach { link_id } => {
            let mine: Vec<_> = held.iter().filter(|h| h.0 == link_id).copied().collect();
            for (link_id, side, role) in mine {
                held.remove(&(link_id, side, role));
                detach(state, conn_id, link_id, side, role);
            }
            true
        }
        AgentToRelay::Peer { link_id, frame } => {
            let side = held
                .iter()
                .find(|(l, _, r)| *l == link_id && *r == Role::Main)
                .map(|h| h.1);
            let Some(side) = side else {
                state.send_or_close(
                    att,
                    RelayToAgent::Error {
                        link_id,
                        code: ErrorCode::NotAttached,
                    },
                );
                return true;
            };
            forward_peer_frame(state, conn_id, link_id, side, frame);
            true
        }
    }
}

/// Attaches `side` of `link_id` on connection `conn_id` in `role`: as the
/// side itself, or as the side's lane, which carries flows only.
fn attach(
    state: &State,
    conn_id: ConnId,
    node_id: NodeId,
    link_id: LinkId,
    generation: u64,
    side: Side,
    role: Role,
) -> Result<(), ErrorCode> {
    let grants = state.grants.snapshot();
    let refused = |reason, code| {
        state.metrics.attach_refused(reason);
        debug!(link = %link_id.fmt_short(), reason, "attach refused");
        Err(code)
    };
    let Some(grant) = grants.link(&link_id) else {
        return refused("not_granted", ErrorCode::NotGranted);
    };
    let stats = state.stats.get(grant);
    let refused = |reason, code| {
        stats.refused_attach();
        refused(reason, code)
    };
    if grant.side(side).node_id != node_id {
        return refused("not_granted", ErrorCode::NotGranted);
    }
    if generation < grant.generation {
        return refused("stale_generation", ErrorCode::StaleGeneration);
    }
    if generation > grant.generation {
        return refused("not_granted", ErrorCode::NotGranted);
    }
    if unix_now() >= grant.not_after {
        return refused("expired", ErrorCode::Expired);
    }
    let max_links = state.limits().max_links;
    let (attached, superseded) = {
        let mut links = state.links();
        let attached = links
            .table
            .attach(link_id, side, role, conn_id, max_links, || {
                LinkState::new(stats.clone())
            });
        let attached = match attached {
            Ok(a) => a,
            Err(Refusal::Draining) => {
                drop(links);
                return refused("draining", ErrorCode::Draining);
            }
            Err(Refusal::RelayFull) => {
                drop(links);
                return refused("relay_full", ErrorCode::RelayFull);
            }
        };
        // Parked flows of the peer may go on to this side (or lane) now.
        if let Some(link) = links.table.data(link_id) {
            link.pair.send_modify(|n| *n += 1);
        }
        let superseded = [attached.superseded, attached.stale_lane]
            .map(|c| links.conn(c).map(|a| a.conn.clone()));
        (attached, superseded)
    };
    for old in superseded.into_iter().flatten() {
        // The same node attached again from a new connection: the old
        // one (and the lane that went with it) is stale, a reconnect or a
        // restart the old path has not noticed yet.
        debug!(link = %link_id.fmt_short(), ?role, "re-attached from a new connection");
        old.close(CLOSE_NORMAL.into(), b"superseded by a new connection");
    }
    if role == Role::Lane {
        debug!(link = %link_id.fmt_short(), %side, "lane attached");
        return Ok(());
    }
    if attached.newly_paired {
        state.metrics.links_paired.increment(1.0);
    }
    info!(link = %link_id.fmt_short(), %side, "attached");
    Ok(())
}

/// Tells both sides of a paired link that their peer is present.
fn announce_pair(state: &State, link_id: LinkId) {
    let pair = {
        let links = state.links();
        links
            .table
            .pair(link_id)
            .and_then(|(a, b)| Some((links.conn(Some(a))?.clone(), links.conn(Some(b))?.clone())))
    };
    if let Some((a, b)) = pair {
        for att in [a, b] {
            state.send_or_close(&att, RelayToAgent::PeerPresent { link_id });
        }
    }
}

/// Gives up `side` of `link_id` in `role` if connection `conn_id` holds
/// it; the peer learns that it is alone.
fn detach(state: &State, conn_id: ConnId, link_id: LinkId, side: Side, role: Role) {
    let (detached, peer) = {
        let mut links = state.links();
        let Some(detached) = links.table.detach(link_id, side, role, conn_id) else {
            return;
        };
        let peer = links.conn(detached.peer).cloned();
        (detached, peer)
    };
    if detached.unpaired {
        state.metrics.links_paired.decrement(1.0);
    }
    if role == Role::Lane {
        debug!(link = %link_id.fmt_short(), %side, "lane detached");
        return;
    }
    info!(link = %link_id.fmt_short(), %side, "detached");
    if let Some(peer) = peer {
        state.send_or_close(&peer, RelayToAgent::PeerAbsent { link_id });
    }
}

fn forward_peer_frame(
    state: &State,
    conn_id: ConnId,
    link_id: LinkId,
    side: Side,
    frame: PeerFrame,
) {
    let peer = {
        let links = state.links();
        if !links.table.holds(link_id, side, conn_id) {
            return;
        }
        links
            .conn(links.table.attached(link_id, side.peer()))
            .cloned()
    };
    let Some(peer) = peer else {
        debug!(link = %link_id.fmt_short(), "peer frame dropped: peer absent");
        return;
    };
    match &frame {
        PeerFrame::Handshake(b) => state.tap(b),
        PeerFrame::Sealed { ciphertext, .. } => state.tap(ciphertext),
        PeerFrame::NoSession => {}
    }
    let frames = match state.adversary.get() {
        Some(adversary) => adversary.peer_frame(link_id, side, frame),
        None => vec![frame],
    };
    for frame in frames {
        // A full queue here is the sender's doing (it floods its peer), so
        // the frame is dropped rather than the peer disconnected; senders
        // retry.
        if peer
            .ctl
            .try_send(RelayToAgent::Peer { link_id, frame }, state.control_room())
            .is_err()
        {
            debug!(link = %link_id.fmt_short(), "peer frame dropped: peer's control queue is full");
        }
    }
}
