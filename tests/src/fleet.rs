//! The shared fixture of the controller's end-to-end tests: a [`Fleet`]
//! of real `comsat` processes on loopback (a controller from `controller
//! init/run`, relays and agents enrolled with join tokens from `ctl token
//! create`), and the helpers the tests drive it with (`ctl`, hash servers,
//! round trips, hand-made JWTs). The bench measures on it too.
//!
//! The `comsat` binary it runs is [`bin`]: the one Cargo built beside the
//! test or bench executable.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::netns::{NatTopology, PUBLIC_ADDR};
use crate::{Proc, free_udp_port};
use anyhow::{Context, Result, ensure};
use comsat_node::NodeState;
use comsat_node::keys::KeyFile;
use comsat_protocol::api::{self, NodeKind};
use comsat_protocol::{SigningKey, jwt};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const START: Duration = crate::proc::START_TIMEOUT;

static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The `comsat` binary of this build: the one [`use_bin`] chose, else
/// `COMSAT_BIN` if set, else `comsat` in the directory of the running
/// executable (a bench's), or in the one above (an integration test's, in
/// `deps/`).
pub fn bin() -> &'static str {
    BIN.get_or_init(|| {
        if let Ok(b) = std::env::var("COMSAT_BIN") {
            return b;
        }
        let exe = std::env::current_exe().unwrap_or_default();
        let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
        if dir.ends_with("deps") {
            dir.pop();
        }
        dir.join("comsat").to_string_lossy().into_owned()
    })
}

/// Makes `path` the binary [`bin`] names, before anything has asked for
/// it (the bench's `--comsat PATH`); false if it was too late.
pub fn use_bin(path: &Path) -> bool {
    BIN.set(path.to_string_lossy().into_owned()).is_ok()
}

/// How long a change made with `ctl` may take to reach the agents.
pub const CONVERGE: Duration = Duration::from_secs(20);
/// `--bulk-nice` of the relays and agents the tests run (not the default 5).
pub const BULK_NICE: &str = "7";

/// Runs `comsat ARGS` to completion: (exit code, stdout, stderr).
pub fn comsat(args: &[&str]) -> Result<(i32, String, String)> {
    comsat_in(None, args)
}

/// `comsat` as a command, inside network namespace `ns` if given.
fn command_in(ns: Option<&str>) -> Command {
    ns.map_or_else(|| Command::new(bin()), |ns| NatTopology::command(ns, bin()))
}

/// [`comsat`] inside network namespace `ns` if given.
pub fn comsat_in(ns: Option<&str>, args: &[&str]) -> Result<(i32, String, String)> {
    let out = command_in(ns)
        .args(args)
        .env("COMSAT_LOG", "warn")
        .env_remove("COMSAT_CONTEXT")
        .output()
        .with_context(|| format!("running comsat {args:?}"))?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Like [`comsat`], failing unless it exits 0; returns stdout.
pub fn ok(args: &[&str]) -> Result<String> {
    ok_in(None, args)
}

/// [`ok`] inside network namespace `ns` if given.
pub fn ok_in(ns: Option<&str>, args: &[&str]) -> Result<String> {
    let (code, out, err) = comsat_in(ns, args)?;
    ensure!(code == 0, "comsat {args:?} exited {code}:\n{out}\n{err}");
    Ok(out)
}

pub fn free_tcp_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Where a fleet runs: all on loopback, or its controller and relays in
/// the public namespace of a [`NatTopology`] and each agent behind a NAT
/// of its own.
#[derive(Clone, Debug)]
pub struct Net {
    /// The namespace of the controller and the relays (`None`: this one).
    pub public: Option<String>,
    /// The address they listen on.
    pub host: Ipv4Addr,
    /// Agents' namespaces, by agent name.
    pub edges: Vec<(String, String)>,
}

impl Default for Net {
    fn default() -> Self {
        Self {
            public: None,
            host: Ipv4Addr::LOCALHOST,
            edges: Vec::new(),
        }
    }
}

impl Net {
    /// Agents `names` behind `topology`'s edges, in order.
    pub fn nat(topology: &NatTopology, names: &[&str]) -> Self {
        Self {
            public: Some(topology.public().to_owned()),
            host: PUBLIC_ADDR,
            edges: names
                .iter()
                .zip(topology.edges())
                .map(|(n, e)| ((*n).to_owned(), e.ns.clone()))
                .collect(),
        }
    }

    /// The namespace of agent `name` (`None`: this one).
    pub fn agent_ns(&self, name: &str) -> Option<&str> {
        self.edges
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, ns)| ns.as_str())
    }
}

