//! What the resume tests share: a bulk transfer of four flows checked end
//! to end, echo flows, signals to processes and a wait for a metric.

#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use comsat_tests::oracle::{Received, hash_counting};
use comsat_tests::{Oracle, metric, scrape};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use crate::common::System;

pub const FLOWS: u64 = 4;

/// 4 flows x 32 MiB x 2 directions = 256 MiB.
pub const PER_FLOW: u64 = 32 * 1024 * 1024;

pub const REPLY_XOR: u64 = 0x0bad_cafe;

/// How long a slowed sender waits after each chunk: about 1.3 MB/s a
/// flow, so a disruption is sure to happen in the middle of a transfer.
const SLOW_PAUSE: Duration = Duration::from_millis(50);

/// Sends `seed` + its stream and hashes what comes back, counting progress;
/// while `slow` is set, the sender pauses after every chunk.
pub async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    s: S,
    send_seed: u64,
    header: Option<u64>,
    progress: &AtomicU64,
    slow: &AtomicBool,
) -> Result<Received> {
    let (mut r, mut w) = tokio::io::split(s);
    let send = async {
        if let Some(h) = header {
            w.write_u64(h).await?;
        }
        let mut o = Oracle::new(send_seed, PER_FLOW);
        let mut buf = Vec::new();
        loop {
            o.next_chunk(&mut buf);
            if buf.is_empty() {
                break;
            }
            w.write_all(&buf).await?;
            if slow.load(Ordering::Relaxed) {
                tokio::time::sleep(SLOW_PAUSE).await;
            }
        }
        w.shutdown().await
    };
    let (sent, received) = tokio::join!(send, hash_counting(&mut r, progress));
    sent.context("sending")?;
    received.context("receiving (a reset here is an application-visible failure)")
}

/// A running bulk transfer: 4 flows, 32 MiB each way each.
pub struct Bulk {
    pub progress: Arc<AtomicU64>,
    /// While set, every sender is slowed down (see [`exchange`]).
    pub slow: Arc<AtomicBool>,
    pub done: tokio::task::JoinHandle<Result<()>>,
}

/// Where the server side of a [`Bulk`] accepts its flows.
pub trait Accept: Send + 'static {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept(&self) -> impl Future<Output = std::io::Result<Self::Stream>> + Send;
}

impl Accept for TcpListener {
    type Stream = TcpStream;
    async fn accept(&self) -> std::io::Result<TcpStream> {
        Ok(Self::accept(self).await?.0)
    }
}

impl Accept for UnixListener {
    type Stream = UnixStream;
    async fn accept(&self) -> std::io::Result<UnixStream> {
        Ok(Self::accept(self).await?.0)
    }
}

impl Bulk {
    pub const TOTAL: u64 = 2 * FLOWS * PER_FLOW;

    pub fn start(listen: SocketAddr, target: TcpListener) -> Self {
        Self::start_with(move || TcpStream::connect(listen), target)
    }

    /// Like [`Self::start`], each client flow from a connection `connect`
    /// makes.
    pub fn start_with<C, CF>(connect: C, target: TcpListener) -> Self
    where
        C: Fn() -> CF,
        CF: Future<Output = std::io::Result<TcpStream>> + Send + 'static,
    {
        Self::over(connect, target, false)
    }

