//! What relays and agents call (relay events, heartbeats and
//! certificates; agents' desired state), and enrolled nodes as operators
//! see them, with the status overview.

use std::collections::HashMap;
use std::time::Duration;

use super::access::{delete, get, post};
use crate::unix_now;
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use comsat_protocol::api::{
    self, AgentDesired, AgentInfo, AgentLink, CertRequest, CertResponse, Empty, NodeKind, PeerMove,
    RelayAddr, RelayEvent, RelayEventKind, RelayEvents, RelayHeartbeat, RelayInfo, RelaySilent,
    Status,
};
use comsat_protocol::{LinkId, RelayId, Side};
use serde::Deserialize;
use tokio::time::Instant;

use super::access::{Audited, CallingNode, Policy, Routes};
use super::enrol::relay_host;
use super::{AppState, parse_json, query};
use crate::audit::{Caller, Outcome};
use crate::pki;
use crate::state::{ApiError, Shared};
use crate::store::NodeRecord;

/// A long poll re-reads the database at least this often (changes made by
/// another controller sharing the database notify no one here).
const RECHECK: Duration = Duration::from_secs(5);

/// What relays and agents call, the node views and the status overview:
/// path, who may call it, what its success records, and the handler (a
/// table: one route a line).
#[rustfmt::skip]
pub(super) fn routes(r: Routes) -> Routes {
    let relay = || Policy::node(NodeKind::Relay);
    let mut r = r
        .add(api::PATH_RELAY_EVENTS, relay(), get(relay_events))
        .add(api::PATH_RELAY_HEARTBEAT, relay(), post(relay_heartbeat))
        .add(api::PATH_RELAY_CERT, relay().audited("relay.cert"), post(relay_cert))
        .add(api::PATH_AGENT_CONFIG, Policy::node(NodeKind::Agent), get(agent_config))
        .add(api::PATH_AGENT_RELAY_SILENT, Policy::node(NodeKind::Agent), post(relay_silent))
        .add(api::PATH_AGENT_SVID, Policy::node(NodeKind::Agent), post(agent_svid))
        .add(api::PATH_AGENTS, Policy::api("agents", "list"), get(list_agents))
        .add(api::PATH_RELAYS, Policy::api("relays", "list"), get(list_relays))
        .add(api::PATH_STATUS, Policy::api("status", "get"), get(status));
    for (kind, all) in [(NodeKind::Agent, api::PATH_AGENTS), (NodeKind::Relay, api::PATH_RELAYS)] {
        let (res, one) = (node_resource(kind), &format!("{all}/{{name}}"));
        let deleted = format!("{res}.delete");
        let get_one = move |st: State<AppState>, n: Path<String>| get_node(st, kind, n);
        let delete_one = move |st: State<AppState>, n: Path<String>| delete_node(st, kind, n);
        r = r
            .add(one, Policy::api(res, "get"), get(get_one))
            .add(one, Policy::api(res, "delete").audited(deleted), delete(delete_one));
    }
    r
}

#[derive(Debug, Deserialize)]
struct PollQuery {
    #[serde(default)]
    since: u64,
    #[serde(default)]
    wait_ms: u64,
}

/// Waits until something changes, the deadline passes, or the server
/// shuts down; `false` when it is time to answer.
async fn wait_change(
    changes: &mut tokio::sync::watch::Receiver<u64>,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
    deadline: Instant,
) -> bool {
    if *shutdown.borrow() || Instant::now() >= deadline {
        return false;
    }
    let recheck = Instant::now() + RECHECK;
    tokio::select! {
        r = changes.changed() => r.is_ok(),
        _ = shutdown.changed() => false,
        () = tokio::time::sleep_until(deadline.min(recheck)) => Instant::now() < deadline,
    }
}

fn deadline(wait_ms: u64) -> Instant {
    Instant::now() + Duration::from_millis(wait_ms.min(api::MAX_WAIT_MS))
}

