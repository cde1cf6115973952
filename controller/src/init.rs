//! `comsat controller init`: creates a controller's data dir.
//!
//! ```text
//! controller.toml   configuration (see crate::config)
//! authority.key     ed25519 authority key that signs grants (0600)
//! ca.pem            the CA nodes pin for the controller API
//! ca.key            its key, when generated here (0600)
//! tls.crt, tls.key  the HTTPS certificate and key (key 0600)
//! relay-ca.pem      the CA that signs relay certificates and agents' SVIDs
//!                   (agents trust it); with --upstream-ca, the operator
//!                   installs it, signed from relay-ca.csr
//! relay-ca.key      its key (0600)
//! upstream-ca.pem   with --upstream-ca: the operator's root(s)
//! controller.db     the SQLite database
//! admin.token       the first admin API token (0600; only its hash is in the db)
//! context.toml      what `comsat ctl` needs to reach this controller
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use comsat_node::keys::write_secret_file;
use comsat_node::keys::{Generate, KeyFile};
use comsat_protocol::SigningKey;
use sha2::{Digest, Sha256};

use crate::config::{CONFIG_FILE, DEFAULT_PUBLIC_URL, parse_public_url};
use crate::error::ControllerError;
use crate::pki::{self, CaIssuer};
use crate::store::{DatabaseUrl, NewApiToken, SqlStore, Store};
use crate::unix_now;

/// Prefix of admin API tokens.
pub const ADMIN_TOKEN_PREFIX: &str = "comsat-admin-v1";

/// The admin token file's name.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// The `comsat ctl` context file's name.
pub const CONTEXT_FILE: &str = "context.toml";

/// Lifetime of the generated HTTPS certificate (ten years; the operator
/// replaces `tls.crt`/`tls.key` to rotate it).
const SERVER_CERT_TTL: Duration = Duration::from_secs(10 * 365 * 86_400);

/// What `init` creates.
#[derive(Clone, Debug, Default)]
pub struct InitOptions {
    /// The data dir (created if missing; must not hold a controller).
    pub data_dir: PathBuf,
    /// The URL nodes reach the controller at (default
    /// `https://127.0.0.1:8443`).
    pub public_url: Option<String>,
    /// Operator-provided HTTPS certificate chain (PEM); with `tls_key`.
    pub tls_cert: Option<PathBuf>,
    /// Operator-provided HTTPS key (PEM); with `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// The CA nodes pin (PEM); default: the last certificate of `tls_cert`.
    pub tls_ca: Option<PathBuf>,
    /// The SPIFFE trust domain (default: the host of `public_url` if it
    /// is a DNS name, else `comsat.internal`).
    pub trust_domain: Option<String>,
    /// The operator's root CA (PEM, certificates only): the relay CA
    /// becomes an intermediate under it. `init` then writes a CSR
    /// (`relay-ca.csr`) for the operator to sign where the root's key is,
    /// and the controller runs once the signed certificate is installed
    /// as `relay-ca.pem`.
    pub upstream_ca: Option<PathBuf>,
    /// A PostgreSQL database instead of the SQLite file (it must hold no
    /// controller yet: a second controller copies the first one's data
    /// dir and runs with the same database).
    pub database: Option<DatabaseUrl>,
}

/// What `init` did. Holds no secret.
#[derive(Clone, Debug)]
pub struct InitReport {
    /// The data dir.
    pub data_dir: PathBuf,
    /// The URL in join tokens.
    pub public_url: String,
    /// SHA-256 of the CA certificate (hex), as pinned by join tokens.
    pub ca_sha256: String,
    /// The SPIFFE trust domain.
    pub trust_domain: String,
    /// With an upstream CA: the CSR of the relay CA to have it sign.
    pub relay_ca_csr: Option<PathBuf>,
    /// The `comsat ctl` context file.
    pub context_file: PathBuf,
}