pub struct Fleet {
    pub dir: tempfile::TempDir,
    /// A PostgreSQL database instead of the SQLite file.
    pub database: Option<String>,
    /// `--fallback-controller` given to enrolments.
    pub fallback: Option<String>,
    pub controller: Option<Proc>,
    pub relays: Vec<(String, Proc, SocketAddr, SocketAddr)>,
    pub agents: Vec<(String, Proc, SocketAddr)>,
    pub net: Net,
    /// More `agent run` arguments.
    pub agent_args: Vec<String>,
}

impl Fleet {
    /// Initialises a controller (with `edit` applied to its
    /// controller.toml) and runs it.
    pub fn start(edit: impl FnOnce(String) -> String) -> Result<Self> {
        Self::start_with(edit, |_| Ok(Vec::new()))
    }

    /// Like [`Self::start`], with more `controller init` arguments made
    /// from the temporary directory.
    pub fn start_with(
        edit: impl FnOnce(String) -> String,
        init_args: impl FnOnce(&Path) -> Result<Vec<String>>,
    ) -> Result<Self> {
        Self::start_on(None, edit, init_args)
    }

    /// Like [`Self::start_with`], on `database` (PostgreSQL) if given.
    pub fn start_on(
        database: Option<String>,
        edit: impl FnOnce(String) -> String,
        init_args: impl FnOnce(&Path) -> Result<Vec<String>>,
    ) -> Result<Self> {
        Self::start_in(Net::default(), database, edit, init_args)
    }

    /// Like [`Self::start_on`], placed as `net` says.
    pub fn start_in(
        net: Net,
        database: Option<String>,
        edit: impl FnOnce(String) -> String,
        init_args: impl FnOnce(&Path) -> Result<Vec<String>>,
    ) -> Result<Self> {
        let mut c = Self::init_in(net, database, edit, init_args)?;
        c.run_controller()?;
        Ok(c)
    }

