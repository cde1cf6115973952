//! The agent configuration file (TOML).
//!
//! ```toml
//! node_id = "5d1e..."              # 32 hex digits, as named in grants
//! signing_key = "node.key"         # ed25519 key file (mode 0600)
//! noise_key = "noise.key"          # X25519 key file (mode 0600)
//! admin = "127.0.0.1:9201"         # optional: /metrics, /healthz, /readyz
//! flow_timeout_ms = 30000          # optional: outage a flow survives
//! lane_idle_ms = 30000             # optional: a lane without flows closes
//! keep_alive_ms = 25000            # optional: 1 s to 300 s, see defaults
//! bulk_nice = 5                    # optional: 0 to 19, see "The lane"
//! # Optional, for tests of rekeying only: a record key seals at most
//! # 2^rekey_records_log2 records (2 to 20, default 20), and a generation
//! # of flow ids holds 2^flow_ids_log2 - 1 flows (2 to 22, default 22).
//! # Both agents of a link use the lower of their values.
//! # rekey_records_log2 = 20
//! # flow_ids_log2 = 22
//! # Also for tests only: messages that fail to decrypt under one session
//! # before it is replaced (1 to 65536, default 65536).
//! # max_forgeries = 65536
//!
//! [[links]]
//! name = "db"
//! link_id = "0a7c..."              # 32 hex digits
//! generation = 1
//! side = "a"                       # "a" or "b"
//! peer_noise_public_key = "9e2f..."  # 64 hex digits
//! listen = "tcp://127.0.0.1:7000"  # or "unix:///run/app/db.sock";
//! # target = "tcp://127.0.0.1:5432" # exactly one of listen / target
//! allowed_uids = [1000]            # unix listeners: allowed peer uids
//! allowed_gids = []                # unix listeners: allowed peer gids
//! allow = ["unix:path:/usr/bin/app unix:uid:1000"] # listeners: workloads
//!                                  # admitted (comsat_protocol::workload)
//! connection = "interactive"       # optional: a connection (and thread)
//!                                  # apart from unnamed links; see below
//! [[links.relays]]                # in order of preference, as in the grant
//! addr = "relay.example.net:4433"
//! server_name = "relay.example.net" # name in the relay certificate
//! ca_file = "ca.pem"               # pin by CA ...
//! # cert_sha256 = "ab12..."        # ... or by the certificate's SHA-256
//! relay_id = "8c1f..."             # optional: with ca_file, the relay
//!                                  # certificate must name this relay (as
//!                                  # the controller's and `comsat dev`'s do)
//! lane_addr = "relay.example.net:4434" # optional: the lane's address, the
//!                                  # relay's interactive listener or its
//!                                  # `addr` (see below)
//! [[links.relays]]                 # a backup, used while the first is down
//! addr = "relay2.example.net:4433"
//! server_name = "relay2.example.net"
//! ca_file = "ca.pem"
//! ```
//!
//! Links with the same relay list (and the same `connection`, if any)
//! share one QUIC connection, to the first relay of the list that
//! answers; both agents of a link follow the same order, so they meet on
//! the same relay. When the relay goes silent they
//! move to the next relay of the list; when the connection ends otherwise
//! they start again from the top; when every link's peer stays away
//! from the relay they are on (one agent cannot reach it), they try the next
//! relays in turn until they meet.
//!
//! **The lane.** Where a relay entry has a `lane_addr`, the agent keeps a
//! second QUIC connection beside the shared one, to that address, with a
//! UDP socket and a thread (`comsat-lane`) of its own here. Best is the
//! relay's `interactive_listen` address, which the relay serves from a
//! thread of its own too; a relay without one serves lanes at its main
//! listener (`lane_addr` = `addr`), which still keeps them out of the
//! shared connection's queues (on the bench's 2-core machine a ping beside
//! a bulk flow: p50 ~0.3–0.6 ms / p99 ~4–6.5 ms that way, ~5–8 / ~15–25 ms
//! without a lane). An enrolled agent gets a lane for every relay from its
//! controller: the interactive listener of a relay enrolled with
//! `--interactive-port`, else the relay's main listener. Flows start
//! there, so a request, a reply or a keystroke never waits behind the
//! bytes a bulk flow keeps in flight; a flow that carries more than
//! 1 MiB within 250 ms (either way) turns bulk and moves to the shared
//! connection, once, without losing or repeating a byte (it resumes on a
//! new stream there), and stays there. Nothing to configure per link. The
//! lane is up only while flows run (and `lane_idle_ms`, 30 s, after): idle
//! links cost one connection per relay, as without lanes; the first flow
//! of a burst opens it and starts on the shared connection, and a flow
//! that is not bulk moves to the lane once it is up. A busy lane costs a
//! second connection per relay (~40 KiB at the relay); one that is down or
//! refused costs nothing else: flows ride the shared connection. Metrics:
//! `comsat_agent_flows_moved_total`, `comsat_agent_lane_connects_total`,
//! `comsat_agent_lanes_open`, the relay's `comsat_relay_lane_flows_total`.
//!
//! The lane's thread still waits for a CPU while the main threads hold
//! every core with bulk. So once an agent (`comsat agent run`) has a link
//! with a lane or a `connection`, its main threads take `bulk_nice`
//! (default 5) more niceness than the process (no privilege needed; the
//! lane's thread keeps the process's own) and the kernel runs the lane's
//! thread first when it wakes. Bulk is not slowed while the CPUs have
//! room; on a box whose CPUs are full the agent's bulk gets a smaller
//! share against other processes too: `bulk_nice = 0` keeps it equal (an
//! enrolled agent: `comsat agent run --bulk-nice 0`).
//!
//! A link that must never share a connection with bulk flows, not even
//! while its own flows turn bulk or before a lane is up (a request/response
//! service beside a link that moves files, where the relay has no
//! interactive listener for lanes), can have a connection of its own:
//! give it a `connection` name, on both halves of the link (each
//! agent groups its own links). Links naming a connection ride a QUIC
//! connection of their own per relay, and are served, with their
//! listeners and flows, by one thread of their own (`comsat-lane`), apart
//! from the threads a bulk link keeps busy. Point their relays at the
//! relay's `interactive_listen` address, which the relay serves the same
//! way. On the bench's 2-core machine a ping beside a bulk flow took p50
//! ~5 ms / p99 ~16–20 ms sharing everything and ~0.3 ms / 3–7 ms this way.
//! Keep bulk links off named connections: one thread carries them all.
//! An enrolled agent gets both from its controller: links created with
//! `comsat ctl link create --connection NAME` come with the name and, for
//! relays enrolled with `--interactive-port`, that listener's address.
//! A running agent handed a link whose `connection` changed
//! ([`crate::Agent::apply`]) treats it as a new link: its flows reset.
//! Each name costs one more QUIC connection per relay (about 40 KiB at the
//! relay); at most [`MAX_CONNECTIONS`] names per agent.
//!
//! Relative paths are relative to the config file's directory. A listener
//! binds loopback or a Unix socket only: agents never accept connections
//! from the network.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use comsat_protocol::half::{LinkError, LinkHalf, LocalRole};
use comsat_protocol::noise;
use comsat_protocol::{NodeId, RelayId};
use serde::Deserialize;

