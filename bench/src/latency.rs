//! Latency: idle round trips, their CPU, and round trips beside a bulk flow.

use std::net::SocketAddr;

use anyhow::{Context, Result};

use crate::measure::{Pinger, cpu_ns_of, latency_under_bulk, median, percentile, wait_carrying};
use crate::path::{Path, link};
use crate::report::{Samples, figure};
use crate::{DIRECT, FLOOR, QUINN, Run, measure};

/// p50, p99 and p99.9 of a sorted run.
fn tails(rtts: &[f64]) -> [f64; 3] {
    [0.5, 0.99, 0.999].map(|p| percentile(rtts, p))
}

/// Idle round trips per path taken in one turn of the interleaving.
const PING_BLOCK: usize = 100;

pub(crate) async fn latency_scenario(r: &mut Run) -> Result<()> {
    let rounds = if r.quick { 2_000 } else { 20_000 };
    let busy_rounds = rounds / 4;
    let mut l = Latency::default();
    let mut beside = placements(r).await?;
    for i in 0..r.reps {
        eprintln!(
            "latency: run {}/{}, {rounds} ping-pongs each",
            i + 1,
            r.reps
        );
        l.idle_run(r, rounds).await?;
        for (name, chain) in &r.chains {
            let b = latency_under_bulk(chain.bulk, chain.ping, busy_rounds).await?;
            l.busy.add(name, percentile(&b, 0.99));
            l.busy_p50.add(name, percentile(&b, 0.5));
        }
        let b = latency_under_bulk(r.bulk(), r.ping(), busy_rounds).await?;
        l.busy.comsat.push(percentile(&b, 0.99));
        l.busy_p50.comsat.push(percentile(&b, 0.5));
        for p in &mut beside {
            let b = latency_under_bulk(p.bulk, p.ping, busy_rounds).await?;
            p.p50.comsat.push(percentile(&b, 0.5));
            p.p99.comsat.push(percentile(&b, 0.99));
        }
    }
    for p in &mut beside {
        // Their processes end here; the peers' beside-bulk figures are
        // what each is compared with.
        p.path = None;
        p.p50.baselines = l.busy_p50.baselines.clone();
        p.p99.baselines = l.busy.baselines.clone();
    }
    l.report(r, &beside);
    Ok(())
}

/// What the latency scenario gathers over its runs.
#[derive(Default)]
struct Latency {
    /// Idle p50, p99 and p99.9.
    idle: [Samples; 3],
    /// Idle p99 over direct TCP's.
    added: Samples,
    /// p99 and p50 beside a bulk flow on another link of the path.
    busy: Samples,
    busy_p50: Samples,
    /// CPU microseconds per idle round trip.
    cpu_per_round: Samples,
    /// Why the CPU was not measured, if it was not.
    cpu_missing: Option<String>,
}

impl Latency {
    /// One idle run: every path at once, in turns of a hundred round
    /// trips, with the CPU of each path's processes.
    async fn idle_run(&mut self, r: &Run, rounds: usize) -> Result<()> {
        let mut pingers = vec![Pinger::tcp(r.echo).await?];
        for (_, chain) in &r.chains {
            pingers.push(Pinger::tcp(chain.ping).await?);
        }
        pingers.push(r.quinn.pinger().await?);
        pingers.push(Pinger::tcp(r.ping()).await?);
        // CPU of each path's processes (the peers', then comsat's) while
        // all ping in turns: each works only in its own turns.
        let groups: Vec<Vec<u32>> = r
            .chains
            .iter()
            .map(|(_, c)| c.pids())
            .chain([r.path.pids()])
            .collect();
        // Where the kernel keeps no schedstat the figure is left out (a
        // note says so) and the latencies are still measured.
        let cpu = || -> Result<Vec<u64>> { groups.iter().map(|g| cpu_ns_of(g)).collect() };
        let before = cpu();
        let mut rtts = measure::interleaved(&mut pingers, rounds, PING_BLOCK).await?;
        match (before, cpu()) {
            (Ok(before), Ok(after)) => {
                let used: Vec<f64> = after
                    .iter()
                    .zip(&before)
                    .map(|(a, b)| a.saturating_sub(*b) as f64 / 1e3 / rounds as f64)
                    .collect();
                for ((name, _), us) in r.chains.iter().zip(&used) {
                    self.cpu_per_round.add(name, *us);
                }
                self.cpu_per_round.comsat.extend(used.last());
            }
            (Err(e), _) | (_, Err(e)) => self.cpu_missing = Some(format!("{e:#}")),
        }
        drop(pingers);
        let comsat = tails(&rtts.pop().context("no comsat samples")?);
        let quinn = tails(&rtts.pop().context("no quinn samples")?);
        let direct = tails(&rtts[0]);
        for (k, v) in direct.iter().enumerate() {
            self.idle[k].add(DIRECT, *v);
        }
        for ((name, _), t) in r.chains.iter().zip(&rtts[1..]) {
            let t = tails(t);
            for (k, v) in t.iter().enumerate() {
                self.idle[k].add(name, *v);
            }
            self.added.add(name, t[1] - direct[1]);
        }
        for (k, v) in quinn.iter().enumerate() {
            self.idle[k].add(QUINN, *v);
        }
        for (k, v) in comsat.iter().enumerate() {
            self.idle[k].comsat.push(*v);
        }
        self.added.comsat.push(comsat[1] - direct[1]);
        Ok(())
    }