impl std::fmt::Display for InitReport {
    /// What `comsat controller init` prints: what it made, and what next.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dir = self.data_dir.display();
        let context = self.context_file.display();
        writeln!(f, "initialised a comsat controller in {dir}")?;
        writeln!(f, "  URL:            {}", self.public_url)?;
        writeln!(f, "  CA SHA-256:     {}", self.ca_sha256)?;
        writeln!(f, "  trust domain:   spiffe://{}", self.trust_domain)?;
        if let Some(csr) = &self.relay_ca_csr {
            writeln!(
                f,
                "  relay CA CSR:   {} (sign it with your root CA and install the certificate \
                 as {dir}/relay-ca.pem)",
                csr.display()
            )?;
        }
        writeln!(f, "  admin token:    {dir}/admin.token (keep it secret)")?;
        writeln!(f, "  ctl context:    {context}")?;
        writeln!(f, "next:")?;
        writeln!(f, "  comsat controller run --data-dir {dir}")?;
        writeln!(f, "  export COMSAT_CONTEXT={context}")?;
        writeln!(
            f,
            "  comsat ctl token create --kind relay --name relay-1 > relay.token"
        )
    }
}

/// SHA-256 of an API token, hex: what the database stores.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn read_file(path: &Path, option: &'static str) -> Result<Vec<u8>, ControllerError> {
    std::fs::read(path).map_err(|e| ControllerError::Option {
        option,
        message: format!("cannot read {}: {e}", path.display()),
    })
}

fn write_public(path: &Path, contents: &[u8]) -> Result<(), ControllerError> {
    std::fs::write(path, contents).map_err(ControllerError::io(path))
}

fn toml_str(s: &str) -> String {
    // TOML basic strings share JSON's escapes for what we write.
    serde_json::Value::String(s.to_owned()).to_string()
}

/// Creates a controller data dir. Refuses a directory that already holds
/// one. Never prints or returns the admin token: it is in `admin.token`.
pub fn init(opts: &InitOptions) -> Result<InitReport, ControllerError> {
    let dir = &opts.data_dir;
    refuse_initialised(dir)?;
    if let Some(url) = &opts.database {
        refuse_used_database(url)?;
    }
    let public_url = opts
        .public_url
        .clone()
        .unwrap_or_else(|| DEFAULT_PUBLIC_URL.to_owned());
    let public_url = public_url.trim_end_matches('/').to_owned();
    let (host, _port) = parse_public_url(&public_url).map_err(|e| ControllerError::Option {
        option: "--public-url",
        message: e.to_string(),
    })?;
    let operator_tls = operator_tls(opts)?;
    let upstream = match &opts.upstream_ca {
        Some(path) => {
            let pem = read_file(path, "--upstream-ca")?;
            if key_in(&pem) {
                return Err(ControllerError::Option {
                    option: "--upstream-ca",
                    message: format!(
                        "{} holds a private key: give the root's certificate only; its key \
                         stays where it is and signs relay-ca.csr there",
                        path.display()
                    ),
                });
            }
            // Certificates that a bundle can hold.
            crate::bundle::spiffe_bundle(&pem).map_err(|e| ControllerError::Option {
                option: "--upstream-ca",
                message: format!("{}: {e}", path.display()),
            })?;
            Some(pem)
        }
        None => None,
    };
    let trust_domain = match &opts.trust_domain {
        Some(domain) => {
            comsat_protocol::spiffe::check_trust_domain(domain).map_err(|why| {
                ControllerError::Option {
                    option: "--trust-domain",
                    message: format!("`{domain}`: {why}"),
                }
            })?;
            domain.clone()
        }
        None => crate::config::default_trust_domain(&public_url),
    };

    std::fs::create_dir_all(dir).map_err(ControllerError::io(dir))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(ControllerError::io(dir))?;
    }
    let now = unix_now();

    SigningKey::generate().write_file(&dir.join("authority.key"))?;

    // The controller's HTTPS certificate and the CA nodes pin.
    let ca_path = dir.join("ca.pem");
    let ca_pem = match operator_tls {
        Some((cert, key)) => install_operator_tls(dir, cert, key, opts.tls_ca.as_deref())?,
        None => generate_tls(dir, &host, now)?,
    };
    write_public(&ca_path, &ca_pem)?;
    let ca_sha256 =
        hex::encode(pki::first_cert_sha256(&ca_pem).map_err(ControllerError::pki(&ca_path))?);

    // The relay CA: self-signed, or a CSR for the upstream CA to sign.
    let relay_ca_csr = relay_ca(dir, upstream.as_deref(), &trust_domain)?;

    // The first admin token; only its hash goes into the database.
    let token = format!(
        "{ADMIN_TOKEN_PREFIX}:{}",
        hex::encode(rand::random::<[u8; 32]>())
    );
    write_secret_file(&dir.join(ADMIN_TOKEN_FILE), format!("{token}\n").as_bytes())?;
    create_database(
        &dir.join("controller.db"),
        opts.database.as_ref(),
        token_hash(&token),
        now,
    )?;

    let context_file = dir.join(CONTEXT_FILE);
    write_context(&context_file, &public_url)?;
    // Written last: its presence means a complete data dir.
    write_config(&dir.join(CONFIG_FILE), &public_url, &trust_domain)?;

    Ok(InitReport {
        data_dir: dir.clone(),
        public_url,
        ca_sha256,
        trust_domain,
        relay_ca_csr,
        context_file,
    })
}

