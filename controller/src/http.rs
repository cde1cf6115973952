//! The HTTPS API ([`comsat_protocol::api`]): routes, authentication and
//! handlers.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};

use crate::audit::{Caller, Outcome, Verdict};
use crate::rbac;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use comsat_protocol::api::AuditRecord;
use comsat_protocol::api::{
    self, AgentDesired, AgentInfo, AgentLink, CertRequest, CertResponse, Empty, EnrolRequest,
    EnrolResponse, JoinToken, LinkCreate, LinkInfo, LinkUpdate, NodeKind, RelayAddr, RelayEvent,
    RelayEventKind, RelayEvents, RelayHeartbeat, RelayInfo, Status, TokenCreate, TokenCreated,
};
use comsat_protocol::api::{
    PrincipalCreate, PrincipalCreated, PrincipalInfo, PrincipalKind, RoleBindingCreate,
    RoleBindingInfo, RoleCreate, RoleInfo, Rule,
};
use comsat_protocol::jwt::{self, unix_now};
use comsat_protocol::{LinkId, NodeId, RelayId, Side};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::init::token_hash;
use crate::pki;
use crate::state::{ApiError, Shared};
use crate::store::{
    LinkRecord, NewApiToken, NewJoinToken, NewNode, NodeRecord, Redemption, StoreError,
};

type AppState = Arc<Shared>;

/// Default join token lifetime.
const DEFAULT_TOKEN_TTL_SECS: u64 = 3600;
/// Longest join token lifetime.
const MAX_TOKEN_TTL_SECS: u64 = 30 * 86_400;
/// Most uids or gids on one link.
const MAX_SELECTORS: usize = 64;
/// Longest listen or target spec.
const MAX_SPEC_LEN: usize = 512;
/// A long poll re-reads the database at least this often (changes made by
/// another controller sharing the database notify no one here).
const RECHECK: Duration = Duration::from_secs(5);

/// The API's routes.
pub(crate) fn router(state: AppState) -> Router {
    Router::new()
        .route(api::PATH_CA, get(get_ca))
        .route(api::PATH_ENROL, post(enrol))
        .route(api::PATH_RELAY_EVENTS, get(relay_events))
        .route(api::PATH_RELAY_HEARTBEAT, post(relay_heartbeat))
        .route(api::PATH_RELAY_CERT, post(relay_cert))
        .route(api::PATH_AGENT_CONFIG, get(agent_config))
        .route(api::PATH_TOKENS, post(create_token))
        .route(api::PATH_AGENTS, get(list_agents))
        .route(api::PATH_RELAYS, get(list_relays))
        .route(api::PATH_LINKS, get(list_links).post(create_link))
        .route(
            &format!("{}/{{name}}", api::PATH_LINKS),
            get(get_link).patch(update_link).delete(delete_link),
        )
        .route(api::PATH_STATUS, get(status))
        .route(api::PATH_AUDIT, get(audit_list))
        .route(
            &format!("{}/{{name}}", api::PATH_AGENTS),
            get(|st: State<AppState>, c: Caller, n: Path<String>| {
                get_node(st, c, NodeKind::Agent, n)
            })
            .delete(|st: State<AppState>, c: Caller, n: Path<String>| {
                delete_node(st, c, NodeKind::Agent, n)
            }),
        )
        .route(
            &format!("{}/{{name}}", api::PATH_RELAYS),
            get(|st: State<AppState>, c: Caller, n: Path<String>| {
                get_node(st, c, NodeKind::Relay, n)
            })
            .delete(|st: State<AppState>, c: Caller, n: Path<String>| {
                delete_node(st, c, NodeKind::Relay, n)
            }),
        )
        .route(api::PATH_OPEN_TOKENS, get(list_open_tokens))
        .route(api::PATH_ROLES, get(list_roles).post(create_role))
        .route(
            &format!("{}/{{name}}", api::PATH_ROLES),
            get(get_role).delete(delete_role),
        )
        .route(
            api::PATH_ROLE_BINDINGS,
            get(list_bindings).post(create_binding),
        )
        .route(
            &format!("{}/{{name}}", api::PATH_ROLE_BINDINGS),
            get(get_binding).delete(delete_binding),
        )
        .merge(principal_routes(PrincipalKind::ServiceAccount))
        .merge(principal_routes(PrincipalKind::User))
        .fallback(|| async { ApiError::not_found("no such API path") })
        .layer(DefaultBodyLimit::max(api::MAX_BODY_LEN))
        .with_state(state)
}

/// Parses a JSON body read as bytes (after the caller was authenticated:
/// a stranger learns nothing from the parser's messages).
fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(t)| t)
        .map_err(|e| ApiError::bad_request(format!("invalid query: {}", e.body_text())))
}

fn bearer(headers: &HeaderMap) -> Result<&str, &'static str> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or("no `Authorization: Bearer …` header")?;
    let value = value
        .to_str()
        .map_err(|_| "Authorization header is not ASCII")?;
    match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => Ok(token.trim()),
        _ => Err("Authorization header is not `Bearer <token>`"),
    }
}

/// What every refused authentication answers: the real reason goes to the
/// audit log only.
const UNAUTHORIZED: &str = "unauthorized (the controller's audit log has the reason)";

