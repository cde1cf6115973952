//! Datagrams of a link's UDP flows, sealed end to end.
//!
//! A link's UDP flows travel as QUIC datagrams through the relay: each may
//! be lost, duplicated, delayed or reordered, by the network or by the
//! relay, so each is sealed on its own and carries its own number:
//!
//! ```text
//! seq (8 bytes, big-endian) || AEAD(plaintext = flow (4 bytes, big-endian) || payload)
//! ```
//!
//! `seq` counts every datagram one side sends in one session, from 0, and
//! is the AEAD nonce (encoded as for records). The key is that of `seq`'s
//! epoch (`seq >> records_per_key_log2`): HKDF-SHA256 of the direction's
//! key from Noise's split under a label of its own, so datagram keys never
//! meet record keys, and no key seals more than
//! [`Params::records_per_key`] datagrams. The UDP flow a datagram belongs
//! to is inside the ciphertext: the relay sees neither it nor the payload,
//! only the length.
//!
//! The receiver keeps a sliding window of the numbers it accepted
//! ([`DATAGRAM_WINDOW`] of them, as WireGuard and DTLS do): a datagram
//! whose number it accepted before (a replay, by the relay or anyone on
//! the path) or that lies a whole window below the newest is refused, and
//! datagrams overtaken within the window are delivered in the order they
//! arrive. A number is checked before decryption and taken only once the
//! datagram proved authentic, so a forgery cannot use up a number.

use std::fmt;
use std::sync::Arc;

use ring::aead::{Aad, LessSafeKey};
use zeroize::Zeroizing;

use super::Params;
use super::session::derive_labelled;
use crate::limits::NOISE_TAG_LEN;
use crate::replay::{Stale, Window};

/// Which UDP flow of a link a datagram belongs to (one local source
/// address on side A).
pub type UdpFlowId = u32;

/// Bytes in front of a datagram's ciphertext: its number.
pub const DATAGRAM_HEADER_LEN: usize = 8;

/// What sealing adds to a payload: the number, the flow and the tag.
pub const DATAGRAM_OVERHEAD: usize = DATAGRAM_HEADER_LEN + 4 + NOISE_TAG_LEN;

/// The largest sealed datagram either side sends or opens (a UDP payload
/// is at most 65,507 bytes; a QUIC datagram is bounded by the path).
pub const MAX_DATAGRAM_LEN: usize = 65_535;

/// Datagram numbers the receiver remembers below the newest it accepted:
/// one overtaken by more than this many newer ones is refused.
pub const DATAGRAM_WINDOW: u64 = 4096;

/// Label of the HKDF that derives every datagram key.
const DATAGRAM_KEY_LABEL: &[u8] = b"comsat datagram key v1";

/// Why a datagram was not sealed or opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DatagramError {
    /// Shorter than a number, a flow and a tag.
    #[error("datagram of {0} bytes is shorter than the {DATAGRAM_OVERHEAD} bytes of its framing")]
    TooShort(usize),
    /// Longer than [`MAX_DATAGRAM_LEN`] once sealed.
    #[error("datagram of {0} bytes exceeds {MAX_DATAGRAM_LEN} once sealed")]
    TooLong(usize),
    /// Its number was accepted before: a replay.
    #[error("datagram {0} was delivered before (a replay)")]
    Replayed(u64),
    /// Its number lies a whole window below the newest accepted.
    #[error("datagram {seq} is more than {DATAGRAM_WINDOW} below the newest, {highest}")]
    TooOld {
        /// Its number.
        seq: u64,
        /// The newest number accepted.
        highest: u64,
    },
    /// It failed to decrypt: altered, forged, or of another session.
    #[error("datagram failed to decrypt")]
    Decrypt,
    /// This side sent every number of the session: it must be replaced.
    #[error("the session sent every datagram number it has")]
    Exhausted,
}

/// One direction's datagram keys: the direction's session key, and the
/// key of the epoch in use.
pub(super) struct DatagramKeys {
    direction: Arc<Zeroizing<[u8; 32]>>,
    params: Params,
    current: Option<(u64, LessSafeKey)>,
}

impl DatagramKeys {
    pub(super) fn new(direction: Arc<Zeroizing<[u8; 32]>>, params: Params) -> Self {
        Self {
            direction,
            params,
            current: None,
        }
    }

