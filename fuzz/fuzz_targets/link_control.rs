//! Link-control messages (after decryption): decode never panics and
//! round-trips.
#![no_main]

use comsat_protocol::link::LinkControl;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = LinkControl::decode(data) {
        let again = msg.encode().expect("a decoded message encodes");
        assert_eq!(LinkControl::decode(&again).expect("re-decodes"), msg);
    }
});
