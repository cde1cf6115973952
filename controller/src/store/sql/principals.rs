//! Users and service accounts, as listed.

use comsat_protocol::api::{ApiTokenInfo, PrincipalInfo, PrincipalKind};
use sqlx::Row;

use super::SqlStore;
use super::rows::to_u64;
use crate::store::StoreError;

impl SqlStore {
    pub(super) async fn read_principals(
        &self,
        kind: PrincipalKind,
    ) -> Result<Vec<PrincipalInfo>, StoreError> {
        let rows =
            sqlx::query("SELECT name, created_at FROM principals WHERE kind = $1 ORDER BY name")
                .bind(kind.as_str())
                .fetch_all(&self.pool)
                .await?;
        let tokens = sqlx::query(
            "SELECT name, id, created_at, expires_at, revoked_at FROM api_tokens \
             WHERE subject_kind = $1 ORDER BY created_at, id",
        )
        .bind(kind.as_str())
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::new();
        for r in &rows {
            let name: String = r.try_get("name")?;
            let mut mine = Vec::new();
            for t in &tokens {
                if t.try_get::<String, _>("name")? == name {
                    mine.push(ApiTokenInfo {
                        id: t.try_get::<Option<String>, _>("id")?.unwrap_or_default(),
                        created_at: to_u64(t.try_get("created_at")?),
                        expires_at: t.try_get::<Option<i64>, _>("expires_at")?.map(to_u64),
                        revoked_at: t.try_get::<Option<i64>, _>("revoked_at")?.map(to_u64),
                    });
                }
            }
            out.push(PrincipalInfo {
                kind,
                name,
                created_at: to_u64(r.try_get("created_at")?),
                tokens: mine,
            });
        }
        Ok(out)
    }
}
