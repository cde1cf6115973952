//! Certificates: the controller's CAs, its TLS server certificate, relay
//! certificates issued from CSRs, and PEM helpers.

use std::sync::Arc;
use std::time::Duration;

use comsat_protocol::endpoint::split_host_port;
pub use comsat_protocol::endpoint::valid_host;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

/// A certificate operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// rcgen refused.
    #[error("{what}: {source}")]
    Rcgen {
        /// What was being done.
        what: &'static str,
        /// The cause.
        source: rcgen::Error,
    },
    /// PEM input did not parse.
    #[error("{0}")]
    Pem(String),
    /// rustls refused the certificate or key.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// A certificate chain and a private key that do not belong together.
    #[error(
        "the key does not match the certificate: {0} \
         (install the key the certificate was issued for)"
    )]
    KeyMismatch(rustls::Error),
    /// A certificate chain with no certificate in it.
    #[error("no certificate")]
    NoCertificate,
    /// The CA that nodes pin cannot anchor a chain.
    #[error("the pinned CA is unusable: {0}")]
    PinnedCaUnusable(rustls::Error),
    /// No verifier could be built on the pinned CA.
    #[error("the pinned CA is unusable: {0}")]
    Verifier(#[from] rustls::client::VerifierBuilderError),
    /// The controller's host is not a name a certificate can be checked for.
    #[error("{host}: {source} (fix the host of public_url)")]
    InvalidHost {
        /// The host of `public_url`.
        host: String,
        /// Why it is not a server name.
        source: rustls::pki_types::InvalidDnsNameError,
    },
    /// The certificate does not chain to the CA nodes pin for the host.
    #[error(
        "it does not verify for {host} against the CA nodes pin (ca.pem): {source} \
         (issue it from that CA, include its intermediates, and name {host})"
    )]
    Untrusted {
        /// The host of `public_url`.
        host: String,
        /// Why verification failed.
        source: rustls::Error,
    },
}

fn rc(what: &'static str) -> impl FnOnce(rcgen::Error) -> PkiError {
    move |source| PkiError::Rcgen { what, source }
}

/// A CA: its certificate (PEM) and private key (PEM).
#[derive(Clone)]
pub struct CaFiles {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PKCS#8 PEM (a secret).
    pub key_pem: String,
}

impl std::fmt::Debug for CaFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaFiles")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// Generates a self-signed CA named `common_name` (ECDSA P-256).
pub fn generate_ca(common_name: &str) -> Result<CaFiles, PkiError> {
    let key = KeyPair::generate().map_err(rc("generating a CA key"))?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(rc("CA parameters"))?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    // Dated now: the SPIFFE bundle's sequence is its authorities' newest.
    params.not_before = OffsetDateTime::now_utc() - time::Duration::minutes(5);
    let cert = params
        .self_signed(&key)
        .map_err(rc("self-signing the CA"))?;
    Ok(CaFiles {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A new key for the controller's signing CA, and a CSR for the operator's
/// upstream CA to sign into a CA certificate for the trust domain (the CSR
/// names `spiffe://DOMAIN`, as SPIFFE signing CAs do). Returns (CSR PEM,
/// key PEM).
pub fn generate_ca_csr(trust_domain: &str) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate().map_err(rc("generating a CA key"))?;
    // A CSR carries the name; the signer makes it a CA (CA:TRUE, pathlen
    // 0, keyCertSign and cRLSign), as the documentation shows.
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(rc("CA parameters"))?;
    params
        .distinguished_name
        .push(DnType::CommonName, format!("comsat {trust_domain} CA"));
    let uri = rcgen::string::Ia5String::try_from(format!("spiffe://{trust_domain}"))
        .map_err(rc("the trust domain's URI"))?;
    params.subject_alt_names.push(SanType::URI(uri));
    let csr = params
        .serialize_request(&key)
        .and_then(|r| r.pem())
        .map_err(rc("the CA's certificate signing request"))?;
    Ok((csr, key.serialize_pem()))
}

/// An issuer loaded from a CA's files.
pub struct CaIssuer {
    issuer: Issuer<'static, KeyPair>,
    /// Its own certificate, PEM.
    cert_pem: String,
    /// The certificates an issued one is followed by: the CA's file
    /// (itself and the intermediates above it) when the CA is not
    /// self-signed; empty when it is.
    chain_pem: String,
}

impl std::fmt::Debug for CaIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaIssuer").finish_non_exhaustive()
    }
}

