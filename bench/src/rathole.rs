//! The rathole baseline: a rathole server (where users connect) and a
//! rathole client (beside the service) joined by one tunnel, over plain TCP
//! or over Noise (`Noise_NK_25519_ChaChaPoly_BLAKE2s`, rathole's default).
//! One hop: rathole has no relay between two NATed ends.

use std::net::SocketAddr;

use anyhow::Result;
use base64::Engine as _;

use crate::chain::{Chain, free_port};

/// Whether rathole is installed (`bench/peers.sh` builds it).
pub(crate) fn available() -> bool {
    crate::chain::available("rathole", "--version")
}

/// rathole's transport.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Transport {
    Tcp,
    Noise,
}

/// Starts a server and a client in front of `sink` (bulk) and `echo` (ping).
pub(crate) fn start(transport: Transport, sink: SocketAddr, echo: SocketAddr) -> Result<Chain> {
    let dir = tempfile::tempdir()?;
    let control = free_port()?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let (server_t, client_t) = match transport {
        Transport::Tcp => (
            "[server.transport]\ntype = \"tcp\"\n".to_owned(),
            "[client.transport]\ntype = \"tcp\"\n".to_owned(),
        ),
        Transport::Noise => {
            let keys = snow::Builder::new("Noise_NK_25519_ChaChaPoly_BLAKE2s".parse()?)
                .generate_keypair()?;
            (
                format!(
                    "[server.transport]\ntype = \"noise\"\n[server.transport.noise]\n\
                     local_private_key = \"{}\"\n",
                    b64.encode(&keys.private)
                ),
                format!(
                    "[client.transport]\ntype = \"noise\"\n[client.transport.noise]\n\
                     remote_public_key = \"{}\"\n",
                    b64.encode(&keys.public)
                ),
            )
        }
    };
    let mut server = format!("[server]\nbind_addr = \"127.0.0.1:{control}\"\n{server_t}");
    let mut client = format!("[client]\nremote_addr = \"127.0.0.1:{control}\"\n{client_t}");
    let mut entries = Vec::new();
    for (name, target) in [("bulk", sink), ("ping", echo)] {
        let entry = free_port()?;
        server.push_str(&format!(
            "[server.services.{name}]\nbind_addr = \"127.0.0.1:{entry}\"\ntoken = \"bench-{name}\"\n"
        ));
        client.push_str(&format!(
            "[client.services.{name}]\nlocal_addr = \"{target}\"\ntoken = \"bench-{name}\"\n"
        ));
        entries.push(SocketAddr::from(([127, 0, 0, 1], entry)));
    }
    let mut chain = Chain::new(dir, entries[0], entries[1]);
    for (name, conf) in [("server", server), ("client", client)] {
        let path = chain.dir().join(format!("{name}.toml"));
        std::fs::write(&path, conf)?;
        chain.spawn(name, "rathole", &[&path])?;
    }
    Ok(chain)
}
