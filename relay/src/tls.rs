//! The relay's TLS and QUIC configuration.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use comsat_protocol::ALPN;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::config::RelayConfig;
use crate::defaults;
use crate::error::RelayError;

/// The relay's certificate, swapped in place when its files change (a
/// renewed certificate is served to new connections without a restart).
#[derive(Debug)]
pub struct CertSlot {
    files: RwLock<(PathBuf, PathBuf)>,
    current: RwLock<(Arc<CertifiedKey>, Option<SystemTime>)>,
    /// The stamp of a certificate file that failed to load (so it is
    /// reported once, not on every poll).
    failed: RwLock<Option<SystemTime>>,
}

fn read<T: Clone>(l: &RwLock<T>) -> T {
    match l.read() {
        Ok(v) => v.clone(),
        Err(p) => p.into_inner().clone(),
    }
}

fn write<T>(l: &RwLock<T>, v: T) {
    match l.write() {
        Ok(mut g) => *g = v,
        Err(p) => *p.into_inner() = v,
    }
}

impl CertSlot {
    /// Loads the certificate chain and key.
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<Self>, RelayError> {
        let stamp = modified(cert);
        let ck = load_certified(cert, key)?;
        Ok(Arc::new(Self {
            files: RwLock::new((cert.to_owned(), key.to_owned())),
            current: RwLock::new((ck, stamp)),
            failed: RwLock::new(None),
        }))
    }

    /// Switches to another certificate and key (a reloaded config may name
    /// new files) and loads them now. On error nothing changes.
    pub fn set_files(&self, cert: &Path, key: &Path) -> Result<(), RelayError> {
        let stamp = modified(cert);
        let ck = load_certified(cert, key)?;
        write(&self.files, (cert.to_owned(), key.to_owned()));
        write(&self.current, (ck, stamp));
        write(&self.failed, None);
        Ok(())
    }

    /// Reloads the files if the certificate file changed since the last
    /// load. A pair that does not load is logged (once per change) and the
    /// old one kept.
    pub fn reload_if_changed(&self) -> bool {
        let (cert, key) = read(&self.files);
        let stamp = modified(&cert);
        let last = read(&self.current).1;
        if stamp == last || (stamp.is_some() && stamp == read(&self.failed)) {
            return false;
        }
        match load_certified(&cert, &key) {
            Ok(ck) => {
                write(&self.current, (ck, stamp));
                write(&self.failed, None);
                tracing::info!(cert = %cert.display(), "certificate reloaded");
                true
            }
            Err(e) => {
                write(&self.failed, stamp);
                tracing::error!(error = %e, "new certificate does not load; keeping the current one (fix the files; they are checked again when they change)");
                false
            }
        }
    }
}

impl ResolvesServerCert for CertSlot {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(match self.current.read() {
            Ok(c) => c.0.clone(),
            Err(p) => p.into_inner().0.clone(),
        })
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn load_certified(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, RelayError> {
    let certs = load_certs(cert)?;
    let der = load_key(key)?;
    let provider = rustls::crypto::ring::default_provider();
    let ck = CertifiedKey::from_der(certs, der, &provider).map_err(|e| {
        RelayError::Tls(format!(
            "{} and {} do not form a usable certificate and key: {e}",
            cert.display(),
            key.display()
        ))
    })?;
    Ok(Arc::new(ck))
}

/// Builds the QUIC server configuration from the certificate in `cert`
/// and the limits in `config`.
pub fn server_config(
    config: &RelayConfig,
    cert: Arc<CertSlot>,
) -> Result<quinn::ServerConfig, RelayError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| RelayError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| RelayError::Tls(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(transport_config(config)));
    // New connections not yet taken or refused (those waiting for an
    // unauthenticated place among them), and what quinn buffers for them:
    // a client's first flight, not what a stranger sends to fill memory.
    server
        .max_incoming(defaults::MAX_WAITING + defaults::MAX_UNAUTHENTICATED)
        .incoming_buffer_size(defaults::INCOMING_BUFFER)
        .incoming_buffer_size_total(defaults::INCOMING_BUFFER_TOTAL);
    Ok(server)
}

fn transport_config(config: &RelayConfig) -> quinn::TransportConfig {
    let l = &config.limits;
    let mut t = quinn::TransportConfig::default();
    // What a stranger gets: its control stream, for the Hello, and a small
    // window. A verified agent gets the configured window and its first
    // flow streams, more as they are used (server::accept).
    t.max_concurrent_bidi_streams(1u32.into())
        .max_concurrent_uni_streams(0u32.into())
        .receive_window(
            l.connection_receive_window
                .min(defaults::PRE_HELLO_WINDOW)
                .into(),
        )
        .stream_receive_window(l.stream_receive_window.into())
        .send_window(defaults::SEND_WINDOW)
        // The agents keep alive (see `defaults::IDLE_TIMEOUT`).
        .keep_alive_interval(None)
        // The links' UDP flows: what a connection sent and the relay has
        // not yet forwarded, and what waits to go out to a connection;
        // beyond either, the oldest datagrams are dropped.
        .datagram_receive_buffer_size(Some(defaults::DATAGRAM_BUFFER))
        .datagram_send_buffer_size(defaults::DATAGRAM_BUFFER);
    let idle = Duration::from_millis(l.idle_timeout_ms);
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(10u32.into())
        .max_ack_delay(Some(Duration::from_millis(5)));
    t.ack_frequency_config(Some(ack));
    t.max_idle_timeout(quinn::IdleTimeout::try_from(idle).ok());
    // BBR, as the agents: random loss on an agent's uplink is not read as
    // congestion (see the bench's `loss` scenario).
    t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
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
    let text = comsat_node::keys::read_secret_file(path)?;
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

fn derive(label: &[u8], endpoint: Endpoint, secret: &[u8]) -> ring::digest::Digest {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(label);
    ctx.update(endpoint.label());
    ctx.update(secret);
    ctx.finish()
}

/// Which of a relay's QUIC endpoints a configuration is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// The main listener (`listen`).
    Main,
    /// The interactive listener (`interactive_listen`).
    Interactive,
}

impl Endpoint {
    fn label(self) -> &'static [u8] {
        match self {
            // The main endpoint's keys are those of relays that had one
            // endpoint: a relay upgraded in place still resets its old
            // connections.
            Self::Main => b"",
            Self::Interactive => b"interactive\0",
        }
    }
}

