//! Certificates the controller issues to a node and the node renews: a
//! relay's TLS certificate and an agent's X.509-SVID. Both are SVIDs of
//! the controller's trust domain; the key stays where it was made and the
//! controller sees only a CSR for it.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use comsat_protocol::api;
use comsat_protocol::limits::MAX_PEM_FILE_LEN;

use crate::client::{self, Client};
use crate::keys::{read_secret_file, write_secret_file};
use crate::retry::Retry;
use crate::state::{NodeState, csr, write_atomic};
use crate::unix_now;

/// An agent's X.509-SVID file (PEM) in its directory.
pub const AGENT_SVID_FILE: &str = "svid.pem";
/// Its private key (PKCS#8 PEM, mode 0600).
pub const AGENT_SVID_KEY_FILE: &str = "svid.key";

/// A certificate renewed by [`renew`]: where it and its key are, and
/// whether a certificate is the current form for this node.
pub(crate) struct Renewed<C> {
    /// The certificate file (PEM).
    pub(crate) cert: PathBuf,
    /// Its key file.
    pub(crate) key: PathBuf,
    /// Whether a certificate (DER) is of the current form (an SVID with
    /// this node's ID): one that is not is renewed at once, once.
    pub(crate) current: C,
}

/// Whether `der` is the X.509-SVID of a node whose SPIFFE ID's path is
/// `path` (`relay/NAME`, `agent/NAME`), in whatever trust domain.
pub(crate) fn is_svid_of(der: &[u8], path: &str) -> bool {
    comsat_protocol::spiffe::svid_spiffe_id(der)
        .as_deref()
        .and_then(comsat_protocol::spiffe::split_spiffe_id)
        .is_some_and(|(_, p)| p == path)
}

/// The seconds left of the certificate at `path`, its whole lifetime, and
/// whether `current` says it is of the current form.
fn cert_life(path: &Path, current: &impl Fn(&[u8]) -> bool) -> Option<(i64, i64, bool)> {
    let pem = crate::state::read_at_most(path, MAX_PEM_FILE_LEN).ok()?;
    let der = client::read_ca_pem(&pem).ok()?;
    let first = der.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(first.as_ref()).ok()?;
    let v = cert.validity();
    let now = unix_now() as i64;
    Some((
        v.not_after.timestamp() - now,
        v.not_after.timestamp() - v.not_before.timestamp(),
        current(first.as_ref()),
    ))
}

/// Renews the certificate when a third of its lifetime is left (at once
/// if it is missing, and once at once if it is not of the current form),
/// forever: `request` asks the controller for one, which is checked
/// ([`check_renewed`]) and written; `renewed` is told.
pub(crate) async fn renew<C, F, Fut>(
    what: &'static str,
    r: Renewed<C>,
    request: F,
    renewed: impl Fn(),
) where
    C: Fn(&[u8]) -> bool,
    F: Fn() -> Fut,
    Fut: Future<Output = anyhow::Result<String>>,
{
    let mut retry = Retry::new();
    let mut old_form_renewed = false;
    loop {
        let due = |left: i64, life: i64, current: bool| {
            if current || old_form_renewed {
                (left - life / 3).max(0) as u64
            } else {
                0
            }
        };
        let wait = match cert_life(&r.cert, &r.current) {
            Some((left, life, current)) => due(left, life, current),
            None => 0,
        };
        tokio::time::sleep(Duration::from_secs(wait.min(3600))).await;
        if cert_life(&r.cert, &r.current)
            .is_some_and(|(left, life, current)| due(left, life, current) > 0)
        {
            continue;
        }
        match request()
            .await
            .and_then(|pem| check_renewed(&pem, &r.key).map(|()| pem))
        {
            Ok(pem) => {
                retry.reset();
                if cert_life(&r.cert, &r.current).is_some_and(|(_, _, current)| !current) {
                    old_form_renewed = true;
                }
                match write_atomic(&r.cert, pem.as_bytes()) {
                    Ok(()) => {
                        tracing::info!("{what} renewed");
                        renewed();
                    }
                    Err(e) => tracing::error!(error = %e, "cannot write the renewed {what}"),
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "{what} renewal failed; retrying");
                retry.wait().await;
            }
        }
    }
}

