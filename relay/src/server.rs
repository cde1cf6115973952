//! The QUIC server: authentication, pairing and splicing.
//!
//! One task per agent connection reads its control stream; one task per
//! flow splices the agent's stream with its twin on the peer's connection.
//! The pairing table is a plain mutex-guarded map, never held across an
//! `await`.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use comsat_protocol::msg::{
    AgentToRelay, ControlMessage, ErrorCode, FrameDecoder, PeerFrame, RelayToAgent, verify_hello,
};
use comsat_protocol::record::{FLOW_HEADER_LEN, FlowHeader};
use comsat_protocol::{
    CLOSE_NORMAL, CLOSE_PROTOCOL_ERROR, CLOSE_REFUSED, FlowId, HELLO_EXPORTER_LABEL,
    HELLO_EXPORTER_LEN, LinkId, NodeId, STREAM_FLOW_LIMIT, STREAM_PEER_SILENT, Side,
};
use tokio::sync::{Semaphore, mpsc, watch};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::config::RelayConfig;
use crate::defaults;
use crate::error::RelayError;
use crate::grants::{DirGrantSource, GrantSource, GrantStore, unix_now};
use crate::metrics::Metrics;

/// Stream error code: the flow was refused or its link went away.
const STREAM_REFUSED: u32 = 1;

#[derive(Clone)]
struct Attachment {
    conn_id: u64,
    conn: quinn::Connection,
    ctl: mpsc::Sender<RelayToAgent>,
}

struct LinkSlot {
    a: Option<Attachment>,
    b: Option<Attachment>,
    /// Flips to `true` when the link is revoked: its flows stop.
    revoked: watch::Sender<bool>,
    /// Bumped whenever a side attaches: parked flows look for their peer.
    pair: watch::Sender<u64>,
    /// Bytes held for this link's parked flows.
    buffered: Arc<AtomicU64>,
    /// The link's open flows.
    flows: FlowCounts,
}

/// Open streams per flow id of a link: a flow counts once, however many
/// streams (resumptions) carry it.
type FlowCounts = Arc<Mutex<HashMap<FlowId, u32>>>;

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

impl LinkSlot {
    fn new() -> Self {
        Self {
            a: None,
            b: None,
            revoked: watch::channel(false).0,
            pair: watch::channel(0).0,
            buffered: Arc::default(),
            flows: Arc::default(),
        }
    }

    fn side_mut(&mut self, side: Side) -> &mut Option<Attachment> {
        match side {
            Side::A => &mut self.a,
            Side::B => &mut self.b,
        }
    }

    /// Whether `side` is attached on connection `conn_id`.
    fn held_by(&self, side: Side, conn_id: u64) -> bool {
        self.side(side)
            .as_ref()
            .is_some_and(|a| a.conn_id == conn_id)
    }

    fn side(&self, side: Side) -> &Option<Attachment> {
        match side {
            Side::A => &self.a,
            Side::B => &self.b,
        }
    }
}

struct State {
    config: RelayConfig,
    grants: GrantStore,
    links: Mutex<HashMap<LinkId, LinkSlot>>,
    metrics: Metrics,
    unauthenticated: Arc<Semaphore>,
    connections: Arc<Semaphore>,
    next_conn_id: AtomicU64,
    tap: Option<Mutex<std::fs::File>>,
    /// Bytes held for parked flows, all links together.
    buffered: AtomicU64,
    /// The served certificate, reloaded when its file changes.
    cert: Arc<crate::tls::CertSlot>,
}

/// Locks `m`, going on with the data of a thread that panicked holding it
/// (every critical section here leaves the data consistent).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl State {
    fn links(&self) -> std::sync::MutexGuard<'_, HashMap<LinkId, LinkSlot>> {
        lock(&self.links)
    }

    fn tap(&self, bytes: &[u8]) {
        if let Some(tap) = &self.tap {
            let _ = lock(tap).write_all(bytes);
        }
    }
}

/// A bound relay, ready to [`Relay::run`].
pub struct Relay {
    endpoint: quinn::Endpoint,
    state: Arc<State>,
    source: Box<dyn GrantSource>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("relay_id", &self.state.config.relay_id)
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// Loads the certificate and the grants (from `config.grants_dir`) and
    /// binds the UDP socket.
    pub fn bind(config: RelayConfig) -> Result<Self, RelayError> {
        let source = Box::new(DirGrantSource::new(config.grants_dir.clone()));
        Self::bind_with_source(config, source)
    }

