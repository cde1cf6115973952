//! Enrolled nodes: `comsat agent|relay enrol` and the controller-fed
//! `comsat agent|relay run --data-dir DIR`.
//!
//! A node's data dir after enrolment:
//!
//! | file | what |
//! |---|---|
//! | `node.toml` | kind, id, name, controller URL, JWT audience, authority key; relays: public address |
//! | `node.key` | ed25519 node key (0600), signs the node's JWTs and `Hello`s |
//! | `noise.key` | agents: X25519 Noise static key (0600) |
//! | `tls.key`, `tls.crt` | relays: TLS key (0600, never leaves the node) and the certificate the controller issued for it, renewed at two thirds of its life |
//! | `ca.pem` | the controller CA, pinned at enrolment |
//! | `relay-ca.pem` | the CA relay certificates chain to |
//! | `grants/` | relays: verified grants (`*.grant`) and the event cursor — a relay restarts and serves without the controller |
//! | `desired.json` | agents: the last desired state — an agent restarts and rejoins its links without the controller |
//!
//! Keys are generated here and never sent anywhere; only public keys and a
//! certificate signing request go to the controller.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use comsat_protocol::api::{self, JoinToken, NodeKind};
use comsat_protocol::grant::SignedGrant;
use comsat_protocol::keys::{read_secret_file, write_secret_file};
use comsat_protocol::{NodeId, NoiseSecretKey, RelayId, SignPublicKey, SigningKey};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::client::{self, Auth, Client};

/// How often a relay heartbeats.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
/// Longest wait between retries while the controller is unreachable.
const RETRY_MAX: Duration = Duration::from_secs(30);
/// Largest `node.toml` or `desired.json` read.
const MAX_STATE_FILE: u64 = 8 * 1024 * 1024;

/// `node.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeState {
    /// `agent` or `relay`.
    pub kind: NodeKind,
    /// The node's id.
    pub node_id: NodeId,
    /// The node's name.
    pub name: String,
    /// The controller's base URL (from the join token).
    pub controller: String,
    /// More controllers sharing its database, tried in order when it
    /// cannot be reached.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallback_controllers: Vec<String>,
    /// `aud` of the node's JWTs.
    pub audience: String,
    /// The key that signs grants.
    pub authority_public_key: SignPublicKey,
    /// Relays: the `host:port` agents dial.
    #[serde(default)]
    pub public_addr: Option<String>,
    /// Relays: the `host:port` of their interactive listener (the host of
    /// `public_addr`), if they run one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interactive_addr: Option<String>,
}

fn read_capped(path: &Path) -> anyhow::Result<String> {
    read_at_most(path, MAX_STATE_FILE)
}

/// Reads a text file of at most `max` bytes (`-`: standard input), naming
/// the file in errors.
pub(crate) fn read_at_most(path: &Path, max: u64) -> anyhow::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    let read = if path == Path::new("-") {
        std::io::stdin().take(max + 1).read_to_string(&mut text)
    } else {
        std::fs::File::open(path).and_then(|f| f.take(max + 1).read_to_string(&mut text))
    };
    read.with_context(|| format!("reading {}", path.display()))?;
    if text.len() as u64 > max {
        bail!("{}: larger than {max} bytes", path.display());
    }
    Ok(text)
}

/// Writes `bytes` to `path` atomically (a temporary file renamed over it).
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

impl NodeState {
    /// Reads `DIR/node.toml`, checking it is a node of `kind`.
    pub fn load(dir: &Path, kind: NodeKind) -> anyhow::Result<Self> {
        let path = dir.join("node.toml");
        if !path.exists() {
            bail!(
                "{} does not exist: enrol first with `comsat {kind} enrol --token-file FILE --data-dir {}`",
                path.display(),
                dir.display()
            );
        }
        let state: Self = toml::from_str(&read_capped(&path)?)
            .with_context(|| format!("{} is not a valid node state file", path.display()))?;
        if state.kind != kind {
            bail!(
                "{} belongs to a {}, not a {kind}: use `comsat {} run --data-dir {}`",
                dir.display(),
                state.kind,
                state.kind,
                dir.display()
            );
        }
        Ok(state)
    }

