//! Memory: per idle link and agent connection, and the capacity held.

use std::time::Duration;

use anyhow::Result;

use crate::measure::{cpu_ns, fit, rss_kib};
use crate::path::{Path, link};
use crate::report::figure;
use crate::setup::fleet_relay;
use crate::{FLOOR, Run};

/// The sizes held and the line fitted over them.
struct Capacity {
    points: Vec<(f64, f64)>,
    failed: Option<String>,
}

impl Capacity {
    fn report(
        &self,
        what: &str,
        asked: usize,
        floor: f64,
        agent: Option<&[(f64, f64)]>,
        r: &mut Run,
    ) {
        let (slope, r2) = fit(&self.points);
        let held = self.points.last().map_or(0.0, |p| p.0);
        r.figures.push(figure(
            "memory",
            &format!("relay RSS per idle {what} (floor: {floor} KiB)"),
            "KiB",
            slope,
            FLOOR,
            floor,
            self.points.len(),
        ));
        if let Some(agent) = agent {
            r.figures.push(figure(
                "memory",
                "agent RSS per idle link (side A)",
                "KiB",
                fit(agent).0,
                "the relay's floor, for scale",
                floor,
                agent.len(),
            ));
        }
        r.figures.push(figure(
            "capacity",
            &format!("{what}s one relay held, RSS linear in N (R² {r2:.4})"),
            "",
            held,
            "asked",
            asked as f64,
            self.points.len(),
        ));
        r.notes.push(format!(
            "memory: relay RSS (KiB) by {what}s held: {}{}",
            self.points
                .iter()
                .map(|p| format!("{:.0} → {:.0}", p.0, p.1))
                .collect::<Vec<_>>()
                .join(", "),
            self.failed
                .as_ref()
                .map(|e| format!("; the next size FAILED: {e}"))
                .unwrap_or_default()
        ));
    }
}

/// What the relay counted as refused connections, by reason (why a
/// capacity size failed, in the relay's own words).
fn refusals(relay: &Path) -> String {
    match relay.relay_metrics() {
        Ok(m) => refusals_in(&m),
        Err(e) => format!("the relay's /metrics: {e:#}"),
    }
}

/// The refused connections a relay's `/metrics` text counts, by reason.
pub(crate) fn refusals_in(metrics: &str) -> String {
    let lines: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("comsat_relay_auth_failures_total{"))
        .collect();
    if lines.is_empty() {
        "the relay counted no refused connection".into()
    } else {
        format!("the relay counted {}", lines.join(", "))
    }
}

