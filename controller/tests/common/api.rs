//! The HTTPS API in process, shared by the API tests: init a temp dir,
//! bind on 127.0.0.1:0, and talk to it with reqwest over TLS pinned to the
//! generated CA ([`start`], [`Api`]); nodes enrolled through it ([`Node`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use comsat_controller::store::DatabaseUrl;
use comsat_controller::{Controller, InitOptions, RunOptions, init};
use comsat_node::keys::Generate;
use comsat_protocol::api::{
    self, AgentDesired, EnrolRequest, EnrolResponse, ErrorBody, JoinToken, LinkSpec, NodeKind,
    RelayEventKind, RelayEvents, RelayHeartbeat, RelayLoad, TokenCreated,
};
use comsat_protocol::jwt;
use comsat_protocol::{NoiseSecretKey, RelayId, SignPublicKey, SignedGrant, SigningKey};
use reqwest::StatusCode;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde_json::json;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Unix time now, in seconds.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub struct Api {
    pub _dir: tempfile::TempDir,
    pub data: PathBuf,
    pub client: reqwest::Client,
    pub base: String,
    pub admin: String,
    pub ca_pem: String,
    pub stop: Option<oneshot::Sender<()>>,
    pub server: Option<JoinHandle<Result<(), comsat_controller::ControllerError>>>,
}

pub struct Node {
    pub key: SigningKey,
    pub noise: Option<NoiseSecretKey>,
    pub enrolled: EnrolResponse,
}

impl Node {
    pub fn jwt(&self) -> String {
        jwt::mint(
            &self.key,
            &self.enrolled.node_id,
            &self.enrolled.audience,
            unix_now(),
            30,
            comsat_node::keys::random_jti(),
        )
        .expect("mint")
    }

    pub fn relay_id(&self) -> RelayId {
        RelayId(self.enrolled.node_id.0)
    }
}

/// A TLS client config that trusts the CA in `ca_pem`.
pub fn tls_config(ca_pem: &[u8]) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.expect("ca pem")).expect("add root");
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

pub fn client(ca_pem: &[u8]) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls_config(ca_pem))
        .build()
        .expect("client")
}

pub async fn start(extra_config: &str) -> Api {
    start_on(extra_config, None).await
}

