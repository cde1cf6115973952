//! The bundles of the trust domains the controller federates with.

use comsat_protocol::api::TrustBundle;
use sqlx::Row;

use super::SqlStore;
use super::rows::to_i64;
use super::tx::mark_change;
use crate::store::StoreError;

impl SqlStore {
    pub(super) async fn read_bundles(&self) -> Result<Vec<TrustBundle>, StoreError> {
        let rows = sqlx::query(
            "SELECT trust_domain, bundle_pem FROM federated_bundles ORDER BY trust_domain",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(TrustBundle {
                    trust_domain: r.try_get("trust_domain")?,
                    bundle_pem: r.try_get("bundle_pem")?,
                })
            })
            .collect()
    }

    /// Runs `sql` (with `args`, then `now`) and bumps every agent's desired state with it: their
    /// relays may chain to a federated bundle.
    async fn change_bundles(
        &self,
        sql: &str,
        args: &[&str],
        now: Option<u64>,
    ) -> Result<u64, StoreError> {
        let mut tx = self.write_tx().await?;
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()));
        for a in args {
            q = q.bind(*a);
        }
        if let Some(now) = now {
            q = q.bind(to_i64(now));
        }
        let changed = q.execute(&mut *tx).await?.rows_affected();
        if changed > 0 {
            sqlx::query(
                "UPDATE nodes SET config_version = config_version + 1 WHERE kind = 'agent'",
            )
            .execute(&mut *tx)
            .await?;
            mark_change(&mut tx, self.backend).await?;
        }
        tx.commit().await?;
        Ok(changed)
    }

    pub(super) async fn write_bundle(&self, b: &TrustBundle, now: u64) -> Result<(), StoreError> {
        self.change_bundles(
            "INSERT INTO federated_bundles (trust_domain, bundle_pem, updated_at) \
             VALUES ($1, $2, $3) ON CONFLICT (trust_domain) DO UPDATE \
             SET bundle_pem = excluded.bundle_pem, updated_at = excluded.updated_at",
            &[&b.trust_domain, &b.bundle_pem],
            Some(now),
        )
        .await
        .map(|_| ())
    }

    pub(super) async fn remove_bundle(&self, trust_domain: &str) -> Result<bool, StoreError> {
        self.change_bundles(
            "DELETE FROM federated_bundles WHERE trust_domain = $1",
            &[trust_domain],
            None,
        )
        .await
        .map(|n| n > 0)
    }
}
