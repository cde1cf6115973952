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
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use comsat_protocol::msg::{
    AgentToRelay, ControlMessage, ErrorCode, FrameDecoder, PeerFrame, RelayToAgent, verify_hello,
};
use comsat_protocol::quantum::Quantum;
use comsat_protocol::record::{FLOW_HEADER_LEN, FlowHeader};
use comsat_protocol::{
    CLOSE_NORMAL, CLOSE_PROTOCOL_ERROR, CLOSE_REFUSED, FlowId, HELLO_EXPORTER_LABEL,
    HELLO_EXPORTER_LEN, LinkId, NodeId, STREAM_FLOW_LIMIT, STREAM_PEER_SILENT, Side,
};
use tokio::sync::{mpsc, watch};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::adversary::{Adversary, Tamper, Tampered};
use crate::config::{Limits, RelayConfig};
use crate::defaults;
use crate::error::RelayError;
use crate::grants::{DirGrantSource, GrantSource, GrantStore, unix_now};
use crate::links::{FlowCounts, LinkStats, LinkTable, Throttle, lock};
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
    /// A second connection of side A's (B's) agent that carries flows of
    /// the link beside `a` (`b`): its lane ([`AgentToRelay::AttachLane`]).
    a_lane: Option<Attachment>,
    b_lane: Option<Attachment>,
    /// Flips to `true` when the link is revoked: its flows stop.
    revoked: watch::Sender<bool>,
    /// Bumped whenever a side attaches: parked flows look for their peer.
    pair: watch::Sender<u64>,
    /// The link's counters, flows and rate limiters (they outlive the slot
    /// while the grant lasts).
    stats: Arc<LinkStats>,
}

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
    fn new(stats: Arc<LinkStats>) -> Self {
        Self {
            a: None,
            b: None,
            a_lane: None,
            b_lane: None,
            revoked: watch::channel(false).0,
            pair: watch::channel(0).0,
            stats,
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

    fn lane_mut(&mut self, side: Side) -> &mut Option<Attachment> {
        match side {
            Side::A => &mut self.a_lane,
            Side::B => &mut self.b_lane,
        }
    }

    fn lane(&self, side: Side) -> &Option<Attachment> {
        match side {
            Side::A => &self.a_lane,
            Side::B => &self.b_lane,
        }
    }

    /// Whether `side`'s lane is attached on connection `conn_id`.
    fn lane_held_by(&self, side: Side, conn_id: u64) -> bool {
        self.lane(side)
            .as_ref()
            .is_some_and(|a| a.conn_id == conn_id)
    }

    /// Where a flow of `side` goes on to: the peer's lane for a flow that
    /// came on `side`'s lane (if the peer has one), else the peer's main
    /// attachment. `None` while the peer is away (its main attachment is
    /// what makes it present; a lane without it carries nothing).
    fn peer_conn(&self, side: Side, from_lane: bool) -> Option<quinn::Connection> {
        let peer = side.peer();
        let main = self.side(peer).as_ref()?;
        let to = from_lane
            .then(|| self.lane(peer).as_ref())
            .flatten()
            .unwrap_or(main);
        Some(to.conn.clone())
    }

    fn is_empty(&self) -> bool {
        self.a.is_none() && self.b.is_none() && self.a_lane.is_none() && self.b_lane.is_none()
    }
}

/// How many of something are held at once, against a limit that a
/// config reload may change.
#[derive(Default)]
struct Occupancy(Arc<AtomicUsize>);

/// One place in an [`Occupancy`], given back on drop.
struct Place(Arc<AtomicUsize>);

impl Occupancy {
    fn try_enter(&self, max: usize) -> Option<Place> {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Place(self.0.clone()))
    }

    fn current(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

struct State {
    /// The configuration as loaded at start (the restart-only settings).
    config: RelayConfig,
    /// The limits in force (a reload replaces them).
    limits: RwLock<Arc<Limits>>,
    grants: GrantStore,
    links: Mutex<HashMap<LinkId, LinkSlot>>,
    /// Per-link counters and rate limiters.
    table: LinkTable,
    metrics: Metrics,
    unauthenticated: Occupancy,
    connections: Occupancy,
    next_conn_id: AtomicU64,
    tap: Option<Mutex<std::fs::File>>,
    /// Bytes held for parked flows, all links together.
    buffered: AtomicU64,
    /// The served certificate, reloaded when its file changes.
    cert: Arc<crate::tls::CertSlot>,
    /// Flips to `true` when the relay starts draining.
    draining: watch::Sender<bool>,
    /// Nanoseconds flows waited for their link's rate limit, all links.
    throttled_ns: AtomicU64,
    /// UDP traffic of authenticated connections.
    wire: crate::wire::WireStats,
    /// A test's hostile relay ([`crate::adversary`]); never set otherwise.
    adversary: OnceLock<Arc<dyn Adversary>>,
}

impl State {
    fn links(&self) -> std::sync::MutexGuard<'_, HashMap<LinkId, LinkSlot>> {
        lock(&self.links)
    }

    fn limits(&self) -> Arc<Limits> {
        match self.limits.read() {
            Ok(l) => l.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn is_draining(&self) -> bool {
        *self.draining.borrow()
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
    lane: Option<Lane>,
    state: Arc<State>,
    source: Box<dyn GrantSource>,
}

/// The interactive listener (`interactive_listen`): its endpoint, and the
/// runtime of one thread (`comsat-lane`) that drives its connections and
/// their flows apart from the main threads.
struct Lane {
    endpoint: quinn::Endpoint,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Lane {
    fn bind(
        config: &RelayConfig,
        server: quinn::ServerConfig,
        addr: SocketAddr,
    ) -> Result<Self, RelayError> {
        let bind_error = |source| RelayError::Bind { addr, source };
        // The socket first: a port in use is an error to report, and a
        // runtime must not be dropped inside another one (as `bind` runs).
        let socket = crate::udp::bind(addr).map_err(bind_error)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("comsat-lane")
            .enable_all()
            .build()
            .map_err(bind_error)?;
        // quinn spawns the endpoint's and its connections' drivers on the
        // runtime it is created in.
        let endpoint = {
            let _lane = runtime.enter();
            quinn::default_runtime()
                .ok_or_else(|| bind_error(std::io::Error::other("no async runtime")))
                .and_then(|rt| {
                    let quic =
                        crate::tls::endpoint_config(config, crate::tls::Endpoint::Interactive)?;
                    quinn::Endpoint::new(quic, Some(server), socket, rt).map_err(bind_error)
                })
        };
        match endpoint {
            Ok(endpoint) => Ok(Self {
                endpoint,
                runtime: Some(runtime),
            }),
            Err(e) => {
                runtime.shutdown_background();
                Err(e)
            }
        }
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        // Dropping a runtime inside another one would panic.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("relay_id", &self.state.config.relay_id)
            .finish_non_exhaustive()
    }
}

/// How a running relay is asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Stop {
    /// Close every connection now (agents notice and move on, resuming
    /// their flows elsewhere).
    Now,
    /// Drain: refuse new attaches, tell every agent to move its links to
    /// the next relay of their grants, and exit when no link is attached
    /// here any more or after `grace`, whichever comes first.
    Drain {
        /// The longest the relay waits for its links to move.
        grace: Duration,
    },
}

/// A handle on a running relay for its operator's signals: reload the
/// configuration or the certificate.
#[derive(Clone)]
pub struct RelayHandle {
    state: Arc<State>,
    /// The main endpoint, then the interactive one if any.
    endpoints: Vec<quinn::Endpoint>,
}

impl std::fmt::Debug for RelayHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayHandle").finish_non_exhaustive()
    }
}

impl RelayHandle {
    /// Reads the config file at `path` (the one the relay started from) and
    /// applies it: the certificate pair, the limits and the QUIC transport
    /// settings. Refused as a whole, with the reason, if the file does not
    /// load, a restart-only setting changed or the certificate does not
    /// load; the configuration in force stays. Counted either way.
    pub fn reload_file(&self, path: &std::path::Path) -> Result<(), String> {
        let result = RelayConfig::load(path)
            .map_err(|e| e.to_string())
            .and_then(|new| self.try_reload(&new));
        self.counted(result)
    }

    fn counted(&self, result: Result<(), String>) -> Result<(), String> {
        let outcome = if result.is_ok() { "applied" } else { "refused" };
        self.state.metrics.config_reload(outcome);
        result
    }

    fn try_reload(&self, new: &RelayConfig) -> Result<(), String> {
        let fixed = self.state.config.restart_only_changes(new);
        if !fixed.is_empty() {
            return Err(format!(
                "{} cannot change without a restart (restart the relay, or undo the change)",
                fixed.join(", ")
            ));
        }
        if new.limits.max_unauthenticated == 0
            || new.limits.max_connections == 0
            || new.limits.max_links == 0
        {
            return Err(
                "limits.max_unauthenticated, limits.max_connections and limits.max_links \
                 must be at least 1"
                    .into(),
            );
        }
        self.state
            .cert
            .set_files(&new.tls_cert, &new.tls_key)
            .map_err(|e| e.to_string())?;
        let server =
            crate::tls::server_config(new, self.state.cert.clone()).map_err(|e| e.to_string())?;
        for endpoint in &self.endpoints {
            endpoint.set_server_config(Some(server.clone()));
        }
        match self.state.limits.write() {
            Ok(mut l) => *l = Arc::new(new.limits.clone()),
            Err(p) => *p.into_inner() = Arc::new(new.limits.clone()),
        }
        Ok(())
    }

    /// The connection on which `side` of `link` is attached now, if any:
    /// a test's adversary opens streams of its own on it
    /// ([`crate::adversary`]).
    pub fn side_connection(&self, link: LinkId, side: Side) -> Option<quinn::Connection> {
        let links = self.state.links();
        Some(links.get(&link)?.side(side).as_ref()?.conn.clone())
    }

    /// Sends `frame` to `side` of `link` as if its peer had sent it: a
    /// test's adversary forges or replays messages with it
    /// ([`crate::adversary`]). `false` if the side is not attached or its
    /// queue is full.
    pub fn send_peer_frame(&self, link: LinkId, side: Side, frame: PeerFrame) -> bool {
        let ctl = {
            let links = self.state.links();
            let Some(att) = links.get(&link).and_then(|s| s.side(side).clone()) else {
                return false;
            };
            att.ctl
        };
        ctl.try_send(RelayToAgent::Peer {
            link_id: link,
            frame,
        })
        .is_ok()
    }

    /// Reloads the certificate and key files now, if they changed.
    pub fn reload_certificate(&self) {
        self.state.cert.reload_if_changed();
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
            crate::tls::endpoint_config(&config, crate::tls::Endpoint::Main)?,
            Some(server),
            socket,
            runtime,
        )
        .map_err(bind_error)?;
        let lane = match config.interactive_listen {
            Some(addr) => {
                let lane = Lane::bind(
                    &config,
                    crate::tls::server_config(&config, cert.clone())?,
                    addr,
                )?;
                // Its thread exists: from here the main threads may yield.
                crate::prefer_lanes(config.bulk_nice);
                Some(lane)
            }
            None => None,
        };
        let state = Arc::new(State {
            limits: RwLock::new(Arc::new(config.limits.clone())),
            unauthenticated: Occupancy::default(),
            connections: Occupancy::default(),
            config,
            grants,
            links: Mutex::default(),
            table: LinkTable::default(),
            metrics,
            next_conn_id: AtomicU64::new(1),
            tap,
            buffered: AtomicU64::new(0),
            cert,
            draining: watch::channel(false).0,
            throttled_ns: AtomicU64::new(0),
            wire: crate::wire::WireStats::default(),
            adversary: OnceLock::new(),
        });
        state.table.sync(&state.grants.snapshot());
        Ok(Self {
            endpoint,
            lane,
            state,
            source,
        })
    }

    /// Makes this relay attack its agents as `adversary` says: for tests
    /// of the end-to-end layer only ([`crate::adversary`]). Set once; a
    /// second call is ignored.
    pub fn set_adversary(&self, adversary: Arc<dyn Adversary>) {
        let _ = self.state.adversary.set(adversary);
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// The bound UDP address of the interactive listener, if configured.
    pub fn interactive_addr(&self) -> Option<std::io::Result<SocketAddr>> {
        self.lane.as_ref().map(|l| l.endpoint.local_addr())
    }

    /// A handle for reloads while the relay runs.
    pub fn handle(&self) -> RelayHandle {
        let mut endpoints = vec![self.endpoint.clone()];
        endpoints.extend(self.lane.as_ref().map(|l| l.endpoint.clone()));
        RelayHandle {
            state: self.state.clone(),
            endpoints,
        }
    }

    /// A function reporting the relay's load (for controller heartbeats).
    pub fn load_probe(
        &self,
    ) -> impl Fn() -> comsat_protocol::api::RelayLoad + Send + Sync + 'static {
        let state = self.state.clone();
        move || comsat_protocol::api::RelayLoad {
            connections: state.connections.current() as u64,
            links: state.grants.snapshot().len() as u64,
            buffered_bytes: state.buffered.load(Ordering::Relaxed),
        }
    }

    /// Whether the relay is serving (what `/readyz` reports). A bound
    /// relay has loaded its grants ([`Self::bind`] fails otherwise) and
    /// serves until it stops; a draining relay is not ready, so load
    /// balancers and health checks stop sending agents to it.
    pub fn readiness(&self) -> impl Fn() -> bool + Send + Sync + 'static {
        let state = self.state.clone();
        move || !state.is_draining()
    }

    /// Per-link series for `/metrics` (bounded: see the metrics table in
    /// [`crate::metrics`]).
    pub fn link_metrics(&self) -> impl Fn() -> String + Send + Sync + 'static {
        let state = self.state.clone();
        move || {
            let mut text = format!(
                "# HELP comsat_relay_throttled_seconds_total Time flows waited for their link's rate limit, all links\n\
                 # TYPE comsat_relay_throttled_seconds_total counter\n\
                 comsat_relay_throttled_seconds_total {}\n",
                state.throttled_ns.load(Ordering::Relaxed) as f64 / 1e9
            );
            text.push_str(&state.table.render(state.limits().metrics_max_links));
            text.push_str(&state.wire.render());
            text
        }
    }

    /// Serves until `shutdown` completes, then closes every connection.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), RelayError> {
        let (tx, rx) = mpsc::channel(1);
        tokio::select! {
            result = self.run_until(rx) => result,
            () = async move {
                shutdown.await;
                let _ = tx.send(Stop::Now).await;
                std::future::pending::<()>().await;
            } => Ok(()),
        }
    }

    /// Serves until told to [`Stop`]. A [`Stop::Now`] received while
    /// draining ends the drain at once.
    pub async fn run_until(self, mut stop: mpsc::Receiver<Stop>) -> Result<(), RelayError> {
        let state = self.state.clone();
        let watcher = tokio::spawn(watch_grants(state.clone(), self.source));
        let accept = tokio::spawn(accept_loop(state.clone(), self.endpoint.clone()));
        // The interactive listener's connections, and every task they
        // spawn (flows), live on the lane's own thread.
        let lane_accept = self.lane.as_ref().and_then(|l| {
            let rt = l.runtime.as_ref()?;
            Some(rt.spawn(accept_loop(state.clone(), l.endpoint.clone())))
        });
        let how = stop.recv().await.unwrap_or(Stop::Now);
        if let Stop::Drain { grace } = how {
            drain(&state, grace, &mut stop).await;
        }
        accept.abort();
        if let Some(a) = lane_accept {
            a.abort();
        }
        watcher.abort();
        info!("relay shutting down");
        let endpoints =
            std::iter::once(&self.endpoint).chain(self.lane.as_ref().map(|l| &l.endpoint));
        for endpoint in endpoints.clone() {
            endpoint.close(CLOSE_NORMAL.into(), b"shutdown");
        }
        for endpoint in endpoints {
            let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        }
        Ok(())
    }
}

