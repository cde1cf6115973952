//! Control frames from the network: decode never panics, and whatever
//! decodes re-encodes to a frame that decodes to the same message.
#![no_main]

use comsat_protocol::msg::{ControlMessage, FrameDecoder, RelayToAgent};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((msg, used))) = RelayToAgent::decode_frame(data) {
        assert!(used <= data.len());
        let mut again = Vec::new();
        msg.write_to(&mut again).expect("a decoded message encodes");
        let (back, n) = RelayToAgent::decode_frame(&again)
            .expect("re-encoded frame is valid")
            .expect("re-encoded frame is complete");
        assert_eq!(back, msg);
        assert_eq!(n, again.len());
    }
    // The streaming decoder on the same bytes, fed in two pieces.
    let mut d = FrameDecoder::new();
    let cut = data.len() / 2;
    d.extend(&data[..cut]);
    while let Ok(Some(_)) = d.next_message::<RelayToAgent>() {}
    d.extend(&data[cut..]);
    while let Ok(Some(_)) = d.next_message::<RelayToAgent>() {}
});
