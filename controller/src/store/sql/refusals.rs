//! The links agents refused.

use std::collections::HashMap;

use comsat_protocol::{LinkId, NodeId};
use sqlx::Row;

use super::SqlStore;
use super::rows::{parse, to_i64, to_u64};
use crate::store::{RefusalRecord, StoreError};

impl SqlStore {
    pub(super) async fn replace_refusals(
        &self,
        agent: &NodeId,
        refused: &[(LinkId, String)],
        now: u64,
    ) -> Result<Vec<(LinkId, String)>, StoreError> {
        let agent = agent.to_string();
        let mut tx = self.write_tx().await?;
        let rows = sqlx::query("SELECT link_id, reason FROM link_refusals WHERE agent_id = $1")
            .bind(&agent)
            .fetch_all(&mut *tx)
            .await?;
        let mut before = HashMap::new();
        for r in rows {
            let link: String = r.try_get("link_id")?;
            before.insert(link, r.try_get::<String, _>("reason")?);
        }
        let wanted: HashMap<String, &str> = refused
            .iter()
            .map(|(l, reason)| (l.to_string(), reason.as_str()))
            .collect();
        for link in before.keys().filter(|l| !wanted.contains_key(*l)) {
            sqlx::query("DELETE FROM link_refusals WHERE link_id = $1 AND agent_id = $2")
                .bind(link)
                .bind(&agent)
                .execute(&mut *tx)
                .await?;
        }
        let mut new = Vec::new();
        for (link, reason) in refused {
            let id = link.to_string();
            if before.get(&id).is_some_and(|r| r == reason) || wanted[&id] != reason {
                // Unchanged (it keeps its time), or a later duplicate.
                continue;
            }
            sqlx::query("DELETE FROM link_refusals WHERE link_id = $1 AND agent_id = $2")
                .bind(&id)
                .bind(&agent)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "INSERT INTO link_refusals (link_id, agent_id, reason, at) VALUES ($1, $2, $3, $4)",
            )
            .bind(&id)
            .bind(&agent)
            .bind(reason)
            .bind(to_i64(now))
            .execute(&mut *tx)
            .await?;
            new.push((*link, reason.clone()));
        }
        tx.commit().await?;
        Ok(new)
    }

    pub(super) async fn all_refusals(&self) -> Result<Vec<RefusalRecord>, StoreError> {
        let rows = sqlx::query("SELECT link_id, agent_id, reason, at FROM link_refusals")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(RefusalRecord {
                    link_id: parse("link_refusals.link_id", &r.try_get::<String, _>("link_id")?)?,
                    agent: parse(
                        "link_refusals.agent_id",
                        &r.try_get::<String, _>("agent_id")?,
                    )?,
                    reason: r.try_get("reason")?,
                    at: to_u64(r.try_get("at")?),
                })
            })
            .collect()
    }
}
