//! The end-to-end Noise session between the two agents of a link.
//!
//! Pattern `KK`: each agent knows the other's static key from its link
//! configuration (the controller vouches for it), so the handshake is one
//! round trip through the relay and authenticates both ends. Side A
//! initiates, side B responds. The prologue binds the session to the link
//! id, so a handshake for one link is useless on another.
//!
//! The handshake always runs [`NOISE_PARAMS`]. Each handshake message
//! carries a one-byte payload, encrypted and authenticated by the handshake
//! itself, saying whether its sender prefers AES-GCM (it has AES hardware).
//! The transport then uses AES-256-GCM when both prefer it and
//! ChaCha20-Poly1305 otherwise, keyed with the handshake's split keys (a
//! relay cannot change the choice: the payloads are authenticated, and an
//! empty payload, from an older peer, means ChaCha20-Poly1305). So a small
//! ARM board without AES instructions never runs software AES, and two
//! x86 agents get hardware AES without asking the controller.
//!
//! After the handshake both sides use stateless transport: every record
//! carries its own nonce `(flow_id << 40) | seq`, encoded as Noise encodes
//! nonces for the cipher in use, so records of many flows can be sealed
//! concurrently from one shared [`Session`], and a record can be sent again
//! after a reconnect. The receiver must accept each `(flow_id, seq)` at most
//! once (the flow code enforces strictly increasing `seq`, and the side that
//! accepts flows takes each flow id once per session: [`crate::replay`]),
//! and the sender must never reuse a flow id within a session. Records are sealed and
//! opened in place ([`Session::seal_record_in_place`],
//! [`Session::open_record_in_place`]): the bytes read from a socket are
//! encrypted where they lie.
//!
//! Call order: side A [`initiate`]s and sends the message through the relay;
//! side B [`respond`]s and sends its answer back; side A hands it to
//! [`ExpectResponse::handle_response`]. Both then hold a [`Session`].

use std::fmt;
use std::ops::Range;

use ring::aead::{self, AES_256_GCM, Aad, CHACHA20_POLY1305, LessSafeKey, UnboundKey};
use zeroize::Zeroizing;

use crate::ids::{FlowId, LinkId};
use crate::keys::{NoisePublicKey, NoiseSecretKey};
use crate::limits::{
    MAX_HANDSHAKE_LEN, MAX_RECORD_CIPHERTEXT_LEN, MAX_RECORD_PAYLOAD_LEN, NOISE_TAG_LEN,
};
use crate::record::{self, RECORD_HEADER_LEN, RecordError, RecordHeader, RecordKind};

/// The Noise protocol of the handshake.
pub const NOISE_PARAMS: &str = "Noise_KK_25519_ChaChaPoly_BLAKE2s";

/// Prologue label, version 1; followed by the link id.
pub const PROLOGUE_LABEL: &[u8] = b"comsat noise v1\0";

/// Bytes in front of a record's payload: the record header and the kind.
pub const RECORD_PREFIX_LEN: usize = RECORD_HEADER_LEN + 1;

