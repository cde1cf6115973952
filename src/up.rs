//! `comsat up`: the whole system in one process on loopback — a controller,
//! a relay and two agents, enrolled through the real join-token flow, plus
//! a demo service behind agent B and a demo link that exposes it on agent
//! A. A second `up` on the same data dir reuses everything it enrolled.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use comsat_protocol::api::{self, JoinToken, NodeKind};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::task::JoinSet;

use comsat_node::client::Client;
use comsat_node::{NodeState, ctl};

use comsat_agent::enrolled::FedAgent;

/// What `comsat up` runs.
#[derive(Debug, Clone)]
pub(crate) struct UpOptions {
    /// Where everything lives (`./.comsat` by default).
    pub(crate) data_dir: PathBuf,
    /// The controller's HTTPS port on 127.0.0.1 (first run only: it goes
    /// into the controller's URL).
    pub(crate) controller_port: u16,
    /// The relay's QUIC port on 127.0.0.1 (first run only).
    pub(crate) relay_port: u16,
    /// The relay's interactive listener's port on 127.0.0.1, where links
    /// created with `--connection` go (first run only).
    pub(crate) relay_interactive_port: u16,
    /// Where the demo link listens on agent A.
    pub(crate) demo_listen: SocketAddr,
    /// Start the demo service and link.
    pub(crate) demo: bool,
}

/// The reply of the demo service.
pub(crate) const DEMO_REPLY: &str = "hello from the demo service behind agent-b, through comsat\n";

const RELAY: &str = "relay-1";
const AGENTS: [&str; 2] = ["agent-a", "agent-b"];
const DEMO_LINK: &str = "demo";

/// A future that completes when `rx` says stop.
async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Runs until `shutdown` completes, then stops everything.
pub(crate) async fn up(
    opts: UpOptions,
    prometheus: PrometheusHandle,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let dir = &opts.data_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir
        .canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();

    let (controller_addr, context, admin) =
        start_controller(&dir, &opts, &stop_rx, &mut tasks, &prometheus).await?;

    let (relay_quic, relay_lane) = start_relay(&dir, &opts, &admin, &stop_rx, &mut tasks).await?;

    start_agents(&dir, &admin, &stop_rx, &mut tasks).await?;

    // The demo service and link.
    if opts.demo {
        let sock = dir.join("demo.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = tokio::net::UnixListener::bind(&sock)
            .with_context(|| format!("binding the demo service at {}", sock.display()))?;
        tasks.spawn(demo_service(listener, stop_rx.clone()));
        ensure_demo_link(&admin, &opts.demo_listen, &sock).await?;
        wait_demo(opts.demo_listen).await?;
    }

    print_banner(
        &dir,
        controller_addr,
        (relay_quic, relay_lane),
        &context,
        &opts,
    );
    println!("comsat up ready");

    let status = status_loop(prometheus, stop_rx.clone());
    tokio::pin!(status);
    tokio::select! {
        () = shutdown => {}
        () = &mut status => {}
    }
    eprintln!("comsat up: stopping");
    let _ = stop_tx.send(true);
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(5), drain)
        .await
        .is_err()
    {
        tasks.abort_all();
    }
    while tasks.join_next().await.is_some() {}
    if opts.demo {
        let _ = std::fs::remove_file(dir.join("demo.sock"));
    }
    println!("comsat up stopped");
    Ok(())
}

/// Starts the controller (initialised in `dir/controller` on the first
/// run): its address, its admin context file and a client with it.
async fn start_controller(
    dir: &Path,
    opts: &UpOptions,
    stop_rx: &watch::Receiver<bool>,
    tasks: &mut JoinSet<()>,
    prometheus: &PrometheusHandle,
) -> anyhow::Result<(SocketAddr, PathBuf, Client)> {
    let ctl_dir = dir.join("controller");
    if !ctl_dir.join("controller.toml").exists() {
        eprintln!(
            "comsat up: initialising a controller in {}",
            ctl_dir.display()
        );
        comsat_controller::init(&comsat_controller::InitOptions {
            data_dir: ctl_dir.clone(),
            public_url: Some(format!("https://127.0.0.1:{}", opts.controller_port)),
            ..Default::default()
        })?;
    }
    let render = prometheus.clone();
    let controller = comsat_controller::Controller::bind(comsat_controller::RunOptions {
        data_dir: ctl_dir.clone(),
        listen: None,
        database: None,
        metrics: Some(comsat_controller::MetricsText(std::sync::Arc::new(
            move || render.render(),
        ))),
    })
    .await
    .context("starting the controller")?;
    let controller_addr = controller.local_addr();
    tasks.spawn({
        let rx = stop_rx.clone();
        async move {
            if let Err(e) = controller.run(stopped(rx)).await {
                tracing::error!(error = %e, "controller stopped");
            }
        }
    });
    let context = ctl_dir.join("context.toml");
    let admin = ctl::Target {
        context: Some(context.clone()),
        ..Default::default()
    }
    .client()?;
    Ok((controller_addr, context, admin))
}

