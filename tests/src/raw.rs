//! A raw protocol client, for tests that must send what a real agent never
//! would: unknown keys, replayed `Hello`s.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use comsat_protocol::msg::{AgentToRelay, ControlMessage, FrameDecoder, RelayToAgent};
use comsat_protocol::{ALPN, HELLO_EXPORTER_LABEL, HELLO_EXPORTER_LEN};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// What the relay did with a `Hello`.
#[derive(Debug, PartialEq, Eq)]
pub enum HelloOutcome {
    /// It answered `Welcome`.
    Welcome,
    /// It closed the connection with this application error code.
    Closed(u64),
    /// Anything else.
    Other(String),
}

/// A QUIC client that trusts one CA.
pub struct RawClient {
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
}

impl RawClient {
    /// A client trusting the PEM CA at `ca_pem`.
    pub fn new(ca_pem: &Path) -> Result<Self> {
        Self::from_source(ca_pem, std::net::Ipv4Addr::LOCALHOST.into())
    }

    /// A client trusting the PEM CA at `ca_pem` whose connections come
    /// from the loopback address `source`.
    pub fn from_source(ca_pem: &Path, source: std::net::IpAddr) -> Result<Self> {
        let bytes = std::fs::read(ca_pem)?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&bytes) {
            roots.add(cert?)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
        let config = quinn::ClientConfig::new(Arc::new(crypto));
        let endpoint = quinn::Endpoint::client(SocketAddr::new(source, 0))?;
        Ok(Self { endpoint, config })
    }

    /// Connects to the relay at `addr` (certificate name `localhost`).
    pub async fn connect(&self, addr: SocketAddr) -> Result<quinn::Connection> {
        self.connect_to(addr, "localhost").await
    }

    /// Connects to the relay at `addr` whose certificate names `name`.
    pub async fn connect_to(&self, addr: SocketAddr, name: &str) -> Result<quinn::Connection> {
        Ok(self
            .endpoint
            .connect_with(self.config.clone(), addr, name)?
            .await?)
    }
}

/// The `Hello` channel-binding value of `conn`.
pub fn exporter(conn: &quinn::Connection) -> Result<[u8; HELLO_EXPORTER_LEN]> {
    let mut out = [0u8; HELLO_EXPORTER_LEN];
    conn.export_keying_material(&mut out, HELLO_EXPORTER_LABEL, b"")
        .map_err(|_| anyhow::anyhow!("exporter failed"))?;
    Ok(out)
}

/// Sends `hello` on a new control stream and reports what the relay did.
pub async fn send_hello(conn: &quinn::Connection, hello: &AgentToRelay) -> Result<HelloOutcome> {
    let (mut send, mut recv) = conn.open_bi().await?;
    let mut buf = Vec::new();
    hello.write_to(&mut buf)?;
    send.write_all(&buf).await?;
    let mut decoder = FrameDecoder::new();
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(msg) = decoder.next_message::<RelayToAgent>()? {
            return Ok(if msg == RelayToAgent::Welcome {
                HelloOutcome::Welcome
            } else {
                HelloOutcome::Other(format!("{msg:?}"))
            });
        }
        match recv.read(&mut chunk).await {
            Ok(Some(n)) => decoder.extend(&chunk[..n]),
            Ok(None) => return Ok(HelloOutcome::Other("stream ended".into())),
            Err(_) => break,
        }
    }
    let reason = conn.closed().await;
    Ok(match reason {
        quinn::ConnectionError::ApplicationClosed(close) => {
            HelloOutcome::Closed(close.error_code.into_inner())
        }
        other => HelloOutcome::Other(other.to_string()),
    })
}

/// An authenticated control stream, to send messages a real agent would
/// not (or not in that order) and read what the relay answers.
pub struct Control {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
}

impl Control {
    /// Sends `hello` on a new control stream; fails unless welcomed.
    pub async fn open(conn: &quinn::Connection, hello: &AgentToRelay) -> Result<Self> {
        let (send, recv) = conn.open_bi().await?;
        let mut control = Self {
            send,
            recv,
            decoder: FrameDecoder::new(),
        };
        control.send(hello).await?;
        match control.next().await? {
            RelayToAgent::Welcome => Ok(control),
            other => anyhow::bail!("expected Welcome, got {other:?}"),
        }
    }

    /// Sends one message.
    pub async fn send(&mut self, msg: &AgentToRelay) -> Result<()> {
        let mut buf = Vec::new();
        msg.write_to(&mut buf)?;
        self.send.write_all(&buf).await?;
        Ok(())
    }

    /// The next message, within 10 s.
    pub async fn next(&mut self) -> Result<RelayToAgent> {
        let mut chunk = [0u8; 1024];
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            loop {
                if let Some(msg) = self.decoder.next_message::<RelayToAgent>()? {
                    return Ok(msg);
                }
                match self.recv.read(&mut chunk).await? {
                    Some(n) => self.decoder.extend(&chunk[..n]),
                    None => anyhow::bail!("control stream ended"),
                }
            }
        })
        .await?
    }
}
