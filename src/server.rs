//! The relay's and the controller's commands, and `up` and `dev`: what
//! an agent-only build (`--no-default-features`) leaves out.

use std::net::SocketAddr;
use std::path::PathBuf;

use comsat_protocol::api::NodeKind;
use comsat_relay::ops as relay_ops;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::cli::{ControllerCommand, DevInit, NodeRunArgs, RelayCommand, UpArgs};
use crate::{Usage, enrol, install_metrics, runtime, serve_admin, shutdown_signal, up};

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
    let extra: comsat_node::admin::ExtraMetrics = std::sync::Arc::new(relay.link_metrics());
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

pub(crate) fn dev_init(args: DevInit) -> anyhow::Result<()> {
    let links = if args.links.is_empty() {
        vec![comsat_controller::dev::DevLink {
            name: "demo".into(),
            listen: "tcp://127.0.0.1:7000".into(),
            target: "tcp://127.0.0.1:9000".into(),
            allowed_uids: vec![],
            allow: vec![],
            proxy_protocol: false,
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
    print!("{report}");
    Ok(())
}

pub(crate) async fn run_up(args: UpArgs) -> anyhow::Result<()> {
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

/// `comsat controller ...`.
pub(crate) fn controller(command: ControllerCommand) -> anyhow::Result<()> {
    match command {
        ControllerCommand::Init {
            data_dir,
            public_url,
            tls_cert,
            tls_key,
            tls_ca,
            trust_domain,
            upstream_ca,
            database,
        } => controller_init(comsat_controller::InitOptions {
            data_dir,
            public_url: Some(public_url),
            tls_cert,
            tls_key,
            tls_ca,
            trust_domain,
            upstream_ca,
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
pub(crate) async fn relay(command: RelayCommand) -> anyhow::Result<()> {
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
            own_cert,
        } => {
            let relay = Some((public_addr, interactive_port, own_cert));
            enrol(token, NodeKind::Relay, data_dir, relay).await
        }
    }
}