/// The host part of a `host:port` (brackets of an IPv6 literal removed),
/// if it is one ([`split_host_port`]).
pub fn host_of(addr: &str) -> Option<&str> {
    split_host_port(addr).ok().map(|(host, _)| host)
}

fn validity(now: u64, ttl: Duration) -> Result<(OffsetDateTime, OffsetDateTime), PkiError> {
    let now = i64::try_from(now).map_err(|_| PkiError::Pem("clock out of range".into()))?;
    let start = OffsetDateTime::from_unix_timestamp(now.saturating_sub(300))
        .map_err(|e| PkiError::Pem(format!("clock out of range: {e}")))?;
    let ttl = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
    let end = OffsetDateTime::from_unix_timestamp(now.saturating_add(ttl))
        .map_err(|e| PkiError::Pem(format!("certificate lifetime out of range: {e}")))?;
    Ok((start, end))
}

fn leaf_params(
    names: Vec<String>,
    common_name: &str,
    now: u64,
    ttl: Duration,
) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::new(names).map_err(rc("certificate names"))?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let (start, end) = validity(now, ttl)?;
    params.not_before = start;
    params.not_after = end;
    Ok(params)
}

impl CaIssuer {
    /// Loads a CA from its key and its certificate PEM: the CA's own
    /// certificate first, then, for a CA under an upstream one, the
    /// intermediates above it.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem).map_err(rc("reading the CA key"))?;
        let first = certs_from_pem(cert_pem.as_bytes())?.remove(0);
        let own_pem = der_to_pem(first.as_ref());
        let issuer =
            Issuer::from_ca_cert_pem(&own_pem, key).map_err(rc("reading the CA certificate"))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(first.as_ref())
            .map_err(|e| PkiError::Pem(format!("the CA certificate does not parse: {e}")))?;
        let self_signed = parsed.subject() == parsed.issuer();
        Ok(Self {
            issuer,
            cert_pem: own_pem,
            chain_pem: if self_signed {
                String::new()
            } else {
                cert_pem.to_owned()
            },
        })
    }

    /// The CA's own certificate, PEM: what agents anchor relay
    /// certificates to.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Checks that this CA, under an upstream CA, issues certificates that
    /// chain to `upstream_pem` (the roots): that its key is its
    /// certificate's, that it may sign, and that its chain verifies, as a
    /// TLS peer checks it, with a probe certificate issued now.
    pub fn check_chains_to(
        &self,
        upstream_pem: &[u8],
        trust_domain: &str,
        now: u64,
    ) -> Result<(), PkiError> {
        let mut roots = rustls::RootCertStore::empty();
        for root in certs_from_pem(upstream_pem)? {
            roots.add(root).map_err(PkiError::PinnedCaUnusable)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| PkiError::Pem(format!("the upstream CA is unusable: {e}")))?;
        let key = KeyPair::generate().map_err(rc("generating a probe key"))?;
        let csr = CertificateParams::new(Vec::<String>::new())
            .and_then(|p| p.serialize_request(&key))
            .and_then(|r| r.pem())
            .map_err(rc("a probe CSR"))?;
        let probe = format!("spiffe://{trust_domain}/comsat/probe");
        let pem = self.issue_svid(&csr, Svid::Agent, &probe, now, Duration::from_secs(600))?;
        let chain = certs_from_pem(pem.as_bytes())?;
        let (leaf, rest) = chain.split_first().ok_or(PkiError::NoCertificate)?;
        verifier
            .verify_client_cert(
                leaf,
                rest,
                rustls::pki_types::UnixTime::since_unix_epoch(Duration::from_secs(now)),
            )
            .map_err(|e| {
                PkiError::Pem(format!(
                    "certificates it issues do not verify against the upstream CA: {e}"
                ))
            })?;
        Ok(())
    }

    /// A new key and server certificate for `names` (IP addresses become
    /// IP SANs), valid for `ttl` from `now`. Returns (cert PEM, key PEM).
    pub fn issue_server(
        &self,
        names: Vec<String>,
        now: u64,
        ttl: Duration,
    ) -> Result<(String, String), PkiError> {
        let key = KeyPair::generate().map_err(rc("generating a TLS key"))?;
        let params = leaf_params(names, "comsat controller", now, ttl)?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(rc("signing the TLS certificate"))?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// An X.509-SVID for the public key of `csr_pem` (whose signature must
    /// verify), valid for `ttl` from `now`: its one URI subjectAltName is
    /// `spiffe_id`; a relay's (`Svid::Relay`) also names the `host` agents
    /// dial and is for TLS servers, an agent's (`Svid::Agent`) is for TLS
    /// clients. What the CSR asks for beyond its key is ignored. Returns
    /// the certificate, PEM.
    pub fn issue_svid(
        &self,
        csr_pem: &str,
        svid: Svid<'_>,
        spiffe_id: &str,
        now: u64,
        ttl: Duration,
    ) -> Result<String, PkiError> {
        let mut csr = parse_csr(csr_pem)?;
        csr.params = match svid {
            Svid::Relay { host } => leaf_params(vec![host.to_owned()], "comsat relay", now, ttl)?,
            Svid::Agent => {
                let mut params = leaf_params(Vec::new(), "comsat agent", now, ttl)?;
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
                params
            }
        };
        // An X.509-SVID says it is no CA: basicConstraints, critical, with
        // cA at its default (false), which DER leaves out (rcgen's
        // `ExplicitNoCa` writes it, which strict parsers refuse).
        let mut no_ca = rcgen::CustomExtension::from_oid_content(&[2, 5, 29, 19], vec![0x30, 0x00]);
        no_ca.set_criticality(true);
        csr.params.custom_extensions.push(no_ca);
        let uri = rcgen::string::Ia5String::try_from(spiffe_id).map_err(rc("the SPIFFE ID"))?;
        csr.params.subject_alt_names.push(SanType::URI(uri));
        let cert = csr
            .signed_by(&self.issuer)
            .map_err(rc("signing the certificate"))?;
        Ok(cert.pem() + &self.chain_pem)
    }
}