    /// A client of the node's controller, authenticating with its key.
    pub fn client(&self, dir: &Path) -> anyhow::Result<Client> {
        let ca = client::read_ca(&dir.join("ca.pem"))?;
        let key = SigningKey::read_file(&dir.join("node.key"))?;
        let mut bases = vec![self.controller.clone()];
        bases.extend(self.fallback_controllers.iter().cloned());
        Client::with_fallbacks(
            &bases,
            &ca,
            Auth::Node {
                node_id: self.node_id,
                key: Box::new(key),
                audience: self.audience.clone(),
            },
        )
    }
}

/// Where a join token comes from: the argument, a file (`-` is stdin) or
/// `COMSAT_TOKEN`.
pub fn read_token(arg: Option<String>, file: Option<&Path>) -> anyhow::Result<JoinToken> {
    let text = Zeroizing::new(match (arg, file) {
        (Some(t), None) => t,
        (None, Some(p)) if p == Path::new("-") => {
            let mut s = String::new();
            std::io::Read::read_to_string(
                &mut std::io::Read::take(std::io::stdin(), api::MAX_JOIN_TOKEN_LEN as u64 + 2),
                &mut s,
            )
            .context("reading the join token from standard input")?;
            s
        }
        (None, Some(p)) => {
            let mut s = String::new();
            std::fs::File::open(p)
                .and_then(|f| {
                    std::io::Read::read_to_string(
                        &mut std::io::Read::take(f, api::MAX_JOIN_TOKEN_LEN as u64 + 2),
                        &mut s,
                    )
                })
                .with_context(|| format!("reading the join token file {}", p.display()))?;
            s
        }
        (None, None) => std::env::var("COMSAT_TOKEN").map_err(|_| {
            anyhow!(
                "no join token: pass --token-file FILE (or - for standard input), set COMSAT_TOKEN, \
                 or give it as an argument; `comsat ctl token create` prints one"
            )
        })?,
        (Some(_), Some(_)) => bail!("give the join token either as an argument or with --token-file, not both"),
    });
    Ok(JoinToken::parse(&text)?)
}

/// What `enrol` did, for the CLI to print.
#[derive(Debug)]
pub struct Enrolled {
    /// The node's name.
    pub name: String,
    /// Its id.
    pub node_id: NodeId,
}

