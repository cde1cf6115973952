//! The bundles of the trust domains the controller federates with: a
//! relay whose certificate is an X.509-SVID of one of them may enrol, and
//! agents anchor it at that bundle.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use comsat_protocol::api::{self, BundleSet, Empty, TrustBundle};

use super::access::{Audited, Policy, Routes, delete, get, put};
use super::{AppState, parse_json};
use crate::state::ApiError;
use crate::unix_now;

/// The federated bundles' routes.
#[rustfmt::skip]
pub(super) fn routes(r: Routes) -> Routes {
    let one = &format!("{}/{{domain}}", api::PATH_BUNDLES);
    r.add(api::PATH_BUNDLES, Policy::api("bundles", "list"), get(list_bundles))
        .add(one, Policy::api("bundles", "update").audited("bundle.set"), put(set_bundle))
        .add(one, Policy::api("bundles", "delete").audited("bundle.delete"), delete(delete_bundle))
}

async fn list_bundles(State(state): State<AppState>) -> Result<Json<Vec<TrustBundle>>, ApiError> {
    Ok(Json(state.store.bundles().await?))
}

/// Checks a trust domain named in a path: a valid one, not this
/// controller's own.
fn federated_domain(state: &AppState, domain: &str) -> Result<(), ApiError> {
    comsat_protocol::spiffe::check_trust_domain(domain)
        .map_err(|why| ApiError::bad_request(format!("trust domain `{domain}`: {why}")))?;
    if domain == state.config.trust_domain() {
        return Err(ApiError::bad_request(format!(
            "{domain} is this controller's own trust domain: federate with another"
        )));
    }
    Ok(())
}

async fn set_bundle(
    State(state): State<AppState>,
    Path(domain): Path<String>,
    body: Bytes,
) -> Result<(Audited, Json<TrustBundle>), ApiError> {
    federated_domain(&state, &domain)?;
    let req: BundleSet = parse_json(&body)?;
    if req.bundle.len() > api::MAX_BUNDLE_LEN {
        return Err(ApiError::bad_request(format!(
            "the bundle is longer than {} bytes",
            api::MAX_BUNDLE_LEN
        )));
    }
    let bundle_pem = crate::bundle::federated_bundle_pem(&req.bundle)
        .map_err(|e| ApiError::bad_request(format!("bundle of {domain}: {e}")))?;
    let bundles = state.store.bundles().await?;
    if bundles.len() >= api::MAX_FEDERATED && !bundles.iter().any(|b| b.trust_domain == domain) {
        return Err(ApiError::bad_request(format!(
            "at most {} federated trust domains",
            api::MAX_FEDERATED
        )));
    }
    let bundle = TrustBundle {
        trust_domain: domain,
        bundle_pem,
    };
    state.store.set_bundle(&bundle, unix_now()).await?;
    state.notify();
    tracing::info!(trust_domain = %bundle.trust_domain, "federated bundle set");
    Ok((
        Audited::on(format!("bundle/{}", bundle.trust_domain)),
        Json(bundle),
    ))
}

async fn delete_bundle(
    State(state): State<AppState>,
    Path(domain): Path<String>,
) -> Result<(Audited, Json<Empty>), ApiError> {
    if state.store.delete_bundle(&domain).await? {
        state.notify();
        tracing::info!(trust_domain = %domain, "federated bundle removed");
        Ok((Audited::on(format!("bundle/{domain}")), Json(Empty {})))
    } else {
        Err(ApiError::not_found(format!(
            "no bundle of trust domain `{domain}`"
        )))
    }
}
