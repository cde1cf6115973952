//! The HTTPS API in process: init a temp dir, bind on 127.0.0.1:0, and talk
//! to it with reqwest over TLS pinned to the generated CA.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use comsat_controller::{Controller, InitOptions, RunOptions, init};
use comsat_protocol::api::{
    self, AgentDesired, AuditRecord, EnrolRequest, EnrolResponse, ErrorBody, JoinToken, LinkCreate,
    LinkInfo, NodeKind, RelayEventKind, RelayEvents, RelayHeartbeat, RelayInfo, RelayLoad, Status,
    TokenCreated,
};
use comsat_protocol::jwt::{self, unix_now};
use comsat_protocol::{NoiseSecretKey, RelayId, Side, SignPublicKey, SignedGrant, SigningKey};
use reqwest::StatusCode;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde_json::json;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

struct Api {
    _dir: tempfile::TempDir,
    data: PathBuf,
    client: reqwest::Client,
    base: String,
    admin: String,
    ca_pem: String,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<Result<(), comsat_controller::ControllerError>>>,
}

struct Node {
    key: SigningKey,
    noise: Option<NoiseSecretKey>,
    enrolled: EnrolResponse,
}

impl Node {
    fn jwt(&self) -> String {
        jwt::mint(
            &self.key,
            &self.enrolled.node_id,
            &self.enrolled.audience,
            unix_now(),
            30,
        )
        .expect("mint")
    }

    fn relay_id(&self) -> RelayId {
        RelayId(self.enrolled.node_id.0)
    }
}

fn client(ca_pem: &[u8]) -> reqwest::Client {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.expect("ca pem")).expect("add root");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .build()
        .expect("client")
}

async fn start(extra_config: &str) -> Api {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("ctl");
    init(&InitOptions {
        data_dir: data.clone(),
        ..InitOptions::default()
    })
    .expect("init");
    if !extra_config.is_empty() {
        let path = data.join("controller.toml");
        let mut text = std::fs::read_to_string(&path).expect("read config");
        text.push_str(extra_config);
        std::fs::write(&path, text).expect("write config");
    }
    let controller = Controller::bind(RunOptions {
        data_dir: data.clone(),
        listen: Some("127.0.0.1:0".parse().expect("addr")),
        database: None,
    })
    .await
    .expect("bind");
    let base = format!("https://127.0.0.1:{}", controller.local_addr().port());
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(controller.run(async {
        let _ = stopped.await;
    }));
    let ca_pem = std::fs::read_to_string(data.join("ca.pem")).expect("ca");
    let admin = std::fs::read_to_string(data.join("admin.token"))
        .expect("admin token")
        .trim()
        .to_owned();
    Api {
        client: client(ca_pem.as_bytes()),
        _dir: dir,
        data,
        base,
        admin,
        ca_pem,
        stop: Some(stop),
        server: Some(server),
    }
}

