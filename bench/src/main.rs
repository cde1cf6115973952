//! comsat-bench: how fast is comsat, beside the baselines, in one run.
//!
//! Every figure is measured on loopback with every process of the path
//! real and separate (agent A, relay, agent B, and this process as the
//! client and the server), interleaved with its baseline (A B A B …) and
//! reported as the median of several runs, with the ratio to the baseline
//! measured in the same run: these machines are noisy, ratios hold better
//! than absolute numbers.
//!
//! ```sh
//! cargo build --release
//! cargo run --release -p comsat-bench -- run --quick
//! ```
//!
//! Results go to `bench/results/latest.json` and `latest.md`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use comsat::dev::{DevLink, DevOptions};
use comsat_protocol::grant::LinkLimits;
use comsat_tests::{Proc, free_udp_port};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

mod bare_quinn;
mod stunnel;

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
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// A short run (under 3 minutes) that keeps the harness from rotting.
    #[arg(long)]
    quick: bool,
    /// Only this scenario: throughput-1, throughput-8, latency, rate-limit,
    /// resume, memory.
    #[arg(long)]
    scenario: Option<String>,
    /// The comsat binary (default: `comsat` beside this executable).
    #[arg(long)]
    comsat: Option<PathBuf>,
    /// Where to write latest.json and latest.md.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

/// One measured figure beside its baseline.
#[derive(Debug, Serialize)]
struct Figure {
    scenario: String,
    metric: String,
    unit: String,
    comsat: f64,
    baseline_name: String,
    baseline: f64,
    /// comsat ÷ baseline.
    ratio: f64,
    samples: usize,
}