async fn relay_events(
    State(state): State<AppState>,
    CallingNode(relay): CallingNode,
    q: Result<Query<PollQuery>, QueryRejection>,
) -> Result<Json<RelayEvents>, ApiError> {
    let q = query(q)?;
    let relay_id = RelayId(relay.node_id.0);
    state.relay_cursors().insert(relay_id, q.since);
    let _open = super::health::LongPoll::start("relay");
    let deadline = deadline(q.wait_ms);
    let mut changes = state.changes.subscribe();
    let mut shutdown = state.shutdown.clone();
    loop {
        changes.borrow_and_update();
        let mut rows = state
            .store
            .relay_events(&relay_id, q.since, api::MAX_EVENTS_PER_POLL + 1)
            .await?;
        if !rows.is_empty() {
            let more = rows.len() > api::MAX_EVENTS_PER_POLL;
            rows.truncate(api::MAX_EVENTS_PER_POLL);
            let next = rows.last().map_or(q.since, |e| e.seq);
            let events = rows
                .into_iter()
                .map(|e| RelayEvent {
                    seq: e.seq,
                    link_id: e.link_id,
                    kind: match e.grant_hex {
                        Some(grant) => RelayEventKind::Grant { grant },
                        None => RelayEventKind::Revoke,
                    },
                })
                .collect();
            return Ok(Json(RelayEvents { events, next, more }));
        }
        if !wait_change(&mut changes, &mut shutdown, deadline).await {
            // Nothing for this relay. A cursor beyond the log (the database
            // was replaced) is brought back to its end.
            let max = state.store.max_event_seq().await?;
            return Ok(Json(RelayEvents {
                events: Vec::new(),
                next: q.since.min(max),
                more: false,
            }));
        }
    }
}

async fn relay_heartbeat(
    State(state): State<AppState>,
    CallingNode(relay): CallingNode,
    caller: Caller,
    body: Bytes,
) -> Result<Json<Empty>, ApiError> {
    let hb: RelayHeartbeat = parse_json(&body)?;
    if hb.traffic.len() > api::MAX_TRAFFIC_PER_HEARTBEAT {
        return Err(ApiError::bad_request(format!(
            "a heartbeat reports at most {} links' traffic",
            api::MAX_TRAFFIC_PER_HEARTBEAT
        )));
    }
    let version = checked_version(hb.version.as_deref())?;
    if hb.clones.len() > api::MAX_CLONES_PER_HEARTBEAT
        || hb.clones.iter().any(|c| {
            c.source.len() > api::MAX_CLONE_SOURCE_LEN
                || c.other_source.len() > api::MAX_CLONE_SOURCE_LEN
        })
    {
        return Err(ApiError::bad_request(format!(
            "a heartbeat carries at most {} clone alarms, each source at most {} bytes",
            api::MAX_CLONES_PER_HEARTBEAT,
            api::MAX_CLONE_SOURCE_LEN
        )));
    }
    let now = unix_now();
    state.store.heartbeat(&relay.node_id, &hb.load, now).await?;
    if let Some(v) = version {
        state.store.set_version(&relay.node_id, v, now).await?;
    }
    if !hb.traffic.is_empty() {
        state
            .store
            .record_traffic(&relay.node_id, &hb.traffic, now)
            .await?;
    }
    audit_clones(&state, &caller, &relay, &hb).await?;
    Ok(Json(Empty {}))
}

/// A version a node reports: at most [`api::MAX_VERSION_LEN`] bytes of
/// printable ASCII, or refused.
pub(super) fn checked_version(v: Option<&str>) -> Result<Option<&str>, ApiError> {
    match v {
        Some(v)
            if v.is_empty()
                || v.len() > api::MAX_VERSION_LEN
                || !v.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            Err(ApiError::bad_request(format!(
                "version: 1 to {} printable ASCII characters",
                api::MAX_VERSION_LEN
            )))
        }
        v => Ok(v),
    }
}

