//! Storage: one trait, [`Store`], with every database operation the API
//! needs, and its backends.
//!
//! Each method is one transaction. Operations that must be atomic — join
//! token redemption, creating or re-granting a link together with its relay
//! events and the agents' config version bumps — are single methods, so a
//! backend cannot get them half right. [`SqlStore`] implements it on SQLite (the embedded
//! default) and on PostgreSQL.

mod sql;

pub use sql::{Backend, CHANGES_CHANNEL, SqlStore, SqliteStore};

/// Support for tests that run on PostgreSQL.
pub mod testing {
    use sqlx::Connection;

    /// Where tests find a PostgreSQL server: a URL ending in a database
    /// name, whose role may create databases (`.ci/run` sets one up).
    pub const POSTGRES_ENV: &str = "COMSAT_TEST_POSTGRES_URL";

    /// The test server's URL, or `None` after printing why the calling
    /// test skips its PostgreSQL part.
    pub fn postgres_server() -> Option<String> {
        match std::env::var(POSTGRES_ENV) {
            Ok(url) => Some(url),
            Err(_) => {
                eprintln!(
                    "skipped on PostgreSQL: set {POSTGRES_ENV}=postgres://USER:PASS@HOST/postgres \
                     (a role that may create databases) to run it there"
                );
                None
            }
        }
    }

    /// Creates a database with a random name on the server of `admin`
    /// and returns its URL.
    pub async fn fresh_database(admin: &str) -> Result<String, sqlx::Error> {
        let name = format!("comsat_test_{}", hex::encode(rand::random::<[u8; 6]>()));
        let mut conn = sqlx::PgConnection::connect(admin).await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await?;
        let _ = conn.close().await;
        let (base, query) = match admin.split_once('?') {
            Some((b, q)) => (b, format!("?{q}")),
            None => (admin, String::new()),
        };
        let server = base.rsplit_once('/').map_or(base, |(s, _)| s);
        Ok(format!("{server}/{name}{query}"))
    }
}

use std::collections::HashMap;

use async_trait::async_trait;
use comsat_protocol::api::{
    self as api, AuditRecord, HalfReport, HalfState, JoinTokenInfo, NodeKind, PrincipalInfo,
    PrincipalKind, RelayLoad, RoleBindingCreate,
};
use comsat_protocol::{LinkId, NodeId, NoisePublicKey, RelayId, SignPublicKey};

/// A PostgreSQL connection URL. It may carry a password, so `Debug` and
/// `Display` show it without one (and without query parameters).
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(String);

/// Longest database URL accepted.
const MAX_DATABASE_URL_LEN: usize = 4096;

/// A database URL that [`DatabaseUrl::parse`] refused. The message never
/// repeats the URL: it may hold a password.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DatabaseUrlError {
    /// Not a PostgreSQL URL.
    #[error(
        "expected postgres://USER:PASSWORD@HOST:PORT/DATABASE (SQLite needs no URL: \
         it is the file controller.db in the data dir)"
    )]
    NotPostgres,
    /// Longer than 4096 bytes.
    #[error(
        "the database URL is {len} bytes long; at most {MAX_DATABASE_URL_LEN} are accepted \
         (expected postgres://USER:PASSWORD@HOST:PORT/DATABASE)"
    )]
    TooLong {
        /// Its length in bytes.
        len: usize,
    },
}

impl DatabaseUrl {
    /// Checks that `s` is a `postgres://` or `postgresql://` URL.
    pub fn parse(s: &str) -> Result<Self, DatabaseUrlError> {
        if !(s.starts_with("postgres://") || s.starts_with("postgresql://")) {
            return Err(DatabaseUrlError::NotPostgres);
        }
        if s.len() > MAX_DATABASE_URL_LEN {
            return Err(DatabaseUrlError::TooLong { len: s.len() });
        }
        Ok(Self(s.to_owned()))
    }