    /// Like [`Self::start_in`], without running the controller.
    pub fn init_in(
        net: Net,
        database: Option<String>,
        edit: impl FnOnce(String) -> String,
        init_args: impl FnOnce(&Path) -> Result<Vec<String>>,
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = free_tcp_port()?;
        let ctl_dir = dir.path().join("controller");
        let mut extra = init_args(dir.path())?;
        if let Some(url) = &database {
            extra.extend(["--database".to_owned(), url.clone()]);
        }
        let mut args = vec![
            "controller".to_owned(),
            "init".to_owned(),
            "--data-dir".to_owned(),
            s(&ctl_dir),
            "--public-url".to_owned(),
            format!("https://{}:{port}", net.host),
        ];
        args.extend(extra);
        ok_in(
            net.public.as_deref(),
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        )?;
        let toml = ctl_dir.join("controller.toml");
        let text = std::fs::read_to_string(&toml)?;
        std::fs::write(&toml, edit(text))?;
        Ok(Self {
            dir,
            database,
            fallback: None,
            controller: None,
            relays: Vec::new(),
            agents: Vec::new(),
            net,
            agent_args: Vec::new(),
        })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts `comsat ARGS` as process `name`, in namespace `ns` if given.
    fn spawn_in(&self, ns: Option<&str>, name: &str, args: &[&str]) -> Result<Proc> {
        match ns {
            None => Proc::spawn(bin(), name, args, self.dir.path()),
            Some(ns) => {
                let mut all = vec!["netns", "exec", ns, bin()];
                all.extend_from_slice(args);
                Proc::spawn("ip", name, &all, self.dir.path())
            }
        }
    }

    pub fn run_controller(&mut self) -> Result<()> {
        let p = self.spawn_controller("controller", "controller", None)?;
        self.controller = Some(p);
        Ok(())
    }

    /// Runs `controller run` on data dir `dir`, named `name`.
    pub fn spawn_controller(&self, dir: &str, name: &str, listen: Option<u16>) -> Result<Proc> {
        let data_dir = s(&self.path(dir));
        let mut args = vec!["controller", "run", "--data-dir", &data_dir];
        let listen = listen.map(|p| format!("{}:{p}", self.net.host));
        if let Some(l) = &listen {
            args.extend(["--listen", l]);
        }
        if let Some(url) = &self.database {
            args.extend(["--database", url]);
        }
        let mut p = self.spawn_in(self.net.public.as_deref(), name, &args)?;
        p.wait_line("comsat controller listening", START)?;
        Ok(p)
    }

    /// A second controller on the same database, from a copy of the
    /// first one's data dir, listening on `port`.
    pub fn second_controller(&self, port: u16) -> Result<Proc> {
        let from = self.path("controller");
        let to = self.path("controller-2");
        std::fs::create_dir_all(&to)?;
        for entry in std::fs::read_dir(&from)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                std::fs::copy(entry.path(), to.join(entry.file_name()))?;
            }
        }
        self.spawn_controller("controller-2", "controller-2", Some(port))
    }

    /// `comsat ctl` against the controller at `url` with the admin token.
    pub fn ctl_at(&self, url: &str, args: &[&str]) -> Result<String> {
        let token = s(&self.path("controller/admin.token"));
        let ca = s(&self.path("controller/ca.pem"));
        let mut all = vec![
            "ctl",
            "--controller",
            url,
            "--token-file",
            &token,
            "--ca",
            &ca,
        ];
        all.extend_from_slice(args);
        let (code, out, err) = comsat_in(self.net.public.as_deref(), &all)?;
        ensure!(
            code == 0,
            "ctl {args:?} at {url} exited {code}:\n{out}\n{err}"
        );
        Ok(out)
    }

    pub fn ctl(&self, args: &[&str]) -> Result<(i32, String, String)> {
        let ctx = s(&self.path("controller/context.toml"));
        let mut all = vec!["ctl", "--context", &ctx];
        all.extend_from_slice(args);
        comsat_in(self.net.public.as_deref(), &all)
    }

    pub fn ctl_ok(&self, args: &[&str]) -> Result<String> {
        let (code, out, err) = self.ctl(args)?;
        ensure!(code == 0, "ctl {args:?} exited {code}:\n{out}\n{err}");
        Ok(out)
    }

    /// A join token in a file.
    pub fn token(&self, kind: &str, name: &str, extra: &[&str]) -> Result<PathBuf> {
        let mut args = vec!["token", "create", "--kind", kind, "--name", name];
        args.extend_from_slice(extra);
        let token = self.ctl_ok(&args)?;
        ensure!(
            token.trim().lines().count() == 1,
            "token create printed more than the token: {token}"
        );
        let file = self.path(&format!("{name}.{kind}.token"));
        std::fs::write(&file, token)?;
        Ok(file)
    }

    pub fn enrol_relay(&mut self, name: &str) -> Result<()> {
        self.enrol_relay_only(name)?;
        self.run_relay(name)
    }

    pub fn enrol_relay_only(&mut self, name: &str) -> Result<()> {
        self.enrol_relay_only_with(name, &[])
    }

    /// Enrols relay `name` with more `relay enrol` arguments.
    pub fn enrol_relay_only_with(&mut self, name: &str, extra: &[&str]) -> Result<()> {
        let token = self.token("relay", name, &[])?;
        let port = free_udp_port()?;
        let dir = self.path(name);
        let (token, dir, addr) = (s(&token), s(&dir), format!("{}:{port}", self.net.host));
        let mut args = vec![
            "relay",
            "enrol",
            "--token-file",
            &token,
            "--data-dir",
            &dir,
            "--public-addr",
            &addr,
        ];
        if let Some(f) = &self.fallback {
            args.extend(["--fallback-controller", f]);
        }
        args.extend_from_slice(extra);
        ok_in(self.net.public.as_deref(), &args)?;
        Ok(())
    }

    pub fn run_relay(&mut self, name: &str) -> Result<()> {
        let dir = self.path(name);
        let port = NodeState::load(&dir, NodeKind::Relay)?
            .public_addr
            .context("public addr")?
            .rsplit_once(':')
            .context("port")?
            .1
            .to_owned();
        let mut p = self.spawn_in(
            self.net.public.as_deref(),
            name,
            &[
                "relay",
                "run",
                "--data-dir",
                &s(&dir),
                "--listen",
                &format!("{}:{port}", self.net.host),
                "--admin",
                "127.0.0.1:0",
                // Not the default 5: the lane test sees the flag applied.
                "--bulk-nice",
                BULK_NICE,
            ],
        )?;
        let line = p.wait_line("comsat relay listening", START)?;
        let field = |k: &str| -> Result<SocketAddr> {
            Ok(line
                .split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .context("field")?
                .parse()?)
        };
        let (quic, admin) = (field("quic=")?, field("admin=")?);
        self.relays.retain(|r| r.0 != name);
        self.relays.push((name.to_owned(), p, quic, admin));
        Ok(())
    }

    pub fn enrol_agent(&mut self, name: &str) -> Result<()> {
        let token = s(&self.token("agent", name, &[])?);
        let dir = s(&self.path(name));
        let mut args = vec!["agent", "enrol", "--token-file", &token, "--data-dir", &dir];
        if let Some(f) = &self.fallback {
            args.extend(["--fallback-controller", f]);
        }
        ok_in(self.net.agent_ns(name), &args)?;
        self.run_agent(name)
    }

    pub fn run_agent(&mut self, name: &str) -> Result<()> {
        let dir = s(&self.path(name));
        let mut args = vec![
            "agent",
            "run",
            "--data-dir",
            &dir,
            "--admin",
            "127.0.0.1:0",
            "--bulk-nice",
            BULK_NICE,
        ];
        args.extend(self.agent_args.iter().map(String::as_str));
        let mut p = self.spawn_in(self.net.agent_ns(name), name, &args)?;
        let line = p.wait_line("comsat agent admin", START)?;
        p.wait_line("comsat agent started", START)?;
        let admin = line.rsplit(' ').next().context("admin")?.parse()?;
        self.agents.retain(|a| a.0 != name);
        self.agents.push((name.to_owned(), p, admin));
        Ok(())
    }

    pub fn relay_proc(&self, name: &str) -> Result<&Proc> {
        self.relays
            .iter()
            .find(|r| r.0 == name)
            .map(|r| &r.1)
            .context("no such relay")
    }

    pub fn agent(&mut self, name: &str) -> Result<&mut Proc> {
        self.agents
            .iter_mut()
            .find(|a| a.0 == name)
            .map(|a| &mut a.1)
            .context("no such agent")
    }

    pub fn relay_admin(&self, name: &str) -> Result<SocketAddr> {
        self.relays
            .iter()
            .find(|r| r.0 == name)
            .map(|r| r.3)
            .context("no such relay")
    }

    /// Waits until the relays have heartbeated, so links get assigned.
    pub fn wait_relays_healthy(&self, n: usize) -> Result<()> {
        wait_for(CONVERGE, || {
            let out = self.ctl_ok(&["relay", "list", "-o", "json"])?;
            let relays: Vec<api::RelayInfo> = serde_json::from_str(&out)?;
            let healthy = relays.iter().filter(|r| r.healthy).count();
            ensure!(healthy >= n, "{healthy} of {n} relays healthy: {out}");
            Ok(())
        })
    }

    /// Logs of every process, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        if let Some(c) = &self.controller {
            out += &format!("--- controller\n{}\n", c.log_tail());
        }
        for r in &self.relays {
            out += &format!("--- {}\n{}\n", r.0, r.1.log_tail());
        }
        for a in &self.agents {
            out += &format!("--- {}\n{}\n", a.0, a.1.log_tail());
        }
        out
    }
}