    /// The figures, notes and charts of the scenario.
    fn report(self, r: &mut Run, beside: &[Beside]) {
        for (k, name) in ["p50", "p99", "p99.9"].iter().enumerate() {
            self.idle[k].figures(
                "latency",
                &format!("64 B round trip {name}"),
                "µs",
                &mut r.figures,
            );
        }
        r.chart("64 B round trip p99, idle", "µs", &self.idle[1]);
        if let Some(why) = self.cpu_missing {
            r.notes.push(format!(
                "latency: CPU per idle round trip not measured: {why}"
            ));
        }
        self.cpu_per_round.figures(
            "latency",
            "CPU per idle round trip (relay and both agents; peers: all their processes)",
            "µs",
            &mut r.figures,
        );
        self.added.figures(
            "latency",
            "added p99 over direct TCP (floor vs rathole Noise: 2.5)",
            "µs",
            &mut r.figures,
        );
        self.busy_p50.figures(
            "latency",
            "p50 round trip while another link of the path runs bulk",
            "µs",
            &mut r.figures,
        );
        self.busy.figures(
            "latency",
            "p99 round trip while another link of the path runs bulk",
            "µs",
            &mut r.figures,
        );
        for p in beside {
            for (q, samples) in [("p50", &p.p50), ("p99", &p.p99)] {
                let metric = format!("{q} round trip{}", p.what);
                samples.figures("latency", &metric, "µs", &mut r.figures);
            }
        }
        r.figures.push(figure(
            "latency",
            "p99 round trip while another link runs bulk; floor 5 ms",
            "µs",
            median(self.busy.comsat.clone()),
            FLOOR,
            5_000.0,
            r.reps,
        ));
        for p in beside {
            if let Some(metric) = p.floor {
                let p99 = median(p.p99.comsat.clone());
                r.figures
                    .push(figure("latency", metric, "µs", p99, FLOOR, 5_000.0, r.reps));
            }
        }
        r.chart("64 B round trip p99 beside a bulk flow", "µs", &self.busy);
    }
}

/// One placement of the ping beside a bulk flow, other than the main
/// path's: the path started for it, where its bulk flow and its ping go,
/// and the round trips measured.
struct Beside {
    /// The metric's tail after "p50 round trip" / "p99 round trip".
    what: &'static str,
    path: Option<Path>,
    bulk: SocketAddr,
    ping: SocketAddr,
    p50: Samples,
    p99: Samples,
    /// The metric of its own line against the 5 ms floor, if it has one.
    floor: Option<&'static str>,
}

/// The placements, started: lanes at the relay's main listener (what a
/// relay enrolled without an interactive listener gives); a second path
/// that shares no process with the main one (what the machine itself
/// costs a round trip beside bulk);
/// the ping on the relay's interactive listener (its own connection and
/// threads: what an operator can set); and the ping on a connection of
/// its own through a second relay (what sharing one connection costs).
async fn placements(r: &Run) -> Result<Vec<Beside>> {
    let pair = || vec![link("bulk", r.sink), link("ping", r.echo)];
    let apart = Path::start(&r.bin, vec![link("bulk", r.sink)], &[]).await?;
    let own = Path::start_interactive(&r.bin, pair(), "ping").await?;
    let split = Path::start_split(&r.bin, pair()).await?;
    let on_main = Path::start_lanes_on_main(&r.bin, pair()).await?;
    // The main path's other configuration.
    let other = if r.lanes {
        (
            " beside bulk, without lanes (every flow on the agents' one connection)",
            Path::start(&r.bin, pair(), &[]).await?,
            None,
        )
    } else {
        (
            " beside bulk, with lanes (the relay's interactive listener; no link names a connection)",
            Path::start_lanes(&r.bin, pair()).await?,
            Some("p99 round trip while another link runs bulk, with lanes; floor 5 ms"),
        )
    };
    let placed = [
        (
            other.0,
            other.1.listen[0],
            other.1.listen[1],
            other.1,
            other.2,
        ),
        (
            " beside bulk, lanes at the relay's main listener (a relay enrolled without --interactive-port)",
            on_main.listen[0],
            on_main.listen[1],
            on_main,
            Some(
                "p99 round trip while another link runs bulk, lanes at the relay's main listener; floor 5 ms",
            ),
        ),
        (
            " while a second comsat path (no shared process) runs bulk",
            apart.listen[0],
            r.ping(),
            apart,
            None,
        ),
        (
            " beside bulk, the ping on the interactive listener (own connection and thread)",
            own.listen[0],
            own.listen[1],
            own,
            Some(
                "p99 round trip while another link runs bulk, the ping on the interactive listener; floor 5 ms",
            ),
        ),
        (
            ", same agents, while bulk runs on another QUIC connection (one relay per link)",
            split.listen[0],
            split.listen[1],
            split,
            None,
        ),
    ];
    let mut out = Vec::new();
    for (what, bulk, ping, path, floor) in placed {
        wait_carrying(&format!("comsat,{what}"), bulk, ping).await?;
        out.push(Beside {
            what,
            path: Some(path),
            bulk,
            ping,
            p50: Samples::default(),
            p99: Samples::default(),
            floor,
        });
    }
    Ok(out)
}
