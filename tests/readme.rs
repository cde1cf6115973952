//! The documentation, run as written: every command of every `sh` block of
//! README.md and docs/*.md, and every configuration example.
//!
//! Each scenario test below runs the `sh` blocks of one section of a
//! document, in order, in a temporary directory of its own, after the
//! sections it continues (docs/operations.md continues the README's deploy
//! guide, for one). Commands run as written, with these rewrites, each
//! printed beside the command: `/var/lib/comsat` and `/run/app` become
//! directories of the test; every fixed loopback port (`127.0.0.1:PORT`,
//! and the port after `--interactive-port` and the like) becomes a free
//! one, the same one throughout the scenario; `cargo run --release --` and
//! `./target/release/comsat` are the binary under test, and a command that
//! uses fixed ports by default gets them spelled out, so they are mapped
//! too; `TOKEN_ID` becomes an id from the list the guide shows, and the
//! PostgreSQL URL the database of `COMSAT_TEST_POSTGRES_URL` (without it
//! the PostgreSQL scenario says why it skips). `cargo test --workspace` is
//! the one command not run: it is what runs this test.
//!
//! Long-running commands (`comsat … run`, `comsat up`, `python3 -m
//! http.server`) start in the background and are waited for until ready;
//! every other command must exit 0 within a minute. Where `comsat ctl link
//! create` names TCP ends, a service answers at the link's target and bytes
//! must cross the link. Everything runs on loopback, and every process a
//! scenario starts is ended, by its PID, when the scenario ends.
//!
//! `every_sh_block_is_run_by_a_scenario` fails when a section holds `sh`
//! commands that no scenario runs, or a block has no language;
//! `every_configuration_example_loads` loads each TOML example with the
//! code that reads that file (YAML examples are applied by their sections'
//! commands).

use std::collections::{HashMap, HashSet};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use comsat_tests::Proc;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_comsat");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// How long a command that does not run in the background may take.
const SH_TIMEOUT: Duration = Duration::from_secs(60);

/// A section of a document: its path in the repository and its `## `
/// heading.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Section(&'static str, &'static str);

const QUICKSTART: Section = Section("README.md", "The two commands");
const DEPLOY: Section = Section("README.md", "Deploy with a controller");
const OPERATING_RELAYS: Section = Section("docs/operations.md", "Operating relays");
const POSTGRES: Section = Section("docs/operations.md", "Several controllers on PostgreSQL");
const METRICS: Section = Section("docs/operations.md", "Metrics and health");
const STATIC: Section = Section("docs/operations.md", "A static setup, without a controller");
const APPLY: Section = Section(
    "docs/configuration.md",
    "`comsat ctl apply`: declarative configuration",
);
const SECRETS: Section = Section("docs/security.md", "Keys and secrets");

/// Commands of the documents that are not run, and why.
const NOT_RUN: &[(&str, &str)] = &[("cargo test --workspace", "it is what runs this test")];

/// The PostgreSQL URL of docs/operations.md, replaced by a fresh database.
const DOC_DATABASE_URL: &str = "postgres://comsat:PASSWORD@db.example:5432/comsat?sslmode=verify-full&sslrootcert=/etc/comsat/db-ca.pem";

/// Where a port number follows in a command or file, to be mapped.
const PORT_MARKERS: &[&str] = &[
    "127.0.0.1:",
    "--interactive-port ",
    "--controller-port ",
    "--relay-port ",
    "--relay-interactive-port ",
    "http.server ",
];

