//! End-to-end tests of named connections and lanes: links that name a
//! connection ride a QUIC connection of their own, and flows start on a
//! lane served by a thread of its own; the real `comsat` binary as
//! separate relay and agent processes on loopback.

mod common;
#[path = "common/flows.rs"]
mod flows;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use common::{Options, System};
use comsat_controller::dev::DevLink;
use comsat_node::keys::KeyFile;
use comsat_protocol::msg::{AgentToRelay, ErrorCode, PeerFrame, RelayToAgent, make_hello};
use comsat_protocol::{Side, SigningKey};
use comsat_tests::raw::{Control, RawClient, exporter};
use comsat_tests::{
    main_threads_keep_the_process_niceness, main_threads_yield_to_the_lane, metric, scrape,
    threads_named,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use flows::*;

/// Links `names` to `echo` (the first as the options' one link).
fn echo_links(names: &[&str], echo: SocketAddr) -> Options {
    let links: Vec<DevLink> = names
        .iter()
        .map(|n| link(n, "tcp://127.0.0.1:0".into(), format!("tcp://{echo}")))
        .collect();
    Options {
        links: links.clone(),
        ..Options::one(links[0].clone())
    }
}

/// Waits until `sys` is ready, then sends each link's name through it to
/// the echo and checks it comes back.
async fn echo_each(sys: &mut System, names: &[&str]) -> Result<()> {
    let mut listen = Vec::new();
    for name in names {
        let addr: SocketAddr = sys.tcp_listen_addr(name)?;
        listen.push(addr);
    }
    sys.wait_ready()?;
    for (addr, name) in listen.iter().zip(names) {
        let mut c = TcpStream::connect(addr).await?;
        c.write_all(name.as_bytes()).await?;
        let mut back = vec![0u8; name.len()];
        tokio::time::timeout(Duration::from_secs(20), c.read_exact(&mut back))
            .await
            .with_context(|| format!("{name}: no echo"))??;
        assert_eq!(back, name.as_bytes(), "{name}");
    }
    Ok(())
}

/// Links that name a `connection` ride a QUIC connection of their own to
/// the same relay, apart from the other links of the same two agents, and
/// both kinds carry their flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_connection_is_a_second_quic_connection_to_the_same_relay() -> Result<()> {
    let names = ["plain", "rpc-1", "rpc-2"];
    let mut sys = System::start_prepared(echo_links(&names, spawn_echo().await?), |layout| {
        // Both halves of both rpc links name the same connection.
        layout.set_link_connection("rpc-1", "interactive")?;
        layout.set_link_connection("rpc-2", "interactive")?;
        Ok(())
    })?;
    echo_each(&mut sys, &names).await?;
    // Two agents, two connections each: the default one (plain) and the
    // named one (both rpc links), all to the one relay.
    let m = wait_metric(sys.relay_admin, "comsat_relay_connections_open", 4.0).await?;
    assert_eq!(metric(&m, "comsat_relay_connections_open"), 4.0, "{m}");
    assert_eq!(metric(&m, "comsat_relay_links_paired"), 3.0, "{m}");
    // The agent's log tells its two sessions to the one relay apart.
    let log = std::fs::read_to_string(sys.logs().join("agent-a.log"))?;
    for name in ["connection=default", "connection=interactive"] {
        assert!(log.contains(name), "no `{name}` in agent A's log:\n{log}");
    }
    Ok(())
}

/// A link put on the relay's interactive listener (a `connection` name and
/// the relay's `interactive_listen` address in both agents) carries its
/// flows beside a plain link, and the relay and both agents serve it from
/// a thread of its own, which a setup without it does not start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_interactive_listener_serves_named_links_from_their_own_thread() -> Result<()> {
    let names = ["plain", "rpc"];
    let interactive: SocketAddr =
        format!("127.0.0.1:{}", comsat_tests::free_udp_port()?).parse()?;
    let mut sys = System::start_prepared(echo_links(&names, spawn_echo().await?), |layout| {
        layout.put_link_on_interactive_listener("rpc", "interactive", 0, interactive)?;
        Ok(())
    })?;
    let log = std::fs::read_to_string(sys.logs().join("relay.log"))?;
    assert!(
        log.contains(&format!("interactive={interactive}")),
        "the relay names its interactive listener:\n{log}"
    );
    echo_each(&mut sys, &names).await?;
    let m = wait_metric(sys.relay_admin, "comsat_relay_connections_open", 4.0).await?;
    assert_eq!(metric(&m, "comsat_relay_connections_open"), 4.0, "{m}");
    assert_eq!(metric(&m, "comsat_relay_links_paired"), 2.0, "{m}");
    for pid in pids(&sys) {
        // Its worker, and any blocking-pool thread it started.
        assert!(threads_named(pid, "comsat-lane")? >= 1, "process {pid}");
    }
    Ok(())
}