/// Whether a PEM text holds a private key.
fn key_in(pem: &[u8]) -> bool {
    String::from_utf8_lossy(pem).contains("PRIVATE KEY-----")
}

/// Makes the relay CA: a self-signed one, or, under `upstream` (the
/// operator's roots, written to `upstream-ca.pem`), a key and a CSR for
/// the operator to sign. Returns the CSR's path.
fn relay_ca(
    dir: &Path,
    upstream: Option<&[u8]>,
    trust_domain: &str,
) -> Result<Option<PathBuf>, ControllerError> {
    let relay_ca_path = dir.join("relay-ca.pem");
    let Some(upstream) = upstream else {
        let relay_ca = pki::generate_ca(&format!("comsat {trust_domain} CA"))
            .map_err(ControllerError::pki(&relay_ca_path))?;
        write_secret_file(&dir.join("relay-ca.key"), relay_ca.key_pem.as_bytes())?;
        write_public(&relay_ca_path, relay_ca.cert_pem.as_bytes())?;
        return Ok(None);
    };
    let csr_path = dir.join("relay-ca.csr");
    let (csr, key) = pki::generate_ca_csr(trust_domain).map_err(ControllerError::pki(&csr_path))?;
    write_secret_file(&dir.join("relay-ca.key"), key.as_bytes())?;
    write_public(&csr_path, csr.as_bytes())?;
    write_public(&dir.join("upstream-ca.pem"), upstream)?;
    Ok(Some(csr_path))
}

/// Refuses a directory that holds a controller (or part of one).
fn refuse_initialised(dir: &Path) -> Result<(), ControllerError> {
    for marker in [CONFIG_FILE, "authority.key", "controller.db"] {
        let marker = dir.join(marker);
        if marker.exists() {
            return Err(ControllerError::AlreadyInitialised {
                dir: dir.to_owned(),
                marker,
            });
        }
    }
    Ok(())
}

/// Refuses a PostgreSQL database that already holds a controller's state.
fn refuse_used_database(url: &DatabaseUrl) -> Result<(), ControllerError> {
    let url = url.clone();
    on_own_runtime(database_label(&url), async move {
        let store = SqlStore::connect_postgres(url.expose())
            .await
            .map_err(|source| store_error(&url, source))?;
        let used = store.holds_a_controller().await;
        store.close().await;
        if used.map_err(|source| store_error(&url, source))? {
            return Err(ControllerError::DatabaseInUse {
                url: url.redacted(),
            });
        }
        Ok(())
    })
}

