//! The SQLite backend: a file in the data dir, WAL, 5 s busy timeout,
//! foreign keys on. Write transactions start with `BEGIN IMMEDIATE`, so a
//! writer waits for the lock instead of failing on a stale snapshot.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use comsat_protocol::api::{NodeKind, RelayLoad};
use comsat_protocol::{LinkId, NodeId, RelayId};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};

use super::{
    EventRecord, LinkGrantUpdate, LinkRecord, NewEvent, NewJoinToken, NewNode, NodeRecord,
    Redemption, Store, StoreError,
};

/// How long a connection waits for a lock another holds.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The SQLite [`Store`].
#[derive(Clone, Debug)]
pub struct SqliteStore {
    pool: SqlitePool,
}

pub(crate) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(crate) fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

fn parse<T: FromStr>(what: &str, s: &str) -> Result<T, StoreError>
where
    T::Err: std::fmt::Display,
{
    s.parse().map_err(|e| corrupt(what, e))
}

fn json<T: serde::de::DeserializeOwned>(what: &str, s: &str) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(|e| corrupt(what, e))
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| corrupt("encoding json", e))
}

const NODE_COLUMNS: &str = "node_id, kind, name, sign_pub, noise_pub, public_addr, created_at, \
     last_seen, last_heartbeat, load, config_version";

fn node_from_row(row: &SqliteRow) -> Result<NodeRecord, StoreError> {
    let load: Option<String> = row.try_get("load")?;
    let noise: Option<String> = row.try_get("noise_pub")?;
    Ok(NodeRecord {
        node_id: parse("nodes.node_id", &row.try_get::<String, _>("node_id")?)?,
        kind: parse("nodes.kind", &row.try_get::<String, _>("kind")?)?,
        name: row.try_get("name")?,
        sign_pub: parse("nodes.sign_pub", &row.try_get::<String, _>("sign_pub")?)?,
        noise_pub: noise.map(|n| parse("nodes.noise_pub", &n)).transpose()?,
        public_addr: row.try_get("public_addr")?,
        created_at: to_u64(row.try_get("created_at")?),
        last_seen: row.try_get::<Option<i64>, _>("last_seen")?.map(to_u64),
        last_heartbeat: row.try_get::<Option<i64>, _>("last_heartbeat")?.map(to_u64),
        load: load
            .map(|l| json::<RelayLoad>("nodes.load", &l))
            .transpose()?
            .unwrap_or_default(),
        config_version: to_u64(row.try_get("config_version")?),
    })
}

const LINK_COLUMNS: &str = "link_id, name, generation, from_node, listen, to_node, target, \
     allowed_uids, allowed_gids, relays, created_at, grant_not_after, max_flows, rate_limit";

fn link_from_row(row: &SqliteRow) -> Result<LinkRecord, StoreError> {
    let relays: Vec<String> = json("links.relays", &row.try_get::<String, _>("relays")?)?;
    Ok(LinkRecord {
        link_id: parse("links.link_id", &row.try_get::<String, _>("link_id")?)?,
        name: row.try_get("name")?,
        generation: to_u64(row.try_get("generation")?),
        from_node: parse("links.from_node", &row.try_get::<String, _>("from_node")?)?,
        listen: row.try_get("listen")?,
        to_node: parse("links.to_node", &row.try_get::<String, _>("to_node")?)?,
        target: row.try_get("target")?,
        allowed_uids: json(
            "links.allowed_uids",
            &row.try_get::<String, _>("allowed_uids")?,
        )?,
        allowed_gids: json(
            "links.allowed_gids",
            &row.try_get::<String, _>("allowed_gids")?,
        )?,
        relays: relays
            .iter()
            .map(|r| parse::<RelayId>("links.relays", r))
            .collect::<Result<_, _>>()?,
        created_at: to_u64(row.try_get("created_at")?),
        grant_not_after: to_u64(row.try_get("grant_not_after")?),
        max_flows: row
            .try_get::<Option<i64>, _>("max_flows")?
            .and_then(|n| u32::try_from(n).ok()),
        rate_limit: row
            .try_get::<Option<i64>, _>("rate_limit")?
            .and_then(|n| u64::try_from(n).ok()),
    })
}

fn relays_json(relays: &[RelayId]) -> Result<String, StoreError> {
    to_json(&relays.iter().map(ToString::to_string).collect::<Vec<_>>())
}

async fn insert_events(
    tx: &mut Transaction<'static, Sqlite>,
    events: &[NewEvent],
    now: u64,
) -> Result<(), StoreError> {
    for e in events {
        let kind = if e.grant_hex.is_some() {
            "grant"
        } else {
            "revoke"
        };
        sqlx::query(
            "INSERT INTO relay_events (relay_id, link_id, kind, grant_hex, created_at) \
             VALUES (?, ?, ?, ?, ?)",
        )
        .bind(e.relay_id.to_string())
        .bind(e.link_id.to_string())
        .bind(kind)
        .bind(e.grant_hex.as_deref())
        .bind(to_i64(now))
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

async fn bump_agents(
    tx: &mut Transaction<'static, Sqlite>,
    a: &NodeId,
    b: &NodeId,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE nodes SET config_version = config_version + 1 WHERE node_id = ? OR node_id = ?",
    )
    .bind(a.to_string())
    .bind(b.to_string())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.is_unique_violation())
}

