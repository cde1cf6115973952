//! What relays report of the links they carry, and nodes' versions.

use std::collections::HashMap;

use comsat_protocol::api::LinkTraffic;
use comsat_protocol::{LinkId, NodeId};
use sqlx::Row;

use super::SqlStore;
use super::rows::{parse, to_i64, to_u64};
use crate::store::{StoreError, TrafficRecord};

/// Bytes per second from `old` (at `old_at`) to `new` (at `now`); 0 when
/// the counter went back (the relay restarted) or no time passed.
fn rate(new: u64, old: u64, old_at: u64, now: u64) -> u64 {
    if now > old_at && new >= old {
        (new - old) / (now - old_at)
    } else {
        0
    }
}

impl SqlStore {
    pub(super) async fn write_traffic(
        &self,
        relay: &NodeId,
        traffic: &[LinkTraffic],
        now: u64,
    ) -> Result<(), StoreError> {
        let relay_id = relay.to_string();
        let mut tx = self.write_tx().await?;
        for t in traffic {
            let link_id = t.link_id.to_string();
            let before = sqlx::query(
                "SELECT a_to_b, b_to_a, at FROM link_traffic WHERE link_id = $1 AND relay_id = $2",
            )
            .bind(&link_id)
            .bind(&relay_id)
            .fetch_optional(&mut *tx)
            .await?;
            let (rate_a, rate_b) = match before {
                Some(r) => {
                    let at = to_u64(r.try_get("at")?);
                    (
                        rate(t.bytes_a_to_b, to_u64(r.try_get("a_to_b")?), at, now),
                        rate(t.bytes_b_to_a, to_u64(r.try_get("b_to_a")?), at, now),
                    )
                }
                None => (0, 0),
            };
            // Only a link whose grant names this relay: a relay reports
            // nothing of another's links.
            sqlx::query(
                "INSERT INTO link_traffic \
                 (link_id, relay_id, a_to_b, b_to_a, flows_open, rate_a_to_b, rate_b_to_a, at) \
                 SELECT $1, $2, $3, $4, $5, $6, $7, $8 FROM links \
                 WHERE link_id = $1 AND relays LIKE '%' || $2 || '%' \
                 ON CONFLICT (link_id, relay_id) DO UPDATE SET a_to_b = excluded.a_to_b, \
                 b_to_a = excluded.b_to_a, flows_open = excluded.flows_open, \
                 rate_a_to_b = excluded.rate_a_to_b, rate_b_to_a = excluded.rate_b_to_a, \
                 at = excluded.at",
            )
            .bind(&link_id)
            .bind(&relay_id)
            .bind(to_i64(t.bytes_a_to_b))
            .bind(to_i64(t.bytes_b_to_a))
            .bind(to_i64(t.flows_open))
            .bind(to_i64(rate_a))
            .bind(to_i64(rate_b))
            .bind(to_i64(now))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn delete_traffic(&self, before: u64) -> Result<u64, StoreError> {
        Ok(sqlx::query("DELETE FROM link_traffic WHERE at < $1")
            .bind(to_i64(before))
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    pub(super) async fn all_traffic(&self) -> Result<Vec<TrafficRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT link_id, relay_id, a_to_b, b_to_a, flows_open, rate_a_to_b, rate_b_to_a, at \
             FROM link_traffic",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(TrafficRecord {
                    link_id: parse::<LinkId>(
                        "link_traffic.link_id",
                        &r.try_get::<String, _>("link_id")?,
                    )?,
                    relay: parse::<NodeId>(
                        "link_traffic.relay_id",
                        &r.try_get::<String, _>("relay_id")?,
                    )?,
                    a_to_b: to_u64(r.try_get("a_to_b")?),
                    b_to_a: to_u64(r.try_get("b_to_a")?),
                    flows_open: to_u64(r.try_get("flows_open")?),
                    rate_a_to_b: to_u64(r.try_get("rate_a_to_b")?),
                    rate_b_to_a: to_u64(r.try_get("rate_b_to_a")?),
                    at: to_u64(r.try_get("at")?),
                })
            })
            .collect()
    }

    pub(super) async fn write_version(
        &self,
        node: &NodeId,
        version: &str,
        now: u64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO node_versions (node_id, version, at) VALUES ($1, $2, $3) \
             ON CONFLICT (node_id) DO UPDATE SET version = excluded.version, at = excluded.at",
        )
        .bind(node.to_string())
        .bind(version)
        .bind(to_i64(now))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(super) async fn all_versions(&self) -> Result<HashMap<NodeId, String>, StoreError> {
        let rows = sqlx::query("SELECT node_id, version FROM node_versions")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    parse::<NodeId>("node_versions.node_id", &r.try_get::<String, _>("node_id")?)?,
                    r.try_get("version")?,
                ))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::rate;

    #[test]
    fn a_rate_is_bytes_over_seconds_and_zero_when_counters_went_back() {
        assert_eq!(rate(10_000, 0, 100, 105), 2000);
        assert_eq!(rate(5, 10_000, 100, 105), 0, "the relay restarted");
        assert_eq!(rate(10_000, 0, 100, 100), 0, "no time passed");
    }
}
