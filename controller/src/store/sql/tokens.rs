//! Join tokens looked at without being used.

use comsat_protocol::api::NodeKind;
use sqlx::Row;

use super::SqlStore;
use super::rows::{parse, to_u64};
use crate::store::{Redemption, StoreError};

impl SqlStore {
    /// Whether `r` would redeem its token now (known, this secret, this
    /// kind of node, unused, unexpired), changing nothing: the cheap check
    /// before an enrolment's costlier parts. The redemption itself decides.
    pub(super) async fn peek_join_token(&self, r: &Redemption) -> Result<(), StoreError> {
        let row = sqlx::query(
            "SELECT secret_hash, kind, used_at, expires_at FROM join_tokens WHERE id = $1",
        )
        .bind(&r.token_id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Err(StoreError::UnknownToken);
        };
        if row.try_get::<String, _>("secret_hash")? != r.secret_hash {
            return Err(StoreError::UnknownToken);
        }
        if row.try_get::<Option<i64>, _>("used_at")?.is_some() {
            return Err(StoreError::TokenUsed);
        }
        let token_kind: NodeKind = parse("join_tokens.kind", &row.try_get::<String, _>("kind")?)?;
        if token_kind != r.kind {
            return Err(StoreError::WrongKind { token_kind });
        }
        if to_u64(row.try_get("expires_at")?) <= r.now {
            return Err(StoreError::TokenExpired);
        }
        Ok(())
    }
}
