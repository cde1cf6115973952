//! Flow streams and their records.
//!
//! A flow is one accepted local connection carried over one QUIC
//! bidirectional stream per hop. The stream starts with a [`FlowHeader`]
//! (in clear: the relay needs the link to splice), then carries records in
//! both directions:
//!
//! ```text
//! len: u32 (big endian) | seq: u64 (big endian) | ciphertext: [u8; len]
//! ```
//!
//! `seq` counts records per flow direction from 0. The ciphertext is the
//! Noise transport encryption (nonce `(flow_id << 40) | seq`) of one
//! plaintext: a [`RecordKind`] byte followed by the payload. Open, data,
//! half-close and reset are all records, so the relay never learns what a
//! flow carries, only sizes and timing.

use crate::ids::{FlowId, LinkId};
use crate::limits::{MAX_FLOW_ID, MAX_RECORD_CIPHERTEXT_LEN, MAX_SEQ, NOISE_TAG_LEN};

/// Version byte of the flow header.
pub const FLOW_HEADER_VERSION: u8 = 1;

/// Encoded length of a [`FlowHeader`].
pub const FLOW_HEADER_LEN: usize = 1 + 16 + 4;

/// Encoded length of a record header.
pub const RECORD_HEADER_LEN: usize = 4 + 8;

/// Smallest valid ciphertext: the tag over a one-byte plaintext.
pub const MIN_RECORD_CIPHERTEXT_LEN: usize = NOISE_TAG_LEN + 1;

/// Bytes that can never form a valid flow header or record.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecordError {
    /// Unknown flow header version.
    #[error("unknown flow header version {0}")]
    Version(u8),
    /// A flow id out of range (its low 24 bits must not be 0, and a nonce
    /// takes only those).
    #[error("flow id {0} is out of range")]
    FlowId(u32),
    /// A record length out of range.
    #[error(
        "record length {0} is outside {MIN_RECORD_CIPHERTEXT_LEN}..={MAX_RECORD_CIPHERTEXT_LEN}"
    )]
    Length(usize),
    /// A sequence number at or beyond 2^40.
    #[error("record sequence number {0} is beyond 2^40")]
    Seq(u64),
    /// Unknown plaintext record kind.
    #[error("unknown record kind {0}")]
    Kind(u8),
    /// An empty plaintext.
    #[error("empty record plaintext")]
    Empty,
}

/// The first bytes of every flow stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowHeader {
    /// The link the flow belongs to.
    pub link_id: LinkId,
    /// The flow as it travels: its id in the low 24 bits, the low 8 bits
    /// of its generation above ([`wire_flow_id`]).
    pub flow_id: FlowId,
}

/// The flow id a stream header carries for flow `id` (below 2^24, not 0)
/// of `generation`: the generation's low 8 bits tell the flows of
/// neighbouring generations apart, which reuse the same ids under other
/// keys.
pub fn wire_flow_id(generation: u32, id: FlowId) -> FlowId {
    ((generation & 0xff) << 24) | (id & (MAX_FLOW_ID - 1))
}

/// The generation tag (low 8 bits of the generation) and the id of a flow
/// id as a stream header carries it.
pub fn split_flow_id(wire: FlowId) -> (u8, FlowId) {
    ((wire >> 24) as u8, wire & (MAX_FLOW_ID - 1))
}

impl FlowHeader {
    /// Appends the header to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        out.push(FLOW_HEADER_VERSION);
        out.extend_from_slice(&self.link_id.0);
        out.extend_from_slice(&self.flow_id.to_be_bytes());
    }

    /// The encoded length.
    pub const fn encoded_len(&self) -> usize {
        FLOW_HEADER_LEN
    }

    /// Decodes a header from the front of `buf`: `Ok(None)` if incomplete.
    pub fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, RecordError> {
        let Some(&version) = buf.first() else {
            return Ok(None);
        };
        if version != FLOW_HEADER_VERSION {
            return Err(RecordError::Version(version));
        }
        let Some(bytes) = buf.get(..FLOW_HEADER_LEN) else {
            return Ok(None);
        };
        let mut link = [0u8; 16];
        link.copy_from_slice(&bytes[1..17]);
        let flow_id = u32::from_be_bytes([bytes[17], bytes[18], bytes[19], bytes[20]]);
        if split_flow_id(flow_id).1 == 0 {
            return Err(RecordError::FlowId(flow_id));
        }
        Ok(Some((
            Self {
                link_id: LinkId(link),
                flow_id,
            },
            FLOW_HEADER_LEN,
        )))
    }
}

/// A record header as read from a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    /// Length of the ciphertext that follows.
    pub len: usize,
    /// Sequence number.
    pub seq: u64,
}

impl RecordHeader {
    /// Appends the header to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.encode());
    }

    /// The encoded header.
    pub fn encode(&self) -> [u8; RECORD_HEADER_LEN] {
        let mut b = [0u8; RECORD_HEADER_LEN];
        b[..4].copy_from_slice(&(self.len as u32).to_be_bytes());
        b[4..].copy_from_slice(&self.seq.to_be_bytes());
        b
    }

    /// Decodes and checks a header from the front of `buf`: `Ok(None)` if
    /// fewer than [`RECORD_HEADER_LEN`] bytes are there.
    pub fn decode(buf: &[u8]) -> Result<Option<Self>, RecordError> {
        let Some(b) = buf.get(..RECORD_HEADER_LEN) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
        if !(MIN_RECORD_CIPHERTEXT_LEN..=MAX_RECORD_CIPHERTEXT_LEN).contains(&len) {
            return Err(RecordError::Length(len));
        }
        let seq = u64::from_be_bytes([b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11]]);
        if seq >= MAX_SEQ {
            return Err(RecordError::Seq(seq));
        }
        Ok(Some(Self { len, seq }))
    }
}

