//! The QUIC server: authentication, pairing and splicing.
//!
//! One task per agent connection reads its control stream; one task per
//! flow splices the agent's stream with its twin on the peer's connection.
//! The pairing table (`table.rs`) sits behind one mutex, never held
//! across an `await`.
//!
//! - `accept`: the handshake, the agent's `Hello`, connection limits;
//! - `control`: a connection's control stream, attaches and peer frames;
//! - `splice` and `park`: flow streams, spliced or parked;
//! - `expiry`: the grant set in force, expiry and ending links;
//! - `drain`: moving every link away before exit;
//! - `handle`: [`RelayHandle`], reloads and grant hand-over.

mod accept;
mod control;
mod ctl;
mod datagrams;
mod drain;
mod expiry;
mod handle;
mod park;
mod splice;

pub use handle::{RelayHandle, ReloadError};

use std::collections::HashMap;
use std::future::Future;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use comsat_protocol::msg::RelayToAgent;
use comsat_protocol::{CLOSE_NORMAL, NodeId, SignedGrant};
use tokio::sync::{mpsc, watch};
use tracing::info;

use crate::adversary::Adversary;
use crate::config::{Limits, RelayConfig};
use crate::error::RelayError;
use crate::grants::{DirGrantSource, FedGrantSource, GrantSource, GrantStore};
use crate::links::{LinkStats, LinkTable, lock};
use crate::metrics::Metrics;
use crate::table::{ConnId, Table};

/// How the relay reaches the agent on one connection.
#[derive(Clone)]
struct Attachment {
    conn: quinn::Connection,
    ctl: ctl::Ctl,
}

/// What the server keeps for each link in the [`Table`].
struct LinkState {
    /// Flips to `true` when the link is revoked: its flows stop.
    revoked: watch::Sender<bool>,
    /// Bumped whenever a side attaches: parked flows look for their peer.
    pair: watch::Sender<u64>,
    /// The link's counters, flows and rate limiters (they outlive the
    /// link's place in the table while the grant lasts).
    stats: Arc<LinkStats>,
}

impl LinkState {
    fn new(stats: Arc<LinkStats>) -> Self {
        Self {
            revoked: watch::channel(false).0,
            pair: watch::channel(0).0,
            stats,
        }
    }
}

/// The pairing table and the connections its ids name.
#[derive(Default)]
struct Links {
    table: Table<LinkState>,
    /// Every authenticated connection being served.
    conns: HashMap<ConnId, Attachment>,
}

impl Links {
    fn conn(&self, id: Option<ConnId>) -> Option<&Attachment> {
        self.conns.get(&id?)
    }
}

/// How many of something are held at once, against a limit that a
/// config reload may change.
#[derive(Default)]
struct Occupancy(Arc<Count>);

#[derive(Default)]
struct Count {
    n: AtomicUsize,
    /// Woken (one waiter, or the next to wait) when a place is given back.
    freed: tokio::sync::Notify,
}

/// One place in an [`Occupancy`], given back on drop.
struct Place(Arc<Count>);

impl Occupancy {
    fn try_enter(&self, max: usize) -> Option<Place> {
        self.0
            .n
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Place(self.0.clone()))
    }

    fn current(&self) -> usize {
        self.0.n.load(Ordering::Acquire)
    }

    /// Returns once a place was given back (perhaps before this call).
    async fn freed(&self) {
        self.0.freed.notified().await;
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.0.n.fetch_sub(1, Ordering::AcqRel);
        self.0.freed.notify_one();
    }
}

/// How many of something each source (an IPv4 address or IPv6 /64) holds
/// at once.
#[derive(Default)]
struct BySource(Arc<Mutex<HashMap<IpAddr, usize>>>);

/// One source's place in a [`BySource`], given back on drop.
struct SourcePlace {
    held: Arc<Mutex<HashMap<IpAddr, usize>>>,
    source: IpAddr,
}

