//! UDP links: a 64-byte UDP ping-pong through a `udp://` link beside the
//! same ping-pong straight to the echo, and a burst of datagrams sent as
//! fast as the client can (the rate that arrives, and the share lost)
//! beside the same burst straight to the sink. Interleaved, run by run.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use comsat_controller::dev::DevLink;
use tokio::net::UdpSocket;

use crate::Run;
use crate::measure::{median, percentile};
use crate::path::Path;
use crate::report::Samples;

const DIRECT_UDP: &str = "direct loopback UDP";

/// Bytes of each datagram of the burst.
const BURST_PAYLOAD: usize = 512;

/// A UDP echo on loopback for as long as the bench runs.
async fn spawn_echo() -> Result<SocketAddr> {
    let socket = UdpSocket::bind("127.0.0.1:0").await?;
    let addr = socket.local_addr()?;
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(&buf[..n], from).await;
        }
    });
    Ok(addr)
}

/// A UDP sink on loopback counting what arrives, with when the last did.
struct Sink {
    addr: SocketAddr,
    received: Arc<AtomicU64>,
    /// Nanoseconds since `epoch` of the last arrival.
    last: Arc<AtomicU64>,
    epoch: Instant,
}

impl Sink {
    async fn start() -> Result<Self> {
        let socket = UdpSocket::bind("127.0.0.1:0").await?;
        let _ = socket2::SockRef::from(&socket).set_recv_buffer_size(4 << 20);
        let addr = socket.local_addr()?;
        let (received, last) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let epoch = Instant::now();
        let (r, l) = (received.clone(), last.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while socket.recv(&mut buf).await.is_ok() {
                r.fetch_add(1, Ordering::Relaxed);
                l.store(epoch.elapsed().as_nanos() as u64, Ordering::Relaxed);
            }
        });
        Ok(Self {
            addr,
            received,
            last,
            epoch,
        })
    }

    /// Sends `count` datagrams to `to` as fast as it goes; returns the
    /// datagrams per second that arrived (from the first send to the last
    /// arrival) and the share lost.
    async fn burst(&self, to: SocketAddr, count: u64) -> Result<(f64, f64)> {
        let client = UdpSocket::bind("127.0.0.1:0").await?;
        let _ = socket2::SockRef::from(&client).set_send_buffer_size(4 << 20);
        client.connect(to).await?;
        let before = self.received.load(Ordering::Relaxed);
        let start = self.epoch.elapsed();
        let payload = [0x42u8; BURST_PAYLOAD];
        for _ in 0..count {
            client.send(&payload).await?;
        }
        // Settled once nothing arrived for 300 ms.
        let mut seen = self.received.load(Ordering::Relaxed);
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let now = self.received.load(Ordering::Relaxed);
            if now == seen {
                break;
            }
            seen = now;
        }
        let got = seen - before;
        let end = Duration::from_nanos(self.last.load(Ordering::Relaxed));
        let secs = end.saturating_sub(start).as_secs_f64().max(1e-6);
        Ok((got as f64 / secs, 1.0 - got as f64 / count as f64))
    }
}

/// `rounds` 64-byte ping-pongs with `to`; sorted round trips in µs.
async fn ping_pongs(to: SocketAddr, rounds: usize) -> Result<Vec<f64>> {
    let socket = UdpSocket::bind("127.0.0.1:0").await?;
    socket.connect(to).await?;
    let (ping, mut back) = ([7u8; 64], [0u8; 128]);
    let mut rtts = Vec::with_capacity(rounds);
    let mut lost = 0;
    while rtts.len() < rounds {
        let t = Instant::now();
        socket.send(&ping).await?;
        match tokio::time::timeout(Duration::from_secs(1), socket.recv(&mut back)).await {
            Ok(r) => {
                r?;
                rtts.push(t.elapsed().as_secs_f64() * 1e6);
            }
            Err(_) => {
                lost += 1;
                ensure!(lost < 10, "ten pings without an answer within 1 s");
            }
        }
    }
    rtts.sort_by(f64::total_cmp);
    Ok(rtts)
}

