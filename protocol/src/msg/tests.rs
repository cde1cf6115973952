use proptest::prelude::*;

use super::*;
use crate::keys::SigningKey;

fn sig() -> Signature {
    SigningKey::from_seed(&[4; 32]).sign(DOMAIN_SEP_HELLO, b"x")
}

fn frame<M: ControlMessage>(m: &M) -> String {
    let mut out = Vec::new();
    m.write_to(&mut out).expect("encode");
    assert_eq!(out.len(), m.encoded_len().expect("len"));
    let (back, used) = M::decode_frame(&out).expect("valid").expect("complete");
    assert_eq!(used, out.len());
    assert_eq!(
        codec::encode(&back).expect("re-encode"),
        out[FRAME_HEADER_LEN..]
    );
    hex::encode(out)
}

#[test]
fn hex_snapshots_agent_to_relay() {
    let link = LinkId([0xab; 16]);
    let hello = AgentToRelay::Hello {
        node_id: NodeId([1; 16]),
        signature: sig(),
    };
    let h = frame(&hello);
    assert_eq!(&h[..10], "0000005100");
    assert_eq!(
        frame(&AgentToRelay::Attach {
            link_id: link,
            generation: 300,
            side: Side::B
        }),
        "0000001501abababababababababababababababab".to_owned() + "fb2c0101"
    );
    assert_eq!(
        frame(&AgentToRelay::AttachLane {
            link_id: link,
            generation: 300,
            side: Side::A
        }),
        "0000001504abababababababababababababababab".to_owned() + "fb2c0100"
    );
    assert_eq!(
        frame(&AgentToRelay::Detach { link_id: link }),
        "0000001102abababababababababababababababab"
    );
    assert_eq!(
        frame(&AgentToRelay::Peer {
            link_id: link,
            frame: PeerFrame::Handshake(vec![1, 2, 3])
        }),
        "0000001603abababababababababababababababab0003010203"
    );
    assert_eq!(
        frame(&AgentToRelay::Peer {
            link_id: link,
            frame: PeerFrame::Sealed {
                seq: 2,
                ciphertext: vec![9]
            }
        }),
        "0000001503abababababababababababababababab01020109"
    );
}

#[test]
fn hex_snapshots_relay_to_agent() {
    let link = LinkId([0xcd; 16]);
    assert_eq!(frame(&RelayToAgent::Welcome), "0000000100");
    assert_eq!(
        frame(&RelayToAgent::Attached { link_id: link }),
        "0000001101cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd"
    );
    assert_eq!(
        frame(&RelayToAgent::PeerPresent { link_id: link }),
        "0000001102cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd"
    );
    assert_eq!(
        frame(&RelayToAgent::PeerAbsent { link_id: link }),
        "0000001103cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd"
    );
    assert_eq!(
        frame(&RelayToAgent::Peer {
            link_id: link,
            frame: PeerFrame::Handshake(vec![7])
        }),
        "0000001404cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd000107"
    );
    assert_eq!(
        frame(&RelayToAgent::Error {
            link_id: link,
            code: ErrorCode::StaleGeneration
        }),
        "0000001205cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd02"
    );
    assert_eq!(frame(&RelayToAgent::GoAway), "0000000106");
    assert_eq!(
        frame(&RelayToAgent::Error {
            link_id: link,
            code: ErrorCode::Draining
        }),
        "0000001205cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd05"
    );
}

#[test]
fn hello_is_channel_bound() {
    let key = SigningKey::from_seed(&[4; 32]);
    let node = NodeId([1; 16]);
    let AgentToRelay::Hello { node_id, signature } = make_hello(node, &key, &[7; 32]) else {
        panic!("not a hello");
    };
    assert!(verify_hello(&node_id, &signature, &key.public(), &[7; 32]));
    assert!(!verify_hello(&node_id, &signature, &key.public(), &[8; 32]));
    assert!(!verify_hello(
        &NodeId([2; 16]),
        &signature,
        &key.public(),
        &[7; 32]
    ));
}

#[test]
fn oversized_length_is_invalid_before_body_arrives() {
    let len = (MAX_CONTROL_FRAME_LEN as u32 + 1).to_be_bytes();
    assert_eq!(
        AgentToRelay::decode_frame(&len),
        Err(FrameError::TooLong(MAX_CONTROL_FRAME_LEN + 1))
    );
}

