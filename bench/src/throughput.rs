//! Throughput: one flow, eight flows, and a rate-limited link beside bulk.

use std::time::{Duration, Instant};

use anyhow::Result;
use comsat_protocol::grant::LinkLimits;

use crate::measure::{jain, median, throughput, usage_during};
use crate::path::{Path, link};
use crate::report::{Samples, figure};
use crate::{DIRECT, FLOOR, GB, IP_UDP_HEADERS, IPERF, QUINN, Run, iperf};

/// UDP payload bytes and datagrams through the relay, both directions.
fn relay_udp(path: &Path) -> Result<(f64, f64)> {
    let m = path.relay_metrics()?;
    let sum = |name: &str| {
        ["rx", "tx"]
            .iter()
            .map(|d| comsat_tests::metric(&m, &format!("{name}{{direction=\"{d}\"}}")))
            .sum::<f64>()
    };
    Ok((
        sum("comsat_relay_udp_bytes_total"),
        sum("comsat_relay_udp_datagrams_total"),
    ))
}

/// One flow per target, interleaved; beside comsat's: the CPU seconds per
/// GB of each path's processes, the relay's share, and the bytes on the
/// wire per payload byte per hop.
pub(crate) async fn throughput_1(r: &mut Run) -> Result<()> {
    let n: u64 = if r.quick { 256 << 20 } else { 2 << 30 };
    let (mut s, mut cpu, mut faults): (Samples, Samples, Samples) = Default::default();
    let (mut share, mut wire, mut udp_only) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..r.reps {
        eprintln!("throughput-1: run {}/{}", i + 1, r.reps);
        s.add(DIRECT, throughput(r.sink, 1, n).await?[0]);
        if r.iperf {
            // A failed iperf3 run is reported; comsat's figures still count.
            match iperf::throughput(n).await {
                Ok(rate) => s.add(IPERF, rate),
                Err(e) => r
                    .notes
                    .push(format!("{IPERF}: run {} FAILED: {e:#}", i + 1)),
            }
        }
        for (name, chain) in &r.chains {
            let (rate, u) = usage_during(&chain.pids(), throughput(chain.bulk, 1, n)).await?;
            s.add(name, rate[0]);
            cpu.add(name, u.iter().map(|u| u.cpu).sum::<f64>() / (n as f64 / GB));
            faults.add(
                name,
                u.iter().map(|u| u.faults).sum::<f64>() / (n as f64 / GB),
            );
        }
        s.add(QUINN, r.quinn.throughput(1, n).await?[0]);
        let before = relay_udp(&r.path)?;
        let (rate, u) = usage_during(&r.path.pids(), throughput(r.bulk(), 1, n)).await?;
        let after = relay_udp(&r.path)?;
        s.comsat.push(rate[0]);
        let total: f64 = u.iter().map(|u| u.cpu).sum();
        cpu.comsat.push(total / (n as f64 / GB));
        faults
            .comsat
            .push(u.iter().map(|u| u.faults).sum::<f64>() / (n as f64 / GB));
        share.push(u[0].cpu / total);
        // Two hops: agent A -> relay and relay -> agent B.
        let payload = 2.0 * n as f64;
        udp_only.push((after.0 - before.0) / payload);
        wire.push((after.0 - before.0 + IP_UDP_HEADERS * (after.1 - before.1)) / payload);
    }
    s.figures("throughput-1", "one flow", "MiB/s", &mut r.figures);
    r.chart("1-flow throughput", "MiB/s", &s);
    let metric = "CPU seconds per GB (relay and both agents; peers: all their processes)";
    let c = median(cpu.comsat.clone());
    r.figures.push(figure(
        "efficiency",
        &format!("{metric}; floor 6.5"),
        "s",
        c,
        FLOOR,
        6.5,
        r.reps,
    ));
    cpu.figures("efficiency", metric, "s", &mut r.figures);
    faults.figures(
        "efficiency",
        "minor page faults per GB (memory handed back to the kernel and touched again; same processes)",
        "",
        &mut r.figures,
    );
    let share = median(share);
    r.figures.push(figure(
        "efficiency",
        "the relay's share of that CPU time",
        "",
        share,
        "all three processes",
        1.0,
        r.reps,
    ));
    r.figures.push(figure(
        "efficiency",
        "wire bytes (IP+UDP+QUIC) per payload byte per hop; floor 1.05",
        "",
        median(wire),
        FLOOR,
        1.05,
        r.reps,
    ));
    r.notes.push(format!(
        "efficiency: wire bytes are counted at the relay (comsat_relay_udp_bytes_total and \
         _datagrams_total, both directions, acknowledgements included) plus 28 bytes of IPv4 \
         and UDP headers per datagram, over the payload bytes of the two hops; UDP payload \
         alone is {:.4} per payload byte per hop.",
        median(udp_only)
    ));
    Ok(())
}

