//! The comsat edge agent.
//!
//! The agent only dials out: one QUIC connection per relay, carrying every
//! link it holds there. For each link it either listens on a local socket
//! (loopback TCP or a Unix socket whose peers' uid/gid are checked) and
//! turns each accepted connection into a flow, or dials a local target for
//! each flow its peer opens. Flows are encrypted end to end with the link's
//! Noise session, so the relay only sees ciphertext.
//!
//! Entry points: [`AgentConfig::load`], then [`Agent::start`] and
//! [`Agent::run`].

#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used)]

mod attest;
pub mod config;
pub mod consent;
mod core;
mod datagrams;
pub mod defaults;
pub mod enrolled;
pub mod error;
mod flow;
mod flowlog;
mod group;
mod link;
mod local;
pub mod metrics;
mod session;
mod shared;
mod status;
mod sync;
pub mod tls;
mod udp;

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use comsat_node::keys::KeyFile;
use comsat_protocol::{LinkId, NoiseSecretKey, SigningKey};
use tokio::task::JoinHandle;

pub use config::{AgentConfig, LinkConfig};

pub use error::AgentError;

/// The agent's reconnect backoff (exponential, full jitter), for tools that
/// play agents and must reconnect as they do.
pub use crate::core::relay::Backoff;

use crate::config::{LocalRole, LocalSpec, RelayEndpoint};
use crate::link::{AckWake, LinkRt};
use crate::shared::Shared;
use crate::sync::lock;

/// A started agent: listeners bound, relay sessions running. Its links can
/// be replaced while it runs ([`Agent::apply`]).
pub struct Agent {
    shared: Arc<Shared>,
    flow_timeout: Duration,
    links: HashMap<LinkId, Held>,
    groups: HashMap<GroupKey, Group>,
    live: Arc<Mutex<Vec<Arc<LinkRt>>>>,
    /// Serves the links that name a `connection` and the flows that ride
    /// lanes; started with the first such link.
    lane: Option<Lane>,
    /// `bulk_nice`, taken by the main threads once the lane runs.
    bulk_nice: u8,
    /// What the owner lets links from a controller do ([`Agent::require_consent`]);
    /// `None`: the links come from the owner's own config.
    consent: Option<consent::Consent>,
    /// Until taken ([`Agent::silent_relays`]).
    silent: Option<tokio::sync::mpsc::Receiver<comsat_protocol::RelayId>>,
}

/// The runtime of one thread (`comsat-lane`) that serves the links naming
/// a `connection` (their relay sessions, listeners and flows) and the lanes
/// of the others (their connections, listeners, and flows while they ride
/// a lane), apart from the main threads that bulk keeps busy.
struct Lane(Option<tokio::runtime::Runtime>);

impl Lane {
    fn start() -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("comsat-lane")
            .enable_all()
            .build()?;
        Ok(Self(Some(rt)))
    }

    fn handle(&self) -> Option<&tokio::runtime::Handle> {
        self.0.as_ref().map(tokio::runtime::Runtime::handle)
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        // Dropping a runtime inside another one would panic.
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// What links share one relay session (one QUIC connection at a time):
/// the same relay list and the same `connection` name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct GroupKey {
    relays: Vec<RelayEndpoint>,
    connection: Option<String>,
}

/// A link the agent holds.
struct Held {
    cfg: LinkConfig,
    rt: Arc<LinkRt>,
    /// The task serving its listener (or, for a `udp://` target, its
    /// flows).
    listener: Option<JoinHandle<()>>,
}

/// Links with the same relay list, sharing one relay session.
struct Group {
    task: JoinHandle<()>,
    members: BTreeSet<LinkId>,
    /// A relay its links' peers left ([`Agent::peer_moved`]).
    leave: tokio::sync::watch::Sender<Option<comsat_protocol::RelayId>>,
    notify: Arc<AckWake>,
    /// The flows its links carry: its lanes are up while there are some.
    busy: Arc<group::Busy>,
}

