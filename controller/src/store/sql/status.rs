//! What agents report of their link halves.

use std::collections::HashMap;

use comsat_protocol::NodeId;
use comsat_protocol::api::{HalfReport, HalfState};
use sqlx::Row;

use super::SqlStore;
use super::rows::{parse, to_i64, to_u64};
use crate::store::{HalfRecord, StoreError};

impl SqlStore {
    pub(super) async fn replace_link_status(
        &self,
        agent: &NodeId,
        halves: &[HalfReport],
        now: u64,
    ) -> Result<Vec<HalfRecord>, StoreError> {
        let agent_id = agent.to_string();
        let mut tx = self.write_tx().await?;
        let rows = sqlx::query("SELECT link_id, state, since FROM link_status WHERE agent_id = $1")
            .bind(&agent_id)
            .fetch_all(&mut *tx)
            .await?;
        let mut before: HashMap<String, (String, u64)> = HashMap::new();
        for r in rows {
            before.insert(
                r.try_get("link_id")?,
                (r.try_get("state")?, to_u64(r.try_get("since")?)),
            );
        }
        sqlx::query("DELETE FROM link_status WHERE agent_id = $1")
            .bind(&agent_id)
            .execute(&mut *tx)
            .await?;
        let mut changed = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for h in halves {
            let link = h.link_id.to_string();
            if !seen.insert(link.clone()) {
                // A later duplicate: the first one stands.
                continue;
            }
            let since = match before.get(&link) {
                Some((state, since)) if state == h.state.as_str() => *since,
                _ => {
                    changed.push(HalfRecord {
                        link_id: h.link_id,
                        agent: *agent,
                        state: h.state,
                        reason: h.reason.clone(),
                        relay_id: h.relay_id,
                        since: now,
                    });
                    now
                }
            };
            sqlx::query(
                "INSERT INTO link_status (link_id, agent_id, state, reason, relay_id, since) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(&link)
            .bind(&agent_id)
            .bind(h.state.as_str())
            .bind(h.reason.as_deref())
            .bind(h.relay_id.map(|r| r.to_string()))
            .bind(to_i64(since))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(changed)
    }

    pub(super) async fn all_link_status(&self) -> Result<Vec<HalfRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT link_id, agent_id, state, reason, relay_id, since FROM link_status",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(HalfRecord {
                    link_id: parse("link_status.link_id", &r.try_get::<String, _>("link_id")?)?,
                    agent: parse("link_status.agent_id", &r.try_get::<String, _>("agent_id")?)?,
                    state: parse::<HalfState>(
                        "link_status.state",
                        &r.try_get::<String, _>("state")?,
                    )?,
                    reason: r.try_get("reason")?,
                    relay_id: r
                        .try_get::<Option<String>, _>("relay_id")?
                        .map(|s| parse("link_status.relay_id", &s))
                        .transpose()?,
                    since: to_u64(r.try_get("since")?),
                })
            })
            .collect()
    }
}
