//! The end-to-end Noise session between the two agents of a link.
//!
//! Pattern `KK`: each agent knows the other's static key from its link
//! configuration (the controller vouches for it), so the handshake is one
//! round trip through the relay and authenticates both ends. Side A
//! initiates, side B responds. The prologue binds the session to the link
//! id, so a handshake for one link is useless on another.
//!
//! After the handshake both sides switch to snow's *stateless* transport:
//! every record carries its own nonce `(flow_id << 40) | seq`, so records of
//! many flows can be sealed concurrently from one shared [`Session`], and a
//! record can be sent again after a reconnect. The receiver must accept each
//! `(flow_id, seq)` at most once (the flow code enforces strictly increasing
//! `seq`), and the sender must never reuse a flow id within a session.
//!
//! Call order: side A [`initiate`]s and sends the message through the relay;
//! side B [`respond`]s and sends its answer back; side A hands it to
//! [`ExpectResponse::handle_response`]. Both then hold a [`Session`].

use std::fmt;

use crate::ids::{FlowId, LinkId};
use crate::keys::{NoisePublicKey, NoiseSecretKey};
use crate::limits::{MAX_HANDSHAKE_LEN, MAX_RECORD_CIPHERTEXT_LEN, MAX_RECORD_PAYLOAD_LEN};
use crate::record::{self, RecordError, RecordHeader, RecordKind};

/// The Noise protocol name with ChaCha20-Poly1305 (the default).
pub const NOISE_PARAMS_CHACHA: &str = "Noise_KK_25519_ChaChaPoly_BLAKE2s";

/// Prologue label, version 1; followed by the link id.
pub const PROLOGUE_LABEL: &[u8] = b"comsat noise v1\0";

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
    /// A record value is out of range.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// A payload is too long for one record.
    #[error("record payload of {0} bytes exceeds {MAX_RECORD_PAYLOAD_LEN}")]
    PayloadTooLong(usize),
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
    let params = NOISE_PARAMS_CHACHA.parse()?;
    Ok(snow::Builder::new(params)
        .local_private_key(local.as_bytes())?
        .remote_public_key(&remote.0)?
        .prologue(prologue)?)
}

/// Side A after sending the first handshake message.
pub struct ExpectResponse {
    state: snow::HandshakeState,
}

impl fmt::Debug for ExpectResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ExpectResponse")
    }
}

/// Starts a session as side A: returns the state and the message to send.
pub fn initiate(
    local: &NoiseSecretKey,
    remote: &NoisePublicKey,
    link_id: &LinkId,
) -> Result<(ExpectResponse, Vec<u8>), NoiseError> {
    initiate_with(builder(local, remote, &prologue(link_id))?)
}

fn initiate_with(b: snow::Builder<'_>) -> Result<(ExpectResponse, Vec<u8>), NoiseError> {
    let mut state = b.build_initiator()?;
    let mut msg = vec![0u8; MAX_HANDSHAKE_LEN];
    let n = state.write_message(&[], &mut msg)?;
    msg.truncate(n);
    Ok((ExpectResponse { state }, msg))
}

impl ExpectResponse {
    /// Completes the handshake with side B's answer.
    pub fn handle_response(mut self, msg: &[u8]) -> Result<Session, NoiseError> {
        if msg.len() > MAX_HANDSHAKE_LEN {
            return Err(NoiseError::HandshakeTooLong(msg.len()));
        }
        let mut payload = vec![0u8; MAX_HANDSHAKE_LEN];
        self.state.read_message(msg, &mut payload)?;
        Session::from_handshake(self.state)
    }
}

/// Answers side A's first message as side B: returns the session and the
/// message to send back.
pub fn respond(
    local: &NoiseSecretKey,
    remote: &NoisePublicKey,
    link_id: &LinkId,
    msg: &[u8],
) -> Result<(Session, Vec<u8>), NoiseError> {
    respond_with(builder(local, remote, &prologue(link_id))?, msg)
}

fn respond_with(b: snow::Builder<'_>, msg: &[u8]) -> Result<(Session, Vec<u8>), NoiseError> {
    if msg.len() > MAX_HANDSHAKE_LEN {
        return Err(NoiseError::HandshakeTooLong(msg.len()));
    }
    let mut state = b.build_responder()?;
    let mut payload = vec![0u8; MAX_HANDSHAKE_LEN];
    state.read_message(msg, &mut payload)?;
    let mut out = vec![0u8; MAX_HANDSHAKE_LEN];
    let n = state.write_message(&[], &mut out)?;
    out.truncate(n);
    Ok((Session::from_handshake(state)?, out))
}

/// An established end-to-end session: seals and opens records of any flow.
///
/// Shared by all flows of a link (`&self` methods, no lock needed).
pub struct Session {
    transport: snow::StatelessTransportState,
    handshake_hash: [u8; 32],
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Session({})", hex::encode(&self.handshake_hash[..4]))
    }
}

impl Session {
    fn from_handshake(state: snow::HandshakeState) -> Result<Self, NoiseError> {
        let mut handshake_hash = [0u8; 32];
        let h = state.get_handshake_hash();
        let n = h.len().min(32);
        handshake_hash[..n].copy_from_slice(&h[..n]);
        Ok(Self {
            transport: state.into_stateless_transport_mode()?,
            handshake_hash,
        })
    }

    /// The handshake hash: equal on both sides of one session, different
    /// for every session.
    pub fn handshake_hash(&self) -> &[u8; 32] {
        &self.handshake_hash
    }

