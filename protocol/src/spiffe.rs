//! SPIFFE identities: trust domains, SPIFFE IDs, and the names the
//! controller's certificates carry.
//!
//! A controller serves one trust domain. Its relays and agents are
//! `spiffe://DOMAIN/relay/NAME` and `spiffe://DOMAIN/agent/NAME`, carried
//! as the one URI subjectAltName of their X.509-SVIDs. An agent checks a
//! relay's certificate against the SPIFFE ID its controller names for the
//! relay, so a relay holding a certificate from the same CA cannot stand in
//! for another. Certificates from before relays had SPIFFE IDs named the
//! relay `urn:comsat:relay:ID`; agents still accept that form.

use crate::RelayId;
use crate::api::NodeKind;

/// Longest SPIFFE ID accepted (the SPIFFE standard's limit).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;

/// Longest trust domain accepted (the SPIFFE standard's limit).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Checks a trust domain: 1 to [`MAX_TRUST_DOMAIN_LEN`] lowercase letters,
/// digits, `.`, `-` and `_`.
pub fn check_trust_domain(domain: &str) -> Result<(), &'static str> {
    let ok = !domain.is_empty()
        && domain.len() <= MAX_TRUST_DOMAIN_LEN
        && domain.bytes().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'-' || c == b'_'
        });
    if ok {
        Ok(())
    } else {
        Err("a trust domain is 1 to 255 lowercase letters, digits, ., - and _")
    }
}

/// Checks a SPIFFE ID: `spiffe://` then a trust domain
/// ([`check_trust_domain`]), then a path of segments of letters, digits,
/// `.`, `-` and `_` (none empty, `.` or `..`), at most
/// [`MAX_SPIFFE_ID_LEN`] bytes in all.
pub fn check_spiffe_id(id: &str) -> Result<(), &'static str> {
    if id.len() > MAX_SPIFFE_ID_LEN {
        return Err("a SPIFFE ID is at most 2048 bytes");
    }
    let rest = id
        .strip_prefix("spiffe://")
        .ok_or("a SPIFFE ID starts with spiffe://")?;
    let (domain, path) = rest.split_once('/').unwrap_or((rest, ""));
    check_trust_domain(domain)?;
    let segments_ok = path.split('/').all(|s| {
        !s.is_empty()
            && s != "."
            && s != ".."
            && s.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'.' || c == b'-' || c == b'_')
    });
    if path.is_empty() || !segments_ok {
        return Err("a SPIFFE ID's path is segments of letters, digits, ., - and _");
    }
    Ok(())
}

/// The trust domain and path (without its leading `/`) of a valid SPIFFE
/// ID; `None` for anything [`check_spiffe_id`] refuses.
pub fn split_spiffe_id(id: &str) -> Option<(&str, &str)> {
    check_spiffe_id(id).ok()?;
    id.strip_prefix("spiffe://")?.split_once('/')
}

/// The SPIFFE ID of the node `name` of `kind` in `domain`:
/// `spiffe://DOMAIN/relay/NAME` or `spiffe://DOMAIN/agent/NAME`. Node
/// names ([`crate::api::valid_name`]) are valid path segments.
pub fn node_spiffe_id(domain: &str, kind: NodeKind, name: &str) -> String {
    format!("spiffe://{domain}/{kind}/{name}")
}

/// The URI a relay certificate named its relay by before relays had
/// SPIFFE IDs.
fn legacy_relay_uri(relay: &RelayId) -> String {
    format!("urn:comsat:relay:{relay}")
}

/// The URI subjectAltNames of the certificate `der`; `None` if it does not
/// parse.
pub fn cert_uris(der: &[u8]) -> Option<Vec<String>> {
    let (_, parsed) = x509_parser::parse_x509_certificate(der).ok()?;
    let Ok(san) = parsed.subject_alternative_name() else {
        return None;
    };
    let Some(san) = san else {
        return Some(Vec::new());
    };
    Some(
        san.value
            .general_names
            .iter()
            .filter_map(|name| match name {
                x509_parser::extensions::GeneralName::URI(uri) => Some((*uri).to_owned()),
                _ => None,
            })
            .collect(),
    )
}

