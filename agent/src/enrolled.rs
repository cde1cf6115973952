//! An agent enrolled with a controller: made from its data dir, and fed
//! by the controller sync ([`comsat_node::agent`]) through its narrow
//! trait.

use std::path::Path;

use comsat_node::NodeState;
use comsat_node::agent::{AgentSink, Applied as Synced};
use comsat_protocol::api;
use comsat_protocol::{LinkId, RelayId};

use crate::consent::Consent;
use crate::{Agent, AgentConfig, AgentError, Applied};

/// The agent of the data dir `dir` (`state` read from it), holding no
/// link yet (they come from the controller, or its cache), and taking
/// only those within its owner's consent (the dir's `consent.toml`, or
/// the default). `tune` sets what the command line says of its config.
///
/// # Errors
///
/// Its keys or its consent file cannot be read.
pub fn agent(
    dir: &Path,
    state: &NodeState,
    tune: impl FnOnce(&mut AgentConfig),
) -> Result<Agent, AgentError> {
    let mut config =
        AgentConfig::for_node(state.node_id, dir.join("node.key"), dir.join("noise.key"));
    tune(&mut config);
    let mut agent = Agent::new(&config)?;
    agent.require_consent(Consent::load(dir)?);
    Ok(agent)
}

/// An agent in this process, as its controller sync sees it: `announce`
/// is told what each desired state changed.
pub struct FedAgent<'a> {
    /// The agent.
    pub agent: &'a mut Agent,
    /// Called with what each apply did.
    pub announce: fn(&Applied),
}

impl FedAgent<'_> {
    /// Applies the desired state cached in `dir`, if any: its version and
    /// the links refused (for the controller, once it is reached).
    pub async fn apply_cached(&mut self, dir: &Path) -> Synced {
        match comsat_node::agent::cached_desired(dir) {
            Some(cached) => Synced {
                version: cached.version,
                refused: Some(self.apply(&cached, &dir.join("relay-ca.pem")).await),
            },
            None => Synced::default(),
        }
    }
}

impl AgentSink for FedAgent<'_> {
    async fn apply(
        &mut self,
        desired: &api::AgentDesired,
        relay_ca: &Path,
    ) -> Vec<api::LinkRefusal> {
        let federated = comsat_node::agent::federated_domains(&desired.federated_bundles);
        let links = desired
            .links
            .iter()
            .map(|l| crate::config::from_desired(l, relay_ca, &federated))
            .collect();
        let applied = self.agent.apply(links).await;
        for (name, e) in &applied.failed {
            tracing::error!(link = %name, error = %e, "link cannot be set up");
        }
        (self.announce)(&applied);
        applied
            .refused
            .into_iter()
            .map(|(link, reason)| api::LinkRefusal { link, reason })
            .collect()
    }

    fn silent_relays(&mut self) -> Option<tokio::sync::mpsc::Receiver<RelayId>> {
        self.agent.silent_relays()
    }

    fn peer_moved(&mut self, link: LinkId, relay: RelayId) {
        self.agent.peer_moved(link, relay);
    }

    fn status_source(&self) -> comsat_node::agent::StatusSource {
        Box::new(self.agent.status_source())
    }

    fn flow_source(&self) -> comsat_node::agent::FlowSource {
        Box::new(self.agent.flow_records())
    }
}

/// Prints what applying a desired state did, in the machine-readable
/// lines the tests and scripts read.
pub fn announce(applied: &Applied) {
    for (name, addr) in &applied.listening {
        println!("comsat agent link {name} listening {addr}");
    }
    for name in &applied.removed {
        println!("comsat agent link {name} removed");
    }
    for (name, _) in &applied.failed {
        println!("comsat agent link {name} failed");
    }
    for (name, _) in &applied.refused {
        println!("comsat agent link {name} refused");
    }
}
