//! The harness of comsat's end-to-end tests.
//!
//! It starts the real `comsat` binary as processes on loopback ([`Proc`]),
//! reads their `/metrics` ([`scrape`], [`metric`]), generates deterministic
//! pseudo-random streams and hashes what arrives ([`Oracle`]), and speaks
//! the relay protocol directly for negative tests ([`raw`]), and puts edges
//! behind real NATs in network namespaces ([`netns`]). Every process it
//! starts is killed, by PID, when its handle drops.
//!
//! The scenario tests live in the root package's `tests/*.rs`, where Cargo
//! gives them the binary's path as `env!("CARGO_BIN_EXE_comsat")`.

#![forbid(unsafe_code)]

pub mod docker;
pub mod fault;
pub mod fleet;
pub mod hostile;
pub mod netns;
pub mod oracle;
pub mod proc;
pub mod proxy_v2;
pub mod raw;
pub mod tools;

pub use oracle::Oracle;

/// Locks `m`, taking the value of a poisoned lock as it is.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
pub use proc::{
    Proc, free_udp_port, main_threads_keep_the_process_niceness, main_threads_yield_to_the_lane,
    metric, minor_faults, scrape, stat_field, thread_nices, threads_named, wait_for_metric,
};