/// Whose X.509-SVID [`CaIssuer::issue_svid`] issues.
#[derive(Clone, Copy, Debug)]
pub enum Svid<'a> {
    /// A relay's, a TLS server reached at `host`.
    Relay {
        /// The host agents dial.
        host: &'a str,
    },
    /// An agent's, a TLS client.
    Agent,
}

/// Parses and checks a PEM CSR.
pub fn parse_csr(csr_pem: &str) -> Result<CertificateSigningRequestParams, PkiError> {
    if csr_pem.len() > 64 * 1024 {
        return Err(PkiError::Pem("csr_pem is longer than 64 KiB".into()));
    }
    CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| {
        PkiError::Pem(format!(
            "csr_pem is not a valid PEM certificate signing request with a verifying signature: {e}"
        ))
    })
}

/// Every certificate in a PEM text, in order.
pub fn certs_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::Pem(format!("bad PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(PkiError::Pem("no PEM certificate found".into()));
    }
    Ok(certs)
}

/// The private key in a PEM text.
pub fn key_from_pem(pem: &[u8]) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_slice(pem)
        .map_err(|e| PkiError::Pem(format!("bad PEM private key: {e}")))
}

/// SHA-256 of the first certificate of a PEM text (what join tokens pin).
pub fn first_cert_sha256(pem: &[u8]) -> Result<[u8; 32], PkiError> {
    let certs = certs_from_pem(pem)?;
    let first = certs
        .first()
        .ok_or_else(|| PkiError::Pem("no PEM certificate found".into()))?;
    Ok(Sha256::digest(first.as_ref()).into())
}

/// The last certificate of a PEM chain, as PEM.
pub fn last_cert_pem(pem: &[u8]) -> Result<String, PkiError> {
    let certs = certs_from_pem(pem)?;
    let last = certs
        .last()
        .ok_or_else(|| PkiError::Pem("no PEM certificate found".into()))?;
    Ok(der_to_pem(last.as_ref()))
}

