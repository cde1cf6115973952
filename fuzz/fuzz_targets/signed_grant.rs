//! Grants from a file or the network: decode and verify never panic.
#![no_main]

use comsat_protocol::grant::SignedGrant;
use comsat_protocol::keys::SigningKey;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(grant) = SignedGrant::decode(data) else {
        return;
    };
    let again = grant.encode().expect("a decoded grant encodes");
    assert_eq!(SignedGrant::decode(&again).expect("re-decodes"), grant);
    let authority = SigningKey::from_seed(&[1; 32]).public();
    let _ = grant.verify_signature(&authority);
});
