//! The controller under siege: a real `comsat controller run` process,
//! strangers holding connections open with slow request heads
//! (slowloris) and trickling large unauthenticated POSTs, while an
//! operator runs `comsat ctl status` once a second.
//!
//! - [`SLOW`] connections from 8 addresses (127.0.2.1 to 127.0.2.8): each
//!   completes TLS, then sends a request head one byte every 20 s, and is
//!   opened again 1 s after the controller closes it;
//! - [`POSTS`] POSTs of a 4 MiB body to `/v1/links` without credentials,
//!   from 127.0.3.1, each writing its body 4 KiB every 100 ms until the
//!   controller answers (401, or 429 once the address has failed
//!   authentication too often).
//!
//! Bounded: the siege stops by itself after its duration.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use comsat_tests::proc::{self, Proc};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::measure::{median, rss_kib};
use crate::report::figure;
use crate::{FLOOR, Run};

/// Slowloris connections held.
const SLOW: usize = 2_000;
/// Trickled unauthenticated POSTs.
const POSTS: usize = 200;
/// The body each POST announces.
const POST_BODY: usize = 4 << 20;

/// A controller process and what talking to it takes.
struct Controller {
    dir: tempfile::TempDir,
    addr: SocketAddr,
    tls: TlsConnector,
}

