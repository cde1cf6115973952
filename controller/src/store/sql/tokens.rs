//! Join tokens: looked at without being used, and redeemed.

use comsat_protocol::api::NodeKind;
use sqlx::Row;

use super::SqlStore;
use super::rows::{parse, to_i64, to_u64};
use super::tx::{is_unique_violation, node_name_taken};
use crate::store::{NewNode, NodeRecord, Redemption, StoreError};
use comsat_protocol::api::RelayLoad;

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

    /// Redeems join token `r` and enrols `node` with it, in one transaction.
    pub(super) async fn redeem(
        &self,
        r: &Redemption,
        node: &NewNode,
    ) -> Result<NodeRecord, StoreError> {
        let mut tx = self.write_tx().await?;
        // The one statement that decides who wins a race.
        let won = sqlx::query(
            "UPDATE join_tokens SET used_at = $1 \
             WHERE id = $2 AND secret_hash = $3 AND kind = $4 AND used_at IS NULL \
             RETURNING name, expires_at",
        )
        .bind(to_i64(r.now))
        .bind(&r.token_id)
        .bind(&r.secret_hash)
        .bind(r.kind.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(won) = won else {
            // Find out why, without changing anything.
            let row =
                sqlx::query("SELECT secret_hash, kind, used_at FROM join_tokens WHERE id = $1")
                    .bind(&r.token_id)
                    .fetch_optional(&mut *tx)
                    .await?;
            tx.rollback().await?;
            let Some(row) = row else {
                return Err(StoreError::UnknownToken);
            };
            let hash: String = row.try_get("secret_hash")?;
            if hash != r.secret_hash {
                return Err(StoreError::UnknownToken);
            }
            if row.try_get::<Option<i64>, _>("used_at")?.is_some() {
                return Err(StoreError::TokenUsed);
            }
            let token_kind: NodeKind =
                parse("join_tokens.kind", &row.try_get::<String, _>("kind")?)?;
            return Err(StoreError::WrongKind { token_kind });
        };
        let expires_at = to_u64(won.try_get("expires_at")?);
        if expires_at <= r.now {
            // Used up all the same: an expired token never works again.
            tx.commit().await?;
            return Err(StoreError::TokenExpired);
        }
        let token_name: Option<String> = won.try_get("name")?;
        let name = match token_name {
            Some(name) => {
                if node_name_taken(&mut tx, r.kind, &name).await? {
                    tx.rollback().await?;
                    return Err(StoreError::NodeNameTaken { kind: r.kind, name });
                }
                name
            }
            None => {
                let mut tries = 0;
                loop {
                    let name = format!("{}-{}", r.kind, hex::encode(rand::random::<[u8; 4]>()));
                    let taken = node_name_taken(&mut tx, r.kind, &name).await?;
                    tries += 1;
                    if !taken {
                        break name;
                    }
                    if tries > 16 {
                        tx.rollback().await?;
                        return Err(StoreError::NodeNameTaken { kind: r.kind, name });
                    }
                }
            }
        };
        let record = NodeRecord {
            node_id: node.node_id,
            kind: r.kind,
            name,
            sign_pub: node.sign_pub,
            noise_pub: node.noise_pub,
            public_addr: node.public_addr.clone(),
            interactive_addr: node.interactive_addr.clone(),
            spiffe_id: node.spiffe_id.clone(),
            created_at: r.now,
            last_seen: Some(r.now),
            last_heartbeat: None,
            load: RelayLoad::default(),
            config_version: 1,
        };
        let inserted = sqlx::query(
            "INSERT INTO nodes (node_id, kind, name, sign_pub, noise_pub, public_addr, created_at, \
             last_seen, last_heartbeat, load, config_version, interactive_addr, spiffe_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, NULL, NULL, $9, $10, $11)",
        )
        .bind(record.node_id.to_string())
        .bind(record.kind.as_str())
        .bind(&record.name)
        .bind(record.sign_pub.to_string())
        .bind(record.noise_pub.map(|k| k.to_string()))
        .bind(record.public_addr.as_deref())
        .bind(to_i64(r.now))
        .bind(to_i64(r.now))
        .bind(to_i64(record.config_version))
        .bind(record.interactive_addr.as_deref())
        .bind(record.spiffe_id.as_deref())
        .execute(&mut *tx)
        .await;
        if let Err(e) = inserted {
            let unique = is_unique_violation(&e);
            tx.rollback().await?;
            if unique {
                return Err(StoreError::NodeNameTaken {
                    kind: record.kind,
                    name: record.name,
                });
            }
            return Err(e.into());
        }
        tx.commit().await?;
        Ok(record)
    }
}
