//! Datagrams from the network split as the relay reads them (their link)
//! and opened with a real Noise session (either transport cipher): opening
//! arbitrary bytes never panics and never accepts a number without an
//! authentic datagram, and what one side seals the other opens once, to
//! the same flow and payload.
#![no_main]

use comsat_protocol::noise::{DATAGRAM_OVERHEAD, DatagramError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((head, rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let (sa, sb) = &comsat_fuzz::sessions()[usize::from(head[0] & 1)];
    // A sealer and an opener numbering from 0, as at a session's start.
    let ((mut seal, _), (_, mut open)) = (sa.datagrams(), sb.datagrams());

    // What the relay reads of a datagram: a link id, if there are 16
    // bytes, and the rest as it came.
    if let Some((link, sealed)) = comsat_protocol::datagram::split(data) {
        assert_eq!((&link.0[..], sealed), data.split_at(16));
    }

    // Arbitrary bytes as datagrams from the network: refused, and no
    // number taken.
    for chunk in rest.chunks(usize::from(head[1]).max(DATAGRAM_OVERHEAD - 1)) {
        let mut buf = chunk.to_vec();
        assert!(open.open_in_place(&mut buf).is_err());
    }
    assert_eq!(open.newest(), None);

    // Round trip, then the replay of what was delivered.
    let flow = u32::from_be_bytes(*head);
    let mut wire = Vec::new();
    let seq = seal.seal(flow, rest, &mut wire).expect("within the limit");
    let mut buf = wire.clone();
    let (got, at) = open.open_in_place(&mut buf).expect("opens");
    assert_eq!((got, &buf[at]), (flow, rest));
    let mut again = wire.clone();
    assert_eq!(
        open.open_in_place(&mut again),
        Err(DatagramError::Replayed(seq))
    );
});
