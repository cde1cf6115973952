//! End-to-end tests of the encrypted data plane: the real `comsat` binary
//! as separate relay and agent processes on loopback.

mod common;
#[path = "common/flows.rs"]
mod flows;

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use common::{Options, System};
use comsat_node::keys::{Generate, KeyFile, RandomId};
use comsat_protocol::grant::{Grant, GrantSide, LinkLimits};
use comsat_protocol::msg::make_hello;
use comsat_protocol::{CLOSE_REFUSED, LinkId, NodeId, RelayId, SigningKey};
use comsat_tests::raw::{Control, HelloOutcome, RawClient, exporter, send_hello};
use comsat_tests::{metric, minor_faults, scrape};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use flows::*;

/// A ready system with one link, `bulk`, from a TCP listener at agent A
/// to a target listener of ours; returns the system, the target and agent
/// A's listen address.
async fn one_tcp_link() -> Result<(System, TcpListener, SocketAddr)> {
    let target = TcpListener::bind("127.0.0.1:0").await?;
    let target_addr = target.local_addr()?;
    let mut sys = System::start(Options::one(link(
        "bulk",
        "tcp://127.0.0.1:0".into(),
        format!("tcp://{target_addr}"),
    )))?;
    let listen = sys.tcp_listen_addr("bulk")?;
    sys.wait_ready()?;
    Ok((sys, target, listen))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_64mib_both_ways_over_8_flows() -> Result<()> {
    let (sys, target, listen) = one_tcp_link().await?;
    eight_tcp_flows(target, listen).await?;
    let m = scrape(sys.relay_admin)?;
    assert!(metric(&m, "comsat_relay_forwarded_bytes_total") >= (2 * FLOWS * PER_FLOW) as f64);
    assert_eq!(metric(&m, "comsat_relay_flows_total"), FLOWS as f64);
    Ok(())
}

/// A ready system with one link between Unix sockets in a new directory,
/// whose listener admits only the uid `allowed` makes of our own; returns
/// the directory, the listen path, the target listener and the system.
fn unix_system(
    name: &str,
    allowed: impl Fn(u32) -> u32,
) -> Result<(tempfile::TempDir, std::path::PathBuf, UnixListener, System)> {
    let sockets = tempfile::tempdir()?;
    let listen_path = sockets.path().join("app.sock");
    let target_path = sockets.path().join("service.sock");
    let target = UnixListener::bind(&target_path)?;
    let uid = std::fs::metadata(sockets.path())?.uid();
    let mut l = link(
        name,
        format!("unix://{}", listen_path.display()),
        format!("unix://{}", target_path.display()),
    );
    l.allowed_uids = vec![allowed(uid)];
    let sys = System::start(Options::one(l))?;
    sys.wait_ready()?;
    Ok((sockets, listen_path, target, sys))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_64mib_both_ways_over_8_flows() -> Result<()> {
    // Only our own uid may use the listener.
    let (_sockets, listen_path, target, sys) = unix_system("unix", |uid| uid)?;
    let target = Arc::new(target);
    eight_flows(
        move || {
            let target = target.clone();
            async move { target.accept().await.map(|(s, _)| s) }
        },
        move || UnixStream::connect(listen_path.clone()),
    )
    .await?;
    drop(sys);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_closed_flow_still_carries_the_reply() -> Result<()> {
    let target = TcpListener::bind("127.0.0.1:0").await?;
    let target_addr = target.local_addr()?;
    let mut sys = System::start(Options {
        links: vec![link(
            "half",
            "tcp://127.0.0.1:0".into(),
            format!("tcp://{target_addr}"),
        )],
        tap: false,
        pin_sha256: true, // and the relay is pinned by certificate hash
        relay_extra: String::new(),
        extra_relays: 0,
    })?;
    let listen: SocketAddr = sys.tcp_listen_addr("half")?;
    sys.wait_ready()?;
    // The server reads the whole request to EOF, and only then answers.
    let server = tokio::spawn(async move {
        let (mut s, _) = target.accept().await?;
        let mut request = Vec::new();
        s.read_to_end(&mut request).await?;
        let reply = format!("got {} bytes", request.len());
        s.write_all(reply.as_bytes()).await?;
        s.shutdown().await?;
        anyhow::Ok(request)
    });
    let mut c = TcpStream::connect(listen).await?;
    c.write_all(b"request body").await?;
    c.shutdown().await?; // half-close: no more from the client
    let mut reply = String::new();
    tokio::time::timeout(Duration::from_secs(20), c.read_to_string(&mut reply)).await??;
    assert_eq!(reply, "got 12 bytes");
    assert_eq!(server.await??, b"request body");
    Ok(())
}

/// End-to-end acks: an interactive flow's records are acknowledged lazily
/// (at most one ack message per 100 ms per agent, not one per record, so a
/// ping-pong does not wake every process's control task each round trip),
/// yet they are acknowledged, and the flow still ends on both agents (an
/// end waits for its Fin's acknowledgement).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chatty_flow_is_acknowledged_lazily_and_still_ends_on_both_agents() -> Result<()> {
    const ROUNDS: u32 = 400;
    /// `comsat_agent::defaults::ACK_LAZY`.
    const ACK_LAZY: Duration = Duration::from_millis(100);
    let echo = spawn_echo().await?;
    let mut sys = System::start(Options::one(link(
        "chat",
        "tcp://127.0.0.1:0".into(),
        format!("tcp://{echo}"),
    )))?;
    let listen: SocketAddr = sys.tcp_listen_addr("chat")?;
    sys.wait_ready()?;
    let admins = [sys.agents[0].1, sys.agents[1].1];
    let acks =
        |admin| -> Result<f64> { Ok(metric(&scrape(admin)?, "comsat_agent_ack_messages_total")) };
    let mut c = TcpStream::connect(listen).await?;
    c.set_nodelay(true)?;
    let mut back = [0u8; 64];
    // The flow is open and its first records acknowledged.
    c.write_all(&[1u8; 64]).await?;
    c.read_exact(&mut back).await?;
    tokio::time::sleep(3 * ACK_LAZY).await;
    let before = [acks(admins[0])?, acks(admins[1])?];
    let started = std::time::Instant::now();
    for i in 0..ROUNDS {
        let msg = [i as u8; 64];
        c.write_all(&msg).await?;
        tokio::time::timeout(Duration::from_secs(20), c.read_exact(&mut back)).await??;
        assert_eq!(back, msg, "round trip {i}");
    }
    let took = started.elapsed();
    let during = [acks(admins[0])? - before[0], acks(admins[1])? - before[1]];
    let lazy_bound = (took.as_secs_f64() / ACK_LAZY.as_secs_f64()).ceil() + 2.0;
    for (agent, sent) in ["A", "B"].iter().zip(during) {
        assert!(
            sent <= lazy_bound,
            "agent {agent} sent {sent} ack messages in {took:?} of {ROUNDS} round trips \
             (lazy acks allow at most {lazy_bound})"
        );
    }
    // ... and they do go out.
    tokio::time::sleep(3 * ACK_LAZY).await;
    for (i, agent) in ["A", "B"].iter().enumerate() {
        let now = acks(admins[i])?;
        assert!(
            now > before[i],
            "agent {agent}: the round trips' records were never acknowledged"
        );
    }
    // The flow ends on both agents: each side's Fin is acknowledged.
    c.shutdown().await?;
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), c.read_to_end(&mut rest)).await??;
    assert!(rest.is_empty());
    drop(c);
    for admin in admins {
        wait_metric_at_most(admin, "comsat_agent_flows_open", 0.0).await?;
    }
    Ok(())
}

