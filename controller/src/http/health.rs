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
//! | `comsat_controller_enrolments_total{kind}` | counter | nodes enrolled, by kind (`agent`, `relay`) |
//! | `comsat_controller_refusals_total{action}` | counter | refusals recorded in the audit log, by action (`authenticate`, `enrol`, `links.create`, `link.refuse`, `node.clone`, …: each a fixed name of the code, or a route's resource and verb) |
//! | `comsat_controller_long_polls_open{kind}` | gauge | long polls waiting now: `relay` (grant events), `agent` (desired state) |
//! | `comsat_controller_db_connections{state}` | gauge | the database pool's connections, `idle` and `busy`, when last scraped |
//! | `comsat_controller_db_ping_seconds` | histogram | time for the database to answer a trivial query (at each `/readyz` and each scrape) |
//! | `comsat_controller_relay_events_pending{relay}` | gauge | grant events a relay has not fetched yet, by relay name, at each scrape (counted up to 1,001) for the relays that long-poll this controller |
//! | `comsat_controller_link_info{link,name}` | gauge | 1 for each link (the first 10,000 by name), read from the database at each scrape: `link` is its id, the label relays give their per-link series, `name` its name |
//!
//! Relays know a link by its id only (they hold grants, not names: need to
//! know); `comsat_controller_link_info` puts names on their series in a
//! query: `comsat_relay_link_bytes_total * on(link) group_left(name)
//! comsat_controller_link_info`.

use std::time::{Duration, Instant};

use super::access::get;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics::{counter, gauge, histogram};

use comsat_protocol::RelayId;
use comsat_protocol::api::{self, NodeKind};

use super::AppState;
use super::access::{Policy, Routes};
use crate::store::StoreError;

/// Requests answered, by route, method and code.
pub(crate) const REQUESTS_TOTAL: &str = "comsat_controller_requests_total";
/// Time to answer, by route.
pub(crate) const REQUEST_DURATION: &str = "comsat_controller_request_duration_seconds";
/// Whether the last readiness check passed.
pub(crate) const READY: &str = "comsat_controller_ready";

/// Nodes enrolled, by kind.
pub(crate) const ENROLMENTS_TOTAL: &str = "comsat_controller_enrolments_total";
/// Refusals recorded in the audit log, by action.
pub(crate) const REFUSALS_TOTAL: &str = "comsat_controller_refusals_total";
/// Long polls waiting now, by kind.
const LONG_POLLS_OPEN: &str = "comsat_controller_long_polls_open";
/// The database pool's connections, by state.
const DB_CONNECTIONS: &str = "comsat_controller_db_connections";
/// Time for the database to answer a trivial query.
const DB_PING: &str = "comsat_controller_db_ping_seconds";
/// Grant events a relay has not fetched yet.
const RELAY_EVENTS_PENDING: &str = "comsat_controller_relay_events_pending";

/// The link info series, for the links a scrape reports.
const LINK_INFO: &str = "comsat_controller_link_info";
/// At most this many links get a [`LINK_INFO`] series, the first by name.
const MAX_LINK_INFO: usize = 10_000;

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
    metrics::describe_counter!(ENROLMENTS_TOTAL, "Nodes enrolled, by kind");
    metrics::describe_counter!(
        REFUSALS_TOTAL,
        "Refusals recorded in the audit log, by action"
    );
    metrics::describe_gauge!(LONG_POLLS_OPEN, "Long polls waiting now, by kind");
    metrics::describe_gauge!(
        DB_CONNECTIONS,
        "The database pool's connections, by state, when last scraped"
    );
    metrics::describe_histogram!(
        DB_PING,
        metrics::Unit::Seconds,
        "Time for the database to answer a trivial query"
    );
    metrics::describe_gauge!(
        RELAY_EVENTS_PENDING,
        "Grant events a relay has not fetched yet (counted up to 1001), by relay"
    );
    routes
        .add("/healthz", Policy::public(), get(|| async { "ok\n" }))
        .add("/readyz", Policy::public(), get(readyz))
        .add("/metrics", Policy::api("metrics", "get"), get(render))
}

