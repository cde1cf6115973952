//! The bench's own client and servers, and the arithmetic on samples.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Accepts connections; each announces a length, sends that many bytes, and
/// gets one byte back once they all arrived. (No half-close: stunnel does
/// not carry one through TLS.)
pub(crate) async fn sink(listener: TcpListener) {
    while let Ok((mut s, _)) = listener.accept().await {
        tokio::spawn(async move {
            let Ok(mut left) = s.read_u64().await else {
                return;
            };
            let mut buf = vec![0u8; 256 * 1024];
            while left > 0 {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => left = left.saturating_sub(n as u64),
                }
            }
            let _ = s.write_all(&[1]).await;
        });
    }
}

/// Echoes every connection.
pub(crate) async fn echo(listener: TcpListener) {
    while let Ok((s, _)) = listener.accept().await {
        tokio::spawn(async move {
            let _ = s.set_nodelay(true);
            let (mut r, mut w) = s.into_split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

/// Sends `per_flow` bytes on each of `flows` connections to `addr` and
/// waits for the sink's answers; returns per-flow throughputs in MiB/s.
pub(crate) async fn throughput(addr: SocketAddr, flows: usize, per_flow: u64) -> Result<Vec<f64>> {
    let mut tasks = Vec::new();
    for _ in 0..flows {
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await?;
            let (mut recv, mut send) = s.split();
            upload(&mut send, &mut recv, &vec![0x5au8; 256 * 1024], per_flow).await
        }));
    }
    flow_rates(tasks).await
}

/// Sends `per_flow` (its count first, then the bytes, `buf` at a time) to
/// a [`sink`] and waits for its answer; returns the flow's MiB/s.
pub(crate) async fn upload(
    send: &mut (impl AsyncWrite + Unpin),
    recv: &mut (impl AsyncRead + Unpin),
    buf: &[u8],
    per_flow: u64,
) -> Result<f64> {
    let start = Instant::now();
    send.write_u64(per_flow).await?;
    let mut left = per_flow;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        send.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
    let mut done = [0u8; 1];
    recv.read_exact(&mut done).await?;
    Ok(per_flow as f64 / (1024.0 * 1024.0) / start.elapsed().as_secs_f64())
}

/// Each flow's MiB/s, waiting at most 300 s for each.
pub(crate) async fn flow_rates(
    tasks: Vec<tokio::task::JoinHandle<Result<f64>>>,
) -> Result<Vec<f64>> {
    let mut rates = Vec::new();
    for t in tasks {
        rates.push(
            tokio::time::timeout(Duration::from_secs(300), t)
                .await
                .context("a flow did not finish within 300 s")???,
        );
    }
    Ok(rates)
}

/// One ping-pong connection (64-byte messages through an echo), kept open
/// across blocks of round trips.
pub(crate) enum Pinger {
    Tcp(TcpStream),
    /// A bare quinn stream; its connection stays open with it.
    Quic {
        _conn: quinn::Connection,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    },
}

const PING: [u8; 64] = [7u8; 64];

impl Pinger {
    /// Connects to the echo (or the path in front of it) and warms the
    /// path up.
    pub(crate) async fn tcp(addr: SocketAddr) -> Result<Self> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Self::Tcp(s).warmed().await
    }

    /// Round trips before any is measured, and again after a pause (in
    /// which a comsat flow moves to its lane, which comes up with it).
    pub(crate) async fn warmed(mut self) -> Result<Self> {
        for _ in 0..20 {
            self.round().await?;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        for _ in 0..20 {
            self.round().await?;
        }
        Ok(self)
    }

    /// One round trip, in microseconds.
    pub(crate) async fn round(&mut self) -> Result<f64> {
        let mut back = [0u8; 64];
        let t = Instant::now();
        match self {
            Self::Tcp(s) => {
                s.write_all(&PING).await?;
                s.read_exact(&mut back).await?;
            }
            Self::Quic { send, recv, .. } => {
                send.write_all(&PING).await?;
                recv.read_exact(&mut back).await?;
            }
        }
        Ok(t.elapsed().as_secs_f64() * 1e6)
    }

    async fn rounds(&mut self, n: usize, rtts: &mut Vec<f64>) -> Result<()> {
        for _ in 0..n {
            rtts.push(self.round().await?);
        }
        Ok(())
    }
}

/// `rounds` round trips on each of `pingers`, taken in turns of `block`
/// (A B C A B C …), so that the machine's noise, which comes and goes over
/// seconds, falls on all of them alike. Each one's round-trip times in
/// microseconds, sorted.
pub(crate) async fn interleaved(
    pingers: &mut [Pinger],
    rounds: usize,
    block: usize,
) -> Result<Vec<Vec<f64>>> {
    let mut rtts: Vec<Vec<f64>> = pingers.iter().map(|_| Vec::with_capacity(rounds)).collect();
    let mut done = 0;
    while done < rounds {
        let n = block.min(rounds - done);
        for (p, out) in pingers.iter_mut().zip(&mut rtts) {
            p.rounds(n, out).await?;
        }
        done += n;
    }
    for r in &mut rtts {
        r.sort_by(f64::total_cmp);
    }
    Ok(rtts)
}

/// 64-byte ping-pongs on a new connection; returns round-trip times in
/// microseconds, sorted.
pub(crate) async fn latency(addr: SocketAddr, rounds: usize) -> Result<Vec<f64>> {
    let mut p = Pinger::tcp(addr).await?;
    let mut rtts = Vec::with_capacity(rounds);
    p.rounds(rounds, &mut rtts).await?;
    rtts.sort_by(f64::total_cmp);
    Ok(rtts)
}

/// [`latency`] on `ping` while one flow sends bulk to `bulk` (a sink)
/// through the same path the whole time.
pub(crate) async fn latency_under_bulk(
    bulk: SocketAddr,
    ping: SocketAddr,
    rounds: usize,
) -> Result<Vec<f64>> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut s = TcpStream::connect(bulk).await?;
    let flag = stop.clone();
    let load = tokio::spawn(async move {
        let buf = vec![0x5au8; 256 * 1024];
        // Announces more than it will send: the sink stops at our close.
        s.write_u64(u64::MAX).await?;
        let mut sent = 0u64;
        while !flag.load(Ordering::Relaxed) {
            s.write_all(&buf).await?;
            sent += buf.len() as u64;
        }
        anyhow::Ok(sent)
    });
    // Let the bulk flow reach its pace.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rtts = latency(ping, rounds).await;
    stop.store(true, Ordering::Relaxed);
    let sent = tokio::time::timeout(Duration::from_secs(30), load)
        .await
        .context("the bulk flow did not stop")???;
    if sent == 0 {
        bail!("the bulk flow sent nothing");
    }
    rtts
}

