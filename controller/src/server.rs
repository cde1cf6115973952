//! [`Controller`]: opens the data dir, binds, serves HTTPS and runs the
//! background tasks (relay assignment and grant renewal, JWT id purge).

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use comsat_node::keys::KeyFile;
use comsat_protocol::SigningKey;
use tokio::sync::{Mutex, watch};

use crate::config::ControllerConfig;
use crate::error::ControllerError;
use crate::pki::{self, CaIssuer};
use crate::state::Shared;
use crate::store::{CHANGES_CHANNEL, DatabaseUrl, SqlStore};
use crate::unix_now;

/// How often links are checked for reassignment and grant renewal.
const ASSIGN_INTERVAL: Duration = Duration::from_secs(1);
/// How often expired JWT ids are forgotten.
const PURGE_INTERVAL: Duration = Duration::from_secs(60);

/// Traffic reports older than this are forgotten (the link moved, or went
/// quiet).
const TRAFFIC_KEPT_SECS: u64 = 3600;
/// How often a controller sharing its database looks for other
/// controllers' changes (it is woken sooner by `LISTEN` where it works).
const SHARED_POLL: Duration = Duration::from_millis(500);
/// How often the HTTPS certificate files are checked for a renewal.
const TLS_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How long open requests (long polls end at once) get to finish.
const GRACE: Duration = Duration::from_secs(5);

/// Longest TLS handshake (shorter still if `http_idle_timeout_secs` is).
const TLS_HANDSHAKE: Duration = Duration::from_secs(10);

/// How to run a controller.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// The data dir made by [`crate::init`].
    pub data_dir: PathBuf,
    /// Overrides `listen` in `controller.toml`.
    pub listen: Option<SocketAddr>,
    /// A PostgreSQL database (shared with other controllers) instead of
    /// the SQLite file in the data dir.
    pub database: Option<DatabaseUrl>,
    /// Renders the process's metrics for `/metrics` (its Prometheus
    /// recorder); `None`: the process records none, and `/metrics`
    /// answers 503.
    pub metrics: Option<MetricsText>,
}

/// Renders a process's metrics as Prometheus text.
#[derive(Clone)]
pub struct MetricsText(pub Arc<dyn Fn() -> String + Send + Sync>);

impl std::fmt::Debug for MetricsText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MetricsText")
    }
}

/// A controller bound to its listen address, ready to [`run`](Self::run).
pub struct Controller {
    shared: Arc<Shared>,
    listener: std::net::TcpListener,
    local_addr: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    shutdown: watch::Sender<bool>,
    database: Option<DatabaseUrl>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

fn read_text(path: &Path, dir: &Path) -> Result<String, ControllerError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(ControllerError::NotInitialised {
                dir: dir.to_owned(),
                path: path.to_owned(),
            })
        }
        Err(e) => Err(ControllerError::Io {
            path: path.to_owned(),
            source: e,
        }),
    }
}

fn read_secret(path: &Path, dir: &Path) -> Result<String, ControllerError> {
    if !path.exists() {
        return Err(ControllerError::NotInitialised {
            dir: dir.to_owned(),
            path: path.to_owned(),
        });
    }
    Ok(comsat_node::keys::read_secret_file(path)?.to_string())
}

