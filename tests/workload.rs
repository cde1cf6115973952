//! Workload attestation at the listening agent: a link's `allow` rules
//! admit the local callers they name, by executable or by uid, and refuse
//! every other before a byte of it leaves the agent, logging and counting
//! the refusal with the caller's selectors.

mod common;
#[path = "common/flows.rs"]
mod flows;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use common::{Options, System};
use comsat_tests::{metric, scrape};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use flows::link;

const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// A target that answers each connection's first line with `hello LINE`,
/// and keeps the lines it got.
async fn greeter() -> Result<(String, Arc<Mutex<Vec<String>>>)> {
    let target = TcpListener::bind("127.0.0.1:0").await?;
    let addr = format!("tcp://{}", target.local_addr()?);
    let got = Arc::new(Mutex::new(Vec::new()));
    let lines = got.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = target.accept().await {
            let lines = lines.clone();
            tokio::spawn(async move {
                let (r, mut w) = s.into_split();
                let mut line = String::new();
                if BufReader::new(r).read_line(&mut line).await.is_ok() {
                    let line = line.trim_end().to_owned();
                    let _ = w.write_all(format!("hello {line}\n").as_bytes()).await;
                    lines.lock().expect("lock").push(line);
                }
            });
        }
    });
    Ok((addr, got))
}

