//! The flow log: agents report the flows that ended; operators query them.

use std::collections::HashMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use comsat_protocol::api::{self, AgentFlows, Empty, FlowInfo, NodeKind};
use comsat_protocol::text::printable;
use comsat_protocol::{NodeId, RelayId};
use serde::Deserialize;

use super::access::{CallingNode, Policy, Routes, get, post};
use super::{AppState, parse_json, query};
use crate::state::ApiError;
use crate::store::FlowQuery;

/// The flow log's routes.
#[rustfmt::skip]
pub(super) fn routes(r: Routes) -> Routes {
    r.add(api::PATH_AGENT_FLOWS, Policy::node(NodeKind::Agent), post(agent_flows))
        .add(api::PATH_FLOWS, Policy::api("flows", "list"), get(list_flows))
}

/// Keeps what an agent reports of its flows: records of links it holds
/// only (an agent writes nothing into another's links' log).
async fn agent_flows(
    State(state): State<AppState>,
    CallingNode(node): CallingNode,
    body: Bytes,
) -> Result<Json<Empty>, ApiError> {
    let req: AgentFlows = parse_json(&body)?;
    if req.flows.len() > api::MAX_FLOWS_PER_REPORT {
        return Err(ApiError::bad_request(format!(
            "more than {} flow records",
            api::MAX_FLOWS_PER_REPORT
        )));
    }
    if req.dropped > 0 {
        tracing::warn!(agent = %node.name, dropped = req.dropped, "an agent dropped flow records the controller took too slowly");
    }
    // A record that fails its checks is left out (and said), not the
    // batch: the agent would send it again and again.
    let (flows, bad): (Vec<_>, Vec<_>) = req.flows.into_iter().partition(|f| f.check().is_ok());
    if let Some(Err(why)) = bad.first().map(api::FlowRecord::check) {
        tracing::warn!(agent = %node.name, refused = bad.len(), first = %printable(&why), "flow records out of their limits left out");
    }
    let links = state.store.links_of_agent(&node.node_id).await?;
    let flows: Vec<_> = flows
        .into_iter()
        .filter(|f| links.iter().any(|l| l.link_id == f.link_id))
        .collect();
    state.store.add_flows(&node.node_id, &flows).await?;
    Ok(Json(Empty {}))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FlowsQuery {
    /// A link's name.
    #[serde(default)]
    link: Option<String>,
    /// A SPIFFE ID or a selector.
    #[serde(default)]
    identity: Option<String>,
    /// Unix milliseconds.
    #[serde(default)]
    since: Option<u64>,
    /// Unix milliseconds.
    #[serde(default)]
    until: Option<u64>,
    #[serde(default)]
    limit: Option<usize>,
}

async fn list_flows(
    State(state): State<AppState>,
    q: Result<Query<FlowsQuery>, QueryRejection>,
) -> Result<Json<Vec<FlowInfo>>, ApiError> {
    let q = query(q)?;
    if let Some(id) = q.identity.as_deref() {
        let valid = if id.starts_with("spiffe:") {
            comsat_protocol::workload::check_spiffe_id(id)
        } else {
            comsat_protocol::workload::Selector::parse(id).map(|_| ())
        };
        valid.map_err(|e| {
            ApiError::bad_request(format!(
                "identity `{}`: {e}; give a SPIFFE ID or a selector like unix:uid:1000",
                id.escape_debug()
            ))
        })?;
    }
    let link = match q.link.as_deref() {
        Some(name) => match state.store.link_by_name(name).await? {
            Some(l) => Some(l.link_id),
            None => return Ok(Json(Vec::new())),
        },
        None => None,
    };
    let limit = q.limit.unwrap_or(1000).clamp(1, api::MAX_FLOWS_PER_QUERY);
    let records = state
        .store
        .flows(&FlowQuery {
            link,
            identity: q.identity,
            since_ms: q.since.unwrap_or(0),
            until_ms: q.until.unwrap_or(u64::MAX >> 1),
            limit: u32::try_from(limit).unwrap_or(u32::MAX),
        })
        .await?;
    let mut names: HashMap<NodeId, String> = HashMap::new();
    for kind in [NodeKind::Agent, NodeKind::Relay] {
        for n in state.store.nodes(kind).await? {
            names.insert(n.node_id, n.name);
        }
    }
    let links: HashMap<_, _> = state
        .store
        .links()
        .await?
        .into_iter()
        .map(|l| (l.link_id, l.name))
        .collect();
    let name = |id: &NodeId| names.get(id).cloned().unwrap_or_else(|| id.to_string());
    Ok(Json(
        records
            .into_iter()
            .map(|(agent, record)| FlowInfo {
                link: links
                    .get(&record.link_id)
                    .cloned()
                    .unwrap_or_else(|| record.link_id.to_string()),
                agent: name(&agent),
                relay: record.relay_id.map(|r: RelayId| name(&NodeId(r.0))),
                record,
            })
            .collect(),
    ))
}