use crate::defaults;
use crate::error::AgentError;

/// Largest config file read: room for [`MAX_LINKS`] links of two relays
/// each (a link with one relay takes ~420 bytes, so 10,000 take ~4 MiB).
pub const MAX_CONFIG_LEN: u64 = 16 * 1024 * 1024;

/// Most relays one link may name (as in grants).
pub const MAX_RELAYS_PER_LINK: usize = comsat_protocol::limits::MAX_GRANT_RELAYS;

/// Most links one agent config may hold.
pub const MAX_LINKS: usize = 10_000;

/// Most distinct `connection` names one agent config may use.
pub const MAX_CONNECTIONS: usize = 16;

/// Longest `connection` name.
pub use comsat_protocol::api::MAX_CONNECTION_NAME_LEN;

/// The agent configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct AgentConfig {
    /// This agent's id.
    pub node_id: NodeId,
    /// ed25519 key file.
    pub signing_key: PathBuf,
    /// X25519 Noise key file.
    pub noise_key: PathBuf,
    /// Admin HTTP address.
    pub admin: Option<SocketAddr>,
    /// Milliseconds a flow waits for its link to come back after an outage
    /// before its application sees a reset (default 30 s).
    pub flow_timeout_ms: Option<u64>,
    /// Milliseconds between keep-alives of an idle relay connection
    /// (default 25 s, 1 s to 300 s): shorter than the NAT in front of the
    /// agent keeps an idle UDP binding, and well under the relay's idle
    /// timeout (60 s by default).
    pub keep_alive_ms: Option<u64>,
    /// Milliseconds a lane stays up without flows before it closes
    /// (default 30 s; it opens again with the next flow).
    pub lane_idle_ms: Option<u64>,
    /// Niceness the main threads take above the process's own once a link
    /// has a lane or a connection of its own (0 to 19, default 5).
    pub bulk_nice: Option<u8>,
    /// A record key seals at most `2^rekey_records_log2` records (default
    /// and most 20): lower only to test rekeying.
    pub rekey_records_log2: Option<u8>,
    /// A generation of flow ids holds `2^flow_ids_log2 - 1` flows (default
    /// and most 22): lower only to test new generations.
    pub flow_ids_log2: Option<u8>,
    /// Messages that fail to decrypt under one session (forged `Open`s,
    /// forged link control) before the session is replaced (default and
    /// most 65,536): lower only to test it.
    pub max_forgeries: Option<u64>,
    /// The links.
    #[serde(default)]
    pub links: Vec<LinkConfig>,
}

