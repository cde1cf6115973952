//! Key types and key files.
//!
//! Private keys are generated on the node that uses them, zeroised on drop,
//! never printed (their `Debug` is redacted) and written to files with mode
//! 0600 atomically (temporary file, fsync, rename). Loading a key file that
//! group or others can read is refused.

use std::fmt;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signer, Verifier};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::ids::{ParseHexError, hex_bytes, parse_hex};
use crate::limits::MAX_KEY_FILE_LEN;

pub use ed25519_dalek::Signature;

const SIGNING_KEY_HEADER: &str = "comsat ed25519 signing key v1";
const NOISE_KEY_HEADER: &str = "comsat x25519 noise key v1";

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
    #[error("key file {path} is not a {expected}: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What kind of key was expected.
        expected: &'static str,
        /// What was wrong.
        reason: String,
    },
}

/// An ed25519 private signing key (a node key or the authority key).
pub struct SigningKey(ed25519_dalek::SigningKey);

impl SigningKey {
    /// Generates a new key from the OS random source.
    pub fn generate() -> Self {
        let seed = Zeroizing::new(rand::random::<[u8; 32]>());
        Self(ed25519_dalek::SigningKey::from_bytes(&seed))
    }

    /// Builds a key from its 32-byte seed.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self(ed25519_dalek::SigningKey::from_bytes(seed))
    }

    /// The public half.
    pub fn public(&self) -> SignPublicKey {
        SignPublicKey(self.0.verifying_key().to_bytes())
    }

    /// Signs `domain || msg`. `domain` must be one of the crate's
    /// `DOMAIN_SEP_*` constants so signatures of one kind can never be
    /// replayed as another.
    pub fn sign(&self, domain: &[u8], msg: &[u8]) -> Signature {
        let mut buf = Vec::with_capacity(domain.len() + msg.len());
        buf.extend_from_slice(domain);
        buf.extend_from_slice(msg);
        self.0.sign(&buf)
    }

    /// The key as PKCS#8 v1 DER (for JWT signing), zeroized on drop.
    pub fn to_pkcs8_der(&self) -> Zeroizing<Vec<u8>> {
        use ed25519_dalek::pkcs8::EncodePrivateKey;
        // Encoding a 32-byte seed into its fixed PKCS#8 form cannot fail.
        self.0
            .to_pkcs8_der()
            .map(|doc| Zeroizing::new(doc.as_bytes().to_vec()))
            .unwrap_or_default()
    }

    /// Writes the key to `path` (mode 0600, atomically).
    pub fn write_file(&self, path: &Path) -> Result<(), KeyFileError> {
        let text = Zeroizing::new(format!(
            "{SIGNING_KEY_HEADER}\n{}\n",
            hex::encode(self.0.to_bytes())
        ));
        write_secret_file(path, text.as_bytes())
    }

    /// Reads a key written by [`Self::write_file`].
    pub fn read_file(path: &Path) -> Result<Self, KeyFileError> {
        let seed = read_key_file(path, SIGNING_KEY_HEADER, "comsat ed25519 signing key")?;
        Ok(Self::from_seed(&seed))
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey(public={}, secret=<redacted>)", self.public())
    }
}

/// An ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SignPublicKey(#[serde(with = "hex_bytes")] pub [u8; 32]);

impl SignPublicKey {
    /// Verifies `sig` over `domain || msg` (strict verification: no
    /// malleable or small-order signatures).
    pub fn verify(&self, domain: &[u8], msg: &[u8], sig: &Signature) -> bool {
        let Ok(key) = ed25519_dalek::VerifyingKey::from_bytes(&self.0) else {
            return false;
        };
        let mut buf = Vec::with_capacity(domain.len() + msg.len());
        buf.extend_from_slice(domain);
        buf.extend_from_slice(msg);
        key.verify_strict(&buf, sig).is_ok() && key.verify(&buf, sig).is_ok()
    }
}

