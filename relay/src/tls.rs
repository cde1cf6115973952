//! The relay's TLS and QUIC configuration.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use comsat_protocol::ALPN;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::RelayConfig;
use crate::defaults;
use crate::error::RelayError;

/// Builds the QUIC server configuration from the certificate files and
/// limits in `config`.
pub fn server_config(config: &RelayConfig) -> Result<quinn::ServerConfig, RelayError> {
    let certs = load_certs(&config.tls_cert)?;
    let key = load_key(&config.tls_key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| RelayError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            RelayError::Tls(format!(
                "{} and {} do not form a usable certificate and key: {e}",
                config.tls_cert.display(),
                config.tls_key.display()
            ))
        })?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| RelayError::Tls(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(transport_config(config)));
    Ok(server)
}

fn transport_config(config: &RelayConfig) -> quinn::TransportConfig {
    let l = &config.limits;
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(l.max_streams_per_connection.saturating_add(1).into())
        .max_concurrent_uni_streams(0u32.into())
        .receive_window(l.connection_receive_window.into())
        .stream_receive_window(l.stream_receive_window.into())
        .send_window(defaults::SEND_WINDOW)
        .keep_alive_interval(Some(defaults::KEEP_ALIVE_INTERVAL))
        .datagram_receive_buffer_size(None);
    let idle = Duration::from_millis(l.idle_timeout_ms);
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(10u32.into())
        .max_ack_delay(Some(Duration::from_millis(5)));
    t.ack_frequency_config(Some(ack));
    t.max_idle_timeout(quinn::IdleTimeout::try_from(idle).ok());
    t
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, RelayError> {
    let bytes = std::fs::read(path).map_err(|source| RelayError::Io {
        path: path.to_owned(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            RelayError::Tls(format!(
                "{}: not a PEM certificate chain: {e}",
                path.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(RelayError::Tls(format!(
            "{}: no certificate found (expected PEM `BEGIN CERTIFICATE` blocks)",
            path.display()
        )));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, RelayError> {
    let text = comsat_protocol::keys::read_secret_file(path)?;
    PrivateKeyDer::from_pem_slice(text.as_bytes()).map_err(|e| {
        RelayError::Tls(format!(
            "{}: not a PEM private key (PKCS#8, PKCS#1 or SEC1): {e}",
            path.display()
        ))
    })
}

/// Label of the stateless-reset key derivation, version 1.
const RESET_KEY_LABEL: &[u8] = b"comsat relay stateless reset v1\0";

/// Label of the connection-id key derivation, version 1.
const CID_KEY_LABEL: &[u8] = b"comsat relay connection id v1\0";

fn derive(label: &[u8], secret: &[u8]) -> ring::digest::Digest {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(label);
    ctx.update(secret);
    ctx.finish()
}

/// The QUIC endpoint configuration, with the stateless-reset key and the
/// connection-id key derived from the relay's TLS private key: a relay
/// restarted with the same key recognizes the connection ids of its
/// previous run and resets those connections as soon as their packets
/// arrive, so agents notice a restart in one round trip instead of an idle
/// timeout.
pub fn endpoint_config(config: &RelayConfig) -> Result<quinn::EndpointConfig, RelayError> {
    let text = comsat_protocol::keys::read_secret_file(&config.tls_key)?;
    let reset = derive(RESET_KEY_LABEL, text.as_bytes());
    let cid = derive(CID_KEY_LABEL, text.as_bytes());
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&cid.as_ref()[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    let mut endpoint = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        reset.as_ref(),
    )));
    endpoint.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    Ok(endpoint)
}
