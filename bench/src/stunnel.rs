//! The stunnel baseline: stunnel client -> stunnel relay -> stunnel server,
//! TLS on both hops, certificates verified: the topology of comsat without
//! the end-to-end layer.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// A running chain with two services, `bulk` and `ping`.
pub(crate) struct Chain {
    _dir: tempfile::TempDir,
    procs: Vec<Child>,
    pub(crate) bulk: SocketAddr,
    pub(crate) ping: SocketAddr,
}

impl Drop for Chain {
    fn drop(&mut self) {
        if std::env::var_os("COMSAT_BENCH_KEEP").is_some() {
            let kept =
                std::mem::replace(&mut self._dir, tempfile::TempDir::new().expect("tempdir"));
            let _ = kept.keep();
        }
        for p in &mut self.procs {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Whether stunnel is installed.
pub(crate) fn available() -> bool {
    Command::new("stunnel")
        .arg("-version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

fn service(name: &str, accept: u16, connect: u16, client: bool, dir: &Path) -> String {
    let tls = if client {
        format!(
            "client = yes\nCAfile = {}\nverifyChain = yes\ncheckHost = localhost\n",
            dir.join("ca.pem").display()
        )
    } else {
        format!("cert = {}\n", dir.join("server.pem").display())
    };
    format!("[{name}]\naccept = 127.0.0.1:{accept}\nconnect = 127.0.0.1:{connect}\n{tls}\n")
}

/// Starts the chain in front of `sink` (bulk) and `echo` (ping).
pub(crate) fn start(sink: SocketAddr, echo: SocketAddr) -> Result<Chain> {
    let dir = tempfile::tempdir()?;
    if std::env::var_os("COMSAT_BENCH_KEEP").is_some() {
        eprintln!("stunnel files in {}", dir.path().display());
    }
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "comsat-bench CA");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key)?;
    let key = rcgen::KeyPair::generate()?;
    let mut leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])?;
    leaf.distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    let cert = leaf.signed_by(&key, &ca)?;
    std::fs::write(dir.path().join("ca.pem"), ca.pem())?;
    std::fs::write(
        dir.path().join("server.pem"),
        format!("{}{}", cert.pem(), key.serialize_pem()),
    )?;
    let head = "foreground = yes\npid =\ndebug = 3\n";
    let d = dir.path();
    let mut entries = Vec::new();
    let (mut client, mut relay, mut server) = (head.to_owned(), head.to_owned(), head.to_owned());
    for (name, target) in [("bulk", sink), ("ping", echo)] {
        let (c, r_in, r_mid, s) = (free_port()?, free_port()?, free_port()?, free_port()?);
        client.push_str(&service(name, c, r_in, true, d));
        relay.push_str(&service(&format!("{name}-in"), r_in, r_mid, false, d));
        relay.push_str(&service(&format!("{name}-out"), r_mid, s, true, d));
        server.push_str(&format!(
            "[{name}]\naccept = 127.0.0.1:{s}\nconnect = {target}\ncert = {}\n\n",
            d.join("server.pem").display()
        ));
        entries.push(SocketAddr::from(([127, 0, 0, 1], c)));
    }
    let mut procs = Vec::new();
    for (name, conf) in [("server", server), ("relay", relay), ("client", client)] {
        let path = d.join(format!("{name}.conf"));
        std::fs::write(&path, conf)?;
        let log = std::fs::File::create(d.join(format!("{name}.log")))?;
        procs.push(
            Command::new("stunnel")
                .arg(&path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .context("starting stunnel")?,
        );
    }
    let chain = Chain {
        bulk: entries[0],
        ping: entries[1],
        procs,
        _dir: dir,
    };
    // Wait until the client side accepts.
    let deadline = Instant::now() + Duration::from_secs(10);
    for addr in [chain.bulk, chain.ping] {
        while std::net::TcpStream::connect(addr).is_err() {
            if Instant::now() > deadline {
                bail!("stunnel did not start");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(chain)
}
