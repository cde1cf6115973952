//! The README's "Deploy with a controller" guide, run as written: every
//! command of its `sh` blocks, in order, with `/var/lib/comsat` moved into
//! a temporary directory and each fixed port mapped to a free one. The
//! long-running `… run` commands start in the background; after `link
//! create` bytes must cross the link to a service at its target. A README
//! edit that breaks the guide fails this test.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use comsat_tests::Proc;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_comsat");
const SECTION: &str = "## Deploy with a controller";

/// The commands of the `sh` blocks of `section`: continuation lines
/// joined, comments and blank lines dropped.
fn commands(readme: &str, section: &str) -> Result<Vec<String>> {
    let start = readme.find(section).context("section not found")?;
    let body = &readme[start + section.len()..];
    let body = &body[..body.find("\n## ").unwrap_or(body.len())];
    let mut out = Vec::new();
    let mut in_block = false;
    let mut pending = String::new();
    for line in body.lines() {
        if line.starts_with("```") {
            in_block = line == "```sh";
            continue;
        }
        if !in_block {
            continue;
        }
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
    Ok(out)
}

fn free_port(udp: bool) -> Result<u16> {
    Ok(if udp {
        std::net::UdpSocket::bind("127.0.0.1:0")?
            .local_addr()?
            .port()
    } else {
        std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port()
    })
}

/// Every `127.0.0.1:PORT` in `cmds`, mapped to a free port (UDP for the
/// relay's `--public-addr`).
fn port_map(cmds: &[String]) -> Result<HashMap<String, String>> {
    let mut map = HashMap::new();
    for c in cmds {
        let udp = c.contains("--public-addr");
        for (i, _) in c.match_indices("127.0.0.1:") {
            let port: String = c[i + 10..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            if port.is_empty() {
                continue;
            }
            let from = format!("127.0.0.1:{port}");
            if let std::collections::hash_map::Entry::Vacant(e) = map.entry(from) {
                e.insert(format!("127.0.0.1:{}", free_port(udp)?));
            }
        }
    }
    Ok(map)
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

fn sh(cmd: &str, cwd: &Path, env: &[(String, String)], path: &str) -> Result<()> {
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", cmd])
        .current_dir(cwd)
        .envs(env.iter().cloned())
        .env("PATH", path)
        .env("COMSAT_LOG", "warn")
        .output()?;
    ensure!(
        out.status.success(),
        "README command failed: {cmd}\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deploy_guide_works_as_written() -> Result<()> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))?;
    let cmds = commands(&readme, SECTION)?;
    ensure!(cmds.len() >= 10, "the guide lost its commands: {cmds:?}");
    let dir = tempfile::tempdir()?;
    let bin_dir = dir.path().join("bin");
    std::fs::create_dir(&bin_dir)?;
    std::os::unix::fs::symlink(BIN, bin_dir.join("comsat"))?;
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let ports = port_map(&cmds)?;
    let state = dir.path().join("var-lib-comsat");
    let mut env: Vec<(String, String)> = Vec::new();
    let mut background: Vec<Proc> = Vec::new();
    let mut link_checked = false;
    for (n, raw) in cmds.iter().enumerate() {
        let mut cmd = raw.replace("/var/lib/comsat", &state.display().to_string());
        for (from, to) in &ports {
            cmd = cmd.replace(from, to);
        }
        if let Some(assign) = cmd.strip_prefix("export ") {
            let (k, v) = assign.split_once('=').context("export")?;
            env.push((k.to_owned(), v.to_owned()));
            continue;
        }
        let ready = if cmd.starts_with("comsat controller run") {
            Some("comsat controller listening")
        } else if cmd.starts_with("comsat relay run") {
            Some("comsat relay listening")
        } else if cmd.starts_with("comsat agent run") {
            Some("comsat agent started")
        } else {
            None
        };
        if let Some(ready) = ready {
            let args: Vec<&str> = cmd.split_whitespace().skip(1).collect();
            let mut p = Proc::spawn(BIN, &format!("step-{n}"), &args, dir.path())?;
            p.wait_line(ready, comsat_tests::proc::START_TIMEOUT)?;
            background.push(p);
            continue;
        }
        if cmd.starts_with("comsat ctl link create") {
            // The link's target: a service to reach through it.
            let target = cmd
                .split_whitespace()
                .skip_while(|w| *w != "--target")
                .nth(1)
                .context("--target")?
                .trim_start_matches("tcp://")
                .to_owned();
            hash_service(&target).await?;
        }
        eprintln!("$ {cmd}");
        sh(&cmd, dir.path(), &env, &path)?;
        if cmd.starts_with("comsat ctl link create") {
            let listen = cmd
                .split_whitespace()
                .skip_while(|w| *w != "--listen")
                .nth(1)
                .context("--listen")?
                .trim_start_matches("tcp://")
                .to_owned();
            through(&listen).await.with_context(|| {
                background
                    .iter()
                    .map(|p| p.log_tail())
                    .collect::<Vec<_>>()
                    .join("\n---\n")
            })?;
            link_checked = true;
        }
    }
    ensure!(link_checked, "the guide never created a link");
    Ok(())
}

#[test]
fn commands_are_read_from_sh_blocks_only() -> Result<()> {
    let text = "## A\n```sh\nx \\\n  --y 1  # note\n# skip\n\nz\n```\n```toml\nk = 1\n```\n## B\n```sh\nw\n```\n";
    assert_eq!(commands(text, "## A")?, ["x --y 1", "z"]);
    Ok(())
}
