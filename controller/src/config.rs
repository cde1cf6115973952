//! `controller.toml`: the controller's configuration file.
//!
//! `comsat controller init --data-dir DIR` writes it; `comsat controller
//! run --data-dir DIR` reads it. Every key is optional; unknown keys are
//! refused. Relative paths are relative to DIR.
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `public_url` | `https://127.0.0.1:8443` | the URL nodes and `comsat ctl` reach the controller at; it goes into every join token |
//! | `listen` | `0.0.0.0:<port of public_url>`, or `127.0.0.1:<port>` when its host is a loopback address or `localhost` | the HTTPS listen address (`--listen` overrides it) |
//! | `jwt_leeway_secs` | 30 | clock skew tolerated on node JWTs (at most 300) |
//! | `heartbeat_interval_secs` | 5 | how often relays heartbeat (informational: relays use a fixed 5 s) |
//! | `heartbeat_timeout_secs` | 15 | a relay with no heartbeat for this long is unhealthy and its links move; must exceed `heartbeat_interval_secs` |
//! | `relays_per_link` | 2 | relays each link is assigned: a primary and backups (1 to 16) |
//! | `trust_domain` | the host of `public_url` if it is a DNS name, else `comsat.internal` | the SPIFFE trust domain: relays are `spiffe://DOMAIN/relay/NAME` and agents `spiffe://DOMAIN/agent/NAME` in the X.509-SVIDs the controller issues (lowercase letters, digits, `.`, `-`, `_`; `controller init --trust-domain` sets it) |
//! | `relay_cert_ttl_secs` | 86400 | lifetime of relay certificates the controller issues (at least 300) |
//! | `agent_svid_ttl_secs` | 3600 | lifetime of agents' X.509-SVIDs (300 to 2592000); agents renew theirs when a third is left |
//! | `grant_ttl_secs` | 604800 (7 days) | lifetime of grants; they are re-signed before half of it is gone (at least 60) |
//! | `link_buffer_limit` | 67108864 (64 MiB) | bytes a relay may hold per link while one side is away |
//! | `audit_retention_days` | 90 | audit records older than this are removed (hourly); 0 keeps them forever |
//! | `flow_log_days` | 7 | flow records older than this are removed (every minute); 0 keeps them until `flow_log_max_records` |
//! | `flow_log_max_records` | 1000000 | the most flow records kept: beyond it the oldest are removed (every minute; 1000 to 100000000) |
//! | `max_connections` | 768 | HTTPS connections open at once (keep it below the process's open-file limit); when all are taken, the one waiting longest for a request head (slow, or idle after its answer) is closed to make room, and a newcomer is closed at once only when every connection holds a request in flight |
//! | `max_connections_per_source` | 256 | of those, from one IPv4 address or IPv6 /64 (at most `max_connections`) |
//! | `http_idle_timeout_secs` | 20 | a connection that completes no TLS handshake or request head for this long (a slow one, or one idle between requests) is closed; a request in flight is not idle (1 to 300) |
//! | `auth_failures_per_source` | 20 | failed authentications an address may make at once before it gets 429 (then one a second; even a correct credential waits meanwhile; 1 to 1000000) |
//! | `console_session_secs` | 28800 (8 h) | how long a console sign-in lasts (its session also ends with the API token it was opened with; 1 to 604800) |
//! | `tls_cert` | `tls.crt` | the HTTPS server certificate chain (PEM) |
//! | `tls_key` | `tls.key` | its private key (PEM, mode 0600) |
//! | `ca` | `ca.pem` | the CA nodes pin (its SHA-256 goes into join tokens; served at `/v1/ca`) |
//! | `relay_ca_cert` | `relay-ca.pem` | the CA that signs relay certificates (agents trust it) |
//! | `relay_ca_key` | `relay-ca.key` | its private key (mode 0600) |
//! | `upstream_ca` | `upstream-ca.pem` | if the file exists: the operator's root(s) the relay CA is an intermediate under (`controller init --upstream-ca`); certificates must chain to it, and it is the trust domain's bundle |
//! | `authority_key` | `authority.key` | the ed25519 authority key that signs grants (mode 0600) |
//! | `database` | `controller.db` | the SQLite database (unused with `--database postgres://…` / `COMSAT_DATABASE_URL`, which is never read from this file: it may hold a password) |
//!
//! Example:
//!
//! ```toml
//! public_url = "https://controller.example.com:8443"
//! relays_per_link = 3
//! heartbeat_timeout_secs = 20
//! ```

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use comsat_protocol::limits::MAX_GRANT_RELAYS;
use serde::{Deserialize, Serialize};