/// One link half, with its relays' TLS settings: the protocol's one link
/// model ([`comsat_protocol::half::LinkHalf`]).
pub type LinkConfig = LinkHalf<RelayEndpoint>;

/// How to reach and authenticate a relay.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RelayEndpoint {
    /// `host:port` of the relay's QUIC listener.
    pub addr: String,
    /// The name the relay certificate is checked against.
    pub server_name: String,
    /// PEM CA certificate(s) the relay certificate must chain to.
    pub ca_file: Option<PathBuf>,
    /// SHA-256 (hex) of the relay's end-entity certificate.
    pub cert_sha256: Option<String>,
    /// The relay's id, as the link's grant names it: with `ca_file`, the
    /// relay certificate must name it too (the controller's and `comsat
    /// dev`'s relay certificates do), so a relay holding a certificate
    /// from the same CA cannot stand in for another.
    pub relay_id: Option<RelayId>,
    /// The relay's SPIFFE ID: with `relay_id`, a certificate that is its
    /// X.509-SVID names it (as the controller's are). Certificates of the
    /// form from before relays had SPIFFE IDs name it by `relay_id` alone.
    pub spiffe_id: Option<String>,
    /// `host:port` of the lane: a second connection on which links without
    /// a `connection` start their flows (see the module docs), to the
    /// relay's interactive listener or to `addr`. None: every flow rides
    /// the shared connection.
    pub lane_addr: Option<String>,
}

/// A local socket address: `tcp://HOST:PORT` or `unix:///PATH`, parsed
/// by the one grammar every party uses.
pub use comsat_protocol::endpoint::Endpoint as LocalSpec;

/// This agent's half of a link as the controller sends it; relay
/// certificates must chain to `relay_ca_file`, or, for a relay whose SPIFFE
/// ID is of a trust domain in `federated`, to that domain's bundle (its
/// [`comsat_node::agent::bundle_file`]).
pub fn from_desired(
    link: &comsat_protocol::api::AgentLink,
    relay_ca_file: &Path,
    federated: &std::collections::HashSet<String>,
) -> LinkConfig {
    let anchor = |spiffe_id: Option<&str>| {
        spiffe_id
            .and_then(comsat_protocol::spiffe::split_spiffe_id)
            .filter(|(domain, _)| federated.contains(*domain))
            .and_then(|(domain, _)| comsat_node::agent::bundle_file(relay_ca_file, domain))
            .unwrap_or_else(|| relay_ca_file.to_owned())
    };
    link.map_relays(|r| RelayEndpoint {
        // A link of its own connection dials the relay's interactive
        // listener where it runs one.
        addr: match (&link.connection, &r.interactive_addr) {
            (Some(_), Some(lane)) => lane.clone(),
            _ => r.addr.clone(),
        },
        server_name: r.server_name.clone(),
        ca_file: Some(anchor(r.spiffe_id.as_deref())),
        cert_sha256: None,
        relay_id: Some(r.relay_id),
        spiffe_id: r.spiffe_id.clone(),
        // The other links start their flows there, or, where the relay
        // runs no interactive listener, on a lane to its main one (a link
        // already on a connection of its own has no lane beside it).
        lane_addr: match link.connection {
            Some(_) => None,
            None => Some(r.interactive_addr.clone().unwrap_or_else(|| r.addr.clone())),
        },
    })
}

