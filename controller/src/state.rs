//! The controller's shared state and the logic behind the API: link
//! creation and deletion, relay assignment, grant signing and renewal.

use std::collections::HashMap;
use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use comsat_protocol::api::{ErrorBody, NodeKind};
use comsat_protocol::grant::{Grant, GrantSide, LinkLimits};
use comsat_protocol::{LinkId, NodeId, RelayId, SigningKey};
use tokio::sync::{Mutex, watch};

use crate::assign::{self, Candidate};
use crate::config::ControllerConfig;
use crate::pki::CaIssuer;
use crate::store::{LinkGrantUpdate, LinkRecord, NewEvent, NodeRecord, Store, StoreError};

/// An API failure: a status and a message for [`ErrorBody`].
#[derive(Debug)]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    pub(crate) fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, message)
    }
    pub(crate) fn too_many() -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "too many failed attempts from this address; try again in {} s",
                crate::audit::RETRY_AFTER.as_secs()
            ),
        )
    }
    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
    pub(crate) fn internal(what: &str, e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "{what}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("internal error ({what}); see the controller log"),
        )
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let status = match &e {
            StoreError::UnknownToken | StoreError::TokenUsed | StoreError::TokenExpired => {
                StatusCode::UNAUTHORIZED
            }
            StoreError::WrongKind { .. } => StatusCode::FORBIDDEN,
            StoreError::NodeNameTaken { .. }
            | StoreError::LinkNameTaken(_)
            | StoreError::Exists(_) => StatusCode::CONFLICT,
            _ => return Self::internal("database", e),
        };
        Self::new(status, e.to_string())
    }
}

impl From<crate::rbac::RbacError> for ApiError {
    fn from(e: crate::rbac::RbacError) -> Self {
        Self::bad_request(e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            axum::Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response()
    }
}

/// Everything the handlers and background tasks share.
pub(crate) struct Shared {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) config: ControllerConfig,
    pub(crate) authority: SigningKey,
    pub(crate) audience: String,
    pub(crate) ca_pem: String,
    pub(crate) ca_sha256: [u8; 32],
    pub(crate) relay_ca: CaIssuer,
    /// The trust domain's SPIFFE bundle (JSON): the authorities of
    /// `relay_ca`, which signs every SVID.
    pub(crate) spiffe_bundle: String,
    /// Bumped after every write that a long poll may be waiting for.
    pub(crate) changes: watch::Sender<u64>,
    /// Becomes `true` when the server shuts down.
    pub(crate) shutdown: watch::Receiver<bool>,
    /// Serialises link changes within this process.
    pub(crate) link_lock: Mutex<()>,
    /// Unix time the controller started (assignment waits for heartbeats).
    pub(crate) started_at: u64,
    /// Enrolment attempts per source address.
    pub(crate) enrol_limit: crate::audit::SourceLimiter,
    /// Failed authentications per source address.
    pub(crate) auth_limit: crate::audit::SourceLimiter,
    /// Renders this process's metrics, where it records them.
    pub(crate) metrics: Option<crate::MetricsText>,
    /// The event cursor each relay long-polling this controller last sent
    /// (what it has fetched), for its pending events in `/metrics`.
    pub(crate) relay_cursors: std::sync::Mutex<HashMap<RelayId, u64>>,
}

impl Shared {
    /// The SPIFFE ID of the node `name` of `kind` in this controller's
    /// trust domain.
    pub(crate) fn spiffe_id(&self, kind: NodeKind, name: &str) -> String {
        comsat_protocol::spiffe::node_spiffe_id(&self.config.trust_domain(), kind, name)
    }

    /// The SPIFFE ID of `node`: the one its own certificate carries (a
    /// relay of a federated trust domain), or its ID in this controller's.
    pub(crate) fn node_spiffe_id(&self, node: &NodeRecord) -> String {
        node.spiffe_id
            .clone()
            .unwrap_or_else(|| self.spiffe_id(node.kind, &node.name))
    }