pub(crate) async fn throughput_8(r: &mut Run) -> Result<()> {
    let n: u64 = if r.quick { 32 << 20 } else { 256 << 20 };
    let (mut s, mut fair) = (Samples::default(), Vec::new());
    let mut one = Vec::new();
    for i in 0..r.reps {
        eprintln!("throughput-8: run {}/{}", i + 1, r.reps);
        s.add(DIRECT, throughput(r.sink, 8, n).await?.iter().sum());
        for (name, chain) in &r.chains {
            s.add(name, throughput(chain.bulk, 8, n).await?.iter().sum());
        }
        s.add(QUINN, r.quinn.throughput(8, n).await?.iter().sum());
        let rates = throughput(r.bulk(), 8, n).await?;
        fair.push(jain(&rates));
        s.comsat.push(rates.iter().sum());
        one.push(throughput(r.bulk(), 1, 8 * n).await?[0]);
    }
    s.figures(
        "throughput-8",
        "8 flows, aggregate",
        "MiB/s",
        &mut r.figures,
    );
    let (agg, one) = (median(s.comsat.clone()), median(one));
    r.figures.push(figure(
        "throughput-8",
        "8-flow aggregate over one flow (same bytes); floor 0.9",
        "MiB/s",
        agg,
        "comsat, one flow",
        one,
        r.reps,
    ));
    r.figures.push(figure(
        "throughput-8",
        "Jain fairness index; floor 0.9",
        "",
        median(fair),
        "perfect fairness",
        1.0,
        r.reps,
    ));
    Ok(())
}

/// The relay enforces a link's rate limit: 4 MiB through a link limited
/// to 1 MiB/s, while another link on the same relay and agents runs bulk
/// beside it, compared with that other link alone.
pub(crate) async fn rate_limit(r: &mut Run) -> Result<()> {
    const LIMITED: u64 = 4 << 20;
    const RATE: u64 = 1 << 20;
    let per_flow: u64 = if r.quick { 256 << 20 } else { 2 << 30 };
    eprintln!("rate-limit: starting a path with a link limited to 1 MiB/s");
    let path = Path::start(
        &r.bin,
        vec![link("limited", r.sink), link("free", r.sink)],
        &[(
            "limited",
            LinkLimits {
                rate_bytes_per_sec: Some(RATE),
                max_flows: None,
            },
        )],
    )
    .await?;
    let (limited, free) = (path.listen[0], path.listen[1]);
    let (mut alone, mut beside, mut limited_secs) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..r.reps {
        eprintln!("rate-limit: run {}/{}", i + 1, r.reps);
        alone.push(throughput(free, 1, per_flow).await?[0]);
        let slow = tokio::spawn(async move {
            let start = Instant::now();
            throughput(limited, 1, LIMITED).await?;
            anyhow::Ok(start.elapsed().as_secs_f64())
        });
        // Give the limited flow a head start so the two overlap.
        tokio::time::sleep(Duration::from_millis(200)).await;
        beside.push(throughput(free, 1, per_flow).await?[0]);
        limited_secs.push(slow.await??);
    }
    r.figures.push(figure(
        "rate-limit",
        "4 MiB through a 1 MiB/s link (floor: 3 s)",
        "s",
        median(limited_secs),
        FLOOR,
        3.0,
        r.reps,
    ));
    r.figures.push(figure(
        "rate-limit",
        "another link's one flow while it runs",
        "MiB/s",
        median(beside),
        "that link alone",
        median(alone),
        r.reps,
    ));
    Ok(())
}