/// The CA that signs every SVID (`relay_ca_cert`, with its key), and the
/// trust domain's SPIFFE bundle (JSON): the upstream CA's roots if the
/// relay CA is under one (which it must then chain to), else the relay CA.
fn signing_ca(
    config: &ControllerConfig,
    dir: &Path,
) -> Result<(CaIssuer, String), ControllerError> {
    let csr = config.relay_ca_cert.with_extension("csr");
    if !config.relay_ca_cert.exists() && csr.exists() {
        return Err(ControllerError::Config {
            path: config.relay_ca_cert.clone(),
            message: format!(
                "missing: have your upstream CA sign {} (a CA certificate for the trust \
                 domain) and put the certificate, followed by any intermediates above it, here",
                csr.display()
            ),
        });
    }
    let relay_ca_pem = read_text(&config.relay_ca_cert, dir)?;
    let relay_ca_key = read_secret(&config.relay_ca_key, dir)?;
    let relay_ca = CaIssuer::from_pem(&relay_ca_pem, &relay_ca_key)
        .map_err(ControllerError::pki(&config.relay_ca_cert))?;
    let bundle_pem = if config.upstream_ca.exists() {
        let upstream = read_text(&config.upstream_ca, dir)?;
        relay_ca
            .check_chains_to(upstream.as_bytes(), &config.trust_domain(), unix_now())
            .map_err(ControllerError::pki(&config.relay_ca_cert))?;
        upstream
    } else {
        relay_ca.cert_pem().to_owned()
    };
    let bundle = crate::bundle::spiffe_bundle(bundle_pem.as_bytes())
        .map_err(ControllerError::pki(&config.upstream_ca))?;
    let json = serde_json::to_string(&bundle).map_err(|e| ControllerError::Config {
        path: config.upstream_ca.clone(),
        message: e.to_string(),
    })?;
    Ok((relay_ca, json))
}