#[derive(Debug, Serialize)]
struct Report {
    quick: bool,
    environment: Environment,
    figures: Vec<Figure>,
    notes: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Environment {
    kernel: String,
    cpus: usize,
    cpu_model: String,
    aes_ni: bool,
    comsat_version: String,
    quic_max_udp_payload: u16,
}

fn environment() -> Environment {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    Environment {
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        aes_ni: cpuinfo.contains(" aes "),
        cpu_model,
        comsat_version: env!("CARGO_PKG_VERSION").to_owned(),
        // quinn's default MTU discovery upper bound: loopback's 64 KiB MTU
        // is never used.
        quic_max_udp_payload: 1452,
    }
}

/// A running comsat path: relay and two agents, and the listen address
/// of each link, in the order given.
struct Path {
    dir: tempfile::TempDir,
    /// Relay, agent A, agent B.
    procs: Vec<Proc>,
    listen: Vec<SocketAddr>,
    /// The relay's config file (to restart it).
    relay_config: PathBuf,
}

fn link(name: &str, target: SocketAddr) -> DevLink {
    DevLink {
        name: name.into(),
        listen: "tcp://127.0.0.1:0".into(),
        target: format!("tcp://{target}"),
        allowed_uids: vec![],
    }
}

/// Starts a relay and two agents carrying `links`; `limits` re-signs the
/// named links' grants with limits before the relay starts.
async fn start_path(bin: &str, links: Vec<DevLink>, limits: &[(&str, LinkLimits)]) -> Result<Path> {
    let dir = tempfile::tempdir()?;
    let any: SocketAddr = "127.0.0.1:0".parse()?;
    let names: Vec<String> = links.iter().map(|l| l.name.clone()).collect();
    let layout = comsat::dev::init(
        &dir.path().join("setup"),
        &DevOptions {
            relay_listen: format!("127.0.0.1:{}", free_udp_port()?).parse()?,
            relay_admin: Some(any),
            agent_admin: [Some(any), Some(any)],
            links,
            pin_sha256: false,
            extra_relays: vec![],
        },
    )?;
    for (name, l) in limits {
        layout.set_link_limits(name, l.clone())?;
    }
    let logs = dir.path();
    let timeout = comsat_tests::proc::START_TIMEOUT;
    let (relay, _, _) = comsat_tests::proc::start_relay(bin, &layout.relay_config, logs, "relay")?;
    let (mut a, admin) =
        comsat_tests::proc::start_agent(bin, &layout.agent_a.config, logs, "agent-a")?;
    let (b, _) = comsat_tests::proc::start_agent(bin, &layout.agent_b.config, logs, "agent-b")?;
    let mut listen = Vec::new();
    for name in &names {
        listen.push(comsat_tests::proc::listen_addr(&mut a, name)?);
    }
    let deadline = Instant::now() + timeout;
    while !matches!(comsat_tests::proc::http_get(admin, "/readyz"), Ok((200, _))) {
        if Instant::now() > deadline {
            bail!("comsat path not ready; agent log:\n{}", a.log_tail());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Path {
        procs: vec![relay, a, b],
        listen,
        relay_config: layout.relay_config.clone(),
        dir,
    })
}

/// Accepts connections; each announces a length, sends that many bytes, and
/// gets one byte back once they all arrived. (No half-close: stunnel does
/// not carry one through TLS.)
async fn sink(listener: TcpListener) {
    while let Ok((mut s, _)) = listener.accept().await {
        tokio::spawn(async move {
            let Ok(mut left) = s.read_u64().await else {
                return;
            };
            let mut buf = vec![0u8; 256 * 1024];
            while left > 0 {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => left = left.saturating_sub(n as u64),
                }
            }
            let _ = s.write_all(&[1]).await;
        });
    }
}

/// Echoes every connection.
async fn echo(listener: TcpListener) {
    while let Ok((s, _)) = listener.accept().await {
        tokio::spawn(async move {
            let _ = s.set_nodelay(true);
            let (mut r, mut w) = s.into_split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

/// Sends `per_flow` bytes on each of `flows` connections to `addr` and
/// waits for the sink's answers; returns per-flow throughputs in MiB/s.
async fn throughput(addr: SocketAddr, flows: usize, per_flow: u64) -> Result<Vec<f64>> {
    let mut tasks = Vec::new();
    for _ in 0..flows {
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await?;
            let buf = vec![0x5au8; 256 * 1024];
            let start = Instant::now();
            s.write_u64(per_flow).await?;
            let mut left = per_flow;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                s.write_all(&buf[..n]).await?;
                left -= n as u64;
            }
            let mut done = [0u8; 1];
            s.read_exact(&mut done).await?;
            anyhow::Ok(per_flow as f64 / (1024.0 * 1024.0) / start.elapsed().as_secs_f64())
        }));
    }
    let mut rates = Vec::new();
    for t in tasks {
        rates.push(tokio::time::timeout(Duration::from_secs(300), t).await???);
    }
    Ok(rates)
}

/// 64-byte ping-pongs; returns round-trip times in microseconds, sorted.
async fn latency(addr: SocketAddr, rounds: usize) -> Result<Vec<f64>> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let msg = [7u8; 64];
    let mut back = [0u8; 64];
    // Warm up the path.
    for _ in 0..20 {
        s.write_all(&msg).await?;
        s.read_exact(&mut back).await?;
    }
    let mut rtts = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        s.write_all(&msg).await?;
        s.read_exact(&mut back).await?;
        rtts.push(t.elapsed().as_secs_f64() * 1e6);
    }
    rtts.sort_by(f64::total_cmp);
    Ok(rtts)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    percentile(&v, 0.5)
}

/// Jain's fairness index of per-flow rates: 1 is perfectly fair.
fn jain(rates: &[f64]) -> f64 {
    let sum: f64 = rates.iter().sum();
    let squares: f64 = rates.iter().map(|r| r * r).sum();
    sum * sum / (rates.len() as f64 * squares)
}

/// The baselines measured beside comsat.
const DIRECT: &str = "direct loopback TCP";
const STUNNEL: &str = "stunnel two-hop TLS chain";
const QUINN: &str = "bare quinn stream, one hop";