/// Without named connections no process starts the lane thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_named_connection_no_lane_thread() -> Result<()> {
    let mut sys = System::start(echo_links(&["plain"], spawn_echo().await?))?;
    echo_each(&mut sys, &["plain"]).await?;
    for pid in pids(&sys) {
        assert_eq!(threads_named(pid, "comsat-lane")?, 0, "process {pid}");
        // Nothing to yield to: the main threads keep the process's niceness.
        main_threads_keep_the_process_niceness(pid)?;
    }
    Ok(())
}

/// With the relay's interactive listener in the layout (as `--interactive-port`
/// gives enrolled links), plain links get a lane: a second connection per
/// agent, on the lane thread, up while flows run. A 64-byte ping rides it;
/// eight flows of 8 MiB both ways start there, turn bulk and move to the
/// main connection mid-transfer, and every byte arrives once and in order
/// at both ends; idle again, the lanes close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_start_on_the_lane_and_bulk_ones_move_to_the_main_connection() -> Result<()> {
    lanes_carry_flows(Lanes::Interactive).await
}

/// A relay without an interactive listener (enrolled without
/// `--interactive-port`) serves lanes at its main listener: the same as
/// above, with the relay's side of the lanes on its main threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_without_an_interactive_listener_serves_lanes_at_its_main_one() -> Result<()> {
    lanes_carry_flows(Lanes::MainListener).await
}

/// Where the relay serves the agents' lanes.
#[derive(Clone, Copy, PartialEq)]
enum Lanes {
    Interactive,
    MainListener,
}