async fn accept_loop(state: Arc<State>, endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        state.metrics.connections_total.increment(1);
        let max = state.limits().max_unauthenticated;
        match state.unauthenticated.try_enter(max) {
            Some(place) => {
                tokio::spawn(handle_incoming(state.clone(), incoming, place));
            }
            None => {
                state.metrics.auth_failure("too_many_unauthenticated");
                incoming.refuse();
            }
        }
    }
}

/// Tells every agent to move on and waits until no link is attached here,
/// `grace` has passed, or a second stop asks for now.
async fn drain(state: &State, grace: Duration, stop: &mut mpsc::Receiver<Stop>) {
    let started = tokio::time::Instant::now();
    let attached = state.links().len();
    info!(
        links = attached,
        grace_secs = grace.as_secs_f64(),
        "draining: refusing new attaches and asking every agent to move to its next relay"
    );
    state.draining.send_replace(true);
    state.metrics.draining.set(1.0);
    let deadline = started + grace;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        let left = state.links().len();
        if left == 0 {
            info!(
                after_secs = started.elapsed().as_secs_f64(),
                "drained: every link has moved"
            );
            return;
        }
        tokio::select! {
            _ = tick.tick() => {}
            () = tokio::time::sleep_until(deadline) => {
                warn!(links = left, grace_secs = grace.as_secs_f64(), "drain grace over with links still attached; closing them");
                return;
            }
            again = stop.recv() => {
                if matches!(again, Some(Stop::Now) | None) {
                    warn!(links = left, "stop requested during drain; closing now");
                    return;
                }
            }
        }
    }
}