impl AgentConfig {
    /// What this agent states in its Noise handshakes.
    pub fn noise_params(&self) -> noise::Params {
        let defaults = noise::Params::default();
        noise::Params {
            records_per_key_log2: self
                .rekey_records_log2
                .unwrap_or(defaults.records_per_key_log2),
            flow_ids_log2: self.flow_ids_log2.unwrap_or(defaults.flow_ids_log2),
            ..defaults
        }
    }

    /// A config with no links, for an agent whose links come from the
    /// controller ([`crate::Agent::apply`]).
    pub fn for_node(node_id: NodeId, signing_key: PathBuf, noise_key: PathBuf) -> Self {
        Self {
            node_id,
            signing_key,
            noise_key,
            admin: None,
            flow_timeout_ms: None,
            lane_idle_ms: None,
            bulk_nice: None,
            keep_alive_ms: None,
            rekey_records_log2: None,
            flow_ids_log2: None,
            max_forgeries: None,
            links: Vec::new(),
        }
    }

    /// Reads and checks a config file; relative paths resolve against its
    /// directory.
    pub fn load(path: &Path) -> Result<Self, AgentError> {
        use std::io::Read;
        let io = |source| AgentError::Io {
            path: path.to_owned(),
            source,
        };
        let bad = |reason: String| AgentError::Config {
            path: path.to_owned(),
            reason,
        };
        let mut text = String::new();
        std::fs::File::open(path)
            .map_err(io)?
            .take(MAX_CONFIG_LEN + 1)
            .read_to_string(&mut text)
            .map_err(io)?;
        if text.len() as u64 > MAX_CONFIG_LEN {
            return Err(bad(format!("file is larger than {MAX_CONFIG_LEN} bytes")));
        }
        // Every key must mean something: a misspelt one is refused, not
        // ignored (the link model also reads the controller's answers,
        // which may carry fields an older agent does not know).
        let mut unknown = Vec::new();
        let de = toml::Deserializer::parse(&text).map_err(|e| bad(e.to_string()))?;
        let mut config: Self = serde_ignored::deserialize(de, |key| unknown.push(key.to_string()))
            .map_err(|e| bad(e.to_string()))?;
        if let Some(key) = unknown.first() {
            return Err(bad(format!("unknown key `{key}`")));
        }
        let base = path.parent().unwrap_or(Path::new(".")).to_owned();
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut config.signing_key);
        resolve(&mut config.noise_key);
        if let Some(n) = config.bulk_nice.filter(|n| *n > 19) {
            return Err(bad(format!(
                "bulk_nice is {n}: niceness goes from 0 (as the process) to 19"
            )));
        }
        if let Some(ms) = config.keep_alive_ms
            && !defaults::KEEP_ALIVE_RANGE.contains(&Duration::from_millis(ms))
        {
            return Err(bad(format!(
                "keep_alive_ms is {ms}: it goes from 1000 to 300000 (1 s to 5 min; 25000 unless set)"
            )));
        }
        if config.noise_params().check().is_err() {
            let p = config.noise_params();
            return Err(bad(format!(
                "rekey_records_log2 is {} and flow_ids_log2 {}: the first goes from {min} to {}, the second from {min} to {}",
                p.records_per_key_log2,
                p.flow_ids_log2,
                noise::DEFAULT_RECORDS_PER_KEY_LOG2,
                noise::DEFAULT_FLOW_IDS_LOG2,
                min = noise::MIN_LOG2,
            )));
        }
        if let Some(n) = config
            .max_forgeries
            .filter(|n| !(1..=defaults::MAX_FORGERIES).contains(n))
        {
            return Err(bad(format!(
                "max_forgeries is {n}: it goes from 1 to {}",
                defaults::MAX_FORGERIES
            )));
        }
        if config.links.len() > MAX_LINKS {
            return Err(bad(format!("more than {MAX_LINKS} links")));
        }
        let mut ids = std::collections::HashSet::new();
        for link in &mut config.links {
            if link.relays.is_empty() || link.relays.len() > MAX_RELAYS_PER_LINK {
                return Err(bad(format!(
                    "link `{}`: list 1 to {MAX_RELAYS_PER_LINK} [[links.relays]]",
                    link.name
                )));
            }
            for relay in &mut link.relays {
                if let Some(ca) = &mut relay.ca_file {
                    resolve(ca);
                }
            }
            link.role()
                .map_err(|e| bad(format!("link `{}`: {e}", link.name)))?;
            link.check_connection()
                .map_err(|e| bad(format!("link `{}`: {e}", link.name)))?;
            link.allow_rules()
                .map_err(|e| bad(format!("link `{}`: {e}", link.name)))?;
            if link
                .relays
                .iter()
                .any(|r| r.ca_file.is_some() == r.cert_sha256.is_some())
            {
                return Err(bad(format!(
                    "link `{}`: set exactly one of ca_file or cert_sha256 in every [[links.relays]]",
                    link.name
                )));
            }
            if !ids.insert(link.link_id) {
                return Err(bad(format!("link `{}`: link_id appears twice", link.name)));
            }
        }
        let connections: std::collections::HashSet<&str> = config
            .links
            .iter()
            .filter_map(|l| l.connection.as_deref())
            .collect();
        if connections.len() > MAX_CONNECTIONS {
            return Err(bad(format!(
                "{} distinct `connection` names; at most {MAX_CONNECTIONS} (each is one more \
                 QUIC connection per relay)",
                connections.len()
            )));
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use comsat_protocol::{LinkId, NoisePublicKey, Side};

    fn link(listen: Option<&str>, target: Option<&str>) -> LinkConfig {
        LinkConfig {
            name: "l".into(),
            link_id: LinkId([1; 16]),
            generation: 1,
            side: Side::A,
            peer_noise_public_key: NoisePublicKey([2; 32]),
            listen: listen.map(Into::into),
            target: target.map(Into::into),
            allowed_uids: vec![],
            allowed_gids: vec![],
            allow: vec![],
            proxy_protocol: false,
            relays: vec![RelayEndpoint {
                addr: "127.0.0.1:1".into(),
                server_name: "localhost".into(),
                ca_file: None,
                cert_sha256: Some("00".into()),
                relay_id: None,
                spiffe_id: None,
                lane_addr: None,
            }],
            connection: None,
        }
    }

    #[test]
    fn a_controller_link_with_a_connection_dials_the_interactive_listeners() {
        use comsat_protocol::RelayId;
        use comsat_protocol::api::{AgentLink, RelayAddr};
        let relay = |n: u8, lane: Option<&str>| RelayAddr {
            relay_id: RelayId([n; 16]),
            addr: format!("r{n}.example:4433"),
            server_name: format!("r{n}.example"),
            interactive_addr: lane.map(Into::into),
            spiffe_id: None,
        };
        let mut desired = AgentLink {
            name: "ssh".into(),
            link_id: LinkId([1; 16]),
            generation: 1,
            side: Side::A,
            peer_noise_public_key: NoisePublicKey([2; 32]),
            listen: Some("tcp://127.0.0.1:2222".into()),
            target: None,
            allowed_uids: vec![],
            allowed_gids: vec![],
            allow: vec![],
            proxy_protocol: false,
            relays: vec![relay(1, Some("r1.example:4434")), relay(2, None)],
            connection: Some("interactive".into()),
        };
        let ca = Path::new("/ca.pem");
        let cfg = from_desired(&desired, ca, &Default::default());
        assert_eq!(cfg.connection.as_deref(), Some("interactive"));
        let addrs: Vec<&str> = cfg.relays.iter().map(|r| r.addr.as_str()).collect();
        // A relay without an interactive listener is reached on its main one.
        assert_eq!(addrs, ["r1.example:4434", "r2.example:4433"]);
        assert_eq!(cfg.relays[0].server_name, "r1.example");
        // It is on the lane already: no lane beside it.
        assert!(cfg.relays.iter().all(|r| r.lane_addr.is_none()));
        // A link without a connection stays on the main listeners, with a
        // lane to each relay's interactive listener, or to its main one
        // where it runs none.
        desired.connection = None;
        let cfg = from_desired(&desired, ca, &Default::default());
        let addrs: Vec<&str> = cfg.relays.iter().map(|r| r.addr.as_str()).collect();
        let lanes: Vec<Option<&str>> = cfg.relays.iter().map(|r| r.lane_addr.as_deref()).collect();
        assert_eq!(
            (cfg.connection, addrs, lanes),
            (
                None,
                vec!["r1.example:4433", "r2.example:4433"],
                vec![Some("r1.example:4434"), Some("r2.example:4433")]
            )
        );
    }

    #[test]
    fn a_changed_connection_is_another_half_and_new_relays_are_not() {
        let a = link(None, Some("tcp://db.internal:5432"));
        let mut b = a.clone();
        b.relays[0].addr = "127.0.0.1:2".into();
        b.generation = 2;
        assert!(a.same_half(&b), "relays and generation carry over");
        b.connection = Some("interactive".into());
        assert!(!a.same_half(&b), "a new connection is a new half");
    }

    #[test]
    fn connection_names_are_short_and_plain() {
        let mut l = link(None, Some("tcp://db.internal:5432"));
        assert!(l.check_connection().is_ok(), "no name is fine");
        for good in [
            "interactive",
            "a",
            "rpc-1.v2_x",
            &"x".repeat(MAX_CONNECTION_NAME_LEN),
        ] {
            l.connection = Some(good.into());
            assert!(l.check_connection().is_ok(), "{good}");
        }
        for bad in [
            "",
            "with space",
            "ünï",
            "a/b",
            &"x".repeat(MAX_CONNECTION_NAME_LEN + 1),
        ] {
            l.connection = Some(bad.into());
            let err = l.check_connection().expect_err(bad);
            assert!(err.to_string().contains("letters, digits"), "{err}");
        }
    }

    /// Each `connection` name is one more QUIC connection per relay: a
    /// file naming more than MAX_CONNECTIONS is refused, saying so.
    /// An agent config of the required keys and `extra`, loaded.
    fn load_with(extra: &str) -> Result<AgentConfig, AgentError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.toml");
        let text = format!(
            "node_id = \"{}\"\nsigning_key = \"node.key\"\nnoise_key = \"noise.key\"\n{extra}",
            "5d".repeat(16)
        );
        std::fs::write(&path, text).expect("write");
        AgentConfig::load(&path)
    }