/// Refuses a caller whose source has failed too often, before looking at
/// its credentials.
fn check_not_limited(state: &Shared, caller: &Caller) -> Result<(), ApiError> {
    if state.auth_limit.exhausted(caller.ip()) {
        return Err(ApiError::too_many());
    }
    Ok(())
}

/// Records a refused authentication (and the source running out of
/// attempts, once) and answers the uniform 401.
async fn refuse_auth(state: &Shared, caller: &Caller, subject: &str, reason: &str) -> ApiError {
    tracing::warn!(source = ?caller.source(), subject, reason, path = %caller.path, "refused an authentication");
    state
        .audit(
            caller,
            subject,
            "authenticate",
            &caller.path,
            Outcome::Denied,
            Some(reason),
        )
        .await;
    if state.auth_limit.take(caller.ip()) == (Verdict::Limited { first: true }) {
        state
            .audit(
                caller,
                subject,
                "authenticate",
                &caller.path,
                Outcome::Denied,
                Some("rate limited: too many failed authentications from this address"),
            )
            .await;
    }
    ApiError::unauthorized(UNAUTHORIZED)
}

/// The user or service account an API token stands for.
pub(crate) struct Principal {
    kind: PrincipalKind,
    name: String,
}

impl Principal {
    fn subject(&self) -> String {
        format!("{}:{}", self.kind, self.name)
    }
}

/// Authenticates an API token: known, not revoked, not expired.
async fn authenticate_api(state: &Shared, caller: &Caller) -> Result<Principal, ApiError> {
    check_not_limited(state, caller)?;
    let token = match bearer(&caller.headers) {
        Ok(t) => t,
        Err(reason) => return Err(refuse_auth(state, caller, "anonymous", reason).await),
    };
    let Some(rec) = state.store.api_token(&token_hash(token)).await? else {
        return Err(refuse_auth(state, caller, "anonymous", "unknown API token").await);
    };
    let subject = format!("{}:{}", rec.kind, rec.name);
    if rec.revoked_at.is_some() {
        let reason = format!("API token {} was revoked", rec.id);
        return Err(refuse_auth(state, caller, &subject, &reason).await);
    }
    if rec.expires_at.is_some_and(|t| t <= unix_now()) {
        let reason = format!("API token {} expired", rec.id);
        return Err(refuse_auth(state, caller, &subject, &reason).await);
    }
    Ok(Principal {
        kind: rec.kind,
        name: rec.name,
    })
}

/// The rules of every role bound to `p` (a binding to a role that does not
/// exist gives nothing).
async fn rules_of(state: &Shared, p: &Principal) -> Result<Vec<Rule>, ApiError> {
    let mut rules = Vec::new();
    for role in state.store.roles_of(p.kind, &p.name).await? {
        if let Some(r) = rbac::builtin(&role) {
            rules.extend(r);
        } else if let Some(json) = state.store.role(&role).await? {
            match serde_json::from_str::<Vec<Rule>>(&json) {
                Ok(r) => rules.extend(r),
                Err(e) => {
                    tracing::error!(role, error = %e, "a stored role does not parse; it grants nothing")
                }
            }
        }
    }
    Ok(rules)
}

/// Checks that `p` may `verb` on `resource`; a refusal is audited and
/// names the missing permission. Returns the subject.
async fn check_permission(
    state: &Shared,
    caller: &Caller,
    p: &Principal,
    resource: &str,
    verb: &str,
) -> Result<String, ApiError> {
    let subject = p.subject();
    if rbac::allows(&rules_of(state, p).await?, resource, verb) {
        return Ok(subject);
    }
    let missing = format!("`{verb}` on `{resource}`");
    state
        .audit(
            caller,
            &subject,
            &format!("{resource}.{verb}"),
            &caller.path,
            Outcome::Denied,
            Some(&format!("no role bound to {subject} allows {missing}")),
        )
        .await;
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        format!("forbidden: {subject} lacks the permission {missing}; bind it a role that has it"),
    ))
}

/// Authenticates an API token and checks its permission.
async fn authorize(
    state: &Shared,
    caller: &Caller,
    resource: &str,
    verb: &str,
) -> Result<String, ApiError> {
    let p = authenticate_api(state, caller).await?;
    check_permission(state, caller, &p, resource, verb).await
}

/// Checks a node JWT: its node exists and is of `kind`, the signature and
/// claims verify, and its `jti` was never seen (recorded in the database,
/// so this holds across restarts).
async fn auth_node(
    state: &Shared,
    caller: &Caller,
    kind: NodeKind,
) -> Result<NodeRecord, ApiError> {
    check_not_limited(state, caller)?;
    let refuse = async |node: Option<&NodeId>, reason: String| {
        let subject = node.map_or_else(|| "anonymous".to_owned(), |n| format!("node:{n}"));
        refuse_auth(state, caller, &subject, &reason).await
    };
    let token = match bearer(&caller.headers) {
        Ok(t) => t,
        Err(reason) => return Err(refuse(None, reason.to_owned()).await),
    };
    let claimed = match jwt::claimed_node(token) {
        Ok(c) => c,
        Err(e) => return Err(refuse(None, e.to_string()).await),
    };
    let node = match state.store.node(&claimed).await? {
        Some(n) if n.kind == kind => n,
        Some(n) => {
            return Err(refuse(
                Some(&claimed),
                format!(
                    "node {claimed} is a {}; this endpoint is for {kind}s",
                    n.kind
                ),
            )
            .await);
        }
        None => {
            return Err(refuse(
                Some(&claimed),
                format!("JWT names node {claimed}, which is not enrolled here"),
            )
            .await);
        }
    };
    let now = unix_now();
    let leeway = state.config.jwt_leeway_secs;
    let claims = match jwt::verify(
        token,
        &node.node_id,
        &node.sign_pub,
        &state.audience,
        now,
        leeway,
    ) {
        Ok(c) => c,
        Err(e) => return Err(refuse(Some(&claimed), e.to_string()).await),
    };
    let fresh = state
        .store
        .record_jti(
            &claims.jti,
            &node.node_id,
            claims.exp.saturating_add(leeway),
        )
        .await?;
    if !fresh {
        return Err(refuse(
            Some(&claimed),
            "JWT replayed: its jti was already used".into(),
        )
        .await);
    }
    state.store.touch_node(&node.node_id, now).await?;
    Ok(node)
}