/// Enrols this machine as a node of `kind` with `token`, writing its data
/// dir. Relays give the address agents will dial and, if they run an
/// interactive listener, its port (on the same host).
pub async fn enrol(
    token: &JoinToken,
    kind: NodeKind,
    dir: &Path,
    public_addr: Option<&str>,
    interactive_port: Option<u16>,
    fallbacks: &[String],
) -> anyhow::Result<Enrolled> {
    if dir.join("node.toml").exists() {
        bail!(
            "{} is already enrolled (node.toml exists): run `comsat {kind} run --data-dir {}`, \
             or enrol into an empty directory",
            dir.display(),
            dir.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    eprintln!("comsat: contacting the controller at {} …", token.url);
    let ca_pem = client::fetch_pinned_ca(&token.url, &token.ca_sha256).await?;
    let ca = client::read_ca_pem(&ca_pem)?;
    let signing = SigningKey::generate();
    let mut req = api::EnrolRequest {
        token_id: token.id.clone(),
        secret: token.secret.clone(),
        kind,
        sign_public_key: signing.public(),
        noise_public_key: None,
        public_addr: None,
        interactive_addr: None,
        csr_pem: None,
    };
    let mut noise = None;
    let mut tls_key = None;
    match kind {
        NodeKind::Agent => {
            let key = NoiseSecretKey::generate();
            req.noise_public_key = Some(key.public());
            noise = Some(key);
        }
        NodeKind::Relay => {
            let addr = public_addr.ok_or_else(|| {
                anyhow!("a relay needs --public-addr HOST:PORT, the address agents dial")
            })?;
            let host = host_of(addr)?;
            let key = rcgen::KeyPair::generate().context("generating the relay TLS key")?;
            req.csr_pem = Some(csr(&key, &host)?);
            req.public_addr = Some(addr.to_owned());
            req.interactive_addr = interactive_port
                .map(|port| interactive_addr(addr, port))
                .transpose()?;
            tls_key = Some(key);
        }
    }
    let client = Client::new(&token.url, &ca, Auth::None)?;
    let resp: api::EnrolResponse = client.post(api::PATH_ENROL, &req, "enrolment").await?;
    signing.write_file(&dir.join("node.key"))?;
    if let Some(key) = noise {
        key.write_file(&dir.join("noise.key"))?;
    }
    if let Some(key) = tls_key {
        write_secret_file(&dir.join("tls.key"), key.serialize_pem().as_bytes())?;
        let cert = resp
            .cert_pem
            .as_deref()
            .ok_or_else(|| anyhow!("the controller sent no certificate for this relay"))?;
        write_atomic(&dir.join("tls.crt"), cert.as_bytes())?;
        std::fs::create_dir_all(dir.join("grants"))?;
    }
    write_atomic(&dir.join("ca.pem"), ca_pem.as_bytes())?;
    write_atomic(&dir.join("relay-ca.pem"), resp.relay_ca_pem.as_bytes())?;
    let state = NodeState {
        kind,
        node_id: resp.node_id,
        name: resp.name.clone(),
        controller: token.url.clone(),
        fallback_controllers: fallbacks.to_vec(),
        audience: resp.audience,
        authority_public_key: resp.authority_public_key,
        public_addr: public_addr.map(str::to_owned),
        interactive_addr: req.interactive_addr.clone(),
    };
    write_atomic(&dir.join("node.toml"), toml::to_string(&state)?.as_bytes())?;
    Ok(Enrolled {
        name: resp.name,
        node_id: resp.node_id,
    })
}

/// `host:port` of a relay's interactive listener: the host agents dial
/// (`public_addr`'s, which its certificate names) and another port.
fn interactive_addr(public_addr: &str, port: u16) -> anyhow::Result<String> {
    let (public_host, public_port) = public_addr
        .rsplit_once(':')
        .ok_or_else(|| anyhow!("--public-addr `{public_addr}`: expected HOST:PORT"))?;
    if public_port.parse::<u16>().ok() == Some(port) {
        bail!(
            "--interactive-port {port} is the port of --public-addr `{public_addr}`: \
             the interactive listener needs a port of its own"
        );
    }
    Ok(format!("{public_host}:{port}"))
}

/// The host part of `host:port` (brackets of an IPv6 address removed).
fn host_of(addr: &str) -> anyhow::Result<String> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| anyhow!("--public-addr `{addr}`: expected HOST:PORT"))?;
    port.parse::<u16>()
        .map_err(|_| anyhow!("--public-addr `{addr}`: `{port}` is not a port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        bail!("--public-addr `{addr}`: expected HOST:PORT");
    }
    Ok(host.to_owned())
}

fn csr(key: &rcgen::KeyPair, host: &str) -> anyhow::Result<String> {
    let params = rcgen::CertificateParams::new(vec![host.to_owned()])
        .with_context(|| format!("`{host}` is not a valid certificate name"))?;
    let req = params
        .serialize_request(key)
        .context("building the certificate signing request")?;
    req.pem()
        .context("encoding the certificate signing request")
}

/// Jittered exponential backoff for controller retries.
struct Retry(Duration);

impl Retry {
    fn new() -> Self {
        Self(Duration::from_millis(500))
    }
    async fn wait(&mut self) {
        let d = self.0;
        self.0 = (d * 2).min(RETRY_MAX);
        tokio::time::sleep(d / 2 + (d / 2).mul_f64(rand::random::<f64>())).await;
    }
    fn reset(&mut self) {
        self.0 = Duration::from_millis(500);
    }
}

// ---------------------------------------------------------------- relays

/// The relay config of an enrolled relay's data dir.
pub fn relay_config(
    dir: &Path,
    state: &NodeState,
    listen: Option<SocketAddr>,
    admin: Option<SocketAddr>,
) -> anyhow::Result<comsat_relay::RelayConfig> {
    let listen = match listen {
        Some(l) => l,
        None => {
            let addr = state.public_addr.as_deref().unwrap_or_default();
            let port = addr
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .ok_or_else(|| {
                    anyhow!("node.toml: public_addr `{addr}` has no port; pass --listen")
                })?;
            SocketAddr::from(([0, 0, 0, 0], port))
        }
    };
    let mut cfg = comsat_relay::RelayConfig::new(
        RelayId(state.node_id.0),
        listen,
        dir.join("tls.crt"),
        dir.join("tls.key"),
        state.authority_public_key,
        dir.join("grants"),
    );
    cfg.admin = admin;
    if let Some(lane) = &state.interactive_addr {
        let port = lane
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .ok_or_else(|| anyhow!("node.toml: interactive_addr `{lane}` has no port"))?;
        cfg.interactive_listen = Some(SocketAddr::new(listen.ip(), port));
    }
    Ok(cfg)
}

/// Keeps an enrolled relay's grant cache, heartbeat and certificate in
/// step with the controller, forever.
pub async fn relay_sync(
    dir: PathBuf,
    state: NodeState,
    load: impl Fn() -> api::RelayLoad + Send + Sync + 'static,
) {
    let client = match state.client(&dir) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot talk to the controller; serving cached grants only");
            return;
        }
    };
    let hb = {
        let client = client.clone();
        async move {
            let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
            loop {
                tick.tick().await;
                let body = api::RelayHeartbeat { load: load() };
                if let Err(e) = client
                    .post::<_, api::Empty>(api::PATH_RELAY_HEARTBEAT, &body, "heartbeat")
                    .await
                {
                    tracing::warn!(error = %e, "heartbeat failed");
                }
            }
        }
    };
    tokio::join!(
        hb,
        relay_events(&client, &dir, &state),
        renew_cert(&client, &dir, RelayId(state.node_id.0))
    );
}