    #[test]
    fn bulk_nice_is_optional_and_at_most_19() {
        assert_eq!(load_with("").expect("load").bulk_nice, None);
        assert_eq!(
            load_with("bulk_nice = 19\n").expect("load").bulk_nice,
            Some(19)
        );
        let err = load_with("bulk_nice = 20\n").expect_err("too nice");
        assert!(err.to_string().contains("bulk_nice is 20"), "{err}");
    }

    #[test]
    fn keep_alive_is_optional_and_within_its_range() {
        assert_eq!(load_with("").expect("load").keep_alive_ms, None);
        assert_eq!(
            load_with("keep_alive_ms = 300000\n")
                .expect("load")
                .keep_alive_ms,
            Some(300_000)
        );
        for bad in [0, 999, 300_001] {
            let err = load_with(&format!("keep_alive_ms = {bad}\n")).expect_err("out of range");
            assert!(
                err.to_string().contains(&format!("keep_alive_ms is {bad}")),
                "{err}"
            );
        }
    }

    #[test]
    fn at_most_max_connections_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = |names: usize| {
            let mut t = format!(
                "node_id = \"{}\"\nsigning_key = \"node.key\"\nnoise_key = \"noise.key\"\n",
                "5d".repeat(16)
            );
            for i in 0..names {
                t.push_str(&format!(
                    "[[links]]\nname = \"l{i}\"\nlink_id = \"{i:032x}\"\ngeneration = 1\n\
                     side = \"b\"\npeer_noise_public_key = \"{}\"\n\
                     target = \"tcp://127.0.0.1:9\"\nconnection = \"c{i}\"\n\
                     [[links.relays]]\naddr = \"relay.example.net:4433\"\n\
                     server_name = \"relay.example.net\"\ncert_sha256 = \"{}\"\n",
                    "9e".repeat(32),
                    "ab".repeat(32)
                ));
            }
            t
        };
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, text(MAX_CONNECTIONS)).expect("write");
        let config = AgentConfig::load(&path).expect("MAX_CONNECTIONS names load");
        assert_eq!(config.links[3].connection.as_deref(), Some("c3"));
        std::fs::write(&path, text(MAX_CONNECTIONS + 1)).expect("write");
        let err = AgentConfig::load(&path).expect_err("one name too many");
        assert!(
            err.to_string().contains("distinct `connection` names"),
            "{err}"
        );
        std::fs::write(&path, text(1).replace("\"c0\"", "\"c 0\"")).expect("write");
        let err = AgentConfig::load(&path).expect_err("bad name");
        assert!(err.to_string().contains("link `l0`: connection"), "{err}");
    }

    #[test]
    fn a_misspelt_key_in_a_link_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.toml");
        let text = format!(
            "node_id = \"{}\"\nsigning_key = \"k\"\nnoise_key = \"n\"\n\
             [[links]]\nname = \"l\"\nlink_id = \"{}\"\ngeneration = 1\nside = \"a\"\n\
             peer_noise_public_key = \"{}\"\nlisten = \"tcp://127.0.0.1:7000\"\nallowed_uid = [1]\n\
             [[links.relays]]\naddr = \"127.0.0.1:1\"\nserver_name = \"localhost\"\ncert_sha256 = \"00\"\n",
            NodeId([1; 16]),
            LinkId([2; 16]),
            NoisePublicKey([3; 32]),
        );
        std::fs::write(&path, &text).expect("write");
        let err = AgentConfig::load(&path).expect_err("misspelt key");
        assert!(err.to_string().contains("links.0.allowed_uid"), "{err}");
        std::fs::write(&path, text.replace("allowed_uid =", "allowed_uids =")).expect("write");
        AgentConfig::load(&path).expect("the right key loads");
    }

    #[test]
    fn listen_must_be_loopback() {
        assert!(link(Some("tcp://127.0.0.1:7000"), None).role().is_ok());
        assert!(link(Some("tcp://[::1]:7000"), None).role().is_ok());
        let err = link(Some("tcp://0.0.0.0:7000"), None)
            .role()
            .expect_err("not loopback");
        assert!(err.to_string().contains("loopback"), "{err}");
        assert!(link(Some("unix:///tmp/x.sock"), None).role().is_ok());
        assert!(link(Some("unix://rel.sock"), None).role().is_err());
    }

    /// A file with as many links as an agent may hold loads; one more
    /// link is refused for what it is, not for the file's size.
    #[test]
    fn the_most_links_allowed_fit_in_a_config_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let entry = |i: usize| {
            format!(
                "[[links]]\nname = \"link-{i:05}\"\nlink_id = \"{i:032x}\"\ngeneration = 1\n\
                 side = \"b\"\npeer_noise_public_key = \"{}\"\n\
                 target = \"tcp://127.0.0.1:{}\"\n[[links.relays]]\n\
                 addr = \"relay-1.example.net:4433\"\nserver_name = \"relay-1.example.net\"\n\
                 cert_sha256 = \"{}\"\n",
                "9e".repeat(32),
                1000 + i % 60000,
                "ab".repeat(32)
            )
        };
        let head = format!(
            "node_id = \"{}\"\nsigning_key = \"node.key\"\nnoise_key = \"noise.key\"\n",
            "5d".repeat(16)
        );
        let path = dir.path().join("agent.toml");
        let mut text = head.clone();
        for i in 0..MAX_LINKS {
            text.push_str(&entry(i));
        }
        std::fs::write(&path, &text).expect("write");
        let config = AgentConfig::load(&path).expect("MAX_LINKS links load");
        assert_eq!(config.links.len(), MAX_LINKS);
        text.push_str(&entry(MAX_LINKS));
        std::fs::write(&path, &text).expect("write");
        let err = AgentConfig::load(&path).expect_err("one link too many");
        assert!(err.to_string().contains("more than"), "{err}");
    }

    #[test]
    fn exactly_one_role() {
        assert!(link(None, None).role().is_err());
        assert!(
            link(Some("tcp://127.0.0.1:1"), Some("tcp://a:1"))
                .role()
                .is_err()
        );
        assert!(link(None, Some("tcp://db.internal:5432")).role().is_ok());
        assert!(link(None, Some("http://x")).role().is_err());
    }
}
