//! The audit log, as operators read it.

use super::access::get;
use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use comsat_protocol::api::{self, AuditRecord};
use serde::Deserialize;

use super::access::{Policy, Routes};
use super::{AppState, query};
use crate::state::ApiError;

/// The audit log's route.
pub(super) fn routes(r: Routes) -> Routes {
    r.add(
        api::PATH_AUDIT,
        Policy::api("audit", "list"),
        get(audit_list),
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    /// Unix seconds.
    #[serde(default)]
    since: u64,
    #[serde(default)]
    subject: Option<String>,
    /// `ok`, `denied` or `alarm`.
    #[serde(default)]
    result: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
}

async fn audit_list(
    State(state): State<AppState>,
    q: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<Json<Vec<AuditRecord>>, ApiError> {
    let q = query(q)?;
    if q.subject.as_ref().is_some_and(|s| s.len() > 256) {
        return Err(ApiError::bad_request("subject: at most 256 characters"));
    }
    if q.result
        .as_deref()
        .is_some_and(|r| !["ok", "denied", "alarm"].contains(&r))
    {
        return Err(ApiError::bad_request("result: ok, denied or alarm"));
    }
    let limit = q
        .limit
        .unwrap_or(api::MAX_AUDIT_RECORDS)
        .clamp(1, api::MAX_AUDIT_RECORDS);
    let records = state
        .store
        .audit(
            q.since.saturating_mul(1000),
            q.subject.as_deref(),
            q.result.as_deref(),
            limit,
        )
        .await?;
    Ok(Json(records))
}