/// A bulk flow does not make the relay or the agents hand freed memory back
/// to the kernel and fault it in again (glibc's default trim threshold did:
/// ~190 faults per MiB moved here over the three processes, each a zeroed page
/// and some 5 % of their CPU; the binary raises the threshold). Memory a
/// process touches once (a send window reaching a new high, a flow moving
/// to another runtime's thread) faults in once, up to ~2,500 pages here
/// whatever the length; the transfer is long enough that only faults that
/// recur with every MiB can reach the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_flow_does_not_fault_freed_memory_back_in() -> Result<()> {
    const MIB: usize = 1 << 20;
    /// Until the flow's windows and buffers have filled once.
    const WARM: usize = 64 * MIB;
    const MEASURED: usize = 384 * MIB;
    /// Faults allowed per MiB measured, all three processes together.
    const PER_MIB: usize = 16;
    let (sys, target, listen) = one_tcp_link().await?;
    let pids = pids(&sys);
    let faults = || -> Result<u64> { pids.iter().map(|p| minor_faults(*p)).sum() };
    let (warm_tx, warm_rx) = tokio::sync::oneshot::channel();
    let server = tokio::spawn(async move {
        let (mut s, _) = target.accept().await?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0;
        let mut warm_tx = Some(warm_tx);
        loop {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                return anyhow::Ok(got);
            }
            got += n;
            if got >= WARM
                && let Some(tx) = warm_tx.take()
            {
                let _ = tx.send(());
            }
        }
    });
    let client = tokio::spawn(async move {
        let mut c = TcpStream::connect(listen).await?;
        let chunk = vec![0x5au8; MIB];
        for _ in 0..(WARM + MEASURED) / MIB {
            c.write_all(&chunk).await?;
        }
        c.shutdown().await?;
        anyhow::Ok(())
    });
    tokio::time::timeout(TEST_TIMEOUT, async {
        warm_rx
            .await
            .context("the target closed before it had the warm-up")?;
        let before = faults()?;
        let each_before = pids
            .iter()
            .map(|p| minor_faults(*p))
            .collect::<Result<Vec<_>>>()?;
        client.await??;
        let got = server.await??;
        let during = faults()? - before;
        assert_eq!(got, WARM + MEASURED, "bytes at the target");
        let bound = (PER_MIB * (MEASURED / MIB)) as u64;
        let each = pids
            .iter()
            .zip(&each_before)
            .map(|(p, b)| Ok(minor_faults(*p)? - b))
            .collect::<Result<Vec<_>>>()?;
        eprintln!(
            "{during} minor page faults while {} MiB moved (relay, agent A, agent B: {each:?})",
            MEASURED / MIB
        );
        assert!(
            during <= bound,
            "{during} minor page faults in the relay and agents while ~{} MiB moved (at most \
             {bound})",
            MEASURED / MIB
        );
        anyhow::Ok(())
    })
    .await
    .context("transfer timed out")?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_never_sees_plaintext() -> Result<()> {
    const MARKER: &[u8] = b"COMSAT-PLAINTEXT-MARKER-7f3a";
    let target = TcpListener::bind("127.0.0.1:0").await?;
    let target_addr = target.local_addr()?;
    let mut sys = System::start(Options {
        links: vec![link(
            "tap",
            "tcp://127.0.0.1:0".into(),
            format!("tcp://{target_addr}"),
        )],
        tap: true,
        pin_sha256: false,
        relay_extra: String::new(),
        extra_relays: 0,
    })?;
    let listen: SocketAddr = sys.tcp_listen_addr("tap")?;
    sys.wait_ready()?;
    let payload: Vec<u8> = MARKER.repeat(4096); // ~112 KiB
    let server = tokio::spawn(async move {
        let (mut s, _) = target.accept().await?;
        let mut got = Vec::new();
        s.read_to_end(&mut got).await?;
        s.write_all(&got).await?; // echo: the marker crosses both ways
        s.shutdown().await?;
        anyhow::Ok(got)
    });
    let mut c = TcpStream::connect(listen).await?;
    c.write_all(&payload).await?;
    c.shutdown().await?;
    let mut echoed = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), c.read_to_end(&mut echoed)).await??;
    assert_eq!(server.await??, payload, "target received the plaintext");
    assert_eq!(echoed, payload, "client received the echo");
    let tap = std::fs::read(sys.layout.relay_config.with_file_name("tap.bin"))?;
    assert!(
        tap.len() >= 2 * payload.len(),
        "the tap saw only {} bytes: it did not see the flow",
        tap.len()
    );
    assert!(
        !tap.windows(MARKER.len()).any(|w| w == MARKER),
        "the relay forwarded plaintext"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_peer_with_wrong_uid_is_refused() -> Result<()> {
    let (_sockets, listen_path, target, sys) =
        unix_system("guarded", |uid| uid.wrapping_add(4242))?;
    let mut c = UnixStream::connect(&listen_path).await?;
    let _ = c.write_all(b"let me in").await;
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut buf)).await?;
    assert!(matches!(n, Ok(0) | Err(_)), "refused peer got data");
    // The target never saw a connection.
    let accepted = tokio::time::timeout(Duration::from_millis(500), target.accept()).await;
    assert!(
        accepted.is_err(),
        "the target was dialled for a refused peer"
    );
    let m = scrape(sys.agents[0].1)?;
    assert_eq!(
        metric(&m, "comsat_agent_local_refused_total{reason=\"workload\"}"),
        1.0
    );
    assert_eq!(metric(&m, "comsat_agent_flows_total"), 0.0);
    Ok(())
}