/// What [`Agent::apply`] did.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct Applied {
    /// `(link name, bound address)` of every listener bound now.
    pub listening: Vec<(String, String)>,
    /// Links that were removed (their listener closed, their flows reset).
    pub removed: Vec<String>,
    /// Links that could not be set up, with why; they are not held.
    pub failed: Vec<(String, AgentError)>,
    /// Links outside the agent's [consent](consent::Consent), with why:
    /// nothing was dialled or bound for them.
    pub refused: Vec<(String, String)>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("links", &self.links.len())
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// Loads the keys, binds every listener and starts the relay sessions.
    pub async fn start(config: AgentConfig) -> Result<Self, AgentError> {
        let mut agent = Self::new(&config)?;
        let applied = agent.apply(config.links).await;
        if let Some((_, e)) = applied.failed.into_iter().next() {
            return Err(e);
        }
        Ok(agent)
    }

    /// An agent holding no link yet: loads the keys.
    pub fn new(config: &AgentConfig) -> Result<Self, AgentError> {
        let signing = SigningKey::read_file(&config.signing_key)?;
        let noise = NoiseSecretKey::read_file(&config.noise_key)?;
        let budget_kib = defaults::REPLAY_BUDGET / 1024;
        let (silent, silent_rx) = tokio::sync::mpsc::channel(defaults::SILENT_QUEUE);
        let shared = Arc::new(Shared {
            node_id: config.node_id,
            signing,
            noise,
            metrics: metrics::Metrics::new(),
            budget: Arc::new(tokio::sync::Semaphore::new(budget_kib)),
            lane_idle: config
                .lane_idle_ms
                .map_or(defaults::LANE_IDLE, Duration::from_millis),
            noise_params: config.noise_params(),
            max_forgeries: config.max_forgeries.unwrap_or(defaults::MAX_FORGERIES),
            keep_alive: config
                .keep_alive_ms
                .map_or(defaults::KEEP_ALIVE_INTERVAL, Duration::from_millis),
            silent,
            flow_log: Arc::default(),
        });
        let flow_timeout = config
            .flow_timeout_ms
            .map_or(defaults::FLOW_TIMEOUT, Duration::from_millis);
        Ok(Self {
            shared,
            flow_timeout,
            links: HashMap::new(),
            groups: HashMap::new(),
            live: Arc::default(),
            lane: None,
            bulk_nice: config.bulk_nice.unwrap_or(defaults::BULK_NICE),
            consent: None,
            silent: Some(silent_rx),
        })
    }

    /// The relays this agent leaves because they stopped answering (their
    /// ids, as links name them), as it leaves them: for a controller to
    /// tell the peers ([`Agent::peer_moved`]). Taken once.
    pub fn silent_relays(
        &mut self,
    ) -> Option<tokio::sync::mpsc::Receiver<comsat_protocol::RelayId>> {
        self.silent.take()
    }

    /// The peer of `link` left `relay`, which stopped answering it: if the
    /// link is on that relay now, it moves to the next one of its list at
    /// once, to meet the peer there (without waiting to notice the silence
    /// itself, which an idle link does only at its next keep-alive).
    /// Whether the link is held here.
    pub fn peer_moved(&self, link: LinkId, relay: comsat_protocol::RelayId) -> bool {
        let Some(group) = self.groups.values().find(|g| g.members.contains(&link)) else {
            return false;
        };
        group.leave.send_replace(Some(relay));
        true
    }

    /// From now on, takes only links within `consent` (those an owner's
    /// config lists are its own consent; those a controller sends are not).
    pub fn require_consent(&mut self, consent: consent::Consent) {
        self.consent = Some(consent);
    }

    /// Makes `links` the agent's links. Only what changed is touched: a
    /// removed link closes its listener and resets its flows; a new one
    /// binds its listener; a link whose grant moved to other relays keeps
    /// its end-to-end session and flows here (the relay still resets them
    /// when it drops the old generation: see the open review finding).
    /// Links sharing a relay list with a changed one reconnect and resume.
    pub async fn apply(&mut self, links: Vec<LinkConfig>) -> Applied {
        let mut applied = Applied::default();
        let mut desired = HashMap::new();
        for cfg in links {
            match check(&cfg) {
                Ok(role) => match self.consent.as_ref().map(|c| c.check(&role)) {
                    Some(Err(reason)) => {
                        tracing::warn!(link = %cfg.name, reason, "refused a link outside this agent's consent");
                        applied.refused.push((cfg.name.clone(), reason));
                    }
                    _ => {
                        desired.insert(cfg.link_id, (cfg, role));
                    }
                },
                Err(e) => applied.failed.push((cfg.name.clone(), e)),
            }
        }
        self.remove_gone(&desired, &mut applied).await;
        for (id, (cfg, role)) in desired {
            if let Some(held) = self.links.get_mut(&id) {
                held.cfg = cfg;
                continue;
            }
            let mut listener = None;
            // A link of its own connection runs on the lane; a plain one
            // with a lane to one of its relays starts its flows there.
            let with_lane =
                cfg.connection.is_none() && cfg.relays.iter().any(|r| r.lane_addr.is_some());
            let lane = match cfg.connection.is_some() || with_lane {
                true => match self.lane() {
                    Ok(h) => Some(h),
                    Err(source) => {
                        applied.failed.push((
                            cfg.name.clone(),
                            AgentError::Lane {
                                link: cfg.name.clone(),
                                source,
                            },
                        ));
                        continue;
                    }
                },
                false => None,
            };
            let runtimes = match (&lane, with_lane) {
                (Some(lane), true) => Some(group::Runtimes {
                    lane: lane.clone(),
                    main: tokio::runtime::Handle::current(),
                }),
                _ => None,
            };
            let rt = Arc::new(LinkRt::new(
                cfg.clone(),
                role.clone(),
                self.flow_timeout,
                Arc::new(AckWake::default()),
                runtimes,
            ));
            if let LocalRole::Listen(spec) = &role {
                // A lane link's listener is bound and served on the lane,
                // so its sockets are polled there too.
                let bind = match &lane {
                    Some(h) => {
                        let spec = spec.clone();
                        h.spawn(async move { local::Listener::bind(&spec).await })
                            .await
                            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
                    }
                    None => local::Listener::bind(spec).await,
                };
                // A listener that cannot bind is tried again until it can
                // (the link is held meanwhile, and reported failed).
                let serve: std::pin::Pin<Box<dyn Future<Output = ()> + Send>> = match bind {
                    Ok(l) => {
                        let addr = l.describe();
                        tracing::info!(link = %cfg.name, listen = %addr, "listening");
                        applied.listening.push((cfg.name.clone(), addr.clone()));
                        rt.set_local(status::LocalEnd::Bound(addr));
                        Box::pin(session::serve_listener(self.shared.clone(), rt.clone(), l))
                    }
                    Err(source) => {
                        let retry = status::listen_retrying(
                            self.shared.clone(),
                            rt.clone(),
                            spec.clone(),
                            std::io::Error::new(source.kind(), source.to_string()),
                        );
                        applied.failed.push((
                            cfg.name.clone(),
                            AgentError::Listen {
                                link: cfg.name.clone(),
                                spec: spec.to_string(),
                                source,
                            },
                        ));
                        Box::pin(retry)
                    }
                };
                listener = Some(match &lane {
                    Some(h) => h.spawn(serve),
                    None => tokio::spawn(serve),
                });
            }
            if let LocalRole::Target(LocalSpec::Udp(_)) = &role {
                listener = Some(tokio::spawn(datagrams::serve_target(rt.clone())));
            }
            self.links.insert(id, Held { cfg, rt, listener });
        }
        self.regroup().await;
        *lock(&self.live) = self.links.values().map(|h| h.rt.clone()).collect();
        applied
    }

    /// Removes the links that are gone from `desired`, or changed in what
    /// their session and flows depend on.
    async fn remove_gone(
        &mut self,
        desired: &HashMap<LinkId, (LinkConfig, LocalRole)>,
        applied: &mut Applied,
    ) {
        let gone: Vec<LinkId> = self
            .links
            .iter()
            .filter(|(id, held)| {
                desired
                    .get(*id)
                    .is_none_or(|(cfg, _)| !cfg.same_half(&held.cfg))
            })
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            if let Some(held) = self.links.remove(&id) {
                self.stop_groups_of(&[id]).await;
                if let Some(task) = held.listener {
                    task.abort();
                    let _ = task.await;
                }
                held.rt.shut(&self.shared.metrics);
                // Only a socket this link bound: one it could not bind is
                // another program's.
                if let (LocalRole::Listen(spec), Some(_)) = (&held.rt.role, held.rt.bound()) {
                    local::cleanup(spec);
                }
                tracing::info!(link = %held.cfg.name, "link removed");
                applied.removed.push(held.cfg.name);
            }
        }
    }

    /// The lane's runtime, started on first use.
    fn lane(&mut self) -> std::io::Result<tokio::runtime::Handle> {
        if self.lane.is_none() {
            self.lane = Some(Lane::start()?);
            // Its thread exists: from here the main threads may yield.
            prefer_lanes(self.bulk_nice);
        }
        self.lane
            .as_ref()
            .and_then(Lane::handle)
            .cloned()
            .ok_or_else(|| std::io::Error::other("the lane runtime is gone"))
    }

    /// Stops the relay sessions carrying any of `ids`.
    async fn stop_groups_of(&mut self, ids: &[LinkId]) {
        let keys: Vec<_> = self
            .groups
            .iter()
            .filter(|(_, g)| ids.iter().any(|id| g.members.contains(id)))
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            if let Some(group) = self.groups.remove(&key) {
                group.task.abort();
                let _ = group.task.await;
                for id in &group.members {
                    if let Some(held) = self.links.get(id) {
                        held.rt.detach(&self.shared.metrics);
                    }
                }
            }
        }
    }

    /// Runs one relay session per relay list and `connection` name,
    /// restarting only those whose links changed.
    async fn regroup(&mut self) {
        let mut want: HashMap<GroupKey, BTreeSet<LinkId>> = HashMap::new();
        for (id, held) in &self.links {
            let key = GroupKey {
                relays: held.cfg.relays.clone(),
                connection: held.cfg.connection.clone(),
            };
            want.entry(key).or_default().insert(*id);
        }
        let stale: Vec<LinkId> = self
            .groups
            .iter()
            .filter(|(k, g)| want.get(*k) != Some(&g.members))
            .flat_map(|(_, g)| g.members.iter().copied())
            .collect();
        self.stop_groups_of(&stale).await;
        for (key, members) in want {
            // A link the controller could not place on any relay yet.
            if key.relays.is_empty() {
                continue;
            }
            if let Some(group) = self.groups.get(&key) {
                // Unchanged session; a new grant generation is used from
                // the next attach (the relay drops the old one).
                for id in &members {
                    if let Some(held) = self.links.get(id) {
                        held.rt
                            .rebind(group.notify.clone(), &group.busy, held.cfg.generation);
                    }
                }
                continue;
            }
            let notify = Arc::new(AckWake::default());
            let busy = Arc::new(group::Busy::default());
            let mut links = HashMap::new();
            for id in &members {
                if let Some(held) = self.links.get(id) {
                    held.rt.rebind(notify.clone(), &busy, held.cfg.generation);
                    links.insert(*id, held.rt.clone());
                }
            }
            // Unnamed links with a lane to one of their relays (the same
            // relays for the whole group) got its runtimes when applied.
            let lanes = links.values().find_map(|l| l.runtimes.clone());
            let (leave, left) = tokio::sync::watch::channel(None);
            let session = session::relay_loop(
                self.shared.clone(),
                (key.relays.clone(), left),
                key.connection.clone(),
                links,
                notify.clone(),
                lanes.map(|rt| (rt, busy.clone())),
            );
            // A named connection's lane was started when its first link
            // was applied; without one (it failed) there is no such link.
            let lane = key
                .connection
                .as_ref()
                .and_then(|_| self.lane.as_ref()?.handle());
            let task = match lane {
                Some(h) => h.spawn(session),
                None => tokio::spawn(session),
            };
            self.groups.insert(
                key,
                Group {
                    task,
                    members,
                    leave,
                    notify,
                    busy,
                },
            );
        }
    }

    /// `(link name, bound address)` of every listener.
    pub fn listening(&self) -> Vec<(String, String)> {
        let mut out: Vec<_> = self
            .links
            .values()
            .filter_map(|h| Some((h.cfg.name.clone(), h.rt.bound()?)))
            .collect();
        out.sort();
        out
    }

    /// A function telling the state of every link half held, for the
    /// controller ([`comsat_node::agent::AgentSink::status_source`]).
    pub fn status_source(
        &self,
    ) -> impl Fn() -> Vec<comsat_protocol::api::HalfReport> + Send + Sync + 'static {
        let live = self.live.clone();
        move || lock(&live).iter().map(|l| l.half_report()).collect()
    }

    /// A function taking up to `max` records of flows that ended, oldest
    /// first, with how many were dropped since the last take (the queue
    /// holds at most 10,000), for the controller
    /// ([`comsat_node::agent::AgentSink::flow_source`]).
    pub fn flow_records(
        &self,
    ) -> impl Fn(usize) -> (Vec<comsat_protocol::api::FlowRecord>, u64) + Send + Sync + 'static
    {
        let log = self.shared.flow_log.clone();
        move |max| log.take(max)
    }

    /// A function telling whether every link is up: its listener bound,
    /// attached to a relay with an end-to-end session, its peer attached
    /// there too (what `/readyz` reports). A link whose peer is away still
    /// takes flows (the relay holds them until it is back), but is not
    /// ready.
    pub fn readiness(&self) -> impl Fn() -> bool + Send + Sync + 'static {
        let live = self.live.clone();
        move || lock(&live).iter().all(|l| l.up() && l.local_ok())
    }

    /// Runs until `shutdown` completes.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        shutdown.await;
        tracing::info!("agent shutting down");
        self.stop().await;
    }

    /// Stops every relay session and listener.
    pub async fn stop(&mut self) {
        let _ = self.apply(Vec::new()).await;
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        for g in self.groups.values() {
            g.task.abort();
        }
        for h in self.links.values() {
            if let Some(l) = &h.listener {
                l.abort();
            }
        }
    }
}

