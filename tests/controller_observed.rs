//! The controller observed, as a real process: `/healthz` and `/readyz`
//! answer anyone, `/metrics` only a token whose roles allow it, and it
//! counts every request by route template and code (never by the path as
//! sent), beside the build it runs.

#[path = "common/fleet.rs"]
mod fleet;

use anyhow::{Context, Result, ensure};
use comsat_protocol::api;
use fleet::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_answers_health_readiness_and_metrics() -> Result<()> {
    let c = Fleet::start(|t| t)?;
    let admin = std::fs::read_to_string(c.path("controller/admin.token"))?;
    let admin = admin.trim();

    let (code, body) = raw_get(&c, "/healthz", "").await?;
    ensure!(code == 200 && body == "ok\n", "{code} {body}");
    let (code, body) = raw_get(&c, "/readyz", "").await?;
    ensure!(code == 200 && body == "ready\n", "{code} {body}");

    // Metrics are not for strangers.
    let (code, body) = raw_get(&c, "/metrics", "").await?;
    ensure!(code == 401, "/metrics without a token: {code} {body}");

    // Requests to count: a listing, a link that is not there, and paths
    // that match no route (counted under one label, whatever they are).
    let (code, _) = raw_get(&c, api::PATH_LINKS, admin).await?;
    ensure!(code == 200);
    let (code, _) = raw_get(&c, &format!("{}/nope", api::PATH_LINKS), admin).await?;
    ensure!(code == 404);
    for junk in ["/a", "/b/c", "/v1/zzz"] {
        raw_get(&c, junk, admin).await?;
    }

    let (code, m) = raw_get(&c, "/metrics", admin).await?;
    ensure!(code == 200, "{code} {m}");
    let count = |route: &str, code: u16| {
        comsat_tests::metric(
            &m,
            &format!(
                "comsat_controller_requests_total{{route=\"{route}\",method=\"GET\",code=\"{code}\"}}"
            ),
        )
    };
    ensure!(count(api::PATH_LINKS, 200) == 1.0, "{m}");
    ensure!(
        count(&format!("{}/{{name}}", api::PATH_LINKS), 404) == 1.0,
        "{m}"
    );
    ensure!(count("unmatched", 404) == 3.0, "{m}");
    ensure!(!m.contains("/v1/zzz") && !m.contains("/b/c"), "{m}");
    ensure!(count("/readyz", 200) == 1.0, "{m}");
    ensure!(
        comsat_tests::metric(&m, "comsat_controller_ready") == 1.0,
        "{m}"
    );
    ensure!(
        m.contains("comsat_controller_request_duration_seconds_bucket{route=\"/v1/links\""),
        "a histogram, with buckets: {m}"
    );
    let build = m
        .lines()
        .find(|l| l.starts_with("comsat_build_info{"))
        .unwrap_or_default();
    ensure!(
        build.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION")))
            && build.contains("commit=\"")
            && build.ends_with(" 1"),
        "{m}"
    );
    Ok(())
}

/// Runs `promtool check metrics` (Prometheus's own linter) on `text`, the
/// scrape of `what`.
fn promtool_check(promtool: &str, what: &str, text: &str) -> Result<()> {
    let mut cmd = std::process::Command::new(promtool);
    cmd.args(["check", "metrics"]);
    comsat_tests::tools::passes(
        cmd,
        Some(text.as_bytes()),
        &format!("the metrics of {what}"),
    )
}

/// Every component's `/metrics`, scraped while a link carries bytes, passes
/// `promtool check metrics`. Runs where `COMSAT_TEST_PROMTOOL` names the
/// tool (CI installs Debian's `prometheus` package for it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_components_metrics_pass_promtool() -> Result<()> {
    let Some(promtool) = comsat_tests::tools::from_env("COMSAT_TEST_PROMTOOL", "promtool's check")
    else {
        return Ok(());
    };
    let (c, listen, _) = demo().await?;
    round_trip_eventually(listen, 1 << 20)
        .await
        .with_context(|| c.logs())?;
    let admin = std::fs::read_to_string(c.path("controller/admin.token"))?;
    let (code, m) = raw_get(&c, "/metrics", admin.trim()).await?;
    ensure!(code == 200, "{code} {m}");
    ensure!(m.contains("comsat_controller_requests_total"), "{m}");
    promtool_check(&promtool, "the controller", &m)?;
    let m = comsat_tests::proc::scrape(c.relay_admin("relay-1")?)?;
    ensure!(m.contains("comsat_relay_"), "{m}");
    promtool_check(&promtool, "relay-1", &m)?;
    for (name, _, admin) in &c.agents {
        let m = comsat_tests::proc::scrape(*admin)?;
        ensure!(m.contains("comsat_agent_"), "{m}");
        promtool_check(&promtool, &format!("agent {name}"), &m)?;
    }
    Ok(())
}

