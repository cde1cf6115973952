//! The comsat controller: enrolment, links, grants and relay assignment,
//! served as an HTTPS API ([`comsat_protocol::api`]).
//!
//! - [`init`] creates a data dir: authority key, CAs, TLS certificate,
//!   database, admin token, `comsat ctl` context.
//! - [`Controller::bind`] opens it and binds; [`Controller::run`] serves
//!   until told to stop.
//! - Storage goes through the [`store::Store`] trait, implemented by
//!   [`store::SqlStore`] on SQLite (the default) and PostgreSQL (several
//!   controllers on one database).
//! - Relays are assigned by weighted rendezvous hashing ([`assign`]); a
//!   background task moves links off relays that stop heartbeating and
//!   renews grants before they expire.
//!
//! Node requests carry EdDSA JWTs whose `jti` is recorded in the database
//! and refused a second time; users and service accounts use API tokens,
//! of which only a SHA-256 is stored, and get what their role bindings
//! allow ([`rbac`]). Changes and refusals go to the audit log. No secret is
//! ever logged.

#![forbid(unsafe_code)]

mod admit;
pub mod assign;
mod audit;
pub mod bundle;
pub mod config;
pub mod dev;
mod error;
mod http;
mod init;
mod link_view;
pub mod pki;
pub mod rbac;
mod server;
mod state;
pub mod store;

pub use config::ControllerConfig;
pub use error::ControllerError;
pub use init::{
    ADMIN_TOKEN_FILE, ADMIN_TOKEN_PREFIX, CONTEXT_FILE, InitOptions, InitReport, init, token_hash,
};
pub use server::{Controller, MetricsText, RunOptions};

/// Unix time now, in seconds.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