/// One small exchange through the sink: 1 byte there, 1 byte back.
pub(crate) async fn poke(addr: SocketAddr) -> Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_u64(1).await?;
    s.write_all(&[7]).await?;
    let mut done = [0u8; 1];
    s.read_exact(&mut done).await?;
    Ok(())
}

/// Waits until `bulk` (in front of a sink) and `ping` (in front of the
/// echo) both carry bytes.
pub(crate) async fn wait_carrying(what: &str, bulk: SocketAddr, ping: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let try_once = async {
            poke(bulk).await?;
            latency(ping, 1).await?;
            anyhow::Ok(())
        };
        match tokio::time::timeout(Duration::from_secs(2), try_once).await {
            Ok(Ok(())) => return Ok(()),
            _ if Instant::now() > deadline => bail!("{what} did not carry bytes within 20 s"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    percentile(&v, 0.5)
}

/// Jain's fairness index of per-flow rates: 1 is perfectly fair.
pub(crate) fn jain(rates: &[f64]) -> f64 {
    let sum: f64 = rates.iter().sum();
    let squares: f64 = rates.iter().map(|r| r * r).sum();
    sum * sum / (rates.len() as f64 * squares)
}

/// The least-squares line through `points`: slope and R².
pub(crate) fn fit(points: &[(f64, f64)]) -> (f64, f64) {
    let n = points.len() as f64;
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let syy: f64 = points.iter().map(|p| (p.1 - my).powi(2)).sum();
    if sxx == 0.0 {
        return (0.0, 0.0);
    }
    let r2 = if syy == 0.0 {
        1.0
    } else {
        sxy * sxy / (sxx * syy)
    };
    (sxy / sxx, r2)
}

/// Resident memory of a process, KiB (`VmRSS` of /proc/PID/status).
pub(crate) fn rss_kib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("VmRSS value")?
        .parse()?)
}

/// What a process has used so far, all threads.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Usage {
    /// CPU time, user and system, seconds.
    pub(crate) cpu: f64,
    /// Minor page faults: pages the kernel had to hand the process (zeroed)
    /// when it touched memory it had not mapped, e.g. after its allocator
    /// gave freed memory back.
    pub(crate) faults: f64,
}

impl std::ops::Sub for Usage {
    type Output = Self;
    fn sub(self, before: Self) -> Self {
        Self {
            cpu: self.cpu - before.cpu,
            faults: self.faults - before.faults,
        }
    }
}

