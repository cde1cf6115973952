//! Many agents at once, played by this process: each connection is a real
//! QUIC connection to the relay with its own node identity, TLS verified
//! against the relay's CA, and the agent's `Hello` signed with the node's
//! key; it counts as up when the relay answers `Welcome`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use comsat_agent::config::RelayEndpoint;
use comsat_protocol::msg::{ControlMessage, FrameDecoder, RelayToAgent, make_hello};
use comsat_protocol::{HELLO_EXPORTER_LABEL, HELLO_EXPORTER_LEN, NodeId, SigningKey};

/// Client sockets the connections share, each on its own loopback
/// address (a real fleet has one per agent; the relay serves each
/// connection alike either way).
pub(crate) const SOCKETS: usize = 16;

/// One connected agent: the connection and its control stream (dropping
/// the stream would end the agent's session).
pub(crate) struct Connected {
    pub(crate) conn: quinn::Connection,
    _control: (quinn::SendStream, quinn::RecvStream),
}

/// The QUIC client configuration of an agent of the relay at `relay`,
/// whose certificate `ca` signed (made as an agent's config names it).
pub(crate) fn client_config(relay: SocketAddr, ca: &Path) -> Result<quinn::ClientConfig> {
    let endpoint: RelayEndpoint = serde_json::from_value(serde_json::json!({
        "addr": relay.to_string(),
        "server_name": "localhost",
        "ca_file": ca,
    }))?;
    comsat_agent::tls::client_config(&endpoint, comsat_agent::defaults::KEEP_ALIVE_INTERVAL)
        .map_err(anyhow::Error::msg)
}

pub(crate) struct Fleet {
    endpoints: Vec<quinn::Endpoint>,
    client: quinn::ClientConfig,
    relay: SocketAddr,
    nodes: Arc<Vec<(NodeId, SigningKey)>>,
}

impl Fleet {
    pub(crate) fn new(
        relay: SocketAddr,
        ca: &Path,
        nodes: Vec<(NodeId, SigningKey)>,
    ) -> Result<Self> {
        let client = client_config(relay, ca)?;
        // Each socket on an address of its own (127.0.5.1 and up), as a
        // fleet comes from many: a relay's caps per source apply to them as
        // to a real fleet's.
        let endpoints = (1..=SOCKETS)
            .map(|i| {
                let ip = std::net::Ipv4Addr::new(127, 0, 5, u8::try_from(i).unwrap_or(1));
                quinn::Endpoint::client(SocketAddr::from((ip, 0)))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            endpoints,
            client,
            relay,
            nodes: Arc::new(nodes),
        })
    }

    /// Connects node `i` and waits for `Welcome`: the connection (keep it
    /// to keep the agent connected) and the time it took.
    pub(crate) async fn connect(&self, i: usize) -> Result<(Connected, Duration)> {
        let (node_id, key) = &self.nodes[i % self.nodes.len()];
        let endpoint = &self.endpoints[i % self.endpoints.len()];
        let start = Instant::now();
        let conn = endpoint
            .connect_with(self.client.clone(), self.relay, "localhost")?
            .await
            .context("QUIC handshake")?;
        let (mut send, mut recv) = conn.open_bi().await?;
        let mut exporter = [0u8; HELLO_EXPORTER_LEN];
        conn.export_keying_material(&mut exporter, HELLO_EXPORTER_LABEL, b"")
            .map_err(|_| anyhow::anyhow!("TLS exporter unavailable"))?;
        let mut buf = Vec::new();
        make_hello(*node_id, key, &exporter).write_to(&mut buf)?;
        send.write_all(&buf).await?;
        let mut decoder = FrameDecoder::new();
        let mut chunk = [0u8; 512];
        loop {
            if let Some(msg) = decoder.next_message::<RelayToAgent>()? {
                if msg != RelayToAgent::Welcome {
                    bail!("the relay answered {msg:?} instead of Welcome");
                }
                let elapsed = start.elapsed();
                let connected = Connected {
                    conn,
                    _control: (send, recv),
                };
                return Ok((connected, elapsed));
            }
            match recv.read(&mut chunk).await? {
                Some(n) => decoder.extend(&chunk[..n]),
                None => bail!("the relay closed the control stream"),
            }
        }
    }

    /// Connects nodes `range`, `concurrency` at a time: every connection
    /// (held open) and each one's time to `Welcome` in milliseconds, sorted.
    /// A stranger's flood: `n` connections that never send a `Hello`,
    /// each trying to open `streams` streams and write `bytes` on each,
    /// until `until`. Returns how many connections the relay let in and
    /// how many bytes it took in all (what flow control let through).
    pub(crate) async fn flood_without_hello(
        &self,
        n: usize,
        streams: usize,
        bytes: usize,
        until: Instant,
    ) -> (usize, u64) {
        let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut tasks = Vec::new();
        for i in 0..n {
            let endpoint = self.endpoints[i % self.endpoints.len()].clone();
            let (client, relay, written) = (self.client.clone(), self.relay, written.clone());
            tasks.push(tokio::spawn(async move {
                let connecting = endpoint.connect_with(client, relay, "localhost").ok()?;
                let conn = tokio::time::timeout_at(until.into(), connecting)
                    .await
                    .ok()?
                    .ok()?;
                let mut writers = Vec::new();
                for _ in 0..streams {
                    let (conn, written) = (conn.clone(), written.clone());
                    writers.push(tokio::spawn(async move {
                        let payload = vec![0x5a; 64 * 1024];
                        let write = async {
                            let (mut send, _recv) = conn.open_bi().await.ok()?;
                            let mut left = bytes;
                            while left > 0 {
                                let n =
                                    send.write(&payload[..left.min(payload.len())]).await.ok()?;
                                written.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                                left -= n;
                            }
                            Some(())
                        };
                        let _ = tokio::time::timeout_at(until.into(), write).await;
                    }));
                }
                for w in writers {
                    let _ = w.await;
                }
                Some(conn)
            }));
        }
        let mut admitted = Vec::new();
        for t in tasks {
            if let Ok(Some(conn)) = t.await {
                admitted.push(conn);
            }
        }
        (
            admitted.len(),
            written.load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    pub(crate) async fn connect_many(
        self: &Arc<Self>,
        range: std::ops::Range<usize>,
        concurrency: usize,
    ) -> Result<(Vec<Connected>, Vec<f64>)> {
        let n = range.end;
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(range.start));
        let mut workers = Vec::new();
        for _ in 0..concurrency {
            let (fleet, next) = (self.clone(), next.clone());
            workers.push(tokio::spawn(async move {
                let mut out = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= n {
                        return anyhow::Ok(out);
                    }
                    let done = tokio::time::timeout(Duration::from_secs(30), fleet.connect(i))
                        .await
                        .context("no Welcome within 30 s")??;
                    out.push(done);
                }
            }));
        }
        let (mut conns, mut times) = (Vec::new(), Vec::new());
        for w in workers {
            for (c, t) in w.await?? {
                conns.push(c);
                times.push(t.as_secs_f64() * 1e3);
            }
        }
        times.sort_by(f64::total_cmp);
        Ok((conns, times))
    }
}
