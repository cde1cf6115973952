//! The relay configuration file (TOML).
//!
//! ```toml
//! # The relay's id, as named in grants (32 hex digits).
//! relay_id = "9f0c..."
//! # UDP address for QUIC.
//! listen = "0.0.0.0:4433"
//! # Optional: a second QUIC listener for interactive links, served by a
//! # thread of its own (see below).
//! interactive_listen = "0.0.0.0:4434"
//! # Optional: how much nicer than the process the main threads are while
//! # the interactive listener runs (0 to 19; 0: the same). Default 5.
//! bulk_nice = 5
//! # Admin HTTP (metrics, health): keep it on loopback.
//! admin = "127.0.0.1:9101"
//! # Server certificate chain and private key (PEM). The key file must be
//! # mode 0600. A new certificate written over tls_cert (renewal) is
//! # served to new connections within a second, without a restart. The QUIC stateless-reset and connection-id keys derive from
//! # it (each listener its own), so a relay restarted with the same key
//! # makes its agents notice the restart at once.
//! tls_cert = "relay.crt"
//! tls_key = "relay.key"
//! # The authority's ed25519 public key (64 hex digits); grants must be
//! # signed by it.
//! authority_public_key = "3b6a..."
//! # Directory of signed grant files (`*.grant`), watched for changes.
//! grants_dir = "grants"
//!
//! [limits]              # all optional
//! auth_timeout_ms = 5000      # first packet to Hello, at most
//! hello_timeout_ms = 2000     # end of the QUIC handshake to Hello
//! max_unauthenticated = 256
//! max_unauthenticated_per_source = 32   # per IPv4 address or IPv6 /64
//! retry_above = 64            # unauthenticated connections at which new ones must pass a QUIC Retry (0: always)
//! max_connections = 10000
//! max_connections_per_node = 16   # authenticated connections of one node key
//! connection_receive_window = 16777216
//! stream_receive_window = 2097152
//! max_streams_per_connection = 1024
//! idle_timeout_ms = 60000
//! buffer_budget = 268435456    # bytes held for absent peers and agents' control queues, all links
//! max_links = 100000           # links with a side attached, at once
//! metrics_max_links = 100      # links with /metrics series of their own
//!
//! [drain]               # optional
//! grace_secs = 30       # SIGTERM: how long to wait for links to move
//! ```
//!
//! Relative paths are relative to the directory of the config file.
//!
//! ## Interactive listener
//!
//! Every connection of the main listener is served by the relay's main
//! threads, where a link that moves bulk data keeps them busy; a
//! request/response link waits behind that work. Connections that arrive
//! at `interactive_listen` are served by one thread of their own
//! (`comsat-lane`), with the same grants, limits and certificate. Agents
//! keep lanes there for all their links (below); a link can also be put
//! there for good: its relays pointed there on both agents and a
//! `connection` name (agent config). On the bench's 2-core machine a ping
//! beside a bulk flow took p50 ~5 ms / p99 ~16–20 ms sharing everything,
//! ~0.3 ms / 3–7 ms this way. Do not name a connection for bulk links:
//! one thread carries all of them (a lane moves bulk flows off itself). A relay enrolled with
//! a controller runs it when enrolled with `--interactive-port PORT`
//! (listening on that port, reported to the controller as the host of its
//! public address and that port), and agents get the address with the
//! links created with `--connection`.
//!
//! Agents also keep a *lane* there for their other links (their
//! `lane_addr`; enrolled agents get it for every link on a relay with an
//! interactive listener): a second connection that attaches each link
//! with `AttachLane` (checked like an attach; it carries flows only, no
//! peer frames, and never pairs a link). Flows start on it and move to the
//! main connection when they turn bulk; a flow that arrives on a lane goes
//! on to the peer's lane where the peer has one. So each agent with flows
//! running holds two connections per relay (idle ones close their lane):
//! count them in `limits.max_connections`.
//! `comsat_relay_lane_flows_total` counts flow streams that came on lanes.
//!
//! A lane's thread still waits for a CPU while the main threads hold every
//! core with bulk. So while the interactive listener runs, the main
//! threads of `comsat relay run` take `bulk_nice` (default 5) more
//! niceness than the process (raising niceness needs no privilege; the
//! lane's thread keeps the process's own), and the kernel runs the lane's
//! thread first when it wakes: on the bench's 2-core machine the p99 of a
//! ping beside a bulk flow went from ~5–6 ms to ~1–3 ms. Bulk is not slowed
//! while the CPUs have room; on a machine whose CPUs are full, the main
//! threads get a smaller share against other processes too (weight 335
//! against 1,024 at 5): set `bulk_nice = 0` to keep them equal (an enrolled
//! relay: `comsat relay run --bulk-nice 0`).
//!
//! ## Reload
//!
//! The relay re-reads this file on SIGHUP (`systemctl reload`) and when it
//! changes on disk. A file that does not parse, names an unusable
//! certificate, or changes a setting that needs a restart (`relay_id`,
//! `listen`, `interactive_listen`, `bulk_nice`, `admin`, `authority_public_key`, `grants_dir`,
//! `dangerous_tap_file`) is refused with an error in the log and the
//! `comsat_relay_config_reloads_total{result="refused"}` counter; the
//! configuration in force stays. Accepted changes apply at once: limits to
//! the next connection, attach or flow; QUIC windows, stream counts and the
//! idle timeout to new connections; `tls_cert`/`tls_key` to new
//! handshakes. Open connections and flows are never dropped by a reload.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use comsat_protocol::{RelayId, SignPublicKey};
use serde::Deserialize;

