//! HTTPS client of the controller API, shared by `comsat ctl`, enrolment
//! and the controller-fed relay and agent.
//!
//! The controller's CA is pinned: a client trusts exactly the CA file it
//! was given (or, on first contact, the CA whose SHA-256 a join token
//! carries). Nodes sign a fresh JWT for every request; operators send the
//! admin token.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use comsat_protocol::api::{self, ErrorBody};
use comsat_protocol::limits::MAX_PEM_FILE_LEN;
use comsat_protocol::{NodeId, SigningKey, jwt};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde::Serialize;
use serde::de::DeserializeOwned;
use zeroize::Zeroizing;

/// Time to connect to the controller.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an idle connection to the controller is kept for the next
/// request.
const POOL_IDLE: Duration = Duration::from_secs(5);
/// Time one ordinary request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Silence on a connection to the controller before a TCP keep-alive.
const TCP_KEEPALIVE: Duration = Duration::from_secs(120);
/// Long polls ask the controller to wait this long: an idle node's whole
/// conversation with its controller is one small exchange this often
/// (about 0.3 MB a day at 5 min; a change comes back at once). A
/// controller host that vanishes mid-poll is noticed within this and
/// [`REQUEST_TIMEOUT`]; the data plane does not wait for it.
pub const LONG_POLL: Duration = Duration::from_secs(300);

/// How a request authenticates.
pub enum Auth {
    /// The operator's admin API token.
    Admin(Zeroizing<String>),
    /// A node signing JWTs with its key.
    Node {
        /// Its id.
        node_id: NodeId,
        /// Its key.
        key: Box<SigningKey>,
        /// The controller deployment (`aud`).
        audience: String,
    },
    /// None (enrolment, the CA).
    None,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Admin(_) => f.write_str("Admin(<redacted>)"),
            Self::Node { node_id, .. } => write!(f, "Node({node_id})"),
            Self::None => f.write_str("None"),
        }
    }
}

/// A client of a controller, reachable at one or more URLs (several
/// controllers sharing one database): a request that cannot reach one goes
/// to the next, and the one that answered is tried first next time.
#[derive(Debug, Clone)]
pub struct Client {
    bases: Arc<Vec<String>>,
    current: Arc<std::sync::atomic::AtomicUsize>,
    http: reqwest::Client,
    auth: Arc<Auth>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads PEM certificates, naming the file on error.
pub fn read_ca(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = crate::state::read_at_most(path, MAX_PEM_FILE_LEN)
        .context("reading the controller CA file")?;
    parse_ca(pem.as_bytes()).with_context(|| format!("{}", path.display()))
}

/// Parses PEM certificates.
pub fn read_ca_pem(pem: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    parse_ca(pem.as_bytes())
}

fn parse_ca(pem: &[u8]) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("not a PEM certificate: {e}"))?;
    if certs.is_empty() {
        bail!("no PEM certificate found");
    }
    Ok(certs)
}

fn http_client(tls: rustls::ClientConfig, timeout: Duration) -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .connect_timeout(CONNECT_TIMEOUT)
        // Let go of an idle connection before the controller closes it
        // (after `http_idle_timeout_secs`, at least 1 s and 20 s by
        // default), so a request never goes out on one being closed.
        .pool_idle_timeout(POOL_IDLE)
        // A long poll is quiet for minutes: probe the controller after 2
        // minutes of silence (not the default 15 s, which alone would cost
        // an idle edge box 0.6 MB a day), so a vanished one is noticed
        // within about 3 minutes and NAT bindings stay open.
        .tcp_keepalive(TCP_KEEPALIVE)
        .timeout(timeout)
        .https_only(true)
        .build()
        .context("building the HTTPS client")
}

