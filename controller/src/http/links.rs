//! Links: their checks, creation, changes and deletion.

use super::access::{delete, get, patch, post};
use crate::unix_now;
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use comsat_node::keys::RandomId;
use comsat_protocol::LinkId;
use comsat_protocol::api::{
    self, AgentLinkStatus, AgentRefusals, Empty, LinkInfo, LinkSpec, LinkUpdate, NodeKind,
};
use comsat_protocol::endpoint::{Endpoint, EndpointError};
use comsat_protocol::text::printable;

use super::access::{Audited, CallingNode, Policy, Routes};
use super::{AppState, parse_json};
use crate::audit::{Caller, Outcome};
use crate::state::ApiError;
use crate::store::LinkRecord;

/// Most uids or gids on one link.
const MAX_SELECTORS: usize = 64;

/// The link routes: path, who may call it, what its success records, and
/// the handler (a table: one route a line).
#[rustfmt::skip]
pub(super) fn routes(r: Routes) -> Routes {
    let (all, one) = (api::PATH_LINKS, &format!("{}/{{name}}", api::PATH_LINKS));
    r.add(all, Policy::api("links", "list"), get(list_links))
        .add(all, Policy::api("links", "create").audited("link.create"), post(create_link))
        .add(one, Policy::api("links", "get"), get(get_link))
        .add(one, Policy::api("links", "update").audited("link.update"), patch(update_link))
        .add(one, Policy::api("links", "delete").audited("link.delete"), delete(delete_link))
        .add(api::PATH_AGENT_REFUSALS, Policy::node(NodeKind::Agent), post(agent_refusals))
        .add(api::PATH_AGENT_LINK_STATUS, Policy::node(NodeKind::Agent), post(agent_link_status))
}

/// What an agent reports of the link halves it holds, in place of what it
/// said before (halves of links it no longer holds are left out): each
/// half that changed state is logged, one that failed as a warning.
async fn agent_link_status(
    State(state): State<AppState>,
    CallingNode(node): CallingNode,
    body: Bytes,
) -> Result<Json<Empty>, ApiError> {
    let req: AgentLinkStatus = parse_json(&body)?;
    if req.links.len() > api::MAX_STATUS_LINKS {
        return Err(ApiError::bad_request(format!(
            "more than {} link halves",
            api::MAX_STATUS_LINKS
        )));
    }
    if let Some(v) = super::nodes::checked_version(req.version.as_deref())? {
        state
            .store
            .set_version(&node.node_id, v, unix_now())
            .await?;
    }
    let links = state.store.links_of_agent(&node.node_id).await?;
    let mut halves = Vec::with_capacity(req.links.len());
    for mut h in req.links {
        if let Some(reason) = &mut h.reason {
            if reason.len() > api::MAX_STATUS_REASON_LEN {
                return Err(ApiError::bad_request(format!(
                    "the reason for link {} is longer than {} bytes",
                    h.link_id,
                    api::MAX_STATUS_REASON_LEN
                )));
            }
            *reason = printable(reason).into_owned();
        }
        if links.iter().any(|l| l.link_id == h.link_id) {
            halves.push(h);
        }
    }
    let changed = state
        .store
        .set_link_status(&node.node_id, &halves, unix_now())
        .await?;
    for c in changed {
        let name = links
            .iter()
            .find(|l| l.link_id == c.link_id)
            .map_or("?", |l| l.name.as_str());
        let reason = c.reason.as_deref().unwrap_or("");
        if c.state == api::HalfState::Failed {
            tracing::warn!(agent = %node.name, link = name, reason, "a link half failed at its agent");
        } else {
            tracing::info!(agent = %node.name, link = name, state = c.state.as_str(), reason, "a link half changed state");
        }
    }
    Ok(Json(Empty {}))
}

