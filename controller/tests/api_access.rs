//! The HTTPS API in process: built-in roles, service account tokens, and
//! the audit log.

mod common;

use std::time::Duration;

use common::api::*;
use comsat_protocol::api::{self, AuditRecord, LinkInfo};
use reqwest::{Method, StatusCode};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_builtin_role_is_allowed_exactly_what_it_says() {
    use comsat_controller::rbac;
    let api = start("").await;
    let mut n = 0u32;
    let mut refused = 0usize;
    for (role, rules) in rbac::builtin_roles() {
        // A service account bound to the role.
        let token = bind_a_service_account(&api, role).await;
        // The same account signed in to the console: its session must be
        // allowed exactly the same.
        let console = console_session(&api, &token).await;

        // Every (resource, verb) the API has, with a call that shows it,
        // with the token and then through the console's session.
        for via_console in [false, true] {
            let mut cases = agent_relay_and_link_calls();
            cases.extend(token_role_and_binding_calls(&mut n));
            cases.extend(account_user_audit_and_status_calls(&mut n));
            for (resource, verb, method, path, body) in cases {
                let (status, text) = if via_console {
                    // (the session's CSRF token goes with every change)
                    call_in_session(&api, &console, method.clone(), &path, body).await
                } else {
                    call(&api, &token, method.clone(), &path, body).await
                };
                let want = rbac::allows(&rules, resource, verb);
                assert_ne!(
                    status,
                    StatusCode::UNAUTHORIZED,
                    "{role} {method} {path}: {text}"
                );
                assert_eq!(
                    status != StatusCode::FORBIDDEN,
                    want,
                    "role {role}, {verb} on {resource} ({method} {path}): {status} {text}"
                );
                if !want {
                    refused += 1;
                    assert!(
                        text.contains(&format!("`{verb}` on `{resource}`")),
                        "the refusal names the missing permission: {text}"
                    );
                }
            }
        }
    }
    // Every refusal is in the audit log with its subject and reason.
    let audit: Vec<AuditRecord> = api.admin_get(api::PATH_AUDIT).await;
    let denied = audit
        .iter()
        .filter(|r| {
            r.result == "denied"
                && r.subject.starts_with("serviceaccount:sa-")
                && r.reason.as_deref().is_some_and(|x| x.contains("allows `"))
        })
        .count();
    assert!(refused > 20, "the matrix refused only {refused} calls");
    assert_eq!(denied, refused, "one audit record per refused call");
    assert!(audit.iter().any(|r| {
        r.subject == "serviceaccount:sa-viewer"
            && r.result == "denied"
            && r.reason
                .as_deref()
                .is_some_and(|x| x.contains("`create` on `links`"))
    }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_account_tokens_expire_and_are_revocable() {
    let api = start("").await;
    let (status, text) = call(
        &api,
        &api.admin,
        Method::POST,
        api::PATH_SERVICE_ACCOUNTS,
        Some(json!({ "name": "ci" })),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{text}");
    let first: serde_json::Value = serde_json::from_str(&text).expect("json");
    let token = first["token"].as_str().expect("token").to_owned();
    // No role yet: authenticated, and denied.
    let (status, _) = call(&api, &token, Method::GET, api::PATH_LINKS, None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, text) = call(
        &api,
        &api.admin,
        Method::POST,
        api::PATH_ROLE_BINDINGS,
        Some(json!({ "name": "ci-view", "role": "viewer", "subject_kind": "serviceaccount", "subject_name": "ci" })),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{text}");
    let (status, _) = call(&api, &token, Method::GET, api::PATH_LINKS, None).await;
    assert_eq!(status, StatusCode::OK);
    // A second token, 1 s of life.
    let (status, text) = call(
        &api,
        &api.admin,
        Method::POST,
        &format!("{}/ci/tokens", api::PATH_SERVICE_ACCOUNTS),
        Some(json!({ "ttl_secs": 1 })),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{text}");
    let short: serde_json::Value = serde_json::from_str(&text).expect("json");
    let short_token = short["token"].as_str().expect("token").to_owned();
    let (status, _) = call(&api, &short_token, Method::GET, api::PATH_LINKS, None).await;
    assert_eq!(status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (status, _) = call(&api, &short_token, Method::GET, api::PATH_LINKS, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "expired");
    // Revoking the first.
    let id = first["token_id"].as_str().expect("id");
    let (status, text) = call(
        &api,
        &api.admin,
        Method::DELETE,
        &format!("{}/ci/tokens/{id}", api::PATH_SERVICE_ACCOUNTS),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let (status, _) = call(&api, &token, Method::GET, api::PATH_LINKS, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "revoked");
    let audit: Vec<AuditRecord> = api.admin_get(api::PATH_AUDIT).await;
    for reason in ["expired", "was revoked"] {
        assert!(
            audit.iter().any(|r| r.subject == "serviceaccount:ci"
                && r.reason.as_deref().is_some_and(|x| x.contains(reason))),
            "{reason}: {audit:#?}"
        );
    }
    let listed: Vec<api::PrincipalInfo> = api.admin_get(api::PATH_SERVICE_ACCOUNTS).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].tokens.len(), 2);
    let text = serde_json::to_string(&listed).expect("json");
    assert!(!text.contains(&token) && !text.contains(&short_token));
}

/// Makes one change of each kind the API audits, and a few reads and node
/// calls that change nothing; returns the id of the API token it added
/// (and revoked).
async fn change_everything_once(api: &Api) -> String {
    let a1 = api.enrol_agent("a1").await;
    api.enrol_agent("a2").await;
    let r1 = api.enrol_relay("r1", "10.0.0.1:4433").await;
    let resp = api
        .client
        .post(api.url(api::PATH_RELAY_CERT))
        .bearer_auth(r1.jwt())
        .json(&json!({ "csr_pem": csr() }))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        api.create_link(&link("l1", "a1", "a2")).await.status(),
        StatusCode::CREATED
    );
    assert_eq!(
        api.patch_link("l1", &json!({ "max_flows": 5 }))
            .await
            .status(),
        StatusCode::OK
    );
    let sa = api::PATH_SERVICE_ACCOUNTS;
    let calls = [
        (
            Method::POST,
            api::PATH_ROLES.to_owned(),
            Some(json!({ "name": "r1", "rules": [{ "resources": ["links"], "verbs": ["get"] }] })),
        ),
        (Method::POST, sa.to_owned(), Some(json!({ "name": "sa1" }))),
        (
            Method::POST,
            api::PATH_USERS.to_owned(),
            Some(json!({ "name": "u1" })),
        ),
        (
            Method::POST,
            api::PATH_ROLE_BINDINGS.to_owned(),
            Some(
                json!({ "name": "b1", "role": "r1", "subject_kind": "serviceaccount", "subject_name": "sa1" }),
            ),
        ),
    ];
    for (method, path, body) in calls {
        let (status, text) = call(api, &api.admin, method, &path, body).await;
        assert_eq!(status, StatusCode::CREATED, "{path}: {text}");
    }
    let (status, text) = call(
        api,
        &api.admin,
        Method::POST,
        &format!("{sa}/sa1/tokens"),
        Some(json!({})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{text}");
    let token_id = serde_json::from_str::<serde_json::Value>(&text).expect("json")["token_id"]
        .as_str()
        .expect("token_id")
        .to_owned();
    for path in [
        format!("{sa}/sa1/tokens/{token_id}"),
        format!("{}/b1", api::PATH_ROLE_BINDINGS),
        format!("{}/r1", api::PATH_ROLES),
        format!("{sa}/sa1"),
        format!("{}/l1", api::PATH_LINKS),
        format!("{}/a2", api::PATH_AGENTS),
    ] {
        let (status, text) = call(api, &api.admin, Method::DELETE, &path, None).await;
        assert_eq!(status, StatusCode::OK, "{path}: {text}");
    }
    // Reads and node calls that change nothing are not recorded.
    let _: Vec<LinkInfo> = api.admin_get(api::PATH_LINKS).await;
    api.heartbeat(&r1).await;
    api.config(&a1, 0, 0).await;

    token_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_change_is_audited_once_with_its_action_subject_and_resource() {
    let api = start("").await;
    let admin = "user:admin";
    let token_id = change_everything_once(&api).await;
    let audit: Vec<AuditRecord> = api.admin_get(api::PATH_AUDIT).await;
    let ok: Vec<_> = audit.iter().filter(|r| r.result == "ok").collect();
    let token_resource = |r: &&&AuditRecord| r.resource.starts_with("token/");
    let expected = [
        ("agent:a1", "enrol", None),
        ("agent:a2", "enrol", None),
        ("relay:r1", "enrol", None),
        ("relay:r1", "relay.cert", Some("relay/r1")),
        (admin, "link.create", Some("link/l1")),
        (admin, "link.update", Some("link/l1")),
        (admin, "roles.create", Some("role/r1")),
        (admin, "serviceaccounts.create", Some("serviceaccount:sa1")),
        (admin, "users.create", Some("user:u1")),
        (admin, "rolebindings.create", Some("rolebinding/b1")),
        (
            admin,
            "serviceaccounts.token.create",
            Some(&*format!("serviceaccount:sa1/token/{token_id}")),
        ),
        (
            admin,
            "serviceaccounts.token.revoke",
            Some(&*format!("serviceaccount:sa1/token/{token_id}")),
        ),
        (admin, "rolebindings.delete", Some("rolebinding/b1")),
        (admin, "roles.delete", Some("role/r1")),
        (admin, "serviceaccounts.delete", Some("serviceaccount:sa1")),
        (admin, "link.delete", Some("link/l1")),
        (admin, "agents.delete", Some("agent/a2")),
    ];
    for (subject, action, resource) in expected {
        let n = ok
            .iter()
            .filter(|r| r.subject == subject && r.action == action)
            .filter(|r| resource.map_or_else(|| token_resource(r), |res| r.resource == res))
            .count();
        assert_eq!(n, 1, "{subject} {action} {resource:?}: {audit:#?}");
    }
    let join_tokens = ok
        .iter()
        .filter(|r| r.subject == admin && r.action == "token.create" && token_resource(r))
        .count();
    assert_eq!(join_tokens, 3, "{audit:#?}");
    assert_eq!(ok.len(), expected.len() + join_tokens, "{audit:#?}");
    let binding = ok
        .iter()
        .find(|r| r.action == "rolebindings.create")
        .expect("binding record");
    assert_eq!(
        binding.reason.as_deref(),
        Some("r1 to serviceaccount:sa1"),
        "{binding:?}"
    );
}

/// A service account `sa-{role}` bound to `role` (binding `b-{role}`);
/// returns its token.
async fn bind_a_service_account(api: &Api, role: &str) -> String {
    let (status, text) = call(
        api,
        &api.admin,
        Method::POST,
        api::PATH_SERVICE_ACCOUNTS,
        Some(json!({ "name": format!("sa-{role}") })),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{text}");
    let created: serde_json::Value = serde_json::from_str(&text).expect("json");
    let token = created["token"].as_str().expect("token").to_owned();
    let (status, text) = call(
        api,
        &api.admin,
        Method::POST,
        api::PATH_ROLE_BINDINGS,
        Some(json!({
            "name": format!("b-{role}"),
            "role": role,
            "subject_kind": "serviceaccount",
            "subject_name": format!("sa-{role}"),
        })),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{text}");
    token
}

/// A call the RBAC matrix makes: resource, verb, method, path, body.
type Case = (
    &'static str,
    &'static str,
    Method,
    String,
    Option<serde_json::Value>,
);

/// Calls on agents, relays and links.
fn agent_relay_and_link_calls() -> Vec<Case> {
    vec![
        ("agents", "list", Method::GET, api::PATH_AGENTS.into(), None),
        (
            "agents",
            "get",
            Method::GET,
            format!("{}/nope", api::PATH_AGENTS),
            None,
        ),
        (
            "agents",
            "delete",
            Method::DELETE,
            format!("{}/nope", api::PATH_AGENTS),
            None,
        ),
        ("relays", "list", Method::GET, api::PATH_RELAYS.into(), None),
        (
            "relays",
            "get",
            Method::GET,
            format!("{}/nope", api::PATH_RELAYS),
            None,
        ),
        (
            "relays",
            "delete",
            Method::DELETE,
            format!("{}/nope", api::PATH_RELAYS),
            None,
        ),
        ("links", "list", Method::GET, api::PATH_LINKS.into(), None),
        (
            "links",
            "get",
            Method::GET,
            format!("{}/nope", api::PATH_LINKS),
            None,
        ),
        (
            "links",
            "create",
            Method::POST,
            api::PATH_LINKS.into(),
            Some(serde_json::to_value(link("l1", "nobody", "noone")).expect("json")),
        ),
        (
            "links",
            "update",
            Method::PATCH,
            format!("{}/nope", api::PATH_LINKS),
            Some(json!({ "max_flows": 3 })),
        ),
        (
            "links",
            "delete",
            Method::DELETE,
            format!("{}/nope", api::PATH_LINKS),
            None,
        ),
    ]
}

/// Calls on join tokens, roles and role bindings; `n` numbers the
/// names they create.
fn token_role_and_binding_calls(n: &mut u32) -> Vec<Case> {
    let mut unique = || {
        *n += 1;
        format!("x{n}")
    };
    vec![
        (
            "tokens/agent",
            "create",
            Method::POST,
            api::PATH_TOKENS.into(),
            Some(json!({ "kind": "agent" })),
        ),
        (
            "tokens/relay",
            "create",
            Method::POST,
            api::PATH_TOKENS.into(),
            Some(json!({ "kind": "relay" })),
        ),
        (
            "tokens",
            "list",
            Method::GET,
            api::PATH_OPEN_TOKENS.into(),
            None,
        ),
        ("roles", "list", Method::GET, api::PATH_ROLES.into(), None),
        (
            "roles",
            "get",
            Method::GET,
            format!("{}/viewer", api::PATH_ROLES),
            None,
        ),
        (
            "roles",
            "create",
            Method::POST,
            api::PATH_ROLES.into(),
            Some(
                json!({ "name": unique(), "rules": [{ "resources": ["links"], "verbs": ["get"] }] }),
            ),
        ),
        (
            "roles",
            "delete",
            Method::DELETE,
            format!("{}/nope", api::PATH_ROLES),
            None,
        ),
        (
            "rolebindings",
            "list",
            Method::GET,
            api::PATH_ROLE_BINDINGS.into(),
            None,
        ),
        (
            "rolebindings",
            "get",
            Method::GET,
            format!("{}/nope", api::PATH_ROLE_BINDINGS),
            None,
        ),
        (
            "rolebindings",
            "create",
            Method::POST,
            api::PATH_ROLE_BINDINGS.into(),
            Some(
                json!({ "name": unique(), "role": "nope", "subject_kind": "user", "subject_name": "nobody" }),
            ),
        ),
        (
            "rolebindings",
            "delete",
            Method::DELETE,
            format!("{}/nope", api::PATH_ROLE_BINDINGS),
            None,
        ),
    ]
}

/// Calls on service accounts, users, the audit log and the status; `n`
/// numbers the names they create.
fn account_user_audit_and_status_calls(n: &mut u32) -> Vec<Case> {
    let mut unique = || {
        *n += 1;
        format!("x{n}")
    };
    vec![
        (
            "serviceaccounts",
            "list",
            Method::GET,
            api::PATH_SERVICE_ACCOUNTS.into(),
            None,
        ),
        (
            "serviceaccounts",
            "create",
            Method::POST,
            api::PATH_SERVICE_ACCOUNTS.into(),
            Some(json!({ "name": unique() })),
        ),
        (
            "serviceaccounts",
            "update",
            Method::POST,
            format!("{}/nope/tokens", api::PATH_SERVICE_ACCOUNTS),
            Some(json!({})),
        ),
        (
            "serviceaccounts",
            "delete",
            Method::DELETE,
            format!("{}/nope", api::PATH_SERVICE_ACCOUNTS),
            None,
        ),
        ("users", "list", Method::GET, api::PATH_USERS.into(), None),
        (
            "users",
            "create",
            Method::POST,
            api::PATH_USERS.into(),
            Some(json!({ "name": unique() })),
        ),
        (
            "users",
            "update",
            Method::DELETE,
            format!("{}/nope/tokens/0011223344556677", api::PATH_USERS),
            None,
        ),
        (
            "users",
            "delete",
            Method::DELETE,
            format!("{}/nope", api::PATH_USERS),
            None,
        ),
        ("audit", "list", Method::GET, api::PATH_AUDIT.into(), None),
        ("status", "get", Method::GET, api::PATH_STATUS.into(), None),
        (
            "bundles",
            "list",
            Method::GET,
            api::PATH_BUNDLES.into(),
            None,
        ),
        (
            "bundles",
            "update",
            Method::PUT,
            format!("{}/site-x.example", api::PATH_BUNDLES),
            Some(json!({ "bundle": "not a bundle" })),
        ),
        (
            "bundles",
            "delete",
            Method::DELETE,
            format!("{}/nope.example", api::PATH_BUNDLES),
            None,
        ),
    ]
}

/// Creates role `name` with `rules` as the admin.
async fn create_role(api: &Api, name: &str, rules: serde_json::Value) {
    let body = json!({ "name": name, "rules": rules });
    let (status, text) = call(api, &api.admin, Method::POST, api::PATH_ROLES, Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{text}");
}

/// `token` binds `role` to service account `subject` (binding `name`).
async fn try_bind(
    api: &Api,
    token: &str,
    name: &str,
    role: &str,
    subject: &str,
) -> (StatusCode, String) {
    let body = json!({
        "name": name,
        "role": role,
        "subject_kind": "serviceaccount",
        "subject_name": subject,
    });
    call(
        api,
        token,
        Method::POST,
        api::PATH_ROLE_BINDINGS,
        Some(body),
    )
    .await
}

/// Audit records of `subject` refused `action` for a reason holding `rule`.
fn denied(audit: &[AuditRecord], subject: &str, action: &str, rule: &str) -> usize {
    audit
        .iter()
        .filter(|r| r.result == "denied" && r.subject == subject && r.action == action)
        .filter(|r| r.reason.as_deref().is_some_and(|x| x.contains(rule)))
        .count()
}

/// A service account `victim` with no role, made by the admin.
async fn victim(api: &Api) {
    let body = json!({ "name": "victim" });
    let (status, text) = call(
        api,
        &api.admin,
        Method::POST,
        api::PATH_SERVICE_ACCOUNTS,
        Some(body),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_allowed_to_create_bindings_cannot_bind_more_than_it_holds() {
    let api = start("").await;
    create_role(
        &api,
        "binder",
        json!([{ "resources": ["rolebindings"], "verbs": ["create"] }]),
    )
    .await;
    create_role(
        &api,
        "sa-keeper",
        json!([{ "resources": ["serviceaccounts"], "verbs": ["update"] }]),
    )
    .await;
    let both = json!([{ "resources": ["rolebindings"], "verbs": ["create"] }, { "resources": ["roles"], "verbs": ["bind"] }]);
    create_role(&api, "binder-plus", both).await;
    let binder = bind_a_service_account(&api, "binder").await;
    let binder_plus = bind_a_service_account(&api, "binder-plus").await;
    victim(&api).await;

    // It cannot bind admin to itself or to anyone.
    for (i, subject) in ["sa-binder", "victim"].into_iter().enumerate() {
        let (status, text) = try_bind(&api, &binder, &format!("esc-{i}"), "admin", subject).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{text}");
        assert!(
            text.contains(&format!(
                "cannot bind role `admin` to serviceaccount:{subject}"
            )),
            "{text}"
        );
        assert!(
            text.contains("`*` on `*`") && text.contains("`bind` on `roles`"),
            "the refusal names the rule: {text}"
        );
    }
    // Nor a role granting one thing more than it holds; what it holds, it may.
    let (status, text) = try_bind(&api, &binder, "esc-2", "sa-keeper", "victim").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{text}");
    assert!(text.contains("`update` on `serviceaccounts`"), "{text}");
    let (status, text) = try_bind(&api, &binder, "ok-1", "binder", "victim").await;
    assert_eq!(status, StatusCode::CREATED, "{text}");
    // `bind` on `roles` lifts the rule, as the rule says.
    let (status, text) = try_bind(&api, &binder_plus, "ok-2", "admin", "victim").await;
    assert_eq!(status, StatusCode::CREATED, "{text}");

    let bindings: Vec<api::RoleBindingInfo> = api.admin_get(api::PATH_ROLE_BINDINGS).await;
    assert!(
        !bindings.iter().any(|b| b.name.starts_with("esc-")),
        "{bindings:?}"
    );
    let audit: Vec<AuditRecord> = api.admin_get(api::PATH_AUDIT).await;
    let n = denied(
        &audit,
        "serviceaccount:sa-binder",
        "rolebindings.create",
        "`bind` on `roles`",
    );
    assert_eq!(n, 3, "each refusal audited with its rule: {audit:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_allowed_to_update_accounts_cannot_mint_a_token_for_a_stronger_one() {
    let api = start("").await;
    create_role(
        &api,
        "sa-keeper",
        json!([{ "resources": ["serviceaccounts"], "verbs": ["update"] }]),
    )
    .await;
    let keeper = bind_a_service_account(&api, "sa-keeper").await;
    let _admin = bind_a_service_account(&api, "admin").await;
    victim(&api).await;

    let mint = |who: &'static str| format!("{}/{who}/tokens", api::PATH_SERVICE_ACCOUNTS);
    let (status, text) = call(
        &api,
        &keeper,
        Method::POST,
        &mint("sa-admin"),
        Some(json!({})),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{text}");
    assert!(
        text.contains("cannot mint a token for serviceaccount:sa-admin")
            && text.contains("every permission of that account"),
        "{text}"
    );
    // For itself, or an account with no more, it may.
    for who in ["sa-sa-keeper", "victim"] {
        let (status, text) = call(&api, &keeper, Method::POST, &mint(who), Some(json!({}))).await;
        assert_eq!(status, StatusCode::CREATED, "{who}: {text}");
    }
    let audit: Vec<AuditRecord> = api.admin_get(api::PATH_AUDIT).await;
    let n = denied(
        &audit,
        "serviceaccount:sa-sa-keeper",
        "serviceaccounts.token.create",
        "every permission of that account",
    );
    assert_eq!(n, 1, "{audit:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_allowed_to_create_roles_cannot_create_one_granting_more_than_it_holds() {
    let api = start("").await;
    create_role(
        &api,
        "role-maker",
        json!([{ "resources": ["roles"], "verbs": ["create"] }]),
    )
    .await;
    create_role(
        &api,
        "maker-plus",
        json!([{ "resources": ["roles"], "verbs": ["create", "escalate"] }]),
    )
    .await;
    let maker = bind_a_service_account(&api, "role-maker").await;
    let maker_plus = bind_a_service_account(&api, "maker-plus").await;

    let wide =
        json!({ "name": "wide", "rules": [{ "resources": ["links"], "verbs": ["delete"] }] });
    let (status, text) = call(
        &api,
        &maker,
        Method::POST,
        api::PATH_ROLES,
        Some(wide.clone()),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{text}");
    assert!(
        text.contains("cannot create role `wide`")
            && text.contains("`delete` on `links`")
            && text.contains("`escalate` on `roles`"),
        "{text}"
    );
    let narrow =
        json!({ "name": "narrow", "rules": [{ "resources": ["roles"], "verbs": ["create"] }] });
    let (status, text) = call(&api, &maker, Method::POST, api::PATH_ROLES, Some(narrow)).await;
    assert_eq!(status, StatusCode::CREATED, "{text}");
    // `escalate` on `roles` lifts the rule.
    let (status, text) = call(&api, &maker_plus, Method::POST, api::PATH_ROLES, Some(wide)).await;
    assert_eq!(status, StatusCode::CREATED, "{text}");
    let audit: Vec<AuditRecord> = api.admin_get(api::PATH_AUDIT).await;
    let n = denied(
        &audit,
        "serviceaccount:sa-role-maker",
        "roles.create",
        "`escalate` on `roles`",
    );
    assert_eq!(n, 1, "{audit:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_join_tokens_are_audited_as_sensitive_and_may_name_one_relay() {
    let api = start("").await;
    let body = json!({ "kind": "relay", "name": "edge-7" });
    let (status, text) = call(&api, &api.admin, Method::POST, api::PATH_TOKENS, Some(body)).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let body = json!({ "kind": "relay" });
    let (status, text) = call(&api, &api.admin, Method::POST, api::PATH_TOKENS, Some(body)).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let audit: Vec<AuditRecord> = api.admin_get(api::PATH_AUDIT).await;
    let reasons: Vec<&str> = audit
        .iter()
        .filter(|r| r.action == "token.create" && r.result == "ok")
        .filter_map(|r| r.reason.as_deref())
        .collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("relay join token for `edge-7` only") && r.contains("data paths")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("relay join token for any name")),
        "{reasons:?}"
    );
    // The token is listed with the one name its relay will get.
    let tokens: Vec<api::JoinTokenInfo> = api.admin_get(api::PATH_OPEN_TOKENS).await;
    assert!(
        tokens
            .iter()
            .any(|t| t.kind == api::NodeKind::Relay && t.name.as_deref() == Some("edge-7")),
        "{tokens:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_administrator_cannot_be_taken_away() {
    let api = start("").await;
    let users: Vec<api::PrincipalInfo> = api.admin_get(api::PATH_USERS).await;
    let admin_token = users[0].tokens[0].id.clone();
    let lockouts = [
        (Method::DELETE, format!("{}/admin", api::PATH_ROLE_BINDINGS)),
        (
            Method::DELETE,
            format!("{}/admin/tokens/{admin_token}", api::PATH_USERS),
        ),
    ];
    for (method, path) in &lockouts {
        let (status, text) = call(&api, &api.admin, method.clone(), path, None).await;
        assert_eq!(status, StatusCode::CONFLICT, "{method} {path}: {text}");
        assert!(
            text.contains("no user or service account with the role admin"),
            "{text}"
        );
    }
    // Another administrator, with a token: now each may go, but not both.
    let ops = bind_a_service_account(&api, "admin").await;
    let (status, text) = call(&api, &ops, Method::DELETE, &lockouts[0].1, None).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let (status, text) = call(&api, &ops, Method::DELETE, &lockouts[1].1, None).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the user admin no longer administers: {text}"
    );
    let (status, text) = call(
        &api,
        &ops,
        Method::DELETE,
        &format!("{}/b-admin", api::PATH_ROLE_BINDINGS),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{text}");
    let (status, _) = call(&api, &ops, Method::GET, api::PATH_ROLE_BINDINGS, None).await;
    assert_eq!(status, StatusCode::OK, "the last administrator still works");
}

/// The audit log filters by outcome, and refuses an outcome it does not
/// know.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_filters_by_outcome() {
    let api = start("").await;
    // A refused authentication, and an admin's success.
    let (status, _) = call(
        &api,
        "comsat_not_a_token",
        Method::GET,
        api::PATH_LINKS,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, text) = call(
        &api,
        &api.admin,
        Method::POST,
        api::PATH_SERVICE_ACCOUNTS,
        Some(json!({ "name": "ci" })),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{text}");
    for (result, other) in [("denied", "ok"), ("ok", "denied")] {
        let records: Vec<AuditRecord> = api
            .admin_get(&format!("{}?result={result}", api::PATH_AUDIT))
            .await;
        assert!(!records.is_empty(), "{result}");
        assert!(records.iter().all(|r| r.result == result), "{records:#?}");
        assert!(records.iter().all(|r| r.result != other));
    }
    let (status, text) = call(
        &api,
        &api.admin,
        Method::GET,
        &format!("{}?result=maybe", api::PATH_AUDIT),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
}