/// Bash, copied to `name` in `dir`; `salt` appended makes its SHA-256
/// another (bash runs the same).
fn bash_copy(dir: &Path, name: &str, salt: &[u8]) -> Result<PathBuf> {
    let bash = ["/bin/bash", "/usr/bin/bash"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .context("bash is needed as a TCP client (/dev/tcp)")?;
    let mut bytes = std::fs::read(bash)?;
    bytes.extend_from_slice(salt);
    let path = dir.join(name);
    std::fs::write(&path, bytes)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

/// Runs `client` (a bash) to send `line` to `addr` and read the answer:
/// the answer, or `None` if the connection gave none.
async fn call(client: &Path, addr: std::net::SocketAddr, line: &str) -> Result<Option<String>> {
    let script = format!(
        "exec 3<>/dev/tcp/{}/{} || exit 3; printf '%s\\n' {line} >&3; read -r answer <&3 || exit 4; printf '%s' \"$answer\"",
        addr.ip(),
        addr.port()
    );
    // coreutils' `timeout` runs the client as its child, and ends it if
    // it hangs.
    let mut cmd = std::process::Command::new("timeout");
    cmd.arg(CLIENT_TIMEOUT.as_secs().to_string())
        .arg(client)
        .args(["--norc", "-c", &script]);
    let out = tokio::task::spawn_blocking(move || cmd.output()).await??;
    if out.status.code() == Some(124) {
        bail!("{} hung", client.display());
    }
    Ok(out
        .status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_allowed_executable_reaches_a_tcp_link() -> Result<()> {
    let bin = tempfile::tempdir()?;
    let allowed = bash_copy(bin.path(), "allowed-client", b"")?;
    let other = bash_copy(bin.path(), "other-client", b"\0another build")?;
    let allowed_hash = hex::encode(Sha256::digest(std::fs::read(&allowed)?));
    let (by_path_target, by_path_got) = greeter().await?;
    let (by_hash_target, by_hash_got) = greeter().await?;
    let mut by_path = link("by-path", "tcp://127.0.0.1:0".into(), by_path_target);
    by_path.allow = vec![format!("unix:path:{}", allowed.display())];
    let mut by_hash = link("by-hash", "tcp://127.0.0.1:0".into(), by_hash_target);
    by_hash.allow = vec![format!("unix:sha256:{allowed_hash}")];
    let mut opts = Options::one(by_path);
    opts.links.push(by_hash);
    let mut sys = System::start(opts)?;
    let path_addr = sys.tcp_listen_addr("by-path")?;
    let hash_addr = sys.tcp_listen_addr("by-hash")?;
    sys.wait_ready()?;

    for (name, addr, got) in [
        ("by-path", path_addr, &by_path_got),
        ("by-hash", hash_addr, &by_hash_got),
    ] {
        assert_eq!(
            call(&allowed, addr, "from-allowed").await?.as_deref(),
            Some("hello from-allowed"),
            "{name}: the allowed executable's bytes flow both ways"
        );
        assert_eq!(
            call(&other, addr, "from-other").await?,
            None,
            "{name}: another executable is refused"
        );
        // What the refused caller wrote never reached the target.
        assert_eq!(*got.lock().expect("lock"), vec!["from-allowed".to_owned()]);
    }

    let m = scrape(sys.agents[0].1)?;
    for name in ["by-path", "by-hash"] {
        assert_eq!(
            metric(
                &m,
                &format!("comsat_agent_workloads_refused_total{{link=\"{name}\"}}")
            ),
            1.0,
            "{name}"
        );
    }
    assert_eq!(
        metric(&m, "comsat_agent_local_refused_total{reason=\"workload\"}"),
        2.0
    );
    assert_eq!(metric(&m, "comsat_agent_flows_total"), 2.0);
    let relay = scrape(sys.relay_admin)?;
    assert_eq!(metric(&relay, "comsat_relay_flows_total"), 2.0);
    // Each refusal is logged with the caller's selectors.
    let log = sys.agents[0].0.log();
    let refusals: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("local caller refused"))
        .collect();
    assert_eq!(refusals.len(), 2, "{log}");
    let other_hash = hex::encode(Sha256::digest(std::fs::read(&other)?));
    for line in refusals {
        assert!(
            line.contains(&format!("unix:path:{}", other.display())),
            "{line}"
        );
        assert!(line.contains("unix:uid:"), "{line}");
        if line.contains("by-hash") {
            assert!(
                line.contains(&format!("unix:sha256:{other_hash}")),
                "{line}"
            );
        }
    }
    Ok(())
}

/// Connects to the Unix socket `path` from a thread that runs as `uid`
/// (the kernel records a connecting thread's credentials), sends `line`
/// and returns the answer, or `None` if the connection gave none.
fn call_as(uid: u32, path: PathBuf, line: &'static str) -> Result<Option<String>> {
    std::thread::spawn(move || -> Result<Option<String>> {
        use std::io::{BufRead, Write};
        let uid = rustix::process::Uid::from_raw(uid);
        rustix::thread::set_thread_res_uid(uid, uid, uid)?;
        let mut s = std::os::unix::net::UnixStream::connect(&path)?;
        s.set_read_timeout(Some(CLIENT_TIMEOUT))?;
        if writeln!(s, "{line}").is_err() {
            return Ok(None);
        }
        let mut answer = String::new();
        match std::io::BufReader::new(s).read_line(&mut answer) {
            Ok(n) if n > 0 => Ok(Some(answer.trim_end().to_owned())),
            _ => Ok(None),
        }
    })
    .join()
    .map_err(|_| anyhow::anyhow!("client thread panicked"))?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_allowed_uid_reaches_a_unix_link() -> Result<()> {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: connecting as two other uids takes root");
        return Ok(());
    }
    const ALLOWED: u32 = 64_001;
    const OTHER: u32 = 64_002;
    let sockets = tempfile::tempdir()?;
    std::fs::set_permissions(sockets.path(), std::fs::Permissions::from_mode(0o755))?;
    let listen = sockets.path().join("app.sock");
    let (target, got) = greeter().await?;
    let mut l = link("by-uid", format!("unix://{}", listen.display()), target);
    l.allow = vec![format!("unix:uid:{ALLOWED}")];
    let mut sys = System::start(Options::one(l))?;
    sys.listen_addr("by-uid")?;
    sys.wait_ready()?;
    // Anyone may reach the socket file: only the rule keeps them out.
    std::fs::set_permissions(&listen, std::fs::Permissions::from_mode(0o777))?;
    assert_ne!(std::fs::metadata(&listen)?.uid(), ALLOWED);

    let answer = tokio::task::spawn_blocking({
        let listen = listen.clone();
        move || call_as(ALLOWED, listen, "from-allowed")
    })
    .await??;
    assert_eq!(answer.as_deref(), Some("hello from-allowed"));
    let answer =
        tokio::task::spawn_blocking(move || call_as(OTHER, listen, "from-other")).await??;
    assert_eq!(answer, None, "another uid is refused");
    assert_eq!(*got.lock().expect("lock"), vec!["from-allowed".to_owned()]);

    let m = scrape(sys.agents[0].1)?;
    assert_eq!(
        metric(&m, "comsat_agent_workloads_refused_total{link=\"by-uid\"}"),
        1.0
    );
    let log = sys.agents[0].0.log();
    let Some(refusal) = log.lines().find(|l| l.contains("local caller refused")) else {
        bail!("no refusal logged:\n{log}");
    };
    assert!(refusal.contains(&format!("unix:uid:{OTHER}")), "{refusal}");
    Ok(())
}

/// A target that keeps every connection's bytes, to their end, and
/// answers `ok`.
async fn keeper() -> Result<(String, Arc<Mutex<Vec<Vec<u8>>>>)> {
    let target = TcpListener::bind("127.0.0.1:0").await?;
    let addr = format!("tcp://{}", target.local_addr()?);
    let got = Arc::new(Mutex::new(Vec::new()));
    let kept = got.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = target.accept().await {
            let kept = kept.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut bytes = Vec::new();
                // The client sends one line and waits: read up to it.
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    bytes.extend_from_slice(&buf[..n]);
                    if bytes.ends_with(b"\n") {
                        break;
                    }
                }
                let _ = s.write_all(b"ok\n").await;
                kept.lock().expect("lock").push(bytes);
            });
        }
    });
    Ok((addr, got))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_reads_the_callers_spiffe_id_in_a_proxy_header() -> Result<()> {
    const ID: &str = "spiffe://example.org/billing";
    let bin = tempfile::tempdir()?;
    let billing = bash_copy(bin.path(), "billing", b"")?;
    let (target, got) = keeper().await?;
    let mut l = link("named", "tcp://127.0.0.1:0".into(), target);
    l.allow = vec![
        format!("{ID} unix:path:{}", billing.display()),
        "spiffe://example.org/nobody unix:uid:4294967294".into(),
    ];
    l.proxy_protocol = true;
    let mut sys = System::start(Options::one(l))?;
    let addr = sys.tcp_listen_addr("named")?;
    sys.wait_ready()?;
    assert_eq!(
        call(&billing, addr, "invoice-42").await?.as_deref(),
        Some("ok")
    );
    let kept = got.lock().expect("lock").clone();
    assert_eq!(kept.len(), 1);
    let (header, rest) = comsat_tests::proxy_v2::split(&kept[0])?;
    assert_eq!((header.version_command, header.family), (0x21, 0x00));
    assert!(header.addresses.is_empty());
    assert_eq!(header.tlv_text(0xE0).as_deref(), Some(ID));
    let selectors = header.tlv_text(0xE1).context("selectors")?;
    assert!(
        selectors.contains(&format!("unix:path:{}", billing.display())),
        "{selectors}"
    );
    assert_eq!(rest, b"invoice-42\n");
    // Both agents log the flow when it ends: who called, bytes each way
    // of the flow (the request's 11, the 3 of `ok\n`; not the header),
    // and how it ended.
    for (agent, sent, received) in [(0, 11, 3), (1, 3, 11)] {
        let line = wait_log_line(&sys.agents[agent].0, "flow ended").await?;
        for field in [
            "link=\"named\"".to_owned(),
            format!("caller_id=\"{ID}\""),
            format!("bytes_sent={sent}"),
            format!("bytes_received={received}"),
            "outcome=completed".to_owned(),
        ] {
            assert!(line.contains(&field), "agent {agent}: {field} in {line}");
        }
    }
    Ok(())
}