impl SqliteStore {
    /// Opens (creating if missing) the database file and applies the
    /// embedded migrations.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        Ok(Self { pool })
    }

    async fn write_tx(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn add_api_token(&self, hash: &str, name: &str, now: u64) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO api_tokens (hash, name, created_at) VALUES (?, ?, ?)")
            .bind(hash)
            .bind(name)
            .bind(to_i64(now))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn api_token(&self, hash: &str) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT name FROM api_tokens WHERE hash = ?")
            .bind(hash)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get("name")).transpose()?)
    }

    async fn create_join_token(&self, t: &NewJoinToken) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO join_tokens (id, secret_hash, kind, name, expires_at, used_at, created_at) \
             VALUES (?, ?, ?, ?, ?, NULL, ?)",
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

    async fn redeem_join_token(
        &self,
        r: &Redemption,
        node: &NewNode,
    ) -> Result<NodeRecord, StoreError> {
        let mut tx = self.write_tx().await?;
        // The one statement that decides who wins a race.
        let won = sqlx::query(
            "UPDATE join_tokens SET used_at = ? \
             WHERE id = ? AND secret_hash = ? AND kind = ? AND used_at IS NULL \
             RETURNING name, expires_at",
        )
        .bind(to_i64(r.now))
        .bind(&r.token_id)
        .bind(&r.secret_hash)
        .bind(r.kind.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(won) = won else {
            // Find out why, without changing anything.
            let row =
                sqlx::query("SELECT secret_hash, kind, used_at FROM join_tokens WHERE id = ?")
                    .bind(&r.token_id)
                    .fetch_optional(&mut *tx)
                    .await?;
            tx.rollback().await?;
            let Some(row) = row else {
                return Err(StoreError::UnknownToken);
            };
            let hash: String = row.try_get("secret_hash")?;
            if hash != r.secret_hash {
                return Err(StoreError::UnknownToken);
            }
            if row.try_get::<Option<i64>, _>("used_at")?.is_some() {
                return Err(StoreError::TokenUsed);
            }
            let token_kind: NodeKind =
                parse("join_tokens.kind", &row.try_get::<String, _>("kind")?)?;
            return Err(StoreError::WrongKind { token_kind });
        };
        let expires_at = to_u64(won.try_get("expires_at")?);
        if expires_at <= r.now {
            // Used up all the same: an expired token never works again.
            tx.commit().await?;
            return Err(StoreError::TokenExpired);
        }
        let token_name: Option<String> = won.try_get("name")?;
        let name = match token_name {
            Some(name) => {
                let taken = sqlx::query("SELECT 1 FROM nodes WHERE kind = ? AND name = ?")
                    .bind(r.kind.as_str())
                    .bind(&name)
                    .fetch_optional(&mut *tx)
                    .await?
                    .is_some();
                if taken {
                    tx.rollback().await?;
                    return Err(StoreError::NodeNameTaken { kind: r.kind, name });
                }
                name
            }
            None => {
                let mut tries = 0;
                loop {
                    let name = format!("{}-{}", r.kind, hex::encode(rand::random::<[u8; 4]>()));
                    let taken = sqlx::query("SELECT 1 FROM nodes WHERE kind = ? AND name = ?")
                        .bind(r.kind.as_str())
                        .bind(&name)
                        .fetch_optional(&mut *tx)
                        .await?
                        .is_some();
                    tries += 1;
                    if !taken {
                        break name;
                    }
                    if tries > 16 {
                        tx.rollback().await?;
                        return Err(StoreError::NodeNameTaken { kind: r.kind, name });
                    }
                }
            }
        };
        let record = NodeRecord {
            node_id: node.node_id,
            kind: r.kind,
            name,
            sign_pub: node.sign_pub,
            noise_pub: node.noise_pub,
            public_addr: node.public_addr.clone(),
            created_at: r.now,
            last_seen: Some(r.now),
            last_heartbeat: None,
            load: RelayLoad::default(),
            config_version: 1,
        };
        let inserted = sqlx::query(
            "INSERT INTO nodes (node_id, kind, name, sign_pub, noise_pub, public_addr, created_at, \
             last_seen, last_heartbeat, load, config_version) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, ?)",
        )
        .bind(record.node_id.to_string())
        .bind(record.kind.as_str())
        .bind(&record.name)
        .bind(record.sign_pub.to_string())
        .bind(record.noise_pub.map(|k| k.to_string()))
        .bind(record.public_addr.as_deref())
        .bind(to_i64(r.now))
        .bind(to_i64(r.now))
        .bind(to_i64(record.config_version))
        .execute(&mut *tx)
        .await;
        if let Err(e) = inserted {
            let unique = is_unique_violation(&e);
            tx.rollback().await?;
            if unique {
                return Err(StoreError::NodeNameTaken {
                    kind: record.kind,
                    name: record.name,
                });
            }
            return Err(e.into());
        }
        tx.commit().await?;
        Ok(record)
    }

    async fn node(&self, id: &NodeId) -> Result<Option<NodeRecord>, StoreError> {
        let sql = format!("SELECT {NODE_COLUMNS} FROM nodes WHERE node_id = ?");
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(node_from_row)
            .transpose()
    }

    async fn node_by_name(
        &self,
        kind: NodeKind,
        name: &str,
    ) -> Result<Option<NodeRecord>, StoreError> {
        let sql = format!("SELECT {NODE_COLUMNS} FROM nodes WHERE kind = ? AND name = ?");
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(kind.as_str())
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(node_from_row)
            .transpose()
    }

    async fn nodes(&self, kind: NodeKind) -> Result<Vec<NodeRecord>, StoreError> {
        let sql = format!("SELECT {NODE_COLUMNS} FROM nodes WHERE kind = ? ORDER BY name");
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(kind.as_str())
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(node_from_row)
            .collect()
    }

    async fn record_jti(
        &self,
        jti: &str,
        node: &NodeId,
        expires_at: u64,
    ) -> Result<bool, StoreError> {
        let result =
            sqlx::query("INSERT INTO jwt_seen (jti, node_id, expires_at) VALUES (?, ?, ?)")
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
        let done = sqlx::query("DELETE FROM jwt_seen WHERE expires_at < ?")
            .bind(to_i64(now))
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn touch_node(&self, id: &NodeId, now: u64) -> Result<(), StoreError> {
        sqlx::query("UPDATE nodes SET last_seen = ? WHERE node_id = ?")
            .bind(to_i64(now))
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn heartbeat(&self, id: &NodeId, load: &RelayLoad, now: u64) -> Result<(), StoreError> {
        sqlx::query("UPDATE nodes SET last_heartbeat = ?, load = ? WHERE node_id = ?")
            .bind(to_i64(now))
            .bind(to_json(load)?)
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn create_link(&self, link: &LinkRecord, events: &[NewEvent]) -> Result<(), StoreError> {
        let mut tx = self.write_tx().await?;
        let taken = sqlx::query("SELECT 1 FROM links WHERE name = ?")
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
             rate_limit) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
        tx.commit().await?;
        Ok(())
    }

    async fn link_by_name(&self, name: &str) -> Result<Option<LinkRecord>, StoreError> {
        let sql = format!("SELECT {LINK_COLUMNS} FROM links WHERE name = ?");
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(link_from_row)
            .transpose()
    }

    async fn links(&self) -> Result<Vec<LinkRecord>, StoreError> {
        let sql = format!("SELECT {LINK_COLUMNS} FROM links ORDER BY name");
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(link_from_row)
            .collect()
    }

    async fn links_of_agent(&self, agent: &NodeId) -> Result<Vec<LinkRecord>, StoreError> {
        let sql = format!(
            "SELECT {LINK_COLUMNS} FROM links WHERE from_node = ? OR to_node = ? ORDER BY name"
        );
        let id = agent.to_string();
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&id)
            .bind(&id)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(link_from_row)
            .collect()
    }

    async fn delete_link(&self, name: &str, now: u64) -> Result<Option<LinkRecord>, StoreError> {
        let mut tx = self.write_tx().await?;
        let sql = format!("SELECT {LINK_COLUMNS} FROM links WHERE name = ?");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            tx.rollback().await?;
            return Ok(None);
        };
        let link = link_from_row(&row)?;
        sqlx::query("DELETE FROM links WHERE link_id = ?")
            .bind(link.link_id.to_string())
            .execute(&mut *tx)
            .await?;
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
        tx.commit().await?;
        Ok(Some(link))
    }

    async fn update_link_grant(&self, u: &LinkGrantUpdate, now: u64) -> Result<bool, StoreError> {
        let mut tx = self.write_tx().await?;
        let done = sqlx::query(
            "UPDATE links SET generation = ?, relays = ?, grant_not_after = ? \
             WHERE link_id = ? AND generation = ?",
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
            let row = sqlx::query("SELECT from_node, to_node FROM links WHERE link_id = ?")
                .bind(u.link_id.to_string())
                .fetch_one(&mut *tx)
                .await?;
            let a: NodeId = parse("links.from_node", &row.try_get::<String, _>("from_node")?)?;
            let b: NodeId = parse("links.to_node", &row.try_get::<String, _>("to_node")?)?;
            bump_agents(&mut tx, &a, &b).await?;
        }
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
            "UPDATE links SET max_flows = ?, rate_limit = ? WHERE link_id = ? AND generation = ?",
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
             WHERE relay_id = ? AND seq > ? ORDER BY seq LIMIT ?",
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

    async fn close(&self) {
        self.pool.close().await;
    }
}
