//! Property tests of the record framing, flow headers and grants.

use comsat_protocol::grant::{Grant, GrantSide, LinkLimits, SignedGrant};
use comsat_protocol::ids::{LinkId, NodeId, RelayId};
use comsat_protocol::keys::SigningKey;
use comsat_protocol::record::{FlowHeader, RecordHeader, decode_record};
use proptest::prelude::*;

proptest! {
    #[test]
    fn flow_header_round_trip(link in any::<[u8; 16]>(), flow in 1u32..(1 << 24)) {
        let h = FlowHeader { link_id: LinkId(link), flow_id: flow };
        let mut out = Vec::new();
        h.write_to(&mut out);
        prop_assert_eq!(out.len(), h.encoded_len());
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
