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
use comsat_tests::hostile::{FrameAttack, Hostile, RecordAttack, Recording};
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
    /// What each connection delivered, and whether it ended cleanly.
    received: Mutex<Vec<(Vec<u8>, bool)>>,
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
                    let clean = s.read_to_end(&mut got).await.is_ok();
                    let answer = format!("got {} bytes", got.len());
                    t.received.lock().expect("lock").push((got, clean));
                    if clean {
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

    /// What connection `i` delivered, once it ended.
    async fn delivered(&self, i: usize) -> Result<(Vec<u8>, bool)> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(got) = self.received.lock().expect("lock").get(i) {
                return Ok(got.clone());
            }
            if Instant::now() > deadline {
                bail!("connection {i} never ended at the target");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A target on a new loopback port: its `tcp://` address and what it saw.
async fn target() -> Result<(String, Arc<Target>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    Ok((format!("tcp://{addr}"), Target::serve(listener)))
}

/// Two agent processes and a hostile relay in this process.
struct Setup {
    dir: tempfile::TempDir,
    layout: DevLayout,
    hostile: Arc<Hostile>,
    relay: RelayHandle,
    stop: mpsc::Sender<Stop>,
    agents: [(Proc, SocketAddr); 2],
    /// The first link, and where agent A listens for it.
    link: LinkId,
    listen: SocketAddr,
    /// Every link, with its listen address, in the order given.
    links: Vec<(LinkId, SocketAddr)>,
}

impl Setup {
    /// One link `l` from agent A's listener to `target` at agent B.
    async fn start(target: String) -> Result<Self> {
        Self::start_links(&[("l", target)]).await
    }

    /// A link per `(name, target)`, each from agent A's listener to the
    /// target at agent B.
    async fn start_links(links: &[(&str, String)]) -> Result<Self> {
        Self::start_tuned(links, "").await
    }

    /// Like [`Self::start_links`], with `agent_settings` (top-level lines)
    /// added to both agents' configs.
    async fn start_tuned(links: &[(&str, String)], agent_settings: &str) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let any: SocketAddr = "127.0.0.1:0".parse()?;
        let layout = comsat::dev::init(
            &dir.path().join("setup"),
            &DevOptions {
                relay_listen: format!("127.0.0.1:{}", free_udp_port()?).parse()?,
                relay_admin: None,
                agent_admin: [Some(any), Some(any)],
                links: links
                    .iter()
                    .map(|(name, target)| DevLink {
                        name: (*name).into(),
                        listen: "tcp://127.0.0.1:0".into(),
                        target: target.clone(),
                        allowed_uids: vec![],
                    })
                    .collect(),
                pin_sha256: false,
                extra_relays: vec![],
            },
        )?;
        for config in [&layout.agent_a.config, &layout.agent_b.config] {
            let text = std::fs::read_to_string(config)?;
            let key = "noise_key = \"noise.key\"\n";
            std::fs::write(
                config,
                text.replacen(key, &format!("{key}{agent_settings}"), 1),
            )?;
        }
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
        let mut all = Vec::new();
        for (name, id) in &layout.links {
            all.push((*id, comsat_tests::proc::listen_addr(&mut a.0, name)?));
        }
        let setup = Self {
            dir,
            layout,
            hostile,
            relay: handle,
            stop,
            agents: [a, b],
            link: all[0].0,
            listen: all[0].1,
            links: all,
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
        let config = if side == Side::A {
            &self.layout.agent_a.config
        } else {
            &self.layout.agent_b.config
        };
        let name = format!("agent-{side:?}-again").to_lowercase();
        let mut again = common::start_agent(config, self.dir.path(), &name)?;
        if side == Side::A {
            for (i, (name, _)) in self.layout.links.iter().enumerate() {
                self.links[i].1 = comsat_tests::proc::listen_addr(&mut again.0, name)?;
            }
            self.listen = self.links[0].1;
        }
        self.agents[i] = again;
        self.wait_ready()
    }

    /// Opens a stream of the relay's own to `side` and writes `bytes` on
    /// it, as a relay replaying a recording would; returns what the agent
    /// wrote back before the stream ended (it is refused: nothing).
    async fn inject(&self, side: Side, bytes: &[u8]) -> Result<Vec<u8>> {
        self.inject_on(self.link, side, bytes).await
    }

    /// Like [`Self::inject`], on the connection that holds `link`.
    async fn inject_on(&self, link: LinkId, side: Side, bytes: &[u8]) -> Result<Vec<u8>> {
        let conn = self
            .relay
            .side_connection(link, side)
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
    let (addr, target) = target().await?;
    let sys = Setup::start(addr).await?;

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
/// again on a new stream; then write that `Reset` as a flow of its own to
/// both agents. Checks: the id was taken before dialling
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
    // A's flow (its Open), and B's answer: a sealed Reset.
    let deadline = Instant::now() + WAIT;
    let (recording, resets) = loop {
        let a = sys
            .hostile
            .recordings()
            .into_iter()
            .find(|r| r.sealer == Side::A && r.opener);
        let b = a
            .as_ref()
            .and_then(|a| sys.hostile.recording(a.flow, Side::B));
        if let (Some(a), Some(b)) = (a, b) {
            if !b.bytes.lock().expect("lock").is_empty() {
                break (a, b);
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "B sealed no Reset");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
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
    // B's sealed Reset, written again as a flow to either agent, opens
    // nothing either.
    let reset_as_flow = Recording {
        opener: true,
        ..resets
    }
    .replay_bytes();
    for side in [Side::A, Side::B] {
        let back = sys.inject(side, &reset_as_flow).await?;
        assert!(back.is_empty(), "{side:?} answered a replayed Reset");
    }
    assert_eq!(count(&sys.log(Side::B), "cannot reach target"), 1);
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
    let (addr, target) = target().await?;
    let sys = Setup::start(addr).await?;
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
    let (addr, target) = target().await?;
    let mut sys = Setup::start(addr).await?;
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

/// An echo target on a new loopback port: its `tcp://` address.
async fn echo_target() -> Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    echo(listener);
    Ok(format!("tcp://{addr}"))
}

/// Writes `bytes` on an echoed flow and reads as many back, if the flow
/// still stands: what comes back must be what was sent (a flow may have
/// been reset by an attack, never altered).
async fn echoed_or_reset(s: &mut TcpStream, bytes: &[u8]) {
    let written = s.write_all(bytes).await;
    let mut back = vec![0u8; bytes.len()];
    let read = tokio::time::timeout(WAIT, s.read_exact(&mut back)).await;
    if written.is_ok() && matches!(read, Ok(Ok(_))) {
        assert_eq!(back, bytes, "the echo differs from what was sent");
    }
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
    let sys = Setup::start(echo_target().await?).await?;
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
    let mut sys = Setup::start(echo_target().await?).await?;
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

/// `len` pseudo-random bytes from `seed`: no two records' worth alike, so a
/// record delivered twice, out of order or in the wrong place shows.
fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut oracle = comsat_tests::Oracle::new(seed, len as u64);
    let (mut out, mut buf) = (Vec::with_capacity(len), Vec::new());
    loop {
        oracle.next_chunk(&mut buf);
        if buf.is_empty() {
            return out;
        }
        out.extend_from_slice(&buf);
    }
}

/// Sends `bytes` through the link at `listen`, half-closes, and reads the
/// answer (none if the flow was reset).
async fn send_through(listen: SocketAddr, bytes: &[u8]) -> Result<Vec<u8>> {
    let mut s = TcpStream::connect(listen).await?;
    let sent = s.write_all(bytes).await.and(s.shutdown().await);
    let mut answer = Vec::new();
    let read = tokio::time::timeout(WAIT, s.read_to_end(&mut answer)).await;
    if sent.is_err() || !matches!(read, Ok(Ok(_))) {
        answer.clear();
    }
    Ok(answer)
}

/// What the whole suite promises the application: the bytes its peer
/// wrote, in order, or a prefix of them and a reset — never a byte
/// duplicated, reordered, altered or injected. Returns whether the flow
/// delivered everything.
fn exact_or_reset(sent: &[u8], (got, clean): &(Vec<u8>, bool), answer: &[u8]) -> bool {
    assert!(
        sent.starts_with(got),
        "the target received {} bytes that are not a prefix of the {} sent",
        got.len(),
        sent.len()
    );
    if *clean {
        assert_eq!(got.len(), sent.len(), "a clean end after a partial flow");
        assert_eq!(answer, format!("got {} bytes", sent.len()).as_bytes());
    }
    *clean
}

/// Runs one flow of 1 MiB through a link whose relay attacks its records
/// as `attack` says; returns whether the flow delivered every byte (else
/// it was reset, having delivered a prefix).
async fn attacked_flow(attack: RecordAttack) -> Result<bool> {
    let (addr, target) = target().await?;
    let sys = Setup::start(addr).await?;
    sys.hostile.set_record_attack(attack);
    let sent = payload(7, 1 << 20);
    let answer = send_through(sys.listen, &sent).await?;
    let exact = exact_or_reset(&sent, &target.delivered(0).await?, &answer);
    assert_eq!(sys.hostile.attacks_done(), 1, "the attack did not happen");
    // The link carries the next flow untouched.
    let next = payload(8, 100_000);
    let answer = send_through(sys.listen, &next).await?;
    assert!(exact_or_reset(&next, &target.delivered(1).await?, &answer));
    assert_eq!(target.dials(), 2);
    sys.assert_no_nonce_reused();
    Ok(exact)
}

/// Attack: flip one bit in a data record's ciphertext. Checks: every
/// record is authenticated under its flow's nonce (protocol.md, "Records"):
/// the altered record is never delivered; the flow is reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_bit_in_a_record_is_never_delivered() -> Result<()> {
    let exact = attacked_flow(RecordAttack::FlipBit(3)).await?;
    assert!(!exact, "a flow with an altered record completed");
    Ok(())
}

/// Attack: send a data record twice. Checks: a receiver takes each
/// sequence number once (protocol.md, "Records"): delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicated_record_is_delivered_once() -> Result<()> {
    let exact = attacked_flow(RecordAttack::Duplicate(3)).await?;
    assert!(exact, "a duplicated record lost the flow");
    Ok(())
}

/// Attack: leave a data record out. Checks: sequence numbers are
/// contiguous (protocol.md, "Records"): the gap is never skipped over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_record_never_goes_missing_unnoticed() -> Result<()> {
    attacked_flow(RecordAttack::Drop(3)).await?;
    Ok(())
}

/// Attack: swap two data records. Checks: records are delivered in
/// sequence order only (protocol.md, "Records").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapped_records_are_never_delivered_out_of_order() -> Result<()> {
    attacked_flow(RecordAttack::Swap(3)).await?;
    Ok(())
}

/// Attack: cut a record short and end the stream. Checks: a record is
/// delivered whole or not at all (protocol.md, "Records"); the flow goes
/// on on a new stream or is reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_cut_short_is_never_delivered_in_part() -> Result<()> {
    attacked_flow(RecordAttack::Truncate(3)).await?;
    Ok(())
}

