//! Links made with `comsat ctl` end to end, with the real `comsat` binary
//! as processes: created links carry bytes and deleted ones go away, the
//! relay enforces the flow and rate limits an update changes in place,
//! its counters move, and a link with a connection of its own rides the
//! relay's interactive listener.

#[path = "common/fleet.rs"]
mod fleet;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use comsat_protocol::api;
use comsat_tests::free_udp_port;
use comsat_tests::proc::{metric, scrape};
use fleet::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_created_with_ctl_carries_bytes_and_delete_takes_it_away() -> Result<()> {
    let (mut c, listen, _) = demo().await?;
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
    ensure!(status.contains("agents:       2"), "{status}");

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_enforces_max_flows_and_an_update_applies_without_touching_open_flows()
-> Result<()> {
    let mut c = Fleet::builder().relays(1).agents(&["a", "b"]).start()?;
    let target = hash_server().await?;
    let addr = c.create_link("demo", target, &["--max-flows", "2"])?;
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
        link.spec.max_flows == Some(3) && link.generation == 1,
        "{link:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_set_with_ctl_throttles_the_link_and_an_update_lifts_it_for_open_flows()
-> Result<()> {
    let mut c = Fleet::builder().relays(1).agents(&["a", "b"]).start()?;
    let target = hash_server().await?;
    let addr = c.create_link("demo", target, &["--rate-limit", "128KiB/s"])?;
    let link: api::LinkInfo =
        serde_json::from_str(&c.ctl_ok(&["link", "show", "demo", "-o", "json"])?)?;
    ensure!(
        link.spec.rate_limit_bytes_per_sec == Some(128 * 1024),
        "{link:?}"
    );
    let id = hex::encode(link.link_id.0);
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
        link.spec.rate_limit_bytes_per_sec.is_none() && link.generation == 1,
        "{link:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_byte_counters_move_while_a_flow_is_open() -> Result<()> {
    let (c, listen, _) = demo().await?;
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
        // This flow is open at the relay (the warm-up's streams may take a
        // moment to close there).
        wait_for(CONVERGE, || {
            let open = metric(&scrape(admin)?, "comsat_relay_flows_open");
            ensure!(open == 1.0, "{open} flows open at the relay");
            Ok(())
        })
        .with_context(|| format!("round {i}: the flow is not open alone"))?;
    }
    finish_flow(sock, &sent).await?;
    Ok(())
}

/// A relay enrolled with `--interactive-port` runs its interactive listener
/// and tells the controller; a link created with `ctl link create
/// --connection` reaches both agents with that name and the address, so
/// it rides a QUIC connection of its own to that listener and is served by
/// a thread of its own in the relay and both agents, beside a plain link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_created_with_a_connection_uses_the_relays_interactive_listener() -> Result<()> {
    let mut c = Fleet::start(|t| t)?;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_outside_an_agents_consent_is_refused_there_and_nothing_is_dialled_or_bound()
-> Result<()> {
    let mut c = Fleet::builder().relays(1).agents(&["a", "b"]).start()?;
    // Each edge box's owner consents to little: agent a listens on one
    // loopback port only, agent b dials port 1 only.
    let allowed_listen = free_tcp_port()?;
    std::fs::write(
        c.path("a").join("consent.toml"),
        format!("listen = [\"tcp://127.0.0.1:{allowed_listen}\"]\n"),
    )?;
    std::fs::write(
        c.path("b").join("consent.toml"),
        "# only the echo port\ntargets = [\"tcp://127.0.0.1:1\"]\n",
    )?;
    for agent in ["a", "b"] {
        c.agent(agent)?.kill();
        c.run_agent(agent)?;
    }
    let target = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let target_addr = target.local_addr()?;

    // A target outside b's consent: b refuses its half, a serves its own.
    let listen = format!("tcp://127.0.0.1:{allowed_listen}");
    let far_target = format!("tcp://{target_addr}");
    c.ctl_ok(&[
        "link",
        "create",
        "far",
        "--from",
        "a",
        "--listen",
        &listen,
        "--to",
        "b",
        "--target",
        &far_target,
    ])?;
    c.agent("b")?
        .wait_line("comsat agent link far refused", CONVERGE)
        .with_context(|| c.logs())?;
    let listening = listen_addr(c.agent("a")?, "far")?;
    // A flow opened at a goes nowhere: b dials nothing.
    if let Ok(mut s) = tokio::net::TcpStream::connect(listening).await {
        let _ = s.write_all(b"hello").await;
    }
    let dialled = tokio::time::timeout(Duration::from_secs(3), target.accept()).await;
    ensure!(
        dialled.is_err(),
        "agent b dialled a target outside its consent"
    );

    // A Unix socket outside a's consent: a refuses, binds nothing.
    let sockets = tempfile::tempdir()?;
    let sock = sockets.path().join("app.sock");
    let unix = format!("unix://{}", sock.display());
    c.ctl_ok(&[
        "link",
        "create",
        "bind",
        "--from",
        "a",
        "--listen",
        &unix,
        "--to",
        "b",
        "--target",
        "tcp://127.0.0.1:1",
    ])?;
    c.agent("a")?
        .wait_line("comsat agent link bind refused", CONVERGE)
        .with_context(|| c.logs())?;
    ensure!(!sock.exists(), "agent a bound a socket outside its consent");

    // The operator sees each refusal, who made it and why, with the link
    // and in the audit log.
    wait_for(CONVERGE, || {
        let far = c.ctl_ok(&["link", "show", "far"])?;
        ensure!(
            far.contains(&format!(
                "refused:    by b: target {far_target} is outside this agent's consent"
            )) && far.contains("targets allowed: tcp://127.0.0.1:1;"),
            "{far}"
        );
        let bind = c.ctl_ok(&["link", "show", "bind"])?;
        ensure!(
            bind.contains(&format!(
                "refused:    by a: listen address {unix} is outside this agent's consent"
            )),
            "{bind}"
        );
        Ok(())
    })
    .with_context(|| c.logs())?;
    let audit: Vec<api::AuditRecord> =
        serde_json::from_str(&c.ctl_ok(&["audit", "list", "-o", "json"])?)?;
    for (agent, link) in [("agent:b", "link/far"), ("agent:a", "link/bind")] {
        ensure!(
            audit.iter().any(|r| r.action == "link.refuse"
                && r.subject == agent
                && r.resource == link
                && r.result == "denied"),
            "no refusal by {agent} of {link}: {audit:#?}"
        );
    }

    // b's owner consents to the target and restarts it: b serves the link
    // from its cache (the controller has nothing new for it) and tells the
    // controller, whose refusal of b goes.
    std::fs::write(
        c.path("b").join("consent.toml"),
        format!("targets = [\"{far_target}\", \"tcp://127.0.0.1:1\"]\n"),
    )?;
    c.agent("b")?.kill();
    c.run_agent("b")?;
    wait_for(CONVERGE, || {
        let far = c.ctl_ok(&["link", "show", "far"])?;
        ensure!(!far.contains("refused:"), "{far}");
        Ok(())
    })
    .with_context(|| c.logs())?;
    let bind = c.ctl_ok(&["link", "show", "bind"])?;
    ensure!(
        bind.contains("refused:    by a:"),
        "a still refuses: {bind}"
    );
    Ok(())
}
