//! Console sessions.

use sqlx::Row;

use super::SqlStore;
use super::rows::{to_i64, to_u64};
use crate::store::{ConsoleSession, StoreError};

impl SqlStore {
    pub(super) async fn insert_console_session(
        &self,
        s: &ConsoleSession,
        now: u64,
        most: usize,
    ) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM console_sessions WHERE expires_at <= $1")
            .bind(to_i64(now))
            .execute(&self.pool)
            .await?;
        sqlx::query(
            "INSERT INTO console_sessions (id_hash, token_hash, csrf, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&s.id_hash)
        .bind(&s.token_hash)
        .bind(&s.csrf)
        .bind(to_i64(s.created_at))
        .bind(to_i64(s.expires_at))
        .execute(&self.pool)
        .await?;
        // The new session stays; of the token's others, the newest
        // `most - 1`.
        sqlx::query(
            "DELETE FROM console_sessions WHERE token_hash = $1 AND id_hash <> $3 \
             AND id_hash NOT IN (SELECT id_hash FROM console_sessions \
             WHERE token_hash = $1 AND id_hash <> $3 \
             ORDER BY created_at DESC, id_hash LIMIT $2)",
        )
        .bind(&s.token_hash)
        .bind(i64::try_from(most.saturating_sub(1)).unwrap_or(i64::MAX))
        .bind(&s.id_hash)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(super) async fn find_console_session(
        &self,
        id_hash: &str,
    ) -> Result<Option<ConsoleSession>, StoreError> {
        let row = sqlx::query(
            "SELECT token_hash, csrf, created_at, expires_at FROM console_sessions \
             WHERE id_hash = $1",
        )
        .bind(id_hash)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(ConsoleSession {
                id_hash: id_hash.to_owned(),
                token_hash: r.try_get("token_hash")?,
                csrf: r.try_get("csrf")?,
                created_at: to_u64(r.try_get("created_at")?),
                expires_at: to_u64(r.try_get("expires_at")?),
            })
        })
        .transpose()
    }

    pub(super) async fn remove_console_session(&self, id_hash: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM console_sessions WHERE id_hash = $1")
            .bind(id_hash)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }
}
