//! The controller and its certificates over time, end to end with the
//! real `comsat` binary as processes: the data plane outlives the
//! controller, relays renew their certificates, the operator's own
//! certificate, two controllers on one database, and a rotated controller
//! certificate.

#[path = "common/fleet.rs"]
mod fleet;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use comsat_protocol::api;
use fleet::*;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_plane_outlives_the_controller_and_a_seen_jti_stays_refused() -> Result<()> {
    let (mut c, listen, _) = demo().await?;
    round_trip_eventually(listen, 1 << 20)
        .await
        .with_context(|| c.logs())?;
    let token = c.jwt("a", comsat_node::unix_now(), 50)?;
    let (code, body) = raw_get(&c, api::PATH_AGENT_CONFIG, &token).await?;
    ensure!(code == 200, "first use of a JWT: {code} {body}");

    // A flow open across the controller's death, and new flows while it
    // is down.
    let mut open = tokio::net::TcpStream::connect(listen).await?;
    open.write_all(&[1u8; 100_000]).await?;
    c.controller.take().context("controller")?.kill();
    for i in 0..3u8 {
        round_trip(listen, 2 << 20, i)
            .await
            .with_context(|| c.logs())?;
    }
    open.write_all(&[2u8; 100_000]).await?;
    open.shutdown().await?;
    let mut digest = Vec::new();
    open.read_to_end(&mut digest).await?;
    let mut h = Sha256::new();
    h.update([1u8; 100_000]);
    h.update([2u8; 100_000]);
    ensure!(
        digest == h.finalize().as_slice(),
        "flow open across the controller's death"
    );

    c.run_controller()?;
    let (code, body) = raw_get(&c, api::PATH_AGENT_CONFIG, &token).await?;
    ensure!(code == 401, "a JWT seen before the restart: {code} {body}");
    let audit = c.ctl_ok(&["audit", "list", "-o", "json"])?;
    ensure!(audit.contains("replayed"), "{audit}");
    round_trip(listen, 1 << 20, 9).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_renews_its_certificate_and_serves_it_without_restart() -> Result<()> {
    let mut c = Fleet::start(|t| t)?;
    c.enrol_relay_only("relay-1")?;
    // Replace the issued certificate by one for the same key that is about
    // to expire and that no agent trusts (self-signed).
    let dir = c.path("relay-1");
    let key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(dir.join("tls.key"))?)?;
    let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])?;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::seconds(100);
    params.not_after = now + time::Duration::seconds(20);
    let dying = params.self_signed(&key)?.pem();
    std::fs::write(dir.join("tls.crt"), &dying)?;
    c.run_relay("relay-1")?;
    wait_for(CONVERGE, || {
        let now = std::fs::read_to_string(dir.join("tls.crt"))?;
        ensure!(now != dying, "certificate not renewed yet");
        Ok(())
    })
    .with_context(|| c.logs())?;
    let pem = std::fs::read(dir.join("tls.crt"))?;
    let der = comsat_node::client::read_ca_pem(std::str::from_utf8(&pem)?)?;
    let (_, cert) = x509_parser::parse_x509_certificate(der[0].as_ref())?;
    let ca_pem = std::fs::read(dir.join("relay-ca.pem"))?;
    let ca_der = comsat_node::client::read_ca_pem(std::str::from_utf8(&ca_pem)?)?;
    let (_, ca) = x509_parser::parse_x509_certificate(ca_der[0].as_ref())?;
    ensure!(
        cert.issuer() == ca.subject(),
        "renewed certificate not issued by the relay CA"
    );
    // Agents, which trust only the relay CA, connect to the running relay.
    c.enrol_agent("a")?;
    c.enrol_agent("b")?;
    c.wait_relays_healthy(1)?;
    let target = hash_server().await?;
    let addr = c.create_link("demo", target, &[])?;
    round_trip_eventually(addr, 1 << 20)
        .await
        .with_context(|| c.logs())?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_with_the_operators_own_certificate_enrols_nodes() -> Result<()> {
    // The operator's CA and server certificate, made outside comsat.
    let mut c = Fleet::start_with(
        |t| t,
        |dir| {
            let ca_key = rcgen::KeyPair::generate()?;
            let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
            ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            ca_params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "operator CA");
            let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key)?;
            let key = rcgen::KeyPair::generate()?;
            let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])?
                .signed_by(&key, &ca)?;
            let files = [
                ("op-ca.pem", ca.pem()),
                ("op.crt", cert.pem()),
                ("op.key", key.serialize_pem()),
            ];
            for (name, text) in &files {
                comsat_node::keys::write_secret_file(&dir.join(name), text.as_bytes())?;
            }
            Ok(vec![
                "--tls-cert".into(),
                s(&dir.join("op.crt")),
                "--tls-key".into(),
                s(&dir.join("op.key")),
                "--tls-ca".into(),
                s(&dir.join("op-ca.pem")),
            ])
        },
    )?;
    let pinned = std::fs::read_to_string(c.path("controller/ca.pem"))?;
    ensure!(
        pinned == std::fs::read_to_string(c.path("op-ca.pem"))?,
        "nodes must pin the operator's CA"
    );
    c.enrol_agent("a")?;
    let agents: Vec<api::AgentInfo> =
        serde_json::from_str(&c.ctl_ok(&["agent", "list", "-o", "json"])?)?;
    ensure!(agents.len() == 1 && agents[0].name == "a", "{agents:?}");
    ensure!(
        std::fs::read_to_string(c.path("a/ca.pem"))? == pinned,
        "the agent stored another CA"
    );
    Ok(())
}