/// Records a relay's clone alarms (one node key connected from two sources
/// at once) in the audit log, naming the node as the controller knows it.
async fn audit_clones(
    state: &Shared,
    caller: &Caller,
    relay: &NodeRecord,
    hb: &RelayHeartbeat,
) -> Result<(), ApiError> {
    let by = format!("relay/{}", relay.name);
    for c in &hb.clones {
        let node = match state.store.node(&c.node_id).await? {
            Some(n) => format!("{}/{}", n.kind, n.name),
            None => format!("node/{}", c.node_id),
        };
        tracing::warn!(relay = %relay.name, %node, source = %c.source, other_source = %c.other_source, "a relay saw one node key connected from two sources at once");
        let reason = format!(
            "connected from {} while connected from {} (at unix time {}): a copied key, or an agent that moved networks",
            c.source, c.other_source, c.at
        );
        state
            .audit(
                caller,
                &by,
                "node.clone",
                &node,
                Outcome::Alarm,
                Some(&reason),
            )
            .await;
    }
    if hb.clones_dropped > 0 {
        let reason = format!(
            "{} more clone alarms the relay could not keep",
            hb.clones_dropped
        );
        state
            .audit(
                caller,
                &by,
                "node.clone",
                "node/*",
                Outcome::Alarm,
                Some(&reason),
            )
            .await;
    }
    Ok(())
}

async fn relay_cert(
    State(state): State<AppState>,
    CallingNode(relay): CallingNode,
    body: Bytes,
) -> Result<(Audited, Json<CertResponse>), ApiError> {
    let req: CertRequest = parse_json(&body)?;
    if let Some(id) = &relay.spiffe_id {
        return Err(ApiError::bad_request(format!(
            "this relay is {id} and brings its own certificate: renew it where it was issued"
        )));
    }
    let addr = relay.public_addr.as_deref().unwrap_or_default();
    let host = relay_host(addr)?;
    let id = state.spiffe_id(NodeKind::Relay, &relay.name);
    let ttl = Duration::from_secs(state.config.relay_cert_ttl_secs);
    let cert_pem = state
        .relay_ca
        .issue_svid(
            &req.csr_pem,
            pki::Svid::Relay { host },
            &id,
            unix_now(),
            ttl,
        )
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    tracing::info!(relay = %relay.name, "relay certificate renewed");
    Ok((
        Audited::on(format!("relay/{}", relay.name)),
        Json(CertResponse { cert_pem }),
    ))
}

/// An agent's X.509-SVID (`spiffe://DOMAIN/agent/NAME`) for the key of its
/// CSR, valid for `agent_svid_ttl_secs`; it renews it before it runs out.
async fn agent_svid(
    State(state): State<AppState>,
    CallingNode(agent): CallingNode,
    body: Bytes,
) -> Result<Json<CertResponse>, ApiError> {
    let req: CertRequest = parse_json(&body)?;
    let id = state.spiffe_id(NodeKind::Agent, &agent.name);
    let ttl = Duration::from_secs(state.config.agent_svid_ttl_secs);
    let cert_pem = state
        .relay_ca
        .issue_svid(&req.csr_pem, pki::Svid::Agent, &id, unix_now(), ttl)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    tracing::debug!(agent = %agent.name, "agent SVID issued");
    Ok(Json(CertResponse { cert_pem }))
}

