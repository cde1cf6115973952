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
use comsat::relay_ops;
use comsat_protocol::api::{self, NodeKind};
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
    /// Run the whole system locally in one process: a controller, a relay
    /// and two agents on loopback, enrolled with join tokens, plus a demo
    /// service and link. Ctrl-C stops it; a second run reuses DIR.
    Up(UpArgs),
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
    /// The control plane: enrolment, links, grants.
    Controller {
        #[command(subcommand)]
        command: ControllerCommand,
    },
    /// Operate a controller: join tokens, agents, relays, links.
    Ctl(CtlArgs),
    /// Print a shell completion script, e.g.
    /// `comsat completions bash > /etc/bash_completion.d/comsat`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Development helpers.
    Dev {
        #[command(subcommand)]
        command: DevCommand,
    },
}

#[derive(Args, Debug)]
struct UpArgs {
    /// Where the controller, relay and agents keep their state.
    #[arg(long, default_value = ".comsat", env = "COMSAT_DATA_DIR")]
    data_dir: PathBuf,
    /// The controller's HTTPS port on 127.0.0.1 (first run only).
    #[arg(long, default_value_t = 8443)]
    controller_port: u16,
    /// The relay's QUIC (UDP) port on 127.0.0.1 (first run only).
    #[arg(long, default_value_t = 4433)]
    relay_port: u16,
    /// The relay's interactive listener (UDP) on 127.0.0.1, for links
    /// created with `--connection` (first run only).
    #[arg(long, default_value_t = 4434)]
    relay_interactive_port: u16,
    /// Where the demo link listens.
    #[arg(long, default_value = "127.0.0.1:7000")]
    demo_listen: SocketAddr,
    /// Start only the infrastructure: no demo service, no demo link.
    #[arg(long)]
    no_demo: bool,
}

#[derive(Subcommand, Debug)]
enum ControllerCommand {
    /// Create a controller's data dir: authority key, CA and server
    /// certificate (or yours), database, admin token, ctl context.
    Init {
        /// Directory to create (must not hold a controller yet).
        #[arg(long, env = "COMSAT_DATA_DIR")]
        data_dir: PathBuf,
        /// The URL nodes and operators reach the controller at; it goes
        /// into join tokens and the server certificate.
        #[arg(long, default_value = "https://127.0.0.1:8443")]
        public_url: String,
        /// Your server certificate chain (PEM) instead of a generated CA.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The private key of --tls-cert (PEM).
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// The CA that issued --tls-cert (PEM), pinned by nodes; default:
        /// the last certificate of the chain.
        #[arg(long, requires = "tls_cert")]
        tls_ca: Option<PathBuf>,
        /// Keep state in this PostgreSQL database
        /// (postgres://USER:PASSWORD@HOST:PORT/DB) instead of the SQLite
        /// file in the data dir; it must be empty. Prefer the environment
        /// variable: a command line is visible to other users.
        #[arg(long, env = "COMSAT_DATABASE_URL", hide_env_values = true, value_parser = comsat_controller::store::DatabaseUrl::parse)]
        database: Option<comsat_controller::store::DatabaseUrl>,
    },
    /// Serve the controller API from an initialised data dir.
    Run {
        /// The data dir `controller init` created.
        #[arg(long, env = "COMSAT_DATA_DIR")]
        data_dir: PathBuf,
        /// Address to listen on (default: from controller.toml).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// The PostgreSQL database this controller shares with others
        /// (postgres://USER:PASSWORD@HOST:PORT/DB); default: the SQLite
        /// file in the data dir. Prefer the environment variable.
        #[arg(long, env = "COMSAT_DATABASE_URL", hide_env_values = true, value_parser = comsat_controller::store::DatabaseUrl::parse)]
        database: Option<comsat_controller::store::DatabaseUrl>,
    },
}

