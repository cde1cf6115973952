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
//! rate), `resume`, `restart` (an agent killed and started again, until
//! its link carries bytes; alone, then under a stranger's flood of the
//! relay), `failover` (a ping-pong's longest pause when its relay's host
//! vanishes, frozen with SIGSTOP, a second relay present), `siege` (a controller under slowloris connections and
//! trickled unauthenticated POSTs, with `ctl status` latency), `storm` (a
//! relay restarted under 1,000 agent connections, 3,000 in a full run,
//! 10,000 with `--large`), `memory` (per idle link and agent connection, and
//! capacity: the sizes held with RSS linear in N; `--large` asks for large
//! sizes), `loss` (one flow from an agent behind a NAT whose uplink drops
//! 1 % and 5 % of datagrams at random, beside the same path without loss;
//! needs root for its network namespaces, and says so where it is skipped),
//! `idle` (every IP byte an idle agent with two links sends and receives
//! through its NAT in a day, relay and controller together; root too),
//! `udp` (a 64-byte UDP ping-pong through a `udp://` link, and a burst of
//! datagrams sent as fast as one client can: the rate delivered and the
//! share lost, each beside direct loopback UDP).
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
use std::time::Duration;

use anyhow::{Result, bail, ensure};
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;

mod bare_quinn;
mod chain;
mod failover;
mod fleet;
mod flood;
mod idle;
mod iperf;
mod latency;
mod loss;
mod measure;
mod memory;
mod path;
mod rathole;
mod report;
mod restart;
mod setup;
mod siege;
mod storm;
mod stunnel;
mod throughput;
mod udp;

use measure::{median, wait_carrying};
use path::{Path, link};
use report::{Bar, Figure, Report, Samples};

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
    /// rate-limit, setup, resume, restart, failover, siege, storm, memory
    /// (also called capacity), loss, idle, udp.
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

/// The comsat binary: `--comsat`, or `comsat` beside this executable
/// ([`comsat_tests::fleet::bin`], which the fleet scenarios run too).
fn comsat_bin(arg: Option<&PathBuf>) -> Result<String> {
    if let Some(p) = arg {
        ensure!(
            comsat_tests::fleet::use_bin(p),
            "the comsat binary was chosen before --comsat was read"
        );
    }
    let bin = comsat_tests::fleet::bin();
    if !std::path::Path::new(bin).exists() {
        bail!(
            "{bin} not found: build it first with `cargo build --release`, or pass --comsat PATH"
        );
    }
    Ok(bin.to_owned())
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
    let iperf = iperf::available();
    if !iperf {
        notes.push(missing(IPERF));
    }
    let chains = start_peers(sink, echo, &mut notes).await?;
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
    let scenarios: [(&str, Scenario); 14] = [
        ("throughput-1", |r| Box::pin(throughput::throughput_1(r))),
        ("throughput-8", |r| Box::pin(throughput::throughput_8(r))),
        ("latency", |r| Box::pin(latency::latency_scenario(r))),
        ("rate-limit", |r| Box::pin(throughput::rate_limit(r))),
        ("setup", |r| Box::pin(setup::setup(r))),
        ("resume", |r| Box::pin(setup::resume(r))),
        ("restart", |r| Box::pin(restart::restart(r))),
        ("failover", |r| Box::pin(failover::failover(r))),
        ("siege", |r| Box::pin(siege::siege(r))),
        ("storm", |r| Box::pin(storm::storm(r))),
        ("memory", |r| Box::pin(memory::memory(r))),
        ("loss", |r| Box::pin(loss::loss(r))),
        ("idle", |r| Box::pin(idle::idle(r))),
        ("udp", |r| Box::pin(udp::udp(r))),
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
             setup, resume, restart, failover, siege, storm, memory, loss, idle, udp or capacity",
            args.scenario.unwrap_or_default()
        );
    }
    write_report(&args, r)
}

/// Starts every peer baseline that is installed (each gets two tries),
/// noting the ones missing or failed.
async fn start_peers(
    sink: SocketAddr,
    echo: SocketAddr,
    notes: &mut Vec<String>,
) -> Result<Vec<(&'static str, chain::Chain)>> {
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
    Ok(chains)
}

/// Writes the run's report (JSON, markdown, SVG) to `args.out`, and the
/// markdown to stdout.
fn write_report(args: &RunArgs, r: Run) -> Result<()> {
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
