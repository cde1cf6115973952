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
use comsat_relay::ops as relay_ops;
use metrics_exporter_prometheus::PrometheusHandle;

mod cli;
mod up;

use cli::{
    AgentCommand, AuditCommand, Cli, Command, ControllerCommand, CtlArgs, CtlCommand, DevCommand,
    DevInit, LinkCommand, ListCommand, LogFormat, NodeRunArgs, OutputFormat, PrincipalCommand,
    RelayCommand, RoleBindingCommand, RoleCommand, TokenArgs, TokenCommand, UpArgs,
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
        vec![comsat_controller::dev::DevLink {
            name: "demo".into(),
            listen: "tcp://127.0.0.1:7000".into(),
            target: "tcp://127.0.0.1:9000".into(),
            allowed_uids: vec![],
        }]
    } else {
        args.links
    };
    let layout = comsat_controller::dev::init(
        &args.dir,
        &comsat_controller::dev::DevOptions {
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
    let opts = up::UpOptions {
        data_dir: args.data_dir,
        controller_port: args.controller_port,
        relay_port: args.relay_port,
        relay_interactive_port: args.relay_interactive_port,
        demo_listen: args.demo_listen,
        demo: !args.no_demo,
    };
    up::up(opts, prometheus, shutdown_signal()).await
}

async fn run_controller(mut opts: comsat_controller::RunOptions) -> anyhow::Result<()> {
    let prometheus = install_metrics()?;
    let render = std::sync::Arc::new(move || prometheus.render());
    opts.metrics = Some(comsat_controller::MetricsText(render));
    let controller = comsat_controller::Controller::bind(opts)
        .await
        .map_err(|e| Usage(e.to_string()))?;
    let addr = controller.local_addr();
    println!("comsat controller listening https://{addr}");
    controller.run(shutdown_signal()).await?;
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
    relay: Option<(String, Option<u16>)>,
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
    let state =
        comsat_node::NodeState::load(&dir, NodeKind::Relay).map_err(|e| Usage(format!("{e:#}")))?;
    let mut config = comsat_relay::RelayConfig::enrolled(&dir, &state, listen, admin)
        .map_err(|e| Usage(e.to_string()))?;
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
    let relay = comsat_relay::Relay::bind_fed(config).map_err(|e| Usage(e.to_string()))?;
    tracing::info!(name = %state.name, "relay starting");
    let sync = comsat_node::relay::RelaySync::start(
        dir.clone(),
        state,
        comsat_relay::enrolled::FedRelay::new(&relay),
    );
    let sync = tokio::spawn(sync.run());
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
        announce,
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

/// Prints what applying a desired state did, in the machine-readable
/// lines the tests and scripts read.
pub(crate) fn announce(applied: &comsat_agent::Applied) {
    for (name, addr) in &applied.listening {
        println!("comsat agent link {name} listening {addr}");
    }
    for name in &applied.removed {
        println!("comsat agent link {name} removed");
    }
    for (name, _) in &applied.failed {
        println!("comsat agent link {name} failed");
    }
    for (name, _) in &applied.refused {
        println!("comsat agent link {name} refused");
    }
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
        Command::Controller { command } => controller(command),
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
        Command::Relay { command } => {
            runtime_preferring_lanes().and_then(|rt| rt.block_on(relay(command)))
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

/// `comsat controller ...`.
fn controller(command: ControllerCommand) -> anyhow::Result<()> {
    match command {
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
                metrics: None,
            }))
        }),
    }
}

/// `comsat relay ...`.
async fn relay(command: RelayCommand) -> anyhow::Result<()> {
    match command {
        RelayCommand::Run {
            node:
                NodeRunArgs {
                    data_dir: Some(dir),
                    admin,
                    bulk_nice,
                },
            listen,
            interactive_listen,
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
                    return Err(Usage("pass --data-dir DIR or --config FILE".into()).into());
                }
            };
            let dir = if dir.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                dir
            };
            tokio::task::spawn_blocking(move || relay_ops::drain(&dir, timeout))
                .await?
                .map_err(Into::into)
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