impl Controller {
    fn start(bin: &str) -> Result<(Self, Proc)> {
        let dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let data = dir.path().join("controller");
        let data_s = data.display().to_string();
        let url = format!("https://127.0.0.1:{port}");
        let out = std::process::Command::new(bin)
            .args([
                "controller",
                "init",
                "--data-dir",
                &data_s,
                "--public-url",
                &url,
            ])
            .output()?;
        if !out.status.success() {
            bail!("controller init: {}", String::from_utf8_lossy(&out.stderr));
        }
        let mut proc = Proc::spawn(
            bin,
            "controller",
            &["controller", "run", "--data-dir", &data_s],
            dir.path(),
        )?;
        proc.wait_line("comsat controller listening", proc::START_TIMEOUT)?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(data.join("ca.pem"))? {
            roots.add(cert?)?;
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let c = Self {
            dir,
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            tls: TlsConnector::from(Arc::new(tls)),
        };
        Ok((c, proc))
    }

    /// A TLS connection from `source`.
    async fn connect(&self, source: Ipv4Addr) -> std::io::Result<TlsStream<TcpStream>> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::from((source, 0)))?;
        let tcp = socket.connect(self.addr).await?;
        let name = ServerName::IpAddress(Ipv4Addr::LOCALHOST.into());
        self.tls.connect(name, tcp).await
    }

    /// Seconds `comsat ctl status` took, answering as it should.
    async fn status(&self, bin: &str) -> Result<f64> {
        let context = self.dir.path().join("controller/context.toml");
        let started = Instant::now();
        let out = tokio::process::Command::new(bin)
            .args(["ctl", "--context", &context.display().to_string(), "status"])
            .output()
            .await?;
        let took = started.elapsed().as_secs_f64();
        if !out.status.success() {
            bail!("ctl status: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(took)
    }
}

/// What the strangers saw.
#[derive(Default)]
struct Seen {
    /// Slow connections the controller let through TLS.
    slow_opened: AtomicU64,
    /// Slow connections refused at once (the connection caps).
    slow_refused: AtomicU64,
    /// The longest a slow connection stayed open, milliseconds.
    slow_longest_ms: AtomicU64,
    /// POSTs answered 401 (no credentials).
    posts_401: AtomicU64,
    /// POSTs answered 429 (the source failed authentication too often).
    posts_429: AtomicU64,
    /// POSTs answered otherwise, or not at all.
    posts_other: AtomicU64,
    /// The most body bytes a POST had written when its answer came.
    posts_most_written: AtomicU64,
    /// What the first POSTs answered otherwise saw.
    posts_why: std::sync::Mutex<Vec<String>>,
}

impl Seen {
    fn post_failed(&self, why: String) {
        self.posts_other.fetch_add(1, Ordering::Relaxed);
        let mut w = self
            .posts_why
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if w.len() < 3 {
            w.push(why);
        }
    }
}

/// One slowloris connection, again and again until `until`.
async fn slowloris(c: Arc<Controller>, source: Ipv4Addr, seen: Arc<Seen>, until: Instant) {
    let head = b"GET /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ";
    while Instant::now() < until {
        let Ok(Ok(mut conn)) =
            tokio::time::timeout(Duration::from_secs(10), c.connect(source)).await
        else {
            seen.slow_refused.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        seen.slow_opened.fetch_add(1, Ordering::Relaxed);
        let opened = Instant::now();
        let mut buf = [0u8; 256];
        let mut i = 0;
        let closed = loop {
            let byte = [head[i % head.len()]];
            if conn.write_all(&byte).await.is_err() || conn.flush().await.is_err() {
                break true;
            }
            i += 1;
            let next = (Instant::now() + Duration::from_secs(20)).min(until);
            // Anything the server sends (an error page) or its close ends
            // the wait; the siege's end too.
            match tokio::time::timeout_at(next.into(), conn.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => break true,
                Ok(Ok(_)) => continue,
                Err(_) if Instant::now() >= until => break false,
                Err(_) => {}
            }
        };
        if closed {
            let ms = opened.elapsed().as_millis() as u64;
            seen.slow_longest_ms.fetch_max(ms, Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// One trickled POST without credentials: the answer, and how much of the
/// body was written by then.
async fn trickled_post(c: Arc<Controller>, seen: Arc<Seen>, until: Instant) {
    let source = Ipv4Addr::new(127, 0, 3, 1);
    let conn = match tokio::time::timeout(Duration::from_secs(10), c.connect(source)).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => return seen.post_failed(format!("connect: {e}")),
        Err(_) => return seen.post_failed("connect: no answer in 10 s".into()),
    };
    let (mut rd, mut wr) = tokio::io::split(conn);
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let written = written.clone();
        tokio::spawn(async move {
            let head = format!(
                "POST /v1/links HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {POST_BODY}\r\n\r\n"
            );
            wr.write_all(head.as_bytes()).await?;
            let chunk = [b' '; 4096];
            while (written.load(Ordering::Relaxed) as usize) < POST_BODY {
                wr.write_all(&chunk).await?;
                wr.flush().await?;
                written.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            std::io::Result::Ok(())
        })
    };
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    let got = tokio::time::timeout_at(until.into(), async {
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let at = written.load(Ordering::Relaxed);
    writer.abort();
    let refused = if answer.starts_with(b"HTTP/1.1 401") {
        Some(&seen.posts_401)
    } else if answer.starts_with(b"HTTP/1.1 429") {
        Some(&seen.posts_429)
    } else {
        None
    };
    if let (Ok(()), Some(count)) = (got, refused) {
        count.fetch_add(1, Ordering::Relaxed);
        seen.posts_most_written.fetch_max(at, Ordering::Relaxed);
    } else {
        seen.post_failed(format!(
            "answered {:?} after {at} body bytes",
            String::from_utf8_lossy(&answer[..answer.len().min(40)])
        ));
    }
}

/// The scenario.
pub(crate) async fn siege(r: &mut Run) -> Result<()> {
    let seconds = if r.quick { 30 } else { 60 };
    eprintln!(
        "siege: {SLOW} slowloris connections and {POSTS} trickled POSTs against a controller, {seconds} s"
    );
    let (c, proc) = Controller::start(&r.bin)?;
    let c = Arc::new(c);
    let pid = proc.pid();
    // Warm: the first status is not under siege.
    let quiet = c.status(&r.bin).await.context("before the siege")?;
    let before = rss_kib(pid)?;
    let until = Instant::now() + Duration::from_secs(seconds);
    let seen = Arc::new(Seen::default());
    let mut tasks = Vec::new();
    for i in 0..SLOW {
        let source = Ipv4Addr::new(127, 0, 2, 1 + (i % 8) as u8);
        tasks.push(tokio::spawn(slowloris(
            c.clone(),
            source,
            seen.clone(),
            until,
        )));
    }
    for _ in 0..POSTS {
        tasks.push(tokio::spawn(trickled_post(c.clone(), seen.clone(), until)));
    }
    let mut peak = before;
    let mut status = Vec::new();
    let mut failed = Vec::new();
    while Instant::now() < until {
        let tick = Instant::now() + Duration::from_secs(1);
        match c.status(&r.bin).await {
            Ok(s) => status.push(s),
            Err(e) => failed.push(format!("{e:#}")),
        }
        peak = peak.max(rss_kib(pid)?);
        tokio::time::sleep_until(tick.into()).await;
    }
    for t in tasks {
        let _ = t.await;
    }
    drop(proc);
    report(r, &seen, &status, quiet, peak - before, &failed);
    if !failed.is_empty() {
        bail!("{} ctl status calls failed under the siege", failed.len());
    }
    Ok(())
}

/// The siege's figures and notes: `status` the seconds of each `ctl
/// status` under it, `quiet` before it, `grew` the controller's RSS growth
/// (KiB).
fn report(r: &mut Run, seen: &Seen, status: &[f64], quiet: f64, grew: f64, failed: &[String]) {
    let worst = status.iter().copied().fold(0.0, f64::max);
    r.figures.push(figure(
        "siege",
        "controller: the slowest `ctl status` under the siege (floor 1 s)",
        "s",
        worst,
        FLOOR,
        1.0,
        status.len(),
    ));
    r.figures.push(figure(
        "siege",
        "controller: `ctl status` under the siege, median",
        "s",
        median(status.to_vec()),
        "quiet, before the siege",
        quiet,
        status.len(),
    ));
    let longest = seen.slow_longest_ms.load(Ordering::Relaxed) as f64 / 1e3;
    r.figures.push(figure(
        "siege",
        "controller: the longest a slowloris connection stayed open (floor 30 s)",
        "s",
        longest,
        FLOOR,
        30.0,
        seen.slow_opened.load(Ordering::Relaxed) as usize,
    ));
    r.figures.push(figure(
        "siege",
        "controller: RSS growth under the siege (floor 64 MiB)",
        "MiB",
        grew / 1024.0,
        FLOOR,
        64.0,
        1,
    ));
    r.figures.push(figure(
        "siege",
        "controller: unauthenticated 4 MiB POSTs refused before their bodies (401 or 429)",
        "",
        (seen.posts_401.load(Ordering::Relaxed) + seen.posts_429.load(Ordering::Relaxed)) as f64,
        "POSTs sent",
        POSTS as f64,
        POSTS,
    ));
    let most = seen.posts_most_written.load(Ordering::Relaxed);
    r.figures.push(figure(
        "siege",
        "controller: the most of a 4 MiB unauthenticated body written before its refusal (401 or 429)",
        "KiB",
        most as f64 / 1024.0,
        "the body",
        (POST_BODY / 1024) as f64,
        POSTS,
    ));
    r.notes.push(format!(
        "siege: {} ctl status answers ({} failed{}); slowloris: {} connections through TLS, {} \
         refused or not answered; POSTs: {} answered 401, {} answered 429 (their address failed \
         authentication too often), {} otherwise or not at all.",
        status.len(),
        failed.len(),
        failed
            .first()
            .map(|e| format!(", the first: {e}"))
            .unwrap_or_default(),
        seen.slow_opened.load(Ordering::Relaxed),
        seen.slow_refused.load(Ordering::Relaxed),
        seen.posts_401.load(Ordering::Relaxed),
        seen.posts_429.load(Ordering::Relaxed),
        seen.posts_other.load(Ordering::Relaxed),
    ));
    let why = seen
        .posts_why
        .lock()
        .map(|w| w.join("; "))
        .unwrap_or_default();
    if !why.is_empty() {
        r.notes.push(format!(
            "siege: what POSTs not answered 401 saw first: {why}"
        ));
    }
}
