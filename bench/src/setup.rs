//! Setup and resumption: agent handshakes, link setup rate, resume time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::measure::{percentile, poke};
use crate::path::{Path, link};
use crate::report::figure;
use crate::{FLOOR, Run, fleet};

/// Pokes every address until each carries bytes; the time the last did.
async fn all_carry(listen: &[SocketAddr]) -> Result<Instant> {
    let pokes: Vec<_> = listen
        .iter()
        .map(|addr| {
            let addr = *addr;
            tokio::spawn(async move {
                // A link that is not up yet makes its agent wait, then
                // closes the connection: try again until it carries bytes.
                loop {
                    if poke(addr).await.is_ok() {
                        return Instant::now();
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        })
        .collect();
    let mut last = Instant::now();
    for p in pokes {
        let at = tokio::time::timeout(Duration::from_secs(60), p)
            .await
            .context("a link did not carry bytes within 60 s")??;
        last = last.max(at);
    }
    Ok(last)
}

/// Adds `[limits]` to a relay config so it admits `connections` agents,
/// which the bench plays from 16 addresses (each standing for the many of
/// a real fleet): the cap on unauthenticated connections per source, meant
/// for strangers, is lifted to the relay's cap in all.
pub(crate) fn admit(config: &std::path::Path, connections: usize) -> Result<()> {
    let mut text = std::fs::read_to_string(config)?;
    text.push_str(&format!(
        "\n[limits]\nmax_connections = {}\nmax_unauthenticated_per_source = {}\n",
        connections + 100,
        comsat_relay::defaults::MAX_UNAUTHENTICATED
    ));
    std::fs::write(config, text)?;
    Ok(())
}

/// A relay (no agents) that admits `n` agent identities, and the fleet
/// that plays them.
pub(crate) fn fleet_relay(bin: &str, n: usize) -> Result<(Path, Arc<fleet::Fleet>)> {
    let mut relay = Path::prepare(bin, vec![], &[])?;
    let nodes = relay.layout.add_nodes(n)?;
    admit(&relay.relay_config(), n)?;
    relay.start_relay("relay")?;
    let fleet = Arc::new(fleet::Fleet::new(
        relay.layout.relays[0].listen,
        &relay.layout.ca_pem,
        nodes,
    )?);
    Ok((relay, fleet))
}

/// Agent connections per second and handshake (QUIC, TLS, signed Hello,
/// Welcome) p99 at concurrency 64, beside bare quinn handshakes; then
/// link setup: agent A starts with N links, until each carries a byte.
pub(crate) async fn setup(r: &mut Run) -> Result<()> {
    const CONCURRENCY: usize = 64;
    let n = if r.quick { 640 } else { 6_400 };
    eprintln!("setup: {n} agent connections, {CONCURRENCY} at a time");
    let (relay, fleet) = fleet_relay(&r.bin, n)?;
    let started = Instant::now();
    let (conns, times) = fleet.connect_many(0..n, CONCURRENCY).await?;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    drop(conns);
    let started = Instant::now();
    let bare = r.quinn.handshakes(n, CONCURRENCY).await?;
    let bare_rate = n as f64 / started.elapsed().as_secs_f64();
    r.figures.push(figure(
        "setup",
        "agent connections per second at concurrency 64",
        "/s",
        rate,
        "bare quinn handshakes",
        bare_rate,
        n,
    ));
    for (name, p) in [("p50", 0.5), ("p99", 0.99)] {
        r.figures.push(figure(
            "setup",
            &format!("agent handshake {name} at concurrency 64 (to Welcome)"),
            "ms",
            percentile(&times, p),
            "bare quinn handshake",
            percentile(&bare, p),
            n,
        ));
    }
    r.figures.push(figure(
        "setup",
        "agent handshake p99 at concurrency 64; floor 100 ms",
        "ms",
        percentile(&times, 0.99),
        FLOOR,
        100.0,
        n,
    ));
    drop(relay);

    let links = if r.quick { 100 } else { 1_000 };
    eprintln!("setup: agent A starts with {links} links");
    let mut path = Path::prepare(
        &r.bin,
        (0..links).map(|i| link(&format!("l{i}"), r.sink)).collect(),
        &[],
    )?;
    path.start_relay("relay")?;
    path.start_agent_b()?;
    let started = Instant::now();
    path.start_agent_a().await?;
    let last = all_carry(&path.listen).await?;
    let secs = (last - started).as_secs_f64();
    r.figures.push(figure(
        "setup",
        &format!(
            "links set up per second (agent start to first byte on each of {links}: \
             attach, pair, Noise, first byte)"
        ),
        "/s",
        links as f64 / secs,
        "agent connections per second",
        rate,
        1,
    ));
    Ok(())
}

/// Resume: a path with `n` links, the relay killed and restarted on the
/// same key; the time until every link carries bytes again.
pub(crate) async fn resume(r: &mut Run) -> Result<()> {
    let n = if r.quick { 100 } else { 1000 };
    eprintln!("resume: {n} links, relay killed and restarted");
    let links = (0..n).map(|i| link(&format!("l{i}"), r.sink)).collect();
    let mut path = Path::start(&r.bin, links, &[]).await?;
    all_carry(&path.listen)
        .await
        .context("before the restart")?;
    if let Some(relay) = &mut path.relay {
        relay.kill();
    }
    path.start_relay("relay-2")?;
    let started = Instant::now();
    let last = all_carry(&path.listen).await?;
    r.figures.push(figure(
        "resume",
        &format!("all {n} links carry bytes again after a relay restart (floor: 5 s for 1,000)"),
        "s",
        (last - started).as_secs_f64(),
        FLOOR,
        5.0,
        1,
    ));
    Ok(())
}