    /// Like [`Self::bind`], with grants from `source`.
    pub fn bind_with_source(
        config: RelayConfig,
        mut source: Box<dyn GrantSource>,
    ) -> Result<Self, RelayError> {
        let cert = crate::tls::CertSlot::load(&config.tls_cert, &config.tls_key)?;
        let server = crate::tls::server_config(&config, cert.clone())?;
        let metrics = Metrics::new();
        let grants = GrantStore::new(config.relay_id, config.authority_public_key);
        let initial = source.poll(&metrics).map_err(|e| RelayError::Config {
            path: config.grants_dir.clone(),
            reason: format!("cannot read {}: {e}", source.describe()),
        })?;
        grants.replace(initial.unwrap_or_default(), &metrics);
        let tap = match &config.dangerous_tap_file {
            Some(path) => Some(Mutex::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| RelayError::Io {
                        path: path.clone(),
                        source,
                    })?,
            )),
            None => None,
        };
        let bind_error = |source| RelayError::Bind {
            addr: config.listen,
            source,
        };
        let socket = crate::udp::bind(config.listen).map_err(bind_error)?;
        let runtime = quinn::default_runtime()
            .ok_or_else(|| bind_error(std::io::Error::other("no async runtime")))?;
        let endpoint = quinn::Endpoint::new(
            crate::tls::endpoint_config(&config)?,
            Some(server),
            socket,
            runtime,
        )
        .map_err(bind_error)?;
        let state = Arc::new(State {
            unauthenticated: Arc::new(Semaphore::new(config.limits.max_unauthenticated)),
            connections: Arc::new(Semaphore::new(config.limits.max_connections)),
            config,
            grants,
            links: Mutex::default(),
            metrics,
            next_conn_id: AtomicU64::new(1),
            tap,
            buffered: AtomicU64::new(0),
            cert,
        });
        Ok(Self {
            endpoint,
            state,
            source,
        })
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// A function reporting the relay's load (for controller heartbeats).
    pub fn load_probe(
        &self,
    ) -> impl Fn() -> comsat_protocol::api::RelayLoad + Send + Sync + 'static {
        let state = self.state.clone();
        move || comsat_protocol::api::RelayLoad {
            connections: (state.config.limits.max_connections
                - state.connections.available_permits()) as u64,
            links: state.grants.snapshot().len() as u64,
            buffered_bytes: state.buffered.load(Ordering::Relaxed),
        }
    }

    /// Whether the relay is serving (what `/readyz` reports). A bound
    /// relay has loaded its grants ([`Self::bind`] fails otherwise) and
    /// serves until it stops.
    pub fn readiness(&self) -> impl Fn() -> bool + Send + Sync + 'static {
        || true
    }

    /// Serves until `shutdown` completes, then closes every connection.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), RelayError> {
        let state = self.state.clone();
        let watcher = tokio::spawn(watch_grants(state.clone(), self.source));
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    state.metrics.connections_total.increment(1);
                    match state.unauthenticated.clone().try_acquire_owned() {
                        Ok(permit) => {
                            let state = state.clone();
                            tokio::spawn(handle_incoming(state, incoming, permit));
                        }
                        Err(_) => {
                            state.metrics.auth_failure("too_many_unauthenticated");
                            incoming.refuse();
                        }
                    }
                }
            }
        }
        watcher.abort();
        info!("relay shutting down");
        self.endpoint.close(CLOSE_NORMAL.into(), b"shutdown");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        Ok(())
    }
}

async fn watch_grants(state: Arc<State>, mut source: Box<dyn GrantSource>) {
    let mut tick = tokio::time::interval(defaults::GRANT_POLL_INTERVAL);
    loop {
        tick.tick().await;
        state.cert.reload_if_changed();
        let files = match source.poll(&state.metrics) {
            Ok(Some(files)) => files,
            Ok(None) => continue,
            Err(e) => {
                warn!(source = %source.describe(), error = %e, "cannot read grants; keeping the current ones");
                continue;
            }
        };
        let changed = state.grants.replace(files, &state.metrics);
        info!(grants = state.grants.snapshot().len(), "grants reloaded");
        for link in changed {
            revoke(&state, link);
        }
    }
}

