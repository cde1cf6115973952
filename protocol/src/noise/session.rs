//! The session after the handshake: per-flow record keys, sealing and
//! opening.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use ring::aead::{self, Aad, LessSafeKey, UnboundKey};
use ring::hkdf;
use zeroize::Zeroizing;

use super::datagram::{DatagramKeys, DatagramOpener, DatagramSealer};
use super::{Cipher, KEY_LABEL, NoiseError, Params, RECORD_PREFIX_LEN};
use crate::ids::FlowId;
use crate::limits::{MAX_RECORD_CIPHERTEXT_LEN, MAX_RECORD_PAYLOAD_LEN, NOISE_TAG_LEN};
use crate::record::{self, RECORD_HEADER_LEN, RecordError, RecordHeader, RecordKind};

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
    pub(super) send: Arc<Zeroizing<[u8; 32]>>,
    pub(super) recv: Arc<Zeroizing<[u8; 32]>>,
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
    pub(super) fn from_handshake(
        mut state: snow::HandshakeState,
        params: Params,
    ) -> Result<Self, NoiseError> {
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

    /// The keys of the session's datagrams: a [`DatagramSealer`] for what
    /// this side sends and a [`DatagramOpener`] for what it receives.
    /// Make each once per session: a second sealer would number its
    /// datagrams from 0 again, under the same keys.
    pub fn datagrams(&self) -> (DatagramSealer, DatagramOpener) {
        let keys = |k: &Arc<Zeroizing<[u8; 32]>>| DatagramKeys::new(k.clone(), self.params);
        (
            DatagramSealer::new(keys(&self.send)),
            DatagramOpener::new(keys(&self.recv)),
        )
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
pub(super) fn derive(
    direction: &[u8; 32],
    cipher: Cipher,
    generation: u32,
    flow_id: FlowId,
    epoch: u64,
) -> LessSafeKey {
    let mut info = [0u8; 16];
    info[..4].copy_from_slice(&generation.to_be_bytes());
    info[4..8].copy_from_slice(&flow_id.to_be_bytes());
    info[8..].copy_from_slice(&epoch.to_be_bytes());
    derive_labelled(KEY_LABEL, direction, cipher, &info)
}

/// HKDF-SHA256 of a direction's key under `label` (one key space per
/// label) over `info`.
pub(super) fn derive_labelled(
    label: &[u8],
    direction: &[u8; 32],
    cipher: Cipher,
    info: &[u8],
) -> LessSafeKey {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, label).extract(direction);
    let info = [info];
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