fn figure(
    scenario: &str,
    metric: &str,
    unit: &str,
    comsat: f64,
    baseline_name: &str,
    baseline: f64,
    samples: usize,
) -> Figure {
    Figure {
        scenario: scenario.into(),
        metric: metric.into(),
        unit: unit.into(),
        comsat,
        baseline_name: baseline_name.into(),
        baseline,
        ratio: comsat / baseline,
        samples,
    }
}

/// Samples of comsat and of each baseline that ran, taken interleaved.
#[derive(Default)]
struct Samples {
    comsat: Vec<f64>,
    baselines: Vec<(&'static str, Vec<f64>)>,
}

impl Samples {
    fn add(&mut self, name: &'static str, v: f64) {
        match self.baselines.iter_mut().find(|(n, _)| *n == name) {
            Some((_, vs)) => vs.push(v),
            None => self.baselines.push((name, vec![v])),
        }
    }

    /// One figure per baseline: medians and their ratio.
    fn figures(self, scenario: &str, metric: &str, unit: &str, out: &mut Vec<Figure>) {
        let n = self.comsat.len();
        let c = median(self.comsat);
        for (name, vs) in self.baselines {
            out.push(figure(scenario, metric, unit, c, name, median(vs), n));
        }
    }
}

fn markdown(report: &Report) -> String {
    let mut out = String::from(
        "| scenario | metric | comsat | baseline | ratio |\n|---|---|---:|---:|---:|\n",
    );
    for f in &report.figures {
        out.push_str(&format!(
            "| {} | {} | {:.1} {} | {:.1} {} ({}) | {:.3} |\n",
            f.scenario, f.metric, f.comsat, f.unit, f.baseline, f.unit, f.baseline_name, f.ratio
        ));
    }
    for n in &report.notes {
        out.push_str(&format!("\n{n}\n"));
    }
    out
}

async fn run(args: RunArgs) -> Result<()> {
    let bin = match args.comsat {
        Some(p) => p,
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
    let bin = bin.display().to_string();
    let reps = if args.quick { 3 } else { 5 };
    let per_flow_1: u64 = if args.quick { 256 << 20 } else { 2 << 30 };
    let per_flow_8: u64 = if args.quick { 32 << 20 } else { 256 << 20 };
    let rounds = if args.quick { 2_000 } else { 20_000 };
    let wanted = |name: &str| args.scenario.as_deref().is_none_or(|s| s == name);

    let sink_l = TcpListener::bind("127.0.0.1:0").await?;
    let echo_l = TcpListener::bind("127.0.0.1:0").await?;
    let (sink_addr, echo_addr) = (sink_l.local_addr()?, echo_l.local_addr()?);
    tokio::spawn(sink(sink_l));
    tokio::spawn(echo(echo_l));
    eprintln!("starting relay and agents ({bin})");
    let path = start_path(
        &bin,
        vec![link("bulk", sink_addr), link("ping", echo_addr)],
        &[],
    )
    .await?;
    let (bulk, ping) = (path.listen[0], path.listen[1]);
    let mut notes = vec!["rathole is not measured yet (open work).".to_owned()];
    let bare = bare_quinn::Server::start()?;
    let chain = if stunnel::available() {
        eprintln!("starting the stunnel chain");
        Some(stunnel::start(sink_addr, echo_addr)?)
    } else {
        notes.push("stunnel: MISSING (run bench/peers.sh); its figures are absent.".into());
        None
    };
    let mut figures = Vec::new();

    if wanted("throughput-1") {
        let mut s = Samples::default();
        for i in 0..reps {
            eprintln!("throughput-1: run {}/{reps}", i + 1);
            s.add(DIRECT, throughput(sink_addr, 1, per_flow_1).await?[0]);
            if let Some(chain) = &chain {
                s.add(STUNNEL, throughput(chain.bulk, 1, per_flow_1).await?[0]);
            }
            s.add(QUINN, bare.throughput(1, per_flow_1).await?[0]);
            s.comsat.push(throughput(bulk, 1, per_flow_1).await?[0]);
        }
        s.figures("throughput-1", "one flow", "MiB/s", &mut figures);
    }
    if wanted("throughput-8") {
        let (mut s, mut fair) = (Samples::default(), Vec::new());
        for i in 0..reps {
            eprintln!("throughput-8: run {}/{reps}", i + 1);
            s.add(
                DIRECT,
                throughput(sink_addr, 8, per_flow_8).await?.iter().sum(),
            );
            if let Some(chain) = &chain {
                s.add(
                    STUNNEL,
                    throughput(chain.bulk, 8, per_flow_8).await?.iter().sum(),
                );
            }
            s.add(QUINN, bare.throughput(8, per_flow_8).await?.iter().sum());
            let rates = throughput(bulk, 8, per_flow_8).await?;
            fair.push(jain(&rates));
            s.comsat.push(rates.iter().sum());
        }
        s.figures("throughput-8", "8 flows, aggregate", "MiB/s", &mut figures);
        let j = median(fair);
        figures.push(figure(
            "throughput-8",
            "Jain fairness index",
            "",
            j,
            "perfect fairness",
            1.0,
            reps,
        ));
    }
    if wanted("latency") {
        eprintln!("latency: {rounds} ping-pongs each");
        let mut runs = vec![(DIRECT, latency(echo_addr, rounds).await?)];
        if let Some(chain) = &chain {
            runs.push((STUNNEL, latency(chain.ping, rounds).await?));
        }
        runs.push((QUINN, bare.latency(rounds).await?));
        let c = latency(ping, rounds).await?;
        for (name, p) in [("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999)] {
            for (baseline, d) in &runs {
                figures.push(figure(
                    "latency",
                    &format!("64 B round trip {name}"),
                    "µs",
                    percentile(&c, p),
                    baseline,
                    percentile(d, p),
                    rounds,
                ));
            }
        }
    }
    if wanted("rate-limit") {
        rate_limit(&bin, sink_addr, reps, per_flow_1, &mut figures).await?;
    }
    if wanted("resume") {
        let n = if args.quick { 100 } else { 1000 };
        if let Err(e) = resume(&bin, sink_addr, n, &mut figures).await {
            notes.push(format!("resume: FAILED: {e:#}"));
        }
    }
    if wanted("memory") {
        let sizes: &[usize] = if args.quick {
            &[10, 200]
        } else {
            &[10, 500, 1000]
        };
        memory(&bin, sink_addr, sizes, &mut figures, &mut notes).await?;
    }
    let report = Report {
        quick: args.quick,
        environment: environment(),
        figures,
        notes,
    };
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(
        args.out.join("latest.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    let md = markdown(&report);
    std::fs::write(args.out.join("latest.md"), &md)?;
    println!("{md}");
    Ok(())
}

/// The relay enforces a link's rate limit: 4 MiB through a link limited
/// to 1 MiB/s, while another link on the same relay and agents runs bulk
/// beside it, compared with that other link alone.
async fn rate_limit(
    bin: &str,
    sink_addr: SocketAddr,
    reps: usize,
    per_flow: u64,
    figures: &mut Vec<Figure>,
) -> Result<()> {
    const LIMITED: u64 = 4 << 20;
    const RATE: u64 = 1 << 20;
    eprintln!("rate-limit: starting a path with a link limited to 1 MiB/s");
    let path = start_path(
        bin,
        vec![link("limited", sink_addr), link("free", sink_addr)],
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
    for i in 0..reps {
        eprintln!("rate-limit: run {}/{reps}", i + 1);
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
    figures.push(figure(
        "rate-limit",
        "4 MiB through a 1 MiB/s link (floor: 3 s)",
        "s",
        median(limited_secs),
        "the floor",
        3.0,
        reps,
    ));
    figures.push(figure(
        "rate-limit",
        "another link's one flow while it runs",
        "MiB/s",
        median(beside),
        "that link alone",
        median(alone),
        reps,
    ));
    Ok(())
}

/// One small exchange through the sink: 1 byte there, 1 byte back.
async fn poke(addr: SocketAddr) -> Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_u64(1).await?;
    s.write_all(&[7]).await?;
    let mut done = [0u8; 1];
    s.read_exact(&mut done).await?;
    Ok(())
}

/// Resume: a path with `n` links, the relay killed and restarted on the
/// same key; the time until every link carries bytes again.
async fn resume(
    bin: &str,
    sink_addr: SocketAddr,
    n: usize,
    figures: &mut Vec<Figure>,
) -> Result<()> {
    eprintln!("resume: {n} links, relay killed and restarted");
    let links = (0..n).map(|i| link(&format!("l{i}"), sink_addr)).collect();
    let mut path = start_path(bin, links, &[]).await?;
    for addr in &path.listen {
        poke(*addr).await.context("before the restart")?;
    }
    path.procs[0].kill();
    let (relay, _, _) =
        comsat_tests::proc::start_relay(bin, &path.relay_config, path.dir.path(), "relay-2")?;
    let started = Instant::now();
    path.procs[0] = relay;
    let pokes: Vec<_> = path
        .listen
        .iter()
        .map(|addr| {
            let addr = *addr;
            tokio::spawn(async move {
                // A link that is not back yet makes its agent wait, then
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
    let mut last = started;
    for p in pokes {
        let at = tokio::time::timeout(Duration::from_secs(60), p)
            .await
            .context("a link did not carry bytes within 60 s of the restart")??;
        last = last.max(at);
    }
    figures.push(figure(
        "resume",
        &format!("all {n} links carry bytes again after a relay restart (floor: 5 s for 1,000)"),
        "s",
        (last - started).as_secs_f64(),
        "the floor",
        5.0,
        1,
    ));
    Ok(())
}

/// Resident memory of a process, KiB (`VmRSS` of /proc/PID/status).
fn rss_kib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("VmRSS value")?
        .parse()?)
}

/// The slope of the least-squares line through `points`.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let num: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let den: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if den == 0.0 { 0.0 } else { num / den }
}

/// Relay and agent memory per idle paired link: paths with N idle links
/// (all paired, one connection per agent), RSS after they settle, a line
/// fitted over N.
async fn memory(
    bin: &str,
    sink_addr: SocketAddr,
    sizes: &[usize],
    figures: &mut Vec<Figure>,
    notes: &mut Vec<String>,
) -> Result<()> {
    let (mut relay_pts, mut agent_pts) = (Vec::new(), Vec::new());
    for &n in sizes {
        eprintln!("memory: {n} idle paired links");
        let links = (0..n).map(|i| link(&format!("l{i}"), sink_addr)).collect();
        let path = start_path(bin, links, &[]).await?;
        // Let allocations settle (handshakes done, buffers returned).
        tokio::time::sleep(Duration::from_secs(2)).await;
        relay_pts.push((n as f64, rss_kib(path.procs[0].pid())?));
        agent_pts.push((n as f64, rss_kib(path.procs[1].pid())?));
    }
    let per_link = slope(&relay_pts);
    figures.push(figure(
        "memory",
        "relay RSS per idle paired link (floor: 16 KiB)",
        "KiB",
        per_link,
        "the floor",
        16.0,
        sizes.len(),
    ));
    figures.push(figure(
        "memory",
        "agent RSS per idle link (side A)",
        "KiB",
        slope(&agent_pts),
        "the relay's floor, for scale",
        16.0,
        sizes.len(),
    ));
    notes.push(format!(
        "memory: relay RSS {} KiB at {}..{} links (line fitted over {:?}); relay RSS per idle \
         agent connection is not measured yet.",
        relay_pts
            .iter()
            .map(|p| format!("{:.0}", p.1))
            .collect::<Vec<_>>()
            .join(", "),
        sizes.first().copied().unwrap_or(0),
        sizes.last().copied().unwrap_or(0),
        sizes
    ));
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Run(args) => rt.block_on(run(args)),
    }
}
