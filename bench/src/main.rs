//! comsat-bench: how fast is comsat, beside the baselines, in one run.
//!
//! Every figure is measured on loopback with every process of the path
//! real and separate (agent A, relay, agent B, and this process as the
//! client and the server), interleaved with its baselines (A B A B …) and
//! reported as the median of several runs, with the ratio to the baseline
//! measured in the same run: these machines are noisy, ratios hold better
//! than absolute numbers.
//!
//! ```sh
//! cargo build --release
//! cargo run --release -p comsat-bench -- run --quick
//! ```
//!
//! Results go to `bench/results/latest.json`, `latest.md` and `latest.svg`.
//! Scenarios (`--scenario NAME`, default all): `throughput-1` (with CPU
//! seconds per GB and wire bytes per payload byte), `throughput-8`,
//! `latency` (idle, with CPU per round trip, and beside a bulk flow),
//! `rate-limit`, `setup` (agent handshakes at concurrency 64, link setup
//! rate), `resume`, `memory` (per idle link and agent connection, and
//! capacity: the sizes held with RSS linear in N; `--large` asks for large
//! sizes).
//!
//! The main path runs as `comsat up` does: its relay has an interactive
//! listener, so its links have lanes (flows start on each agent's second
//! connection and move to the main one when they turn bulk), and its
//! processes (`comsat relay run`, `comsat agent run`) have their main
//! threads yield to the lane's (`bulk_nice`); `--no-lanes` runs it without
//! lanes (no interactive listener, no `lane_addr` in the agents: every flow
//! shares the agents' one connection). The latency scenario measures the
//! other configuration beside it, and lanes at the relay's main listener
//! (what a relay enrolled without `--interactive-port` gives).
//!
//! `comsat-bench hold [--seconds N]` starts the main path alone, prints its
//! listen addresses and PIDs, and holds it: for `perf` against the real
//! processes under a load of your own.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use comsat_protocol::grant::LinkLimits;
use tokio::net::TcpListener;

mod bare_quinn;
mod chain;
mod fleet;
mod iperf;
mod measure;
mod path;
mod rathole;
mod report;
mod stunnel;

use measure::{
    Pinger, cpu_ns_of, fit, jain, latency_under_bulk, median, percentile, poke, rss_kib,
    throughput, usage_during, wait_carrying,
};
use path::{Path, link};
use report::{Bar, Figure, Report, Samples, figure};

#[derive(Parser, Debug)]
#[command(name = "comsat-bench", about = "Benchmarks comsat against baselines")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the scenarios.
    Run(RunArgs),
    /// Start the main path (relay, two agents, the sink and the echo) and
    /// hold it, for profiling its processes under a load of your own.
    Hold(HoldArgs),
}

#[derive(clap::Args, Debug)]
struct HoldArgs {
    /// How long to hold the path, at most an hour.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// As `run --no-lanes`.
    #[arg(long)]
    no_lanes: bool,
    /// As `run --comsat`.
    #[arg(long)]
    comsat: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// A short run (under 3 minutes) that keeps the harness from rotting.
    #[arg(long)]
    quick: bool,
    /// Large sizes for the memory and capacity scenario (up to 10,000
    /// links and 50,000 agent connections; needs a few GiB and minutes).
    #[arg(long)]
    large: bool,
    /// Only this scenario: throughput-1, throughput-8, latency,
    /// rate-limit, setup, resume, memory (also called capacity).
    #[arg(long)]
    scenario: Option<String>,
    /// Run the main path without lanes: its relay has no interactive
    /// listener and its agents no `lane_addr`, so every flow shares the
    /// agents' one connection; by default it runs lanes to an interactive
    /// listener, as `comsat up` does.
    #[arg(long)]
    no_lanes: bool,
    /// The comsat binary (default: `comsat` beside this executable).
    #[arg(long)]
    comsat: Option<PathBuf>,
    /// Where to write latest.json, latest.md and latest.svg.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

/// The baselines measured beside comsat.
const DIRECT: &str = "direct loopback TCP";
const IPERF: &str = "iperf3, loopback TCP";
const STUNNEL: &str = "stunnel two-hop TLS chain";
const RATHOLE_TCP: &str = "rathole TCP, one hop";
const RATHOLE_NOISE: &str = "rathole Noise, one hop";
const QUINN: &str = "bare quinn stream, one hop";
const FLOOR: &str = "the floor";

/// Bytes in a GB, for CPU seconds per GB.
const GB: f64 = 1e9;

/// IPv4 and UDP headers of one datagram: on the wire beside its payload.
const IP_UDP_HEADERS: f64 = 28.0;

/// What every scenario shares.
struct Run {
    bin: String,
    quick: bool,
    large: bool,
    /// The main path's links have lanes.
    lanes: bool,
    reps: usize,
    sink: SocketAddr,
    echo: SocketAddr,
    /// The main path: links `bulk` (to the sink) and `ping` (to the echo).
    path: Path,
    /// Peer baselines that are installed, by name.
    chains: Vec<(&'static str, chain::Chain)>,
    quinn: Arc<bare_quinn::Server>,
    /// Whether iperf3 is installed.
    iperf: bool,
    figures: Vec<Figure>,
    notes: Vec<String>,
    /// Chart panels: title, unit, bars.
    charts: Vec<(String, String, Vec<Bar>)>,
}

impl Run {
    fn bulk(&self) -> SocketAddr {
        self.path.listen[0]
    }

