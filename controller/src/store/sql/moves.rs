//! Relays the agents of a link left because they stopped answering.

use comsat_protocol::{LinkId, NodeId, RelayId};
use sqlx::Row;

use super::SqlStore;
use super::rows::{parse, to_i64, to_u64};
use super::tx::mark_change;
use crate::store::{PEER_MOVE_SPACING_SECS, StoreError};

impl SqlStore {
    pub(super) async fn write_peer_moves(
        &self,
        agent: &NodeId,
        relay: &RelayId,
        links: &[LinkId],
        now: u64,
    ) -> Result<usize, StoreError> {
        let agent = agent.to_string();
        let mut tx = self.write_tx().await?;
        let mut moved = 0;
        for link in links {
            let link = link.to_string();
            let Some(row) = sqlx::query("SELECT from_node, to_node FROM links WHERE link_id = $1")
                .bind(&link)
                .fetch_optional(&mut *tx)
                .await?
            else {
                continue;
            };
            let (from, to): (String, String) = (row.try_get("from_node")?, row.try_get("to_node")?);
            let peer = if from == agent { to } else { from };
            // In place of what the agent said before of this link, unless
            // that is younger than the spacing.
            let written = sqlx::query(
                "INSERT INTO peer_moves (link_id, agent_id, relay_id, at) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (link_id, agent_id) DO UPDATE \
                 SET relay_id = excluded.relay_id, at = excluded.at \
                 WHERE peer_moves.at <= $5",
            )
            .bind(&link)
            .bind(&agent)
            .bind(relay.to_string())
            .bind(to_i64(now))
            .bind(to_i64(now.saturating_sub(PEER_MOVE_SPACING_SECS)))
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if written == 0 {
                continue;
            }
            sqlx::query("UPDATE nodes SET config_version = config_version + 1 WHERE node_id = $1")
                .bind(&peer)
                .execute(&mut *tx)
                .await?;
            moved += 1;
        }
        if moved > 0 {
            mark_change(&mut tx, self.backend).await?;
        }
        tx.commit().await?;
        Ok(moved)
    }

    pub(super) async fn read_peer_moves(
        &self,
        agent: &NodeId,
        since: u64,
    ) -> Result<Vec<(LinkId, RelayId, u64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT m.link_id, m.relay_id, m.at FROM peer_moves m \
             JOIN links l ON l.link_id = m.link_id \
             WHERE (l.from_node = $1 OR l.to_node = $1) AND m.agent_id <> $1 AND m.at >= $2",
        )
        .bind(agent.to_string())
        .bind(to_i64(since))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    parse("peer_moves.link_id", &r.try_get::<String, _>("link_id")?)?,
                    parse("peer_moves.relay_id", &r.try_get::<String, _>("relay_id")?)?,
                    to_u64(r.try_get("at")?),
                ))
            })
            .collect()
    }
}