/// The links an agent refused (outside its owner's consent), replacing
/// what it said before: shown with the link, and each new refusal audited.
async fn agent_refusals(
    State(state): State<AppState>,
    caller: Caller,
    CallingNode(node): CallingNode,
    body: Bytes,
) -> Result<Json<Empty>, ApiError> {
    let req: AgentRefusals = parse_json(&body)?;
    if req.refused.len() > api::MAX_REFUSALS {
        return Err(ApiError::bad_request(format!(
            "more than {} refusals",
            api::MAX_REFUSALS
        )));
    }
    let links = state.store.links_of_agent(&node.node_id).await?;
    let mut refused: Vec<(LinkId, String)> = Vec::new();
    for r in &req.refused {
        if r.reason.len() > api::MAX_REFUSAL_REASON_LEN {
            return Err(ApiError::bad_request(format!(
                "the reason for link `{}` is longer than {} bytes",
                printable(&r.link),
                api::MAX_REFUSAL_REASON_LEN
            )));
        }
        // A link the agent no longer holds has gone meanwhile.
        let Some(link) = links.iter().find(|l| l.name == r.link) else {
            continue;
        };
        if !refused.iter().any(|(id, _)| *id == link.link_id) {
            refused.push((link.link_id, printable(&r.reason).into_owned()));
        }
    }
    let new = state
        .store
        .set_refusals(&node.node_id, &refused, unix_now())
        .await?;
    let subject = format!("agent:{}", node.name);
    for (link_id, reason) in new {
        let name = links
            .iter()
            .find(|l| l.link_id == link_id)
            .map_or("?", |l| l.name.as_str());
        tracing::warn!(agent = %node.name, link = name, reason, "an agent refused a link");
        let resource = format!("link/{name}");
        state
            .audit(
                &caller,
                &subject,
                "link.refuse",
                &resource,
                Outcome::Denied,
                Some(&reason),
            )
            .await;
    }
    Ok(Json(Empty {}))
}

fn check_link_name(name: &str) -> Result<(), ApiError> {
    if api::valid_name(name) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "link name `{name}` is not valid: 1 to {} characters of a-z, 0-9 and -, \
             not starting or ending with -",
            api::MAX_NAME_LEN
        )))
    }
}

/// A link's ends, in the one grammar of [`Endpoint`]: the listener on
/// loopback or a Unix socket, neither on port 0 (a link's ends are fixed;
/// an agent's own configuration may ask for any free port), and both
/// streams (`tcp://`, `unix://`) or both datagrams (`udp://`).
fn check_ends(listen: &str, target: &str) -> Result<(Endpoint, Endpoint), ApiError> {
    let fixed = |field: &str, e: Endpoint| match e.port() {
        Some(0) => Err(ApiError::bad_request(format!(
            "{field} `{e}`: port 0 is not a fixed port"
        ))),
        _ => Ok(e),
    };
    let bad =
        |field: &'static str| move |e: EndpointError| ApiError::bad_request(format!("{field} {e}"));
    let listen = fixed(
        "listen",
        Endpoint::parse_listen(listen).map_err(bad("listen"))?,
    )?;
    let target = fixed("target", Endpoint::parse(target).map_err(bad("target"))?)?;
    if listen.is_datagram() != target.is_datagram() {
        return Err(ApiError::bad_request(format!(
            "listen `{listen}` and target `{target}`: a link carries streams (tcp://, unix://) \
             or datagrams (udp://) end to end; make both ends udp:// or neither"
        )));
    }
    Ok((listen, target))
}

/// The answer about a link just changed: audited even if reading the
/// node names for it fails, since the change is made.
type Changed<T> = Result<(Audited, Result<T, ApiError>), ApiError>;

