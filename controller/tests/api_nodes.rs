//! The HTTPS API in process: nodes enrol with join tokens, authenticate
//! with JWTs, get links and lose them; and what is refused and audited on
//! the way.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::api::*;
use comsat_controller::{InitOptions, init};
use comsat_node::keys::Generate;
use comsat_protocol::api::{
    self, AgentDesired, AuditRecord, EnrolRequest, JoinToken, LinkInfo, NodeKind, RelayEventKind,
    Status,
};
use comsat_protocol::jwt;
use comsat_protocol::{NoiseSecretKey, Side, SigningKey};
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrol_authenticate_link_and_revoke() {
    let mut api = start("").await;

    the_ca_is_public_and_everything_admin_needs_the_admin_token(&api).await;

    let a = api.enrol_agent("a").await;
    let b = api.enrol_agent("b").await;
    assert_eq!(a.enrolled.audience, b.enrolled.audience);
    assert!(a.enrolled.audience.starts_with("comsat-controller:"));

    let (r1, relay_token, used_secret) =
        a_relay_token_refuses_an_agent_and_enrols_one_relay_once(&api).await;

    let [token, hs256, forged] = node_jwts_are_good_once(&api, &a, &r1).await;

    let node = a.enrolled.node_id.to_string();
    let secrets = [
        used_secret.as_str(),
        relay_token.secret.as_str(),
        token.as_str(),
        hs256.as_str(),
        forged.as_str(),
    ];
    the_audit_log_kept_every_reason_and_no_secret(&api, &node, secrets).await;

    // Relays: two heartbeat, one does not.
    let r2 = api.enrol_relay("r2", "127.0.0.1:4432").await;
    let r3 = api.enrol_relay("r3", "relay3.example:4433").await;
    api.heartbeat(&r1).await;
    api.heartbeat(&r2).await;
    let status: Status = api.admin_get(api::PATH_STATUS).await;
    assert_eq!(
        (status.agents, status.relays, status.healthy_relays),
        (2, 3, 2)
    );

    links_with_an_unknown_agent_one_agent_or_no_loopback_are_refused(&api).await;

    // A long poll of agent b wakes when the link appears.
    let b_version = api.config(&b, 0, 0).await.version;
    let b_poll = long_poll_config(&api, &b, b_version);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let resp = api.create_link(&link("db", "a", "b")).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let info: LinkInfo = resp.json().await.expect("json");
    let mut names = info.relays.clone();
    names.sort();
    assert_eq!(names, ["r1", "r2"]);
    assert_eq!(
        (
            info.spec.from.as_str(),
            info.spec.to.as_str(),
            info.generation
        ),
        ("a", "b", 1)
    );
    let (code, _) = error_of(api.create_link(&link("db", "a", "b")).await).await;
    assert_eq!(code, StatusCode::CONFLICT);

    let (waited, b_desired) = b_poll.await.expect("poll task");
    assert!(waited < Duration::from_secs(10), "{waited:?}");
    assert!(b_desired.version > b_version);
    assert_eq!(b_desired.links.len(), 1);
    let bl = &b_desired.links[0];
    assert_eq!(bl.side, Side::B);
    assert_eq!(bl.target.as_deref(), Some("tcp://127.0.0.1:5432"));
    assert_eq!(bl.listen, None);
    assert_eq!(
        bl.peer_noise_public_key,
        a.noise.as_ref().expect("noise").public()
    );

    let a_desired = api.config(&a, 0, 0).await;
    let al = &a_desired.links[0];
    assert_eq!(al.side, Side::A);
    assert_eq!(al.listen.as_deref(), Some("tcp://127.0.0.1:7000"));
    assert_eq!(al.target, None);
    assert_eq!(
        al.peer_noise_public_key,
        b.noise.as_ref().expect("noise").public()
    );
    assert_eq!(al.link_id, info.link_id);
    assert_eq!(al.relays.len(), 2);
    for r in &al.relays {
        assert!(r.relay_id == r1.relay_id() || r.relay_id == r2.relay_id());
        assert_eq!(r.server_name, "127.0.0.1");
        assert!(r.addr.starts_with("127.0.0.1:443"));
    }

    let cursors =
        grants_reach_exactly_the_assigned_relays(&api, [&a, &b], [&r1, &r2], &r3, &info).await;

    let links: Vec<LinkInfo> = api.admin_get(api::PATH_LINKS).await;
    assert_eq!(links, vec![info.clone()]);
    let one: LinkInfo = api.admin_get(&format!("{}/db", api::PATH_LINKS)).await;
    assert_eq!(one, info);

    a_relay_renews_its_certificate(&api, &r3).await;

    deleting_revokes_at_both_relays_and_empties_the_config(
        &api,
        [&r1, &r2],
        cursors,
        &r3,
        &a,
        a_desired.version,
    )
    .await;

    api.stop().await;
}

