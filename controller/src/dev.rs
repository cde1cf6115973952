//! `comsat dev init`: a complete local setup on files.
//!
//! Creates, in one directory:
//!
//! ```text
//! authority.key            the authority's ed25519 key (0600): signs grants
//! ca.pem, ca.key           a CA (key 0600) that issued the relay certificate
//! relay/relay.toml         relay config; relay.crt, relay.key (0600)
//! relay/grants/NAME.grant  one signed grant per link
//! agent-a/agent.toml       side A: node.key, noise.key (0600); listens
//! agent-b/agent.toml       side B: node.key, noise.key (0600); dials targets
//! ```
//!
//! Every private key is generated here, where it is used, and never
//! printed. The controller will do the same over the network, with each
//! node generating its own keys.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use comsat_node::keys::{Generate, KeyFile, RandomId};
use comsat_node::keys::{KeyFileError, write_secret_file};
use comsat_protocol::api::NodeKind;
use comsat_protocol::codec::CodecError;
use comsat_protocol::grant::{Grant, GrantSide, LinkLimits};
use comsat_protocol::{LinkId, NodeId, NoisePublicKey, NoiseSecretKey, RelayId, SigningKey};

use crate::pki::{self, CaIssuer, PkiError};

/// Why a dev setup could not be written or changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DevError {
    /// A file could not be read or written.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, naming the file.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A key file could not be written or read.
    #[error(transparent)]
    Key(#[from] KeyFileError),
    /// The CA or a certificate could not be made.
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// A key or certificate request could not be made.
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    /// A grant could not be encoded.
    #[error("grant: {0}")]
    Grant(#[from] CodecError),
    /// The setup is not as asked (already there, no such link or relay, a
    /// config file edited by hand into another shape).
    #[error("{0}")]
    Layout(String),
}

impl From<std::io::Error> for DevError {
    fn from(source: std::io::Error) -> Self {
        Self::Io {
            what: "writing the dev setup".into(),
            source,
        }
    }
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> DevError {
    move |source| DevError::Io { what, source }
}

type Result<T, E = DevError> = std::result::Result<T, E>;

/// Default validity of dev grants.
pub const GRANT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// The name dev relay certificates are issued for, and agents dial.
const DEV_RELAY_NAME: &str = "localhost";

/// The SPIFFE trust domain of a dev setup's relays.
const DEV_TRUST_DOMAIN: &str = "comsat.internal";

/// Default relay buffer per link (used once buffering lands).
pub const BUFFER_LIMIT: u64 = 8 * 1024 * 1024;

/// One link of the dev setup.
#[derive(Debug, Clone)]
pub struct DevLink {
    /// Its name.
    pub name: String,
    /// Side A's listen spec (`tcp://127.0.0.1:PORT` or `unix:///path`).
    pub listen: String,
    /// Side B's target spec.
    pub target: String,
    /// Unix listener: allowed peer uids (empty: any).
    pub allowed_uids: Vec<u32>,
    /// The workloads the listener admits (`comsat_protocol::workload`);
    /// side B checks each flow's caller against them too.
    pub allow: Vec<String>,
    /// Side B starts each target connection with a PROXY v2 header.
    pub proxy_protocol: bool,
}

/// What to create.
#[derive(Debug, Clone)]
pub struct DevOptions {
    /// The relay's QUIC address (agents dial it).
    pub relay_listen: SocketAddr,
    /// The relay's admin address.
    pub relay_admin: Option<SocketAddr>,
    /// Admin addresses of agents A and B.
    pub agent_admin: [Option<SocketAddr>; 2],
    /// The links, side A listening and side B dialling.
    pub links: Vec<DevLink>,
    /// Pin the relay by certificate SHA-256 instead of by CA.
    pub pin_sha256: bool,
    /// More relays after the first, as (QUIC, admin) addresses: every link
    /// names them all, in order, and each gets its own directory
    /// (`relay-2/`, …) with the same grants.
    pub extra_relays: Vec<(SocketAddr, Option<SocketAddr>)>,
}

/// One relay of the dev setup.
#[derive(Debug, Clone)]
pub struct DevRelay {
    /// Its id.
    pub id: RelayId,
    /// Its SPIFFE ID, which its certificate carries.
    pub spiffe_id: String,
    /// Its config file.
    pub config: PathBuf,
    /// Its grant directory.
    pub grants_dir: PathBuf,
    /// SHA-256 of its certificate, hex.
    pub cert_sha256: String,
    /// Its QUIC address.
    pub listen: SocketAddr,
}

/// One agent of the dev setup.
#[derive(Debug, Clone)]
pub struct DevAgent {
    /// Its directory.
    pub dir: PathBuf,
    /// Its config file.
    pub config: PathBuf,
    /// Its node id.
    pub node_id: NodeId,
    /// Its ed25519 public key.
    pub sign_pub: comsat_protocol::SignPublicKey,
    /// Its Noise public key.
    pub noise_pub: NoisePublicKey,
}

/// What was created.
#[derive(Debug, Clone)]
pub struct DevLayout {
    /// The directory.
    pub dir: PathBuf,
    /// The authority key file.
    pub authority_key: PathBuf,
    /// The relay's id.
    pub relay_id: RelayId,
    /// The relay's config file.
    pub relay_config: PathBuf,
    /// The relay's grant directory.
    pub grants_dir: PathBuf,
    /// CA certificate (PEM).
    pub ca_pem: PathBuf,
    /// SHA-256 of the relay certificate, hex.
    pub relay_cert_sha256: String,
    /// Side A.
    pub agent_a: DevAgent,
    /// Side B.
    pub agent_b: DevAgent,
    /// Link ids by name, in option order.
    pub links: Vec<(String, LinkId)>,
    /// Every relay, the first one included, in the links' order.
    pub relays: Vec<DevRelay>,
}

fn unix_now() -> u64 {
    crate::unix_now()
}

fn toml_str(s: &str) -> String {
    // TOML basic strings share JSON's escapes for what we write.
    format!("{s:?}")
}

fn create_agent(dir: &Path, admin: Option<SocketAddr>) -> Result<(DevAgent, String)> {
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    let signing = SigningKey::generate();
    let noise = NoiseSecretKey::generate();
    signing.write_file(&dir.join("node.key"))?;
    noise.write_file(&dir.join("noise.key"))?;
    let node_id = NodeId::random();
    let mut head = format!(
        "# comsat agent config, written by `comsat dev init`.\n\
         node_id = \"{node_id}\"\nsigning_key = \"node.key\"\nnoise_key = \"noise.key\"\n"
    );
    if let Some(a) = admin {
        let _ = writeln!(head, "admin = \"{a}\"");
    }
    Ok((
        DevAgent {
            dir: dir.to_owned(),
            config: dir.join("agent.toml"),
            node_id,
            sign_pub: signing.public(),
            noise_pub: noise.public(),
        },
        head,
    ))
}

/// Creates the setup in `dir` (which must not hold one already).
pub fn init(dir: &Path, opts: &DevOptions) -> Result<DevLayout> {
    if dir.join("authority.key").exists() {
        return Err(DevError::Layout(format!(
            "{} already holds a comsat dev setup (authority.key exists); \
             choose another --dir or remove it",
            dir.display()
        )));
    }
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    let authority = SigningKey::generate();
    let authority_key = dir.join("authority.key");
    authority.write_file(&authority_key)?;

    // A CA (the controller's own PKI code) that issues the relays'
    // certificates.
    let ca_files = pki::generate_ca("comsat dev CA")?;
    let ca_pem = dir.join("ca.pem");
    std::fs::write(&ca_pem, &ca_files.cert_pem)?;
    write_secret_file(&dir.join("ca.key"), ca_files.key_pem.as_bytes())?;
    let ca = CaIssuer::from_pem(&ca_files.cert_pem, &ca_files.key_pem)?;

    let mut relays = Vec::new();
    let all = std::iter::once((opts.relay_listen, opts.relay_admin))
        .chain(opts.extra_relays.iter().copied());
    for (n, (listen, admin)) in all.enumerate() {
        let name = if n == 0 {
            "relay".to_owned()
        } else {
            format!("relay-{}", n + 1)
        };
        relays.push(create_relay(
            &dir.join(&name),
            &name,
            &ca,
            &authority,
            listen,
            admin,
        )?);
    }
    let (agent_a, mut a_toml) = create_agent(&dir.join("agent-a"), opts.agent_admin[0])?;
    let (agent_b, mut b_toml) = create_agent(&dir.join("agent-b"), opts.agent_admin[1])?;
    let relay_tables: String = relays.iter().map(|r| r.table(opts.pin_sha256)).collect();
    let mut links = Vec::new();
    for link in &opts.links {
        let link_id = LinkId::random();
        let grant = Grant {
            link_id,
            generation: 1,
            relays: relays.iter().map(|r| r.id).collect(),
            side_a: GrantSide {
                node_id: agent_a.node_id,
                sign_pub: agent_a.sign_pub,
            },
            side_b: GrantSide {
                node_id: agent_b.node_id,
                sign_pub: agent_b.sign_pub,
            },
            not_after: unix_now() + GRANT_VALIDITY.as_secs(),
            buffer_limit: BUFFER_LIMIT,
            limits: LinkLimits::default(),
        };
        let signed = grant.sign(&authority)?.encode()?;
        for r in &relays {
            std::fs::write(r.grants_dir.join(format!("{}.grant", link.name)), &signed)?;
        }
        let relay = &relay_tables;
        let _ = write!(
            a_toml,
            "\n[[links]]\nname = {}\nlink_id = \"{link_id}\"\ngeneration = 1\nside = \"a\"\n\
             peer_noise_public_key = \"{}\"\nlisten = {}\nallowed_uids = {:?}\nallow = [{}]\n{relay}",
            toml_str(&link.name),
            agent_b.noise_pub,
            toml_str(&link.listen),
            link.allowed_uids,
            link.allow
                .iter()
                .map(|r| toml_str(r))
                .collect::<Vec<_>>()
                .join(", "),
        );
        let _ = write!(
            b_toml,
            "\n[[links]]\nname = {}\nlink_id = \"{link_id}\"\ngeneration = 1\nside = \"b\"\n\
             peer_noise_public_key = \"{}\"\ntarget = {}\nallow = [{}]\nproxy_protocol = {}\n{relay}",
            toml_str(&link.name),
            agent_a.noise_pub,
            toml_str(&link.target),
            link.allow
                .iter()
                .map(|r| toml_str(r))
                .collect::<Vec<_>>()
                .join(", "),
            link.proxy_protocol,
        );
        links.push((link.name.clone(), link_id));
    }
    std::fs::write(&agent_a.config, a_toml)?;
    std::fs::write(&agent_b.config, b_toml)?;
    let first = relays[0].clone();
    Ok(DevLayout {
        dir: dir.to_owned(),
        authority_key,
        relay_id: first.id,
        relay_config: first.config,
        grants_dir: first.grants_dir,
        ca_pem,
        relay_cert_sha256: first.cert_sha256,
        agent_a,
        agent_b,
        links,
        relays,
    })
}

/// Reads `path` as a TOML table.
fn read_table(path: &Path) -> Result<toml::Table> {
    let shown = path.display();
    let text = std::fs::read_to_string(path).map_err(io(format!("reading {shown}")))?;
    toml::from_str(&text).map_err(|e| DevError::Layout(format!("{shown} is not valid TOML: {e}")))
}

/// Writes `doc` over `path` by way of a temporary file and a rename.
fn replace_table(path: &Path, doc: &toml::Table) -> Result<()> {
    let text = toml::to_string(doc).map_err(|e| DevError::Layout(format!("{e}")))?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(io(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io(format!("writing {}", path.display())))
}

impl DevLayout {
    /// Re-signs link `name`'s grant with `limits` (same generation, so the
    /// relays apply them without touching the link) into every relay's
    /// grant directory.
    pub fn set_link_limits(&self, name: &str, limits: LinkLimits) -> Result<()> {
        let Some((_, link_id)) = self.links.iter().find(|(n, _)| n == name) else {
            return Err(DevError::Layout(format!(
                "no link named `{name}` in this layout"
            )));
        };
        let authority = SigningKey::read_file(&self.authority_key)?;
        let grant = Grant {
            link_id: *link_id,
            generation: 1,
            relays: self.relays.iter().map(|r| r.id).collect(),
            side_a: GrantSide {
                node_id: self.agent_a.node_id,
                sign_pub: self.agent_a.sign_pub,
            },
            side_b: GrantSide {
                node_id: self.agent_b.node_id,
                sign_pub: self.agent_b.sign_pub,
            },
            not_after: unix_now() + GRANT_VALIDITY.as_secs(),
            buffer_limit: BUFFER_LIMIT,
            limits,
        };
        let signed = grant.sign(&authority)?.encode()?;
        for r in &self.relays {
            let path = r.grants_dir.join(format!("{name}.grant"));
            let tmp = r.grants_dir.join(format!(".{name}.grant.tmp"));
            std::fs::write(&tmp, &signed)?;
            std::fs::rename(&tmp, &path)?;
        }
        Ok(())
    }

    /// Keeps link `name` on relay `relay` (an index into `relays`) alone,
    /// in both agents' configs: with links kept on different relays, each
    /// rides its own QUIC connection from the same agents. The agents must
    /// be (re)started to use it.
    pub fn keep_link_on_relay(&self, name: &str, relay: usize) -> Result<()> {
        let keep = self.relay(relay)?.listen.to_string();
        self.edit_link(name, |link, config| {
            let Some(toml::Value::Array(relays)) = link.get_mut("relays") else {
                return Err(DevError::Layout(format!(
                    "link `{name}` in {config} names no relays"
                )));
            };
            relays.retain(|r| r.get("addr").and_then(toml::Value::as_str) == Some(&keep));
            if relays.is_empty() {
                return Err(DevError::Layout(format!(
                    "link `{name}` in {config} does not name relay {keep}"
                )));
            }
            Ok(())
        })
    }

    /// Sets link `name`'s `connection` (see the agent config reference) in
    /// both agents' configs: it then rides a QUIC connection apart from
    /// the links that name none. The agents must be (re)started to use it.
    pub fn set_link_connection(&self, name: &str, connection: &str) -> Result<()> {
        self.edit_link(name, |link, _| {
            link.insert("connection".into(), connection.into());
            Ok(())
        })
    }

    /// Gives relay `relay` an interactive listener at `addr` (its config's
    /// `interactive_listen`) and puts link `name` on it in both agents'
    /// configs: the `connection` name, and `addr` in place of that relay's
    /// main address. The relay and agents must be (re)started to use it.
    pub fn put_link_on_interactive_listener(
        &self,
        name: &str,
        connection: &str,
        relay: usize,
        addr: SocketAddr,
    ) -> Result<()> {
        let r = self.relay(relay)?;
        let mut doc = read_table(&r.config)?;
        doc.insert("interactive_listen".into(), addr.to_string().into());
        replace_table(&r.config, &doc)?;
        let main = r.listen.to_string();
        self.edit_link(name, |link, config| {
            link.insert("connection".into(), connection.into());
            let Some(toml::Value::Array(relays)) = link.get_mut("relays") else {
                return Err(DevError::Layout(format!(
                    "link `{name}` in {config} names no relays"
                )));
            };
            let entry = relays
                .iter_mut()
                .filter_map(toml::Value::as_table_mut)
                .find(|t| t.get("addr").and_then(toml::Value::as_str) == Some(&main))
                .ok_or_else(|| {
                    DevError::Layout(format!(
                        "link `{name}` in {config} does not name relay {main}"
                    ))
                })?;
            entry.insert("addr".into(), addr.to_string().into());
            Ok(())
        })
    }

    /// Gives relay `relay` an interactive listener at `addr` and every
    /// link of the layout a lane to it (its `lane_addr` in both agents'
    /// configs), as an enrolled relay with `--interactive-port` gives its
    /// links: flows start on the lane and move to the main connection when
    /// they turn bulk. The relay and agents must be (re)started to use it.
    pub fn run_lanes(&self, relay: usize, addr: SocketAddr) -> Result<()> {
        let r = self.relay(relay)?;
        let mut doc = read_table(&r.config)?;
        doc.insert("interactive_listen".into(), addr.to_string().into());
        replace_table(&r.config, &doc)?;
        self.give_lanes(relay, &addr.to_string())
    }

    /// Gives every link of the layout a lane to relay `relay`'s main
    /// listener (its `lane_addr` is the relay's `addr`), as the controller
    /// gives links of a relay enrolled without `--interactive-port`: the
    /// relay serves the lanes at its main listener, from its main threads.
    /// The agents must be (re)started to use it.
    pub fn run_lanes_on_main(&self, relay: usize) -> Result<()> {
        let main = self.relay(relay)?.listen.to_string();
        self.give_lanes(relay, &main)
    }

    /// Sets `lane_addr` to `lane` in every link's entry for relay `relay`.
    fn give_lanes(&self, relay: usize, lane: &str) -> Result<()> {
        let main = self.relay(relay)?.listen.to_string();
        for (name, _) in &self.links {
            self.edit_link(name, |link, _| {
                let Some(toml::Value::Array(relays)) = link.get_mut("relays") else {
                    return Ok(());
                };
                for entry in relays.iter_mut().filter_map(toml::Value::as_table_mut) {
                    if entry.get("addr").and_then(toml::Value::as_str) == Some(&main) {
                        entry.insert("lane_addr".into(), lane.into());
                    }
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Relay `i` of the layout (0 is the first).
    fn relay(&self, i: usize) -> Result<&DevRelay> {
        self.relays.get(i).ok_or_else(|| {
            DevError::Layout(format!(
                "the layout has {} relays, not {}",
                self.relays.len(),
                i + 1
            ))
        })
    }

    /// Applies `edit` to link `name`'s table in both agents' configs and
    /// replaces each file by rename.
    fn edit_link(
        &self,
        name: &str,
        edit: impl Fn(&mut toml::Table, &str) -> Result<()>,
    ) -> Result<()> {
        for config in [&self.agent_a.config, &self.agent_b.config] {
            let shown = config.display().to_string();
            let mut doc = read_table(config)?;
            let Some(toml::Value::Array(links)) = doc.get_mut("links") else {
                return Err(DevError::Layout(format!("{shown} has no links")));
            };
            let link = links
                .iter_mut()
                .find(|l| l.get("name").and_then(toml::Value::as_str) == Some(name))
                .and_then(toml::Value::as_table_mut)
                .ok_or_else(|| DevError::Layout(format!("no link named `{name}` in {shown}")))?;
            edit(link, &shown)?;
            replace_table(config, &doc)?;
        }
        Ok(())
    }

    /// Enrols `n` more nodes with every relay of the layout, for load
    /// tests that act as many agents: each pair of new nodes shares a
    /// grant (with an odd `n`, the last one shares one with side B). The
    /// relays must be (re)started or reload their grants to know them.
    /// Returns each node's id and signing key.
    pub fn add_nodes(&self, n: usize) -> Result<Vec<(NodeId, SigningKey)>> {
        let authority = SigningKey::read_file(&self.authority_key)?;
        let nodes: Vec<(NodeId, SigningKey)> = (0..n)
            .map(|_| (NodeId::random(), SigningKey::generate()))
            .collect();
        let side = |(id, key): &(NodeId, SigningKey)| GrantSide {
            node_id: *id,
            sign_pub: key.public(),
        };
        for (i, pair) in nodes.chunks(2).enumerate() {
            let grant = Grant {
                link_id: LinkId::random(),
                generation: 1,
                relays: self.relays.iter().map(|r| r.id).collect(),
                side_a: side(&pair[0]),
                side_b: pair.get(1).map_or(
                    GrantSide {
                        node_id: self.agent_b.node_id,
                        sign_pub: self.agent_b.sign_pub,
                    },
                    side,
                ),
                not_after: unix_now() + GRANT_VALIDITY.as_secs(),
                buffer_limit: BUFFER_LIMIT,
                limits: LinkLimits::default(),
            };
            let signed = grant.sign(&authority)?.encode()?;
            for r in &self.relays {
                std::fs::write(r.grants_dir.join(format!("node-pair-{i}.grant")), &signed)?;
            }
        }
        Ok(nodes)
    }
}

impl DevRelay {
    /// The relay as a link's `[[links.relays]]` table in an agent's
    /// config: pinned by its certificate's hash, or by the CA.
    fn table(&self, pin_sha256: bool) -> String {
        let pin = if pin_sha256 {
            format!("cert_sha256 = \"{}\"\n", self.cert_sha256)
        } else {
            // Relative to the agent's directory, so the setup can move.
            "ca_file = \"../ca.pem\"\n".to_owned()
        };
        format!(
            "[[links.relays]]\naddr = \"{}\"\nserver_name = \"{DEV_RELAY_NAME}\"\nrelay_id = \"{}\"\n\
             spiffe_id = \"{}\"\n{pin}",
            self.listen, self.id, self.spiffe_id
        )
    }
}

fn create_relay(
    relay_dir: &Path,
    name: &str,
    ca: &CaIssuer,
    authority: &SigningKey,
    listen: SocketAddr,
    admin: Option<SocketAddr>,
) -> Result<DevRelay> {
    let grants_dir = relay_dir.join("grants");
    std::fs::create_dir_all(&grants_dir)?;
    let id = RelayId::random();
    // The relay's key is made here, where it is used; the CA sees only a
    // request for it, as an enrolling relay's would.
    let relay_key = rcgen::KeyPair::generate()?;
    let csr = rcgen::CertificateParams::new(vec![DEV_RELAY_NAME.to_owned()])?
        .serialize_request(&relay_key)?
        .pem()?;
    let spiffe_id =
        comsat_protocol::spiffe::node_spiffe_id(DEV_TRUST_DOMAIN, NodeKind::Relay, name);
    let svid = pki::Svid::Relay {
        host: DEV_RELAY_NAME,
    };
    let cert_pem = ca.issue_svid(&csr, svid, &spiffe_id, unix_now(), GRANT_VALIDITY)?;
    std::fs::write(relay_dir.join("relay.crt"), &cert_pem)?;
    write_secret_file(
        &relay_dir.join("relay.key"),
        relay_key.serialize_pem().as_bytes(),
    )?;
    let cert_sha256 = hex::encode(pki::first_cert_sha256(cert_pem.as_bytes())?);
    let mut relay_toml = format!(
        "# comsat relay config, written by `comsat dev init`.\n\
         relay_id = \"{id}\"\nlisten = \"{listen}\"\n"
    );
    if let Some(a) = admin {
        let _ = writeln!(relay_toml, "admin = \"{a}\"");
    }
    let _ = write!(
        relay_toml,
        "tls_cert = \"relay.crt\"\ntls_key = \"relay.key\"\n\
         authority_public_key = \"{}\"\ngrants_dir = \"grants\"\n",
        authority.public()
    );
    let config = relay_dir.join("relay.toml");
    std::fs::write(&config, relay_toml)?;
    Ok(DevRelay {
        id,
        spiffe_id,
        config,
        grants_dir,
        cert_sha256,
        listen,
    })
}
