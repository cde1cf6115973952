//! The controller's HTTPS API: paths and JSON bodies.
//!
//! Everything here is plain data; the controller serves it (axum) and the
//! nodes and `comsat ctl` call it. Bodies are JSON; every response that is
//! not 2xx carries an [`ErrorBody`]. Nodes authenticate with a short-lived
//! JWT signed by their node key ([`crate::jwt`]); users and service
//! accounts with an API token, whose role bindings decide what they may do
//! (the "permission" column: resource and verb). Both go in
//! `Authorization: Bearer …`. Every refused authentication answers 401
//! alike; a missing permission answers 403 naming it.
//!
//! | path | method | who | body → answer |
//! |---|---|---|---|
//! | [`PATH_CA`] | GET | anyone | — → the controller CA, PEM (`text/plain`) |
//! | [`PATH_ENROL`] | POST | token holder | [`EnrolRequest`] → [`EnrolResponse`] |
//! | [`PATH_RELAY_EVENTS`] | GET `?since=N&wait_ms=W` | relay | → [`RelayEvents`] |
//! | [`PATH_RELAY_HEARTBEAT`] | POST | relay | [`RelayHeartbeat`] → [`Empty`] |
//! | [`PATH_RELAY_CERT`] | POST | relay | [`CertRequest`] → [`CertResponse`] |
//! | [`PATH_AGENT_CONFIG`] | GET `?since=V&wait_ms=W` | agent | → [`AgentDesired`] |
//! | [`PATH_AGENT_REFUSALS`] | POST | agent | [`AgentRefusals`] → [`Empty`] |
//! | [`PATH_AGENT_RELAY_SILENT`] | POST | agent | [`RelaySilent`] → [`Empty`] |
//! | [`PATH_AGENT_LINK_STATUS`] | POST | agent | [`AgentLinkStatus`] → [`Empty`] |
//! | [`PATH_AGENT_FLOWS`] | POST | agent | [`AgentFlows`] → [`Empty`] |
//! | [`PATH_AGENT_SVID`] | POST | agent | [`CertRequest`] → [`CertResponse`] (its X.509-SVID) |
//! | [`PATH_SPIFFE_BUNDLE`] | GET | anyone | → [`SpiffeBundle`] (the trust domain's, for federation) |
//! | [`PATH_BUNDLES`], `…/{domain}` | GET / PUT / DELETE | `bundles` list / update / delete | → `Vec<`[`TrustBundle`]`>`; [`BundleSet`] → [`TrustBundle`]; → [`Empty`] |
//! | [`PATH_FLOWS`] | GET `?link=NAME&identity=ID&since=MS&until=MS&limit=N` | `flows` list | → `Vec<`[`FlowInfo`]`>` |
//! | [`PATH_TOKENS`] | POST | `tokens/KIND` create | [`TokenCreate`] → [`TokenCreated`] |
//! | [`PATH_OPEN_TOKENS`] | GET | `tokens` list | → `Vec<`[`JoinTokenInfo`]`>` |
//! | [`PATH_AGENTS`], [`PATH_RELAYS`] | GET | `agents`/`relays` list | → `Vec<`[`AgentInfo`]`>`, `Vec<`[`RelayInfo`]`>` |
//! | `PATH_AGENTS/{name}`, `PATH_RELAYS/{name}` | GET / DELETE | get / delete | → node; → [`Empty`] (decommission) |
//! | [`PATH_LINKS`] | GET / POST | `links` list / create | [`LinkSpec`] → [`LinkInfo`]; list → `Vec<LinkInfo>` |
//! | `PATH_LINKS/{name}` | GET / PATCH / DELETE | `links` get / update / delete | → [`LinkInfo`]; [`LinkUpdate`] → [`LinkInfo`]; → [`Empty`] |
//! | [`PATH_SERVICE_ACCOUNTS`], [`PATH_USERS`] | GET / POST | list / create | → `Vec<`[`PrincipalInfo`]`>`; [`PrincipalCreate`] → [`PrincipalCreated`] |
//! | `…/{name}`, `…/{name}/tokens`, `…/{name}/tokens/{id}` | DELETE, POST, DELETE | delete, update, update | → [`Empty`]; [`PrincipalCreate`] → [`PrincipalCreated`]; → [`Empty`] |
//! | [`PATH_ROLES`], `…/{name}` | GET / POST / DELETE | `roles` | [`RoleCreate`] → [`RoleInfo`] |
//! | [`PATH_ROLE_BINDINGS`], `…/{name}` | GET / POST / DELETE | `rolebindings` | [`RoleBindingCreate`] → [`RoleBindingInfo`] |
//! | [`PATH_AUDIT`] | GET `?since=S&subject=P&limit=N` | `audit` list | → `Vec<`[`AuditRecord`]`>` |
//! | [`PATH_STATUS`] | GET | `status` get | → [`Status`] |
//! | [`PATH_OPENAPI`] | GET | anyone | → this API's OpenAPI 3 document (YAML) |

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ids::{LinkId, NodeId, RelayId};
use crate::keys::{NoisePublicKey, SignPublicKey};