async fn relay_events(client: &Client, dir: &Path, state: &NodeState) {
    let grants = dir.join("grants");
    let cursor_file = grants.join("cursor");
    let mut since: u64 = std::fs::read_to_string(&cursor_file)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let relay_id = RelayId(state.node_id.0);
    let mut retry = Retry::new();
    loop {
        let wait = client::LONG_POLL.as_millis().to_string();
        let got: anyhow::Result<api::RelayEvents> = client
            .get(
                api::PATH_RELAY_EVENTS,
                &[("since", since.to_string()), ("wait_ms", wait)],
                "relay events",
            )
            .await;
        let events = match got {
            Ok(e) => {
                retry.reset();
                e
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot fetch grants from the controller; serving cached ones");
                retry.wait().await;
                continue;
            }
        };
        for ev in &events.events {
            let file = grants.join(format!("{}.grant", ev.link_id));
            match &ev.kind {
                api::RelayEventKind::Grant { grant } => {
                    match check_grant(grant, state, &relay_id, &ev.link_id, &file) {
                        Ok(bytes) => {
                            if let Err(e) = write_atomic(&file, &bytes) {
                                tracing::error!(error = %e, "cannot cache a grant");
                            }
                        }
                        Err(e) => {
                            tracing::warn!(link = %ev.link_id, error = %e, "controller sent a grant that does not verify; ignored");
                        }
                    }
                }
                api::RelayEventKind::Revoke => {
                    let _ = std::fs::remove_file(&file);
                    tracing::info!(link = %ev.link_id, "link revoked");
                }
            }
        }
        if events.next != since {
            since = events.next;
            if let Err(e) = write_atomic(&cursor_file, since.to_string().as_bytes()) {
                tracing::error!(error = %e, "cannot save the event cursor");
            }
        }
    }
}

/// Verifies a grant the controller sent for `link`: signed by the
/// authority, naming this relay and that link, and not older than the one
/// cached at `cached` (a late event never rolls a link back).
fn check_grant(
    hex_grant: &str,
    state: &NodeState,
    relay: &RelayId,
    link: &comsat_protocol::LinkId,
    cached: &Path,
) -> anyhow::Result<Vec<u8>> {
    if hex_grant.len() > 2 * comsat_protocol::limits::MAX_SIGNED_GRANT_LEN {
        bail!("grant too long");
    }
    let bytes = hex::decode(hex_grant)?;
    let signed = SignedGrant::decode(&bytes)?;
    let known = std::fs::read(cached)
        .ok()
        .and_then(|b| SignedGrant::decode(&b).ok())
        .and_then(|g| g.verify_signature(&state.authority_public_key).ok())
        .map(|g| g.generation);
    let grant = signed.verify(
        &state.authority_public_key,
        relay,
        comsat_protocol::jwt::unix_now(),
        known,
    )?;
    if grant.link_id != *link {
        bail!(
            "the grant is for link {}, but came as an event for link {link}",
            grant.link_id
        );
    }
    Ok(bytes)
}