/// Checks a link's local role and relay TLS settings.
fn check(cfg: &LinkConfig) -> Result<LocalRole, AgentError> {
    let bad = |reason: config::LinkError| AgentError::Config {
        path: "agent config".into(),
        reason: format!("link `{}`: {reason}", cfg.name),
    };
    let role = cfg.role().map_err(bad)?;
    cfg.check_connection().map_err(bad)?;
    cfg.allow_rules().map_err(bad)?;
    for relay in &cfg.relays {
        tls::client_config(relay, defaults::KEEP_ALIVE_INTERVAL).map_err(|reason| {
            AgentError::Tls {
                link: cfg.name.clone(),
                reason: format!("relay {}: {reason}", relay.addr),
            }
        })?;
    }
    Ok(role)
}

static BULK_NICE: AtomicI32 = AtomicI32::new(0);

/// How much nicer than the process the threads that carry bulk should be:
/// the agent's `bulk_nice` once a link is served with a lane, 0 before.
/// The `comsat` binary's runtime applies it to its worker threads as they
/// next run (the lane's thread, started before, keeps the process's
/// niceness), so the kernel runs the lane first when it wakes.
pub fn bulk_nice() -> i32 {
    BULK_NICE.load(Ordering::Relaxed)
}

fn prefer_lanes(nice: u8) {
    BULK_NICE.fetch_max(i32::from(nice), Ordering::Relaxed);
}
