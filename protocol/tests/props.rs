//! Property tests of the record framing, flow headers, sealed records and
//! grants.

use std::sync::OnceLock;

use comsat_protocol::endpoint::{Endpoint, split_host_port};
use comsat_protocol::grant::{Grant, GrantSide, LinkLimits, SignedGrant};
use comsat_protocol::ids::{LinkId, NodeId, RelayId};
use comsat_protocol::keys::{NoiseSecretKey, SigningKey};
use comsat_protocol::noise::{self, Cipher, RECORD_PREFIX_LEN, Session};
use comsat_protocol::record::{
    FlowHeader, RECORD_HEADER_LEN, RecordHeader, RecordKind, decode_record,
};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

/// A seeded random source for the handshakes: the same sessions every run.
struct Seeded(StdRng);

impl noise::NoiseRng for Seeded {
    fn fill(&mut self, out: &mut [u8]) {
        self.0.fill_bytes(out);
    }
}

fn seeded(seed: u64) -> Box<dyn noise::NoiseRng> {
    Box::new(Seeded(StdRng::seed_from_u64(seed)))
}

/// One session per transport cipher: (side A, side B).
fn sessions() -> &'static [(Session, Session); 2] {
    static PAIRS: OnceLock<[(Session, Session); 2]> = OnceLock::new();
    PAIRS.get_or_init(|| {
        [Cipher::ChaChaPoly, Cipher::AesGcm].map(|cipher| {
            let a = NoiseSecretKey::from_bytes([1; 32]);
            let b = NoiseSecretKey::from_bytes([2; 32]);
            let link = LinkId([5; 16]);
            let (pending, m1) =
                noise::initiate_preferring(&a, &b.public(), &link, cipher, seeded(1))
                    .expect("initiate");
            let (sb, m2) =
                noise::respond_preferring(&b, &a.public(), &link, &m1, cipher, seeded(2))
                    .expect("respond");
            (pending.handle_response(&m2).expect("finish"), sb)
        })
    })
}

