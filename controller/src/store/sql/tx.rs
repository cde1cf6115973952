//! Steps that several write transactions share: relay events, the change
//! count, agents' config versions, API tokens and principals.

use comsat_protocol::api::{NodeKind, PrincipalKind};
use comsat_protocol::{LinkId, NodeId};
use sqlx::{Any, Row, Transaction};

use super::rows::{parse, to_i64};
use super::{Backend, CHANGES_CHANNEL};
use crate::store::{NewApiToken, NewEvent, StoreError};

pub(super) async fn insert_events(
    tx: &mut Transaction<'static, Any>,
    events: &[NewEvent],
    now: u64,
) -> Result<(), StoreError> {
    for e in events {
        let kind = if e.grant_hex.is_some() {
            "grant"
        } else {
            "revoke"
        };
        // The counter row stays locked until commit: the next writer waits
        // here, so sequence numbers are committed in order.
        let seq: i64 = sqlx::query("UPDATE event_seq SET seq = seq + 1 WHERE id = 1 RETURNING seq")
            .fetch_one(&mut **tx)
            .await?
            .try_get("seq")?;
        sqlx::query(
            "INSERT INTO relay_events (seq, relay_id, link_id, kind, grant_hex, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(seq)
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

/// Counts a change nodes must hear of (controllers sharing the database
/// watch the count) and, on PostgreSQL, wakes their `LISTEN` at commit.
pub(super) async fn mark_change(
    tx: &mut Transaction<'static, Any>,
    backend: Backend,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE event_seq SET changes = changes + 1 WHERE id = 1")
        .execute(&mut **tx)
        .await?;
    if backend == Backend::Postgres {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT pg_notify('{CHANGES_CHANNEL}', '')"
        )))
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

pub(super) async fn bump_agents(
    tx: &mut Transaction<'static, Any>,
    a: &NodeId,
    b: &NodeId,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE nodes SET config_version = config_version + 1 WHERE node_id = $1 OR node_id = $2",
    )
    .bind(a.to_string())
    .bind(b.to_string())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Bumps the config versions of both agents of link `link_id`.
pub(super) async fn bump_link_agents(
    tx: &mut Transaction<'static, Any>,
    link_id: &LinkId,
) -> Result<(), StoreError> {
    let row = sqlx::query("SELECT from_node, to_node FROM links WHERE link_id = $1")
        .bind(link_id.to_string())
        .fetch_one(&mut **tx)
        .await?;
    let a: NodeId = parse("links.from_node", &row.try_get::<String, _>("from_node")?)?;
    let b: NodeId = parse("links.to_node", &row.try_get::<String, _>("to_node")?)?;
    bump_agents(tx, &a, &b).await
}

pub(super) async fn insert_token(
    tx: &mut Transaction<'static, Any>,
    kind: PrincipalKind,
    name: &str,
    t: &NewApiToken,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO api_tokens (hash, name, created_at, id, subject_kind, expires_at, revoked_at) \
         VALUES ($1, $2, $3, $4, $5, $6, NULL)",
    )
    .bind(&t.hash)
    .bind(name)
    .bind(to_i64(t.created_at))
    .bind(&t.id)
    .bind(kind.as_str())
    .bind(t.expires_at.map(to_i64))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

pub(super) async fn insert_principal(
    tx: &mut Transaction<'static, Any>,
    kind: PrincipalKind,
    name: &str,
    token: &NewApiToken,
) -> Result<(), StoreError> {
    let done = sqlx::query("INSERT INTO principals (kind, name, created_at) VALUES ($1, $2, $3)")
        .bind(kind.as_str())
        .bind(name)
        .bind(to_i64(token.created_at))
        .execute(&mut **tx)
        .await;
    unless_taken(done, || format!("{kind} `{name}`"))?;
    insert_token(tx, kind, name, token).await
}

/// An insert's outcome: a unique key already taken is
/// [`StoreError::Exists`] of `what` (a role, a role binding, …).
pub(super) fn unless_taken<T>(
    done: Result<T, sqlx::Error>,
    what: impl FnOnce() -> String,
) -> Result<(), StoreError> {
    match done {
        Ok(_) => Ok(()),
        Err(e) if is_unique_violation(&e) => Err(StoreError::Exists(what())),
        Err(e) => Err(e.into()),
    }
}

/// Whether a node of `kind` is named `name`.
pub(super) async fn node_name_taken(
    tx: &mut Transaction<'static, Any>,
    kind: NodeKind,
    name: &str,
) -> Result<bool, StoreError> {
    Ok(
        sqlx::query("SELECT 1 FROM nodes WHERE kind = $1 AND name = $2")
            .bind(kind.as_str())
            .bind(name)
            .fetch_optional(&mut **tx)
            .await?
            .is_some(),
    )
}

pub(super) fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.is_unique_violation())
}