use crate::defaults;
use crate::error::RelayError;

fn default_bulk_nice() -> u8 {
    defaults::BULK_NICE
}

/// Largest config file read.
pub const MAX_CONFIG_LEN: u64 = 1024 * 1024;

/// The relay configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RelayConfig {
    /// This relay's id as named in grants.
    pub relay_id: RelayId,
    /// UDP address to serve QUIC on.
    pub listen: SocketAddr,
    /// A second UDP address for interactive links, served by a thread of
    /// its own (see the module docs).
    pub interactive_listen: Option<SocketAddr>,
    /// Niceness the main threads take above the process's own while the
    /// interactive listener runs (0 to 19; see the module docs).
    #[serde(default = "default_bulk_nice")]
    pub bulk_nice: u8,
    /// Admin HTTP address (`/metrics`, `/healthz`, `/readyz`).
    pub admin: Option<SocketAddr>,
    /// PEM certificate chain.
    pub tls_cert: PathBuf,
    /// PEM private key (mode 0600).
    pub tls_key: PathBuf,
    /// The authority public key that signs grants.
    pub authority_public_key: SignPublicKey,
    /// Directory of `*.grant` files.
    pub grants_dir: PathBuf,
    /// Limits and tuning.
    #[serde(default)]
    pub limits: Limits,
    /// How the relay drains on SIGTERM.
    #[serde(default)]
    pub drain: Drain,
    /// For tests only: append every byte the relay forwards between agents
    /// to this file. It only ever sees ciphertext; the end-to-end tests use
    /// it to prove so.
    pub dangerous_tap_file: Option<PathBuf>,
}

/// Limits and QUIC tuning; see [`crate::defaults`] for the reasons.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct Limits {
    /// Milliseconds an agent has to authenticate.
    pub auth_timeout_ms: u64,
    /// Milliseconds from the end of the QUIC handshake to a verified
    /// `Hello`.
    pub hello_timeout_ms: u64,
    /// Unauthenticated connections at once.
    pub max_unauthenticated: usize,
    /// Unauthenticated connections from one IPv4 address or IPv6 /64.
    pub max_unauthenticated_per_source: usize,
    /// Unauthenticated connections at which new ones must prove their
    /// address with a QUIC Retry (0: always).
    pub retry_above: usize,
    /// Authenticated connections at once.
    pub max_connections: usize,
    /// Authenticated connections of one node key at once.
    pub max_connections_per_node: usize,
    /// QUIC connection receive window, bytes.
    pub connection_receive_window: u32,
    /// QUIC stream receive window, bytes.
    pub stream_receive_window: u32,
    /// Concurrent flow streams per agent connection, at most (the credit
    /// starts lower and grows with use).
    pub max_streams_per_connection: u32,
    /// Idle timeout, milliseconds.
    pub idle_timeout_ms: u64,
    /// Bytes held for parked flows (peer away) and queued on agents'
    /// control streams, all links and agents together.
    pub buffer_budget: u64,
    /// Links with at least one side attached, at once; an attach beyond is
    /// refused (`relay_full`) and the agent tries the next relay.
    pub max_links: usize,
    /// Links with `/metrics` series of their own (the rest are summed).
    pub metrics_max_links: usize,
}

/// Draining: what SIGTERM and `comsat relay drain` do.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct Drain {
    /// Seconds to wait for attached links to move to their next relay
    /// before exiting anyway.
    pub grace_secs: u64,
}

impl Default for Drain {
    fn default() -> Self {
        Self {
            grace_secs: defaults::DRAIN_GRACE.as_secs(),
        }
    }
}

