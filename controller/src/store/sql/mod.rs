//! The SQL backends, through one implementation on sqlx's `Any` driver:
//!
//! - **SQLite** (the embedded default): a file in the data dir, WAL, 5 s
//!   busy timeout, foreign keys on. Write transactions start with
//!   `BEGIN IMMEDIATE`, so a writer waits for the lock instead of failing
//!   on a stale snapshot.
//! - **PostgreSQL**, shared by several controllers. Every race is decided
//!   by one statement (a conditional `UPDATE`, a unique key), so READ
//!   COMMITTED is enough. Relay events take their sequence numbers from a
//!   one-row counter updated in the same transaction: its row lock orders
//!   writers, so numbers become visible in order and a relay reading "after
//!   N" never skips an event committed late. Nothing here needs advisory
//!   locks, `LISTEN` or sequences, so the same schema runs on
//!   PostgreSQL-compatible distributed SQL (CockroachDB, YugabyteDB).
//!
//! Queries use `$1`-style parameters, which both databases take.

mod bundles;
mod connect;
mod flows;
mod migrations;
mod moves;
mod principals;
mod refusals;
mod rows;
mod sessions;
mod status;
mod tokens;
mod traffic;
mod tx;

use std::collections::HashMap;

use async_trait::async_trait;
use comsat_protocol::api::{
    self as api, AuditRecord, HalfReport, JoinTokenInfo, NodeKind, PrincipalInfo, PrincipalKind,
    RelayLoad, RoleBindingCreate,
};
use comsat_protocol::{LinkId, NodeId, RelayId};
use sqlx::{AnyPool, Row};

use self::rows::{
    LINK_COLUMNS, LINKS, NODES, link_from_row, parse, relays_json, to_i64, to_json, to_u64,
};
use self::tx::{
    bump_agents, bump_link_agents, insert_events, insert_principal, insert_token,
    is_unique_violation, mark_change, unless_taken,
};
use super::{
    ApiTokenRecord, ConsoleSession, EventRecord, FlowQuery, HalfRecord, LinkGrantUpdate,
    LinkRecord, NewApiToken, NewEvent, NewJoinToken, NewNode, NodeRecord, Redemption,
    RefusalRecord, Store, StoreError, TrafficRecord,
};

/// Which database a [`SqlStore`] talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file.
    Sqlite,
    /// A PostgreSQL (or compatible) server.
    Postgres,
}

/// The SQL [`Store`]: SQLite or PostgreSQL.
#[derive(Clone, Debug)]
pub struct SqlStore {
    pool: AnyPool,
    backend: Backend,
}

/// The SQLite store (the embedded default): a [`SqlStore`] on a file.
pub type SqliteStore = SqlStore;

/// The PostgreSQL `NOTIFY` channel of changes.
pub const CHANGES_CHANNEL: &str = "comsat_changes";

