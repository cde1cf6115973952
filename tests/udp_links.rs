//! `udp://` links end to end, with the real relay and agents as processes:
//! each local source address is a flow whose answers come back to it, a
//! long stream of datagrams is accounted for one by one (delivered, or
//! dropped and counted), and a busy TCP link beside does not stop UDP
//! ping-pongs.

mod common;
#[path = "common/flows.rs"]
mod flows;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use common::{Options, System};
use comsat_tests::{metric, scrape};
use flows::{link, spawn_echo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// A UDP server on loopback that answers each datagram with `answer:`
/// and the datagram, from the address it was sent to.
async fn spawn_answerer() -> Result<SocketAddr> {
    let socket = UdpSocket::bind("127.0.0.1:0").await?;
    let addr = socket.local_addr()?;
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let mut answer = b"answer:".to_vec();
            answer.extend_from_slice(&buf[..n]);
            let _ = socket.send_to(&answer, from).await;
        }
    });
    Ok(addr)
}

/// Starts a system with `links`, waits until they are up, and returns it
/// with agent A's address for the first (a `udp://` listener).
async fn start(links: Vec<comsat_controller::dev::DevLink>) -> Result<(System, SocketAddr)> {
    let name = links[0].name.clone();
    let mut opts = Options::one(links[0].clone());
    opts.links = links;
    let mut sys = System::start(opts)?;
    let listen = sys.listen_addr(&name)?;
    let addr = listen
        .strip_prefix("udp://")
        .with_context(|| format!("link {name} listens on {listen}, not udp://"))?
        .parse()?;
    sys.wait_ready()?;
    Ok((sys, addr))
}

/// `series` of link `name` on `admin`, e.g. `sent` for
/// `comsat_agent_udp_datagrams_sent_total{link="name"}`.
fn udp_metric(m: &str, what: &str, name: &str) -> f64 {
    metric(
        m,
        &format!("comsat_agent_udp_datagrams_{what}_total{{link=\"{name}\"}}"),
    )
}

