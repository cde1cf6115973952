//! Keys on this machine: what `comsat-protocol` leaves to its callers to
//! stay sans-IO.
//!
//! - [`Generate`]: fresh private keys, and [`RandomId`]: fresh ids, from
//!   the OS random source, on the node that uses them; [`os_rng`]: the
//!   same source for the ephemeral keys of Noise handshakes.
//! - [`KeyFile`]: private key files, written with mode 0600 atomically
//!   (temporary file, fsync, rename) and read only when group and others
//!   cannot read them; [`write_secret_file`] and [`read_secret_file`] do
//!   the same for any secret (a TLS key, a token).
//!
//! Keys are zeroised on drop and never printed (their `Debug` is redacted).

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use comsat_protocol::limits::MAX_KEY_FILE_LEN;
use comsat_protocol::noise::NoiseRng;
use comsat_protocol::{KeyTextError, LinkId, NodeId, NoiseSecretKey, RelayId, SigningKey};
use zeroize::Zeroizing;

/// A key file could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFileError {
    /// Reading or writing failed.
    #[error("key file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file can be read by group or others.
    #[error(
        "key file {path} has mode {mode:04o}, readable by group or others; \
         a private key must be private: run `chmod 600 {path}`"
    )]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file is not a key file of the expected kind.
    #[error("key file {path} is {source}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        source: KeyTextError,
    },
}

/// A private key made fresh from the OS random source.
pub trait Generate {
    /// A new key.
    fn generate() -> Self;
}

impl Generate for SigningKey {
    fn generate() -> Self {
        Self::from_seed(&Zeroizing::new(rand::random::<[u8; 32]>()))
    }
}

impl Generate for NoiseSecretKey {
    fn generate() -> Self {
        Self::from_bytes(rand::random())
    }
}

/// An id made fresh from the OS random source.
pub trait RandomId {
    /// A new id.
    fn random() -> Self;
}

macro_rules! random_id {
    ($($id:ident),*) => {$(
        impl RandomId for $id {
            fn random() -> Self {
                Self(rand::random())
            }
        }
    )*};
}
random_id!(NodeId, LinkId, RelayId);

/// A fresh JWT id ([`comsat_protocol::jwt::mint`]'s `jti`).
pub fn random_jti() -> [u8; 16] {
    rand::random()
}

/// The OS random source (through the thread's CSPRNG, as [`Generate`]
/// uses it) as a [`NoiseRng`]: where a Noise handshake on this machine
/// draws its ephemeral key.
pub fn os_rng() -> Box<dyn NoiseRng> {
    Box::new(OsNoiseRng)
}

struct OsNoiseRng;

impl NoiseRng for OsNoiseRng {
    fn fill(&mut self, out: &mut [u8]) {
        rand::RngCore::fill_bytes(&mut rand::rng(), out);
    }
}

/// A private key kept in a file of its own.
pub trait KeyFile: Sized {
    /// Writes the key to `path` (mode 0600, atomically).
    fn write_file(&self, path: &Path) -> Result<(), KeyFileError>;
    /// Reads a key written by [`Self::write_file`], refusing a file that
    /// group or others can read.
    fn read_file(path: &Path) -> Result<Self, KeyFileError>;
}

macro_rules! key_file {
    ($($key:ident),*) => {$(
        impl KeyFile for $key {
            fn write_file(&self, path: &Path) -> Result<(), KeyFileError> {
                write_secret_file(path, self.to_text().as_bytes())
            }

            fn read_file(path: &Path) -> Result<Self, KeyFileError> {
                let text = read_secret_file(path)?;
                Self::from_text(&text).map_err(|source| KeyFileError::Format {
                    path: path.to_owned(),
                    source,
                })
            }
        }
    )*};
}
key_file!(SigningKey, NoiseSecretKey);

/// Writes `contents` to `path` with mode 0600: to a new temporary file in
/// the same directory first, flushed to disk, then renamed over `path`, so a
/// crash never leaves a half-written key.
pub fn write_secret_file(path: &Path, contents: &[u8]) -> Result<(), KeyFileError> {
    let io = |source| KeyFileError::Io {
        path: path.to_owned(),
        source,
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io(std::io::Error::other("path has no file name")))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{:016x}",
        name.to_string_lossy(),
        rand::random::<u64>()
    ));
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io)
}

/// Reads a secret file, refusing one that group or others can read and one
/// larger than [`MAX_KEY_FILE_LEN`].
pub fn read_secret_file(path: &Path) -> Result<Zeroizing<String>, KeyFileError> {
    let io = |source| KeyFileError::Io {
        path: path.to_owned(),
        source,
    };
    let file = fs::File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    let mut text = Zeroizing::new(String::new());
    file.take(MAX_KEY_FILE_LEN + 1)
        .read_to_string(&mut text)
        .map_err(io)?;
    if text.len() as u64 > MAX_KEY_FILE_LEN {
        return Err(io(std::io::Error::other(format!(
            "larger than {MAX_KEY_FILE_LEN} bytes"
        ))));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signing_key_file_round_trip_and_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.key");
        let key = SigningKey::generate();
        key.write_file(&path).expect("write");
        let mode = fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let back = SigningKey::read_file(&path).expect("read");
        assert_eq!(back.public(), key.public());
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(dir.path()).expect("ls").count(), 1);
    }

    #[test]
    fn world_readable_key_is_refused_with_advice() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("noise.key");
        NoiseSecretKey::generate().write_file(&path).expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = NoiseSecretKey::read_file(&path).expect_err("must refuse");
        assert!(matches!(err, KeyFileError::Permissions { mode: 0o644, .. }));
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }

    #[test]
    fn os_rng_fills_differently_each_time() {
        let (mut x, mut y) = ([0u8; 32], [0u8; 32]);
        os_rng().fill(&mut x);
        os_rng().fill(&mut y);
        assert_ne!(x, [0; 32]);
        assert_ne!(x, y);
    }

    #[test]
    fn wrong_kind_of_key_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("k");
        SigningKey::generate().write_file(&path).expect("write");
        let err = NoiseSecretKey::read_file(&path).expect_err("wrong kind");
        assert!(matches!(err, KeyFileError::Format { .. }), "{err}");
    }
}
