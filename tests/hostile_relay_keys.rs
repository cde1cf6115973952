//! The relay as the adversary, over many keys and relays: flows carry many
//! times the rekey limit, nonces never repeat across a gigabyte, thousands
//! of flows, kills and a failover, a relay cannot stand in for another of
//! the same CA, and a session that meets too many forgeries is replaced.
//! The real relay runs in this test's process with a [`Hostile`]
//! adversary between two real agent processes.

mod common;
#[path = "common/hostile_setup.rs"]
mod hostile_setup;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use comsat_controller::dev::{DevLayout, DevLink, DevOptions};
use comsat_protocol::Side;
use comsat_protocol::msg::PeerFrame;
use comsat_relay::{Relay, RelayConfig};
use comsat_tests::hostile::Hostile;
use comsat_tests::{free_udp_port, metric, scrape};
use hostile_setup::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// Records one key seals in the rekey tests (`rekey_records_log2 = 4`).
const SMALL_KEY: u64 = 16;

/// With the rekey limit lowered to 16 records, eight flows open throughout
/// carry 4 MiB each, both ways (some 64 records per flow and direction,
/// over 30 times the limit in all). Checks: a flow moves to its next key
/// every 16 records without a word on the wire and without a reset
/// (protocol.md, "Keys and nonces"); every byte arrives; each flow went
/// through at least 3 key epochs; no key sealed two records under one
/// nonce.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_carries_many_times_the_rekey_limit_with_eight_flows_open() -> Result<()> {
    let _heavy = common::one_at_a_time().await;
    let sys =
        Setup::start_tuned(&[("l", echo_target().await?)], "rekey_records_log2 = 4\n").await?;
    const PER_FLOW: usize = 4 << 20;
    let mut flows = Vec::new();
    for seed in 0..8u64 {
        let listen = sys.listen;
        flows.push(tokio::spawn(async move {
            let s = TcpStream::connect(listen).await?;
            let (mut r, mut w) = s.into_split();
            let sent = payload(seed, PER_FLOW);
            let expect = sent.clone();
            let writer = tokio::spawn(async move {
                w.write_all(&sent).await?;
                w.shutdown().await?;
                anyhow::Ok(())
            });
            let mut back = Vec::with_capacity(PER_FLOW);
            tokio::time::timeout(Duration::from_secs(120), r.read_to_end(&mut back))
                .await
                .context("flow timed out")??;
            writer.await??;
            anyhow::ensure!(back == expect, "flow {seed}: the echo differs");
            anyhow::Ok(())
        }));
    }
    for f in flows {
        f.await??;
    }
    for side in [Side::A, Side::B] {
        assert_eq!(sys.metric(side, "comsat_agent_flows_failed_total")?, 0.0);
        let rekeys = sys.metric(side, "comsat_agent_rekeys_total{kind=\"records\"}")?;
        assert!(rekeys >= 16.0, "{side:?} moved to a new key {rekeys} times");
    }
    // The relay's view: each flow, each way, reached its third key.
    let highest = sys.hostile.highest_seqs();
    assert_eq!(highest.len(), 16, "{highest:?}");
    for ((side, flow, _), seq) in &highest {
        let epochs = seq / SMALL_KEY + 1;
        assert!(epochs >= 3, "{side:?} flow {flow}: {epochs} key epochs");
    }
    sys.assert_no_nonce_reused();
    Ok(())
}

/// With generations of 3 flow ids per side (`flow_ids_log2 = 2`), 20 flows
/// one after another take each id again, in 7 generations. Checks: flow ids
/// past the id space continue in a new generation under new keys
/// (protocol.md, "Flow ids"): every flow works, none is refused as a
/// replay, and the relay saw the same ids under different keys, never
/// one key twice on a nonce.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_ids_past_a_generation_continue_in_a_new_one() -> Result<()> {
    let _heavy = common::one_at_a_time().await;
    let (addr, target) = target().await?;
    let sys = Setup::start_tuned(&[("l", addr)], "flow_ids_log2 = 2\n").await?;
    for i in 0..20u64 {
        let sent = payload(i, 5000 + i as usize);
        let answer = send_through(sys.listen, &sent).await?;
        let got = target.delivered(i as usize).await?;
        assert!(exact_or_reset(&sent, &got, &answer), "flow {i} was reset");
    }
    assert_eq!(target.dials(), 20);
    // On the wire a flow id carries its generation's low 8 bits: the 20
    // flows are 20 wire ids over 3 ids.
    let wire: std::collections::HashSet<_> = sys
        .hostile
        .recordings()
        .into_iter()
        .filter(|r| r.opener)
        .map(|r| r.flow)
        .collect();
    let ids: std::collections::HashSet<_> = wire
        .iter()
        .map(|w| comsat_protocol::record::split_flow_id(*w).1)
        .collect();
    assert_eq!((wire.len(), ids.len()), (20, 3), "ids used: {wire:?}");
    assert_eq!(sys.hostile.flow_instances(), 20);
    assert!(sys.metric(Side::A, "comsat_agent_rekeys_total{kind=\"flow_ids\"}")? >= 6.0);
    assert_eq!(
        sys.metric(
            Side::B,
            "comsat_agent_peer_refused_total{reason=\"replayed_flow\"}"
        )?,
        0.0
    );
    sys.assert_no_nonce_reused();
    Ok(())
}