/// The operator's HTTPS certificate chain and key, if given (both or
/// neither; a CA only with them).
fn operator_tls(opts: &InitOptions) -> Result<Option<(&Path, &Path)>, ControllerError> {
    match (&opts.tls_cert, &opts.tls_key) {
        (Some(c), Some(k)) => Ok(Some((c, k))),
        (None, None) => {
            if opts.tls_ca.is_some() {
                return Err(ControllerError::Option {
                    option: "--tls-ca",
                    message: "given without --tls-cert and --tls-key: pass all three, \
                              or none to have the controller generate its CA"
                        .into(),
                });
            }
            Ok(None)
        }
        _ => Err(ControllerError::Option {
            option: "--tls-cert/--tls-key",
            message: "pass both (the certificate chain and its key), or neither".into(),
        }),
    }
}

/// Checks and copies the operator's HTTPS certificate chain and key into
/// `dir`; returns the CA nodes pin: `tls_ca`, or the chain's last
/// certificate.
fn install_operator_tls(
    dir: &Path,
    cert: &Path,
    key: &Path,
    tls_ca: Option<&Path>,
) -> Result<Vec<u8>, ControllerError> {
    let option = |option: &'static str| {
        move |e: pki::PkiError| ControllerError::Option {
            option,
            message: e.to_string(),
        }
    };
    let cert_pem = read_file(cert, "--tls-cert")?;
    let key_pem = read_file(key, "--tls-key")?;
    // Refuse now what the server would refuse at start.
    pki::server_tls_config(&cert_pem, &key_pem).map_err(option("--tls-cert/--tls-key"))?;
    let ca_pem = match tls_ca {
        Some(ca) => {
            let pem = read_file(ca, "--tls-ca")?;
            pki::certs_from_pem(&pem).map_err(option("--tls-ca"))?;
            pem
        }
        None => pki::last_cert_pem(&cert_pem)
            .map_err(option("--tls-cert"))?
            .into_bytes(),
    };
    write_public(&dir.join("tls.crt"), &cert_pem)?;
    write_secret_file(&dir.join("tls.key"), &key_pem)?;
    Ok(ca_pem)
}

/// Generates the controller's CA (key in `ca.key`) and an HTTPS
/// certificate from it for `host`, `localhost` and `127.0.0.1`; returns
/// the CA certificate, which nodes pin.
fn generate_tls(dir: &Path, host: &str, now: u64) -> Result<Vec<u8>, ControllerError> {
    let ca_path = dir.join("ca.pem");
    let cert_path = dir.join("tls.crt");
    let ca = pki::generate_ca("comsat controller CA").map_err(ControllerError::pki(&ca_path))?;
    write_secret_file(&dir.join("ca.key"), ca.key_pem.as_bytes())?;
    let issuer =
        CaIssuer::from_pem(&ca.cert_pem, &ca.key_pem).map_err(ControllerError::pki(&ca_path))?;
    let mut names = vec![host.to_owned()];
    for extra in ["localhost", "127.0.0.1"] {
        if !names.iter().any(|n| n == extra) {
            names.push(extra.to_owned());
        }
    }
    let (cert_pem, key_pem) = issuer
        .issue_server(names, now, SERVER_CERT_TTL)
        .map_err(ControllerError::pki(&cert_path))?;
    write_public(&cert_path, cert_pem.as_bytes())?;
    write_secret_file(&dir.join("tls.key"), key_pem.as_bytes())?;
    Ok(ca.cert_pem.into_bytes())
}

/// Writes what `comsat ctl` needs to reach the controller.
fn write_context(path: &Path, public_url: &str) -> Result<(), ControllerError> {
    write_public(
        path,
        format!(
            "# comsat ctl context, written by `comsat controller init`.\n\
             # Paths are relative to this file's directory.\n\
             controller = {}\ntoken_file = \"{ADMIN_TOKEN_FILE}\"\nca = \"ca.pem\"\n",
            toml_str(public_url)
        )
        .as_bytes(),
    )
}