    /// The URL itself, password included: only for connecting.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL without password or query.
    pub fn redacted(&self) -> String {
        let base = self.0.split('?').next().unwrap_or_default();
        let Some((scheme, rest)) = base.split_once("://") else {
            return "postgres://…".into();
        };
        match rest.rsplit_once('@') {
            Some((user, host)) => {
                let user = user.split(':').next().unwrap_or_default();
                format!("{scheme}://{user}:***@{host}")
            }
            None => format!("{scheme}://{rest}"),
        }
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl std::fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// A storage operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database failed or could not be reached.
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    /// The PostgreSQL server's TLS certificate was refused (or TLS
    /// failed), under the URL's `sslmode`.
    #[error(
        "the database server's TLS was refused: {0} (with sslmode=verify-full its certificate \
         must chain to the sslrootcert file of the URL and name the URL's host)"
    )]
    DbTls(String),
    /// Applying the schema migrations failed.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A row holds something that does not parse (the database was edited
    /// by hand or is corrupt).
    #[error("corrupt database row: {0}")]
    Corrupt(String),
    /// No join token has this id and secret.
    #[error("unknown join token")]
    UnknownToken,
    /// The join token was redeemed before.
    #[error("join token already used")]
    TokenUsed,
    /// The join token expired (and is now used up).
    #[error("join token expired; ask the operator for a new one (`comsat ctl token create`)")]
    TokenExpired,
    /// The join token enrols the other kind of node (it was not consumed).
    #[error("this token enrols a {token_kind}; run `comsat {token_kind} enrol`")]
    WrongKind {
        /// The kind the token enrols.
        token_kind: NodeKind,
    },
    /// A node of this kind already has this name.
    #[error("a {kind} named `{name}` is already enrolled")]
    NodeNameTaken {
        /// Its kind.
        kind: NodeKind,
        /// The name.
        name: String,
    },
    /// A link already has this name.
    #[error("a link named `{0}` already exists")]
    LinkNameTaken(String),
    /// Something of this kind already has this name (`role `x``, …).
    #[error("{0} already exists")]
    Exists(String),
}

/// An API token to store (only the hash of its value).
#[derive(Clone, Debug)]
pub struct NewApiToken {
    /// SHA-256 of the whole token, hex.
    pub hash: String,
    /// Its public id.
    pub id: String,
    /// Unix time created.
    pub created_at: u64,
    /// Unix time it expires, if it does.
    pub expires_at: Option<u64>,
}

/// A stored API token, found by its hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiTokenRecord {
    /// Whose.
    pub kind: PrincipalKind,
    /// Their name.
    pub name: String,
    /// Its id.
    pub id: String,
    /// Unix time it expires, if it does.
    pub expires_at: Option<u64>,
    /// Unix time it was revoked, if it was.
    pub revoked_at: Option<u64>,
}

/// A console session, found by the SHA-256 of its cookie; it acts for the
/// API token it was opened with (by that token's hash), until it expires.
#[derive(Clone, PartialEq, Eq)]
pub struct ConsoleSession {
    /// SHA-256 of the session cookie, hex.
    pub id_hash: String,
    /// The hash of the API token it was opened with (as `api_tokens`
    /// keeps it).
    pub token_hash: String,
    /// The token a change request must carry in `X-CSRF-Token`.
    pub csrf: String,
    /// Unix time it was opened.
    pub created_at: u64,
    /// Unix time it ends.
    pub expires_at: u64,
}

impl std::fmt::Debug for ConsoleSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleSession")
            .field("created_at", &self.created_at)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// A link's latest counters from one relay, with the rate since the
/// report before.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrafficRecord {
    /// The link.
    pub link_id: LinkId,
    /// The relay that reported it.
    pub relay: NodeId,
    /// Bytes from side A to side B.
    pub a_to_b: u64,
    /// Bytes from side B to side A.
    pub b_to_a: u64,
    /// Flows open.
    pub flows_open: u64,
    /// Bytes per second from A to B since the report before.
    pub rate_a_to_b: u64,
    /// Bytes per second from B to A.
    pub rate_b_to_a: u64,
    /// Unix time of the report.
    pub at: u64,
}

