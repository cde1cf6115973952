//! The bare quinn baseline: one QUIC stream per flow, client and server in
//! this process, TLS 1.3 with the same crypto provider and MTU as comsat.
//! It shows what QUIC itself costs on this machine, one hop, no relay.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::measure::{self, Pinger};

/// A server that answers each stream: reads a length and that many bytes,
/// then writes one byte (throughput), or echoes (latency, length 0).
pub(crate) struct Server {
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
}

impl Server {
    pub(crate) fn start() -> Result<Self> {
        let key = rcgen::KeyPair::generate()?;
        let cert =
            rcgen::CertificateParams::new(vec!["localhost".to_owned()])?.self_signed(&key)?;
        let cert_der: CertificateDer<'static> = cert.der().clone();
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(vec![cert_der.clone()], key_der)?;
        server_tls.alpn_protocols = vec![b"bench".to_vec()];
        let server = quinn::ServerConfig::with_crypto(Arc::new(
            quinn::crypto::rustls::QuicServerConfig::try_from(server_tls)?,
        ));
        let endpoint = endpoint(Some(server))?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert_der)?;
        let mut client_tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_no_client_auth();
        client_tls.alpn_protocols = vec![b"bench".to_vec()];
        let client = quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(client_tls)?,
        ));
        let accept = endpoint.clone();
        tokio::spawn(async move {
            while let Some(incoming) = accept.accept().await {
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                        tokio::spawn(async move {
                            let mut len = [0u8; 8];
                            if recv.read_exact(&mut len).await.is_err() {
                                return;
                            }
                            let mut left = u64::from_be_bytes(len);
                            if left == 0 {
                                // Echo until the client finishes.
                                let mut buf = [0u8; 64];
                                while recv.read_exact(&mut buf).await.is_ok() {
                                    if send.write_all(&buf).await.is_err() {
                                        return;
                                    }
                                }
                                return;
                            }
                            while left > 0 {
                                match recv.read_chunk(usize::MAX, true).await {
                                    Ok(Some(c)) => left = left.saturating_sub(c.bytes.len() as u64),
                                    _ => return,
                                }
                            }
                            let _ = send.write_all(&[1]).await;
                            let _ = send.finish();
                            let _ = send.stopped().await;
                        });
                    }
                });
            }
        });
        Ok(Self { endpoint, client })
    }

    async fn connect(&self) -> Result<quinn::Connection> {
        self.connect_from(&endpoint(None)?).await
    }

    async fn connect_from(&self, client: &quinn::Endpoint) -> Result<quinn::Connection> {
        let addr: SocketAddr = self.endpoint.local_addr()?;
        Ok(client
            .connect_with(self.client.clone(), addr, "localhost")?
            .await?)
    }

    /// `n` handshakes, `concurrency` at a time, from as many client
    /// sockets as the fleet of agents uses: each one's time in
    /// milliseconds, sorted.
    pub(crate) async fn handshakes(
        self: &Arc<Self>,
        n: usize,
        concurrency: usize,
    ) -> Result<Vec<f64>> {
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let clients: Vec<quinn::Endpoint> = (0..crate::fleet::SOCKETS)
            .map(|_| endpoint(None))
            .collect::<Result<_>>()?;
        let mut workers = Vec::new();
        for _ in 0..concurrency {
            let (server, next, clients) = (self.clone(), next.clone(), clients.clone());
            workers.push(tokio::spawn(async move {
                let mut times = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let start = Instant::now();
                    let conn = server.connect_from(&clients[i % clients.len()]).await?;
                    times.push(start.elapsed().as_secs_f64() * 1e3);
                    conn.close(0u32.into(), b"done");
                }
                anyhow::Ok(times)
            }));
        }
        let mut times = Vec::new();
        for w in workers {
            times.extend(w.await??);
        }
        times.sort_by(f64::total_cmp);
        Ok(times)
    }

    /// Per-flow throughputs in MiB/s, one connection, `flows` streams.
    pub(crate) async fn throughput(&self, flows: usize, per_flow: u64) -> Result<Vec<f64>> {
        let conn = self.connect().await?;
        let mut tasks = Vec::new();
        for _ in 0..flows {
            let conn = conn.clone();
            tasks.push(tokio::spawn(async move {
                let (mut send, mut recv) = conn.open_bi().await?;
                measure::upload(&mut send, &mut recv, &bytes_of(256 * 1024), per_flow).await
            }));
        }
        let rates = measure::flow_rates(tasks).await;
        conn.close(0u32.into(), b"done");
        rates
    }

    /// A ping-pong stream through the echo, warmed up.
    pub(crate) async fn pinger(&self) -> Result<Pinger> {
        let conn = self.connect().await?;
        let (mut send, recv) = conn.open_bi().await?;
        send.write_all(&0u64.to_be_bytes()).await?;
        Pinger::Quic {
            _conn: conn,
            send,
            recv,
        }
        .warmed()
        .await
    }
}

/// An endpoint on a loopback socket with the relay's socket buffers.
fn endpoint(server: Option<quinn::ServerConfig>) -> Result<quinn::Endpoint> {
    let socket = comsat_relay::udp::bind("127.0.0.1:0".parse()?)?;
    let runtime = quinn::default_runtime().context("no async runtime")?;
    Ok(quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        server,
        socket,
        runtime,
    )?)
}

fn bytes_of(n: usize) -> Vec<u8> {
    vec![0x5a; n]
}
