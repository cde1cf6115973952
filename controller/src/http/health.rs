//! The controller observed: `/healthz` (it serves), `/readyz` (it is ready
//! to serve: its database answers), both for anyone and revealing nothing;
//! `/metrics` (Prometheus text) for a token whose roles allow `get` on
//! `metrics` (the built-in `admin` and `viewer` do), as the API's port is
//! often open to the internet. Every request is counted by route, method
//! and status code, and timed by route.
//!
//! | name | type | meaning |
//! |---|---|---|
//! | `comsat_controller_requests_total{route,method,code}` | counter | requests answered, by route template (`/v1/links/{name}`), method and status code |
//! | `comsat_controller_request_duration_seconds{route}` | histogram | time to answer, by route template (long polls included: they wait by design) |
//! | `comsat_controller_ready` | gauge | 1 when the last `/readyz` found the database answering, 0 when not |

use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics::{counter, gauge, histogram};

use super::AppState;
use super::access::{Policy, Routes};

/// Requests answered, by route, method and code.
pub(crate) const REQUESTS_TOTAL: &str = "comsat_controller_requests_total";
/// Time to answer, by route.
pub(crate) const REQUEST_DURATION: &str = "comsat_controller_request_duration_seconds";
/// Whether the last readiness check passed.
pub(crate) const READY: &str = "comsat_controller_ready";

/// How long `/readyz` waits for the database.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

pub(super) fn routes(routes: Routes) -> Routes {
    metrics::describe_counter!(
        REQUESTS_TOTAL,
        "Requests answered, by route template, method and status code"
    );
    metrics::describe_histogram!(
        REQUEST_DURATION,
        metrics::Unit::Seconds,
        "Time to answer a request, by route template"
    );
    metrics::describe_gauge!(
        READY,
        "1 when the database answered the last readiness check"
    );
    routes
        .add("/healthz", Policy::public(), get(|| async { "ok\n" }))
        .add("/readyz", Policy::public(), get(readyz))
        .add("/metrics", Policy::api("metrics", "get"), get(render))
}

/// 200 while the database answers within [`READY_TIMEOUT`], else 503
/// (what failed goes to the log, not to whoever asked).
async fn readyz(State(state): State<AppState>) -> Response {
    let answer = tokio::time::timeout(READY_TIMEOUT, state.store.ping()).await;
    let ready = matches!(answer, Ok(Ok(())));
    gauge!(READY).set(if ready { 1.0 } else { 0.0 });
    match answer {
        Ok(Ok(())) => (StatusCode::OK, "ready\n").into_response(),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "not ready: the database does not answer");
            not_ready("the database does not answer")
        }
        Err(_) => {
            tracing::warn!("not ready: the database did not answer within 2 s");
            not_ready("the database did not answer within 2 s")
        }
    }
}

fn not_ready(why: &str) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("not ready: {why}\n"),
    )
        .into_response()
}

async fn render(State(state): State<AppState>) -> Response {
    match &state.metrics {
        Some(text) => ([("content-type", "text/plain; version=0.0.4")], (text.0)()).into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "this process records no metrics\n",
        )
            .into_response(),
    }
}

/// Counts and times every request by its route template (never by the
/// path as sent: the label set stays bounded whatever a client asks for).
pub(super) async fn count_request(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    // A method is one of the known few: a stranger's own are "other".
    let method = match *req.method() {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    };
    let started = Instant::now();
    let response = next.run(req).await;
    let code = response.status().as_u16().to_string();
    counter!(REQUESTS_TOTAL, "route" => route.clone(), "method" => method, "code" => code)
        .increment(1);
    histogram!(REQUEST_DURATION, "route" => route).record(started.elapsed().as_secs_f64());
    response
}