/// Starts the relay (enrolled in `dir/relay-1` on the first run) with its
/// grant sync: its QUIC address and its interactive listener's.
async fn start_relay(
    dir: &Path,
    opts: &UpOptions,
    admin: &Client,
    stop_rx: &watch::Receiver<bool>,
    tasks: &mut JoinSet<()>,
) -> anyhow::Result<(SocketAddr, Option<SocketAddr>)> {
    let relay_dir = dir.join(RELAY);
    if !relay_dir.join("node.toml").exists() {
        let token = new_token(admin, NodeKind::Relay, RELAY).await?;
        let addr = format!("127.0.0.1:{}", opts.relay_port);
        let lane = Some(opts.relay_interactive_port);
        let own = Default::default();
        comsat_node::enrol(
            &token,
            NodeKind::Relay,
            &relay_dir,
            Some(&addr),
            lane,
            &own,
            &[],
        )
        .await?;
    }
    let relay_state = NodeState::load(&relay_dir, NodeKind::Relay)?;
    let relay_config = comsat_relay::RelayConfig::enrolled(&relay_dir, &relay_state, None, None)?;
    let relay_listen = SocketAddr::from(([127, 0, 0, 1], relay_config.listen.port()));
    let mut relay_config = relay_config;
    relay_config.listen = relay_listen;
    relay_config.interactive_listen = relay_config
        .interactive_listen
        .map(|a| SocketAddr::from(([127, 0, 0, 1], a.port())));
    let relay = comsat_relay::Relay::bind_fed(relay_config).context("starting the relay")?;
    let relay_quic = relay.local_addr()?;
    let relay_lane = relay.interactive_addr().transpose()?;
    tasks.spawn({
        let sync = comsat_node::relay::RelaySync::start(
            relay_dir.clone(),
            relay_state,
            comsat_relay::enrolled::FedRelay::new(&relay),
        )
        .run();
        let rx = stop_rx.clone();
        async move {
            tokio::select! {
                () = sync => {}
                () = stopped(rx) => {}
            }
        }
    });
    tasks.spawn({
        let rx = stop_rx.clone();
        async move {
            if let Err(e) = relay.run(stopped(rx)).await {
                tracing::error!(error = %e, "relay stopped");
            }
        }
    });
    Ok((relay_quic, relay_lane))
}

/// Lets the agent of `agent_dir` dial the demo service at `sock` as well as
/// the default loopback targets (its consent file, written once: an owner's
/// edit stays).
fn consent_to_demo(agent_dir: &Path, sock: &Path) -> anyhow::Result<()> {
    let path = agent_dir.join(comsat_agent::consent::CONSENT_FILE);
    if path.exists() {
        return Ok(());
    }
    let mut targets: Vec<String> = comsat_agent::consent::DEFAULT
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    targets.push(format!("unix://{}", sock.display()));
    let text = format!(
        "# What this agent will dial for links the controller assigns (see\n\
         # docs/configuration.md, \"Consent at the edge\"). Written by `comsat up`.\n{}",
        comsat_agent::consent::targets_text(&targets)
    );
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
}

/// Starts both agents (enrolled on the first run), each with its sync.
async fn start_agents(
    dir: &Path,
    admin: &Client,
    stop_rx: &watch::Receiver<bool>,
    tasks: &mut JoinSet<()>,
) -> anyhow::Result<()> {
    for name in AGENTS {
        let agent_dir = dir.join(name);
        if !agent_dir.join("node.toml").exists() {
            let token = new_token(admin, NodeKind::Agent, name).await?;
            let own = Default::default();
            comsat_node::enrol(&token, NodeKind::Agent, &agent_dir, None, None, &own, &[]).await?;
        }
        let state = NodeState::load(&agent_dir, NodeKind::Agent)?;
        if name == AGENTS[1] {
            consent_to_demo(&agent_dir, &dir.join("demo.sock"))?;
        }
        let mut agent = comsat_agent::enrolled::agent(&agent_dir, &state, |_| {})?;
        let rx = stop_rx.clone();
        tasks.spawn(async move {
            let mut fed = FedAgent {
                agent: &mut agent,
                announce: comsat_agent::enrolled::announce,
            };
            let applied = fed.apply_cached(&agent_dir).await;
            tokio::select! {
                () = comsat_node::agent::agent_sync(agent_dir, state, fed, applied) => {}
                () = stopped(rx) => {}
            }
            agent.stop().await;
        });
    }
    Ok(())
}

async fn new_token(admin: &Client, kind: NodeKind, name: &str) -> anyhow::Result<JoinToken> {
    let text = ctl::token_create(
        admin,
        kind,
        Some(name.to_owned()),
        Some(Duration::from_secs(600)),
    )
    .await?;
    Ok(JoinToken::parse(&text)?)
}

