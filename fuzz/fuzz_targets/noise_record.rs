//! Records from the network opened with a real Noise session (either
//! transport cipher): opening arbitrary bytes never panics, and what one
//! side seals, copying or in place, the other opens to the same kind and
//! payload.
#![no_main]

use comsat_protocol::noise::RECORD_PREFIX_LEN;
use comsat_protocol::record::{RECORD_HEADER_LEN, RecordKind, decode_record};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((head, rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let (sa, sb) = &comsat_fuzz::sessions()[usize::from(head[1] & 1)];
    // Any u32 flow id, valid or not; the top byte also picks a kind below.
    let flow = u32::from_be_bytes(*head);

    // Arbitrary bytes as a record from the network, on both sides.
    let mut out = Vec::new();
    if let Ok(Some((header, ciphertext, _))) = decode_record(rest) {
        let _ = sb.open_record(flow, header.seq, ciphertext, &mut out);
        let _ = sa.open_record(flow, header.seq, ciphertext, &mut out);
    }
    let _ = sb.open_record(flow, u64::from(flow), rest, &mut out);
    let _ = sb.open_control(u64::from(flow), rest);

    // Round trip: A seals `rest` as a record, B decodes and opens it.
    let kind = match head[0] % 4 {
        0 => RecordKind::Open,
        1 => RecordKind::Data,
        2 => RecordKind::Fin,
        _ => RecordKind::Reset,
    };
    let flow_id = flow & 0x00ff_ffff;
    let seq = u64::from(flow) << 8;
    let mut wire = Vec::new();
    if sa.seal_record(flow_id, seq, kind, rest, &mut wire).is_ok() {
        let (header, ciphertext, used) = decode_record(&wire)
            .expect("a sealed record decodes")
            .expect("a sealed record is complete");
        assert_eq!(used, wire.len());
        assert_eq!(header.seq, seq);
        let mut payload = Vec::new();
        let opened = sb.open_record(flow_id, header.seq, ciphertext, &mut payload);
        assert_eq!(opened.ok(), Some(kind));
        assert_eq!(payload.as_slice(), rest);

        // The same record sealed in place is the same bytes, and opens in
        // place to the payload.
        let mut record = vec![0u8; RECORD_PREFIX_LEN];
        record.extend_from_slice(rest);
        sa.seal_record_in_place(flow_id, seq, kind, &mut record)
            .expect("sealed once already");
        assert_eq!(record, wire);
        let (got, at) = sb
            .open_record_in_place(flow_id, seq, &mut record[RECORD_HEADER_LEN..])
            .expect("opens");
        assert_eq!(got, kind);
        assert_eq!(&record[RECORD_HEADER_LEN..][at], rest);
    }
});