    /// Like [`Self::start_with`] over any kind of stream, slowed from the
    /// start if `slow` (until [`Self::full_speed`]).
    pub fn over<C, CF, S, A>(connect: C, target: A, slow: bool) -> Self
    where
        C: Fn() -> CF,
        CF: Future<Output = std::io::Result<S>> + Send + 'static,
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        A: Accept,
    {
        let progress = Arc::new(AtomicU64::new(0));
        let slow = Arc::new(AtomicBool::new(slow));
        let server = {
            let (progress, slow) = (progress.clone(), slow.clone());
            tokio::spawn(async move {
                let mut flows = Vec::new();
                for _ in 0..FLOWS {
                    let mut s = target.accept().await?;
                    let (progress, slow) = (progress.clone(), slow.clone());
                    flows.push(tokio::spawn(async move {
                        let seed = s.read_u64().await?;
                        let got = exchange(s, seed ^ REPLY_XOR, None, &progress, &slow).await?;
                        anyhow::Ok((seed, got))
                    }));
                }
                anyhow::Ok(flows)
            })
        };
        let clients: Vec<_> = (1..=FLOWS)
            .map(|seed| {
                let (progress, slow) = (progress.clone(), slow.clone());
                let connecting = connect();
                tokio::spawn(async move {
                    let s = connecting.await?;
                    let got = exchange(s, seed, Some(seed), &progress, &slow).await?;
                    anyhow::Ok((seed, got))
                })
            })
            .collect();
        let done = tokio::spawn(async move {
            let mut worst = Duration::ZERO;
            for c in clients {
                let (seed, got) = c.await??;
                // The client received the server's reply stream.
                if let Some(wrong) = got.verdict(seed ^ REPLY_XOR, PER_FLOW) {
                    bail!("flow {seed}, at the client: {wrong}");
                }
                worst = worst.max(got.longest_stall);
            }
            let mut seeds = Vec::new();
            for s in server.await?? {
                let (seed, got) = s.await??;
                if let Some(wrong) = got.verdict(seed, PER_FLOW) {
                    bail!("flow {seed}, at the server: {wrong}");
                }
                worst = worst.max(got.longest_stall);
                seeds.push(seed);
            }
            seeds.sort();
            assert_eq!(seeds, (1..=FLOWS).collect::<Vec<_>>());
            eprintln!(
                "0 bytes lost, 0 duplicated, 0 resets; longest pause (resume time) {worst:?}"
            );
            Ok(())
        });
        Self {
            progress,
            slow,
            done,
        }
    }

    /// Lets every sender go as fast as the link takes.
    pub fn full_speed(&self) {
        self.slow.store(false, Ordering::Relaxed);
    }

    /// Waits until `at` bytes have arrived, in either direction.
    pub async fn reach(&self, at: u64) -> Result<u64> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            let now = self.progress.load(Ordering::Relaxed);
            if now >= at {
                return Ok(now);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("transfer stalled at {now} of {} bytes", Self::TOTAL);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub async fn finish(self) -> Result<()> {
        tokio::time::timeout(Duration::from_secs(240), self.done)
            .await
            .context("transfer did not finish")??
    }
}

pub fn assert_no_application_failures(sys: &System) -> Result<()> {
    for (_, admin) in &sys.agents {
        let m = scrape(*admin)?;
        assert_eq!(metric(&m, "comsat_agent_flows_failed_total"), 0.0, "{m}");
    }
    Ok(())
}

/// Echoes every connection's bytes back until it ends.
pub async fn echo_server(listener: TcpListener) {
    while let Ok((s, _)) = listener.accept().await {
        tokio::spawn(async move {
            let (mut r, mut w) = s.into_split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        });
    }
}

/// Writes `data` and reads the same number of bytes back.
pub async fn echo_round(s: &mut TcpStream, data: &[u8]) -> Result<()> {
    s.write_all(data).await?;
    let mut back = vec![0u8; data.len()];
    tokio::time::timeout(Duration::from_secs(20), s.read_exact(&mut back)).await??;
    if back != data {
        bail!("echo differs");
    }
    Ok(())
}

/// Keeps a flow busy until it ends; `Ok(())` if the application saw a
/// reset (an error), an error if it saw a clean end of stream.
pub async fn expect_reset(mut s: TcpStream, within: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if tokio::time::Instant::now() > deadline {
            bail!("no reset within {within:?}");
        }
        if let Err(e) = s.write_all(b"still here").await {
            eprintln!("write failed: {e}");
            return Ok(());
        }
        match tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await {
            Ok(Ok(0)) => bail!("the application saw a clean end of stream, not a reset"),
            Ok(Ok(_)) | Err(_) => {}
            Ok(Err(e)) => {
                eprintln!("read failed: {e}");
                return Ok(());
            }
        }
    }
}

pub use comsat_tests::proc::signal;

/// Waits (at most 30 s) until `series` meets `pred`; returns its value.
pub async fn wait_metric(
    admin: SocketAddr,
    series: &str,
    pred: impl Fn(f64) -> bool,
) -> Result<f64> {
    let m = comsat_tests::wait_for_metric(admin, series, Duration::from_secs(30), pred).await?;
    Ok(metric(&m, series))
}

/// Sends SIGCONT to `pid` when dropped, so a failed test never leaves a
/// stopped process behind.
pub fn scopeguard(pid: u32) -> impl Drop {
    struct Cont(u32);
    impl Drop for Cont {
        fn drop(&mut self) {
            let _ = signal(self.0, "CONT");
        }
    }
    Cont(pid)
}
