//! End-to-end tests of resume: flows survive the relay dying under them.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use common::{Options, System};
use comsat::dev::DevLink;
use comsat_tests::oracle::hash_counting;
use comsat_tests::{Oracle, metric, scrape};
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const FLOWS: u64 = 4;
/// 4 flows x 32 MiB x 2 directions = 256 MiB.
const PER_FLOW: u64 = 32 * 1024 * 1024;
const REPLY_XOR: u64 = 0x0bad_cafe;

/// Sends `seed` + its stream and hashes what comes back, counting progress.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    s: S,
    send_seed: u64,
    header: Option<u64>,
    progress: &AtomicU64,
) -> Result<(u64, [u8; 32])> {
    let (mut r, mut w) = tokio::io::split(s);
    let send = async {
        if let Some(h) = header {
            w.write_u64(h).await?;
        }
        Oracle::write_to(send_seed, PER_FLOW, &mut w).await?;
        w.shutdown().await
    };
    let (sent, received) = tokio::join!(send, hash_counting(&mut r, progress));
    sent.context("sending")?;
    received.context("receiving (a reset here is an application-visible failure)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_and_restarted_mid_transfer_loses_nothing() -> Result<()> {
    let target = TcpListener::bind("127.0.0.1:0").await?;
    let target_addr = target.local_addr()?;
    let mut sys = System::start(Options {
        links: vec![DevLink {
            name: "bulk".into(),
            listen: "tcp://127.0.0.1:0".into(),
            target: format!("tcp://{target_addr}"),
            allowed_uids: vec![],
        }],
        tap: false,
        pin_sha256: false,
    })?;
    let listen: SocketAddr = sys
        .listen_addr("bulk")?
        .trim_start_matches("tcp://")
        .parse()?;
    sys.wait_ready()?;

    let progress = Arc::new(AtomicU64::new(0));
    let server = {
        let progress = progress.clone();
        tokio::spawn(async move {
            let mut flows = Vec::new();
            for _ in 0..FLOWS {
                let (mut s, _) = target.accept().await?;
                let progress = progress.clone();
                flows.push(tokio::spawn(async move {
                    let seed = s.read_u64().await?;
                    let got = exchange(s, seed ^ REPLY_XOR, None, &progress).await?;
                    anyhow::Ok((seed, got))
                }));
            }
            anyhow::Ok(flows)
        })
    };
    let clients: Vec<_> = (1..=FLOWS)
        .map(|seed| {
            let progress = progress.clone();
            tokio::spawn(async move {
                let s = TcpStream::connect(listen).await?;
                let got = exchange(s, seed, Some(seed), &progress).await?;
                anyhow::Ok((seed, got))
            })
        })
        .collect();

    // Kill the relay at three random points of the transfer, restarting it
    // each time on the same address with the same configuration.
    let total = 2 * FLOWS * PER_FLOW;
    let mut rng = rand::rngs::StdRng::seed_from_u64(rand::random());
    let mut points: Vec<u64> = (0..3)
        .map(|i| total * (i * 25 + rng.random_range(10..25)) / 100)
        .collect();
    points.sort();
    let logs = sys.logs();
    for (i, at) in points.iter().enumerate() {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while progress.load(Ordering::Relaxed) < *at {
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "transfer stalled at {} of {total} bytes",
                    progress.load(Ordering::Relaxed)
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        sys.relay.kill();
        eprintln!(
            "killed the relay at {} bytes",
            progress.load(Ordering::Relaxed)
        );
        let (relay, _, admin) =
            common::start_relay(&sys.layout.relay_config, &logs, &format!("relay-{}", i + 2))?;
        sys.relay = relay;
        sys.relay_admin = admin;
    }

    let results = tokio::time::timeout(Duration::from_secs(240), async {
        let mut out = Vec::new();
        for c in clients {
            out.push(c.await??);
        }
        for s in server.await?? {
            out.push(s.await??);
        }
        anyhow::Ok(out)
    })
    .await
    .context("transfer did not finish")??;
    assert_eq!(results.len() as u64, 2 * FLOWS);
    for (seed, (len, hash)) in &results[..FLOWS as usize] {
        // The client received the server's reply stream.
        assert_eq!(
            *len, PER_FLOW,
            "flow {seed}: bytes at the client (lost or duplicated)"
        );
        assert_eq!(
            *hash,
            Oracle::digest(seed ^ REPLY_XOR, PER_FLOW),
            "flow {seed}: client SHA-256"
        );
    }
    for (seed, (len, hash)) in &results[FLOWS as usize..] {
        assert_eq!(
            *len, PER_FLOW,
            "flow {seed}: bytes at the server (lost or duplicated)"
        );
        assert_eq!(
            *hash,
            Oracle::digest(*seed, PER_FLOW),
            "flow {seed}: server SHA-256"
        );
    }
    for (_, admin) in &sys.agents {
        let m = scrape(*admin)?;
        assert_eq!(metric(&m, "comsat_agent_flows_failed_total"), 0.0, "{m}");
    }
    let a = scrape(sys.agents[0].1)?;
    assert!(metric(&a, "comsat_agent_flows_resumed_total") >= 3.0, "{a}");
    Ok(())
}