fn udp_link(name: &str, target: SocketAddr) -> DevLink {
    DevLink {
        name: name.into(),
        listen: "udp://127.0.0.1:0".into(),
        target: format!("udp://{target}"),
        allowed_uids: vec![],
        allow: vec![],
        proxy_protocol: false,
    }
}

pub(crate) async fn udp(r: &mut Run) -> Result<()> {
    let echo = spawn_echo().await?;
    let sink = Sink::start().await?;
    let path = Path::start(
        &r.bin,
        vec![udp_link("udp-ping", echo), udp_link("udp-burst", sink.addr)],
        &[],
    )
    .await?;
    let (ping, burst) = (path.listen[0], path.listen[1]);
    ping_pongs(ping, 20).await.context("warming the UDP link")?;
    let rounds = if r.quick { 2_000 } else { 10_000 };
    let count: u64 = if r.quick { 50_000 } else { 200_000 };
    let [mut p50, mut p99, mut rate, mut loss] = [(); 4].map(|()| Samples::default());
    for i in 0..r.reps {
        eprintln!(
            "udp: run {}/{}, {rounds} ping-pongs and {count} datagrams each",
            i + 1,
            r.reps
        );
        let direct = ping_pongs(echo, rounds).await?;
        let through = ping_pongs(ping, rounds).await?;
        p50.add(DIRECT_UDP, percentile(&direct, 0.5));
        p99.add(DIRECT_UDP, percentile(&direct, 0.99));
        p50.comsat.push(percentile(&through, 0.5));
        p99.comsat.push(percentile(&through, 0.99));
        let (direct_rate, direct_loss) = sink.burst(sink.addr, count).await?;
        let (our_rate, our_loss) = sink.burst(burst, count).await?;
        rate.add(DIRECT_UDP, direct_rate);
        loss.add(DIRECT_UDP, direct_loss * 100.0);
        rate.comsat.push(our_rate);
        loss.comsat.push(our_loss * 100.0);
    }
    p50.figures("udp", "64-byte UDP ping-pong p50", "µs", &mut r.figures);
    p99.figures("udp", "64-byte UDP ping-pong p99", "µs", &mut r.figures);
    rate.figures(
        "udp",
        &format!("datagrams of {BURST_PAYLOAD} bytes delivered per second, sent as fast as one client can"),
        "datagrams/s",
        &mut r.figures,
    );
    loss.figures(
        "udp",
        "share of those datagrams lost (dropped and counted, for comsat)",
        "%",
        &mut r.figures,
    );
    r.chart("64-byte UDP ping-pong p50", "µs", &p50);
    let relay = path.relay_metrics()?;
    let dropped: Vec<&str> = relay
        .lines()
        .filter(|l| l.starts_with("comsat_relay_datagrams_dropped_total{") && !l.ends_with(" 0"))
        .collect();
    r.notes.push(format!(
        "udp: ping-pong p50 µs each run: comsat {:?}, direct {:?}; burst rate each run: comsat {:?}, direct {:?}; loss % each run: comsat {:?}, direct {:?}; the relay dropped {dropped:?}",
        p50.comsat, p50.baselines.first().map(|b| &b.1), rate.comsat, rate.baselines.first().map(|b| &b.1), loss.comsat, loss.baselines.first().map(|b| &b.1)
    ));
    eprintln!(
        "udp: ping p50 {:.0} µs (direct {:.0}), burst {:.0}/s with {:.2} % lost (direct {:.0}/s, {:.2} %)",
        median(p50.comsat.clone()),
        median(p50.baselines[0].1.clone()),
        median(rate.comsat.clone()),
        median(loss.comsat.clone()),
        median(rate.baselines[0].1.clone()),
        median(loss.baselines[0].1.clone()),
    );
    Ok(())
}