    /// Appends a whole record (header and ciphertext) of `kind` carrying
    /// `payload` to `out`.
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
        let nonce = record::nonce(flow_id, seq)?;
        let mut plain = Vec::with_capacity(1 + payload.len());
        plain.push(kind as u8);
        plain.extend_from_slice(payload);
        let ct_len = plain.len() + crate::limits::NOISE_TAG_LEN;
        debug_assert!(ct_len <= MAX_RECORD_CIPHERTEXT_LEN);
        RecordHeader { len: ct_len, seq }.write_to(out);
        let start = out.len();
        out.resize(start + ct_len, 0);
        let n = self
            .transport
            .write_message(nonce, &plain, &mut out[start..])?;
        out.truncate(start + n);
        Ok(())
    }

    /// Decrypts the ciphertext of record `seq` of `flow_id`, appending the
    /// payload to `out` and returning its kind.
    pub fn open_record(
        &self,
        flow_id: FlowId,
        seq: u64,
        ciphertext: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<RecordKind, NoiseError> {
        let nonce = record::nonce(flow_id, seq)?;
        if ciphertext.len() > MAX_RECORD_CIPHERTEXT_LEN {
            return Err(RecordError::Length(ciphertext.len()).into());
        }
        let mut plain = vec![0u8; ciphertext.len()];
        let n = self.transport.read_message(nonce, ciphertext, &mut plain)?;
        let (kind, payload) = record::split_plaintext(&plain[..n])?;
        out.extend_from_slice(payload);
        Ok(kind)
    }

    /// Seals an opaque link-control message on flow 0; returns the
    /// ciphertext only (the caller carries `seq`).
    pub fn seal_control(&self, seq: u64, msg: &[u8]) -> Result<Vec<u8>, NoiseError> {
        if msg.len() > MAX_RECORD_PAYLOAD_LEN {
            return Err(NoiseError::PayloadTooLong(msg.len()));
        }
        let nonce = record::nonce(0, seq)?;
        let mut out = vec![0u8; msg.len() + crate::limits::NOISE_TAG_LEN];
        let n = self.transport.write_message(nonce, msg, &mut out)?;
        out.truncate(n);
        Ok(out)
    }

    /// Opens a link-control message sealed by [`Self::seal_control`].
    pub fn open_control(&self, seq: u64, ciphertext: &[u8]) -> Result<Vec<u8>, NoiseError> {
        let nonce = record::nonce(0, seq)?;
        if ciphertext.len() > MAX_RECORD_CIPHERTEXT_LEN {
            return Err(RecordError::Length(ciphertext.len()).into());
        }
        let mut out = vec![0u8; ciphertext.len()];
        let n = self.transport.read_message(nonce, ciphertext, &mut out)?;
        out.truncate(n);
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

    fn pair() -> (Session, Session) {
        let (a, b) = keys();
        let link = LinkId([5; 16]);
        let (pending, m1) = initiate(&a, &b.public(), &link).expect("initiate");
        let (sb, m2) = respond(&b, &a.public(), &link, &m1).expect("respond");
        let sa = pending.handle_response(&m2).expect("finish");
        (sa, sb)
    }

    #[test]
    fn records_round_trip_both_ways() {
        let (sa, sb) = pair();
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

    #[test]
    fn record_bound_to_flow_and_seq() {
        let (sa, sb) = pair();
        let mut wire = Vec::new();
        sa.seal_record(7, 3, RecordKind::Data, b"x", &mut wire)
            .expect("seal");
        let (_, ct, _) = decode_record(&wire).expect("valid").expect("complete");
        let mut out = Vec::new();
        assert!(sb.open_record(8, 3, ct, &mut out).is_err(), "other flow");
        assert!(sb.open_record(7, 4, ct, &mut out).is_err(), "other seq");
        // A's own sending key does not open A's records.
        assert!(sa.open_record(7, 3, ct, &mut out).is_err(), "reflected");
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
        let (pending, m1) = initiate_with(
            builder(&a, &b.public(), &p)
                .expect("builder")
                .fixed_ephemeral_key_for_testing_only(&ea),
        )
        .expect("initiate");
        let (sb, m2) = respond_with(
            builder(&b, &a.public(), &p)
                .expect("builder")
                .fixed_ephemeral_key_for_testing_only(&eb),
            &m1,
        )
        .expect("respond");
        let sa = pending.handle_response(&m2).expect("finish");
        let mut rec = Vec::new();
        sa.seal_record(1, 0, RecordKind::Data, b"comsat", &mut rec)
            .expect("seal");
        assert_eq!(
            hex::encode(&m1),
            "7b4e909bbe7ffe44c465a220037d608ee35897d31ef972f07f74892cb0f73f1340e7ccfc674dc370f9994b3184f2e2e2"
        );
        assert_eq!(
            hex::encode(&m2),
            "0faa684ed28867b97f4a6a2dee5df8ce974e76b7018e3f22a1c4cf2678570f20ce0299b2e81d013a11fba9de68204247"
        );
        assert_eq!(
            hex::encode(&rec),
            "000000170000000000000000636e1d07b24d8521632b36760c32e981cd8d0ea2ac47ee"
        );
        assert_eq!(
            hex::encode(sb.handshake_hash()),
            "bfb8ef09d092b15da11389ae65d3252638a81cb865ae0b354e015673dff0ee40"
        );
    }
}
