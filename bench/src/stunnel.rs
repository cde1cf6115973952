//! The stunnel baseline: stunnel client -> stunnel relay -> stunnel server,
//! TLS on both hops, certificates verified: the topology of comsat without
//! the end-to-end layer.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Result;

use crate::chain::{Chain, free_port};

/// Whether stunnel is installed.
pub(crate) fn available() -> bool {
    crate::chain::available("stunnel", "-version")
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
    let d = dir.path().to_owned();
    let mut entries = Vec::new();
    let (mut client, mut relay, mut server) = (head.to_owned(), head.to_owned(), head.to_owned());
    for (name, target) in [("bulk", sink), ("ping", echo)] {
        let (c, r_in, r_mid, s) = (free_port()?, free_port()?, free_port()?, free_port()?);
        client.push_str(&service(name, c, r_in, true, &d));
        relay.push_str(&service(&format!("{name}-in"), r_in, r_mid, false, &d));
        relay.push_str(&service(&format!("{name}-out"), r_mid, s, true, &d));
        server.push_str(&format!(
            "[{name}]\naccept = 127.0.0.1:{s}\nconnect = {target}\ncert = {}\n\n",
            d.join("server.pem").display()
        ));
        entries.push(SocketAddr::from(([127, 0, 0, 1], c)));
    }
    let mut chain = Chain::new(dir, entries[0], entries[1]);
    for (name, conf) in [("server", server), ("relay", relay), ("client", client)] {
        let path = d.join(format!("{name}.conf"));
        std::fs::write(&path, conf)?;
        chain.spawn(name, "stunnel", &[&path])?;
    }
    Ok(chain)
}