/// Checks a renewed certificate before it replaces the one in use: it
/// parses, is for the key in `key_file`, and is valid now for a while. A
/// bad one is refused (and asked for again with backoff).
pub(crate) fn check_renewed(pem: &str, key_file: &Path) -> anyhow::Result<()> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("the renewed certificate is not PEM: {e}"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| anyhow!("the controller sent no certificate"))?;
    let key_pem = read_secret_file(key_file)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .with_context(|| key_file.display().to_string())?;
    rustls::sign::CertifiedKey::from_der(
        certs.clone(),
        key,
        &rustls::crypto::ring::default_provider(),
    )
    .map_err(|e| anyhow!("the renewed certificate is not for this node's key: {e}"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| anyhow!("the renewed certificate does not parse: {e}"))?;
    let now = unix_now() as i64;
    let v = cert.validity();
    if v.not_before.timestamp() > now + 300 || v.not_after.timestamp() <= now + 60 {
        bail!("the renewed certificate is not valid now");
    }
    Ok(())
}

/// Keeps an agent's X.509-SVID (`svid.pem`, key `svid.key`, made here on
/// first use) fresh, forever.
pub(crate) async fn agent_svid(client: Client, dir: PathBuf, state: NodeState) {
    let key_file = dir.join(AGENT_SVID_KEY_FILE);
    if !key_file.exists() {
        let made = rcgen::KeyPair::generate()
            .context("generating the SVID key")
            .and_then(|key| {
                write_secret_file(&key_file, key.serialize_pem().as_bytes()).map_err(Into::into)
            });
        if let Err(e) = made {
            tracing::error!(error = %e, "cannot make the agent's SVID key; no SVID");
            return;
        }
    }
    let path = format!("agent/{}", state.name);
    let r = Renewed {
        cert: dir.join(AGENT_SVID_FILE),
        key: key_file.clone(),
        current: |der: &[u8]| is_svid_of(der, &path),
    };
    let request = || async {
        let key_pem = read_secret_file(&key_file)?;
        let key = rcgen::KeyPair::from_pem(&key_pem).context(AGENT_SVID_KEY_FILE)?;
        let body = api::CertRequest {
            csr_pem: csr(&key, Vec::new())?,
        };
        let resp: api::CertResponse = client
            .post(api::PATH_AGENT_SVID, &body, "SVID renewal")
            .await?;
        Ok(resp.cert_pem)
    };
    renew("agent SVID", r, request, || ()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_renewed_certificate_must_be_for_the_nodes_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key_file = dir.path().join("tls.key");
        let key = rcgen::KeyPair::generate().expect("key");
        write_secret_file(&key_file, key.serialize_pem().as_bytes()).expect("key file");
        let cert = rcgen::CertificateParams::new(vec!["relay.example".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        check_renewed(&cert.pem(), &key_file).expect("good");
        let other = rcgen::KeyPair::generate().expect("key");
        let wrong = rcgen::CertificateParams::new(vec!["relay.example".to_owned()])
            .expect("params")
            .self_signed(&other)
            .expect("cert");
        let err = check_renewed(&wrong.pem(), &key_file).expect_err("other key");
        assert!(err.to_string().contains("key"), "{err}");
        assert!(check_renewed("junk", &key_file).is_err());
        assert!(check_renewed("", &key_file).is_err());
    }

    #[test]
    fn only_an_svid_with_the_nodes_path_is_current() {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = |uris: &[&str]| {
            let mut params =
                rcgen::CertificateParams::new(vec!["relay.example".to_owned()]).expect("params");
            for uri in uris {
                params.subject_alt_names.push(rcgen::SanType::URI(
                    rcgen::string::Ia5String::try_from(*uri).expect("uri"),
                ));
            }
            params.self_signed(&key).expect("cert").der().to_vec()
        };
        let current = cert(&["spiffe://site-a.example/relay/r1"]);
        assert!(is_svid_of(&current, "relay/r1"));
        assert!(!is_svid_of(&current, "relay/r2"));
        assert!(!is_svid_of(&current, "agent/r1"));
        assert!(!is_svid_of(&cert(&["urn:comsat:relay:00"]), "relay/r1"));
        let two = cert(&["spiffe://a/relay/r1", "spiffe://b/relay/r1"]);
        assert!(!is_svid_of(&two, "relay/r1"), "an SVID has one URI");
    }
}
