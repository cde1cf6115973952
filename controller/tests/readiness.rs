//! `/readyz` follows the database: a controller on PostgreSQL answers 503
//! while its database cannot be reached (every connection to it cut, new
//! ones refused, as when the server stops) and 200 again once it can, with
//! no restart. Runs where `COMSAT_TEST_POSTGRES_URL` names a server.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use common::Db;
use common::api::{Api, start_on};

/// A TCP forwarder to the database server that can be cut: while cut it
/// closes every connection through it and every new one at once.
struct Cuttable {
    addr: SocketAddr,
    cut: watch::Sender<bool>,
}

impl Cuttable {
    async fn start(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (cut, cut_rx) = watch::channel(false);
        tokio::spawn(async move {
            loop {
                let Ok((mut down, _)) = listener.accept().await else {
                    return;
                };
                let mut cut = cut_rx.clone();
                if *cut.borrow() {
                    continue;
                }
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut up) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                        _ = cut.wait_for(|c| *c) => {}
                    }
                });
            }
        });
        Self { addr, cut }
    }
}

async fn readyz(api: &Api) -> StatusCode {
    match api.client.get(api.url("/readyz")).send().await {
        Ok(r) => r.status(),
        Err(e) => panic!("the controller does not answer /readyz: {e}"),
    }
}

/// Asks `/readyz` until it answers `want`.
async fn readyz_turns(api: &Api, want: StatusCode, within: Duration) {
    let started = Instant::now();
    loop {
        let got = readyz(api).await;
        if got == want {
            eprintln!("/readyz {want} after {:?}", started.elapsed());
            return;
        }
        assert!(
            started.elapsed() < within,
            "/readyz still {got}, not {want}, after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_503_while_postgres_is_unreachable_and_200_when_it_returns() {
    let Some(Db::Postgres(url)) = Db::postgres().await else {
        return;
    };
    // The URL's host:port, then the same URL through the forwarder (same
    // host name, so TLS still verifies it).
    let authority = url
        .split_once('@')
        .and_then(|(_, rest)| rest.split('/').next())
        .expect("host:port in the URL")
        .to_owned();
    let (host, port) = authority.rsplit_once(':').expect("a port in the URL");
    let upstream = format!("127.0.0.1:{port}");
    let cuttable = Cuttable::start(upstream).await;
    let through = url.replacen(&authority, &format!("{host}:{}", cuttable.addr.port()), 1);
    let api = start_on("", Some(&through)).await;
    assert_eq!(readyz(&api).await, StatusCode::OK);

    cuttable.cut.send_replace(true);
    readyz_turns(
        &api,
        StatusCode::SERVICE_UNAVAILABLE,
        Duration::from_secs(20),
    )
    .await;
    let body = api
        .client
        .get(api.url("/readyz"))
        .send()
        .await
        .expect("send")
        .text()
        .await
        .expect("body");
    assert!(body.starts_with("not ready: the database"), "{body}");
    // It still serves: liveness is not readiness.
    let live = api
        .client
        .get(api.url("/healthz"))
        .send()
        .await
        .expect("send");
    assert_eq!(live.status(), StatusCode::OK);

    cuttable.cut.send_replace(false);
    readyz_turns(&api, StatusCode::OK, Duration::from_secs(30)).await;
}