impl BySource {
    fn try_enter(&self, ip: IpAddr, max: usize) -> Option<SourcePlace> {
        let source = comsat_protocol::endpoint::source_of(ip);
        let mut held = lock(&self.0);
        // A source refused is not remembered: spoofed ones leave nothing.
        if held.get(&source).copied().unwrap_or(0) >= max {
            return None;
        }
        *held.entry(source).or_insert(0) += 1;
        Some(SourcePlace {
            held: self.0.clone(),
            source,
        })
    }
}

/// Each node key's authenticated connections: (connection, source).
type NodeConns = Arc<Mutex<HashMap<NodeId, Vec<(u64, IpAddr)>>>>;

/// The authenticated connections of each node key.
#[derive(Default)]
struct ByNode(NodeConns);

/// One connection's place among its node's, given back on drop.
struct NodePlace {
    held: NodeConns,
    node: NodeId,
    conn: u64,
}

impl ByNode {
    /// A place for connection `conn` of `node` from `ip`, and the source
    /// of another connection of the same key held from elsewhere, if any;
    /// `None` when the node holds `max` connections already.
    fn try_enter(
        &self,
        node: NodeId,
        conn: u64,
        ip: IpAddr,
        max: usize,
    ) -> Option<(NodePlace, Option<IpAddr>)> {
        let source = comsat_protocol::endpoint::source_of(ip);
        let mut held = lock(&self.0);
        let conns = held.entry(node).or_default();
        if conns.len() >= max {
            return None;
        }
        let elsewhere = conns.iter().map(|c| c.1).find(|s| *s != source);
        conns.push((conn, source));
        let place = NodePlace {
            held: self.0.clone(),
            node,
            conn,
        };
        Some((place, elsewhere))
    }
}

impl Drop for NodePlace {
    fn drop(&mut self) {
        let mut held = lock(&self.held);
        if let Some(conns) = held.get_mut(&self.node) {
            conns.retain(|c| c.0 != self.conn);
            if conns.is_empty() {
                held.remove(&self.node);
            }
        }
    }
}

impl Drop for SourcePlace {
    fn drop(&mut self) {
        let mut held = lock(&self.held);
        if let Some(n) = held.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.source);
            }
        }
    }
}

struct State {
    /// The configuration as loaded at start (the restart-only settings).
    config: RelayConfig,
    /// The limits in force (a reload replaces them).
    limits: RwLock<Arc<Limits>>,
    grants: GrantStore,
    links: Mutex<Links>,
    /// Per-link counters and rate limiters.
    stats: LinkTable,
    metrics: Metrics,
    unauthenticated: Occupancy,
    unauthenticated_by_source: BySource,
    connections: Occupancy,
    by_node: ByNode,
    next_conn_id: AtomicU64,
    tap: Option<Mutex<std::fs::File>>,
    /// The served certificate, reloaded when its file changes.
    cert: Arc<crate::tls::CertSlot>,
    /// Flips to `true` when the relay starts draining.
    draining: watch::Sender<bool>,
    /// Nanoseconds flows waited for their link's rate limit, all links.
    throttled_ns: AtomicU64,
    /// Bytes held for parked flows, all links (as the [`Table`] counts
    /// them): with `control_bytes`, what counts against the budget.
    parked_bytes: AtomicU64,
    /// Bytes queued on every agent's control stream ([`ctl`]).
    control_bytes: Arc<AtomicU64>,
    /// Clone alarms not yet reported to the controller.
    clones: Mutex<CloneAlarms>,
    /// UDP traffic of authenticated connections.
    wire: crate::wire::WireStats,
    /// A test's hostile relay ([`crate::adversary`]); never set otherwise.
    adversary: OnceLock<Arc<dyn Adversary>>,
    /// Grant sets handed over in process ([`RelayHandle::set_grants`]).
    fed: watch::Sender<Option<FedGrants>>,
}