/// What [`Fleet::builder`] starts: a controller (its controller.toml
/// edited first), then relays `relay-1` to `relay-N` enrolled and running,
/// then the named agents enrolled and running; it waits until the relays
/// are healthy, so links get assigned.
pub struct FleetBuilder {
    edit: Box<dyn FnOnce(String) -> String>,
    relays: usize,
    agents: Vec<String>,
    net: Net,
    agent_args: Vec<String>,
}

impl FleetBuilder {
    /// Edits the controller's controller.toml before it runs.
    pub fn controller_toml(mut self, edit: impl FnOnce(String) -> String + 'static) -> Self {
        self.edit = Box::new(edit);
        self
    }

    /// Relays `relay-1` to `relay-{n}`.
    pub fn relays(mut self, n: usize) -> Self {
        self.relays = n;
        self
    }

    /// Agents with these names, enrolled in this order.
    pub fn agents(mut self, names: &[&str]) -> Self {
        self.agents = names.iter().map(|&n| n.to_owned()).collect();
        self
    }

    /// Runs the controller and relays in `topology`'s public namespace
    /// and each agent (named with [`Self::agents`] first) behind one of its
    /// NATs, in order.
    pub fn behind_nats(mut self, topology: &NatTopology) -> Self {
        let names: Vec<&str> = self.agents.iter().map(String::as_str).collect();
        self.net = Net::nat(topology, &names);
        self
    }

