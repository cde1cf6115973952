//! What more than one fuzz target checks.

use std::fmt::Debug;
use std::sync::OnceLock;

use comsat_protocol::LinkId;
use comsat_protocol::keys::NoiseSecretKey;
use comsat_protocol::msg::{ControlMessage, FrameDecoder};
use comsat_protocol::noise::{self, Cipher, Session};

/// A fixed random source: the same ephemeral keys every run, so a crash
/// replays exactly.
struct Fixed(u8);

impl noise::NoiseRng for Fixed {
    fn fill(&mut self, out: &mut [u8]) {
        out.fill(self.0);
    }
}

/// The initiator (side A) and responder (side B) of one fixed session per
/// transport cipher: ChaCha20-Poly1305, then AES-256-GCM.
pub fn sessions() -> &'static [(Session, Session); 2] {
    static PAIRS: OnceLock<[(Session, Session); 2]> = OnceLock::new();
    PAIRS.get_or_init(|| {
        [Cipher::ChaChaPoly, Cipher::AesGcm].map(|cipher| {
            let a = NoiseSecretKey::from_bytes([1; 32]);
            let b = NoiseSecretKey::from_bytes([2; 32]);
            let link = LinkId([5; 16]);
            let (pending, m1) =
                noise::initiate_preferring(&a, &b.public(), &link, cipher, Box::new(Fixed(3)))
                    .expect("initiate");
            let (sb, m2) =
                noise::respond_preferring(&b, &a.public(), &link, &m1, cipher, Box::new(Fixed(4)))
                    .expect("respond");
            (pending.handle_response(&m2).expect("finish"), sb)
        })
    })
}

/// Control frames of type `M` from the network: decoding never panics, and
/// a frame that decodes re-encodes (with `write_to`, to `encoded_len`
/// bytes) to a frame that decodes to an equal message. The streaming
/// decoder gets the same bytes in two pieces.
pub fn control_frames<M: ControlMessage + PartialEq + Debug>(data: &[u8]) {
    if let Ok(Some((msg, used))) = M::decode_frame(data) {
        assert!(used <= data.len());
        let mut again = Vec::new();
        msg.write_to(&mut again).expect("a decoded message encodes");
        assert_eq!(msg.encoded_len(), Ok(again.len()));
        let (back, n) = M::decode_frame(&again)
            .expect("re-encoded frame is valid")
            .expect("re-encoded frame is complete");
        assert_eq!(back, msg);
        assert_eq!(n, again.len());
    }
    let mut decoder = FrameDecoder::new();
    let (first, second) = data.split_at(data.len() / 2);
    decoder.extend(first);
    while let Ok(Some(_)) = decoder.next_message::<M>() {}
    decoder.extend(second);
    while let Ok(Some(_)) = decoder.next_message::<M>() {}
}