/// 200 while the database answers within [`READY_TIMEOUT`], else 503
/// (what failed goes to the log, not to whoever asked).
async fn readyz(State(state): State<AppState>) -> Response {
    let answer = ping(&state).await;
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

/// Asks the database a trivial query, timed, within [`READY_TIMEOUT`].
async fn ping(state: &AppState) -> Result<Result<(), StoreError>, tokio::time::error::Elapsed> {
    let asked = Instant::now();
    let answer = tokio::time::timeout(READY_TIMEOUT, state.store.ping()).await;
    if matches!(answer, Ok(Ok(()))) {
        histogram!(DB_PING).record(asked.elapsed().as_secs_f64());
    }
    answer
}

/// A long poll waiting, counted while it lives.
pub(crate) struct LongPoll(&'static str);

impl LongPoll {
    /// A long poll of `kind` (`relay`, `agent`) starts.
    pub(crate) fn start(kind: &'static str) -> Self {
        gauge!(LONG_POLLS_OPEN, "kind" => kind).increment(1.0);
        Self(kind)
    }
}

impl Drop for LongPoll {
    fn drop(&mut self) {
        gauge!(LONG_POLLS_OPEN, "kind" => self.0).decrement(1.0);
    }
}

/// What is measured when scraped: the pool, a ping, and the events each
/// relay polling here has not fetched (the first [`api::MAX_EVENTS_PER_POLL`]
/// and one more are counted). A failure leaves the last values.
async fn observe(state: &AppState) {
    let (size, idle) = state.store.pool_connections();
    gauge!(DB_CONNECTIONS, "state" => "idle").set(idle as f64);
    gauge!(DB_CONNECTIONS, "state" => "busy").set((size as f64 - idle as f64).max(0.0));
    if !matches!(ping(state).await, Ok(Ok(()))) {
        return;
    }
    let Ok(relays) = state.store.nodes(NodeKind::Relay).await else {
        return;
    };
    let cursors: Vec<(RelayId, u64)> = {
        let mut cursors = state.relay_cursors();
        cursors.retain(|id, _| relays.iter().any(|r| r.node_id.0 == id.0));
        cursors.iter().map(|(id, since)| (*id, *since)).collect()
    };
    for (relay, since) in cursors {
        let Ok(rows) = state
            .store
            .relay_events(&relay, since, api::MAX_EVENTS_PER_POLL + 1)
            .await
        else {
            return;
        };
        let name = relays
            .iter()
            .find(|r| r.node_id.0 == relay.0)
            .map_or_else(|| relay.to_string(), |r| r.name.clone());
        gauge!(RELAY_EVENTS_PENDING, "relay" => name).set(rows.len() as f64);
    }
}

/// [`LINK_INFO`]'s family: a series for each link, rendered here rather
/// than recorded, so that a deleted link's series goes with it. Empty when
/// the database does not answer.
async fn link_info(state: &AppState) -> String {
    use std::fmt::Write;
    let Ok(mut links) = state.store.links().await else {
        return String::new();
    };
    links.sort_by(|a, b| a.name.cmp(&b.name));
    let mut out = format!(
        "# HELP {LINK_INFO} 1 for each link: its id (the label `link` of relays' per-link series) and name\n\
         # TYPE {LINK_INFO} gauge\n"
    );
    for link in links.iter().take(MAX_LINK_INFO) {
        let _ = writeln!(
            out,
            "{LINK_INFO}{{link=\"{}\",name=\"{}\"}} 1",
            hex::encode(link.link_id.0),
            escape_label(&link.name)
        );
    }
    out
}

/// `value` as a Prometheus label value (the controller's names never need
/// it, but a database is read here, not trusted).
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

async fn render(State(state): State<AppState>) -> Response {
    match &state.metrics {
        Some(text) => {
            observe(&state).await;
            let mut body = (text.0)();
            body.push_str(&link_info(&state).await);
            ([("content-type", "text/plain; version=0.0.4")], body).into_response()
        }
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