/// A decoded record: its header, its ciphertext and the bytes consumed.
pub type DecodedRecord<'a> = (RecordHeader, &'a [u8], usize);

/// Decodes one whole record from the front of `buf`: `Ok(None)` if
/// incomplete, else the header, the ciphertext and the bytes consumed.
pub fn decode_record(buf: &[u8]) -> Result<Option<DecodedRecord<'_>>, RecordError> {
    let Some(header) = RecordHeader::decode(buf)? else {
        return Ok(None);
    };
    let end = RECORD_HEADER_LEN + header.len;
    Ok(buf.get(RECORD_HEADER_LEN..end).map(|ct| (header, ct, end)))
}

/// What a record's plaintext means. The first plaintext byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    /// Opens the flow: the receiver dials its target. Payload empty.
    Open = 1,
    /// Application bytes.
    Data = 2,
    /// The sender will send no more (half-close). Payload empty.
    Fin = 3,
    /// The sender aborted the flow. Payload: an optional UTF-8 reason.
    Reset = 4,
}

impl RecordKind {
    /// Parses a kind byte.
    pub fn from_byte(b: u8) -> Result<Self, RecordError> {
        Ok(match b {
            1 => Self::Open,
            2 => Self::Data,
            3 => Self::Fin,
            4 => Self::Reset,
            other => return Err(RecordError::Kind(other)),
        })
    }
}

/// Splits a decrypted plaintext into its kind and payload.
pub fn split_plaintext(plain: &[u8]) -> Result<(RecordKind, &[u8]), RecordError> {
    let (&kind, payload) = plain.split_first().ok_or(RecordError::Empty)?;
    Ok((RecordKind::from_byte(kind)?, payload))
}

/// The Noise nonce of record `seq` of flow `flow_id`.
pub fn nonce(flow_id: FlowId, seq: u64) -> Result<u64, RecordError> {
    if flow_id >= MAX_FLOW_ID {
        return Err(RecordError::FlowId(flow_id));
    }
    if seq >= MAX_SEQ {
        return Err(RecordError::Seq(seq));
    }
    Ok((u64::from(flow_id) << crate::limits::SEQ_BITS) | seq)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_snapshot() {
        let mut out = Vec::new();
        FlowHeader {
            link_id: LinkId([0xaa; 16]),
            flow_id: 0x0001_0203,
        }
        .write_to(&mut out);
        assert_eq!(
            hex::encode(&out),
            "01aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa00010203"
        );
        let mut rec = Vec::new();
        RecordHeader { len: 17, seq: 5 }.write_to(&mut rec);
        assert_eq!(hex::encode(&rec), "000000110000000000000005");
    }

    #[test]
    fn incomplete_is_not_invalid() {
        let mut out = Vec::new();
        FlowHeader {
            link_id: LinkId([1; 16]),
            flow_id: 9,
        }
        .write_to(&mut out);
        for cut in 0..out.len() {
            assert_eq!(FlowHeader::decode(&out[..cut]), Ok(None), "cut {cut}");
        }
        let mut rec = Vec::new();
        RecordHeader { len: 20, seq: 1 }.write_to(&mut rec);
        rec.extend_from_slice(&[0; 20]);
        for cut in 0..rec.len() {
            assert_eq!(decode_record(&rec[..cut]).map(|r| r.is_some()), Ok(false));
        }
        assert!(matches!(decode_record(&rec), Ok(Some((_, _, 32)))));
    }

    #[test]
    fn invalid_values_are_refused() {
        let mut bad_len = Vec::new();
        RecordHeader { len: 3, seq: 0 }.write_to(&mut bad_len);
        assert_eq!(RecordHeader::decode(&bad_len), Err(RecordError::Length(3)));
        let mut bad_seq = Vec::new();
        RecordHeader {
            len: 20,
            seq: MAX_SEQ,
        }
        .write_to(&mut bad_seq);
        assert_eq!(
            RecordHeader::decode(&bad_seq),
            Err(RecordError::Seq(MAX_SEQ))
        );
        assert_eq!(FlowHeader::decode(&[2]), Err(RecordError::Version(2)));
        let mut zero_flow = Vec::new();
        FlowHeader {
            link_id: LinkId([1; 16]),
            flow_id: 0,
        }
        .write_to(&mut zero_flow);
        assert_eq!(FlowHeader::decode(&zero_flow), Err(RecordError::FlowId(0)));
        let mut tagged_zero = Vec::new();
        FlowHeader {
            link_id: LinkId([1; 16]),
            flow_id: 3 << 24,
        }
        .write_to(&mut tagged_zero);
        assert_eq!(
            FlowHeader::decode(&tagged_zero),
            Err(RecordError::FlowId(3 << 24))
        );
        assert_eq!(wire_flow_id(0x1_05, 7), (5 << 24) | 7);
        assert_eq!(split_flow_id((5 << 24) | 7), (5, 7));
        assert_eq!(nonce(MAX_FLOW_ID, 0), Err(RecordError::FlowId(MAX_FLOW_ID)));
        assert_eq!(nonce(1, MAX_SEQ), Err(RecordError::Seq(MAX_SEQ)));
        assert_eq!(nonce(3, 7), Ok((3 << 40) | 7));
    }
}