/// Polls the grant source, and ends each link at its grant's `not_after`
/// (the two in one task, so neither overwrites the other's grant set).
async fn watch_grants(state: Arc<State>, mut source: Box<dyn GrantSource>) {
    let mut tick = tokio::time::interval(defaults::GRANT_POLL_INTERVAL);
    let mut expiry = tokio::time::interval(defaults::EXPIRY_CHECK);
    loop {
        tokio::select! {
            _ = tick.tick() => reload_grants(&state, &mut *source),
            _ = expiry.tick() => expire_grants(&state),
        }
    }
}

fn reload_grants(state: &State, source: &mut dyn GrantSource) {
    state.cert.reload_if_changed();
    let files = match source.poll(&state.metrics) {
        Ok(Some(files)) => files,
        Ok(None) => return,
        Err(e) => {
            warn!(source = %source.describe(), error = %e, "cannot read grants; keeping the current ones");
            return;
        }
    };
    let changed = state.grants.replace(files, &state.metrics);
    let snapshot = state.grants.snapshot();
    state.table.sync(&snapshot);
    info!(grants = snapshot.len(), "grants reloaded");
    for link in changed {
        end_link(state, link, ErrorCode::Revoked);
    }
}

/// Tears down the links whose grant expired: the relay enforces
/// `not_after` itself, whether or not the controller can reach it.
fn expire_grants(state: &State) {
    let expired = state.grants.expire(unix_now(), &state.metrics);
    if expired.is_empty() {
        return;
    }
    state.table.sync(&state.grants.snapshot());
    for link in expired {
        info!(link = %link.fmt_short(), "grant expired: link torn down");
        end_link(state, link, ErrorCode::Expired);
    }
}