/// Handshake payload flag: the sender prefers AES-GCM.
const PREFERS_AES: u8 = 1;

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

    fn agree(ours: Self, theirs: Self) -> Self {
        if ours == Self::AesGcm && theirs == Self::AesGcm {
            Self::AesGcm
        } else {
            Self::ChaChaPoly
        }
    }

    fn payload(self) -> [u8; 1] {
        [if self == Self::AesGcm { PREFERS_AES } else { 0 }]
    }

    /// The preference a handshake payload states. Empty (an older peer):
    /// ChaCha20-Poly1305; unknown flags are ignored.
    fn from_payload(payload: &[u8]) -> Result<Self, NoiseError> {
        match payload {
            [] => Ok(Self::ChaChaPoly),
            [flags] if flags & PREFERS_AES != 0 => Ok(Self::AesGcm),
            [_] => Ok(Self::ChaChaPoly),
            _ => Err(NoiseError::HandshakePayload(payload.len())),
        }
    }

    fn algorithm(self) -> &'static aead::Algorithm {
        match self {
            Self::ChaChaPoly => &CHACHA20_POLY1305,
            Self::AesGcm => &AES_256_GCM,
        }
    }

    /// Noise's nonce encoding: 32 zero bits, then the counter little endian
    /// (ChaChaPoly) or big endian (AESGCM).
    fn nonce(self, n: u64) -> aead::Nonce {
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

/// A Noise operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NoiseError {
    /// The Noise library refused (bad message, bad tag, wrong key).
    #[error("noise: {0}")]
    Snow(#[from] snow::Error),
    /// A handshake message is too long.
    #[error("handshake message of {0} bytes exceeds {MAX_HANDSHAKE_LEN}")]
    HandshakeTooLong(usize),
    /// A handshake payload is not the one-byte cipher preference.
    #[error("handshake payload of {0} bytes (expected at most 1)")]
    HandshakePayload(usize),
    /// A record value is out of range.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// A payload is too long for one record.
    #[error("record payload of {0} bytes exceeds {MAX_RECORD_PAYLOAD_LEN}")]
    PayloadTooLong(usize),
    /// A buffer to seal in place lacks the room for the record header.
    #[error("record buffer of {0} bytes lacks the {RECORD_PREFIX_LEN}-byte prefix")]
    NoPrefix(usize),
    /// A record or control message failed to decrypt (wrong key, flow or
    /// sequence number, or altered bytes).
    #[error("decryption failed")]
    Decrypt,
}

fn prologue(link_id: &LinkId) -> Vec<u8> {
    let mut p = PROLOGUE_LABEL.to_vec();
    p.extend_from_slice(&link_id.0);
    p
}

fn builder<'a>(
    local: &'a NoiseSecretKey,
    remote: &'a NoisePublicKey,
    prologue: &'a [u8],
) -> Result<snow::Builder<'a>, NoiseError> {
    let params = NOISE_PARAMS.parse()?;
    Ok(snow::Builder::new(params)
        .local_private_key(local.as_bytes())?
        .remote_public_key(&remote.0)?
        .prologue(prologue)?)
}

/// Side A after sending the first handshake message.
pub struct ExpectResponse {
    state: snow::HandshakeState,
    preference: Cipher,
}

impl fmt::Debug for ExpectResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ExpectResponse")
    }
}

/// Starts a session as side A, stating this machine's cipher preference:
/// returns the state and the message to send.
pub fn initiate(
    local: &NoiseSecretKey,
    remote: &NoisePublicKey,
    link_id: &LinkId,
) -> Result<(ExpectResponse, Vec<u8>), NoiseError> {
    initiate_preferring(local, remote, link_id, Cipher::local_preference())
}

/// [`initiate`] stating `preference` instead of this machine's.
pub fn initiate_preferring(
    local: &NoiseSecretKey,
    remote: &NoisePublicKey,
    link_id: &LinkId,
    preference: Cipher,
) -> Result<(ExpectResponse, Vec<u8>), NoiseError> {
    initiate_with(builder(local, remote, &prologue(link_id))?, preference)
}

fn initiate_with(
    b: snow::Builder<'_>,
    preference: Cipher,
) -> Result<(ExpectResponse, Vec<u8>), NoiseError> {
    let mut state = b.build_initiator()?;
    let mut msg = vec![0u8; MAX_HANDSHAKE_LEN];
    let n = state.write_message(&preference.payload(), &mut msg)?;
    msg.truncate(n);
    Ok((ExpectResponse { state, preference }, msg))
}

impl ExpectResponse {
    /// Completes the handshake with side B's answer.
    pub fn handle_response(mut self, msg: &[u8]) -> Result<Session, NoiseError> {
        if msg.len() > MAX_HANDSHAKE_LEN {
            return Err(NoiseError::HandshakeTooLong(msg.len()));
        }
        let mut payload = vec![0u8; MAX_HANDSHAKE_LEN];
        let n = self.state.read_message(msg, &mut payload)?;
        let theirs = Cipher::from_payload(&payload[..n])?;
        Session::from_handshake(self.state, Cipher::agree(self.preference, theirs))
    }
}

/// Answers side A's first message as side B, stating this machine's
/// cipher preference: returns the session and the message to send back.
pub fn respond(
    local: &NoiseSecretKey,
    remote: &NoisePublicKey,
    link_id: &LinkId,
    msg: &[u8],
) -> Result<(Session, Vec<u8>), NoiseError> {
    respond_preferring(local, remote, link_id, msg, Cipher::local_preference())
}