#[test]
fn init_refuses_an_initialised_dir() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = InitOptions {
        data_dir: dir.path().to_owned(),
        ..InitOptions::default()
    };
    init(&opts).expect("first");
    let err = init(&opts).expect_err("second");
    assert!(err.to_string().contains(&dir.path().display().to_string()));
    assert!(Path::new(&dir.path().join("controller.db")).exists());
}

/// The CA is public; everything admin needs the admin token, and a body
/// with an unknown field is refused.
async fn the_ca_is_public_and_everything_admin_needs_the_admin_token(api: &Api) {
    let ca = api
        .client
        .get(api.url(api::PATH_CA))
        .send()
        .await
        .expect("ca")
        .text()
        .await
        .expect("text");
    assert_eq!(ca, api.ca_pem);
    let resp = api
        .client
        .post(api.url(api::PATH_TOKENS))
        .bearer_auth("comsat-admin-v1:nope")
        .json(&json!({ "kind": "agent" }))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let resp = api
        .client
        .post(api.url(api::PATH_TOKENS))
        .bearer_auth(&api.admin)
        .json(&json!({ "kind": "agent", "nmae": "x" }))
        .send()
        .await
        .expect("send");
    let (status, msg) = error_of(resp).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(msg.contains("unknown field"), "{msg}");
}