async fn get_ca(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        state.ca_pem.clone(),
    )
        .into_response()
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
}

async fn create_token(
    State(state): State<AppState>,
    caller: Caller,
    body: Bytes,
) -> Result<Json<TokenCreated>, ApiError> {
    let principal = authenticate_api(&state, &caller).await?;
    let req: TokenCreate = parse_json(&body)?;
    let subject = check_permission(
        &state,
        &caller,
        &principal,
        &format!("tokens/{}", req.kind),
        "create",
    )
    .await?;
    let ttl = req.ttl_secs.unwrap_or(DEFAULT_TOKEN_TTL_SECS);
    if ttl == 0 || ttl > MAX_TOKEN_TTL_SECS {
        return Err(ApiError::bad_request(format!(
            "ttl_secs must be 1 to {MAX_TOKEN_TTL_SECS} (30 days)"
        )));
    }
    if let Some(name) = &req.name {
        if !api::valid_name(name) {
            return Err(ApiError::bad_request(format!(
                "name `{name}` is not valid: 1 to {} characters of a-z, 0-9 and -, \
                 not starting or ending with -",
                api::MAX_NAME_LEN
            )));
        }
        if state.store.node_by_name(req.kind, name).await?.is_some() {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("a {} named `{name}` is already enrolled", req.kind),
            ));
        }
    }
    let now = unix_now();
    let token = JoinToken {
        id: hex::encode(rand::random::<[u8; 8]>()),
        secret: hex::encode(rand::random::<[u8; 32]>()),
        ca_sha256: state.ca_sha256,
        url: state.config.public_url.clone(),
    };
    let expires_at = now.saturating_add(ttl);
    state
        .store
        .create_join_token(&NewJoinToken {
            id: token.id.clone(),
            secret_hash: hex::encode(Sha256::digest(token.secret.as_bytes())),
            kind: req.kind,
            name: req.name.clone(),
            expires_at,
            created_at: now,
        })
        .await?;
    tracing::info!(token_id = %token.id, kind = %req.kind, name = ?req.name, expires_at, "join token created");
    state
        .audit(
            &caller,
            &subject,
            "token.create",
            &format!("token/{}", token.id),
            Outcome::Ok,
            None,
        )
        .await;
    Ok(Json(TokenCreated {
        token: token.encode(),
        expires_at,
    }))
}

/// The host of a relay's `public_addr`, checked.
fn relay_host(public_addr: &str) -> Result<&str, ApiError> {
    pki::host_of(public_addr)
        .filter(|h| pki::valid_host(h))
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "public_addr `{public_addr}` must be HOST:PORT (a DNS name or IP; IPv6 in [])"
            ))
        })
}

/// A relay's `interactive_addr`: `HOST:PORT` on the host of its
/// `public_addr` (its certificate names that host) and another port.
fn check_interactive_addr(public_addr: &str, host: &str, lane: &str) -> Result<(), ApiError> {
    let port = |a: &str| a.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok());
    if pki::host_of(lane) != Some(host) || port(lane).is_none() {
        return Err(ApiError::bad_request(format!(
            "interactive_addr `{lane}` must be HOST:PORT with the host of public_addr `{public_addr}` \
             (the relay's certificate names that host)"
        )));
    }
    if port(lane) == port(public_addr) {
        return Err(ApiError::bad_request(format!(
            "interactive_addr `{lane}` is public_addr: the interactive listener needs a port of its own"
        )));
    }
    Ok(())
}

/// What a refused enrolment answers, whatever the reason (the audit log
/// has it).
const ENROL_REFUSED: &str = "join token refused (unknown, used, expired or for another kind of node: \
     the controller's audit log says which)";