/// Seconds of validity left in the certificate file, and its lifetime.
/// The seconds left of the certificate at `path`, its whole lifetime, and
/// whether it names `relay` (agents refuse a relay certificate that does
/// not; those from before relay certificates named their relay do not).
fn cert_life(path: &Path, relay: &RelayId) -> Option<(i64, i64, bool)> {
    let pem = std::fs::read(path).ok()?;
    let der = client::read_ca_pem(std::str::from_utf8(&pem).ok()?).ok()?;
    let first = der.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(first.as_ref()).ok()?;
    let names_relay = comsat_agent::tls::names_relay(first, relay);
    let v = cert.validity();
    let now = comsat_protocol::jwt::unix_now() as i64;
    Some((
        v.not_after.timestamp() - now,
        v.not_after.timestamp() - v.not_before.timestamp(),
        names_relay,
    ))
}

async fn renew_cert(client: &Client, dir: &Path, relay: RelayId) {
    let cert = dir.join("tls.crt");
    let mut retry = Retry::new();
    // A certificate that does not name this relay is renewed at once, once
    // (a controller of an older version issues such certificates still).
    let mut unnamed_renewed = false;
    loop {
        // Renew when a third of the lifetime is left.
        let due = |left: i64, life: i64, named: bool| {
            if named || unnamed_renewed {
                (left - life / 3).max(0) as u64
            } else {
                0
            }
        };
        let wait = match cert_life(&cert, &relay) {
            Some((left, life, named)) => due(left, life, named),
            None => 0,
        };
        tokio::time::sleep(Duration::from_secs(wait.min(3600))).await;
        if cert_life(&cert, &relay).is_some_and(|(left, life, named)| due(left, life, named) > 0) {
            continue;
        }
        match request_cert(client, dir)
            .await
            .and_then(|pem| check_renewed(&pem, dir).map(|()| pem))
        {
            Ok(pem) => {
                retry.reset();
                if cert_life(&cert, &relay).is_some_and(|(_, _, named)| !named) {
                    unnamed_renewed = true;
                }
                match write_atomic(&cert, pem.as_bytes()) {
                    Ok(()) => tracing::info!("relay certificate renewed"),
                    Err(e) => tracing::error!(error = %e, "cannot write the renewed certificate"),
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "certificate renewal failed; retrying");
                retry.wait().await;
            }
        }
    }
}

/// Checks a renewed certificate before it replaces the served one: it
/// parses, is for this relay's key (`tls.key`), and is valid now for a
/// while. A bad one is refused (and asked for again with backoff).
fn check_renewed(pem: &str, dir: &Path) -> anyhow::Result<()> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("the renewed certificate is not PEM: {e}"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| anyhow!("the controller sent no certificate"))?;
    let key_pem = read_secret_file(&dir.join("tls.key"))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).context("tls.key")?;
    rustls::sign::CertifiedKey::from_der(
        certs.clone(),
        key,
        &rustls::crypto::ring::default_provider(),
    )
    .map_err(|e| anyhow!("the renewed certificate is not for this relay's key: {e}"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| anyhow!("the renewed certificate does not parse: {e}"))?;
    let now = comsat_protocol::jwt::unix_now() as i64;
    let v = cert.validity();
    if v.not_before.timestamp() > now + 300 || v.not_after.timestamp() <= now + 60 {
        bail!("the renewed certificate is not valid now");
    }
    Ok(())
}

