//! The admin HTTP server of relays and agents: `/metrics`, `/healthz`,
//! `/readyz`.
//!
//! Serve it on a loopback or management address only: it needs no
//! authentication because it reveals nothing secret, but it does reveal
//! counts and ids.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;

/// Series rendered at scrape time, appended to the registry's.
pub type ExtraMetrics = Arc<dyn Fn() -> String + Send + Sync>;

/// Binds the admin address and returns the bound address and the serving
/// future. `extra` adds series computed at scrape time (the relay's
/// per-link series).
pub async fn bind(
    addr: SocketAddr,
    prometheus: PrometheusHandle,
    extra: Option<ExtraMetrics>,
    ready: impl Fn() -> bool + Send + Sync + 'static,
    not_ready_reason: &'static str,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, impl Future<Output = std::io::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let ready = Arc::new(ready);
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let p = prometheus.clone();
                let extra = extra.clone();
                async move {
                    let mut text = p.render();
                    if let Some(extra) = extra {
                        text.push_str(&extra());
                    }
                    text
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.clone();
                async move {
                    if ready() {
                        (StatusCode::OK, "ready\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, not_ready_reason)
                    }
                }
            }),
        );
    let serve = axum::serve(listener, app).with_graceful_shutdown(shutdown);
    Ok((local, async move { serve.await }))
}
