//! The flow log: what agents report of the flows that ended.

use comsat_protocol::api::{FlowOutcome, FlowRecord};
use comsat_protocol::{NodeId, Side};
use sqlx::Row;
use sqlx::any::AnyRow;

use super::SqlStore;
use super::rows::{json, parse, to_i64, to_json, to_u64};
use crate::store::{FlowQuery, StoreError};

const COLUMNS: &str = "agent_id, link_id, flow_id, side, started_ms, ended_ms, caller_id, \
     caller, relay_id, bytes_sent, bytes_received, outcome";

/// `s` with `LIKE`'s wildcards (and the escape) escaped by `\`.
fn like_escaped(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_")
}

fn flow_from_row(row: &AnyRow) -> Result<(NodeId, FlowRecord), StoreError> {
    let side = match row.try_get::<String, _>("side")?.as_str() {
        "a" => Side::A,
        _ => Side::B,
    };
    let outcome = match row.try_get::<String, _>("outcome")?.as_str() {
        "completed" => FlowOutcome::Completed,
        "refused" => FlowOutcome::Refused,
        _ => FlowOutcome::Reset,
    };
    let record = FlowRecord {
        link_id: parse("flow_log.link_id", &row.try_get::<String, _>("link_id")?)?,
        flow_id: u32::try_from(row.try_get::<i64, _>("flow_id")?).unwrap_or(0),
        side,
        caller_id: row.try_get("caller_id")?,
        caller: json("flow_log.caller", &row.try_get::<String, _>("caller")?)?,
        relay_id: row
            .try_get::<Option<String>, _>("relay_id")?
            .map(|r| parse("flow_log.relay_id", &r))
            .transpose()?,
        started_ms: to_u64(row.try_get("started_ms")?),
        ended_ms: to_u64(row.try_get("ended_ms")?),
        bytes_sent: to_u64(row.try_get("bytes_sent")?),
        bytes_received: to_u64(row.try_get("bytes_received")?),
        outcome,
    };
    let agent = parse("flow_log.agent_id", &row.try_get::<String, _>("agent_id")?)?;
    Ok((agent, record))
}

impl SqlStore {
    pub(super) async fn write_flows(
        &self,
        agent: &NodeId,
        flows: &[FlowRecord],
    ) -> Result<(), StoreError> {
        let agent = agent.to_string();
        let mut tx = self.write_tx().await?;
        for f in flows {
            // Constant text only: the columns and placeholders.
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO flow_log ({COLUMNS}) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
                 ON CONFLICT DO NOTHING"
            )))
            .bind(&agent)
            .bind(f.link_id.to_string())
            .bind(i64::from(f.flow_id))
            .bind(f.side.to_string())
            .bind(to_i64(f.started_ms))
            .bind(to_i64(f.ended_ms))
            .bind(f.caller_id.as_deref())
            .bind(to_json(&f.caller)?)
            .bind(f.relay_id.map(|r| r.to_string()))
            .bind(to_i64(f.bytes_sent))
            .bind(to_i64(f.bytes_received))
            .bind(f.outcome.as_str())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn read_flows(
        &self,
        q: &FlowQuery,
    ) -> Result<Vec<(NodeId, FlowRecord)>, StoreError> {
        // Each filter is on, or its parameter makes it true.
        let (by_id, by_selector) = match q.identity.as_deref() {
            Some(id) if id.starts_with("spiffe://") => (Some(id.to_owned()), None),
            Some(selector) => (None, Some(format!("%\"{}\"%", like_escaped(selector)))),
            None => (None, None),
        };
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM flow_log \
             WHERE ($1 = '' OR link_id = $1) AND ($2 = '' OR caller_id = $2) \
             AND ($3 = '' OR caller LIKE $3 ESCAPE '\\') \
             AND ended_ms >= $4 AND ended_ms <= $5 \
             ORDER BY ended_ms DESC, agent_id, link_id, flow_id LIMIT $6"
        )))
        .bind(q.link.map(|l| l.to_string()).unwrap_or_default())
        .bind(by_id.unwrap_or_default())
        .bind(by_selector.unwrap_or_default())
        .bind(to_i64(q.since_ms))
        .bind(to_i64(q.until_ms))
        .bind(i64::from(q.limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(flow_from_row).collect()
    }

    pub(super) async fn delete_flows(&self, before_ms: u64, max: u64) -> Result<u64, StoreError> {
        let mut tx = self.write_tx().await?;
        let old = sqlx::query("DELETE FROM flow_log WHERE ended_ms < $1")
            .bind(to_i64(before_ms))
            .execute(&mut *tx)
            .await?
            .rows_affected();
        // Beyond `max` rows, those that ended before the newest `max`-th
        // go (ties with it stay).
        let over = sqlx::query(
            "DELETE FROM flow_log WHERE ended_ms < \
             (SELECT ended_ms FROM flow_log ORDER BY ended_ms DESC LIMIT 1 OFFSET $1)",
        )
        .bind(to_i64(max.saturating_sub(1)))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(old + over)
    }
}