use crate::error::ControllerError;

/// The config file's name inside the data dir.
pub const CONFIG_FILE: &str = "controller.toml";

/// Largest config file read.
const MAX_CONFIG_LEN: u64 = 64 * 1024;

/// The default `public_url`.
pub const DEFAULT_PUBLIC_URL: &str = "https://127.0.0.1:8443";

fn default_public_url() -> String {
    DEFAULT_PUBLIC_URL.to_owned()
}
fn default_leeway() -> u64 {
    30
}
fn default_hb_interval() -> u64 {
    5
}
fn default_hb_timeout() -> u64 {
    15
}
fn default_relays_per_link() -> usize {
    2
}
fn default_relay_cert_ttl() -> u64 {
    86_400
}
fn default_agent_svid_ttl() -> u64 {
    3600
}
fn default_grant_ttl() -> u64 {
    7 * 86_400
}
fn default_buffer_limit() -> u64 {
    64 * 1024 * 1024
}
fn default_audit_retention() -> u64 {
    90
}
fn default_flow_log_days() -> u64 {
    7
}
fn default_flow_log_max() -> u64 {
    1_000_000
}
fn default_max_connections() -> usize {
    768
}
fn default_max_connections_per_source() -> usize {
    256
}
fn default_http_idle_timeout() -> u64 {
    20
}
fn default_auth_failures_per_source() -> u32 {
    20
}
fn default_console_session() -> u64 {
    8 * 3600
}
fn path_default(s: &str) -> PathBuf {
    PathBuf::from(s)
}

/// The parsed `controller.toml` (see the module docs for every key).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerConfig {
    /// The URL nodes reach the controller at.
    #[serde(default = "default_public_url")]
    pub public_url: String,
    /// The HTTPS listen address.
    pub listen: Option<SocketAddr>,
    /// Clock skew tolerated on node JWTs, seconds.
    #[serde(default = "default_leeway")]
    pub jwt_leeway_secs: u64,
    /// How often relays heartbeat, seconds (informational).
    #[serde(default = "default_hb_interval")]
    pub heartbeat_interval_secs: u64,
    /// Heartbeat silence after which a relay is unhealthy, seconds.
    #[serde(default = "default_hb_timeout")]
    pub heartbeat_timeout_secs: u64,
    /// Relays per link (primary + backups).
    #[serde(default = "default_relays_per_link")]
    pub relays_per_link: usize,
    /// Lifetime of issued relay certificates, seconds.
    #[serde(default = "default_relay_cert_ttl")]
    pub relay_cert_ttl_secs: u64,
    /// The SPIFFE trust domain (see [`ControllerConfig::trust_domain`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_domain: Option<String>,
    /// Lifetime of agents' X.509-SVIDs, seconds.
    #[serde(default = "default_agent_svid_ttl")]
    pub agent_svid_ttl_secs: u64,
    /// Lifetime of grants, seconds.
    #[serde(default = "default_grant_ttl")]
    pub grant_ttl_secs: u64,
    /// Per-link relay buffer, bytes.
    #[serde(default = "default_buffer_limit")]
    pub link_buffer_limit: u64,
    /// Days audit records are kept (0: forever).
    #[serde(default = "default_audit_retention")]
    pub audit_retention_days: u64,
    /// Days flow records are kept (0: until `flow_log_max_records`).
    #[serde(default = "default_flow_log_days")]
    pub flow_log_days: u64,
    /// The most flow records kept.
    #[serde(default = "default_flow_log_max")]
    pub flow_log_max_records: u64,
    /// HTTPS connections open at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// HTTPS connections open at once from one IPv4 address or IPv6 /64.
    #[serde(default = "default_max_connections_per_source")]
    pub max_connections_per_source: usize,
    /// Seconds a connection may take to complete a TLS handshake or a
    /// request head.
    #[serde(default = "default_http_idle_timeout")]
    pub http_idle_timeout_secs: u64,
    /// Failed authentications an address may make at once before it is
    /// refused with 429 (then one a second).
    #[serde(default = "default_auth_failures_per_source")]
    pub auth_failures_per_source: u32,
    /// Seconds a console session lasts.
    #[serde(default = "default_console_session")]
    pub console_session_secs: u64,
    /// HTTPS certificate chain (PEM).
    #[serde(default = "tls_cert_default")]
    pub tls_cert: PathBuf,
    /// HTTPS private key (PEM).
    #[serde(default = "tls_key_default")]
    pub tls_key: PathBuf,
    /// The CA nodes pin.
    #[serde(default = "ca_default")]
    pub ca: PathBuf,
    /// The relay CA certificate.
    #[serde(default = "relay_ca_cert_default")]
    pub relay_ca_cert: PathBuf,
    /// The relay CA key.
    #[serde(default = "relay_ca_key_default")]
    pub relay_ca_key: PathBuf,
    /// The operator's upstream CA, if the file exists.
    #[serde(default = "upstream_ca_default")]
    pub upstream_ca: PathBuf,
    /// The authority key.
    #[serde(default = "authority_key_default")]
    pub authority_key: PathBuf,
    /// The SQLite database.
    #[serde(default = "database_default")]
    pub database: PathBuf,
}