/// Attack: hold a record back for 1.5 s. Checks: a relay can delay
/// (protocol.md, "What a relay can do"), and nothing else changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_record_arrives_in_its_place() -> Result<()> {
    let exact = attacked_flow(RecordAttack::Delay(3, 1500)).await?;
    assert!(exact, "a delayed record lost the flow");
    Ok(())
}

/// Attack: reset a flow's stream in the middle. Checks: a flow survives
/// the loss of its stream (protocol.md, "What a relay can do"): it resumes
/// on a new one, every byte exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_reset_by_the_relay_resumes_without_loss() -> Result<()> {
    let exact = attacked_flow(RecordAttack::Reset(3)).await?;
    assert!(exact, "a flow whose stream was reset lost bytes");
    Ok(())
}

/// Attack: open streams of the relay's own: a new flow id with a record of
/// random bytes, and one with a well-framed record that claims to be an
/// `Open`, to both agents. Checks: only an `Open` sealed by the peer opens
/// a flow (protocol.md, "Flow ids"): nothing is dialled or answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_injected_by_the_relay_open_nothing() -> Result<()> {
    let (addr, target) = target().await?;
    let sys = Setup::start(addr).await?;
    for (flow, side) in [(1001u32, Side::B), (1002, Side::A), (1003, Side::B)] {
        let mut forged = Vec::new();
        comsat_protocol::record::FlowHeader {
            link_id: sys.link,
            flow_id: flow,
        }
        .write_to(&mut forged);
        comsat_protocol::record::RecordHeader { len: 17, seq: 0 }.write_to(&mut forged);
        forged.extend_from_slice(&payload(u64::from(flow), 17));
        let back = sys.inject(side, &forged).await?;
        assert!(back.is_empty(), "{side:?} answered a forged flow");
        let garbage = payload(9, 300);
        let back = sys.inject(side, &garbage).await?;
        assert!(back.is_empty(), "{side:?} answered garbage");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(target.dials(), 0, "a forged flow dialled the target");
    let sent = payload(3, 1000);
    let answer = send_through(sys.listen, &sent).await?;
    assert!(exact_or_reset(&sent, &target.delivered(0).await?, &answer));
    Ok(())
}