    /// The key of `seq`'s epoch, derived when first needed.
    fn for_seq(&mut self, seq: u64) -> &LessSafeKey {
        let epoch = seq >> self.params.records_per_key_log2;
        self.current.take_if(|(e, _)| *e != epoch);
        let (direction, cipher) = (&self.direction, self.params.cipher);
        let (_, key) = self.current.get_or_insert_with(|| {
            (
                epoch,
                derive_labelled(DATAGRAM_KEY_LABEL, direction, cipher, &epoch.to_be_bytes()),
            )
        });
        key
    }
}

/// Seals what this side sends as datagrams (see [`super::Session::datagrams`]).
pub struct DatagramSealer {
    keys: DatagramKeys,
    next: u64,
}

impl fmt::Debug for DatagramSealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatagramSealer(next {})", self.next)
    }
}

impl DatagramSealer {
    pub(super) fn new(keys: DatagramKeys) -> Self {
        Self { keys, next: 0 }
    }

    /// Appends `payload` of UDP flow `flow`, sealed under the next number,
    /// to `out` (which it leaves as it was on an error).
    ///
    /// # Errors
    ///
    /// [`DatagramError::TooLong`] when the sealed datagram would exceed
    /// [`MAX_DATAGRAM_LEN`]; [`DatagramError::Exhausted`] when every number
    /// is used.
    pub fn seal(
        &mut self,
        flow: UdpFlowId,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<u64, DatagramError> {
        let len = payload.len() + DATAGRAM_OVERHEAD;
        if len > MAX_DATAGRAM_LEN {
            return Err(DatagramError::TooLong(len));
        }
        let seq = self.next;
        self.next = seq.checked_add(1).ok_or(DatagramError::Exhausted)?;
        let start = out.len();
        out.reserve(len);
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(&flow.to_be_bytes());
        out.extend_from_slice(payload);
        let nonce = self.keys.params.cipher.nonce(seq);
        let tag = self
            .keys
            .for_seq(seq)
            .seal_in_place_separate_tag(
                nonce,
                Aad::empty(),
                &mut out[start + DATAGRAM_HEADER_LEN..],
            )
            // ring refuses only inputs beyond what one AEAD call may seal,
            // far above MAX_DATAGRAM_LEN.
            .expect("a datagram within the AEAD's size limit");
        out.extend_from_slice(tag.as_ref());
        Ok(seq)
    }

    /// The number the next datagram takes.
    pub fn next_seq(&self) -> u64 {
        self.next
    }
}

/// Opens what this side receives as datagrams, each at most once (see
/// [`super::Session::datagrams`]).
pub struct DatagramOpener {
    keys: DatagramKeys,
    window: Window<DATAGRAM_WINDOW>,
}

impl fmt::Debug for DatagramOpener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatagramOpener(newest {:?})", self.window.highest())
    }
}

impl DatagramOpener {
    pub(super) fn new(keys: DatagramKeys) -> Self {
        Self {
            keys,
            window: Window::new(),
        }
    }

    /// Opens `datagram` where it lies: its UDP flow and where in
    /// `datagram` the payload now lies in clear. Accepts its number: the
    /// same datagram is refused from then on.
    ///
    /// # Errors
    ///
    /// Too short or too long, a number accepted before or too old, or a
    /// datagram that fails to decrypt; nothing is accepted then.
    pub fn open_in_place(
        &mut self,
        datagram: &mut [u8],
    ) -> Result<(UdpFlowId, std::ops::Range<usize>), DatagramError> {
        let len = datagram.len();
        if len < DATAGRAM_OVERHEAD {
            return Err(DatagramError::TooShort(len));
        }
        if len > MAX_DATAGRAM_LEN {
            return Err(DatagramError::TooLong(len));
        }
        let (header, sealed) = datagram.split_at_mut(DATAGRAM_HEADER_LEN);
        let mut number = [0u8; DATAGRAM_HEADER_LEN];
        number.copy_from_slice(header);
        let seq = u64::from_be_bytes(number);
        self.window.check(seq).map_err(|e| stale(seq, e))?;
        let nonce = self.keys.params.cipher.nonce(seq);
        let plain = self
            .keys
            .for_seq(seq)
            .open_in_place(nonce, Aad::empty(), sealed)
            .map_err(|_| DatagramError::Decrypt)?;
        let mut flow = [0u8; 4];
        flow.copy_from_slice(&plain[..4]);
        let end = DATAGRAM_HEADER_LEN + plain.len();
        self.window.accept(seq).map_err(|e| stale(seq, e))?;
        Ok((UdpFlowId::from_be_bytes(flow), DATAGRAM_HEADER_LEN + 4..end))
    }