impl Drain {
    /// The grace period.
    pub fn grace(&self) -> Duration {
        Duration::from_secs(self.grace_secs)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            auth_timeout_ms: defaults::AUTH_TIMEOUT.as_millis() as u64,
            hello_timeout_ms: defaults::HELLO_TIMEOUT.as_millis() as u64,
            max_unauthenticated: defaults::MAX_UNAUTHENTICATED,
            max_unauthenticated_per_source: defaults::MAX_UNAUTHENTICATED_PER_SOURCE,
            retry_above: defaults::RETRY_ABOVE,
            max_connections: defaults::MAX_CONNECTIONS,
            max_connections_per_node: defaults::MAX_CONNECTIONS_PER_NODE,
            connection_receive_window: defaults::CONNECTION_RECEIVE_WINDOW,
            stream_receive_window: defaults::STREAM_RECEIVE_WINDOW,
            max_streams_per_connection: defaults::MAX_STREAMS_PER_CONNECTION,
            idle_timeout_ms: defaults::IDLE_TIMEOUT.as_millis() as u64,
            buffer_budget: defaults::BUFFER_BUDGET,
            max_links: defaults::MAX_LINKS,
            metrics_max_links: defaults::METRICS_MAX_LINKS,
        }
    }
}

impl Limits {
    /// The authentication deadline.
    pub fn auth_timeout(&self) -> Duration {
        Duration::from_millis(self.auth_timeout_ms)
    }

    /// The `Hello` deadline after the QUIC handshake.
    pub fn hello_timeout(&self) -> Duration {
        Duration::from_millis(self.hello_timeout_ms)
    }
}

impl RelayConfig {
    /// A configuration with the required fields and default limits.
    pub fn new(
        relay_id: RelayId,
        listen: SocketAddr,
        tls_cert: PathBuf,
        tls_key: PathBuf,
        authority_public_key: SignPublicKey,
        grants_dir: PathBuf,
    ) -> Self {
        Self {
            relay_id,
            listen,
            interactive_listen: None,
            bulk_nice: defaults::BULK_NICE,
            admin: None,
            tls_cert,
            tls_key,
            authority_public_key,
            grants_dir,
            limits: Limits::default(),
            drain: Drain::default(),
            dangerous_tap_file: None,
        }
    }

