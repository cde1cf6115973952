//! Enrolled relays and agents in this process: their configs from a data
//! dir, and the relay and the agent fed by their controller sync
//! (`comsat_node`) through its narrow traits.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use comsat_node::NodeState;
use comsat_node::agent::AgentSink;
use comsat_node::relay::RelaySink;
use comsat_protocol::api;
use comsat_protocol::grant::SignedGrant;
use comsat_protocol::{LinkId, RelayId};

/// The relay config of an enrolled relay's data dir.
pub(crate) fn relay_config(
    dir: &Path,
    state: &NodeState,
    listen: Option<SocketAddr>,
    admin: Option<SocketAddr>,
) -> anyhow::Result<comsat_relay::RelayConfig> {
    let (listen, lane) = state.relay_listen(listen)?;
    let mut cfg = comsat_relay::RelayConfig::new(
        RelayId(state.node_id.0),
        listen,
        dir.join("tls.crt"),
        dir.join("tls.key"),
        state.authority_public_key,
        dir.join("grants"),
    );
    cfg.admin = admin;
    cfg.interactive_listen = lane;
    Ok(cfg)
}

/// A relay in this process, as its controller sync sees it.
pub(crate) struct FedRelay {
    handle: comsat_relay::RelayHandle,
    load: Box<dyn Fn() -> api::RelayLoad + Send + Sync>,
}

impl FedRelay {
    /// `relay` (bound with [`comsat_relay::Relay::bind_fed`]).
    pub(crate) fn new(relay: &comsat_relay::Relay) -> Arc<Self> {
        Arc::new(Self {
            handle: relay.handle(),
            load: Box::new(relay.load_probe()),
        })
    }
}

impl RelaySink for FedRelay {
    fn grants(&self, grants: Vec<(String, SignedGrant)>) {
        self.handle.set_grants(grants);
    }

    fn certificate_renewed(&self) {
        self.handle.reload_certificate();
    }

    fn load(&self) -> api::RelayLoad {
        (self.load)()
    }

    fn clone_alarms(&self, max: usize) -> (Vec<api::NodeClone>, u64) {
        self.handle.take_clone_alarms(max)
    }
}

/// An agent in this process, as its controller sync sees it.
pub(crate) struct FedAgent<'a>(pub &'a mut comsat_agent::Agent);

impl AgentSink for FedAgent<'_> {
    async fn apply(
        &mut self,
        desired: &api::AgentDesired,
        relay_ca: &Path,
    ) -> Vec<api::LinkRefusal> {
        let links = desired
            .links
            .iter()
            .map(|l| comsat_agent::config::from_desired(l, relay_ca))
            .collect();
        let applied = self.0.apply(links).await;
        // Machine-readable lines the tests and scripts read.
        for (name, addr) in &applied.listening {
            println!("comsat agent link {name} listening {addr}");
        }
        for name in &applied.removed {
            println!("comsat agent link {name} removed");
        }
        for (name, e) in &applied.failed {
            tracing::error!(link = %name, error = %e, "link cannot be set up");
            println!("comsat agent link {name} failed");
        }
        applied
            .refused
            .into_iter()
            .map(|(link, reason)| {
                println!("comsat agent link {link} refused");
                api::LinkRefusal { link, reason }
            })
            .collect()
    }

    fn silent_relays(&mut self) -> Option<tokio::sync::mpsc::Receiver<RelayId>> {
        self.0.silent_relays()
    }

    fn peer_moved(&mut self, link: LinkId, relay: RelayId) {
        self.0.peer_moved(link, relay);
    }
}

/// The agent of an enrolled data dir, holding no link yet (they come from
/// the controller, or its cache), and taking only those within its owner's
/// consent (the dir's `consent.toml`, or the default).
pub(crate) fn enrolled_agent(
    dir: &Path,
    state: &NodeState,
    bulk_nice: Option<u8>,
    tuning: &crate::cli::AgentTuning,
) -> Result<comsat_agent::Agent, comsat_agent::AgentError> {
    let mut config = comsat_agent::AgentConfig::for_node(
        state.node_id,
        dir.join("node.key"),
        dir.join("noise.key"),
    );
    config.bulk_nice = bulk_nice;
    let ms = |d: std::time::Duration| d.as_millis() as u64;
    config.flow_timeout_ms = tuning.flow_timeout.map(ms);
    config.keep_alive_ms = tuning.keep_alive.map(ms);
    let mut agent = comsat_agent::Agent::new(&config)?;
    agent.require_consent(comsat_agent::consent::Consent::load(dir)?);
    Ok(agent)
}

/// Applies the desired state cached in `dir`, if any: its version and
/// the links refused (for the controller, once it is reached).
pub(crate) async fn apply_cached(
    agent: &mut comsat_agent::Agent,
    dir: &Path,
) -> comsat_node::agent::Applied {
    match comsat_node::agent::cached_desired(dir) {
        Some(cached) => {
            let refused = FedAgent(agent)
                .apply(&cached, &dir.join("relay-ca.pem"))
                .await;
            comsat_node::agent::Applied {
                version: cached.version,
                refused: Some(refused),
            }
        }
        None => comsat_node::agent::Applied::default(),
    }
}
