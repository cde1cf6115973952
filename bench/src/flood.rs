//! A stranger's flood of a relay, from this process, bounded in count and
//! stopped by [`Flood::stop`]:
//!
//! - [`CONNECTIONS`] QUIC connections that never send a `Hello`, from the
//!   attacker's own address (127.0.1.1), each opened again as the relay
//!   closes it (after a 100 ms pause);
//! - [`INITIALS_PER_SEC`] QUIC Initials a second (valid ones, each a new
//!   connection's first packet) from 200 addresses that never answer
//!   (127.0.0.2 to 127.0.0.201): spoofed sources as far as the relay can
//!   tell. They are made before the flood starts (a pool used in turn).

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Unauthenticated connections the flood keeps trying to hold.
pub(crate) const CONNECTIONS: usize = 1_000;

/// Initials sent a second from spoofed sources.
pub(crate) const INITIALS_PER_SEC: u64 = 10_000;

/// The attacker's own address, where its connections come from.
const ATTACKER: Ipv4Addr = Ipv4Addr::new(127, 0, 1, 1);

/// Spoofed source addresses of the Initials: 127.0.0.2 and up.
const SPOOFED_SOURCES: u8 = 200;

/// A running flood.
pub(crate) struct Flood {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    /// Connections the relay let through the QUIC handshake.
    opened: Arc<AtomicU64>,
    /// Connection attempts that failed (refused, or no handshake in 5 s).
    failed: Arc<AtomicU64>,
    initials: Arc<AtomicU64>,
}

impl Flood {
    /// Starts flooding the relay at `relay`, whose certificate `ca`
    /// signed (the strangers complete TLS: it is public).
    pub(crate) async fn start(relay: SocketAddr, ca: &Path, quick: bool) -> Result<Self> {
        let client = crate::fleet::client_config(relay, ca)?;
        let pool = if quick { 5_000 } else { 20_000 };
        let initials = tokio::task::spawn_blocking({
            let client = client.clone();
            move || initials(pool, relay, &client)
        })
        .await??;
        let (stop, stopped) = watch::channel(false);
        let mut flood = Self {
            stop,
            tasks: Vec::new(),
            opened: Arc::default(),
            failed: Arc::default(),
            initials: Arc::default(),
        };
        let endpoint = quinn::Endpoint::client(SocketAddr::from((ATTACKER, 0)))
            .context("the attacker's endpoint")?;
        for _ in 0..CONNECTIONS {
            flood.tasks.push(tokio::spawn(hold(
                endpoint.clone(),
                client.clone(),
                relay,
                (flood.opened.clone(), flood.failed.clone()),
                stopped.clone(),
            )));
        }
        let sent = flood.initials.clone();
        flood.tasks.push(tokio::spawn(async move {
            let spoof =
                tokio::task::spawn_blocking(move || spray(&initials, relay, &sent, &stopped));
            if let Ok(Err(e)) = spoof.await {
                eprintln!("flood: spoofed Initials stopped: {e:#}");
            }
        }));
        Ok(flood)
    }

    /// Stops the flood; what it did, in words.
    pub(crate) async fn stop(self) -> String {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        format!(
            "The flood: {CONNECTIONS} connections without a Hello kept open from \
             {ATTACKER} ({} let through the QUIC handshake, {} refused or \
             unanswered), and {} spoofed Initials from {SPOOFED_SOURCES} addresses \
             ({INITIALS_PER_SEC}/s asked).",
            self.opened.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            self.initials.load(Ordering::Relaxed),
        )
    }
}

/// One held connection: opened, a byte written on one stream (never a
/// whole `Hello`), held until the relay closes it, opened again.
async fn hold(
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    relay: SocketAddr,
    (opened, failed): (Arc<AtomicU64>, Arc<AtomicU64>),
    mut stopped: watch::Receiver<bool>,
) {
    while !*stopped.borrow() {
        let attempt = async {
            let conn = tokio::time::timeout(
                Duration::from_secs(5),
                endpoint
                    .connect_with(client.clone(), relay, "localhost")
                    .ok()?,
            )
            .await
            .ok()?
            .ok()?;
            opened.fetch_add(1, Ordering::Relaxed);
            if let Ok((mut send, _recv)) = conn.open_bi().await {
                let _ = send.write_all(&[0]).await;
            }
            conn.closed().await;
            Some(())
        };
        tokio::select! {
            held = attempt => if held.is_none() {
                failed.fetch_add(1, Ordering::Relaxed);
            },
            _ = stopped.changed() => return,
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = stopped.changed() => return,
        }
    }
}

/// `n` first packets of new connections to `relay`, each its own.
fn initials(n: usize, relay: SocketAddr, client: &quinn::ClientConfig) -> Result<Vec<Vec<u8>>> {
    let now = std::time::Instant::now();
    let mut out = Vec::with_capacity(n);
    let mut buf = Vec::with_capacity(1500);
    // A new endpoint now and then: each keeps every connection it made.
    for chunk in 0..n.div_ceil(1000) {
        let mut endpoint = quinn_proto::Endpoint::new(
            Arc::new(quinn_proto::EndpointConfig::default()),
            None,
            false,
            None,
        );
        for _ in 0..(n - chunk * 1000).min(1000) {
            let (_, mut conn) = endpoint.connect(now, client.clone(), relay, "localhost")?;
            buf.clear();
            let t = conn
                .poll_transmit(now, 1, &mut buf)
                .context("a new connection sent no Initial")?;
            out.push(buf[..t.size].to_vec());
        }
    }
    Ok(out)
}

/// Sends `initials` in turn from the spoofed sources, at
/// [`INITIALS_PER_SEC`], until stopped.
fn spray(
    initials: &[Vec<u8>],
    relay: SocketAddr,
    sent: &AtomicU64,
    stopped: &watch::Receiver<bool>,
) -> Result<()> {
    let sockets = (2..2 + SPOOFED_SOURCES)
        .map(|i| UdpSocket::bind((Ipv4Addr::new(127, 0, 0, i), 0)))
        .collect::<std::io::Result<Vec<_>>>()
        .context("binding the spoofed sources")?;
    // In batches every 10 ms.
    let batch = INITIALS_PER_SEC / 100;
    let tick = Duration::from_millis(10);
    let started = std::time::Instant::now();
    let mut n: u64 = 0;
    while !*stopped.borrow() {
        for _ in 0..batch {
            let i = usize::try_from(n).unwrap_or(0);
            // A full socket buffer drops the packet, as a network would.
            let _ = sockets[i % sockets.len()].send_to(&initials[i % initials.len()], relay);
            n += 1;
        }
        sent.store(n, Ordering::Relaxed);
        let due = started + tick * u32::try_from(n / batch).unwrap_or(u32::MAX);
        std::thread::sleep(due.saturating_duration_since(std::time::Instant::now()));
    }
    Ok(())
}
