//! Accepting connections: the unauthenticated limit, the QUIC handshake,
//! the agent's signed `Hello` and the connection limit.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use comsat_protocol::msg::{AgentToRelay, ControlMessage, FrameDecoder, FrameError, verify_hello};
use comsat_protocol::{CLOSE_REFUSED, HELLO_EXPORTER_LABEL, HELLO_EXPORTER_LEN, NodeId};
use tokio::time::Instant;
use tracing::{Instrument, debug, info, info_span, warn};

use super::control::serve_connection;
use super::{Place, SourcePlace, State};
use crate::defaults;

/// New connections waiting for a place among the unauthenticated ones,
/// oldest first (see [`accept_loop`]).
type Waiting = VecDeque<(quinn::Incoming, Instant)>;

pub(super) async fn accept_loop(state: Arc<State>, endpoint: quinn::Endpoint) {
    // When every unauthenticated place is taken (a fleet reconnecting at
    // once after a restart), a new connection waits for one, up to
    // `defaults::ACCEPT_WAIT` and `defaults::MAX_WAITING` of them, rather
    // than being refused at once: its agent would only come back later,
    // and a refused storm keeps refusing. Each waits as its Initial packet
    // (the client resends it meanwhile); strangers' spoofed Initials never
    // get here under load, they get a Retry first.
    let mut waiting = Waiting::new();
    loop {
        admit_waiting(&state, &mut waiting);
        let oldest = waiting.front().map(|(_, at)| *at + defaults::ACCEPT_WAIT);
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                if let Some(incoming) = new_incoming(&state, incoming)
                    && let Some(incoming) = admit(&state, incoming)
                {
                    if waiting.len() < defaults::MAX_WAITING {
                        waiting.push_back((incoming, Instant::now()));
                    } else {
                        state.metrics.auth_failure("too_many_unauthenticated");
                        incoming.refuse();
                    }
                }
            }
            () = state.unauthenticated.freed(), if !waiting.is_empty() => {}
            () = sleep_until(oldest), if oldest.is_some() => {}
        }
    }
    for (incoming, _) in waiting {
        incoming.refuse();
    }
}

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
    }
}

/// Counts a new connection and, under load, answers it with a Retry
/// (stateless: spoofed Initials then cost one packet each, and no place
/// among the unauthenticated); `None` once it is dealt with.
fn new_incoming(state: &State, incoming: quinn::Incoming) -> Option<quinn::Incoming> {
    state.metrics.connections_total.increment(1);
    let limits = state.limits();
    if state.unauthenticated.current() >= limits.retry_above
        && !incoming.remote_address_validated()
        && incoming.may_retry()
    {
        match incoming.retry() {
            Ok(()) => {
                state.metrics.retries.increment(1);
                return None;
            }
            Err(e) => return Some(e.into_incoming()),
        }
    }
    Some(incoming)
}

/// Gives the connections waiting the places freed since, oldest first;
/// refuses those that waited too long.
fn admit_waiting(state: &Arc<State>, waiting: &mut Waiting) {
    while let Some((incoming, at)) = waiting.pop_front() {
        if at.elapsed() >= defaults::ACCEPT_WAIT {
            state.metrics.auth_failure("too_many_unauthenticated");
            incoming.refuse();
            continue;
        }
        if let Some(incoming) = admit(state, incoming) {
            waiting.push_front((incoming, at));
            return;
        }
    }
}

/// Starts authenticating `incoming` if its source and the relay have an
/// unauthenticated place for it (over its source's share it is refused);
/// gives it back when every place is taken.
fn admit(state: &Arc<State>, incoming: quinn::Incoming) -> Option<quinn::Incoming> {
    let limits = state.limits();
    let ip = incoming.remote_address().ip();
    let Some(from_source) = state
        .unauthenticated_by_source
        .try_enter(ip, limits.max_unauthenticated_per_source)
    else {
        state.metrics.auth_failure("too_many_from_source");
        incoming.refuse();
        return None;
    };
    let Some(place) = state.unauthenticated.try_enter(limits.max_unauthenticated) else {
        return Some(incoming);
    };
    tokio::spawn(handle_incoming(
        state.clone(),
        incoming,
        (place, from_source),
    ));
    None
}

fn refuse(state: &State, conn: &quinn::Connection, reason: &'static str) {
    state.metrics.auth_failure(reason);
    debug!(reason, "connection refused");
    conn.close(CLOSE_REFUSED.into(), b"refused");
}

