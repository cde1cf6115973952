//! The end-to-end Noise session between the two agents of a link.
//!
//! Pattern `KK`: each agent knows the other's static key from its link
//! configuration (the controller vouches for it), so the handshake is one
//! round trip through the relay and authenticates both ends. Side A
//! initiates, side B responds. The prologue binds the session to the link
//! id, so a handshake for one link is useless on another.
//!
//! The handshake always runs [`NOISE_PARAMS`]. Each handshake message
//! carries a three-byte payload, encrypted and authenticated by the
//! handshake itself ([`Params`]): whether its sender prefers AES-GCM (it
//! has AES hardware), how many records it lets one key seal, and how many
//! flow ids a generation holds. The transport uses AES-256-GCM when both
//! prefer it and ChaCha20-Poly1305 otherwise, and the lower of the two
//! limits (a relay cannot change either: the payloads are authenticated).
//! So a small ARM board without AES instructions never runs software AES,
//! and two x86 agents get hardware AES without asking the controller.
//!
//! After the handshake every record is sealed with a key of its own flow
//! and key epoch: HKDF-SHA256 of the direction's key from Noise's split,
//! over the flow's generation and id and `seq >> records_per_key_log2`
//! ([`Session::flow`]). So no key seals more than
//! [`Params::records_per_key`] records, whatever a flow carries, a long
//! flow moves to its next key without a message on the wire and with every
//! record still in place, and records of many flows are sealed concurrently
//! without a shared lock. Each record carries its own nonce
//! `(flow_id << 40) | seq` (encoded as Noise encodes nonces for the cipher
//! in use), so it can be sent again after a reconnect. The receiver must
//! accept each `(generation, flow_id, seq)` at most once (the flow code
//! enforces strictly increasing `seq`, and the side that accepts flows
//! takes each flow id once per generation: [`crate::replay`]), and the
//! sender must never reuse a flow id within a generation. When a dialling
//! side has used a generation's ids, it starts the next generation with
//! the same ids under new keys; open flows keep theirs. Records are sealed
//! and opened in place ([`Sealer::seal_record_in_place`],
//! [`Opener::open_record_in_place`]): the bytes read from a socket are
//! encrypted where they lie.
//!
//! Call order: side A [`initiate`]s and sends the message through the relay;
//! side B [`respond`]s and sends its answer back; side A hands it to
//! [`ExpectResponse::handle_response`]. Both then hold a [`Session`].

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use ring::aead::{self, AES_256_GCM, Aad, CHACHA20_POLY1305, LessSafeKey, UnboundKey};
use ring::hkdf;
use zeroize::Zeroizing;

use crate::ids::{FlowId, LinkId};
use crate::keys::{NoisePublicKey, NoiseSecretKey};
use crate::limits::{
    MAX_HANDSHAKE_LEN, MAX_RECORD_CIPHERTEXT_LEN, MAX_RECORD_PAYLOAD_LEN, NOISE_TAG_LEN,
};
use crate::record::{self, RECORD_HEADER_LEN, RecordError, RecordHeader, RecordKind};

/// The Noise protocol of the handshake.
pub const NOISE_PARAMS: &str = "Noise_KK_25519_ChaChaPoly_BLAKE2s";

/// Prologue label, version 2 (per-flow keys); followed by the link id. A
/// peer of version 1 fails the handshake instead of misreading records.
pub const PROLOGUE_LABEL: &[u8] = b"comsat noise v2\0";

/// Bytes in front of a record's payload: the record header and the kind.
pub const RECORD_PREFIX_LEN: usize = RECORD_HEADER_LEN + 1;

/// Handshake payload flag: the sender prefers AES-GCM.
const PREFERS_AES: u8 = 1;

/// Label of the HKDF that derives every record key from a direction's key.
const KEY_LABEL: &[u8] = b"comsat record key v2";

