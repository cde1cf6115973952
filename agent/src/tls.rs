//! TLS towards relays: the relay certificate must chain to a pinned CA or
//! match a pinned SHA-256.

use std::sync::Arc;
use std::time::Duration;

use comsat_protocol::ALPN;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::config::RelayEndpoint;
use crate::defaults;

/// Builds the QUIC client configuration for `relay`.
pub fn client_config(relay: &RelayEndpoint) -> Result<quinn::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?;
    let mut tls = match (&relay.ca_file, &relay.cert_sha256) {
        (Some(ca), None) => {
            let bytes = std::fs::read(ca).map_err(|e| format!("ca_file {}: {e}", ca.display()))?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&bytes) {
                let cert = cert.map_err(|e| format!("ca_file {}: {e}", ca.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("ca_file {}: {e}", ca.display()))?;
            }
            if roots.is_empty() {
                return Err(format!(
                    "ca_file {}: no PEM certificate in it",
                    ca.display()
                ));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        (None, Some(pin)) => {
            let mut want = [0u8; 32];
            hex::decode_to_slice(pin.trim(), &mut want)
                .map_err(|_| format!("cert_sha256 `{pin}`: expected 64 hex digits"))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedCert { want, provider }))
                .with_no_client_auth()
        }
        _ => return Err("set exactly one of relay.ca_file or relay.cert_sha256".into()),
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.enable_early_data = false;
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(defaults::MAX_INCOMING_FLOWS.into())
        .max_concurrent_uni_streams(0u32.into())
        .receive_window(defaults::CONNECTION_RECEIVE_WINDOW.into())
        .stream_receive_window(defaults::STREAM_RECEIVE_WINDOW.into())
        .keep_alive_interval(Some(defaults::KEEP_ALIVE_INTERVAL))
        .max_idle_timeout(quinn::IdleTimeout::try_from(defaults::IDLE_TIMEOUT).ok());
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(10u32.into())
        .max_ack_delay(Some(Duration::from_millis(5)));
    t.ack_frequency_config(Some(ack));
    config.transport_config(Arc::new(t));
    Ok(config)
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