/// The QUIC endpoint configuration of `endpoint`, with the stateless-reset
/// key and the connection-id key derived from the relay's TLS private key:
/// a relay restarted with the same key recognizes the connection ids of its
/// previous run and resets those connections as soon as their packets
/// arrive, so agents notice a restart in one round trip instead of an idle
/// timeout. Each endpoint derives its own keys (RFC 9000 §10.3.2: a reset
/// token must not be computable for another endpoint's connections): a
/// connection id of the main endpoint is not even valid at the interactive
/// one, which drops the packet instead of answering with a reset.
pub fn endpoint_config(
    config: &RelayConfig,
    endpoint: Endpoint,
) -> Result<quinn::EndpointConfig, RelayError> {
    let text = comsat_node::keys::read_secret_file(&config.tls_key)?;
    let reset = derive(RESET_KEY_LABEL, endpoint, text.as_bytes());
    let cid = derive(CID_KEY_LABEL, endpoint, text.as_bytes());
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&cid.as_ref()[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    let mut quic = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        reset.as_ref(),
    )));
    quic.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    quic.min_reset_interval(defaults::MIN_RESET_INTERVAL);
    Ok(quic)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let (c, k) = (dir.join("tls.crt"), dir.join("tls.key"));
        let tmp = dir.join("tls.crt.tmp");
        std::fs::write(&tmp, cert.pem()).expect("write");
        std::fs::rename(&tmp, &c).expect("rename");
        comsat_node::keys::write_secret_file(&k, key.serialize_pem().as_bytes()).expect("key file");
        (c, k)
    }

    fn served(slot: &CertSlot) -> Vec<u8> {
        match slot.current.read() {
            Ok(c) => c.0.cert[0].as_ref().to_vec(),
            Err(p) => p.into_inner().0.cert[0].as_ref().to_vec(),
        }
    }

    #[test]
    fn a_renewed_certificate_file_is_served_without_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (c, k) = write_pair(dir.path(), "one.example");
        let slot = CertSlot::load(&c, &k).expect("loads");
        let first = served(&slot);
        assert!(!slot.reload_if_changed(), "nothing changed yet");
        // A coarse mtime could hide the change: make it visibly newer.
        std::thread::sleep(Duration::from_millis(20));
        write_pair(dir.path(), "two.example");
        let later = SystemTime::now() + Duration::from_secs(2);
        std::fs::File::options()
            .write(true)
            .open(&c)
            .and_then(|f| f.set_modified(later))
            .expect("touch");
        assert!(slot.reload_if_changed());
        assert_ne!(served(&slot), first);
        // A broken file is refused and the current pair kept.
        std::fs::write(&c, "not a certificate").expect("write");
        let much_later = later + Duration::from_secs(2);
        std::fs::File::options()
            .write(true)
            .open(&c)
            .and_then(|f| f.set_modified(much_later))
            .expect("touch");
        let before = served(&slot);
        assert!(!slot.reload_if_changed());
        assert_eq!(served(&slot), before);
    }
}