/// A `comsat dev` layout in `dir` with two relays and one link `l` from
/// agent A's listener to `target` at agent B, on both relays in order.
fn two_relays(dir: &std::path::Path, target: String) -> Result<DevLayout> {
    let any: SocketAddr = "127.0.0.1:0".parse()?;
    Ok(comsat_controller::dev::init(
        &dir.join("setup"),
        &DevOptions {
            relay_listen: format!("127.0.0.1:{}", free_udp_port()?).parse()?,
            relay_admin: None,
            agent_admin: [Some(any), Some(any)],
            links: vec![DevLink {
                name: "l".into(),
                listen: "tcp://127.0.0.1:0".into(),
                target,
                allowed_uids: vec![],
                allow: vec![],
                proxy_protocol: false,
            }],
            pin_sha256: false,
            extra_relays: vec![(format!("127.0.0.1:{}", free_udp_port()?).parse()?, None)],
        },
    )?)
}

/// A relay run in this process on a runtime of its own, so it can be
/// killed: its runtime is shut down without a word to its agents, as a
/// killed process would go.
struct KillableRelay {
    runtime: Option<tokio::runtime::Runtime>,
}

impl KillableRelay {
    /// Binds `config`'s relay (waiting for a killed one's port) with
    /// `hostile` inside, and runs it.
    async fn start(config: &RelayConfig, hostile: &Arc<Hostile>) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let deadline = Instant::now() + WAIT;
        let relay = loop {
            let bound = {
                let _in = runtime.enter();
                Relay::bind(config.clone())
            };
            match bound {
                Ok(relay) => break relay,
                Err(e) if Instant::now() > deadline => return Err(e.into()),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        relay.set_adversary(hostile.clone());
        let (stop, stopped) = mpsc::channel(1);
        runtime.spawn(async move {
            let _stop = stop;
            relay.run_until(stopped).await
        });
        Ok(Self {
            runtime: Some(runtime),
        })
    }

    /// Kills the relay: every task and socket goes at once.
    fn kill(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for KillableRelay {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Echo flows of `len` bytes each, `count` at once; each must come back
/// exact or be reset. Returns the bytes that came back.
async fn bulk(listen: SocketAddr, count: u64, len: usize, seed: u64) -> Result<u64> {
    let mut flows = Vec::new();
    for i in 0..count {
        flows.push(tokio::spawn(async move {
            let s = TcpStream::connect(listen).await?;
            let (mut r, mut w) = s.into_split();
            let sent = payload(seed + i, len);
            let expect = sent.clone();
            let writer = tokio::spawn(async move {
                w.write_all(&sent).await?;
                w.shutdown().await
            });
            let mut back = Vec::with_capacity(len);
            let read = tokio::time::timeout(Duration::from_secs(240), r.read_to_end(&mut back))
                .await
                .context("bulk flow timed out")?;
            // A reset is reported once, to whichever call meets it first:
            // the flow ended cleanly only if neither half saw one.
            let wrote = matches!(writer.await, Ok(Ok(())));
            anyhow::ensure!(
                expect.starts_with(&back),
                "bulk flow {}: the echo is not a prefix of what was sent",
                seed + i
            );
            anyhow::ensure!(
                !(read.is_ok() && wrote) || back.len() == len,
                "bulk flow {}: a clean end after {} of {len} bytes",
                seed + i,
                back.len()
            );
            anyhow::Ok(back.len() as u64)
        }));
    }
    let mut total = 0;
    for f in flows {
        total += f.await??;
    }
    Ok(total)
}

/// `count` short echo flows, `workers` at a time; each comes back exact or
/// is reset (relays and agents are killed meanwhile). Returns how many
/// came back whole.
async fn short_flows(listen: SocketAddr, count: u64, workers: u64) -> Result<u64> {
    let mut tasks = Vec::new();
    for w in 0..workers {
        tasks.push(tokio::spawn(async move {
            let mut whole = 0u64;
            for i in (w..count).step_by(workers as usize) {
                let sent = payload(i, 200 + (i % 700) as usize);
                let Ok(Ok(mut s)) =
                    tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(listen)).await
                else {
                    continue;
                };
                let mut back = Vec::new();
                let done = tokio::time::timeout(Duration::from_secs(30), async {
                    s.write_all(&sent).await?;
                    s.shutdown().await?;
                    s.read_to_end(&mut back).await
                })
                .await;
                anyhow::ensure!(sent.starts_with(&back), "flow {i}: not a prefix");
                if matches!(done, Ok(Ok(_))) && back.len() == sent.len() {
                    whole += 1;
                }
            }
            anyhow::Ok(whole)
        }));
    }
    let mut whole = 0;
    for t in tasks {
        whole += t.await??;
    }
    Ok(whole)
}

/// The ledger over a long, eventful run: more than 1 GiB sealed and more
/// than 10,000 flows, while the first relay is killed and restarted twice,
/// then killed for good (the link fails over to the second relay), then
/// agent B restarts. Checks: no agent sealed two records under one key and
/// nonce, across flows, resumes, relay restarts, the failover and the agent
/// restart (protocol.md, "Keys and nonces", "The nonce ledger"); every
/// application saw exact bytes or a reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nonces_never_repeat_over_a_gigabyte_ten_thousand_flows_kills_and_a_failover() -> Result<()>
{
    let _heavy = common::one_at_a_time().await;
    let dir = tempfile::tempdir()?;
    let layout = two_relays(dir.path(), echo_target().await?)?;
    let hostile = Hostile::new();
    let first = RelayConfig::load(&layout.relays[0].config)?;
    let second = RelayConfig::load(&layout.relays[1].config)?;
    let mut relay1 = KillableRelay::start(&first, &hostile).await?;
    let _relay2 = KillableRelay::start(&second, &hostile).await?;
    let logs = dir.path().to_owned();
    let mut a = common::start_agent(&layout.agent_a.config, &logs, "agent-a")?;
    let mut b = common::start_agent(&layout.agent_b.config, &logs, "agent-b")?;
    let listen = comsat_tests::proc::listen_addr(&mut a.0, "l")?;
    const MIB: usize = 1 << 20;

    // Phase 1, on the first relay: killed and restarted twice meanwhile.
    let phase = tokio::spawn(async move {
        let (bytes, whole) = tokio::join!(
            bulk(listen, 4, 128 * MIB, 1000),
            short_flows(listen, 5000, 16)
        );
        anyhow::Ok((bytes?, whole?))
    });
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_secs(3)).await;
        relay1.kill();
        tokio::time::sleep(Duration::from_millis(500)).await;
        relay1 = KillableRelay::start(&first, &hostile).await?;
    }
    let (bytes1, whole1) = phase.await??;

    // Phase 2: the first relay dies for good; the link fails over.
    relay1.kill();
    let (bytes2, whole2) = tokio::join!(
        bulk(listen, 2, 64 * MIB, 2000),
        short_flows(listen, 2500, 16)
    );
    let (bytes2, whole2) = (bytes2?, whole2?);

    // Phase 3: agent B restarts (a new session, flow ids from the start).
    b.0.kill();
    b = common::start_agent(&layout.agent_b.config, &logs, "agent-b-again")?;
    // Short flows at once (some meet the old session), bulk ones once the
    // new session stands.
    let shorts = tokio::spawn(short_flows(listen, 2500, 16));
    let deadline = Instant::now() + WAIT;
    while !b.0.log().contains("new end-to-end session confirmed") {
        anyhow::ensure!(
            Instant::now() < deadline,
            "no new session after agent B restarted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let bytes3 = bulk(listen, 2, 64 * MIB, 3000).await?;
    let whole3 = shorts.await??;

    let echoed = bytes1 + bytes2 + bytes3;
    let whole = whole1 + whole2 + whole3;
    eprintln!(
        "echoed {} MiB, {whole} of 10,000 short flows whole, {} records, {} flow instances",
        echoed >> 20,
        hostile.records_seen(),
        hostile.flow_instances()
    );
    // Echoed bytes crossed the relay twice, sealed once each way.
    assert!(
        2 * echoed >= 1 << 30,
        "only {} MiB sealed",
        (2 * echoed) >> 20
    );
    assert!(
        hostile.flow_instances() >= 10_000,
        "{} flows",
        hostile.flow_instances()
    );
    assert!(whole >= 9_000, "only {whole} short flows came back whole");
    let reused = hostile.reused_nonces();
    assert!(reused.is_empty(), "nonces sealed twice: {reused:?}");
    drop((a, b));
    Ok(())
}

/// Attack: a relay stands in for another. Both relays hold certificates
/// from the fleet's CA for the same name; agent A is sent to the second
/// relay's address for the first relay of its link (a hijacked name, a
/// misrouted address). Checks: relay certificates name their relay, and an
/// agent takes only the relay its grant names (protocol.md, "Around the
/// end-to-end layer"): agent A refuses the stand-in and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_cannot_stand_in_for_another_of_the_same_ca() -> Result<()> {
    let _heavy = common::one_at_a_time().await;
    let dir = tempfile::tempdir()?;
    let layout = two_relays(dir.path(), "tcp://127.0.0.1:9".into())?;
    let (first, second) = (&layout.relays[0], &layout.relays[1]);
    let text = std::fs::read_to_string(&layout.agent_a.config)?;
    let hijacked = text.replacen(
        &format!("addr = \"{}\"", first.listen),
        &format!("addr = \"{}\"", second.listen),
        1,
    );
    anyhow::ensure!(hijacked != text, "no relay address to hijack");
    std::fs::write(&layout.agent_a.config, hijacked)?;
    let hostile = Hostile::new();
    let _r1 = KillableRelay::start(&RelayConfig::load(&first.config)?, &hostile).await?;
    let _r2 = KillableRelay::start(&RelayConfig::load(&second.config)?, &hostile).await?;
    let a = common::start_agent(&layout.agent_a.config, dir.path(), "agent-a")?;
    let want = format!("does not name relay {}", first.id);
    let deadline = Instant::now() + WAIT;
    while !a.0.log().contains(&want) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "agent A took the stand-in:\n{}",
            a.0.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(metric(&scrape(a.1)?, "comsat_agent_relay_connect_failures_total") >= 1.0);
    Ok(())
}

/// Attack: send forged `Open`s (to agent B) and forged link-control
/// messages (to agent A), aiming at keys that will not open them. Checks:
/// each is refused, and a session that meets `max_forgeries` of them (8
/// here, 65,536 by default) is replaced by a new handshake, long before the
/// AEADs' integrity limits (protocol.md, "Keys and nonces"): the link then
/// works under new keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_meets_too_many_forgeries_is_replaced() -> Result<()> {
    let _heavy = common::one_at_a_time().await;
    let (addr, target) = target().await?;
    let sys = Setup::start_tuned(&[("l", addr)], "max_forgeries = 8\n").await?;
    let sessions = |side| count(&sys.log(side), "new end-to-end session confirmed");
    let confirmed = sessions(Side::B);
    let forgeries = "comsat_agent_peer_refused_total{reason=\"forgeries\"}";
    for n in 0..8u32 {
        let mut forged = Vec::new();
        comsat_protocol::record::FlowHeader {
            link_id: sys.link,
            flow_id: 2001 + 2 * n,
        }
        .write_to(&mut forged);
        comsat_protocol::record::RecordHeader { len: 17, seq: 0 }.write_to(&mut forged);
        forged.extend_from_slice(&payload(u64::from(n), 17));
        assert!(sys.inject(Side::B, &forged).await?.is_empty());
    }
    for n in 0..8u64 {
        let frame = PeerFrame::Sealed {
            seq: 1_000_000 + n,
            ciphertext: payload(n, 40),
        };
        assert!(sys.relay.send_peer_frame(sys.link, Side::A, frame));
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let renewed = sys.metric(Side::A, forgeries)? == 1.0
            && sys.metric(Side::B, forgeries)? == 1.0
            && sessions(Side::B) > confirmed;
        if renewed {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no new session after the forgeries:\nA:\n{}\nB:\n{}",
            sys.log(Side::A),
            sys.log(Side::B)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(target.dials(), 0, "a forged Open dialled the target");
    // Each side met its own forgeries: side A starts a new handshake for
    // its own, and again when side B asks it to (at B's next retry, which
    // backs off: 2 s, then 4 s, ...), which resets flows opened in between.
    // Wait until no new session has come for a while, then the link
    // carries a flow whole; a flow a late session change still caught is
    // reset (never altered) and tried again.
    let mut last = (sessions(Side::B), Instant::now());
    while last.1.elapsed() < Duration::from_secs(3) {
        anyhow::ensure!(Instant::now() < deadline + WAIT, "sessions keep changing");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = sessions(Side::B);
        if now != last.0 {
            last = (now, Instant::now());
        }
    }
    let sent = payload(11, 3000);
    let mut whole = false;
    for _ in 0..5 {
        let dialled = target.dials();
        let answer = send_through(sys.listen, &sent).await?;
        if target.dials() > dialled {
            let got = target.delivered(dialled).await?;
            whole = exact_or_reset(&sent, &got, &answer);
        }
        if whole {
            assert_eq!(answer, b"got 3000 bytes");
            break;
        }
        assert!(answer.is_empty(), "a flow not delivered whole was answered");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert!(
        whole,
        "the link never carried a flow whole after the forgeries"
    );
    sys.assert_no_nonce_reused();
    Ok(())
}
