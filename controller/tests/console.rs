//! The console's pages and sessions, in process: an API token signs in for
//! a session cookie, which then acts as that token under the same role
//! checks; a change needs the session's CSRF token; a session ends when it
//! is signed out, when it expires, and when its token is revoked.

mod common;

use std::time::Duration;

use common::api::*;
use comsat_protocol::api::{self, AuditRecord, ConsoleSessionInfo};
use reqwest::header::{HeaderMap, SET_COOKIE};
use reqwest::{Method, StatusCode};
use serde_json::json;

/// Signs in with `token`: the answer's status, headers and body.
async fn sign_in(api: &Api, token: &str) -> (StatusCode, HeaderMap, String) {
    let resp = api
        .client
        .post(api.url(api::PATH_CONSOLE_SESSION))
        .json(&json!({ "token": token }))
        .send()
        .await
        .expect("send");
    let (status, headers) = (resp.status(), resp.headers().clone());
    (status, headers, resp.text().await.unwrap_or_default())
}

/// `method path` with the session's cookie, and its CSRF token if `csrf`.
async fn with_session(
    api: &Api,
    s: &ConsoleSession,
    csrf: Option<&str>,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> (StatusCode, String) {
    let mut req = api
        .client
        .request(method, api.url(path))
        .header("cookie", &s.cookie);
    if let Some(c) = csrf {
        req = req.header("x-csrf-token", c);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("send");
    let status = resp.status();
    (status, resp.text().await.unwrap_or_default())
}

fn link_body(name: &str) -> serde_json::Value {
    json!({
        "name": name, "from": "a", "listen": "tcp://127.0.0.1:7000",
        "to": "b", "target": "tcp://127.0.0.1:9000",
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_is_served_hardened_from_the_binary() {
    let api = start("").await;
    for (path, kind) in [
        (api::PATH_CONSOLE, "text/html"),
        (api::PATH_CONSOLE_SCRIPT, "text/javascript"),
        (api::PATH_CONSOLE_STYLE, "text/css"),
    ] {
        let resp = api.client.get(api.url(path)).send().await.expect("send");
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        let h = resp.headers().clone();
        let header = |name: &str| h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("");
        assert!(header("content-type").starts_with(kind), "{path}");
        assert!(
            header("content-security-policy").contains("default-src 'self'"),
            "{path}: everything from this origin only"
        );
        assert!(header("content-security-policy").contains("frame-ancestors 'none'"));
        assert_eq!(header("x-content-type-options"), "nosniff");
        assert_eq!(header("cache-control"), "no-store");
        let body = resp.text().await.expect("body");
        assert!(!body.contains(&api.admin));
        // The SVG namespace is a name, not an address to fetch.
        let body = body.replace("http://www.w3.org/2000/svg", "");
        assert!(
            !body.contains("http://") && !body.contains("https://"),
            "{path} fetches nothing from elsewhere"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_acts_as_its_token_and_changes_need_its_csrf_token() {
    let api = start("").await;
    let (status, headers, body) = sign_in(&api, &api.admin).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let cookie = headers[SET_COOKIE].to_str().expect("ascii");
    for attribute in [
        "HttpOnly",
        "Secure",
        "SameSite=Strict",
        "Path=/",
        "Max-Age=28800",
    ] {
        assert!(cookie.contains(attribute), "{attribute} in {cookie}");
    }
    assert!(!cookie.contains(&api.admin) && !body.contains(&api.admin));
    let info: ConsoleSessionInfo = serde_json::from_str(&body).expect("info");
    assert_eq!(info.subject, "user:admin");
    assert_eq!(info.csrf.len(), 64);
    assert!(!info.rules.is_empty());
    let s = console_session(&api, &api.admin).await;

    // Reads need the cookie only; the session is what GET /ui/session says.
    let (status, text) = with_session(&api, &s, None, Method::GET, api::PATH_LINKS, None).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let (status, text) =
        with_session(&api, &s, None, Method::GET, api::PATH_CONSOLE_SESSION, None).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let again: ConsoleSessionInfo = serde_json::from_str(&text).expect("info");
    assert_eq!(again.csrf, s.csrf);

    // A change without the CSRF token, or with another, is refused.
    for csrf in [
        None,
        Some("0".repeat(64).as_str()),
        Some(info.csrf.as_str()),
    ] {
        let (status, text) = with_session(
            &api,
            &s,
            csrf,
            Method::POST,
            api::PATH_LINKS,
            Some(link_body("from-console")),
        )
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{text}");
        assert!(text.contains("X-CSRF-Token"), "{text}");
    }
    let (status, text) = with_session(
        &api,
        &s,
        Some(&s.csrf),
        Method::POST,
        api::PATH_LINKS,
        Some(link_body("from-console")),
    )
    .await;
    assert_ne!(status, StatusCode::FORBIDDEN, "{text}");
    assert_ne!(status, StatusCode::UNAUTHORIZED, "{text}");
    let audit: Vec<AuditRecord> = api.admin_get(api::PATH_AUDIT).await;
    assert!(
        audit
            .iter()
            .any(|r| r.action == "session.create" && r.subject == "user:admin"),
        "{audit:#?}"
    );
    assert!(
        audit.iter().any(|r| r.result == "denied"
            && r.reason
                .as_deref()
                .is_some_and(|x| x.contains("X-CSRF-Token"))),
        "{audit:#?}"
    );

    // Signing out needs the CSRF token too, and ends the session.
    let (status, _) = with_session(
        &api,
        &s,
        None,
        Method::DELETE,
        api::PATH_CONSOLE_SESSION,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let resp = api
        .client
        .delete(api.url(api::PATH_CONSOLE_SESSION))
        .header("cookie", &s.cookie)
        .header("x-csrf-token", &s.csrf)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert!(
        resp.headers()[SET_COOKIE]
            .to_str()
            .expect("ascii")
            .contains("Max-Age=0")
    );
    let (status, _) = with_session(&api, &s, None, Method::GET, api::PATH_LINKS, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "signed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_session_can_look_but_not_change() {
    let api = start("").await;
    let (status, text) = call(
        &api,
        &api.admin,
        Method::POST,
        api::PATH_SERVICE_ACCOUNTS,
        Some(json!({ "name": "looker" })),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{text}");
    let created: serde_json::Value = serde_json::from_str(&text).expect("json");
    let token = created["token"].as_str().expect("token").to_owned();
    let (status, text) = call(
        &api,
        &api.admin,
        Method::POST,
        api::PATH_ROLE_BINDINGS,
        Some(json!({
            "name": "looker-views", "role": "viewer",
            "subject_kind": "serviceaccount", "subject_name": "looker",
        })),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{text}");
    let s = console_session(&api, &token).await;
    let (status, _) = with_session(&api, &s, None, Method::GET, api::PATH_LINKS, None).await;
    assert_eq!(status, StatusCode::OK);
    // Even with its CSRF token, a forged change is refused by the roles.
    let (status, text) = with_session(
        &api,
        &s,
        Some(&s.csrf),
        Method::POST,
        api::PATH_LINKS,
        Some(link_body("forged")),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{text}");
    assert!(text.contains("`create` on `links`"), "{text}");
    let (status, text) = with_session(
        &api,
        &s,
        Some(&s.csrf),
        Method::POST,
        api::PATH_TOKENS,
        Some(json!({ "kind": "agent", "name": "x" })),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_session_a_bad_token_or_a_forged_cookie_gets_nothing() {
    let api = start("").await;
    for (body, want) in [
        (
            json!({ "token": "comsat_not_a_token" }),
            StatusCode::UNAUTHORIZED,
        ),
        (json!({ "token": "" }), StatusCode::BAD_REQUEST),
        (json!({ "token": "x".repeat(513) }), StatusCode::BAD_REQUEST),
        (
            json!({ "token": api.admin, "also": 1 }),
            StatusCode::BAD_REQUEST,
        ),
        (json!({}), StatusCode::BAD_REQUEST),
    ] {
        let resp = api
            .client
            .post(api.url(api::PATH_CONSOLE_SESSION))
            .json(&body)
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), want, "{body}");
        assert!(resp.headers().get(SET_COOKIE).is_none());
    }
    let forged = ConsoleSession {
        cookie: format!("comsat_session={}", "ab".repeat(32)),
        csrf: String::new(),
    };
    let malformed = ConsoleSession {
        cookie: "comsat_session=../../admin.token".into(),
        csrf: String::new(),
    };
    for s in [&forged, &malformed] {
        for path in [api::PATH_LINKS, api::PATH_CONSOLE_SESSION] {
            let (status, text) = with_session(&api, s, None, Method::GET, path, None).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}: {text}");
        }
    }
    // Not from the console's page: a form's body, or another site.
    let resp = api
        .client
        .post(api.url(api::PATH_CONSOLE_SESSION))
        .header("content-type", "text/plain")
        .body(format!("{{\"token\":\"{}\"}}", api.admin))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let resp = api
        .client
        .post(api.url(api::PATH_CONSOLE_SESSION))
        .header("sec-fetch-site", "cross-site")
        .json(&json!({ "token": api.admin }))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert!(resp.headers().get(SET_COOKIE).is_none());
    // Without any credential.
    let resp = api
        .client
        .get(api.url(api::PATH_CONSOLE_SESSION))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}

/// One token holds at most 16 sessions: signing in again ends an older
/// one, never the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_token_holds_a_bounded_number_of_sessions() {
    let api = start("").await;
    let mut sessions = Vec::new();
    for _ in 0..20 {
        sessions.push(console_session(&api, &api.admin).await);
    }
    let mut live = 0;
    for s in &sessions {
        let (status, _) = with_session(&api, s, None, Method::GET, api::PATH_LINKS, None).await;
        if status == StatusCode::OK {
            live += 1;
        } else {
            assert_eq!(status, StatusCode::UNAUTHORIZED);
        }
    }
    assert_eq!(live, 16);
    let newest = sessions.last().expect("a session");
    let (status, _) = with_session(&api, newest, None, Method::GET, api::PATH_LINKS, None).await;
    assert_eq!(status, StatusCode::OK, "the newest session stays");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ends_when_it_expires_and_when_its_token_is_revoked() {
    let api = start("console_session_secs = 1\n").await;
    let s = console_session(&api, &api.admin).await;
    let (status, _) = with_session(&api, &s, None, Method::GET, api::PATH_LINKS, None).await;
    assert_eq!(status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (status, _) = with_session(&api, &s, None, Method::GET, api::PATH_LINKS, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "expired");
    let audit: Vec<AuditRecord> = api.admin_get(api::PATH_AUDIT).await;
    assert!(
        audit
            .iter()
            .any(|r| r.reason.as_deref() == Some("console session expired")),
        "{audit:#?}"
    );

    let api = start("").await;
    let (status, text) = call(
        &api,
        &api.admin,
        Method::POST,
        api::PATH_SERVICE_ACCOUNTS,
        Some(json!({ "name": "ops" })),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{text}");
    let created: serde_json::Value = serde_json::from_str(&text).expect("json");
    let token = created["token"].as_str().expect("token").to_owned();
    let id = created["token_id"].as_str().expect("id").to_owned();
    let s = console_session(&api, &token).await;
    let (status, _) =
        with_session(&api, &s, None, Method::GET, api::PATH_CONSOLE_SESSION, None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, text) = call(
        &api,
        &api.admin,
        Method::DELETE,
        &format!("{}/ops/tokens/{id}", api::PATH_SERVICE_ACCOUNTS),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    for path in [api::PATH_CONSOLE_SESSION, api::PATH_STATUS] {
        let (status, _) = with_session(&api, &s, None, Method::GET, path, None).await;
        assert_eq!(
            status,
            StatusCode::UNAUTHORIZED,
            "{path}: the token was revoked"
        );
    }
}
