//! End-to-end tests of resume: flows survive the relay dying under them.

mod common;
#[path = "common/transfer.rs"]
mod transfer;

use comsat_node::keys::KeyFile;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use common::{Options, System};
use comsat_controller::dev::DevLink;
use comsat_tests::{Oracle, metric, scrape};
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use transfer::*;

fn bulk_system(target: SocketAddr, extra_relays: usize) -> Result<System> {
    System::start(Options {
        links: vec![DevLink {
            name: "bulk".into(),
            listen: "tcp://127.0.0.1:0".into(),
            target: format!("tcp://{target}"),
            allowed_uids: vec![],
            allow: vec![],
            proxy_protocol: false,
        }],
        tap: false,
        pin_sha256: false,
        relay_extra: String::new(),
        extra_relays,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_and_restarted_mid_transfer_loses_nothing() -> Result<()> {
    let _heavy = common::one_at_a_time().await;
    let target = TcpListener::bind("127.0.0.1:0").await?;
    let mut sys = bulk_system(target.local_addr()?, 0)?;
    let listen: SocketAddr = sys.tcp_listen_addr("bulk")?;
    sys.wait_ready()?;
    let bulk = Bulk::start(listen, target);

    // Kill the relay at three random points of the transfer, restarting it
    // each time on the same address with the same configuration.
    let mut rng = rand::rngs::StdRng::seed_from_u64(rand::random());
    let mut points: Vec<u64> = (0..3)
        .map(|i| Bulk::TOTAL * (i * 25 + rng.random_range(10..25)) / 100)
        .collect();
    points.sort();
    let logs = sys.logs();
    for (i, at) in points.iter().enumerate() {
        let now = bulk.reach(*at).await?;
        sys.relay.kill();
        eprintln!("killed the relay at {now} bytes");
        let (relay, _, admin) =
            common::start_relay(&sys.layout.relay_config, &logs, &format!("relay-{}", i + 2))?;
        sys.relay = relay;
        sys.relay_admin = admin;
    }
    bulk.finish().await?;
    assert_no_application_failures(&sys)?;
    let a = scrape(sys.agents[0].1)?;
    assert!(metric(&a, "comsat_agent_flows_resumed_total") >= 3.0, "{a}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_failover_to_the_next_relay_loses_nothing() -> Result<()> {
    let _heavy = common::one_at_a_time().await;
    let target = TcpListener::bind("127.0.0.1:0").await?;
    let mut sys = bulk_system(target.local_addr()?, 1)?;
    let listen: SocketAddr = sys.tcp_listen_addr("bulk")?;
    sys.wait_ready()?;
    // Both agents are on the first relay.
    assert_eq!(
        metric(&scrape(sys.relay_admin)?, "comsat_relay_links_paired"),
        1.0
    );
    let bulk = Bulk::start(listen, target);
    let at = bulk.reach(Bulk::TOTAL / 3).await?;
    // Its host vanishes: frozen, it answers nothing, not even with an
    // ICMP error or a QUIC reset (it is killed, by PID, with `sys`).
    signal(sys.relay.pid(), "STOP")?;
    eprintln!("froze the first relay at {at} bytes");
    bulk.finish().await?;
    assert_no_application_failures(&sys)?;
    // The agents gave up on it for its silence under their data (the
    // watchdog), not for the idle timeout: at least one of them. A side
    // with nothing waiting for the relay at that moment (its sends all
    // acknowledged, its flows waiting for the peer's acknowledgements)
    // has only its keep-alive to find out, and may follow by that.
    let silences: f64 = sys
        .agents
        .iter()
        .map(|(_, admin)| {
            Ok(metric(
                &scrape(*admin)?,
                "comsat_agent_relay_silences_total",
            ))
        })
        .sum::<Result<f64>>()?;
    assert!(silences >= 1.0, "no agent's watchdog noticed the silence");
    let backup = scrape(sys.backups[0].1)?;
    assert_eq!(
        metric(&backup, "comsat_relay_links_paired"),
        1.0,
        "{backup}"
    );
    assert!(
        metric(&backup, "comsat_relay_forwarded_bytes_total") > 0.0,
        "{backup}"
    );
    Ok(())
}

/// Waits (without blocking the runtime the transfer runs on) until `p`
/// exits; returns its exit code and how long that took.
async fn exited(p: &mut comsat_tests::Proc, within: Duration) -> Result<(Option<i32>, Duration)> {
    let started = tokio::time::Instant::now();
    while p.is_running() {
        if started.elapsed() > within {
            bail!(
                "{} still running after {within:?}:\n{}",
                p.name(),
                p.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((p.wait_exit(Duration::from_secs(1))?, started.elapsed()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_two_relays_in_turn_under_traffic_loses_nothing() -> Result<()> {
    let _heavy = common::one_at_a_time().await;
    // The relays' default grace.
    const GRACE: Duration = Duration::from_secs(30);
    let target = TcpListener::bind("127.0.0.1:0").await?;
    let mut sys = bulk_system(target.local_addr()?, 1)?;
    let listen: SocketAddr = sys.tcp_listen_addr("bulk")?;
    sys.wait_ready()?;
    assert_eq!(
        metric(&scrape(sys.relay_admin)?, "comsat_relay_links_paired"),
        1.0
    );
    let bulk = Bulk::start(listen, target);
    let logs = sys.logs();

    // Drain the first relay with SIGTERM, under traffic in both directions.
    let at = bulk.reach(Bulk::TOTAL / 4).await?;
    signal(sys.relay.pid(), "TERM")?;
    let (code, took) = exited(&mut sys.relay, GRACE + Duration::from_secs(15)).await?;
    eprintln!("relay 1 drained at {at} bytes in {took:?}");
    assert_eq!(code, Some(0), "{}", sys.relay.log_tail());
    assert!(
        took < GRACE,
        "the drain used its whole grace ({took:?})\nrelay:\n{}\nagent a:\n{}\nagent b:\n{}",
        sys.relay.log_tail(),
        sys.agents[0].0.log_tail(),
        sys.agents[1].0.log_tail()
    );
    assert!(
        sys.relay
            .log_tail()
            .contains("drained: every link has moved"),
        "{}",
        sys.relay.log_tail()
    );
    assert!(!sys.layout.relay_config.with_file_name("relay.pid").exists());
    // Both sides moved together to the next relay of the grant.
    wait_metric(sys.backups[0].1, "comsat_relay_links_paired", |v| v == 1.0).await?;
    // The drained relay comes back and takes links again, by itself.
    let (relay, _, admin) = common::start_relay(&sys.layout.relay_config, &logs, "relay-1b")?;
    sys.relay = relay;
    sys.relay_admin = admin;

    // Drain the second one with `comsat relay drain`.
    let at = bulk.reach(Bulk::TOTAL * 5 / 8).await?;
    let backup_config = sys.layout.relays[1].config.clone();
    let drain = {
        let config = backup_config.clone();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(common::BIN)
                .args(["relay", "drain", "--timeout", "45s", "--config"])
                .arg(&config)
                .output()
        })
    };
    let out = drain.await.context("relay drain")??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "relay drain failed: {stderr}");
    assert!(stderr.contains("has exited"), "{stderr}");
    let (code, took) = exited(&mut sys.backups[0].0, Duration::from_secs(5)).await?;
    eprintln!("relay 2 drained at {at} bytes; `relay drain` said: {stderr}");
    assert_eq!(code, Some(0));
    assert!(took < GRACE);
    assert!(
        sys.backups[0]
            .0
            .log_tail()
            .contains("drained: every link has moved"),
        "{}",
        sys.backups[0].0.log_tail()
    );
    wait_metric(sys.relay_admin, "comsat_relay_links_paired", |v| v == 1.0).await?;
    let (p, _, admin) = common::start_relay(&backup_config, &logs, "relay-2b")?;
    sys.backups[0] = (p, admin);

    bulk.finish().await?;
    assert_no_application_failures(&sys)?;
    for (_, admin) in &sys.agents {
        let m = scrape(*admin)?;
        assert_eq!(metric(&m, "comsat_agent_relay_drains_total"), 2.0, "{m}");
    }
    // The restarted first relay carried the end of the transfer.
    assert!(
        metric(
            &scrape(sys.relay_admin)?,
            "comsat_relay_forwarded_bytes_total"
        ) > 0.0
    );
    Ok(())
}

/// A link's grant expires while nothing can renew it (no controller here:
/// the relay's grant directory is all it has). The relay ends the link at
/// `not_after` by itself: the open flow works until then and is reset
/// right after, and a new local connection is refused with the reason in
/// the agent's log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_ends_when_its_grant_expires_without_a_controller() -> Result<()> {
    let _heavy = common::one_at_a_time().await;
    use std::time::{SystemTime, UNIX_EPOCH};

    let target = TcpListener::bind("127.0.0.1:0").await?;
    let mut sys = echo_system(target.local_addr()?, None)?;
    tokio::spawn(echo_server(target));
    let listen: SocketAddr = sys.tcp_listen_addr("echo")?;
    sys.wait_ready()?;

    // The same grant (generation 1), now valid for 4 more seconds.
    let unix = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
    };
    let not_after = unix().as_secs() + 4;
    regrant(&sys, 1, not_after)?;

    let mut flow = TcpStream::connect(listen).await?;
    echo_round(&mut flow, b"while the grant lasts").await?;
    expect_reset(flow, Duration::from_secs(30)).await?;
    let at = unix();
    let expiry = Duration::from_secs(not_after);
    assert!(
        at >= expiry,
        "the flow was reset {:?} before the grant expired",
        expiry - at
    );
    // Within a second of expiry on a calm machine; the bound here is loose
    // so a slow one does not fail the test.
    let late = at - expiry;
    eprintln!("flow reset {late:?} after the grant expired");
    assert!(
        late < Duration::from_secs(6),
        "the link outlived its grant by {late:?}"
    );
    let m = scrape(sys.relay_admin)?;
    assert_eq!(metric(&m, "comsat_relay_grants_expired_total"), 1.0, "{m}");
    assert_eq!(metric(&m, "comsat_relay_links_paired"), 0.0, "{m}");

    // Refused with a reset, which may already be there when the connect
    // completes.
    if let Ok(mut refused) = TcpStream::connect(listen).await {
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(5), refused.read(&mut buf)).await;
        assert!(
            matches!(n, Ok(Err(_))),
            "a local connection was not reset: {n:?}"
        );
    }
    let want = "local connection refused: the link's grant expired";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !sys.agents[0].0.log().contains(want) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "agent A's log gives no reason:\n{}",
            sys.agents[0].0.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let a = scrape(sys.agents[0].1)?;
    assert_eq!(
        metric(
            &a,
            "comsat_agent_local_refused_total{reason=\"grant_expired\"}"
        ),
        1.0
    );
    Ok(())
}

/// Signs a new grant for the system's first link (`generation`, valid
/// until `not_after`) and puts it in place of the relay's.
fn regrant(sys: &System, generation: u64, not_after: u64) -> Result<()> {
    use comsat_protocol::SigningKey;
    use comsat_protocol::grant::{Grant, GrantSide, LinkLimits};

    let authority = SigningKey::read_file(&sys.layout.authority_key)?;
    let (name, link_id) = sys.layout.links[0].clone();
    let grant = Grant {
        link_id,
        generation,
        relays: vec![sys.layout.relay_id],
        side_a: GrantSide {
            node_id: sys.layout.agent_a.node_id,
            sign_pub: sys.layout.agent_a.sign_pub,
        },
        side_b: GrantSide {
            node_id: sys.layout.agent_b.node_id,
            sign_pub: sys.layout.agent_b.sign_pub,
        },
        not_after,
        buffer_limit: 1 << 20,
        limits: LinkLimits::default(),
    };
    let path = sys.layout.grants_dir.join(format!("{name}.grant"));
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, grant.sign(&authority)?.encode()?)?;
    std::fs::rename(&tmp, &path)?;
    Ok(())
}

/// A chatty flow goes on across a relay restart, and its acks with it: they
/// stay lazy (at most one ack message per 100 ms per agent) and keep going
/// out on the new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chatty_flows_lazy_acks_go_on_after_a_relay_restart() -> Result<()> {
    let _heavy = common::one_at_a_time().await;
    /// `comsat_agent::defaults::ACK_LAZY`.
    const ACK_LAZY: Duration = Duration::from_millis(100);
    let target = TcpListener::bind("127.0.0.1:0").await?;
    let target_addr = target.local_addr()?;
    tokio::spawn(echo_server(target));
    let mut sys = echo_system(target_addr, None)?;
    let listen: SocketAddr = sys.tcp_listen_addr("echo")?;
    sys.wait_ready()?;
    let mut c = TcpStream::connect(listen).await?;
    c.set_nodelay(true)?;
    // Round trips right up to the kill, so lazy acks are pending then.
    for i in 0..200u32 {
        echo_round(&mut c, &i.to_be_bytes().repeat(16)).await?;
    }
    sys.relay.kill();
    let (relay, _, admin) = common::start_relay(&sys.layout.relay_config, &sys.logs(), "relay-2")?;
    sys.relay = relay;
    sys.relay_admin = admin;
    // The flow resumes on the new connection.
    echo_round(&mut c, b"after the restart").await?;
    tokio::time::sleep(3 * ACK_LAZY).await;
    let admins = [sys.agents[0].1, sys.agents[1].1];
    let acks =
        |admin| -> Result<f64> { Ok(metric(&scrape(admin)?, "comsat_agent_ack_messages_total")) };
    let before = [acks(admins[0])?, acks(admins[1])?];
    let started = std::time::Instant::now();
    for i in 0..300u32 {
        echo_round(&mut c, &i.to_le_bytes().repeat(16)).await?;
    }
    let took = started.elapsed();
    tokio::time::sleep(3 * ACK_LAZY).await;
    let bound = ((took + 3 * ACK_LAZY).as_secs_f64() / ACK_LAZY.as_secs_f64()).ceil() + 2.0;
    for (i, agent) in ["A", "B"].iter().enumerate() {
        let sent = acks(admins[i])? - before[i];
        assert!(
            sent >= 1.0,
            "agent {agent}: no ack message after the restart"
        );
        assert!(
            sent <= bound,
            "agent {agent}: {sent} ack messages in {took:?} (lazy allows {bound})"
        );
    }
    Ok(())
}

fn echo_system(target: SocketAddr, flow_timeout_ms: Option<u64>) -> Result<System> {
    let sys = System::start_with(
        Options::one(DevLink {
            name: "echo".into(),
            listen: "tcp://127.0.0.1:0".into(),
            target: format!("tcp://{target}"),
            allowed_uids: vec![],
            allow: vec![],
            proxy_protocol: false,
        }),
        |_, text| match flow_timeout_ms {
            Some(ms) => text.replacen(
                "noise_key = \"noise.key\"\n",
                &format!("noise_key = \"noise.key\"\nflow_timeout_ms = {ms}\n"),
                1,
            ),
            None => text,
        },
    )?;
    Ok(sys)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_peer_agent_resets_old_flows_and_serves_new_ones() -> Result<()> {
    let _heavy = common::one_at_a_time().await;
    let target = TcpListener::bind("127.0.0.1:0").await?;
    let mut sys = echo_system(target.local_addr()?, None)?;
    tokio::spawn(echo_server(target));
    let listen: SocketAddr = sys.tcp_listen_addr("echo")?;
    sys.wait_ready()?;
    let data: Vec<u8> = (0..1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let mut old = TcpStream::connect(listen).await?;
    echo_round(&mut old, &data).await?;

    // Agent B dies and comes back with the same data dir (same keys).
    sys.agents[1].0.kill();
    let logs = sys.logs();
    let b = common::start_agent(&sys.layout.agent_b.config, &logs, "agent-b-2")?;
    sys.agents[1] = b;

    // The old flow cannot go on (its peer's session is gone): the
    // application sees a reset, never a silent end or a reused nonce.
    expect_reset(old, Duration::from_secs(30)).await?;
    sys.wait_ready()?;
    let mut new = TcpStream::connect(listen).await?;
    echo_round(&mut new, &data).await?;
    let m = scrape(sys.agents[0].1)?;
    assert!(metric(&m, "comsat_agent_flows_failed_total") >= 1.0, "{m}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_longer_than_flow_timeout_resets_both_ends() -> Result<()> {
    let _heavy = common::one_at_a_time().await;
    let target = TcpListener::bind("127.0.0.1:0").await?;
    let target_addr = target.local_addr()?;
    let mut sys = echo_system(target_addr, Some(1500))?;
    let listen: SocketAddr = sys.tcp_listen_addr("echo")?;
    sys.wait_ready()?;
    let mut client = TcpStream::connect(listen).await?;
    let (mut server, _) = tokio::time::timeout(Duration::from_secs(10), async {
        // The flow reaches the target once the first bytes go through.
        client.write_all(b"hello").await?;
        target.accept().await
    })
    .await??;
    let mut hello = [0u8; 5];
    server.read_exact(&mut hello).await?;
    server.write_all(b"world").await?;
    client.read_exact(&mut hello).await?;
    assert_eq!(&hello, b"world");

    // The relay dies and stays dead: after the connection's idle timeout
    // (5 s) and the flow timeout (1.5 s) both applications see a reset.
    sys.relay.kill();
    let (c, s) = tokio::join!(
        expect_reset(client, Duration::from_secs(20)),
        expect_reset(server, Duration::from_secs(20)),
    );
    c.context("client side")?;
    s.context("server side")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn superseded_grant_tears_the_link_down_and_old_generation_is_refused() -> Result<()> {
    let _heavy = common::one_at_a_time().await;
    let target = TcpListener::bind("127.0.0.1:0").await?;
    let mut sys = echo_system(target.local_addr()?, None)?;
    tokio::spawn(echo_server(target));
    let listen: SocketAddr = sys.tcp_listen_addr("echo")?;
    sys.wait_ready()?;
    let mut flow = TcpStream::connect(listen).await?;
    echo_round(&mut flow, b"before revocation").await?;

    // The authority supersedes the link with generation 2.
    regrant(&sys, 2, u64::MAX / 2)?;

    // The flow stops: the application sees a reset.
    expect_reset(flow, Duration::from_secs(15)).await?;
    let m = scrape(sys.relay_admin)?;
    assert_eq!(metric(&m, "comsat_relay_links_paired"), 0.0, "{m}");

    // An agent still configured with generation 1 is refused.
    sys.agents[0].0.kill();
    let logs = sys.logs();
    sys.agents[0] = common::start_agent(&sys.layout.agent_a.config, &logs, "agent-a-2")?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let m = scrape(sys.relay_admin)?;
        if metric(
            &m,
            "comsat_relay_attach_refused_total{reason=\"stale_generation\"}",
        ) >= 1.0
        {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("old generation was not refused; metrics:\n{m}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let a = scrape(sys.agents[0].1)?;
    assert_eq!(metric(&a, "comsat_agent_links_ready"), 0.0, "{a}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_stores_and_forwards_while_the_peer_is_away() -> Result<()> {
    let _heavy = common::one_at_a_time().await;
    const LEN: u64 = 8 * 1024 * 1024;
    const SEED: u64 = 77;
    let target = TcpListener::bind("127.0.0.1:0").await?;
    let mut sys = System::start_with(
        Options {
            links: vec![DevLink {
                name: "sf".into(),
                listen: "tcp://127.0.0.1:0".into(),
                target: format!("tcp://{}", target.local_addr()?),
                allowed_uids: vec![],
                allow: vec![],
                proxy_protocol: false,
            }],
            tap: false,
            pin_sha256: false,
            // Notice a vanished agent quickly...
            relay_extra: "[limits]\nidle_timeout_ms = 3000\n".into(),
            extra_relays: 0,
        },
        // ...and keep the live one's idle connection alive within that.
        |_, text| text.replacen("[[links]]", "keep_alive_ms = 1000\n\n[[links]]", 1),
    )?;
    let listen: SocketAddr = sys.tcp_listen_addr("sf")?;
    sys.wait_ready()?;

    // Agent B goes away (frozen: it keeps its session) and the relay
    // notices.
    let b_pid = sys.agents[1].0.pid();
    signal(b_pid, "STOP")?;
    let resumed = scopeguard(b_pid);
    wait_metric(sys.relay_admin, "comsat_relay_links_paired", |v| v == 0.0).await?;

    // A's application writes 8 MiB and closes while B is away.
    let mut client = TcpStream::connect(listen).await?;
    let writer = tokio::spawn(async move {
        Oracle::write_to(SEED, LEN, &mut client).await?;
        client.shutdown().await?;
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await?;
        anyhow::Ok(rest)
    });
    let held = wait_metric(sys.relay_admin, "comsat_relay_buffered_bytes", |v| {
        v >= (LEN / 2) as f64
    })
    .await?;
    eprintln!("relay holds {held} bytes for the absent peer");
    assert!(
        held <= (common::BUFFER_LIMIT + 128 * 1024) as f64,
        "relay buffered {held}, over the link's buffer_limit"
    );

    // B comes back and receives everything, in order.
    drop(resumed);
    let (mut s, _) = tokio::time::timeout(Duration::from_secs(30), target.accept()).await??;
    let (len, hash) = tokio::time::timeout(
        Duration::from_secs(60),
        comsat_tests::oracle::hash_to_end(&mut s),
    )
    .await??;
    assert_eq!(len, LEN, "bytes delivered after the peer came back");
    assert_eq!(
        hash,
        Oracle::digest(SEED, LEN),
        "SHA-256 after store and forward"
    );
    s.shutdown().await?;
    let rest = tokio::time::timeout(Duration::from_secs(30), writer).await???;
    assert!(rest.is_empty());
    wait_metric(sys.relay_admin, "comsat_relay_buffered_bytes", |v| v == 0.0).await?;
    Ok(())
}

/// Points an agent config's first relay at `front` (a fault proxy), noting
/// the relay address it replaced in `upstream`.
fn redirect_first_relay(
    text: String,
    front: SocketAddr,
    upstream: &std::sync::Mutex<Option<SocketAddr>>,
) -> String {
    let line = text
        .lines()
        .find(|l| l.starts_with("addr = "))
        .map(str::to_owned)
        .unwrap_or_default();
    let relay = line.trim_start_matches("addr = ").trim_matches('"');
    *upstream.lock().unwrap_or_else(|p| p.into_inner()) = relay.parse().ok();
    text.replacen(&line, &format!("addr = \"{front}\""), 1)
}

/// A system whose agent A reaches the relay through a fault proxy.
fn partitioned_system(
    target: SocketAddr,
    flow_timeout_ms: u64,
) -> Result<(System, comsat_tests::fault::FaultProxy)> {
    let front = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let front_addr = front.local_addr()?;
    let upstream = std::sync::Mutex::new(None);
    let sys = System::start_with(
        Options::one(DevLink {
            name: "p".into(),
            listen: "tcp://127.0.0.1:0".into(),
            target: format!("tcp://{target}"),
            allowed_uids: vec![],
            allow: vec![],
            proxy_protocol: false,
        }),
        |agent, text| {
            let text = text.replacen(
                "noise_key = \"noise.key\"\n",
                &format!("noise_key = \"noise.key\"\nflow_timeout_ms = {flow_timeout_ms}\n"),
                1,
            );
            if agent != 0 {
                return text;
            }
            // Agent A dials the proxy instead of the relay.
            redirect_first_relay(text, front_addr, &upstream)
        },
    );
    // The proxy must run before agent A can connect: start it, then wait
    // for readiness in the caller.
    let upstream = upstream
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .context("no relay address in agent A's config")?;
    let proxy = comsat_tests::fault::FaultProxy::start_on(front, upstream)?;
    Ok((sys?, proxy))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_partition_and_loss_are_invisible_to_the_application() -> Result<()> {
    let _heavy = common::one_at_a_time().await;
    use comsat_tests::fault::Fault;
    let target = TcpListener::bind("127.0.0.1:0").await?;
    let (mut sys, proxy) = partitioned_system(target.local_addr()?, 30_000)?;
    let listen: SocketAddr = sys.tcp_listen_addr("p")?;
    sys.wait_ready()?;
    let bulk = Bulk::start(listen, target);
    bulk.reach(Bulk::TOTAL / 4).await?;
    proxy.set(Fault::Lossy {
        drop_percent: 5,
        delay: Duration::from_millis(10),
    });
    eprintln!("5% loss and 10 ms delay for 2 s");
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.set(Fault::Blackhole);
    eprintln!("blackhole for 3 s");
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.set(Fault::Pass);
    bulk.finish().await?;
    assert_no_application_failures(&sys)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_partition_fails_both_ends_and_frees_the_relay() -> Result<()> {
    let _heavy = common::one_at_a_time().await;
    use comsat_tests::fault::Fault;
    let target = TcpListener::bind("127.0.0.1:0").await?;
    let (mut sys, proxy) = partitioned_system(target.local_addr()?, 3_000)?;
    let listen: SocketAddr = sys.tcp_listen_addr("p")?;
    sys.wait_ready()?;
    let mut client = TcpStream::connect(listen).await?;
    client.write_all(b"hello").await?;
    let (mut server, _) = tokio::time::timeout(Duration::from_secs(10), target.accept()).await??;
    let mut hello = [0u8; 5];
    server.read_exact(&mut hello).await?;
    server.write_all(b"world").await?;
    client.read_exact(&mut hello).await?;

    proxy.set(Fault::Blackhole);
    // The flow is idle: A notices the silence at its next keep-alive (25 s,
    // then 3 s unanswered), and its flow times out. B's, after the relay
    // notices A gone (its idle timeout, 60 s) and B's flow timeout.
    let (c, s) = tokio::join!(
        expect_reset(client, Duration::from_secs(60)),
        expect_reset(server, Duration::from_secs(90)),
    );
    c.context("client side")?;
    s.context("server side")?;
    // Nothing of the flow is left at the relay.
    wait_metric(sys.relay_admin, "comsat_relay_flows_open", |v| v == 0.0).await?;
    wait_metric(sys.relay_admin, "comsat_relay_buffered_bytes", |v| v == 0.0).await?;
    wait_metric(sys.relay_admin, "comsat_relay_links_paired", |v| v == 0.0).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_receiver_blocks_its_sender_and_not_other_links() -> Result<()> {
    let _heavy = common::one_at_a_time().await;
    const SLOW_TOTAL: u64 = 128 * 1024 * 1024;
    const FAST_LEN: u64 = 16 * 1024 * 1024;
    let slow_target = TcpListener::bind("127.0.0.1:0").await?;
    let fast_target = TcpListener::bind("127.0.0.1:0").await?;
    let mut options = Options::one(DevLink {
        name: "slow".into(),
        listen: "tcp://127.0.0.1:0".into(),
        target: format!("tcp://{}", slow_target.local_addr()?),
        allowed_uids: vec![],
        allow: vec![],
        proxy_protocol: false,
    });
    options.links.push(DevLink {
        name: "fast".into(),
        listen: "tcp://127.0.0.1:0".into(),
        target: format!("tcp://{}", fast_target.local_addr()?),
        allowed_uids: vec![],
        allow: vec![],
        proxy_protocol: false,
    });
    let mut sys = System::start(options)?;
    let slow: SocketAddr = sys.tcp_listen_addr("slow")?;
    let fast: SocketAddr = sys.tcp_listen_addr("fast")?;
    sys.wait_ready()?;

    // A consumer that accepts and never reads.
    let held = tokio::spawn(async move { slow_target.accept().await });
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let written = written.clone();
        tokio::spawn(async move {
            let mut s = TcpStream::connect(slow).await?;
            let chunk = vec![7u8; 64 * 1024];
            while written.load(Ordering::Relaxed) < SLOW_TOTAL {
                s.write_all(&chunk).await?;
                written.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
            anyhow::Ok(())
        })
    };

    // The other link on the same relay carries 16 MiB each way meanwhile.
    let server = tokio::spawn(async move {
        let (s, _) = fast_target.accept().await?;
        let (mut r, mut w) = s.into_split();
        let (sent, got) = tokio::join!(
            async {
                Oracle::write_to(2, FAST_LEN, &mut w).await?;
                w.shutdown().await
            },
            comsat_tests::oracle::hash_to_end(&mut r)
        );
        sent?;
        anyhow::Ok(got?)
    });
    let c = TcpStream::connect(fast).await?;
    let (mut r, mut w) = c.into_split();
    let (sent, got) = tokio::time::timeout(Duration::from_secs(120), async {
        tokio::join!(
            async {
                Oracle::write_to(1, FAST_LEN, &mut w).await?;
                w.shutdown().await
            },
            comsat_tests::oracle::hash_to_end(&mut r)
        )
    })
    .await?;
    sent?;
    assert_eq!(
        got?,
        (FAST_LEN, Oracle::digest(2, FAST_LEN)),
        "fast link, client side"
    );
    assert_eq!(
        server.await??,
        (FAST_LEN, Oracle::digest(1, FAST_LEN)),
        "fast link, server side"
    );

    // The slow link's sender is blocked: its writes stop progressing, far
    // below what it wanted to send (bounded buffers all along the path).
    let mut last = written.load(Ordering::Relaxed);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = written.load(Ordering::Relaxed);
        if now == last {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the slow link's sender never blocked ({now} bytes written)");
        }
        last = now;
    }
    assert!(
        !writer.is_finished(),
        "the sender finished: nothing pushed back"
    );
    assert!(
        last < SLOW_TOTAL / 2,
        "{last} bytes accepted for a consumer that reads nothing"
    );
    eprintln!("slow sender blocked after {last} bytes");
    let m = scrape(sys.relay_admin)?;
    assert!(
        metric(&m, "comsat_relay_buffered_bytes") <= (common::BUFFER_LIMIT + 128 * 1024) as f64,
        "{m}"
    );
    writer.abort();
    held.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_meet_on_a_relay_both_can_reach() -> Result<()> {
    let _heavy = common::one_at_a_time().await;
    use comsat_tests::fault::{Fault, FaultProxy};
    let target = TcpListener::bind("127.0.0.1:0").await?;
    let target_addr = target.local_addr()?;
    tokio::spawn(echo_server(target));
    // Agent B cannot reach the first relay (a blackhole in front of it);
    // agent A reaches both. A starts on the first relay, alone.
    let front = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let front_addr = front.local_addr()?;
    let first_relay = std::sync::Mutex::new(None);
    let mut options = Options::one(DevLink {
        name: "meet".into(),
        listen: "tcp://127.0.0.1:0".into(),
        target: format!("tcp://{target_addr}"),
        allowed_uids: vec![],
        allow: vec![],
        proxy_protocol: false,
    });
    options.extra_relays = 1;
    let mut sys = System::start_with(options, |agent, text| {
        if agent != 1 {
            return text;
        }
        redirect_first_relay(text, front_addr, &first_relay)
    })?;
    let upstream = first_relay
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .context("no first relay in agent B's config")?;
    let proxy = FaultProxy::start_on(front, upstream)?;
    proxy.set(Fault::Blackhole);
    let listen: SocketAddr = sys.tcp_listen_addr("meet")?;

    // Within a few dwell periods A moves to the second relay, where B is.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let attempt = async {
            let mut s = TcpStream::connect(listen).await?;
            echo_round(&mut s, b"are we on the same relay?").await
        };
        match tokio::time::timeout(Duration::from_secs(15), attempt).await {
            Ok(Ok(())) => break,
            _ if tokio::time::Instant::now() > deadline => {
                bail!("the agents never met on the relay both can reach")
            }
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
    let second = scrape(sys.backups[0].1)?;
    assert_eq!(
        metric(&second, "comsat_relay_links_paired"),
        1.0,
        "{second}"
    );
    assert_eq!(
        metric(&scrape(sys.relay_admin)?, "comsat_relay_links_paired"),
        0.0
    );
    Ok(())
}