/// [`respond`] stating `preference` instead of this machine's.
pub fn respond_preferring(
    local: &NoiseSecretKey,
    remote: &NoisePublicKey,
    link_id: &LinkId,
    msg: &[u8],
    preference: Cipher,
) -> Result<(Session, Vec<u8>), NoiseError> {
    respond_with(builder(local, remote, &prologue(link_id))?, msg, preference)
}

fn respond_with(
    b: snow::Builder<'_>,
    msg: &[u8],
    preference: Cipher,
) -> Result<(Session, Vec<u8>), NoiseError> {
    if msg.len() > MAX_HANDSHAKE_LEN {
        return Err(NoiseError::HandshakeTooLong(msg.len()));
    }
    let mut state = b.build_responder()?;
    let mut payload = vec![0u8; MAX_HANDSHAKE_LEN];
    let n = state.read_message(msg, &mut payload)?;
    let theirs = Cipher::from_payload(&payload[..n])?;
    let mut out = vec![0u8; MAX_HANDSHAKE_LEN];
    let n = state.write_message(&preference.payload(), &mut out)?;
    out.truncate(n);
    let cipher = Cipher::agree(preference, theirs);
    Ok((Session::from_handshake(state, cipher)?, out))
}

/// An established end-to-end session: seals and opens records of any flow.
///
/// Shared by all flows of a link (`&self` methods, no lock needed). The
/// keys live in `ring`'s AEAD keys; the raw split keys they were made from
/// are zeroised as soon as those exist.
pub struct Session {
    cipher: Cipher,
    send: LessSafeKey,
    recv: LessSafeKey,
    handshake_hash: [u8; 32],
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Session({}, {:?})",
            hex::encode(&self.handshake_hash[..4]),
            self.cipher
        )
    }
}

impl Session {
    fn from_handshake(mut state: snow::HandshakeState, cipher: Cipher) -> Result<Self, NoiseError> {
        if !state.is_handshake_finished() {
            return Err(snow::Error::State(snow::error::StateProblem::HandshakeNotFinished).into());
        }
        let mut handshake_hash = [0u8; 32];
        let h = state.get_handshake_hash();
        let n = h.len().min(32);
        handshake_hash[..n].copy_from_slice(&h[..n]);
        // Noise's split: the first key carries initiator -> responder.
        let (k1, k2) = state.dangerously_get_raw_split();
        let (k1, k2) = (Zeroizing::new(k1), Zeroizing::new(k2));
        let (send, recv) = if state.is_initiator() {
            (k1, k2)
        } else {
            (k2, k1)
        };
        let key = |k: &[u8; 32]| {
            // Both AEADs take exactly the 32-byte keys Noise's split gives.
            LessSafeKey::new(UnboundKey::new(cipher.algorithm(), k).expect("a 256-bit key"))
        };
        Ok(Self {
            cipher,
            send: key(&send),
            recv: key(&recv),
            handshake_hash,
        })
    }

    /// The handshake hash: equal on both sides of one session, different
    /// for every session.
    pub fn handshake_hash(&self) -> &[u8; 32] {
        &self.handshake_hash
    }

    /// The transport's AEAD, as both sides agreed.
    pub fn cipher(&self) -> Cipher {
        self.cipher
    }

    /// Seals `plain[start..]` in place under nonce `n` and appends the tag.
    fn seal_at(&self, n: u64, buf: &mut Vec<u8>, start: usize) {
        let tag = self
            .send
            .seal_in_place_separate_tag(self.cipher.nonce(n), Aad::empty(), &mut buf[start..])
            // ring refuses only inputs beyond what one AEAD call may seal
            // (far above our 64 KiB record maximum, checked by callers).
            .expect("record within the AEAD's size limit");
        buf.extend_from_slice(tag.as_ref());
    }

    /// Seals one record where it lies. `record` holds [`RECORD_PREFIX_LEN`]
    /// bytes (whatever they are) followed by the payload; afterwards it
    /// holds the whole record, header and ciphertext, ready to send. Give it
    /// [`NOISE_TAG_LEN`] bytes of spare capacity to spare a reallocation.
    pub fn seal_record_in_place(
        &self,
        flow_id: FlowId,
        seq: u64,
        kind: RecordKind,
        record: &mut Vec<u8>,
    ) -> Result<(), NoiseError> {
        self.seal_record_at(flow_id, seq, kind, record, 0)
    }

