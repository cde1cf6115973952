//! What the agent's tasks share.

use std::sync::Arc;
use std::time::Duration;

use comsat_protocol::noise;
use comsat_protocol::{NodeId, NoiseSecretKey, RelayId, SigningKey};
use tokio::sync::{Semaphore, mpsc};

use crate::metrics::Metrics;

/// What the agent's tasks share.
pub(crate) struct Shared {
    pub(crate) node_id: NodeId,
    pub(crate) signing: SigningKey,
    pub(crate) noise: NoiseSecretKey,
    pub(crate) metrics: Metrics,
    /// Replay budget of the whole agent, in KiB of unacknowledged records.
    pub(crate) budget: Arc<Semaphore>,
    /// How long a lane stays up without flows.
    pub(crate) lane_idle: Duration,
    /// What this agent states in its Noise handshakes.
    pub(crate) noise_params: noise::Params,
    /// Messages that fail to decrypt under one session before it is
    /// replaced ([`crate::defaults::MAX_FORGERIES`]).
    pub(crate) max_forgeries: u64,
    /// How often an idle relay connection sends a keep-alive.
    pub(crate) keep_alive: Duration,
    /// Relays this agent left because they stopped answering, for whoever
    /// tells the peers ([`crate::Agent::silent_relays`]); dropped when
    /// nobody takes them.
    pub(crate) silent: mpsc::Sender<RelayId>,
    /// Flows that ended, for the log and the controller.
    pub(crate) flow_log: Arc<crate::flowlog::FlowLog>,
}