fn tls_cert_default() -> PathBuf {
    path_default("tls.crt")
}
fn tls_key_default() -> PathBuf {
    path_default("tls.key")
}
fn ca_default() -> PathBuf {
    path_default("ca.pem")
}
fn relay_ca_cert_default() -> PathBuf {
    path_default("relay-ca.pem")
}
fn relay_ca_key_default() -> PathBuf {
    path_default("relay-ca.key")
}
fn upstream_ca_default() -> PathBuf {
    path_default("upstream-ca.pem")
}
fn authority_key_default() -> PathBuf {
    path_default("authority.key")
}
fn database_default() -> PathBuf {
    path_default("controller.db")
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            public_url: default_public_url(),
            listen: None,
            jwt_leeway_secs: default_leeway(),
            heartbeat_interval_secs: default_hb_interval(),
            heartbeat_timeout_secs: default_hb_timeout(),
            relays_per_link: default_relays_per_link(),
            relay_cert_ttl_secs: default_relay_cert_ttl(),
            grant_ttl_secs: default_grant_ttl(),
            trust_domain: None,
            agent_svid_ttl_secs: default_agent_svid_ttl(),
            link_buffer_limit: default_buffer_limit(),
            audit_retention_days: default_audit_retention(),
            flow_log_days: default_flow_log_days(),
            flow_log_max_records: default_flow_log_max(),
            max_connections: default_max_connections(),
            max_connections_per_source: default_max_connections_per_source(),
            http_idle_timeout_secs: default_http_idle_timeout(),
            auth_failures_per_source: default_auth_failures_per_source(),
            console_session_secs: default_console_session(),
            tls_cert: tls_cert_default(),
            tls_key: tls_key_default(),
            ca: ca_default(),
            relay_ca_cert: relay_ca_cert_default(),
            relay_ca_key: relay_ca_key_default(),
            upstream_ca: upstream_ca_default(),
            authority_key: authority_key_default(),
            database: database_default(),
        }
    }
}

/// A `public_url` that [`parse_public_url`] refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PublicUrlError {
    /// Another scheme than `https://`.
    #[error("`{url}` must start with https://")]
    NotHttps {
        /// The URL given.
        url: String,
    },
    /// A path, user, query, fragment or blank in the URL, or no host.
    #[error("`{url}` must be https://HOST[:PORT] with no path, user or query")]
    NotBare {
        /// The URL given.
        url: String,
    },
    /// `[` without `]`.
    #[error("`{url}`: unclosed [ in the host")]
    UnclosedBracket {
        /// The URL given.
        url: String,
    },
    /// Something in `[]` that is not an IPv6 address.
    #[error("`{url}`: `{host}` is not an IPv6 address")]
    NotIpv6 {
        /// The URL given.
        url: String,
        /// What stood in the brackets.
        host: String,
    },
    /// A port that is not 1 to 65535.
    #[error("`{url}`: the port must be 1 to 65535")]
    BadPort {
        /// The URL given.
        url: String,
    },
    /// A host that is neither a DNS name nor an IP address.
    #[error("`{url}`: `{host}` is not a valid host name or IP address")]
    BadHost {
        /// The URL given.
        url: String,
        /// The host.
        host: String,
    },
}

