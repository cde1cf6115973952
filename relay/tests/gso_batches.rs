//! The vendored quinn (vendor/quinn/COMSAT.md) sends a bulk stream in GSO
//! batches larger than upstream's 10 datagrams per `sendmsg`, and never
//! more than one UDP send can carry. A socket wrapper counts what each
//! `sendmsg` of a real QUIC connection on loopback carries.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Upstream quinn 0.11.12's `MAX_TRANSMIT_SEGMENTS`.
const UPSTREAM_SEGMENTS: usize = 10;

/// The most UDP payload one `sendmsg` may carry (IPv4).
const MAX_UDP_SEND: usize = 65_507;

/// Counts the datagrams and bytes of each send through the inner socket.
struct Counting {
    inner: Arc<dyn AsyncUdpSocket>,
    most_segments: AtomicUsize,
    most_bytes: AtomicUsize,
}

impl fmt::Debug for Counting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Counting").finish_non_exhaustive()
    }
}

impl AsyncUdpSocket for Counting {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.inner.try_send(transmit)?;
        let segments = transmit
            .segment_size
            .map_or(1, |s| transmit.contents.len().div_ceil(s));
        self.most_segments.fetch_max(segments, Ordering::Relaxed);
        self.most_bytes
            .fetch_max(transmit.contents.len(), Ordering::Relaxed);
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[tokio::test]
async fn bulk_stream_sends_more_than_ten_datagrams_per_sendmsg() {
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    let cert_der: CertificateDer<'static> = cert.der().clone();
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls 1.3")
        .with_no_client_auth()
        .with_single_cert(vec![cert_der.clone()], key_der)
        .expect("server tls");
    let server_config = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(server_tls).expect("quic server"),
    ));

    let runtime = quinn::default_runtime().expect("tokio runtime");
    let std_socket = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let counting = Arc::new(Counting {
        inner: runtime.wrap_udp_socket(std_socket).expect("wrap socket"),
        most_segments: AtomicUsize::new(0),
        most_bytes: AtomicUsize::new(0),
    });
    if counting.max_transmit_segments() <= UPSTREAM_SEGMENTS {
        eprintln!(
            "this kernel offers {} GSO segments per send: nothing to measure",
            counting.max_transmit_segments()
        );
        return;
    }
    let server = quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        Some(server_config),
        counting.clone(),
        runtime,
    )
    .expect("server endpoint");
    let server_addr = server.local_addr().expect("server address");

    // The server writes 16 MiB on the stream the client opens.
    const BULK: usize = 16 << 20;
    let serve = tokio::spawn(async move {
        let conn = server
            .accept()
            .await
            .expect("incoming")
            .await
            .expect("handshake");
        let (mut send, mut recv) = conn.accept_bi().await.expect("stream");
        let mut hello = [0u8; 1];
        recv.read_exact(&mut hello).await.expect("hello");
        let chunk = vec![7u8; 64 << 10];
        for _ in 0..BULK / chunk.len() {
            send.write_all(&chunk).await.expect("write");
        }
        send.finish().expect("finish");
        send.stopped().await.expect("stopped");
    });

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert_der).expect("root");
    let client_tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let client_config = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(client_tls).expect("quic client"),
    ));
    let client =
        quinn::Endpoint::client(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).expect("client");
    let conn = client
        .connect_with(client_config, server_addr, "localhost")
        .expect("connect")
        .await
        .expect("client handshake");
    let (mut send, mut recv) = conn.open_bi().await.expect("open");
    send.write_all(&[1]).await.expect("hello");
    let received = tokio::time::timeout(Duration::from_secs(60), async {
        let mut n = 0;
        while let Some(chunk) = recv.read_chunk(usize::MAX, true).await.expect("read") {
            n += chunk.bytes.len();
        }
        n
    })
    .await
    .expect("the bulk stream ends within 60 s");
    assert_eq!(received, BULK);
    serve.await.expect("server task");

    let segments = counting.most_segments.load(Ordering::Relaxed);
    let bytes = counting.most_bytes.load(Ordering::Relaxed);
    assert!(
        segments > UPSTREAM_SEGMENTS,
        "the largest send carried {segments} datagrams: the vendored quinn's \
         batches are not in use (is [patch.crates-io] in Cargo.toml?)"
    );
    assert!(
        bytes <= MAX_UDP_SEND,
        "a send carried {bytes} bytes, more than one UDP send may ({MAX_UDP_SEND})"
    );
}
