//! The comsat controller.
//!
//! Not built yet: enrolment, the HTTPS API, storage and the grant push land
//! with the controller issue. Until then `comsat dev init` writes the
//! static configuration and grant files the relay and agents read.

#![forbid(unsafe_code)]

/// What the CLI prints for controller commands that do not exist yet.
pub const NOT_YET: &str = "the controller is not built yet: use `comsat dev init` to write \
     static relay and agent configurations (see README.md)";