/// The controller CA certificate (PEM), unauthenticated: a new node fetches
/// it and checks its SHA-256 against the fingerprint in its join token.
pub const PATH_CA: &str = "/v1/ca";
/// Redeem a join token and register the node's public keys.
pub const PATH_ENROL: &str = "/v1/enrol";
/// A relay's ordered log of grants and revocations (long poll).
pub const PATH_RELAY_EVENTS: &str = "/v1/relay/events";
/// A relay's load report.
pub const PATH_RELAY_HEARTBEAT: &str = "/v1/relay/heartbeat";
/// A relay's certificate renewal.
pub const PATH_RELAY_CERT: &str = "/v1/relay/cert";
/// An agent's desired state (long poll).
pub const PATH_AGENT_CONFIG: &str = "/v1/agent/config";
/// `POST`: the links an agent refused, and why ([`AgentRefusals`]).
pub const PATH_AGENT_REFUSALS: &str = "/v1/agent/refusals";
/// `POST`: the agent left a relay that stopped answering ([`RelaySilent`]);
/// the peers of its links there are told to leave it too.
pub const PATH_AGENT_RELAY_SILENT: &str = "/v1/agent/relay-silent";
/// Join tokens (admin).
pub const PATH_TOKENS: &str = "/v1/tokens";
/// `GET`: join tokens neither used nor expired ([`JoinTokenInfo`]).
pub const PATH_OPEN_TOKENS: &str = "/v1/tokens/open";
/// Enrolled agents (admin).
pub const PATH_AGENTS: &str = "/v1/agents";
/// Enrolled relays (admin).
pub const PATH_RELAYS: &str = "/v1/relays";
/// Links (admin); one link is `PATH_LINKS/{name}`.
pub const PATH_LINKS: &str = "/v1/links";
/// Summary (admin).
pub const PATH_STATUS: &str = "/v1/status";
/// `GET`: the API's OpenAPI 3 document (YAML), for anyone.
pub const PATH_OPENAPI: &str = "/v1/openapi.yaml";
/// `GET`: the audit log (admin), `?since=UNIX_SECS&subject=S&limit=N`.
pub const PATH_AUDIT: &str = "/v1/audit";
/// `GET` list, `POST` create ([`PrincipalCreate`]): service accounts;
/// `/{name}` `DELETE`; `/{name}/tokens` `POST` another token;
/// `/{name}/tokens/{id}` `DELETE` revokes one.
pub const PATH_SERVICE_ACCOUNTS: &str = "/v1/serviceaccounts";
/// The same for users.
pub const PATH_USERS: &str = "/v1/users";
/// `GET` list, `POST` create ([`RoleCreate`]); `/{name}` `GET`, `DELETE`.
pub const PATH_ROLES: &str = "/v1/roles";
/// `GET` list, `POST` create ([`RoleBindingCreate`]); `/{name}` `GET`,
/// `DELETE`.
pub const PATH_ROLE_BINDINGS: &str = "/v1/rolebindings";
/// Most audit records one request returns.
pub const MAX_AUDIT_RECORDS: usize = 1000;

