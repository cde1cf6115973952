use super::handshake::{builder, initiate_with, prologue, respond_with};
use super::session::derive;
use ring::aead::Aad;

use super::*;
use crate::ids::LinkId;
use crate::keys::NoiseSecretKey;
use crate::limits::{MAX_HANDSHAKE_LEN, MAX_RECORD_PAYLOAD_LEN, NOISE_TAG_LEN};
use crate::record::decode_record;
use crate::record::{self, RECORD_HEADER_LEN, RecordKind};

/// A deterministic [`NoiseRng`] (SplitMix64 from `seed`): the same seed
/// gives the same ephemeral keys, so the same handshake messages.
pub(crate) struct Seeded(u64);

impl NoiseRng for Seeded {
    fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
        }
    }
}

/// A [`Seeded`] source for a handshake.
pub(crate) fn seeded(seed: u64) -> Box<dyn NoiseRng> {
    Box::new(Seeded(seed))
}

fn keys() -> (NoiseSecretKey, NoiseSecretKey) {
    (
        NoiseSecretKey::from_bytes([1; 32]),
        NoiseSecretKey::from_bytes([2; 32]),
    )
}

pub(crate) fn pair_preferring(a_pref: Cipher, b_pref: Cipher) -> (Session, Session) {
    let (a, b) = keys();
    let link = LinkId([5; 16]);
    let (pending, m1) =
        initiate_preferring(&a, &b.public(), &link, a_pref, seeded(1)).expect("initiate");
    let (sb, m2) =
        respond_preferring(&b, &a.public(), &link, &m1, b_pref, seeded(2)).expect("respond");
    let sa = pending.handle_response(&m2).expect("finish");
    (sa, sb)
}

fn pair() -> (Session, Session) {
    let (a, b) = keys();
    let link = LinkId([5; 16]);
    let (pending, m1) = initiate(&a, &b.public(), &link, seeded(1)).expect("initiate");
    let (sb, m2) = respond(&b, &a.public(), &link, &m1, seeded(2)).expect("respond");
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
    let mut old = builder(&a, &b.public(), &v1, seeded(1))
        .expect("builder")
        .build_initiator()
        .expect("initiator");
    let mut m1 = vec![0u8; MAX_HANDSHAKE_LEN];
    let n = old.write_message(&[PREFERS_AES], &mut m1).expect("write");
    m1.truncate(n);
    assert!(respond(&b, &a.public(), &link, &m1, seeded(2)).is_err());
    // The same payload under this version's prologue: refused by length.
    let mut hs = builder(&a, &b.public(), &prologue(&link), seeded(1))
        .expect("builder")
        .build_initiator()
        .expect("initiator");
    let mut m1 = vec![0u8; MAX_HANDSHAKE_LEN];
    let n = hs.write_message(&[PREFERS_AES], &mut m1).expect("write");
    m1.truncate(n);
    assert!(matches!(
        respond(&b, &a.public(), &link, &m1, seeded(2)),
        Err(NoiseError::HandshakePayload(1))
    ));
}

#[test]
fn a_handshake_payload_of_another_shape_is_refused() {
    let (a, b) = keys();
    let link = LinkId([5; 16]);
    for (payload, want_len) in [(&[1u8, 2][..], Some(2)), (&[1, 20, 22, 0][..], Some(4))] {
        let mut hs = builder(&a, &b.public(), &prologue(&link), seeded(1))
            .expect("builder")
            .build_initiator()
            .expect("initiator");
        let mut m1 = vec![0u8; MAX_HANDSHAKE_LEN];
        let n = hs.write_message(payload, &mut m1).expect("write");
        m1.truncate(n);
        let got = respond(&b, &a.public(), &link, &m1, seeded(2));
        assert!(
            matches!(got, Err(NoiseError::HandshakePayload(n)) if Some(n) == want_len),
            "{payload:?}"
        );
    }
    for limits in [[0, 1, 10], [0, 21, 10], [0, 10, 23], [0, 10, 0]] {
        let mut hs = builder(&a, &b.public(), &prologue(&link), seeded(1))
            .expect("builder")
            .build_initiator()
            .expect("initiator");
        let mut m1 = vec![0u8; MAX_HANDSHAKE_LEN];
        let n = hs.write_message(&limits, &mut m1).expect("write");
        m1.truncate(n);
        assert!(
            matches!(
                respond(&b, &a.public(), &link, &m1, seeded(2)),
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
        let mut hs = builder(&a, &b.public(), &prologue(&link), seeded(1))
            .expect("builder")
            .build_initiator()
            .expect("initiator");
        let mut m1 = vec![0u8; MAX_HANDSHAKE_LEN];
        let n = hs.write_message(&payload, &mut m1).expect("write");
        m1.truncate(n);
        match respond(&b, &a.public(), &link, &m1, seeded(2)) {
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

pub(crate) fn pair_with(a: Params, b: Params) -> (Session, Session) {
    let (ka, kb) = keys();
    let link = LinkId([5; 16]);
    let (pending, m1) =
        initiate_with_params(&ka, &kb.public(), &link, a, seeded(1)).expect("initiate");
    let (sb, m2) =
        respond_with_params(&kb, &ka.public(), &link, &m1, b, seeded(2)).expect("respond");
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

/// The ephemeral keys come from the source the caller passes in: the same
/// seed and keys give the same messages, another seed other ones.
#[test]
fn handshakes_draw_from_the_callers_source() {
    let (a, b) = keys();
    let link = LinkId([5; 16]);
    let params = Params::with_cipher(Cipher::ChaChaPoly);
    let first = |seed| {
        initiate_with_params(&a, &b.public(), &link, params, seeded(seed))
            .expect("initiate")
            .1
    };
    let m1 = first(7);
    assert_eq!(m1, first(7), "the same source gave another first message");
    assert_ne!(m1, first(8), "another source gave the same first message");
    // The ephemeral key travels in clear at the front of the first
    // message: it is the public key of the first 32 bytes drawn.
    let mut e = [0u8; 32];
    Seeded(7).fill(&mut e);
    assert_eq!(m1[..32], NoiseSecretKey::from_bytes(e).public().0);

    let answer = |seed| {
        respond_with_params(&b, &a.public(), &link, &m1, params, seeded(seed))
            .expect("respond")
            .1
    };
    assert_eq!(answer(9), answer(9), "the same source gave another answer");
    assert_ne!(answer(9), answer(10), "another source gave the same answer");
}

#[test]
fn wrong_static_key_fails_handshake() {
    let (a, b) = keys();
    let mallory = NoiseSecretKey::from_bytes([3; 32]);
    let link = LinkId([5; 16]);
    let (_, m1) = initiate(&mallory, &b.public(), &link, seeded(1)).expect("initiate");
    assert!(respond(&b, &a.public(), &link, &m1, seeded(2)).is_err());
}

#[test]
fn handshake_bound_to_link() {
    let (a, b) = keys();
    let (_, m1) = initiate(&a, &b.public(), &LinkId([5; 16]), seeded(1)).expect("initiate");
    assert!(respond(&b, &a.public(), &LinkId([6; 16]), &m1, seeded(2)).is_err());
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
            builder(&a, &b.public(), &p, seeded(1))
                .expect("builder")
                .fixed_ephemeral_key_for_testing_only(&ea),
            Params::with_cipher(pref),
        )
        .expect("initiate");
        let (sb, m2) = respond_with(
            builder(&b, &a.public(), &p, seeded(2))
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
