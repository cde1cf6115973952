//! An agent's half of a link: the one model of it, as the controller sends
//! it ([`crate::api::AgentLink`], its relays by address) and as an agent's
//! configuration holds it (its relays with their TLS settings).

use serde::{Deserialize, Serialize};

use crate::api::{MAX_CONNECTION_NAME_LEN, valid_connection_name};
use crate::endpoint::{Endpoint, EndpointError};
use crate::ids::{LinkId, Side};
use crate::keys::NoisePublicKey;
use crate::workload::{self, Rule, RuleError, Selector};

/// One agent's half of a link; `R` says how it reaches each relay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkHalf<R> {
    /// The link's name.
    pub name: String,
    /// The link's id.
    pub link_id: LinkId,
    /// The grant generation.
    pub generation: u64,
    /// The side this agent holds.
    pub side: Side,
    /// The peer's Noise static public key (never its address).
    pub peer_noise_public_key: NoisePublicKey,
    /// Local listener (`tcp://…` or `unix://…`), side A.
    pub listen: Option<String>,
    /// Local target dialled per flow, side B.
    pub target: Option<String>,
    /// Unix listeners: allowed peer uids.
    #[serde(default)]
    pub allowed_uids: Vec<u32>,
    /// Unix listeners: allowed peer gids.
    #[serde(default)]
    pub allowed_gids: Vec<u32>,
    /// The workloads admitted, as rules of selectors
    /// ([`crate::workload`]); with `allowed_uids` and `allowed_gids`,
    /// a caller one of them matches is admitted (all empty: anyone who can
    /// reach the listener). Side B checks each flow's caller against them
    /// too, where `allow` is not empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// Side B: each flow's target connection starts with a PROXY protocol
    /// v2 header naming the caller's identity.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub proxy_protocol: bool,
    /// The relays that carry the link, in order of preference: how to
    /// reach and authenticate each.
    pub relays: Vec<R>,
    /// The agent's own QUIC connection (and thread) the link uses, apart
    /// from its other links: for interactive links beside bulk ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection: Option<String>,
}

/// What a link half does locally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalRole {
    /// Accept local connections (on loopback or a Unix socket); each
    /// becomes a flow.
    Listen(Endpoint),
    /// Dial this target for each flow the peer opens.
    Target(Endpoint),
}

/// Why a link half is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// `listen` does not parse, or is off loopback.
    #[error("listen {0}")]
    Listen(EndpointError),
    /// `target` does not parse.
    #[error("target {0}")]
    Target(EndpointError),
    /// Both or neither of `listen` and `target`.
    #[error("set exactly one of `listen` or `target`")]
    Role,
    /// An `allow` rule that does not parse, or too many.
    #[error("{0}")]
    Allow(#[from] RuleError),
    /// `allow` rules or the PROXY protocol on a `udp://` link.
    #[error("allow rules and the PROXY protocol apply to tcp:// and unix:// links only")]
    Datagrams,
    /// A `connection` name out of its grammar.
    #[error(
        "connection `{0}`: use 1 to {MAX_CONNECTION_NAME_LEN} letters, digits, `-`, `_` or `.`"
    )]
    Connection(String),
}

impl<R> LinkHalf<R> {
    /// The parsed local role: a listener on loopback or a Unix socket, or
    /// a target.
    pub fn role(&self) -> Result<LocalRole, LinkError> {
        match (&self.listen, &self.target) {
            (Some(l), None) => Endpoint::parse_listen(l)
                .map(LocalRole::Listen)
                .map_err(LinkError::Listen),
            (None, Some(t)) => Endpoint::parse(t)
                .map(LocalRole::Target)
                .map_err(LinkError::Target),
            _ => Err(LinkError::Role),
        }
    }

    /// Checks the `connection` name: 1 to [`MAX_CONNECTION_NAME_LEN`]
    /// ASCII letters, digits, `-`, `_` or `.`.
    pub fn check_connection(&self) -> Result<(), LinkError> {
        match &self.connection {
            Some(name) if !valid_connection_name(name) => {
                Err(LinkError::Connection(name.escape_debug().to_string()))
            }
            _ => Ok(()),
        }
    }

    /// The workloads the listener admits: the `allow` rules, and one rule
    /// per allowed uid and gid. Empty: anyone who can reach the listener.
    pub fn allow_rules(&self) -> Result<Vec<Rule>, LinkError> {
        let mut rules = workload::parse_rules(&self.allow)?;
        let datagrams = matches!(
            self.role(),
            Ok(LocalRole::Listen(Endpoint::Udp(_)) | LocalRole::Target(Endpoint::Udp(_)))
        );
        if datagrams && (!rules.is_empty() || self.proxy_protocol) {
            return Err(LinkError::Datagrams);
        }
        rules.extend(
            self.allowed_uids
                .iter()
                .map(|&u| Rule::one(Selector::Uid(u))),
        );
        rules.extend(
            self.allowed_gids
                .iter()
                .map(|&g| Rule::one(Selector::Gid(g))),
        );
        Ok(rules)
    }

    /// Whether `other` is the same link half except for its generation and
    /// relays: then its session and flows carry over. A changed
    /// `connection` is another half: its listener and flows run on another
    /// runtime (the lane or the main one).
    pub fn same_half<S>(&self, other: &LinkHalf<S>) -> bool {
        self.link_id == other.link_id
            && self.connection == other.connection
            && self.side == other.side
            && self.peer_noise_public_key == other.peer_noise_public_key
            && self.listen == other.listen
            && self.target == other.target
            && self.allowed_uids == other.allowed_uids
            && self.allowed_gids == other.allowed_gids
            && self.allow == other.allow
            && self.proxy_protocol == other.proxy_protocol
            && self.name == other.name
    }

    /// The same half with its relays mapped by `f`.
    pub fn map_relays<S>(&self, f: impl FnMut(&R) -> S) -> LinkHalf<S> {
        LinkHalf {
            name: self.name.clone(),
            link_id: self.link_id,
            generation: self.generation,
            side: self.side,
            peer_noise_public_key: self.peer_noise_public_key,
            listen: self.listen.clone(),
            target: self.target.clone(),
            allowed_uids: self.allowed_uids.clone(),
            allowed_gids: self.allowed_gids.clone(),
            allow: self.allow.clone(),
            proxy_protocol: self.proxy_protocol,
            relays: self.relays.iter().map(f).collect(),
            connection: self.connection.clone(),
        }
    }
}
