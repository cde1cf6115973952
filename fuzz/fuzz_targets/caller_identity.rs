//! The caller identity in a flow's `Open` (sealed end to end, so only a
//! peer agent writes it; decoded with limits all the same): decoding never
//! panics, and an identity that decodes re-encodes to bytes that decode to
//! an equal one, whose selectors describe a workload.
#![no_main]

use comsat_protocol::workload::CallerIdentity;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = CallerIdentity::decode(data) {
        let bytes = c.encode().expect("an identity that decoded encodes");
        assert_eq!(CallerIdentity::decode(&bytes).as_ref(), Ok(&c));
        assert!(c.workload().is_ok());
        let _ = comsat_protocol::workload::proxy_v2_header(Some(&c));
    }
});