/// An agent's desired state: its half of each of its links.
async fn desired(state: &Shared, agent: &NodeRecord) -> Result<AgentDesired, ApiError> {
    let relays: HashMap<RelayId, NodeRecord> = state
        .store
        .nodes(NodeKind::Relay)
        .await?
        .into_iter()
        .map(|r| (r.relay_id(), r))
        .collect();
    let mut links = Vec::new();
    for link in state.store.links_of_agent(&agent.node_id).await? {
        let side = if link.from_node == agent.node_id {
            Side::A
        } else {
            Side::B
        };
        let peer_id = match side {
            Side::A => link.to_node,
            Side::B => link.from_node,
        };
        let Some(peer_noise) = state.store.node(&peer_id).await?.and_then(|p| p.noise_pub) else {
            tracing::warn!(link = %link.name, peer = %peer_id, "link peer has no Noise key; left out");
            continue;
        };
        let relay_addrs = link
            .relays
            .iter()
            .filter_map(|r| {
                let relay = relays.get(r)?;
                let addr = relay.public_addr.clone()?;
                let server_name = pki::host_of(&addr)?.to_owned();
                Some(RelayAddr {
                    relay_id: *r,
                    addr,
                    server_name,
                    interactive_addr: relay.interactive_addr.clone(),
                    spiffe_id: Some(state.node_spiffe_id(relay)),
                })
            })
            .collect();
        links.push(AgentLink {
            name: link.name.clone(),
            link_id: link.link_id,
            generation: link.generation,
            side,
            peer_noise_public_key: peer_noise,
            listen: (side == Side::A).then(|| link.listen.clone()),
            target: (side == Side::B).then(|| link.target.clone()),
            // Both sides: side B checks each flow's caller against them.
            allowed_uids: link.allowed_uids.clone(),
            allowed_gids: link.allowed_gids.clone(),
            allow: link.allow.clone(),
            proxy_protocol: side == Side::B && link.proxy_protocol,
            relays: relay_addrs,
            connection: link.connection.clone(),
        });
    }
    let since = unix_now().saturating_sub(api::PEER_MOVE_TTL_SECS);
    let peer_moves = state
        .store
        .peer_moves(&agent.node_id, since)
        .await?
        .into_iter()
        .map(|(link_id, relay_id, at)| PeerMove {
            link_id,
            relay_id,
            at,
        })
        .collect();
    Ok(AgentDesired {
        version: agent.config_version,
        links,
        relay_ca_pem: state.relay_ca.cert_pem().to_owned(),
        peer_moves,
        federated_bundles: state.store.bundles().await?,
    })
}

/// An agent left a relay that stopped answering: the peers of its links
/// there are told to leave it too (their desired state names the move),
/// so both meet on the next relay without the idle one waiting to notice
/// the silence itself. An agent moves only links it is a party to, and
/// only off relays they are placed on.
async fn relay_silent(
    State(state): State<AppState>,
    CallingNode(agent): CallingNode,
    body: Bytes,
) -> Result<Json<Empty>, ApiError> {
    let req: RelaySilent = parse_json(&body)?;
    let links: Vec<LinkId> = state
        .store
        .links_of_agent(&agent.node_id)
        .await?
        .into_iter()
        .filter(|l| l.relays.contains(&req.relay_id))
        .map(|l| l.link_id)
        .collect();
    if links.is_empty() {
        return Ok(Json(Empty {}));
    }
    let moved = state
        .store
        .record_peer_moves(&agent.node_id, &req.relay_id, &links, unix_now())
        .await?;
    if moved > 0 {
        tracing::info!(agent = %agent.name, relay = %req.relay_id, links = moved, "an agent left a relay that stopped answering; telling its peers");
        state.notify();
    }
    Ok(Json(Empty {}))
}

async fn agent_config(
    State(state): State<AppState>,
    CallingNode(mut agent): CallingNode,
    q: Result<Query<PollQuery>, QueryRejection>,
) -> Result<Json<AgentDesired>, ApiError> {
    let q = query(q)?;
    let _open = super::health::LongPoll::start("agent");
    let deadline = deadline(q.wait_ms);
    let mut changes = state.changes.subscribe();
    let mut shutdown = state.shutdown.clone();
    loop {
        changes.borrow_and_update();
        if let Some(fresh) = state.store.node(&agent.node_id).await? {
            agent = fresh;
        }
        if agent.config_version > q.since
            || !wait_change(&mut changes, &mut shutdown, deadline).await
        {
            if agent.config_version == q.since {
                // Nothing new: the agent keeps what it has.
                return Ok(Json(AgentDesired {
                    version: q.since,
                    ..AgentDesired::default()
                }));
            }
            return Ok(Json(desired(&state, &agent).await?));
        }
    }
}