/// Records one key seals by default: `2^20`. With records of up to 2^12
/// AES blocks, AES-GCM's confidentiality bound `(q * l)^2 / 2^129` stays
/// at 2^-65 (RFC 9001 section 6.6 and the CFRG's AEAD limits, which QUIC's
/// per-packet limits come from); ChaCha20-Poly1305's is far higher.
pub const DEFAULT_RECORDS_PER_KEY_LOG2: u8 = 20;

/// Flow ids per generation by default: `2^22 - 1` per dialling side (odd
/// ids for side A, even ones for side B, below 2^24).
pub const DEFAULT_FLOW_IDS_LOG2: u8 = 22;

/// The smallest values an agent may state (for tests of rekeying).
pub const MIN_LOG2: u8 = 2;

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

    fn payload(self) -> [u8; 3] {
        let flags = if self.cipher == Cipher::AesGcm {
            PREFERS_AES
        } else {
            0
        };
        [flags, self.records_per_key_log2, self.flow_ids_log2]
    }

    /// What a handshake payload states: exactly three bytes (unknown flags
    /// are ignored), limits in range.
    fn from_payload(payload: &[u8]) -> Result<Self, NoiseError> {
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

    fn agree(self, theirs: Self) -> Self {
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

    fn agree(ours: Self, theirs: Self) -> Self {
        if ours == Self::AesGcm && theirs == Self::AesGcm {
            Self::AesGcm
        } else {
            Self::ChaChaPoly
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
    /// A handshake payload is not the three bytes of [`Params`] (a peer of
    /// another version).
    #[error("handshake payload of {0} bytes (expected 3: a peer of another comsat version?)")]
    HandshakePayload(usize),
    /// A peer stated limits out of range.
    #[error("handshake states records per key 2^{0} and flow ids 2^{1}: out of range")]
    Params(u8, u8),
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
    params: Params,
}

impl fmt::Debug for ExpectResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ExpectResponse")
    }
}

/// Starts a session as side A, stating this machine's cipher preference
/// and the default limits: returns the state and the message to send.
pub fn initiate(
    local: &NoiseSecretKey,
    remote: &NoisePublicKey,
    link_id: &LinkId,
) -> Result<(ExpectResponse, Vec<u8>), NoiseError> {
    initiate_with_params(local, remote, link_id, Params::default())
}

/// [`initiate`] stating `preference` instead of this machine's.
pub fn initiate_preferring(
    local: &NoiseSecretKey,
    remote: &NoisePublicKey,
    link_id: &LinkId,
    preference: Cipher,
) -> Result<(ExpectResponse, Vec<u8>), NoiseError> {
    initiate_with_params(local, remote, link_id, Params::with_cipher(preference))
}

/// [`initiate`] stating `params`.
pub fn initiate_with_params(
    local: &NoiseSecretKey,
    remote: &NoisePublicKey,
    link_id: &LinkId,
    params: Params,
) -> Result<(ExpectResponse, Vec<u8>), NoiseError> {
    initiate_with(builder(local, remote, &prologue(link_id))?, params.check()?)
}

fn initiate_with(
    b: snow::Builder<'_>,
    params: Params,
) -> Result<(ExpectResponse, Vec<u8>), NoiseError> {
    let mut state = b.build_initiator()?;
    let mut msg = vec![0u8; MAX_HANDSHAKE_LEN];
    let n = state.write_message(&params.payload(), &mut msg)?;
    msg.truncate(n);
    Ok((ExpectResponse { state, params }, msg))
}

impl ExpectResponse {
    /// Completes the handshake with side B's answer.
    pub fn handle_response(mut self, msg: &[u8]) -> Result<Session, NoiseError> {
        if msg.len() > MAX_HANDSHAKE_LEN {
            return Err(NoiseError::HandshakeTooLong(msg.len()));
        }
        let mut payload = vec![0u8; MAX_HANDSHAKE_LEN];
        let n = self.state.read_message(msg, &mut payload)?;
        let theirs = Params::from_payload(&payload[..n])?;
        Session::from_handshake(self.state, self.params.agree(theirs))
    }
}

/// Answers side A's first message as side B, stating this machine's
/// cipher preference and the default limits: returns the session and the
/// message to send back.
pub fn respond(
    local: &NoiseSecretKey,
    remote: &NoisePublicKey,
    link_id: &LinkId,
    msg: &[u8],
) -> Result<(Session, Vec<u8>), NoiseError> {
    respond_with_params(local, remote, link_id, msg, Params::default())
}

/// [`respond`] stating `preference` instead of this machine's.
pub fn respond_preferring(
    local: &NoiseSecretKey,
    remote: &NoisePublicKey,
    link_id: &LinkId,
    msg: &[u8],
    preference: Cipher,
) -> Result<(Session, Vec<u8>), NoiseError> {
    respond_with_params(local, remote, link_id, msg, Params::with_cipher(preference))
}

/// [`respond`] stating `params`.
pub fn respond_with_params(
    local: &NoiseSecretKey,
    remote: &NoisePublicKey,
    link_id: &LinkId,
    msg: &[u8],
    params: Params,
) -> Result<(Session, Vec<u8>), NoiseError> {
    respond_with(
        builder(local, remote, &prologue(link_id))?,
        msg,
        params.check()?,
    )
}

fn respond_with(
    b: snow::Builder<'_>,
    msg: &[u8],
    params: Params,
) -> Result<(Session, Vec<u8>), NoiseError> {
    if msg.len() > MAX_HANDSHAKE_LEN {
        return Err(NoiseError::HandshakeTooLong(msg.len()));
    }
    let mut state = b.build_responder()?;
    let mut payload = vec![0u8; MAX_HANDSHAKE_LEN];
    let n = state.read_message(msg, &mut payload)?;
    let theirs = Params::from_payload(&payload[..n])?;
    let mut out = vec![0u8; MAX_HANDSHAKE_LEN];
    let n = state.write_message(&params.payload(), &mut out)?;
    out.truncate(n);
    Ok((Session::from_handshake(state, params.agree(theirs))?, out))
}

/// An established end-to-end session.
///
/// It holds one key per direction, from Noise's split, and never seals or
/// opens with them: every record is sealed with a key derived from its
/// direction's key, the flow's generation and id, and its key epoch
/// (`seq >> records_per_key_log2`), so each key seals at most
/// [`Params::records_per_key`] records of one flow, and a flow that
/// carries more moves to a new key without a word on the wire
/// ([`Session::flow`]). Link control is flow 0 of generation 0. The
/// direction keys are zeroised with the session.
pub struct Session {
    params: Params,
    send: Arc<Zeroizing<[u8; 32]>>,
    recv: Arc<Zeroizing<[u8; 32]>>,
    handshake_hash: [u8; 32],
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Session({}, {:?})",
            hex::encode(&self.handshake_hash[..4]),
            self.params
        )
    }
}

