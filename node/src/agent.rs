//! An enrolled agent kept in step with its controller: the desired state
//! (its links), applied to the agent in process and cached on disk.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::collections::HashSet;

use comsat_protocol::api;
use comsat_protocol::{LinkId, RelayId};

use crate::retry::{Retry, long_poll};
use crate::state::{NodeState, read_at_most, write_atomic};

/// Largest `desired.json` read.
const MAX_DESIRED_FILE: u64 = 8 * 1024 * 1024;

/// What an enrolled agent's controller sync feeds: the agent itself, in
/// the same process.
pub trait AgentSink: Send {
    /// Applies `desired` (the relays of its links chain to the CA in the
    /// file `relay_ca`); returns the links the agent refused, and why.
    fn apply(
        &mut self,
        desired: &api::AgentDesired,
        relay_ca: &Path,
    ) -> impl Future<Output = Vec<api::LinkRefusal>> + Send;

    /// The relays the agent leaves because they stopped answering, as it
    /// leaves them (taken once): the controller tells the peers.
    fn silent_relays(&mut self) -> Option<tokio::sync::mpsc::Receiver<RelayId>>;

    /// The peer of `link` left `relay`, which stopped answering it: a link
    /// still there follows it to its next relay.
    fn peer_moved(&mut self, link: LinkId, relay: RelayId);

    /// A function telling the state of every link half the agent holds
    /// now, for the controller.
    fn status_source(&self) -> StatusSource;

    /// A function taking up to N records of flows that ended, with how
    /// many were dropped since the last take, for the controller.
    fn flow_source(&self) -> FlowSource;
}

/// What [`AgentSink::status_source`] gives.
pub type StatusSource = Box<dyn Fn() -> Vec<api::HalfReport> + Send + Sync>;

/// What [`AgentSink::flow_source`] gives.
pub type FlowSource = Box<dyn Fn(usize) -> (Vec<api::FlowRecord>, u64) + Send + Sync>;

/// How often an agent sends the controller the flows that ended.
const FLOW_REPORT: Duration = Duration::from_secs(2);

/// How often the agent's link halves are looked at, to tell the controller
/// what changed.
const STATUS_CHECK: Duration = Duration::from_millis(500);

/// The longest wait between two tries to tell the controller.
const STATUS_RETRY_MAX: Duration = Duration::from_secs(30);

/// Where an agent keeps a federated trust domain's bundle: `DOMAIN.pem`
/// in `bundles/` beside its relay CA file `relay_ca`. `None` for what is
/// no trust domain (which could name no file).
pub fn bundle_file(relay_ca: &Path, domain: &str) -> Option<PathBuf> {
    comsat_protocol::spiffe::check_trust_domain(domain).ok()?;
    Some(
        relay_ca
            .with_file_name("bundles")
            .join(format!("{domain}.pem")),
    )
}

/// The trust domains of `bundles` an agent anchors relays at (valid ones,
/// whose [`bundle_file`] it can name; at most [`api::MAX_FEDERATED`]).
pub fn federated_domains(bundles: &[api::TrustBundle]) -> HashSet<String> {
    bundles
        .iter()
        .filter(|b| comsat_protocol::spiffe::check_trust_domain(&b.trust_domain).is_ok())
        .map(|b| b.trust_domain.clone())
        .take(api::MAX_FEDERATED)
        .collect()
}

