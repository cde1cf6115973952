//! A flow stream from the network: header, then records.
#![no_main]

use comsat_protocol::record::{FlowHeader, decode_record, split_plaintext};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(Some((header, used))) = FlowHeader::decode(data) else {
        return;
    };
    let mut again = Vec::new();
    header.write_to(&mut again);
    assert_eq!(FlowHeader::decode(&again), Ok(Some((header, again.len()))));
    let mut rest = &data[used..];
    while let Ok(Some((_, ciphertext, n))) = decode_record(rest) {
        assert!(n <= rest.len());
        let _ = split_plaintext(ciphertext);
        rest = &rest[n..];
    }
});
