//! Flow streams: each new stream of an attached connection is routed to
//! its link's peer (parked while the peer is away) and spliced with a twin
//! stream there, both ways.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use comsat_protocol::quantum::Quantum;
use comsat_protocol::record::{FLOW_HEADER_LEN, FlowHeader};
use comsat_protocol::{FlowId, Side, StreamCode};
use tracing::{Instrument, debug, info_span};

use super::State;
use super::park::{park, route};
use crate::adversary::{Tamper, Tampered};
use crate::defaults;
use crate::links::{FlowCounts, LinkStats, Throttle, lock};
use crate::table::Role;

/// One open stream of a flow, counted in its link's [`FlowCounts`] until
/// dropped.
struct FlowGuard {
    counts: FlowCounts,
    id: FlowId,
}

impl FlowGuard {
    /// Counts a stream of flow `id`; `None` if it is a new flow and the
    /// link already has `limit` flows open.
    fn enter(counts: &FlowCounts, id: FlowId, limit: Option<u32>) -> Option<Self> {
        let mut c = lock(counts);
        if !c.contains_key(&id) && limit.is_some_and(|max| c.len() >= max as usize) {
            return None;
        }
        *c.entry(id).or_insert(0) += 1;
        Some(Self {
            counts: counts.clone(),
            id,
        })
    }
}

impl Drop for FlowGuard {
    fn drop(&mut self) {
        let mut c = lock(&self.counts);
        if let Some(n) = c.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                c.remove(&self.id);
            }
        }
    }
}

