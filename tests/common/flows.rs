//! The flows the data plane tests send: eight pseudo-random flows each
//! way through a link, checked end to end, and a wait for a metric.

#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use comsat_controller::dev::DevLink;
use comsat_tests::Oracle;
use comsat_tests::oracle::hash_to_end;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bytes per flow per direction: 8 flows x 8 MiB = 64 MiB each way.
pub const PER_FLOW: u64 = 8 * 1024 * 1024;
pub const FLOWS: u64 = 8;
/// The server's reply stream is seeded from the client's seed.
pub const REPLY_XOR: u64 = 0x5eed_0000_0000_b00b;
pub const TEST_TIMEOUT: Duration = Duration::from_secs(240);

pub fn link(name: &str, listen: String, target: String) -> DevLink {
    DevLink {
        name: name.into(),
        listen,
        target,
        allowed_uids: vec![],
        allow: vec![],
        proxy_protocol: false,
    }
}

/// Serves one flow at the target: reads a seed, then concurrently sends the
/// reply stream and hashes everything received; returns (seed, len, hash).
pub async fn serve_flow<S: AsyncRead + AsyncWrite + Unpin>(s: S) -> Result<Received> {
    let (mut r, mut w) = tokio::io::split(s);
    let seed = r.read_u64().await?;
    let send = async {
        Oracle::write_to(seed ^ REPLY_XOR, PER_FLOW, &mut w).await?;
        w.shutdown().await
    };
    let (sent, received) = tokio::join!(send, hash_to_end(&mut r));
    sent?;
    let (len, hash) = received?;
    Ok((seed, len, hash))
}

/// One client flow: sends seed + stream, half-closes, hashes the reply.
pub async fn client_flow<S: AsyncRead + AsyncWrite + Unpin>(s: S, seed: u64) -> Result<()> {
    let (mut r, mut w) = tokio::io::split(s);
    let send = async {
        w.write_u64(seed).await?;
        Oracle::write_to(seed, PER_FLOW, &mut w).await?;
        w.shutdown().await
    };
    let (sent, received) = tokio::join!(send, hash_to_end(&mut r));
    sent?;
    let (len, hash) = received?;
    if len != PER_FLOW || hash != Oracle::digest(seed ^ REPLY_XOR, PER_FLOW) {
        bail!("flow {seed}: reply of {len} bytes does not match the sent stream");
    }
    Ok(())
}

/// What the target saw of one flow: (seed, bytes, SHA-256).
type Received = (u64, u64, [u8; 32]);

pub async fn check_server_results(
    results: Vec<tokio::task::JoinHandle<Result<Received>>>,
) -> Result<()> {
    let mut seeds = Vec::new();
    for r in results {
        let (seed, len, hash) = r.await??;
        assert_eq!(len, PER_FLOW, "flow {seed}: bytes received at the target");
        assert_eq!(
            hash,
            Oracle::digest(seed, PER_FLOW),
            "flow {seed}: SHA-256 at the target"
        );
        seeds.push(seed);
    }
    seeds.sort();
    assert_eq!(seeds, (1..=FLOWS).collect::<Vec<_>>());
    Ok(())
}

/// Runs [`FLOWS`] concurrent flows, each carrying [`PER_FLOW`] bytes both
/// ways, and checks every byte at both ends.
pub async fn eight_flows<S, A, AF, C, CF>(mut accept: A, connect: C) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    A: FnMut() -> AF + Send + 'static,
    AF: Future<Output = std::io::Result<S>> + Send,
    C: Fn() -> CF,
    CF: Future<Output = std::io::Result<S>> + Send + 'static,
{
    let server = tokio::spawn(async move {
        let mut flows = Vec::new();
        for _ in 0..FLOWS {
            let s = accept().await?;
            flows.push(tokio::spawn(serve_flow(s)));
        }
        anyhow::Ok(flows)
    });
    let clients: Vec<_> = (1..=FLOWS)
        .map(|seed| {
            let connecting = connect();
            tokio::spawn(async move { client_flow(connecting.await?, seed).await })
        })
        .collect();
    tokio::time::timeout(TEST_TIMEOUT, async {
        for c in clients {
            c.await??;
        }
        check_server_results(server.await??).await
    })
    .await
    .context("transfer timed out")?
}

/// [`eight_flows`] from agent A's listener at `listen` to `target`.
pub async fn eight_tcp_flows(target: TcpListener, listen: SocketAddr) -> Result<()> {
    let target = Arc::new(target);
    eight_flows(
        move || {
            let target = target.clone();
            async move { target.accept().await.map(|(s, _)| s) }
        },
        move || TcpStream::connect(listen),
    )
    .await
}

/// Waits (at most 15 s) until `series` reaches `at_least`; returns the scrape.
pub async fn wait_metric(admin: SocketAddr, series: &str, at_least: f64) -> Result<String> {
    comsat_tests::wait_for_metric(admin, series, Duration::from_secs(15), |v| v >= at_least).await
}

/// An echo server on loopback for as long as the test runs.
pub async fn spawn_echo() -> Result<SocketAddr> {
    let echo = TcpListener::bind("127.0.0.1:0").await?;
    let addr = echo.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Ok(addr)
}

/// Process ids of the relay and both agents.
pub fn pids(sys: &crate::common::System) -> [u32; 3] {
    [
        sys.relay.pid(),
        sys.agents[0].0.pid(),
        sys.agents[1].0.pid(),
    ]
}