impl Controller {
    /// Reads the data dir, opens the database (applying migrations) and
    /// binds the listen address.
    pub async fn bind(opts: RunOptions) -> Result<Self, ControllerError> {
        let dir = &opts.data_dir;
        let config = ControllerConfig::load(dir)?;
        if !config.authority_key.exists() {
            return Err(ControllerError::NotInitialised {
                dir: dir.clone(),
                path: config.authority_key.clone(),
            });
        }
        let authority = SigningKey::read_file(&config.authority_key)?;
        let ca_pem = read_text(&config.ca, dir)?;
        let ca_sha256 =
            pki::first_cert_sha256(ca_pem.as_bytes()).map_err(ControllerError::pki(&config.ca))?;
        let (relay_ca, spiffe_bundle) = signing_ca(&config, dir)?;
        let cert_pem = read_text(&config.tls_cert, dir)?;
        let key_pem = read_secret(&config.tls_key, dir)?;
        let tls = pki::server_tls_config(cert_pem.as_bytes(), key_pem.as_bytes())
            .map_err(ControllerError::pki(&config.tls_cert))?;
        let store = match &opts.database {
            Some(url) => SqlStore::connect_postgres(url.expose())
                .await
                .map_err(|source| ControllerError::Store {
                    path: PathBuf::from(url.redacted()),
                    source,
                })?,
            None => {
                if !config.database.exists() {
                    return Err(ControllerError::NotInitialised {
                        dir: dir.clone(),
                        path: config.database.clone(),
                    });
                }
                SqlStore::open(&config.database)
                    .await
                    .map_err(|source| ControllerError::Store {
                        path: config.database.clone(),
                        source,
                    })?
            }
        };
        let addr = opts.listen.unwrap_or_else(|| config.listen_addr());
        let listener = std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|source| ControllerError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| ControllerError::Bind { addr, source })?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let audience = format!("comsat-controller:{}", authority.public());
        let auth_failures = config.auth_failures_per_source;
        let shared = Arc::new(Shared {
            relay_cursors: std::sync::Mutex::default(),
            store: Arc::new(store),
            config,
            authority,
            audience,
            ca_pem,
            ca_sha256,
            relay_ca,
            spiffe_bundle,
            changes: watch::channel(0).0,
            shutdown: shutdown_rx,
            link_lock: Mutex::new(()),
            started_at: unix_now(),
            enrol_limit: crate::audit::enrol_limiter(),
            auth_limit: crate::audit::auth_failure_limiter(auth_failures),
            metrics: opts.metrics.clone(),
        });
        Ok(Self {
            shared,
            listener,
            local_addr,
            tls: Arc::new(tls),
            shutdown,
            database: opts.database,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Every (path, method) its API serves: what its OpenAPI description
    /// must hold.
    pub fn api_routes(&self) -> Vec<(String, &'static str)> {
        crate::http::route_table(&self.shared)
    }

    /// The JWT audience of this deployment.
    pub fn audience(&self) -> &str {
        &self.shared.audience
    }

    /// Serves until `shutdown` completes, then stops accepting, ends long
    /// polls, lets open requests finish (a few seconds at most) and closes
    /// the database.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ControllerError> {
        let Self {
            shared,
            listener,
            local_addr,
            tls,
            shutdown: stop,
            database: self_database,
        } = self;
        let handle = axum_server::Handle::<SocketAddr>::new();
        let rustls_config = axum_server::tls_rustls::RustlsConfig::from_config(tls);
        let config = &shared.config;
        let slots =
            crate::admit::Slots::new(config.max_connections, config.max_connections_per_source);
        let idle = Duration::from_secs(config.http_idle_timeout_secs);
        let mut server = axum_server::from_tcp_rustls(listener, rustls_config.clone())
            .map_err(ControllerError::Serve)?
            .map(|tls| {
                crate::admit::Admit::new(tls.handshake_timeout(idle.min(TLS_HANDSHAKE)), slots)
            })
            .handle(handle.clone());
        // A connection that sends no complete request head for `idle` (a
        // slow one, or one idle between requests) is closed; a request in
        // flight (a long poll) is not idle.
        server
            .http_builder()
            .http1()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(idle);
        let app = crate::http::router(shared.clone());
        let tasks = [
            tokio::spawn(assign_loop(shared.clone())),
            tokio::spawn(purge_loop(shared.clone())),
            tokio::spawn(watch_shared_database(shared.clone(), self_database)),
            tokio::spawn(watch_tls_files(shared.clone(), rustls_config)),
        ];
        tracing::info!(
            listen = %local_addr,
            public_url = %shared.config.public_url,
            audience = %shared.audience,
            "controller serving"
        );
        let serve = server.serve(app.into_make_service_with_connect_info::<SocketAddr>());
        tokio::pin!(serve);
        let result = tokio::select! {
            r = &mut serve => r,
            () = shutdown => {
                tracing::info!("controller shutting down");
                let _ = stop.send(true);
                handle.graceful_shutdown(Some(GRACE));
                serve.await
            }
        };
        let _ = stop.send(true);
        for task in tasks {
            let _ = task.await;
        }
        shared.store.close().await;
        result.map_err(ControllerError::Serve)
    }
}

async fn assign_loop(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.clone();
    let mut tick = tokio::time::interval(ASSIGN_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
        if let Err(e) = shared.reassign(unix_now()).await {
            tracing::warn!(error = %e.message, "relay assignment pass failed; retrying");
        }
    }
}

/// With a database other controllers share, their changes must wake this
/// controller's long polls too: a `LISTEN` on PostgreSQL wakes it at once,
/// and the change count is polled every [`SHARED_POLL`] whatever happens
/// (the bound when `LISTEN` is unavailable, as on CockroachDB). A
/// controller on its own SQLite file needs none of it.
async fn watch_shared_database(shared: Arc<Shared>, database: Option<DatabaseUrl>) {
    let Some(url) = database else { return };
    let mut shutdown = shared.shutdown.clone();
    let mut listener = match sqlx::postgres::PgListener::connect(url.expose()).await {
        Ok(mut l) => match l.listen(CHANGES_CHANNEL).await {
            Ok(()) => Some(l),
            Err(e) => {
                tracing::warn!(error = %e, "LISTEN refused; polling the database for other controllers' changes");
                None
            }
        },
        Err(e) => {
            tracing::warn!(error = %e, "cannot LISTEN; polling the database for other controllers' changes");
            None
        }
    };
    let mut last = shared.store.change_mark().await.ok();
    loop {
        let woke = tokio::select! {
            ok = notified(&mut listener) => Some(ok),
            () = tokio::time::sleep(SHARED_POLL) => None,
            _ = shutdown.changed() => return,
        };
        if *shutdown.borrow() {
            return;
        }
        if woke == Some(false) {
            tracing::warn!(
                "LISTEN connection lost; polling the database for other controllers' changes"
            );
            listener = None;
        }
        match shared.store.change_mark().await {
            Ok(now) if Some(now) != last => {
                last = Some(now);
                shared.notify();
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "reading the database's change count failed"),
        }
    }
}

/// Serves a new HTTPS certificate and key as soon as their files change
/// (an operator's renewal), to new connections; open ones, long polls
/// included, go on. A pair that does not load, does not match, or does not
/// chain to the CA nodes pin is refused with an error and the current one
/// stays; it is tried again when either file changes.
async fn watch_tls_files(shared: Arc<Shared>, served: axum_server::tls_rustls::RustlsConfig) {
    let (cert, key) = (
        shared.config.tls_cert.clone(),
        shared.config.tls_key.clone(),
    );
    let stamps = || [&cert, &key].map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
    let mut last = stamps();
    let host = crate::config::parse_public_url(&shared.config.public_url)
        .map(|(h, _)| h)
        .unwrap_or_default();
    let mut shutdown = shared.shutdown.clone();
    let mut tick = tokio::time::interval(TLS_CHECK_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
        let now = stamps();
        if now == last {
            continue;
        }
        last = now;
        match load_rotated(&cert, &key, &shared.ca_pem, &host) {
            Ok(config) => {
                served.reload_from_config(Arc::new(config));
                tracing::info!(cert = %cert.display(), "HTTPS certificate reloaded; new connections get it");
            }
            Err(e) => tracing::error!(
                cert = %cert.display(),
                error = %e,
                "new HTTPS certificate refused; still serving the current one"
            ),
        }
    }
}

/// Reads a renewed HTTPS certificate and key and checks them against the
/// CA nodes pin ([`pki::check_rotated_certificate`]).
fn load_rotated(
    cert: &Path,
    key: &Path,
    ca_pem: &str,
    host: &str,
) -> Result<rustls::ServerConfig, ControllerError> {
    let cert_pem = std::fs::read(cert).map_err(ControllerError::io(cert))?;
    let key_pem = comsat_node::keys::read_secret_file(key)?;
    pki::check_rotated_certificate(&cert_pem, key_pem.as_bytes(), ca_pem.as_bytes(), host)
        .map_err(ControllerError::pki(cert))
}

/// Waits for a notification; `false` if the listener failed. Never
/// completes without a listener.
async fn notified(listener: &mut Option<sqlx::postgres::PgListener>) -> bool {
    match listener {
        Some(l) => l.recv().await.is_ok(),
        None => std::future::pending().await,
    }
}

async fn purge_loop(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.clone();
    let mut tick = tokio::time::interval(PURGE_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
        match shared.store.purge_jtis(unix_now()).await {
            Ok(n) if n > 0 => tracing::debug!(purged = n, "expired JWT ids forgotten"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "purging expired JWT ids failed"),
        }
        let before = unix_now().saturating_sub(TRAFFIC_KEPT_SECS);
        if let Err(e) = shared.store.purge_traffic(before).await {
            tracing::warn!(error = %e, "forgetting old traffic reports failed");
        }
        let days = shared.config.flow_log_days;
        let before = match days {
            0 => 0,
            d => crate::audit::now_ms().saturating_sub(d.saturating_mul(86_400_000)),
        };
        match shared
            .store
            .purge_flows(before, shared.config.flow_log_max_records)
            .await
        {
            Ok(n) if n > 0 => tracing::debug!(removed = n, "old flow records removed"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "removing old flow records failed"),
        }
        let days = shared.config.audit_retention_days;
        if days > 0 {
            let before = crate::audit::now_ms().saturating_sub(days.saturating_mul(86_400_000));
            match shared.store.purge_audit(before).await {
                Ok(n) if n > 0 => tracing::info!(removed = n, days, "old audit records removed"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "removing old audit records failed"),
            }
        }
    }
}