/// The controller's own gauges and counters, from a fleet that enrolled,
/// long-polls and carries a link: enrolments by kind, refusals by action,
/// long polls open, the database pool and its latency, and each relay's
/// pending grant events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_counts_enrolments_refusals_polls_and_pending_events() -> Result<()> {
    let (c, listen, _) = demo().await?;
    round_trip_eventually(listen, 1 << 16)
        .await
        .with_context(|| c.logs())?;
    let admin = std::fs::read_to_string(c.path("controller/admin.token"))?;
    let admin = admin.trim();
    // A stranger's token: refused, and counted.
    let (code, _) = raw_get(&c, api::PATH_LINKS, "comsat_not_a_token").await?;
    ensure!(code == 401);
    let m = |series: &str, m: &str| comsat_tests::metric(m, series);
    let mut last = String::new();
    for _ in 0..100 {
        let (code, text) = raw_get(&c, "/metrics", admin).await?;
        ensure!(code == 200, "{code} {text}");
        last = text;
        // Every node long-polls again as soon as it is answered: one
        // scrape may fall between an answer and the next poll.
        if m("comsat_controller_long_polls_open{kind=\"agent\"}", &last) >= 1.0
            && m("comsat_controller_long_polls_open{kind=\"relay\"}", &last) >= 1.0
            && m(
                "comsat_controller_relay_events_pending{relay=\"relay-1\"}",
                &last,
            ) == 0.0
            && last.contains("comsat_controller_relay_events_pending{relay=\"relay-1\"}")
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let last = &last;
    ensure!(
        m("comsat_controller_long_polls_open{kind=\"agent\"}", last) >= 1.0,
        "{last}"
    );
    ensure!(
        m("comsat_controller_long_polls_open{kind=\"relay\"}", last) >= 1.0,
        "{last}"
    );
    ensure!(
        last.contains("comsat_controller_relay_events_pending{relay=\"relay-1\"} 0"),
        "the relay has every event: {last}"
    );
    ensure!(
        m("comsat_controller_enrolments_total{kind=\"agent\"}", last) == 2.0,
        "{last}"
    );
    ensure!(
        m("comsat_controller_enrolments_total{kind=\"relay\"}", last) == 1.0,
        "{last}"
    );
    ensure!(
        m(
            "comsat_controller_refusals_total{action=\"authenticate\"}",
            last
        ) >= 1.0,
        "{last}"
    );
    ensure!(
        m("comsat_controller_db_ping_seconds_count", last) >= 1.0,
        "{last}"
    );
    ensure!(
        last.contains("comsat_controller_db_connections{state=\"idle\"}")
            && last.contains("comsat_controller_db_connections{state=\"busy\"}"),
        "{last}"
    );
    Ok(())
}

/// Relays label per-link series with the link's id; the controller's
/// `comsat_controller_link_info` gives each id its name, so a query puts
/// names on the relays' series. A deleted link's info series goes with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_names_the_links_the_relays_count_by_id() -> Result<()> {
    let (c, listen, _) = demo().await?;
    round_trip_eventually(listen, 1 << 16)
        .await
        .with_context(|| c.logs())?;
    let shown: serde_json::Value =
        serde_json::from_str(&c.ctl_ok(&["link", "show", "demo", "-o", "json"])?)?;
    let id = shown["link_id"].as_str().context("link_id")?.to_owned();
    let admin = std::fs::read_to_string(c.path("controller/admin.token"))?;
    let admin = admin.trim();
    let (code, m) = raw_get(&c, "/metrics", admin).await?;
    ensure!(code == 200, "{code} {m}");
    let info = format!("comsat_controller_link_info{{link=\"{id}\",name=\"demo\"}}");
    ensure!(comsat_tests::metric(&m, &info) == 1.0, "no {info} in {m}");
    // The relay counts the same link under the same label value.
    let relay = comsat_tests::proc::scrape(c.relay_admin("relay-1")?)?;
    let bytes = format!("comsat_relay_link_bytes_total{{link=\"{id}\",direction=\"a_to_b\"}}");
    ensure!(
        comsat_tests::metric(&relay, &bytes) > 0.0,
        "no {bytes} in {relay}"
    );

    c.ctl_ok(&["link", "delete", "demo"])?;
    let (code, m) = raw_get(&c, "/metrics", admin).await?;
    ensure!(code == 200, "{code} {m}");
    ensure!(
        m.contains("# TYPE comsat_controller_link_info gauge")
            && m.lines()
                .any(|l| l == "# TYPE comsat_controller_link_info gauge")
            && !m.contains(&id),
        "the deleted link's info series is still there: {m}"
    );
    Ok(())
}