/// A join token to store (the secret itself is never stored).
#[derive(Clone, Debug)]
pub struct NewJoinToken {
    /// Its id (16 hex digits).
    pub id: String,
    /// SHA-256 of the secret, hex.
    pub secret_hash: String,
    /// What it enrols.
    pub kind: NodeKind,
    /// The name the node gets, if fixed.
    pub name: Option<String>,
    /// Unix time it expires.
    pub expires_at: u64,
    /// Unix time it was created.
    pub created_at: u64,
}

/// A redemption attempt.
#[derive(Clone, Debug)]
pub struct Redemption {
    /// The token's id.
    pub token_id: String,
    /// SHA-256 of the presented secret, hex.
    pub secret_hash: String,
    /// The kind the node enrols as.
    pub kind: NodeKind,
    /// Unix time now.
    pub now: u64,
}

/// A node to register on redemption.
#[derive(Clone, Debug)]
pub struct NewNode {
    /// Its id.
    pub node_id: NodeId,
    /// Its ed25519 key.
    pub sign_pub: SignPublicKey,
    /// Agents: their Noise key.
    pub noise_pub: Option<NoisePublicKey>,
    /// Relays: the `host:port` agents dial.
    pub public_addr: Option<String>,
    /// Relays: the `host:port` of their interactive listener, if any.
    pub interactive_addr: Option<String>,
    /// Relays that bring their own certificate: its SPIFFE ID (in a
    /// federated trust domain).
    pub spiffe_id: Option<String>,
}

/// An enrolled node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRecord {
    /// Its id.
    pub node_id: NodeId,
    /// Agent or relay.
    pub kind: NodeKind,
    /// Its name (unique per kind).
    pub name: String,
    /// Its ed25519 key (verifies its JWTs; named in grants).
    pub sign_pub: SignPublicKey,
    /// Agents: their Noise key.
    pub noise_pub: Option<NoisePublicKey>,
    /// Relays: the address agents dial.
    pub public_addr: Option<String>,
    /// Relays: the address of their interactive listener, if any.
    pub interactive_addr: Option<String>,
    /// Relays that brought their own certificate: its SPIFFE ID.
    pub spiffe_id: Option<String>,
    /// Unix time enrolled.
    pub created_at: u64,
    /// Unix time of its last authenticated request.
    pub last_seen: Option<u64>,
    /// Relays: Unix time of the last heartbeat.
    pub last_heartbeat: Option<u64>,
    /// Relays: the last reported load.
    pub load: RelayLoad,
    /// Agents: the version of their desired state.
    pub config_version: u64,
}

impl NodeRecord {
    /// The relay id of a relay node (the same 16 bytes as its node id).
    pub fn relay_id(&self) -> RelayId {
        RelayId(self.node_id.0)
    }
}

/// A link as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkRecord {
    /// Its id.
    pub link_id: LinkId,
    /// Its name (unique).
    pub name: String,
    /// Grant generation, bumped on every change of its relay list.
    pub generation: u64,
    /// Side A: the agent that listens.
    pub from_node: NodeId,
    /// Side A's listen spec.
    pub listen: String,
    /// Side B: the agent that dials the target.
    pub to_node: NodeId,
    /// Side B's target spec.
    pub target: String,
    /// Unix listeners: allowed peer uids.
    pub allowed_uids: Vec<u32>,
    /// Unix listeners: allowed peer gids.
    pub allowed_gids: Vec<u32>,
    /// Listeners: the workloads admitted (`comsat_protocol::workload`).
    pub allow: Vec<String>,
    /// Side B writes a PROXY protocol v2 header to the target.
    pub proxy_protocol: bool,
    /// Assigned relays, primary first (empty: unassigned).
    pub relays: Vec<RelayId>,
    /// Unix time created.
    pub created_at: u64,
    /// Unix time the current grant expires (0: no grant).
    pub grant_not_after: u64,
    /// Concurrent flows the relays allow (`None`: unlimited).
    pub max_flows: Option<u32>,
    /// Bytes per second per direction the relays allow (`None`: unlimited).
    pub rate_limit: Option<u64>,
    /// The agents' connection of its own for the link (`None`: shared).
    pub connection: Option<String>,
}

