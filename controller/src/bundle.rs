//! SPIFFE bundles: the trust domain's, as its bundle endpoint serves it,
//! and those of the trust domains the controller federates with.

use rustls::pki_types::CertificateDer;

use crate::pki::{PkiError, certs_from_pem, der_to_pem, verify_server_chain};

/// The SPIFFE bundle of the X.509 authorities in `ca_pem` (EC P-256,
/// P-384 and P-521 or RSA keys): a JWK each, with the certificate in
/// `x5c`. Its sequence is the newest authority's notBefore, so it grows
/// when an authority is added.
pub fn spiffe_bundle(ca_pem: &[u8]) -> Result<comsat_protocol::api::SpiffeBundle, PkiError> {
    let mut keys = Vec::new();
    let mut sequence = 0u64;
    for der in certs_from_pem(ca_pem)? {
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| PkiError::Pem(format!("a CA certificate does not parse: {e}")))?;
        let not_before = cert.validity().not_before.timestamp();
        sequence = sequence.max(u64::try_from(not_before).unwrap_or(0));
        keys.push(bundle_key(&cert, der.as_ref())?);
    }
    Ok(comsat_protocol::api::SpiffeBundle {
        keys,
        spiffe_sequence: sequence,
        spiffe_refresh_hint: comsat_protocol::api::SPIFFE_REFRESH_HINT_SECS,
    })
}

/// An X.509 authority as a JWK of a SPIFFE bundle.
fn bundle_key(
    cert: &x509_parser::certificate::X509Certificate<'_>,
    der: &[u8],
) -> Result<comsat_protocol::api::BundleKey, PkiError> {
    use base64::Engine;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    use x509_parser::public_key::PublicKey;
    let b64 = |bytes: &[u8]| Some(URL_SAFE_NO_PAD.encode(bytes));
    let unusable = || {
        PkiError::Pem(format!(
            "the key of CA `{}` is neither EC (P-256, P-384, P-521) nor RSA",
            cert.subject()
        ))
    };
    let mut key = comsat_protocol::api::BundleKey {
        kty: "EC".into(),
        crv: None,
        x: None,
        y: None,
        n: None,
        e: None,
        use_: "x509-svid".into(),
        x5c: vec![STANDARD.encode(der)],
    };
    match cert.public_key().parsed().map_err(|_| unusable())? {
        PublicKey::EC(point) => {
            // Uncompressed: 0x04, x, y.
            let point = point.data();
            let crv = match point.len() {
                65 => "P-256",
                97 => "P-384",
                133 => "P-521",
                _ => return Err(unusable()),
            };
            if point.first() != Some(&0x04) {
                return Err(unusable());
            }
            let half = (point.len() - 1) / 2;
            key.crv = Some(crv.into());
            key.x = b64(&point[1..=half]);
            key.y = b64(&point[1 + half..]);
        }
        PublicKey::RSA(rsa) => {
            let trim = |b: &[u8]| b.iter().position(|&x| x != 0).map_or(0, |i| i);
            key.kty = "RSA".into();
            key.n = b64(&rsa.modulus[trim(rsa.modulus)..]);
            key.e = b64(&rsa.exponent[trim(rsa.exponent)..]);
        }
        _ => return Err(unusable()),
    }
    Ok(key)
}

/// Most X.509 authorities in a federated bundle.
const MAX_BUNDLE_AUTHORITIES: usize = 64;

/// The X.509 authorities of a federated trust domain's bundle as PEM: from
/// a SPIFFE bundle (JSON, as a bundle endpoint serves it: its `x509-svid`
/// keys' certificates) or PEM certificates. Each must be usable as a root.
pub fn federated_bundle_pem(bundle: &str) -> Result<String, PkiError> {
    use base64::Engine;
    let ders: Vec<Vec<u8>> = if bundle.trim_start().starts_with('{') {
        let doc: comsat_protocol::api::SpiffeBundle = serde_json::from_str(bundle)
            .map_err(|e| PkiError::Pem(format!("not a SPIFFE bundle: {e}")))?;
        doc.keys
            .iter()
            .filter(|k| k.use_ == "x509-svid")
            .map(|k| match k.x5c.as_slice() {
                [one] => base64::engine::general_purpose::STANDARD
                    .decode(one)
                    .map_err(|e| PkiError::Pem(format!("an x5c is not base64: {e}"))),
                _ => Err(PkiError::Pem(
                    "an x509-svid key's x5c must hold its certificate alone".into(),
                )),
            })
            .collect::<Result<_, _>>()?
    } else {
        certs_from_pem(bundle.as_bytes())?
            .into_iter()
            .map(|c| c.as_ref().to_vec())
            .collect()
    };
    if ders.is_empty() || ders.len() > MAX_BUNDLE_AUTHORITIES {
        return Err(PkiError::Pem(format!(
            "a bundle holds 1 to {MAX_BUNDLE_AUTHORITIES} X.509 authorities; this one {}",
            ders.len()
        )));
    }
    let mut roots = rustls::RootCertStore::empty();
    let mut pem = String::new();
    for der in ders {
        roots
            .add(CertificateDer::from(der.clone()))
            .map_err(PkiError::PinnedCaUnusable)?;
        pem.push_str(&der_to_pem(&der));
    }
    Ok(pem)
}

