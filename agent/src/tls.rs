//! TLS towards relays: the relay certificate must chain to a pinned CA or
//! match a pinned SHA-256. With a CA and the relay's id (as an enrolled
//! agent's links always have), the certificate must also name that relay
//! ([`comsat_protocol::ids::relay_cert_uri`]): every relay of a fleet holds
//! a certificate from the same CA, and one must not stand in for another
//! that a link's grant names.

use std::sync::Arc;
use std::time::Duration;

use comsat_protocol::limits::MAX_PEM_FILE_LEN;
use comsat_protocol::spiffe::cert_names_relay;
use comsat_protocol::{ALPN, RelayId};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::config::RelayEndpoint;
use crate::defaults;

/// Why a relay's TLS settings cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayTlsError {
    /// The CA file cannot be read or holds no usable certificate.
    #[error("ca_file {path}: {reason}")]
    CaFile {
        /// The file.
        path: std::path::PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The pinned certificate hash is not 64 hex digits.
    #[error("cert_sha256 `{0}`: expected 64 hex digits")]
    Pin(String),
    /// Both or neither of `ca_file` and `cert_sha256`.
    #[error("set exactly one of relay.ca_file or relay.cert_sha256")]
    Trust,
    /// rustls or quinn refused the configuration.
    #[error("{0}")]
    Tls(String),
}

/// Builds the QUIC client configuration for `relay`, kept alive every
/// `keep_alive` ([`defaults::KEEP_ALIVE_INTERVAL`] unless configured).
pub fn client_config(
    relay: &RelayEndpoint,
    keep_alive: Duration,
) -> Result<quinn::ClientConfig, RelayTlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| RelayTlsError::Tls(e.to_string()))?;
    let mut tls = match (&relay.ca_file, &relay.cert_sha256) {
        (Some(ca), None) => {
            let ca_err = |reason: String| RelayTlsError::CaFile {
                path: ca.clone(),
                reason,
            };
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(
                &mut std::io::Read::take(
                    std::fs::File::open(ca).map_err(|e| ca_err(e.to_string()))?,
                    MAX_PEM_FILE_LEN + 1,
                ),
                &mut bytes,
            )
            .map_err(|e| ca_err(e.to_string()))?;
            if bytes.len() as u64 > MAX_PEM_FILE_LEN {
                return Err(ca_err(format!("larger than {MAX_PEM_FILE_LEN} bytes")));
            }
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&bytes) {
                let cert = cert.map_err(|e| ca_err(e.to_string()))?;
                roots.add(cert).map_err(|e| ca_err(e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(ca_err("no PEM certificate in it".into()));
            }
            match relay.relay_id {
                Some(relay_id) => {
                    let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
                        Arc::new(roots),
                        provider.clone(),
                    )
                    .build()
                    .map_err(|e| ca_err(e.to_string()))?;
                    builder
                        .dangerous()
                        .with_custom_certificate_verifier(Arc::new(NamedRelay {
                            inner,
                            relay_id,
                            spiffe_id: relay.spiffe_id.clone(),
                        }))
                        .with_no_client_auth()
                }
                None => builder.with_root_certificates(roots).with_no_client_auth(),
            }
        }
        (None, Some(pin)) => {
            let mut want = [0u8; 32];
            hex::decode_to_slice(pin.trim(), &mut want)
                .map_err(|_| RelayTlsError::Pin(pin.clone()))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedCert { want, provider }))
                .with_no_client_auth()
        }
        _ => return Err(RelayTlsError::Trust),
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.enable_early_data = false;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| RelayTlsError::Tls(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(defaults::MAX_INCOMING_FLOWS.into())
        .max_concurrent_uni_streams(0u32.into())
        .receive_window(defaults::CONNECTION_RECEIVE_WINDOW.into())
        .stream_receive_window(defaults::STREAM_RECEIVE_WINDOW.into())
        .keep_alive_interval(Some(keep_alive))
        .max_idle_timeout(quinn::IdleTimeout::try_from(defaults::idle_timeout(keep_alive)).ok());
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(10u32.into())
        .max_ack_delay(Some(Duration::from_millis(5)));
    t.ack_frequency_config(Some(ack));
    // BBR: random loss (a lossy radio link) is not read as congestion. The
    // bench's `loss` scenario measured one flow keeping ~0.95 of its
    // loss-free throughput at 1 % and 5 % loss where Cubic kept 0.27 and
    // 0.05, with the same loss-free throughput and lower latency beside a
    // bulk flow.
    t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
    config.transport_config(Arc::new(t));
    Ok(config)
}

/// A certificate that chains to the CA and names the server, as `inner`
/// checks, and also names relay `relay_id`: as the X.509-SVID of
/// `spiffe_id`, or in the form of certificates from before relays had
/// SPIFFE IDs.
#[derive(Debug)]
struct NamedRelay {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    relay_id: RelayId,
    spiffe_id: Option<String>,
}