/// [`start`] on the PostgreSQL database at `database`, or SQLite.
pub async fn start_on(extra_config: &str, database: Option<&str>) -> Api {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("ctl");
    let database = database.map(|url| DatabaseUrl::parse(url).expect("database url"));
    init(&InitOptions {
        data_dir: data.clone(),
        database: database.clone(),
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
        database,
        metrics: None,
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
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn stop(&mut self) {
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

    pub async fn token(&self, kind: NodeKind, name: &str) -> JoinToken {
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

    pub async fn enrol_req(&self, req: &EnrolRequest) -> reqwest::Response {
        self.client
            .post(self.url(api::PATH_ENROL))
            .json(req)
            .send()
            .await
            .expect("send")
    }

    pub async fn enrol_agent(&self, name: &str) -> Node {
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
                svid_pem: None,
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

    pub async fn enrol_relay(&self, name: &str, addr: &str) -> Node {
        let (key, resp) = self.try_enrol_relay(name, addr, None).await;
        self.enrolled_relay(key, resp).await
    }

    /// Sends a relay's enrolment; the key it named and the answer.
    pub async fn try_enrol_relay(
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
                svid_pem: None,
            })
            .await;
        (key, resp)
    }

    pub async fn enrolled_relay(&self, key: SigningKey, resp: reqwest::Response) -> Node {
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

    pub async fn heartbeat(&self, relay: &Node) {
        let resp = self
            .client
            .post(self.url(api::PATH_RELAY_HEARTBEAT))
            .bearer_auth(relay.jwt())
            .json(&RelayHeartbeat {
                load: RelayLoad::default(),
                ..RelayHeartbeat::default()
            })
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), StatusCode::OK);
    }

    pub async fn events(&self, relay: &Node, since: u64, wait_ms: u64) -> RelayEvents {
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

    pub async fn config(&self, agent: &Node, since: u64, wait_ms: u64) -> AgentDesired {
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

    pub async fn admin_get<T: serde::de::DeserializeOwned>(&self, path: &str) -> T {
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

    pub async fn create_link(&self, body: &LinkSpec) -> reqwest::Response {
        self.client
            .post(self.url(api::PATH_LINKS))
            .bearer_auth(&self.admin)
            .json(body)
            .send()
            .await
            .expect("send")
    }

    pub async fn patch_link(&self, name: &str, body: &serde_json::Value) -> reqwest::Response {
        self.client
            .patch(self.url(&format!("{}/{name}", api::PATH_LINKS)))
            .bearer_auth(&self.admin)
            .json(body)
            .send()
            .await
            .expect("send")
    }
}

pub fn csr() -> String {
    let key = rcgen::KeyPair::generate().expect("key");
    rcgen::CertificateParams::new(vec!["ignored.example".to_owned()])
        .expect("params")
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem")
}

pub async fn error_of(resp: reqwest::Response) -> (StatusCode, String) {
    let status = resp.status();
    let body: ErrorBody = resp.json().await.expect("error body");
    (status, body.error)
}

pub fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

pub fn link(name: &str, from: &str, to: &str) -> LinkSpec {
    LinkSpec {
        name: name.into(),
        from: from.into(),
        listen: "tcp://127.0.0.1:7000".into(),
        to: to.into(),
        target: "tcp://127.0.0.1:5432".into(),
        allowed_uids: vec![],
        allowed_gids: vec![],
        allow: vec![],
        proxy_protocol: false,
        max_flows: None,
        rate_limit_bytes_per_sec: None,
        connection: None,
    }
}

pub fn verify_grant(
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

/// The one grant event a relay got after `since`, verified; and its seq.
pub async fn one_grant(api: &Api, relay: &Node, since: u64) -> (comsat_protocol::Grant, u64) {
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

/// A console session: its cookie (`comsat_session=…`) and CSRF token.
pub struct ConsoleSession {
    pub cookie: String,
    pub csrf: String,
}

/// Signs in to the console with `token`.
pub async fn console_session(api: &Api, token: &str) -> ConsoleSession {
    let resp = api
        .client
        .post(api.url(api::PATH_CONSOLE_SESSION))
        .json(&serde_json::json!({ "token": token }))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::CREATED);
    let cookie = resp.headers()[reqwest::header::SET_COOKIE]
        .to_str()
        .expect("ascii")
        .split(';')
        .next()
        .expect("name=value")
        .to_owned();
    let info: api::ConsoleSessionInfo = resp.json().await.expect("session info");
    ConsoleSession {
        cookie,
        csrf: info.csrf,
    }
}

/// Like [`call`], through console session `s` (its CSRF token sent along).
pub async fn call_in_session(
    api: &Api,
    s: &ConsoleSession,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> (StatusCode, String) {
    let mut req = api
        .client
        .request(method, api.url(path))
        .header("cookie", &s.cookie)
        .header("x-csrf-token", &s.csrf);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("send");
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    (status, text)
}

/// Sends `method path` with `body` and bearer `token`; returns the status
/// and the error message, if any.
pub async fn call(
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

/// Agents a, b and c, relay r1 (healthy), and link `db` from a to b.
pub async fn db_between_a_and_b(api: &Api) -> ([Node; 4], api::LinkInfo) {
    let a = api.enrol_agent("a").await;
    let b = api.enrol_agent("b").await;
    let c = api.enrol_agent("c").await;
    let r1 = api.enrol_relay("r1", "127.0.0.1:4431").await;
    api.heartbeat(&r1).await;
    let resp = api.create_link(&link("db", "a", "b")).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    ([a, b, c, r1], resp.json().await.expect("json"))
}