/// Attack: write the records of a finished flow (its `Open`, data and
/// `Fin`), and the `Reset` of a failed one, on a new stream of a flow
/// that is open. Checks: a record's nonce names its flow (protocol.md,
/// "Keys and nonces"): none opens under the other flow, whose
/// application sees its own bytes or a reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_moved_to_another_flow_are_refused() -> Result<()> {
    let sys = Setup::start(echo_target().await?).await?;
    let mut first = TcpStream::connect(sys.listen).await?;
    echoed(&mut first, b"a finished flow").await?;
    first.shutdown().await?;
    let mut rest = Vec::new();
    first.read_to_end(&mut rest).await?;
    let old = sys.finished_flow_of_a().await?;
    let old_answers = sys
        .hostile
        .recording(old.flow, Side::B)
        .context("answers")?;

    let mut open = TcpStream::connect(sys.listen).await?;
    echoed(&mut open, b"the open flow").await?;
    let current = sys
        .hostile
        .recordings()
        .into_iter()
        .filter(|r| r.sealer == Side::A && r.opener)
        .map(|r| r.flow)
        .max()
        .context("open flow")?;
    assert_ne!(current, old.flow);
    for (side, recording) in [(Side::B, &old), (Side::A, &old_answers)] {
        let moved = Recording {
            flow: current,
            opener: true,
            ..recording.clone()
        };
        let back = sys.inject(side, &moved.replay_bytes()).await?;
        assert!(back.is_empty(), "{side:?} answered moved records");
    }
    // The open flow carries on with its own bytes, or was reset: never
    // the other flow's.
    let more = b"more of the open flow";
    echoed_or_reset(&mut open, more).await;
    sys.assert_no_nonce_reused();
    Ok(())
}

