//! What more than one fuzz target checks.

use std::fmt::Debug;

use comsat_protocol::msg::{ControlMessage, FrameDecoder};

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
