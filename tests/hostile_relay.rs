//! The relay as the adversary: the real relay, in this test's process, with
//! a [`Hostile`] adversary that records, replays, forges and mangles what
//! passes between two real agent processes. Each test names the attack and
//! the part of the argument in `docs/protocol.md` it checks. What every
//! one shows: an application sees the exact bytes its peer wrote, in order,
//! or a reset; a target is dialled once per `Open` its peer sent; and no
//! agent seals two records under one key and nonce (the ledger of the
//! nonces the relay saw stays free of repeats).

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use comsat::dev::{DevLayout, DevLink, DevOptions};
use comsat_protocol::msg::PeerFrame;
use comsat_protocol::{LinkId, Side};
use comsat_relay::{Relay, RelayConfig, RelayHandle, Stop};
use comsat_tests::hostile::{Hostile, Recording};
use comsat_tests::{Proc, free_udp_port, metric, scrape};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(20);

/// What the target side of the link saw: one entry per connection the
/// agent dialled, with the bytes it received.
#[derive(Default)]
struct Target {
    dials: AtomicUsize,
    received: Mutex<Vec<Vec<u8>>>,
}

impl Target {
    /// Serves on `listener`: reads each connection to its end, then answers
    /// `got <n> bytes` and closes.
    fn serve(listener: TcpListener) -> Arc<Self> {
        let target = Arc::new(Self::default());
        let t = target.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                t.dials.fetch_add(1, Ordering::SeqCst);
                let t = t.clone();
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    if s.read_to_end(&mut got).await.is_ok() {
                        let answer = format!("got {} bytes", got.len());
                        t.received.lock().expect("lock").push(got);
                        let _ = s.write_all(answer.as_bytes()).await;
                        let _ = s.shutdown().await;
                    }
                });
            }
        });
        target
    }

    fn dials(&self) -> usize {
        self.dials.load(Ordering::SeqCst)
    }
}

/// Two agent processes and a hostile relay in this process.
struct Setup {
    dir: tempfile::TempDir,
    layout: DevLayout,
    hostile: Arc<Hostile>,
    relay: RelayHandle,
    stop: mpsc::Sender<Stop>,
    agents: [(Proc, SocketAddr); 2],
    link: LinkId,
    listen: SocketAddr,
}