    /// The relays' event cursors ([`Shared::relay_cursors`]).
    pub(crate) fn relay_cursors(&self) -> std::sync::MutexGuard<'_, HashMap<RelayId, u64>> {
        self.relay_cursors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Wakes every long poll to look again.
    pub(crate) fn notify(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Whether a relay heartbeats in time at `now`.
    pub(crate) fn healthy(&self, relay: &NodeRecord, now: u64) -> bool {
        relay
            .last_heartbeat
            .is_some_and(|t| t.saturating_add(self.config.heartbeat_timeout_secs) >= now)
    }

    /// Every relay, and the healthy ones as assignment candidates.
    pub(crate) async fn relays(
        &self,
        now: u64,
    ) -> Result<(Vec<NodeRecord>, Vec<Candidate>), StoreError> {
        let relays = self.store.nodes(NodeKind::Relay).await?;
        let healthy = relays
            .iter()
            .filter(|r| self.healthy(r, now))
            .map(|r| Candidate {
                relay_id: r.relay_id(),
                connections: r.load.connections,
            })
            .collect();
        Ok((relays, healthy))
    }

    async fn agent(&self, id: &NodeId) -> Result<NodeRecord, ApiError> {
        match self.store.node(id).await? {
            Some(n) if n.kind == NodeKind::Agent => Ok(n),
            _ => Err(ApiError::internal(
                "link names a missing agent",
                format!("node {id} is not an enrolled agent"),
            )),
        }
    }

    /// Signs the grant of `link` for `relays`; `None` when there is none.
    async fn grant_hex(
        &self,
        link: &LinkRecord,
        generation: u64,
        relays: &[RelayId],
        not_after: u64,
    ) -> Result<Option<String>, ApiError> {
        if relays.is_empty() {
            return Ok(None);
        }
        let a = self.agent(&link.from_node).await?;
        let b = self.agent(&link.to_node).await?;
        let grant = Grant {
            link_id: link.link_id,
            generation,
            relays: relays.to_vec(),
            side_a: GrantSide {
                node_id: a.node_id,
                sign_pub: a.sign_pub,
            },
            side_b: GrantSide {
                node_id: b.node_id,
                sign_pub: b.sign_pub,
            },
            not_after,
            buffer_limit: self.config.link_buffer_limit,
            limits: LinkLimits {
                max_flows: link.max_flows,
                rate_bytes_per_sec: link.rate_limit,
            },
        };
        let signed = grant
            .sign(&self.authority)
            .and_then(|s| s.encode())
            .map_err(|e| ApiError::internal("signing a grant", e))?;
        Ok(Some(hex::encode(signed)))
    }

    fn grant_events(link: LinkId, relays: &[RelayId], grant: Option<&String>) -> Vec<NewEvent> {
        grant.map_or_else(Vec::new, |g| {
            relays
                .iter()
                .map(|r| NewEvent {
                    relay_id: *r,
                    link_id: link,
                    grant_hex: Some(g.clone()),
                })
                .collect()
        })
    }

    /// Refuses (409) a link whose listening agent already listens at the
    /// same address for another link: the second could never bind there.
    async fn check_listen_free(&self, link: &LinkRecord) -> Result<(), ApiError> {
        let key = listen_key(&link.listen);
        let taken = self
            .store
            .links_of_agent(&link.from_node)
            .await?
            .into_iter()
            .find(|l| l.from_node == link.from_node && listen_key(&l.listen) == key);
        match taken {
            Some(other) => Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "listen `{}`: this agent already listens there for link `{}`; choose another \
                     listen address, or delete that link first (`comsat ctl link delete {}`)",
                    link.listen, other.name, other.name
                ),
            )),
            None => Ok(()),
        }
    }

    /// Creates a link (already validated), assigning relays if any is
    /// healthy, and pushes its grants.
    pub(crate) async fn create_link(
        &self,
        mut link: LinkRecord,
        now: u64,
    ) -> Result<LinkRecord, ApiError> {
        let _guard = self.link_lock.lock().await;
        self.check_listen_free(&link).await?;
        let (_, healthy) = self.relays(now).await?;
        link.relays = assign::rendezvous(&link.link_id, &healthy, self.config.relays_per_link);
        link.grant_not_after = if link.relays.is_empty() {
            0
        } else {
            now.saturating_add(self.config.grant_ttl_secs)
        };
        let grant = self
            .grant_hex(&link, link.generation, &link.relays, link.grant_not_after)
            .await?;
        let events = Self::grant_events(link.link_id, &link.relays, grant.as_ref());
        self.store.create_link(&link, &events).await?;
        self.notify();
        tracing::info!(
            link = %link.name,
            link_id = %link.link_id,
            relays = link.relays.len(),
            "link created"
        );
        Ok(link)
    }

    /// Changes a link's limits: its grant is re-signed with the same
    /// generation (relays apply it to new flows; open flows go on) and
    /// pushed to its relays. Agents see no change.
    pub(crate) async fn update_link_limits(
        &self,
        name: &str,
        update: &comsat_protocol::api::LinkUpdate,
        now: u64,
    ) -> Result<Option<LinkRecord>, ApiError> {
        let _guard = self.link_lock.lock().await;
        let Some(mut link) = self.store.link_by_name(name).await? else {
            return Ok(None);
        };
        // Absent: unchanged; 0: no limit.
        if let Some(n) = update.max_flows {
            link.max_flows = (n > 0).then_some(n);
        }
        if let Some(r) = update.rate_limit_bytes_per_sec {
            link.rate_limit = (r > 0).then_some(r);
        }
        let (max_flows, rate_limit) = (link.max_flows, link.rate_limit);
        let grant = self
            .grant_hex(&link, link.generation, &link.relays, link.grant_not_after)
            .await?;
        let events = Self::grant_events(link.link_id, &link.relays, grant.as_ref());
        if !self
            .store
            .update_link_limits(
                &link.link_id,
                link.generation,
                max_flows,
                rate_limit,
                &events,
                now,
            )
            .await?
        {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("link `{name}` changed meanwhile; try again"),
            ));
        }
        self.notify();
        tracing::info!(link = %link.name, ?max_flows, ?rate_limit, "link limits updated");
        Ok(Some(link))
    }

    /// Moves a link onto its own agents' connection `connection` (`None`:
    /// the shared one). Its grant is unchanged; both agents hear of it and
    /// re-create their halves (open flows reset).
    pub(crate) async fn set_link_connection(
        &self,
        name: &str,
        connection: Option<String>,
    ) -> Result<Option<LinkRecord>, ApiError> {
        let _guard = self.link_lock.lock().await;
        let Some(mut link) = self.store.link_by_name(name).await? else {
            return Ok(None);
        };
        if link.connection == connection {
            return Ok(Some(link));
        }
        if !self
            .store
            .set_link_connection(&link.link_id, connection.as_deref())
            .await?
        {
            return Ok(None);
        }
        link.connection = connection;
        self.notify();
        tracing::info!(link = %link.name, connection = ?link.connection, "link connection changed");
        Ok(Some(link))
    }

    /// Deletes a link and revokes it at its relays.
    pub(crate) async fn delete_link(
        &self,
        name: &str,
        now: u64,
    ) -> Result<Option<LinkRecord>, ApiError> {
        let _guard = self.link_lock.lock().await;
        let deleted = self.store.delete_link(name, now).await?;
        if let Some(link) = &deleted {
            self.notify();
            tracing::info!(link = %link.name, link_id = %link.link_id, "link deleted");
        }
        Ok(deleted)
    }

    /// One pass of the assignment loop: moves links off unhealthy relays,
    /// fills short relay lists, and renews grants past half their life.
    /// Returns how many links changed.
    pub(crate) async fn reassign(&self, now: u64) -> Result<usize, ApiError> {
        let _guard = self.link_lock.lock().await;
        let (_, healthy) = self.relays(now).await?;
        // Just started: relays have not had the chance to heartbeat yet.
        let settled = now
            >= self
                .started_at
                .saturating_add(self.config.heartbeat_timeout_secs);
        let ttl = self.config.grant_ttl_secs;
        let mut changed = 0;
        for link in self.store.links().await? {
            let planned = if settled {
                assign::plan(
                    &link.link_id,
                    &link.relays,
                    &healthy,
                    self.config.relays_per_link,
                )
            } else {
                None
            };
            let update = if let Some(relays) = planned {
                let generation = link.generation.saturating_add(1);
                let not_after = now.saturating_add(ttl);
                let grant = self
                    .grant_hex(&link, generation, &relays, not_after)
                    .await?;
                let mut events = Self::grant_events(link.link_id, &relays, grant.as_ref());
                events.extend(link.relays.iter().filter(|r| !relays.contains(r)).map(|r| {
                    NewEvent {
                        relay_id: *r,
                        link_id: link.link_id,
                        grant_hex: None,
                    }
                }));
                tracing::info!(
                    link = %link.name,
                    generation,
                    from = ?link.relays,
                    to = ?relays,
                    "link reassigned"
                );
                LinkGrantUpdate {
                    link_id: link.link_id,
                    expected_generation: link.generation,
                    generation,
                    relays,
                    grant_not_after: not_after,
                    events,
                    bump_agents: true,
                }
            } else if !link.relays.is_empty() && link.grant_not_after.saturating_sub(now) < ttl / 2
            {
                let not_after = now.saturating_add(ttl);
                let grant = self
                    .grant_hex(&link, link.generation, &link.relays, not_after)
                    .await?;
                tracing::debug!(link = %link.name, not_after, "grant renewed");
                LinkGrantUpdate {
                    link_id: link.link_id,
                    expected_generation: link.generation,
                    generation: link.generation,
                    relays: link.relays.clone(),
                    grant_not_after: not_after,
                    events: Self::grant_events(link.link_id, &link.relays, grant.as_ref()),
                    bump_agents: false,
                }
            } else {
                continue;
            };
            if self.store.update_link_grant(&update, now).await? {
                changed += 1;
            }
        }
        if changed > 0 {
            self.notify();
        }
        Ok(changed)
    }
}

