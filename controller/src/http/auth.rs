//! Who is calling: API tokens of users and service accounts, with the
//! role check of each admin call, and node JWTs. Every refusal is audited
//! with its real reason; the caller only hears "unauthorized".

use crate::unix_now;
use axum::http::{HeaderMap, StatusCode, header};
use comsat_protocol::NodeId;
use comsat_protocol::api::{NodeKind, PrincipalKind, Rule};
use comsat_protocol::jwt;
use comsat_protocol::text::printable;

use super::console;
use crate::audit::{Caller, Outcome, Verdict};
use crate::init::token_hash;
use crate::rbac;
use crate::state::{ApiError, Shared};
use crate::store::NodeRecord;

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
pub(super) fn check_not_limited(state: &Shared, caller: &Caller) -> Result<(), ApiError> {
    if state.auth_limit.exhausted(caller.ip()) {
        return Err(ApiError::too_many());
    }
    Ok(())
}

/// Records a refused authentication (and the source running out of
/// attempts, once) and answers the uniform 401.
pub(super) async fn refuse_auth(
    state: &Shared,
    caller: &Caller,
    subject: &str,
    reason: &str,
) -> ApiError {
    tracing::warn!(source = ?caller.source(), subject = %printable(subject), reason = %printable(reason), path = %caller.path, "refused an authentication");
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
pub(super) struct Principal {
    pub(super) kind: PrincipalKind,
    pub(super) name: String,
}

impl Principal {
    pub(super) fn subject(&self) -> String {
        format!("{}:{}", self.kind, self.name)
    }
}

/// Authenticates an API token (known, not revoked, not expired): a bearer
/// token, or the one a console session was opened with
/// ([`super::console`]).
pub(super) async fn authenticate_api(
    state: &Shared,
    caller: &Caller,
) -> Result<Principal, ApiError> {
    check_not_limited(state, caller)?;
    let hash = match (
        bearer(&caller.headers),
        console::session_cookie(&caller.headers),
    ) {
        (Ok(t), _) => token_hash(t),
        (Err(_), Some(cookie)) if !caller.headers.contains_key(header::AUTHORIZATION) => {
            console::session_token(state, caller, &cookie).await?
        }
        (Err(reason), _) => return Err(refuse_auth(state, caller, "anonymous", reason).await),
    };
    authenticate_token(state, caller, &hash).await
}

/// The user or service account whose API token has `hash`, where that
/// token is valid.
pub(super) async fn authenticate_token(
    state: &Shared,
    caller: &Caller,
    hash: &str,
) -> Result<Principal, ApiError> {
    let Some(rec) = state.store.api_token(hash).await? else {
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

/// The rules of role `role`, built in or stored; `None` if there is no such
/// role (a stored role that does not parse grants nothing).
pub(super) async fn role_rules(state: &Shared, role: &str) -> Result<Option<Vec<Rule>>, ApiError> {
    if let Some(r) = rbac::builtin(role) {
        return Ok(Some(r));
    }
    let Some(json) = state.store.role(role).await? else {
        return Ok(None);
    };
    Ok(Some(serde_json::from_str(&json).unwrap_or_else(|e| {
        tracing::error!(role, error = %e, "a stored role does not parse; it grants nothing");
        Vec::new()
    })))
}

/// The rules of every role bound to the user or service account `name`
/// (a binding to a role that does not exist gives nothing).
pub(super) async fn rules_of(
    state: &Shared,
    kind: PrincipalKind,
    name: &str,
) -> Result<Vec<Rule>, ApiError> {
    let mut rules = Vec::new();
    for role in state.store.roles_of(kind, name).await? {
        rules.extend(role_rules(state, &role).await?.unwrap_or_default());
    }
    Ok(rules)
}

/// Checks that `p` may `verb` on `resource`; a refusal is audited and
/// names the missing permission. Returns the subject and the rules it
/// holds.
pub(super) async fn check_permission(
    state: &Shared,
    caller: &Caller,
    p: &Principal,
    resource: &str,
    verb: &str,
) -> Result<(String, Vec<Rule>), ApiError> {
    let subject = p.subject();
    let held = rules_of(state, p.kind, &p.name).await?;
    if rbac::allows(&held, resource, verb) {
        return Ok((subject, held));
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

/// What a caller may give away: a role it creates, a role it binds, or a
/// token it mints for an account.
#[derive(Clone, Copy, Debug)]
pub(super) enum Grant {
    /// Creating a role (`escalate` on `roles` lifts the rule).
    Role,
    /// Binding a role (`bind` on `roles` lifts the rule).
    Binding,
    /// Minting a token for an account (nothing lifts the rule).
    Token,
}

impl Grant {
    /// The verb on `roles` that lets its holder give more than it holds.
    fn bypass(self) -> Option<&'static str> {
        match self {
            Self::Role => Some("escalate"),
            Self::Binding => Some("bind"),
            Self::Token => None,
        }
    }

    /// The rule a refusal names.
    fn rule(self) -> &'static str {
        match self {
            Self::Role => {
                "a role may grant only what its creator holds, unless the creator has \
                 `escalate` on `roles`"
            }
            Self::Binding => {
                "a role may be bound only by a caller holding every permission it grants, \
                 or `bind` on `roles`"
            }
            Self::Token => {
                "a token for an account may be minted only by a caller holding every \
                 permission of that account"
            }
        }
    }
}

/// Refuses, with an audit record naming the rule, a `grant` of `wanted`
/// (`what`: "bind role `admin` to user:bob") by `subject`, holding `held`,
/// if `wanted` gives a permission that `held` lacks: no escalation.
pub(super) async fn check_no_escalation(
    state: &Shared,
    caller: &Caller,
    (subject, held): (&str, &[Rule]),
    grant: Grant,
    wanted: &[Rule],
    (action, what): (&str, &str),
) -> Result<(), ApiError> {
    if grant
        .bypass()
        .is_some_and(|v| rbac::allows(held, "roles", v))
    {
        return Ok(());
    }
    let Some((resource, verb)) = rbac::first_uncovered(held, wanted) else {
        return Ok(());
    };
    let reason = format!(
        "{subject} cannot {what}: that grants `{verb}` on `{resource}`, which {subject} does \
         not hold ({})",
        grant.rule()
    );
    tracing::warn!(subject, action, reason, "refused an escalation");
    state
        .audit(
            caller,
            subject,
            action,
            &caller.path,
            Outcome::Denied,
            Some(&reason),
        )
        .await;
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        format!("forbidden: {reason}"),
    ))
}

/// Checks a node JWT: its node exists and is of `kind`, the signature and
/// claims verify, and its `jti` was never seen (recorded in the database,
/// so this holds across restarts).
pub(super) async fn auth_node(
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
