//! A link's `allow` rules (from the controller's API and agent configs):
//! parsing never panics, and a rule that parses prints as a string that
//! parses to an equal rule.
#![no_main]

use comsat_protocol::workload::Rule;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(rule) = Rule::parse(s) {
        assert_eq!(Rule::parse(&rule.to_string()), Ok(rule));
    }
});