/// What two listen addresses of one agent clash on: the protocol and the
/// socket address (`tcp://127.0.0.1:7000` and `tcp://127.0.0.1:07000` are
/// one), or the socket path; a listen that does not parse is its text.
fn listen_key(listen: &str) -> String {
    use comsat_protocol::endpoint::Endpoint;
    match Endpoint::parse_listen(listen) {
        Ok(Endpoint::Tcp(a)) => a
            .parse::<std::net::SocketAddr>()
            .map_or(listen.into(), |a| format!("tcp {a}")),
        Ok(Endpoint::Udp(a)) => a
            .parse::<std::net::SocketAddr>()
            .map_or(listen.into(), |a| format!("udp {a}")),
        Ok(Endpoint::Unix(p)) => format!(
            "unix {}",
            p.components().collect::<std::path::PathBuf>().display()
        ),
        _ => listen.into(),
    }
}

#[cfg(test)]
mod listen_tests {
    use super::listen_key;

    #[test]
    fn listen_addresses_clash_by_protocol_and_socket_address() {
        assert_eq!(
            listen_key("tcp://127.0.0.1:7000"),
            listen_key("tcp://127.0.0.1:07000")
        );
        assert_eq!(
            listen_key("unix:///run/a.sock"),
            listen_key("unix:///run//a.sock")
        );
        for (a, b) in [
            ("tcp://127.0.0.1:7000", "udp://127.0.0.1:7000"),
            ("tcp://127.0.0.1:7000", "tcp://127.0.0.2:7000"),
            ("tcp://127.0.0.1:7000", "tcp://[::1]:7000"),
            ("tcp://127.0.0.1:7000", "tcp://127.0.0.1:7001"),
            ("unix:///run/a.sock", "unix:///run/b.sock"),
        ] {
            assert_ne!(listen_key(a), listen_key(b), "{a} {b}");
        }
    }
}