fn arb_link() -> impl Strategy<Value = LinkId> {
    any::<[u8; 16]>().prop_map(LinkId)
}

fn arb_peer_frame() -> impl Strategy<Value = PeerFrame> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..200).prop_map(PeerFrame::Handshake),
        (any::<u64>(), proptest::collection::vec(any::<u8>(), 0..200))
            .prop_map(|(seq, ciphertext)| PeerFrame::Sealed { seq, ciphertext }),
        Just(PeerFrame::NoSession),
    ]
}

fn arb_a2r() -> impl Strategy<Value = AgentToRelay> {
    prop_oneof![
        (any::<[u8; 16]>(), any::<[u8; 32]>()).prop_map(|(n, seed)| AgentToRelay::Hello {
            node_id: NodeId(n),
            signature: SigningKey::from_seed(&seed).sign(DOMAIN_SEP_HELLO, &n),
        }),
        (arb_link(), any::<u64>(), any::<bool>()).prop_map(|(link_id, generation, a)| {
            AgentToRelay::Attach {
                link_id,
                generation,
                side: if a { Side::A } else { Side::B },
            }
        }),
        arb_link().prop_map(|link_id| AgentToRelay::Detach { link_id }),
        (arb_link(), any::<u64>(), any::<bool>()).prop_map(|(link_id, generation, a)| {
            AgentToRelay::AttachLane {
                link_id,
                generation,
                side: if a { Side::A } else { Side::B },
            }
        }),
        (arb_link(), arb_peer_frame())
            .prop_map(|(link_id, frame)| AgentToRelay::Peer { link_id, frame }),
    ]
}

fn arb_r2a() -> impl Strategy<Value = RelayToAgent> {
    prop_oneof![
        Just(RelayToAgent::Welcome),
        arb_link().prop_map(|link_id| RelayToAgent::Attached { link_id }),
        arb_link().prop_map(|link_id| RelayToAgent::PeerPresent { link_id }),
        arb_link().prop_map(|link_id| RelayToAgent::PeerAbsent { link_id }),
        (arb_link(), arb_peer_frame())
            .prop_map(|(link_id, frame)| RelayToAgent::Peer { link_id, frame }),
        Just(RelayToAgent::GoAway),
        (arb_link(), 0usize..7).prop_map(|(link_id, c)| RelayToAgent::Error {
            link_id,
            code: [
                ErrorCode::NotGranted,
                ErrorCode::AlreadyAttached,
                ErrorCode::StaleGeneration,
                ErrorCode::NotAttached,
                ErrorCode::Revoked,
                ErrorCode::Draining,
                ErrorCode::RelayFull,
            ][c],
        }),
    ]
}

fn round_trip<M: ControlMessage + PartialEq + std::fmt::Debug>(msgs: &[M]) {
    let mut wire = Vec::new();
    for m in msgs {
        m.write_to(&mut wire).expect("encode");
    }
    let mut at = 0;
    for m in msgs {
        // Every strict prefix of the next frame is incomplete, never invalid.
        let (back, used) = M::decode_frame(&wire[at..])
            .expect("valid")
            .expect("complete");
        assert_eq!(&back, m);
        for cut in [1, used / 2, used - 1] {
            assert!(matches!(M::decode_frame(&wire[at..at + cut]), Ok(None)));
        }
        at += used;
    }
    assert_eq!(at, wire.len());
}

proptest! {
    #[test]
    fn a2r_round_trip(msgs in proptest::collection::vec(arb_a2r(), 1..6)) {
        round_trip(&msgs);
    }

    #[test]
    fn r2a_round_trip(msgs in proptest::collection::vec(arb_r2a(), 1..6)) {
        round_trip(&msgs);
    }

    #[test]
    fn perturbed_frames_never_panic(m in arb_a2r(), idx in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut wire = Vec::new();
        m.write_to(&mut wire).expect("encode");
        let i = idx.index(wire.len());
        wire[i] = byte;
        let _ = AgentToRelay::decode_frame(&wire);
        let _ = RelayToAgent::decode_frame(&wire);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = AgentToRelay::decode_frame(&bytes);
        let _ = RelayToAgent::decode_frame(&bytes);
    }
}
