//! The setup the hostile relay tests share: the real relay in the test's
//! process with a [`Hostile`] adversary, two real agent processes, a
//! target that records what it was sent, and flows to send through them.

#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use comsat_controller::dev::{DevLayout, DevLink, DevOptions};
use comsat_protocol::{LinkId, Side};
use comsat_relay::{Relay, RelayConfig, RelayHandle, Stop};
use comsat_tests::hostile::{Hostile, Recording};
use comsat_tests::{Proc, free_udp_port, metric, scrape};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::common;

pub const WAIT: Duration = Duration::from_secs(20);

/// What the target side of the link saw: one entry per connection the
/// agent dialled, with the bytes it received.
#[derive(Default)]
pub struct Target {
    pub dials: AtomicUsize,
    /// What each connection delivered, and whether it ended cleanly.
    pub received: Mutex<Vec<(Vec<u8>, bool)>>,
}

impl Target {
    /// Serves on `listener`: reads each connection to its end, then answers
    /// `got <n> bytes` and closes.
    pub fn serve(listener: TcpListener) -> Arc<Self> {
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

    pub fn dials(&self) -> usize {
        self.dials.load(Ordering::SeqCst)
    }

    /// What connection `i` delivered, once it ended.
    pub async fn delivered(&self, i: usize) -> Result<(Vec<u8>, bool)> {
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
pub async fn target() -> Result<(String, Arc<Target>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    Ok((format!("tcp://{addr}"), Target::serve(listener)))
}

/// Two agent processes and a hostile relay in this process.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub layout: DevLayout,
    pub hostile: Arc<Hostile>,
    pub relay: RelayHandle,
    pub stop: mpsc::Sender<Stop>,
    pub agents: [(Proc, SocketAddr); 2],
    /// The first link, and where agent A listens for it.
    pub link: LinkId,
    pub listen: SocketAddr,
    /// Every link, with its listen address, in the order given.
    pub links: Vec<(LinkId, SocketAddr)>,
}

impl Setup {
    /// One link `l` from agent A's listener to `target` at agent B.
    pub async fn start(target: String) -> Result<Self> {
        Self::start_links(&[("l", target)]).await
    }

    /// A link per `(name, target)`, each from agent A's listener to the
    /// target at agent B (a `udp://` listener for a `udp://` target).
    pub async fn start_links(links: &[(&str, String)]) -> Result<Self> {
        Self::start_tuned(links, "").await
    }

    /// Like [`Self::start_links`], with `agent_settings` (top-level lines)
    /// added to both agents' configs.
    pub async fn start_tuned(links: &[(&str, String)], agent_settings: &str) -> Result<Self> {
        Self::start_with(links, agent_settings, |_| {}).await
    }

    /// Like [`Self::start_tuned`], each link changed by `edit` first.
    pub async fn start_with(
        links: &[(&str, String)],
        agent_settings: &str,
        edit: impl Fn(&mut DevLink),
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let any: SocketAddr = "127.0.0.1:0".parse()?;
        let layout = comsat_controller::dev::init(
            &dir.path().join("setup"),
            &DevOptions {
                relay_listen: format!("127.0.0.1:{}", free_udp_port()?).parse()?,
                relay_admin: None,
                agent_admin: [Some(any), Some(any)],
                links: links
                    .iter()
                    .map(|(name, target)| {
                        let mut link = DevLink {
                            name: (*name).into(),
                            listen: match target.starts_with("udp://") {
                                true => "udp://127.0.0.1:0".into(),
                                false => "tcp://127.0.0.1:0".into(),
                            },
                            target: target.clone(),
                            allowed_uids: vec![],
                            allow: vec![],
                            proxy_protocol: false,
                        };
                        edit(&mut link);
                        link
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

    pub fn wait_ready(&self) -> Result<()> {
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

    pub fn agent(&self, side: Side) -> &(Proc, SocketAddr) {
        &self.agents[usize::from(side == Side::B)]
    }

    pub fn metric(&self, side: Side, series: &str) -> Result<f64> {
        Ok(metric(&scrape(self.agent(side).1)?, series))
    }

    /// Waits until `side` holds no open flow.
    pub async fn wait_flows_closed(&self, side: Side) -> Result<()> {
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
    pub fn restart(&mut self, side: Side) -> Result<()> {
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
    pub async fn inject(&self, side: Side, bytes: &[u8]) -> Result<Vec<u8>> {
        self.inject_on(self.link, side, bytes).await
    }

    /// Like [`Self::inject`], on the connection that holds `link`.
    pub async fn inject_on(&self, link: LinkId, side: Side, bytes: &[u8]) -> Result<Vec<u8>> {
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
    pub async fn request(&self, request: &[u8]) -> Result<Vec<u8>> {
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
    pub async fn finished_flow_of_a(&self) -> Result<Recording> {
        let deadline = Instant::now() + WAIT;
        loop {
            let found = self
                .hostile
                .recordings()
                .into_iter()
                .find(|r| r.sealer == Side::A && r.opener);
            if let Some(r) = found
                && r.finished.load(Ordering::Relaxed)
            {
                return Ok(r);
            }
            if Instant::now() > deadline {
                bail!("no finished flow from agent A recorded");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn assert_no_nonce_reused(&self) {
        let reused = self.hostile.reused_nonces();
        assert!(reused.is_empty(), "nonces sealed twice: {reused:?}");
        assert!(self.hostile.records_seen() > 0, "the ledger saw no record");
    }

    pub fn log(&self, side: Side) -> String {
        self.agent(side).0.log()
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = self.stop.try_send(Stop::Now);
    }
}

pub fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

/// Serves an echo on `listener`: every byte comes back, until the end.
pub fn echo(listener: TcpListener) {
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
pub async fn echo_target() -> Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    echo(listener);
    Ok(format!("tcp://{addr}"))
}

/// Writes `bytes` on an echoed flow and reads as many back, if the flow
/// still stands: what comes back must be what was sent (a flow may have
/// been reset by an attack, never altered).
pub async fn echoed_or_reset(s: &mut TcpStream, bytes: &[u8]) {
    let written = s.write_all(bytes).await;
    let mut back = vec![0u8; bytes.len()];
    let read = tokio::time::timeout(WAIT, s.read_exact(&mut back)).await;
    if written.is_ok() && matches!(read, Ok(Ok(_))) {
        assert_eq!(back, bytes, "the echo differs from what was sent");
    }
}

/// Writes `bytes` on `s` and reads as many back.
pub async fn echoed(s: &mut TcpStream, bytes: &[u8]) -> Result<()> {
    s.write_all(bytes).await?;
    let mut back = vec![0u8; bytes.len()];
    tokio::time::timeout(WAIT, s.read_exact(&mut back))
        .await
        .context("no echo")??;
    assert_eq!(back, bytes, "the echo differs from what was sent");
    Ok(())
}

/// `len` pseudo-random bytes from `seed`: no two records' worth alike, so a
/// record delivered twice, out of order or in the wrong place shows.
pub fn payload(seed: u64, len: usize) -> Vec<u8> {
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
pub async fn send_through(listen: SocketAddr, bytes: &[u8]) -> Result<Vec<u8>> {
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
pub fn exact_or_reset(sent: &[u8], (got, clean): &(Vec<u8>, bool), answer: &[u8]) -> bool {
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