/// Longest long poll a client may ask for (`wait_ms`): ten minutes.
pub const MAX_WAIT_MS: u64 = 600_000;
/// Most events in one [`RelayEvents`] answer.
pub const MAX_EVENTS_PER_POLL: usize = 1000;
/// Largest JSON body either side reads.
pub const MAX_BODY_LEN: usize = 4 * 1024 * 1024;
/// Longest enrolment body (`POST PATH_ENROL`): the one a caller sends
/// before it has proved anything.
pub const MAX_ENROL_BODY_LEN: usize = 64 * 1024;
/// Longest node, link or token name.
pub const MAX_NAME_LEN: usize = 63;

/// The body of every error answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong and, where it helps, what to do.
    pub error: String,
}

/// An empty JSON object.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Empty {}

/// The kind of node a token enrols.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeKind {
    /// An edge agent.
    Agent,
    /// A relay.
    Relay,
}

impl NodeKind {
    /// `"agent"` or `"relay"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Agent => "agent",
            Self::Relay => "relay",
        }
    }
}

impl fmt::Display for NodeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for NodeKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "agent" => Ok(Self::Agent),
            "relay" => Ok(Self::Relay),
            other => Err(format!(
                "unknown node kind `{other}` (expected agent or relay)"
            )),
        }
    }
}

/// Longest name of a link's `connection`.
pub const MAX_CONNECTION_NAME_LEN: usize = 64;

/// Whether `name` may name a link's `connection` (the agent's own QUIC
/// connection and thread for interactive links): 1 to
/// [`MAX_CONNECTION_NAME_LEN`] ASCII letters, digits, `-`, `_` or `.`.
pub fn valid_connection_name(name: &str) -> bool {
    (1..=MAX_CONNECTION_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Whether `name` is a valid node or link name: 1 to [`MAX_NAME_LEN`]
/// characters of `a-z 0-9 -`, starting with a letter or digit and not
/// ending with `-` (a DNS label).
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_NAME_LEN
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// What a node sends to redeem its join token. `Debug` hides the secret.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrolRequest {
    /// The token's id.
    pub token_id: String,
    /// The token's secret (hex).
    pub secret: String,
    /// The kind the node enrols as; must match the token's.
    pub kind: NodeKind,
    /// The node's ed25519 public key.
    pub sign_public_key: SignPublicKey,
    /// Agents: their X25519 Noise static public key.
    pub noise_public_key: Option<NoisePublicKey>,
    /// Relays: the `host:port` agents dial.
    pub public_addr: Option<String>,
    /// Relays: the `host:port` of their interactive listener (same host as
    /// `public_addr`), if they run one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interactive_addr: Option<String>,
    /// Relays: a PEM certificate signing request for their TLS key.
    pub csr_pem: Option<String>,
    /// Relays that bring their own certificate instead (an X.509-SVID of a
    /// federated trust domain): its chain, PEM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub svid_pem: Option<String>,
}

impl fmt::Debug for EnrolRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnrolRequest")
            .field("token_id", &self.token_id)
            .field("secret", &"<redacted>")
            .field("kind", &self.kind)
            .field("sign_public_key", &self.sign_public_key)
            .field("public_addr", &self.public_addr)
            .field("interactive_addr", &self.interactive_addr)
            .finish_non_exhaustive()
    }
}

/// What an enrolled node learns.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EnrolResponse {
    /// Its id (a relay's id in grants is the same 16 bytes).
    pub node_id: NodeId,
    /// Its name.
    pub name: String,
    /// The authority key that signs grants.
    pub authority_public_key: SignPublicKey,
    /// The `aud` its JWTs must carry.
    pub audience: String,
    /// The CA relay certificates chain to (PEM).
    pub relay_ca_pem: String,
    /// Relays: their certificate chain (PEM).
    pub cert_pem: Option<String>,
}

