//! Signed grants from a file or the network. Decoding and verifying never
//! panic; a signed grant that decodes re-encodes (with `encode`) to bytes
//! that decode to an equal value; and a grant body that verifies re-signs
//! to a grant that verifies to an equal grant.
#![no_main]

use std::sync::OnceLock;

use comsat_protocol::grant::{DOMAIN_SEP_GRANT, SignedGrant};
use comsat_protocol::keys::{SignPublicKey, SigningKey};
use libfuzzer_sys::fuzz_target;

/// The fixed grant authority.
fn authority() -> &'static (SigningKey, SignPublicKey) {
    static KEY: OnceLock<(SigningKey, SignPublicKey)> = OnceLock::new();
    KEY.get_or_init(|| {
        let key = SigningKey::from_seed(&[1; 32]);
        let public = key.public();
        (key, public)
    })
}

fuzz_target!(|data: &[u8]| {
    let (key, public) = authority();

    // The bytes as a whole signed grant (forged: the signature fails).
    if let Ok(grant) = SignedGrant::decode(data) {
        let again = grant.encode().expect("a decoded grant encodes");
        assert_eq!(SignedGrant::decode(&again), Ok(grant.clone()));
        let _ = grant.verify_signature(public);
    }

    // The bytes as a grant body the authority signed, so that the body
    // decoder and shape checks behind the signature get fuzzed too.
    let signed = SignedGrant {
        body: data.to_vec(),
        signature: key.sign(DOMAIN_SEP_GRANT, data),
    };
    if let Ok(grant) = signed.verify_signature(public) {
        let resigned = grant.sign(key).expect("a verified grant signs");
        assert_eq!(resigned.verify_signature(public), Ok(grant));
    }
});