/// A whole grant set handed to the relay in process.
type FedGrants = Arc<Vec<(String, SignedGrant)>>;

impl State {
    fn links(&self) -> std::sync::MutexGuard<'_, Links> {
        lock(&self.links)
    }

    fn limits(&self) -> Arc<Limits> {
        match self.limits.read() {
            Ok(l) => l.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// The parked flows now hold `total` bytes.
    fn set_parked(&self, total: u64) {
        self.parked_bytes.store(total, Ordering::Relaxed);
        self.metrics.buffered_bytes.set(total as f64);
    }

    /// Room left in the buffer budget for control queues: the budget less
    /// the parked flows' bytes.
    fn control_room(&self) -> u64 {
        self.limits()
            .buffer_budget
            .saturating_sub(self.parked_bytes.load(Ordering::Relaxed))
    }

    /// Room left in the buffer budget for parked flows: the budget less
    /// what the control queues hold.
    fn park_budget(&self) -> u64 {
        self.limits()
            .buffer_budget
            .saturating_sub(self.control_bytes.load(Ordering::Relaxed))
    }

    /// Queues `msg` for the agent of `att`; an agent that does not read
    /// its control stream fast enough is disconnected.
    fn send_or_close(&self, att: &Attachment, msg: RelayToAgent) {
        if att.ctl.try_send(msg, self.control_room()).is_err() {
            tracing::warn!("agent is not reading its control stream; closing");
            att.conn.close(
                comsat_protocol::CLOSE_PROTOCOL_ERROR.into(),
                b"control stream stalled",
            );
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

/// Clone alarms (one node key connected from two sources at once) kept
/// for the controller's audit log until a heartbeat takes them: at most
/// [`crate::defaults::MAX_CLONE_ALARMS`], then counted as dropped.
#[derive(Default)]
struct CloneAlarms {
    kept: std::collections::VecDeque<comsat_protocol::api::NodeClone>,
    dropped: u64,
}

impl CloneAlarms {
    fn push(&mut self, alarm: comsat_protocol::api::NodeClone) {
        if self.kept.len() >= crate::defaults::MAX_CLONE_ALARMS {
            self.dropped += 1;
        } else {
            self.kept.push_back(alarm);
        }
    }

    /// The oldest `max` alarms, and how many were dropped since the last
    /// take.
    fn take(&mut self, max: usize) -> (Vec<comsat_protocol::api::NodeClone>, u64) {
        let n = self.kept.len().min(max);
        (
            self.kept.drain(..n).collect(),
            std::mem::take(&mut self.dropped),
        )
    }
}

/// A bound relay, ready to [`Relay::run`].
pub struct Relay {
    endpoint: quinn::Endpoint,
    lane: Option<Lane>,
    state: Arc<State>,
    source: Box<dyn GrantSource>,
    fed: watch::Receiver<Option<FedGrants>>,
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

impl Relay {
    /// Loads the certificate and the grants (from `config.grants_dir`) and
    /// binds the UDP socket.
    pub fn bind(config: RelayConfig) -> Result<Self, RelayError> {
        let source = Box::new(DirGrantSource::new(config.grants_dir.clone()));
        Self::bind_with_source(config, source)
    }

    /// Like [`Self::bind`], for a relay whose grants are handed over in
    /// process with [`RelayHandle::set_grants`] (by its node's controller
    /// sync), not read from `config.grants_dir`. It starts with none.
    pub fn bind_fed(config: RelayConfig) -> Result<Self, RelayError> {
        Self::bind_with_source(config, Box::new(FedGrantSource))
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
        let (fed_tx, fed) = watch::channel(None);
        let state = Arc::new(State {
            limits: RwLock::new(Arc::new(config.limits.clone())),
            unauthenticated: Occupancy::default(),
            unauthenticated_by_source: BySource::default(),
            by_node: ByNode::default(),
            connections: Occupancy::default(),
            config,
            grants,
            links: Mutex::default(),
            stats: LinkTable::default(),
            metrics,
            next_conn_id: AtomicU64::new(1),
            tap,
            cert,
            draining: watch::channel(false).0,
            throttled_ns: AtomicU64::new(0),
            parked_bytes: AtomicU64::new(0),
            control_bytes: Arc::default(),
            clones: Mutex::default(),
            wire: crate::wire::WireStats::default(),
            adversary: OnceLock::new(),
            fed: fed_tx,
        });
        state.stats.sync(&state.grants.snapshot());
        Ok(Self {
            endpoint,
            lane,
            state,
            source,
            fed,
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
            buffered_bytes: state.links().table.buffered(),
            draining: state.is_draining(),
        }
    }

    /// What its links carried since the probe was last asked (see
    /// [`comsat_node::relay::RelaySink::link_traffic`]).
    pub fn traffic_probe(
        &self,
    ) -> impl Fn(usize) -> Vec<comsat_protocol::api::LinkTraffic> + Send + Sync + 'static {
        let state = self.state.clone();
        let last = Mutex::default();
        move |max| state.stats.traffic(&last, max)
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
            text.push_str(&state.stats.render(state.limits().metrics_max_links));
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
        let watcher = tokio::spawn(expiry::watch_grants(state.clone(), self.source, self.fed));
        let accept = tokio::spawn(accept::accept_loop(state.clone(), self.endpoint.clone()));
        // The interactive listener's connections, and every task they
        // spawn (flows), live on the lane's own thread.
        let lane_accept = self.lane.as_ref().and_then(|l| {
            let rt = l.runtime.as_ref()?;
            Some(rt.spawn(accept::accept_loop(state.clone(), l.endpoint.clone())))
        });
        let how = stop.recv().await.unwrap_or(Stop::Now);
        if let Stop::Drain { grace } = how {
            drain::drain(&state, grace, &mut stop).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn a_node_key_holds_at_most_its_connections_and_another_source_is_seen() {
        let nodes = ByNode::default();
        let (a, b) = (NodeId([1; 16]), NodeId([2; 16]));
        let (first, elsewhere) = nodes.try_enter(a, 1, ip("192.0.2.1"), 3).expect("first");
        assert_eq!(elsewhere, None);
        // Its lane, from the same address: no alarm.
        let (_lane, elsewhere) = nodes.try_enter(a, 2, ip("192.0.2.1"), 3).expect("lane");
        assert_eq!(elsewhere, None);
        // The same key from another address: allowed, and seen.
        let (_clone, elsewhere) = nodes.try_enter(a, 3, ip("198.51.100.7"), 3).expect("clone");
        assert_eq!(elsewhere, Some(ip("192.0.2.1")));
        assert!(
            nodes.try_enter(a, 4, ip("192.0.2.1"), 3).is_none(),
            "over the key's cap"
        );
        // Another key is counted apart; a place given back is free again.
        assert!(nodes.try_enter(b, 5, ip("192.0.2.1"), 3).is_some());
        drop(first);
        assert!(nodes.try_enter(a, 6, ip("192.0.2.1"), 3).is_some());
    }

    #[test]
    fn addresses_of_one_ipv6_64_are_one_source() {
        let nodes = ByNode::default();
        let a = NodeId([1; 16]);
        let _first = nodes
            .try_enter(a, 1, ip("2001:db8:0:1::10"), 4)
            .expect("first");
        let (_second, elsewhere) = nodes
            .try_enter(a, 2, ip("2001:db8:0:1::99"), 4)
            .expect("second");
        assert_eq!(
            elsewhere, None,
            "a privacy address of the same /64 is no clone"
        );
        let (_third, elsewhere) = nodes
            .try_enter(a, 3, ip("2001:db8:0:2::1"), 4)
            .expect("third");
        assert_eq!(elsewhere, Some(ip("2001:db8:0:1::")));
    }
}