impl Setup {
    /// One link `l` from agent A's listener to `target` at agent B.
    async fn start(target: String) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let any: SocketAddr = "127.0.0.1:0".parse()?;
        let layout = comsat::dev::init(
            &dir.path().join("setup"),
            &DevOptions {
                relay_listen: format!("127.0.0.1:{}", free_udp_port()?).parse()?,
                relay_admin: None,
                agent_admin: [Some(any), Some(any)],
                links: vec![DevLink {
                    name: "l".into(),
                    listen: "tcp://127.0.0.1:0".into(),
                    target,
                    allowed_uids: vec![],
                }],
                pin_sha256: false,
                extra_relays: vec![],
            },
        )?;
        let config = RelayConfig::load(&layout.relay_config)?;
        let relay = Relay::bind(config)?;
        let hostile = Hostile::new();
        relay.set_adversary(hostile.clone());
        let handle = relay.handle();
        let (stop, stopped) = mpsc::channel(1);
        tokio::spawn(relay.run_until(stopped));
        let logs = dir.path().to_owned();
        let mut a = common::start_agent(&layout.agent_a.config, &logs, "agent-a")?;
        let b = common::start_agent(&layout.agent_b.config, &logs, "agent-b")?;
        let listen = comsat_tests::proc::listen_addr(&mut a.0, "l")?;
        let link = layout.links[0].1;
        let setup = Self {
            dir,
            layout,
            hostile,
            relay: handle,
            stop,
            agents: [a, b],
            link,
            listen,
        };
        setup.wait_ready()?;
        Ok(setup)
    }

    fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + WAIT;
        for (agent, admin) in &self.agents {
            while !matches!(
                comsat_tests::proc::http_get(*admin, "/readyz"),
                Ok((200, _))
            ) {
                if Instant::now() > deadline {
                    bail!("agent {} not ready:\n{}", agent.name(), agent.log_tail());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    fn agent(&self, side: Side) -> &(Proc, SocketAddr) {
        &self.agents[usize::from(side == Side::B)]
    }

    fn metric(&self, side: Side, series: &str) -> Result<f64> {
        Ok(metric(&scrape(self.agent(side).1)?, series))
    }

    /// Waits until `side` holds no open flow.
    async fn wait_flows_closed(&self, side: Side) -> Result<()> {
        let deadline = Instant::now() + WAIT;
        while self.metric(side, "comsat_agent_flows_open")? > 0.0 {
            if Instant::now() > deadline {
                bail!("{side:?} still has open flows");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Restarts the agent of `side` (a new process: new Noise session).
    fn restart(&mut self, side: Side) -> Result<()> {
        let i = usize::from(side == Side::B);
        self.agents[i].0.kill();
        self.hostile.forget_sealer(side);
        let config = if side == Side::A {
            &self.layout.agent_a.config
        } else {
            &self.layout.agent_b.config
        };
        let name = format!("agent-{side:?}-again").to_lowercase();
        let mut again = common::start_agent(config, self.dir.path(), &name)?;
        if side == Side::A {
            self.listen = comsat_tests::proc::listen_addr(&mut again.0, "l")?;
        }
        self.agents[i] = again;
        self.wait_ready()
    }

    /// Opens a stream of the relay's own to `side` and writes `bytes` on
    /// it, as a relay replaying a recording would; returns what the agent
    /// wrote back before the stream ended (it is refused: nothing).
    async fn inject(&self, side: Side, bytes: &[u8]) -> Result<Vec<u8>> {
        let conn = self
            .relay
            .side_connection(self.link, side)
            .context("side not attached")?;
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(bytes).await?;
        let _ = send.finish();
        let mut back = Vec::new();
        let mut buf = [0u8; 4096];
        let read = tokio::time::timeout(Duration::from_secs(5), async {
            while let Ok(Some(n)) = recv.read(&mut buf).await {
                back.extend_from_slice(&buf[..n]);
            }
        });
        let _ = read.await;
        Ok(back)
    }

    /// One request through the link: writes `request`, half-closes, reads
    /// the answer to its end.
    async fn request(&self, request: &[u8]) -> Result<Vec<u8>> {
        let mut s = TcpStream::connect(self.listen).await?;
        s.write_all(request).await?;
        s.shutdown().await?;
        let mut answer = Vec::new();
        tokio::time::timeout(WAIT, s.read_to_end(&mut answer))
            .await
            .context("no answer through the link")??;
        Ok(answer)
    }

    /// The recording of the only flow A opened so far, in A's direction,
    /// once A finished its stream.
    async fn finished_flow_of_a(&self) -> Result<Recording> {
        let deadline = Instant::now() + WAIT;
        loop {
            let found = self
                .hostile
                .recordings()
                .into_iter()
                .find(|r| r.sealer == Side::A && r.opener);
            if let Some(r) = found {
                if r.finished.load(Ordering::Relaxed) {
                    return Ok(r);
                }
            }
            if Instant::now() > deadline {
                bail!("no finished flow from agent A recorded");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn assert_no_nonce_reused(&self) {
        let reused = self.hostile.reused_nonces();
        assert!(reused.is_empty(), "nonces sealed twice: {reused:?}");
        assert!(self.hostile.records_seen() > 0, "the ledger saw no record");
    }

    fn log(&self, side: Side) -> String {
        self.agent(side).0.log()
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = self.stop.try_send(Stop::Now);
    }
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

/// Attack: record a whole finished flow (header, `Open`, data, `Fin`) and
/// write it again on a new stream to the accepting agent, in the same
/// session. Checks: a flow id is accepted once per session (protocol.md,
/// "Flow ids"), so the target is not dialled again, the request is not
/// delivered again, and the agent seals nothing (no answer under a used
/// nonce).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_flow_replayed_on_a_new_stream_is_refused() -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let target_addr = listener.local_addr()?;
    let target = Target::serve(listener);
    let sys = Setup::start(format!("tcp://{target_addr}")).await?;

    let request = b"POST /transfer amount=100";
    let answer = sys.request(request).await?;
    assert_eq!(answer, b"got 25 bytes");
    let recording = sys.finished_flow_of_a().await?;
    sys.wait_flows_closed(Side::B).await?;
    assert_eq!(target.dials(), 1);

    let back = sys.inject(Side::B, &recording.replay_bytes()).await?;
    assert!(
        back.is_empty(),
        "agent B answered a replayed flow: {back:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(target.dials(), 1, "the replayed flow dialled the target");
    assert_eq!(target.received.lock().expect("lock").len(), 1);
    assert!(
        sys.log(Side::B).contains("replayed flow refused"),
        "agent B's log does not name the replay:\n{}",
        sys.log(Side::B)
    );
    assert_eq!(
        sys.metric(
            Side::B,
            "comsat_agent_peer_refused_total{reason=\"replayed_flow\"}"
        )?,
        1.0
    );
    // The link still works, and the next flow is a new one.
    assert_eq!(sys.request(b"again").await?, b"got 5 bytes");
    assert_eq!(target.dials(), 2);
    sys.assert_no_nonce_reused();
    Ok(())
}

/// Attack: record the `Open` of a flow whose target cannot be reached (the
/// accepting agent answered with a sealed `Reset` at seq 0) and write it
/// again on a new stream. Checks: the id was taken before dialling
/// (protocol.md, "Flow ids"), so the replay is refused without a second
/// dial and without a second `Reset` sealed at the same nonce.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_open_of_an_unreachable_target_is_refused() -> Result<()> {
    // A port with nothing behind it.
    let closed = TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
    let sys = Setup::start(format!("tcp://{closed}")).await?;

    let mut s = TcpStream::connect(sys.listen).await?;
    s.write_all(b"hello").await?;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(WAIT, s.read_to_end(&mut buf)).await?;
    assert!(
        read.is_err() || buf.is_empty(),
        "an unreachable target answered"
    );
    let recording = sys.finished_flow_of_a().await.or_else(|_| {
        sys.hostile
            .recordings()
            .into_iter()
            .find(|r| r.sealer == Side::A && r.opener)
            .context("no flow recorded")
    })?;
    let resets = sys
        .hostile
        .recording(recording.flow, Side::B)
        .context("B's answer not recorded")?;
    assert!(
        !resets.bytes.lock().expect("lock").is_empty(),
        "B sealed no Reset"
    );
    assert_eq!(count(&sys.log(Side::B), "cannot reach target"), 1);

    let back = sys.inject(Side::B, &recording.replay_bytes()).await?;
    assert!(back.is_empty(), "agent B sealed an answer again: {back:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        count(&sys.log(Side::B), "cannot reach target"),
        1,
        "the replayed Open dialled the target again"
    );
    assert!(sys.log(Side::B).contains("replayed flow refused"));
    sys.assert_no_nonce_reused();
    Ok(())
}

/// Attack: write a finished flow again to the agent that sent it (a
/// reflection), and the accepting agent's answers as a new flow to either
/// agent. Checks: each direction has its own key and only the target side
/// accepts flows (protocol.md, "Keys and nonces"), so nothing is dialled or
/// delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_reflected_or_its_answers_replayed_is_refused() -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let target_addr = listener.local_addr()?;
    let target = Target::serve(listener);
    let sys = Setup::start(format!("tcp://{target_addr}")).await?;
    assert_eq!(sys.request(b"ping").await?, b"got 4 bytes");
    let recording = sys.finished_flow_of_a().await?;
    sys.wait_flows_closed(Side::B).await?;

    // A's own flow, back to A.
    let back = sys.inject(Side::A, &recording.replay_bytes()).await?;
    assert!(back.is_empty(), "agent A answered its own flow: {back:?}");
    // B's answers, with the flow's header, to B and to A.
    let answers = sys
        .hostile
        .recording(recording.flow, Side::B)
        .context("B's answers not recorded")?;
    let as_flow = Recording {
        opener: true,
        ..answers
    }
    .replay_bytes();
    for side in [Side::A, Side::B] {
        let back = sys.inject(side, &as_flow).await?;
        assert!(back.is_empty(), "{side:?} answered B's replayed answers");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(target.dials(), 1);
    assert_eq!(sys.request(b"still works").await?, b"got 11 bytes");
    sys.assert_no_nonce_reused();
    Ok(())
}

/// Attack: replay a flow recorded before agent B restarted. Checks: a new
/// agent run holds a new session (protocol.md, "Sessions"), under whose
/// keys the recorded `Open` does not authenticate: nothing is dialled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_replayed_after_the_agent_restarted_is_refused() -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let target_addr = listener.local_addr()?;
    let target = Target::serve(listener);
    let mut sys = Setup::start(format!("tcp://{target_addr}")).await?;
    assert_eq!(sys.request(b"before").await?, b"got 6 bytes");
    let recording = sys.finished_flow_of_a().await?;
    sys.restart(Side::B)?;
    assert_eq!(sys.request(b"after restart").await?, b"got 13 bytes");
    assert_eq!(target.dials(), 2);

    let back = sys.inject(Side::B, &recording.replay_bytes()).await?;
    assert!(back.is_empty(), "agent B answered an old flow: {back:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        target.dials(),
        2,
        "an old session's flow dialled the target"
    );
    sys.assert_no_nonce_reused();
    Ok(())
}

/// Serves an echo on `listener`: every byte comes back, until the end.
fn echo(listener: TcpListener) {
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
}

/// Writes `bytes` on `s` and reads as many back.
async fn echoed(s: &mut TcpStream, bytes: &[u8]) -> Result<()> {
    s.write_all(bytes).await?;
    let mut back = vec![0u8; bytes.len()];
    tokio::time::timeout(WAIT, s.read_exact(&mut back))
        .await
        .context("no echo")??;
    assert_eq!(back, bytes, "the echo differs from what was sent");
    Ok(())
}

/// The handshake messages side `from` sent on the link so far.
fn handshakes(sys: &Setup, from: Side) -> Vec<PeerFrame> {
    sys.hostile
        .frames()
        .into_iter()
        .filter(|(l, s, f)| *l == sys.link && *s == from && matches!(f, PeerFrame::Handshake(_)))
        .map(|(_, _, f)| f)
        .collect()
}

/// Attack: replay side A's first handshake message to side B (and B's
/// answer to A) while a flow is open on the session it set up. Checks: side
/// B answers but takes a new session only once side A seals under it
/// (protocol.md, "Sessions"), so the working session and its open flow go
/// on untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_handshake_does_not_tear_down_a_working_session() -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let target_addr = listener.local_addr()?;
    echo(listener);
    let sys = Setup::start(format!("tcp://{target_addr}")).await?;
    let mut flow = TcpStream::connect(sys.listen).await?;
    echoed(&mut flow, b"before the replay").await?;

    let from_a = handshakes(&sys, Side::A);
    let from_b = handshakes(&sys, Side::B);
    assert!(
        !from_a.is_empty() && !from_b.is_empty(),
        "no handshake seen"
    );
    for _ in 0..3 {
        for m in &from_a {
            assert!(sys.relay.send_peer_frame(sys.link, Side::B, m.clone()));
        }
        for m in &from_b {
            assert!(sys.relay.send_peer_frame(sys.link, Side::A, m.clone()));
        }
    }
    // Side B answered each replay (it cannot tell them from a new
    // handshake), and side A refused the unexpected answers.
    let deadline = Instant::now() + WAIT;
    while handshakes(&sys, Side::B).len() < from_b.len() + 3 {
        if Instant::now() > deadline {
            bail!("side B did not answer the replayed handshakes");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    echoed(&mut flow, b"after the replay: the same flow").await?;
    flow.shutdown().await?;
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, flow.read_to_end(&mut rest)).await??;
    assert!(rest.is_empty());
    for side in [Side::A, Side::B] {
        assert!(
            !sys.log(side).contains("resetting the old session's flows"),
            "{side:?} replaced its session:\n{}",
            sys.log(side)
        );
        assert_eq!(sys.metric(side, "comsat_agent_flows_failed_total")?, 0.0);
    }
    sys.assert_no_nonce_reused();
    Ok(())
}

/// Attack: replay side A's handshake message from before agent A restarted
/// to side B, which holds the session the restarted agent set up since.
/// Checks: the old message is answered, never confirmed (protocol.md,
/// "Sessions"): B keeps the new session and its flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_replayed_after_an_agent_restart_changes_nothing() -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let target_addr = listener.local_addr()?;
    echo(listener);
    let mut sys = Setup::start(format!("tcp://{target_addr}")).await?;
    let old = handshakes(&sys, Side::A);
    sys.restart(Side::A)?;
    let mut flow = TcpStream::connect(sys.listen).await?;
    echoed(&mut flow, b"new session").await?;
    let answers = handshakes(&sys, Side::B).len();

    for m in &old {
        assert!(sys.relay.send_peer_frame(sys.link, Side::B, m.clone()));
    }
    let deadline = Instant::now() + WAIT;
    while handshakes(&sys, Side::B).len() < answers + old.len() {
        if Instant::now() > deadline {
            bail!("side B did not answer the replayed handshake");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    echoed(&mut flow, b"still the new session").await?;
    assert_eq!(sys.metric(Side::B, "comsat_agent_flows_failed_total")?, 0.0);
    sys.assert_no_nonce_reused();
    Ok(())
}