proptest! {
    /// Any text given as an endpoint is parsed or refused with a reason,
    /// never a panic; what parses prints back to an equal endpoint.
    #[test]
    fn endpoints_parse_or_are_refused_and_round_trip(s in "(tcp|unix|udp)?(://)?[\\[\\]a-z0-9.:/\\-]{0,40}") {
        let _ = split_host_port(&s);
        if let Ok(e) = Endpoint::parse(&s) {
            prop_assert_eq!(Endpoint::parse(&e.to_string()), Ok(e));
        }
    }

    /// Every loopback address and port makes a listener; it prints back.
    #[test]
    fn loopback_listeners_parse(port in any::<u16>(), v6 in any::<bool>(), udp in any::<bool>()) {
        let scheme = if udp { "udp" } else { "tcp" };
        let s = if v6 { format!("{scheme}://[::1]:{port}") } else { format!("{scheme}://127.0.0.1:{port}") };
        let e = Endpoint::parse_listen(&s).expect("a loopback listener");
        prop_assert_eq!(e.port(), Some(port));
        prop_assert_eq!(e.to_string(), s);
    }

    /// A relayed datagram names its link in its first 16 bytes, whatever
    /// follows; anything shorter names none.
    #[test]
    fn relayed_datagrams_split_into_link_and_rest(
        link in any::<[u8; 16]>(),
        rest in proptest::collection::vec(any::<u8>(), 0..100),
        cut in 0usize..16,
    ) {
        let mut d = Vec::new();
        comsat_protocol::datagram::tag(LinkId(link), &mut d);
        d.extend_from_slice(&rest);
        prop_assert_eq!(comsat_protocol::datagram::split(&d), Some((LinkId(link), rest.as_slice())));
        prop_assert_eq!(comsat_protocol::datagram::split(&d[..cut]), None);
    }

    /// A hostile relay between two agents drops, duplicates, delays,
    /// reorders and alters datagrams as it likes: the receiver delivers
    /// each sent datagram at most once, exactly as sent (flow and
    /// payload), never an altered one, and refuses a repeat or a
    /// datagram a whole window late; everything else it delivers.
    #[test]
    fn datagrams_through_a_hostile_relay_arrive_at_most_once_and_intact(
        aes in any::<bool>(),
        sent in proptest::collection::vec((any::<u32>(), proptest::collection::vec(any::<u8>(), 0..64)), 1..60),
        acts in proptest::collection::vec((0u8..5, any::<usize>(), any::<usize>()), 0..200),
    ) {
        let (sa, sb) = &sessions()[usize::from(aes)];
        let ((mut seal, _), (_, mut open)) = (sa.datagrams(), sb.datagrams());
        let wire: Vec<Vec<u8>> = sent
            .iter()
            .map(|(flow, payload)| {
                let mut d = Vec::new();
                seal.seal(*flow, payload, &mut d).expect("seal");
                d
            })
            .collect();
        let mut delivered = vec![false; wire.len()];
        let mut newest: Option<usize> = None;
        for (act, i, flip) in acts {
            let i = i % wire.len();
            let mut d = wire[i].clone();
            let altered = act == 4;
            if altered {
                let at = flip % d.len();
                d[at] ^= 1 << (flip % 8);
            }
            match open.open_in_place(&mut d) {
                Ok((flow, at)) => {
                    prop_assert!(!altered, "an altered datagram was delivered");
                    prop_assert!(!delivered[i], "datagram {} delivered twice", i);
                    prop_assert_eq!((flow, &d[at]), (sent[i].0, sent[i].1.as_slice()));
                    delivered[i] = true;
                    newest = Some(newest.map_or(i, |n| n.max(i)));
                }
                Err(e) => {
                    // Refused only for a reason that holds: altered, or
                    // a repeat (the window spans every number sent here).
                    prop_assert!(altered || delivered[i], "datagram {} refused: {}", i, e);
                }
            }
        }
        prop_assert_eq!(open.newest(), newest.map(|n| n as u64));
    }

    /// A record sealed in place is the record the copying sealer makes;
    /// the peer opens it in place to the same kind and payload, and any
    /// flipped bit is refused.
    #[test]
    fn sealed_records_round_trip_in_place(
        aes in any::<bool>(),
        payload in proptest::collection::vec(any::<u8>(), 0..3000),
        flow in 1u32..(1 << 24),
        seq in 0u64..(1 << 40),
        flip in any::<usize>(),
    ) {
        let (sa, sb) = &sessions()[usize::from(aes)];
        let mut copied = Vec::new();
        sa.seal_record(flow, seq, RecordKind::Data, &payload, &mut copied).expect("seal");
        let mut record = vec![0u8; RECORD_PREFIX_LEN];
        record.extend_from_slice(&payload);
        sa.seal_record_in_place(flow, seq, RecordKind::Data, &mut record).expect("seal");
        prop_assert_eq!(&record, &copied);
        let (h, _, used) = decode_record(&record).expect("valid").expect("whole");
        prop_assert_eq!((h.seq, used), (seq, record.len()));
        let mut altered = record.clone();
        let at = RECORD_HEADER_LEN + flip % (altered.len() - RECORD_HEADER_LEN);
        altered[at] ^= 1 << (flip % 8);
        prop_assert!(sb.open_record_in_place(flow, seq, &mut altered[RECORD_HEADER_LEN..]).is_err());
        let (kind, at) = sb
            .open_record_in_place(flow, seq, &mut record[RECORD_HEADER_LEN..])
            .expect("open");
        prop_assert_eq!(kind, RecordKind::Data);
        prop_assert_eq!(&record[RECORD_HEADER_LEN..][at], payload.as_slice());
    }

    #[test]
    fn flow_header_round_trip(link in any::<[u8; 16]>(), flow in 1u32..(1 << 24)) {
        let h = FlowHeader { link_id: LinkId(link), flow_id: flow };
        let mut out = Vec::new();
        h.write_to(&mut out);
        prop_assert_eq!(out.len(), h.encoded_len());
        prop_assert_eq!(FlowHeader::decode(&out), Ok(Some((h, out.len()))));
    }

    #[test]
    fn tagged_flow_ids_round_trip(
        link in any::<[u8; 16]>(),
        generation in any::<u32>(),
        id in 1u32..(1 << 24),
    ) {
        let wire = comsat_protocol::record::wire_flow_id(generation, id);
        prop_assert_eq!(
            comsat_protocol::record::split_flow_id(wire),
            ((generation & 0xff) as u8, id)
        );
        let h = FlowHeader { link_id: LinkId(link), flow_id: wire };
        let mut out = Vec::new();
        h.write_to(&mut out);
        prop_assert_eq!(FlowHeader::decode(&out), Ok(Some((h, out.len()))));
    }

    #[test]
    fn record_round_trip(len in 17usize..2000, seq in 0u64..(1 << 40)) {
        let mut out = Vec::new();
        RecordHeader { len, seq }.write_to(&mut out);
        out.extend(std::iter::repeat_n(0x5a, len));
        let (h, ct, used) = decode_record(&out).expect("valid").expect("complete");
        prop_assert_eq!(h, RecordHeader { len, seq });
        prop_assert_eq!(ct.len(), len);
        prop_assert_eq!(used, out.len());
    }

    #[test]
    fn record_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = decode_record(&bytes);
        let _ = FlowHeader::decode(&bytes);
    }

    #[test]
    fn grant_round_trip(
        link in any::<[u8; 16]>(),
        generation in any::<u64>(),
        relays in proptest::collection::vec(any::<[u8; 16]>(), 1..16),
        not_after in any::<u64>(),
        buffer_limit in any::<u64>(),
        rate in any::<Option<u64>>(),
        flows in any::<Option<u32>>(),
    ) {
        let authority = SigningKey::from_seed(&[1; 32]);
        let grant = Grant {
            link_id: LinkId(link),
            generation,
            relays: relays.into_iter().map(RelayId).collect(),
            side_a: GrantSide { node_id: NodeId([1; 16]), sign_pub: SigningKey::from_seed(&[2; 32]).public() },
            side_b: GrantSide { node_id: NodeId([2; 16]), sign_pub: SigningKey::from_seed(&[3; 32]).public() },
            not_after,
            buffer_limit,
            limits: LinkLimits { rate_bytes_per_sec: rate, max_flows: flows },
        };
        let signed = grant.sign(&authority).expect("sign");
        let bytes = signed.encode().expect("encode");
        let back = SignedGrant::decode(&bytes).expect("decode");
        prop_assert_eq!(&back, &signed);
        prop_assert_eq!(back.verify_signature(&authority.public()).expect("verify"), grant);
    }

    #[test]
    fn grant_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        if let Ok(g) = SignedGrant::decode(&bytes) {
            let _ = g.verify_signature(&SigningKey::from_seed(&[1; 32]).public());
        }
    }
}