async fn create_link(
    State(state): State<AppState>,
    body: Bytes,
) -> Changed<(StatusCode, Json<LinkInfo>)> {
    let req: LinkSpec = parse_json(&body)?;
    check_link_name(&req.name)?;
    let (listen, _) = check_ends(&req.listen, &req.target)?;
    let max_flows = check_max_flows(req.max_flows)?;
    let rate_limit = check_rate_limit(req.rate_limit_bytes_per_sec)?;
    check_connection(req.connection.as_deref())?;
    if req.allowed_uids.len() > MAX_SELECTORS || req.allowed_gids.len() > MAX_SELECTORS {
        return Err(ApiError::bad_request(format!(
            "at most {MAX_SELECTORS} allowed_uids and {MAX_SELECTORS} allowed_gids"
        )));
    }
    if (!req.allowed_uids.is_empty() || !req.allowed_gids.is_empty())
        && listen.unix_path().is_none()
    {
        return Err(ApiError::bad_request(
            "allowed_uids and allowed_gids apply only to unix:// listeners",
        ));
    }
    comsat_protocol::workload::parse_rules(&req.allow)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    if (!req.allow.is_empty() || req.proxy_protocol) && listen.is_datagram() {
        return Err(ApiError::bad_request(
            "allow rules and proxy_protocol apply to tcp:// and unix:// links only",
        ));
    }
    if req.from == req.to {
        return Err(ApiError::bad_request(format!(
            "from and to are both `{}`: a link joins two different agents",
            req.from
        )));
    }
    let mut agents = Vec::new();
    for name in [&req.from, &req.to] {
        match state.store.node_by_name(NodeKind::Agent, name).await? {
            Some(a) => agents.push(a),
            None => {
                return Err(ApiError::not_found(format!(
                    "no agent named `{name}` is enrolled (see `comsat ctl agent list`)"
                )));
            }
        }
    }
    let (a, b) = (&agents[0], &agents[1]);
    let now = unix_now();
    let link = LinkRecord {
        link_id: LinkId::random(),
        name: req.name.clone(),
        generation: 1,
        from_node: a.node_id,
        listen: req.listen.clone(),
        to_node: b.node_id,
        target: req.target.clone(),
        allowed_uids: req.allowed_uids.clone(),
        allowed_gids: req.allowed_gids.clone(),
        allow: req.allow.clone(),
        proxy_protocol: req.proxy_protocol,
        relays: Vec::new(),
        created_at: now,
        grant_not_after: 0,
        max_flows,
        rate_limit,
        connection: req.connection.clone(),
    };
    let link = state.create_link(link, now).await?;
    let answer = state
        .link_info_of(&link)
        .await
        .map(|info| (StatusCode::CREATED, Json(info)));
    Ok((
        Audited::on(format!("link/{}", link.name)),
        answer.map_err(Into::into),
    ))
}

/// A link's `connection` name, if given.
fn check_connection(c: Option<&str>) -> Result<(), ApiError> {
    match c {
        Some(c) if !api::valid_connection_name(c) => Err(ApiError::bad_request(format!(
            "connection `{}`: use 1 to {} letters, digits, `-`, `_` or `.` (or none to share the agents' connection)",
            c.escape_debug(),
            api::MAX_CONNECTION_NAME_LEN
        ))),
        _ => Ok(()),
    }
}

/// Most concurrent flows a link may be given.
const MAX_FLOWS_LIMIT: u32 = 1_000_000;

/// Lowest rate limit, bytes per second: below it a link could not even
/// carry its own handshakes and acknowledgements in good time.
const MIN_RATE_LIMIT: u64 = 1024;

fn check_rate_limit(r: Option<u64>) -> Result<Option<u64>, ApiError> {
    match r {
        Some(r) if r < MIN_RATE_LIMIT || r > i64::MAX as u64 => {
            Err(ApiError::bad_request(format!(
                "rate_limit_bytes_per_sec {r}: use at least {MIN_RATE_LIMIT}, or leave it out for no limit"
            )))
        }
        r => Ok(r),
    }
}

fn check_max_flows(n: Option<u32>) -> Result<Option<u32>, ApiError> {
    match n {
        Some(n) if n == 0 || n > MAX_FLOWS_LIMIT => Err(ApiError::bad_request(format!(
            "max_flows {n}: use 1 to {MAX_FLOWS_LIMIT}, or leave it out for no limit"
        ))),
        n => Ok(n),
    }
}