pub(crate) fn der_to_pem(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// Checks a new HTTPS certificate before it replaces the served one: the
/// key must match it, and it must chain to the CA nodes pin (`ca_pem`) for
/// `host`; otherwise every node would stop trusting the controller.
/// Returns the server configuration to serve it with.
pub fn check_rotated_certificate(
    cert_pem: &[u8],
    key_pem: &[u8],
    ca_pem: &[u8],
    host: &str,
) -> Result<rustls::ServerConfig, PkiError> {
    let certs = certs_from_pem(cert_pem)?;
    let key = key_from_pem(key_pem)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::sign::CertifiedKey::from_der(certs.clone(), key.clone_key(), &provider)
        .map_err(PkiError::KeyMismatch)?;
    verify_server_chain(&certs, ca_pem, host)?.map_err(|source| PkiError::Untrusted {
        host: host.to_owned(),
        source,
    })?;
    server_tls_config(cert_pem, key_pem)
}

/// Verifies the chain `certs` (the leaf first) of a TLS server reached at
/// `host` against the roots in `roots_pem`, now, as a TLS client does.
/// The outer error: unusable roots or host; the inner: the chain fails.
pub(crate) fn verify_server_chain(
    certs: &[CertificateDer<'static>],
    roots_pem: &[u8],
    host: &str,
) -> Result<Result<(), rustls::Error>, PkiError> {
    use rustls::client::danger::ServerCertVerifier;
    let mut roots = rustls::RootCertStore::empty();
    for ca in certs_from_pem(roots_pem)? {
        roots.add(ca).map_err(PkiError::PinnedCaUnusable)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()?;
    let name = rustls::pki_types::ServerName::try_from(host.to_owned()).map_err(|source| {
        PkiError::InvalidHost {
            host: host.to_owned(),
            source,
        }
    })?;
    let (leaf, rest) = certs.split_first().ok_or(PkiError::NoCertificate)?;
    Ok(verifier
        .verify_server_cert(leaf, rest, &name, &[], rustls::pki_types::UnixTime::now())
        .map(|_| ()))
}

/// The rustls server configuration (ring, TLS 1.2 and 1.3, HTTP/1.1).
pub fn server_tls_config(
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<rustls::ServerConfig, PkiError> {
    let certs = certs_from_pem(cert_pem)?;
    let key = key_from_pem(key_pem)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::PublicKeyData;

    #[test]
    fn hosts_of_addresses() {
        assert_eq!(host_of("relay.example:4433"), Some("relay.example"));
        assert_eq!(host_of("10.0.0.1:4433"), Some("10.0.0.1"));
        assert_eq!(host_of("[::1]:4433"), Some("::1"));
        for bad in [
            "relay",
            "relay:",
            ":4433",
            "relay:99999",
            "::1:4433",
            "[::1]",
        ] {
            assert_eq!(host_of(bad), None, "{bad}");
        }
        assert!(valid_host("relay-1.example.com"));
        assert!(valid_host("::1"));
        assert!(!valid_host("bad host"));
        assert!(!valid_host("-x.example"));
    }

    fn csr_asking_for(name: &str, key: &KeyPair) -> String {
        let params = CertificateParams::new(vec![name.to_owned()]).expect("params");
        params
            .serialize_request(key)
            .expect("csr")
            .pem()
            .expect("pem")
    }

    fn issued(pem: &str) -> CertificateDer<'static> {
        certs_from_pem(pem.as_bytes()).expect("parse").remove(0)
    }

    #[test]
    fn a_relay_svid_names_only_the_host_and_the_relay_and_keeps_the_key() {
        let ca = generate_ca("test relay CA").expect("ca");
        let issuer = CaIssuer::from_pem(&ca.cert_pem, &ca.key_pem).expect("issuer");
        let key = KeyPair::generate().expect("key");
        let csr = csr_asking_for("evil.example", &key);
        let id = "spiffe://site-a.example/relay/r1";
        let relay = Svid::Relay { host: "10.1.2.3" };
        let ttl = Duration::from_secs(3600);
        let pem = issuer
            .issue_svid(&csr, relay, id, 1_800_000_000, ttl)
            .expect("issue");
        let der = issued(&pem);
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).expect("x509");
        let san = cert
            .subject_alternative_name()
            .expect("ext")
            .expect("san")
            .value
            .general_names
            .clone();
        assert_eq!(san.len(), 2);
        assert!(format!("{:?}", san[0]).contains("[10, 1, 2, 3]"), "{san:?}");
        assert_eq!(
            comsat_protocol::spiffe::svid_spiffe_id(der.as_ref()).as_deref(),
            Some(id)
        );
        assert!(!cert.is_ca());
        let constraints = cert.basic_constraints().expect("ext").expect("present");
        assert!(!constraints.value.ca, "an SVID says it is no CA");
        let eku = cert.extended_key_usage().expect("ext").expect("present");
        assert!(eku.value.server_auth && !eku.value.client_auth);
        assert_eq!(
            cert.public_key().raw,
            key.subject_public_key_info().as_slice()
        );
        assert_eq!(cert.validity().not_after.timestamp(), 1_800_000_000 + 3600);
        assert!(issuer.issue_svid("garbage", relay, id, 0, ttl).is_err());
    }

    #[test]
    fn an_agent_svid_is_a_client_certificate_naming_no_host() {
        let ca = generate_ca("test CA").expect("ca");
        let issuer = CaIssuer::from_pem(&ca.cert_pem, &ca.key_pem).expect("issuer");
        let key = KeyPair::generate().expect("key");
        let csr = csr_asking_for("relay.example", &key);
        let id = "spiffe://site-a.example/agent/a1";
        let pem = issuer
            .issue_svid(
                &csr,
                Svid::Agent,
                id,
                1_800_000_000,
                Duration::from_secs(600),
            )
            .expect("issue");
        let der = issued(&pem);
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).expect("x509");
        assert_eq!(
            comsat_protocol::spiffe::cert_uris(der.as_ref()),
            Some(vec![id.to_owned()]),
            "its one name is its SPIFFE ID"
        );
        let eku = cert.extended_key_usage().expect("ext").expect("present");
        assert!(eku.value.client_auth && !eku.value.server_auth);
        // An agent's SVID never passes for a relay, whose SPIFFE ID differs.
        let relay = comsat_protocol::RelayId([3; 16]);
        assert!(!comsat_protocol::spiffe::cert_names_relay(
            der.as_ref(),
            &relay,
            Some("spiffe://site-a.example/relay/a1")
        ));
    }

    /// A root, and the relay CA of `generate_ca_csr` it signed as a CA
    /// for `domain`: (root PEM, relay CA PEM, relay CA key PEM).
    fn signed_under_a_root(domain: &str) -> (String, String, String) {
        let root = generate_ca("root").expect("root");
        let root_key = KeyPair::from_pem(&root.key_pem).expect("key");
        let root_issuer = Issuer::from_ca_cert_pem(&root.cert_pem, root_key).expect("issuer");
        let (csr, key) = generate_ca_csr(domain).expect("csr");
        let mut csr = parse_csr(&csr).expect("parse");
        csr.params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        csr.params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = csr.signed_by(&root_issuer).expect("sign");
        (root.cert_pem, cert.pem(), key)
    }

    #[test]
    fn a_ca_under_a_root_issues_chains_that_verify_to_it_and_no_other() {
        let (root, relay_ca, key) = signed_under_a_root("site-a.example");
        let issuer = CaIssuer::from_pem(&relay_ca, &key).expect("issuer");
        issuer
            .check_chains_to(root.as_bytes(), "site-a.example", 1_800_000_000)
            .expect("chains to its root");
        // Issued certificates carry the intermediate after them.
        let key = KeyPair::generate().expect("key");
        let pem = issuer
            .issue_svid(
                &csr_asking_for("x", &key),
                Svid::Agent,
                "spiffe://site-a.example/agent/a",
                1_800_000_000,
                Duration::from_secs(600),
            )
            .expect("issue");
        assert_eq!(certs_from_pem(pem.as_bytes()).expect("chain").len(), 2);
        assert_eq!(issuer.cert_pem(), der_to_pem(issued(&relay_ca).as_ref()));
        // Another root, or a key that is not the certificate's, fails.
        let other = generate_ca("another root").expect("root");
        let err = issuer
            .check_chains_to(other.cert_pem.as_bytes(), "site-a.example", 1_800_000_000)
            .expect_err("another root");
        assert!(err.to_string().contains("upstream CA"), "{err}");
        let stranger = KeyPair::generate().expect("key").serialize_pem();
        let wrong = CaIssuer::from_pem(&relay_ca, &stranger).expect("loads");
        assert!(
            wrong
                .check_chains_to(root.as_bytes(), "site-a.example", 1_800_000_000)
                .is_err(),
            "a key that is not the CA certificate's"
        );
    }

    #[test]
    fn pem_round_trip_of_the_last_certificate() {
        let a = generate_ca("a").expect("a");
        let b = generate_ca("b").expect("b");
        let chain = format!("{}{}", a.cert_pem, b.cert_pem);
        let last = last_cert_pem(chain.as_bytes()).expect("last");
        assert_eq!(
            first_cert_sha256(last.as_bytes()).expect("sha"),
            first_cert_sha256(b.cert_pem.as_bytes()).expect("sha")
        );
        assert!(first_cert_sha256(b"nothing").is_err());
    }

    #[test]
    fn a_rotated_certificate_must_match_its_key_and_chain_to_the_pinned_ca() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let ttl = Duration::from_secs(3600);
        let ca = generate_ca("pinned").expect("ca");
        let issuer = CaIssuer::from_pem(&ca.cert_pem, &ca.key_pem).expect("issuer");
        let (cert, key) = issuer
            .issue_server(vec!["ctl.example".into()], now, ttl)
            .expect("leaf");
        let pinned = ca.cert_pem.as_bytes();
        let rotate = |cert: &str, key: &str, host: &str| {
            check_rotated_certificate(cert.as_bytes(), key.as_bytes(), pinned, host)
        };
        let ok = rotate(&cert, &key, "ctl.example");
        assert!(ok.is_ok(), "{:?}", ok.err());

        let (_, other_key) = issuer
            .issue_server(vec!["ctl.example".into()], now, ttl)
            .expect("leaf");
        let err = rotate(&cert, &other_key, "ctl.example")
            .expect_err("mismatched key")
            .to_string();
        assert!(err.contains("does not match"), "{err}");

        let stranger = generate_ca("another").expect("ca");
        let stranger = CaIssuer::from_pem(&stranger.cert_pem, &stranger.key_pem).expect("issuer");
        let (cert2, key2) = stranger
            .issue_server(vec!["ctl.example".into()], now, ttl)
            .expect("leaf");
        let err = rotate(&cert2, &key2, "ctl.example")
            .expect_err("other CA")
            .to_string();
        assert!(err.contains("ca.pem"), "{err}");

        let err = rotate(&cert, &key, "other.example")
            .expect_err("other host")
            .to_string();
        assert!(err.contains("other.example"), "{err}");
        assert!(rotate("junk", &key, "x").is_err());
    }

    #[test]
    fn a_rotation_to_a_new_intermediate_under_the_pinned_root_is_accepted() {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let root_key = KeyPair::generate().expect("key");
        let mut root_params = CertificateParams::new(Vec::<String>::new()).expect("params");
        root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let root = root_params.self_signed(&root_key).expect("root");
        let root_issuer = Issuer::new(root_params, root_key);
        let chain_under = |label: &str| {
            let key = KeyPair::generate().expect("key");
            let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.distinguished_name.push(DnType::CommonName, label);
            let inter = p.signed_by(&key, &root_issuer).expect("intermediate");
            let inter_issuer = Issuer::new(p, key);
            let leaf_key = KeyPair::generate().expect("key");
            let leaf = CertificateParams::new(vec!["ctl.example".to_owned()])
                .expect("params")
                .signed_by(&leaf_key, &inter_issuer)
                .expect("leaf");
            (
                format!("{}{}", leaf.pem(), inter.pem()),
                leaf_key.serialize_pem(),
            )
        };
        for label in ["intermediate 1", "intermediate 2"] {
            let (chain, key) = chain_under(label);
            let ok = check_rotated_certificate(
                chain.as_bytes(),
                key.as_bytes(),
                root.pem().as_bytes(),
                "ctl.example",
            );
            assert!(ok.is_ok(), "{label}: {:?}", ok.err());
        }
        // Without its intermediate the leaf does not chain.
        let (chain, key) = chain_under("intermediate 3");
        let leaf_only = chain
            .split_inclusive("-----END CERTIFICATE-----\n")
            .next()
            .expect("leaf");
        assert!(
            check_rotated_certificate(
                leaf_only.as_bytes(),
                key.as_bytes(),
                root.pem().as_bytes(),
                "ctl.example"
            )
            .is_err()
        );
    }
}