/// One entry of a relay's event log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayEvent {
    /// Position in the log (strictly increasing).
    pub seq: u64,
    /// The link concerned.
    pub link_id: LinkId,
    /// Grant or revocation.
    #[serde(flatten)]
    pub kind: RelayEventKind,
}

/// What happened to a link, for one relay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum RelayEventKind {
    /// A grant (new, renewed or a new generation), as signed bytes in hex.
    Grant {
        /// `SignedGrant` bytes, hex.
        grant: String,
    },
    /// The relay no longer carries the link.
    Revoke,
}

/// An answer to [`PATH_RELAY_EVENTS`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayEvents {
    /// Events after `since`, oldest first, at most [`MAX_EVENTS_PER_POLL`].
    pub events: Vec<RelayEvent>,
    /// The cursor for the next poll.
    pub next: u64,
    /// More events wait: poll again at once.
    pub more: bool,
}

/// A relay's load, reported with every heartbeat.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayLoad {
    /// Agent connections.
    pub connections: u64,
    /// Links granted.
    pub links: u64,
    /// Bytes held for absent peers.
    pub buffered_bytes: u64,
    /// Whether it is draining (its links move to other relays).
    #[serde(default)]
    pub draining: bool,
}

/// Most clone alarms one heartbeat carries (a relay keeps the rest for
/// the next ones, up to a bound, and counts what it had to drop).
pub const MAX_CLONES_PER_HEARTBEAT: usize = 64;

/// Longest source address in a clone alarm (an IPv6 address is at most 45
/// characters).
pub const MAX_CLONE_SOURCE_LEN: usize = 64;

/// A relay's alarm: one node key connected from two sources at once (a
/// copied key, or an agent that moved networks).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeClone {
    /// The node.
    pub node_id: NodeId,
    /// The address of the new connection.
    pub source: String,
    /// The address of a connection of the same key still open.
    pub other_source: String,
    /// Unix time the relay saw it.
    pub at: u64,
}

/// A relay's heartbeat.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayHeartbeat {
    /// Its load.
    pub load: RelayLoad,
    /// Clone alarms since the last heartbeat, oldest first, at most
    /// [`MAX_CLONES_PER_HEARTBEAT`].
    #[serde(default)]
    pub clones: Vec<NodeClone>,
    /// Clone alarms the relay dropped since the last heartbeat (it saw more
    /// than it keeps).
    #[serde(default)]
    pub clones_dropped: u64,
    /// What its links carried (at most [`MAX_TRAFFIC_PER_HEARTBEAT`]).
    #[serde(default)]
    pub traffic: Vec<LinkTraffic>,
    /// Its software version (at most [`MAX_VERSION_LEN`] bytes).
    #[serde(default)]
    pub version: Option<String>,
}

/// A relay's certificate renewal request.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertRequest {
    /// PEM certificate signing request for the relay's TLS key.
    pub csr_pem: String,
}

/// A renewed relay certificate.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CertResponse {
    /// The certificate chain (PEM).
    pub cert_pem: String,
}

/// A relay as an agent reaches it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RelayAddr {
    /// The relay's id.
    pub relay_id: RelayId,
    /// `host:port` of its QUIC listener.
    pub addr: String,
    /// The name its certificate carries.
    pub server_name: String,
    /// `host:port` of its interactive listener, if it runs one: links with
    /// a `connection` dial it instead of `addr`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interactive_addr: Option<String>,
    /// Its SPIFFE ID, which its certificate (an X.509-SVID) must carry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
}

pub use crate::half::LinkHalf;

/// An agent's half of one link, as the controller sends it.
pub type AgentLink = LinkHalf<RelayAddr>;

