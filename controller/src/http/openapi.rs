//! The API described: its OpenAPI 3 document, served as written at
//! [`api::PATH_OPENAPI`] to anyone (it holds nothing secret), and kept true
//! by tests (every route served is in it and nothing else; CI runs
//! schemathesis against a running controller).

use axum::response::IntoResponse;
use comsat_protocol::api;

use super::access::{Policy, Routes, get};

/// The document.
pub(crate) const DOCUMENT: &str = include_str!("openapi.yaml");

pub(super) fn routes(routes: Routes) -> Routes {
    routes.add(
        api::PATH_OPENAPI,
        Policy::public(),
        get(|| async { ([("content-type", "application/yaml")], DOCUMENT).into_response() }),
    )
}
