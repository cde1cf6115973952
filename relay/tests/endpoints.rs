//! A relay's two QUIC endpoints: each reports a port in use as an error,
//! and they keep their stateless resets apart (RFC 9000
//! §10.3 and §21.11): a connection id the main endpoint issued, sent to the
//! interactive endpoint, draws no valid stateless reset. If it did, anyone
//! who saw a connection's id on the path could make the other endpoint
//! hand out the token that tears that connection down.
//!
//! The valid token is taken from the relay itself: a relay restarted with
//! the same key answers a packet for a connection of its previous run with
//! a stateless reset (that is how agents notice a restart at once), whose
//! last 16 bytes are the token.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use comsat_node::keys::{Generate, RandomId};
use comsat_protocol::{RelayId, SigningKey};
use comsat_relay::{Relay, RelayConfig, Stop};
use rustls::pki_types::CertificateDer;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

/// Length of the connection ids the relay issues.
const CID_LEN: usize = 8;

fn config(dir: &Path, listen: SocketAddr, interactive: SocketAddr) -> RelayConfig {
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    let (c, k) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&c, cert.pem()).expect("cert file");
    comsat_node::keys::write_secret_file(&k, key.serialize_pem().as_bytes()).expect("key");
    let grants = dir.join("grants");
    std::fs::create_dir_all(&grants).expect("grants dir");
    let authority = SigningKey::generate().public();
    let mut config = RelayConfig::new(RelayId::random(), listen, c, k, authority, grants);
    config.interactive_listen = Some(interactive);
    config
}

fn free_udp() -> SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("free port")
}

/// Forwards datagrams between one client and `upstream`, keeping the
/// destination connection id of the first short-header packet the client
/// sends.
async fn cid_spy(upstream: SocketAddr) -> (SocketAddr, Arc<Mutex<Option<Vec<u8>>>>) {
    let front = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let back = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    back.connect(upstream).await.expect("connect");
    let addr = front.local_addr().expect("addr");
    let seen = Arc::new(Mutex::new(None));
    let keep = seen.clone();
    tokio::spawn(async move {
        let (mut a, mut b) = ([0u8; 2048], [0u8; 2048]);
        let mut client = None;
        loop {
            tokio::select! {
                Ok((n, from)) = front.recv_from(&mut a) => {
                    client = Some(from);
                    // Short header: first bit clear; the id follows.
                    if n > 1 + CID_LEN && a[0] & 0x80 == 0 {
                        keep.lock().expect("lock").get_or_insert_with(|| a[1..1 + CID_LEN].to_vec());
                    }
                    let _ = back.send(&a[..n]).await;
                }
                Ok(n) = back.recv(&mut b) => {
                    if let Some(c) = client {
                        let _ = front.send_to(&b[..n], c).await;
                    }
                }
            }
        }
    });
    (addr, seen)
}

/// A packet that looks like 1-RTT data for connection `cid`.
fn packet_for(cid: &[u8]) -> Vec<u8> {
    let mut p = vec![0x41];
    p.extend_from_slice(cid);
    p.extend((0..1200 - p.len()).map(|i| (i * 7) as u8));
    p
}

/// Sends `packet` to `to` and returns the answer, if one comes.
async fn answer(to: SocketAddr, packet: &[u8]) -> Option<Vec<u8>> {
    let s = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    s.send_to(packet, to).await.expect("send");
    let mut buf = [0u8; 2048];
    let got = tokio::time::timeout(Duration::from_secs(1), s.recv_from(&mut buf)).await;
    got.ok()
        .and_then(Result::ok)
        .map(|(n, _)| buf[..n].to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_main_endpoint_connection_id_draws_no_valid_reset_at_the_interactive_one() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().expect("dir");
    let (main, interactive) = (free_udp(), free_udp());
    let config = config(dir.path(), main, interactive);

    // A connection to the main endpoint, through a spy that learns the
    // connection id the relay issued for it.
    let relay = Relay::bind(config.clone()).expect("bind");
    let (stop, stopped) = mpsc::channel(1);
    let running = tokio::spawn(relay.run_until(stopped));
    let (spy, cid) = cid_spy(main).await;
    let pem = std::fs::read(&config.tls_cert).expect("cert");
    let mut roots = rustls::RootCertStore::empty();
    for cert in pem_certs(&pem) {
        roots.add(cert).expect("root");
    }
    let mut tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![comsat_protocol::ALPN.to_vec()];
    let client = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client");
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic tls");
    let conn = client
        .connect_with(quinn::ClientConfig::new(Arc::new(quic)), spy, "localhost")
        .expect("connect")
        .await
        .expect("handshake");
    // Some 1-RTT traffic, so a short-header packet carries the id.
    let (mut send, _recv) = conn.open_bi().await.expect("stream");
    send.write_all(b"x").await.expect("write");
    let mut cid_seen = None;
    for _ in 0..100 {
        cid_seen = cid.lock().expect("lock").clone();
        if cid_seen.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cid = cid_seen.expect("no short-header packet seen");
    stop.send(Stop::Now).await.expect("stop");
    running.await.expect("join").expect("run");
    drop((conn, client));

    // The same relay restarted: its main endpoint answers a packet for the
    // old connection with a stateless reset carrying the valid token.
    let relay = bind_soon(&config).await;
    let (stop, stopped) = mpsc::channel(1);
    let running = tokio::spawn(relay.run_until(stopped));
    let packet = packet_for(&cid);
    let reset = answer(main, &packet)
        .await
        .expect("the main endpoint sent no stateless reset for its own connection");
    assert!(reset.len() >= 21, "a stateless reset is at least 21 bytes");
    let token = &reset[reset.len() - 16..];

    // The interactive endpoint must not hand out that token.
    match answer(interactive, &packet).await {
        None => {}
        Some(other) => assert_ne!(
            &other[other.len().saturating_sub(16)..],
            token,
            "the interactive endpoint answered with the main endpoint's reset token"
        ),
    }
    stop.send(Stop::Now).await.expect("stop");
    running.await.expect("join").expect("run");
}

/// Binds `config`'s relay, waiting for a previous run's sockets to close.
async fn bind_soon(config: &RelayConfig) -> Relay {
    for _ in 0..100 {
        match Relay::bind(config.clone()) {
            Ok(relay) => return relay,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    Relay::bind(config.clone()).expect("bind again")
}

/// A port in use, at either listener, is an error naming it (bound from
/// inside an async runtime, as the `comsat` binary binds, without a panic).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_port_in_use_is_an_error() {
    let dir = tempfile::tempdir().expect("dir");
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let taken_addr = taken.local_addr().expect("addr");
    for (main, interactive) in [(taken_addr, free_udp()), (free_udp(), taken_addr)] {
        let config = config(dir.path(), main, interactive);
        let err = Relay::bind(config).expect_err("bound a port in use");
        assert!(
            err.to_string().contains(&taken_addr.to_string()),
            "the error does not name the port: {err}"
        );
    }
}

/// The certificates in a PEM file.
fn pem_certs(pem: &[u8]) -> Vec<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .expect("pem")
}
