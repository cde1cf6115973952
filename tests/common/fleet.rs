//! The fleet fixture ([`comsat_tests::fleet`]), and this build's binary.

#![allow(unused_imports, dead_code, unreachable_pub)]

pub use comsat_tests::fleet::*;

pub const BIN: &str = env!("CARGO_BIN_EXE_comsat");