async fn enrol(
    State(state): State<AppState>,
    caller: Caller,
    body: Bytes,
) -> Result<Json<EnrolResponse>, ApiError> {
    if let Verdict::Limited { first } = state.enrol_limit.take(caller.ip()) {
        if first {
            state
                .audit(
                    &caller,
                    "anonymous",
                    "enrol",
                    &caller.path,
                    Outcome::Denied,
                    Some("rate limited: too many enrolment attempts from this address"),
                )
                .await;
        }
        return Err(ApiError::too_many());
    }
    let req: EnrolRequest = parse_json(&body)?;
    let now = unix_now();
    let node_id = NodeId::random();
    let mut cert_pem = None;
    match req.kind {
        NodeKind::Agent => {
            if req.noise_public_key.is_none() {
                return Err(ApiError::bad_request("an agent must send noise_public_key"));
            }
        }
        NodeKind::Relay => {
            let (Some(addr), Some(csr)) = (&req.public_addr, &req.csr_pem) else {
                return Err(ApiError::bad_request(
                    "a relay must send public_addr (HOST:PORT agents dial) and csr_pem",
                ));
            };
            let host = relay_host(addr)?;
            if let Some(lane) = &req.interactive_addr {
                check_interactive_addr(addr, host, lane)?;
            }
            // Issued now but only handed out if the token redeems.
            let cert = state
                .relay_ca
                .issue_for_csr(
                    csr,
                    host,
                    &RelayId(node_id.0),
                    now,
                    Duration::from_secs(state.config.relay_cert_ttl_secs),
                )
                .map_err(|e| ApiError::bad_request(e.to_string()))?;
            cert_pem = Some(cert);
        }
    }
    if !is_lower_hex(&req.token_id, 16) || !is_lower_hex(&req.secret, 64) {
        state
            .audit(
                &caller,
                "anonymous",
                "enrol",
                "token/?",
                Outcome::Denied,
                Some("malformed join token"),
            )
            .await;
        return Err(ApiError::unauthorized(ENROL_REFUSED));
    }
    let resource = format!("token/{}", req.token_id);
    let redemption = Redemption {
        token_id: req.token_id.clone(),
        secret_hash: hex::encode(Sha256::digest(req.secret.as_bytes())),
        kind: req.kind,
        now,
    };
    let node = NewNode {
        node_id,
        sign_pub: req.sign_public_key,
        noise_pub: match req.kind {
            NodeKind::Agent => req.noise_public_key,
            NodeKind::Relay => None,
        },
        public_addr: match req.kind {
            NodeKind::Agent => None,
            NodeKind::Relay => req.public_addr.clone(),
        },
        interactive_addr: match req.kind {
            NodeKind::Agent => None,
            NodeKind::Relay => req.interactive_addr.clone(),
        },
    };
    let record = match state.store.redeem_join_token(&redemption, &node).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(token_id = %req.token_id, kind = %req.kind, reason = %e, "enrolment refused");
            let refused = matches!(
                e,
                StoreError::UnknownToken
                    | StoreError::TokenUsed
                    | StoreError::TokenExpired
                    | StoreError::WrongKind { .. }
            );
            if !refused {
                return Err(e.into());
            }
            state
                .audit(
                    &caller,
                    "anonymous",
                    "enrol",
                    &resource,
                    Outcome::Denied,
                    Some(&format!("{e} (a {} tried it)", req.kind)),
                )
                .await;
            return Err(ApiError::unauthorized(ENROL_REFUSED));
        }
    };
    tracing::info!(kind = %record.kind, name = %record.name, node_id = %record.node_id, "node enrolled");
    state
        .audit(
            &caller,
            &format!("{}:{}", record.kind, record.name),
            "enrol",
            &resource,
            Outcome::Ok,
            None,
        )
        .await;
    Ok(Json(EnrolResponse {
        node_id: record.node_id,
        name: record.name,
        authority_public_key: state.authority.public(),
        audience: state.audience.clone(),
        relay_ca_pem: state.relay_ca.cert_pem().to_owned(),
        cert_pem,
    }))
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
    caller: Caller,
    q: Result<Query<PollQuery>, QueryRejection>,
) -> Result<Json<RelayEvents>, ApiError> {
    let q = query(q)?;
    let relay = auth_node(&state, &caller, NodeKind::Relay).await?;
    let relay_id = RelayId(relay.node_id.0);
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
    caller: Caller,
    body: Bytes,
) -> Result<Json<Empty>, ApiError> {
    let relay = auth_node(&state, &caller, NodeKind::Relay).await?;
    let hb: RelayHeartbeat = parse_json(&body)?;
    state
        .store
        .heartbeat(&relay.node_id, &hb.load, unix_now())
        .await?;
    Ok(Json(Empty {}))
}

async fn relay_cert(
    State(state): State<AppState>,
    caller: Caller,
    body: Bytes,
) -> Result<Json<CertResponse>, ApiError> {
    let relay = auth_node(&state, &caller, NodeKind::Relay).await?;
    let req: CertRequest = parse_json(&body)?;
    let addr = relay.public_addr.as_deref().unwrap_or_default();
    let host = relay_host(addr)?;
    let cert_pem = state
        .relay_ca
        .issue_for_csr(
            &req.csr_pem,
            host,
            &RelayId(relay.node_id.0),
            unix_now(),
            Duration::from_secs(state.config.relay_cert_ttl_secs),
        )
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    tracing::info!(relay = %relay.name, "relay certificate renewed");
    state
        .audit(
            &caller,
            &format!("relay:{}", relay.name),
            "relay.cert",
            &format!("relay/{}", relay.name),
            Outcome::Ok,
            None,
        )
        .await;
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
            allowed_uids: if side == Side::A {
                link.allowed_uids.clone()
            } else {
                Vec::new()
            },
            allowed_gids: if side == Side::A {
                link.allowed_gids.clone()
            } else {
                Vec::new()
            },
            relays: relay_addrs,
            connection: link.connection.clone(),
        });
    }
    Ok(AgentDesired {
        version: agent.config_version,
        links,
        relay_ca_pem: state.relay_ca.cert_pem().to_owned(),
    })
}