    fn seal_record_at(
        &self,
        flow_id: FlowId,
        seq: u64,
        kind: RecordKind,
        buf: &mut Vec<u8>,
        start: usize,
    ) -> Result<(), NoiseError> {
        let payload_len = buf
            .len()
            .checked_sub(start + RECORD_PREFIX_LEN)
            .ok_or(NoiseError::NoPrefix(buf.len().saturating_sub(start)))?;
        if payload_len > MAX_RECORD_PAYLOAD_LEN {
            return Err(NoiseError::PayloadTooLong(payload_len));
        }
        let n = record::nonce(flow_id, seq)?;
        let ct_len = 1 + payload_len + NOISE_TAG_LEN;
        buf[start..start + RECORD_HEADER_LEN]
            .copy_from_slice(&RecordHeader { len: ct_len, seq }.encode());
        buf[start + RECORD_HEADER_LEN] = kind as u8;
        self.seal_at(n, buf, start + RECORD_HEADER_LEN);
        Ok(())
    }

    /// Appends a whole record (header and ciphertext) of `kind` carrying
    /// `payload` to `out` (a copy; see [`Self::seal_record_in_place`]).
    pub fn seal_record(
        &self,
        flow_id: FlowId,
        seq: u64,
        kind: RecordKind,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), NoiseError> {
        if payload.len() > MAX_RECORD_PAYLOAD_LEN {
            return Err(NoiseError::PayloadTooLong(payload.len()));
        }
        let start = out.len();
        out.reserve(RECORD_PREFIX_LEN + payload.len() + NOISE_TAG_LEN);
        out.resize(start + RECORD_PREFIX_LEN, 0);
        out.extend_from_slice(payload);
        let sealed = self.seal_record_at(flow_id, seq, kind, out, start);
        if sealed.is_err() {
            out.truncate(start);
        }
        sealed
    }

    /// Decrypts the ciphertext of record `seq` of `flow_id` where it lies:
    /// returns the record's kind and where in `ciphertext` its payload now
    /// lies in clear.
    pub fn open_record_in_place(
        &self,
        flow_id: FlowId,
        seq: u64,
        ciphertext: &mut [u8],
    ) -> Result<(RecordKind, Range<usize>), NoiseError> {
        let n = record::nonce(flow_id, seq)?;
        if ciphertext.len() > MAX_RECORD_CIPHERTEXT_LEN {
            return Err(RecordError::Length(ciphertext.len()).into());
        }
        let plain = self
            .recv
            .open_in_place(self.cipher.nonce(n), Aad::empty(), ciphertext)
            .map_err(|_| NoiseError::Decrypt)?;
        let (kind, payload) = record::split_plaintext(plain)?;
        Ok((kind, 1..1 + payload.len()))
    }