/// Tears down a link whose grant went away or changed: both sides are told,
/// its flows stop.
fn revoke(state: &State, link_id: LinkId) {
    let slot = state.links().remove(&link_id);
    let Some(slot) = slot else { return };
    info!(link = %link_id.fmt_short(), "link revoked");
    let _ = slot.revoked.send(true);
    if slot.a.is_some() && slot.b.is_some() {
        state.metrics.links_paired.decrement(1.0);
    }
    for att in [slot.a, slot.b].into_iter().flatten() {
        let _ = att.ctl.try_send(RelayToAgent::Error {
            link_id,
            code: ErrorCode::Revoked,
        });
    }
}

fn refuse(state: &State, conn: &quinn::Connection, reason: &'static str) {
    state.metrics.auth_failure(reason);
    debug!(reason, "connection refused");
    conn.close(CLOSE_REFUSED.into(), b"refused");
}

/// Authenticates a new connection, then serves it. `unauthenticated` is
/// this connection's place among the unauthenticated ones, given back as
/// soon as it has authenticated (or failed to).
async fn handle_incoming(
    state: Arc<State>,
    incoming: quinn::Incoming,
    unauthenticated: tokio::sync::OwnedSemaphorePermit,
) {
    let deadline = tokio::time::Instant::now() + state.config.limits.auth_timeout();
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
    let authed = tokio::time::timeout_at(deadline, authenticate(&state, &conn)).await;
    drop(unauthenticated);
    let (node_id, send, decoder, recv) = match authed {
        Ok(Ok(ok)) => ok,
        Ok(Err(reason)) => return refuse(&state, &conn, reason),
        Err(_) => return refuse(&state, &conn, "timeout"),
    };
    let Ok(permit) = state.connections.clone().try_acquire_owned() else {
        return refuse(&state, &conn, "too_many_connections");
    };
    let conn_id = state.next_conn_id.fetch_add(1, Ordering::Relaxed);
    let span = info_span!("conn", id = conn_id, node = %node_id.fmt_short());
    async move {
        info!("agent connected");
        state.metrics.connections_open.increment(1.0);
        serve_connection(&state, conn_id, node_id, conn, send, recv, decoder).await;
        state.metrics.connections_open.decrement(1.0);
        drop(permit);
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
    Ok((node_id, send, decoder, recv))
}

/// Reads the next control message: `Ok(None)` at a clean end of stream.
async fn read_message<M: ControlMessage>(
    recv: &mut quinn::RecvStream,
    decoder: &mut FrameDecoder,
) -> Result<Option<M>, String> {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(msg) = decoder.next_message::<M>().map_err(|e| e.to_string())? {
            return Ok(Some(msg));
        }
        match recv.read(&mut buf).await.map_err(|e| e.to_string())? {
            Some(n) => decoder.extend(&buf[..n]),
            None if decoder.has_partial() => return Err("stream ended inside a frame".into()),
            None => return Ok(None),
        }
    }
}

async fn write_control(mut send: quinn::SendStream, mut rx: mpsc::Receiver<RelayToAgent>) {
    let mut buf = Vec::new();
    while let Some(msg) = rx.recv().await {
        buf.clear();
        if msg.write_to(&mut buf).is_err() {
            continue;
        }
        while let Ok(more) = rx.try_recv() {
            let _ = more.write_to(&mut buf);
        }
        if send.write_all(&buf).await.is_err() {
            return;
        }
    }
    let _ = send.finish();
}

