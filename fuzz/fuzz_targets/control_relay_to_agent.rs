//! `RelayToAgent` control frames from the network: decoding never panics, and a
//! frame that decodes re-encodes (with `write_to`, to `encoded_len` bytes)
//! to a frame that decodes to an equal message.
#![no_main]

use comsat_protocol::msg::{ControlMessage, FrameDecoder, RelayToAgent};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((msg, used))) = RelayToAgent::decode_frame(data) {
        assert!(used <= data.len());
        let mut again = Vec::new();
        msg.write_to(&mut again).expect("a decoded message encodes");
        assert_eq!(msg.encoded_len(), Ok(again.len()));
        let (back, n) = RelayToAgent::decode_frame(&again)
            .expect("re-encoded frame is valid")
            .expect("re-encoded frame is complete");
        assert_eq!(back, msg);
        assert_eq!(n, again.len());
    }
    // The streaming decoder on the same bytes, fed in two pieces.
    let mut decoder = FrameDecoder::new();
    let (first, second) = data.split_at(data.len() / 2);
    decoder.extend(first);
    while let Ok(Some(_)) = decoder.next_message::<RelayToAgent>() {}
    decoder.extend(second);
    while let Ok(Some(_)) = decoder.next_message::<RelayToAgent>() {}
});
