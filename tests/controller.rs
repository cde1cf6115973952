//! The controller end to end, with the real `comsat` binary as processes:
//! `controller init/run`, join tokens from `ctl token create`, `relay|agent
//! enrol`, `relay|agent run --data-dir`, `ctl link create/delete`, and the
//! refusals the controller owes (tokens, JWTs, what each node learns).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use comsat::node::NodeState;
use comsat_protocol::api::{self, NodeKind};
use comsat_protocol::{SigningKey, jwt};
use comsat_tests::proc::{metric, scrape};
use comsat_tests::{Proc, free_udp_port};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_comsat");
const START: Duration = comsat_tests::proc::START_TIMEOUT;
/// How long a change made with `ctl` may take to reach the agents.
const CONVERGE: Duration = Duration::from_secs(20);
/// `--bulk-nice` of the relays and agents the tests run (not the default 5).
const BULK_NICE: &str = "7";

/// Runs `comsat ARGS` to completion: (exit code, stdout, stderr).
fn comsat(args: &[&str]) -> Result<(i32, String, String)> {
    let out = Command::new(BIN)
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
fn ok(args: &[&str]) -> Result<String> {
    let (code, out, err) = comsat(args)?;
    ensure!(code == 0, "comsat {args:?} exited {code}:\n{out}\n{err}");
    Ok(out)
}

fn free_tcp_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

struct Cluster {
    dir: tempfile::TempDir,
    /// A PostgreSQL database instead of the SQLite file.
    database: Option<String>,
    /// `--fallback-controller` given to enrolments.
    fallback: Option<String>,
    controller: Option<Proc>,
    relays: Vec<(String, Proc, SocketAddr, SocketAddr)>,
    agents: Vec<(String, Proc, SocketAddr)>,
}

impl Cluster {
    /// Initialises a controller (with `edit` applied to its
    /// controller.toml) and runs it.
    fn start(edit: impl FnOnce(String) -> String) -> Result<Self> {
        Self::start_with(edit, |_| Ok(Vec::new()))
    }

    /// Like [`Self::start`], with more `controller init` arguments made
    /// from the temporary directory.
    fn start_with(
        edit: impl FnOnce(String) -> String,
        init_args: impl FnOnce(&Path) -> Result<Vec<String>>,
    ) -> Result<Self> {
        Self::start_on(None, edit, init_args)
    }

    /// Like [`Self::start_with`], on `database` (PostgreSQL) if given.
    fn start_on(
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
            format!("https://127.0.0.1:{port}"),
        ];
        args.extend(extra);
        ok(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
        let toml = ctl_dir.join("controller.toml");
        let text = std::fs::read_to_string(&toml)?;
        std::fs::write(&toml, edit(text))?;
        let mut c = Self {
            dir,
            database,
            fallback: None,
            controller: None,
            relays: Vec::new(),
            agents: Vec::new(),
        };
        c.run_controller()?;
        Ok(c)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn run_controller(&mut self) -> Result<()> {
        let p = self.spawn_controller("controller", "controller", None)?;
        self.controller = Some(p);
        Ok(())
    }

    /// Runs `controller run` on data dir `dir`, named `name`.
    fn spawn_controller(&self, dir: &str, name: &str, listen: Option<u16>) -> Result<Proc> {
        let data_dir = s(&self.path(dir));
        let mut args = vec!["controller", "run", "--data-dir", &data_dir];
        let listen = listen.map(|p| format!("127.0.0.1:{p}"));
        if let Some(l) = &listen {
            args.extend(["--listen", l]);
        }
        if let Some(url) = &self.database {
            args.extend(["--database", url]);
        }
        let mut p = Proc::spawn(BIN, name, &args, self.dir.path())?;
        p.wait_line("comsat controller listening", START)?;
        Ok(p)
    }

    /// A second controller on the same database, from a copy of the
    /// first one's data dir, listening on `port`.
    fn second_controller(&self, port: u16) -> Result<Proc> {
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
    fn ctl_at(&self, url: &str, args: &[&str]) -> Result<String> {
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
        let (code, out, err) = comsat(&all)?;
        ensure!(
            code == 0,
            "ctl {args:?} at {url} exited {code}:\n{out}\n{err}"
        );
        Ok(out)
    }

    fn ctl(&self, args: &[&str]) -> Result<(i32, String, String)> {
        let ctx = s(&self.path("controller/context.toml"));
        let mut all = vec!["ctl", "--context", &ctx];
        all.extend_from_slice(args);
        comsat(&all)
    }

    fn ctl_ok(&self, args: &[&str]) -> Result<String> {
        let (code, out, err) = self.ctl(args)?;
        ensure!(code == 0, "ctl {args:?} exited {code}:\n{out}\n{err}");
        Ok(out)
    }

    /// A join token in a file.
    fn token(&self, kind: &str, name: &str, extra: &[&str]) -> Result<PathBuf> {
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

    fn enrol_relay(&mut self, name: &str) -> Result<()> {
        self.enrol_relay_only(name)?;
        self.run_relay(name)
    }

    fn enrol_relay_only(&mut self, name: &str) -> Result<()> {
        self.enrol_relay_only_with(name, &[])
    }

    /// Enrols relay `name` with more `relay enrol` arguments.
    fn enrol_relay_only_with(&mut self, name: &str, extra: &[&str]) -> Result<()> {
        let token = self.token("relay", name, &[])?;
        let port = free_udp_port()?;
        let dir = self.path(name);
        let (token, dir, addr) = (s(&token), s(&dir), format!("127.0.0.1:{port}"));
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
        ok(&args)?;
        Ok(())
    }

    fn run_relay(&mut self, name: &str) -> Result<()> {
        let dir = self.path(name);
        let port = NodeState::load(&dir, NodeKind::Relay)?
            .public_addr
            .context("public addr")?
            .rsplit_once(':')
            .context("port")?
            .1
            .to_owned();
        let mut p = Proc::spawn(
            BIN,
            name,
            &[
                "relay",
                "run",
                "--data-dir",
                &s(&dir),
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--admin",
                "127.0.0.1:0",
                // Not the default 5: the lane test sees the flag applied.
                "--bulk-nice",
                BULK_NICE,
            ],
            self.dir.path(),
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

    fn enrol_agent(&mut self, name: &str) -> Result<()> {
        let token = s(&self.token("agent", name, &[])?);
        let dir = s(&self.path(name));
        let mut args = vec!["agent", "enrol", "--token-file", &token, "--data-dir", &dir];
        if let Some(f) = &self.fallback {
            args.extend(["--fallback-controller", f]);
        }
        ok(&args)?;
        self.run_agent(name)
    }

    fn run_agent(&mut self, name: &str) -> Result<()> {
        let mut p = Proc::spawn(
            BIN,
            name,
            &[
                "agent",
                "run",
                "--data-dir",
                &s(&self.path(name)),
                "--admin",
                "127.0.0.1:0",
                "--bulk-nice",
                BULK_NICE,
            ],
            self.dir.path(),
        )?;
        let line = p.wait_line("comsat agent admin", START)?;
        p.wait_line("comsat agent started", START)?;
        let admin = line.rsplit(' ').next().context("admin")?.parse()?;
        self.agents.retain(|a| a.0 != name);
        self.agents.push((name.to_owned(), p, admin));
        Ok(())
    }

    fn relay_proc(&self, name: &str) -> Result<&Proc> {
        self.relays
            .iter()
            .find(|r| r.0 == name)
            .map(|r| &r.1)
            .context("no such relay")
    }

    fn agent(&mut self, name: &str) -> Result<&mut Proc> {
        self.agents
            .iter_mut()
            .find(|a| a.0 == name)
            .map(|a| &mut a.1)
            .context("no such agent")
    }

    fn relay_admin(&self, name: &str) -> Result<SocketAddr> {
        self.relays
            .iter()
            .find(|r| r.0 == name)
            .map(|r| r.3)
            .context("no such relay")
    }

    /// Waits until the relays have heartbeated, so links get assigned.
    fn wait_relays_healthy(&self, n: usize) -> Result<()> {
        wait_for(CONVERGE, || {
            let out = self.ctl_ok(&["relay", "list", "-o", "json"])?;
            let relays: Vec<api::RelayInfo> = serde_json::from_str(&out)?;
            let healthy = relays.iter().filter(|r| r.healthy).count();
            ensure!(healthy >= n, "{healthy} of {n} relays healthy: {out}");
            Ok(())
        })
    }

    /// Logs of every process, for failure messages.
    fn logs(&self) -> String {
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

/// `text` (TOML) with top-level `key = value`, replaced or added.
fn set_key(text: &str, key: &str, value: &str) -> String {
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

fn wait_for(limit: Duration, mut f: impl FnMut() -> Result<()>) -> Result<()> {
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
fn listen_addr(agent: &mut Proc, name: &str) -> Result<SocketAddr> {
    comsat_tests::proc::listen_addr(agent, name)
}

/// A TCP server that answers every connection with the SHA-256 of what it
/// read until EOF.
async fn hash_server() -> Result<SocketAddr> {
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
async fn round_trip(addr: SocketAddr, len: usize, seed: u8) -> Result<()> {
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
async fn round_trip_eventually(addr: SocketAddr, len: usize) -> Result<Duration> {
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
async fn demo(edit: impl FnOnce(String) -> String) -> Result<(Cluster, SocketAddr, SocketAddr)> {
    let mut c = Cluster::start(edit)?;
    c.enrol_relay("relay-1")?;
    c.enrol_agent("a")?;
    c.enrol_agent("b")?;
    c.wait_relays_healthy(1)?;
    let target = hash_server().await?;
    let listen = format!("tcp://127.0.0.1:{}", free_tcp_port()?);
    c.ctl_ok(&[
        "link",
        "create",
        "demo",
        "--from",
        "a",
        "--listen",
        &listen,
        "--to",
        "b",
        "--target",
        &format!("tcp://{target}"),
    ])?;
    let listen = listen_addr(c.agent("a")?, "demo")?;
    Ok((c, listen, target))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_created_with_ctl_carries_bytes_and_delete_takes_it_away() -> Result<()> {
    let (mut c, listen, _) = demo(|t| t).await?;
    let took = round_trip_eventually(listen, 8 << 20)
        .await
        .with_context(|| c.logs())?;
    eprintln!("link usable {took:?} after the listener appeared");

    let links: Vec<api::LinkInfo> =
        serde_json::from_str(&c.ctl_ok(&["link", "list", "-o", "json"])?)?;
    ensure!(
        links.len() == 1 && links[0].relays == ["relay-1"],
        "{links:?}"
    );
    let table = c.ctl_ok(&["link", "list"])?;
    ensure!(
        table.starts_with("NAME") && table.contains("demo"),
        "{table}"
    );
    let status = c.ctl_ok(&["status"])?;
    ensure!(status.contains("agents:     2"), "{status}");

    // An agent restarted with its data dir comes back without a token.
    let relay_admin = c.relay_admin("relay-1")?;
    c.agent("b")?.kill();
    c.run_agent("b")?;
    round_trip_eventually(listen, 1 << 20)
        .await
        .with_context(|| c.logs())?;

    // An open flow, then delete: the flow is reset, the listener closes,
    // the relay drops the grant.
    let mut open = tokio::net::TcpStream::connect(listen).await?;
    open.write_all(b"partial").await?;
    wait_for(CONVERGE, || {
        let m = scrape(relay_admin)?;
        ensure!(metric(&m, "comsat_relay_grants_loaded") == 1.0);
        Ok(())
    })?;
    c.ctl_ok(&["link", "delete", "demo"])?;
    c.agent("a")?
        .wait_line("comsat agent link demo removed", CONVERGE)?;
    let mut buf = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), open.read_to_end(&mut buf)).await;
    ensure!(
        matches!(r, Ok(Err(_))),
        "the open flow should be reset when its link is deleted, got {r:?}"
    );
    ensure!(
        tokio::net::TcpStream::connect(listen).await.is_err(),
        "the listener should be closed"
    );
    wait_for(CONVERGE, || {
        let m = scrape(relay_admin)?;
        ensure!(
            metric(&m, "comsat_relay_grants_loaded") == 0.0,
            "relay still holds the grant"
        );
        Ok(())
    })
    .with_context(|| c.logs())?;
    let (code, _, err) = c.ctl(&["link", "show", "demo"])?;
    ensure!(
        code != 0 && err.contains("demo"),
        "link show after delete: {code} {err}"
    );
    Ok(())
}

/// A request to the controller with a hand-made bearer token.
async fn raw_get(c: &Cluster, path: &str, bearer: &str) -> Result<(u16, String)> {
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
async fn raw_get_at(c: &Cluster, url: &str, path: &str, bearer: &str) -> Result<(u16, String)> {
    let roots = {
        let mut r = rustls::RootCertStore::empty();
        for cert in comsat::client::read_ca(&c.path("controller/ca.pem"))? {
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
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(Duration::from_secs(10))
        .build()?;
    let resp = http
        .get(format!("{url}{path}"))
        .bearer_auth(bearer)
        .send()
        .await?;
    Ok((resp.status().as_u16(), resp.text().await?))
}

fn node_key(c: &Cluster, name: &str) -> Result<(NodeState, SigningKey)> {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_plane_outlives_the_controller_and_a_seen_jti_stays_refused() -> Result<()> {
    let (mut c, listen, _) = demo(|t| t).await?;
    round_trip_eventually(listen, 1 << 20)
        .await
        .with_context(|| c.logs())?;
    let (state, key) = node_key(&c, "a")?;
    let token = jwt::mint(&key, &state.node_id, &state.audience, jwt::unix_now(), 50)?;
    let (code, body) = raw_get(&c, api::PATH_AGENT_CONFIG, &token).await?;
    ensure!(code == 200, "first use of a JWT: {code} {body}");

    // A flow open across the controller's death, and new flows while it
    // is down.
    let mut open = tokio::net::TcpStream::connect(listen).await?;
    open.write_all(&[1u8; 100_000]).await?;
    c.controller.take().context("controller")?.kill();
    for i in 0..3u8 {
        round_trip(listen, 2 << 20, i)
            .await
            .with_context(|| c.logs())?;
    }
    open.write_all(&[2u8; 100_000]).await?;
    open.shutdown().await?;
    let mut digest = Vec::new();
    open.read_to_end(&mut digest).await?;
    let mut h = Sha256::new();
    h.update([1u8; 100_000]);
    h.update([2u8; 100_000]);
    ensure!(
        digest == h.finalize().as_slice(),
        "flow open across the controller's death"
    );

    c.run_controller()?;
    let (code, body) = raw_get(&c, api::PATH_AGENT_CONFIG, &token).await?;
    ensure!(code == 401, "a JWT seen before the restart: {code} {body}");
    let audit = c.ctl_ok(&["audit", "list", "-o", "json"])?;
    ensure!(audit.contains("replayed"), "{audit}");
    round_trip(listen, 1 << 20, 9).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_jwts_are_refused_alike_and_audited_with_the_reason() -> Result<()> {
    let mut c = Cluster::start(|t| t)?;
    c.enrol_agent("a")?;
    let dir = |n: &str| s(&c.path(n));

    // A used token.
    let used = c.path("a.agent.token");
    let (code, _, err) = comsat(&[
        "agent",
        "enrol",
        "--token-file",
        &s(&used),
        "--data-dir",
        &dir("again"),
    ])?;
    let refused = |code: i32, err: &str| code != 0 && err.contains("join token refused");
    ensure!(refused(code, &err), "used token: {code} {err}");

    // An expired token.
    let expired = c.token("agent", "late", &["--ttl", "1s"])?;
    std::thread::sleep(Duration::from_millis(2100));
    let (code, _, err) = comsat(&[
        "agent",
        "enrol",
        "--token-file",
        &s(&expired),
        "--data-dir",
        &dir("late"),
    ])?;
    ensure!(refused(code, &err), "expired token: {code} {err}");
    // ... and used up: it stays refused.
    let (code, _, err) = comsat(&[
        "agent",
        "enrol",
        "--token-file",
        &s(&expired),
        "--data-dir",
        &dir("late2"),
    ])?;
    ensure!(code != 0, "expired token, second try: {code} {err}");

    // A relay token used by an agent.
    let relay_token = c.token("relay", "relay-9", &[])?;
    let (code, _, err) = comsat(&[
        "agent",
        "enrol",
        "--token-file",
        &s(&relay_token),
        "--data-dir",
        &dir("x"),
    ])?;
    ensure!(
        refused(code, &err),
        "relay token used by an agent: {code} {err}"
    );

    // A token pinning another CA.
    let good = std::fs::read_to_string(c.token("agent", "pinned", &[])?)?;
    let mut t = api::JoinToken::parse(&good)?;
    t.ca_sha256[0] ^= 1;
    let (code, _, err) = comsat(&["agent", "enrol", &t.encode(), "--data-dir", &dir("pinned")])?;
    ensure!(
        code != 0 && err.contains("SHA-256"),
        "wrong CA pin: {code} {err}"
    );

    // JWTs.
    let (state, key) = node_key(&c, "a")?;
    let now = jwt::unix_now();
    let good = jwt::mint(&key, &state.node_id, &state.audience, now, 30)?;
    let (code, body) = raw_get(&c, api::PATH_AGENT_CONFIG, &good).await?;
    ensure!(code == 200, "{code} {body}");
    let (code, body) = raw_get(&c, api::PATH_AGENT_CONFIG, &good).await?;
    let unauthorized = |code: u16, body: &str| code == 401 && body.contains("unauthorized");
    ensure!(unauthorized(code, &body), "replayed JWT: {code} {body}");

    let other = SigningKey::generate();
    let forged = jwt::mint(&other, &state.node_id, &state.audience, now, 30)?;
    let (code, body) = raw_get(&c, api::PATH_AGENT_CONFIG, &forged).await?;
    ensure!(
        unauthorized(code, &body),
        "JWT signed by another key: {code} {body}"
    );

    let old = jwt::mint(&key, &state.node_id, &state.audience, now - 600, 30)?;
    let (code, body) = raw_get(&c, api::PATH_AGENT_CONFIG, &old).await?;
    ensure!(unauthorized(code, &body), "expired JWT: {code} {body}");

    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let header = format!(r#"{{"alg":"HS256","typ":"JWT","kid":"{}"}}"#, state.node_id);
    let claims = format!(
        r#"{{"sub":"{}","aud":"{}","iat":{now},"exp":{},"jti":"hs"}}"#,
        state.node_id,
        state.audience,
        now + 30
    );
    let hs = format!(
        "{}.{}.{}",
        b64(header.as_bytes()),
        b64(claims.as_bytes()),
        b64(&[0; 32])
    );
    let (code, body) = raw_get(&c, api::PATH_AGENT_CONFIG, &hs).await?;
    ensure!(unauthorized(code, &body), "HS256 JWT: {code} {body}");
    let none = format!(
        "{}.{}.",
        b64(format!(r#"{{"alg":"none","kid":"{}"}}"#, state.node_id).as_bytes()),
        b64(claims.as_bytes())
    );
    let (code, body) = raw_get(&c, api::PATH_AGENT_CONFIG, &none).await?;
    ensure!(code == 401, "alg none JWT: {code} {body}");

    // An agent's JWT does not open relay endpoints.
    let agent_jwt = jwt::mint(&key, &state.node_id, &state.audience, now, 30)?;
    let (code, body) = raw_get(&c, api::PATH_RELAY_EVENTS, &agent_jwt).await?;
    ensure!(
        unauthorized(code, &body),
        "agent JWT on relay events: {code} {body}"
    );

    // The operator sees every real reason in the audit log, with the
    // subject and the source; no token used here is in it, nor in the
    // controller's log.
    let audit: Vec<api::AuditRecord> =
        serde_json::from_str(&c.ctl_ok(&["audit", "list", "--since", "1h", "-o", "json"])?)?;
    for reason in [
        "already used",
        "expired",
        "comsat relay enrol",
        "replayed",
        "signature",
        "EdDSA",
        "this endpoint is for relays",
    ] {
        ensure!(
            audit.iter().any(|r| r.result == "denied"
                && r.reason.as_deref().is_some_and(|x| x.contains(reason))
                && r.source
                    .as_deref()
                    .is_some_and(|s| s.starts_with("127.0.0.1:"))),
            "no denied audit record for {reason:?}: {audit:#?}"
        );
    }
    ensure!(
        audit
            .iter()
            .any(|r| r.subject == format!("node:{}", state.node_id) && r.action == "authenticate"),
        "{audit:#?}"
    );
    let table = c.ctl_ok(&["audit", "list", "--subject", "agent:"])?;
    ensure!(
        table.starts_with("TIME") && table.contains("agent:a") && table.contains("enrol"),
        "{table}"
    );
    let audit_text = serde_json::to_string(&audit)?;
    let controller_log = std::fs::read_to_string(c.path("controller.log"))?;
    let admin = std::fs::read_to_string(c.path("controller/admin.token"))?;
    let mut secrets = vec![admin.trim().to_owned(), good, forged, old, hs, agent_jwt];
    for file in [used, expired, relay_token] {
        let t = api::JoinToken::parse(std::fs::read_to_string(file)?.trim())?;
        secrets.push(t.secret.clone());
    }
    for secret in &secrets {
        ensure!(
            !audit_text.contains(secret.as_str()),
            "a secret is in the audit log"
        );
        ensure!(
            !controller_log.contains(secret.as_str()),
            "a secret is in the controller's log"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_learn_only_their_part() -> Result<()> {
    // Two relays, one relay per link: the other relay must get nothing.
    let mut c = Cluster::start(|t| set_key(&t, "relays_per_link", "1"))?;
    c.enrol_relay("relay-1")?;
    c.enrol_relay("relay-2")?;
    c.enrol_agent("a")?;
    c.enrol_agent("b")?;
    c.wait_relays_healthy(2)?;
    let target = hash_server().await?;
    let target_spec = format!("tcp://{target}");
    let listen_spec = format!("tcp://127.0.0.1:{}", free_tcp_port()?);
    c.ctl_ok(&[
        "link",
        "create",
        "demo",
        "--from",
        "a",
        "--listen",
        &listen_spec,
        "--to",
        "b",
        "--target",
        &target_spec,
    ])?;
    let listen = listen_addr(c.agent("a")?, "demo")?;
    round_trip_eventually(listen, 1 << 20)
        .await
        .with_context(|| c.logs())?;

    let link: api::LinkInfo =
        serde_json::from_str(&c.ctl_ok(&["link", "show", "demo", "-o", "json"])?)?;
    ensure!(link.relays.len() == 1, "{link:?}");
    let assigned = link.relays[0].clone();
    let other = if assigned == "relay-1" {
        "relay-2"
    } else {
        "relay-1"
    };

    // The unassigned relay's event log and grant cache hold nothing.
    let (state, key) = node_key(&c, other)?;
    let t = jwt::mint(&key, &state.node_id, &state.audience, jwt::unix_now(), 30)?;
    let (code, body) = raw_get(
        &c,
        &format!("{}?since=0&wait_ms=0", api::PATH_RELAY_EVENTS),
        &t,
    )
    .await?;
    ensure!(code == 200, "{code} {body}");
    let events: api::RelayEvents = serde_json::from_str(&body)?;
    ensure!(
        events.events.is_empty(),
        "unassigned relay got events: {body}"
    );
    let cached = std::fs::read_dir(c.path(other).join("grants"))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "grant"))
        .count();
    ensure!(cached == 0, "unassigned relay cached {cached} grants");
    let m = scrape(c.relay_admin(other)?)?;
    ensure!(metric(&m, "comsat_relay_grants_loaded") == 0.0);
    let m = scrape(c.relay_admin(&assigned)?)?;
    ensure!(metric(&m, "comsat_relay_grants_loaded") == 1.0);

    // Each agent's desired state names its own half, never the peer's
    // socket.
    for (me, must_not) in [("a", target_spec.as_str()), ("b", listen_spec.as_str())] {
        let (state, key) = node_key(&c, me)?;
        let t = jwt::mint(&key, &state.node_id, &state.audience, jwt::unix_now(), 30)?;
        let (code, body) = raw_get(
            &c,
            &format!("{}?since=0&wait_ms=0", api::PATH_AGENT_CONFIG),
            &t,
        )
        .await?;
        ensure!(code == 200, "{code} {body}");
        ensure!(
            !body.contains(must_not),
            "agent {me}'s config names its peer's socket: {body}"
        );
        let desired: api::AgentDesired = serde_json::from_str(&body)?;
        ensure!(desired.links.len() == 1);
        let l = &desired.links[0];
        ensure!(l.relays.len() == 1 && l.relays[0].addr.starts_with("127.0.0.1:"));
    }

    // The assigned relay stops heartbeating: the link moves to the other
    // one and carries bytes there.
    let idx = c
        .relays
        .iter()
        .position(|r| r.0 == assigned)
        .context("relay")?;
    c.relays[idx].1.kill();
    wait_for(Duration::from_secs(60), || {
        let link: api::LinkInfo =
            serde_json::from_str(&c.ctl_ok(&["link", "show", "demo", "-o", "json"])?)?;
        ensure!(link.relays == [other], "still on {:?}", link.relays);
        Ok(())
    })
    .with_context(|| c.logs())?;
    round_trip_eventually(listen, 1 << 20)
        .await
        .with_context(|| c.logs())?;
    let m = scrape(c.relay_admin(other)?)?;
    ensure!(
        metric(&m, "comsat_relay_grants_loaded") == 1.0,
        "the new relay holds the grant"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_renews_its_certificate_and_serves_it_without_restart() -> Result<()> {
    let mut c = Cluster::start(|t| t)?;
    c.enrol_relay_only("relay-1")?;
    // Replace the issued certificate by one for the same key that is about
    // to expire and that no agent trusts (self-signed).
    let dir = c.path("relay-1");
    let key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(dir.join("tls.key"))?)?;
    let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])?;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::seconds(100);
    params.not_after = now + time::Duration::seconds(20);
    let dying = params.self_signed(&key)?.pem();
    std::fs::write(dir.join("tls.crt"), &dying)?;
    c.run_relay("relay-1")?;
    wait_for(CONVERGE, || {
        let now = std::fs::read_to_string(dir.join("tls.crt"))?;
        ensure!(now != dying, "certificate not renewed yet");
        Ok(())
    })
    .with_context(|| c.logs())?;
    let pem = std::fs::read(dir.join("tls.crt"))?;
    let der = comsat::client::read_ca_pem(std::str::from_utf8(&pem)?)?;
    let (_, cert) = x509_parser::parse_x509_certificate(der[0].as_ref())?;
    let ca_pem = std::fs::read(dir.join("relay-ca.pem"))?;
    let ca_der = comsat::client::read_ca_pem(std::str::from_utf8(&ca_pem)?)?;
    let (_, ca) = x509_parser::parse_x509_certificate(ca_der[0].as_ref())?;
    ensure!(
        cert.issuer() == ca.subject(),
        "renewed certificate not issued by the relay CA"
    );
    // Agents, which trust only the relay CA, connect to the running relay.
    c.enrol_agent("a")?;
    c.enrol_agent("b")?;
    c.wait_relays_healthy(1)?;
    let target = hash_server().await?;
    let listen = format!("tcp://127.0.0.1:{}", free_tcp_port()?);
    c.ctl_ok(&[
        "link",
        "create",
        "demo",
        "--from",
        "a",
        "--listen",
        &listen,
        "--to",
        "b",
        "--target",
        &format!("tcp://{target}"),
    ])?;
    let addr = listen_addr(c.agent("a")?, "demo")?;
    round_trip_eventually(addr, 1 << 20)
        .await
        .with_context(|| c.logs())?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_with_the_operators_own_certificate_enrols_nodes() -> Result<()> {
    // The operator's CA and server certificate, made outside comsat.
    let mut c = Cluster::start_with(
        |t| t,
        |dir| {
            let ca_key = rcgen::KeyPair::generate()?;
            let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
            ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            ca_params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "operator CA");
            let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key)?;
            let key = rcgen::KeyPair::generate()?;
            let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])?
                .signed_by(&key, &ca)?;
            let files = [
                ("op-ca.pem", ca.pem()),
                ("op.crt", cert.pem()),
                ("op.key", key.serialize_pem()),
            ];
            for (name, text) in &files {
                comsat_protocol::keys::write_secret_file(&dir.join(name), text.as_bytes())?;
            }
            Ok(vec![
                "--tls-cert".into(),
                s(&dir.join("op.crt")),
                "--tls-key".into(),
                s(&dir.join("op.key")),
                "--tls-ca".into(),
                s(&dir.join("op-ca.pem")),
            ])
        },
    )?;
    let pinned = std::fs::read_to_string(c.path("controller/ca.pem"))?;
    ensure!(
        pinned == std::fs::read_to_string(c.path("op-ca.pem"))?,
        "nodes must pin the operator's CA"
    );
    c.enrol_agent("a")?;
    let agents: Vec<api::AgentInfo> =
        serde_json::from_str(&c.ctl_ok(&["agent", "list", "-o", "json"])?)?;
    ensure!(agents.len() == 1 && agents[0].name == "a", "{agents:?}");
    ensure!(
        std::fs::read_to_string(c.path("a/ca.pem"))? == pinned,
        "the agent stored another CA"
    );
    Ok(())
}

/// Writes `data` on a connection through a link, half-closes and checks
/// the SHA-256 the far end answers with.
async fn finish_flow(mut sock: tokio::net::TcpStream, sent: &[u8]) -> Result<()> {
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
async fn new_flow_allowed(addr: SocketAddr) -> Result<bool> {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_enforces_max_flows_and_an_update_applies_without_touching_open_flows()
-> Result<()> {
    let mut c = Cluster::start(|t| t)?;
    c.enrol_relay("relay-1")?;
    c.enrol_agent("a")?;
    c.enrol_agent("b")?;
    c.wait_relays_healthy(1)?;
    let target = hash_server().await?;
    let listen = format!("tcp://127.0.0.1:{}", free_tcp_port()?);
    c.ctl_ok(&[
        "link",
        "create",
        "demo",
        "--from",
        "a",
        "--listen",
        &listen,
        "--to",
        "b",
        "--target",
        &format!("tcp://{target}"),
        "--max-flows",
        "2",
    ])?;
    let addr = listen_addr(c.agent("a")?, "demo")?;
    round_trip_eventually(addr, 1024)
        .await
        .with_context(|| c.logs())?;
    let relay_admin = c.relay_admin("relay-1")?;
    // The first flow counts until its streams have ended at the relay.
    wait_for(CONVERGE, || {
        let m = scrape(relay_admin)?;
        ensure!(
            metric(&m, "comsat_relay_flows_open") == 0.0,
            "first flow still open"
        );
        Ok(())
    })?;

    // Two flows open and carrying bytes.
    let mut open = Vec::new();
    for i in 0..2u8 {
        let mut sock = tokio::net::TcpStream::connect(addr).await?;
        sock.write_all(&[i; 1000]).await?;
        open.push((sock, vec![i; 1000]));
    }
    wait_for(CONVERGE, || {
        let m = scrape(relay_admin)?;
        ensure!(
            metric(&m, "comsat_relay_flows_open") == 2.0,
            "flows not spliced yet"
        );
        Ok(())
    })?;
    // A third is reset and counted.
    ensure!(
        !new_flow_allowed(addr).await?,
        "a third flow got through a limit of 2"
    );
    let m = scrape(relay_admin)?;
    ensure!(
        metric(&m, "comsat_relay_flows_over_limit_total") >= 1.0,
        "refusal not counted"
    );

    // Raising the limit lets a new flow in; the open ones go on.
    let shown = c.ctl_ok(&["link", "update", "demo", "--max-flows", "3"])?;
    ensure!(shown.contains('3'), "{shown}");
    let deadline = Instant::now() + CONVERGE;
    while !new_flow_allowed(addr).await? {
        ensure!(
            Instant::now() < deadline,
            "the raised limit never applied\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (mut sock, mut sent) in open {
        sock.write_all(b" more")
            .await
            .with_context(|| format!("an open flow was reset by the update\n{}", c.logs()))?;
        sent.extend_from_slice(b" more");
        finish_flow(sock, &sent)
            .await
            .with_context(|| format!("an open flow failed after the update\n{}", c.logs()))?;
    }
    let link: api::LinkInfo =
        serde_json::from_str(&c.ctl_ok(&["link", "show", "demo", "-o", "json"])?)?;
    ensure!(
        link.max_flows == Some(3) && link.generation == 1,
        "{link:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_set_with_ctl_throttles_the_link_and_an_update_lifts_it_for_open_flows()
-> Result<()> {
    let mut c = Cluster::start(|t| t)?;
    c.enrol_relay("relay-1")?;
    c.enrol_agent("a")?;
    c.enrol_agent("b")?;
    c.wait_relays_healthy(1)?;
    let target = hash_server().await?;
    let listen = format!("tcp://127.0.0.1:{}", free_tcp_port()?);
    c.ctl_ok(&[
        "link",
        "create",
        "demo",
        "--from",
        "a",
        "--listen",
        &listen,
        "--to",
        "b",
        "--target",
        &format!("tcp://{target}"),
        "--rate-limit",
        "128KiB/s",
    ])?;
    let link: api::LinkInfo =
        serde_json::from_str(&c.ctl_ok(&["link", "show", "demo", "-o", "json"])?)?;
    ensure!(
        link.rate_limit_bytes_per_sec == Some(128 * 1024),
        "{link:?}"
    );
    let id = hex::encode(link.link_id.0);
    let addr = listen_addr(c.agent("a")?, "demo")?;
    round_trip_eventually(addr, 1024)
        .await
        .with_context(|| c.logs())?;
    let admin = c.relay_admin("relay-1")?;
    let series = |name: &str| format!("{name}{{link=\"{id}\"}}");
    let m = scrape(admin)?;
    ensure!(
        metric(&m, &series("comsat_relay_link_rate_limit_bytes_per_second")) == 131_072.0,
        "the relay does not hold the limit:\n{m}"
    );

    // More than the burst: the relay holds the sender back.
    let mut sock = tokio::net::TcpStream::connect(addr).await?;
    let mut sent = vec![1u8; 512 * 1024];
    sock.write_all(&sent).await?;
    wait_for(CONVERGE, || {
        let m = scrape(admin)?;
        ensure!(
            metric(&m, &series("comsat_relay_link_throttled_seconds_total")) > 0.0,
            "not throttled yet"
        );
        Ok(())
    })?;

    // Lifting the limit applies to the open flow, which goes on.
    c.ctl_ok(&["link", "update", "demo", "--unlimited-rate"])?;
    wait_for(CONVERGE, || {
        let m = scrape(admin)?;
        ensure!(
            metric(&m, &series("comsat_relay_link_rate_limit_bytes_per_second")) == 0.0,
            "limit still in force"
        );
        Ok(())
    })?;
    let more = vec![2u8; 8 << 20];
    sock.write_all(&more).await?;
    sent.extend_from_slice(&more);
    finish_flow(sock, &sent)
        .await
        .with_context(|| format!("the open flow failed across the update\n{}", c.logs()))?;
    let link: api::LinkInfo =
        serde_json::from_str(&c.ctl_ok(&["link", "show", "demo", "-o", "json"])?)?;
    ensure!(
        link.rate_limit_bytes_per_sec.is_none() && link.generation == 1,
        "{link:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_byte_counters_move_while_a_flow_is_open() -> Result<()> {
    let (c, listen, _) = demo(|t| t).await?;
    round_trip_eventually(listen, 1024)
        .await
        .with_context(|| c.logs())?;
    let admin = c.relay_admin("relay-1")?;
    let forwarded = || -> Result<f64> {
        Ok(metric(
            &scrape(admin)?,
            "comsat_relay_forwarded_bytes_total",
        ))
    };
    let mut sock = tokio::net::TcpStream::connect(listen).await?;
    let mut sent = Vec::new();
    let mut last = forwarded()?;
    for i in 0..3u8 {
        let chunk = vec![i; 2 << 20];
        sock.write_all(&chunk).await?;
        sent.extend_from_slice(&chunk);
        wait_for(CONVERGE, || {
            let now = forwarded()?;
            ensure!(
                now >= last + (2 << 20) as f64,
                "forwarded {now}, was {last}"
            );
            last = now;
            Ok(())
        })
        .with_context(|| format!("round {i}: the counter did not move while the flow was open"))?;
        let m = scrape(admin)?;
        ensure!(
            metric(&m, "comsat_relay_flows_open") == 1.0,
            "the flow is not open"
        );
    }
    finish_flow(sock, &sent).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_controllers_on_one_postgres_database_act_as_one() -> Result<()> {
    use comsat_controller::store::testing::{fresh_database, postgres_server};
    let Some(server) = postgres_server() else {
        return Ok(());
    };
    let database = fresh_database(&server).await?;
    let mut c = Cluster::start_on(Some(database), |t| t, |_| Ok(Vec::new()))?;
    let port2 = free_tcp_port()?;
    let _second = c.second_controller(port2)?;
    let url2 = format!("https://127.0.0.1:{port2}");
    c.fallback = Some(url2.clone());

    // Nodes enrol through the first controller...
    c.enrol_relay("relay-1")?;
    c.enrol_agent("a")?;
    c.enrol_agent("b")?;
    c.wait_relays_healthy(1)?;
    // ...the link is created through the second, and bytes flow: the
    // first controller's long polls hear of it.
    let target = hash_server().await?;
    let listen = format!("tcp://127.0.0.1:{}", free_tcp_port()?);
    c.ctl_at(
        &url2,
        &[
            "link",
            "create",
            "demo",
            "--from",
            "a",
            "--listen",
            &listen,
            "--to",
            "b",
            "--target",
            &format!("tcp://{target}"),
        ],
    )?;
    let addr = listen_addr(c.agent("a")?, "demo")?;
    round_trip_eventually(addr, 1 << 20)
        .await
        .with_context(|| c.logs())?;
    let listed = c.ctl_ok(&["link", "list"])?;
    ensure!(listed.contains("demo"), "{listed}");

    // A JWT used at one controller is refused at the other.
    let (state, key) = node_key(&c, "a")?;
    let token = jwt::mint(&key, &state.node_id, &state.audience, jwt::unix_now(), 50)?;
    let (code, body) = raw_get(&c, api::PATH_AGENT_CONFIG, &token).await?;
    ensure!(code == 200, "first use: {code} {body}");
    let (code, body) = raw_get_at(&c, &url2, api::PATH_AGENT_CONFIG, &token).await?;
    ensure!(
        code == 401,
        "the same JWT at the second controller: {code} {body}"
    );
    let audit = c.ctl_at(&url2, &["audit", "list", "-o", "json"])?;
    ensure!(audit.contains("replayed"), "{audit}");

    // One join token redeemed at both controllers at once: one wins.
    let first = c.token("agent", "racer", &[])?;
    let text = std::fs::read_to_string(&first)?;
    let (head, _) = text.trim().rsplit_once(':').context("token url")?;
    let (head, _) = head.rsplit_once(":https").context("token url")?;
    let second = c.path("racer-2.token");
    std::fs::write(&second, format!("{head}:{url2}\n"))?;
    let enrol = |token: PathBuf, dir: PathBuf| {
        std::thread::spawn(move || {
            Command::new(BIN)
                .args(["agent", "enrol", "--token-file"])
                .arg(token)
                .arg("--data-dir")
                .arg(dir)
                .output()
        })
    };
    let runs = [
        enrol(first, c.path("racer-1")),
        enrol(second, c.path("racer-2")),
    ];
    let mut outcomes = Vec::new();
    for r in runs {
        let out = r.join().map_err(|_| anyhow::anyhow!("enrol thread"))??;
        outcomes.push((
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
    }
    ensure!(
        outcomes.iter().filter(|(ok, _)| *ok).count() == 1,
        "exactly one redemption wins: {outcomes:?}"
    );
    ensure!(
        outcomes
            .iter()
            .any(|(ok, err)| !ok && err.contains("join token refused")),
        "the loser is told the token was used: {outcomes:?}"
    );

    // The first controller dies: relays and agents go on with the second
    // (they were enrolled with it as a fallback), and a link created there
    // reaches them.
    c.controller.take().context("controller")?.kill();
    let target2 = hash_server().await?;
    let listen2 = format!("tcp://127.0.0.1:{}", free_tcp_port()?);
    c.ctl_at(
        &url2,
        &[
            "link",
            "create",
            "after",
            "--from",
            "a",
            "--listen",
            &listen2,
            "--to",
            "b",
            "--target",
            &format!("tcp://{target2}"),
        ],
    )?;
    let addr2 = listen_addr(c.agent("a")?, "after")?;
    round_trip_eventually(addr2, 1 << 20)
        .await
        .with_context(|| c.logs())?;
    // The relay heartbeats to the second controller: it stays healthy.
    tokio::time::sleep(Duration::from_secs(16)).await;
    let relays = c.ctl_at(&url2, &["relay", "list", "-o", "json"])?;
    let relays: Vec<api::RelayInfo> = serde_json::from_str(&relays)?;
    ensure!(
        relays.len() == 1 && relays[0].healthy,
        "the relay is still healthy at the second controller: {relays:?}"
    );
    round_trip(addr, 1 << 20, 3).await?;
    Ok(())
}

/// The leaf certificate the controller at `url` serves to a new
/// connection, checked against the pinned CA.
fn served_controller_cert(c: &Cluster, url: &str) -> Result<Vec<u8>> {
    use std::io::{Read, Write};
    let addr = url.trim_start_matches("https://");
    let mut roots = rustls::RootCertStore::empty();
    for cert in comsat::client::read_ca(&c.path("controller/ca.pem"))? {
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

fn controller_url(c: &Cluster) -> Result<String> {
    let text = std::fs::read_to_string(c.path("controller/context.toml"))?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("controller = "))
        .context("controller url")?
        .trim_matches('"')
        .to_owned())
}

fn write_then_rename(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_the_controller_certificate_drops_no_agent() -> Result<()> {
    use comsat_controller::pki::CaIssuer;
    let (c, listen, target) = demo(|t| t).await?;
    round_trip_eventually(listen, 1024)
        .await
        .with_context(|| c.logs())?;
    let url = controller_url(&c)?;
    let before = served_controller_cert(&c, &url)?;
    let dir = c.path("controller");

    // A broken certificate is refused; the current one is still served.
    std::fs::write(dir.join("tls.crt.bak"), std::fs::read(dir.join("tls.crt"))?)?;
    write_then_rename(&dir.join("tls.crt"), b"not a certificate")?;
    wait_for(CONVERGE, || {
        let log = std::fs::read_to_string(c.path("controller.log"))?;
        ensure!(
            log.contains("new HTTPS certificate refused"),
            "not refused yet"
        );
        Ok(())
    })?;
    ensure!(served_controller_cert(&c, &url)? == before);

    // A new certificate from the same CA, written key first: served to new
    // connections within seconds.
    let issuer = CaIssuer::from_pem(
        &std::fs::read_to_string(dir.join("ca.pem"))?,
        &std::fs::read_to_string(dir.join("ca.key"))?,
    )?;
    let (cert, key) = issuer.issue_server(
        vec!["127.0.0.1".into(), "localhost".into()],
        jwt::unix_now(),
        Duration::from_secs(3600),
    )?;
    comsat_protocol::keys::write_secret_file(&dir.join("tls.key"), key.as_bytes())?;
    write_then_rename(&dir.join("tls.crt"), cert.as_bytes())?;
    let want = comsat_controller::pki::certs_from_pem(cert.as_bytes())?[0]
        .as_ref()
        .to_vec();
    wait_for(CONVERGE, || {
        ensure!(
            served_controller_cert(&c, &url)? == want,
            "old certificate still served:\n{}",
            std::fs::read_to_string(c.path("controller.log")).unwrap_or_default()
        );
        Ok(())
    })?;

    // The agents, long-polling all along, still hear of changes: a new
    // link reaches them and carries bytes; the old one goes on.
    let listen2 = format!("tcp://127.0.0.1:{}", free_tcp_port()?);
    c.ctl_ok(&[
        "link",
        "create",
        "after-rotation",
        "--from",
        "a",
        "--listen",
        &listen2,
        "--to",
        "b",
        "--target",
        &format!("tcp://{target}"),
    ])?;
    let mut c = c;
    let addr2 = listen_addr(c.agent("a")?, "after-rotation")?;
    round_trip_eventually(addr2, 1 << 20)
        .await
        .with_context(|| c.logs())?;
    round_trip(listen, 1 << 20, 5).await?;
    for agent in ["a", "b"] {
        let log = std::fs::read_to_string(c.path(&format!("{agent}.log")))?;
        ensure!(
            !log.contains("cannot reach the controller"),
            "agent {agent} lost the controller during the rotation:\n{log}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_account_gets_only_what_its_role_allows() -> Result<()> {
    let c = Cluster::start(|t| t)?;
    // `create` prints the token and nothing else.
    let token = c.ctl_ok(&["serviceaccount", "create", "deployer"])?;
    ensure!(
        token.lines().count() == 1 && token.starts_with("comsat-sa-v1:"),
        "{token}"
    );
    let token_file = c.path("deployer.token");
    comsat_protocol::keys::write_secret_file(&token_file, token.as_bytes())?;
    c.ctl_ok(&[
        "rolebinding",
        "create",
        "deployer-ops",
        "--role",
        "operator",
        "--serviceaccount",
        "deployer",
    ])?;
    let url = controller_url(&c)?;
    let ca = s(&c.path("controller/ca.pem"));
    let as_deployer = |args: &[&str]| {
        let tf = s(&token_file);
        let mut all = vec![
            "ctl",
            "--controller",
            &url,
            "--token-file",
            &tf,
            "--ca",
            &ca,
        ];
        all.extend_from_slice(args);
        comsat(&all)
    };
    // The operator role may create join tokens...
    let (code, out, err) = as_deployer(&["token", "create", "--kind", "agent"])?;
    ensure!(
        code == 0 && out.starts_with("comsat-join-v1:"),
        "{code} {out} {err}"
    );
    // ...but not read roles: refused, non-zero, naming the permission.
    let (code, _, err) = as_deployer(&["role", "list"])?;
    ensure!(
        code != 0 && err.contains("`list` on `roles`"),
        "{code} {err}"
    );
    // A custom role, bound in place of the operator one.
    c.ctl_ok(&[
        "role",
        "create",
        "reader",
        "--rule",
        "links,agents:get,list",
    ])?;
    let roles = c.ctl_ok(&["role", "list"])?;
    ensure!(
        roles.contains("reader") && roles.contains("built-in"),
        "{roles}"
    );
    c.ctl_ok(&["rolebinding", "delete", "deployer-ops"])?;
    c.ctl_ok(&[
        "rolebinding",
        "create",
        "deployer-read",
        "--role",
        "reader",
        "--serviceaccount",
        "deployer",
    ])?;
    let (code, _, err) = as_deployer(&["link", "list"])?;
    ensure!(code == 0, "{err}");
    let (code, _, err) = as_deployer(&["token", "create", "--kind", "agent"])?;
    ensure!(
        code != 0 && err.contains("`create` on `tokens/agent`"),
        "{code} {err}"
    );
    // Deleting the account ends its token.
    c.ctl_ok(&["serviceaccount", "delete", "deployer"])?;
    let (code, _, err) = as_deployer(&["link", "list"])?;
    ensure!(code != 0 && err.contains("unauthorized"), "{code} {err}");
    let audit = c.ctl_ok(&[
        "audit",
        "list",
        "--subject",
        "serviceaccount:deployer",
        "-o",
        "json",
    ])?;
    ensure!(audit.contains("`list` on `roles`"), "{audit}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_is_idempotent_and_refuses_a_bad_file_whole() -> Result<()> {
    let mut c = Cluster::start(|t| t)?;
    c.enrol_agent("a")?;
    c.enrol_agent("b")?;
    let file = c.path("fleet.yaml");
    let text = "\
apiVersion: comsat.dev/v1
kind: ServiceAccount
metadata: {name: ci}
---
apiVersion: comsat.dev/v1
kind: Role
metadata: {name: reader}
spec:
  rules:
    - resources: [links, agents]
      verbs: [get, list]
---
apiVersion: comsat.dev/v1
kind: RoleBinding
metadata: {name: ci-reads}
spec: {role: reader, subject: {kind: serviceaccount, name: ci}}
---
apiVersion: comsat.dev/v1
kind: Link
metadata: {name: db}
spec:
  from: a
  listen: tcp://127.0.0.1:17432
  to: b
  target: tcp://127.0.0.1:5432
  maxFlows: 10
---
apiVersion: comsat.dev/v1
kind: JoinToken
metadata: {name: edge-c}
spec: {nodeKind: agent, ttl: 1h}
";
    std::fs::write(&file, text)?;
    let f = s(&file);
    let first = c.ctl_ok(&["apply", "-f", &f])?;
    for line in [
        "serviceaccount/ci created",
        "role/reader created",
        "rolebinding/ci-reads created",
        "link/db created",
        "jointoken/edge-c created",
    ] {
        ensure!(first.contains(line), "{line}: {first}");
    }
    ensure!(first.contains("comsat-sa-v1:") && first.contains("comsat-join-v1:"));
    let second = c.ctl_ok(&["apply", "-f", &f])?;
    ensure!(
        second.lines().count() == 5 && second.lines().all(|l| l.contains(" unchanged")),
        "the second apply changed something:\n{second}"
    );
    let links: Vec<api::LinkInfo> =
        serde_json::from_str(&c.ctl_ok(&["link", "list", "-o", "json"])?)?;
    ensure!(links.len() == 1 && links[0].max_flows == Some(10) && links[0].generation == 1);

    // What `get` prints, `apply` takes back unchanged.
    for (kind, name) in [
        ("link", "db"),
        ("role", "reader"),
        ("rolebinding", "ci-reads"),
        ("serviceaccount", "ci"),
    ] {
        let yaml = c.ctl_ok(&["get", kind, name, "-o", "yaml"])?;
        ensure!(yaml.contains("apiVersion: comsat.dev/v1"), "{yaml}");
        let back = c.path(&format!("{kind}.yaml"));
        std::fs::write(&back, &yaml)?;
        let again = c.ctl_ok(&["apply", "-f", &s(&back)])?;
        ensure!(
            again.trim() == format!("{kind}/{name} unchanged"),
            "{kind}: {again}\n{yaml}"
        );
    }

    // A limit changed in the file is an update of the same link.
    std::fs::write(&file, text.replace("maxFlows: 10", "maxFlows: 20"))?;
    let third = c.ctl_ok(&["apply", "-f", &f])?;
    ensure!(third.contains("link/db updated"), "{third}");
    let links: Vec<api::LinkInfo> =
        serde_json::from_str(&c.ctl_ok(&["link", "list", "-o", "json"])?)?;
    ensure!(links[0].max_flows == Some(20) && links[0].generation == 1);

    // A bad document: refused with the file, document and field named, and
    // nothing of the file applied.
    let bad = format!(
        "apiVersion: comsat.dev/v1\nkind: ServiceAccount\nmetadata: {{name: fresh}}\n---\n{}",
        text.replace("target: tcp", "tagret: tcp")
    );
    std::fs::write(&file, bad)?;
    let (code, _, err) = c.ctl(&["apply", "-f", &f])?;
    ensure!(
        code != 0
            && err.contains("fleet.yaml")
            && err.contains("document 5")
            && err.contains("tagret"),
        "{code} {err}"
    );
    let sas = c.ctl_ok(&["serviceaccount", "list"])?;
    ensure!(
        !sas.contains("fresh"),
        "a document of a refused file was applied: {sas}"
    );

    // Decommissioning an agent: refused while it holds a link, then done;
    // its credentials stop working at once.
    let (code, _, err) = c.ctl(&["agent", "delete", "a"])?;
    ensure!(code != 0 && err.contains("db"), "{code} {err}");
    c.ctl_ok(&["link", "delete", "db"])?;
    c.ctl_ok(&["agent", "delete", "a"])?;
    let agents = c.ctl_ok(&["agent", "list"])?;
    ensure!(!agents.lines().any(|l| l.starts_with("a ")), "{agents}");
    let (state, key) = node_key(&c, "a")?;
    let jwt = jwt::mint(&key, &state.node_id, &state.audience, jwt::unix_now(), 30)?;
    let (code, _) = raw_get(&c, api::PATH_AGENT_CONFIG, &jwt).await?;
    ensure!(code == 401, "a decommissioned agent is refused: {code}");
    let audit = c.ctl_ok(&["audit", "list", "-o", "json"])?;
    ensure!(
        audit.contains("agents.delete") && audit.contains("not enrolled"),
        "{audit}"
    );
    Ok(())
}

/// A relay enrolled with `--interactive-port` runs its interactive listener
/// and tells the controller; a link created with `ctl link create
/// --connection` reaches both agents with that name and the address, so
/// it rides a QUIC connection of its own to that listener and is served by
/// a thread of its own in the relay and both agents, beside a plain link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_created_with_a_connection_uses_the_relays_interactive_listener() -> Result<()> {
    let mut c = Cluster::start(|t| t)?;
    let lane_port = free_udp_port()?.to_string();
    c.enrol_relay_only_with("relay-1", &["--interactive-port", &lane_port])?;
    c.run_relay("relay-1")?;
    let lane = format!("127.0.0.1:{lane_port}");
    let log = c.relay_proc("relay-1")?.log_tail();
    ensure!(
        log.contains(&format!("interactive={lane}")),
        "the relay runs its interactive listener:\n{log}"
    );
    // A relay enrolled without an interactive port refuses to run one:
    // agents would never hear of it.
    c.enrol_relay_only("relay-2")?;
    let lane_2 = format!("127.0.0.1:{}", free_udp_port()?);
    let dir_2 = s(&c.path("relay-2"));
    let args = [
        "relay",
        "run",
        "--data-dir",
        &dir_2,
        "--interactive-listen",
        &lane_2,
    ];
    let (code, _, err) = comsat(&args)?;
    ensure!(
        code == 2 && err.contains("enrolled without --interactive-port"),
        "{code}: {err}"
    );
    c.enrol_agent("a")?;
    c.enrol_agent("b")?;
    c.wait_relays_healthy(1)?;
    let relays: Vec<api::RelayInfo> =
        serde_json::from_str(&c.ctl_ok(&["relay", "list", "-o", "json"])?)?;
    let lane_of = |name: &str| {
        relays
            .iter()
            .find(|r| r.name == name)
            .map(|r| r.interactive_addr.clone())
    };
    ensure!(
        lane_of("relay-1") == Some(Some(lane.clone())) && lane_of("relay-2") == Some(None),
        "{relays:?}"
    );
    let target = hash_server().await?;
    for (name, connection) in [("plain", None), ("rpc", Some("interactive"))] {
        let listen = format!("tcp://127.0.0.1:{}", free_tcp_port()?);
        let target = format!("tcp://{target}");
        let mut args = vec![
            "link", "create", name, "--from", "a", "--listen", &listen, "--to", "b", "--target",
            &target,
        ];
        if let Some(conn) = connection {
            args.extend(["--connection", conn]);
        }
        c.ctl_ok(&args)?;
    }
    let shown = c.ctl_ok(&["link", "show", "rpc"])?;
    ensure!(shown.contains("\nconnection: interactive "), "{shown}");
    for name in ["plain", "rpc"] {
        let listen = listen_addr(c.agent("a")?, name)?;
        round_trip_eventually(listen, 1 << 20)
            .await
            .with_context(|| c.logs())?;
    }
    // Three connections per agent: the shared one, its lane (the relay
    // offers one: the plain link's flows start there) and the rpc link's.
    let admin = c.relay_admin("relay-1")?;
    let connections_become = |n: f64| {
        wait_for(CONVERGE, || {
            let open = metric(&scrape(admin)?, "comsat_relay_connections_open");
            ensure!(open == n, "{open} relay connections open, not {n}");
            Ok(())
        })
    };
    connections_become(6.0).with_context(|| c.logs())?;
    let mut pids = vec![c.relay_proc("relay-1")?.pid()];
    for agent in ["a", "b"] {
        // Its rpc session reached the relay on the interactive listener.
        let p = c.agent(agent)?;
        let log = p.log();
        let session = format!("relay{{addr={lane} connection=interactive}}");
        ensure!(
            log.lines()
                .any(|l| l.contains(&session) && l.ends_with("connected to relay")),
            "agent {agent}: no `{session}` connected:\n{log}"
        );
        let beside = format!("lane{{addr={lane}}}");
        ensure!(
            log.lines()
                .any(|l| l.contains(&beside) && l.ends_with("lane connected")),
            "agent {agent}: no `{beside}` connected:\n{log}"
        );
        pids.push(p.pid());
    }
    for pid in pids {
        ensure!(
            comsat_tests::threads_named(pid, "comsat-lane")? >= 1,
            "process {pid} has no lane thread"
        );
        // `relay run` and `agent run --bulk-nice` of enrolled nodes.
        comsat_tests::main_threads_yield_to_the_lane(pid, BULK_NICE.parse()?)?;
    }

    // Moved onto the same connection, the plain link joins rpc there: it
    // carries bytes again and the agents' shared connections (and their
    // lanes) go away.
    c.ctl_ok(&["link", "update", "plain", "--connection", "interactive"])?;
    let shown = c.ctl_ok(&["link", "show", "plain"])?;
    ensure!(shown.contains("\nconnection: interactive "), "{shown}");
    let listen = listen_addr(c.agent("a")?, "plain")?;
    round_trip_eventually(listen, 1 << 20)
        .await
        .with_context(|| c.logs())?;
    connections_become(2.0).with_context(|| c.logs())?;
    Ok(())
}
