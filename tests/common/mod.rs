//! Starting a whole local system (relay + two agents as real processes)
//! from a `comsat dev init` layout.

#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use comsat_controller::dev::{DevLayout, DevLink, DevOptions};
use comsat_tests::{Proc, free_udp_port};

pub const BIN: &str = env!("CARGO_BIN_EXE_comsat");
pub const START_TIMEOUT: Duration = comsat_tests::proc::START_TIMEOUT;
/// The per-link relay buffer that `comsat dev init` grants.
pub const BUFFER_LIMIT: u64 = comsat_controller::dev::BUFFER_LIMIT;

/// Held by a test that moves a lot through its own processes, so the
/// heavy tests of one test binary run one at a time: on a 2-core machine a
/// dozen of them at once (three processes each) starve each other for
/// seconds, and the tests time what the code does, not the machine.
pub async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    HEAVY.lock().await
}

pub struct System {
    pub dir: tempfile::TempDir,
    pub layout: DevLayout,
    pub relay: Proc,
    pub relay_quic: SocketAddr,
    pub relay_admin: SocketAddr,
    /// Backup relays: (process, admin address).
    pub backups: Vec<(Proc, SocketAddr)>,
    pub agents: Vec<(Proc, SocketAddr)>,
}

pub struct Options {
    pub links: Vec<DevLink>,
    pub tap: bool,
    /// Agents pin the relay certificate by SHA-256 instead of by CA.
    pub pin_sha256: bool,
    /// Appended to the relay config (after every top-level key).
    pub relay_extra: String,
    /// Backup relays to start besides the first.
    pub extra_relays: usize,
}

pub fn start_relay(
    config: &Path,
    logs: &Path,
    name: &str,
) -> Result<(Proc, SocketAddr, SocketAddr)> {
    comsat_tests::proc::start_relay(BIN, config, logs, name)
}

pub fn start_agent(config: &Path, logs: &Path, name: &str) -> Result<(Proc, SocketAddr)> {
    comsat_tests::proc::start_agent(BIN, config, logs, name)
}

/// A `comsat dev init` layout under `dir/setup` for `opts` (its links,
/// pinning and backup relays), every node on loopback with an admin
/// endpoint (the agents' only when `agent_admin`).
pub fn dev_layout(dir: &Path, opts: &Options, agent_admin: bool) -> Result<DevLayout> {
    let any: SocketAddr = "127.0.0.1:0".parse()?;
    let agent = agent_admin.then_some(any);
    Ok(comsat_controller::dev::init(
        &dir.join("setup"),
        &DevOptions {
            relay_listen: format!("127.0.0.1:{}", free_udp_port()?).parse()?,
            relay_admin: Some(any),
            agent_admin: [agent, agent],
            links: opts.links.clone(),
            pin_sha256: opts.pin_sha256,
            extra_relays: (0..opts.extra_relays)
                .map(|_| {
                    Ok((
                        format!("127.0.0.1:{}", free_udp_port()?).parse()?,
                        Some(any),
                    ))
                })
                .collect::<Result<_>>()?,
        },
    )?)
}

impl Options {
    /// One link, no tap, CA pinning, one relay.
    pub fn one(link: DevLink) -> Self {
        Self {
            links: vec![link],
            tap: false,
            pin_sha256: false,
            relay_extra: String::new(),
            extra_relays: 0,
        }
    }
}

impl System {
    pub fn start(opts: Options) -> Result<Self> {
        Self::start_with(opts, |_, t| t)
    }

    /// Like [`Self::start`], editing the agent configs with `edit` first
    /// (called with 0 for agent A, 1 for agent B).
    pub fn start_with(opts: Options, edit: impl Fn(usize, String) -> String) -> Result<Self> {
        Self::start_prepared(opts, |layout| {
            for (i, config) in [&layout.agent_a.config, &layout.agent_b.config]
                .into_iter()
                .enumerate()
            {
                let text = std::fs::read_to_string(config)?;
                std::fs::write(config, edit(i, text))?;
            }
            Ok(())
        })
    }

    /// Like [`Self::start`], letting `prepare` change the layout's files
    /// (after `relay_extra` is applied) before anything starts.
    pub fn start_prepared(
        opts: Options,
        prepare: impl FnOnce(&DevLayout) -> Result<()>,
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let layout = dev_layout(dir.path(), &opts, true)?;
        let mut relay_text = std::fs::read_to_string(&layout.relay_config)?;
        if opts.tap {
            relay_text.push_str("dangerous_tap_file = \"tap.bin\"\n");
        }
        relay_text.push_str(&opts.relay_extra);
        std::fs::write(&layout.relay_config, relay_text)?;
        prepare(&layout)?;
        let logs = dir.path().to_owned();
        let (relay, relay_quic, relay_admin) = start_relay(&layout.relay_config, &logs, "relay")?;
        let mut backups = Vec::new();
        for (n, r) in layout.relays.iter().enumerate().skip(1) {
            let mut text = std::fs::read_to_string(&r.config)?;
            text.push_str(&opts.relay_extra);
            std::fs::write(&r.config, text)?;
            let (p, _, admin) = start_relay(&r.config, &logs, &format!("relay-{}", n + 1))?;
            backups.push((p, admin));
        }
        let a = start_agent(&layout.agent_a.config, &logs, "agent-a")?;
        let b = start_agent(&layout.agent_b.config, &logs, "agent-b")?;
        Ok(Self {
            dir,
            layout,
            relay,
            relay_quic,
            relay_admin,
            backups,
            agents: vec![a, b],
        })
    }

    pub fn logs(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    /// The address agent A printed for link `name`.
    pub fn listen_addr(&mut self, name: &str) -> Result<String> {
        let line = self.agents[0].0.wait_line(
            &format!("comsat agent link {name} listening "),
            START_TIMEOUT,
        )?;
        Ok(line.rsplit(' ').next().context("listen line")?.to_owned())
    }

    /// The TCP address agent A printed for link `name` (a `tcp://` listener).
    pub fn tcp_listen_addr(&mut self, name: &str) -> Result<SocketAddr> {
        let addr = self.listen_addr(name)?;
        let addr = addr
            .strip_prefix("tcp://")
            .with_context(|| format!("link {name} listens on {addr}, not tcp://"))?;
        Ok(addr.parse()?)
    }

    /// Waits until both agents report every link ready.
    pub fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        for (_, admin) in &self.agents {
            loop {
                if let Ok((200, _)) = comsat_tests::proc::http_get(*admin, "/readyz") {
                    break;
                }
                if Instant::now() > deadline {
                    let tails: Vec<String> =
                        self.agents.iter().map(|(p, _)| p.log_tail()).collect();
                    bail!(
                        "agents not ready within {START_TIMEOUT:?}; logs:\n{}\nrelay:\n{}",
                        tails.join("\n----\n"),
                        self.relay.log_tail()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }
}