/// Defines the scenario tests and `SCENARIOS`, the list of the sections
/// each runs (the last is the section it is about), from one table.
macro_rules! scenarios {
    ($($(#[doc = $doc:literal])* $name:ident: [$($section:expr),+];)+) => {
        /// Every scenario: the sections it runs, in order.
        const SCENARIOS: &[&[Section]] = &[$(&[$($section),+]),+];
        $(
            $(#[doc = $doc])*
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() -> Result<()> {
                run_scenario(&[$($section),+]).await
            }
        )+
    };
}

scenarios! {
    /// README, "The two commands": `comsat up` (what `cargo run --release
    /// -- up` runs), then curl through its demo link and `comsat ctl`.
    the_quickstart_works_as_written: [QUICKSTART];
    /// README, "Deploy with a controller": a controller, a relay and two
    /// agents enrolled with join tokens; bytes cross the link it creates;
    /// roles, service accounts and the audit log.
    the_deploy_guide_works_as_written: [DEPLOY];
    /// docs/operations.md, "Operating relays", after the deploy guide: a
    /// second relay, limits, an interactive link, drain and restart,
    /// reload, a Unix-socket link.
    operating_relays_works_as_written: [DEPLOY, OPERATING_RELAYS];
    /// docs/operations.md, "Several controllers on PostgreSQL": two
    /// controllers on one database, a node enrolled with a fallback.
    several_controllers_on_postgresql_work_as_written: [POSTGRES];
    /// docs/operations.md, "Metrics and health", after the deploy guide.
    metrics_and_health_work_as_written: [DEPLOY, METRICS];
    /// docs/operations.md, "A static setup, without a controller":
    /// `comsat dev init`, a relay and two agents from their files, curl
    /// through the link, a reload.
    the_static_setup_works_as_written: [STATIC];
    /// docs/configuration.md, `comsat ctl apply`, after the deploy guide:
    /// the YAML example applied twice, and a link's document taken back.
    the_apply_example_works_as_written: [DEPLOY, APPLY];
    /// docs/security.md, "Keys and secrets", after the deploy guide: key
    /// file modes, and an enrolment whose token never touches a disk.
    the_security_checks_work_as_written: [DEPLOY, SECRETS];
}

/// A fenced block of a document.
#[derive(Debug)]
struct Block {
    /// Its language tag (empty if none).
    lang: String,
    body: String,
    /// The `## ` heading it is under.
    section: String,
    /// Its first line, 1-based.
    line: usize,
}

/// Every fenced block of `doc`, with the section it is in.
fn blocks(doc: &str) -> Result<Vec<Block>> {
    let mut out = Vec::new();
    let mut section = String::new();
    let mut open: Option<Block> = None;
    for (i, line) in doc.lines().enumerate() {
        let fence = line.trim_start().strip_prefix("```");
        if let Some(block) = &mut open {
            if fence.is_some() {
                out.extend(open.take());
            } else {
                block.body.push_str(line);
                block.body.push('\n');
            }
            continue;
        }
        if let Some(heading) = line.strip_prefix("## ") {
            heading.trim().clone_into(&mut section);
        }
        if let Some(info) = fence {
            open = Some(Block {
                lang: info.trim().to_owned(),
                body: String::new(),
                section: section.clone(),
                line: i + 1,
            });
        }
    }
    if let Some(b) = open {
        bail!("the block of line {} is never closed", b.line);
    }
    Ok(out)
}

/// The commands of an `sh` block: continuation lines joined, comments and
/// blank lines dropped.
fn commands(body: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut pending = String::new();
    for line in body.lines() {
        let line = match line.find("  #") {
            Some(i) => &line[..i],
            None => line,
        };
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(head) = line.strip_suffix('\\') {
            pending.push_str(head.trim_end());
            pending.push(' ');
            continue;
        }
        pending.push_str(line);
        out.push(std::mem::take(&mut pending));
    }
    out
}

/// The file a configuration example is, from its first line (`# NAME`).
fn file_name(body: &str) -> Option<String> {
    let first = body.lines().next()?.strip_prefix("# ")?.trim();
    (!first.contains(' ') && first.contains('.')).then(|| first.to_owned())
}

/// What a section asks for, in order.
#[derive(Debug, PartialEq, Eq)]
enum Item {
    /// A command of an `sh` block.
    Run(String),
    /// A YAML or TOML example with a file name: written into the
    /// scenario's directory where it appears, for the commands after it.
    File(String, String),
}

fn items(doc: &str, heading: &str) -> Result<Vec<Item>> {
    let mut out = Vec::new();
    for b in blocks(doc)?.into_iter().filter(|b| b.section == heading) {
        match b.lang.as_str() {
            "sh" => out.extend(commands(&b.body).into_iter().map(Item::Run)),
            "yaml" | "toml" => {
                if let Some(name) = file_name(&b.body) {
                    out.push(Item::File(name, b.body));
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

/// README.md and every docs/*.md, by their paths in the repository.
fn documents() -> Result<Vec<(String, String)>> {
    let mut names = vec!["README.md".to_owned()];
    let mut docs: Vec<String> = std::fs::read_dir(Path::new(ROOT).join("docs"))?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    docs.retain(|n| n.ends_with(".md"));
    docs.sort();
    names.extend(docs.into_iter().map(|n| format!("docs/{n}")));
    names
        .into_iter()
        .map(|n| {
            let text = std::fs::read_to_string(Path::new(ROOT).join(&n))
                .with_context(|| format!("reading {n}"))?;
            Ok((n, text))
        })
        .collect()
}

/// A port on 127.0.0.1 that was free, for TCP and UDP alike, a moment ago.
fn free_port(taken: &HashSet<u16>) -> Result<u16> {
    for _ in 0..100 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        if !taken.contains(&port) && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port")
}

/// The value after `flag` in a command.
fn flag<'a>(cmd: &'a str, flag: &str) -> Option<&'a str> {
    cmd.split_whitespace().skip_while(|w| *w != flag).nth(1)
}

/// A TCP service answering with the SHA-256 of what it read until EOF.
async fn hash_service(addr: &str) -> Result<()> {
    let l = tokio::net::TcpListener::bind(addr).await?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut h = Sha256::new();
                let mut buf = vec![0u8; 65536];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                }
                let _ = s.write_all(&h.finalize()).await;
            });
        }
    });
    Ok(())
}

