//! Join token strings (from files, stdin, the command line): parsing never
//! panics, and a token that parses re-encodes to a string that parses to
//! an equal token.
#![no_main]

use comsat_protocol::api::JoinToken;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(t) = JoinToken::parse(s) {
        assert_eq!(JoinToken::parse(&t.encode()), Ok(t));
    }
});