/// Tears down a link whose grant went away or changed: both sides are told,
/// its flows stop.
/// Ends a link at once: its flows stop, its buffers go, and each side is
/// told why (`code`: revoked or expired).
fn end_link(state: &State, link_id: LinkId, code: ErrorCode) {
    let slot = state.links().remove(&link_id);
    let Some(slot) = slot else { return };
    info!(link = %link_id.fmt_short(), ?code, "link ended");
    let _ = slot.revoked.send(true);
    if slot.a.is_some() && slot.b.is_some() {
        state.metrics.links_paired.decrement(1.0);
    }
    for att in [slot.a, slot.b, slot.a_lane, slot.b_lane]
        .into_iter()
        .flatten()
    {
        let _ = att.ctl.try_send(RelayToAgent::Error { link_id, code });
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
async fn handle_incoming(state: Arc<State>, incoming: quinn::Incoming, unauthenticated: Place) {
    let deadline = tokio::time::Instant::now() + state.limits().auth_timeout();
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
    let Some(permit) = state.connections.try_enter(state.limits().max_connections) else {
        return refuse(&state, &conn, "too_many_connections");
    };
    let conn_id = state.next_conn_id.fetch_add(1, Ordering::Relaxed);
    let span = info_span!("conn", id = conn_id, node = %node_id.fmt_short());
    async move {
        info!("agent connected");
        state.metrics.connections_open.increment(1.0);
        state.wire.open(conn_id, &conn);
        serve_connection(&state, conn_id, node_id, conn, send, recv, decoder).await;
        state.wire.close(conn_id);
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
    let mut lanes: HashSet<(LinkId, Side)> = HashSet::new();
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
                send_or_close(&ctl, &conn, RelayToAgent::GoAway);
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
        let mut sides = Sides {
            attached: &mut attached,
            lanes: &mut lanes,
        };
        let ok = handle_control(state, conn_id, node_id, &conn, &ctl, &mut sides, msg);
        if !ok {
            conn.close(CLOSE_PROTOCOL_ERROR.into(), b"protocol error");
            break;
        }
    }
    for (link_id, side) in attached {
        detach(state, conn_id, link_id, side);
    }
    for (link_id, side) in lanes {
        detach_lane(state, conn_id, link_id, side);
    }
    flows.abort();
    drop(ctl);
    let _ = writer.await;
}

/// The link sides one connection holds: attached, and as a lane.
struct Sides<'a> {
    attached: &'a mut HashSet<(LinkId, Side)>,
    lanes: &'a mut HashSet<(LinkId, Side)>,
}

/// Takes the sides of `link_id` out of `set`.
fn take_sides(set: &mut HashSet<(LinkId, Side)>, link_id: LinkId) -> Vec<Side> {
    let sides: Vec<Side> = set
        .iter()
        .filter(|(l, _)| *l == link_id)
        .map(|(_, s)| *s)
        .collect();
    for side in &sides {
        set.remove(&(link_id, *side));
    }
    sides
}

/// Handles one control message; `false` closes the connection.
fn handle_control(
    state: &State,
    conn_id: u64,
    node_id: NodeId,
    conn: &quinn::Connection,
    ctl: &mpsc::Sender<RelayToAgent>,
    sides: &mut Sides<'_>,
    msg: AgentToRelay,
) -> bool {
    let here = Attachment {
        conn_id,
        conn: conn.clone(),
        ctl: ctl.clone(),
    };
    let answer = |reply: Result<(), ErrorCode>, link_id| {
        send_or_close(
            ctl,
            conn,
            match reply {
                Ok(()) => RelayToAgent::Attached { link_id },
                Err(code) => RelayToAgent::Error { link_id, code },
            },
        );
    };
    let lane = matches!(msg, AgentToRelay::AttachLane { .. });
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
            let reply = attach(state, here, node_id, link_id, generation, side, lane);
            if reply.is_ok() {
                let held = if lane {
                    &mut *sides.lanes
                } else {
                    &mut *sides.attached
                };
                held.insert((link_id, side));
            }
            answer(reply, link_id);
            // A lane never pairs a link.
            if reply.is_ok() && !lane {
                announce_pair(state, link_id);
            }
            true
        }
        AgentToRelay::Detach { link_id } => {
            for side in take_sides(sides.attached, link_id) {
                detach(state, conn_id, link_id, side);
            }
            for side in take_sides(sides.lanes, link_id) {
                detach_lane(state, conn_id, link_id, side);
            }
            true
        }
        AgentToRelay::Peer { link_id, frame } => {
            let Some(&(_, side)) = sides.attached.iter().find(|(l, _)| *l == link_id) else {
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

/// Attaches `side` of `link_id` on connection `here`: as the side itself,
/// or (`lane`) as the side's lane, which carries flows only.
fn attach(
    state: &State,
    here: Attachment,
    node_id: NodeId,
    link_id: LinkId,
    generation: u64,
    side: Side,
    lane: bool,
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
    let stats = state.table.get(grant);
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
    if state.is_draining() {
        return refused("draining", ErrorCode::Draining);
    }
    let mut links = state.links();
    if !links.contains_key(&link_id) && links.len() >= state.limits().max_links {
        drop(links);
        return refused("relay_full", ErrorCode::RelayFull);
    }
    let slot = links
        .entry(link_id)
        .or_insert_with(|| LinkSlot::new(stats.clone()));
    let conn_id = here.conn_id;
    if lane {
        let old = slot.lane_mut(side).replace(here);
        if let Some(old) = old.filter(|old| old.conn_id != conn_id) {
            debug!(link = %link_id.fmt_short(), "lane re-attached from a new connection");
            old.conn
                .close(CLOSE_NORMAL.into(), b"superseded by a new connection");
        }
        // Parked flows of the peer may go on to this lane now.
        slot.pair.send_modify(|n| *n += 1);
        debug!(link = %link_id.fmt_short(), %side, "lane attached");
        return Ok(());
    }
    let was_paired = slot.a.is_some() && slot.b.is_some();
    let old = slot.side_mut(side).replace(here);
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
        if slot.is_empty() {
            links.remove(&link_id);
        }
        peer
    };
    info!(link = %link_id.fmt_short(), %side, "detached");
    if let Some(peer) = peer {
        send_or_close(&peer.ctl, &peer.conn, RelayToAgent::PeerAbsent { link_id });
    }
}

/// Gives up `side`'s lane of `link_id` if connection `conn_id` holds it.
fn detach_lane(state: &State, conn_id: u64, link_id: LinkId, side: Side) {
    let mut links = state.links();
    let Some(slot) = links.get_mut(&link_id) else {
        return;
    };
    if slot.lane_held_by(side, conn_id) {
        *slot.lane_mut(side) = None;
        if slot.is_empty() {
            links.remove(&link_id);
        }
        debug!(link = %link_id.fmt_short(), %side, "lane detached");
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
            .try_send(RelayToAgent::Peer { link_id, frame })
            .is_err()
        {
            debug!(link = %link_id.fmt_short(), "peer frame dropped: peer's control queue is full");
        }
    }
}

async fn accept_flows(state: Arc<State>, conn_id: u64, conn: quinn::Connection) {
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

/// Bytes held by the relay for a parked flow, released on drop.
struct Held {
    bytes: u64,
    link: Arc<LinkStats>,
    state: Arc<State>,
}

impl Held {
    fn add(&mut self, n: u64) {
        self.bytes += n;
        self.link.buffered.fetch_add(n, Ordering::Relaxed);
        let total = self.state.buffered.fetch_add(n, Ordering::Relaxed) + n;
        self.state.metrics.buffered_bytes.set(total as f64);
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.link.buffered.fetch_sub(self.bytes, Ordering::Relaxed);
        let total = self.state.buffered.fetch_sub(self.bytes, Ordering::Relaxed) - self.bytes;
        self.state.metrics.buffered_bytes.set(total as f64);
    }
}

/// A flow whose peer side is away: what the relay read of it so far.
struct Parked {
    chunks: Vec<Bytes>,
    finished: bool,
    held: Held,
}

/// Where a new flow stream goes.
struct Route {
    side: Side,
    /// The flow came on the side's lane.
    lane: bool,
    peer: Option<quinn::Connection>,
    revoked: watch::Receiver<bool>,
    pair: watch::Receiver<u64>,
    stats: Arc<LinkStats>,
    buffer_limit: u64,
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
    let (side, lane) = [Side::A, Side::B].into_iter().find_map(|side| {
        if slot.held_by(side, conn_id) {
            Some((side, false))
        } else {
            slot.lane_held_by(side, conn_id).then_some((side, true))
        }
    })?;
    Some(Route {
        side,
        lane,
        peer: slot.peer_conn(side, lane),
        revoked: slot.revoked.subscribe(),
        pair: slot.pair.subscribe(),
        stats: slot.stats.clone(),
        buffer_limit,
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
            link: route.stats.clone(),
            state: state.clone(),
        },
    };
    state.metrics.flows_parked.increment(1);
    debug!("flow parked: peer away");
    let mut frames = Vec::new();
    loop {
        let peer = {
            let links = state.links();
            links
                .get(&link_id)
                .and_then(|s| s.peer_conn(route.side, route.lane))
        };
        if let Some(peer) = peer {
            return Some((peer, parked));
        }
        let room = !parked.finished
            && route.stats.buffered.load(Ordering::Relaxed) < route.buffer_limit
            && state.buffered.load(Ordering::Relaxed) < state.limits().buffer_budget;
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
    let Some(_counted) = FlowGuard::enter(&route.stats.flows, flow.flow_id, route.max_flows) else {
        state.metrics.flows_over_limit.increment(1);
        route.stats.refused_max_flows();
        debug!(link = %flow.link_id.fmt_short(), limit = ?route.max_flows, "flow refused: the link's max_flows are open");
        let _ = send.reset(STREAM_FLOW_LIMIT.into());
        let _ = recv.stop(STREAM_FLOW_LIMIT.into());
        return;
    };
    if route.lane {
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
                    let _ = recv.stop(STREAM_REFUSED.into());
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
                        let _ = to.reset(STREAM_REFUSED.into());
                        let _ = from.stop(STREAM_REFUSED.into());
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
                    let _ = from.stop(STREAM_REFUSED.into());
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
async fn read_joined(
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
/// side's stream fails: `STREAM_PEER_SILENT` when that side's connection
/// timed out (the outage began an idle timeout ago), else `STREAM_REFUSED`.
fn end_code(lost: Option<&quinn::ConnectionError>) -> quinn::VarInt {
    match lost {
        Some(quinn::ConnectionError::TimedOut) => STREAM_PEER_SILENT.into(),
        _ => STREAM_REFUSED.into(),
    }
}