#[derive(Subcommand, Debug)]
enum RelayCommand {
    /// Serve agents: from an enrolled data dir (grants pushed by the
    /// controller), or as configured in a relay.toml.
    Run {
        /// The data dir `comsat relay enrol` wrote.
        #[arg(
            long,
            env = "COMSAT_DATA_DIR",
            conflicts_with = "config",
            required_unless_present = "config"
        )]
        data_dir: Option<PathBuf>,
        /// UDP address to serve QUIC on (default: all addresses, at the
        /// enrolled public address's port).
        #[arg(long, requires = "data_dir")]
        listen: Option<SocketAddr>,
        /// Admin HTTP address (/metrics, /healthz, /readyz).
        #[arg(long, requires = "data_dir")]
        admin: Option<SocketAddr>,
        /// UDP address of the interactive listener (default: the listen
        /// address's IP at the enrolled interactive port; for a relay
        /// enrolled with `--interactive-port` behind a port forward).
        #[arg(long, requires = "data_dir")]
        interactive_listen: Option<SocketAddr>,
        /// Niceness the main threads take above the process's own while
        /// the interactive listener runs (0 to 19, default 5; 0: the same).
        #[arg(long, requires = "data_dir", value_parser = clap::value_parser!(u8).range(0..=19))]
        bulk_nice: Option<u8>,
        /// A static relay config file (see `comsat dev init`).
        #[arg(long, env = "COMSAT_RELAY_CONFIG")]
        config: Option<PathBuf>,
        /// On SIGTERM, how long to wait for attached links to move to
        /// their next relay before exiting anyway (default: the config's
        /// `[drain] grace_secs`, else 30s).
        #[arg(long, value_parser = humantime::parse_duration)]
        drain_grace: Option<std::time::Duration>,
    },
    /// Drain a running relay: it refuses new attaches, moves every link to
    /// the next relay of its grant, and exits (what SIGTERM does); this
    /// waits until it has exited.
    Drain {
        /// The relay's data dir (or the directory of its config file).
        #[arg(
            long,
            env = "COMSAT_DATA_DIR",
            conflicts_with = "config",
            required_unless_present = "config"
        )]
        data_dir: Option<PathBuf>,
        /// The relay's static config file.
        #[arg(long, env = "COMSAT_RELAY_CONFIG")]
        config: Option<PathBuf>,
        /// Give up waiting after this long (the relay keeps draining).
        #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Enrol this machine as a relay with a join token.
    Enrol {
        #[command(flatten)]
        token: TokenArgs,
        /// Directory for the relay's keys, certificate and grant cache.
        #[arg(long, env = "COMSAT_DATA_DIR")]
        data_dir: PathBuf,
        /// HOST:PORT agents dial (UDP); HOST goes into the certificate.
        #[arg(long)]
        public_addr: String,
        /// Also run an interactive listener on this UDP port (same host):
        /// agents' lanes, and links created with `--connection`, reach it
        /// over a QUIC connection and a relay thread of their own (without
        /// it, lanes go to the main port). Open the port too.
        #[arg(long, value_name = "PORT")]
        interactive_port: Option<u16>,
    },
}

#[derive(Subcommand, Debug)]
enum AgentCommand {
    /// Join links: those the controller assigns to an enrolled data dir,
    /// or those configured in an agent.toml.
    Run {
        /// The data dir `comsat agent enrol` wrote.
        #[arg(
            long,
            env = "COMSAT_DATA_DIR",
            conflicts_with = "config",
            required_unless_present = "config"
        )]
        data_dir: Option<PathBuf>,
        /// Admin HTTP address (/metrics, /healthz, /readyz).
        #[arg(long, requires = "data_dir")]
        admin: Option<SocketAddr>,
        /// Niceness the main threads take above the process's own once a
        /// link has a lane (0 to 19, default 5; 0: the same).
        #[arg(long, requires = "data_dir", value_parser = clap::value_parser!(u8).range(0..=19))]
        bulk_nice: Option<u8>,
        /// A static agent config file (see `comsat dev init`).
        #[arg(long, env = "COMSAT_AGENT_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Enrol this machine as an agent with a join token.
    Enrol {
        #[command(flatten)]
        token: TokenArgs,
        /// Directory for the agent's keys and state.
        #[arg(long, env = "COMSAT_DATA_DIR")]
        data_dir: PathBuf,
    },
}

#[derive(Args, Debug)]
struct TokenArgs {
    /// The join token (prefer --token-file: a command line is visible to
    /// every user of the machine).
    token: Option<String>,
    /// File holding the join token; `-` reads standard input.
    #[arg(long, conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// Another controller sharing the first one's database (https://…),
    /// tried when the token's one cannot be reached (repeatable).
    #[arg(long = "fallback-controller")]
    fallback_controllers: Vec<String>,
}

