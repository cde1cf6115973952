//! `comsat up` as a new user runs it: one process, a controller, a relay
//! and two agents enrolled with join tokens, a demo link that answers, a
//! clean exit on Ctrl-C, and a second run that reuses the identities.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use comsat_tests::{Proc, free_udp_port, threads_named};

const BIN: &str = env!("CARGO_BIN_EXE_comsat");

fn free_tcp_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_serves_the_demo_link_stops_on_ctrl_c_and_comes_back_with_the_same_identities()
-> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("state");
    let demo = format!("127.0.0.1:{}", free_tcp_port()?);
    let controller_port = free_tcp_port()?.to_string();
    let relay_port = free_udp_port()?.to_string();
    let lane_port = free_udp_port()?.to_string();
    let args = [
        "up",
        "--data-dir",
        data.to_str().context("path")?,
        "--controller-port",
        &controller_port,
        "--relay-port",
        &relay_port,
        "--relay-interactive-port",
        &lane_port,
        "--demo-listen",
        &demo,
    ];
    let mut ids = Vec::new();
    for run in 0..2 {
        let mut up = Proc::spawn(BIN, &format!("up-{run}"), &args, dir.path())?;
        up.wait_line("comsat up ready", Duration::from_secs(120))?;
        // The banner (before the ready line) names the console.
        up.wait_line(
            &format!("  console     https://127.0.0.1:{controller_port}/ui (sign in with"),
            Duration::from_secs(1),
        )?;
        let reply = ask(demo.parse()?, b"GET / HTTP/1.0\r\n\r\n").await?;
        ensure!(
            reply.starts_with("HTTP/1.0 200") && reply.ends_with(DEMO_REPLY),
            "run {run}: unexpected reply through the demo link: {reply:?}"
        );
        // The new demo link races its grant to the relay; the agents'
        // refused first tries are expected, not warnings.
        let log = up.log();
        ensure!(
            !log.contains("relay connection failed"),
            "run {run} warned of refused relay connections:\n{log}"
        );
        let mut these = Vec::new();
        for node in ["relay-1", "agent-a", "agent-b"] {
            let state = std::fs::read_to_string(data.join(node).join("node.toml"))?;
            these.push(state);
        }
        ids.push(these);
        up.interrupt()?;
        let code = up.wait_exit(Duration::from_secs(20))?;
        ensure!(
            code == Some(0),
            "run {run}: exit code {code:?}\n{}",
            up.log_tail()
        );
        up.wait_line("comsat up stopped", Duration::from_secs(1))?;
    }
    ensure!(ids[0] == ids[1], "the second run enrolled new identities");
    ensure!(
        !data.join("demo.sock").exists(),
        "the demo service's socket is left behind"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_without_the_demo_starts_only_the_infrastructure() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("state");
    let controller_port = free_tcp_port()?.to_string();
    let relay_port = free_udp_port()?.to_string();
    let lane_port = free_udp_port()?.to_string();
    let mut up = Proc::spawn(
        BIN,
        "up-no-demo",
        &[
            "up",
            "--no-demo",
            "--data-dir",
            data.to_str().context("path")?,
            "--controller-port",
            &controller_port,
            "--relay-port",
            &relay_port,
            "--relay-interactive-port",
            &lane_port,
        ],
        dir.path(),
    )?;
    up.wait_line("comsat up ready", Duration::from_secs(120))?;
    let context = data.join("controller/context.toml");
    let out = std::process::Command::new(BIN)
        .args([
            "ctl",
            "--context",
            context.to_str().context("path")?,
            "link",
            "list",
            "-o",
            "json",
        ])
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let links: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
    ensure!(links.is_empty(), "--no-demo created links: {links:?}");
    ensure!(
        !data.join("demo.sock").exists(),
        "--no-demo started the demo service"
    );
    for node in ["relay-1", "agent-a", "agent-b"] {
        ensure!(
            data.join(node).join("node.toml").exists(),
            "{node} not enrolled"
        );
    }
    // The relay runs its interactive listener, on its own thread, and the
    // controller knows its address (links created with --connection use it).
    let out = std::process::Command::new(BIN)
        .args(["ctl", "--context", context.to_str().context("path")?])
        .args(["relay", "list", "-o", "json"])
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let relays: Vec<comsat_protocol::api::RelayInfo> = serde_json::from_slice(&out.stdout)?;
    let lane = format!("127.0.0.1:{lane_port}");
    ensure!(
        relays.len() == 1 && relays[0].interactive_addr.as_deref() == Some(lane.as_str()),
        "{relays:?}"
    );
    ensure!(
        threads_named(up.pid(), "comsat-lane")? >= 1,
        "no lane thread in `comsat up`"
    );
    up.interrupt()?;
    ensure!(
        up.wait_exit(Duration::from_secs(20))? == Some(0),
        "{}",
        up.log_tail()
    );
    Ok(())
}

/// What `comsat up`'s demo service answers, as its banner documents.
const DEMO_REPLY: &str = "hello from the demo service behind agent-b, through comsat\n";

/// Sends `req` to `addr`, half-closes, and reads the whole reply.
async fn ask(addr: std::net::SocketAddr, req: &[u8]) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(req).await?;
    s.shutdown().await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}
