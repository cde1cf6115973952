//! `RelayToAgent` control frames from the network: decoding never panics, and a
//! frame that decodes re-encodes to a frame that decodes to an equal
//! message ([`comsat_fuzz::control_frames`]).
#![no_main]

use comsat_protocol::msg::RelayToAgent;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| comsat_fuzz::control_frames::<RelayToAgent>(data));