impl Api {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            tokio::time::timeout(Duration::from_secs(10), server)
                .await
                .expect("stops in time")
                .expect("task")
                .expect("run ok");
        }
    }

    async fn token(&self, kind: NodeKind, name: &str) -> JoinToken {
        let resp = self
            .client
            .post(self.url(api::PATH_TOKENS))
            .bearer_auth(&self.admin)
            .json(&json!({ "kind": kind, "name": name }))
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), StatusCode::OK);
        let created: TokenCreated = resp.json().await.expect("json");
        assert!(created.expires_at > unix_now());
        JoinToken::parse(&created.token).expect("token parses")
    }

    async fn enrol_req(&self, req: &EnrolRequest) -> reqwest::Response {
        self.client
            .post(self.url(api::PATH_ENROL))
            .json(req)
            .send()
            .await
            .expect("send")
    }

    async fn enrol_agent(&self, name: &str) -> Node {
        let token = self.token(NodeKind::Agent, name).await;
        assert_eq!(token.url, "https://127.0.0.1:8443");
        let key = SigningKey::generate();
        let noise = NoiseSecretKey::generate();
        let resp = self
            .enrol_req(&EnrolRequest {
                token_id: token.id.clone(),
                secret: token.secret.clone(),
                kind: NodeKind::Agent,
                sign_public_key: key.public(),
                noise_public_key: Some(noise.public()),
                public_addr: None,
                interactive_addr: None,
                csr_pem: None,
            })
            .await;
        assert_eq!(resp.status(), StatusCode::OK);
        let enrolled: EnrolResponse = resp.json().await.expect("json");
        assert_eq!(enrolled.name, name);
        Node {
            key,
            noise: Some(noise),
            enrolled,
        }
    }

    async fn enrol_relay(&self, name: &str, addr: &str) -> Node {
        let (key, resp) = self.try_enrol_relay(name, addr, None).await;
        self.enrolled_relay(key, resp).await
    }

    /// Sends a relay's enrolment; the key it named and the answer.
    async fn try_enrol_relay(
        &self,
        name: &str,
        addr: &str,
        interactive: Option<&str>,
    ) -> (SigningKey, reqwest::Response) {
        let token = self.token(NodeKind::Relay, name).await;
        let key = SigningKey::generate();
        let resp = self
            .enrol_req(&EnrolRequest {
                token_id: token.id.clone(),
                secret: token.secret.clone(),
                kind: NodeKind::Relay,
                sign_public_key: key.public(),
                noise_public_key: None,
                public_addr: Some(addr.to_owned()),
                interactive_addr: interactive.map(str::to_owned),
                csr_pem: Some(csr()),
            })
            .await;
        (key, resp)
    }

    async fn enrolled_relay(&self, key: SigningKey, resp: reqwest::Response) -> Node {
        assert_eq!(resp.status(), StatusCode::OK);
        let enrolled: EnrolResponse = resp.json().await.expect("json");
        assert!(
            enrolled
                .cert_pem
                .as_deref()
                .is_some_and(|c| c.contains("BEGIN CERTIFICATE"))
        );
        Node {
            key,
            noise: None,
            enrolled,
        }
    }

    async fn heartbeat(&self, relay: &Node) {
        let resp = self
            .client
            .post(self.url(api::PATH_RELAY_HEARTBEAT))
            .bearer_auth(relay.jwt())
            .json(&RelayHeartbeat {
                load: RelayLoad::default(),
            })
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), StatusCode::OK);
    }

    async fn events(&self, relay: &Node, since: u64, wait_ms: u64) -> RelayEvents {
        let resp = self
            .client
            .get(self.url(api::PATH_RELAY_EVENTS))
            .query(&[("since", since), ("wait_ms", wait_ms)])
            .bearer_auth(relay.jwt())
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), StatusCode::OK);
        resp.json().await.expect("json")
    }

    async fn config(&self, agent: &Node, since: u64, wait_ms: u64) -> AgentDesired {
        let resp = self
            .client
            .get(self.url(api::PATH_AGENT_CONFIG))
            .query(&[("since", since), ("wait_ms", wait_ms)])
            .bearer_auth(agent.jwt())
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), StatusCode::OK);
        resp.json().await.expect("json")
    }

    async fn admin_get<T: serde::de::DeserializeOwned>(&self, path: &str) -> T {
        let resp = self
            .client
            .get(self.url(path))
            .bearer_auth(&self.admin)
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        resp.json().await.expect("json")
    }

    async fn create_link(&self, body: &LinkCreate) -> reqwest::Response {
        self.client
            .post(self.url(api::PATH_LINKS))
            .bearer_auth(&self.admin)
            .json(body)
            .send()
            .await
            .expect("send")
    }

    async fn patch_link(&self, name: &str, body: &serde_json::Value) -> reqwest::Response {
        self.client
            .patch(self.url(&format!("{}/{name}", api::PATH_LINKS)))
            .bearer_auth(&self.admin)
            .json(body)
            .send()
            .await
            .expect("send")
    }
}

fn csr() -> String {
    let key = rcgen::KeyPair::generate().expect("key");
    rcgen::CertificateParams::new(vec!["ignored.example".to_owned()])
        .expect("params")
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem")
}

