//! A flow stream from the network: a flow header, then records. Decoding
//! never panics, and every header that decodes re-encodes (with `write_to`)
//! to bytes that decode to an equal header.
#![no_main]

use comsat_protocol::record::{FlowHeader, RecordHeader, decode_record, split_plaintext};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(Some((header, used))) = FlowHeader::decode(data) else {
        return;
    };
    assert!(used <= data.len());
    let mut again = Vec::new();
    header.write_to(&mut again);
    assert_eq!(again.len(), header.encoded_len());
    assert_eq!(FlowHeader::decode(&again), Ok(Some((header, again.len()))));

    let mut rest = &data[used..];
    while let Ok(Some((record, ciphertext, n))) = decode_record(rest) {
        assert!(n <= rest.len());
        assert_eq!(ciphertext.len(), record.len);
        let mut again = Vec::new();
        record.write_to(&mut again);
        assert_eq!(again.as_slice(), &rest[..again.len()]);
        assert_eq!(RecordHeader::decode(&again), Ok(Some(record)));
        let _ = split_plaintext(ciphertext);
        rest = &rest[n..];
    }
});