/// A relay event to append.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewEvent {
    /// The relay it is for.
    pub relay_id: RelayId,
    /// The link concerned.
    pub link_id: LinkId,
    /// The signed grant (hex), or `None` for a revocation.
    pub grant_hex: Option<String>,
}

/// A stored relay event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventRecord {
    /// Its position in the log.
    pub seq: u64,
    /// The link concerned.
    pub link_id: LinkId,
    /// The signed grant (hex), or `None` for a revocation.
    pub grant_hex: Option<String>,
}

/// A change of a link's grant: a new relay list (new generation) or a
/// renewal (same generation, later expiry).
#[derive(Clone, Debug)]
pub struct LinkGrantUpdate {
    /// The link.
    pub link_id: LinkId,
    /// The generation the caller read; the update is skipped if the link
    /// has changed since (optimistic concurrency).
    pub expected_generation: u64,
    /// The new generation.
    pub generation: u64,
    /// The new relay list.
    pub relays: Vec<RelayId>,
    /// The new grant's expiry (0: no grant).
    pub grant_not_after: u64,
    /// Events to append (grants for the new relays, revocations for the
    /// dropped ones).
    pub events: Vec<NewEvent>,
    /// Whether both agents' config versions go up (their relay set changed).
    pub bump_agents: bool,
}

/// Seconds an agent's report that it left a relay stands before the same
/// agent may move the same link again ([`Store::record_peer_moves`]).
pub const PEER_MOVE_SPACING_SECS: u64 = 5;

/// What a flow log query asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowQuery {
    /// Flows of this link only.
    pub link: Option<LinkId>,
    /// Flows whose caller has this SPIFFE ID (`spiffe://…`) or this
    /// selector.
    pub identity: Option<String>,
    /// Flows that ended at or after this Unix time (milliseconds).
    pub since_ms: u64,
    /// And at or before this one.
    pub until_ms: u64,
    /// The most records answered.
    pub limit: u32,
}

/// Every database operation of the controller.
#[async_trait]
pub trait Store: Send + Sync {
    /// Creates the `admin` user with its first token, bound to the
    /// built-in `admin` role (at `controller init`).
    async fn bootstrap_admin(&self, token: &NewApiToken) -> Result<(), StoreError>;

    /// The API token with this hash, if any (even expired or revoked: the
    /// caller decides).
    async fn api_token(&self, hash: &str) -> Result<Option<ApiTokenRecord>, StoreError>;

    /// Creates a user or service account with its first token.
    async fn create_principal(
        &self,
        kind: PrincipalKind,
        name: &str,
        token: &NewApiToken,
    ) -> Result<(), StoreError>;

    /// Deletes a user or service account, its tokens and its bindings;
    /// `false` if there was none.
    async fn delete_principal(&self, kind: PrincipalKind, name: &str) -> Result<bool, StoreError>;

    /// Users or service accounts, with their tokens.
    async fn principals(&self, kind: PrincipalKind) -> Result<Vec<PrincipalInfo>, StoreError>;

    /// Adds a token to an existing user or service account; `false` if
    /// there is none.
    async fn add_principal_token(
        &self,
        kind: PrincipalKind,
        name: &str,
        token: &NewApiToken,
    ) -> Result<bool, StoreError>;

    /// Revokes one token of a user or service account; `false` if it has
    /// no such (unrevoked) token.
    async fn revoke_token(
        &self,
        kind: PrincipalKind,
        name: &str,
        id: &str,
        now: u64,
    ) -> Result<bool, StoreError>;

    /// Creates a role (`rules` as JSON).
    async fn create_role(&self, name: &str, rules: &str, now: u64) -> Result<(), StoreError>;

    /// The rules (JSON) of a stored role.
    async fn role(&self, name: &str) -> Result<Option<String>, StoreError>;

    /// Every stored role and its rules (JSON), by name.
    async fn roles(&self) -> Result<Vec<(String, String)>, StoreError>;

    /// Deletes a role; `false` if there was none.
    async fn delete_role(&self, name: &str) -> Result<bool, StoreError>;

    /// Creates a role binding.
    async fn create_binding(&self, b: &RoleBindingCreate, now: u64) -> Result<(), StoreError>;