/// A process's [`Usage`] so far (`minflt`, `utime` and `stime` of
/// /proc/PID/stat; times in USER_HZ = 100 ticks a second on every Linux
/// architecture we run on).
pub(crate) fn usage(pid: u32) -> Result<Usage> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("/proc/{pid}/stat"))?;
    parse_stat(&text).with_context(|| format!("/proc/{pid}/stat"))
}

fn parse_stat(text: &str) -> Result<Usage> {
    // minflt, utime and stime (proc(5)).
    let field = |n: usize| -> Result<f64> {
        let f = comsat_tests::stat_field(text, n).context("short or malformed stat")?;
        Ok(f.parse::<u64>()? as f64)
    };
    Ok(Usage {
        cpu: (field(14)? + field(15)?) / 100.0,
        faults: field(10)?,
    })
}

/// CPU time of every thread of process `pid` so far, in nanoseconds
/// (the first field of each /proc/PID/task/TID/schedstat: time run, to the
/// nanosecond, where `stat`'s utime and stime count 10 ms ticks). A thread
/// that ends while it is read is left out; a kernel without schedstat
/// (`CONFIG_SCHED_INFO`) is an error, not zero.
pub(crate) fn cpu_ns(pid: u32) -> Result<u64> {
    let tasks = format!("/proc/{pid}/task");
    let (mut ns, mut read) = (0, 0);
    for task in std::fs::read_dir(&tasks).with_context(|| tasks.clone())? {
        let path = task?.path().join("schedstat");
        if let Ok(text) = std::fs::read_to_string(&path) {
            ns += parse_schedstat(&text).with_context(|| path.display().to_string())?;
            read += 1;
        }
    }
    if read == 0 {
        bail!("no schedstat under {tasks} (a kernel without CONFIG_SCHED_INFO?)");
    }
    Ok(ns)
}

fn parse_schedstat(text: &str) -> Result<u64> {
    // time run, time waited (ns), timeslices (sched-stats.rst).
    let run = text.split_whitespace().next().context("empty schedstat")?;
    Ok(run.parse()?)
}

/// [`cpu_ns`] of `pids`, summed.
pub(crate) fn cpu_ns_of(pids: &[u32]) -> Result<u64> {
    pids.iter().map(|p| cpu_ns(*p)).sum()
}

/// The [`Usage`] of each of `pids` while `work` runs.
pub(crate) async fn usage_during<T>(
    pids: &[u32],
    work: impl Future<Output = Result<T>>,
) -> Result<(T, Vec<Usage>)> {
    let before: Vec<Usage> = pids.iter().map(|p| usage(*p)).collect::<Result<_>>()?;
    let out = work.await?;
    let after: Vec<Usage> = pids.iter().map(|p| usage(*p)).collect::<Result<_>>()?;
    Ok((
        out,
        after.iter().zip(&before).map(|(a, b)| *a - *b).collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        // pid (comm with ") spaces") state ppid pgrp session tty tpgid flags
        // minflt cminflt majflt cmajflt utime stime ...
        let line = "42 (a) b (c) S 1 42 42 0 -1 4194560 1234 0 7 0 250 50 0 0 20 0 3";
        let u = parse_stat(line).expect("parse");
        assert_eq!(u.faults, 1234.0);
        assert!((u.cpu - 3.0).abs() < 1e-9, "{}", u.cpu);
        assert!(parse_stat("42 (x) S 1 2").is_err());
    }

    #[test]
    fn schedstat_gives_the_time_run() {
        assert_eq!(
            parse_schedstat("123456789 2000 31\n").expect("parse"),
            123_456_789
        );
        assert!(parse_schedstat("").is_err());
        assert!(parse_schedstat("x 1 2").is_err());
        // This process has run.
        assert!(cpu_ns(std::process::id()).expect("own schedstat") > 0);
    }

    #[test]
    fn a_line_fits_itself() {
        let (slope, r2) = fit(&[(10.0, 100.0), (20.0, 150.0), (40.0, 250.0)]);
        assert!((slope - 5.0).abs() < 1e-9);
        assert!((r2 - 1.0).abs() < 1e-9);
        let (_, r2) = fit(&[(10.0, 100.0), (20.0, 300.0), (40.0, 120.0)]);
        assert!(r2 < 0.5, "{r2}");
    }

    #[test]
    fn jain_is_one_when_fair_and_one_over_n_when_one_flow_takes_all() {
        assert!((jain(&[5.0, 5.0, 5.0, 5.0]) - 1.0).abs() < 1e-9);
        assert!((jain(&[8.0, 0.0, 0.0, 0.0]) - 0.25).abs() < 1e-9);
    }

    #[test]
    fn percentiles_pick_from_sorted_samples() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 51.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert!(percentile(&[], 0.5).is_nan());
    }
}