    /// More arguments for every `agent run`.
    pub fn agent_args(mut self, args: &[&str]) -> Self {
        self.agent_args = args.iter().map(|&a| a.to_owned()).collect();
        self
    }

    pub fn start(self) -> Result<Fleet> {
        ensure!(
            self.net.public.is_none() || self.net.edges.len() == self.agents.len(),
            "{} agents for {} edges (name the agents before `behind_nats`)",
            self.agents.len(),
            self.net.edges.len()
        );
        let mut c = Fleet::start_in(self.net, None, self.edit, |_| Ok(Vec::new()))?;
        c.agent_args = self.agent_args;
        for i in 1..=self.relays {
            c.enrol_relay(&format!("relay-{i}"))?;
        }
        for name in &self.agents {
            c.enrol_agent(name)?;
        }
        if self.relays > 0 {
            c.wait_relays_healthy(self.relays)?;
        }
        Ok(c)
    }
}

impl Fleet {
    /// A fleet to start: by default a controller alone.
    pub fn builder() -> FleetBuilder {
        FleetBuilder {
            edit: Box::new(|t| t),
            relays: 0,
            agents: Vec::new(),
            net: Net::default(),
            agent_args: Vec::new(),
        }
    }

    /// `ctl link create NAME` from agent `a`, listening on a free loopback
    /// port, to agent `b`'s `target`, with `extra` arguments; returns the
    /// address agent `a` then listens on.
    pub fn create_link(
        &mut self,
        name: &str,
        target: SocketAddr,
        extra: &[&str],
    ) -> Result<SocketAddr> {
        let listen = format!("tcp://127.0.0.1:{}", free_tcp_port()?);
        let target = format!("tcp://{target}");
        let mut args = vec![
            "link", "create", name, "--from", "a", "--listen", &listen, "--to", "b", "--target",
            &target,
        ];
        args.extend_from_slice(extra);
        self.ctl_ok(&args)?;
        listen_addr(self.agent("a")?, name)
    }

