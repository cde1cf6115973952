//! The `comsat` binary: clap dispatch, logging and metrics setup, then the
//! component's `run`.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 bad usage or configuration.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use comsat_agent::enrolled::FedAgent;
use comsat_protocol::api::{self, NodeKind};
use metrics_exporter_prometheus::PrometheusHandle;

mod cli;
#[cfg(feature = "server")]
mod server;
#[cfg(feature = "server")]
mod up;

use cli::{
    AgentCommand, Cli, Command, CtlArgs, CtlCommand, LinkCommand, ListCommand, LogFormat,
    NodeRunArgs, OutputFormat, PrincipalCommand, RoleBindingCommand, RoleCommand, TokenArgs,
    TokenCommand,
};

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

/// Installs the process's Prometheus recorder, with `comsat_build_info`.
fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&[0.001, 0.005, 0.025, 0.1, 0.5, 2.5, 10.0, 60.0])
        .context("histogram buckets")?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).context("installing the metrics recorder")?;
    metrics::describe_gauge!("comsat_build_info", "1, labelled with the build");
    let (version, commit) = (env!("CARGO_PKG_VERSION"), env!("COMSAT_COMMIT"));
    metrics::gauge!("comsat_build_info", "version" => version, "commit" => commit).set(1.0);
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

async fn principal(
    c: &comsat_node::client::Client,
    kind: api::PrincipalKind,
    command: PrincipalCommand,
    out: comsat_node::ctl::Output,
) -> anyhow::Result<String> {
    use comsat_node::ctl;
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
    use comsat_node::ctl;
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
        CtlCommand::Link { command } => link(&c, command, out).await?,
        CtlCommand::Status => ctl::status(&c, out).await?,
        CtlCommand::Audit { command } => ctl::log::audit(&c, command, out).await?,
        CtlCommand::Flows(a) => ctl::log::flows(&c, a, out).await?,
        CtlCommand::Bundle(command) => ctl::bundle::bundle(&c, command, out).await?,
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
        CtlCommand::Apply { file } => comsat_node::apply::apply(&c, &file).await?,
        CtlCommand::Get { kind, name } => {
            comsat_node::apply::get(&c, &kind, &name, matches!(out, ctl::Output::Json)).await?
        }
        CtlCommand::RoleBinding { command } => role_binding(&c, command, out).await?,
    };
    print!("{text}");
    Ok(())
}

/// `comsat ctl link ...`.
async fn link(
    c: &comsat_node::client::Client,
    command: LinkCommand,
    out: comsat_node::ctl::Output,
) -> anyhow::Result<String> {
    use comsat_node::ctl;
    Ok(match command {
        LinkCommand::Create(args) => ctl::link_create(c, args.into(), out).await?,
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
            ctl::link_update(c, &name, update, out).await?
        }
        LinkCommand::List => ctl::link_list(c, out).await?,
        LinkCommand::Show { name } => ctl::link_show(c, &name, out).await?,
        LinkCommand::Delete { name } => ctl::link_delete(c, &name).await?,
    })
}

/// `comsat ctl rolebinding ...`.
async fn role_binding(
    c: &comsat_node::client::Client,
    command: RoleBindingCommand,
    out: comsat_node::ctl::Output,
) -> anyhow::Result<String> {
    use comsat_node::ctl;
    Ok(match command {
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
                    return Err(Usage("pass --serviceaccount NAME or --user NAME".into()).into());
                }
            };
            let body = api::RoleBindingCreate {
                name,
                role,
                subject_kind,
                subject_name,
            };
            ctl::binding_create(c, body, out).await?
        }
        RoleBindingCommand::List => ctl::binding_list(c, out).await?,
        RoleBindingCommand::Delete { name } => {
            ctl::delete(c, api::PATH_ROLE_BINDINGS, &name, "rolebinding delete").await?
        }
    })
}