/// The relay certificate names another relay, or none.
#[derive(Debug)]
struct OtherRelay(String);

impl std::fmt::Display for OtherRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for OtherRelay {}

impl ServerCertVerifier for NamedRelay {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified =
            self.inner
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
        if cert_names_relay(end_entity, &self.relay_id, self.spiffe_id.as_deref()) {
            Ok(verified)
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(OtherRelay(format!(
                    "the certificate does not name relay {} ({}), the relay the link's grant \
                     names: another relay holds a certificate from the same CA",
                    self.relay_id,
                    self.spiffe_id.as_deref().unwrap_or("no SPIFFE ID")
                ))))),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Accepts exactly one end-entity certificate, by SHA-256, and still checks
/// that the server holds its private key (TLS 1.3 signature).
#[derive(Debug)]
struct PinnedCert {
    want: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if got == self.want {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_larger_than_the_limit_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("relay-ca.pem");
        std::fs::write(&ca, vec![b'A'; MAX_PEM_FILE_LEN as usize + 1]).expect("write");
        let relay = RelayEndpoint {
            addr: "127.0.0.1:1".into(),
            server_name: "localhost".into(),
            ca_file: Some(ca),
            cert_sha256: None,
            relay_id: None,
            spiffe_id: None,
            lane_addr: None,
        };
        let err = client_config(&relay, defaults::KEEP_ALIVE_INTERVAL).expect_err("too large");
        assert!(
            err.to_string().contains("relay-ca.pem: larger than"),
            "{err}"
        );
    }

    /// A CA, and a certificate for `localhost` it issued with `uris` as
    /// its URI subjectAltNames.
    fn ca_and_leaf(uris: &[String]) -> (CertificateDer<'static>, CertificateDer<'static>) {
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("ca");
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("p");
        for uri in uris {
            params.subject_alt_names.push(rcgen::SanType::URI(
                rcgen::string::Ia5String::try_from(uri.as_str()).expect("uri"),
            ));
        }
        let leaf = params.signed_by(&key, &ca).expect("leaf");
        (ca.der().clone(), leaf.der().clone())
    }

    fn verifier(ca: CertificateDer<'static>, relay_id: RelayId, spiffe_id: &str) -> NamedRelay {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca).expect("root");
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .expect("verifier");
        NamedRelay {
            inner,
            relay_id,
            spiffe_id: Some(spiffe_id.to_owned()),
        }
    }

    fn check(
        v: &NamedRelay,
        leaf: &CertificateDer<'_>,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let name = ServerName::try_from("localhost").expect("name");
        v.verify_server_cert(leaf, &[], &name, &[], UnixTime::now())
    }

    #[test]
    fn a_relay_certificate_must_name_the_relay_the_grant_names() {
        let (x, y) = (RelayId([1; 16]), RelayId([2; 16]));
        let (x_id, y_id) = ("spiffe://td.example/relay/x", "spiffe://td.example/relay/y");
        let (ca, leaf_x) = ca_and_leaf(&[x_id.to_owned()]);
        assert!(check(&verifier(ca.clone(), x, x_id), &leaf_x).is_ok());
        // Relay X's certificate, from the same CA, presented for relay Y.
        let err = check(&verifier(ca, y, y_id), &leaf_x).expect_err("another relay's certificate");
        assert!(
            err.to_string()
                .contains(&format!("does not name relay {y} ({y_id})")),
            "{err}"
        );
        // The same name in another trust domain is another relay.
        let (ca, other_domain) = ca_and_leaf(&["spiffe://other.example/relay/x".to_owned()]);
        assert!(check(&verifier(ca, x, x_id), &other_domain).is_err());
        // An X.509-SVID has one URI: a second one makes it none.
        let (ca, two) = ca_and_leaf(&[x_id.to_owned(), y_id.to_owned()]);
        assert!(check(&verifier(ca.clone(), x, x_id), &two).is_err());
        assert!(check(&verifier(ca, y, y_id), &two).is_err());
        // The form from before relays had SPIFFE IDs names the relay by id.
        let (ca, legacy) = ca_and_leaf(&[format!("urn:comsat:relay:{x}")]);
        assert!(check(&verifier(ca.clone(), x, x_id), &legacy).is_ok());
        assert!(check(&verifier(ca, y, y_id), &legacy).is_err());
        // A certificate that names no relay at all.
        let (ca, plain) = ca_and_leaf(&[]);
        assert!(check(&verifier(ca, x, x_id), &plain).is_err());
        // The CA still decides first: a certificate from another CA fails
        // however it names the relay.
        let (other_ca, _) = ca_and_leaf(&[]);
        assert!(check(&verifier(other_ca, x, x_id), &leaf_x).is_err());
    }
}