    fn ping(&self) -> SocketAddr {
        self.path.listen[1]
    }

    fn chart(&mut self, title: &str, unit: &str, s: &Samples) {
        let mut bars = vec![Bar {
            label: "comsat (two hops, Noise end to end)".into(),
            value: median(s.comsat.clone()),
            ours: true,
        }];
        for (name, vs) in &s.baselines {
            bars.push(Bar {
                label: (*name).into(),
                value: median(vs.clone()),
                ours: false,
            });
        }
        self.charts.push((title.into(), unit.into(), bars));
    }
}

/// The comsat binary: `--comsat`, or `comsat` beside this executable.
fn comsat_bin(arg: Option<&PathBuf>) -> Result<String> {
    let bin = match arg {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("executable has no directory")?
            .join("comsat"),
    };
    if !bin.exists() {
        bail!(
            "{} not found: build it first with `cargo build --release`, or pass --comsat PATH",
            bin.display()
        );
    }
    Ok(bin.display().to_string())
}

/// The sink and the echo (in this process), and the main path with its
/// links `bulk` and `ping` to them, carrying.
async fn start_main(bin: &str, no_lanes: bool) -> Result<(Path, SocketAddr, SocketAddr)> {
    // Debug logging would weigh on the figures.
    comsat_tests::proc::set_log_filter("info");
    let sink_l = TcpListener::bind("127.0.0.1:0").await?;
    let echo_l = TcpListener::bind("127.0.0.1:0").await?;
    let (sink, echo) = (sink_l.local_addr()?, echo_l.local_addr()?);
    tokio::spawn(measure::sink(sink_l));
    tokio::spawn(measure::echo(echo_l));
    eprintln!("starting relay and agents ({bin})");
    let main_links = vec![link("bulk", sink), link("ping", echo)];
    let path = if no_lanes {
        Path::start(bin, main_links, &[]).await?
    } else {
        Path::start_lanes(bin, main_links).await?
    };
    wait_carrying("comsat", path.listen[0], path.listen[1]).await?;
    Ok((path, sink, echo))
}

/// `comsat-bench hold`.
async fn hold(args: HoldArgs) -> Result<()> {
    let bin = comsat_bin(args.comsat.as_ref())?;
    let (path, _, _) = start_main(&bin, args.no_lanes).await?;
    println!(
        "bulk (send an 8-byte big-endian length, then that many bytes; the sink answers once it has them): {}",
        path.listen[0]
    );
    println!("ping (an echo): {}", path.listen[1]);
    for (name, p) in [
        ("the relay", &path.relay),
        ("agent A", &path.agent_a),
        ("agent B", &path.agent_b),
    ] {
        if let Some(p) = p {
            println!("PID of {name}: {}", p.pid());
        }
    }
    let seconds = args.seconds.min(3600);
    println!("holding for {seconds} s");
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    Ok(())
}

async fn run(args: RunArgs) -> Result<()> {
    let bin = comsat_bin(args.comsat.as_ref())?;
    let wanted = |name: &str| {
        args.scenario
            .as_deref()
            .is_none_or(|s| s == name || (s == "capacity" && name == "memory"))
    };

    let (path, sink, echo) = start_main(&bin, args.no_lanes).await?;
    let mut notes = vec![if args.no_lanes {
        "The main comsat path runs without lanes (`--no-lanes`: no interactive listener at its relay, no `lane_addr` in its agents)."
    } else {
        "The main comsat path runs with lanes, as `comsat up` does: its relay has an interactive listener, flows start on each agent's lane and move to the main connection when they turn bulk."
    }
    .to_owned()];
    let mut chains = Vec::new();
    type Starter = fn(SocketAddr, SocketAddr) -> Result<chain::Chain>;
    let peers: [(&str, bool, Starter); 3] = [
        (STUNNEL, stunnel::available(), stunnel::start),
        (RATHOLE_TCP, rathole::available(), |s, e| {
            rathole::start(rathole::Transport::Tcp, s, e)
        }),
        (RATHOLE_NOISE, rathole::available(), |s, e| {
            rathole::start(rathole::Transport::Noise, s, e)
        }),
    ];
    let iperf = iperf::available();
    if !iperf {
        notes.push(missing(IPERF));
    }
    for (name, available, start) in peers {
        if !available {
            notes.push(missing(name));
            continue;
        }
        // A peer that did not come up on a loaded machine gets one more
        // try (with new ports) before it is reported as failed.
        let mut failures = Vec::new();
        for attempt in 1..=2 {
            eprintln!("starting {name} (try {attempt} of 2)");
            let chain = start(sink, echo)?;
            match wait_carrying(name, chain.bulk, chain.ping).await {
                Ok(()) => {
                    chains.push((name, chain));
                    break;
                }
                Err(e) => failures.push(format!("{e:#}")),
            }
        }
        if failures.len() == 2 {
            notes.push(format!(
                "{name}: FAILED to start twice ({}); its figures are absent.",
                failures.join("; ")
            ));
        } else if let Some(first) = failures.first() {
            notes.push(format!(
                "{name}: started on its second try (the first: {first})."
            ));
        }
    }
    let mut r = Run {
        bin,
        quick: args.quick,
        large: args.large,
        lanes: !args.no_lanes,
        reps: if args.quick { 3 } else { 5 },
        sink,
        echo,
        path,
        chains,
        quinn: Arc::new(bare_quinn::Server::start()?),
        iperf,
        figures: Vec::new(),
        notes,
        charts: Vec::new(),
    };
    // A scenario that fails is reported, and the others still run.
    type Scenario =
        for<'a> fn(&'a mut Run) -> std::pin::Pin<Box<dyn Future<Output = Result<()>> + 'a>>;
    let scenarios: [(&str, Scenario); 7] = [
        ("throughput-1", |r| Box::pin(throughput_1(r))),
        ("throughput-8", |r| Box::pin(throughput_8(r))),
        ("latency", |r| Box::pin(latency_scenario(r))),
        ("rate-limit", |r| Box::pin(rate_limit(r))),
        ("setup", |r| Box::pin(setup(r))),
        ("resume", |r| Box::pin(resume(r))),
        ("memory", |r| Box::pin(memory(r))),
    ];
    let mut ran = false;
    for (name, scenario) in scenarios {
        if wanted(name) {
            ran = true;
            if let Err(e) = scenario(&mut r).await {
                eprintln!("{name}: FAILED: {e:#}");
                r.notes.push(format!("{name}: FAILED: {e:#}"));
            }
        }
    }
    if !ran {
        bail!(
            "no scenario named {:?}: choose throughput-1, throughput-8, latency, rate-limit, \
             setup, resume, memory or capacity",
            args.scenario.unwrap_or_default()
        );
    }
    let report = Report {
        quick: args.quick,
        command: std::env::args()
            .skip(1)
            .fold("comsat-bench".to_owned(), |a, b| a + " " + &b),
        environment: report::environment(),
        figures: r.figures,
        notes: r.notes,
    };
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(
        args.out.join("latest.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    let md = report::markdown(&report);
    std::fs::write(args.out.join("latest.md"), &md)?;
    std::fs::write(args.out.join("latest.svg"), report::svg(&r.charts))?;
    println!("{md}");
    Ok(())
}

/// The note for a peer that is not installed.
fn missing(name: &str) -> String {
    format!("{name}: MISSING (install it: `bash bench/peers.sh` as root); its figures are absent.")
}

/// UDP payload bytes and datagrams through the relay, both directions.
fn relay_udp(path: &Path) -> Result<(f64, f64)> {
    let m = path.relay_metrics()?;
    let sum = |name: &str| {
        ["rx", "tx"]
            .iter()
            .map(|d| comsat_tests::metric(&m, &format!("{name}{{direction=\"{d}\"}}")))
            .sum::<f64>()
    };
    Ok((
        sum("comsat_relay_udp_bytes_total"),
        sum("comsat_relay_udp_datagrams_total"),
    ))
}

/// One flow per target, interleaved; beside comsat's: the CPU seconds per
/// GB of each path's processes, the relay's share, and the bytes on the
/// wire per payload byte per hop.
async fn throughput_1(r: &mut Run) -> Result<()> {
    let n: u64 = if r.quick { 256 << 20 } else { 2 << 30 };
    let (mut s, mut cpu, mut faults): (Samples, Samples, Samples) = Default::default();
    let (mut share, mut wire, mut udp_only) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..r.reps {
        eprintln!("throughput-1: run {}/{}", i + 1, r.reps);
        s.add(DIRECT, throughput(r.sink, 1, n).await?[0]);
        if r.iperf {
            // A failed iperf3 run is reported; comsat's figures still count.
            match iperf::throughput(n).await {
                Ok(rate) => s.add(IPERF, rate),
                Err(e) => r
                    .notes
                    .push(format!("{IPERF}: run {} FAILED: {e:#}", i + 1)),
            }
        }
        for (name, chain) in &r.chains {
            let (rate, u) = usage_during(&chain.pids(), throughput(chain.bulk, 1, n)).await?;
            s.add(name, rate[0]);
            cpu.add(name, u.iter().map(|u| u.cpu).sum::<f64>() / (n as f64 / GB));
            faults.add(
                name,
                u.iter().map(|u| u.faults).sum::<f64>() / (n as f64 / GB),
            );
        }
        s.add(QUINN, r.quinn.throughput(1, n).await?[0]);
        let before = relay_udp(&r.path)?;
        let (rate, u) = usage_during(&r.path.pids(), throughput(r.bulk(), 1, n)).await?;
        let after = relay_udp(&r.path)?;
        s.comsat.push(rate[0]);
        let total: f64 = u.iter().map(|u| u.cpu).sum();
        cpu.comsat.push(total / (n as f64 / GB));
        faults
            .comsat
            .push(u.iter().map(|u| u.faults).sum::<f64>() / (n as f64 / GB));
        share.push(u[0].cpu / total);
        // Two hops: agent A -> relay and relay -> agent B.
        let payload = 2.0 * n as f64;
        udp_only.push((after.0 - before.0) / payload);
        wire.push((after.0 - before.0 + IP_UDP_HEADERS * (after.1 - before.1)) / payload);
    }
    s.figures("throughput-1", "one flow", "MiB/s", &mut r.figures);
    r.chart("1-flow throughput", "MiB/s", &s);
    let metric = "CPU seconds per GB (relay and both agents; peers: all their processes)";
    let c = median(cpu.comsat.clone());
    r.figures.push(figure(
        "efficiency",
        &format!("{metric}; floor 6.5"),
        "s",
        c,
        FLOOR,
        6.5,
        r.reps,
    ));
    cpu.figures("efficiency", metric, "s", &mut r.figures);
    faults.figures(
        "efficiency",
        "minor page faults per GB (memory handed back to the kernel and touched again; same processes)",
        "",
        &mut r.figures,
    );
    let share = median(share);
    r.figures.push(figure(
        "efficiency",
        "the relay's share of that CPU time",
        "",
        share,
        "all three processes",
        1.0,
        r.reps,
    ));
    r.figures.push(figure(
        "efficiency",
        "wire bytes (IP+UDP+QUIC) per payload byte per hop; floor 1.05",
        "",
        median(wire),
        FLOOR,
        1.05,
        r.reps,
    ));
    r.notes.push(format!(
        "efficiency: wire bytes are counted at the relay (comsat_relay_udp_bytes_total and \
         _datagrams_total, both directions, acknowledgements included) plus 28 bytes of IPv4 \
         and UDP headers per datagram, over the payload bytes of the two hops; UDP payload \
         alone is {:.4} per payload byte per hop.",
        median(udp_only)
    ));
    Ok(())
}

async fn throughput_8(r: &mut Run) -> Result<()> {
    let n: u64 = if r.quick { 32 << 20 } else { 256 << 20 };
    let (mut s, mut fair) = (Samples::default(), Vec::new());
    let mut one = Vec::new();
    for i in 0..r.reps {
        eprintln!("throughput-8: run {}/{}", i + 1, r.reps);
        s.add(DIRECT, throughput(r.sink, 8, n).await?.iter().sum());
        for (name, chain) in &r.chains {
            s.add(name, throughput(chain.bulk, 8, n).await?.iter().sum());
        }
        s.add(QUINN, r.quinn.throughput(8, n).await?.iter().sum());
        let rates = throughput(r.bulk(), 8, n).await?;
        fair.push(jain(&rates));
        s.comsat.push(rates.iter().sum());
        one.push(throughput(r.bulk(), 1, 8 * n).await?[0]);
    }
    s.figures(
        "throughput-8",
        "8 flows, aggregate",
        "MiB/s",
        &mut r.figures,
    );
    let (agg, one) = (median(s.comsat.clone()), median(one));
    r.figures.push(figure(
        "throughput-8",
        "8-flow aggregate over one flow (same bytes); floor 0.9",
        "MiB/s",
        agg,
        "comsat, one flow",
        one,
        r.reps,
    ));
    r.figures.push(figure(
        "throughput-8",
        "Jain fairness index; floor 0.9",
        "",
        median(fair),
        "perfect fairness",
        1.0,
        r.reps,
    ));
    Ok(())
}

/// p50, p99 and p99.9 of a sorted run.
fn tails(rtts: &[f64]) -> [f64; 3] {
    [0.5, 0.99, 0.999].map(|p| percentile(rtts, p))
}

/// Idle round trips per path taken in one turn of the interleaving.
const PING_BLOCK: usize = 100;

async fn latency_scenario(r: &mut Run) -> Result<()> {
    let rounds = if r.quick { 2_000 } else { 20_000 };
    let busy_rounds = rounds / 4;
    let mut idle: [Samples; 3] = Default::default();
    let (mut added, mut busy, mut busy_p50) =
        (Samples::default(), Samples::default(), Samples::default());
    let mut cpu_per_round = Samples::default();
    let mut cpu_missing = None;
    let mut beside = placements(r).await?;
    for i in 0..r.reps {
        eprintln!(
            "latency: run {}/{}, {rounds} ping-pongs each",
            i + 1,
            r.reps
        );
        // Idle: every path at once, in turns of a hundred round trips.
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
                    cpu_per_round.add(name, *us);
                }
                cpu_per_round.comsat.extend(used.last());
            }
            (Err(e), _) | (_, Err(e)) => cpu_missing = Some(format!("{e:#}")),
        }
        drop(pingers);
        let comsat = tails(&rtts.pop().context("no comsat samples")?);
        let quinn = tails(&rtts.pop().context("no quinn samples")?);
        let direct = tails(&rtts[0]);
        for (k, v) in direct.iter().enumerate() {
            idle[k].add(DIRECT, *v);
        }
        for ((name, chain), t) in r.chains.iter().zip(&rtts[1..]) {
            let t = tails(t);
            for (k, v) in t.iter().enumerate() {
                idle[k].add(name, *v);
            }
            added.add(name, t[1] - direct[1]);
            let b = latency_under_bulk(chain.bulk, chain.ping, busy_rounds).await?;
            busy.add(name, percentile(&b, 0.99));
            busy_p50.add(name, percentile(&b, 0.5));
        }
        for (k, v) in quinn.iter().enumerate() {
            idle[k].add(QUINN, *v);
        }
        for (k, v) in comsat.iter().enumerate() {
            idle[k].comsat.push(*v);
        }
        added.comsat.push(comsat[1] - direct[1]);
        let b = latency_under_bulk(r.bulk(), r.ping(), busy_rounds).await?;
        busy.comsat.push(percentile(&b, 0.99));
        busy_p50.comsat.push(percentile(&b, 0.5));
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
        p.p50.baselines = busy_p50.baselines.clone();
        p.p99.baselines = busy.baselines.clone();
    }
    for (k, name) in ["p50", "p99", "p99.9"].iter().enumerate() {
        idle[k].figures(
            "latency",
            &format!("64 B round trip {name}"),
            "µs",
            &mut r.figures,
        );
    }
    r.chart("64 B round trip p99, idle", "µs", &idle[1]);
    if let Some(why) = cpu_missing {
        r.notes.push(format!(
            "latency: CPU per idle round trip not measured: {why}"
        ));
    }
    cpu_per_round.figures(
        "latency",
        "CPU per idle round trip (relay and both agents; peers: all their processes)",
        "µs",
        &mut r.figures,
    );
    added.figures(
        "latency",
        "added p99 over direct TCP (floor vs rathole Noise: 2.5)",
        "µs",
        &mut r.figures,
    );
    busy_p50.figures(
        "latency",
        "p50 round trip while another link of the path runs bulk",
        "µs",
        &mut r.figures,
    );
    busy.figures(
        "latency",
        "p99 round trip while another link of the path runs bulk",
        "µs",
        &mut r.figures,
    );
    for p in &beside {
        for (q, samples) in [("p50", &p.p50), ("p99", &p.p99)] {
            let metric = format!("{q} round trip{}", p.what);
            samples.figures("latency", &metric, "µs", &mut r.figures);
        }
    }
    r.figures.push(figure(
        "latency",
        "p99 round trip while another link runs bulk; floor 5 ms",
        "µs",
        median(busy.comsat.clone()),
        FLOOR,
        5_000.0,
        r.reps,
    ));
    for p in &beside {
        if let Some(metric) = p.floor {
            let p99 = median(p.p99.comsat.clone());
            r.figures
                .push(figure("latency", metric, "µs", p99, FLOOR, 5_000.0, r.reps));
        }
    }
    r.chart("64 B round trip p99 beside a bulk flow", "µs", &busy);
    Ok(())
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

/// The relay enforces a link's rate limit: 4 MiB through a link limited
/// to 1 MiB/s, while another link on the same relay and agents runs bulk
/// beside it, compared with that other link alone.
async fn rate_limit(r: &mut Run) -> Result<()> {
    const LIMITED: u64 = 4 << 20;
    const RATE: u64 = 1 << 20;
    let per_flow: u64 = if r.quick { 256 << 20 } else { 2 << 30 };
    eprintln!("rate-limit: starting a path with a link limited to 1 MiB/s");
    let path = Path::start(
        &r.bin,
        vec![link("limited", r.sink), link("free", r.sink)],
        &[(
            "limited",
            LinkLimits {
                rate_bytes_per_sec: Some(RATE),
                max_flows: None,
            },
        )],
    )
    .await?;
    let (limited, free) = (path.listen[0], path.listen[1]);
    let (mut alone, mut beside, mut limited_secs) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..r.reps {
        eprintln!("rate-limit: run {}/{}", i + 1, r.reps);
        alone.push(throughput(free, 1, per_flow).await?[0]);
        let slow = tokio::spawn(async move {
            let start = Instant::now();
            throughput(limited, 1, LIMITED).await?;
            anyhow::Ok(start.elapsed().as_secs_f64())
        });
        // Give the limited flow a head start so the two overlap.
        tokio::time::sleep(Duration::from_millis(200)).await;
        beside.push(throughput(free, 1, per_flow).await?[0]);
        limited_secs.push(slow.await??);
    }
    r.figures.push(figure(
        "rate-limit",
        "4 MiB through a 1 MiB/s link (floor: 3 s)",
        "s",
        median(limited_secs),
        FLOOR,
        3.0,
        r.reps,
    ));
    r.figures.push(figure(
        "rate-limit",
        "another link's one flow while it runs",
        "MiB/s",
        median(beside),
        "that link alone",
        median(alone),
        r.reps,
    ));
    Ok(())
}

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

/// Adds `[limits]` to a relay config so it admits `connections` agents.
fn admit(config: &std::path::Path, connections: usize) -> Result<()> {
    let mut text = std::fs::read_to_string(config)?;
    text.push_str(&format!(
        "\n[limits]\nmax_connections = {}\n",
        connections + 100
    ));
    std::fs::write(config, text)?;
    Ok(())
}

/// A relay (no agents) that admits `n` agent identities, and the fleet
/// that plays them.
fn fleet_relay(bin: &str, n: usize) -> Result<(Path, Arc<fleet::Fleet>)> {
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
async fn setup(r: &mut Run) -> Result<()> {
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
async fn resume(r: &mut Run) -> Result<()> {
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
        Ok(m) => {
            let lines: Vec<&str> = m
                .lines()
                .filter(|l| l.starts_with("comsat_relay_auth_failures_total{"))
                .collect();
            if lines.is_empty() {
                "the relay counted no refused connection".into()
            } else {
                format!("the relay counted {}", lines.join(", "))
            }
        }
        Err(e) => format!("the relay's /metrics: {e:#}"),
    }
}

/// Relay and agent memory per idle paired link and per idle agent
/// connection, a line fitted over several N; the largest N held is the
/// capacity shown.
async fn memory(r: &mut Run) -> Result<()> {
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
    conns.report("agent connection", max, 64.0, None, r);
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Run(args) => rt.block_on(run(args)),
        Command::Hold(args) => rt.block_on(hold(args)),
    }
}
