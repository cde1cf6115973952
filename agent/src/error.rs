//! Agent errors.

use std::path::PathBuf;

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The configuration is invalid.
    #[error("config {path}: {reason}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },
    /// A key file problem.
    #[error(transparent)]
    KeyFile(#[from] comsat_node::keys::KeyFileError),
    /// TLS setup failed.
    #[error("relay TLS for link {link}: {reason}")]
    Tls {
        /// The link whose relay entry is wrong.
        link: String,
        /// What is wrong.
        reason: String,
    },
    /// A local listener could not be bound.
    #[error("link {link}: cannot listen on {spec}: {source}")]
    Listen {
        /// The link.
        link: String,
        /// The listen spec.
        spec: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The thread that serves links naming a `connection` could not start.
    #[error("link {link}: cannot start the thread for named connections: {source}")]
    Lane {
        /// The link.
        link: String,
        /// The cause.
        source: std::io::Error,
    },
}