/// One join token redeemed at both controllers at once: one wins, and
/// the loser is told the token was used.
fn one_join_token_redeemed_at_both_controllers_wins_once(c: &Fleet, url2: &str) -> Result<()> {
    let first = c.token("agent", "racer", &[])?;
    let text = std::fs::read_to_string(&first)?;
    let (head, _) = text.trim().rsplit_once(':').context("token url")?;
    let (head, _) = head.rsplit_once(":https").context("token url")?;
    let second = c.path("racer-2.token");
    std::fs::write(&second, format!("{head}:{url2}\n"))?;
    let enrol = |token: PathBuf, dir: PathBuf| {
        std::thread::spawn(move || {
            Command::new(BIN)
                .args(["agent", "enrol", "--token-file"])
                .arg(token)
                .arg("--data-dir")
                .arg(dir)
                .output()
        })
    };
    let runs = [
        enrol(first, c.path("racer-1")),
        enrol(second, c.path("racer-2")),
    ];
    let mut outcomes = Vec::new();
    for r in runs {
        let out = r.join().map_err(|_| anyhow::anyhow!("enrol thread"))??;
        outcomes.push((
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
    }
    ensure!(
        outcomes.iter().filter(|(ok, _)| *ok).count() == 1,
        "exactly one redemption wins: {outcomes:?}"
    );
    ensure!(
        outcomes
            .iter()
            .any(|(ok, err)| !ok && err.contains("join token refused")),
        "the loser is told the token was used: {outcomes:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_controllers_on_one_postgres_database_act_as_one() -> Result<()> {
    use comsat_controller::store::testing::{fresh_database, postgres_server};
    let Some(server) = postgres_server() else {
        return Ok(());
    };
    let database = fresh_database(&server).await?;
    let mut c = Fleet::start_on(Some(database), |t| t, |_| Ok(Vec::new()))?;
    let port2 = free_tcp_port()?;
    let _second = c.second_controller(port2)?;
    let url2 = format!("https://127.0.0.1:{port2}");
    c.fallback = Some(url2.clone());

    // Nodes enrol through the first controller...
    c.enrol_relay("relay-1")?;
    c.enrol_agent("a")?;
    c.enrol_agent("b")?;
    c.wait_relays_healthy(1)?;
    // ...the link is created through the second, and bytes flow: the
    // first controller's long polls hear of it.
    let target = hash_server().await?;
    let listen = format!("tcp://127.0.0.1:{}", free_tcp_port()?);
    c.ctl_at(
        &url2,
        &[
            "link",
            "create",
            "demo",
            "--from",
            "a",
            "--listen",
            &listen,
            "--to",
            "b",
            "--target",
            &format!("tcp://{target}"),
        ],
    )?;
    let addr = listen_addr(c.agent("a")?, "demo")?;
    round_trip_eventually(addr, 1 << 20)
        .await
        .with_context(|| c.logs())?;
    let listed = c.ctl_ok(&["link", "list"])?;
    ensure!(listed.contains("demo"), "{listed}");

    // A JWT used at one controller is refused at the other.
    let token = c.jwt("a", comsat_node::unix_now(), 50)?;
    let (code, body) = raw_get(&c, api::PATH_AGENT_CONFIG, &token).await?;
    ensure!(code == 200, "first use: {code} {body}");
    let (code, body) = raw_get_at(&c, &url2, api::PATH_AGENT_CONFIG, &token).await?;
    ensure!(
        code == 401,
        "the same JWT at the second controller: {code} {body}"
    );
    let audit = c.ctl_at(&url2, &["audit", "list", "-o", "json"])?;
    ensure!(audit.contains("replayed"), "{audit}");

    one_join_token_redeemed_at_both_controllers_wins_once(&c, &url2)?;

    // The first controller dies: relays and agents go on with the second
    // (they were enrolled with it as a fallback), and a link created there
    // reaches them.
    c.controller.take().context("controller")?.kill();
    let target2 = hash_server().await?;
    let listen2 = format!("tcp://127.0.0.1:{}", free_tcp_port()?);
    c.ctl_at(
        &url2,
        &[
            "link",
            "create",
            "after",
            "--from",
            "a",
            "--listen",
            &listen2,
            "--to",
            "b",
            "--target",
            &format!("tcp://{target2}"),
        ],
    )?;
    let addr2 = listen_addr(c.agent("a")?, "after")?;
    round_trip_eventually(addr2, 1 << 20)
        .await
        .with_context(|| c.logs())?;
    // The relay heartbeats to the second controller: it stays healthy.
    tokio::time::sleep(Duration::from_secs(16)).await;
    let relays = c.ctl_at(&url2, &["relay", "list", "-o", "json"])?;
    let relays: Vec<api::RelayInfo> = serde_json::from_str(&relays)?;
    ensure!(
        relays.len() == 1 && relays[0].healthy,
        "the relay is still healthy at the second controller: {relays:?}"
    );
    round_trip(addr, 1 << 20, 3).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_the_controller_certificate_drops_no_agent() -> Result<()> {
    use comsat_controller::pki::CaIssuer;
    let (c, listen, target) = demo().await?;
    round_trip_eventually(listen, 1024)
        .await
        .with_context(|| c.logs())?;
    let url = controller_url(&c)?;
    let before = served_controller_cert(&c, &url)?;
    let dir = c.path("controller");

    // A broken certificate is refused; the current one is still served.
    std::fs::write(dir.join("tls.crt.bak"), std::fs::read(dir.join("tls.crt"))?)?;
    write_then_rename(&dir.join("tls.crt"), b"not a certificate")?;
    wait_for(CONVERGE, || {
        let log = std::fs::read_to_string(c.path("controller.log"))?;
        ensure!(
            log.contains("new HTTPS certificate refused"),
            "not refused yet"
        );
        Ok(())
    })?;
    ensure!(served_controller_cert(&c, &url)? == before);

    // A new certificate from the same CA, written key first: served to new
    // connections within seconds.
    let issuer = CaIssuer::from_pem(
        &std::fs::read_to_string(dir.join("ca.pem"))?,
        &std::fs::read_to_string(dir.join("ca.key"))?,
    )?;
    let (cert, key) = issuer.issue_server(
        vec!["127.0.0.1".into(), "localhost".into()],
        comsat_node::unix_now(),
        Duration::from_secs(3600),
    )?;
    comsat_node::keys::write_secret_file(&dir.join("tls.key"), key.as_bytes())?;
    write_then_rename(&dir.join("tls.crt"), cert.as_bytes())?;
    let want = comsat_controller::pki::certs_from_pem(cert.as_bytes())?[0]
        .as_ref()
        .to_vec();
    wait_for(CONVERGE, || {
        ensure!(
            served_controller_cert(&c, &url)? == want,
            "old certificate still served:\n{}",
            std::fs::read_to_string(c.path("controller.log")).unwrap_or_default()
        );
        Ok(())
    })?;

    // The agents, long-polling all along, still hear of changes: a new
    // link reaches them and carries bytes; the old one goes on.
    let mut c = c;
    let addr2 = c.create_link("after-rotation", target, &[])?;
    round_trip_eventually(addr2, 1 << 20)
        .await
        .with_context(|| c.logs())?;
    round_trip(listen, 1 << 20, 5).await?;
    for agent in ["a", "b"] {
        let log = std::fs::read_to_string(c.path(&format!("{agent}.log")))?;
        ensure!(
            !log.contains("cannot reach the controller"),
            "agent {agent} lost the controller during the rotation:\n{log}"
        );
    }
    Ok(())
}

/// A relay's host vanishes under a link whose agent B is idle. Agent A,
/// which sends, notices the silence (its watchdog) and moves to the next
/// relay; the controller hears of it and tells B, which follows at once
/// instead of noticing at its next keep-alive. The flow A opened
/// meanwhile carries its bytes once both are there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_peer_follows_its_peer_off_a_vanished_relay() -> Result<()> {
    use comsat_tests::{metric, scrape};
    let mut c = Fleet::builder().relays(2).agents(&["a", "b"]).start()?;
    let target = hash_server().await?;
    let listen = c.create_link("follow", target, &[])?;
    round_trip_eventually(listen, 1 << 20)
        .await
        .with_context(|| c.logs())?;
    // B goes idle: its last acknowledgements (sent within 100 ms of the
    // bytes) are answered before the relay vanishes, so B has nothing
    // outstanding there and no reason to notice the silence itself.
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The relay both agents are on vanishes: frozen, it answers nothing
    // (it is killed, by PID, with the fleet).
    let mut on = None;
    for (name, p, _, admin) in &c.relays {
        if metric(&scrape(*admin)?, "comsat_relay_links_paired") == 1.0 {
            on = Some((name.clone(), p.pid()));
        }
    }
    let (name, pid) = on.context("no relay pairs the link")?;
    comsat_tests::proc::signal(pid, "STOP")?;
    eprintln!("froze {name}");
    // B is idle; A opens a flow and sends.
    round_trip(listen, 1 << 20, 7)
        .await
        .with_context(|| c.logs())?;
    let agent = |n: &str| -> Result<String> {
        let admin = c.agents.iter().find(|a| a.0 == n).context("agent")?.2;
        scrape(admin)
    };
    let (a, b) = (agent("a")?, agent("b")?);
    ensure!(
        metric(&a, "comsat_agent_relay_silences_total") >= 1.0,
        "A did not notice the silence itself:\n{a}\n{}",
        c.logs()
    );
    ensure!(
        metric(&b, "comsat_agent_peer_moves_total") >= 1.0
            && metric(&b, "comsat_agent_relay_silences_total") == 0.0,
        "B did not follow A on the controller's word:\n{b}\n{}",
        c.logs()
    );
    Ok(())
}