/// The first line of `agent`'s log containing `text`, waiting for it.
async fn wait_log_line(agent: &comsat_tests::Proc, text: &str) -> Result<String> {
    let deadline = std::time::Instant::now() + CLIENT_TIMEOUT;
    loop {
        if let Some(line) = agent.log().lines().find(|l| l.contains(text)) {
            return Ok(line.to_owned());
        }
        if std::time::Instant::now() > deadline {
            bail!("no line with {text:?}:\n{}", agent.log());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An agent A that attests no callers (here: its config lost the rules,
/// as an older agent would ignore them) sends flows that name no caller;
/// agent B, holding the link's rules, refuses them and dials nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_target_agent_refuses_flows_whose_caller_no_rule_admits() -> Result<()> {
    let bin = tempfile::tempdir()?;
    let allowed = bash_copy(bin.path(), "allowed-client", b"")?;
    let (target, got) = greeter().await?;
    let mut l = link("checked", "tcp://127.0.0.1:0".into(), target);
    l.allow = vec![format!("unix:path:{}", allowed.display())];
    let rules_line = format!("allow = [{:?}]\n", l.allow[0]);
    let mut sys = System::start_with(Options::one(l), |agent, config| {
        if agent == 0 {
            config.replacen(&rules_line, "", 1)
        } else {
            config
        }
    })?;
    let addr = sys.tcp_listen_addr("checked")?;
    sys.wait_ready()?;
    assert_eq!(call(&allowed, addr, "through-a").await?, None);
    assert!(
        got.lock().expect("lock").is_empty(),
        "the target was dialled"
    );
    let m = scrape(sys.agents[1].1)?;
    assert_eq!(
        metric(&m, "comsat_agent_workloads_refused_total{link=\"checked\"}"),
        1.0
    );
    let log = sys.agents[1].0.log();
    assert!(
        log.contains("flow refused: it names no caller"),
        "agent B's log:\n{log}"
    );
    Ok(())
}