/// Every datagram `admin`'s agent dropped on link `name`, all reasons.
fn dropped(m: &str, name: &str) -> f64 {
    let prefix = format!("comsat_agent_udp_datagrams_dropped_total{{link=\"{name}\",");
    m.lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Datagrams of link `name` that the agents and the relay dropped and
/// counted (the relay's counters are its own, for every link), and the
/// scrapes they were read from.
fn counted_drops(sys: &System, name: &str) -> Result<(f64, [String; 3])> {
    let a = scrape(sys.agents[0].1)?;
    let b = scrape(sys.agents[1].1)?;
    let r = scrape(sys.relay_admin)?;
    let relay: f64 = [
        "too_large",
        "congested",
        "peer_away",
        "rate_limit",
        "overflow",
    ]
    .iter()
    .map(|why| {
        metric(
            &r,
            &format!("comsat_relay_datagrams_dropped_total{{reason=\"{why}\"}}"),
        )
    })
    .sum();
    let overflow = metric(&a, "comsat_agent_udp_datagrams_overflow_total")
        + metric(&b, "comsat_agent_udp_datagrams_overflow_total");
    Ok((
        dropped(&a, name) + dropped(&b, name) + relay + overflow,
        [a, b, r],
    ))
}

async fn recv_within(socket: &UdpSocket, buf: &mut [u8], within: Duration) -> Result<usize> {
    tokio::time::timeout(within, socket.recv(buf))
        .await
        .context("no answer in time")?
        .map_err(Into::into)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_style_queries_from_many_sources_each_get_their_own_answers() -> Result<()> {
    let target = spawn_answerer().await?;
    let (sys, listen) = start(vec![link(
        "dns",
        "udp://127.0.0.1:0".into(),
        format!("udp://{target}"),
    )])
    .await?;

    // Four clients (four source ports: four flows), each asking 25
    // questions with ids of its own, as a stub resolver does.
    let mut clients = Vec::new();
    for _ in 0..4 {
        let s = UdpSocket::bind("127.0.0.1:0").await?;
        s.connect(listen).await?;
        clients.push(s);
    }
    let mut buf = vec![0u8; 2048];
    for id in 0..25u16 {
        for (c, socket) in clients.iter().enumerate() {
            let query = format!("query id={id} from client {c} for example.internal A");
            socket.send(query.as_bytes()).await?;
            let n = match recv_within(socket, &mut buf, Duration::from_secs(5)).await {
                Ok(n) => n,
                Err(e) => {
                    let (_, [a, b, r]) = counted_drops(&sys, "dns")?;
                    bail!("{e}: client {c}, query {id}\nagent A:\n{a}\nagent B:\n{b}\nrelay:\n{r}");
                }
            };
            ensure!(
                buf[..n] == *format!("answer:{query}").as_bytes(),
                "client {c} got {:?} for {query:?}",
                String::from_utf8_lossy(&buf[..n])
            );
        }
    }

    let a = scrape(sys.agents[0].1)?;
    let b = scrape(sys.agents[1].1)?;
    assert_eq!(udp_metric(&a, "sent", "dns"), 100.0, "{a}");
    assert_eq!(udp_metric(&a, "received", "dns"), 100.0, "{a}");
    assert_eq!(udp_metric(&b, "received", "dns"), 100.0, "{b}");
    assert_eq!(udp_metric(&b, "sent", "dns"), 100.0, "{b}");
    assert_eq!(
        metric(&a, "comsat_agent_udp_flows_open{link=\"dns\"}"),
        4.0,
        "one flow per source address: {a}"
    );
    assert_eq!(
        metric(&b, "comsat_agent_udp_flows_open{link=\"dns\"}"),
        4.0,
        "one target socket per flow: {b}"
    );
    assert_eq!(dropped(&a, "dns") + dropped(&b, "dns"), 0.0, "{a}\n{b}");
    Ok(())
}

/// Datagrams the stream sends, every thousandth of them larger than any
/// path takes.
const STREAM: u64 = 100_000;
const OVERSIZED_EVERY: u64 = 1000;
/// Datagrams in flight at most (sent, neither delivered nor known
/// dropped), so the test measures accounting, not the loopback's buffers.
const IN_FLIGHT: u64 = 64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_datagrams_are_each_delivered_once_or_dropped_and_counted() -> Result<()>
{
    let sink = UdpSocket::bind("127.0.0.1:0").await?;
    let target = sink.local_addr()?;
    let (sys, listen) = start(vec![link(
        "stream",
        "udp://127.0.0.1:0".into(),
        format!("udp://{target}"),
    )])
    .await?;

    let delivered = Arc::new(AtomicU64::new(0));
    let counter = delivered.clone();
    let receiver = tokio::spawn(async move {
        let mut seen = HashSet::new();
        let mut duplicates = 0u64;
        let mut buf = vec![0u8; 65_536];
        while let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_secs(3), sink.recv(&mut buf)).await
        {
            let Some(seq) = buf[..n].first_chunk::<8>().copied() else {
                continue;
            };
            let seq = u64::from_be_bytes(seq);
            if seen.insert(seq) {
                counter.fetch_add(1, Ordering::Relaxed);
            } else {
                duplicates += 1;
            }
            if seen.len() as u64 == STREAM - STREAM / OVERSIZED_EVERY {
                break;
            }
        }
        (seen, duplicates)
    });

    let client = UdpSocket::bind("127.0.0.1:0").await?;
    client.connect(listen).await?;
    let started = Instant::now();
    let mut oversized = 0u64;
    // Drops other than the oversized ones, as last read from the metrics
    // (only when the window stalls: no scrape per datagram).
    let mut other_drops = 0u64;
    let mut last_progress = (0u64, Instant::now());
    for seq in 0..STREAM {
        let len = if seq % OVERSIZED_EVERY == OVERSIZED_EVERY - 1 {
            oversized += 1;
            4000
        } else {
            64 + (seq % 1000) as usize
        };
        let mut d = vec![0u8; len];
        d[..8].copy_from_slice(&seq.to_be_bytes());
        client.send(&d).await?;
        // Wait for room in the window.
        loop {
            let done = delivered.load(Ordering::Relaxed) + oversized + other_drops;
            if (seq + 1).saturating_sub(done) < IN_FLIGHT {
                break;
            }
            if done != last_progress.0 {
                last_progress = (done, Instant::now());
            } else if last_progress.1.elapsed() > Duration::from_millis(500) {
                let (counted, [a, b, r]) = counted_drops(&sys, "stream")?;
                let too_large = metric(
                    &a,
                    "comsat_agent_udp_datagrams_dropped_total{link=\"stream\",reason=\"too_large\"}",
                );
                other_drops = (counted - too_large) as u64;
                if last_progress.1.elapsed() > Duration::from_secs(5) {
                    bail!(
                        "nothing delivered or counted for 5 s at {seq} ({done} settled): \
                         datagrams went missing without a count\nagent A:\n{a}\nagent B:\n{b}\nrelay:\n{r}"
                    );
                }
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }
    let (seen, duplicates) = receiver.await?;
    let elapsed = started.elapsed();

    let (counted, [a, b, r]) = counted_drops(&sys, "stream")?;
    let reasons: Vec<&str> = [&a, &b, &r]
        .iter()
        .flat_map(|m| m.lines())
        .filter(|l| {
            !l.starts_with('#')
                && (l.contains("dropped_total{") || l.contains("overflow_total"))
                && !l.ends_with(" 0")
        })
        .collect();
    let missing: Vec<u64> = (0..STREAM)
        .filter(|seq| seq % OVERSIZED_EVERY != OVERSIZED_EVERY - 1 && !seen.contains(seq))
        .take(20)
        .collect();
    println!(
        "{STREAM} datagrams in {elapsed:?}: {} delivered, {counted} dropped and counted \
         ({reasons:?}), {duplicates} duplicates; missing (first 20): {missing:?}; \
         A sent {}, relay forwarded {}, B received {}",
        seen.len(),
        udp_metric(&a, "sent", "stream"),
        metric(&r, "comsat_relay_datagrams_forwarded_total"),
        udp_metric(&b, "received", "stream"),
    );
    assert_eq!(duplicates, 0, "a datagram was delivered twice");
    assert_eq!(
        seen.len() as f64 + counted,
        STREAM as f64,
        "delivered + dropped must be every datagram sent\nagent A:\n{a}\nagent B:\n{b}\nrelay:\n{r}"
    );
    assert_eq!(
        metric(
            &a,
            "comsat_agent_udp_datagrams_dropped_total{link=\"stream\",reason=\"too_large\"}"
        ),
        oversized as f64,
        "each oversized datagram is dropped at the sender, never fragmented: {a}"
    );
    assert_eq!(
        udp_metric(&a, "sent", "stream"),
        (STREAM - oversized) as f64
    );
    assert_eq!(udp_metric(&b, "received", "stream"), seen.len() as f64);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_tcp_link_beside_does_not_stop_udp_ping_pongs() -> Result<()> {
    let answerer = spawn_answerer().await?;
    let echo = spawn_echo().await?;
    let (mut sys, listen) = start(vec![
        link(
            "ping",
            "udp://127.0.0.1:0".into(),
            format!("udp://{answerer}"),
        ),
        link("bulk", "tcp://127.0.0.1:0".into(), format!("tcp://{echo}")),
    ])
    .await?;
    let bulk_addr = sys.tcp_listen_addr("bulk")?;

    // 64 MiB each way through the TCP link, while 64-byte pings go every
    // 10 ms through the UDP link (both links share the agents' relay
    // connection).
    const BULK: usize = 64 * 1024 * 1024;
    let bulk = tokio::spawn(async move {
        let s = TcpStream::connect(bulk_addr).await?;
        let (mut r, mut w) = s.into_split();
        let writer = tokio::spawn(async move {
            let chunk = vec![0x5au8; 256 * 1024];
            for _ in 0..BULK / chunk.len() {
                w.write_all(&chunk).await?;
            }
            w.shutdown().await?;
            anyhow::Ok(())
        });
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0;
        while got < BULK {
            let n = r.read(&mut buf).await?;
            ensure!(n > 0, "echo ended after {got} bytes");
            got += n;
        }
        writer.await??;
        anyhow::Ok(got)
    });

    let ping = UdpSocket::bind("127.0.0.1:0").await?;
    ping.connect(listen).await?;
    let mut buf = vec![0u8; 2048];
    let (mut sent, mut answered, mut rtts) = (0u32, 0u32, Vec::new());
    while !bulk.is_finished() {
        sent += 1;
        let mut msg = sent.to_be_bytes().to_vec();
        msg.resize(64, 0);
        let at = Instant::now();
        ping.send(&msg).await?;
        let deadline = at + Duration::from_secs(1);
        // Late answers to earlier pings are read and passed over.
        while let Ok(Ok(n)) = tokio::time::timeout_at(deadline.into(), ping.recv(&mut buf)).await {
            if buf[..n] == *[b"answer:".as_slice(), &msg].concat() {
                answered += 1;
                rtts.push(at.elapsed());
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let moved = bulk.await??;
    rtts.sort();
    let pct = |p: usize| rtts.get(rtts.len() * p / 100).copied().unwrap_or_default();
    println!(
        "beside {} MiB of bulk each way: {answered}/{sent} pings answered, p50 {:?}, p99 {:?}",
        moved >> 20,
        pct(50),
        pct(99)
    );
    assert!(sent >= 5, "the bulk transfer was too short to ping beside");
    assert!(
        answered * 10 >= sent * 9,
        "only {answered} of {sent} pings were answered beside the bulk transfer"
    );
    Ok(())
}