impl Client {
    /// A client of the controller at `base` (`https://host:port`) whose
    /// certificate must chain to `ca`.
    pub fn new(base: &str, ca: &[CertificateDer<'static>], auth: Auth) -> anyhow::Result<Self> {
        Self::with_fallbacks(&[base.to_owned()], ca, auth)
    }

    /// A client of the controllers at `bases`, tried in order.
    pub fn with_fallbacks(
        bases: &[String],
        ca: &[CertificateDer<'static>],
        auth: Auth,
    ) -> anyhow::Result<Self> {
        if bases.is_empty() {
            bail!("no controller URL");
        }
        let mut roots = rustls::RootCertStore::empty();
        for c in ca {
            roots
                .add(c.clone())
                .map_err(|e| anyhow!("the controller CA is not a usable CA certificate: {e}"))?;
        }
        let tls = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| anyhow!("TLS setup: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        // Long polls set their own (see `poll`).
        let http = http_client(tls, REQUEST_TIMEOUT)?;
        Ok(Self {
            bases: Arc::new(
                bases
                    .iter()
                    .map(|b| b.trim_end_matches('/').to_owned())
                    .collect(),
            ),
            current: Arc::default(),
            http,
            auth: Arc::new(auth),
        })
    }

    /// The base URL requests go to first (the last one that answered).
    pub fn base(&self) -> &str {
        let i = self.current.load(std::sync::atomic::Ordering::Relaxed);
        &self.bases[i % self.bases.len()]
    }

    fn bearer(&self) -> anyhow::Result<Option<Zeroizing<String>>> {
        Ok(match &*self.auth {
            Auth::Admin(t) => Some(t.clone()),
            Auth::Node {
                node_id,
                key,
                audience,
            } => Some(Zeroizing::new(
                jwt::mint(
                    key,
                    node_id,
                    audience,
                    crate::unix_now(),
                    jwt::DEFAULT_LIFETIME_SECS,
                    crate::keys::random_jti(),
                )
                .map_err(|e| anyhow!("cannot sign a JWT: {e}"))?,
            )),
            Auth::None => None,
        })
    }

    /// Sends the request `build` makes for a base URL, to the current
    /// controller and, when it cannot be reached, to the next ones.
    async fn send<T: DeserializeOwned>(
        &self,
        build: impl Fn(&str) -> reqwest::RequestBuilder,
        what: &str,
    ) -> anyhow::Result<T> {
        use std::sync::atomic::Ordering;
        let start = self.current.load(Ordering::Relaxed);
        let mut unreachable = Vec::new();
        let mut answered = None;
        for k in 0..self.bases.len() {
            let i = (start + k) % self.bases.len();
            let base = &self.bases[i];
            let req = build(base);
            let req = match self.bearer()? {
                Some(t) => req.bearer_auth(t.as_str()),
                None => req,
            };
            match req.send().await {
                Ok(resp) => {
                    if k > 0 {
                        tracing::info!(controller = %base, "using the next controller");
                    }
                    self.current.store(i, Ordering::Relaxed);
                    answered = Some(resp);
                    break;
                }
                Err(e) => unreachable.push(format!("{base}: {}", error_chain(&e))),
            }
        }
        let Some(resp) = answered else {
            bail!(
                "{what}: cannot reach the controller at {}",
                unreachable.join("; nor at ")
            );
        };
        let status = resp.status();
        let body = read_limited(resp).await.with_context(|| what.to_owned())?;
        if !status.is_success() {
            let msg = serde_json::from_slice::<ErrorBody>(&body)
                .map(|b| b.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body[..body.len().min(200)]).into());
            bail!("{what}: the controller refused ({status}): {msg}");
        }
        serde_json::from_slice(&body)
            .map_err(|e| anyhow!("{what}: unexpected answer from the controller: {e}"))
    }

    /// `GET path` with a query.
    pub async fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
        what: &str,
    ) -> anyhow::Result<T> {
        self.send(
            |base| self.http.get(format!("{base}{path}")).query(query),
            what,
        )
        .await
    }

    /// `GET path` with a query, as a long poll the controller may hold for
    /// up to `wait`.
    pub async fn poll<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
        wait: Duration,
        what: &str,
    ) -> anyhow::Result<T> {
        self.send(
            |base| {
                self.http
                    .get(format!("{base}{path}"))
                    .query(query)
                    .timeout(wait + REQUEST_TIMEOUT)
            },
            what,
        )
        .await
    }

