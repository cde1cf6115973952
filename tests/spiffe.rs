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
    py_spiffe_agrees(&c, bundle.as_bytes(), &["relay-1", "a", "b"])
}

/// With `COMSAT_TEST_SPIFFE_PYTHON`, py-spiffe parses the certificates of
/// `nodes` in `c` (relays' `tls.crt`, agents' `svid.pem`, with their keys)
/// as X.509-SVIDs of their SPIFFE IDs in [`DOMAIN`], and `bundle` (as the
/// bundle endpoint served it) as the bundle they chain to.
fn py_spiffe_agrees(c: &Fleet, bundle: &[u8], nodes: &[&str]) -> Result<()> {
    let Some(python) = from_env("COMSAT_TEST_SPIFFE_PYTHON", "the py-spiffe check") else {
        return Ok(());
    };
    let bundle_file = c.path("bundle.json");
    std::fs::write(&bundle_file, bundle)?;
    let mut cmd = Command::new(python);
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/spiffe/svids.py"))
        .args(["--trust-domain", DOMAIN, "--bundle"])
        .arg(&bundle_file);
    for node in nodes {
        let (cert, key, id) = match node.strip_prefix("relay-") {
            Some(_) => (
                "tls.crt",
                "tls.key",
                format!("spiffe://{DOMAIN}/relay/{node}"),
            ),
            None => (
                "svid.pem",
                "svid.key",
                format!("spiffe://{DOMAIN}/agent/{node}"),
            ),
        };
        cmd.arg("--svid")
            .arg(c.path(&format!("{node}/{cert}")))
            .arg(c.path(&format!("{node}/{key}")))
            .arg(id);
    }
    passes(cmd, None, "comsat's X.509-SVIDs and SPIFFE bundle")
}

/// Waits until agent `a` of `c` refuses its relay's certificate (its log
/// says `why`), then checks that no byte flows through `listen`'s link.
async fn refuses_the_relay(c: &mut Fleet, why: &str, listen: std::net::SocketAddr) -> Result<()> {
    wait_for(3 * CONVERGE, || {
        let log = c.agent("a")?.log();
        ensure!(log.contains(why), "agent a has not refused the relay");
        Ok(())
    })
    .with_context(|| c.logs())?;
    ensure!(
        round_trip(listen, 1024, 3).await.is_err(),
        "bytes flowed through the refused relay"
    );
    Ok(())
}

/// Runs `openssl ARGS` in `dir`; fails with its output.
fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let mut cmd = Command::new("openssl");
    cmd.current_dir(dir).args(args);
    passes(cmd, None, "its arguments")
}

/// The operator's root CA, made where it stays: `root.pem` and `root.key`
/// in `dir`, as the documentation makes it.
fn make_root(dir: &Path) -> Result<()> {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "root.key",
            "-out",
            "root.pem",
            "-days",
            "3650",
            "-subj",
            "/CN=Example root CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    )
}

/// Signs the CSR of a controller initialised with `--upstream-ca` where
/// the root is (`root_dir`), as the documentation does, and installs the
/// certificate in the controller's data dir.
fn sign_relay_ca(root_dir: &Path, ctl_dir: &Path, domain: &str) -> Result<()> {
    std::fs::copy(ctl_dir.join("relay-ca.csr"), root_dir.join("relay-ca.csr"))?;
    std::fs::write(
        root_dir.join("relay-ca.ext"),
        format!(
            "basicConstraints = critical, CA:TRUE, pathlen:0\n\
             keyUsage = critical, keyCertSign, cRLSign\n\
             subjectAltName = URI:spiffe://{domain}\n"
        ),
    )?;
    openssl(
        root_dir,
        &[
            "x509",
            "-req",
            "-in",
            "relay-ca.csr",
            "-CA",
            "root.pem",
            "-CAkey",
            "root.key",
            "-CAcreateserial",
            "-days",
            "365",
            "-extfile",
            "relay-ca.ext",
            "-out",
            "relay-ca.pem",
        ],
    )?;
    std::fs::copy(root_dir.join("relay-ca.pem"), ctl_dir.join("relay-ca.pem"))?;
    Ok(())
}