/// The host and port of an `https://host[:port][/]` URL (host without
/// IPv6 brackets; port 443 if absent).
pub fn parse_public_url(url: &str) -> Result<(String, u16), PublicUrlError> {
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| PublicUrlError::NotHttps {
            url: url.to_owned(),
        })?;
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty()
        || authority.bytes().any(|c| {
            matches!(c, b'/' | b'@' | b'?' | b'#')
                || c.is_ascii_whitespace()
                || c.is_ascii_control()
        })
    {
        return Err(PublicUrlError::NotBare {
            url: url.to_owned(),
        });
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| PublicUrlError::UnclosedBracket {
                url: url.to_owned(),
            })?;
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(PublicUrlError::NotIpv6 {
                url: url.to_owned(),
                host: host.to_owned(),
            });
        }
        (host, after.strip_prefix(':'))
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port =
        match port {
            None => 443,
            Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| {
                PublicUrlError::BadPort {
                    url: url.to_owned(),
                }
            })?,
        };
    if !crate::pki::valid_host(host) {
        return Err(PublicUrlError::BadHost {
            url: url.to_owned(),
            host: host.to_owned(),
        });
    }
    Ok((host.to_owned(), port))
}

/// A value of `controller.toml` out of range: [`ControllerConfig::check`]
/// names the key, what it must be, and where to change it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// `public_url` does not parse.
    #[error("public_url: {0}")]
    PublicUrl(#[from] PublicUrlError),
    /// `jwt_leeway_secs` above 300.
    #[error("jwt_leeway_secs must be at most 300")]
    JwtLeeway,
    /// `heartbeat_interval_secs` of 0.
    #[error("heartbeat_interval_secs must be at least 1")]
    HeartbeatInterval,
    /// `heartbeat_timeout_secs` not above `heartbeat_interval_secs`.
    #[error("heartbeat_timeout_secs ({timeout}) must exceed heartbeat_interval_secs ({interval})")]
    HeartbeatTimeout {
        /// `heartbeat_timeout_secs`.
        timeout: u64,
        /// `heartbeat_interval_secs`.
        interval: u64,
    },
    /// `relays_per_link` out of range.
    #[error("relays_per_link must be 1 to {MAX_GRANT_RELAYS}")]
    RelaysPerLink,
    /// `relay_cert_ttl_secs` below 300.
    #[error("relay_cert_ttl_secs must be at least 300")]
    RelayCertTtl,
    /// `trust_domain` is no SPIFFE trust domain.
    #[error("trust_domain `{domain}`: {why}")]
    TrustDomain {
        /// The value.
        domain: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// `agent_svid_ttl_secs` out of range.
    #[error("agent_svid_ttl_secs must be 300 to 2592000 (30 days)")]
    AgentSvidTtl,
    /// `grant_ttl_secs` out of range.
    #[error("grant_ttl_secs must be 60 to 315360000 (ten years)")]
    GrantTtl,
    /// `link_buffer_limit` of 0.
    #[error("link_buffer_limit must be at least 1")]
    LinkBufferLimit,
    /// `max_connections` or `max_connections_per_source` out of range.
    #[error(
        "max_connections must be 1 to 1000000 and max_connections_per_source 1 to max_connections \
         (got {max} and {per_source})"
    )]
    Connections {
        /// `max_connections`.
        max: usize,
        /// `max_connections_per_source`.
        per_source: usize,
    },
    /// `http_idle_timeout_secs` out of range.
    #[error("http_idle_timeout_secs must be 1 to 300")]
    IdleTimeout,
    /// `auth_failures_per_source` out of range.
    #[error("auth_failures_per_source must be 1 to 1000000")]
    AuthFailures,
    /// `flow_log_max_records` out of range.
    #[error("flow_log_max_records must be 1000 to 100000000")]
    FlowLogMax,
    /// `console_session_secs` out of range.
    #[error("console_session_secs must be 1 to 604800")]
    ConsoleSession,
}