/// An agent's whole desired state. A long poll that ends with nothing
/// new (`version` equal to the poll's `since`) carries no links and no CA:
/// the agent keeps what it has (an idle agent's poll answer stays small).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentDesired {
    /// Increases with every change; poll with `since` = this.
    pub version: u64,
    /// Its links.
    pub links: Vec<AgentLink>,
    /// The CA relay certificates chain to (PEM).
    pub relay_ca_pem: String,
    /// Relays the peers of its links left lately because they stopped
    /// answering: a link still on one of them moves to its next relay, to
    /// meet its peer there, without waiting to notice the silence itself.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peer_moves: Vec<PeerMove>,
    /// The bundles of the trust domains the controller federates with:
    /// relays whose SPIFFE ID is in one of them chain to its bundle.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub federated_bundles: Vec<TrustBundle>,
}

/// How long a peer's move stays in [`AgentDesired::peer_moves`], seconds.
pub const PEER_MOVE_TTL_SECS: u64 = 120;

/// A link's peer left a relay that stopped answering.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerMove {
    /// The link.
    pub link_id: LinkId,
    /// The relay its peer left.
    pub relay_id: RelayId,
    /// When the peer said so (Unix seconds): a move is acted on once.
    pub at: u64,
}

/// `POST PATH_AGENT_RELAY_SILENT`: the agent left this relay because it
/// stopped answering.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelaySilent {
    /// The relay.
    pub relay_id: RelayId,
}

/// Most links in one [`AgentRefusals`].
pub const MAX_REFUSALS: usize = 1024;

/// Longest reason in a [`LinkRefusal`], in bytes.
pub const MAX_REFUSAL_REASON_LEN: usize = 1024;

/// `POST PATH_AGENT_REFUSALS`: every link of its desired state an agent
/// refused (it holds the others). Replaces what it sent before.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentRefusals {
    /// The links it refused (at most [`MAX_REFUSALS`]).
    pub refused: Vec<LinkRefusal>,
}

/// A link an agent refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkRefusal {
    /// The link's name.
    pub link: String,
    /// Why, for the operator (at most [`MAX_REFUSAL_REASON_LEN`] bytes).
    pub reason: String,
}

/// A link's half that its agent refused, as the operator sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkRefused {
    /// The agent that refused.
    pub agent: String,
    /// Why.
    pub reason: String,
    /// Unix time it said so.
    pub at: u64,
}

/// `POST PATH_TOKENS`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenCreate {
    /// What the token enrols.
    pub kind: NodeKind,
    /// The name the node gets; the controller picks one if absent.
    pub name: Option<String>,
    /// Lifetime in seconds (default one hour).
    pub ttl_secs: Option<u64>,
}

/// A join token as listed (`GET PATH_TOKENS`): never its secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenInfo {
    /// Its id.
    pub id: String,
    /// What it enrols.
    pub kind: NodeKind,
    /// The name the node gets, if set.
    pub name: Option<String>,
    /// Unix time it expires.
    pub expires_at: u64,
    /// Whether it was redeemed (or tried after expiry).
    pub used: bool,
}

/// A new join token.
#[derive(Clone, Serialize, Deserialize)]
pub struct TokenCreated {
    /// The token string ([`JoinToken`]).
    pub token: String,
    /// Unix time it expires.
    pub expires_at: u64,
}

impl fmt::Debug for TokenCreated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenCreated")
            .field("token", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// An enrolled agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    /// Its name.
    pub name: String,
    /// Its id.
    pub node_id: NodeId,
    /// Unix time of its last authenticated request.
    pub last_seen: Option<u64>,
    /// Links it holds a side of.
    pub links: u64,
    /// The software version it last reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Its SPIFFE ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
}

/// An enrolled relay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayInfo {
    /// Its name.
    pub name: String,
    /// Its id.
    pub relay_id: RelayId,
    /// The address agents dial.
    pub public_addr: String,
    /// The address of its interactive listener, if it runs one.
    pub interactive_addr: Option<String>,
    /// Unix time of its last heartbeat.
    pub last_heartbeat: Option<u64>,
    /// Whether it heartbeats in time and gets links.
    pub healthy: bool,
    /// Its last reported load.
    pub load: RelayLoad,
    /// Links assigned to it.
    pub links: u64,
    /// The software version it last reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Its SPIFFE ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
}