async fn enrol(
    token: TokenArgs,
    kind: NodeKind,
    dir: PathBuf,
    relay: Option<(String, Option<u16>, comsat_node::state::OwnCert)>,
) -> anyhow::Result<()> {
    let join = comsat_node::read_token(token.token, token.token_file.as_deref())
        .map_err(|e| Usage(format!("{e:#}")))?;
    for url in &token.fallback_controllers {
        if !url.starts_with("https://") {
            return Err(Usage(format!(
                "--fallback-controller {url}: expected an https:// URL"
            ))
            .into());
        }
    }
    let done = comsat_node::enrol(
        &join,
        kind,
        &dir,
        relay.as_ref().map(|(addr, ..)| addr.as_str()),
        relay.as_ref().and_then(|(_, port, _)| *port),
        &relay.as_ref().map(|r| r.2.clone()).unwrap_or_default(),
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

async fn run_enrolled_agent(
    dir: PathBuf,
    admin: Option<SocketAddr>,
    bulk_nice: Option<u8>,
    tuning: &cli::AgentTuning,
) -> anyhow::Result<()> {
    let state =
        comsat_node::NodeState::load(&dir, NodeKind::Agent).map_err(|e| Usage(format!("{e:#}")))?;
    let prometheus = install_metrics()?;
    let mut agent = comsat_agent::enrolled::agent(&dir, &state, |c| {
        c.bulk_nice = bulk_nice;
        tuning.apply(c);
    })
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
    let mut fed = FedAgent {
        agent: &mut agent,
        announce: comsat_agent::enrolled::announce,
    };
    let applied = fed.apply_cached(&dir).await;
    println!("comsat agent started");
    tracing::info!(name = %state.name, "agent started");
    tokio::select! {
        () = comsat_node::agent::agent_sync(dir, state, fed, applied) => {}
        () = shutdown_signal() => {}
    }
    tracing::info!("agent shutting down");
    agent.stop().await;
    Ok(())
}

async fn serve_admin(
    addr: Option<SocketAddr>,
    prometheus: PrometheusHandle,
    extra: Option<comsat_node::admin::ExtraMetrics>,
    ready: impl Fn() -> bool + Send + Sync + 'static,
    not_ready: &'static str,
) -> anyhow::Result<String> {
    let Some(addr) = addr else {
        return Ok("none".into());
    };
    let (bound, serve) = comsat_node::admin::bind(
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
    comsat_node::keep_freed_memory();
    let cli = Cli::parse();
    // `up` and `ctl` talk to a person: only warnings unless asked.
    init_tracing(
        cli.log_format,
        if cli.command.quiet() { "warn" } else { "info" },
    );
    let result = match cli.command {
        #[cfg(feature = "server")]
        Command::Up(args) => runtime().and_then(|rt| rt.block_on(server::run_up(args))),
        #[cfg(feature = "server")]
        Command::Controller { command } => server::controller(command),
        Command::Ctl(args) => runtime().and_then(|rt| rt.block_on(ctl(*args))),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "comsat", &mut script);
            // A closed pipe (`| head`) is not an error worth a message.
            let _ = std::io::Write::write_all(&mut std::io::stdout(), &script);
            Ok(())
        }
        #[cfg(feature = "server")]
        Command::Dev {
            command: cli::DevCommand::Init(args),
        } => server::dev_init(args),
        #[cfg(feature = "server")]
        Command::Relay { command } => {
            runtime_preferring_lanes().and_then(|rt| rt.block_on(server::relay(command)))
        }
        Command::Agent { command } => {
            runtime_preferring_lanes().and_then(|rt| rt.block_on(agent(command)))
        }
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

/// `comsat agent ...`.
async fn agent(command: AgentCommand) -> anyhow::Result<()> {
    match command {
        AgentCommand::Run {
            node:
                NodeRunArgs {
                    data_dir: Some(dir),
                    admin,
                    bulk_nice,
                },
            tuning,
            ..
        } => run_enrolled_agent(dir, admin, bulk_nice, &tuning).await,
        AgentCommand::Run { config, .. } => match config {
            Some(config) => run_agent(config).await,
            None => Err(Usage("pass --data-dir DIR or --config FILE".into()).into()),
        },
        AgentCommand::Enrol { token, data_dir } => {
            enrol(token, NodeKind::Agent, data_dir, None).await
        }
    }
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

#[cfg(feature = "server")]
use comsat_relay::bulk_nice as server_bulk_nice;
/// An agent-only build runs no relay, which asks for none.
#[cfg(not(feature = "server"))]
fn server_bulk_nice() -> i32 {
    0
}

/// Raises the calling worker thread's niceness to what the relay or agent
/// asks for, once (Linux keeps niceness per thread; raising it needs no
/// privilege, lowering it would, so it only ever goes up).
fn take_bulk_nice() {
    thread_local! {
        static TAKEN: std::cell::Cell<i32> = const { std::cell::Cell::new(0) };
    }
    let want = server_bulk_nice().max(comsat_agent::bulk_nice());
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