async fn lanes_carry_flows(at: Lanes) -> Result<()> {
    let echo = spawn_echo().await?;
    let target = TcpListener::bind("127.0.0.1:0").await?;
    let target_addr = target.local_addr()?;
    let lane: SocketAddr = format!("127.0.0.1:{}", comsat_tests::free_udp_port()?).parse()?;
    let links = vec![
        link("ping", "tcp://127.0.0.1:0".into(), format!("tcp://{echo}")),
        link(
            "bulk",
            "tcp://127.0.0.1:0".into(),
            format!("tcp://{target_addr}"),
        ),
    ];
    let opts = Options {
        links: links.clone(),
        ..Options::one(links[0].clone())
    };
    let mut sys = System::start_prepared(opts, |layout| {
        match at {
            Lanes::Interactive => layout.run_lanes(0, lane)?,
            Lanes::MainListener => layout.run_lanes_on_main(0)?,
        }
        for config in [&layout.agent_a.config, &layout.agent_b.config] {
            let text = std::fs::read_to_string(config)?;
            std::fs::write(config, format!("lane_idle_ms = 3000\n{text}"))?;
        }
        Ok(())
    })?;
    let ping: SocketAddr = sys.tcp_listen_addr("ping")?;
    sys.wait_ready()?;
    // No flow yet, no lane: one connection per agent.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let m = scrape(sys.relay_admin)?;
    assert_eq!(metric(&m, "comsat_relay_connections_open"), 2.0, "{m}");
    let [relay, agents @ ..] = pids(&sys);
    for pid in agents {
        assert!(threads_named(pid, "comsat-lane")? >= 1, "agent {pid}");
    }
    let relay_lane_threads = threads_named(relay, "comsat-lane")?;
    match at {
        Lanes::Interactive => assert!(relay_lane_threads >= 1),
        Lanes::MainListener => assert_eq!(relay_lane_threads, 0),
    }
    // The first flow opens both agents' lanes.
    echo_each(&mut sys, &["ping"]).await?;
    let m = wait_metric(sys.relay_admin, "comsat_relay_connections_open", 4.0).await?;
    assert_eq!(metric(&m, "comsat_relay_connections_open"), 4.0, "{m}");
    // A flow rides the lane: from its start, or it moves there as the
    // lane comes up, and it carries bytes there.
    let mut c = TcpStream::connect(ping).await?;
    for round in 0..2 {
        c.write_all(&[round; 64]).await?;
        let mut back = [0u8; 64];
        tokio::time::timeout(Duration::from_secs(20), c.read_exact(&mut back)).await??;
        assert_eq!(back, [round; 64]);
        if round == 0 {
            wait_metric(sys.relay_admin, "comsat_relay_lane_flows_total", 1.0).await?;
        }
    }
    drop(c);
    let a = sys.agents[0].1;
    assert_eq!(metric(&scrape(a)?, "comsat_agent_flows_moved_total"), 0.0);

    let listen: SocketAddr = sys.tcp_listen_addr("bulk")?;
    eight_tcp_flows(target, listen).await?;
    let agent = scrape(a)?;
    assert_eq!(
        metric(&agent, "comsat_agent_flows_moved_total"),
        FLOWS as f64,
        "every bulk flow moved:\n{agent}"
    );
    for pid in agents {
        // `bulk_nice`, 5 unless set.
        main_threads_yield_to_the_lane(pid, 5)?;
    }
    match at {
        Lanes::Interactive => main_threads_yield_to_the_lane(relay, 5)?,
        // No lane thread to yield to.
        Lanes::MainListener => main_threads_keep_the_process_niceness(relay)?,
    }
    assert_eq!(
        metric(&agent, "comsat_agent_flows_failed_total"),
        0.0,
        "{agent}"
    );
    // At agent A they ran on the lane's thread, then moved their tasks and
    // sockets to the main runtime with their streams. (Agent B's do the
    // same when their lane stream reaches it before their main one; the
    // two race through the relay, and a flow first seen on the main
    // connection starts there, so B's count is not fixed.)
    let text = std::fs::read_to_string(sys.logs().join("agent-a.log"))?;
    let moved = text
        .lines()
        .filter(|l| l.contains("flow moved to the runtime of its new stream lane=false"))
        .count();
    assert!(moved >= FLOWS as usize, "{moved} flows moved:\n{text}");
    let m = scrape(sys.relay_admin)?;
    // Each bulk flow: a stream on the lane (which the agent may give up
    // before the relay has read its header), then one on the main
    // connection.
    assert!(metric(&m, "comsat_relay_lane_flows_total") > 1.0, "{m}");
    assert!(
        metric(&m, "comsat_relay_flows_total") >= 1.0 + FLOWS as f64,
        "{m}"
    );
    assert_eq!(metric(&agent, "comsat_agent_lanes_open"), 1.0, "{agent}");
    // Without flows for `lane_idle_ms`, the lanes close again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let m = scrape(sys.relay_admin)?;
        if metric(&m, "comsat_relay_connections_open") == 2.0
            && metric(&scrape(a)?, "comsat_agent_lanes_open") == 0.0
        {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the idle lanes did not close:\n{m}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// A lane is checked like an attach (the node must hold that side of the
/// granted link at its generation), carries no peer frames, and leaves the
/// side's own attachment alone: the link stays paired and carries bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_is_checked_like_an_attach_and_carries_only_flows() -> Result<()> {
    let mut sys = System::start(echo_links(&["plain"], spawn_echo().await?))?;
    echo_each(&mut sys, &["plain"]).await?;
    let link_id = sys.layout.links[0].1;
    let b = &sys.layout.agent_b;
    let key = SigningKey::read_file(&b.dir.join("node.key"))?;
    let client = RawClient::new(&sys.layout.ca_pem)?;
    let conn = client.connect(sys.relay_quic).await?;
    let mut ctl = Control::open(&conn, &make_hello(b.node_id, &key, &exporter(&conn)?)).await?;
    let lane = |side, generation| AgentToRelay::AttachLane {
        link_id,
        generation,
        side,
    };
    for (what, msg, code) in [
        ("the other side", lane(Side::A, 1), ErrorCode::NotGranted),
        (
            "a newer generation",
            lane(Side::B, 2),
            ErrorCode::NotGranted,
        ),
        (
            "an older generation",
            lane(Side::B, 0),
            ErrorCode::StaleGeneration,
        ),
    ] {
        ctl.send(&msg).await?;
        assert_eq!(
            ctl.next().await?,
            RelayToAgent::Error { link_id, code },
            "{what}"
        );
    }
    ctl.send(&lane(Side::B, 1)).await?;
    assert_eq!(ctl.next().await?, RelayToAgent::Attached { link_id });
    ctl.send(&AgentToRelay::Peer {
        link_id,
        frame: PeerFrame::Handshake(vec![1, 2, 3]),
    })
    .await?;
    assert_eq!(
        ctl.next().await?,
        RelayToAgent::Error {
            link_id,
            code: ErrorCode::NotAttached
        },
        "a lane carries no peer frames"
    );
    let m = scrape(sys.relay_admin)?;
    assert_eq!(metric(&m, "comsat_relay_links_paired"), 1.0, "{m}");
    assert_eq!(metric(&m, "comsat_relay_connections_open"), 3.0, "{m}");
    let m = wait_metric(
        sys.relay_admin,
        "comsat_relay_attach_refused_total{reason=\"not_granted\"}",
        2.0,
    )
    .await?;
    assert_eq!(
        metric(
            &m,
            "comsat_relay_attach_refused_total{reason=\"stale_generation\"}"
        ),
        1.0,
        "{m}"
    );
    // The agents' own connections were not superseded.
    echo_each(&mut sys, &["plain"]).await?;
    Ok(())
}