impl Session {
    fn from_handshake(mut state: snow::HandshakeState, params: Params) -> Result<Self, NoiseError> {
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
        Ok(Self {
            params,
            send: Arc::new(send),
            recv: Arc::new(recv),
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
        self.params.cipher
    }

    /// The limits both sides agreed on.
    pub fn params(&self) -> Params {
        self.params
    }

    /// The keys of flow `flow_id` of generation `generation`: a [`Sealer`]
    /// for what this side sends on it and an [`Opener`] for what it
    /// receives. Each derives the key of a record's epoch when it first
    /// needs it and keeps it while records of that epoch go on.
    pub fn flow(&self, generation: u32, flow_id: FlowId) -> (Sealer, Opener) {
        let keys = |k: &Arc<Zeroizing<[u8; 32]>>| RecordKeys {
            direction: k.clone(),
            params: self.params,
            generation,
            flow_id,
            current: None,
        };
        (Sealer(keys(&self.send)), Opener(keys(&self.recv)))
    }

    /// The keys of link control (flow 0 of generation 0).
    pub fn control(&self) -> (Sealer, Opener) {
        self.flow(0, 0)
    }

    /// Seals one record of `flow_id` (generation 0) where it lies (a key
    /// derived for the call; flows keep theirs: [`Self::flow`]).
    pub fn seal_record_in_place(
        &self,
        flow_id: FlowId,
        seq: u64,
        kind: RecordKind,
        record: &mut Vec<u8>,
    ) -> Result<(), NoiseError> {
        self.flow(0, flow_id)
            .0
            .seal_record_in_place(seq, kind, record)
    }

    /// Appends a whole record of `flow_id` (generation 0) to `out`.
    pub fn seal_record(
        &self,
        flow_id: FlowId,
        seq: u64,
        kind: RecordKind,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), NoiseError> {
        self.flow(0, flow_id).0.seal_record(seq, kind, payload, out)
    }

    /// Opens record `seq` of `flow_id` (generation 0) where it lies.
    pub fn open_record_in_place(
        &self,
        flow_id: FlowId,
        seq: u64,
        ciphertext: &mut [u8],
    ) -> Result<(RecordKind, Range<usize>), NoiseError> {
        self.flow(0, flow_id)
            .1
            .open_record_in_place(seq, ciphertext)
    }

    /// Opens record `seq` of `flow_id` (generation 0), appending its payload
    /// to `out`.
    pub fn open_record(
        &self,
        flow_id: FlowId,
        seq: u64,
        ciphertext: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<RecordKind, NoiseError> {
        self.flow(0, flow_id).1.open_record(seq, ciphertext, out)
    }

    /// Seals link-control message `seq` (see [`Self::control`]).
    pub fn seal_control(&self, seq: u64, msg: &[u8]) -> Result<Vec<u8>, NoiseError> {
        self.control().0.seal_control(seq, msg)
    }

    /// Opens link-control message `seq` (see [`Self::control`]).
    pub fn open_control(&self, seq: u64, ciphertext: &[u8]) -> Result<Vec<u8>, NoiseError> {
        self.control().1.open_control(seq, ciphertext)
    }
}

/// One direction of one flow's keys: the direction's session key, and the
/// record key of the epoch in use.
struct RecordKeys {
    direction: Arc<Zeroizing<[u8; 32]>>,
    params: Params,
    generation: u32,
    flow_id: FlowId,
    current: Option<(u64, LessSafeKey)>,
}

impl RecordKeys {
    /// The key that seals or opens record `seq`, and its nonce.
    fn for_record(&mut self, seq: u64) -> Result<(&LessSafeKey, aead::Nonce), NoiseError> {
        let n = record::nonce(self.flow_id, seq)?;
        let epoch = seq >> self.params.records_per_key_log2;
        let (cipher, generation, flow_id) = (self.params.cipher, self.generation, self.flow_id);
        self.current.take_if(|(e, _)| *e != epoch);
        let direction = &self.direction;
        let (_, key) = self
            .current
            .get_or_insert_with(|| (epoch, derive(direction, cipher, generation, flow_id, epoch)));
        Ok((key, cipher.nonce(n)))
    }
}

/// HKDF-SHA256 of a direction's key: the record key of one epoch of one
/// flow of one generation.
fn derive(
    direction: &[u8; 32],
    cipher: Cipher,
    generation: u32,
    flow_id: FlowId,
    epoch: u64,
) -> LessSafeKey {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, KEY_LABEL).extract(direction);
    let mut info = [0u8; 16];
    info[..4].copy_from_slice(&generation.to_be_bytes());
    info[4..8].copy_from_slice(&flow_id.to_be_bytes());
    info[8..].copy_from_slice(&epoch.to_be_bytes());
    let info = [&info[..]];
    let okm = prk
        .expand(&info, cipher.algorithm())
        // Only an output longer than 255 hash lengths is refused.
        .expect("a 32-byte key from HKDF-SHA256");
    LessSafeKey::new(UnboundKey::from(okm))
}

/// Seals what this side sends on one flow (see [`Session::flow`]).
pub struct Sealer(RecordKeys);

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sealer(flow {}/{})", self.0.generation, self.0.flow_id)
    }
}