async fn request_cert(client: &Client, dir: &Path) -> anyhow::Result<String> {
    let state = NodeState::load(dir, NodeKind::Relay)?;
    let key_pem = read_secret_file(&dir.join("tls.key"))?;
    let key = rcgen::KeyPair::from_pem(&key_pem).context("tls.key")?;
    let host = host_of(state.public_addr.as_deref().unwrap_or_default())?;
    let body = api::CertRequest {
        csr_pem: csr(&key, &host)?,
    };
    let resp: api::CertResponse = client
        .post(api::PATH_RELAY_CERT, &body, "certificate renewal")
        .await?;
    Ok(resp.cert_pem)
}

// ---------------------------------------------------------------- agents

/// The agent config of an enrolled agent's data dir (no links yet: they
/// come from the controller).
pub fn agent_config(dir: &Path, state: &NodeState) -> comsat_agent::AgentConfig {
    comsat_agent::AgentConfig::for_node(state.node_id, dir.join("node.key"), dir.join("noise.key"))
}

/// The last desired state this agent applied, if any.
pub fn cached_desired(dir: &Path) -> Option<api::AgentDesired> {
    let text = read_capped(&dir.join("desired.json")).ok()?;
    serde_json::from_str(&text).ok()
}

fn link_configs(dir: &Path, desired: &api::AgentDesired) -> Vec<comsat_agent::LinkConfig> {
    let ca = dir.join("relay-ca.pem");
    desired
        .links
        .iter()
        .map(|l| comsat_agent::LinkConfig::from_desired(l, &ca))
        .collect()
}

/// Applies a desired state and prints what changed (machine-readable lines
/// the tests and scripts read).
pub async fn apply_desired(
    agent: &mut comsat_agent::Agent,
    dir: &Path,
    desired: &api::AgentDesired,
) {
    let applied = agent.apply(link_configs(dir, desired)).await;
    for (name, addr) in &applied.listening {
        println!("comsat agent link {name} listening {addr}");
    }
    for name in &applied.removed {
        println!("comsat agent link {name} removed");
    }
    for (name, e) in &applied.failed {
        tracing::error!(link = %name, error = %e, "link cannot be set up");
        println!("comsat agent link {name} failed");
    }
}

