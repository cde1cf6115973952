//! SPIFFE IDs and the certificates that carry them (a relay's certificate
//! comes from the network): parsing never panics, and an ID that checks
//! splits into a trust domain and path that check too.
#![no_main]

use comsat_protocol::spiffe;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = spiffe::cert_uris(data);
    if let Some(id) = spiffe::svid_spiffe_id(data) {
        assert!(spiffe::check_spiffe_id(&id).is_ok());
    }
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Some((domain, _path)) = spiffe::split_spiffe_id(s) {
        assert!(spiffe::check_trust_domain(domain).is_ok());
    }
});