    /// `POST path` with a JSON body.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        what: &str,
    ) -> anyhow::Result<T> {
        self.send_json(reqwest::Method::POST, path, body, what)
            .await
    }

    /// `PUT path` with a JSON body.
    pub async fn put<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        what: &str,
    ) -> anyhow::Result<T> {
        self.send_json(reqwest::Method::PUT, path, body, what).await
    }

    /// `PATCH path` with a JSON body.
    pub async fn patch<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        what: &str,
    ) -> anyhow::Result<T> {
        self.send_json(reqwest::Method::PATCH, path, body, what)
            .await
    }

    async fn send_json<B: Serialize, T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &B,
        what: &str,
    ) -> anyhow::Result<T> {
        let build = |base: &str| {
            self.http
                .request(method.clone(), format!("{base}{path}"))
                .json(body)
        };
        self.send(build, what).await
    }

    /// `DELETE path`.
    pub async fn delete(&self, path: &str, what: &str) -> anyhow::Result<()> {
        let _: api::Empty = self
            .send(|base| self.http.delete(format!("{base}{path}")), what)
            .await?;
        Ok(())
    }
}

/// Reads a response body of at most [`api::MAX_BODY_LEN`] bytes.
async fn read_limited(mut resp: reqwest::Response) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| anyhow!("reading the answer: {}", error_chain(&e)))?
    {
        if out.len() + chunk.len() > api::MAX_BODY_LEN {
            bail!(
                "the controller's answer is larger than {} bytes",
                api::MAX_BODY_LEN
            );
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// An error with its causes, on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// Fetches the controller CA on first contact and checks it against the
/// fingerprint from a join token (kubeadm's discovery hash): the TLS
/// connection that fetches it is not yet authenticated, and nothing secret
/// goes over it. Returns the CA PEM.
pub async fn fetch_pinned_ca(base: &str, ca_sha256: &[u8; 32]) -> anyhow::Result<String> {
    let tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| anyhow!("TLS setup: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider())))
        .with_no_client_auth();
    let http = http_client(tls, REQUEST_TIMEOUT)?;
    let url = format!("{}{}", base.trim_end_matches('/'), api::PATH_CA);
    let resp = http.get(&url).send().await.map_err(|e| {
        anyhow!(
            "cannot reach the controller at {base}: {} (is it running, and is the URL in the token reachable from here?)",
            error_chain(&e)
        )
    })?;
    if !resp.status().is_success() {
        bail!(
            "the controller at {base} did not serve its CA ({})",
            resp.status()
        );
    }
    let pem = read_limited(resp).await?;
    let certs = parse_ca(&pem).context("the controller's CA")?;
    // Only the certificate whose hash is checked may become the trust
    // anchor: a second one would be trusted unchecked.
    if certs.len() != 1 {
        bail!(
            "the controller at {base} serves {} CA certificates; it must serve exactly the one \
             its join tokens pin (put a single CA certificate in the controller's ca.pem)",
            certs.len()
        );
    }
    let got: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, certs[0].as_ref())
        .as_ref()
        .try_into()
        .map_err(|_| anyhow!("SHA-256 is 32 bytes"))?;
    if &got != ca_sha256 {
        bail!(
            "the controller at {base} presented a CA whose SHA-256 is {}, but the token pins {}: \
             refusing to enrol (a different controller, or someone in between)",
            hex::encode(got),
            hex::encode(ca_sha256)
        );
    }
    String::from_utf8(pem).map_err(|_| anyhow!("the controller's CA is not text"))
}

/// Accepts any server certificate; used only to fetch the CA, whose hash
/// is then checked.
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        let algs = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        let algs = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
