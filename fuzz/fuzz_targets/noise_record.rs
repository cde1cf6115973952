//! Records from the network opened with a real session: never panics, and
//! nothing forged opens.
#![no_main]

use std::sync::OnceLock;

use comsat_protocol::LinkId;
use comsat_protocol::keys::NoiseSecretKey;
use comsat_protocol::noise::{self, Session};
use comsat_protocol::record::decode_record;
use libfuzzer_sys::fuzz_target;

fn session() -> &'static Session {
    static S: OnceLock<Session> = OnceLock::new();
    S.get_or_init(|| {
        let a = NoiseSecretKey::from_bytes([1; 32]);
        let b = NoiseSecretKey::from_bytes([2; 32]);
        let link = LinkId([3; 16]);
        let (pending, m1) = noise::initiate(&a, &b.public(), &link).expect("initiate");
        let (_, m2) = noise::respond(&b, &a.public(), &link, &m1).expect("respond");
        pending.handle_response(&m2).expect("finish")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&flow, rest)) = data.split_first() else {
        return;
    };
    let mut out = Vec::new();
    if let Ok(Some((header, ciphertext, _))) = decode_record(rest) {
        let opened = session().open_record(u32::from(flow), header.seq, ciphertext, &mut out);
        assert!(opened.is_err(), "a forged record opened");
    }
    let _ = session().open_control(u64::from(flow), rest);
});
