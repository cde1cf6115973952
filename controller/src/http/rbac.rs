//! Users and service accounts with their API tokens, roles and role
//! bindings.

use super::access::{delete, get, post};
use crate::unix_now;
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use comsat_protocol::api::{
    self, Empty, PrincipalCreate, PrincipalCreated, PrincipalInfo, PrincipalKind,
    RoleBindingCreate, RoleBindingInfo, RoleCreate, RoleInfo,
};

use super::access::{Audited, Held, Policy, Routes, Subject};
use super::auth::{Grant, check_no_escalation, role_rules, rules_of};
use super::{AppState, parse_json};
use crate::audit::Caller;
use crate::init::token_hash;
use crate::rbac;
use crate::state::{ApiError, Shared};
use crate::store::NewApiToken;

/// The routes of roles, role bindings, users and service accounts: path,
/// who may call it, what its success records, and the handler (a table:
/// one route a line).
#[rustfmt::skip]
pub(super) fn routes(r: Routes) -> Routes {
    let (roles, role) = (api::PATH_ROLES, &format!("{}/{{name}}", api::PATH_ROLES));
    let bindings = api::PATH_ROLE_BINDINGS;
    let binding = &format!("{bindings}/{{name}}");
    let on_roles = |verb| Policy::api("roles", verb);
    let on_bindings = |verb| Policy::api("rolebindings", verb);
    let mut r = r
        .add(roles, on_roles("list"), get(list_roles))
        .add(roles, on_roles("create").audited("roles.create"), post(create_role))
        .add(role, on_roles("get"), get(get_role))
        .add(role, on_roles("delete").audited("roles.delete"), delete(delete_role))
        .add(bindings, on_bindings("list"), get(list_bindings))
        .add(bindings, on_bindings("create").audited("rolebindings.create"), post(create_binding))
        .add(binding, on_bindings("get"), get(get_binding))
        .add(binding, on_bindings("delete").audited("rolebindings.delete"), delete(delete_binding));
    for kind in [PrincipalKind::ServiceAccount, PrincipalKind::User] {
        r = principal_routes(r, kind);
    }
    r
}

/// The routes of users or service accounts (the same for both kinds).
#[rustfmt::skip]
fn principal_routes(r: Routes, kind: PrincipalKind) -> Routes {
    let (all, res) = (kind.path(), kind.resource());
    let one = &format!("{all}/{{name}}");
    let (tokens, token) = (&format!("{one}/tokens"), &format!("{one}/tokens/{{id}}"));
    let audited = |verb, action: &str| Policy::api(res, verb).audited(format!("{res}.{action}"));
    let list = move |st: State<AppState>| list_principals(st, kind);
    let create = move |st: State<AppState>, b: Bytes| create_principal(st, kind, b);
    let remove =
        move |st: State<AppState>, s: Subject, n: Path<String>| delete_principal(st, s, kind, n);
    let add = move |st: State<AppState>, c: Caller, s: Subject, h: Held, n: Path<String>, b: Bytes| {
        add_token(st, (c, s, h), kind, n, b)
    };
    let revoke = move |st: State<AppState>, p: Path<(String, String)>| revoke_token(st, kind, p);
    r.add(all, Policy::api(res, "list"), get(list))
        .add(all, audited("create", "create"), post(create))
        .add(one, audited("delete", "delete"), delete(remove))
        .add(tokens, audited("update", "token.create"), post(add))
        .add(token, audited("update", "token.revoke"), delete(revoke))
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
    kind: PrincipalKind,
) -> Result<Json<Vec<PrincipalInfo>>, ApiError> {
    Ok(Json(state.store.principals(kind).await?))
}

/// The answer to a new user, service account or token: the token, shown
/// this once.
fn created(
    subject: String,
    token: String,
    record: NewApiToken,
) -> (StatusCode, Json<PrincipalCreated>) {
    (
        StatusCode::CREATED,
        Json(PrincipalCreated {
            subject,
            token_id: record.id,
            token,
            expires_at: record.expires_at,
        }),
    )
}

async fn create_principal(
    State(state): State<AppState>,
    kind: PrincipalKind,
    body: Bytes,
) -> Result<(Audited, (StatusCode, Json<PrincipalCreated>)), ApiError> {
    let req: PrincipalCreate = parse_json(&body)?;
    rbac::check_name(kind.as_str(), &req.name)?;
    let (token, record) = new_api_token(kind, req.ttl_secs)?;
    state
        .store
        .create_principal(kind, &req.name, &record)
        .await?;
    let subject = format!("{kind}:{}", req.name);
    Ok((
        Audited::on(subject.clone()),
        created(subject, token, record),
    ))
}