/// An HTTP service answering every request with a short page: what the
/// static setup's `python3 -m http.server` is for, where there is no
/// python3.
async fn http_stand_in(addr: &str) -> Result<()> {
    let l = tokio::net::TcpListener::bind(addr).await?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let body = "a stand-in for python3 -m http.server\n";
                let resp = format!(
                    "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    Ok(())
}

/// Sends 1 MiB through `addr` until the digest the hash service sends back
/// is right.
async fn through(addr: &str) -> Result<()> {
    let data = vec![0x5au8; 1 << 20];
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let attempt = async {
            let mut s = tokio::net::TcpStream::connect(addr).await?;
            s.write_all(&data).await?;
            s.shutdown().await?;
            let mut got = Vec::new();
            s.read_to_end(&mut got).await?;
            ensure!(got == Sha256::digest(&data).as_slice(), "wrong digest");
            anyhow::Ok(())
        };
        match tokio::time::timeout(Duration::from_secs(10), attempt).await {
            Ok(Ok(())) => return Ok(()),
            _ if Instant::now() > deadline => bail!("no bytes crossed the link at {addr}"),
            _ => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// Runs `cmd` with bash in `dir`, in a process group of its own; returns
/// its standard output. Past [`SH_TIMEOUT`] the group is killed.
fn sh(dir: &Path, env: &[(String, String)], path: &str, cmd: &str) -> Result<String> {
    let out_file = dir.join(".command.out");
    let err_file = dir.join(".command.err");
    let mut child = Command::new("bash")
        .args(["-euo", "pipefail", "-c", cmd])
        .current_dir(dir)
        .envs(env.iter().cloned())
        .env("PATH", path)
        .env("COMSAT_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_file)?)
        .stderr(std::fs::File::create(&err_file)?)
        .process_group(0)
        .spawn()
        .context("spawning bash")?;
    let deadline = Instant::now() + SH_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if status.is_none() {
        // Not reaped yet, so the group is still ours.
        let _ = Command::new("kill")
            .args(["-s", "KILL", "--", &format!("-{}", child.id())])
            .status();
        let _ = child.wait();
    }
    let stdout = std::fs::read_to_string(&out_file).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_file).unwrap_or_default();
    eprint!("{stdout}{stderr}");
    match status {
        None => bail!("did not finish within {SH_TIMEOUT:?}: {cmd}\n{stdout}{stderr}"),
        Some(s) if !s.success() => bail!("failed ({s}): {cmd}\n{stdout}{stderr}"),
        Some(_) => Ok(stdout),
    }
}

/// How to know a background command is ready.
enum Ready {
    /// It prints a line starting with this.
    Line(&'static str),
    /// It accepts TCP connections on this port.
    Port(u16),
}

/// One scenario's directory, environment, port map and processes.
struct Scenario {
    dir: tempfile::TempDir,
    /// `PATH`, with `comsat` (the binary under test) first.
    path: String,
    /// What `export` commands set.
    env: Vec<(String, String)>,
    /// Fixed ports of the documents to free ones.
    ports: HashMap<u16, u16>,
    /// The database that stands in for the documents' PostgreSQL URL.
    database: Option<String>,
    /// Background processes, ended by PID when dropped.
    background: Vec<Proc>,
    /// Addresses where this test serves a link's target.
    services: HashSet<String>,
    /// Commands run.
    ran: usize,
}

impl Scenario {
    fn new() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let bin_dir = dir.path().join("bin");
        std::fs::create_dir(&bin_dir)?;
        std::os::unix::fs::symlink(BIN, bin_dir.join("comsat"))?;
        std::fs::create_dir(dir.path().join("run-app"))?;
        let path = format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        Ok(Self {
            dir,
            path,
            env: Vec::new(),
            ports: HashMap::new(),
            database: None,
            background: Vec::new(),
            services: HashSet::new(),
            ran: 0,
        })
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The free port standing in for `port`.
    fn port(&mut self, port: u16) -> Result<u16> {
        if let Some(p) = self.ports.get(&port) {
            return Ok(*p);
        }
        let taken = self.ports.values().copied().collect();
        let free = free_port(&taken)?;
        self.ports.insert(port, free);
        Ok(free)
    }

    /// `text` with its paths and fixed ports mapped to the scenario's.
    fn map(&mut self, text: &str) -> Result<String> {
        let text = text
            .replace(
                "/var/lib/comsat",
                &self.dir().join("var-lib-comsat").display().to_string(),
            )
            .replace(
                "/run/app/",
                &format!("{}/", self.dir().join("run-app").display()),
            );
        let mut out = String::new();
        let mut rest = text.as_str();
        loop {
            let next = PORT_MARKERS
                .iter()
                .filter_map(|m| rest.find(m).map(|i| (i, m.len())))
                .min();
            let Some((i, len)) = next else {
                out.push_str(rest);
                break;
            };
            out.push_str(&rest[..i + len]);
            rest = &rest[i + len..];
            let digits = rest.chars().take_while(char::is_ascii_digit).count();
            if digits > 0 {
                let port = rest[..digits].parse().context("a port")?;
                out.push_str(&self.port(port)?.to_string());
                rest = &rest[digits..];
            }
        }
        Ok(out)
    }

    /// The command the scenario runs for `raw`, or `None` for one of
    /// [`NOT_RUN`].
    fn rewrite(&mut self, raw: &str) -> Result<Option<String>> {
        if let Some((_, why)) = NOT_RUN.iter().find(|(c, _)| *c == raw) {
            eprintln!("  not run: {why}");
            return Ok(None);
        }
        let mut cmd = raw
            .replace("cargo run --release -- ", "comsat ")
            .replace("./target/release/comsat ", "comsat ");
        // Fixed ports a command uses unless told, spelled out to be mapped.
        let defaults: &[(&str, &[(&str, &str)])] = &[
            (
                "comsat up",
                &[
                    ("--controller-port", "8443"),
                    ("--relay-port", "4433"),
                    ("--relay-interactive-port", "4434"),
                    ("--demo-listen", "127.0.0.1:7000"),
                ],
            ),
            (
                "comsat dev init",
                &[
                    ("--relay-listen", "127.0.0.1:4433"),
                    ("--relay-admin", "127.0.0.1:9101"),
                    ("--agent-a-admin", "127.0.0.1:9201"),
                    ("--agent-b-admin", "127.0.0.1:9202"),
                ],
            ),
        ];
        for (prefix, flags) in defaults {
            if cmd.starts_with(prefix) {
                for (f, v) in *flags {
                    if flag(&cmd, f).is_none() {
                        cmd.push_str(&format!(" {f} {v}"));
                    }
                }
            }
        }
        let mut cmd = self.map(&cmd)?;
        if cmd.contains(DOC_DATABASE_URL) {
            let db = self.database.as_deref().context("no test database")?;
            cmd = cmd.replace(DOC_DATABASE_URL, db);
        }
        if cmd.contains("TOKEN_ID") {
            let name = flag(&cmd, "revoke").context("TOKEN_ID outside `revoke NAME`")?;
            let id = self.token_id(name)?;
            cmd = cmd.replace("TOKEN_ID", &id);
        }
        if cmd != raw {
            eprintln!("  as: {cmd}");
        }
        Ok(Some(cmd))
    }

    /// The id of an unrevoked API token of service account `name`.
    fn token_id(&self, name: &str) -> Result<String> {
        let out = sh(
            self.dir(),
            &self.env,
            &self.path,
            "comsat ctl serviceaccount list -o json",
        )?;
        let list: serde_json::Value = serde_json::from_str(&out)?;
        list.as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["name"] == name)
            .flat_map(|p| p["tokens"].as_array().into_iter().flatten())
            .find(|t| t["revoked_at"].is_null())
            .and_then(|t| t["id"].as_str())
            .map(str::to_owned)
            .with_context(|| format!("no token of serviceaccount {name}: {out}"))
    }

    /// Runs one item of a section.
    async fn step(&mut self, item: Item) -> Result<()> {
        let raw = match item {
            Item::File(name, text) => {
                let text = self.map(&text)?;
                std::fs::write(self.dir().join(&name), text)?;
                eprintln!("(wrote {name})");
                return Ok(());
            }
            Item::Run(raw) => raw,
        };
        eprintln!("$ {raw}");
        let Some(cmd) = self.rewrite(&raw)? else {
            return Ok(());
        };
        self.ran += 1;
        if let Some(assign) = cmd.strip_prefix("export ") {
            let (k, _) = assign.split_once('=').context("export K=V")?;
            let value = sh(
                self.dir(),
                &self.env,
                &self.path,
                &format!("{cmd}; printf '%s' \"${k}\""),
            )?;
            self.env.push((k.to_owned(), value));
            return Ok(());
        }
        if let Some(ready) = self.background_ready(&cmd)? {
            return self.start(&cmd, ready).await;
        }
        let link = cmd.starts_with("comsat ctl link create");
        if link {
            // The link's target: a service to reach through it.
            if let Some(target) = flag(&cmd, "--target").and_then(|t| t.strip_prefix("tcp://"))
                && self.services.insert(target.to_owned())
            {
                hash_service(target).await?;
            }
        }
        let (dir, env, path, c) = (
            self.dir().to_owned(),
            self.env.clone(),
            self.path.clone(),
            cmd.clone(),
        );
        tokio::task::spawn_blocking(move || sh(&dir, &env, &path, &c)).await??;
        if link {
            let tcp = |f| flag(&cmd, f).and_then(|a| a.strip_prefix("tcp://"));
            if let (Some(listen), Some(_)) = (tcp("--listen"), tcp("--target")) {
                through(listen).await?;
            }
        }
        Ok(())
    }

    /// How to know `cmd` is ready, if it runs in the background.
    fn background_ready(&self, cmd: &str) -> Result<Option<Ready>> {
        const LINES: &[(&str, &str)] = &[
            ("comsat controller run", "comsat controller listening"),
            ("comsat relay run", "comsat relay listening"),
            ("comsat agent run", "comsat agent started"),
            ("comsat up", "comsat up ready"),
        ];
        if let Some((_, line)) = LINES.iter().find(|(p, _)| cmd.starts_with(p)) {
            return Ok(Some(Ready::Line(line)));
        }
        if cmd.starts_with("python3 -m http.server") {
            let port = flag(cmd, "http.server").context("http.server PORT")?;
            return Ok(Some(Ready::Port(port.parse()?)));
        }
        Ok(None)
    }

    /// Starts a long-running command in the background (in the scenario's
    /// directory, with its environment) and waits until it is ready.
    async fn start(&mut self, cmd: &str, ready: Ready) -> Result<()> {
        ensure!(
            !cmd.contains(['"', '\'', '$', '|', '>', '<', ';', '&']),
            "a command that keeps running must be plain words: {cmd}"
        );
        let words: Vec<&str> = cmd.split_whitespace().collect();
        let program = match words[0] {
            "comsat" => BIN,
            "python3" if !on_path("python3") => {
                let Ready::Port(port) = ready else {
                    bail!("python3 without a port");
                };
                eprintln!("  python3 is not installed: a stand-in serves HTTP on its port");
                return http_stand_in(&format!("127.0.0.1:{port}")).await;
            }
            other => other,
        };
        let dir = self.dir().display().to_string();
        let mut args: Vec<String> = vec![
            "-c".into(),
            "cd -- \"$1\" && shift && exec env \"$@\"".into(),
            "bash".into(),
            dir,
            format!("PATH={}", self.path),
            "PYTHONUNBUFFERED=1".into(),
        ];
        args.extend(self.env.iter().map(|(k, v)| format!("{k}={v}")));
        args.push(program.to_owned());
        args.extend(words[1..].iter().map(|w| (*w).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let name = format!("step-{}", self.ran);
        let mut p = Proc::spawn("bash", &name, &args, self.dir())?;
        match ready {
            Ready::Line(line) => {
                p.wait_line(line, comsat_tests::proc::START_TIMEOUT)?;
            }
            Ready::Port(port) => {
                let deadline = Instant::now() + Duration::from_secs(20);
                while tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_err()
                {
                    ensure!(p.is_running(), "{cmd} exited:\n{}", p.log_tail());
                    ensure!(
                        Instant::now() < deadline,
                        "{cmd}: nothing listens on {port}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        self.background.push(p);
        Ok(())
    }

    /// The last lines of every background process's log.
    fn logs(&self) -> String {
        self.background
            .iter()
            .map(|p| format!("--- {}\n{}", p.name(), p.log_tail()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn on_path(program: &str) -> bool {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .any(|d| Path::new(d).join(program).is_file())
}

/// Runs `sections` in order in one new scenario.
async fn run_scenario(sections: &[Section]) -> Result<()> {
    let started = Instant::now();
    let mut s = Scenario::new()?;
    if sections.contains(&POSTGRES) {
        use comsat_controller::store::testing::{fresh_database, postgres_server};
        let Some(server) = postgres_server() else {
            eprintln!(
                "not run: {}, section `{}`, needs a PostgreSQL server",
                POSTGRES.0, POSTGRES.1
            );
            return Ok(());
        };
        s.database = Some(fresh_database(&server).await?);
    }
    for &Section(file, heading) in sections {
        let doc = std::fs::read_to_string(PathBuf::from(ROOT).join(file))?;
        let items = items(&doc, heading)?;
        ensure!(
            items.iter().any(|i| matches!(i, Item::Run(_))),
            "{file}: no sh command under `## {heading}`"
        );
        eprintln!("## {file}: {heading}");
        for item in items {
            if let Err(e) = s.step(item).await {
                return Err(e.context(format!(
                    "{file}, section `{heading}`; the processes' logs:\n{}",
                    s.logs()
                )));
            }
        }
    }
    eprintln!("{} commands in {:?}", s.ran, started.elapsed());
    Ok(())
}

/// Every section with `sh` commands is the subject of a scenario, and
/// every block says what it holds: `sh` for the commands a user runs in a
/// terminal (which the scenarios run), `toml`, `yaml`, `ini` or `text` for
/// the rest. A YAML example is a named file its section's commands use.
#[test]
fn every_sh_block_is_run_by_a_scenario() -> Result<()> {
    let covered: HashSet<Section> = SCENARIOS.iter().filter_map(|s| s.last().copied()).collect();
    let mut sh_sections = HashSet::new();
    for (file, doc) in documents()? {
        let blocks = blocks(&doc)?;
        for b in &blocks {
            let at = format!("{file}:{} (section `{}`)", b.line, b.section);
            match b.lang.as_str() {
                "sh" => {
                    let run = covered
                        .iter()
                        .any(|Section(f, h)| *f == file && *h == b.section);
                    ensure!(
                        run,
                        "{at}: no scenario runs this sh block: add one to `scenarios!` in tests/readme.rs"
                    );
                    sh_sections.insert((file.clone(), b.section.clone()));
                }
                "yaml" => {
                    let name = file_name(&b.body).with_context(|| {
                        format!("{at}: a yaml example starts with `# NAME.yaml`")
                    })?;
                    let used = blocks.iter().any(|o| {
                        o.lang == "sh"
                            && o.section == b.section
                            && commands(&o.body).iter().any(|c| c.contains(&name))
                    });
                    ensure!(used, "{at}: no sh command of its section uses {name}");
                }
                "toml" | "ini" | "text" => {}
                "" => bail!(
                    "{at}: a block without a language: tag it `sh` (commands a user runs, which \
                     this test runs) or `toml`, `yaml`, `ini`, `text`"
                ),
                other => bail!(
                    "{at}: language `{other}`: use `sh` for shell commands, or `toml`, `yaml`, \
                     `ini`, `text`"
                ),
            }
        }
    }
    for s in SCENARIOS {
        for Section(f, h) in *s {
            ensure!(
                sh_sections.contains(&((*f).to_owned(), (*h).to_owned())),
                "{f}: no sh block under `## {h}`"
            );
        }
    }
    // The deploy guide keeps its commands, and a link to carry bytes.
    let readme = std::fs::read_to_string(Path::new(ROOT).join(DEPLOY.0))?;
    let cmds: Vec<Item> = items(&readme, DEPLOY.1)?;
    ensure!(cmds.len() >= 10, "the guide lost its commands: {cmds:?}");
    ensure!(
        cmds.iter()
            .any(|i| matches!(i, Item::Run(c) if c.starts_with("comsat ctl link create"))),
        "the guide creates no link"
    );
    Ok(())
}

/// Every TOML example is named by its first line (`# relay.toml`, …) and
/// loads with the code that reads that file, checks included.
#[test]
fn every_configuration_example_loads() -> Result<()> {
    let mut loaded = Vec::new();
    for (file, doc) in documents()? {
        for b in blocks(&doc)?.into_iter().filter(|b| b.lang == "toml") {
            let at = format!("{file}:{}", b.line);
            let name = file_name(&b.body)
                .with_context(|| format!("{at}: a toml example starts with `# NAME.toml`"))?;
            let dir = tempfile::tempdir()?;
            let path = dir.path().join(&name);
            std::fs::write(&path, &b.body)?;
            match name.as_str() {
                "relay.toml" => {
                    comsat_relay::RelayConfig::load(&path).with_context(|| at.clone())?;
                }
                "agent.toml" => {
                    comsat_agent::AgentConfig::load(&path).with_context(|| at.clone())?;
                }
                "consent.toml" => {
                    comsat_agent::consent::Consent::load(dir.path()).with_context(|| at.clone())?;
                }
                "controller.toml" => {
                    comsat_controller::ControllerConfig::load(dir.path())
                        .with_context(|| at.clone())?;
                }
                other => bail!("{at}: nothing here loads {other}"),
            }
            loaded.push(name);
        }
    }
    loaded.sort();
    ensure!(
        loaded
            == [
                "agent.toml",
                "consent.toml",
                "controller.toml",
                "relay.toml"
            ],
        "examples loaded: {loaded:?}"
    );
    Ok(())
}

#[test]
fn commands_and_examples_are_read_from_their_blocks() -> Result<()> {
    let text = "## A\n```sh\nx \\\n  --y 1  # note\n# skip\n\nz\n```\n```toml\n# a.toml\nk = 1\n```\n\
                ```text\nnot run\n```\n## B\n```sh\nw\n```\n";
    assert_eq!(
        items(text, "A")?,
        [
            Item::Run("x --y 1".into()),
            Item::Run("z".into()),
            Item::File("a.toml".into(), "# a.toml\nk = 1\n".into())
        ]
    );
    assert_eq!(items(text, "B")?, [Item::Run("w".into())]);
    let langs: Vec<String> = blocks(text)?.into_iter().map(|b| b.lang).collect();
    assert_eq!(langs, ["sh", "toml", "text", "sh"]);
    Ok(())
}

#[test]
fn fixed_ports_and_paths_are_mapped_alike_everywhere() -> Result<()> {
    let mut s = Scenario::new()?;
    let a = s.map("--admin 127.0.0.1:9101 https://127.0.0.1:8443 db.example:5432")?;
    let b = s.map("curl 127.0.0.1:9101/readyz --interactive-port 4444 /var/lib/comsat/x")?;
    let p = s.ports[&9101];
    assert!(a.starts_with(&format!("--admin 127.0.0.1:{p} https://127.0.0.1:")));
    assert!(a.ends_with(" db.example:5432"), "{a}");
    assert!(
        b.starts_with(&format!(
            "curl 127.0.0.1:{p}/readyz --interactive-port {} ",
            s.ports[&4444]
        )),
        "{b}"
    );
    assert!(!b.contains("/var/lib/comsat"), "{b}");
    Ok(())
}