/// Relay and agent memory per idle paired link and per idle agent
/// connection, a line fitted over several N; the largest N held is the
/// capacity shown.
pub(crate) async fn memory(r: &mut Run) -> Result<()> {
    let (link_sizes, conn_sizes): (&[usize], &[usize]) = match (r.large, r.quick) {
        (true, _) => (&[1_000, 5_000, 10_000], &[10_000, 25_000, 50_000]),
        (false, true) => (&[10, 200, 400], &[100, 500, 1_000]),
        (false, false) => (&[10, 500, 1_000], &[1_000, 3_000, 5_000]),
    };
    let mut links = Capacity {
        points: Vec::new(),
        failed: None,
    };
    let mut agent = Vec::new();
    for &n in link_sizes {
        eprintln!("memory: {n} idle paired links");
        let held = async {
            let l = (0..n).map(|i| link(&format!("l{i}"), r.sink)).collect();
            let path = Path::start(&r.bin, l, &[]).await?;
            // Let allocations settle (handshakes done, buffers returned).
            tokio::time::sleep(Duration::from_secs(2)).await;
            let pids = path.pids();
            anyhow::Ok((rss_kib(pids[0])?, rss_kib(pids[1])?))
        };
        match held.await {
            Ok((relay, a)) => {
                links.points.push((n as f64, relay));
                agent.push((n as f64, a));
            }
            Err(e) => {
                links.failed = Some(format!("{n}: {e:#}"));
                break;
            }
        }
    }
    let max_links = *link_sizes.last().unwrap_or(&0);
    links.report("paired link", max_links, 16.0, Some(&agent), r);

    let max = *conn_sizes.last().unwrap_or(&0);
    eprintln!("memory: up to {max} idle agent connections");
    let (relay, fleet) = fleet_relay(&r.bin, max)?;
    let mut conns = Capacity {
        points: Vec::new(),
        failed: None,
    };
    let mut held = Vec::new();
    for &n in conn_sizes {
        match fleet.connect_many(held.len()..n, 64).await {
            Ok((more, _)) => held.extend(more),
            Err(e) => {
                conns.failed = Some(format!("{n}: {e:#}; {}", refusals(&relay)));
                break;
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let alive = held
            .iter()
            .filter(|c| c.conn.close_reason().is_none())
            .count();
        if alive < n {
            conns.failed = Some(format!(
                "{n}: only {alive} connections stayed open; {}",
                refusals(&relay)
            ));
            break;
        }
        conns.points.push((n as f64, rss_kib(relay.relay_pid()?)?));
    }
    if let Some(&(n, _)) = conns.points.last() {
        idle_cpu(r, &relay, n).await?;
    }
    conns.report("agent connection", max, 64.0, None, r);
    pre_hello_flood(r).await
}

/// The relay's CPU while the `n` agent connections it holds sit idle
/// (their keep-alives, 25 s apart, and whatever else it does), over one
/// keep-alive interval (a quick run: 10 s), per 1,000 connections; after
/// [`IDLE_SETTLE`], in which what follows a handshake (path MTU probes,
/// new connection ids) is done.
async fn idle_cpu(r: &mut Run, relay: &Path, n: f64) -> Result<()> {
    tokio::time::sleep(IDLE_SETTLE).await;
    let window = if r.quick {
        Duration::from_secs(10)
    } else {
        comsat_agent::defaults::KEEP_ALIVE_INTERVAL
    };
    let pid = relay.relay_pid()?;
    let before = cpu_ns(pid)?;
    tokio::time::sleep(window).await;
    let cores = cpu_ns(pid)?.saturating_sub(before) as f64 / 1e9 / window.as_secs_f64();
    r.figures.push(figure(
        "capacity",
        &format!(
            "relay CPU while {n:.0} agent connections sit idle, per 1,000 (% of one core; goal 1 %)"
        ),
        "%",
        cores * 100.0 / (n / 1000.0),
        "goal",
        1.0,
        1,
    ));
    Ok(())
}

/// How long connections sit before their idle CPU is measured.
const IDLE_SETTLE: Duration = Duration::from_secs(10);

/// Connections, streams each and bytes on each stream of the pre-`Hello`
/// flood (as a stranger would try them).
const FLOOD: (usize, usize, usize) = (256, 32, 512 * 1024);

/// Goal for the relay's RSS growth under [`FLOOD`], KiB.
const FLOOD_GOAL_KIB: f64 = 64.0 * 1024.0;

/// A stranger's flood before any `Hello`: [`FLOOD`] connections, streams
/// and bytes tried at once against a fresh relay; the most its RSS grew
/// while they were open (it is sampled every 100 ms for 3 s).
async fn pre_hello_flood(r: &mut Run) -> Result<()> {
    let (n, streams, bytes) = FLOOD;
    eprintln!("memory: {n} connections without a Hello, {streams} streams × {bytes} B each");
    let (relay, fleet) = fleet_relay(&r.bin, 1)?;
    let pid = relay.relay_pid()?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = rss_kib(pid)?;
    let until = std::time::Instant::now() + Duration::from_secs(3);
    let flood = {
        let fleet = fleet.clone();
        tokio::spawn(async move { fleet.flood_without_hello(n, streams, bytes, until).await })
    };
    let mut peak = before;
    while std::time::Instant::now() < until {
        peak = peak.max(rss_kib(pid)?);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (admitted, taken) = flood.await?;
    peak = peak.max(rss_kib(pid)?);
    r.figures.push(figure(
        "memory",
        &format!(
            "relay RSS growth under a pre-Hello flood ({n} connections × {streams} streams × {} KiB tried)",
            bytes / 1024
        ),
        "KiB",
        peak - before,
        "goal",
        FLOOD_GOAL_KIB,
        1,
    ));
    r.notes.push(format!(
        "memory: pre-Hello flood: {admitted} of {n} connections let in, {} KiB taken in all \
         (of {} MiB tried), relay RSS {before:.0} → peak {peak:.0} KiB; {}",
        taken / 1024,
        n * streams * bytes / (1024 * 1024),
        refusals(&relay)
    ));
    Ok(())
}