impl Sealer {
    /// The key epoch of the last record sealed.
    pub fn epoch(&self) -> Option<u64> {
        self.0.current.as_ref().map(|(e, _)| *e)
    }

    /// Seals `buf[start..]` in place as record `seq` and appends the tag.
    fn seal_at(&mut self, seq: u64, buf: &mut Vec<u8>, start: usize) -> Result<(), NoiseError> {
        let (key, nonce) = self.0.for_record(seq)?;
        let tag = key
            .seal_in_place_separate_tag(nonce, Aad::empty(), &mut buf[start..])
            // ring refuses only inputs beyond what one AEAD call may seal
            // (far above our 64 KiB record maximum, checked by callers).
            .expect("record within the AEAD's size limit");
        buf.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Seals one record where it lies. `record` holds [`RECORD_PREFIX_LEN`]
    /// bytes (whatever they are) followed by the payload; afterwards it
    /// holds the whole record, header and ciphertext, ready to send. Give it
    /// [`NOISE_TAG_LEN`] bytes of spare capacity to spare a reallocation.
    pub fn seal_record_in_place(
        &mut self,
        seq: u64,
        kind: RecordKind,
        record: &mut Vec<u8>,
    ) -> Result<(), NoiseError> {
        self.seal_record_at(seq, kind, record, 0)
    }

    fn seal_record_at(
        &mut self,
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
        record::nonce(self.0.flow_id, seq)?;
        let ct_len = 1 + payload_len + NOISE_TAG_LEN;
        buf[start..start + RECORD_HEADER_LEN]
            .copy_from_slice(&RecordHeader { len: ct_len, seq }.encode());
        buf[start + RECORD_HEADER_LEN] = kind as u8;
        self.seal_at(seq, buf, start + RECORD_HEADER_LEN)
    }

    /// Appends a whole record (header and ciphertext) of `kind` carrying
    /// `payload` to `out` (a copy; see [`Self::seal_record_in_place`]).
    pub fn seal_record(
        &mut self,
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
        let sealed = self.seal_record_at(seq, kind, out, start);
        if sealed.is_err() {
            out.truncate(start);
        }
        sealed
    }

    /// Seals an opaque link-control message; returns the ciphertext only
    /// (the caller carries `seq`).
    pub fn seal_control(&mut self, seq: u64, msg: &[u8]) -> Result<Vec<u8>, NoiseError> {
        if msg.len() > MAX_RECORD_PAYLOAD_LEN {
            return Err(NoiseError::PayloadTooLong(msg.len()));
        }
        let mut out = Vec::with_capacity(msg.len() + NOISE_TAG_LEN);
        out.extend_from_slice(msg);
        self.seal_at(seq, &mut out, 0)?;
        Ok(out)
    }
}

/// Opens what this side receives on one flow (see [`Session::flow`]).
pub struct Opener(RecordKeys);

impl fmt::Debug for Opener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Opener(flow {}/{})", self.0.generation, self.0.flow_id)
    }
}

