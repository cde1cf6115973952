//! A reconnect storm: a relay holding N agent connections (played by
//! this process, each reconnecting as a real agent does: the agent's own
//! transport settings and backoff) and a real path's links is killed and
//! started again on the same key. Measured: the time until every agent is
//! back and every real link carries bytes, and the relay's refusals as a
//! share of the connections it was asked for.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use comsat_agent::Backoff;
use comsat_agent::defaults::{CONNECT_TIMEOUT, RECONNECT_INITIAL, RECONNECT_MAX};
use tokio::sync::watch;

use crate::fleet::Fleet;
use crate::measure::poke;
use crate::memory::refusals_in;
use crate::path::{Path, link};
use crate::report::figure;
use crate::setup::admit;
use crate::{FLOOR, Run};

/// What the played agents did.
#[derive(Default)]
struct Counts {
    /// Connections tried.
    attempts: AtomicU64,
    /// Tries that got no `Welcome`.
    failures: AtomicU64,
    /// Agents connected now.
    up: AtomicU64,
    /// Connections that got their `Welcome`, in all.
    welcomed: AtomicU64,
}

/// Waits until a byte goes through each of the links at `listen`.
async fn all_carry(listen: &[std::net::SocketAddr]) -> Result<()> {
    for addr in listen {
        let deadline = Instant::now() + Duration::from_secs(60);
        while tokio::time::timeout(Duration::from_secs(2), poke(*addr))
            .await
            .map_or(true, |p| p.is_err())
        {
            if Instant::now() > deadline {
                bail!("a real link carried nothing within 60 s of the restart");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

/// Agent `i` of `fleet`: connected until stopped, reconnecting as an
/// agent does (a fresh backoff after a connection that worked, the next
/// delay after each failed try).
async fn agent(fleet: Arc<Fleet>, i: usize, counts: Arc<Counts>, mut stop: watch::Receiver<bool>) {
    let mut backoff = Backoff::new(RECONNECT_INITIAL, RECONNECT_MAX);
    let mut first = true;
    while !*stop.borrow() {
        if !first {
            let delay = backoff.next_delay(rand::random::<f64>());
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = stop.changed() => return,
            }
        }
        first = false;
        counts.attempts.fetch_add(1, Ordering::Relaxed);
        let Ok(Ok((connected, _))) = tokio::time::timeout(CONNECT_TIMEOUT, fleet.connect(i)).await
        else {
            counts.failures.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        counts.up.fetch_add(1, Ordering::Relaxed);
        counts.welcomed.fetch_add(1, Ordering::Relaxed);
        tokio::select! {
            _ = connected.conn.closed() => {}
            _ = stop.changed() => return,
        }
        counts.up.fetch_sub(1, Ordering::Relaxed);
        backoff.reset();
    }
}

/// The sum of a counter's series with any labels.
fn total(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .fold(0.0, |a, b| a + b)
}

/// Waits until `n` agents are up, and `welcomed` connections were
/// welcomed in all; when.
async fn all_up(counts: &Counts, n: u64, welcomed: u64, limit: Duration) -> Result<Instant> {
    let deadline = Instant::now() + limit;
    while counts.up.load(Ordering::Relaxed) < n
        || counts.welcomed.load(Ordering::Relaxed) < welcomed
    {
        if Instant::now() > deadline {
            bail!(
                "{} of {n} agents connected within {limit:?}",
                counts.up.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(Instant::now())
}

/// The scenario.
pub(crate) async fn storm(r: &mut Run) -> Result<()> {
    let n = match (r.large, r.quick) {
        (true, _) => 10_000,
        (false, true) => 1_000,
        (false, false) => 3_000,
    };
    const LINKS: usize = 20;
    eprintln!("storm: {n} agent connections and {LINKS} real links, the relay restarted");
    let mut path = Path::prepare(
        &r.bin,
        (0..LINKS).map(|i| link(&format!("l{i}"), r.sink)).collect(),
        &[],
    )?;
    let nodes = path.layout.add_nodes(n)?;
    admit(&path.relay_config(), n + 2)?;
    path.start_relay("relay")?;
    path.start_agent_b()?;
    path.start_agent_a().await?;
    let fleet = Arc::new(Fleet::new(
        path.layout.relays[0].listen,
        &path.layout.ca_pem,
        nodes,
    )?);
    let counts = Arc::new(Counts::default());
    let (stop, stopped) = watch::channel(false);
    let mut agents = Vec::new();
    // Connected the first time 64 at a time, as `setup` measures them.
    for chunk in (0..n).collect::<Vec<_>>().chunks(64) {
        for &i in chunk {
            agents.push(tokio::spawn(agent(
                fleet.clone(),
                i,
                counts.clone(),
                stopped.clone(),
            )));
        }
        let up = agents.len() as u64;
        all_up(&counts, up, up, Duration::from_secs(60)).await?;
    }
    for addr in &path.listen {
        poke(*addr).await.context("a link before the restart")?;
    }
    let before = (
        counts.attempts.load(Ordering::Relaxed),
        counts.failures.load(Ordering::Relaxed),
        counts.welcomed.load(Ordering::Relaxed),
    );
    if let Some(relay) = &mut path.relay {
        relay.kill();
    }
    path.start_relay("relay-2")?;
    let restarted = Instant::now();
    let result = async {
        // A link that carries bytes finds out at once (the restarted relay
        // resets the connection its packets come on).
        all_carry(&path.listen).await?;
        let links_back = Instant::now();
        // Every idle agent noticed the restart at its next keep-alive and
        // is back (99 % of them first).
        let most = before.2 + (n as u64 * 99).div_ceil(100);
        let most = all_up(&counts, 0, most, Duration::from_secs(180)).await?;
        let again = before.2 + n as u64;
        let back = all_up(&counts, n as u64, again, Duration::from_secs(180)).await?;
        anyhow::Ok((most, back, links_back))
    }
    .await;
    let metrics = path.relay_metrics()?;
    let _ = stop.send(true);
    for a in agents {
        let _ = a.await;
    }
    let (most, back, links_back) = result?;
    let attempts = counts.attempts.load(Ordering::Relaxed) - before.0;
    let failures = counts.failures.load(Ordering::Relaxed) - before.1;
    // The restarted relay's own counts: every connection it accepted, and
    // those it refused before or at authentication.
    let accepted = total(&metrics, "comsat_relay_connections_total");
    let refused = total(&metrics, "comsat_relay_auth_failures_total{");
    let retried = total(&metrics, "comsat_relay_retries_total");
    // Idle agents hear of the restart at their next keep-alive, spread
    // over one interval: the floor is that interval and some.
    let keep_alive = comsat_agent::defaults::KEEP_ALIVE_INTERVAL.as_secs_f64();
    let (links_goal, goal) = if n >= 10_000 {
        (10.0, keep_alive + 15.0)
    } else {
        (2.0, keep_alive + 5.0)
    };
    for (what, at, goal) in [
        (
            format!("every one of {LINKS} real links carries bytes"),
            links_back,
            links_goal,
        ),
        ("99 % of the idle agents back".to_owned(), most, goal),
        ("every idle agent back".to_owned(), back, goal),
    ] {
        r.figures.push(figure(
            "storm",
            &format!("relay restarted with {n} agents: {what}"),
            "s",
            (at - restarted).as_secs_f64(),
            FLOOR,
            goal,
            1,
        ));
    }
    r.figures.push(figure(
        "storm",
        "relay refusals as a share of connections asked (floor 10 %)",
        "%",
        100.0 * refused / (accepted - retried).max(1.0),
        FLOOR,
        10.0,
        1,
    ));
    r.notes.push(format!(
        "storm: after the restart the agents tried {attempts} connections ({failures} got no \
         Welcome); the relay accepted {accepted:.0} (of which {retried:.0} were answered with a \
         Retry first) and refused {refused:.0} ({}).",
        refusals_in(&metrics)
    ));
    Ok(())
}
