//! SPIFFE identities end to end, with the real `comsat` binary as
//! processes: a controller initialised with a trust domain issues its
//! relay and agents X.509-SVIDs with their SPIFFE IDs, agents reach the
//! relay by its SPIFFE ID, an agent renews its SVID, `ctl` shows the IDs,
//! and the bundle endpoint serves the trust domain's authorities. With
//! `COMSAT_TEST_SPIFFE_PYTHON` (a Python with py-spiffe), an independent
//! SPIFFE library parses the SVIDs and the bundle.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, ensure};
use comsat_protocol::api;
use comsat_protocol::spiffe::svid_spiffe_id;
use comsat_tests::fleet::*;
use comsat_tests::tools::{from_env, passes};

const DOMAIN: &str = "site-a.example";

/// The SPIFFE ID of the first certificate in the PEM file at `path`, and
/// that certificate's notAfter.
fn svid_of(path: &Path) -> Result<(Option<String>, i64)> {
    let pem = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let der = comsat_node::client::read_ca_pem(&pem)?;
    let first = der.first().context("no certificate")?;
    let (_, cert) = x509_parser::parse_x509_certificate(first.as_ref())?;
    Ok((
        svid_spiffe_id(first.as_ref()),
        cert.validity().not_after.timestamp(),
    ))
}

/// A certificate for the key in `key_file` that runs out in 20 s and is no
/// SVID (self-signed, no URI).
fn dying_certificate(key_file: &Path) -> Result<String> {
    let key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(key_file)?)?;
    let mut params = rcgen::CertificateParams::new(vec!["agent.example".to_owned()])?;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::seconds(100);
    params.not_after = now + time::Duration::seconds(20);
    Ok(params.self_signed(&key)?.pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_and_agents_hold_x509_svids_of_the_trust_domain() -> Result<()> {
    let mut c = Fleet::start_with(
        |t| t,
        |_| Ok(vec!["--trust-domain".to_owned(), DOMAIN.to_owned()]),
    )?;
    c.enrol_relay("relay-1")?;
    c.enrol_agent("a")?;
    c.enrol_agent("b")?;
    c.wait_relays_healthy(1)?;

    // The relay's certificate is its SVID, and agents reach the relay by
    // it: they check the SPIFFE ID the controller names for the relay.
    let relay_id = format!("spiffe://{DOMAIN}/relay/relay-1");
    let (id, _) = svid_of(&c.path("relay-1/tls.crt"))?;
    ensure!(id.as_deref() == Some(relay_id.as_str()), "relay: {id:?}");
    let target = hash_server().await?;
    let listen = c.create_link("demo", target, &[])?;
    round_trip_eventually(listen, 1 << 20)
        .await
        .with_context(|| c.logs())?;

    // Each agent gets an SVID for a key of its own.
    for name in ["a", "b"] {
        let svid = c.path(&format!("{name}/svid.pem"));
        wait_for(CONVERGE, || {
            ensure!(svid.exists(), "no SVID yet");
            Ok(())
        })
        .with_context(|| c.logs())?;
        let (id, _) = svid_of(&svid)?;
        let want = format!("spiffe://{DOMAIN}/agent/{name}");
        ensure!(id.as_deref() == Some(want.as_str()), "agent {name}: {id:?}");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(c.path(&format!("{name}/svid.key")))?.permissions(),
        );
        ensure!(mode & 0o077 == 0, "svid.key is mode {mode:o}");
    }

    // `ctl` shows the IDs and the trust domain.
    let relays: Vec<api::RelayInfo> =
        serde_json::from_str(&c.ctl_ok(&["relay", "list", "-o", "json"])?)?;
    ensure!(
        relays[0].spiffe_id.as_deref() == Some(relay_id.as_str()),
        "{relays:?}"
    );
    let agents = c.ctl_ok(&["agent", "list"])?;
    ensure!(
        agents.contains("SPIFFE ID") && agents.contains(&format!("spiffe://{DOMAIN}/agent/b")),
        "{agents}"
    );
    let status = c.ctl_ok(&["status"])?;
    ensure!(
        status.contains(&format!("trust domain: spiffe://{DOMAIN}")),
        "{status}"
    );

    // The bundle endpoint: public, the relay CA as an X.509 authority.
    let url = controller_url(&c)?;
    let bundle = http_client(&c)?
        .get(format!("{url}{}", api::PATH_SPIFFE_BUNDLE))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    let parsed: api::SpiffeBundle = serde_json::from_str(&bundle)?;
    ensure!(
        parsed.keys.len() == 1 && parsed.keys[0].use_ == "x509-svid",
        "{bundle}"
    );

    // An agent renews an SVID that runs out (here one that is no SVID at
    // all, for its key), without a restart of anything else.
    let (svid, key) = (c.path("a/svid.pem"), c.path("a/svid.key"));
    c.agent("a")?.kill();
    let dying = dying_certificate(&key)?;
    std::fs::write(&svid, &dying)?;
    c.run_agent("a")?;
    wait_for(CONVERGE, || {
        ensure!(std::fs::read_to_string(&svid)? != dying, "not renewed yet");
        Ok(())
    })
    .with_context(|| c.logs())?;
    let (id, not_after) = svid_of(&svid)?;
    ensure!(
        id.as_deref() == Some(format!("spiffe://{DOMAIN}/agent/a").as_str()),
        "renewed: {id:?}"
    );
    ensure!(
        not_after > time::OffsetDateTime::now_utc().unix_timestamp() + 1800,
        "the renewed SVID lives its configured hour"
    );

    // An independent SPIFFE library agrees.
    let Some(python) = from_env("COMSAT_TEST_SPIFFE_PYTHON", "the py-spiffe check") else {
        return Ok(());
    };
    let bundle_file = c.path("bundle.json");
    std::fs::write(&bundle_file, &bundle)?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/spiffe/svids.py");
    let mut cmd = Command::new(python);
    cmd.arg(script)
        .args(["--trust-domain", DOMAIN, "--bundle"])
        .arg(&bundle_file);
    let svids = [
        ("relay-1/tls.crt", "relay-1/tls.key", relay_id.clone()),
        (
            "a/svid.pem",
            "a/svid.key",
            format!("spiffe://{DOMAIN}/agent/a"),
        ),
        (
            "b/svid.pem",
            "b/svid.key",
            format!("spiffe://{DOMAIN}/agent/b"),
        ),
    ];
    for (cert, key, id) in &svids {
        cmd.arg("--svid").arg(c.path(cert)).arg(c.path(key)).arg(id);
    }
    passes(cmd, None, "comsat's X.509-SVIDs and SPIFFE bundle")
}