async fn error_of(resp: reqwest::Response) -> (StatusCode, String) {
    let status = resp.status();
    let body: ErrorBody = resp.json().await.expect("error body");
    (status, body.error)
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn link(name: &str, from: &str, to: &str) -> LinkCreate {
    LinkCreate {
        name: name.into(),
        from: from.into(),
        listen: "tcp://127.0.0.1:7000".into(),
        to: to.into(),
        target: "tcp://127.0.0.1:5432".into(),
        allowed_uids: vec![],
        allowed_gids: vec![],
        max_flows: None,
        rate_limit_bytes_per_sec: None,
        connection: None,
    }
}

fn verify_grant(
    hex_grant: &str,
    authority: &SignPublicKey,
    relay: &RelayId,
) -> comsat_protocol::Grant {
    let bytes = hex::decode(hex_grant).expect("hex");
    SignedGrant::decode(&bytes)
        .expect("decode")
        .verify(authority, relay, unix_now(), None)
        .expect("verifies")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrol_authenticate_link_and_revoke() {
    let mut api = start("").await;

    // The CA is public; everything admin needs the admin token.
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

    let a = api.enrol_agent("a").await;
    let b = api.enrol_agent("b").await;
    assert_eq!(a.enrolled.audience, b.enrolled.audience);
    assert!(a.enrolled.audience.starts_with("comsat-controller:"));

    // A relay token refuses an agent, and stays good for a relay.
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

    // Node JWTs: good once; replays, other algorithms, other keys refused.
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
    )
    .expect("mint");
    unauthorized(error_of(get_config(forged.clone()).await.expect("send")).await);
    let wrong_aud = jwt::mint(&a.key, &node, "comsat-controller:other", now, 30).expect("mint");
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

    // The audit log kept every real reason, with subject and source, and
    // none of the secrets used.
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
    for secret in [
        api.admin.as_str(),
        used_secret.as_str(),
        relay_token.secret.as_str(),
        token.as_str(),
        hs256.as_str(),
        forged.as_str(),
        "comsat-admin-v1:nope",
    ] {
        assert!(!text.contains(secret), "a secret is in the audit log");
    }

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

    // Link errors.
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

    // A long poll of agent b wakes when the link appears.
    let b_version = api.config(&b, 0, 0).await.version;
    let b_poll = {
        let client = api.client.clone();
        let url = api.url(api::PATH_AGENT_CONFIG);
        let jwt = b.jwt();
        tokio::spawn(async move {
            let started = Instant::now();
            let resp = client
                .get(url)
                .query(&[("since", b_version), ("wait_ms", 20_000)])
                .bearer_auth(jwt)
                .send()
                .await
                .expect("send");
            (
                started.elapsed(),
                resp.json::<AgentDesired>().await.expect("json"),
            )
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;

    let resp = api.create_link(&link("db", "a", "b")).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let info: LinkInfo = resp.json().await.expect("json");
    let mut names = info.relays.clone();
    names.sort();
    assert_eq!(names, ["r1", "r2"]);
    assert_eq!(
        (info.from.as_str(), info.to.as_str(), info.generation),
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

    // Grants reach exactly the assigned relays and verify.
    let authority = a.enrolled.authority_public_key;
    let mut cursors = Vec::new();
    for r in [&r1, &r2] {
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
    let none = api.events(&r3, 0, 300).await;
    assert!(none.events.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(250));

    let links: Vec<LinkInfo> = api.admin_get(api::PATH_LINKS).await;
    assert_eq!(links, vec![info.clone()]);
    let one: LinkInfo = api.admin_get(&format!("{}/db", api::PATH_LINKS)).await;
    assert_eq!(one, info);

    // Relay certificate renewal.
    let resp = api
        .client
        .post(api.url(api::PATH_RELAY_CERT))
        .bearer_auth(r3.jwt())
        .json(&json!({ "csr_pem": csr() }))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::OK);

    // Deleting revokes at both relays and empties both agents' config.
    let resp = api
        .client
        .delete(api.url(&format!("{}/db", api::PATH_LINKS)))
        .bearer_auth(&api.admin)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::OK);
    for (r, since) in [&r1, &r2].into_iter().zip(cursors) {
        let ev = api.events(r, since, 0).await;
        assert_eq!(ev.events.len(), 1);
        assert_eq!(ev.events[0].kind, RelayEventKind::Revoke);
    }
    assert!(api.events(&r3, 0, 0).await.events.is_empty());
    let after = api.config(&a, a_desired.version, 0).await;
    assert!(after.version > a_desired.version);
    assert!(after.links.is_empty());

    api.stop().await;
}

/// The one grant event a relay got after `since`, verified; and its seq.
async fn one_grant(api: &Api, relay: &Node, since: u64) -> (comsat_protocol::Grant, u64) {
    let ev = api.events(relay, since, 5_000).await;
    assert_eq!(ev.events.len(), 1, "{:?}", ev.events);
    let RelayEventKind::Grant { grant } = &ev.events[0].kind else {
        panic!("expected a grant, got {:?}", ev.events[0].kind);
    };
    let g = verify_grant(
        grant,
        &relay.enrolled.authority_public_key,
        &relay.relay_id(),
    );
    (g, ev.next)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_max_flows_is_granted_and_updated_without_a_new_generation() {
    let mut api = start("grant_ttl_secs = 60\n").await;
    let a = api.enrol_agent("a").await;
    let b = api.enrol_agent("b").await;
    let r1 = api.enrol_relay("r1", "127.0.0.1:4431").await;
    let r2 = api.enrol_relay("r2", "127.0.0.1:4432").await;
    api.heartbeat(&r1).await;
    api.heartbeat(&r2).await;

    // Out of range: 400 with a message naming the field, nothing created.
    for bad in [0, 1_000_001, u32::MAX] {
        let mut body = link("db", "a", "b");
        body.max_flows = Some(bad);
        let (code, msg) = error_of(api.create_link(&body).await).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{bad}");
        assert!(
            msg.contains("max_flows") && msg.contains("1000000"),
            "{msg}"
        );
    }
    // Checked before the agents are looked up.
    let mut body = link("db", "a", "nobody");
    body.max_flows = Some(0);
    let (code, _) = error_of(api.create_link(&body).await).await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    let listed: Vec<LinkInfo> = api.admin_get(api::PATH_LINKS).await;
    assert!(listed.is_empty());

    // Created with a limit: shown everywhere, and in every relay's grant.
    let mut body = link("db", "a", "b");
    body.max_flows = Some(8);
    let resp = api.create_link(&body).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let info: LinkInfo = resp.json().await.expect("json");
    assert_eq!((info.max_flows, info.generation), (Some(8), 1));
    assert_eq!(info.relays.len(), 2);
    let one: LinkInfo = api.admin_get(&format!("{}/db", api::PATH_LINKS)).await;
    assert_eq!(one, info);
    let listed: Vec<LinkInfo> = api.admin_get(api::PATH_LINKS).await;
    assert_eq!(listed, vec![info.clone()]);
    // A link created without one is unlimited.
    let resp = api.create_link(&link("free", "b", "a")).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let free: LinkInfo = resp.json().await.expect("json");
    assert_eq!(free.max_flows, None);

    let mut cursors = Vec::new();
    for r in [&r1, &r2] {
        let ev = api.events(r, 0, 0).await;
        assert_eq!(ev.events.len(), 2);
        let mut seen = 0;
        for e in &ev.events {
            let RelayEventKind::Grant { grant } = &e.kind else {
                panic!("expected a grant");
            };
            let g = verify_grant(grant, &r.enrolled.authority_public_key, &r.relay_id());
            let want = if g.link_id == info.link_id {
                Some(8)
            } else {
                assert_eq!(g.link_id, free.link_id);
                None
            };
            assert_eq!(g.limits.max_flows, want);
            assert_eq!(g.limits.rate_bytes_per_sec, None);
            assert_eq!(g.generation, 1);
            seen += 1;
        }
        assert_eq!(seen, 2);
        cursors.push(ev.next);
    }
    let a_version = api.config(&a, 0, 0).await.version;
    let b_version = api.config(&b, 0, 0).await.version;

    // PATCH: same generation, new limit, one new grant per assigned relay;
    // the agents' desired state does not change.
    let resp = api.patch_link("db", &json!({ "max_flows": 3 })).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let patched: LinkInfo = resp.json().await.expect("json");
    assert_eq!(
        patched,
        LinkInfo {
            max_flows: Some(3),
            ..info.clone()
        }
    );
    let one: LinkInfo = api.admin_get(&format!("{}/db", api::PATH_LINKS)).await;
    assert_eq!(one, patched);
    for (r, cursor) in [&r1, &r2].into_iter().zip(cursors.iter_mut()) {
        let (g, next) = one_grant(&api, r, *cursor).await;
        assert_eq!(g.link_id, info.link_id);
        assert_eq!(g.generation, 1);
        assert_eq!(g.limits.max_flows, Some(3));
        *cursor = next;
    }
    let started = Instant::now();
    let a_now = api.config(&a, a_version, 300).await;
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert_eq!(a_now.version, a_version);
    assert_eq!(api.config(&b, 0, 0).await.version, b_version);

    // Grant renewal keeps the limit (and the generation): make the
    // stored grant nearly expired behind the controller's back.
    {
        use comsat_controller::store::{LinkGrantUpdate, SqliteStore, Store};
        let store = SqliteStore::open(&api.data.join("controller.db"))
            .await
            .expect("open store");
        let record = store.link_by_name("db").await.expect("link").expect("some");
        assert_eq!(record.max_flows, Some(3));
        let soon = unix_now() + 5;
        assert!(
            store
                .update_link_grant(
                    &LinkGrantUpdate {
                        link_id: record.link_id,
                        expected_generation: record.generation,
                        generation: record.generation,
                        relays: record.relays.clone(),
                        grant_not_after: soon,
                        events: vec![],
                        bump_agents: false,
                    },
                    unix_now(),
                )
                .await
                .expect("update")
        );
        store.close().await;
        for (r, cursor) in [&r1, &r2].into_iter().zip(cursors.iter_mut()) {
            let (g, next) = one_grant(&api, r, *cursor).await;
            assert_eq!(g.link_id, info.link_id);
            assert!(g.not_after > soon, "renewed");
            assert_eq!(g.generation, 1);
            assert_eq!(g.limits.max_flows, Some(3));
            *cursor = next;
        }
    }

    // A rate limit: the flow limit stays, the generation too.
    let resp = api
        .patch_link("db", &json!({ "rate_limit_bytes_per_sec": 1_048_576 }))
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let patched: LinkInfo = resp.json().await.expect("json");
    assert_eq!(
        (
            patched.max_flows,
            patched.rate_limit_bytes_per_sec,
            patched.generation
        ),
        (Some(3), Some(1_048_576), 1)
    );
    for (r, cursor) in [&r1, &r2].into_iter().zip(cursors.iter_mut()) {
        let (g, next) = one_grant(&api, r, *cursor).await;
        assert_eq!(g.generation, 1);
        assert_eq!(g.limits.max_flows, Some(3));
        assert_eq!(g.limits.rate_bytes_per_sec, Some(1_048_576));
        *cursor = next;
    }

    // Back to unlimited flows (0); the rate limit stays.
    let resp = api.patch_link("db", &json!({ "max_flows": 0 })).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let patched: LinkInfo = resp.json().await.expect("json");
    assert_eq!((patched.max_flows, patched.generation), (None, 1));
    assert_eq!(patched.rate_limit_bytes_per_sec, Some(1_048_576));
    for (r, cursor) in [&r1, &r2].into_iter().zip(cursors.iter_mut()) {
        let (g, next) = one_grant(&api, r, *cursor).await;
        assert_eq!((g.generation, g.limits.max_flows), (1, None));
        assert_eq!(g.limits.rate_bytes_per_sec, Some(1_048_576));
        *cursor = next;
    }

    // Errors: unknown link, out of range, bad JSON, no admin token. None
    // of them pushes anything.
    let (code, msg) = error_of(api.patch_link("nope", &json!({ "max_flows": 3 })).await).await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert!(msg.contains("`nope`"), "{msg}");
    for bad in [
        json!({ "max_flows": 1_000_001 }),
        json!({ "max_flows": -1 }),
        json!({ "max_flows": "3" }),
        json!({ "max_flow": 3 }),
        json!({ "rate_limit_bytes_per_sec": 10 }),
        json!({ "rate_limit_bytes_per_sec": -1 }),
        json!({}),
        json!({ "max_flows": null }),
    ] {
        let (code, msg) = error_of(api.patch_link("db", &bad).await).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{bad}: {msg}");
    }
    let (code, msg) = error_of(api.patch_link("db", &json!({})).await).await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert!(msg.contains("nothing to change"), "{msg}");
    let (code, msg) = error_of(
        api.patch_link("db", &json!({ "rate_limit_bytes_per_sec": 10 }))
            .await,
    )
    .await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert!(msg.contains("rate_limit_bytes_per_sec 10"), "{msg}");
    let resp = api
        .client
        .patch(api.url(&format!("{}/db", api::PATH_LINKS)))
        .json(&json!({ "max_flows": 3 }))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    for (r, cursor) in [&r1, &r2].into_iter().zip(&cursors) {
        assert!(api.events(r, *cursor, 0).await.events.is_empty());
    }
    let one: LinkInfo = api.admin_get(&format!("{}/db", api::PATH_LINKS)).await;
    assert_eq!(one.max_flows, None);
    assert_eq!(api.config(&a, 0, 0).await.version, a_version);

    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_move_off_a_relay_that_stops_heartbeating() {
    let mut api = start("heartbeat_interval_secs = 1\nheartbeat_timeout_secs = 2\n").await;
    let _a = api.enrol_agent("a").await;
    let _b = api.enrol_agent("b").await;
    let relays = vec![
        api.enrol_relay("r1", "127.0.0.1:4431").await,
        api.enrol_relay("r2", "127.0.0.1:4432").await,
        api.enrol_relay("r3", "127.0.0.1:4433").await,
    ];
    for r in &relays {
        api.heartbeat(r).await;
    }
    let mut body = link("db", "a", "b");
    body.max_flows = Some(4);
    let resp = api.create_link(&body).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let info: LinkInfo = resp.json().await.expect("json");
    assert_eq!(info.relays.len(), 2);
    let dead_name = info.relays[0].clone();
    let dead = relays
        .iter()
        .find(|r| r.enrolled.name == dead_name)
        .expect("dead relay");
    let dead_cursor = api.events(dead, 0, 0).await.next;

    let deadline = Instant::now() + Duration::from_secs(15);
    let moved = loop {
        assert!(
            Instant::now() < deadline,
            "link never moved off {dead_name}"
        );
        for r in relays.iter().filter(|r| r.enrolled.name != dead_name) {
            api.heartbeat(r).await;
        }
        let now: LinkInfo = api.admin_get(&format!("{}/db", api::PATH_LINKS)).await;
        if !now.relays.contains(&dead_name) {
            break now;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(moved.generation, 2);
    assert_eq!(moved.relays.len(), 2);
    // The surviving relay keeps its place as primary.
    assert_eq!(moved.relays[0], info.relays[1]);
    let ev = api.events(dead, dead_cursor, 0).await;
    assert_eq!(ev.events.len(), 1);
    assert_eq!(ev.events[0].kind, RelayEventKind::Revoke);
    let newcomer = relays
        .iter()
        .find(|r| r.enrolled.name == moved.relays[1])
        .expect("newcomer");
    let ev = api.events(newcomer, 0, 0).await;
    let RelayEventKind::Grant { grant } = &ev.events.last().expect("grant").kind else {
        panic!("expected a grant");
    };
    let g = verify_grant(
        grant,
        &newcomer.enrolled.authority_public_key,
        &newcomer.relay_id(),
    );
    assert_eq!(g.generation, 2);
    // Reassignment keeps the link's limits.
    assert_eq!(g.limits.max_flows, Some(4));
    assert_eq!(moved.max_flows, Some(4));
    let relays_now: Vec<RelayInfo> = api.admin_get(api::PATH_RELAYS).await;
    let dead_info = relays_now
        .iter()
        .find(|r| r.name == dead_name)
        .expect("listed");
    assert!(!dead_info.healthy);
    assert_eq!(dead_info.links, 0);
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

/// Sends `method path` with `body` and bearer `token`; returns the status
/// and the error message, if any.
async fn call(
    api: &Api,
    token: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> (StatusCode, String) {
    let mut req = api.client.request(method, api.url(path)).bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("send");
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    (status, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_builtin_role_is_allowed_exactly_what_it_says() {
    use comsat_controller::rbac;
    use reqwest::Method;
    let api = start("").await;
    let mut n = 0u32;
    let mut refused = 0usize;
    for (role, rules) in rbac::builtin_roles() {
        // A service account bound to the role.
        let (status, text) = call(
            &api,
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
            &api,
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

        // Every (resource, verb) the API has, with a call that shows it.
        let mut unique = || {
            n += 1;
            format!("x{n}")
        };
        let cases: Vec<(&str, &str, Method, String, Option<serde_json::Value>)> = vec![
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
        ];
        for (resource, verb, method, path, body) in cases {
            let (status, text) = call(&api, &token, method.clone(), &path, body).await;
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
    use reqwest::Method;
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

#[tokio::test]
async fn links_of_their_own_connection_reach_agents_with_the_interactive_listener() {
    let mut api = start("").await;
    // A relay's interactive listener is on the host its certificate names,
    // on a port of its own; anything else is refused, naming the field.
    for (bad, says) in [
        ("10.0.0.1:4434", "host of public_addr"),
        ("127.0.0.1:4433", "port of its own"),
        ("127.0.0.1", "HOST:PORT"),
    ] {
        let (_, resp) = api.try_enrol_relay("r0", "127.0.0.1:4433", Some(bad)).await;
        let (code, msg) = error_of(resp).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{bad}");
        assert!(
            msg.contains("interactive_addr") && msg.contains(says),
            "{bad}: {msg}"
        );
    }
    let (key, resp) = api
        .try_enrol_relay("r1", "127.0.0.1:4433", Some("127.0.0.1:4434"))
        .await;
    let r1 = api.enrolled_relay(key, resp).await;
    let r2 = api.enrol_relay("r2", "127.0.0.1:4435").await;
    api.heartbeat(&r1).await;
    api.heartbeat(&r2).await;
    let relays: Vec<RelayInfo> = api.admin_get(api::PATH_RELAYS).await;
    let lane = |name: &str| {
        relays
            .iter()
            .find(|r| r.name == name)
            .map(|r| r.interactive_addr.clone())
    };
    assert_eq!(lane("r1"), Some(Some("127.0.0.1:4434".into())));
    assert_eq!(lane("r2"), Some(None));

    let a = api.enrol_agent("a").await;
    let b = api.enrol_agent("b").await;
    let long = "x".repeat(api::MAX_CONNECTION_NAME_LEN + 1);
    for bad in ["", "has space", "a/b", long.as_str()] {
        let mut body = link("ssh", "a", "b");
        body.connection = Some(bad.into());
        let (code, msg) = error_of(api.create_link(&body).await).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{bad:?}");
        assert!(msg.starts_with("connection `"), "{msg}");
    }
    let mut body = link("ssh", "a", "b");
    body.connection = Some("interactive".into());
    let resp = api.create_link(&body).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let info: LinkInfo = resp.json().await.expect("json");
    assert_eq!(info.connection.as_deref(), Some("interactive"));
    let shown: LinkInfo = api.admin_get(&format!("{}/ssh", api::PATH_LINKS)).await;
    assert_eq!(shown, info);
    let resp = api.create_link(&link("bulk", "a", "b")).await;
    assert_eq!(resp.status(), StatusCode::CREATED);

    // Both agents get the link's connection and every relay's interactive
    // address where it has one; the shared link gets none.
    for agent in [&a, &b] {
        let desired = api.config(agent, 0, 0).await;
        let get = |name: &str| {
            desired
                .links
                .iter()
                .find(|l| l.name == name)
                .cloned()
                .expect("link")
        };
        let (ssh, bulk) = (get("ssh"), get("bulk"));
        assert_eq!(ssh.connection.as_deref(), Some("interactive"));
        assert_eq!(bulk.connection, None);
        let mut lanes: Vec<_> = ssh
            .relays
            .iter()
            .map(|r| (r.addr.as_str(), r.interactive_addr.as_deref()))
            .collect();
        lanes.sort();
        assert_eq!(
            lanes,
            [
                ("127.0.0.1:4433", Some("127.0.0.1:4434")),
                ("127.0.0.1:4435", None)
            ]
        );
    }

    // PATCH moves a link between connections, and both agents hear of it;
    // `""` is the shared one.
    let before = api.config(&a, 0, 0).await.version;
    let (code, msg) = error_of(
        api.patch_link("bulk", &serde_json::json!({"connection": "a b"}))
            .await,
    )
    .await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert!(msg.starts_with("connection `a b`"), "{msg}");
    let (code, msg) = error_of(api.patch_link("bulk", &serde_json::json!({})).await).await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert!(msg.contains("connection"), "{msg}");
    let resp = api
        .patch_link("ssh", &serde_json::json!({"connection": ""}))
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let info: LinkInfo = resp.json().await.expect("json");
    assert_eq!(info.connection, None);
    let resp = api
        .patch_link("bulk", &serde_json::json!({"connection": "lane-2"}))
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    for agent in [&a, &b] {
        let desired = api.config(agent, 0, 0).await;
        assert!(desired.version > before, "the agents' config changed");
        let conn = |name: &str| {
            desired
                .links
                .iter()
                .find(|l| l.name == name)
                .map(|l| l.connection.clone())
        };
        assert_eq!(conn("ssh"), Some(None));
        assert_eq!(conn("bulk"), Some(Some("lane-2".into())));
    }
    api.stop().await;
}