/// Follows the controller's desired state for this agent, forever.
pub async fn agent_sync(
    dir: PathBuf,
    state: NodeState,
    agent: &mut comsat_agent::Agent,
    mut version: u64,
) {
    let client = match state.client(&dir) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot talk to the controller; keeping the cached links");
            std::future::pending::<()>().await;
            return;
        }
    };
    let mut retry = Retry::new();
    loop {
        let asked = tokio::time::Instant::now();
        let wait = client::LONG_POLL.as_millis().to_string();
        let got: anyhow::Result<api::AgentDesired> = client
            .get(
                api::PATH_AGENT_CONFIG,
                &[("since", version.to_string()), ("wait_ms", wait)],
                "agent config",
            )
            .await;
        let desired = match got {
            Ok(d) => {
                retry.reset();
                d
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot fetch this agent's links from the controller; keeping the current ones");
                retry.wait().await;
                continue;
            }
        };
        if desired.version == version {
            // A controller that answers at once with nothing new is not
            // long-polling: do not spin on it.
            if asked.elapsed() < Duration::from_secs(1) {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            continue;
        }
        if let Err(e) = write_atomic(&dir.join("relay-ca.pem"), desired.relay_ca_pem.as_bytes()) {
            tracing::error!(error = %e, "cannot save the relay CA");
        }
        apply_desired(agent, &dir, &desired).await;
        match serde_json::to_vec(&desired) {
            Ok(bytes) => {
                if let Err(e) = write_atomic(&dir.join("desired.json"), &bytes) {
                    tracing::error!(error = %e, "cannot cache the desired state");
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot encode the desired state"),
        }
        tracing::info!(
            version = desired.version,
            links = desired.links.len(),
            "desired state applied"
        );
        version = desired.version;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use comsat_protocol::grant::{Grant, GrantSide, LinkLimits};
    use comsat_protocol::{LinkId, NodeId};

    fn state(authority: &SigningKey) -> NodeState {
        NodeState {
            kind: NodeKind::Relay,
            node_id: NodeId([1; 16]),
            name: "r1".into(),
            controller: "https://127.0.0.1:1".into(),
            fallback_controllers: vec![],
            audience: "comsat-controller:x".into(),
            authority_public_key: authority.public(),
            public_addr: Some("127.0.0.1:4433".into()),
            interactive_addr: None,
        }
    }

    fn signed(authority: &SigningKey, link: LinkId, relay: RelayId, generation: u64) -> String {
        let side = |n: u8| GrantSide {
            node_id: NodeId([n; 16]),
            sign_pub: SigningKey::generate().public(),
        };
        let g = Grant {
            link_id: link,
            generation,
            relays: vec![relay],
            side_a: side(2),
            side_b: side(3),
            not_after: comsat_protocol::jwt::unix_now() + 3600,
            buffer_limit: 0,
            limits: LinkLimits::default(),
        };
        hex::encode(g.sign(authority).and_then(|s| s.encode()).expect("sign"))
    }

    #[test]
    fn an_interactive_port_is_on_the_public_host_and_the_relay_listens_there() {
        assert_eq!(
            interactive_addr("relay.example:4433", 4434).expect("ok"),
            "relay.example:4434"
        );
        assert_eq!(
            interactive_addr("[::1]:4433", 4434).expect("ok"),
            "[::1]:4434"
        );
        let same = interactive_addr("relay.example:4433", 4433).expect_err("same port");
        assert!(format!("{same}").contains("a port of its own"), "{same}");

        let dir = tempfile::tempdir().expect("tempdir");
        let mut st = state(&SigningKey::generate());
        let cfg = relay_config(dir.path(), &st, None, None).expect("config");
        assert_eq!(cfg.interactive_listen, None);
        st.interactive_addr = Some("127.0.0.1:4434".into());
        let cfg = relay_config(dir.path(), &st, None, None).expect("config");
        assert_eq!(cfg.listen, "0.0.0.0:4433".parse().expect("addr"));
        assert_eq!(cfg.interactive_listen, "0.0.0.0:4434".parse().ok());
    }

    #[test]
    fn a_cached_grant_is_never_replaced_by_an_older_one_or_another_links() {
        let dir = tempfile::tempdir().expect("tempdir");
        let authority = SigningKey::generate();
        let st = state(&authority);
        let relay = RelayId([1; 16]);
        let link = LinkId([3; 16]);
        let file = dir.path().join("x.grant");
        let g2 = check_grant(
            &signed(&authority, link, relay, 2),
            &st,
            &relay,
            &link,
            &file,
        )
        .expect("first");
        std::fs::write(&file, &g2).expect("cache");
        // The same generation again (a renewal or a limit change) is taken.
        check_grant(
            &signed(&authority, link, relay, 2),
            &st,
            &relay,
            &link,
            &file,
        )
        .expect("same generation");
        let err = check_grant(
            &signed(&authority, link, relay, 1),
            &st,
            &relay,
            &link,
            &file,
        )
        .expect_err("older");
        assert!(err.to_string().contains("generation"), "{err}");
        let other = LinkId([4; 16]);
        let err = check_grant(
            &signed(&authority, other, relay, 3),
            &st,
            &relay,
            &link,
            &file,
        )
        .expect_err("another link's grant");
        assert!(
            err.to_string().contains("came as an event for link"),
            "{err}"
        );
        let stranger = SigningKey::generate();
        assert!(
            check_grant(
                &signed(&stranger, link, relay, 3),
                &st,
                &relay,
                &link,
                &file
            )
            .is_err()
        );
    }

    #[test]
    fn a_renewed_certificate_must_be_for_the_relays_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = rcgen::KeyPair::generate().expect("key");
        write_secret_file(&dir.path().join("tls.key"), key.serialize_pem().as_bytes())
            .expect("key file");
        let cert = rcgen::CertificateParams::new(vec!["relay.example".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        check_renewed(&cert.pem(), dir.path()).expect("good");
        let other = rcgen::KeyPair::generate().expect("key");
        let wrong = rcgen::CertificateParams::new(vec!["relay.example".to_owned()])
            .expect("params")
            .self_signed(&other)
            .expect("cert");
        let err = check_renewed(&wrong.pem(), dir.path()).expect_err("other key");
        assert!(err.to_string().contains("key"), "{err}");
        assert!(check_renewed("junk", dir.path()).is_err());
        assert!(check_renewed("", dir.path()).is_err());
    }
}