    /// Waits until agent `name`'s log says link `link` is ready (attached,
    /// end to end session up: its peer is there).
    pub fn wait_link_ready(&mut self, name: &str, link: &str) -> Result<()> {
        let deadline = Instant::now() + CONVERGE;
        let needle = format!("link={link}");
        loop {
            let log = self.agent(name)?.log();
            if log
                .lines()
                .any(|l| l.contains("link ready") && l.contains(&needle))
            {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "agent {name}: link {link} not ready within {CONVERGE:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A JWT of node `name` (signed with its key), issued at `now`, valid
    /// for `lifetime` seconds.
    pub fn jwt(&self, name: &str, now: u64, lifetime: u64) -> Result<String> {
        let (state, key) = node_key(self, name)?;
        Ok(jwt::mint(
            &key,
            &state.node_id,
            &state.audience,
            now,
            lifetime,
            comsat_node::keys::random_jti(),
        )?)
    }
}

/// `text` (TOML) with top-level `key = value`, replaced or added.
pub fn set_key(text: &str, key: &str, value: &str) -> String {
    let mut out: Vec<String> = text
        .lines()
        .filter(|l| {
            !l.trim_start().starts_with(&format!("{key} "))
                && !l.trim_start().starts_with(&format!("{key}="))
        })
        .map(str::to_owned)
        .collect();
    // Top-level keys go before the first table.
    let at = out
        .iter()
        .position(|l| l.trim_start().starts_with('['))
        .unwrap_or(out.len());
    out.insert(at, format!("{key} = {value}"));
    out.join("\n") + "\n"
}

pub fn wait_for(limit: Duration, mut f: impl FnMut() -> Result<()>) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        match f() {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// The address an agent printed for link `name`.
pub fn listen_addr(agent: &mut Proc, name: &str) -> Result<SocketAddr> {
    crate::proc::listen_addr(agent, name)
}

/// A TCP server that answers every connection with the SHA-256 of what it
/// read until EOF.
pub async fn hash_server() -> Result<SocketAddr> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut h = Sha256::new();
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match sock.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(n) => h.update(&buf[..n]),
                        Err(_) => return,
                    }
                }
                let _ = sock.write_all(&h.finalize()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    Ok(addr)
}

/// Sends `len` pseudo-random bytes through `addr` and checks the SHA-256
/// the far end answers with.
pub async fn round_trip(addr: SocketAddr, len: usize, seed: u8) -> Result<()> {
    let mut sock = tokio::net::TcpStream::connect(addr).await?;
    let data: Vec<u8> = (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[0] ^ seed)
        .collect();
    let want = Sha256::digest(&data);
    sock.write_all(&data).await?;
    sock.shutdown().await?;
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), sock.read_to_end(&mut got))
        .await
        .context("no answer within 30 s")??;
    ensure!(
        got == want.as_slice(),
        "SHA-256 mismatch through the link ({} bytes back)",
        got.len()
    );
    Ok(())
}

/// Retries [`round_trip`] until the link carries it (it is set up within
/// seconds of `link create`).
pub async fn round_trip_eventually(addr: SocketAddr, len: usize) -> Result<Duration> {
    let start = Instant::now();
    let mut last = None;
    while start.elapsed() < CONVERGE {
        match round_trip(addr, len, 7).await {
            Ok(()) => return Ok(start.elapsed()),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("never tried")))
}

/// A cluster with one relay, agents `a` and `b`, and link `demo` from a's
/// listener to a hash server behind b.
pub async fn demo() -> Result<(Fleet, SocketAddr, SocketAddr)> {
    let mut c = Fleet::builder().relays(1).agents(&["a", "b"]).start()?;
    let target = hash_server().await?;
    let listen = c.create_link("demo", target, &[])?;
    Ok((c, listen, target))
}