/// Authenticates a new connection, then serves it. `unauthenticated` is
/// this connection's place among the unauthenticated ones (in all, and of
/// its source), given back as soon as it has authenticated (or failed to).
///
/// Until its `Hello` is verified a connection may open one stream (its
/// control stream) and make the relay buffer at most
/// [`defaults::PRE_HELLO_WINDOW`] bytes; then it gets the configured
/// windows and stream credit.
async fn handle_incoming(
    state: Arc<State>,
    incoming: quinn::Incoming,
    unauthenticated: (Place, SourcePlace),
) {
    let limits = state.limits();
    let deadline = Instant::now() + limits.auth_timeout();
    let conn = match tokio::time::timeout_at(deadline, incoming).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            debug!(error = %e, "handshake failed");
            state.metrics.auth_failure("handshake");
            return;
        }
        Err(_) => {
            state.metrics.auth_failure("timeout");
            return;
        }
    };
    // An agent sends its Hello as soon as the handshake is done.
    let deadline = deadline.min(Instant::now() + limits.hello_timeout());
    let authed = tokio::time::timeout_at(deadline, authenticate(&state, &conn)).await;
    drop(unauthenticated);
    let (node_id, send, decoder, recv) = match authed {
        Ok(Ok(ok)) => ok,
        Ok(Err(reason)) => return refuse(&state, &conn, reason),
        Err(_) => return refuse(&state, &conn, "timeout"),
    };
    let Some(permit) = state.connections.try_enter(limits.max_connections) else {
        return refuse(&state, &conn, "too_many_connections");
    };
    // Known now: the windows and the first flow-stream credit.
    conn.set_receive_window(limits.connection_receive_window.into());
    let credit = limits
        .max_streams_per_connection
        .min(defaults::INITIAL_STREAMS_PER_CONNECTION);
    conn.set_max_concurrent_bi_streams(credit.saturating_add(1).into());
    let conn_id = state.next_conn_id.fetch_add(1, Ordering::Relaxed);
    let ip = conn.remote_address().ip();
    let Some((node_place, elsewhere)) =
        state
            .by_node
            .try_enter(node_id, conn_id, ip, limits.max_connections_per_node)
    else {
        return refuse(&state, &conn, "too_many_for_node");
    };
    if let Some(other) = elsewhere {
        // Policy: both are served, and each link side goes to its newest
        // attachment (the one it replaces is closed), so a copied key and
        // its original keep taking links from each other; an agent that
        // moved networks is simply back, its old path closing.
        state.metrics.node_clones.increment(1);
        crate::links::lock(&state.clones).push(comsat_protocol::api::NodeClone {
            node_id,
            source: ip.to_string(),
            other_source: other.to_string(),
            at: crate::grants::unix_now(),
        });
        warn!(node = %node_id, %ip, other_source = %other, "one node key is connected from two sources at once: a copied key, or an agent that moved networks");
    }
    let span = info_span!("conn", id = conn_id, node = %node_id.fmt_short());
    async move {
        info!("agent connected");
        state.metrics.connections_open.increment(1.0);
        state.wire.open(conn_id, &conn);
        serve_connection(&state, conn_id, node_id, conn, send, recv, decoder).await;
        state.wire.close(conn_id);
        state.metrics.connections_open.decrement(1.0);
        drop(permit);
        drop(node_place);
        info!("agent disconnected");
    }
    .instrument(span)
    .await;
}

type Authenticated = (NodeId, quinn::SendStream, FrameDecoder, quinn::RecvStream);

async fn authenticate(
    state: &State,
    conn: &quinn::Connection,
) -> Result<Authenticated, &'static str> {
    let (send, mut recv) = conn.accept_bi().await.map_err(|_| "protocol")?;
    // Until the Hello verifies, the stream is reset rather than finished if
    // it is dropped (a refusal, or the Hello timeout), so the agent never
    // reads a clean end where the refusal code belongs.
    let send = ResetOnDrop(Some(send));
    let mut decoder = FrameDecoder::new();
    let hello = read_message::<AgentToRelay>(&mut recv, &mut decoder)
        .await
        .map_err(|_| "protocol")?
        .ok_or("protocol")?;
    let AgentToRelay::Hello { node_id, signature } = hello else {
        return Err("protocol");
    };
    let grants = state.grants.snapshot();
    let key = grants.node_key(&node_id).ok_or("unknown_node")?;
    let mut exporter = [0u8; HELLO_EXPORTER_LEN];
    conn.export_keying_material(&mut exporter, HELLO_EXPORTER_LABEL, b"")
        .map_err(|_| "protocol")?;
    if !verify_hello(&node_id, &signature, key, &exporter) {
        return Err("bad_signature");
    }
    Ok((node_id, send.take(), decoder, recv))
}

/// A control stream not yet authenticated: reset on drop, with the refusal
/// code, unless [`ResetOnDrop::take`]n. quinn finishes a dropped stream, and
/// that end could reach the agent before the connection's close.
struct ResetOnDrop(Option<quinn::SendStream>);

impl ResetOnDrop {
    fn take(mut self) -> quinn::SendStream {
        self.0.take().expect("taken once")
    }
}

impl Drop for ResetOnDrop {
    fn drop(&mut self) {
        if let Some(mut send) = self.0.take() {
            // Already closed or reset: nothing more to say on it.
            let _ = send.reset(CLOSE_REFUSED.into());
        }
    }
}

/// Why a control stream could not be read.
#[derive(Debug, thiserror::Error)]
pub(super) enum ReadError {
    /// The agent sent bytes that are no control message.
    #[error("undecodable control message: {0}")]
    Decode(#[from] FrameError),
    /// The stream failed (reset, or its connection was lost).
    #[error("control stream failed: {0}")]
    Stream(#[from] quinn::ReadError),
    /// The agent finished the stream half way through a message.
    #[error("stream ended inside a frame")]
    Truncated,
}

/// Reads the next control message: `Ok(None)` at a clean end of stream.
pub(super) async fn read_message<M: ControlMessage>(
    recv: &mut quinn::RecvStream,
    decoder: &mut FrameDecoder,
) -> Result<Option<M>, ReadError> {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(msg) = decoder.next_message::<M>()? {
            return Ok(Some(msg));
        }
        match recv.read(&mut buf).await? {
            Some(n) => decoder.extend(&buf[..n]),
            None if decoder.has_partial() => return Err(ReadError::Truncated),
            None => return Ok(None),
        }
    }
}