/// Writes the federated bundles beside `relay_ca` and removes those of
/// trust domains no longer federated.
fn write_bundles(relay_ca: &Path, bundles: &[api::TrustBundle]) -> anyhow::Result<()> {
    let keep = federated_domains(bundles);
    let dir = relay_ca.with_file_name("bundles");
    std::fs::create_dir_all(&dir)?;
    for b in bundles.iter().filter(|b| keep.contains(&b.trust_domain)) {
        if let Some(path) = bundle_file(relay_ca, &b.trust_domain) {
            write_atomic(&path, b.bundle_pem.as_bytes())?;
        }
    }
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        let domain = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default();
        if path.extension().is_some_and(|e| e == "pem") && !keep.contains(domain) {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// The last desired state this agent applied, if any.
pub fn cached_desired(dir: &Path) -> Option<api::AgentDesired> {
    let text = read_at_most(&dir.join("desired.json"), MAX_DESIRED_FILE).ok()?;
    serde_json::from_str(&text).ok()
}

/// What an agent applied before its sync started (its cached desired
/// state), if anything.
#[derive(Debug, Default)]
pub struct Applied {
    /// The version applied (0: none).
    pub version: u64,
    /// The links it refused, to tell the controller; `None` if nothing was
    /// applied.
    pub refused: Option<Vec<api::LinkRefusal>>,
}

/// Follows the controller's desired state for this agent, forever,
/// starting from what it `applied` already.
pub async fn agent_sync(
    dir: PathBuf,
    state: NodeState,
    mut agent: impl AgentSink,
    applied: Applied,
) {
    let mut version = applied.version;
    let client = match state.client(&dir) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot talk to the controller; keeping the cached links");
            std::future::pending::<()>().await;
            return;
        }
    };
    if let Some(silent) = agent.silent_relays() {
        tokio::spawn(report_silent(client.clone(), silent));
    }
    let _status = AbortOnDrop(tokio::spawn(report_status(
        client.clone(),
        agent.status_source(),
    )));
    let _flows = AbortOnDrop(tokio::spawn(report_flows(
        client.clone(),
        agent.flow_source(),
    )));
    let _svid = AbortOnDrop(tokio::spawn(crate::svid::agent_svid(
        client.clone(),
        dir.clone(),
        state.clone(),
    )));
    let mut moves = Moves::default();
    let mut retry = Retry::new();
    // Refusals the controller has not taken yet: sent before each poll
    // (every time the agent applies a desired state, so an empty list clears
    // what it said before), again after an answer if the controller was away.
    let mut unsent = applied
        .refused
        .map(|refused| api::AgentRefusals { refused });
    loop {
        if let Some(refusals) = unsent.take() {
            unsent = report_refusals(&client, refusals).await;
        }
        let asked = tokio::time::Instant::now();
        let desired: api::AgentDesired = long_poll(
            &client,
            &mut retry,
            (api::PATH_AGENT_CONFIG, "this agent's links"),
            version,
            "keeping the current ones",
        )
        .await;
        if desired.version == version {
            // A controller that answers at once with nothing new is not
            // long-polling: do not spin on it.
            if asked.elapsed() < Duration::from_secs(1) {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            continue;
        }
        if let Err(e) = write_atomic(&dir.join("relay-ca.pem"), desired.relay_ca_pem.as_bytes()) {
            tracing::error!(error = %e, "cannot save the relay CA");
        }
        if let Err(e) = write_bundles(&dir.join("relay-ca.pem"), &desired.federated_bundles) {
            tracing::error!(error = %e, "cannot save the federated trust domains' bundles");
        }
        let refused = agent.apply(&desired, &dir.join("relay-ca.pem")).await;
        unsent = Some(api::AgentRefusals { refused });
        for m in moves.unseen(&desired.peer_moves) {
            tracing::info!(link = %m.link_id, relay = %m.relay_id, "the controller says a link's peer left a relay that stopped answering it");
            agent.peer_moved(m.link_id, m.relay_id);
        }
        match serde_json::to_vec(&desired) {
            Ok(bytes) => {
                if let Err(e) = write_atomic(&dir.join("desired.json"), &bytes) {
                    tracing::error!(error = %e, "cannot cache the desired state");
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot encode the desired state"),
        }
        tracing::info!(
            version = desired.version,
            links = desired.links.len(),
            "desired state applied"
        );
        version = desired.version;
    }
}

/// The peer moves already acted on (each is named in every desired state
/// for a while, [`api::PEER_MOVE_TTL_SECS`]).
#[derive(Default)]
struct Moves(HashSet<(LinkId, RelayId, u64)>);

impl Moves {
    /// Those of `named` not acted on before; forgets those no longer named.
    fn unseen<'a>(&mut self, named: &'a [api::PeerMove]) -> Vec<&'a api::PeerMove> {
        let key = |m: &api::PeerMove| (m.link_id, m.relay_id, m.at);
        let fresh = named.iter().filter(|m| !self.0.contains(&key(m))).collect();
        self.0 = named.iter().map(key).collect();
        fresh
    }
}

/// Tells the controller of each relay this agent left because it stopped
/// answering, so it tells the peers. One that cannot be told is let go:
/// the peers notice by themselves.
async fn report_silent(
    client: crate::client::Client,
    mut silent: tokio::sync::mpsc::Receiver<RelayId>,
) {
    while let Some(relay_id) = silent.recv().await {
        let sent: anyhow::Result<api::Empty> = client
            .post(
                api::PATH_AGENT_RELAY_SILENT,
                &api::RelaySilent { relay_id },
                "a relay left for silence",
            )
            .await;
        if let Err(e) = sent {
            tracing::warn!(error = %e, relay = %relay_id, "cannot tell the controller this agent left a silent relay; its peers notice by themselves");
        }
    }
}

/// Sends the controller the flows that ended, every [`FLOW_REPORT`] (at
/// once again while a full batch waits). A batch the controller did not
/// take is sent again, less often while it keeps failing; meanwhile the
/// agent's queue stays bounded (it drops its oldest and counts them).
async fn report_flows(client: crate::client::Client, source: FlowSource) {
    let mut pending: Option<api::AgentFlows> = None;
    let mut wait = FLOW_REPORT;
    loop {
        tokio::time::sleep(wait).await;
        loop {
            let batch = match pending.take() {
                Some(b) => b,
                None => {
                    let (flows, dropped) = source(api::MAX_FLOWS_PER_REPORT);
                    if flows.is_empty() && dropped == 0 {
                        break;
                    }
                    api::AgentFlows { flows, dropped }
                }
            };
            let full = batch.flows.len() == api::MAX_FLOWS_PER_REPORT;
            let sent: anyhow::Result<api::Empty> = client
                .post(api::PATH_AGENT_FLOWS, &batch, "flow records")
                .await;
            match sent {
                Ok(_) => {
                    wait = FLOW_REPORT;
                    if !full {
                        break;
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot send flow records to the controller; trying again");
                    pending = Some(batch);
                    wait = (wait * 2).min(STATUS_RETRY_MAX);
                    break;
                }
            }
        }
    }
}

/// Ends a task when dropped (the sync it serves stopped).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Tells the controller the state of this agent's link halves: whenever it
/// changes (looked at every [`STATUS_CHECK`]), and every
/// [`api::STATUS_REFRESH_SECS`] regardless, so that the controller can tell
/// a silent agent from a quiet one. A report the controller did not take
/// is sent again, less often while it keeps failing.
async fn report_status(client: crate::client::Client, source: StatusSource) {
    let refresh = Duration::from_secs(api::STATUS_REFRESH_SECS);
    let mut told: Option<(Vec<api::HalfReport>, tokio::time::Instant)> = None;
    let mut retry = STATUS_CHECK;
    let mut failing = false;
    loop {
        let now = source();
        let due = told
            .as_ref()
            .is_none_or(|(last, at)| *last != now || at.elapsed() >= refresh);
        if !due {
            tokio::time::sleep(STATUS_CHECK).await;
            continue;
        }
        // The version goes with reports until the controller took one.
        let body = api::AgentLinkStatus {
            links: now.clone(),
            version: told.is_none().then(|| env!("CARGO_PKG_VERSION").to_owned()),
        };
        let sent: anyhow::Result<api::Empty> = client
            .post(api::PATH_AGENT_LINK_STATUS, &body, "link status")
            .await;
        match sent {
            Ok(_) => {
                if failing {
                    tracing::info!("the controller takes this agent's link status again");
                }
                (failing, retry) = (false, STATUS_CHECK);
                told = Some((now, tokio::time::Instant::now()));
                tokio::time::sleep(STATUS_CHECK).await;
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "cannot tell the controller the state of this agent's links; trying again");
                }
                failing = true;
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(STATUS_RETRY_MAX);
            }
        }
    }
}