async fn delete_principal(
    State(state): State<AppState>,
    Subject(caller): Subject,
    kind: PrincipalKind,
    Path(name): Path<String>,
) -> Result<(Audited, Json<Empty>), ApiError> {
    let target = format!("{kind}:{name}");
    if target == caller {
        return Err(ApiError::bad_request(format!(
            "{target} cannot delete itself; use another account"
        )));
    }
    keep_an_admin(&state, Lost::Principal(kind, &name)).await?;
    if !state.store.delete_principal(kind, &name).await? {
        return Err(ApiError::not_found(format!("no {kind} named `{name}`")));
    }
    Ok((Audited::on(target), Json(Empty {})))
}

/// Who calls a handler that may give away permissions: its record, its
/// subject and the rules it holds.
type Granter = (Caller, Subject, Held);

async fn add_token(
    State(state): State<AppState>,
    (caller, Subject(subject), Held(held)): Granter,
    kind: PrincipalKind,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<(Audited, (StatusCode, Json<PrincipalCreated>)), ApiError> {
    let req: PrincipalCreate = parse_json(&body)?;
    let account = rules_of(&state, kind, &name).await?;
    let what = format!("mint a token for {kind}:{name}");
    check_no_escalation(
        &state,
        &caller,
        (&subject, &held),
        Grant::Token,
        &account,
        (&format!("{}.token.create", kind.resource()), &what),
    )
    .await?;
    let (token, record) = new_api_token(kind, req.ttl_secs)?;
    if !state
        .store
        .add_principal_token(kind, &name, &record)
        .await?
    {
        return Err(ApiError::not_found(format!("no {kind} named `{name}`")));
    }
    let target = format!("{kind}:{name}");
    Ok((
        Audited::on(format!("{target}/token/{}", record.id)),
        created(target, token, record),
    ))
}

async fn revoke_token(
    State(state): State<AppState>,
    kind: PrincipalKind,
    Path((name, id)): Path<(String, String)>,
) -> Result<(Audited, Json<Empty>), ApiError> {
    keep_an_admin(&state, Lost::Token(kind, &name, &id)).await?;
    if !state
        .store
        .revoke_token(kind, &name, &id, unix_now())
        .await?
    {
        return Err(ApiError::not_found(format!(
            "{kind} `{name}` has no token `{id}` that is not revoked yet"
        )));
    }
    Ok((
        Audited::on(format!("{kind}:{name}/token/{id}")),
        Json(Empty {}),
    ))
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

/// The one of `items` named `name`; 404 names `what` was not found.
fn named<T>(
    items: Vec<T>,
    what: &str,
    name: &str,
    name_of: impl Fn(&T) -> &str,
) -> Result<Json<T>, ApiError> {
    items
        .into_iter()
        .find(|i| name_of(i) == name)
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no {what} named `{name}`")))
}

async fn list_roles(State(state): State<AppState>) -> Result<Json<Vec<RoleInfo>>, ApiError> {
    Ok(Json(all_roles(&state).await?))
}

async fn get_role(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<RoleInfo>, ApiError> {
    named(all_roles(&state).await?, "role", &name, |r| &r.name)
}

async fn create_role(
    State(state): State<AppState>,
    caller: Caller,
    Subject(subject): Subject,
    Held(held): Held,
    body: Bytes,
) -> Result<(Audited, (StatusCode, Json<RoleInfo>)), ApiError> {
    let req: RoleCreate = parse_json(&body)?;
    rbac::check_name("role", &req.name)?;
    rbac::check_rules(&req.rules)?;
    if rbac::builtin(&req.name).is_some() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("`{}` is a built-in role", req.name),
        ));
    }
    let what = format!("create role `{}`", req.name);
    check_no_escalation(
        &state,
        &caller,
        (&subject, &held),
        Grant::Role,
        &req.rules,
        ("roles.create", &what),
    )
    .await?;
    let json =
        serde_json::to_string(&req.rules).map_err(|e| ApiError::internal("encoding rules", e))?;
    state
        .store
        .create_role(&req.name, &json, unix_now())
        .await?;
    Ok((
        Audited::on(format!("role/{}", req.name)),
        (
            StatusCode::CREATED,
            Json(RoleInfo {
                name: req.name,
                rules: req.rules,
                builtin: false,
            }),
        ),
    ))
}