/// Checks the certificate chain `chain_pem` a relay brings from a
/// federated trust domain: its leaf is an X.509-SVID of that domain, for a
/// TLS server reached at `host`, chaining to the domain's bundle
/// (`bundle_pem`).
pub fn check_federated_relay(
    chain_pem: &str,
    host: &str,
    trust_domain: &str,
    bundle_pem: &str,
) -> Result<(), PkiError> {
    let chain = certs_from_pem(chain_pem.as_bytes())?;
    verify_server_chain(&chain, bundle_pem.as_bytes(), host)?.map_err(|e| {
        PkiError::Pem(format!(
            "it does not verify against the bundle of {trust_domain} for {host}: {e}"
        ))
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::generate_ca;
    use rcgen::KeyPair;

    #[test]
    fn the_bundle_holds_each_authority_with_its_key() {
        let a = generate_ca("a").expect("a");
        let b = generate_ca("b").expect("b");
        let bundle =
            spiffe_bundle(format!("{}{}", a.cert_pem, b.cert_pem).as_bytes()).expect("bundle");
        assert_eq!(bundle.keys.len(), 2);
        let key = &bundle.keys[0];
        assert_eq!(
            (key.kty.as_str(), key.crv.as_deref()),
            ("EC", Some("P-256"))
        );
        assert_eq!(key.use_, "x509-svid");
        use base64::Engine;
        let der = base64::engine::general_purpose::STANDARD
            .decode(&key.x5c[0])
            .expect("x5c");
        assert_eq!(
            der,
            certs_from_pem(a.cert_pem.as_bytes()).expect("a")[0].as_ref()
        );
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(key.x.as_deref().expect("x"))
            .expect("x");
        let spki = KeyPair::from_pem(&a.key_pem)
            .expect("key")
            .public_key_raw()
            .to_vec();
        assert_eq!(x, spki[1..33], "x is the CA key's");
        assert!(bundle.spiffe_sequence > 1_700_000_000);
        assert!(spiffe_bundle(b"garbage").is_err());
    }

    proptest::proptest! {
        /// What an operator sends as a bundle: never a panic, and what is
        /// accepted is certificates again.
        #[test]
        fn any_bundle_text_is_refused_or_read(s in "\\PC{0,400}", json in proptest::bool::ANY) {
            let text = if json { format!("{{\"keys\":[{{\"use\":\"x509-svid\",\"kty\":\"EC\",\"x5c\":[\"{s}\"]}}],\"spiffe_sequence\":1,\"spiffe_refresh_hint\":1}}") } else { s };
            if let Ok(pem) = federated_bundle_pem(&text) {
                proptest::prop_assert!(certs_from_pem(pem.as_bytes()).is_ok());
            }
        }
    }

    #[test]
    fn a_federated_bundle_reads_as_json_or_pem_and_must_hold_authorities() {
        let a = generate_ca("a").expect("a");
        let json = serde_json::to_string(&spiffe_bundle(a.cert_pem.as_bytes()).expect("bundle"))
            .expect("json");
        let from_json = federated_bundle_pem(&json).expect("json bundle");
        assert_eq!(
            certs_from_pem(from_json.as_bytes()).expect("pem"),
            certs_from_pem(a.cert_pem.as_bytes()).expect("pem")
        );
        assert_eq!(
            federated_bundle_pem(&a.cert_pem).expect("pem bundle"),
            from_json
        );
        for bad in [
            "",
            "{}",
            "{\"keys\": [], \"spiffe_sequence\": 1, \"spiffe_refresh_hint\": 1}",
            "junk",
        ] {
            assert!(federated_bundle_pem(bad).is_err(), "{bad}");
        }
    }
}