    /// Every role binding, by name.
    async fn bindings(&self) -> Result<Vec<RoleBindingCreate>, StoreError>;

    /// The roles bound to a subject.
    async fn roles_of(&self, kind: PrincipalKind, name: &str) -> Result<Vec<String>, StoreError>;

    /// Deletes a role binding; `false` if there was none.
    async fn delete_binding(&self, name: &str) -> Result<bool, StoreError>;

    /// Stores a new join token.
    async fn create_join_token(&self, token: &NewJoinToken) -> Result<(), StoreError>;

    /// Join tokens not yet used nor expired at `now`, oldest first (at
    /// most 1000).
    async fn open_join_tokens(&self, now: u64) -> Result<Vec<JoinTokenInfo>, StoreError>;

    /// Redeems a join token and registers the node, atomically: of two
    /// racing redemptions exactly one wins. An expired token is used up
    /// and refused; a token of the other kind is refused and left unused.
    /// The node is named after the token, or `<kind>-<8 hex>`.
    async fn redeem_join_token(
        &self,
        redemption: &Redemption,
        node: &NewNode,
    ) -> Result<NodeRecord, StoreError>;

    /// One node by id.
    async fn node(&self, id: &NodeId) -> Result<Option<NodeRecord>, StoreError>;

    /// One node by kind and name.
    async fn node_by_name(
        &self,
        kind: NodeKind,
        name: &str,
    ) -> Result<Option<NodeRecord>, StoreError>;

    /// Every node of a kind, by name.
    async fn nodes(&self, kind: NodeKind) -> Result<Vec<NodeRecord>, StoreError>;

    /// Records a JWT id until `expires_at`; `false` if it was seen before.
    async fn record_jti(
        &self,
        jti: &str,
        node: &NodeId,
        expires_at: u64,
    ) -> Result<bool, StoreError>;

    /// Forgets JWT ids that expired before `now`; returns how many.
    async fn purge_jtis(&self, now: u64) -> Result<u64, StoreError>;

    /// Appends an audit record (the log is append-only: nothing updates
    /// a record; only [`Self::purge_audit`] removes old ones).
    async fn append_audit(&self, record: &AuditRecord) -> Result<(), StoreError>;

