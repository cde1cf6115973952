//! The `comsat` binary: clap dispatch, logging and metrics setup, then the
//! component's `run`.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 bad usage or configuration.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use metrics_exporter_prometheus::PrometheusHandle;

/// comsat: a relay-based secure interconnect broker.
///
/// Edge agents dial out over QUIC to relays; relays authenticate and pair
/// the two sides of each link and forward their end-to-end encrypted flows.
#[derive(Parser, Debug)]
#[command(name = "comsat", version, about, long_about = None)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the whole system locally (not built yet).
    Up,
    /// Run a relay.
    Relay {
        #[command(subcommand)]
        command: RelayCommand,
    },
    /// Run an edge agent.
    Agent {
        #[command(subcommand)]
        command: AgentCommand,
    },
    /// The control plane (not built yet).
    Controller,
    /// Development helpers.
    Dev {
        #[command(subcommand)]
        command: DevCommand,
    },
}

#[derive(Subcommand, Debug)]
enum RelayCommand {
    /// Serve agents as configured in a relay.toml.
    Run {
        /// The relay config file.
        #[arg(long, env = "COMSAT_RELAY_CONFIG")]
        config: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum AgentCommand {
    /// Join the links configured in an agent.toml.
    Run {
        /// The agent config file.
        #[arg(long, env = "COMSAT_AGENT_CONFIG")]
        config: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum DevCommand {
    /// Write a local setup: authority, CA, a relay, two agents, grants.
    Init(DevInit),
}

#[derive(Args, Debug)]
struct DevInit {
    /// Directory to create the setup in.
    #[arg(long, default_value = ".comsat-dev")]
    dir: PathBuf,
    /// The relay's QUIC address.
    #[arg(long, default_value = "127.0.0.1:4433")]
    relay_listen: SocketAddr,
    /// The relay's admin HTTP address.
    #[arg(long, default_value = "127.0.0.1:9101")]
    relay_admin: SocketAddr,
    /// Agent A's admin HTTP address.
    #[arg(long, default_value = "127.0.0.1:9201")]
    agent_a_admin: SocketAddr,
    /// Agent B's admin HTTP address.
    #[arg(long, default_value = "127.0.0.1:9202")]
    agent_b_admin: SocketAddr,
    /// A link as NAME,LISTEN,TARGET (repeatable), e.g.
    /// `demo,tcp://127.0.0.1:7000,tcp://127.0.0.1:9000`.
    #[arg(long = "link", value_parser = parse_link)]
    links: Vec<comsat::dev::DevLink>,
    /// Agents pin the relay certificate by SHA-256 instead of by CA.
    #[arg(long)]
    pin_sha256: bool,
    /// A backup relay as QUIC_ADDR[,ADMIN_ADDR] (repeatable): links name
    /// every relay in order, and agents fail over to the next.
    #[arg(long = "extra-relay", value_parser = parse_extra_relay)]
    extra_relays: Vec<(SocketAddr, Option<SocketAddr>)>,
}

fn parse_extra_relay(s: &str) -> Result<(SocketAddr, Option<SocketAddr>), String> {
    let (quic, admin) = match s.split_once(',') {
        Some((q, a)) => (q, Some(a)),
        None => (s, None),
    };
    let quic = quic
        .parse()
        .map_err(|_| format!("`{quic}`: expected IP:PORT"))?;
    let admin = admin
        .map(|a| a.parse().map_err(|_| format!("`{a}`: expected IP:PORT")))
        .transpose()?;
    Ok((quic, admin))
}

fn parse_link(s: &str) -> Result<comsat::dev::DevLink, String> {
    let parts: Vec<&str> = s.splitn(3, ',').collect();
    let [name, listen, target] = parts[..] else {
        return Err("expected NAME,LISTEN,TARGET".into());
    };
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(format!("link name `{name}`: use letters, digits, - and _"));
    }
    Ok(comsat::dev::DevLink {
        name: name.into(),
        listen: listen.into(),
        target: target.into(),
        allowed_uids: vec![],
    })
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("COMSAT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).context("installing the metrics recorder")?;
    Ok(handle)
}

async fn shutdown_signal() {
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// A configuration error (exit code 2) rather than a runtime failure.
#[derive(Debug)]
struct Usage(String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

async fn run_relay(config: PathBuf) -> anyhow::Result<()> {
    let config = comsat_relay::RelayConfig::load(&config).map_err(|e| Usage(e.to_string()))?;
    let prometheus = install_metrics()?;
    let admin = config.admin;
    let relay = comsat_relay::Relay::bind(config).map_err(|e| Usage(e.to_string()))?;
    let quic = relay.local_addr()?;
    let mut admin_addr = None;
    if let Some(addr) = admin {
        let (bound, serve) = comsat_relay::admin::bind(
            addr,
            prometheus,
            relay.readiness(),
            "grants not loaded\n",
            std::future::pending(),
        )
        .await
        .with_context(|| format!("binding admin address {addr}"))?;
        admin_addr = Some(bound);
        tokio::spawn(serve);
    }
    let admin_shown = admin_addr.map_or_else(|| "none".into(), |a| a.to_string());
    tracing::info!(%quic, admin = %admin_shown, "relay listening");
    println!("comsat relay listening quic={quic} admin={admin_shown}");
    relay.run(shutdown_signal()).await?;
    Ok(())
}

async fn run_agent(config: PathBuf) -> anyhow::Result<()> {
    let config = comsat_agent::AgentConfig::load(&config).map_err(|e| Usage(e.to_string()))?;
    let prometheus = install_metrics()?;
    let admin = config.admin;
    let agent = comsat_agent::Agent::start(config)
        .await
        .map_err(|e| Usage(e.to_string()))?;
    if let Some(addr) = admin {
        let (bound, serve) = comsat_relay::admin::bind(
            addr,
            prometheus,
            agent.readiness(),
            "links not ready\n",
            std::future::pending(),
        )
        .await
        .with_context(|| format!("binding admin address {addr}"))?;
        println!("comsat agent admin {bound}");
        tokio::spawn(serve);
    }
    for (name, addr) in &agent.listening() {
        println!("comsat agent link {name} listening {addr}");
    }
    println!("comsat agent started");
    agent.run(shutdown_signal()).await;
    Ok(())
}

fn dev_init(args: DevInit) -> anyhow::Result<()> {
    let links = if args.links.is_empty() {
        vec![comsat::dev::DevLink {
            name: "demo".into(),
            listen: "tcp://127.0.0.1:7000".into(),
            target: "tcp://127.0.0.1:9000".into(),
            allowed_uids: vec![],
        }]
    } else {
        args.links
    };
    let layout = comsat::dev::init(
        &args.dir,
        &comsat::dev::DevOptions {
            relay_listen: args.relay_listen,
            relay_admin: Some(args.relay_admin),
            agent_admin: [Some(args.agent_a_admin), Some(args.agent_b_admin)],
            links,
            pin_sha256: args.pin_sha256,
            extra_relays: args.extra_relays,
        },
    )
    .map_err(|e| Usage(format!("{e:#}")))?;
    println!("wrote a local comsat setup to {}", layout.dir.display());
    println!("run, each in its own terminal:");
    println!(
        "  comsat relay run --config {}",
        layout.relay_config.display()
    );
    println!(
        "  comsat agent run --config {}",
        layout.agent_a.config.display()
    );
    println!(
        "  comsat agent run --config {}",
        layout.agent_b.config.display()
    );
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let result = match cli.command {
        Command::Up => Err(Usage(
            "`comsat up` is not built yet: it lands with the controller. For now run \
             `comsat dev init` and start the relay and agents it describes (see README.md)"
                .into(),
        )
        .into()),
        Command::Controller => Err(Usage(comsat_controller::NOT_YET.into()).into()),
        Command::Dev {
            command: DevCommand::Init(args),
        } => dev_init(args),
        Command::Relay {
            command: RelayCommand::Run { config },
        } => runtime().and_then(|rt| rt.block_on(run_relay(config))),
        Command::Agent {
            command: AgentCommand::Run { config },
        } => runtime().and_then(|rt| rt.block_on(run_agent(config))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<Usage>() => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}