async fn agent_config(
    State(state): State<AppState>,
    caller: Caller,
    q: Result<Query<PollQuery>, QueryRejection>,
) -> Result<Json<AgentDesired>, ApiError> {
    let q = query(q)?;
    let mut agent = auth_node(&state, &caller, NodeKind::Agent).await?;
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
            return Ok(Json(desired(&state, &agent).await?));
        }
    }
}

async fn list_agents(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<AgentInfo>>, ApiError> {
    authorize(&state, &caller, "agents", "list").await?;
    let links = state.store.links().await?;
    let agents = state.store.nodes(NodeKind::Agent).await?;
    Ok(Json(
        agents
            .into_iter()
            .map(|a| AgentInfo {
                links: links
                    .iter()
                    .filter(|l| l.from_node == a.node_id || l.to_node == a.node_id)
                    .count() as u64,
                name: a.name,
                node_id: a.node_id,
                last_seen: a.last_seen,
            })
            .collect(),
    ))
}

async fn list_relays(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<RelayInfo>>, ApiError> {
    authorize(&state, &caller, "relays", "list").await?;
    let now = unix_now();
    let links = state.store.links().await?;
    let (relays, _) = state.relays(now).await?;
    Ok(Json(
        relays
            .into_iter()
            .map(|r| {
                let id = r.relay_id();
                RelayInfo {
                    healthy: state.healthy(&r, now),
                    links: links.iter().filter(|l| l.relays.contains(&id)).count() as u64,
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

fn check_unix_path(spec: &str, field: &str, path: &str) -> Result<(), ApiError> {
    if !path.starts_with('/') || path.len() < 2 || path.contains('\0') {
        return Err(ApiError::bad_request(format!(
            "{field} `{spec}`: a unix socket must be unix:///ABSOLUTE/PATH"
        )));
    }
    Ok(())
}

/// `tcp://<loopback ip>:<port>` or `unix:///abs/path`.
fn check_listen(spec: &str) -> Result<(), ApiError> {
    if spec.len() > MAX_SPEC_LEN {
        return Err(ApiError::bad_request(format!(
            "listen is longer than {MAX_SPEC_LEN} bytes"
        )));
    }
    if let Some(addr) = spec.strip_prefix("tcp://") {
        let ok = addr
            .parse::<std::net::SocketAddr>()
            .is_ok_and(|a| a.ip().is_loopback() && a.port() != 0);
        if !ok {
            return Err(ApiError::bad_request(format!(
                "listen `{spec}`: agents listen on loopback only: use tcp://127.0.0.1:PORT, \
                 tcp://[::1]:PORT or unix:///PATH"
            )));
        }
        return Ok(());
    }
    if let Some(path) = spec.strip_prefix("unix://") {
        return check_unix_path(spec, "listen", path);
    }
    Err(ApiError::bad_request(format!(
        "listen `{spec}` must be tcp://127.0.0.1:PORT or unix:///PATH"
    )))
}

/// `tcp://host:port` or `unix:///abs/path`.
fn check_target(spec: &str) -> Result<(), ApiError> {
    if spec.len() > MAX_SPEC_LEN {
        return Err(ApiError::bad_request(format!(
            "target is longer than {MAX_SPEC_LEN} bytes"
        )));
    }
    if let Some(addr) = spec.strip_prefix("tcp://") {
        let ok = pki::host_of(addr).is_some_and(pki::valid_host) && !addr.ends_with(":0");
        if !ok {
            return Err(ApiError::bad_request(format!(
                "target `{spec}` must be tcp://HOST:PORT (IPv6 in [])"
            )));
        }
        return Ok(());
    }
    if let Some(path) = spec.strip_prefix("unix://") {
        return check_unix_path(spec, "target", path);
    }
    Err(ApiError::bad_request(format!(
        "target `{spec}` must be tcp://HOST:PORT or unix:///PATH"
    )))
}

async fn create_link(
    State(state): State<AppState>,
    caller: Caller,
    body: Bytes,
) -> Result<(StatusCode, Json<LinkInfo>), ApiError> {
    let subject = authorize(&state, &caller, "links", "create").await?;
    let req: LinkCreate = parse_json(&body)?;
    check_link_name(&req.name)?;
    check_listen(&req.listen)?;
    check_target(&req.target)?;
    let max_flows = check_max_flows(req.max_flows)?;
    let rate_limit = check_rate_limit(req.rate_limit_bytes_per_sec)?;
    check_connection(req.connection.as_deref())?;
    if req.allowed_uids.len() > MAX_SELECTORS || req.allowed_gids.len() > MAX_SELECTORS {
        return Err(ApiError::bad_request(format!(
            "at most {MAX_SELECTORS} allowed_uids and {MAX_SELECTORS} allowed_gids"
        )));
    }
    if (!req.allowed_uids.is_empty() || !req.allowed_gids.is_empty())
        && !req.listen.starts_with("unix://")
    {
        return Err(ApiError::bad_request(
            "allowed_uids and allowed_gids apply only to unix:// listeners",
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
                    "no agent named `{name}` is enrolled (see `comsat ctl agents`)"
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
        relays: Vec::new(),
        created_at: now,
        grant_not_after: 0,
        max_flows,
        rate_limit,
        connection: req.connection.clone(),
    };
    let link = state.create_link(link, now).await?;
    state
        .audit(
            &caller,
            &subject,
            "link.create",
            &format!("link/{}", link.name),
            Outcome::Ok,
            None,
        )
        .await;
    let names = state.node_names().await?;
    Ok((StatusCode::CREATED, Json(Shared::link_info(&link, &names))))
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
    caller: Caller,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<LinkInfo>, ApiError> {
    let subject = authorize(&state, &caller, "links", "update").await?;
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
    state
        .audit(
            &caller,
            &subject,
            "link.update",
            &format!("link/{}", link.name),
            Outcome::Ok,
            None,
        )
        .await;
    let names = state.node_names().await?;
    Ok(Json(Shared::link_info(&link, &names)))
}

async fn list_links(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<LinkInfo>>, ApiError> {
    authorize(&state, &caller, "links", "list").await?;
    let names = state.node_names().await?;
    let links = state.store.links().await?;
    Ok(Json(
        links.iter().map(|l| Shared::link_info(l, &names)).collect(),
    ))
}

async fn get_link(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<LinkInfo>, ApiError> {
    authorize(&state, &caller, "links", "get").await?;
    let link = state
        .store
        .link_by_name(&name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no link named `{name}`")))?;
    let names = state.node_names().await?;
    Ok(Json(Shared::link_info(&link, &names)))
}

async fn delete_link(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Empty>, ApiError> {
    let subject = authorize(&state, &caller, "links", "delete").await?;
    match state.delete_link(&name, unix_now()).await? {
        Some(link) => {
            state
                .audit(
                    &caller,
                    &subject,
                    "link.delete",
                    &format!("link/{}", link.name),
                    Outcome::Ok,
                    None,
                )
                .await;
            Ok(Json(Empty {}))
        }
        None => Err(ApiError::not_found(format!("no link named `{name}`"))),
    }
}

async fn status(State(state): State<AppState>, caller: Caller) -> Result<Json<Status>, ApiError> {
    authorize(&state, &caller, "status", "get").await?;
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
    }))
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
            assert!(check_listen(ok).is_ok(), "{ok}");
        }
        for bad in [
            "tcp://0.0.0.0:7000",
            "tcp://10.0.0.1:7000",
            "tcp://127.0.0.1:0",
            "tcp://localhost:7000",
            "unix://relative",
            "unix:///",
            "udp://127.0.0.1:1",
            "",
        ] {
            assert!(check_listen(bad).is_err(), "{bad}");
        }
        for ok in [
            "tcp://db.internal:5432",
            "tcp://10.0.0.1:80",
            "tcp://[fe80::1]:80",
            "unix:///s",
        ] {
            assert!(check_target(ok).is_ok(), "{ok}");
        }
        for bad in [
            "tcp://db",
            "tcp://:80",
            "tcp://db:0",
            "tcp://a b:1",
            "unix://x",
            "http://x:1",
        ] {
            assert!(check_target(bad).is_err(), "{bad}");
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    /// Unix seconds.
    #[serde(default)]
    since: u64,
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
}

async fn audit_list(
    State(state): State<AppState>,
    caller: Caller,
    q: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<Json<Vec<AuditRecord>>, ApiError> {
    authorize(&state, &caller, "audit", "list").await?;
    let q = query(q)?;
    if q.subject.as_ref().is_some_and(|s| s.len() > 256) {
        return Err(ApiError::bad_request("subject: at most 256 characters"));
    }
    let limit = q
        .limit
        .unwrap_or(api::MAX_AUDIT_RECORDS)
        .clamp(1, api::MAX_AUDIT_RECORDS);
    let records = state
        .store
        .audit(q.since.saturating_mul(1000), q.subject.as_deref(), limit)
        .await?;
    Ok(Json(records))
}

/// The routes of users or service accounts (the same for both kinds).
fn principal_routes(kind: PrincipalKind) -> Router<AppState> {
    let base = kind.path();
    Router::new()
        .route(
            base,
            get(move |st: State<AppState>, c: Caller| list_principals(st, c, kind)).post(
                move |st: State<AppState>, c: Caller, b: Bytes| create_principal(st, c, kind, b),
            ),
        )
        .route(
            &format!("{base}/{{name}}"),
            axum::routing::delete(move |st: State<AppState>, c: Caller, n: Path<String>| {
                delete_principal(st, c, kind, n)
            }),
        )
        .route(
            &format!("{base}/{{name}}/tokens"),
            post(
                move |st: State<AppState>, c: Caller, n: Path<String>, b: Bytes| {
                    add_token(st, c, kind, n, b)
                },
            ),
        )
        .route(
            &format!("{base}/{{name}}/tokens/{{id}}"),
            axum::routing::delete(
                move |st: State<AppState>, c: Caller, p: Path<(String, String)>| {
                    revoke_token(st, c, kind, p)
                },
            ),
        )
}

/// A new API token for a user or service account: shown once, stored as
/// its hash.
fn new_api_token(
    kind: PrincipalKind,
    ttl_secs: Option<u64>,
) -> Result<(String, NewApiToken), ApiError> {
    if ttl_secs.is_some_and(|t| t == 0 || t > MAX_API_TOKEN_TTL_SECS) {
        return Err(ApiError::bad_request(format!(
            "ttl_secs must be 1 to {MAX_API_TOKEN_TTL_SECS} (10 years), or left out for no expiry"
        )));
    }
    let prefix = match kind {
        PrincipalKind::User => "comsat-user-v1",
        PrincipalKind::ServiceAccount => "comsat-sa-v1",
    };
    let token = format!("{prefix}:{}", hex::encode(rand::random::<[u8; 32]>()));
    let hash = token_hash(&token);
    let now = unix_now();
    Ok((
        token,
        NewApiToken {
            id: hash[..16].to_owned(),
            hash,
            created_at: now,
            expires_at: ttl_secs.map(|t| now.saturating_add(t)),
        },
    ))
}

/// Longest API token lifetime.
const MAX_API_TOKEN_TTL_SECS: u64 = 10 * 365 * 86_400;

async fn list_principals(
    State(state): State<AppState>,
    caller: Caller,
    kind: PrincipalKind,
) -> Result<Json<Vec<PrincipalInfo>>, ApiError> {
    authorize(&state, &caller, kind.resource(), "list").await?;
    Ok(Json(state.store.principals(kind).await?))
}

async fn create_principal(
    State(state): State<AppState>,
    caller: Caller,
    kind: PrincipalKind,
    body: Bytes,
) -> Result<(StatusCode, Json<PrincipalCreated>), ApiError> {
    let subject = authorize(&state, &caller, kind.resource(), "create").await?;
    let req: PrincipalCreate = parse_json(&body)?;
    rbac::check_name(kind.as_str(), &req.name).map_err(ApiError::bad_request)?;
    let (token, record) = new_api_token(kind, req.ttl_secs)?;
    state
        .store
        .create_principal(kind, &req.name, &record)
        .await?;
    let created = format!("{kind}:{}", req.name);
    state
        .audit(
            &caller,
            &subject,
            &format!("{}.create", kind.resource()),
            &created,
            Outcome::Ok,
            None,
        )
        .await;
    Ok((
        StatusCode::CREATED,
        Json(PrincipalCreated {
            subject: created,
            token_id: record.id,
            token,
            expires_at: record.expires_at,
        }),
    ))
}

async fn delete_principal(
    State(state): State<AppState>,
    caller: Caller,
    kind: PrincipalKind,
    Path(name): Path<String>,
) -> Result<Json<Empty>, ApiError> {
    let subject = authorize(&state, &caller, kind.resource(), "delete").await?;
    let target = format!("{kind}:{name}");
    if target == subject {
        return Err(ApiError::bad_request(format!(
            "{target} cannot delete itself; use another account"
        )));
    }
    if !state.store.delete_principal(kind, &name).await? {
        return Err(ApiError::not_found(format!("no {kind} named `{name}`")));
    }
    state
        .audit(
            &caller,
            &subject,
            &format!("{}.delete", kind.resource()),
            &target,
            Outcome::Ok,
            None,
        )
        .await;
    Ok(Json(Empty {}))
}

async fn add_token(
    State(state): State<AppState>,
    caller: Caller,
    kind: PrincipalKind,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<PrincipalCreated>), ApiError> {
    let subject = authorize(&state, &caller, kind.resource(), "update").await?;
    let req: PrincipalCreate = parse_json(&body)?;
    let (token, record) = new_api_token(kind, req.ttl_secs)?;
    if !state
        .store
        .add_principal_token(kind, &name, &record)
        .await?
    {
        return Err(ApiError::not_found(format!("no {kind} named `{name}`")));
    }
    let target = format!("{kind}:{name}");
    state
        .audit(
            &caller,
            &subject,
            &format!("{}.token.create", kind.resource()),
            &format!("{target}/token/{}", record.id),
            Outcome::Ok,
            None,
        )
        .await;
    Ok((
        StatusCode::CREATED,
        Json(PrincipalCreated {
            subject: target,
            token_id: record.id,
            token,
            expires_at: record.expires_at,
        }),
    ))
}

async fn revoke_token(
    State(state): State<AppState>,
    caller: Caller,
    kind: PrincipalKind,
    Path((name, id)): Path<(String, String)>,
) -> Result<Json<Empty>, ApiError> {
    let subject = authorize(&state, &caller, kind.resource(), "update").await?;
    if !state
        .store
        .revoke_token(kind, &name, &id, unix_now())
        .await?
    {
        return Err(ApiError::not_found(format!(
            "{kind} `{name}` has no token `{id}` that is not revoked yet"
        )));
    }
    state
        .audit(
            &caller,
            &subject,
            &format!("{}.token.revoke", kind.resource()),
            &format!("{kind}:{name}/token/{id}"),
            Outcome::Ok,
            None,
        )
        .await;
    Ok(Json(Empty {}))
}

async fn all_roles(state: &Shared) -> Result<Vec<RoleInfo>, ApiError> {
    let mut out: Vec<RoleInfo> = rbac::builtin_roles()
        .into_iter()
        .map(|(name, rules)| RoleInfo {
            name: name.to_owned(),
            rules,
            builtin: true,
        })
        .collect();
    for (name, json) in state.store.roles().await? {
        let rules = serde_json::from_str(&json).unwrap_or_default();
        out.push(RoleInfo {
            name,
            rules,
            builtin: false,
        });
    }
    Ok(out)
}

async fn list_roles(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<RoleInfo>>, ApiError> {
    authorize(&state, &caller, "roles", "list").await?;
    Ok(Json(all_roles(&state).await?))
}

async fn get_role(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<RoleInfo>, ApiError> {
    authorize(&state, &caller, "roles", "get").await?;
    all_roles(&state)
        .await?
        .into_iter()
        .find(|r| r.name == name)
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no role named `{name}`")))
}

async fn create_role(
    State(state): State<AppState>,
    caller: Caller,
    body: Bytes,
) -> Result<(StatusCode, Json<RoleInfo>), ApiError> {
    let subject = authorize(&state, &caller, "roles", "create").await?;
    let req: RoleCreate = parse_json(&body)?;
    rbac::check_name("role", &req.name).map_err(ApiError::bad_request)?;
    rbac::check_rules(&req.rules).map_err(ApiError::bad_request)?;
    if rbac::builtin(&req.name).is_some() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("`{}` is a built-in role", req.name),
        ));
    }
    let json =
        serde_json::to_string(&req.rules).map_err(|e| ApiError::internal("encoding rules", e))?;
    state
        .store
        .create_role(&req.name, &json, unix_now())
        .await?;
    state
        .audit(
            &caller,
            &subject,
            "roles.create",
            &format!("role/{}", req.name),
            Outcome::Ok,
            None,
        )
        .await;
    Ok((
        StatusCode::CREATED,
        Json(RoleInfo {
            name: req.name,
            rules: req.rules,
            builtin: false,
        }),
    ))
}

async fn delete_role(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Empty>, ApiError> {
    let subject = authorize(&state, &caller, "roles", "delete").await?;
    if rbac::builtin(&name).is_some() {
        return Err(ApiError::bad_request(format!(
            "`{name}` is a built-in role; it cannot be deleted"
        )));
    }
    if !state.store.delete_role(&name).await? {
        return Err(ApiError::not_found(format!("no role named `{name}`")));
    }
    state
        .audit(
            &caller,
            &subject,
            "roles.delete",
            &format!("role/{name}"),
            Outcome::Ok,
            None,
        )
        .await;
    Ok(Json(Empty {}))
}

async fn list_bindings(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<RoleBindingInfo>>, ApiError> {
    authorize(&state, &caller, "rolebindings", "list").await?;
    Ok(Json(state.store.bindings().await?))
}

async fn get_binding(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<RoleBindingInfo>, ApiError> {
    authorize(&state, &caller, "rolebindings", "get").await?;
    state
        .store
        .bindings()
        .await?
        .into_iter()
        .find(|b| b.name == name)
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no role binding named `{name}`")))
}

async fn create_binding(
    State(state): State<AppState>,
    caller: Caller,
    body: Bytes,
) -> Result<(StatusCode, Json<RoleBindingInfo>), ApiError> {
    let subject = authorize(&state, &caller, "rolebindings", "create").await?;
    let req: RoleBindingCreate = parse_json(&body)?;
    rbac::check_name("role binding", &req.name).map_err(ApiError::bad_request)?;
    rbac::check_name("role", &req.role).map_err(ApiError::bad_request)?;
    rbac::check_name(req.subject_kind.as_str(), &req.subject_name)
        .map_err(ApiError::bad_request)?;
    if rbac::builtin(&req.role).is_none() && state.store.role(&req.role).await?.is_none() {
        return Err(ApiError::not_found(format!(
            "no role named `{}` (see `comsat ctl role list`)",
            req.role
        )));
    }
    let exists = state
        .store
        .principals(req.subject_kind)
        .await?
        .iter()
        .any(|p| p.name == req.subject_name);
    if !exists {
        return Err(ApiError::not_found(format!(
            "no {} named `{}`",
            req.subject_kind, req.subject_name
        )));
    }
    state.store.create_binding(&req, unix_now()).await?;
    state
        .audit(
            &caller,
            &subject,
            "rolebindings.create",
            &format!("rolebinding/{}", req.name),
            Outcome::Ok,
            Some(&format!(
                "{} to {}:{}",
                req.role, req.subject_kind, req.subject_name
            )),
        )
        .await;
    Ok((StatusCode::CREATED, Json(req)))
}

async fn delete_binding(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Empty>, ApiError> {
    let subject = authorize(&state, &caller, "rolebindings", "delete").await?;
    if !state.store.delete_binding(&name).await? {
        return Err(ApiError::not_found(format!(
            "no role binding named `{name}`"
        )));
    }
    state
        .audit(
            &caller,
            &subject,
            "rolebindings.delete",
            &format!("rolebinding/{name}"),
            Outcome::Ok,
            None,
        )
        .await;
    Ok(Json(Empty {}))
}

/// Join tokens neither used nor expired (never their secrets).
async fn list_open_tokens(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<api::JoinTokenInfo>>, ApiError> {
    authorize(&state, &caller, "tokens", "list").await?;
    Ok(Json(state.store.open_join_tokens(unix_now()).await?))
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
    caller: Caller,
    kind: NodeKind,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&state, &caller, node_resource(kind), "get").await?;
    let node = state
        .store
        .node_by_name(kind, &name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no {kind} named `{name}`")))?;
    Ok(Json(serde_json::json!({
        "name": node.name,
        "node_id": node.node_id.to_string(),
        "kind": kind.as_str(),
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
    caller: Caller,
    kind: NodeKind,
    Path(name): Path<String>,
) -> Result<Json<Empty>, ApiError> {
    let subject = authorize(&state, &caller, node_resource(kind), "delete").await?;
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
    state
        .audit(
            &caller,
            &subject,
            &format!("{}.delete", node_resource(kind)),
            &format!("{kind}/{name}"),
            Outcome::Ok,
            None,
        )
        .await;
    Ok(Json(Empty {}))
}
