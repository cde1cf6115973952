//! A relay enrolled with a controller: its config from its data dir, and
//! the relay as the controller sync ([`comsat_node::relay`]) feeds it,
//! through its narrow trait.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use comsat_node::NodeState;
use comsat_node::relay::RelaySink;
use comsat_protocol::RelayId;
use comsat_protocol::api;
use comsat_protocol::grant::SignedGrant;

use crate::{Relay, RelayConfig, RelayError, RelayHandle};

impl RelayConfig {
    /// The config of the relay enrolled in `dir` (`state` read from it):
    /// its listeners as enrolled unless `listen` says otherwise, its
    /// certificate and key from the dir, grants fed by the controller.
    ///
    /// # Errors
    ///
    /// [`RelayError::Config`] naming the dir, with what
    /// [`NodeState::relay_listen`] says of its listeners.
    pub fn enrolled(
        dir: &Path,
        state: &NodeState,
        listen: Option<SocketAddr>,
        admin: Option<SocketAddr>,
    ) -> Result<Self, RelayError> {
        let (listen, lane) = state.relay_listen(listen).map_err(|e| RelayError::Config {
            path: dir.to_path_buf(),
            reason: format!("{e:#}"),
        })?;
        let mut cfg = Self::new(
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
}

/// A relay in this process, as its controller sync sees it.
pub struct FedRelay {
    handle: RelayHandle,
    load: Box<dyn Fn() -> api::RelayLoad + Send + Sync>,
    traffic: Box<dyn Fn(usize) -> Vec<api::LinkTraffic> + Send + Sync>,
}

impl FedRelay {
    /// `relay` (bound with [`Relay::bind_fed`]).
    pub fn new(relay: &Relay) -> Arc<Self> {
        Arc::new(Self {
            handle: relay.handle(),
            load: Box::new(relay.load_probe()),
            traffic: Box::new(relay.traffic_probe()),
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

    fn link_traffic(&self, max: usize) -> Vec<api::LinkTraffic> {
        (self.traffic)(max)
    }
}