#[async_trait]
impl Store for SqlStore {
    async fn bootstrap_admin(&self, token: &NewApiToken) -> Result<(), StoreError> {
        let mut tx = self.write_tx().await?;
        insert_principal(&mut tx, PrincipalKind::User, "admin", token).await?;
        sqlx::query(
            "INSERT INTO role_bindings (name, role, subject_kind, subject_name, created_at) \
             VALUES ('admin', 'admin', 'user', 'admin', $1)",
        )
        .bind(to_i64(token.created_at))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn api_token(&self, hash: &str) -> Result<Option<ApiTokenRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT subject_kind, name, id, expires_at, revoked_at FROM api_tokens WHERE hash = $1",
        )
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(ApiTokenRecord {
                kind: parse(
                    "api_tokens.subject_kind",
                    &r.try_get::<String, _>("subject_kind")?,
                )?,
                name: r.try_get("name")?,
                id: r.try_get::<Option<String>, _>("id")?.unwrap_or_default(),
                expires_at: r.try_get::<Option<i64>, _>("expires_at")?.map(to_u64),
                revoked_at: r.try_get::<Option<i64>, _>("revoked_at")?.map(to_u64),
            })
        })
        .transpose()
    }

    async fn create_principal(
        &self,
        kind: PrincipalKind,
        name: &str,
        token: &NewApiToken,
    ) -> Result<(), StoreError> {
        let mut tx = self.write_tx().await?;
        match insert_principal(&mut tx, kind, name, token).await {
            Ok(()) => {
                tx.commit().await?;
                Ok(())
            }
            Err(e) => {
                tx.rollback().await?;
                Err(e)
            }
        }
    }

    async fn delete_principal(&self, kind: PrincipalKind, name: &str) -> Result<bool, StoreError> {
        let mut tx = self.write_tx().await?;
        let done = sqlx::query("DELETE FROM principals WHERE kind = $1 AND name = $2")
            .bind(kind.as_str())
            .bind(name)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        sqlx::query("DELETE FROM api_tokens WHERE subject_kind = $1 AND name = $2")
            .bind(kind.as_str())
            .bind(name)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM role_bindings WHERE subject_kind = $1 AND subject_name = $2")
            .bind(kind.as_str())
            .bind(name)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn principals(&self, kind: PrincipalKind) -> Result<Vec<PrincipalInfo>, StoreError> {
        self.read_principals(kind).await
    }

    async fn add_principal_token(
        &self,
        kind: PrincipalKind,
        name: &str,
        token: &NewApiToken,
    ) -> Result<bool, StoreError> {
        let mut tx = self.write_tx().await?;
        let exists = sqlx::query("SELECT 1 FROM principals WHERE kind = $1 AND name = $2")
            .bind(kind.as_str())
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?
            .is_some();
        if !exists {
            tx.rollback().await?;
            return Ok(false);
        }
        insert_token(&mut tx, kind, name, token).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn revoke_token(
        &self,
        kind: PrincipalKind,
        name: &str,
        id: &str,
        now: u64,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE api_tokens SET revoked_at = $1 \
             WHERE subject_kind = $2 AND name = $3 AND id = $4 AND revoked_at IS NULL",
        )
        .bind(to_i64(now))
        .bind(kind.as_str())
        .bind(name)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn create_role(&self, name: &str, rules: &str, now: u64) -> Result<(), StoreError> {
        let done = sqlx::query("INSERT INTO roles (name, rules, created_at) VALUES ($1, $2, $3)")
            .bind(name)
            .bind(rules)
            .bind(to_i64(now))
            .execute(&self.pool)
            .await;
        unless_taken(done, || format!("role `{name}`"))
    }

    async fn role(&self, name: &str) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT rules FROM roles WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get("rules")).transpose()?)
    }

    async fn roles(&self) -> Result<Vec<(String, String)>, StoreError> {
        let rows = sqlx::query("SELECT name, rules FROM roles ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("name")?, r.try_get("rules")?)))
            .collect()
    }

    async fn delete_role(&self, name: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM roles WHERE name = $1")
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn create_binding(&self, b: &RoleBindingCreate, now: u64) -> Result<(), StoreError> {
        let done = sqlx::query(
            "INSERT INTO role_bindings (name, role, subject_kind, subject_name, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&b.name)
        .bind(&b.role)
        .bind(b.subject_kind.as_str())
        .bind(&b.subject_name)
        .bind(to_i64(now))
        .execute(&self.pool)
        .await;
        unless_taken(done, || format!("role binding `{}`", b.name))
    }

    async fn bindings(&self) -> Result<Vec<RoleBindingCreate>, StoreError> {
        let rows = sqlx::query(
            "SELECT name, role, subject_kind, subject_name FROM role_bindings ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(RoleBindingCreate {
                    name: r.try_get("name")?,
                    role: r.try_get("role")?,
                    subject_kind: parse(
                        "role_bindings.subject_kind",
                        &r.try_get::<String, _>("subject_kind")?,
                    )?,
                    subject_name: r.try_get("subject_name")?,
                })
            })
            .collect()
    }

    async fn roles_of(&self, kind: PrincipalKind, name: &str) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "SELECT role FROM role_bindings WHERE subject_kind = $1 AND subject_name = $2",
        )
        .bind(kind.as_str())
        .bind(name)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok(r.try_get("role")?)).collect()
    }

    async fn delete_binding(&self, name: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM role_bindings WHERE name = $1")
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn create_join_token(&self, t: &NewJoinToken) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO join_tokens (id, secret_hash, kind, name, expires_at, used_at, created_at) \
             VALUES ($1, $2, $3, $4, $5, NULL, $6)",
        )
        .bind(&t.id)
        .bind(&t.secret_hash)
        .bind(t.kind.as_str())
        .bind(t.name.as_deref())
        .bind(to_i64(t.expires_at))
        .bind(to_i64(t.created_at))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn open_join_tokens(&self, now: u64) -> Result<Vec<JoinTokenInfo>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, kind, name, expires_at FROM join_tokens \
             WHERE used_at IS NULL AND expires_at > $1 ORDER BY created_at, id LIMIT 1000",
        )
        .bind(to_i64(now))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(JoinTokenInfo {
                    id: r.try_get("id")?,
                    kind: parse("join_tokens.kind", &r.try_get::<String, _>("kind")?)?,
                    name: r.try_get("name")?,
                    expires_at: to_u64(r.try_get("expires_at")?),
                    used: false,
                })
            })
            .collect()
    }

    async fn redeem_join_token(
        &self,
        r: &Redemption,
        node: &NewNode,
    ) -> Result<NodeRecord, StoreError> {
        self.redeem(r, node).await
    }

    async fn node(&self, id: &NodeId) -> Result<Option<NodeRecord>, StoreError> {
        let id = id.to_string();
        self.select_one(&NODES, "WHERE node_id = $1", &[&id]).await
    }

    async fn node_by_name(
        &self,
        kind: NodeKind,
        name: &str,
    ) -> Result<Option<NodeRecord>, StoreError> {
        let filter = "WHERE kind = $1 AND name = $2";
        self.select_one(&NODES, filter, &[kind.as_str(), name])
            .await
    }

    async fn nodes(&self, kind: NodeKind) -> Result<Vec<NodeRecord>, StoreError> {
        self.select(&NODES, "WHERE kind = $1 ORDER BY name", &[kind.as_str()])
            .await
    }

    async fn record_jti(
        &self,
        jti: &str,
        node: &NodeId,
        expires_at: u64,
    ) -> Result<bool, StoreError> {
        let result =
            sqlx::query("INSERT INTO jwt_seen (jti, node_id, expires_at) VALUES ($1, $2, $3)")
                .bind(jti)
                .bind(node.to_string())
                .bind(to_i64(expires_at))
                .execute(&self.pool)
                .await;
        match result {
            Ok(_) => Ok(true),
            Err(e) if is_unique_violation(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    async fn purge_jtis(&self, now: u64) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM jwt_seen WHERE expires_at < $1")
            .bind(to_i64(now))
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn append_audit(&self, r: &AuditRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO audit_log (id, at_ms, subject, action, resource, result, reason, source) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(hex::encode(rand::random::<[u8; 8]>()))
        .bind(to_i64(r.at_ms))
        .bind(&r.subject)
        .bind(&r.action)
        .bind(&r.resource)
        .bind(&r.result)
        .bind(r.reason.as_deref())
        .bind(r.source.as_deref())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn audit(
        &self,
        since_ms: u64,
        subject: Option<&str>,
        result: Option<&str>,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        // The newest `limit` records, then oldest first. A subject filter
        // is a prefix, matched without LIKE (no wildcard to escape).
        let prefix = subject.unwrap_or("");
        let rows = sqlx::query(
            "SELECT at_ms, subject, action, resource, result, reason, source FROM audit_log \
             WHERE at_ms >= $1 AND substr(subject, 1, CAST($2 AS INTEGER)) = $3 \
             AND ($5 = '' OR result = $5) \
             ORDER BY at_ms DESC, id DESC LIMIT $4",
        )
        .bind(to_i64(since_ms))
        .bind(i64::try_from(prefix.len()).unwrap_or(i64::MAX))
        .bind(prefix)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .bind(result.unwrap_or(""))
        .fetch_all(&self.pool)
        .await?;
        let mut out = rows
            .iter()
            .map(|row| {
                Ok(AuditRecord {
                    at_ms: to_u64(row.try_get("at_ms")?),
                    subject: row.try_get("subject")?,
                    action: row.try_get("action")?,
                    resource: row.try_get("resource")?,
                    result: row.try_get("result")?,
                    reason: row.try_get("reason")?,
                    source: row.try_get("source")?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        out.reverse();
        Ok(out)
    }

    async fn purge_audit(&self, before_ms: u64) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM audit_log WHERE at_ms < $1")
            .bind(to_i64(before_ms))
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn delete_node(&self, id: &NodeId) -> Result<bool, StoreError> {
        let mut tx = self.write_tx().await?;
        let done = sqlx::query("DELETE FROM nodes WHERE node_id = $1")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await;
        let done = match done {
            Ok(d) => d,
            Err(e) => {
                tx.rollback().await?;
                return Err(e.into());
            }
        };
        if done.rows_affected() == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        sqlx::query("DELETE FROM relay_events WHERE relay_id = $1")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn touch_node(&self, id: &NodeId, now: u64) -> Result<(), StoreError> {
        sqlx::query("UPDATE nodes SET last_seen = $1 WHERE node_id = $2")
            .bind(to_i64(now))
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn heartbeat(&self, id: &NodeId, load: &RelayLoad, now: u64) -> Result<(), StoreError> {
        sqlx::query("UPDATE nodes SET last_heartbeat = $1, load = $2 WHERE node_id = $3")
            .bind(to_i64(now))
            .bind(to_json(load)?)
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn create_link(&self, link: &LinkRecord, events: &[NewEvent]) -> Result<(), StoreError> {
        let mut tx = self.write_tx().await?;
        let taken = sqlx::query("SELECT 1 FROM links WHERE name = $1")
            .bind(&link.name)
            .fetch_optional(&mut *tx)
            .await?
            .is_some();
        if taken {
            tx.rollback().await?;
            return Err(StoreError::LinkNameTaken(link.name.clone()));
        }
        let inserted = sqlx::query(
            "INSERT INTO links (link_id, name, generation, from_node, listen, to_node, target, \
             allowed_uids, allowed_gids, relays, created_at, grant_not_after, max_flows, \
             rate_limit, connection, allow_rules, proxy_protocol) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)",
        )
        .bind(link.link_id.to_string())
        .bind(&link.name)
        .bind(to_i64(link.generation))
        .bind(link.from_node.to_string())
        .bind(&link.listen)
        .bind(link.to_node.to_string())
        .bind(&link.target)
        .bind(to_json(&link.allowed_uids)?)
        .bind(to_json(&link.allowed_gids)?)
        .bind(relays_json(&link.relays)?)
        .bind(to_i64(link.created_at))
        .bind(to_i64(link.grant_not_after))
        .bind(link.max_flows.map(i64::from))
        .bind(link.rate_limit.map(to_i64))
        .bind(link.connection.as_deref())
        .bind(to_json(&link.allow)?)
        .bind(i64::from(link.proxy_protocol))
        .execute(&mut *tx)
        .await;
        if let Err(e) = inserted {
            let unique = is_unique_violation(&e);
            tx.rollback().await?;
            if unique {
                return Err(StoreError::LinkNameTaken(link.name.clone()));
            }
            return Err(e.into());
        }
        insert_events(&mut tx, events, link.created_at).await?;
        bump_agents(&mut tx, &link.from_node, &link.to_node).await?;
        mark_change(&mut tx, self.backend).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn link_by_name(&self, name: &str) -> Result<Option<LinkRecord>, StoreError> {
        self.select_one(&LINKS, "WHERE name = $1", &[name]).await
    }

    async fn links(&self) -> Result<Vec<LinkRecord>, StoreError> {
        self.select(&LINKS, "ORDER BY name", &[]).await
    }

    async fn links_of_agent(&self, agent: &NodeId) -> Result<Vec<LinkRecord>, StoreError> {
        let id = agent.to_string();
        let filter = "WHERE from_node = $1 OR to_node = $2 ORDER BY name";
        self.select(&LINKS, filter, &[&id, &id]).await
    }

    async fn delete_link(&self, name: &str, now: u64) -> Result<Option<LinkRecord>, StoreError> {
        let mut tx = self.write_tx().await?;
        let sql = format!("SELECT {LINK_COLUMNS} FROM links WHERE name = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            tx.rollback().await?;
            return Ok(None);
        };
        let link = link_from_row(&row)?;
        for table in ["links", "peer_moves"] {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DELETE FROM {table} WHERE link_id = $1"
            )))
            .bind(link.link_id.to_string())
            .execute(&mut *tx)
            .await?;
        }
        let revokes: Vec<NewEvent> = link
            .relays
            .iter()
            .map(|r| NewEvent {
                relay_id: *r,
                link_id: link.link_id,
                grant_hex: None,
            })
            .collect();
        insert_events(&mut tx, &revokes, now).await?;
        bump_agents(&mut tx, &link.from_node, &link.to_node).await?;
        mark_change(&mut tx, self.backend).await?;
        tx.commit().await?;
        Ok(Some(link))
    }

    async fn update_link_grant(&self, u: &LinkGrantUpdate, now: u64) -> Result<bool, StoreError> {
        let mut tx = self.write_tx().await?;
        let done = sqlx::query(
            "UPDATE links SET generation = $1, relays = $2, grant_not_after = $3 \
             WHERE link_id = $4 AND generation = $5",
        )
        .bind(to_i64(u.generation))
        .bind(relays_json(&u.relays)?)
        .bind(to_i64(u.grant_not_after))
        .bind(u.link_id.to_string())
        .bind(to_i64(u.expected_generation))
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            tx.rollback().await?;
            return Ok(false);
        }
        insert_events(&mut tx, &u.events, now).await?;
        if u.bump_agents {
            bump_link_agents(&mut tx, &u.link_id).await?;
        }
        mark_change(&mut tx, self.backend).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn update_link_limits(
        &self,
        link_id: &LinkId,
        expected_generation: u64,
        max_flows: Option<u32>,
        rate_limit: Option<u64>,
        events: &[NewEvent],
        now: u64,
    ) -> Result<bool, StoreError> {
        let mut tx = self.write_tx().await?;
        let done = sqlx::query(
            "UPDATE links SET max_flows = $1, rate_limit = $2 WHERE link_id = $3 AND generation = $4",
        )
        .bind(max_flows.map(i64::from))
        .bind(rate_limit.map(to_i64))
        .bind(link_id.to_string())
        .bind(to_i64(expected_generation))
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            tx.rollback().await?;
            return Ok(false);
        }
        insert_events(&mut tx, events, now).await?;
        mark_change(&mut tx, self.backend).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn set_link_connection(
        &self,
        link_id: &LinkId,
        connection: Option<&str>,
    ) -> Result<bool, StoreError> {
        let mut tx = self.write_tx().await?;
        let done = sqlx::query("UPDATE links SET connection = $1 WHERE link_id = $2")
            .bind(connection)
            .bind(link_id.to_string())
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() != 1 {
            tx.rollback().await?;
            return Ok(false);
        }
        bump_link_agents(&mut tx, link_id).await?;
        mark_change(&mut tx, self.backend).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn relay_events(
        &self,
        relay: &RelayId,
        since: u64,
        limit: usize,
    ) -> Result<Vec<EventRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, link_id, grant_hex FROM relay_events \
             WHERE relay_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .bind(relay.to_string())
        .bind(to_i64(since))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(EventRecord {
                    seq: to_u64(row.try_get("seq")?),
                    link_id: parse::<LinkId>(
                        "relay_events.link_id",
                        &row.try_get::<String, _>("link_id")?,
                    )?,
                    grant_hex: row.try_get("grant_hex")?,
                })
            })
            .collect()
    }

    async fn max_event_seq(&self) -> Result<u64, StoreError> {
        let row = sqlx::query("SELECT MAX(seq) AS m FROM relay_events")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<Option<i64>, _>("m")?.map_or(0, to_u64))
    }

    async fn change_mark(&self) -> Result<u64, StoreError> {
        let row = sqlx::query("SELECT seq, changes FROM event_seq WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        Ok(to_u64(row.try_get("seq")?).wrapping_add(to_u64(row.try_get("changes")?)))
    }

    async fn check_join_token(&self, r: &Redemption) -> Result<(), StoreError> {
        self.peek_join_token(r).await
    }

    async fn set_refusals(
        &self,
        agent: &NodeId,
        refused: &[(LinkId, String)],
        now: u64,
    ) -> Result<Vec<(LinkId, String)>, StoreError> {
        self.replace_refusals(agent, refused, now).await
    }

    async fn refusals(&self) -> Result<Vec<RefusalRecord>, StoreError> {
        self.all_refusals().await
    }

    async fn set_link_status(
        &self,
        agent: &NodeId,
        halves: &[HalfReport],
        now: u64,
    ) -> Result<Vec<HalfRecord>, StoreError> {
        self.replace_link_status(agent, halves, now).await
    }

    async fn link_statuses(&self) -> Result<Vec<HalfRecord>, StoreError> {
        self.all_link_status().await
    }

    async fn record_peer_moves(
        &self,
        agent: &NodeId,
        relay: &RelayId,
        links: &[LinkId],
        now: u64,
    ) -> Result<usize, StoreError> {
        self.write_peer_moves(agent, relay, links, now).await
    }

    async fn peer_moves(
        &self,
        agent: &NodeId,
        since: u64,
    ) -> Result<Vec<(LinkId, RelayId, u64)>, StoreError> {
        self.read_peer_moves(agent, since).await
    }

    async fn record_traffic(
        &self,
        relay: &NodeId,
        traffic: &[api::LinkTraffic],
        now: u64,
    ) -> Result<(), StoreError> {
        self.write_traffic(relay, traffic, now).await
    }

    async fn traffic(&self) -> Result<Vec<TrafficRecord>, StoreError> {
        self.all_traffic().await
    }

    async fn purge_traffic(&self, before: u64) -> Result<u64, StoreError> {
        self.delete_traffic(before).await
    }

    async fn add_flows(&self, agent: &NodeId, flows: &[api::FlowRecord]) -> Result<(), StoreError> {
        self.write_flows(agent, flows).await
    }

    async fn flows(&self, q: &FlowQuery) -> Result<Vec<(NodeId, api::FlowRecord)>, StoreError> {
        self.read_flows(q).await
    }

    async fn purge_flows(&self, before_ms: u64, max: u64) -> Result<u64, StoreError> {
        self.delete_flows(before_ms, max).await
    }

    async fn bundles(&self) -> Result<Vec<api::TrustBundle>, StoreError> {
        self.read_bundles().await
    }

    async fn set_bundle(&self, bundle: &api::TrustBundle, now: u64) -> Result<(), StoreError> {
        self.write_bundle(bundle, now).await
    }

    async fn delete_bundle(&self, trust_domain: &str) -> Result<bool, StoreError> {
        self.remove_bundle(trust_domain).await
    }

    async fn set_version(&self, node: &NodeId, version: &str, now: u64) -> Result<(), StoreError> {
        self.write_version(node, version, now).await
    }

    async fn versions(&self) -> Result<HashMap<NodeId, String>, StoreError> {
        self.all_versions().await
    }

    async fn create_console_session(
        &self,
        s: &ConsoleSession,
        now: u64,
        most: usize,
    ) -> Result<(), StoreError> {
        self.insert_console_session(s, now, most).await
    }

    async fn console_session(&self, id_hash: &str) -> Result<Option<ConsoleSession>, StoreError> {
        self.find_console_session(id_hash).await
    }

    async fn delete_console_session(&self, id_hash: &str) -> Result<bool, StoreError> {
        self.remove_console_session(id_hash).await
    }

    fn pool_connections(&self) -> (u32, usize) {
        (self.pool.size(), self.pool.num_idle())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}