/// What a link is, as the operator writes it: the body of
/// `POST PATH_LINKS`, and the first fields of [`LinkInfo`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkSpec {
    /// The link's name.
    pub name: String,
    /// The agent that listens (side A).
    pub from: String,
    /// Its listen spec (`tcp://127.0.0.1:PORT` or `unix:///path`).
    pub listen: String,
    /// The agent that dials the target (side B).
    pub to: String,
    /// The target spec (`tcp://host:port` or `unix:///path`).
    pub target: String,
    /// Unix listeners: allowed peer uids.
    #[serde(default)]
    pub allowed_uids: Vec<u32>,
    /// Unix listeners: allowed peer gids.
    #[serde(default)]
    pub allowed_gids: Vec<u32>,
    /// The workloads the listener admits: rules of selectors
    /// ([`crate::workload`]), at most [`crate::workload::MAX_RULES`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// Each flow's connection to the target starts with a PROXY protocol
    /// v2 header naming the caller (tcp:// and unix:// links).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub proxy_protocol: bool,
    /// Concurrent flows the relay lets the link have (`None`: unlimited).
    pub max_flows: Option<u32>,
    /// Bytes per second the relay lets the link carry in each direction
    /// (`None`: unlimited).
    pub rate_limit_bytes_per_sec: Option<u64>,
    /// A connection of its own for the link on both agents (see
    /// [`LinkHalf::connection`]); [`valid_connection_name`].
    pub connection: Option<String>,
}

/// `PATCH PATH_LINKS/{name}`: changes the limits the relays enforce.
/// A field left out stays as it is; `0` removes that limit. Open flows go
/// on; a new flow limit applies to new flows, a new rate to every flow,
/// within seconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkUpdate {
    /// Concurrent flows (`0`: unlimited).
    pub max_flows: Option<u32>,
    /// Bytes per second per direction (`0`: unlimited).
    pub rate_limit_bytes_per_sec: Option<u64>,
    /// The agents' connection of its own for the link (`""`: back to the
    /// shared one). Unlike the limits, this re-creates both agents' halves
    /// of the link: its open flows are reset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection: Option<String>,
}

/// A link as the operator sees it: its [`LinkSpec`] (flattened: the same
/// JSON fields side by side) and what the controller made of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkInfo {
    /// What the operator asked for.
    #[serde(flatten)]
    pub spec: LinkSpec,
    /// Its id.
    pub link_id: LinkId,
    /// Grant generation.
    pub generation: u64,
    /// Relay names, primary first (empty while no relay is healthy).
    pub relays: Vec<String>,
    /// Unix time created.
    pub created_at: u64,
    /// Its agents' refusals: a half refused is not served.
    #[serde(default)]
    pub refused: Vec<LinkRefused>,
    /// Its status, from what its agents report.
    #[serde(default)]
    pub status: LinkStatus,
    /// What it carries, as a relay last reported (none yet: it moved
    /// nothing since a relay began carrying it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic: Option<LinkTrafficInfo>,
}

/// `GET PATH_STATUS`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Enrolled agents.
    pub agents: u64,
    /// Enrolled relays.
    pub relays: u64,
    /// Relays heartbeating in time.
    pub healthy_relays: u64,
    /// Links.
    pub links: u64,
    /// Links with no healthy relay.
    pub unassigned_links: u64,
    /// The SPIFFE trust domain of the controller's relays and agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_domain: Option<String>,
}

mod console;
mod flows;
mod join;
mod rbac;
mod spiffe;
mod status;
mod traffic;

