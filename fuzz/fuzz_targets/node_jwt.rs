//! Bearer tokens as the controller receives them: reading the claimed node
//! and verifying never panic, and nothing but a token signed by the key
//! verifies.
#![no_main]

use comsat_protocol::jwt::{claimed_node, verify};
use comsat_protocol::{NodeId, SigningKey};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let node = claimed_node(s).unwrap_or(NodeId([0; 16]));
    let key = SigningKey::from_seed(&[9; 32]);
    // The fuzzer cannot forge an ed25519 signature by this key.
    assert!(
        verify(
            s,
            &node,
            &key.public(),
            "comsat-controller:fuzz",
            1_800_000_000,
            60
        )
        .is_err()
    );
});
