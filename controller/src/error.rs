//! [`ControllerError`]: what `init`, `bind` and `run` can fail with. Each
//! message names the file or field concerned and what to do.

use std::net::SocketAddr;
use std::path::PathBuf;

use comsat_node::keys::KeyFileError;

use crate::pki::PkiError;
use crate::store::StoreError;

/// A controller failure an operator has to act on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControllerError {
    /// `init` on a directory that already holds a controller.
    #[error(
        "{} already holds a comsat controller ({} exists); \
         run `comsat controller run --data-dir {}` or choose another directory",
        dir.display(), marker.display(), dir.display()
    )]
    AlreadyInitialised {
        /// The data dir.
        dir: PathBuf,
        /// The file that shows it.
        marker: PathBuf,
    },
    /// `init` was given a database that already holds a controller.
    #[error(
        "{url} already holds a controller's state: to add a controller, copy the first \
         controller's data dir and run it with the same --database; to start over, use an \
         empty database"
    )]
    DatabaseInUse {
        /// The database, without its password.
        url: String,
    },
    /// A file of the data dir is missing.
    #[error(
        "{} is missing: is {} a controller data dir? create one with `comsat controller init`",
        path.display(), dir.display()
    )]
    NotInitialised {
        /// The data dir.
        dir: PathBuf,
        /// The missing file.
        path: PathBuf,
    },
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A configuration file or option is invalid.
    #[error("{}: {message}", path.display())]
    Config {
        /// The file (or option) concerned.
        path: PathBuf,
        /// What is wrong and what to do.
        message: String,
    },
    /// An option passed to `init` is invalid.
    #[error("{option}: {message}")]
    Option {
        /// The option, e.g. `--public-url`.
        option: &'static str,
        /// What is wrong and what to do.
        message: String,
    },
    /// A key file could not be read or written.
    #[error(transparent)]
    Key(#[from] KeyFileError),
    /// A certificate or TLS key could not be made or read.
    #[error("{}: {source}", path.display())]
    Pki {
        /// The file concerned.
        path: PathBuf,
        /// The cause.
        source: PkiError,
    },
    /// The database failed.
    #[error("database {}: {source}", path.display())]
    Store {
        /// The database file.
        path: PathBuf,
        /// The cause.
        source: StoreError,
    },
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source} (set `listen` in controller.toml or pass --listen)")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The HTTPS server failed.
    #[error("HTTPS server failed: {0}")]
    Serve(std::io::Error),
}

impl ControllerError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, source }
    }

    pub(crate) fn pki(path: impl Into<PathBuf>) -> impl FnOnce(PkiError) -> Self {
        let path = path.into();
        move |source| Self::Pki { path, source }
    }
}
