//! What each side states in its handshake payload, and the cipher.

use ring::aead::{self, AES_256_GCM, CHACHA20_POLY1305};

use super::{
    DEFAULT_FLOW_IDS_LOG2, DEFAULT_RECORDS_PER_KEY_LOG2, MIN_LOG2, NoiseError, PREFERS_AES,
};

/// What one side states in its handshake payload (encrypted and
/// authenticated by the handshake, so a relay cannot change it), and what
/// the session then uses: AES-256-GCM only if both prefer it, and the
/// lower of the two sides' limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    /// The transport AEAD.
    pub cipher: Cipher,
    /// A record key seals at most `2^records_per_key_log2` records.
    pub records_per_key_log2: u8,
    /// A dialling side opens `2^flow_ids_log2 - 1` flows per generation.
    pub flow_ids_log2: u8,
}

impl Default for Params {
    /// This machine's cipher preference and the default limits.
    fn default() -> Self {
        Self {
            cipher: Cipher::local_preference(),
            records_per_key_log2: DEFAULT_RECORDS_PER_KEY_LOG2,
            flow_ids_log2: DEFAULT_FLOW_IDS_LOG2,
        }
    }
}

impl Params {
    /// The defaults with `cipher`.
    pub fn with_cipher(cipher: Cipher) -> Self {
        Self {
            cipher,
            ..Self::default()
        }
    }

    /// Checks the limits are in range.
    pub fn check(self) -> Result<Self, NoiseError> {
        let ok = (MIN_LOG2..=DEFAULT_RECORDS_PER_KEY_LOG2).contains(&self.records_per_key_log2)
            && (MIN_LOG2..=DEFAULT_FLOW_IDS_LOG2).contains(&self.flow_ids_log2);
        if ok {
            Ok(self)
        } else {
            Err(NoiseError::Params(
                self.records_per_key_log2,
                self.flow_ids_log2,
            ))
        }
    }

    /// Records one key seals.
    pub fn records_per_key(self) -> u64 {
        1 << self.records_per_key_log2
    }

    /// Flows one dialling side opens per generation of flow ids.
    pub fn flow_ids_per_generation(self) -> u64 {
        (1 << self.flow_ids_log2) - 1
    }

    pub(super) fn payload(self) -> [u8; 3] {
        let flags = if self.cipher == Cipher::AesGcm {
            PREFERS_AES
        } else {
            0
        };
        [flags, self.records_per_key_log2, self.flow_ids_log2]
    }

    /// What a handshake payload states: exactly three bytes (unknown flags
    /// are ignored), limits in range.
    pub(super) fn from_payload(payload: &[u8]) -> Result<Self, NoiseError> {
        let &[flags, records, ids] = payload else {
            return Err(NoiseError::HandshakePayload(payload.len()));
        };
        Self {
            cipher: if flags & PREFERS_AES != 0 {
                Cipher::AesGcm
            } else {
                Cipher::ChaChaPoly
            },
            records_per_key_log2: records,
            flow_ids_log2: ids,
        }
        .check()
    }

    pub(super) fn agree(self, theirs: Self) -> Self {
        Self {
            cipher: Cipher::agree(self.cipher, theirs.cipher),
            records_per_key_log2: self.records_per_key_log2.min(theirs.records_per_key_log2),
            flow_ids_log2: self.flow_ids_log2.min(theirs.flow_ids_log2),
        }
    }
}

/// The AEAD of a session's transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Cipher {
    /// ChaCha20-Poly1305: fast everywhere, the choice without AES hardware.
    ChaChaPoly,
    /// AES-256-GCM: the faster one where the CPU has AES instructions.
    AesGcm,
}

impl Cipher {
    /// What this machine prefers: AES-GCM if the CPU has AES (and carry-less
    /// multiplication) instructions, else ChaCha20-Poly1305.
    pub fn local_preference() -> Self {
        if aes_hardware() {
            Self::AesGcm
        } else {
            Self::ChaChaPoly
        }
    }

    pub(super) fn agree(ours: Self, theirs: Self) -> Self {
        if ours == Self::AesGcm && theirs == Self::AesGcm {
            Self::AesGcm
        } else {
            Self::ChaChaPoly
        }
    }

    pub(super) fn algorithm(self) -> &'static aead::Algorithm {
        match self {
            Self::ChaChaPoly => &CHACHA20_POLY1305,
            Self::AesGcm => &AES_256_GCM,
        }
    }

    /// Noise's nonce encoding: 32 zero bits, then the counter little endian
    /// (ChaChaPoly) or big endian (AESGCM).
    pub(super) fn nonce(self, n: u64) -> aead::Nonce {
        let mut bytes = [0u8; aead::NONCE_LEN];
        bytes[4..].copy_from_slice(&match self {
            Self::ChaChaPoly => n.to_le_bytes(),
            Self::AesGcm => n.to_be_bytes(),
        });
        aead::Nonce::assume_unique_for_key(bytes)
    }
}

#[cfg(target_arch = "x86_64")]
fn aes_hardware() -> bool {
    std::arch::is_x86_feature_detected!("aes") && std::arch::is_x86_feature_detected!("pclmulqdq")
}

#[cfg(target_arch = "aarch64")]
fn aes_hardware() -> bool {
    std::arch::is_aarch64_feature_detected!("aes")
        && std::arch::is_aarch64_feature_detected!("pmull")
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn aes_hardware() -> bool {
    false
}