    /// Decrypts the ciphertext of record `seq` of `flow_id`, appending the
    /// payload to `out` and returning its kind (a copy; see
    /// [`Self::open_record_in_place`]).
    pub fn open_record(
        &self,
        flow_id: FlowId,
        seq: u64,
        ciphertext: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<RecordKind, NoiseError> {
        if ciphertext.len() > MAX_RECORD_CIPHERTEXT_LEN {
            return Err(RecordError::Length(ciphertext.len()).into());
        }
        let mut buf = ciphertext.to_vec();
        let (kind, payload) = self.open_record_in_place(flow_id, seq, &mut buf)?;
        out.extend_from_slice(&buf[payload]);
        Ok(kind)
    }

    /// Seals an opaque link-control message on flow 0; returns the
    /// ciphertext only (the caller carries `seq`).
    pub fn seal_control(&self, seq: u64, msg: &[u8]) -> Result<Vec<u8>, NoiseError> {
        if msg.len() > MAX_RECORD_PAYLOAD_LEN {
            return Err(NoiseError::PayloadTooLong(msg.len()));
        }
        let n = record::nonce(0, seq)?;
        let mut out = Vec::with_capacity(msg.len() + NOISE_TAG_LEN);
        out.extend_from_slice(msg);
        self.seal_at(n, &mut out, 0);
        Ok(out)
    }

    /// Opens a link-control message sealed by [`Self::seal_control`].
    pub fn open_control(&self, seq: u64, ciphertext: &[u8]) -> Result<Vec<u8>, NoiseError> {
        let n = record::nonce(0, seq)?;
        if ciphertext.len() > MAX_RECORD_CIPHERTEXT_LEN {
            return Err(RecordError::Length(ciphertext.len()).into());
        }
        let mut out = ciphertext.to_vec();
        let len = self
            .recv
            .open_in_place(self.cipher.nonce(n), Aad::empty(), &mut out)
            .map_err(|_| NoiseError::Decrypt)?
            .len();
        out.truncate(len);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::decode_record;

    fn keys() -> (NoiseSecretKey, NoiseSecretKey) {
        (
            NoiseSecretKey::from_bytes([1; 32]),
            NoiseSecretKey::from_bytes([2; 32]),
        )
    }

    fn pair_preferring(a_pref: Cipher, b_pref: Cipher) -> (Session, Session) {
        let (a, b) = keys();
        let link = LinkId([5; 16]);
        let (pending, m1) = initiate_preferring(&a, &b.public(), &link, a_pref).expect("initiate");
        let (sb, m2) = respond_preferring(&b, &a.public(), &link, &m1, b_pref).expect("respond");
        let sa = pending.handle_response(&m2).expect("finish");
        (sa, sb)
    }

    fn pair() -> (Session, Session) {
        let (a, b) = keys();
        let link = LinkId([5; 16]);
        let (pending, m1) = initiate(&a, &b.public(), &link).expect("initiate");
        let (sb, m2) = respond(&b, &a.public(), &link, &m1).expect("respond");
        let sa = pending.handle_response(&m2).expect("finish");
        (sa, sb)
    }

    const BOTH: [Cipher; 2] = [Cipher::ChaChaPoly, Cipher::AesGcm];

    #[test]
    fn aes_only_when_both_prefer_it() {
        for a in BOTH {
            for b in BOTH {
                let (sa, sb) = pair_preferring(a, b);
                let want = if a == Cipher::AesGcm && b == Cipher::AesGcm {
                    Cipher::AesGcm
                } else {
                    Cipher::ChaChaPoly
                };
                assert_eq!((sa.cipher(), sb.cipher()), (want, want), "{a:?} / {b:?}");
            }
        }
        // This machine's own preference meets itself.
        let (sa, sb) = pair();
        assert_eq!(sa.cipher(), Cipher::local_preference());
        assert_eq!(sb.cipher(), Cipher::local_preference());
    }

    #[test]
    fn records_round_trip_both_ways() {
        for cipher in BOTH {
            let (sa, sb) = pair_preferring(cipher, cipher);
            assert_eq!(sa.handshake_hash(), sb.handshake_hash());
            let mut wire = Vec::new();
            sa.seal_record(7, 0, RecordKind::Data, b"hello", &mut wire)
                .expect("seal");
            let (h, ct, used) = decode_record(&wire).expect("valid").expect("complete");
            assert_eq!(used, wire.len());
            let mut out = Vec::new();
            let kind = sb.open_record(7, h.seq, ct, &mut out).expect("open");
            assert_eq!((kind, out.as_slice()), (RecordKind::Data, &b"hello"[..]));

            let ct = sb.seal_control(0, b"ack").expect("seal");
            assert_eq!(sa.open_control(0, &ct).expect("open"), b"ack");
        }
    }

    #[test]
    fn in_place_sealing_matches_the_copying_one() {
        for cipher in BOTH {
            let (sa, sb) = pair_preferring(cipher, cipher);
            let payload: Vec<u8> = (0..=255u8).cycle().take(MAX_RECORD_PAYLOAD_LEN).collect();
            for len in [0, 1, 1000, MAX_RECORD_PAYLOAD_LEN] {
                let mut copied = b"already here".to_vec();
                sa.seal_record(3, 9, RecordKind::Data, &payload[..len], &mut copied)
                    .expect("seal");
                let mut record = vec![0xee; RECORD_PREFIX_LEN];
                record.extend_from_slice(&payload[..len]);
                sa.seal_record_in_place(3, 9, RecordKind::Data, &mut record)
                    .expect("seal in place");
                assert_eq!(&copied[12..], &record[..], "{cipher:?} {len}");
                let (h, _, used) = decode_record(&record).expect("valid").expect("whole");
                assert_eq!((h.len, used), (len + 1 + NOISE_TAG_LEN, record.len()));
                let (kind, at) = sb
                    .open_record_in_place(3, 9, &mut record[RECORD_HEADER_LEN..])
                    .expect("open in place");
                assert_eq!(kind, RecordKind::Data);
                assert_eq!(&record[RECORD_HEADER_LEN..][at], &payload[..len]);
            }
            let mut short = vec![0; RECORD_PREFIX_LEN - 1];
            assert!(matches!(
                sa.seal_record_in_place(3, 10, RecordKind::Data, &mut short),
                Err(NoiseError::NoPrefix(12))
            ));
            let mut long = vec![0; RECORD_PREFIX_LEN + MAX_RECORD_PAYLOAD_LEN + 1];
            assert!(matches!(
                sa.seal_record_in_place(3, 10, RecordKind::Data, &mut long),
                Err(NoiseError::PayloadTooLong(_))
            ));
        }
    }

    #[test]
    fn record_bound_to_flow_and_seq() {
        for cipher in BOTH {
            let (sa, sb) = pair_preferring(cipher, cipher);
            let mut wire = Vec::new();
            sa.seal_record(7, 3, RecordKind::Data, b"x", &mut wire)
                .expect("seal");
            let (_, ct, _) = decode_record(&wire).expect("valid").expect("complete");
            let mut out = Vec::new();
            assert!(sb.open_record(8, 3, ct, &mut out).is_err(), "other flow");
            assert!(sb.open_record(7, 4, ct, &mut out).is_err(), "other seq");
            // A's own sending key does not open A's records.
            assert!(sa.open_record(7, 3, ct, &mut out).is_err(), "reflected");
            let mut flipped = ct.to_vec();
            flipped[0] ^= 1;
            assert!(sb.open_record(7, 3, &flipped, &mut out).is_err(), "altered");
            assert!(sb.open_record(7, 3, ct, &mut out).is_ok());
        }
    }

    /// A peer that states no preference (an empty handshake payload, as
    /// before ciphers were negotiated) and runs snow's own transport gets
    /// ChaCha20-Poly1305 and reads and writes exactly what we do: our
    /// in-place transport is Noise's.
    #[test]
    fn an_older_peer_with_snows_transport_interoperates() {
        let (a, b) = keys();
        let link = LinkId([5; 16]);
        let p = prologue(&link);
        let mut old = builder(&a, &b.public(), &p)
            .expect("builder")
            .build_initiator()
            .expect("initiator");
        let mut m1 = vec![0u8; MAX_HANDSHAKE_LEN];
        let n = old.write_message(&[], &mut m1).expect("write");
        m1.truncate(n);
        let (sb, m2) =
            respond_preferring(&b, &a.public(), &link, &m1, Cipher::AesGcm).expect("respond");
        assert_eq!(sb.cipher(), Cipher::ChaChaPoly);
        let mut payload = vec![0u8; MAX_HANDSHAKE_LEN];
        let n = old.read_message(&m2, &mut payload).expect("read");
        assert_eq!(&payload[..n], &[PREFERS_AES], "B stated its preference");
        let old = old.into_stateless_transport_mode().expect("transport");

        let nonce = record::nonce(7, 5).expect("nonce");
        let mut theirs = vec![0u8; 64];
        let n = old
            .write_message(nonce, b"\x02hello", &mut theirs)
            .expect("seal");
        theirs.truncate(n);
        let mut out = Vec::new();
        assert_eq!(
            sb.open_record(7, 5, &theirs, &mut out).expect("open"),
            RecordKind::Data
        );
        assert_eq!(out, b"hello");
        let mut ours = Vec::new();
        sb.seal_record(7, 6, RecordKind::Data, b"world", &mut ours)
            .expect("seal");
        let mut plain = vec![0u8; 64];
        let n = old
            .read_message(record::nonce(7, 6).expect("nonce"), &ours[12..], &mut plain)
            .expect("snow opens ours");
        assert_eq!(&plain[..n], b"\x02world");
        let ct = sb.seal_control(3, b"ack").expect("seal");
        let n = old
            .read_message(record::nonce(0, 3).expect("nonce"), &ct, &mut plain)
            .expect("snow opens our control message");
        assert_eq!(&plain[..n], b"ack");
    }

    #[test]
    fn a_handshake_payload_longer_than_one_byte_is_refused() {
        let (a, b) = keys();
        let link = LinkId([5; 16]);
        let mut hs = builder(&a, &b.public(), &prologue(&link))
            .expect("builder")
            .build_initiator()
            .expect("initiator");
        let mut m1 = vec![0u8; MAX_HANDSHAKE_LEN];
        let n = hs.write_message(&[1, 2], &mut m1).expect("write");
        m1.truncate(n);
        assert!(matches!(
            respond(&b, &a.public(), &link, &m1),
            Err(NoiseError::HandshakePayload(2))
        ));
    }

    #[test]
    fn wrong_static_key_fails_handshake() {
        let (a, b) = keys();
        let mallory = NoiseSecretKey::from_bytes([3; 32]);
        let link = LinkId([5; 16]);
        let (_, m1) = initiate(&mallory, &b.public(), &link).expect("initiate");
        assert!(respond(&b, &a.public(), &link, &m1).is_err());
    }

    #[test]
    fn handshake_bound_to_link() {
        let (a, b) = keys();
        let (_, m1) = initiate(&a, &b.public(), &LinkId([5; 16])).expect("initiate");
        assert!(respond(&b, &a.public(), &LinkId([6; 16]), &m1).is_err());
    }

    #[test]
    fn seq_beyond_2_40_is_refused() {
        let (sa, _) = pair();
        let mut out = Vec::new();
        assert!(matches!(
            sa.seal_record(1, 1 << 40, RecordKind::Data, b"", &mut out),
            Err(NoiseError::Record(RecordError::Seq(_)))
        ));
        assert!(out.is_empty(), "nothing appended on failure");
    }

    /// Pinned vectors: fixed static and ephemeral keys give fixed messages.
    /// A change here means peers of different versions cannot talk. (The
    /// ChaChaPoly record is the one snow's own transport sealed before the
    /// transport moved to in-place sealing: same keys, same bytes.)
    #[test]
    fn pinned_vectors() {
        let (a, b) = keys();
        let link = LinkId([5; 16]);
        let p = prologue(&link);
        let ea = [0x11u8; 32];
        let eb = [0x22u8; 32];
        for (pref, m1_hex, m2_hex, record, hash) in [
            (
                Cipher::ChaChaPoly,
                "7b4e909bbe7ffe44c465a220037d608ee35897d31ef972f07f74892cb0f73f1384c2db1333ceed9a39a8ad273e7ec2a972",
                "0faa684ed28867b97f4a6a2dee5df8ce974e76b7018e3f22a1c4cf2678570f2084774bad2d14f4e0b04430fddd2cd2676c",
                "000000170000000000000000636e1d07b24d8521632b36760c32e981cd8d0ea2ac47ee",
                "8158d68e3043744fdc76acb2d7dbf3c9aae8a6fa4e88b8fd7b17fc69f0c05b79",
            ),
            (
                Cipher::AesGcm,
                "7b4e909bbe7ffe44c465a220037d608ee35897d31ef972f07f74892cb0f73f1385edce65bf4c5253e453811bf5175b12ee",
                "0faa684ed28867b97f4a6a2dee5df8ce974e76b7018e3f22a1c4cf2678570f20852815cf3023349941d0ccd4cdf512364e",
                "000000170000000000000000e2358b505e8cdd52f76dcbe66a718e11d042de439a81a8",
                "47bc48b80b1b974515a9e4828fe0a6ceab924506105d823034d27fcbf59db22f",
            ),
        ] {
            let (pending, m1) = initiate_with(
                builder(&a, &b.public(), &p)
                    .expect("builder")
                    .fixed_ephemeral_key_for_testing_only(&ea),
                pref,
            )
            .expect("initiate");
            let (sb, m2) = respond_with(
                builder(&b, &a.public(), &p)
                    .expect("builder")
                    .fixed_ephemeral_key_for_testing_only(&eb),
                &m1,
                pref,
            )
            .expect("respond");
            let sa = pending.handle_response(&m2).expect("finish");
            assert_eq!((sa.cipher(), sb.cipher()), (pref, pref));
            let mut rec = Vec::new();
            sa.seal_record(1, 0, RecordKind::Data, b"comsat", &mut rec)
                .expect("seal");
            assert_eq!(hex::encode(&m1), m1_hex, "{pref:?}");
            assert_eq!(hex::encode(&m2), m2_hex, "{pref:?}");
            assert_eq!(hex::encode(&rec), record, "{pref:?}");
            assert_eq!(hex::encode(sb.handshake_hash()), hash, "{pref:?}");
        }
    }
}
