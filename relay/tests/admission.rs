//! Admission before authentication, against a real relay over loopback
//! UDP: a stranger gets one stream until its `Hello` is verified, a silent
//! one is closed at the `Hello` deadline, one source cannot take every
//! unauthenticated place, and under load a new connection must pass a QUIC
//! Retry before the relay keeps any state for it.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use comsat_node::keys::{Generate, RandomId};
use comsat_protocol::{CLOSE_REFUSED, RelayId, SigningKey};
use comsat_relay::{Relay, RelayConfig, Stop};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

/// A relay running on loopback with `limits` edited; its address, the
/// client config that trusts it, and the sender that stops it.
struct Running {
    addr: SocketAddr,
    client: quinn::ClientConfig,
    stop: mpsc::Sender<Stop>,
    _dir: tempfile::TempDir,
}

async fn start(edit: impl FnOnce(&mut comsat_relay::config::Limits)) -> Running {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().expect("dir");
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    let (c, k) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&c, cert.pem()).expect("cert file");
    comsat_node::keys::write_secret_file(&k, key.serialize_pem().as_bytes()).expect("key");
    let grants = dir.path().join("grants");
    std::fs::create_dir_all(&grants).expect("grants dir");
    let listen = "127.0.0.1:0".parse().expect("addr");
    let authority = SigningKey::generate().public();
    let mut config = RelayConfig::new(RelayId::random(), listen, c, k, authority, grants);
    edit(&mut config.limits);
    let relay = Relay::bind(config).expect("bind");
    let addr = relay.local_addr().expect("addr");
    let (stop, stopped) = mpsc::channel(1);
    tokio::spawn(relay.run_until(stopped));
    Running {
        addr,
        client: client_config(&dir.path().join("tls.crt")),
        stop,
        _dir: dir,
    }
}

fn client_config(cert: &Path) -> quinn::ClientConfig {
    let pem = std::fs::read(cert).expect("cert");
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.expect("pem")).expect("root");
    }
    let mut tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![comsat_protocol::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic tls");
    quinn::ClientConfig::new(Arc::new(quic))
}

/// A QUIC connection to `to` from loopback address `source`, not yet
/// authenticated (no `Hello`).
async fn connect(
    r: &Running,
    source: &str,
    to: SocketAddr,
) -> Result<quinn::Connection, quinn::ConnectionError> {
    let endpoint =
        quinn::Endpoint::client(format!("{source}:0").parse().expect("source")).expect("client");
    endpoint
        .connect_with(r.client.clone(), to, "localhost")
        .expect("connect")
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_gets_one_stream_and_a_silent_one_is_closed_at_the_hello_deadline() {
    let r = start(|l| l.hello_timeout_ms = 1_500).await;
    let conn = connect(&r, "127.0.0.1", r.addr).await.expect("handshake");
    // One stream, for its Hello; no second one before the relay knows it.
    let (mut first, _recv) = conn.open_bi().await.expect("the control stream");
    first.write_all(&[0]).await.expect("write");
    let second = tokio::time::timeout(Duration::from_secs(1), conn.open_bi()).await;
    assert!(second.is_err(), "a stranger opened a second stream");
    // Silent past the deadline: refused.
    let started = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .expect("closed before the auth timeout");
    assert!(
        matches!(&closed, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == CLOSE_REFUSED.into()),
        "{closed:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    r.stop.send(Stop::Now).await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_cannot_take_every_unauthenticated_place() {
    let r = start(|l| {
        l.max_unauthenticated_per_source = 3;
        l.hello_timeout_ms = 20_000;
        l.auth_timeout_ms = 20_000;
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(
            connect(&r, "127.0.0.2", r.addr)
                .await
                .expect("within the share"),
        );
    }
    let refused = connect(&r, "127.0.0.2", r.addr).await;
    assert!(
        matches!(refused, Err(quinn::ConnectionError::ConnectionClosed(_))),
        "a fourth from the source: {refused:?}"
    );
    // Another source is let in meanwhile, and a place given back is free.
    connect(&r, "127.0.0.3", r.addr)
        .await
        .expect("another source");
    held.pop().expect("held").close(0u32.into(), b"bye");
    let mut again = None;
    for _ in 0..50 {
        if let Ok(c) = connect(&r, "127.0.0.2", r.addr).await {
            again = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(again.is_some(), "the source's place did not come back");
    r.stop.send(Stop::Now).await.expect("stop");
}

/// Forwards datagrams between clients and `upstream`, keeping the first
/// byte of every datagram the relay sends back.
async fn spy(upstream: SocketAddr) -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
    let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
    back.connect(upstream).await.expect("connect");
    let addr = front.local_addr().expect("addr");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let client = Arc::new(Mutex::new(None::<SocketAddr>));
    let (f, b, c) = (front.clone(), back.clone(), client.clone());
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = f.recv_from(&mut buf).await {
            *c.lock().expect("lock") = Some(from);
            let _ = b.send(&buf[..n]).await;
        }
    });
    let keep = seen.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok(n) = back.recv(&mut buf).await {
            keep.lock().expect("lock").push(buf[0]);
            let to = *client.lock().expect("lock");
            if let Some(to) = to {
                let _ = front.send_to(&buf[..n], to).await;
            }
        }
    });
    (addr, seen)
}

/// Whether a QUIC v1 Retry packet (long header, type 3) is among `first`.
fn has_retry(first: &[u8]) -> bool {
    first.iter().any(|b| b & 0xf0 == 0xf0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_load_a_new_connection_passes_a_retry_first() {
    // At rest: no Retry.
    let r = start(|_| {}).await;
    let (via, seen) = spy(r.addr).await;
    connect(&r, "127.0.0.1", via).await.expect("handshake");
    assert!(!has_retry(&seen.lock().expect("lock")), "a Retry at rest");
    r.stop.send(Stop::Now).await.expect("stop");

    // Under load (here: from the first unauthenticated connection on), a
    // Retry; the client that proves its address connects all the same.
    let r = start(|l| l.retry_above = 0).await;
    let (via, seen) = spy(r.addr).await;
    let conn = connect(&r, "127.0.0.1", via)
        .await
        .expect("handshake after a Retry");
    assert!(
        has_retry(&seen.lock().expect("lock")),
        "no Retry under load"
    );
    let (mut s, _recv) = conn.open_bi().await.expect("stream");
    s.write_all(&[0]).await.expect("write");
    r.stop.send(Stop::Now).await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_unauthenticated_place_taken_a_new_connection_waits_for_one() {
    let r = start(|l| {
        l.max_unauthenticated = 2;
        l.hello_timeout_ms = 1_000;
        l.retry_above = 100;
    })
    .await;
    // Two silent connections hold both places until their Hello deadline.
    let mut silent = Vec::new();
    for source in ["127.0.0.2", "127.0.0.3"] {
        silent.push(connect(&r, source, r.addr).await.expect("a place"));
    }
    // A third is not refused: it waits, and is let in when one is freed
    // (a fleet reconnecting at once gets in as places free up).
    let third = connect(&r, "127.0.0.4", r.addr).await;
    assert!(third.is_ok(), "refused instead of waiting: {third:?}");
    // The places it waited for were the silent ones', closed at their
    // deadline.
    for conn in &silent {
        tokio::time::timeout(Duration::from_secs(5), conn.closed())
            .await
            .expect("a silent connection outlived its Hello deadline");
    }
    r.stop.send(Stop::Now).await.expect("stop");
}
