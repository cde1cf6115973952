//! Noise handshake messages from the network: side B answering an
//! arbitrary first message, and side A completing with an arbitrary
//! answer, never panic; a message that completes states limits in range.
#![no_main]

use comsat_protocol::LinkId;
use comsat_protocol::keys::NoiseSecretKey;
use comsat_protocol::noise;
use libfuzzer_sys::fuzz_target;

/// A fixed random source: the same ephemeral keys every run, so a crash
/// replays exactly.
struct Fixed(u8);

impl noise::NoiseRng for Fixed {
    fn fill(&mut self, out: &mut [u8]) {
        out.fill(self.0);
    }
}

fuzz_target!(|data: &[u8]| {
    let a = NoiseSecretKey::from_bytes([1; 32]);
    let b = NoiseSecretKey::from_bytes([2; 32]);
    let link = LinkId([5; 16]);
    if let Ok((session, _)) = noise::respond(&b, &a.public(), &link, data, Box::new(Fixed(3))) {
        assert!(session.params().check().is_ok());
    }
    let (pending, _) =
        noise::initiate(&a, &b.public(), &link, Box::new(Fixed(4))).expect("initiate");
    if let Ok(session) = pending.handle_response(data) {
        assert!(session.params().check().is_ok());
    }
});