    /// The newest number accepted.
    pub fn newest(&self) -> Option<u64> {
        self.window.highest()
    }
}

fn stale(seq: u64, why: Stale) -> DatagramError {
    match why {
        Stale::Seen => DatagramError::Replayed(seq),
        Stale::TooOld { highest } => DatagramError::TooOld { seq, highest },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::noise::tests::{pair_preferring, pair_with, seeded};
    use crate::noise::{Cipher, MIN_LOG2, Session};

    const BOTH: [Cipher; 2] = [Cipher::ChaChaPoly, Cipher::AesGcm];

    fn sealed(s: &mut DatagramSealer, flow: UdpFlowId, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        s.seal(flow, payload, &mut out).expect("seal");
        out
    }

    fn opened(o: &mut DatagramOpener, d: &[u8]) -> Result<(UdpFlowId, Vec<u8>), DatagramError> {
        let mut buf = d.to_vec();
        let (flow, range) = o.open_in_place(&mut buf)?;
        Ok((flow, buf[range].to_vec()))
    }

    #[test]
    fn datagrams_round_trip_both_ways_with_their_flow() {
        for cipher in BOTH {
            let (a, b): (Session, Session) = pair_preferring(cipher, cipher);
            let ((mut sa, mut oa), (mut sb, mut ob)) = (a.datagrams(), b.datagrams());
            let big = vec![7u8; MAX_DATAGRAM_LEN - DATAGRAM_OVERHEAD];
            for (flow, payload) in [(1, &b"query"[..]), (u32::MAX, &[][..]), (9, &big[..])] {
                let d = sealed(&mut sa, flow, payload);
                assert_eq!(d.len(), payload.len() + DATAGRAM_OVERHEAD);
                assert_eq!(opened(&mut ob, &d), Ok((flow, payload.to_vec())));
                let back = sealed(&mut sb, flow, payload);
                assert_eq!(opened(&mut oa, &back), Ok((flow, payload.to_vec())));
            }
            // A datagram sealed by one side never opens as its own.
            let mine = sealed(&mut sa, 1, b"x");
            assert_eq!(opened(&mut oa, &mine), Err(DatagramError::Decrypt));
        }
    }

    #[test]
    fn a_replayed_datagram_is_refused_and_overtaken_ones_are_delivered_once() {
        let (a, b) = pair_preferring(Cipher::ChaChaPoly, Cipher::ChaChaPoly);
        let ((mut s, _), (_, mut o)) = (a.datagrams(), b.datagrams());
        let d: Vec<Vec<u8>> = (0..5u8).map(|i| sealed(&mut s, 1, &[i])).collect();
        assert_eq!(opened(&mut o, &d[0]), Ok((1, vec![0])));
        assert_eq!(opened(&mut o, &d[0]), Err(DatagramError::Replayed(0)));
        // 3 overtakes 1 and 2: each is delivered as it arrives, once.
        assert_eq!(opened(&mut o, &d[3]), Ok((1, vec![3])));
        assert_eq!(opened(&mut o, &d[2]), Ok((1, vec![2])));
        assert_eq!(opened(&mut o, &d[1]), Ok((1, vec![1])));
        for (seq, d) in d.iter().enumerate().take(4) {
            assert_eq!(opened(&mut o, d), Err(DatagramError::Replayed(seq as u64)));
        }
        assert_eq!(o.newest(), Some(3));
    }

    #[test]
    fn a_datagram_a_whole_window_behind_is_refused() {
        let (a, b) = pair_preferring(Cipher::AesGcm, Cipher::AesGcm);
        let ((mut s, _), (_, mut o)) = (a.datagrams(), b.datagrams());
        let late = sealed(&mut s, 1, b"late");
        let mut last = Vec::new();
        for _ in 0..DATAGRAM_WINDOW {
            last = sealed(&mut s, 1, b"new");
        }
        assert!(opened(&mut o, &last).is_ok());
        assert_eq!(
            opened(&mut o, &late),
            Err(DatagramError::TooOld {
                seq: 0,
                highest: DATAGRAM_WINDOW
            })
        );
    }

    #[test]
    fn a_forgery_is_refused_and_uses_up_no_number() {
        let (a, b) = pair_preferring(Cipher::ChaChaPoly, Cipher::ChaChaPoly);
        let ((mut s, _), (_, mut o)) = (a.datagrams(), b.datagrams());
        let d = sealed(&mut s, 4, b"genuine");
        for i in 0..d.len() {
            let mut bad = d.clone();
            bad[i] ^= 0x20;
            let got = opened(&mut o, &bad);
            assert!(
                matches!(got, Err(DatagramError::Decrypt)),
                "byte {i}: {got:?}"
            );
        }
        // Another number on the same ciphertext: another nonce, refused.
        let mut moved = d.clone();
        moved[..8].copy_from_slice(&5u64.to_be_bytes());
        assert_eq!(opened(&mut o, &moved), Err(DatagramError::Decrypt));
        assert_eq!(o.newest(), None);
        assert_eq!(opened(&mut o, &d), Ok((4, b"genuine".to_vec())));
    }

    #[test]
    fn another_sessions_datagrams_do_not_open() {
        let (a, _) = pair_preferring(Cipher::ChaChaPoly, Cipher::ChaChaPoly);
        // Same static keys and link, other ephemerals: another session.
        let (ka, kb) = (
            crate::keys::NoiseSecretKey::from_bytes([1; 32]),
            crate::keys::NoiseSecretKey::from_bytes([2; 32]),
        );
        let link = crate::ids::LinkId([5; 16]);
        let (pending, m1) =
            crate::noise::initiate(&ka, &kb.public(), &link, seeded(3)).expect("initiate");
        let (b2, _) =
            crate::noise::respond(&kb, &ka.public(), &link, &m1, seeded(4)).expect("respond");
        drop(pending);
        let (mut s, _) = a.datagrams();
        let (_, mut o) = b2.datagrams();
        assert_eq!(
            opened(&mut o, &sealed(&mut s, 1, b"x")),
            Err(DatagramError::Decrypt)
        );
    }

    #[test]
    fn keys_change_every_records_per_key_datagrams() {
        let params = Params {
            records_per_key_log2: MIN_LOG2,
            ..Params::with_cipher(Cipher::AesGcm)
        };
        let (a, b) = pair_with(params, params);
        let ((mut s, _), (_, mut o)) = (a.datagrams(), b.datagrams());
        let per_key = 1u64 << MIN_LOG2;
        for _ in 0..4 * per_key {
            let d = sealed(&mut s, 2, b"same payload");
            assert_eq!(opened(&mut o, &d), Ok((2, b"same payload".to_vec())));
        }
        // The same plaintext and nonce under the keys of epochs 0 and 1,
        // and of the last number of epoch 0: the key changes with the
        // epoch, and only with it.
        let mut keys = DatagramKeys::new(a.send.clone(), params);
        let mut under = |seq: u64| {
            let mut buf = b"same payload".to_vec();
            let tag = keys
                .for_seq(seq)
                .seal_in_place_separate_tag(params.cipher.nonce(0), Aad::empty(), &mut buf)
                .expect("seal");
            buf.extend_from_slice(tag.as_ref());
            buf
        };
        let (e0, e0_last, e1) = (under(0), under(per_key - 1), under(per_key));
        assert_eq!(e0, e0_last);
        assert_ne!(e0, e1);
    }

    #[test]
    fn framing_limits_are_refused_before_any_work() {
        let (a, b) = pair_preferring(Cipher::ChaChaPoly, Cipher::ChaChaPoly);
        let ((mut s, _), (_, mut o)) = (a.datagrams(), b.datagrams());
        let mut out = vec![1, 2, 3];
        let huge = vec![0u8; MAX_DATAGRAM_LEN];
        assert_eq!(
            s.seal(1, &huge, &mut out),
            Err(DatagramError::TooLong(MAX_DATAGRAM_LEN + DATAGRAM_OVERHEAD))
        );
        assert_eq!(out, [1, 2, 3], "left as it was");
        assert_eq!(s.next_seq(), 0, "no number used");
        for len in [0, 8, DATAGRAM_OVERHEAD - 1] {
            assert_eq!(
                opened(&mut o, &vec![0; len]),
                Err(DatagramError::TooShort(len))
            );
        }
        assert_eq!(
            opened(&mut o, &vec![0; MAX_DATAGRAM_LEN + 1]),
            Err(DatagramError::TooLong(MAX_DATAGRAM_LEN + 1))
        );
    }
}