/// Writes `controller.toml`: `public_url` and `trust_domain`, and every
/// other key commented out at its default.
fn write_config(path: &Path, public_url: &str, trust_domain: &str) -> Result<(), ControllerError> {
    write_public(
        path,
        format!(
            "# comsat controller configuration, written by `comsat controller init`.\n\
             # Every key is optional; defaults are shown commented out.\n\
             public_url = {}\n\
             trust_domain = {}\n\
             # listen = \"0.0.0.0:8443\"\n\
             # jwt_leeway_secs = 30\n\
             # heartbeat_interval_secs = 5\n\
             # heartbeat_timeout_secs = 15\n\
             # relays_per_link = 2\n\
             # relay_cert_ttl_secs = 86400\n\
             # agent_svid_ttl_secs = 3600\n\
             # grant_ttl_secs = 604800\n\
             # link_buffer_limit = 67108864\n\
             # audit_retention_days = 90\n",
            toml_str(public_url),
            toml_str(trust_domain)
        )
        .as_bytes(),
    )
}

fn database_label(url: &DatabaseUrl) -> PathBuf {
    PathBuf::from(url.redacted())
}

fn store_error(url: &DatabaseUrl, source: crate::store::StoreError) -> ControllerError {
    ControllerError::Store {
        path: database_label(url),
        source,
    }
}

/// Runs `work` on a runtime of its own (`init` is synchronous and may be
/// called from inside another runtime).
fn on_own_runtime<F>(label: PathBuf, work: F) -> Result<(), ControllerError>
where
    F: Future<Output = Result<(), ControllerError>> + Send + 'static,
{
    let io_label = label.clone();
    let result = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ControllerError::io(&io_label))?;
        rt.block_on(work)
    })
    .join();
    match result {
        Ok(r) => r,
        Err(_) => Err(ControllerError::Io {
            path: label,
            source: std::io::Error::other("database setup thread panicked"),
        }),
    }
}