/// A relay token refuses an agent, and stays good for a relay; used, and
/// with a wrong secret, it is refused. Returns the relay, the token and
/// its secret.
async fn a_relay_token_refuses_an_agent_and_enrols_one_relay_once(
    api: &Api,
) -> (Node, JoinToken, String) {
    let relay_token = api.token(NodeKind::Relay, "r1").await;
    let mut req = EnrolRequest {
        token_id: relay_token.id.clone(),
        secret: relay_token.secret.clone(),
        kind: NodeKind::Agent,
        sign_public_key: SigningKey::generate().public(),
        noise_public_key: Some(NoiseSecretKey::generate().public()),
        public_addr: None,
        interactive_addr: None,
        csr_pem: None,
        svid_pem: None,
    };
    // Every refusal answers the same; the audit log has the reason.
    let refused = |(status, msg): (StatusCode, String)| {
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(msg.starts_with("join token refused"), "{msg}");
    };
    refused(error_of(api.enrol_req(&req).await).await);
    let r1_key = SigningKey::generate();
    req.kind = NodeKind::Relay;
    req.sign_public_key = r1_key.public();
    req.noise_public_key = None;
    req.public_addr = Some("127.0.0.1:4431".into());
    req.csr_pem = Some(csr());
    let resp = api.enrol_req(&req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let r1 = Node {
        key: r1_key,
        noise: None,
        enrolled: resp.json().await.expect("json"),
    };
    refused(error_of(api.enrol_req(&req).await).await);
    let used_secret = req.secret.clone();
    req.secret = "0".repeat(64);
    refused(error_of(api.enrol_req(&req).await).await);
    (r1, relay_token, used_secret)
}

/// Node JWTs: good once; replays, other algorithms, other keys, another
/// audience, a relay's JWT and none at all refused. Returns the JWTs whose
/// text must not be logged.
async fn node_jwts_are_good_once(api: &Api, a: &Node, r1: &Node) -> [String; 3] {
    let token = a.jwt();
    let get_config = |token: String| {
        api.client
            .get(api.url(api::PATH_AGENT_CONFIG))
            .bearer_auth(token)
            .send()
    };
    let resp = get_config(token.clone()).await.expect("send");
    assert_eq!(resp.status(), StatusCode::OK);
    let desired: AgentDesired = resp.json().await.expect("json");
    assert!(desired.links.is_empty());
    assert!(desired.relay_ca_pem.contains("BEGIN CERTIFICATE"));
    let unauthorized = |(status, msg): (StatusCode, String)| {
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(msg.starts_with("unauthorized"), "{msg}");
    };
    unauthorized(error_of(get_config(token.clone()).await.expect("send")).await);
    let node = a.enrolled.node_id;
    let now = unix_now();
    let hs256 = format!(
        "{}.{}.{}",
        b64(format!(r#"{{"alg":"HS256","typ":"JWT","kid":"{node}"}}"#).as_bytes()),
        b64(format!(
            r#"{{"sub":"{node}","aud":"{}","iat":{now},"exp":{},"jti":"x1"}}"#,
            a.enrolled.audience,
            now + 30
        )
        .as_bytes()),
        b64(b"not a real mac")
    );
    unauthorized(error_of(get_config(hs256.clone()).await.expect("send")).await);
    let forged = jwt::mint(
        &SigningKey::generate(),
        &node,
        &a.enrolled.audience,
        now,
        30,
        comsat_node::keys::random_jti(),
    )
    .expect("mint");
    unauthorized(error_of(get_config(forged.clone()).await.expect("send")).await);
    let wrong_aud = jwt::mint(
        &a.key,
        &node,
        "comsat-controller:other",
        now,
        30,
        comsat_node::keys::random_jti(),
    )
    .expect("mint");
    let (status, _) = error_of(get_config(wrong_aud).await.expect("send")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // A relay's JWT does not open agent endpoints.
    let (status, _) = error_of(get_config(r1.jwt()).await.expect("send")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let resp = api
        .client
        .get(api.url(api::PATH_AGENT_CONFIG))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    [token, hs256, forged]
}

/// The audit log kept every real reason, with subject and source, and
/// none of the secrets used (`secrets` and the admin tokens).
async fn the_audit_log_kept_every_reason_and_no_secret(api: &Api, node: &str, secrets: [&str; 5]) {
    let audit: Vec<AuditRecord> = api.admin_get(api::PATH_AUDIT).await;
    let denied = |reason: &str| {
        audit.iter().any(|r| {
            r.result == "denied"
                && r.reason.as_deref().is_some_and(|x| x.contains(reason))
                && r.source
                    .as_deref()
                    .is_some_and(|s| s.starts_with("127.0.0.1:"))
        })
    };
    for reason in [
        "unknown API token",
        "comsat relay enrol",
        "already used",
        "unknown join token",
        "replayed",
        "EdDSA",
        "signature",
        "this endpoint is for agents",
        "no `Authorization",
    ] {
        assert!(
            denied(reason),
            "no denied record for {reason:?}: {audit:#?}"
        );
    }
    assert!(
        audit
            .iter()
            .any(|r| r.action == "enrol" && r.result == "ok" && r.subject == "relay:r1"),
        "{audit:#?}"
    );
    assert!(
        audit
            .iter()
            .any(|r| r.subject == format!("node:{node}") && r.result == "denied"),
        "{audit:#?}"
    );
    let text = serde_json::to_string(&audit).expect("json");
    let [used_secret, relay_secret, token, hs256, forged] = secrets;
    for secret in [
        api.admin.as_str(),
        used_secret,
        relay_secret,
        token,
        hs256,
        forged,
        "comsat-admin-v1:nope",
    ] {
        assert!(!text.contains(secret), "a secret is in the audit log");
    }
}

/// Link errors: an unknown agent, one agent at both ends, a listener not
/// on loopback.
async fn links_with_an_unknown_agent_one_agent_or_no_loopback_are_refused(api: &Api) {
    let (code, msg) = error_of(api.create_link(&link("db", "a", "zz")).await).await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert!(msg.contains("`zz`"), "{msg}");
    let (code, _) = error_of(api.create_link(&link("db", "a", "a")).await).await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    let mut bad = link("db", "a", "b");
    bad.listen = "tcp://0.0.0.0:7000".into();
    let (code, msg) = error_of(api.create_link(&bad).await).await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert!(msg.contains("loopback"), "{msg}");
}

/// A long poll (20 s) of `agent`'s config after `since`: how long it
/// waited, and what it got.
fn long_poll_config(
    api: &Api,
    agent: &Node,
    since: u64,
) -> tokio::task::JoinHandle<(Duration, AgentDesired)> {
    let client = api.client.clone();
    let url = api.url(api::PATH_AGENT_CONFIG);
    let jwt = agent.jwt();
    tokio::spawn(async move {
        let started = Instant::now();
        let resp = client
            .get(url)
            .query(&[("since", since), ("wait_ms", 20_000)])
            .bearer_auth(jwt)
            .send()
            .await
            .expect("send");
        (
            started.elapsed(),
            resp.json::<AgentDesired>().await.expect("json"),
        )
    })
}

/// Grants of link `info` from agent `a` to agent `b` reach exactly the
/// assigned relays and verify; `r3` gets nothing. Returns each relay's
/// cursor after its grant.
async fn grants_reach_exactly_the_assigned_relays(
    api: &Api,
    [a, b]: [&Node; 2],
    assigned: [&Node; 2],
    r3: &Node,
    info: &LinkInfo,
) -> Vec<u64> {
    let authority = a.enrolled.authority_public_key;
    let mut cursors = Vec::new();
    for r in assigned {
        let ev = api.events(r, 0, 0).await;
        assert_eq!(ev.events.len(), 1);
        assert!(!ev.more);
        assert_eq!(ev.next, ev.events[0].seq);
        let RelayEventKind::Grant { grant } = &ev.events[0].kind else {
            panic!("expected a grant");
        };
        let g = verify_grant(grant, &authority, &r.relay_id());
        assert_eq!(g.link_id, info.link_id);
        assert_eq!(g.side_a.node_id, a.enrolled.node_id);
        assert_eq!(g.side_b.sign_pub, b.key.public());
        assert_eq!(g.buffer_limit, 64 * 1024 * 1024);
        cursors.push(ev.next);
    }
    let started = Instant::now();
    let none = api.events(r3, 0, 300).await;
    assert!(none.events.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(250));
    cursors
}

/// Relay certificate renewal.
async fn a_relay_renews_its_certificate(api: &Api, relay: &Node) {
    let resp = api
        .client
        .post(api.url(api::PATH_RELAY_CERT))
        .bearer_auth(relay.jwt())
        .json(&json!({ "csr_pem": csr() }))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::OK);
}

/// Deleting link `db` revokes it at both `assigned` relays (after
/// `cursors`), at none other, and empties agent `a`'s config (after
/// `version`).
async fn deleting_revokes_at_both_relays_and_empties_the_config(
    api: &Api,
    assigned: [&Node; 2],
    cursors: Vec<u64>,
    r3: &Node,
    a: &Node,
    version: u64,
) {
    let resp = api
        .client
        .delete(api.url(&format!("{}/db", api::PATH_LINKS)))
        .bearer_auth(&api.admin)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::OK);
    for (r, since) in assigned.into_iter().zip(cursors) {
        let ev = api.events(r, since, 0).await;
        assert_eq!(ev.events.len(), 1);
        assert_eq!(ev.events[0].kind, RelayEventKind::Revoke);
    }
    assert!(api.events(r3, 0, 0).await.events.is_empty());
    let after = api.config(a, version, 0).await;
    assert!(after.version > version);
    assert!(after.links.is_empty());
}
