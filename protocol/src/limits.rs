//! Named maximums for everything read off the wire or from a file.
//!
//! Every decoder checks a length against one of these before it allocates.

/// Largest encoded control frame body (`AgentToRelay` / `RelayToAgent`).
///
/// Control messages are small: a Hello is ~100 bytes, a Noise `KK` handshake
/// message under 100 bytes, a sealed link-control record a few dozen. 16 KiB
/// leaves room to grow without letting a peer make us buffer much.
pub const MAX_CONTROL_FRAME_LEN: usize = 16 * 1024;

/// Largest ciphertext carried by one record (the Noise message maximum).
pub const MAX_RECORD_CIPHERTEXT_LEN: usize = 65_535;

/// Length of the AEAD tag on every Noise transport message.
pub const NOISE_TAG_LEN: usize = 16;

/// Largest plaintext body in one record: the Noise maximum less the tag and
/// the one-byte record kind.
pub const MAX_RECORD_PAYLOAD_LEN: usize = MAX_RECORD_CIPHERTEXT_LEN - NOISE_TAG_LEN - 1;

/// Largest Noise handshake message we accept.
pub const MAX_HANDSHAKE_LEN: usize = 1024;

/// Number of bits of a record sequence number (the low bits of the nonce).
pub const SEQ_BITS: u32 = 40;

/// Sequence numbers must stay below this value: `2^40`.
pub const MAX_SEQ: u64 = 1 << SEQ_BITS;

/// Flow ids must stay below this value: `2^24` (the high bits of the nonce).
pub const MAX_FLOW_ID: u32 = 1 << (64 - SEQ_BITS);

/// Largest encoded signed grant (file or wire).
pub const MAX_SIGNED_GRANT_LEN: usize = 8 * 1024;

/// Most relays a grant may name.
pub const MAX_GRANT_RELAYS: usize = 16;

/// Largest key file we read.
pub const MAX_KEY_FILE_LEN: u64 = 4 * 1024;

/// Largest PEM file of certificates read (a CA bundle, a certificate
/// chain): far above any real one.
pub const MAX_PEM_FILE_LEN: u64 = 1024 * 1024;