async fn update_link(
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Changed<Json<LinkInfo>> {
    let req: LinkUpdate = parse_json(&body)?;
    if req.max_flows.is_none() && req.rate_limit_bytes_per_sec.is_none() && req.connection.is_none()
    {
        return Err(ApiError::bad_request(
            "nothing to change: give max_flows, rate_limit_bytes_per_sec (0 removes a limit) \
             and/or connection (\"\" for the shared one)",
        ));
    }
    check_max_flows(req.max_flows.filter(|n| *n > 0))?;
    check_rate_limit(req.rate_limit_bytes_per_sec.filter(|r| *r > 0))?;
    check_connection(req.connection.as_deref().filter(|c| !c.is_empty()))?;
    let missing = || ApiError::not_found(format!("no link named `{name}`"));
    let mut link = None;
    if req.max_flows.is_some() || req.rate_limit_bytes_per_sec.is_some() {
        link = Some(
            state
                .update_link_limits(&name, &req, unix_now())
                .await?
                .ok_or_else(missing)?,
        );
    }
    if let Some(c) = &req.connection {
        let connection = (!c.is_empty()).then(|| c.clone());
        link = Some(
            state
                .set_link_connection(&name, connection)
                .await?
                .ok_or_else(missing)?,
        );
    }
    let link = link.ok_or_else(missing)?;
    let answer = state.link_info_of(&link).await.map(Json);
    Ok((
        Audited::on(format!("link/{}", link.name)),
        answer.map_err(Into::into),
    ))
}

async fn list_links(State(state): State<AppState>) -> Result<Json<Vec<LinkInfo>>, ApiError> {
    let links = state.store.links().await?;
    Ok(Json(state.link_infos(&links).await?))
}

async fn get_link(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<LinkInfo>, ApiError> {
    let link = state
        .store
        .link_by_name(&name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no link named `{name}`")))?;
    Ok(Json(state.link_info_of(&link).await?))
}

async fn delete_link(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<(Audited, Json<Empty>), ApiError> {
    match state.delete_link(&name, unix_now()).await? {
        Some(link) => Ok((Audited::on(format!("link/{}", link.name)), Json(Empty {}))),
        None => Err(ApiError::not_found(format!("no link named `{name}`"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_and_target_specs() {
        for ok in [
            "tcp://127.0.0.1:7000",
            "tcp://[::1]:7000",
            "unix:///run/x.sock",
        ] {
            assert!(check_ends(ok, "tcp://db:1").is_ok(), "{ok}");
        }
        for bad in [
            "tcp://0.0.0.0:7000",
            "tcp://10.0.0.1:7000",
            "tcp://127.0.0.1:0",
            "tcp://localhost:7000",
            "unix://relative",
            "unix:///",
            "udp://0.0.0.0:1",
            "",
        ] {
            assert!(check_ends(bad, "tcp://db:1").is_err(), "{bad}");
        }
        for ok in [
            "tcp://db.internal:5432",
            "tcp://10.0.0.1:80",
            "tcp://[fe80::1]:80",
            "unix:///s",
        ] {
            assert!(check_ends("tcp://127.0.0.1:1", ok).is_ok(), "{ok}");
        }
        for bad in [
            "tcp://db",
            "tcp://:80",
            "tcp://db:0",
            "tcp://a b:1",
            "unix://x",
            "http://x:1",
        ] {
            assert!(check_ends("tcp://127.0.0.1:1", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_link_carries_streams_or_datagrams_at_both_ends() {
        assert!(check_ends("udp://127.0.0.1:5353", "udp://10.0.0.53:53").is_ok());
        assert!(check_ends("udp://[::1]:5353", "udp://dns.internal:53").is_ok());
        for (listen, target) in [
            ("udp://127.0.0.1:5353", "tcp://10.0.0.53:53"),
            ("tcp://127.0.0.1:5353", "udp://10.0.0.53:53"),
            ("unix:///run/dns.sock", "udp://10.0.0.53:53"),
            ("udp://127.0.0.1:0", "udp://10.0.0.53:53"),
            ("udp://0.0.0.0:5353", "udp://10.0.0.53:53"),
            ("udp://127.0.0.1:5353", "udp://10.0.0.53:0"),
        ] {
            assert!(check_ends(listen, target).is_err(), "{listen} -> {target}");
        }
        let e = check_ends("udp://127.0.0.1:5353", "tcp://10.0.0.53:53").expect_err("mixed");
        assert!(e.message.contains("both ends udp://"), "{}", e.message);
    }
}