pub(super) async fn accept_flows(state: Arc<State>, conn_id: u64, conn: quinn::Connection) {
    let open = Arc::new(AtomicU64::new(0));
    // As the transport config the connection was accepted with says.
    let mut credit = u64::from(
        state
            .limits()
            .max_streams_per_connection
            .min(defaults::INITIAL_STREAMS_PER_CONNECTION),
    );
    while let Ok((send, recv)) = conn.accept_bi().await {
        let now = open.fetch_add(1, Ordering::Relaxed) + 1;
        credit = grow_stream_credit(
            &conn,
            now,
            credit,
            state.limits().max_streams_per_connection,
        );
        let (state, open) = (state.clone(), open.clone());
        tokio::spawn(async move {
            splice_flow(state, conn_id, send, recv).await;
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Doubles an agent's flow-stream credit (up to `max`) once `open` flows
/// use three quarters of it; returns the credit in force.
fn grow_stream_credit(conn: &quinn::Connection, open: u64, credit: u64, max: u32) -> u64 {
    let max = u64::from(max);
    if open * 4 < credit * 3 || credit >= max {
        return credit;
    }
    let grown = (credit * 2).min(max);
    // The control stream keeps its own place.
    conn.set_max_concurrent_bi_streams(
        quinn::VarInt::from_u64(grown + 1).unwrap_or(quinn::VarInt::MAX),
    );
    grown
}

async fn splice_flow(
    state: Arc<State>,
    conn_id: u64,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let mut header = [0u8; FLOW_HEADER_LEN];
    let read = tokio::time::timeout(defaults::FLOW_HEADER_TIMEOUT, recv.read_exact(&mut header));
    let parsed = match read.await {
        Ok(Ok(())) => FlowHeader::decode(&header).ok().flatten(),
        _ => None,
    };
    let refuse_stream = |send: &mut quinn::SendStream, recv: &mut quinn::RecvStream| {
        state.metrics.flows_refused.increment(1);
        let _ = send.reset(StreamCode::Refused.code().into());
        let _ = recv.stop(StreamCode::Refused.code().into());
    };
    let Some((flow, _)) = parsed else {
        return refuse_stream(&mut send, &mut recv);
    };
    // The flow's link must be attached on this connection.
    let Some(mut route) = route(&state, conn_id, flow.link_id) else {
        return refuse_stream(&mut send, &mut recv);
    };
    let Some(_counted) = FlowGuard::enter(&route.stats.flows, flow.flow_id, route.max_flows) else {
        state.metrics.flows_over_limit.increment(1);
        route.stats.refused_max_flows();
        debug!(link = %flow.link_id.fmt_short(), limit = ?route.max_flows, "flow refused: the link's max_flows are open");
        let _ = send.reset(StreamCode::FlowLimit.code().into());
        let _ = recv.stop(StreamCode::FlowLimit.code().into());
        return;
    };
    if route.role == Role::Lane {
        state.metrics.lane_flows.increment(1);
    }
    let span = info_span!("flow", link = %flow.link_id.fmt_short(), id = flow.flow_id);
    async {
        let (peer_conn, parked) = match route.peer.take() {
            Some(peer) => (peer, None),
            None => match park(&state, flow.link_id, &mut route, &mut recv).await {
                Some((peer, parked)) => (peer, Some(parked)),
                None => return refuse_stream(&mut send, &mut recv),
            },
        };
        let Ok((mut peer_send, peer_recv)) = peer_conn.open_bi().await else {
            return refuse_stream(&mut send, &mut recv);
        };
        if peer_send.write_all(&header).await.is_err() {
            return refuse_stream(&mut send, &mut recv);
        }
        let (mut forward_tamper, backward_tamper) = state
            .adversary
            .get()
            .and_then(|a| a.flow(flow.link_id, flow.flow_id, route.side))
            .unzip();
        let mut finished = false;
        if let Some(parked) = parked {
            debug!(bytes = parked.held.bytes, "delivering parked flow");
            for chunk in parked.chunks.iter().cloned() {
                state.metrics.forwarded_bytes.increment(chunk.len() as u64);
                route.stats.add_bytes(route.side, chunk.len() as u64);
                let (chunks, then) = tampered(forward_tamper.as_mut(), chunk);
                match then {
                    Then::Reset => return refuse_stream(&mut send, &mut recv),
                    Then::Wait(wait) => tokio::time::sleep(wait).await,
                    Then::Go | Then::Finish => {}
                }
                for chunk in chunks {
                    if peer_send.write_chunk(chunk).await.is_err() {
                        return refuse_stream(&mut send, &mut recv);
                    }
                }
                if then == Then::Finish {
                    let _ = recv.stop(StreamCode::Refused.code().into());
                    finished = true;
                    break;
                }
            }
            finished |= parked.finished;
        }
        state.metrics.flows_total.increment(1);
        state.metrics.flows_open.increment(1.0);
        debug!("flow spliced");
        let (side, stats) = (route.side, route.stats.clone());
        let forward = async {
            if finished {
                if let Some(t) = forward_tamper.as_mut() {
                    for chunk in t.finish() {
                        let _ = peer_send.write_chunk(chunk).await;
                    }
                }
                let _ = peer_send.finish();
                let _ = peer_send.stopped().await;
            } else {
                pump(&state, &stats, side, (recv, peer_send), forward_tamper).await;
            }
        };
        let backward = pump(
            &state,
            &stats,
            side.peer(),
            (peer_recv, send),
            backward_tamper,
        );
        tokio::select! {
            _ = async { tokio::join!(forward, backward) } => {}
            _ = route.revoked.wait_for(|r| *r) => debug!("flow stopped: link revoked"),
        }
        state.metrics.flows_open.decrement(1.0);
        debug!("flow ended");
    }
    .instrument(span)
    .await;
}

/// Copies one direction of a flow (sent by side `from_side`), chunk by
/// chunk, without copying bytes: QUIC flow control bounds what is buffered
/// on either side. A rate-limited link waits before forwarding each chunk;
/// meanwhile nothing more is read, so the sender is slowed, never dropped.
/// A test's adversary (`tamper`) sees each chunk first.
async fn pump(
    state: &State,
    stats: &LinkStats,
    from_side: Side,
    (mut from, mut to): (quinn::RecvStream, quinn::SendStream),
    mut tamper: Option<Box<dyn Tamper>>,
) {
    let throttle: &Throttle = stats.throttle(from_side);
    let mut frames: Vec<Bytes> = Vec::new();
    let mut quantum = Quantum::default();
    loop {
        match read_joined(&mut from, throttle.chunk(), &mut frames).await {
            Ok(Some(chunk)) => {
                let n = chunk.len();
                let wait = throttle.delay(n, tokio::time::Instant::now());
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                    stats.add_throttled(wait);
                    state
                        .throttled_ns
                        .fetch_add(wait.as_nanos() as u64, Ordering::Relaxed);
                }
                state.metrics.forwarded_bytes.increment(n as u64);
                stats.add_bytes(from_side, n as u64);
                state.tap(&chunk);
                let (chunks, then) = tampered(tamper.as_mut(), chunk);
                match then {
                    Then::Reset => {
                        let _ = to.reset(StreamCode::Refused.code().into());
                        let _ = from.stop(StreamCode::Refused.code().into());
                        return;
                    }
                    Then::Wait(wait) => tokio::time::sleep(wait).await,
                    Then::Go | Then::Finish => {}
                }
                for chunk in chunks {
                    if let Err(e) = to.write_chunk(chunk).await {
                        let lost = match &e {
                            quinn::WriteError::ConnectionLost(c) => Some(c),
                            _ => None,
                        };
                        let _ = from.stop(end_code(lost));
                        return;
                    }
                }
                if then == Then::Finish {
                    let _ = from.stop(StreamCode::Refused.code().into());
                    let _ = to.finish();
                    let _ = to.stopped().await;
                    return;
                }
                if quantum.spend(n) {
                    tokio::task::yield_now().await;
                }
            }
            Ok(None) => {
                for chunk in tamper.as_mut().map(|t| t.finish()).unwrap_or_default() {
                    let _ = to.write_chunk(chunk).await;
                }
                let _ = to.finish();
                // Wait until the peer has the data or went away, so the
                // stream is not torn down under it.
                let _ = to.stopped().await;
                return;
            }
            Err(e) => {
                let lost = match &e {
                    quinn::ReadError::ConnectionLost(c) => Some(c),
                    _ => None,
                };
                let _ = to.reset(end_code(lost));
                return;
            }
        }
    }
}

/// What a spliced stream does after a test's adversary saw a chunk.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Then {
    Go,
    Wait(Duration),
    Finish,
    Reset,
}

/// The chunks to forward instead of `chunk`, and what then. Without an
/// adversary (always, outside tests): `chunk` itself, allocating nothing.
fn tampered(
    tamper: Option<&mut Box<dyn Tamper>>,
    chunk: Bytes,
) -> (impl Iterator<Item = Bytes>, Then) {
    let (one, many, then) = match tamper {
        None => (Some(chunk), Vec::new(), Then::Go),
        Some(t) => match t.chunk(chunk) {
            Tampered::Forward(chunks) => (None, chunks, Then::Go),
            Tampered::Finish(chunks) => (None, chunks, Then::Finish),
            Tampered::Delay(wait, chunks) => (None, chunks, Then::Wait(wait)),
            Tampered::Reset => (None, Vec::new(), Then::Reset),
        },
    };
    (one.into_iter().chain(many), then)
}

/// Reads what a stream has for us: waits for at least one chunk, then
/// takes every chunk already received (up to [`defaults::SPLICE_JOIN_FRAMES`])
/// and joins them into one, so the outgoing stream holds few large chunks
/// instead of many datagram-sized ones. A rate-limited link (`max` below
/// [`defaults::SPLICE_CHUNK`]) reads one chunk of at most `max` bytes.
pub(super) async fn read_joined(
    from: &mut quinn::RecvStream,
    max: usize,
    frames: &mut Vec<Bytes>,
) -> Result<Option<Bytes>, quinn::ReadError> {
    if max < defaults::SPLICE_CHUNK {
        return Ok(from.read_chunk(max, true).await?.map(|c| c.bytes));
    }
    frames.resize(defaults::SPLICE_JOIN_FRAMES, Bytes::new());
    let Some(n) = from.read_chunks(frames).await? else {
        return Ok(None);
    };
    let got = &mut frames[..n];
    if let [one] = got {
        return Ok(Some(std::mem::take(one)));
    }
    let mut joined = BytesMut::with_capacity(got.iter().map(Bytes::len).sum());
    for frame in got.iter_mut() {
        joined.extend_from_slice(frame);
        *frame = Bytes::new();
    }
    Ok(Some(joined.freeze()))
}

/// The code with which one side of a spliced flow is ended when the other
/// side's stream fails: [`StreamCode::PeerSilent`] when that side's connection
/// timed out (the outage began an idle timeout ago), else [`StreamCode::Refused`].
fn end_code(lost: Option<&quinn::ConnectionError>) -> quinn::VarInt {
    match lost {
        Some(quinn::ConnectionError::TimedOut) => StreamCode::PeerSilent.code().into(),
        _ => StreamCode::Refused.code().into(),
    }
}