/// A controller of trust domain `domain` under the root in `root_dir`,
/// running once its relay CA is signed.
fn site_under(root_dir: &Path, domain: &str) -> Result<Fleet> {
    let root = root_dir.join("root.pem");
    let mut c = Fleet::init_in(
        Net::default(),
        None,
        |t| t,
        |_| {
            Ok(vec![
                "--trust-domain".to_owned(),
                domain.to_owned(),
                "--upstream-ca".to_owned(),
                s(&root),
            ])
        },
    )?;
    let ctl_dir = c.path("controller");
    // Until the relay CA is signed, the controller says what to do.
    let (code, _, err) = comsat(&["controller", "run", "--data-dir", &s(&ctl_dir)])?;
    ensure!(
        code == 2 && err.contains("relay-ca.pem") && err.contains("relay-ca.csr"),
        "{code}: {err}"
    );
    sign_relay_ca(root_dir, &ctl_dir, domain)?;
    c.run_controller()?;
    Ok(c)
}

/// Every file under `dir`, read.
fn files_under(dir: &Path) -> Result<Vec<(std::path::PathBuf, Vec<u8>)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            out.extend(files_under(&path)?);
        } else if path.is_file() {
            out.push((path.clone(), std::fs::read(&path)?));
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_under_an_upstream_root_chains_to_it_and_never_holds_its_key() -> Result<()> {
    if Command::new("openssl").arg("version").output().is_err() {
        eprintln!("openssl is not installed: the upstream root test does not run");
        return Ok(());
    }
    // The operator's root, on a machine of its own (here a directory no
    // controller reads).
    let root_dir = tempfile::tempdir()?;
    make_root(root_dir.path())?;
    let mut a = site_under(root_dir.path(), DOMAIN)?;
    a.enrol_relay("relay-1")?;
    a.enrol_agent("a")?;
    a.enrol_agent("b")?;
    a.wait_relays_healthy(1)?;
    let target = hash_server().await?;
    let listen = a.create_link("demo", target, &[])?;
    round_trip_eventually(listen, 1 << 20)
        .await
        .with_context(|| a.logs())?;

    // What the controller issues chains to the root, as OpenSSL checks it.
    for (cert, what) in [("relay-1/tls.crt", "relay"), ("a/svid.pem", "agent")] {
        wait_for(CONVERGE, || {
            ensure!(a.path(cert).exists(), "no {what} certificate yet");
            Ok(())
        })?;
        let mut cmd = Command::new("openssl");
        cmd.args(["verify", "-CAfile"])
            .arg(root_dir.path().join("root.pem"))
            .arg("-untrusted")
            .arg(a.path("controller/relay-ca.pem"))
            .arg(a.path(cert));
        passes(cmd, None, &format!("the {what}'s certificate chain"))?;
    }
    // The bundle is the root.
    let url = controller_url(&a)?;
    let bundle: api::SpiffeBundle = http_client(&a)?
        .get(format!("{url}{}", api::PATH_SPIFFE_BUNDLE))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let root_der = comsat_node::client::read_ca_pem(&std::fs::read_to_string(
        root_dir.path().join("root.pem"),
    )?)?;
    use base64::Engine;
    let x5c = base64::engine::general_purpose::STANDARD.decode(&bundle.keys[0].x5c[0])?;
    ensure!(
        bundle.keys.len() == 1 && x5c == root_der[0].as_ref(),
        "the bundle is not the root: {bundle:?}"
    );

    py_spiffe_agrees(&a, &serde_json::to_vec(&bundle)?, &["relay-1", "a"])?;

    // The root's key is nowhere on the controller's or the nodes' side.
    let root_key = std::fs::read_to_string(root_dir.path().join("root.key"))?;
    let body: String = root_key
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    for (path, bytes) in files_under(a.dir.path())? {
        let text = String::from_utf8_lossy(&bytes).replace(['\n', '\r'], "");
        ensure!(
            !text.contains(&body),
            "{} holds the root's key",
            path.display()
        );
    }

    a_compromised_site_cannot_pose_as_a_relay(&mut a, root_dir.path(), listen).await
}

/// A second site under the same root as `a` (in `root_dir`), with a trust
/// domain of its own, is compromised: its CA makes a certificate with site
/// A's relay's SPIFFE ID and host, and one of its relays serves it at site
/// A's relay's address. Site A's agents refuse it, and no byte flows
/// through it to `listen`'s link.
async fn a_compromised_site_cannot_pose_as_a_relay(
    a: &mut Fleet,
    root_dir: &Path,
    listen: std::net::SocketAddr,
) -> Result<()> {
    let mut b = site_under(root_dir, "site-b.example")?;
    b.enrol_relay_only("relay-1")?;
    let b_dir = b.path("relay-1");
    let forged = forge_relay_cert(&b, &b_dir, &format!("spiffe://{DOMAIN}/relay/relay-1"))?;
    std::fs::write(b_dir.join("tls.crt"), &forged)?;
    std::fs::write(root_dir.join("forged.pem"), &forged)?;
    // It does chain to the shared root: an agent trusting the root would
    // take it.
    let mut cmd = Command::new("openssl");
    cmd.current_dir(root_dir).args([
        "verify",
        "-CAfile",
        "root.pem",
        "-untrusted",
        "forged.pem",
        "forged.pem",
    ]);
    passes(cmd, None, "the forged certificate's chain")?;
    let a_relay = a.relays[0].2;
    let a_admin = a.agents.iter().find(|x| x.0 == "a").context("agent a")?.2;
    let failures = || -> Result<f64> {
        Ok(comsat_tests::proc::metric(
            &comsat_tests::proc::scrape(a_admin)?,
            "comsat_agent_relay_connect_failures_total",
        ))
    };
    let before = failures()?;
    // Site A's relay stops (it tells its agents), and the impostor takes
    // its address.
    a.relays[0].1.interrupt()?;
    wait_for(CONVERGE, || {
        ensure!(!a.relays[0].1.is_running(), "site A's relay still runs");
        Ok(())
    })?;
    let _impostor = comsat_tests::proc::Proc::spawn(
        bin(),
        "impostor",
        &[
            "relay",
            "run",
            "--data-dir",
            &s(&b_dir),
            "--listen",
            &a_relay.to_string(),
            "--admin",
            "127.0.0.1:0",
        ],
        b.dir.path(),
    )?;
    // Site A's agents anchor relay certificates at site A's CA, not at the
    // root: they refuse it, and no byte flows.
    refuses_the_relay(a, "UnknownIssuer", listen).await?;
    ensure!(failures()? > before, "the refusal is not counted");
    Ok(())
}

/// A certificate of site `b`'s CA for `key`, a relay at 127.0.0.1 named
/// `spiffe_id`, as any SPIFFE issuer of site B's trust domain could make
/// it; with site B's CA certificate, the chain.
fn relay_cert_of_site(
    b: &Fleet,
    key: &rcgen::KeyPair,
    spiffe_id: &str,
) -> Result<(String, String)> {
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(b.path("controller/relay-ca.key"))?)?;
    let ca_pem = std::fs::read_to_string(b.path("controller/relay-ca.pem"))?;
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
    let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])?;
    params
        .subject_alt_names
        .push(rcgen::SanType::URI(rcgen::string::Ia5String::try_from(
            spiffe_id,
        )?));
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    Ok((params.signed_by(key, &issuer)?.pem(), ca_pem))
}