/// A request to the controller with a hand-made bearer token.
pub async fn raw_get(c: &Fleet, path: &str, bearer: &str) -> Result<(u16, String)> {
    let state_url = std::fs::read_to_string(c.path("controller/context.toml"))?;
    let url = state_url
        .lines()
        .find_map(|l| l.strip_prefix("controller = "))
        .context("controller url")?
        .trim_matches('"')
        .to_owned();
    raw_get_at(c, &url, path, bearer).await
}

/// GETs `path` from the controller at `url` with a bearer token.
pub async fn raw_get_at(c: &Fleet, url: &str, path: &str, bearer: &str) -> Result<(u16, String)> {
    let resp = http_client(c)?
        .get(format!("{url}{path}"))
        .bearer_auth(bearer)
        .send()
        .await?;
    Ok((resp.status().as_u16(), resp.text().await?))
}

/// An HTTPS client that trusts `c`'s controller CA (and nothing else).
pub fn http_client(c: &Fleet) -> Result<reqwest::Client> {
    let roots = {
        let mut r = rustls::RootCertStore::empty();
        for cert in comsat_node::client::read_ca(&c.path("controller/ca.pem"))? {
            r.add(cert)?;
        }
        r
    };
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(Duration::from_secs(10))
        .build()?)
}

pub fn node_key(c: &Fleet, name: &str) -> Result<(NodeState, SigningKey)> {
    let dir = c.path(name);
    let kind = if name.starts_with("relay") {
        NodeKind::Relay
    } else {
        NodeKind::Agent
    };
    Ok((
        NodeState::load(&dir, kind)?,
        SigningKey::read_file(&dir.join("node.key"))?,
    ))
}

/// Writes `data` on a connection through a link, half-closes and checks
/// the SHA-256 the far end answers with.
pub async fn finish_flow(mut sock: tokio::net::TcpStream, sent: &[u8]) -> Result<()> {
    sock.shutdown().await?;
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), sock.read_to_end(&mut got))
        .await
        .context("no answer within 30 s")??;
    ensure!(
        got == Sha256::digest(sent).as_slice(),
        "open flow lost or changed bytes"
    );
    Ok(())
}

/// Whether a new flow through `addr` is let in: it carries bytes and gets
/// the digest back, or it is reset.
pub async fn new_flow_allowed(addr: SocketAddr) -> Result<bool> {
    // The reset can come so fast that it is reported by connect itself.
    let mut sock = match tokio::net::TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    let _ = sock.write_all(b"third").await;
    let _ = sock.shutdown().await;
    let mut got = Vec::new();
    match tokio::time::timeout(Duration::from_secs(10), sock.read_to_end(&mut got)).await {
        Ok(Ok(_)) if got == Sha256::digest(b"third").as_slice() => Ok(true),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(false),
        other => anyhow::bail!("neither carried nor reset: {other:?} ({} bytes)", got.len()),
    }
}

/// The leaf certificate the controller at `url` serves to a new
/// connection, checked against the pinned CA.
pub fn served_controller_cert(c: &Fleet, url: &str) -> Result<Vec<u8>> {
    use std::io::{Read, Write};
    let addr = url.trim_start_matches("https://");
    let mut roots = rustls::RootCertStore::empty();
    for cert in comsat_node::client::read_ca(&c.path("controller/ca.pem"))? {
        roots.add(cert)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?;
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name)?;
    let sock = std::net::TcpStream::connect(addr)?;
    sock.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    tls.write_all(b"GET /v1/ca HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer);
    let leaf = tls
        .conn
        .peer_certificates()
        .and_then(|c| c.first())
        .context("no certificate")?;
    Ok(leaf.as_ref().to_vec())
}

pub fn controller_url(c: &Fleet) -> Result<String> {
    let text = std::fs::read_to_string(c.path("controller/context.toml"))?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("controller = "))
        .context("controller url")?
        .trim_matches('"')
        .to_owned())
}

pub fn write_then_rename(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