/// Creates the database (the SQLite file at `path`, or the PostgreSQL
/// database at `url`) with its schema and the admin token's hash.
fn create_database(
    path: &Path,
    url: Option<&DatabaseUrl>,
    admin_hash: String,
    now: u64,
) -> Result<(), ControllerError> {
    let db = path.to_owned();
    let url = url.cloned();
    let label = url.as_ref().map_or_else(|| db.clone(), database_label);
    on_own_runtime(label.clone(), async move {
        let failed = |source| ControllerError::Store {
            path: label.clone(),
            source,
        };
        let store = match &url {
            Some(url) => SqlStore::connect_postgres(url.expose()).await,
            None => SqlStore::open(&db).await,
        }
        .map_err(failed)?;
        let added = store
            .bootstrap_admin(&NewApiToken {
                id: admin_hash[..16].to_owned(),
                hash: admin_hash,
                created_at: now,
                expires_at: None,
            })
            .await;
        store.close().await;
        added.map_err(failed)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn init_under_an_upstream_ca_writes_a_csr_and_never_takes_a_key() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = pki::generate_ca("root").expect("root");
        let root_pem = tmp.path().join("root.pem");
        std::fs::write(&root_pem, &root.cert_pem).expect("write");
        let dir = tmp.path().join("ctl");
        let report = init(&InitOptions {
            data_dir: dir.clone(),
            trust_domain: Some("site-a.example".into()),
            upstream_ca: Some(root_pem),
            ..Default::default()
        })
        .expect("init");
        assert_eq!(report.relay_ca_csr, Some(dir.join("relay-ca.csr")));
        let csr = std::fs::read_to_string(dir.join("relay-ca.csr")).expect("csr");
        let parsed = pki::parse_csr(&csr).expect("a CSR");
        assert!(
            format!("{:?}", parsed.params.subject_alt_names).contains("spiffe://site-a.example"),
            "{:?}",
            parsed.params.subject_alt_names
        );
        assert!(
            !dir.join("relay-ca.pem").exists(),
            "the operator installs it"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("upstream-ca.pem")).expect("root"),
            root.cert_pem
        );
        // A file with the root's key in it is refused.
        let with_key = tmp.path().join("root-and-key.pem");
        std::fs::write(&with_key, format!("{}{}", root.cert_pem, root.key_pem)).expect("write");
        let err = init(&InitOptions {
            data_dir: tmp.path().join("other"),
            upstream_ca: Some(with_key),
            ..Default::default()
        })
        .expect_err("a key");
        assert!(err.to_string().contains("holds a private key"), "{err}");
        assert!(!tmp.path().join("other").exists(), "nothing written");
    }

    #[test]
    fn init_writes_a_complete_private_data_dir_once() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("ctl");
        let report = init(&InitOptions {
            data_dir: dir.clone(),
            public_url: Some("https://ctl.example.com:9443".into()),
            ..InitOptions::default()
        })
        .expect("init");
        assert_eq!(report.public_url, "https://ctl.example.com:9443");
        for secret in [
            "authority.key",
            "ca.key",
            "tls.key",
            "relay-ca.key",
            "admin.token",
        ] {
            let mode = std::fs::metadata(dir.join(secret))
                .expect(secret)
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{secret}");
        }
        let ctx = std::fs::read_to_string(&report.context_file).expect("context");
        assert_eq!(
            ctx.lines()
                .filter(|l| !l.starts_with('#'))
                .collect::<Vec<_>>(),
            [
                "controller = \"https://ctl.example.com:9443\"",
                "token_file = \"admin.token\"",
                "ca = \"ca.pem\""
            ]
        );
        let token = std::fs::read_to_string(dir.join("admin.token")).expect("token");
        assert!(token.starts_with("comsat-admin-v1:"));
        assert!(!format!("{report:?}").contains(token.trim()));
        let config = crate::config::ControllerConfig::load(&dir).expect("config loads");
        assert_eq!(config.public_url, report.public_url);
        let ca = std::fs::read(dir.join("ca.pem")).expect("ca");
        assert_eq!(
            hex::encode(pki::first_cert_sha256(&ca).expect("sha")),
            report.ca_sha256
        );
        let err = init(&InitOptions {
            data_dir: dir.clone(),
            ..InitOptions::default()
        })
        .expect_err("second init");
        assert!(err.to_string().contains("already holds"), "{err}");
    }

    #[test]
    fn operator_tls_files_are_used_and_the_chain_root_pinned() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ca = pki::generate_ca("operator CA").expect("ca");
        let issuer = CaIssuer::from_pem(&ca.cert_pem, &ca.key_pem).expect("issuer");
        let (leaf, key) = issuer
            .issue_server(
                vec!["ctl.example".into()],
                unix_now(),
                Duration::from_secs(3600),
            )
            .expect("leaf");
        let chain = tmp.path().join("chain.pem");
        let key_path = tmp.path().join("key.pem");
        std::fs::write(&chain, format!("{leaf}{}", ca.cert_pem)).expect("write");
        std::fs::write(&key_path, key).expect("write");
        let report = init(&InitOptions {
            data_dir: tmp.path().join("d"),
            public_url: Some("https://ctl.example:8443".into()),
            tls_cert: Some(chain),
            tls_key: Some(key_path.clone()),
            tls_ca: None,
            trust_domain: None,
            upstream_ca: None,
            database: None,
        })
        .expect("init");
        assert_eq!(
            report.ca_sha256,
            hex::encode(pki::first_cert_sha256(ca.cert_pem.as_bytes()).expect("sha"))
        );
        assert!(!tmp.path().join("d/ca.key").exists());
        let err = init(&InitOptions {
            data_dir: tmp.path().join("e"),
            tls_key: Some(key_path),
            ..InitOptions::default()
        })
        .expect_err("key alone");
        assert!(err.to_string().contains("--tls-cert"), "{err}");
    }
}