    /// Reads and checks a config file; relative paths in it are resolved
    /// against its directory.
    pub fn load(path: &Path) -> Result<Self, RelayError> {
        let text = read_limited(path)?;
        let mut config: Self = toml::from_str(&text).map_err(|e| RelayError::Config {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut config.tls_cert,
            &mut config.tls_key,
            &mut config.grants_dir,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if let Some(tap) = &mut config.dangerous_tap_file
            && tap.is_relative()
        {
            *tap = base.join(&*tap);
        }
        if config.interactive_listen == Some(config.listen) {
            return Err(RelayError::Config {
                path: path.to_owned(),
                reason: format!(
                    "interactive_listen is listen ({}): give it a port of its own, or remove it",
                    config.listen
                ),
            });
        }
        if config.bulk_nice > 19 {
            return Err(RelayError::Config {
                path: path.to_owned(),
                reason: format!(
                    "bulk_nice is {}: niceness goes from 0 (as the process) to 19",
                    config.bulk_nice
                ),
            });
        }
        if config.limits.max_unauthenticated == 0
            || config.limits.max_unauthenticated_per_source == 0
            || config.limits.hello_timeout_ms == 0
            || config.limits.max_connections == 0
            || config.limits.max_connections_per_node == 0
            || config.limits.max_links == 0
        {
            return Err(RelayError::Config {
                path: path.to_owned(),
                reason: "limits.max_unauthenticated, limits.max_unauthenticated_per_source, \
                         limits.hello_timeout_ms, limits.max_connections, \
                         limits.max_connections_per_node and limits.max_links \
                         must be at least 1"
                    .into(),
            });
        }
        if config.limits.idle_timeout_ms == 0 {
            return Err(RelayError::Config {
                path: path.to_owned(),
                reason: "limits.idle_timeout_ms must be at least 1 (60000 unless set)".into(),
            });
        }
        if Duration::from_millis(config.limits.idle_timeout_ms) < defaults::WARN_IDLE_TIMEOUT {
            tracing::warn!(
                idle_timeout_ms = config.limits.idle_timeout_ms,
                "limits.idle_timeout_ms is under 30000: idle agents that keep alive every 25 s (their default) are cut off between keep-alives; give them a shorter --keep-alive or raise it"
            );
        }
        Ok(config)
    }

    /// The settings that only a restart can change, named, when `self`
    /// and `new` differ in them.
    pub fn restart_only_changes(&self, new: &Self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.relay_id != new.relay_id {
            out.push("relay_id");
        }
        if self.listen != new.listen {
            out.push("listen");
        }
        if self.interactive_listen != new.interactive_listen {
            out.push("interactive_listen");
        }
        if self.bulk_nice != new.bulk_nice {
            out.push("bulk_nice");
        }
        if self.admin != new.admin {
            out.push("admin");
        }
        if self.authority_public_key != new.authority_public_key {
            out.push("authority_public_key");
        }
        if self.grants_dir != new.grants_dir {
            out.push("grants_dir");
        }
        if self.dangerous_tap_file != new.dangerous_tap_file {
            out.push("dangerous_tap_file");
        }
        out
    }
}

fn read_limited(path: &Path) -> Result<String, RelayError> {
    use std::io::Read;
    let io = |source| RelayError::Io {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut text = String::new();
    file.take(MAX_CONFIG_LEN + 1)
        .read_to_string(&mut text)
        .map_err(io)?;
    if text.len() as u64 > MAX_CONFIG_LEN {
        return Err(RelayError::Config {
            path: path.to_owned(),
            reason: format!("file is larger than {MAX_CONFIG_LEN} bytes"),
        });
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_field_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("relay.toml");
        std::fs::write(
            &path,
            format!(
                "relay_id = \"{}\"\nlisten = \"127.0.0.1:1\"\ntls_cert = \"c\"\ntls_key = \"k\"\n\
                 authority_public_key = \"{}\"\ngrants_dir = \"g\"\nlisten_port = 3\n",
                "00".repeat(16),
                "11".repeat(32)
            ),
        )
        .expect("write");
        let err = RelayConfig::load(&path).expect_err("unknown field");
        let msg = err.to_string();
        assert!(
            msg.contains("listen_port") && msg.contains("relay.toml"),
            "{msg}"
        );
    }

    #[test]
    fn relative_paths_resolve_against_config_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("relay.toml");
        std::fs::write(
            &path,
            format!(
                "relay_id = \"{}\"\nlisten = \"127.0.0.1:1\"\ntls_cert = \"c\"\ntls_key = \"/abs/k\"\n\
                 authority_public_key = \"{}\"\ngrants_dir = \"g\"\n",
                "00".repeat(16),
                "11".repeat(32)
            ),
        )
        .expect("write");
        let c = RelayConfig::load(&path).expect("load");
        assert_eq!(c.tls_cert, dir.path().join("c"));
        assert_eq!(c.tls_key, PathBuf::from("/abs/k"));
    }

    #[test]
    fn interactive_listen_is_optional_and_not_listen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("relay.toml");
        let write = |extra: &str| {
            std::fs::write(
                &path,
                format!(
                    "relay_id = \"{}\"\nlisten = \"127.0.0.1:4433\"\ntls_cert = \"c\"\n\
                     tls_key = \"k\"\nauthority_public_key = \"{}\"\ngrants_dir = \"g\"\n{extra}",
                    "00".repeat(16),
                    "11".repeat(32)
                ),
            )
            .expect("write");
        };
        write("");
        let c = RelayConfig::load(&path).expect("load");
        assert_eq!(c.interactive_listen, None);
        write("interactive_listen = \"127.0.0.1:4434\"\n");
        let c = RelayConfig::load(&path).expect("load");
        assert_eq!(
            c.interactive_listen,
            Some("127.0.0.1:4434".parse().expect("addr"))
        );
        let mut moved = c.clone();
        moved.interactive_listen = None;
        assert_eq!(c.restart_only_changes(&moved), ["interactive_listen"]);
        write("interactive_listen = \"127.0.0.1:4433\"\n");
        let err = RelayConfig::load(&path).expect_err("same as listen");
        assert!(err.to_string().contains("port of its own"), "{err}");
        // The main threads' niceness: 5 unless set, 0 to 19, restart only.
        assert_eq!(c.bulk_nice, 5);
        write("interactive_listen = \"127.0.0.1:4434\"\nbulk_nice = 0\n");
        let c0 = RelayConfig::load(&path).expect("load");
        assert_eq!(c0.bulk_nice, 0);
        assert_eq!(c.restart_only_changes(&c0), ["bulk_nice"]);
        write("bulk_nice = 20\n");
        let err = RelayConfig::load(&path).expect_err("too nice");
        assert!(err.to_string().contains("bulk_nice is 20"), "{err}");
    }
}