async fn serve_connection(
    state: &Arc<State>,
    conn_id: u64,
    node_id: NodeId,
    conn: quinn::Connection,
    send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    mut decoder: FrameDecoder,
) {
    let (ctl, rx) = mpsc::channel(defaults::CONTROL_QUEUE);
    let writer = tokio::spawn(write_control(send, rx));
    let _ = ctl.try_send(RelayToAgent::Welcome);
    let flows = tokio::spawn(accept_flows(state.clone(), conn_id, conn.clone()));
    let mut attached: HashSet<(LinkId, Side)> = HashSet::new();
    loop {
        let msg = tokio::select! {
            msg = read_message::<AgentToRelay>(&mut recv, &mut decoder) => msg,
            _ = conn.closed() => break,
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
        let ok = handle_control(state, conn_id, node_id, &conn, &ctl, &mut attached, msg);
        if !ok {
            conn.close(CLOSE_PROTOCOL_ERROR.into(), b"protocol error");
            break;
        }
    }
    for (link_id, side) in attached {
        detach(state, conn_id, link_id, side);
    }
    flows.abort();
    drop(ctl);
    let _ = writer.await;
}

/// Handles one control message; `false` closes the connection.
#[allow(clippy::too_many_arguments)]
fn handle_control(
    state: &State,
    conn_id: u64,
    node_id: NodeId,
    conn: &quinn::Connection,
    ctl: &mpsc::Sender<RelayToAgent>,
    attached: &mut HashSet<(LinkId, Side)>,
    msg: AgentToRelay,
) -> bool {
    match msg {
        AgentToRelay::Hello { .. } => false,
        AgentToRelay::Attach {
            link_id,
            generation,
            side,
        } => {
            let reply = attach(
                state, conn_id, conn, ctl, node_id, link_id, generation, side,
            );
            if reply.is_ok() {
                attached.insert((link_id, side));
            }
            send_or_close(
                ctl,
                conn,
                match reply {
                    Ok(()) => RelayToAgent::Attached { link_id },
                    Err(code) => RelayToAgent::Error { link_id, code },
                },
            );
            if reply.is_ok() {
                announce_pair(state, link_id);
            }
            true
        }
        AgentToRelay::Detach { link_id } => {
            let sides: Vec<_> = attached
                .iter()
                .filter(|(l, _)| *l == link_id)
                .copied()
                .collect();
            for key in sides {
                attached.remove(&key);
                detach(state, conn_id, key.0, key.1);
            }
            true
        }
        AgentToRelay::Peer { link_id, frame } => {
            let Some(&(_, side)) = attached.iter().find(|(l, _)| *l == link_id) else {
                send_or_close(
                    ctl,
                    conn,
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

fn send_or_close(ctl: &mpsc::Sender<RelayToAgent>, conn: &quinn::Connection, msg: RelayToAgent) {
    if ctl.try_send(msg).is_err() {
        warn!("agent is not reading its control stream; closing");
        conn.close(CLOSE_PROTOCOL_ERROR.into(), b"control stream stalled");
    }
}

#[allow(clippy::too_many_arguments)]
fn attach(
    state: &State,
    conn_id: u64,
    conn: &quinn::Connection,
    ctl: &mpsc::Sender<RelayToAgent>,
    node_id: NodeId,
    link_id: LinkId,
    generation: u64,
    side: Side,
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
        return refused("expired", ErrorCode::NotGranted);
    }
    let mut links = state.links();
    let slot = links.entry(link_id).or_insert_with(LinkSlot::new);
    let was_paired = slot.a.is_some() && slot.b.is_some();
    let old = slot.side_mut(side).replace(Attachment {
        conn_id,
        conn: conn.clone(),
        ctl: ctl.clone(),
    });
    if let Some(old) = old {
        if old.conn_id != conn_id {
            // The same node attached again from a new connection: the old
            // one is stale (a reconnect the old path has not noticed yet).
            debug!(link = %link_id.fmt_short(), "side re-attached from a new connection");
            old.conn
                .close(CLOSE_NORMAL.into(), b"superseded by a new connection");
        }
    }
    if !was_paired && slot.a.is_some() && slot.b.is_some() {
        state.metrics.links_paired.increment(1.0);
    }
    slot.pair.send_modify(|n| *n += 1);
    info!(link = %link_id.fmt_short(), %side, "attached");
    Ok(())
}

/// Tells both sides of a paired link that their peer is present.
fn announce_pair(state: &State, link_id: LinkId) {
    let pair = {
        let links = state.links();
        links
            .get(&link_id)
            .and_then(|s| Some((s.a.clone()?, s.b.clone()?)))
    };
    if let Some((a, b)) = pair {
        for att in [a, b] {
            send_or_close(&att.ctl, &att.conn, RelayToAgent::PeerPresent { link_id });
        }
    }
}

fn detach(state: &State, conn_id: u64, link_id: LinkId, side: Side) {
    let peer = {
        let mut links = state.links();
        let Some(slot) = links.get_mut(&link_id) else {
            return;
        };
        if !slot.held_by(side, conn_id) {
            return;
        }
        let was_paired = slot.a.is_some() && slot.b.is_some();
        *slot.side_mut(side) = None;
        if was_paired {
            state.metrics.links_paired.decrement(1.0);
        }
        let peer = slot.side(side.peer()).clone();
        if slot.a.is_none() && slot.b.is_none() {
            links.remove(&link_id);
        }
        peer
    };
    info!(link = %link_id.fmt_short(), %side, "detached");
    if let Some(peer) = peer {
        send_or_close(&peer.ctl, &peer.conn, RelayToAgent::PeerAbsent { link_id });
    }
}

fn forward_peer_frame(state: &State, conn_id: u64, link_id: LinkId, side: Side, frame: PeerFrame) {
    let peer = {
        let links = state.links();
        let Some(slot) = links.get(&link_id) else {
            return;
        };
        if !slot.held_by(side, conn_id) {
            return;
        }
        slot.side(side.peer()).clone()
    };
    let Some(peer) = peer else {
        debug!(link = %link_id.fmt_short(), "peer frame dropped: peer absent");
        return;
    };
    match &frame {
        PeerFrame::Handshake(b) => state.tap(b),
        PeerFrame::Sealed { ciphertext, .. } => state.tap(ciphertext),
    }
    // A full queue here is the sender's doing (it floods its peer), so the
    // frame is dropped rather than the peer disconnected; senders retry.
    if peer
        .ctl
        .try_send(RelayToAgent::Peer { link_id, frame })
        .is_err()
    {
        debug!(link = %link_id.fmt_short(), "peer frame dropped: peer's control queue is full");
    }
}

async fn accept_flows(state: Arc<State>, conn_id: u64, conn: quinn::Connection) {
    while let Ok((send, recv)) = conn.accept_bi().await {
        let state = state.clone();
        tokio::spawn(async move {
            splice_flow(state, conn_id, send, recv).await;
        });
    }
}

/// Bytes held by the relay for a parked flow, released on drop.
struct Held {
    bytes: u64,
    link: Arc<AtomicU64>,
    state: Arc<State>,
}

impl Held {
    fn add(&mut self, n: u64) {
        self.bytes += n;
        self.link.fetch_add(n, Ordering::Relaxed);
        let total = self.state.buffered.fetch_add(n, Ordering::Relaxed) + n;
        self.state.metrics.buffered_bytes.set(total as f64);
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.link.fetch_sub(self.bytes, Ordering::Relaxed);
        let total = self.state.buffered.fetch_sub(self.bytes, Ordering::Relaxed) - self.bytes;
        self.state.metrics.buffered_bytes.set(total as f64);
    }
}

/// A flow whose peer side is away: what the relay read of it so far.
struct Parked {
    chunks: Vec<bytes::Bytes>,
    finished: bool,
    held: Held,
}

/// Where a new flow stream goes.
struct Route {
    side: Side,
    peer: Option<quinn::Connection>,
    revoked: watch::Receiver<bool>,
    pair: watch::Receiver<u64>,
    link_buffered: Arc<AtomicU64>,
    buffer_limit: u64,
    flows: FlowCounts,
    /// The grant's concurrent-flow limit, as of now (an updated grant
    /// applies to the next flow).
    max_flows: Option<u32>,
}

fn route(state: &State, conn_id: u64, link_id: &LinkId) -> Option<Route> {
    let (buffer_limit, max_flows) = state
        .grants
        .snapshot()
        .link(link_id)
        .map_or((0, Some(0)), |g| (g.buffer_limit, g.limits.max_flows));
    let links = state.links();
    let slot = links.get(link_id)?;
    let side = [Side::A, Side::B]
        .into_iter()
        .find(|side| slot.held_by(*side, conn_id))?;
    Some(Route {
        side,
        peer: slot.side(side.peer()).as_ref().map(|p| p.conn.clone()),
        revoked: slot.revoked.subscribe(),
        pair: slot.pair.subscribe(),
        link_buffered: slot.buffered.clone(),
        buffer_limit,
        flows: slot.flows.clone(),
        max_flows,
    })
}

/// Holds a flow whose peer is away: reads it into memory while the link's
/// `buffer_limit` and the relay's budget allow (then stops reading, so QUIC
/// flow control pushes back on the sender), until the peer attaches.
/// `None` if the flow ended or the link went away meanwhile.
async fn park(
    state: &Arc<State>,
    link_id: LinkId,
    route: &mut Route,
    recv: &mut quinn::RecvStream,
) -> Option<(quinn::Connection, Parked)> {
    let mut parked = Parked {
        chunks: Vec::new(),
        finished: false,
        held: Held {
            bytes: 0,
            link: route.link_buffered.clone(),
            state: state.clone(),
        },
    };
    state.metrics.flows_parked.increment(1);
    debug!("flow parked: peer away");
    loop {
        let peer = {
            let links = state.links();
            links
                .get(&link_id)
                .and_then(|s| s.side(route.side.peer()).as_ref().map(|p| p.conn.clone()))
        };
        if let Some(peer) = peer {
            return Some((peer, parked));
        }
        let room = !parked.finished
            && route.link_buffered.load(Ordering::Relaxed) < route.buffer_limit
            && state.buffered.load(Ordering::Relaxed) < state.config.limits.buffer_budget;
        tokio::select! {
            changed = route.pair.changed() => {
                if changed.is_err() {
                    return None;
                }
            }
            _ = route.revoked.wait_for(|r| *r) => return None,
            chunk = recv.read_chunk(defaults::SPLICE_CHUNK, true), if room => match chunk {
                Ok(Some(c)) => {
                    parked.held.add(c.bytes.len() as u64);
                    state.tap(&c.bytes);
                    parked.chunks.push(c.bytes);
                }
                Ok(None) => parked.finished = true,
                Err(_) => return None,
            },
            () = tokio::time::sleep(defaults::PARK_RECHECK), if !room => {}
        }
    }
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
        let _ = send.reset(STREAM_REFUSED.into());
        let _ = recv.stop(STREAM_REFUSED.into());
    };
    let Some((flow, _)) = parsed else {
        return refuse_stream(&mut send, &mut recv);
    };
    // The flow's link must be attached on this connection.
    let Some(mut route) = route(&state, conn_id, &flow.link_id) else {
        return refuse_stream(&mut send, &mut recv);
    };
    let Some(_counted) = FlowGuard::enter(&route.flows, flow.flow_id, route.max_flows) else {
        state.metrics.flows_over_limit.increment(1);
        debug!(link = %flow.link_id.fmt_short(), limit = ?route.max_flows, "flow refused: the link's max_flows are open");
        let _ = send.reset(STREAM_FLOW_LIMIT.into());
        let _ = recv.stop(STREAM_FLOW_LIMIT.into());
        return;
    };
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
        let mut finished = false;
        if let Some(parked) = parked {
            debug!(bytes = parked.held.bytes, "delivering parked flow");
            for chunk in parked.chunks.iter().cloned() {
                state.metrics.forwarded_bytes.increment(chunk.len() as u64);
                if peer_send.write_chunk(chunk).await.is_err() {
                    return refuse_stream(&mut send, &mut recv);
                }
            }
            finished = parked.finished;
        }
        state.metrics.flows_total.increment(1);
        state.metrics.flows_open.increment(1.0);
        debug!("flow spliced");
        let forward = async {
            if finished {
                let _ = peer_send.finish();
                let _ = peer_send.stopped().await;
            } else {
                pump(&state, recv, peer_send).await;
            }
        };
        tokio::select! {
            _ = async { tokio::join!(forward, pump(&state, peer_recv, send)) } => {}
            _ = route.revoked.wait_for(|r| *r) => debug!("flow stopped: link revoked"),
        }
        state.metrics.flows_open.decrement(1.0);
        debug!("flow ended");
    }
    .instrument(span)
    .await;
}

/// Copies one direction of a flow, chunk by chunk, without copying bytes:
/// QUIC flow control bounds what is buffered on either side.
async fn pump(state: &State, mut from: quinn::RecvStream, mut to: quinn::SendStream) {
    loop {
        match from.read_chunk(defaults::SPLICE_CHUNK, true).await {
            Ok(Some(chunk)) => {
                state
                    .metrics
                    .forwarded_bytes
                    .increment(chunk.bytes.len() as u64);
                state.tap(&chunk.bytes);
                if let Err(e) = to.write_chunk(chunk.bytes).await {
                    let lost = match &e {
                        quinn::WriteError::ConnectionLost(c) => Some(c),
                        _ => None,
                    };
                    let _ = from.stop(end_code(lost));
                    return;
                }
            }
            Ok(None) => {
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

/// The code with which one side of a spliced flow is ended when the other
/// side's stream fails: `STREAM_PEER_SILENT` when that side's connection
/// timed out (the outage began an idle timeout ago), else `STREAM_REFUSED`.
fn end_code(lost: Option<&quinn::ConnectionError>) -> quinn::VarInt {
    match lost {
        Some(quinn::ConnectionError::TimedOut) => STREAM_PEER_SILENT.into(),
        _ => STREAM_REFUSED.into(),
    }
}