/// The trust domain of a controller at `public_url` whose configuration
/// names none: the URL's host if it is a DNS name, else `comsat.internal`.
pub fn default_trust_domain(public_url: &str) -> String {
    parse_public_url(public_url)
        .ok()
        .map(|(host, _)| host.to_ascii_lowercase())
        .filter(|host| {
            host.parse::<IpAddr>().is_err()
                && host != "localhost"
                && comsat_protocol::spiffe::check_trust_domain(host).is_ok()
        })
        .unwrap_or_else(|| "comsat.internal".to_owned())
}

/// Whether `host` is `localhost` or a loopback IP.
pub fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

impl ControllerConfig {
    /// The SPIFFE trust domain: `trust_domain`, or
    /// [`default_trust_domain`] of `public_url`.
    pub fn trust_domain(&self) -> String {
        self.trust_domain
            .clone()
            .unwrap_or_else(|| default_trust_domain(&self.public_url))
    }

    /// Reads and checks `DIR/controller.toml`, making its paths absolute.
    pub fn load(dir: &Path) -> Result<Self, ControllerError> {
        let path = dir.join(CONFIG_FILE);
        if !path.exists() {
            return Err(ControllerError::NotInitialised {
                dir: dir.to_owned(),
                path,
            });
        }
        let text = {
            use std::io::Read;
            let file = std::fs::File::open(&path).map_err(ControllerError::io(&path))?;
            let mut text = String::new();
            file.take(MAX_CONFIG_LEN + 1)
                .read_to_string(&mut text)
                .map_err(ControllerError::io(&path))?;
            if text.len() as u64 > MAX_CONFIG_LEN {
                return Err(ControllerError::Config {
                    path,
                    message: format!("larger than {MAX_CONFIG_LEN} bytes"),
                });
            }
            text
        };
        let mut config: Self = toml::from_str(&text).map_err(|e| ControllerError::Config {
            path: path.clone(),
            message: e.to_string(),
        })?;
        config.check().map_err(|e| ControllerError::Config {
            path: path.clone(),
            message: e.to_string(),
        })?;
        // Resolved once: every SPIFFE ID the controller names uses it.
        config.trust_domain = Some(config.trust_domain());
        for p in [
            &mut config.tls_cert,
            &mut config.tls_key,
            &mut config.ca,
            &mut config.relay_ca_cert,
            &mut config.relay_ca_key,
            &mut config.upstream_ca,
            &mut config.authority_key,
            &mut config.database,
        ] {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
        Ok(config)
    }

    /// Checks values; the error names the key and the allowed range.
    pub fn check(&self) -> Result<(), ConfigError> {
        parse_public_url(&self.public_url)?;
        if let Some(domain) = &self.trust_domain {
            comsat_protocol::spiffe::check_trust_domain(domain).map_err(|why| {
                ConfigError::TrustDomain {
                    domain: domain.clone(),
                    why,
                }
            })?;
        }
        if !(300..=30 * 86_400).contains(&self.agent_svid_ttl_secs) {
            return Err(ConfigError::AgentSvidTtl);
        }
        if self.jwt_leeway_secs > 300 {
            return Err(ConfigError::JwtLeeway);
        }
        if self.heartbeat_interval_secs == 0 {
            return Err(ConfigError::HeartbeatInterval);
        }
        if self.heartbeat_timeout_secs <= self.heartbeat_interval_secs {
            return Err(ConfigError::HeartbeatTimeout {
                timeout: self.heartbeat_timeout_secs,
                interval: self.heartbeat_interval_secs,
            });
        }
        if !(1..=MAX_GRANT_RELAYS).contains(&self.relays_per_link) {
            return Err(ConfigError::RelaysPerLink);
        }
        if self.relay_cert_ttl_secs < 300 {
            return Err(ConfigError::RelayCertTtl);
        }
        if !(60..=10 * 365 * 86_400).contains(&self.grant_ttl_secs) {
            return Err(ConfigError::GrantTtl);
        }
        if self.link_buffer_limit == 0 {
            return Err(ConfigError::LinkBufferLimit);
        }
        let (max, per_source) = (self.max_connections, self.max_connections_per_source);
        if !(1..=1_000_000).contains(&max) || !(1..=max).contains(&per_source) {
            return Err(ConfigError::Connections { max, per_source });
        }
        if !(1..=300).contains(&self.http_idle_timeout_secs) {
            return Err(ConfigError::IdleTimeout);
        }
        if !(1..=1_000_000).contains(&self.auth_failures_per_source) {
            return Err(ConfigError::AuthFailures);
        }
        if !(1_000..=100_000_000).contains(&self.flow_log_max_records) {
            return Err(ConfigError::FlowLogMax);
        }
        if !(1..=604_800).contains(&self.console_session_secs) {
            return Err(ConfigError::ConsoleSession);
        }
        Ok(())
    }

    /// The listen address: `listen`, or derived from `public_url`.
    pub fn listen_addr(&self) -> SocketAddr {
        if let Some(addr) = self.listen {
            return addr;
        }
        let (host, port) =
            parse_public_url(&self.public_url).unwrap_or_else(|_| ("127.0.0.1".into(), 8443));
        let ip = if is_loopback_host(&host) {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        };
        SocketAddr::new(ip, port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_default_ports() {
        assert_eq!(
            parse_public_url("https://c.example.com:9443/"),
            Ok(("c.example.com".into(), 9443))
        );
        assert_eq!(
            parse_public_url("https://10.0.0.1"),
            Ok(("10.0.0.1".into(), 443))
        );
        assert_eq!(
            parse_public_url("https://[::1]:8443"),
            Ok(("::1".into(), 8443))
        );
        for bad in [
            "http://x:1",
            "https://",
            "https://x:0",
            "https://x:1/path",
            "https://u@x:1",
            "https://x y:1",
            "https://[zz]:1",
        ] {
            assert!(parse_public_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn listen_defaults_follow_the_url() {
        let mut c = ControllerConfig::default();
        assert_eq!(c.listen_addr(), "127.0.0.1:8443".parse().expect("addr"));
        c.public_url = "https://localhost:9000".into();
        assert_eq!(c.listen_addr(), "127.0.0.1:9000".parse().expect("addr"));
        c.public_url = "https://c.example.com".into();
        assert_eq!(c.listen_addr(), "0.0.0.0:443".parse().expect("addr"));
        c.listen = Some("10.0.0.1:1".parse().expect("addr"));
        assert_eq!(c.listen_addr(), "10.0.0.1:1".parse().expect("addr"));
    }

    #[test]
    fn the_trust_domain_is_set_or_follows_a_dns_host() {
        let mut c = ControllerConfig::default();
        assert_eq!(c.trust_domain(), "comsat.internal");
        c.public_url = "https://Ctl.Example.com:9443".into();
        assert_eq!(c.trust_domain(), "ctl.example.com");
        c.trust_domain = Some("site-a.example".into());
        assert_eq!(c.trust_domain(), "site-a.example");
        assert_eq!(c.check(), Ok(()));
        c.trust_domain = Some("Site A".into());
        let err = c.check().expect_err("not a trust domain");
        assert!(err.to_string().contains("trust_domain `Site A`"), "{err}");
        c.trust_domain = None;
        c.agent_svid_ttl_secs = 10;
        assert_eq!(c.check(), Err(ConfigError::AgentSvidTtl));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(CONFIG_FILE), "public_urll = \"x\"\n").expect("write");
        let err = ControllerConfig::load(dir.path()).expect_err("unknown key");
        assert!(err.to_string().contains("public_urll"), "{err}");
        std::fs::write(dir.path().join(CONFIG_FILE), "relays_per_link = 0\n").expect("write");
        let err = ControllerConfig::load(dir.path()).expect_err("bad value");
        assert!(err.to_string().contains("relays_per_link"), "{err}");
        std::fs::write(dir.path().join(CONFIG_FILE), "").expect("write");
        let c = ControllerConfig::load(dir.path()).expect("defaults");
        assert_eq!(c.database, dir.path().join("controller.db"));
    }
}
