//! The CA, join tokens and enrolment: how nodes join.

use std::time::Duration;

use super::access::{Handler, get, post};
use crate::unix_now;
use axum::Json;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use comsat_node::keys::RandomId;
use comsat_protocol::NodeId;
use comsat_protocol::api::{
    self, EnrolRequest, EnrolResponse, JoinToken, NodeKind, TokenCreate, TokenCreated,
};
use sha2::{Digest, Sha256};

use super::access::{Audited, Policy, Routes};
use super::{AppState, parse_json};
use crate::audit::{Caller, Outcome, Verdict};
use crate::pki;
use crate::state::{ApiError, Shared};
use crate::store::{NewJoinToken, NewNode, NodeRecord, Redemption, StoreError};

/// Default join token lifetime.
const DEFAULT_TOKEN_TTL_SECS: u64 = 3600;

/// Longest join token lifetime.
const MAX_TOKEN_TTL_SECS: u64 = 30 * 86_400;

/// The CA, join token and enrolment routes.
pub(super) fn routes(r: Routes) -> Routes {
    r.add(api::PATH_CA, Policy::public(), get(get_ca))
        .add(api::PATH_SPIFFE_BUNDLE, Policy::public(), get(get_bundle))
        .add(
            api::PATH_TOKENS,
            Policy::api_on_body(token_resource, "create").audited("token.create"),
            post(create_token),
        )
        .add(
            api::PATH_OPEN_TOKENS,
            Policy::api("tokens", "list"),
            get(list_open_tokens),
        )
        .add(
            api::PATH_ENROL,
            Policy::public().audited("enrol"),
            // A stranger's body: small (a request is a few KiB with a CSR).
            Handler::of(
                "post",
                axum::routing::post(enrol).layer(DefaultBodyLimit::max(api::MAX_ENROL_BODY_LEN)),
            ),
        )
}

async fn get_ca(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        state.ca_pem.clone(),
    )
        .into_response()
}

/// The trust domain's SPIFFE bundle: what a federated trust domain
/// fetches to check this one's SVIDs.
async fn get_bundle(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        state.spiffe_bundle.clone(),
    )
        .into_response()
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
}

/// What creating a join token needs a permission on: `tokens/agent` or
/// `tokens/relay`, after the kind of node it enrols.
fn token_resource(body: &[u8]) -> Result<String, ApiError> {
    let req: TokenCreate = parse_json(body)?;
    Ok(format!("tokens/{}", req.kind))
}