async fn ensure_demo_link(admin: &Client, listen: &SocketAddr, sock: &Path) -> anyhow::Result<()> {
    let want_listen = format!("tcp://{listen}");
    let want_target = format!("unix://{}", sock.display());
    let links: Vec<api::LinkInfo> = admin.get(api::PATH_LINKS, &[], "link list").await?;
    if let Some(l) = links.iter().find(|l| l.spec.name == DEMO_LINK) {
        if l.spec.listen == want_listen && l.spec.target == want_target {
            return Ok(());
        }
        admin
            .delete(&format!("{}/{DEMO_LINK}", api::PATH_LINKS), "link delete")
            .await?;
    }
    let body = api::LinkSpec {
        name: DEMO_LINK.into(),
        from: AGENTS[0].into(),
        listen: want_listen,
        to: AGENTS[1].into(),
        target: want_target,
        allowed_uids: vec![],
        allowed_gids: vec![],
        allow: vec![],
        proxy_protocol: false,
        max_flows: None,
        rate_limit_bytes_per_sec: None,
        connection: None,
    };
    let _: api::LinkInfo = admin.post(api::PATH_LINKS, &body, "link create").await?;
    Ok(())
}

/// Waits until the demo link answers, showing progress.
async fn wait_demo(listen: SocketAddr) -> anyhow::Result<()> {
    eprint!("comsat up: waiting for the demo link");
    for _ in 0..120 {
        if let Ok(Ok(reply)) = tokio::time::timeout(
            Duration::from_secs(3),
            ask(listen, b"GET / HTTP/1.0\r\n\r\n"),
        )
        .await
            && reply.ends_with(DEMO_REPLY)
        {
            eprintln!(" ok");
            return Ok(());
        }
        eprint!(".");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!();
    bail!(
        "the demo link at {listen} did not answer within a minute; run with COMSAT_LOG=info to see why"
    )
}

/// Sends `req`, half-closes, reads the whole reply.
pub(crate) async fn ask(addr: SocketAddr, req: &[u8]) -> std::io::Result<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(req).await?;
    s.shutdown().await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// A tiny HTTP responder: reads a request head (at most 8 KiB, 5 s) and
/// answers [`DEMO_REPLY`].
async fn demo_service(listener: tokio::net::UnixListener, stop: watch::Receiver<bool>) {
    let serve = async {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                let read = async {
                    while head.len() < 8192 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match sock.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                };
                let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
                let reply = format!(
                    "HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{DEMO_REPLY}",
                    DEMO_REPLY.len()
                );
                let _ = sock.write_all(reply.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    };
    tokio::select! {
        () = serve => {}
        () = stopped(stop) => {}
    }
}

fn print_banner(
    dir: &Path,
    controller: SocketAddr,
    (relay, lane): (SocketAddr, Option<SocketAddr>),
    context: &Path,
    opts: &UpOptions,
) {
    let d = dir.display();
    println!();
    println!("comsat is up — everything on loopback, state in {d}");
    println!("  controller  https://{controller}");
    println!(
        "  console     https://{controller}/ui (sign in with {d}/controller/admin.token; \
         the browser warns until it trusts {d}/controller/ca.pem)"
    );
    match lane {
        Some(lane) => {
            println!("  relay       {RELAY}, QUIC on {relay}, interactive listener on {lane}")
        }
        None => println!("  relay       {RELAY}, QUIC on {relay}"),
    }
    println!("  agents      {} and {}", AGENTS[0], AGENTS[1]);
    if opts.demo {
        println!(
            "  demo link   {DEMO_LINK}: tcp://{} on {}  ->  relay  ->  {}  ->  demo service",
            opts.demo_listen, AGENTS[0], AGENTS[1]
        );
        println!();
        println!("try:");
        println!("  curl http://{}/", opts.demo_listen);
    } else {
        println!();
        println!("try:");
    }
    println!("  export COMSAT_CONTEXT={}", context.display());
    println!("  comsat ctl link list");
    println!(
        "  comsat ctl link create web --from {} --listen tcp://127.0.0.1:7001 --to {} --target tcp://127.0.0.1:8080",
        AGENTS[0], AGENTS[1]
    );
    if lane.is_some() {
        println!(
            "    (add --connection interactive: its own QUIC connection and threads, for round trips beside bulk)"
        );
    }
    println!("Ctrl-C stops everything; `comsat up` again reuses {d}.");
    println!();
}

/// The value of a metric series in Prometheus text, summed over labels.
fn sum_metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Prints a status line whenever links, flows, bytes or resumes change.
async fn status_loop(prometheus: PrometheusHandle, stop: watch::Receiver<bool>) {
    let mut last = String::new();
    let tick = async {
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let text = prometheus.render();
            let line = format!(
                "status: link ends ready {}  flows open {}  bytes sent {}  flows resumed {}",
                sum_metric(&text, "comsat_agent_links_ready"),
                sum_metric(&text, "comsat_agent_flows_open"),
                sum_metric(&text, "comsat_agent_sent_bytes_total"),
                sum_metric(&text, "comsat_agent_flows_resumed_total"),
            );
            if line != last {
                println!("{line}");
                last = line;
            }
        }
    };
    tokio::select! {
        () = tick => {}
        () = stopped(stop) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_summed_over_labels_by_exact_name() {
        let text =
            "# HELP x\nfoo_total{a=\"1\"} 2\nfoo_total{a=\"2\"} 3\nfoo_total_other 100\nfoo 1\n";
        assert_eq!(sum_metric(text, "foo_total"), 5.0);
        assert_eq!(sum_metric(text, "foo"), 1.0);
    }
}
