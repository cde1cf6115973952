//! The HTTPS API against hostile clients, over real TLS connections on
//! loopback: slow and idle connections are closed, a source cannot hold
//! more than its share of connections, a stranger's enrolment is refused
//! on its token before anything else is read or parsed, and a relay's
//! clone alarms are audited within their bounds.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::api::*;
use comsat_protocol::api::{self, AuditRecord};
use reqwest::StatusCode;
use rustls::pki_types::ServerName;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// A TLS connection to the controller (trusting its CA), from `source`.
async fn connect(api: &Api, source: &str) -> std::io::Result<TlsStream<TcpStream>> {
    let config = tls_config(api.ca_pem.as_bytes());
    let addr: SocketAddr = api
        .base
        .trim_start_matches("https://")
        .parse()
        .expect("addr");
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(format!("{source}:0").parse().expect("source"))?;
    let tcp = socket.connect(addr).await?;
    let name = ServerName::try_from("127.0.0.1").expect("name").to_owned();
    TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

/// Waits until the server closes `conn` (a read gives EOF or an error),
/// writing `trickle` one byte a second meanwhile; how long that took, or
/// `None` if it stayed open `limit`.
async fn closed_within(
    conn: &mut TlsStream<TcpStream>,
    trickle: &[u8],
    limit: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    let mut trickle = trickle.iter();
    let mut buf = [0u8; 4096];
    while started.elapsed() < limit {
        match tokio::time::timeout(Duration::from_secs(1), conn.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {}
            Err(_) => {
                if let Some(b) = trickle.next()
                    && conn.write_all(&[*b]).await.is_err()
                {
                    return Some(started.elapsed());
                }
            }
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_connections_are_closed_and_requests_in_flight_are_not() {
    let api = start("http_idle_timeout_secs = 3\n").await;
    // A slowloris: half a request head, then a byte a second.
    let mut slow = connect(&api, "127.0.0.1").await.expect("connect");
    slow.write_all(b"GET /v1/status HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .expect("write");
    let took = closed_within(&mut slow, &[b'a'; 60], Duration::from_secs(20)).await;
    assert!(
        took.is_some_and(|t| t < Duration::from_secs(10)),
        "slowloris held: {took:?}"
    );

    // A connection that made one request, then idles between requests.
    let mut idle = connect(&api, "127.0.0.1").await.expect("connect");
    idle.write_all(b"GET /v1/ca HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut head = [0u8; 12];
    idle.read_exact(&mut head).await.expect("answer");
    assert_eq!(&head, b"HTTP/1.1 200");
    let took = closed_within(&mut idle, &[], Duration::from_secs(20)).await;
    assert!(
        took.is_some_and(|t| t < Duration::from_secs(10)),
        "idle connection held: {took:?}"
    );

    // A TLS handshake never finished.
    let addr: SocketAddr = api
        .base
        .trim_start_matches("https://")
        .parse()
        .expect("addr");
    let mut raw = TcpStream::connect(addr).await.expect("tcp");
    raw.write_all(&[0x16, 0x03, 0x01]).await.expect("write");
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(15), raw.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0) | Err(_))),
        "half a handshake held: {read:?}"
    );

    // A long poll outlasts the idle timeout: a request in flight is not idle.
    let agent = api.enrol_agent("a").await;
    let since = api.config(&agent, 0, 0).await.version;
    let started = Instant::now();
    let same = api.config(&agent, since, 5_000).await;
    assert_eq!(same.version, since);
    assert!(started.elapsed() >= Duration::from_millis(4_500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_holds_its_share_and_a_full_house_makes_room_for_a_quick_client() {
    let api = start("max_connections = 8\nmax_connections_per_source = 3\n").await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(connect(&api, "127.0.0.2").await.expect("within the cap"));
    }
    // The fourth from that source is closed before its handshake.
    assert!(
        connect(&api, "127.0.0.2").await.is_err(),
        "over the source's cap"
    );
    // Another source is served meanwhile (by a client of its own, whose
    // connection closes with it).
    let other = client(api.ca_pem.as_bytes());
    let status = other
        .get(api.url(api::PATH_STATUS))
        .bearer_auth(&api.admin)
        .send()
        .await
        .expect("another source");
    assert_eq!(status.status(), StatusCode::OK);
    drop((status, other));
    // A slot comes back when its connection closes.
    drop(held.pop());
    let mut again = None;
    for _ in 0..50 {
        if let Ok(c) = connect(&api, "127.0.0.2").await {
            again = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(again.is_some(), "the freed slot was not given back");
    // Every place taken by slow connections from several sources: a quick
    // client still gets its answer, and the connection that waited
    // longest for a request head is closed to make room.
    held.extend(again);
    for source in [
        "127.0.0.3",
        "127.0.0.3",
        "127.0.0.3",
        "127.0.0.4",
        "127.0.0.4",
    ] {
        held.push(connect(&api, source).await.expect("within the cap in all"));
    }
    let mut quick = connect(&api, "127.0.0.5").await.expect("a place is made");
    quick
        .write_all(b"GET /v1/ca HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut head = [0u8; 12];
    quick.read_exact(&mut head).await.expect("answer");
    assert_eq!(&head, b"HTTP/1.1 200");
    let oldest = closed_within(&mut held[0], &[], Duration::from_secs(5)).await;
    assert!(oldest.is_some(), "the longest waiting was not closed");
    for (i, conn) in held.iter_mut().enumerate().skip(1) {
        let closed = closed_within(conn, &[], Duration::from_millis(300)).await;
        assert!(closed.is_none(), "connection {i} was closed as well");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strangers_enrolment_is_refused_on_its_token_before_its_csr_is_read() {
    let api = start("").await;
    let key = comsat_protocol::SigningKey::from_seed(&[7; 32]);
    let enrol = |csr: String| {
        json!({
            "token_id": "00112233445566ff",
            "secret": "ab".repeat(32),
            "kind": "relay",
            "sign_public_key": key.public(),
            "public_addr": "127.0.0.1:4433",
            "csr_pem": csr,
        })
    };
    // A garbage CSR with an unknown token: refused as a token, never parsed.
    let resp = api
        .client
        .post(api.url(api::PATH_ENROL))
        .json(&enrol(
            "-----BEGIN CERTIFICATE REQUEST-----\nnot a csr\n".into(),
        ))
        .send()
        .await
        .expect("send");
    let (status, text) = error_of(resp).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{text}");
    assert!(
        text.contains("join token refused") && !text.contains("CSR"),
        "{text}"
    );
    // A body larger than an enrolment is refused unread.
    let resp = api
        .client
        .post(api.url(api::PATH_ENROL))
        .json(&enrol("x".repeat(api::MAX_ENROL_BODY_LEN)))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let audit: Vec<AuditRecord> = api.admin_get(api::PATH_AUDIT).await;
    assert!(
        audit.iter().any(|r| r.action == "enrol"
            && r.result == "denied"
            && r.reason.as_deref().is_some_and(|x| x.contains("unknown"))),
        "{audit:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relays_clone_alarms_are_audited_within_their_bounds() {
    let api = start("").await;
    let relay = api.enrol_relay("r1", "127.0.0.1:7000").await;
    let agent = api.enrol_agent("a1").await;
    let alarm = |source: &str| api::NodeClone {
        node_id: agent.enrolled.node_id,
        source: source.into(),
        other_source: "192.0.2.1".into(),
        at: 1,
    };
    let send = |hb: api::RelayHeartbeat| {
        api.client
            .post(api.url(api::PATH_RELAY_HEARTBEAT))
            .bearer_auth(relay.jwt())
            .json(&hb)
            .send()
    };
    // Beyond the bounds (too many alarms, an address too long): refused
    // whole, nothing recorded.
    let too_many = api::RelayHeartbeat {
        clones: vec![alarm("192.0.2.2"); api::MAX_CLONES_PER_HEARTBEAT + 1],
        ..api::RelayHeartbeat::default()
    };
    let long = api::RelayHeartbeat {
        clones: vec![alarm(&"9".repeat(api::MAX_CLONE_SOURCE_LEN + 1))],
        ..api::RelayHeartbeat::default()
    };
    for hb in [too_many, long] {
        let resp = send(hb).await.expect("send");
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    }
    let audit: Vec<AuditRecord> = api.admin_get(api::PATH_AUDIT).await;
    assert!(!audit.iter().any(|r| r.action == "node.clone"), "{audit:?}");
    // Within them: each alarm is one record naming the node, and what the
    // relay had to drop is said too.
    let hb = api::RelayHeartbeat {
        clones: vec![alarm("192.0.2.2\u{1b}[31m")],
        clones_dropped: 7,
        ..api::RelayHeartbeat::default()
    };
    assert_eq!(send(hb).await.expect("send").status(), StatusCode::OK);
    let audit: Vec<AuditRecord> = api.admin_get(api::PATH_AUDIT).await;
    let clones: Vec<&AuditRecord> = audit.iter().filter(|r| r.action == "node.clone").collect();
    assert_eq!(clones.len(), 2, "{clones:?}");
    let one = clones
        .iter()
        .find(|r| r.resource == "agent/a1")
        .expect("the alarm");
    assert_eq!(
        (one.subject.as_str(), one.result.as_str()),
        ("relay/r1", "alarm")
    );
    let reason = one.reason.as_deref().unwrap_or_default();
    assert!(reason.contains("192.0.2.1"), "{reason}");
    assert!(!reason.contains('\u{1b}'), "escaped: {reason}");
    assert!(
        clones
            .iter()
            .any(|r| r.reason.as_deref().unwrap_or_default().contains("7 more")),
        "{clones:?}"
    );
}
