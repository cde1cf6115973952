//! End-to-end tests of relay operations: reload on SIGHUP, per-link
//! metrics, link limits on a relay-wide scale.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use common::{Options, System};
use comsat_controller::dev::DevLink;
use comsat_tests::raw::RawClient;
use comsat_tests::{metric, scrape};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn echo_server(listener: TcpListener) {
    while let Ok((s, _)) = listener.accept().await {
        tokio::spawn(async move {
            let (mut r, mut w) = s.into_split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

async fn echo_round(s: &mut TcpStream, data: &[u8]) -> Result<()> {
    s.write_all(data).await?;
    let mut back = vec![0u8; data.len()];
    tokio::time::timeout(Duration::from_secs(15), s.read_exact(&mut back))
        .await
        .context("echo timed out")??;
    if back != data {
        bail!("echo came back different");
    }
    Ok(())
}

/// A relay and two agents with one ready link `echo` to an echo server;
/// returns the system and the link's listen address.
async fn echo_system() -> Result<(System, SocketAddr)> {
    let target = TcpListener::bind("127.0.0.1:0").await?;
    let mut sys = System::start(Options::one(DevLink {
        name: "echo".into(),
        listen: "tcp://127.0.0.1:0".into(),
        target: format!("tcp://{}", target.local_addr()?),
        allowed_uids: vec![],
        allow: vec![],
        proxy_protocol: false,
    }))?;
    tokio::spawn(echo_server(target));
    let listen: SocketAddr = sys.tcp_listen_addr("echo")?;
    sys.wait_ready()?;
    Ok((sys, listen))
}

fn sighup(pid: u32) -> Result<()> {
    let ok = std::process::Command::new("kill")
        .args(["-s", "HUP", &pid.to_string()])
        .status()?
        .success();
    if !ok {
        bail!("kill -s HUP {pid} failed");
    }
    Ok(())
}

async fn wait_for(what: &str, mut check: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if check()? {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The certificate the relay at `addr` serves to a new connection.
async fn served_cert(client: &RawClient, addr: SocketAddr) -> Result<Vec<u8>> {
    let conn = client.connect(addr).await?;
    let certs = conn
        .peer_identity()
        .context("no peer identity")?
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| anyhow::anyhow!("peer identity is not a certificate chain"))?;
    conn.close(0u32.into(), b"done");
    Ok(certs.first().context("empty chain")?.as_ref().to_vec())
}

fn pem_der(path: &std::path::Path) -> Result<Vec<u8>> {
    Ok(CertificateDer::from_pem_file(path)?.as_ref().to_vec())
}

/// A new certificate for `localhost` from the dev CA, written as
/// `name.crt` / `name.key` next to the relay config.
fn issue_relay_cert(sys: &System, name: &str) -> Result<()> {
    let setup = sys.layout.ca_pem.parent().context("setup dir")?;
    let ca_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(setup.join("ca.key"))?)?;
    let issuer =
        rcgen::Issuer::from_ca_cert_pem(&std::fs::read_to_string(&sys.layout.ca_pem)?, ca_key)?;
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec![
        "localhost".to_owned(),
        sys.relay_quic.ip().to_string(),
    ])?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "comsat dev relay, renewed");
    let cert = params.signed_by(&key, &issuer)?;
    let dir = sys.layout.relay_config.parent().context("relay dir")?;
    std::fs::write(dir.join(format!("{name}.crt")), cert.pem())?;
    comsat_node::keys::write_secret_file(
        &dir.join(format!("{name}.key")),
        key.serialize_pem().as_bytes(),
    )?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_refuses_a_broken_config_and_applies_a_new_certificate_without_dropping_flows()
-> Result<()> {
    let (sys, listen) = echo_system().await?;
    let mut flow = TcpStream::connect(listen).await?;
    echo_round(&mut flow, b"before any reload").await?;
    let connects = |sys: &System| -> Result<f64> {
        let mut n = 0.0;
        for (_, admin) in &sys.agents {
            n += metric(&scrape(*admin)?, "comsat_agent_relay_connects_total");
        }
        Ok(n)
    };
    let connects_before = connects(&sys)?;
    let client = RawClient::new(&sys.layout.ca_pem)?;
    let original_cert = pem_der(&sys.layout.relay_config.with_file_name("relay.crt"))?;
    assert_eq!(served_cert(&client, sys.relay_quic).await?, original_cert);

    let config = sys.layout.relay_config.clone();
    let good = std::fs::read_to_string(&config)?;
    let reloads = |result: &str| -> Result<f64> {
        Ok(metric(
            &scrape(sys.relay_admin)?,
            &format!("comsat_relay_config_reloads_total{{result=\"{result}\"}}"),
        ))
    };

    // 1. A file that does not parse: refused, logged, the old one stays.
    std::fs::write(&config, format!("{good}\n[limits\nbroken"))?;
    sighup(sys.relay.pid())?;
    wait_for("the broken config to be refused", || {
        Ok(reloads("refused")? >= 1.0)
    })
    .await?;
    let log = std::fs::read_to_string(sys.logs().join("relay.log"))?;
    assert!(
        log.contains("configuration reload refused") && log.contains("relay.toml"),
        "{log}"
    );
    echo_round(&mut flow, b"after a refused reload").await?;
    let mut fresh = TcpStream::connect(listen).await?;
    echo_round(&mut fresh, b"a new flow after a refused reload").await?;

    // 2. A restart-only change is refused too, naming the setting.
    let moved = good.replace(
        &format!("listen = \"{}\"", sys.relay_quic),
        "listen = \"127.0.0.1:1\"",
    );
    assert_ne!(moved, good, "the test must change the listen line");
    std::fs::write(&config, &moved)?;
    sighup(sys.relay.pid())?;
    let log_path = sys.logs().join("relay.log");
    wait_for("the listen change to be refused", || {
        Ok(std::fs::read_to_string(&log_path)?.contains("listen cannot change without a restart"))
    })
    .await?;
    echo_round(&mut flow, b"still on the old config").await?;

    // 3. A new certificate named by the config: served to new connections,
    // while the open flow and the agents' connections go on.
    issue_relay_cert(&sys, "renewed")?;
    let renewed = good
        .replace("tls_cert = \"relay.crt\"", "tls_cert = \"renewed.crt\"")
        .replace("tls_key = \"relay.key\"", "tls_key = \"renewed.key\"");
    assert_ne!(renewed, good, "the test must change the certificate lines");
    std::fs::write(&config, &renewed)?;
    sighup(sys.relay.pid())?;
    wait_for("the new config to be applied", || {
        Ok(reloads("applied")? >= 1.0)
    })
    .await?;
    let new_cert = pem_der(&config.with_file_name("renewed.crt"))?;
    assert_ne!(new_cert, original_cert);
    assert_eq!(served_cert(&client, sys.relay_quic).await?, new_cert);
    echo_round(&mut flow, b"the old flow, after the new certificate").await?;
    echo_round(&mut fresh, b"and the other one").await?;
    assert_eq!(
        connects(&sys)?,
        connects_before,
        "no agent connection was dropped"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_link_metrics_move_while_a_flow_is_open() -> Result<()> {
    let (sys, listen) = echo_system().await?;
    let link = hex::encode(sys.layout.links[0].1.0);
    let series = |name: &str| format!("{name}{{link=\"{link}\",direction=\"a_to_b\"}}");
    let mut flow = TcpStream::connect(listen).await?;
    let (mut last, mut last_udp) = (0.0, [0.0; 2]);
    for round in 0..3 {
        echo_round(&mut flow, &vec![round as u8; 256 * 1024]).await?;
        let m = scrape(sys.relay_admin)?;
        // What went through the relay went over UDP both ways: at least
        // the bytes of this round, in and out.
        for (i, dir) in ["rx", "tx"].into_iter().enumerate() {
            let udp = metric(
                &m,
                &format!("comsat_relay_udp_bytes_total{{direction=\"{dir}\"}}"),
            );
            assert!(
                udp >= last_udp[i] + 2.0 * 256.0 * 1024.0,
                "round {round}: udp {dir} {udp} after {}\n{m}",
                last_udp[i]
            );
            last_udp[i] = udp;
        }
        let a_to_b = metric(&m, &series("comsat_relay_link_bytes_total"));
        let b_to_a = metric(
            &m,
            &format!("comsat_relay_link_bytes_total{{link=\"{link}\",direction=\"b_to_a\"}}"),
        );
        assert!(
            a_to_b >= last + 256.0 * 1024.0,
            "round {round}: {a_to_b} after {last}\n{m}"
        );
        assert!(b_to_a >= 256.0 * 1024.0 * (round + 1) as f64, "{m}");
        assert_eq!(
            metric(
                &m,
                &format!("comsat_relay_link_flows_open{{link=\"{link}\"}}")
            ),
            1.0,
            "the flow is still open\n{m}"
        );
        last = a_to_b;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_at_its_link_cap_refuses_the_next_link_and_serves_the_first() -> Result<()> {
    let target = TcpListener::bind("127.0.0.1:0").await?;
    let link = |name: &str| DevLink {
        name: name.into(),
        listen: "tcp://127.0.0.1:0".into(),
        target: format!("tcp://{}", target.local_addr().expect("bound")),
        allowed_uids: vec![],
        allow: vec![],
        proxy_protocol: false,
    };
    let mut sys = System::start(Options {
        links: vec![link("one"), link("two")],
        tap: false,
        pin_sha256: false,
        relay_extra: "\n[limits]\nmax_links = 1\n".into(),
        extra_relays: 0,
    })?;
    let one: SocketAddr = sys.tcp_listen_addr("one")?;
    let two: SocketAddr = sys.tcp_listen_addr("two")?;
    tokio::spawn(echo_server(target));
    let admin = sys.relay_admin;
    wait_for("an attach refused for relay_full", || {
        let m = scrape(admin)?;
        Ok(metric(
            &m,
            "comsat_relay_attach_refused_total{reason=\"relay_full\"}",
        ) >= 1.0
            && metric(&m, "comsat_relay_links_paired") == 1.0)
    })
    .await?;
    // Exactly one of the two links is served; the other's application
    // connection is closed (the link is not ready).
    let mut served = 0;
    for addr in [one, two] {
        let mut s = TcpStream::connect(addr).await?;
        if echo_round(&mut s, b"hello").await.is_ok() {
            served += 1;
        }
    }
    assert_eq!(served, 1);

    // Raising the cap (a reload) lets the refused link in by itself: its
    // agents ask again.
    let config = sys.layout.relay_config.clone();
    let text = std::fs::read_to_string(&config)?.replace("max_links = 1", "max_links = 2");
    std::fs::write(&config, text)?;
    sighup(sys.relay.pid())?;
    wait_for("both links paired", || {
        Ok(metric(&scrape(admin)?, "comsat_relay_links_paired") == 2.0)
    })
    .await?;
    sys.wait_ready()?;
    for addr in [one, two] {
        let mut s = TcpStream::connect(addr).await?;
        echo_round(&mut s, b"both served").await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_hundreds_of_links_on_one_relay_gets_them_all_ready() -> Result<()> {
    // More links than a control queue used to hold: every attach must get
    // through, and every answer back.
    const LINKS: usize = 400;
    let target = TcpListener::bind("127.0.0.1:0").await?;
    let target_addr = target.local_addr()?;
    tokio::spawn(echo_server(target));
    let links = (0..LINKS)
        .map(|i| DevLink {
            name: format!("l{i}"),
            listen: "tcp://127.0.0.1:0".into(),
            target: format!("tcp://{target_addr}"),
            allowed_uids: vec![],
            allow: vec![],
            proxy_protocol: false,
        })
        .collect();
    let mut sys = System::start(Options {
        links,
        tap: false,
        pin_sha256: false,
        relay_extra: String::new(),
        extra_relays: 0,
    })?;
    let mut last = String::new();
    for i in 0..LINKS {
        last = sys.listen_addr(&format!("l{i}"))?;
    }
    sys.wait_ready()?;
    let m = scrape(sys.relay_admin)?;
    assert_eq!(metric(&m, "comsat_relay_links_paired"), LINKS as f64, "{m}");
    let mut s = TcpStream::connect(last.trim_start_matches("tcp://")).await?;
    echo_round(&mut s, b"the last link carries bytes").await?;
    Ok(())
}

/// The relay gives an agent few flow streams at first and more as it uses
/// them: far more flows than the first credit, all open at once, each
/// carry bytes both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_may_hold_more_flows_open_than_its_first_stream_credit() -> Result<()> {
    const FLOWS: usize = 4 * comsat_relay::defaults::INITIAL_STREAMS_PER_CONNECTION as usize;
    let (_sys, listen) = echo_system().await?;
    let mut flows = Vec::new();
    for i in 0..FLOWS {
        let mut flow = TcpStream::connect(listen).await?;
        echo_round(&mut flow, format!("flow {i} opens").as_bytes())
            .await
            .with_context(|| format!("flow {i} of {FLOWS}"))?;
        // Held open, so each flow keeps its stream.
        flows.push(flow);
    }
    for (i, flow) in flows.iter_mut().enumerate() {
        echo_round(flow, format!("flow {i} is still open").as_bytes()).await?;
    }
    Ok(())
}