impl Opener {
    /// Decrypts the ciphertext of record `seq` where it lies: returns the
    /// record's kind and where in `ciphertext` its payload now lies in
    /// clear.
    pub fn open_record_in_place(
        &mut self,
        seq: u64,
        ciphertext: &mut [u8],
    ) -> Result<(RecordKind, Range<usize>), NoiseError> {
        if ciphertext.len() > MAX_RECORD_CIPHERTEXT_LEN {
            return Err(RecordError::Length(ciphertext.len()).into());
        }
        let (key, nonce) = self.0.for_record(seq)?;
        let plain = key
            .open_in_place(nonce, Aad::empty(), ciphertext)
            .map_err(|_| NoiseError::Decrypt)?;
        let (kind, payload) = record::split_plaintext(plain)?;
        Ok((kind, 1..1 + payload.len()))
    }

    /// Decrypts the ciphertext of record `seq`, appending the payload to
    /// `out` and returning its kind (a copy; see
    /// [`Self::open_record_in_place`]).
    pub fn open_record(
        &mut self,
        seq: u64,
        ciphertext: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<RecordKind, NoiseError> {
        if ciphertext.len() > MAX_RECORD_CIPHERTEXT_LEN {
            return Err(RecordError::Length(ciphertext.len()).into());
        }
        let mut buf = ciphertext.to_vec();
        let (kind, payload) = self.open_record_in_place(seq, &mut buf)?;
        out.extend_from_slice(&buf[payload]);
        Ok(kind)
    }

    /// Opens a link-control message sealed by [`Sealer::seal_control`].
    pub fn open_control(&mut self, seq: u64, ciphertext: &[u8]) -> Result<Vec<u8>, NoiseError> {
        if ciphertext.len() > MAX_RECORD_CIPHERTEXT_LEN {
            return Err(RecordError::Length(ciphertext.len()).into());
        }
        let (key, nonce) = self.0.for_record(seq)?;
        let mut out = ciphertext.to_vec();
        let len = key
            .open_in_place(nonce, Aad::empty(), &mut out)
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

    /// A peer of the previous version (prologue v1, a one-byte payload,
    /// one key per direction) fails the handshake with a clear error
    /// instead of exchanging records that neither could read.
    #[test]
    fn a_peer_of_the_previous_version_fails_the_handshake() {
        let (a, b) = keys();
        let link = LinkId([5; 16]);
        let mut v1 = PROLOGUE_LABEL.to_vec();
        let at = v1.len() - 2;
        v1[at] = b'1';
        v1.extend_from_slice(&link.0);
        let mut old = builder(&a, &b.public(), &v1)
            .expect("builder")
            .build_initiator()
            .expect("initiator");
        let mut m1 = vec![0u8; MAX_HANDSHAKE_LEN];
        let n = old.write_message(&[PREFERS_AES], &mut m1).expect("write");
        m1.truncate(n);
        assert!(respond(&b, &a.public(), &link, &m1).is_err());
        // The same payload under this version's prologue: refused by length.
        let mut hs = builder(&a, &b.public(), &prologue(&link))
            .expect("builder")
            .build_initiator()
            .expect("initiator");
        let mut m1 = vec![0u8; MAX_HANDSHAKE_LEN];
        let n = hs.write_message(&[PREFERS_AES], &mut m1).expect("write");
        m1.truncate(n);
        assert!(matches!(
            respond(&b, &a.public(), &link, &m1),
            Err(NoiseError::HandshakePayload(1))
        ));
    }

    #[test]
    fn a_handshake_payload_of_another_shape_is_refused() {
        let (a, b) = keys();
        let link = LinkId([5; 16]);
        for (payload, want_len) in [(&[1u8, 2][..], Some(2)), (&[1, 20, 22, 0][..], Some(4))] {
            let mut hs = builder(&a, &b.public(), &prologue(&link))
                .expect("builder")
                .build_initiator()
                .expect("initiator");
            let mut m1 = vec![0u8; MAX_HANDSHAKE_LEN];
            let n = hs.write_message(payload, &mut m1).expect("write");
            m1.truncate(n);
            let got = respond(&b, &a.public(), &link, &m1);
            assert!(
                matches!(got, Err(NoiseError::HandshakePayload(n)) if Some(n) == want_len),
                "{payload:?}"
            );
        }
        for limits in [[0, 1, 10], [0, 21, 10], [0, 10, 23], [0, 10, 0]] {
            let mut hs = builder(&a, &b.public(), &prologue(&link))
                .expect("builder")
                .build_initiator()
                .expect("initiator");
            let mut m1 = vec![0u8; MAX_HANDSHAKE_LEN];
            let n = hs.write_message(&limits, &mut m1).expect("write");
            m1.truncate(n);
            assert!(
                matches!(
                    respond(&b, &a.public(), &link, &m1),
                    Err(NoiseError::Params(..))
                ),
                "{limits:?}"
            );
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Whatever payload an initiator states, side B answers with a
        /// session on the lower limits, or refuses it; it never panics.
        #[test]
        fn any_handshake_payload_is_answered_or_refused(
            payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..6)
        ) {
            let (a, b) = keys();
            let link = LinkId([5; 16]);
            let mut hs = builder(&a, &b.public(), &prologue(&link))
                .expect("builder")
                .build_initiator()
                .expect("initiator");
            let mut m1 = vec![0u8; MAX_HANDSHAKE_LEN];
            let n = hs.write_message(&payload, &mut m1).expect("write");
            m1.truncate(n);
            match respond(&b, &a.public(), &link, &m1) {
                Ok((session, _)) => {
                    proptest::prop_assert_eq!(payload.len(), 3);
                    let p = session.params();
                    proptest::prop_assert_eq!(p.records_per_key_log2, payload[1]);
                    proptest::prop_assert_eq!(p.flow_ids_log2, payload[2]);
                }
                Err(NoiseError::HandshakePayload(n)) => proptest::prop_assert_ne!(n, 3),
                Err(NoiseError::Params(r, i)) => {
                    let stated = Params {
                        records_per_key_log2: r,
                        flow_ids_log2: i,
                        ..Params::default()
                    };
                    proptest::prop_assert!(stated.check().is_err());
                }
                Err(e) => proptest::prop_assert!(false, "unexpected error {e}"),
            }
        }
    }

    fn pair_with(a: Params, b: Params) -> (Session, Session) {
        let (ka, kb) = keys();
        let link = LinkId([5; 16]);
        let (pending, m1) = initiate_with_params(&ka, &kb.public(), &link, a).expect("initiate");
        let (sb, m2) = respond_with_params(&kb, &ka.public(), &link, &m1, b).expect("respond");
        (pending.handle_response(&m2).expect("finish"), sb)
    }

    #[test]
    fn both_sides_use_the_lower_limits() {
        let a = Params {
            cipher: Cipher::AesGcm,
            records_per_key_log2: 5,
            flow_ids_log2: 7,
        };
        let b = Params {
            cipher: Cipher::AesGcm,
            records_per_key_log2: 9,
            flow_ids_log2: 3,
        };
        let (sa, sb) = pair_with(a, b);
        for s in [&sa, &sb] {
            assert_eq!(
                (s.params().records_per_key_log2, s.params().flow_ids_log2),
                (5, 3)
            );
            assert_eq!(s.params().records_per_key(), 32);
            assert_eq!(s.params().flow_ids_per_generation(), 7);
        }
        assert!(
            Params {
                records_per_key_log2: 1,
                ..a
            }
            .check()
            .is_err()
        );
        assert!(
            Params {
                flow_ids_log2: 23,
                ..a
            }
            .check()
            .is_err()
        );
    }

    /// A flow that carries more records than one key may seal moves to a
    /// new key at every multiple of the limit: each record opens only
    /// under its own epoch's key, and the receiver follows without being
    /// told.
    #[test]
    fn a_long_flow_changes_keys_every_records_per_key() {
        for cipher in BOTH {
            let p = Params {
                cipher,
                records_per_key_log2: 2,
                flow_ids_log2: 4,
            };
            let (sa, sb) = pair_with(p, p);
            let (mut seal, _) = sa.flow(0, 3);
            let (_, mut open) = sb.flow(0, 3);
            for seq in 0..20u64 {
                let mut wire = Vec::new();
                seal.seal_record(seq, RecordKind::Data, &seq.to_be_bytes(), &mut wire)
                    .expect("seal");
                assert_eq!(seal.epoch(), Some(seq / 4));
                let (_, ct, _) = decode_record(&wire).expect("valid").expect("whole");
                // The key of the epoch before (or after) does not open it.
                for other in [seq / 4 + 1, (seq / 4).wrapping_sub(1)] {
                    let key = derive(&sb.recv, cipher, 0, 3, other);
                    let mut buf = ct.to_vec();
                    let nonce = cipher.nonce(record::nonce(3, seq).expect("nonce"));
                    assert!(key.open_in_place(nonce, Aad::empty(), &mut buf).is_err());
                }
                let mut out = Vec::new();
                assert_eq!(
                    open.open_record(seq, ct, &mut out).expect("open"),
                    RecordKind::Data
                );
                assert_eq!(out, seq.to_be_bytes());
            }
        }
    }

    /// The same flow id in another generation is another flow, under other
    /// keys: neither opens the other's records.
    #[test]
    fn generations_have_keys_of_their_own() {
        let (sa, sb) = pair();
        let (mut g0, _) = sa.flow(0, 5);
        let (mut g1, _) = sa.flow(1, 5);
        let (mut w0, mut w1) = (Vec::new(), Vec::new());
        g0.seal_record(0, RecordKind::Open, &[], &mut w0)
            .expect("seal");
        g1.seal_record(0, RecordKind::Open, &[], &mut w1)
            .expect("seal");
        assert_ne!(w0, w1, "two generations sealed the same bytes");
        let mut out = Vec::new();
        assert!(sb.flow(1, 5).1.open_record(0, &w0[12..], &mut out).is_err());
        assert!(sb.flow(0, 5).1.open_record(0, &w1[12..], &mut out).is_err());
        assert!(sb.flow(0, 5).1.open_record(0, &w0[12..], &mut out).is_ok());
        assert!(sb.flow(1, 5).1.open_record(0, &w1[12..], &mut out).is_ok());
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
    /// A change here means peers of different versions cannot talk.
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
                "7b4e909bbe7ffe44c465a220037d608ee35897d31ef972f07f74892cb0f73f1384390746dc4e4e56d795bb99ba06453f09fefa",
                "0faa684ed28867b97f4a6a2dee5df8ce974e76b7018e3f22a1c4cf2678570f20843ba7e84b80a0baca409eed1d66c5365c43af",
                "000000170000000000000000868519b7289d8b3afd0fcbfcade900f5c3e0cf1ff51d7d",
                "0cb530d42c1ede4354fca616cbbcd02846a62d1ab9e025cb420184d5b7a0748b",
            ),
            (
                Cipher::AesGcm,
                "7b4e909bbe7ffe44c465a220037d608ee35897d31ef972f07f74892cb0f73f1385390771cfa0dad43b4e66458efafbd8a16676",
                "0faa684ed28867b97f4a6a2dee5df8ce974e76b7018e3f22a1c4cf2678570f20853ba78583ff035ce086e3b7e55edc683095db",
                "0000001700000000000000004441837309501707f1928b437859bda6f63cac568c2fc7",
                "14ae1821e887e51f135276c91984fe1b7ec7255e0f6b7a66097774565c690794",
            ),
        ] {
            let (pending, m1) = initiate_with(
                builder(&a, &b.public(), &p)
                    .expect("builder")
                    .fixed_ephemeral_key_for_testing_only(&ea),
                Params::with_cipher(pref),
            )
            .expect("initiate");
            let (sb, m2) = respond_with(
                builder(&b, &a.public(), &p)
                    .expect("builder")
                    .fixed_ephemeral_key_for_testing_only(&eb),
                &m1,
                Params::with_cipher(pref),
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
