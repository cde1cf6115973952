//! Key types and the text of key files.
//!
//! Private keys are zeroised on drop and never printed (their `Debug` is
//! redacted). This crate makes them from bytes and reads and writes their
//! text; generating them from the OS random source and the files themselves
//! (mode 0600, written atomically) are `comsat-node`'.

use std::fmt;

use ed25519_dalek::{Signer, Verifier};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::ids::{ParseHexError, hex_bytes, parse_hex};

pub use ed25519_dalek::Signature;

const SIGNING_KEY_HEADER: &str = "comsat ed25519 signing key v1";
const NOISE_KEY_HEADER: &str = "comsat x25519 noise key v1";

/// `Display` and `FromStr` in hex, and a `Debug` of the first 4 bytes, for
/// a 32-byte public key.
macro_rules! public_key_text {
    ($name:ident) => {
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&hex::encode(self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), hex::encode(&self.0[..4]))
            }
        }

        impl std::str::FromStr for $name {
            type Err = ParseHexError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                parse_hex::<32>(s).map(Self)
            }
        }
    };
}

/// The text of a key file is not a key of the expected kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a {expected}: {reason}")]
pub struct KeyTextError {
    /// What kind of key was expected.
    pub expected: &'static str,
    /// What was wrong.
    pub reason: String,
}

/// An ed25519 private signing key (a node key or the authority key).
pub struct SigningKey(ed25519_dalek::SigningKey);

impl SigningKey {
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

    /// The text of the key's file: a header line and the seed in hex.
    pub fn to_text(&self) -> Zeroizing<String> {
        Zeroizing::new(format!(
            "{SIGNING_KEY_HEADER}\n{}\n",
            hex::encode(self.0.to_bytes())
        ))
    }

    /// Reads the text written by [`Self::to_text`].
    pub fn from_text(text: &str) -> Result<Self, KeyTextError> {
        let seed = parse_key_text(text, SIGNING_KEY_HEADER, "comsat ed25519 signing key")?;
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

public_key_text!(SignPublicKey);

/// An X25519 Noise static private key.
pub struct NoiseSecretKey(Zeroizing<[u8; 32]>);

impl NoiseSecretKey {
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

    /// The text of the key's file: a header line and the key in hex.
    pub fn to_text(&self) -> Zeroizing<String> {
        Zeroizing::new(format!("{NOISE_KEY_HEADER}\n{}\n", hex::encode(*self.0)))
    }

    /// Reads the text written by [`Self::to_text`].
    pub fn from_text(text: &str) -> Result<Self, KeyTextError> {
        let bytes = parse_key_text(text, NOISE_KEY_HEADER, "comsat x25519 noise key")?;
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

public_key_text!(NoisePublicKey);

fn parse_key_text(
    text: &str,
    header: &str,
    expected: &'static str,
) -> Result<Zeroizing<[u8; 32]>, KeyTextError> {
    let format = |reason: &str| KeyTextError {
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
    fn key_text_round_trips_and_names_what_is_wrong() {
        let key = SigningKey::from_seed(&[7; 32]);
        let back = SigningKey::from_text(&key.to_text()).expect("parses");
        assert_eq!(back.public(), key.public());
        let noise = NoiseSecretKey::from_bytes([9; 32]);
        let back = NoiseSecretKey::from_text(&noise.to_text()).expect("parses");
        assert_eq!(back.public(), noise.public());
        let err = NoiseSecretKey::from_text(&key.to_text()).expect_err("wrong kind");
        assert!(err.reason.contains("first line"), "{err}");
        let err = SigningKey::from_text(&format!("{SIGNING_KEY_HEADER}\nzz\n")).expect_err("hex");
        assert!(err.reason.contains("64 hex digits"), "{err}");
        let err = SigningKey::from_text(SIGNING_KEY_HEADER).expect_err("no key");
        assert!(err.reason.contains("missing key line"), "{err}");
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
        let key = SigningKey::from_seed(&[3; 32]);
        let sig = key.sign(b"domain-one", b"msg");
        assert!(key.public().verify(b"domain-one", b"msg", &sig));
        assert!(!key.public().verify(b"domain-two", b"msg", &sig));
        assert!(!key.public().verify(b"domain-one", b"msh", &sig));
    }
}