/// Writes `grant` into the relay's grant directory and waits until the
/// relay has seen it (accepted or rejected).
fn add_grant(sys: &System, name: &str, grant: &Grant, authority: &SigningKey) -> Result<()> {
    let bytes = grant.sign(authority)?.encode()?;
    std::fs::write(sys.layout.grants_dir.join(format!("{name}.grant")), bytes)?;
    Ok(())
}

fn grant_for(
    node: NodeId,
    key: &SigningKey,
    peer: &comsat_controller::dev::DevAgent,
    relay: RelayId,
    not_after: u64,
) -> Grant {
    Grant {
        link_id: LinkId::random(),
        generation: 1,
        relays: vec![relay],
        side_a: GrantSide {
            node_id: node,
            sign_pub: key.public(),
        },
        side_b: GrantSide {
            node_id: peer.node_id,
            sign_pub: peer.sign_pub,
        },
        not_after,
        buffer_limit: 1 << 20,
        limits: LinkLimits::default(),
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn wait_metric_at_most(admin: SocketAddr, series: &str, at_most: f64) -> Result<()> {
    comsat_tests::wait_for_metric(admin, series, Duration::from_secs(15), |v| v <= at_most).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_are_refused_with_one_code_and_counted() -> Result<()> {
    let sys = System::start(Options::one(link(
        "ok",
        "tcp://127.0.0.1:0".into(),
        "tcp://127.0.0.1:9".into(),
    )))?;
    sys.wait_ready()?;
    let authority = SigningKey::read_file(&sys.layout.authority_key)?;
    let other_authority = SigningKey::generate();
    let relay = sys.layout.relay_id;
    let peer = &sys.layout.agent_b;

    // Three nodes whose grants the relay must refuse.
    let forged = (NodeId::random(), SigningKey::generate());
    let elsewhere = (NodeId::random(), SigningKey::generate());
    let expired = (NodeId::random(), SigningKey::generate());
    add_grant(
        &sys,
        "forged",
        &grant_for(forged.0, &forged.1, peer, relay, now() + 3600),
        &other_authority,
    )?;
    add_grant(
        &sys,
        "elsewhere",
        &grant_for(
            elsewhere.0,
            &elsewhere.1,
            peer,
            RelayId::random(),
            now() + 3600,
        ),
        &authority,
    )?;
    add_grant(
        &sys,
        "expired",
        &grant_for(expired.0, &expired.1, peer, relay, now() - 10),
        &authority,
    )?;
    for reason in ["bad_signature", "other_relay", "expired"] {
        wait_metric(
            sys.relay_admin,
            &format!("comsat_relay_grants_rejected_total{{reason=\"{reason}\"}}"),
            1.0,
        )
        .await?;
    }

    let client = RawClient::new(&sys.layout.ca_pem)?;
    let unknown = (NodeId::random(), SigningKey::generate());
    for (what, (node, key)) in [
        ("unknown key", &unknown),
        ("grant signed by another authority", &forged),
        ("grant for another relay", &elsewhere),
        ("expired grant", &expired),
    ] {
        let conn = client.connect(sys.relay_quic).await?;
        let hello = make_hello(*node, key, &exporter(&conn)?);
        let outcome = send_hello(&conn, &hello).await?;
        assert_eq!(
            outcome,
            HelloOutcome::Closed(CLOSE_REFUSED.into()),
            "{what}: expected the generic refusal; relay log:\n{}",
            sys.relay.log_tail()
        );
    }
    let m = scrape(sys.relay_admin)?;
    assert_eq!(
        metric(
            &m,
            "comsat_relay_auth_failures_total{reason=\"unknown_node\"}"
        ),
        4.0,
        "{m}\nrelay log:\n{}",
        sys.relay.log_tail()
    );

    // A Hello that is valid on one connection is useless on another.
    let agent_a_key = SigningKey::read_file(&sys.layout.agent_a.dir.join("node.key"))?;
    let first = client.connect(sys.relay_quic).await?;
    let hello = make_hello(sys.layout.agent_a.node_id, &agent_a_key, &exporter(&first)?);
    assert_eq!(
        send_hello(&first, &hello).await?,
        HelloOutcome::Welcome,
        "relay log:\n{}",
        sys.relay.log_tail()
    );
    let second = client.connect(sys.relay_quic).await?;
    assert_eq!(
        send_hello(&second, &hello).await?,
        HelloOutcome::Closed(CLOSE_REFUSED.into()),
        "replayed Hello; relay log:\n{}",
        sys.relay.log_tail()
    );
    let m = scrape(sys.relay_admin)?;
    assert_eq!(
        metric(
            &m,
            "comsat_relay_auth_failures_total{reason=\"bad_signature\"}"
        ),
        1.0,
        "{m}\nrelay log:\n{}",
        sys.relay.log_tail()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_refuses_a_relay_that_does_not_match_its_pin() -> Result<()> {
    let sys = System::start(Options {
        links: vec![link(
            "pinned",
            "tcp://127.0.0.1:0".into(),
            "tcp://127.0.0.1:9".into(),
        )],
        tap: false,
        pin_sha256: true,
        relay_extra: String::new(),
        extra_relays: 0,
    })?;
    sys.wait_ready()?;
    // The same agent, but pinned to a certificate the relay does not have.
    let config = std::fs::read_to_string(&sys.layout.agent_a.config)?;
    let wrong = config.replace(&sys.layout.relay_cert_sha256, &"ab".repeat(32));
    assert_ne!(wrong, config);
    let path = sys.layout.agent_a.dir.join("wrong-pin.toml");
    std::fs::write(&path, wrong)?;
    let (_agent, admin) = common::start_agent(&path, &sys.logs(), "agent-wrong-pin")?;
    wait_metric(admin, "comsat_agent_relay_connect_failures_total", 2.0).await?;
    let m = scrape(admin)?;
    assert_eq!(metric(&m, "comsat_agent_relay_connects_total"), 0.0, "{m}");
    assert_eq!(comsat_tests::proc::http_get(admin, "/readyz")?.0, 503);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticated_connections_leave_the_unauthenticated_cap() -> Result<()> {
    let mut options = Options::one(link(
        "cap",
        "tcp://127.0.0.1:0".into(),
        "tcp://127.0.0.1:9".into(),
    ));
    options.relay_extra = "[limits]\nmax_unauthenticated = 1\n".into();
    let sys = System::start(options)?;
    // Both agents got in, one after the other, through a cap of one.
    sys.wait_ready()?;
    // (Their first attempts may have raced and been refused: count from here.)
    const REFUSED: &str = "comsat_relay_auth_failures_total{reason=\"too_many_unauthenticated\"}";
    let refused_before = metric(&scrape(sys.relay_admin)?, REFUSED);
    let key = SigningKey::read_file(&sys.layout.agent_a.dir.join("node.key"))?;
    let client = RawClient::new(&sys.layout.ca_pem)?;
    // Each stays open, its control stream with it (the relay closes a
    // connection whose control stream ends).
    let mut open = Vec::new();
    for _ in 0..3 {
        let conn = client.connect(sys.relay_quic).await?;
        let hello = make_hello(sys.layout.agent_a.node_id, &key, &exporter(&conn)?);
        let control = Control::open(&conn, &hello).await?;
        open.push((conn, control));
    }
    let m = scrape(sys.relay_admin)?;
    assert_eq!(metric(&m, REFUSED), refused_before, "{m}");
    Ok(())
}
