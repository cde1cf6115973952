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

pub mod config;
pub mod defaults;
pub mod error;
mod flow;
mod local;
pub mod metrics;
mod session;
pub mod tls;
mod udp;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use comsat_protocol::{NoiseSecretKey, SigningKey};
use tokio::task::JoinSet;

pub use config::AgentConfig;

/// Locks `m`, going on with the data of a task that panicked holding it
/// (every critical section here leaves the data consistent).
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
pub use error::AgentError;

use crate::config::{LocalRole, RelayEndpoint};
use crate::session::{LinkRt, Shared};

/// A started agent: listeners bound, relay sessions running.
pub struct Agent {
    tasks: JoinSet<()>,
    links: Vec<Arc<LinkRt>>,
    listening: Vec<(String, String)>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("listening", &self.listening)
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// Loads the keys, binds every listener and starts the relay sessions.
    pub async fn start(config: AgentConfig) -> Result<Self, AgentError> {
        let signing = SigningKey::read_file(&config.signing_key)?;
        let noise = NoiseSecretKey::read_file(&config.noise_key)?;
        let budget_kib = defaults::REPLAY_BUDGET / 1024;
        let shared = Arc::new(Shared {
            node_id: config.node_id,
            signing,
            noise,
            metrics: metrics::Metrics::new(),
            budget: Arc::new(tokio::sync::Semaphore::new(budget_kib)),
        });
        let flow_timeout = config
            .flow_timeout_ms
            .map_or(defaults::FLOW_TIMEOUT, std::time::Duration::from_millis);
        let mut notifies: HashMap<Vec<RelayEndpoint>, Arc<tokio::sync::Notify>> = HashMap::new();
        let mut tasks = JoinSet::new();
        let mut by_relay: HashMap<Vec<RelayEndpoint>, HashMap<_, Arc<LinkRt>>> = HashMap::new();
        let mut links = Vec::new();
        let mut listening = Vec::new();
        for cfg in config.links {
            let role = cfg.role().map_err(|reason| AgentError::Config {
                path: "agent config".into(),
                reason: format!("link `{}`: {reason}", cfg.name),
            })?;
            let notify = notifies.entry(cfg.relays.clone()).or_default().clone();
            for relay in &cfg.relays {
                tls::client_config(relay).map_err(|reason| AgentError::Tls {
                    link: cfg.name.clone(),
                    reason: format!("relay {}: {reason}", relay.addr),
                })?;
            }
            let link = Arc::new(LinkRt::new(cfg.clone(), role.clone(), flow_timeout, notify));
            if let LocalRole::Listen(spec) = &role {
                let listener =
                    local::Listener::bind(spec)
                        .await
                        .map_err(|source| AgentError::Listen {
                            link: cfg.name.clone(),
                            spec: spec.to_string(),
                            source,
                        })?;
                let addr = listener.describe();
                tracing::info!(link = %cfg.name, listen = %addr, "listening");
                listening.push((cfg.name.clone(), addr));
                tasks.spawn(session::serve_listener(
                    shared.clone(),
                    link.clone(),
                    listener,
                ));
            }
            by_relay
                .entry(cfg.relays.clone())
                .or_default()
                .insert(cfg.link_id, link.clone());
            links.push(link);
        }
        for (relays, links) in by_relay {
            let notify = notifies.get(&relays).cloned().unwrap_or_default();
            tasks.spawn(session::relay_loop(shared.clone(), relays, links, notify));
        }
        Ok(Self {
            tasks,
            links,
            listening,
        })
    }

    /// `(link name, bound address)` of every listener, e.g.
    /// `("db", "tcp://127.0.0.1:7000")`.
    pub fn listening(&self) -> &[(String, String)] {
        &self.listening
    }

    /// A function telling whether every link is attached to a relay with an
    /// end-to-end session (what `/readyz` reports; a link's peer may be away,
    /// the relay then holds what is sent for it).
    pub fn readiness(&self) -> impl Fn() -> bool + Send + Sync + 'static {
        let links = self.links.clone();
        move || links.iter().all(|l| l.ready.borrow().is_some())
    }

    /// Runs until `shutdown` completes.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        shutdown.await;
        tracing::info!("agent shutting down");
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        for link in &self.links {
            if let LocalRole::Listen(spec) = &link.role {
                local::cleanup(spec);
            }
        }
    }
}