/// Site `b`'s relay certificate for the key of its relay in `relay_dir`,
/// naming `spiffe_id`, followed by site B's CA certificate.
fn forge_relay_cert(b: &Fleet, relay_dir: &Path, spiffe_id: &str) -> Result<String> {
    let key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(relay_dir.join("tls.key"))?)?;
    let (leaf, ca) = relay_cert_of_site(b, &key, spiffe_id)?;
    Ok(leaf + &ca)
}

/// A new key, and site `b`'s certificate for it naming `spiffe_id`:
/// (certificate PEM, key PEM).
fn issued_by_site(b: &Fleet, spiffe_id: &str) -> Result<(String, String)> {
    let key = rcgen::KeyPair::generate()?;
    let (leaf, _) = relay_cert_of_site(b, &key, spiffe_id)?;
    Ok((leaf, key.serialize_pem()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_take_a_relay_of_another_trust_domain_only_while_it_is_federated() -> Result<()> {
    // Site B: its trust domain's CA issues the SVID of a relay at its edge.
    let b = Fleet::start_with(
        |t| t,
        |_| {
            Ok(vec![
                "--trust-domain".to_owned(),
                "site-b.example".to_owned(),
            ])
        },
    )?;
    let edge_id = "spiffe://site-b.example/relay/edge-1";
    let (chain, key) = issued_by_site(&b, edge_id)?;
    let own = tempfile::tempdir()?;
    let (cert_file, key_file) = (own.path().join("edge.crt"), own.path().join("edge.key"));
    std::fs::write(&cert_file, &chain)?;
    std::fs::write(&key_file, &key)?;
    std::fs::set_permissions(
        &key_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )?;
    let own_cert = ["--tls-cert", &s(&cert_file), "--tls-key", &s(&key_file)];

    // Site A does not federate with site B yet: the relay cannot enrol.
    let mut a = Fleet::start_with(
        |t| t,
        |_| Ok(vec!["--trust-domain".to_owned(), DOMAIN.to_owned()]),
    )?;
    let err = a
        .enrol_relay_only_with("edge-0", &own_cert)
        .expect_err("site B is not federated");
    ensure!(
        format!("{err:#}").contains("does not federate with"),
        "{err:#}"
    );

    // Federated with site B's bundle, as its bundle endpoint serves it.
    let bundle = http_client(&b)?
        .get(format!(
            "{}{}",
            controller_url(&b)?,
            api::PATH_SPIFFE_BUNDLE
        ))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    let bundle_file = a.path("site-b.bundle.json");
    std::fs::write(&bundle_file, &bundle)?;
    a.ctl_ok(&[
        "bundle",
        "set",
        "site-b.example",
        "--file",
        &s(&bundle_file),
    ])?;
    let listed = a.ctl_ok(&["bundle", "list"])?;
    ensure!(listed.contains("site-b.example"), "{listed}");
    a.enrol_relay_only_with("edge-1", &own_cert)?;
    a.run_relay("edge-1")?;
    a.enrol_agent("a")?;
    a.enrol_agent("b")?;
    a.wait_relays_healthy(1)?;
    let relays: Vec<api::RelayInfo> =
        serde_json::from_str(&a.ctl_ok(&["relay", "list", "-o", "json"])?)?;
    ensure!(
        relays[0].spiffe_id.as_deref() == Some(edge_id),
        "{relays:?}"
    );
    let target = hash_server().await?;
    let listen = a.create_link("demo", target, &[])?;
    round_trip_eventually(listen, 1 << 20)
        .await
        .with_context(|| a.logs())?;

    // No longer federated: an agent that connects anew refuses the relay.
    a.ctl_ok(&["bundle", "delete", "site-b.example"])?;
    let anchor = a.path("a/bundles/site-b.example.pem");
    wait_for(CONVERGE, || {
        ensure!(!anchor.exists(), "agent a still holds site B's bundle");
        Ok(())
    })
    .with_context(|| a.logs())?;
    a.agent("a")?.kill();
    a.run_agent("a")?;
    refuses_the_relay(&mut a, "invalid peer certificate", listen).await
}