async fn list_agents(State(state): State<AppState>) -> Result<Json<Vec<AgentInfo>>, ApiError> {
    let links = state.store.links().await?;
    let agents = state.store.nodes(NodeKind::Agent).await?;
    let versions = state.store.versions().await?;
    Ok(Json(
        agents
            .into_iter()
            .map(|a| AgentInfo {
                links: links
                    .iter()
                    .filter(|l| l.from_node == a.node_id || l.to_node == a.node_id)
                    .count() as u64,
                version: versions.get(&a.node_id).cloned(),
                spiffe_id: Some(state.spiffe_id(NodeKind::Agent, &a.name)),
                name: a.name,
                node_id: a.node_id,
                last_seen: a.last_seen,
            })
            .collect(),
    ))
}

async fn list_relays(State(state): State<AppState>) -> Result<Json<Vec<RelayInfo>>, ApiError> {
    let now = unix_now();
    let links = state.store.links().await?;
    let (relays, _) = state.relays(now).await?;
    let versions = state.store.versions().await?;
    Ok(Json(
        relays
            .into_iter()
            .map(|r| {
                let id = r.relay_id();
                RelayInfo {
                    healthy: state.healthy(&r, now),
                    version: versions.get(&r.node_id).cloned(),
                    links: links.iter().filter(|l| l.relays.contains(&id)).count() as u64,
                    spiffe_id: Some(state.node_spiffe_id(&r)),
                    name: r.name,
                    relay_id: id,
                    public_addr: r.public_addr.unwrap_or_default(),
                    interactive_addr: r.interactive_addr,
                    last_heartbeat: r.last_heartbeat,
                    load: r.load,
                }
            })
            .collect(),
    ))
}

fn node_resource(kind: NodeKind) -> &'static str {
    match kind {
        NodeKind::Agent => "agents",
        NodeKind::Relay => "relays",
    }
}

/// One enrolled node: what the lists show of it.
async fn get_node(
    State(state): State<AppState>,
    kind: NodeKind,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let node = state
        .store
        .node_by_name(kind, &name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no {kind} named `{name}`")))?;
    Ok(Json(serde_json::json!({
        "name": node.name,
        "node_id": node.node_id.to_string(),
        "kind": kind.as_str(),
        "spiffe_id": state.node_spiffe_id(&node),
        "public_addr": node.public_addr,
        "created_at": node.created_at,
        "last_seen": node.last_seen,
        "last_heartbeat": node.last_heartbeat,
    })))
}

/// Decommissions a node: its credentials stop working at once. An agent
/// must hold no link any more; a relay's links move to other relays.
async fn delete_node(
    State(state): State<AppState>,
    kind: NodeKind,
    Path(name): Path<String>,
) -> Result<(Audited, Json<Empty>), ApiError> {
    let _guard = state.link_lock.lock().await;
    let node = state
        .store
        .node_by_name(kind, &name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no {kind} named `{name}`")))?;
    if kind == NodeKind::Agent {
        let links = state.store.links_of_agent(&node.node_id).await?;
        if !links.is_empty() {
            let names: Vec<_> = links.iter().map(|l| l.name.as_str()).collect();
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "agent `{name}` still holds links {}: delete them first",
                    names.join(", ")
                ),
            ));
        }
    }
    state.store.delete_node(&node.node_id).await?;
    drop(_guard);
    state.notify();
    tracing::info!(%kind, name, "node decommissioned");
    Ok((Audited::on(format!("{kind}/{name}")), Json(Empty {})))
}

async fn status(State(state): State<AppState>) -> Result<Json<Status>, ApiError> {
    let now = unix_now();
    let agents = state.store.nodes(NodeKind::Agent).await?;
    let (relays, healthy) = state.relays(now).await?;
    let links = state.store.links().await?;
    Ok(Json(Status {
        agents: agents.len() as u64,
        relays: relays.len() as u64,
        healthy_relays: healthy.len() as u64,
        links: links.len() as u64,
        unassigned_links: links
            .iter()
            .filter(|l| {
                !l.relays
                    .iter()
                    .any(|r| healthy.iter().any(|c| c.relay_id == *r))
            })
            .count() as u64,
        trust_domain: Some(state.config.trust_domain()),
    }))
}