/// Tells the controller which links this agent refused (every time, so an
/// empty list clears what it said before); gives them back if it could
/// not.
async fn report_refusals(
    client: &crate::client::Client,
    refusals: api::AgentRefusals,
) -> Option<api::AgentRefusals> {
    let sent: anyhow::Result<api::Empty> = client
        .post(api::PATH_AGENT_REFUSALS, &refusals, "refused links")
        .await;
    match sent {
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(error = %e, "cannot tell the controller which links this agent refused; trying again after its next answer");
            Some(refusals)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn moved(link: LinkId, at: u64) -> api::PeerMove {
        api::PeerMove {
            link_id: link,
            relay_id: RelayId([7; 16]),
            at,
        }
    }

    #[test]
    fn a_peer_move_is_acted_on_once() {
        let (l1, l2) = (LinkId([1; 16]), LinkId([2; 16]));
        let mut moves = Moves::default();
        let first = [moved(l1, 10)];
        assert_eq!(moves.unseen(&first), vec![&first[0]]);
        // Named again in the next desired state: nothing new.
        assert!(moves.unseen(&first).is_empty());
        // A later move of the same link, and another link's.
        let next = [moved(l1, 10), moved(l1, 70), moved(l2, 70)];
        assert_eq!(moves.unseen(&next), vec![&next[1], &next[2]]);
        assert!(moves.unseen(&next).is_empty());
    }
}