async fn delete_role(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<(Audited, Json<Empty>), ApiError> {
    if rbac::builtin(&name).is_some() {
        return Err(ApiError::bad_request(format!(
            "`{name}` is a built-in role; it cannot be deleted"
        )));
    }
    if !state.store.delete_role(&name).await? {
        return Err(ApiError::not_found(format!("no role named `{name}`")));
    }
    Ok((Audited::on(format!("role/{name}")), Json(Empty {})))
}

async fn list_bindings(
    State(state): State<AppState>,
) -> Result<Json<Vec<RoleBindingInfo>>, ApiError> {
    Ok(Json(state.store.bindings().await?))
}

async fn get_binding(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<RoleBindingInfo>, ApiError> {
    named(state.store.bindings().await?, "role binding", &name, |b| {
        &b.name
    })
}

async fn create_binding(
    State(state): State<AppState>,
    caller: Caller,
    Subject(subject): Subject,
    Held(held): Held,
    body: Bytes,
) -> Result<(Audited, (StatusCode, Json<RoleBindingInfo>)), ApiError> {
    let req: RoleBindingCreate = parse_json(&body)?;
    rbac::check_name("role binding", &req.name)?;
    rbac::check_name("role", &req.role)?;
    rbac::check_name(req.subject_kind.as_str(), &req.subject_name)?;
    let Some(granted) = role_rules(&state, &req.role).await? else {
        return Err(ApiError::not_found(format!(
            "no role named `{}` (see `comsat ctl role list`)",
            req.role
        )));
    };
    let what = format!(
        "bind role `{}` to {}:{}",
        req.role, req.subject_kind, req.subject_name
    );
    check_no_escalation(
        &state,
        &caller,
        (&subject, &held),
        Grant::Binding,
        &granted,
        ("rolebindings.create", &what),
    )
    .await?;
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
    let audited = Audited::on(format!("rolebinding/{}", req.name)).detail(format!(
        "{} to {}:{}",
        req.role, req.subject_kind, req.subject_name
    ));
    Ok((audited, (StatusCode::CREATED, Json(req))))
}

async fn delete_binding(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<(Audited, Json<Empty>), ApiError> {
    keep_an_admin(&state, Lost::Binding(&name)).await?;
    if !state.store.delete_binding(&name).await? {
        return Err(ApiError::not_found(format!(
            "no role binding named `{name}`"
        )));
    }
    Ok((Audited::on(format!("rolebinding/{name}")), Json(Empty {})))
}

/// What a change would take away.
#[derive(Clone, Copy)]
enum Lost<'a> {
    Binding(&'a str),
    Principal(PrincipalKind, &'a str),
    Token(PrincipalKind, &'a str, &'a str),
}

/// Refuses (409) a change after which no user or service account would
/// hold the built-in `admin` role with a token that works: nobody could
/// bind roles, make tokens or undo the change any more. (Two such changes
/// at once on different controllers can still both pass.)
async fn keep_an_admin(state: &Shared, lost: Lost<'_>) -> Result<(), ApiError> {
    let now = unix_now();
    let bindings = state.store.bindings().await?;
    for kind in [PrincipalKind::User, PrincipalKind::ServiceAccount] {
        for p in state.store.principals(kind).await? {
            if matches!(lost, Lost::Principal(k, n) if k == kind && n == p.name) {
                continue;
            }
            let admin = bindings.iter().any(|b| {
                b.role == "admin"
                    && b.subject_kind == kind
                    && b.subject_name == p.name
                    && !matches!(lost, Lost::Binding(n) if n == b.name)
            });
            let token = p.tokens.iter().any(|t| {
                t.revoked_at.is_none()
                    && t.expires_at.is_none_or(|e| e > now)
                    && !matches!(lost, Lost::Token(k, n, id) if k == kind && n == p.name && id == t.id)
            });
            if admin && token {
                return Ok(());
            }
        }
    }
    Err(ApiError::new(
        StatusCode::CONFLICT,
        "this would leave no user or service account with the role admin and a token that \
         works: bind admin to another one (`comsat ctl rolebinding create`) first",
    ))
}
