//! Noise handshake messages from the network: side B answering an
//! arbitrary first message, and side A completing with an arbitrary
//! answer, never panic; a message that completes states limits in range.
#![no_main]

use comsat_protocol::LinkId;
use comsat_protocol::keys::NoiseSecretKey;
use comsat_protocol::noise;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let a = NoiseSecretKey::from_bytes([1; 32]);
    let b = NoiseSecretKey::from_bytes([2; 32]);
    let link = LinkId([5; 16]);
    if let Ok((session, _)) = noise::respond(&b, &a.public(), &link, data) {
        assert!(session.params().check().is_ok());
    }
    let (pending, _) = noise::initiate(&a, &b.public(), &link).expect("initiate");
    if let Ok(session) = pending.handle_response(data) {
        assert!(session.params().check().is_ok());
    }
});
