//! Fast return: an agent killed (SIGKILL: it tells nobody) and started
//! again, the time from its start until its link carries bytes again;
//! alone, then while strangers flood the relay ([`crate::flood`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use comsat_tests::proc;

use crate::flood::Flood;
use crate::measure::{median, poke, rss_kib};
use crate::path::{Path, link};
use crate::report::figure;
use crate::{FLOOR, Run};

/// Which agent of the path restarts.
#[derive(Clone, Copy, Debug)]
enum Which {
    /// Agent A: it listens (its new listener has a new port).
    A,
    /// Agent B: it dials the target.
    B,
}

/// Longest wait for a restarted agent's link: a try that takes longer fails
/// the scenario.
const GIVE_UP: Duration = Duration::from_secs(30);

/// Kills agent `which`, starts it again; seconds from its start until a
/// poke through the link gets its answer.
async fn restart_once(path: &mut Path, which: Which) -> Result<f64> {
    let old = match which {
        Which::A => path.agent_a.as_mut(),
        Which::B => path.agent_b.as_mut(),
    };
    old.context("the agent is not running")?.kill();
    let started = Instant::now();
    let (listen, name) = (path.listen[0], path.layout.links[0].0.clone());
    let listen = tokio::task::block_in_place(|| -> Result<_> {
        let (config, log) = match which {
            Which::A => (&path.layout.agent_a.config, "agent-a"),
            Which::B => (&path.layout.agent_b.config, "agent-b"),
        };
        let (mut agent, _) = proc::start_agent(&path.bin, config, path.dir.path(), log)?;
        let listen = match which {
            Which::A => proc::listen_addr(&mut agent, &name)?,
            Which::B => listen,
        };
        match which {
            Which::A => path.agent_a = Some(agent),
            Which::B => path.agent_b = Some(agent),
        }
        Ok(listen)
    })?;
    path.listen[0] = listen;
    loop {
        if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(1), poke(listen)).await {
            return Ok(started.elapsed().as_secs_f64());
        }
        if started.elapsed() > GIVE_UP {
            bail!("{which:?} restarted: its link carried nothing within {GIVE_UP:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `tries` restarts of each agent in turn; the seconds of A's and of B's.
async fn restarts(path: &mut Path, tries: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..tries {
        a.push(restart_once(path, Which::A).await?);
        b.push(restart_once(path, Which::B).await?);
    }
    Ok((a, b))
}

fn worst(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

/// The scenario: restarts on a quiet relay, then under the flood.
pub(crate) async fn restart(r: &mut Run) -> Result<()> {
    let tries = if r.quick { 3 } else { 10 };
    eprintln!("restart: {tries} restarts of each agent, quiet");
    let mut path = if r.lanes {
        Path::start_lanes(&r.bin, vec![link("back", r.sink)]).await?
    } else {
        Path::start(&r.bin, vec![link("back", r.sink)], &[]).await?
    };
    poke(path.listen[0]).await.context("before the restarts")?;
    let (a, b) = restarts(&mut path, tries).await?;
    for (who, v) in [("A (it listens)", &a), ("B (it dials the target)", &b)] {
        r.figures.push(figure(
            "restart",
            &format!("agent {who} killed and started: its link carries bytes again, median"),
            "s",
            median(v.clone()),
            FLOOR,
            1.0,
            v.len(),
        ));
        r.figures.push(figure(
            "restart",
            &format!(
                "agent {who} killed and started: the slowest of {} tries",
                v.len()
            ),
            "s",
            worst(v),
            FLOOR,
            1.0,
            v.len(),
        ));
    }
    r.notes.push(format!(
        "restart: seconds from the agent's start to bytes through its link, quiet relay: A {}; B {}",
        list(&a),
        list(&b)
    ));

    let relay = path.relay_pid()?;
    let before = rss_kib(relay)?;
    let relay_addr = path.layout.relays[0].listen;
    eprintln!("restart: the same under a flood of strangers");
    let flood = Flood::start(relay_addr, &path.layout.ca_pem, r.quick).await?;
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = tokio::spawn({
        let peak = peak.clone();
        async move {
            while let Ok(kib) = rss_kib(relay) {
                peak.fetch_max(kib as u64, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    // Let the flood reach its full weight first.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let measured = restarts(&mut path, tries).await;
    sampler.abort();
    let peak = peak.load(Ordering::Relaxed) as f64;
    let stats = flood.stop().await;
    let (a, b) = measured?;
    let both: Vec<f64> = a.iter().chain(&b).copied().collect();
    r.figures.push(figure(
        "restart",
        &format!(
            "under the flood: an agent killed and started carries bytes again, the slowest of {}",
            both.len()
        ),
        "s",
        worst(&both),
        FLOOR,
        3.0,
        both.len(),
    ));
    r.figures.push(figure(
        "restart",
        "under the flood: relay RSS growth (floor 64 MiB)",
        "MiB",
        (peak - before) / 1024.0,
        FLOOR,
        64.0,
        1,
    ));
    r.notes.push(format!(
        "restart under the flood: A {}; B {}. {stats}",
        list(&a),
        list(&b)
    ));
    Ok(())
}

fn list(v: &[f64]) -> String {
    v.iter()
        .map(|s| format!("{s:.3}"))
        .collect::<Vec<_>>()
        .join(", ")
}
