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

use crate::keys::write_secret_file;
use crate::keys::{Generate, KeyFile};
use anyhow::{Context, anyhow, bail};
use comsat_protocol::api::{self, JoinToken, NodeKind};
use comsat_protocol::limits::MAX_PEM_FILE_LEN;
use comsat_protocol::{NodeId, NoiseSecretKey, SignPublicKey, SigningKey};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::client::{self, Auth, Client};

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
    pub public_addr: Option<String>,
    /// Relays: the `host:port` of their interactive listener (the host of
    /// `public_addr`), if they run one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interactive_addr: Option<String>,
    /// Relays that brought their own certificate (`tls.crt`): the relay
    /// does not ask the controller to renew it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub own_certificate: bool,
}

/// A relay's own certificate, instead of one the controller issues.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct OwnCert {
    /// The relay's own certificate chain (PEM): an X.509-SVID of a trust
    /// domain the controller federates with, naming --public-addr's host.
    /// Renew it by replacing tls.crt and tls.key in the data dir.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

fn read_capped(path: &Path) -> anyhow::Result<String> {
    read_at_most(path, MAX_STATE_FILE)
}

/// Reads a text file of at most `max` bytes (`-`: standard input), naming
/// the file in errors.
pub fn read_at_most(path: &Path, max: u64) -> anyhow::Result<String> {
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
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
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

    /// Where an enrolled relay listens: `listen` if given (`--listen`),
    /// else every address at `public_addr`'s port; and its interactive
    /// listener, if enrolled with one, on the same address at
    /// `interactive_addr`'s port.
    pub fn relay_listen(
        &self,
        listen: Option<SocketAddr>,
    ) -> anyhow::Result<(SocketAddr, Option<SocketAddr>)> {
        let port_of = |what: &str, addr: &str| {
            addr.rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .ok_or_else(|| anyhow!("node.toml: {what} `{addr}` has no port; pass --listen"))
        };
        let listen = match listen {
            Some(l) => l,
            None => {
                let addr = self.public_addr.as_deref().unwrap_or_default();
                SocketAddr::from(([0, 0, 0, 0], port_of("public_addr", addr)?))
            }
        };
        let lane = match &self.interactive_addr {
            Some(lane) => Some(SocketAddr::new(
                listen.ip(),
                port_of("interactive_addr", lane)?,
            )),
            None => None,
        };
        Ok((listen, lane))
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
/// interactive listener, its port (on the same host), and may bring their
/// own certificate.
pub async fn enrol(
    token: &JoinToken,
    kind: NodeKind,
    dir: &Path,
    public_addr: Option<&str>,
    interactive_port: Option<u16>,
    own_cert: &OwnCert,
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
        svid_pem: None,
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
            let key = match (&own_cert.tls_cert, &own_cert.tls_key) {
                (Some(cert), Some(key)) => {
                    let chain = read_at_most(cert, MAX_PEM_FILE_LEN)?;
                    crate::svid::check_renewed(&chain, key)
                        .with_context(|| format!("--tls-cert {}", cert.display()))?;
                    req.svid_pem = Some(chain);
                    let pem = crate::keys::read_secret_file(key)?;
                    rcgen::KeyPair::from_pem(&pem)
                        .with_context(|| format!("{}: not a PEM private key", key.display()))?
                }
                _ => {
                    let key = rcgen::KeyPair::generate().context("generating the relay TLS key")?;
                    req.csr_pem = Some(csr(&key, vec![host])?);
                    key
                }
            };
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
            .or(req.svid_pem.as_deref())
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
        own_certificate: req.svid_pem.is_some(),
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
pub(crate) fn host_of(addr: &str) -> anyhow::Result<String> {
    let (host, _) = comsat_protocol::endpoint::split_host_port(addr)
        .map_err(|e| anyhow!("--public-addr {e}"))?;
    Ok(host.to_owned())
}

pub(crate) fn csr(key: &rcgen::KeyPair, names: Vec<String>) -> anyhow::Result<String> {
    let shown = names.join(", ");
    let params = rcgen::CertificateParams::new(names)
        .with_context(|| format!("`{shown}` is not a valid certificate name"))?;
    let req = params
        .serialize_request(key)
        .context("building the certificate signing request")?;
    req.pem()
        .context("encoding the certificate signing request")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Generate;

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

        let mut st = NodeState {
            kind: NodeKind::Relay,
            node_id: NodeId([1; 16]),
            name: "r1".into(),
            controller: "https://127.0.0.1:1".into(),
            fallback_controllers: vec![],
            audience: "comsat-controller:x".into(),
            authority_public_key: SigningKey::generate().public(),
            public_addr: Some("127.0.0.1:4433".into()),
            interactive_addr: None,
            own_certificate: false,
        };
        let (listen, lane) = st.relay_listen(None).expect("listen");
        assert_eq!(listen, "0.0.0.0:4433".parse().expect("addr"));
        assert_eq!(lane, None);
        st.interactive_addr = Some("127.0.0.1:4434".into());
        let (listen, lane) = st.relay_listen(None).expect("listen");
        assert_eq!(listen, "0.0.0.0:4433".parse().expect("addr"));
        assert_eq!(lane, "0.0.0.0:4434".parse().ok());
        let given = "127.0.0.1:5000".parse().expect("addr");
        let (_, lane) = st.relay_listen(Some(given)).expect("listen");
        assert_eq!(lane, "127.0.0.1:4434".parse().ok());
    }
}