impl fmt::Display for SignPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for SignPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SignPublicKey({})", hex::encode(&self.0[..4]))
    }
}

impl std::str::FromStr for SignPublicKey {
    type Err = ParseHexError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_hex::<32>(s).map(Self)
    }
}

/// An X25519 Noise static private key.
pub struct NoiseSecretKey(Zeroizing<[u8; 32]>);

impl NoiseSecretKey {
    /// Generates a new key from the OS random source.
    pub fn generate() -> Self {
        Self(Zeroizing::new(rand::random()))
    }

    /// Builds a key from its raw bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// The raw private bytes, for handing to the Noise library.
    pub(crate) fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The public half.
    pub fn public(&self) -> NoisePublicKey {
        let secret = x25519_dalek::StaticSecret::from(*self.0);
        NoisePublicKey(x25519_dalek::PublicKey::from(&secret).to_bytes())
    }

    /// Writes the key to `path` (mode 0600, atomically).
    pub fn write_file(&self, path: &Path) -> Result<(), KeyFileError> {
        let text = Zeroizing::new(format!("{NOISE_KEY_HEADER}\n{}\n", hex::encode(*self.0)));
        write_secret_file(path, text.as_bytes())
    }

    /// Reads a key written by [`Self::write_file`].
    pub fn read_file(path: &Path) -> Result<Self, KeyFileError> {
        let bytes = read_key_file(path, NOISE_KEY_HEADER, "comsat x25519 noise key")?;
        Ok(Self(bytes))
    }
}

impl fmt::Debug for NoiseSecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "NoiseSecretKey(public={}, secret=<redacted>)",
            self.public()
        )
    }
}

/// An X25519 Noise static public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NoisePublicKey(#[serde(with = "hex_bytes")] pub [u8; 32]);

impl fmt::Display for NoisePublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for NoisePublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NoisePublicKey({})", hex::encode(&self.0[..4]))
    }
}

impl std::str::FromStr for NoisePublicKey {
    type Err = ParseHexError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_hex::<32>(s).map(Self)
    }
}

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

fn read_key_file(
    path: &Path,
    header: &str,
    expected: &'static str,
) -> Result<Zeroizing<[u8; 32]>, KeyFileError> {
    let text = read_secret_file(path)?;
    let format = |reason: &str| KeyFileError::Format {
        path: path.to_owned(),
        expected,
        reason: reason.to_owned(),
    };
    let mut lines = text.lines();
    if lines.next() != Some(header) {
        return Err(format(&format!("first line must be `{header}`")));
    }
    let body = lines
        .next()
        .ok_or_else(|| format("missing key line after the header"))?;
    if lines.any(|l| !l.trim().is_empty()) {
        return Err(format("unexpected lines after the key"));
    }
    let mut out = Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(body.trim(), &mut *out)
        .map_err(|_| format("the key line must be 64 hex digits"))?;
    Ok(out)
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
    fn wrong_kind_of_key_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("k");
        SigningKey::generate().write_file(&path).expect("write");
        let err = NoiseSecretKey::read_file(&path).expect_err("wrong kind");
        assert!(matches!(err, KeyFileError::Format { .. }), "{err}");
    }

    #[test]
    fn debug_never_shows_secret() {
        let key = SigningKey::from_seed(&[0xab; 32]);
        let shown = format!("{key:?}");
        assert!(!shown.contains("abab"), "{shown}");
        let noise = NoiseSecretKey::from_bytes([0xcd; 32]);
        let shown = format!("{noise:?}");
        assert!(!shown.contains("cdcd"), "{shown}");
    }

    #[test]
    fn signatures_are_domain_separated() {
        let key = SigningKey::generate();
        let sig = key.sign(b"domain-one", b"msg");
        assert!(key.public().verify(b"domain-one", b"msg", &sig));
        assert!(!key.public().verify(b"domain-two", b"msg", &sig));
        assert!(!key.public().verify(b"domain-one", b"msh", &sig));
    }
}