pub use console::{
    ConsoleSessionInfo, ConsoleSignIn, MAX_TOKEN_LEN, PATH_CONSOLE, PATH_CONSOLE_SCRIPT,
    PATH_CONSOLE_SESSION, PATH_CONSOLE_STYLE,
};
pub use flows::{
    AgentFlows, FlowInfo, FlowOutcome, FlowRecord, MAX_FLOWS_PER_QUERY, MAX_FLOWS_PER_REPORT,
    PATH_AGENT_FLOWS, PATH_FLOWS,
};
pub use join::{JOIN_TOKEN_PREFIX, JoinToken, JoinTokenError, MAX_JOIN_TOKEN_LEN};
pub use rbac::{
    ApiTokenInfo, AuditRecord, PrincipalCreate, PrincipalCreated, PrincipalInfo, PrincipalKind,
    RoleBindingCreate, RoleBindingInfo, RoleCreate, RoleInfo, Rule, UnknownPrincipalKind,
};
pub use spiffe::{
    BundleKey, BundleSet, MAX_BUNDLE_LEN, MAX_FEDERATED, PATH_AGENT_SVID, PATH_BUNDLES,
    PATH_SPIFFE_BUNDLE, SPIFFE_REFRESH_HINT_SECS, SpiffeBundle, TrustBundle,
};
pub use status::{
    AgentLinkStatus, HalfReport, HalfState, HalfStatus, LinkState, LinkStatus, MAX_STATUS_LINKS,
    MAX_STATUS_REASON_LEN, PATH_AGENT_LINK_STATUS, STATUS_REFRESH_SECS, STATUS_STALE_SECS,
    UnknownHalfState,
};
pub use traffic::{LinkTraffic, LinkTrafficInfo, MAX_TRAFFIC_PER_HEARTBEAT, MAX_VERSION_LEN};

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> JoinToken {
        JoinToken {
            id: "0123456789abcdef".into(),
            secret: "ab".repeat(32),
            ca_sha256: [7; 32],
            url: "https://127.0.0.1:8443".into(),
        }
    }

    #[test]
    fn join_token_round_trips_and_hides_its_secret() {
        let t = sample();
        let s = t.encode();
        assert_eq!(JoinToken::parse(&s), Ok(t.clone()));
        assert_eq!(JoinToken::parse(&format!("  {s}\n")), Ok(t.clone()));
        assert!(!format!("{t:?}").contains(&t.secret));
        let req = EnrolRequest {
            token_id: t.id.clone(),
            secret: t.secret.clone(),
            kind: NodeKind::Agent,
            sign_public_key: SignPublicKey([1; 32]),
            noise_public_key: None,
            public_addr: None,
            interactive_addr: None,
            csr_pem: None,
            svid_pem: None,
        };
        assert!(!format!("{req:?}").contains(&t.secret));
    }

    #[test]
    fn a_link_spec_is_written_flat_inside_link_info() {
        // LinkInfo's JSON holds the spec's fields beside its own, as it did
        // before the spec had a type: clients reading either keep working.
        let text = r#"{"name":"db","from":"a","listen":"tcp://127.0.0.1:1","to":"b",
            "target":"tcp://127.0.0.1:2","max_flows":4,"link_id":"00000000000000000000000000000009",
            "generation":3,"relays":["r1"],"created_at":7}"#;
        let info: LinkInfo = serde_json::from_str(text).expect("a flat LinkInfo parses");
        assert_eq!(info.spec.name, "db");
        assert_eq!(info.spec.max_flows, Some(4));
        assert!(info.spec.allowed_uids.is_empty() && info.refused.is_empty());
        assert_eq!(info.generation, 3);
        let value = serde_json::to_value(&info).expect("serialises");
        assert_eq!(value["target"], "tcp://127.0.0.1:2");
        assert_eq!(value["generation"], 3);
        assert!(value.get("spec").is_none(), "{value}");
        let back: LinkInfo = serde_json::from_value(value).expect("round trip");
        assert_eq!(back, info);
        // The create body still refuses a field it does not know.
        let spec = serde_json::to_value(&info.spec).expect("serialises");
        let mut bad = spec.clone();
        bad["generation"] = 3.into();
        assert!(serde_json::from_value::<LinkSpec>(bad).is_err());
        assert!(serde_json::from_value::<LinkSpec>(spec).is_ok());
    }

    #[test]
    fn connection_names_are_short_and_plain() {
        for good in [
            "ssh",
            "ctl.interactive",
            "A-1_b",
            &"x".repeat(MAX_CONNECTION_NAME_LEN),
        ] {
            assert!(valid_connection_name(good), "{good}");
        }
        for bad in [
            "",
            "a b",
            "lane/1",
            "é",
            &"x".repeat(MAX_CONNECTION_NAME_LEN + 1),
        ] {
            assert!(!valid_connection_name(bad), "{bad}");
        }
    }

    #[test]
    fn lane_fields_are_optional_both_ways() {
        // What a controller without lanes sends still parses, and what one
        // with lanes sends without them carries no new keys.
        let relay: RelayAddr = serde_json::from_str(
            r#"{"relay_id":"00000000000000000000000000000001","addr":"r:1","server_name":"r"}"#,
        )
        .expect("an old RelayAddr parses");
        assert_eq!(relay.interactive_addr, None);
        let json = serde_json::to_string(&relay).expect("encodes");
        assert!(!json.contains("interactive_addr"), "{json}");
        let with: RelayAddr = serde_json::from_str(&json.replace(
            r#""server_name":"r""#,
            r#""server_name":"r","interactive_addr":"r:2""#,
        ))
        .expect("parses");
        assert_eq!(with.interactive_addr.as_deref(), Some("r:2"));
    }

    #[test]
    fn join_token_refuses_what_is_not_one() {
        let good = sample().encode();
        for bad in [
            String::new(),
            good.replace("comsat-join-v1", "comsat-join-v2"),
            good.replace("https://", "http://"),
            good.replacen("0123456789abcdef", "0123456789ABCDEF", 1),
            good.replacen(&"ab".repeat(32), "ab", 1),
            format!("{good}{}", "x".repeat(MAX_JOIN_TOKEN_LEN)),
            "comsat-join-v1:0123456789abcdef".into(),
        ] {
            assert!(JoinToken::parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_are_dns_labels() {
        for ok in ["a", "db", "edge-1", "0", &"x".repeat(63)] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", "a b", &"x".repeat(64)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn relay_events_have_a_stable_json_form() {
        let e = RelayEvents {
            events: vec![
                RelayEvent {
                    seq: 1,
                    link_id: LinkId([1; 16]),
                    kind: RelayEventKind::Grant {
                        grant: "00ff".into(),
                    },
                },
                RelayEvent {
                    seq: 2,
                    link_id: LinkId([1; 16]),
                    kind: RelayEventKind::Revoke,
                },
            ],
            next: 2,
            more: false,
        };
        let json = serde_json::to_string(&e).expect("encodes");
        assert_eq!(
            json,
            r#"{"events":[{"seq":1,"link_id":"01010101010101010101010101010101","kind":"grant","grant":"00ff"},{"seq":2,"link_id":"01010101010101010101010101010101","kind":"revoke"}],"next":2,"more":false}"#
        );
        assert_eq!(
            serde_json::from_str::<RelayEvents>(&json).expect("decodes"),
            e
        );
    }

    proptest! {
        #[test]
        fn join_token_parse_never_panics(s in ".{0,200}") {
            let _ = JoinToken::parse(&s);
        }

        #[test]
        fn join_token_parse_round_trips(
            id in "[0-9a-f]{16}",
            secret in "[0-9a-f]{64}",
            ca in any::<[u8; 32]>(),
            host in "[a-z0-9.-]{1,40}",
            port in any::<u16>(),
        ) {
            let t = JoinToken { id, secret, ca_sha256: ca, url: format!("https://{host}:{port}") };
            prop_assert_eq!(JoinToken::parse(&t.encode()), Ok(t));
        }
    }
}