    /// Audit records at or after `since_ms`, of `subject` if given (a
    /// prefix: `agent:` matches every agent) and of outcome `result` if
    /// given, oldest first, at most `limit` (the newest ones when there are
    /// more).
    async fn audit(
        &self,
        since_ms: u64,
        subject: Option<&str>,
        result: Option<&str>,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, StoreError>;

    /// Removes audit records older than `before_ms` (retention); returns
    /// how many.
    async fn purge_audit(&self, before_ms: u64) -> Result<u64, StoreError>;

    /// Sets a node's `last_seen`.
    async fn touch_node(&self, id: &NodeId, now: u64) -> Result<(), StoreError>;

    /// Stores a relay heartbeat.
    async fn heartbeat(&self, id: &NodeId, load: &RelayLoad, now: u64) -> Result<(), StoreError>;

    /// Creates a link with its first events, and bumps both agents' config
    /// versions. Fails with [`StoreError::LinkNameTaken`] if the name is.
    async fn create_link(&self, link: &LinkRecord, events: &[NewEvent]) -> Result<(), StoreError>;

    /// One link by name.
    async fn link_by_name(&self, name: &str) -> Result<Option<LinkRecord>, StoreError>;

    /// Every link, by name.
    async fn links(&self) -> Result<Vec<LinkRecord>, StoreError>;

    /// Removes an enrolled node: its JWTs stop working at once. An agent
    /// must hold no link (the caller checks); a relay's events go with it.
    /// `false` if there was none.
    async fn delete_node(&self, id: &NodeId) -> Result<bool, StoreError>;

    /// The links an agent holds a side of, by name.
    async fn links_of_agent(&self, agent: &NodeId) -> Result<Vec<LinkRecord>, StoreError>;

    /// Deletes a link, appends a revocation for each of its relays and
    /// bumps both agents' config versions. Returns the deleted link.
    async fn delete_link(&self, name: &str, now: u64) -> Result<Option<LinkRecord>, StoreError>;

    /// Applies a grant change unless the link changed meanwhile; `false`
    /// if it did (or is gone) and nothing was written.
    async fn update_link_grant(
        &self,
        update: &LinkGrantUpdate,
        now: u64,
    ) -> Result<bool, StoreError>;

    /// Sets a link's limits and appends its re-signed grant events (same
    /// generation: open flows go on) unless the link changed meanwhile;
    /// `false` if it did (or is gone) and nothing was written.
    async fn update_link_limits(
        &self,
        link_id: &LinkId,
        expected_generation: u64,
        max_flows: Option<u32>,
        rate_limit: Option<u64>,
        events: &[NewEvent],
        now: u64,
    ) -> Result<bool, StoreError>;

    /// Sets the agents' connection of a link (`None`: the shared one) and
    /// bumps both agents' config versions; `false` if the link is gone.
    async fn set_link_connection(
        &self,
        link_id: &LinkId,
        connection: Option<&str>,
    ) -> Result<bool, StoreError>;

    /// A number that changes whenever nodes have something new to hear
    /// (relay events, agents' config): controllers sharing the database
    /// poll it to wake their long polls.
    async fn change_mark(&self) -> Result<u64, StoreError>;

    /// A relay's events after `since`, oldest first, at most `limit`.
    async fn relay_events(
        &self,
        relay: &RelayId,
        since: u64,
        limit: usize,
    ) -> Result<Vec<EventRecord>, StoreError>;

    /// The highest event seq of all relays (0 if none).
    async fn max_event_seq(&self) -> Result<u64, StoreError>;

    /// Whether `r` would redeem its join token now, changing nothing (the
    /// errors of [`Store::redeem_join_token`]).
    async fn check_join_token(&self, r: &Redemption) -> Result<(), StoreError>;

    /// Makes `refused` (link, reason) the link halves `agent` refuses, in
    /// place of what it refused before; returns those new or with a new
    /// reason.
    async fn set_refusals(
        &self,
        agent: &NodeId,
        refused: &[(LinkId, String)],
        now: u64,
    ) -> Result<Vec<(LinkId, String)>, StoreError>;

    /// Every link half refused by its agent.
    async fn refusals(&self) -> Result<Vec<RefusalRecord>, StoreError>;

    /// Makes `halves` what `agent` reports of the link halves it holds, in
    /// place of what it reported before. A half keeps the time it entered
    /// its state while its state stays the same. Returns the halves whose
    /// state changed (or that are new).
    async fn set_link_status(
        &self,
        agent: &NodeId,
        halves: &[HalfReport],
        now: u64,
    ) -> Result<Vec<HalfRecord>, StoreError>;

    /// Every link half's last reported state.
    async fn link_statuses(&self) -> Result<Vec<HalfRecord>, StoreError>;

    /// `agent` left `relay` (it stopped answering) at `now`, on `links`
    /// (its links placed there): records it for each, in place of what
    /// the agent said before of that link, and bumps the config version of
    /// each link's other agent. A link the agent moved less than
    /// [`PEER_MOVE_SPACING_SECS`] ago is left as it is, so that an agent
    /// cannot make its peers hop (or load the database) faster than that.
    /// Returns how many links it recorded.
    async fn record_peer_moves(
        &self,
        agent: &NodeId,
        relay: &RelayId,
        links: &[LinkId],
        now: u64,
    ) -> Result<usize, StoreError>;

    /// What the peers of `agent`'s links said they left at `since` or
    /// later: (link, relay, at).
    async fn peer_moves(
        &self,
        agent: &NodeId,
        since: u64,
    ) -> Result<Vec<(LinkId, RelayId, u64)>, StoreError>;

    /// Stores what relay `relay` reported of its links (those whose grant
    /// names it; others are ignored).
    async fn record_traffic(
        &self,
        relay: &NodeId,
        traffic: &[api::LinkTraffic],
        now: u64,
    ) -> Result<(), StoreError>;

    /// Every link's latest report from each relay.
    async fn traffic(&self) -> Result<Vec<TrafficRecord>, StoreError>;

    /// Forgets traffic reports made before `before` (the link moved, or
    /// went quiet); how many.
    async fn purge_traffic(&self, before: u64) -> Result<u64, StoreError>;

    /// Keeps the flow records agent `agent` reported (one kept already is
    /// left as it is).
    async fn add_flows(&self, agent: &NodeId, flows: &[api::FlowRecord]) -> Result<(), StoreError>;

    /// The flow records `q` asks for, the latest ended first, with the
    /// agent that reported each.
    async fn flows(&self, q: &FlowQuery) -> Result<Vec<(NodeId, api::FlowRecord)>, StoreError>;

    /// Removes flow records that ended before `before_ms`, and the oldest
    /// beyond the newest `max`; how many.
    async fn purge_flows(&self, before_ms: u64, max: u64) -> Result<u64, StoreError>;

    /// The bundles of the federated trust domains, by trust domain.
    async fn bundles(&self) -> Result<Vec<api::TrustBundle>, StoreError>;

    /// Sets a federated trust domain's bundle; every agent's desired state
    /// changes (its relays may chain to it).
    async fn set_bundle(&self, bundle: &api::TrustBundle, now: u64) -> Result<(), StoreError>;

    /// Removes a federated trust domain's bundle (`false`: there was none);
    /// every agent's desired state changes.
    async fn delete_bundle(&self, trust_domain: &str) -> Result<bool, StoreError>;

    /// Stores the software version node `node` reports.
    async fn set_version(&self, node: &NodeId, version: &str, now: u64) -> Result<(), StoreError>;

    /// The software version each node last reported.
    async fn versions(&self) -> Result<HashMap<NodeId, String>, StoreError>;

    /// Stores a console session, forgets those expired at `now`, and ends
    /// the oldest of its token's sessions beyond the newest `most`.
    async fn create_console_session(
        &self,
        s: &ConsoleSession,
        now: u64,
        most: usize,
    ) -> Result<(), StoreError>;

    /// The console session whose cookie has this hash, if any (even
    /// expired: the caller decides).
    async fn console_session(&self, id_hash: &str) -> Result<Option<ConsoleSession>, StoreError>;

    /// Ends a console session; `false` if there was none.
    async fn delete_console_session(&self, id_hash: &str) -> Result<bool, StoreError>;

    /// Answers if the database does (a trivial query).
    async fn ping(&self) -> Result<(), StoreError>;

    /// The connections of its pool: (open, idle).
    fn pool_connections(&self) -> (u32, usize);

    /// Closes the connections (the store is unusable afterwards).
    async fn close(&self);
}

/// A link half as its agent last reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HalfRecord {
    /// The link.
    pub link_id: LinkId,
    /// The agent holding the half.
    pub agent: NodeId,
    /// Its state.
    pub state: HalfState,
    /// Why, as the agent said.
    pub reason: Option<String>,
    /// The relay it is attached to.
    pub relay_id: Option<RelayId>,
    /// Unix time (the controller's) it entered `state`.
    pub since: u64,
}

/// A link half its agent refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefusalRecord {
    /// The link.
    pub link_id: LinkId,
    /// The agent that refused it.
    pub agent: NodeId,
    /// Why.
    pub reason: String,
    /// Unix time it said so.
    pub at: u64,
}

#[cfg(test)]
mod url_tests {
    use super::DatabaseUrl;

    #[test]
    fn a_database_url_never_shows_its_password() {
        let u = DatabaseUrl::parse("postgres://comsat:s3cret@db.example:5432/comsat?password=x")
            .expect("valid");
        for shown in [format!("{u}"), format!("{u:?}")] {
            assert!(
                !shown.contains("s3cret") && !shown.contains("password=x"),
                "{shown}"
            );
            assert_eq!(shown, "postgres://comsat:***@db.example:5432/comsat");
        }
        assert!(u.expose().contains("s3cret"));
        assert!(DatabaseUrl::parse("mysql://x").is_err());
        assert!(DatabaseUrl::parse("controller.db").is_err());
    }
}