/// The SPIFFE ID of the X.509-SVID `der`: its one URI subjectAltName, if
/// it has exactly one and that is a valid SPIFFE ID.
pub fn svid_spiffe_id(der: &[u8]) -> Option<String> {
    let uris = cert_uris(der)?;
    match uris.as_slice() {
        [one] if check_spiffe_id(one).is_ok() => Some(one.clone()),
        _ => None,
    }
}

/// Whether the certificate `der` names `relay`: as the X.509-SVID of
/// `spiffe_id` (the relay's SPIFFE ID, as the controller names it), or by
/// the URI of certificates from before relays had SPIFFE IDs. `false` for
/// anything that does not parse.
pub fn cert_names_relay(der: &[u8], relay: &RelayId, spiffe_id: Option<&str>) -> bool {
    if spiffe_id.is_some() && svid_spiffe_id(der).as_deref() == spiffe_id {
        return true;
    }
    let legacy = legacy_relay_uri(relay);
    cert_uris(der).is_some_and(|uris| uris.contains(&legacy))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn spiffe_ids() {
        for good in [
            "spiffe://example.org/billing",
            "spiffe://site-a.example_1/ns/prod/sa/db.reader",
        ] {
            assert_eq!(check_spiffe_id(good), Ok(()), "{good}");
        }
        for bad in [
            "spiffe://Example.org/x",
            "spiffe://example.org",
            "spiffe://example.org/",
            "spiffe://example.org/a//b",
            "spiffe://example.org/a/../b",
            "spiffe:///x",
            "http://example.org/x",
            "spiffe://example.org/a b",
        ] {
            assert!(check_spiffe_id(bad).is_err(), "{bad}");
        }
        assert!(check_spiffe_id(&format!("spiffe://e.org/{}", "a".repeat(2048))).is_err());
        assert!(check_spiffe_id(&format!("spiffe://{}/a", "a".repeat(256))).is_err());
        assert_eq!(check_trust_domain(&"a".repeat(255)), Ok(()));
    }

    #[test]
    fn node_ids_split_into_their_domain_and_path() {
        let id = node_spiffe_id("site-a.example", NodeKind::Relay, "relay-1");
        assert_eq!(id, "spiffe://site-a.example/relay/relay-1");
        assert_eq!(
            split_spiffe_id(&id),
            Some(("site-a.example", "relay/relay-1"))
        );
        assert_eq!(split_spiffe_id("spiffe://x"), None);
    }

    #[test]
    fn garbage_names_no_relay() {
        let relay = RelayId([7; 16]);
        assert!(!cert_names_relay(
            b"not a certificate",
            &relay,
            Some("spiffe://x/relay/r")
        ));
        assert_eq!(cert_uris(b""), None);
        assert_eq!(svid_spiffe_id(b"\x30\x03\x02\x01\x00"), None);
    }

    proptest! {
        /// Whatever a certificate's URI says, the checks never panic, and a
        /// SPIFFE ID that passes splits into a domain and path that pass.
        #[test]
        fn spiffe_id_checks_never_panic(s in "\\PC{0,300}", d in "[a-z0-9._-]{1,20}", p in "[A-Za-z0-9._/-]{0,40}") {
            let _ = check_spiffe_id(&s);
            let id = format!("spiffe://{d}/{p}");
            match split_spiffe_id(&id) {
                Some((domain, path)) => {
                    prop_assert_eq!(domain, d.as_str());
                    prop_assert_eq!(path, p.as_str());
                    prop_assert!(check_trust_domain(domain).is_ok());
                }
                None => prop_assert!(check_spiffe_id(&id).is_err()),
            }
        }

        /// Any bytes as a certificate: no panic, and no relay named.
        #[test]
        fn certificate_bytes_never_panic(der in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = cert_uris(&der);
            let _ = svid_spiffe_id(&der);
            prop_assert!(!cert_names_relay(&der, &RelayId([1; 16]), None) || cert_uris(&der).is_some());
        }
    }
}