/// Attack: splice a finished flow of one link onto a stream of another
/// link of the same two agents. Checks: the handshake's prologue binds a
/// session to its link (protocol.md, "Sessions"): the other link's session
/// opens nothing of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_spliced_onto_another_link_is_refused() -> Result<()> {
    let (addr, target) = target().await?;
    let sys = Setup::start_links(&[("l", addr.clone()), ("m", addr)]).await?;
    let answer = sys.request(b"on link l").await?;
    assert_eq!(answer, b"got 9 bytes");
    let recording = sys.finished_flow_of_a().await?;
    let (other, _) = sys.links[1];
    let spliced = Recording {
        link: other,
        ..recording
    };
    let back = sys
        .inject_on(other, Side::B, &spliced.replay_bytes())
        .await?;
    assert!(back.is_empty(), "link m answered link l's flow");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(target.dials(), 1, "a spliced flow dialled the target");
    let sent = payload(4, 2000);
    let answer = send_through(sys.links[1].1, &sent).await?;
    assert!(exact_or_reset(&sent, &target.delivered(1).await?, &answer));
    sys.assert_no_nonce_reused();
    Ok(())
}

/// Attack: swap a flow's two directions: write each agent's own records
/// back to it as a new stream of the open flow. Checks: each direction
/// has its own key (protocol.md, "Keys and nonces"): an agent never opens
/// what it sealed; the application sees its own bytes or a reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flows_directions_swapped_are_refused() -> Result<()> {
    let sys = Setup::start(echo_target().await?).await?;
    let mut open = TcpStream::connect(sys.listen).await?;
    echoed(&mut open, b"both ways").await?;
    let flow = sys
        .hostile
        .recordings()
        .first()
        .map(|r| r.flow)
        .context("no flow")?;
    for side in [Side::A, Side::B] {
        let own = sys.hostile.recording(flow, side).context("recording")?;
        let reflected = Recording {
            opener: true,
            ..own
        };
        let back = sys.inject(side, &reflected.replay_bytes()).await?;
        assert!(back.is_empty(), "{side:?} took its own records");
    }
    let more = b"and on";
    echoed_or_reset(&mut open, more).await;
    sys.assert_no_nonce_reused();
    Ok(())
}

