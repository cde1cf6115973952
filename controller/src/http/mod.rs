//! The HTTPS API ([`comsat_protocol::api`]): the router and what every
//! handler shares. Handlers live by resource:
//!
//! - [`access`] declares who may call each route and what it records,
//!   and applies it;
//! - [`auth`] knows who calls: API tokens and their role checks, node
//!   JWTs, refused authentications;
//! - [`enrol`] serves the CA, join tokens and enrolment;
//! - [`nodes`] answers relays and agents, and shows enrolled nodes to
//!   operators;
//! - [`links`] creates, changes and deletes links;
//! - [`rbac`] keeps users, service accounts, their tokens, roles and
//!   bindings;
//! - [`audit`] reads the audit log;
//! - [`health`] says whether the controller serves and is ready, and
//!   shows its metrics (every request counted by route and code);
//! - [`console`] serves the console's pages and signs people in to it.

mod access;
mod audit;
mod auth;
mod bundles;
mod console;
mod enrol;
mod flows;
pub(crate) mod health;
mod links;
mod nodes;
mod openapi;
mod rbac;

use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Query};
use comsat_protocol::api;
use serde::de::DeserializeOwned;

use crate::state::{ApiError, Shared};

pub(super) type AppState = Arc<Shared>;

/// The API's routes. Each module lists its own, each route with its
/// [`access::Policy`]: who may call it and what its success records.
pub(crate) fn router(state: AppState) -> Router {
    routes(&state)
        .into_router()
        .fallback(|| async { ApiError::not_found("no such API path") })
        .layer(axum::middleware::from_fn(health::count_request))
        .layer(DefaultBodyLimit::max(api::MAX_BODY_LEN))
        .with_state(state)
}

fn routes(state: &AppState) -> access::Routes {
    let routes = access::Routes::new(state);
    let routes = enrol::routes(routes);
    let routes = nodes::routes(routes);
    let routes = links::routes(routes);
    let routes = rbac::routes(routes);
    let routes = audit::routes(routes);
    let routes = flows::routes(routes);
    let routes = bundles::routes(routes);
    let routes = health::routes(routes);
    let routes = console::routes(routes);
    openapi::routes(routes)
}

/// Every (path, method) the API serves, in the order they were added.
pub(crate) fn route_table(state: &AppState) -> Vec<(String, &'static str)> {
    routes(state).table()
}

/// Parses a JSON body read as bytes (after the caller was authenticated:
/// a stranger learns nothing from the parser's messages).
pub(super) fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

pub(super) fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(t)| t)
        .map_err(|e| ApiError::bad_request(format!("invalid query: {}", e.body_text())))
}