async fn create_token(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<(Audited, Json<TokenCreated>), ApiError> {
    let req: TokenCreate = parse_json(&body)?;
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
    // A relay join token puts a new relay into data paths: its record says
    // so, and whether it is bound to one name.
    let named = req
        .name
        .as_ref()
        .map_or_else(|| "any name".to_owned(), |n| format!("`{n}` only"));
    let detail = match req.kind {
        NodeKind::Relay => {
            tracing::warn!(token_id = %token.id, name = ?req.name, expires_at, "relay join token created: it can put a relay into data paths");
            format!(
                "relay join token for {named}, expires {expires_at}: enrols a relay into data paths"
            )
        }
        NodeKind::Agent => {
            tracing::info!(token_id = %token.id, name = ?req.name, expires_at, "agent join token created");
            format!("agent join token for {named}, expires {expires_at}")
        }
    };
    Ok((
        Audited::on(format!("token/{}", token.id)).detail(detail),
        Json(TokenCreated {
            token: token.encode(),
            expires_at,
        }),
    ))
}

/// Join tokens neither used nor expired (never their secrets).
async fn list_open_tokens(
    State(state): State<AppState>,
) -> Result<Json<Vec<api::JoinTokenInfo>>, ApiError> {
    Ok(Json(state.store.open_join_tokens(unix_now()).await?))
}

/// The host of a relay's `public_addr`, checked.
pub(super) fn relay_host(public_addr: &str) -> Result<&str, ApiError> {
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

/// Records a refused enrolment (the caller only hears [`ENROL_REFUSED`]
/// or 429).
async fn deny_enrolment(state: &Shared, caller: &Caller, resource: &str, reason: &str) {
    state
        .audit(
            caller,
            "anonymous",
            "enrol",
            resource,
            Outcome::Denied,
            Some(reason),
        )
        .await;
}

/// Checks what a node of the kind it enrols as must send: a relay's CSR is
/// checked here (its certificate is issued once the token redeems and the
/// relay has its name), or the certificate it brings; returns the host its
/// certificate names.
fn check_enrolling(req: &EnrolRequest) -> Result<Option<&str>, ApiError> {
    match req.kind {
        NodeKind::Agent => {
            if req.noise_public_key.is_none() {
                return Err(ApiError::bad_request("an agent must send noise_public_key"));
            }
            Ok(None)
        }
        NodeKind::Relay => {
            let (Some(addr), true) = (
                &req.public_addr,
                req.csr_pem.is_some() != req.svid_pem.is_some(),
            ) else {
                return Err(ApiError::bad_request(
                    "a relay must send public_addr (HOST:PORT agents dial) and either csr_pem \
                     or svid_pem (a certificate of its own)",
                ));
            };
            let host = relay_host(addr)?;
            if let Some(lane) = &req.interactive_addr {
                check_interactive_addr(addr, host, lane)?;
            }
            if let Some(csr) = &req.csr_pem {
                pki::parse_csr(csr).map_err(|e| ApiError::bad_request(e.to_string()))?;
            }
            Ok(Some(host))
        }
    }
}

/// The SPIFFE ID of a relay that brings its own certificate (`chain`):
/// an X.509-SVID of a trust domain this controller federates with, for
/// `host`, chaining to that domain's bundle, and no other relay's ID.
async fn federated_relay(state: &Shared, chain: &str, host: &str) -> Result<String, ApiError> {
    if chain.len() > api::MAX_BUNDLE_LEN {
        return Err(ApiError::bad_request("svid_pem is too long"));
    }
    let refused = |why: String| {
        ApiError::bad_request(format!("the relay's own certificate (svid_pem): {why}"))
    };
    let leaf = pki::certs_from_pem(chain.as_bytes()).map_err(|e| refused(e.to_string()))?;
    let id = comsat_protocol::spiffe::svid_spiffe_id(leaf[0].as_ref())
        .ok_or_else(|| refused("it is no X.509-SVID (one URI, a SPIFFE ID)".into()))?;
    let (domain, _) = comsat_protocol::spiffe::split_spiffe_id(&id)
        .ok_or_else(|| refused(format!("`{id}` is no SPIFFE ID")))?;
    let bundles = state.store.bundles().await?;
    let bundle = bundles
        .iter()
        .find(|b| b.trust_domain == domain)
        .ok_or_else(|| {
            refused(format!(
                "{id} is of trust domain {domain}, which this controller does not federate with \
             (comsat ctl bundle set {domain} --file BUNDLE first)"
            ))
        })?;
    crate::bundle::check_federated_relay(chain, host, domain, &bundle.bundle_pem)
        .map_err(|e| refused(e.to_string()))?;
    let relays = state.store.nodes(NodeKind::Relay).await?;
    if relays
        .iter()
        .any(|r| r.spiffe_id.as_deref() == Some(id.as_str()))
    {
        return Err(refused(format!("another relay is {id}")));
    }
    Ok(id)
}

/// The X.509-SVID of a relay that just enrolled, from the CSR
/// [`check_enrolling`] checked. Should signing fail, the relay is removed
/// again: it cannot serve without a certificate.
async fn relay_svid(
    state: &Shared,
    relay: &NodeRecord,
    csr: &str,
    host: &str,
    now: u64,
) -> Result<String, ApiError> {
    let id = state.spiffe_id(NodeKind::Relay, &relay.name);
    let ttl = Duration::from_secs(state.config.relay_cert_ttl_secs);
    match state
        .relay_ca
        .issue_svid(csr, pki::Svid::Relay { host }, &id, now, ttl)
    {
        Ok(pem) => Ok(pem),
        Err(e) => {
            if let Err(undo) = state.store.delete_node(&relay.node_id).await {
                tracing::error!(relay = %relay.name, error = %undo, "cannot remove the relay whose certificate failed");
            }
            Err(ApiError::internal("issuing the relay certificate", e))
        }
    }
}

/// The node an enrolment registers: an agent with its Noise key, a relay
/// with its addresses.
fn new_node(req: &EnrolRequest, node_id: NodeId) -> NewNode {
    let relay = req.kind == NodeKind::Relay;
    NewNode {
        node_id,
        sign_pub: req.sign_public_key,
        noise_pub: if relay { None } else { req.noise_public_key },
        public_addr: if relay { req.public_addr.clone() } else { None },
        interactive_addr: if relay {
            req.interactive_addr.clone()
        } else {
            None
        },
        spiffe_id: None,
    }
}

/// The answer to a join token the store refused (audited with the real
/// reason), or to a store failure.
async fn refuse_token(
    state: &Shared,
    caller: &Caller,
    req: &EnrolRequest,
    resource: &str,
    e: StoreError,
) -> ApiError {
    tracing::warn!(token_id = %req.token_id, kind = %req.kind, reason = %e, "enrolment refused");
    let refused = matches!(
        e,
        StoreError::UnknownToken
            | StoreError::TokenUsed
            | StoreError::TokenExpired
            | StoreError::WrongKind { .. }
    );
    if !refused {
        return e.into();
    }
    let reason = format!("{e} (a {} tried it)", req.kind);
    deny_enrolment(state, caller, resource, &reason).await;
    ApiError::unauthorized(ENROL_REFUSED)
}

async fn enrol(
    State(state): State<AppState>,
    caller: Caller,
    body: Bytes,
) -> Result<(Audited, Json<EnrolResponse>), ApiError> {
    if let Verdict::Limited { first } = state.enrol_limit.take(caller.ip()) {
        if first {
            let reason = "rate limited: too many enrolment attempts from this address";
            deny_enrolment(&state, &caller, &caller.path, reason).await;
        }
        return Err(ApiError::too_many());
    }
    let req: EnrolRequest = parse_json(&body)?;
    let now = unix_now();
    if !is_lower_hex(&req.token_id, 16) || !is_lower_hex(&req.secret, 64) {
        deny_enrolment(&state, &caller, "token/?", "malformed join token").await;
        return Err(ApiError::unauthorized(ENROL_REFUSED));
    }
    let resource = format!("token/{}", req.token_id);
    let redemption = Redemption {
        token_id: req.token_id.clone(),
        secret_hash: hex::encode(Sha256::digest(req.secret.as_bytes())),
        kind: req.kind,
        now,
    };
    // The token first: a caller without one never reaches the CSR parser
    // or the CA. Its redemption below still decides a race.
    if let Err(e) = state.store.check_join_token(&redemption).await {
        return Err(refuse_token(&state, &caller, &req, &resource, e).await);
    }
    let node_id = NodeId::random();
    let relay_host = check_enrolling(&req)?;
    let mut node = new_node(&req, node_id);
    if let (Some(host), Some(chain)) = (relay_host, &req.svid_pem) {
        node.spiffe_id = Some(federated_relay(&state, chain, host).await?);
    }
    let record = match state.store.redeem_join_token(&redemption, &node).await {
        Ok(r) => r,
        Err(e) => return Err(refuse_token(&state, &caller, &req, &resource, e).await),
    };
    let cert_pem = match (relay_host, &req.csr_pem) {
        (Some(host), Some(csr)) => Some(relay_svid(&state, &record, csr, host, now).await?),
        _ => None,
    };
    tracing::info!(kind = %record.kind, name = %record.name, node_id = %record.node_id, "node enrolled");
    metrics::counter!(super::health::ENROLMENTS_TOTAL, "kind" => record.kind.as_str()).increment(1);
    Ok((
        Audited::on(resource).by(format!("{}:{}", record.kind, record.name)),
        Json(EnrolResponse {
            node_id: record.node_id,
            name: record.name,
            authority_public_key: state.authority.public(),
            audience: state.audience.clone(),
            relay_ca_pem: state.relay_ca.cert_pem().to_owned(),
            cert_pem,
        }),
    ))
}