#[derive(Args, Debug)]
struct CtlArgs {
    /// Controller URL.
    #[arg(long, env = "COMSAT_CONTROLLER", global = true)]
    controller: Option<String>,
    /// File holding the admin API token.
    #[arg(long, env = "COMSAT_TOKEN_FILE", global = true)]
    token_file: Option<PathBuf>,
    /// The controller CA (PEM).
    #[arg(long, env = "COMSAT_CA", global = true)]
    ca: Option<PathBuf>,
    /// A context file written by `controller init` (default
    /// ./.comsat/context.toml when it exists).
    #[arg(long, env = "COMSAT_CONTEXT", global = true)]
    context: Option<PathBuf>,
    /// Output format (`yaml`: only for `get`, which prints YAML by default).
    #[arg(short, long, value_enum, default_value_t = OutputFormat::Table, global = true)]
    output: OutputFormat,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum OutputFormat {
    Table,
    Json,
    Yaml,
}

#[derive(Subcommand, Debug)]
enum CtlCommand {
    /// Join tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Enrolled agents.
    Agent {
        #[command(subcommand)]
        command: ListCommand,
    },
    /// Enrolled relays.
    Relay {
        #[command(subcommand)]
        command: ListCommand,
    },
    /// Links between two agents.
    Link {
        #[command(subcommand)]
        command: LinkCommand,
    },
    /// A summary of the controller's state.
    Status,
    /// The audit log: changes and refused authentications, with reasons.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Service accounts (automation) and their API tokens.
    #[command(name = "serviceaccount")]
    ServiceAccount {
        #[command(subcommand)]
        command: PrincipalCommand,
    },
    /// Users (people) and their API tokens.
    User {
        #[command(subcommand)]
        command: PrincipalCommand,
    },
    /// Roles: rules of resources and verbs.
    Role {
        #[command(subcommand)]
        command: RoleCommand,
    },
    /// Role bindings: roles given to users and service accounts.
    #[command(name = "rolebinding")]
    RoleBinding {
        #[command(subcommand)]
        command: RoleBindingCommand,
    },
    /// Make the controller hold what a YAML file describes (Link, Role,
    /// RoleBinding, ServiceAccount, JoinToken); applying twice changes
    /// nothing the second time.
    Apply {
        /// The file (`-`: standard input).
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Print an object as the YAML document `apply` takes (`-o json` for
    /// JSON).
    Get {
        /// link, role, rolebinding or serviceaccount.
        kind: String,
        /// Its name.
        name: String,
    },
}

#[derive(Subcommand, Debug)]
enum PrincipalCommand {
    /// Create one with its first API token; prints only the token.
    Create {
        /// Its name.
        name: String,
        /// Lifetime of the token, e.g. 30d (default: no expiry).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<std::time::Duration>,
    },
    /// List them with their tokens' ids (never the tokens).
    List,
    /// Delete one: its tokens stop working and its bindings go.
    Delete {
        /// Its name.
        name: String,
    },
    /// Issue another API token; prints only the token.
    Token {
        /// Its name.
        name: String,
        /// Lifetime of the token, e.g. 30d (default: no expiry).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<std::time::Duration>,
    },
    /// Revoke one API token (see `list` for ids).
    Revoke {
        /// Its name.
        name: String,
        /// The token's id.
        #[arg(long)]
        token_id: String,
    },
}

#[derive(Subcommand, Debug)]
enum RoleCommand {
    /// Create a role.
    Create {
        /// Its name.
        name: String,
        /// A rule, RESOURCES:VERBS (comma-separated; `*` for all), e.g.
        /// `links,tokens/agent:get,list,create` (repeatable).
        #[arg(long = "rule", required = true)]
        rules: Vec<String>,
    },
    /// List roles, built-in ones included.
    List,
    /// Show one role's rules.
    Show {
        /// Its name.
        name: String,
    },
    /// Delete a role (not a built-in one).
    Delete {
        /// Its name.
        name: String,
    },
}

#[derive(Subcommand, Debug)]
enum RoleBindingCommand {
    /// Give a role to a service account or a user.
    #[command(group(clap::ArgGroup::new("subject").required(true).args(["serviceaccount", "user"])))]
    Create {
        /// The binding's name.
        name: String,
        /// The role.
        #[arg(long)]
        role: String,
        /// A service account.
        #[arg(long)]
        serviceaccount: Option<String>,
        /// A user.
        #[arg(long)]
        user: Option<String>,
    },
    /// List role bindings.
    List,
    /// Delete a role binding.
    Delete {
        /// Its name.
        name: String,
    },
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// List audit records, oldest first (at most 1000, the newest).
    List {
        /// Only records newer than this, e.g. 10m, 1h, 7d.
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Option<std::time::Duration>,
        /// Only this subject, or subjects starting with it (`agent:`).
        #[arg(long)]
        subject: Option<String>,
        /// At most this many records.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Create a one-time join token; prints only the token.
    Create {
        /// What the token enrols.
        #[arg(long, value_parser = ["agent", "relay"])]
        kind: String,
        /// The name the node gets (default: one the controller picks).
        #[arg(long)]
        name: Option<String>,
        /// Lifetime, e.g. 10m, 1h, 2d.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
    },
}

#[derive(Subcommand, Debug)]
enum ListCommand {
    /// List them.
    List,
    /// Decommission one: its credentials stop working at once (an agent
    /// must hold no link; a relay's links move to other relays).
    Delete {
        /// Its name.
        name: String,
    },
}

#[derive(Subcommand, Debug)]
enum LinkCommand {
    /// Create a link: FROM listens locally, TO dials the target.
    Create {
        /// The link's name (lowercase letters, digits, `-`).
        name: String,
        /// The agent that listens.
        #[arg(long)]
        from: String,
        /// Where it listens: tcp://127.0.0.1:PORT or unix:///PATH.
        #[arg(long)]
        listen: String,
        /// The agent that dials the target.
        #[arg(long)]
        to: String,
        /// What it dials: tcp://HOST:PORT or unix:///PATH.
        #[arg(long)]
        target: String,
        /// Unix listeners: a peer uid allowed to connect (repeatable).
        #[arg(long = "allow-uid")]
        allow_uids: Vec<u32>,
        /// Unix listeners: a peer gid allowed to connect (repeatable).
        #[arg(long = "allow-gid")]
        allow_gids: Vec<u32>,
        /// Concurrent flows the relays allow the link (default: no limit);
        /// one more is reset and counted.
        #[arg(long)]
        max_flows: Option<u32>,
        /// Bytes per second the relays let the link carry in each
        /// direction, like 10MiB/s or 100Mbit/s (default: no limit); the
        /// sender is slowed, nothing is dropped.
        #[arg(long, value_parser = comsat::ctl::parse_rate)]
        rate_limit: Option<u64>,
        /// Give the link a QUIC connection and a thread of its own on both
        /// agents (and the relays' interactive listener where they run
        /// one), so its round trips do not wait behind bulk links. Links
        /// naming the same connection share it.
        #[arg(long, value_name = "NAME")]
        connection: Option<String>,
    },
    /// Change the limits relays enforce on a link (the others stay); open
    /// flows go on.
    #[command(group(clap::ArgGroup::new("limits").required(true).multiple(true).args(["max_flows", "unlimited_flows", "rate_limit", "unlimited_rate", "connection", "shared_connection"])))]
    Update {
        /// The link's name.
        name: String,
        /// Concurrent flows the relays allow the link.
        #[arg(long, conflicts_with = "unlimited_flows")]
        max_flows: Option<u32>,
        /// Remove the concurrent-flow limit.
        #[arg(long)]
        unlimited_flows: bool,
        /// Bytes per second per direction, like 10MiB/s or 100Mbit/s;
        /// applies to open flows too.
        #[arg(long, value_parser = comsat::ctl::parse_rate, conflicts_with = "unlimited_rate")]
        rate_limit: Option<u64>,
        /// Remove the rate limit.
        #[arg(long)]
        unlimited_rate: bool,
        /// Move the link onto the agents' connection NAME (see `create
        /// --connection`); its open flows are reset.
        #[arg(long, value_name = "NAME", conflicts_with = "shared_connection")]
        connection: Option<String>,
        /// Move the link back onto the agents' shared connection; its open
        /// flows are reset.
        #[arg(long)]
        shared_connection: bool,
    },
    /// List links.
    List,
    /// Show one link.
    Show {
        /// The link's name.
        name: String,
    },
    /// Delete a link: listeners close, open flows are reset, relays drop it.
    Delete {
        /// The link's name.
        name: String,
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

fn init_tracing(format: LogFormat, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("COMSAT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
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

async fn run_relay(path: PathBuf, drain_grace: Option<std::time::Duration>) -> anyhow::Result<()> {
    let config = comsat_relay::RelayConfig::load(&path).map_err(|e| Usage(e.to_string()))?;
    let prometheus = install_metrics()?;
    let admin = config.admin;
    let grace = drain_grace.unwrap_or(config.drain.grace());
    let relay = comsat_relay::Relay::bind(config).map_err(|e| Usage(e.to_string()))?;
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    serve_relay(
        relay,
        prometheus,
        admin,
        dir,
        grace,
        relay_ops::Reload::Config(path.clone()),
    )
    .await
}

/// Serves `relay` until a signal stops it (see [`relay_ops`]).
async fn serve_relay(
    relay: comsat_relay::Relay,
    prometheus: PrometheusHandle,
    admin: Option<SocketAddr>,
    dir: &std::path::Path,
    grace: std::time::Duration,
    reload: relay_ops::Reload,
) -> anyhow::Result<()> {
    let quic = relay.local_addr()?;
    let extra: comsat_relay::admin::ExtraMetrics = std::sync::Arc::new(relay.link_metrics());
    let admin_shown = serve_admin(
        admin,
        prometheus,
        Some(extra),
        relay.readiness(),
        "not serving: draining\n",
    )
    .await?;
    let stop = relay_ops::watch_signals(relay.handle(), grace, reload)?;
    let _pid = relay_ops::PidFile::create(dir)?;
    match relay.interactive_addr().transpose()? {
        Some(interactive) => {
            tracing::info!(%quic, admin = %admin_shown, %interactive, "relay listening");
            println!(
                "comsat relay listening quic={quic} admin={admin_shown} interactive={interactive}"
            );
        }
        None => {
            tracing::info!(%quic, admin = %admin_shown, "relay listening");
            println!("comsat relay listening quic={quic} admin={admin_shown}");
        }
    }
    relay.run_until(stop).await?;
    Ok(())
}

async fn run_agent(config: PathBuf) -> anyhow::Result<()> {
    let config = comsat_agent::AgentConfig::load(&config).map_err(|e| Usage(e.to_string()))?;
    let prometheus = install_metrics()?;
    let admin = config.admin;
    let agent = comsat_agent::Agent::start(config)
        .await
        .map_err(|e| Usage(e.to_string()))?;
    let admin_shown = serve_admin(
        admin,
        prometheus,
        None,
        agent.readiness(),
        "links not ready\n",
    )
    .await?;
    println!("comsat agent admin {admin_shown}");
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

fn controller_init(opts: comsat_controller::InitOptions) -> anyhow::Result<()> {
    let report = comsat_controller::init(&opts).map_err(|e| Usage(e.to_string()))?;
    let dir = report.data_dir.display();
    println!("initialised a comsat controller in {dir}");
    println!("  URL:            {}", report.public_url);
    println!("  CA SHA-256:     {}", report.ca_sha256);
    println!("  admin token:    {dir}/admin.token (keep it secret)");
    println!("  ctl context:    {}", report.context_file.display());
    println!("next:");
    println!("  comsat controller run --data-dir {dir}");
    println!("  export COMSAT_CONTEXT={}", report.context_file.display());
    println!("  comsat ctl token create --kind relay --name relay-1 > relay.token");
    Ok(())
}

async fn run_up(args: UpArgs) -> anyhow::Result<()> {
    let prometheus = install_metrics()?;
    let opts = comsat::up::UpOptions {
        data_dir: args.data_dir,
        controller_port: args.controller_port,
        relay_port: args.relay_port,
        relay_interactive_port: args.relay_interactive_port,
        demo_listen: args.demo_listen,
        demo: !args.no_demo,
    };
    comsat::up::up(opts, prometheus, shutdown_signal()).await
}

async fn run_controller(opts: comsat_controller::RunOptions) -> anyhow::Result<()> {
    let controller = comsat_controller::Controller::bind(opts)
        .await
        .map_err(|e| Usage(e.to_string()))?;
    let addr = controller.local_addr();
    println!("comsat controller listening https://{addr}");
    controller.run(shutdown_signal()).await?;
    Ok(())
}

async fn principal(
    c: &comsat::client::Client,
    kind: api::PrincipalKind,
    command: PrincipalCommand,
    out: comsat::ctl::Output,
) -> anyhow::Result<String> {
    use comsat::ctl;
    match command {
        PrincipalCommand::Create { name, ttl } => ctl::principal_create(c, kind, name, ttl).await,
        PrincipalCommand::List => ctl::principal_list(c, kind, out).await,
        PrincipalCommand::Delete { name } => ctl::delete(c, kind.path(), &name, "delete").await,
        PrincipalCommand::Token { name, ttl } => ctl::principal_token(c, kind, &name, ttl).await,
        PrincipalCommand::Revoke { name, token_id } => {
            ctl::principal_revoke(c, kind, &name, &token_id).await
        }
    }
}

async fn ctl(args: CtlArgs) -> anyhow::Result<()> {
    use comsat::ctl;
    let target = ctl::Target {
        controller: args.controller,
        token_file: args.token_file,
        ca: args.ca,
        context: args.context,
    };
    let out = match (args.output, &args.command) {
        (OutputFormat::Yaml, CtlCommand::Get { .. }) | (OutputFormat::Table, _) => {
            ctl::Output::Table
        }
        (OutputFormat::Json, _) => ctl::Output::Json,
        (OutputFormat::Yaml, _) => {
            return Err(Usage("-o yaml is for `comsat ctl get`; use -o json".into()).into());
        }
    };
    let c = target.client().map_err(|e| Usage(format!("{e:#}")))?;
    let text = match args.command {
        CtlCommand::Token {
            command: TokenCommand::Create { kind, name, ttl },
        } => {
            let kind = kind.parse::<NodeKind>().map_err(Usage)?;
            ctl::token_create(&c, kind, name, Some(ttl)).await?
        }
        CtlCommand::Agent {
            command: ListCommand::List,
        } => ctl::agent_list(&c, out).await?,
        CtlCommand::Relay {
            command: ListCommand::List,
        } => ctl::relay_list(&c, out).await?,
        CtlCommand::Agent {
            command: ListCommand::Delete { name },
        } => ctl::delete(&c, api::PATH_AGENTS, &name, "agent delete").await?,
        CtlCommand::Relay {
            command: ListCommand::Delete { name },
        } => ctl::delete(&c, api::PATH_RELAYS, &name, "relay delete").await?,
        CtlCommand::Link { command } => match command {
            LinkCommand::Create {
                name,
                from,
                listen,
                to,
                target,
                allow_uids,
                allow_gids,
                max_flows,
                rate_limit,
                connection,
            } => {
                let body = api::LinkCreate {
                    name,
                    from,
                    listen,
                    to,
                    target,
                    allowed_uids: allow_uids,
                    allowed_gids: allow_gids,
                    max_flows,
                    rate_limit_bytes_per_sec: rate_limit,
                    connection,
                };
                ctl::link_create(&c, body, out).await?
            }
            LinkCommand::Update {
                name,
                max_flows,
                unlimited_flows,
                rate_limit,
                unlimited_rate,
                connection,
                shared_connection,
            } => {
                // 0 removes a limit, "" the connection; a field left out
                // stays as it is.
                let update = api::LinkUpdate {
                    max_flows: if unlimited_flows { Some(0) } else { max_flows },
                    rate_limit_bytes_per_sec: if unlimited_rate { Some(0) } else { rate_limit },
                    connection: if shared_connection {
                        Some(String::new())
                    } else {
                        connection
                    },
                };
                ctl::link_update(&c, &name, update, out).await?
            }
            LinkCommand::List => ctl::link_list(&c, out).await?,
            LinkCommand::Show { name } => ctl::link_show(&c, &name, out).await?,
            LinkCommand::Delete { name } => ctl::link_delete(&c, &name).await?,
        },
        CtlCommand::Status => ctl::status(&c, out).await?,
        CtlCommand::Audit {
            command:
                AuditCommand::List {
                    since,
                    subject,
                    limit,
                },
        } => ctl::audit_list(&c, since, subject, limit, out).await?,
        CtlCommand::ServiceAccount { command } => {
            principal(&c, api::PrincipalKind::ServiceAccount, command, out).await?
        }
        CtlCommand::User { command } => {
            principal(&c, api::PrincipalKind::User, command, out).await?
        }
        CtlCommand::Role { command } => match command {
            RoleCommand::Create { name, rules } => ctl::role_create(&c, name, &rules, out).await?,
            RoleCommand::List => ctl::role_list(&c, out).await?,
            RoleCommand::Show { name } => ctl::role_show(&c, &name, out).await?,
            RoleCommand::Delete { name } => {
                ctl::delete(&c, api::PATH_ROLES, &name, "role delete").await?
            }
        },
        CtlCommand::Apply { file } => comsat::apply::apply(&c, &file).await?,
        CtlCommand::Get { kind, name } => {
            comsat::apply::get(&c, &kind, &name, matches!(out, ctl::Output::Json)).await?
        }
        CtlCommand::RoleBinding { command } => match command {
            RoleBindingCommand::Create {
                name,
                role,
                serviceaccount,
                user,
            } => {
                let (subject_kind, subject_name) = match (serviceaccount, user) {
                    (Some(n), _) => (api::PrincipalKind::ServiceAccount, n),
                    (None, Some(n)) => (api::PrincipalKind::User, n),
                    (None, None) => {
                        return Err(
                            Usage("pass --serviceaccount NAME or --user NAME".into()).into()
                        );
                    }
                };
                let body = api::RoleBindingCreate {
                    name,
                    role,
                    subject_kind,
                    subject_name,
                };
                ctl::binding_create(&c, body, out).await?
            }
            RoleBindingCommand::List => ctl::binding_list(&c, out).await?,
            RoleBindingCommand::Delete { name } => {
                ctl::delete(&c, api::PATH_ROLE_BINDINGS, &name, "rolebinding delete").await?
            }
        },
    };
    print!("{text}");
    Ok(())
}

async fn enrol(
    token: TokenArgs,
    kind: NodeKind,
    dir: PathBuf,
    relay: Option<(String, Option<u16>)>,
) -> anyhow::Result<()> {
    let join = comsat::node::read_token(token.token, token.token_file.as_deref())
        .map_err(|e| Usage(format!("{e:#}")))?;
    for url in &token.fallback_controllers {
        if !url.starts_with("https://") {
            return Err(Usage(format!(
                "--fallback-controller {url}: expected an https:// URL"
            ))
            .into());
        }
    }
    let done = comsat::node::enrol(
        &join,
        kind,
        &dir,
        relay.as_ref().map(|(addr, _)| addr.as_str()),
        relay.as_ref().and_then(|(_, port)| *port),
        &token.fallback_controllers,
    )
    .await?;
    println!(
        "enrolled {kind} {} (id {}) into {}",
        done.name,
        done.node_id,
        dir.display()
    );
    println!("next: comsat {kind} run --data-dir {}", dir.display());
    Ok(())
}

async fn run_enrolled_relay(
    dir: PathBuf,
    (listen, interactive_listen): (Option<SocketAddr>, Option<SocketAddr>),
    admin: Option<SocketAddr>,
    bulk_nice: Option<u8>,
    drain_grace: Option<std::time::Duration>,
) -> anyhow::Result<()> {
    let state = comsat::node::NodeState::load(&dir, NodeKind::Relay)
        .map_err(|e| Usage(format!("{e:#}")))?;
    let mut config = comsat::node::relay_config(&dir, &state, listen, admin)
        .map_err(|e| Usage(format!("{e:#}")))?;
    if let Some(n) = bulk_nice {
        config.bulk_nice = n;
    }
    if let Some(lane) = interactive_listen {
        if state.interactive_addr.is_none() {
            return Err(Usage(format!(
                "--interactive-listen {lane}: {} was enrolled without --interactive-port, so the \
                 controller tells agents of no interactive listener here; enrol the relay anew \
                 with --interactive-port PORT",
                dir.display()
            ))
            .into());
        }
        config.interactive_listen = Some(lane);
    }
    let grace = drain_grace.unwrap_or(config.drain.grace());
    let prometheus = install_metrics()?;
    let relay = comsat_relay::Relay::bind(config).map_err(|e| Usage(e.to_string()))?;
    tracing::info!(name = %state.name, "relay starting");
    let sync = tokio::spawn(comsat::node::relay_sync(
        dir.clone(),
        state,
        relay.load_probe(),
    ));
    let result = serve_relay(
        relay,
        prometheus,
        admin,
        &dir,
        grace,
        relay_ops::Reload::Certificate,
    )
    .await;
    sync.abort();
    result
}

async fn run_enrolled_agent(
    dir: PathBuf,
    admin: Option<SocketAddr>,
    bulk_nice: Option<u8>,
) -> anyhow::Result<()> {
    let state = comsat::node::NodeState::load(&dir, NodeKind::Agent)
        .map_err(|e| Usage(format!("{e:#}")))?;
    let prometheus = install_metrics()?;
    let mut config = comsat::node::agent_config(&dir, &state);
    config.bulk_nice = bulk_nice;
    let mut agent = comsat_agent::Agent::new(&config).map_err(|e| Usage(e.to_string()))?;
    let admin_shown = serve_admin(
        admin,
        prometheus,
        None,
        agent.readiness(),
        "links not ready\n",
    )
    .await?;
    println!("comsat agent admin {admin_shown}");
    let mut version = 0;
    if let Some(cached) = comsat::node::cached_desired(&dir) {
        comsat::node::apply_desired(&mut agent, &dir, &cached).await;
        version = cached.version;
    }
    println!("comsat agent started");
    tracing::info!(name = %state.name, "agent started");
    tokio::select! {
        () = comsat::node::agent_sync(dir, state, &mut agent, version) => {}
        () = shutdown_signal() => {}
    }
    tracing::info!("agent shutting down");
    agent.stop().await;
    Ok(())
}

async fn serve_admin(
    addr: Option<SocketAddr>,
    prometheus: PrometheusHandle,
    extra: Option<comsat_relay::admin::ExtraMetrics>,
    ready: impl Fn() -> bool + Send + Sync + 'static,
    not_ready: &'static str,
) -> anyhow::Result<String> {
    let Some(addr) = addr else {
        return Ok("none".into());
    };
    let (bound, serve) = comsat_relay::admin::bind(
        addr,
        prometheus,
        extra,
        ready,
        not_ready,
        std::future::pending(),
    )
    .await
    .with_context(|| format!("binding admin address {addr}"))?;
    tokio::spawn(serve);
    Ok(bound.to_string())
}

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    // `up` and `ctl` talk to a person: only warnings unless asked.
    let quiet = matches!(cli.command, Command::Up(_) | Command::Ctl(_));
    init_tracing(cli.log_format, if quiet { "warn" } else { "info" });
    let result = match cli.command {
        Command::Up(args) => runtime().and_then(|rt| rt.block_on(run_up(args))),
        Command::Controller { command } => match command {
            ControllerCommand::Init {
                data_dir,
                public_url,
                tls_cert,
                tls_key,
                tls_ca,
                database,
            } => controller_init(comsat_controller::InitOptions {
                data_dir,
                public_url: Some(public_url),
                tls_cert,
                tls_key,
                tls_ca,
                database,
            }),
            ControllerCommand::Run {
                data_dir,
                listen,
                database,
            } => runtime().and_then(|rt| {
                rt.block_on(run_controller(comsat_controller::RunOptions {
                    data_dir,
                    listen,
                    database,
                }))
            }),
        },
        Command::Ctl(args) => runtime().and_then(|rt| rt.block_on(ctl(args))),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "comsat", &mut script);
            // A closed pipe (`| head`) is not an error worth a message.
            let _ = std::io::Write::write_all(&mut std::io::stdout(), &script);
            Ok(())
        }
        Command::Dev {
            command: DevCommand::Init(args),
        } => dev_init(args),
        Command::Relay { command } => runtime_preferring_lanes().and_then(|rt| {
            rt.block_on(async {
                match command {
                    RelayCommand::Run {
                        data_dir: Some(dir),
                        listen,
                        admin,
                        interactive_listen,
                        bulk_nice,
                        drain_grace,
                        ..
                    } => {
                        let listen = (listen, interactive_listen);
                        run_enrolled_relay(dir, listen, admin, bulk_nice, drain_grace).await
                    }
                    RelayCommand::Run {
                        config,
                        drain_grace,
                        ..
                    } => match config {
                        Some(config) => run_relay(config, drain_grace).await,
                        None => Err(Usage("pass --data-dir DIR or --config FILE".into()).into()),
                    },
                    RelayCommand::Drain {
                        data_dir,
                        config,
                        timeout,
                    } => {
                        let dir = match (data_dir, config) {
                            (Some(dir), _) => dir,
                            (None, Some(config)) => config
                                .parent()
                                .map(std::path::Path::to_path_buf)
                                .unwrap_or_default(),
                            (None, None) => {
                                return Err(
                                    Usage("pass --data-dir DIR or --config FILE".into()).into()
                                );
                            }
                        };
                        let dir = if dir.as_os_str().is_empty() {
                            PathBuf::from(".")
                        } else {
                            dir
                        };
                        tokio::task::spawn_blocking(move || relay_ops::drain(&dir, timeout)).await?
                    }
                    RelayCommand::Enrol {
                        token,
                        data_dir,
                        public_addr,
                        interactive_port,
                    } => {
                        let relay = Some((public_addr, interactive_port));
                        enrol(token, NodeKind::Relay, data_dir, relay).await
                    }
                }
            })
        }),
        Command::Agent { command } => runtime_preferring_lanes().and_then(|rt| {
            rt.block_on(async {
                match command {
                    AgentCommand::Run {
                        data_dir: Some(dir),
                        admin,
                        bulk_nice,
                        ..
                    } => run_enrolled_agent(dir, admin, bulk_nice).await,
                    AgentCommand::Run { config, .. } => match config {
                        Some(config) => run_agent(config).await,
                        None => Err(Usage("pass --data-dir DIR or --config FILE".into()).into()),
                    },
                    AgentCommand::Enrol { token, data_dir } => {
                        enrol(token, NodeKind::Agent, data_dir, None).await
                    }
                }
            })
        }),
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

/// Freed memory that glibc's malloc keeps for reuse, per arena, before it
/// hands any back to the kernel: twice this.
///
/// A bulk flow frees its acknowledged records (up to 64 KiB each, a flow
/// window of them) and QUIC's receive batches in bursts of a few MiB. With
/// glibc's default thresholds (128 KiB) each burst was handed back with
/// `madvise` and, moments later, faulted in again page by page, zeroed: ~50
/// page faults per MiB moved at agent A and ~35 at agent B, some 5 % of their
/// CPU (`comsat-bench`'s "minor page faults per GB" shows it).
const KEEP_FREED: usize = 4 << 20;

/// Raises glibc's trim threshold to 2 × [`KEEP_FREED`] (and its mmap
/// threshold to [`KEEP_FREED`]) without `unsafe`: glibc's thresholds are
/// dynamic by default, and freeing a block that was mapped on its own,
/// larger than the current mmap threshold (and at most 32 MiB), raises the
/// mmap threshold to its size and the trim threshold to twice that
/// (mallopt(3), "M_MMAP_THRESHOLD"). Where an operator set either threshold
/// (`GLIBC_TUNABLES`, `MALLOC_TRIM_THRESHOLD_`), glibc keeps theirs; other C
/// libraries just see one allocation. The cost: after a burst, up to
/// 8 MiB of freed memory per arena stays mapped for the next one.
fn keep_freed_memory() {
    drop(std::hint::black_box(Vec::<u8>::with_capacity(KEEP_FREED)));
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

/// The runtime of a relay or agent process (`comsat relay …`, `comsat
/// agent …`): its worker threads carry bulk, and take the niceness the
/// relay or agent asks for once it has a lane (`bulk_nice`), so that the
/// kernel runs the lane's thread first when it wakes. (`comsat up` runs
/// everything in one process and leaves priorities alone.)
fn runtime_preferring_lanes() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .on_thread_unpark(take_bulk_nice)
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

/// Raises the calling worker thread's niceness to what the relay or agent
/// asks for, once (Linux keeps niceness per thread; raising it needs no
/// privilege, lowering it would, so it only ever goes up).
fn take_bulk_nice() {
    thread_local! {
        static TAKEN: std::cell::Cell<i32> = const { std::cell::Cell::new(0) };
    }
    let want = comsat_relay::bulk_nice().max(comsat_agent::bulk_nice());
    TAKEN.with(|taken| {
        let more = want - taken.get();
        if more <= 0 {
            return;
        }
        taken.set(want);
        // `None`: the calling thread.
        if let Ok(now) = rustix::process::getpriority_process(None) {
            let _ = rustix::process::setpriority_process(None, (now + more).min(19));
        }
    });
}