/// Attack: write a recording of an open flow (the records it carried so
/// far) again on a new stream of that same flow. Checks: a receiver takes
/// each sequence number once across streams (protocol.md, "Records"):
/// nothing is delivered twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_flows_records_written_again_are_delivered_once() -> Result<()> {
    let sys = Setup::start(echo_target().await?).await?;
    let mut open = TcpStream::connect(sys.listen).await?;
    let mut sent = Vec::new();
    for i in 0..4u64 {
        let chunk = payload(i, 10_000);
        echoed(&mut open, &chunk).await?;
        sent.extend_from_slice(&chunk);
    }
    let flow = sys
        .hostile
        .recordings()
        .first()
        .map(|r| r.flow)
        .context("no flow")?;
    let recording = sys.hostile.recording(flow, Side::A).context("recording")?;
    let _ = sys.inject(Side::B, &recording.replay_bytes()).await?;
    // The echo of everything after the replay is exactly what was sent
    // after it (or the flow was reset): the replayed records were not
    // delivered again (the echo would repeat them).
    let after = payload(99, 20_000);
    echoed_or_reset(&mut open, &after).await;
    sys.assert_no_nonce_reused();
    Ok(())
}

/// Attack: deliver every link-control message twice during a transfer,
/// then replay every sealed message seen to both agents. Checks: sealed
/// messages carry increasing sequence numbers and each is taken once
/// (protocol.md, "Link control"): the transfer is exact, the link works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicated_and_replayed_link_control_changes_nothing() -> Result<()> {
    let (addr, target) = target().await?;
    let sys = Setup::start(addr).await?;
    sys.hostile.set_frame_attack(FrameAttack::Duplicate);
    let sent = payload(5, 4 << 20);
    let answer = send_through(sys.listen, &sent).await?;
    assert!(exact_or_reset(&sent, &target.delivered(0).await?, &answer));
    sys.hostile.set_frame_attack(FrameAttack::None);
    let sealed: Vec<_> = sys
        .hostile
        .frames()
        .into_iter()
        .filter(|(_, _, f)| matches!(f, PeerFrame::Sealed { .. }))
        .collect();
    assert!(!sealed.is_empty(), "no sealed message seen");
    for (link, from, frame) in sealed {
        sys.relay.send_peer_frame(link, from.peer(), frame);
    }
    let next = payload(6, 1 << 20);
    let answer = send_through(sys.listen, &next).await?;
    assert!(exact_or_reset(&next, &target.delivered(1).await?, &answer));
    assert_eq!(answer, b"got 1048576 bytes");
    sys.assert_no_nonce_reused();
    Ok(())
}

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
    comsat::dev::init(
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
            }],
            pin_sha256: false,
            extra_relays: vec![(format!("127.0.0.1:{}", free_udp_port()?).parse()?, None)],
        },
    )
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
    let sent = payload(11, 3000);
    let answer = send_through(sys.listen, &sent).await?;
    assert!(exact_or_reset(&sent, &target.delivered(0).await?, &answer));
    assert_eq!(answer, b"got 3000 bytes");
    sys.assert_no_nonce_reused();
    Ok(())
}
