//! The flow core: streams are vectors of records.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::{Bytes, BytesMut};
use comsat_protocol::noise::{self, RECORD_PREFIX_LEN, Session};
use comsat_protocol::record::{RecordKind, decode_record};
use comsat_protocol::resume::AckError;
use comsat_protocol::{LinkId, NoiseSecretKey};

use crate::core::ack::AckWhen;
use crate::core::flow::{Delivery, FlowLimits, Received, RecvCore, RecvError, SendCore, completed};

fn sessions() -> (Session, Session) {
    let a = NoiseSecretKey::from_bytes([1; 32]);
    let b = NoiseSecretKey::from_bytes([2; 32]);
    let link = LinkId([3; 16]);
    let (pending, m1) =
        noise::initiate(&a, &b.public(), &link, comsat_node::keys::os_rng()).expect("initiate");
    let (sb, m2) =
        noise::respond(&b, &a.public(), &link, &m1, comsat_node::keys::os_rng()).expect("respond");
    (pending.handle_response(&m2).expect("finish"), sb)
}

const LIMITS: FlowLimits = FlowLimits {
    window: 1000,
    ack_bytes: 300,
    records_per_key: 1 << 20,
};

/// A token that counts how many of its kind were dropped (a budget permit
/// given back).
struct Token(Arc<AtomicUsize>);

impl Drop for Token {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// One side of a flow: its two directions, its delivery and what its
/// application received.
struct Side {
    tx: SendCore,
    rx: RecvCore,
    delivery: Delivery,
    app: Vec<u8>,
    /// Acks queued toward the peer, in order.
    acks: Vec<(u64, AckWhen)>,
}

impl Side {
    /// Writes at most `budget` bytes of the delivery to the application;
    /// true once it is complete (acks queued).
    fn write_app(&mut self, budget: usize) -> bool {
        let n = self.delivery.unwritten().len().min(budget);
        let chunk = self.delivery.unwritten()[..n].to_vec();
        self.app.extend_from_slice(&chunk);
        self.delivery.wrote(n);
        if !self.delivery.unwritten().is_empty() {
            return false;
        }
        let done = self.delivery.complete();
        if let Some(ack) = self.rx.on_delivered(done) {
            self.acks.push(ack);
        }
        true
    }

    /// Takes the records of one stream, writing everything to the
    /// application; stops at the first error.
    fn receive(&mut self, stream: &[Bytes]) -> Result<(), RecvError> {
        if let Some(ack) = self.rx.on_stream() {
            self.acks.push((ack, AckWhen::Soon));
        }
        for record in stream {
            let (header, _, used) = decode_record(record).expect("record").expect("whole");
            assert_eq!(used, record.len());
            match self
                .rx
                .handle_record(header.seq, BytesMut::from(&record[..]))?
            {
                Received::Duplicate { ack } => self.acks.push((ack, AckWhen::Soon)),
                Received::Deliver { payload, fin, ack } => {
                    self.delivery.set(payload, fin, ack);
                    assert!(self.write_app(usize::MAX));
                }
            }
        }
        Ok(())
    }

    /// The highest position acked so far.
    fn last_ack(&self) -> Option<u64> {
        self.acks.iter().map(|(upto, _)| *upto).max()
    }
}

/// Both sides of one flow: `a` dialled it (its sealer is `b`'s opener).
fn pair() -> (Side, Side) {
    pair_with(LIMITS)
}

fn pair_with(limits: FlowLimits) -> (Side, Side) {
    let (sa, sb) = sessions();
    let (a_seal, a_open) = sa.flow(0, 1);
    let (b_seal, b_open) = sb.flow(0, 1);
    let side = |tx, rx| Side {
        tx: SendCore::new(tx, limits),
        rx: RecvCore::new(rx, limits),
        delivery: Delivery::default(),
        app: Vec::new(),
        acks: Vec::new(),
    };
    (side(a_seal, a_open), side(b_seal, b_open))
}

/// A record to seal: room for the prefix, then `payload`.
fn record(payload: &[u8]) -> Vec<u8> {
    let mut r = vec![0; RECORD_PREFIX_LEN];
    r.extend_from_slice(payload);
    r
}

fn push_data<P: Default>(tx: &mut SendCore<P>, payload: &[u8]) -> u64 {
    tx.push(RecordKind::Data, record(payload), P::default())
        .expect("seal")
        .seq
}

fn push_kind(tx: &mut SendCore, kind: RecordKind) {
    tx.push(kind, record(&[]), ()).expect("seal");
}

/// Everything a new stream carries now.
fn stream(tx: &SendCore) -> Vec<Bytes> {
    let mut cursor = tx.cursor();
    tx.poll_transmit(&mut cursor)
}

fn seqs(records: &[Bytes]) -> Vec<u64> {
    records
        .iter()
        .map(|r| decode_record(r).expect("record").expect("whole").0.seq)
        .collect()
}

// ---- sending: sequence numbers, the replay window, resume ----

#[test]
fn pushed_records_take_consecutive_sequence_numbers() {
    let (mut a, _) = pair();
    assert_eq!(push_data(&mut a.tx, b"x"), 0);
    assert_eq!(push_data(&mut a.tx, b"y"), 1);
    assert_eq!(push_data(&mut a.tx, b"z"), 2);
    assert_eq!(seqs(&stream(&a.tx)), [0, 1, 2]);
}

#[test]
fn a_stream_writes_each_record_once() {
    let (mut a, _) = pair();
    push_data(&mut a.tx, b"one");
    let mut cursor = a.tx.cursor();
    assert_eq!(seqs(&a.tx.poll_transmit(&mut cursor)), [0]);
    assert!(a.tx.poll_transmit(&mut cursor).is_empty(), "nothing new");
    push_data(&mut a.tx, b"two");
    assert_eq!(seqs(&a.tx.poll_transmit(&mut cursor)), [1]);
}

#[test]
fn a_new_stream_resends_from_the_oldest_unacknowledged_record() {
    let (mut a, _) = pair();
    for p in [b"a", b"b", b"c", b"d"] {
        push_data(&mut a.tx, p);
    }
    let mut first = a.tx.cursor();
    assert_eq!(a.tx.poll_transmit(&mut first).len(), 4);
    a.tx.on_ack(2).expect("ack");
    // The stream is lost; the next one starts at the oldest record kept.
    assert_eq!(seqs(&stream(&a.tx)), [2, 3]);
}

#[test]
fn a_stream_skips_records_acknowledged_while_it_was_written() {
    let (mut a, _) = pair();
    push_data(&mut a.tx, b"a");
    let mut cursor = a.tx.cursor();
    a.tx.on_ack(0).expect("nothing acked yet");
    push_data(&mut a.tx, b"b");
    push_data(&mut a.tx, b"c");
    a.tx.on_ack(2).expect("ack");
    assert_eq!(seqs(&a.tx.poll_transmit(&mut cursor)), [2]);
}

#[test]
fn an_ack_frees_records_and_gives_back_their_budget() {
    let (sa, _) = sessions();
    let dropped = Arc::new(AtomicUsize::new(0));
    let mut tx = SendCore::<Option<Token>>::new(sa.flow(0, 1).0, LIMITS);
    for _ in 0..3 {
        tx.push(
            RecordKind::Data,
            record(b"abc"),
            Some(Token(dropped.clone())),
        )
        .expect("seal");
    }
    let one = tx.held() / 3;
    assert_eq!(tx.on_ack(2), Ok(2));
    assert_eq!(dropped.load(Ordering::Relaxed), 2, "two permits given back");
    assert_eq!(tx.held(), one);
    assert_eq!(tx.on_ack(3), Ok(1));
    assert_eq!(dropped.load(Ordering::Relaxed), 3);
    assert_eq!(tx.held(), 0);
}

#[test]
fn an_old_or_repeated_ack_frees_nothing() {
    let (mut a, _) = pair();
    push_data(&mut a.tx, b"a");
    push_data(&mut a.tx, b"b");
    assert_eq!(a.tx.on_ack(2), Ok(2));
    assert_eq!(a.tx.on_ack(2), Ok(0));
    assert_eq!(a.tx.on_ack(1), Ok(0));
    assert!(stream(&a.tx).is_empty());
}

#[test]
fn an_ack_beyond_what_was_sent_is_refused_and_frees_nothing() {
    let (mut a, _) = pair();
    push_data(&mut a.tx, b"a");
    let held = a.tx.held();
    assert_eq!(a.tx.on_ack(5), Err(AckError { upto: 5, next: 1 }));
    assert_eq!(a.tx.held(), held);
    assert_eq!(seqs(&stream(&a.tx)), [0]);
}

#[test]
fn the_newest_record_is_the_reset_to_send_last() {
    let (mut a, _) = pair();
    push_data(&mut a.tx, b"a");
    push_kind(&mut a.tx, RecordKind::Reset);
    let last = a.tx.last().expect("a record").clone();
    assert_eq!(seqs(&[last]), [1]);
}

#[test]
fn the_record_that_starts_each_key_is_reported_as_a_rekey() {
    let limits = FlowLimits {
        records_per_key: 3,
        ..LIMITS
    };
    let (sa, _) = sessions();
    let mut tx = SendCore::<()>::new(sa.flow(0, 1).0, limits);
    let rekeyed: Vec<bool> = (0..7)
        .map(|_| {
            tx.push(RecordKind::Data, record(b"x"), ())
                .expect("seal")
                .rekeyed
        })
        .collect();
    assert_eq!(rekeyed, [false, false, false, true, false, false, true]);
}

// ---- the buffer limits and a slow receiver ----

#[test]
fn a_full_window_stops_local_reads_until_an_ack_frees_it() {
    let (mut a, _) = pair();
    let mut pushed = 0;
    while a.tx.has_room() {
        push_data(&mut a.tx, &[7; 100]);
        pushed += 1;
    }
    assert!(a.tx.held() >= LIMITS.window);
    assert!(pushed < 11, "100-byte records fill a 1000-byte window");
    a.tx.on_ack(1).expect("ack");
    assert!(a.tx.has_room(), "the ack made room");
}

#[test]
fn the_window_counts_whole_sealed_records() {
    let (mut a, _) = pair();
    push_data(&mut a.tx, &[0; 10]);
    let held = a.tx.held();
    assert_eq!(held, stream(&a.tx)[0].len());
    assert!(held > 10, "header and tag count too");
}

#[test]
fn one_record_may_overshoot_the_window_but_then_reading_stops() {
    let (mut a, _) = pair();
    push_data(&mut a.tx, &[1; 990]);
    assert!(!a.tx.has_room());
    assert!(a.tx.held() > LIMITS.window);
}

#[test]
fn a_slow_receiver_holds_back_its_ack_until_the_application_reads() {
    let (mut a, mut b) = pair();
    push_data(&mut a.tx, &[5; 200]);
    let records = stream(&a.tx);
    let (h, _, _) = decode_record(&records[0]).expect("ok").expect("whole");
    let Received::Deliver { payload, fin, ack } =
        b.rx.handle_record(h.seq, BytesMut::from(&records[0][..]))
            .expect("deliver")
    else {
        panic!("a new record is delivered");
    };
    b.delivery.set(payload, fin, ack);
    assert!(!b.write_app(50), "the application took 50 bytes only");
    assert!(
        b.acks.is_empty(),
        "nothing acknowledged before it is written"
    );
    assert!(!b.write_app(100));
    assert!(b.write_app(100));
    assert_eq!(b.app, vec![5; 200]);
    assert_eq!(b.acks, [(1, AckWhen::Lazy)]);
}

#[test]
fn a_slow_receiver_stops_the_sender_through_its_window() {
    let (mut a, mut b) = pair();
    // The receiving application reads nothing: no acks, the window fills.
    let mut cursor = a.tx.cursor();
    let mut stuck = None;
    while a.tx.has_room() {
        push_data(&mut a.tx, &[9; 100]);
        for r in a.tx.poll_transmit(&mut cursor) {
            if stuck.is_some() {
                continue;
            }
            let (h, _, _) = decode_record(&r).expect("ok").expect("whole");
            if let Received::Deliver { payload, fin, ack } =
                b.rx.handle_record(h.seq, BytesMut::from(&r[..]))
                    .expect("deliver")
            {
                b.delivery.set(payload, fin, ack);
                stuck = Some(());
            }
        }
    }
    assert!(!a.tx.has_room(), "the sender stops reading its socket");
    assert!(b.acks.is_empty());
    // The application reads; the ack frees the sender's window.
    assert!(b.write_app(usize::MAX));
    let (upto, _) = b.acks[0];
    assert_eq!(a.tx.on_ack(upto), Ok(1));
    // The rest arrives on a new stream; once delivered, everything is acked.
    let resent = stream(&a.tx);
    assert_eq!(seqs(&resent)[0], 1);
    b.receive(&resent).expect("in order");
    a.tx.on_ack(b.last_ack().expect("acks")).expect("ack");
    assert_eq!(a.tx.held(), 0);
    assert!(a.tx.has_room());
}

// ---- receiving: in order, exactly once ----

#[test]
fn records_are_delivered_in_order_and_acked_up_to_the_next() {
    let (mut a, mut b) = pair();
    push_data(&mut a.tx, b"hello ");
    push_data(&mut a.tx, b"world");
    b.receive(&stream(&a.tx)).expect("in order");
    assert_eq!(b.app, b"hello world");
    assert_eq!(b.rx.expected(), 2);
    assert_eq!(b.acks, [(1, AckWhen::Lazy), (2, AckWhen::Lazy)]);
}

#[test]
fn a_record_delivered_before_is_dropped_and_acked_again_soon() {
    let (mut a, mut b) = pair();
    push_data(&mut a.tx, b"once");
    let records = stream(&a.tx);
    b.receive(&records).expect("first");
    let (h, _, _) = decode_record(&records[0]).expect("ok").expect("whole");
    let again =
        b.rx.handle_record(h.seq, BytesMut::from(&records[0][..]))
            .expect("duplicate");
    assert_eq!(again, Received::Duplicate { ack: 1 });
    assert_eq!(b.app, b"once");
}

#[test]
fn a_missing_record_fails_the_flow() {
    let (mut a, mut b) = pair();
    push_data(&mut a.tx, b"0");
    push_data(&mut a.tx, b"1");
    let records = stream(&a.tx);
    let err = b.receive(&records[1..]).expect_err("a gap");
    assert!(matches!(err, RecvError::Sequence { want: 0, got: 1 }));
    assert!(b.app.is_empty());
}

#[test]
fn a_tampered_record_fails_to_decrypt_and_is_not_delivered() {
    let (mut a, mut b) = pair();
    push_data(&mut a.tx, b"secret");
    let mut bad = stream(&a.tx)[0].to_vec();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    let err = b.receive(&[Bytes::from(bad)]).expect_err("forged");
    assert!(matches!(err, RecvError::Noise(_)));
    assert!(b.app.is_empty());
    assert_eq!(b.rx.expected(), 0, "nothing counts as delivered");
}

#[test]
fn a_reset_record_ends_the_flow_as_a_peer_reset() {
    let (mut a, mut b) = pair();
    push_data(&mut a.tx, b"partial");
    push_kind(&mut a.tx, RecordKind::Reset);
    let err = b.receive(&stream(&a.tx)).expect_err("reset");
    assert!(matches!(err, RecvError::PeerReset));
    assert_eq!(b.app, b"partial");
}

#[test]
fn an_open_record_is_refused_anywhere_but_first() {
    let (mut a, mut b) = pair();
    push_kind(&mut a.tx, RecordKind::Open);
    push_kind(&mut a.tx, RecordKind::Open);
    let err = b.receive(&stream(&a.tx)).expect_err("second open");
    assert!(matches!(err, RecvError::Unexpected(RecordKind::Open)));
    assert_eq!(b.rx.expected(), 1, "the first Open was taken");
}

#[test]
fn an_open_taken_before_the_flow_existed_counts_and_is_acked_lazily() {
    let (mut a, mut b) = pair();
    push_kind(&mut a.tx, RecordKind::Open);
    push_data(&mut a.tx, b"after open");
    assert_eq!(b.rx.opened_by_peer(), (1, AckWhen::Lazy));
    // The stream still carries the Open: it is a duplicate now.
    b.receive(&stream(&a.tx)).expect("ok");
    assert_eq!(b.app, b"after open");
    assert_eq!(
        b.acks,
        [(1, AckWhen::Soon), (1, AckWhen::Soon), (2, AckWhen::Lazy)]
    );
}

#[test]
fn a_new_stream_acks_soon_what_was_delivered_before() {
    let (mut a, mut b) = pair();
    assert_eq!(b.rx.on_stream(), None, "nothing delivered: nothing to ack");
    push_data(&mut a.tx, b"x");
    b.receive(&stream(&a.tx)).expect("ok");
    assert_eq!(b.rx.on_stream(), Some(1));
}

// ---- lazy acknowledgements: the byte count trigger ----

#[test]
fn small_deliveries_are_acked_lazily() {
    let (mut a, mut b) = pair();
    for _ in 0..2 {
        push_data(&mut a.tx, &[1; 100]);
    }
    b.receive(&stream(&a.tx)).expect("ok");
    assert!(b.acks.iter().all(|(_, w)| *w == AckWhen::Lazy));
}

#[test]
fn enough_bytes_delivered_make_the_ack_go_soon_and_the_count_restart() {
    let (mut a, mut b) = pair();
    // 300 bytes trigger: the third 100-byte record, then the sixth.
    for _ in 0..6 {
        push_data(&mut a.tx, &[1; 100]);
    }
    b.receive(&stream(&a.tx)).expect("ok");
    let when: Vec<AckWhen> = b.acks.iter().map(|(_, w)| *w).collect();
    use AckWhen::{Lazy, Soon};
    assert_eq!(when, [Lazy, Lazy, Soon, Lazy, Lazy, Soon]);
    assert_eq!(b.last_ack(), Some(6));
}

#[test]
fn one_large_record_is_acked_soon() {
    let (mut a, mut b) = pair();
    push_data(&mut a.tx, &[1; 400]);
    b.receive(&stream(&a.tx)).expect("ok");
    assert_eq!(b.acks, [(1, AckWhen::Soon)]);
}

// ---- Fin both ways: half-close and completion ----

#[test]
fn a_fin_is_delivered_once_written_and_acked_soon() {
    let (mut a, mut b) = pair();
    push_data(&mut a.tx, b"last words");
    push_kind(&mut a.tx, RecordKind::Fin);
    let records = stream(&a.tx);
    let (h, _, _) = decode_record(&records[1]).expect("ok").expect("whole");
    b.receive(&records[..1]).expect("data");
    let Received::Deliver { payload, fin, ack } =
        b.rx.handle_record(h.seq, BytesMut::from(&records[1][..]))
            .expect("fin")
    else {
        panic!("the Fin is delivered");
    };
    assert!(fin && payload.is_empty());
    assert!(!b.rx.fin_delivered(), "not before the write side is shut");
    b.delivery.set(payload, fin, ack);
    assert!(b.delivery.fin());
    assert!(b.write_app(0));
    assert!(b.rx.fin_delivered());
    assert_eq!(b.acks.last(), Some(&(2, AckWhen::Soon)));
}

#[test]
fn a_fin_is_acked_only_by_an_ack_that_covers_it() {
    let (mut a, _) = pair();
    push_data(&mut a.tx, b"x");
    push_kind(&mut a.tx, RecordKind::Fin);
    assert!(a.tx.fin_sent());
    a.tx.on_ack(1).expect("ack");
    assert!(!a.tx.fin_acked());
    a.tx.on_ack(2).expect("ack");
    assert!(a.tx.fin_acked());
}

#[test]
fn a_half_closed_flow_still_carries_the_other_direction() {
    let (mut a, mut b) = pair();
    // A is done sending; B still answers.
    push_kind(&mut a.tx, RecordKind::Fin);
    b.receive(&stream(&a.tx)).expect("fin");
    a.tx.on_ack(b.last_ack().expect("ack")).expect("ack");
    assert!(a.tx.fin_acked() && b.rx.fin_delivered());
    push_data(&mut b.tx, b"answer");
    a.receive(&stream(&b.tx)).expect("answer");
    assert_eq!(a.app, b"answer");
    assert!(!completed(&a.tx, &a.rx), "B has not finished");
    assert!(!completed(&b.tx, &b.rx));
}

#[test]
fn a_flow_completes_once_both_fins_are_delivered_and_acknowledged() {
    let (mut a, mut b) = pair();
    push_kind(&mut a.tx, RecordKind::Fin);
    push_kind(&mut b.tx, RecordKind::Fin);
    b.receive(&stream(&a.tx)).expect("a's fin");
    a.receive(&stream(&b.tx)).expect("b's fin");
    assert!(!completed(&a.tx, &a.rx), "a's Fin not acknowledged yet");
    a.tx.on_ack(b.last_ack().expect("ack")).expect("ack");
    assert!(completed(&a.tx, &a.rx));
    assert!(!completed(&b.tx, &b.rx));
    b.tx.on_ack(a.last_ack().expect("ack")).expect("ack");
    assert!(completed(&b.tx, &b.rx));
}

// ---- resume after a lost stream, a move between connections ----

#[test]
fn a_flow_cut_mid_stream_resumes_and_delivers_everything_once() {
    let (mut a, mut b) = pair();
    let sent: Vec<u8> = (0..40u8).collect();
    for chunk in sent.chunks(4) {
        push_data(&mut a.tx, chunk);
    }
    // The first stream loses everything after 3 records; acks are lost too.
    let first = stream(&a.tx);
    b.receive(&first[..3]).expect("ok");
    // The second carries all not acknowledged: the first 3 again.
    b.receive(&stream(&a.tx)).expect("duplicates dropped");
    assert_eq!(b.app, sent);
    a.tx.on_ack(b.last_ack().expect("ack")).expect("ack");
    assert_eq!(a.tx.held(), 0);
}

#[test]
fn a_delivery_cut_short_finishes_on_the_next_stream_without_repeating() {
    let (mut a, mut b) = pair();
    push_data(&mut a.tx, b"0123456789");
    push_data(&mut a.tx, b"abc");
    let records = stream(&a.tx);
    let (h, _, _) = decode_record(&records[0]).expect("ok").expect("whole");
    let Received::Deliver { payload, fin, ack } =
        b.rx.handle_record(h.seq, BytesMut::from(&records[0][..]))
            .expect("deliver")
    else {
        panic!("delivered");
    };
    b.delivery.set(payload, fin, ack);
    assert!(!b.write_app(4));
    // The stream dies; the next one first finishes the write.
    assert!(b.write_app(usize::MAX));
    b.receive(&stream(&a.tx)).expect("resend");
    assert_eq!(b.app, b"0123456789abc");
}

#[test]
fn a_move_to_another_connection_resends_what_the_old_stream_had_not_carried() {
    let (mut a, mut b) = pair();
    for i in 0..6u8 {
        push_data(&mut a.tx, &[i]);
    }
    let mut lane = a.tx.cursor();
    let on_lane = a.tx.poll_transmit(&mut lane);
    // Two records made it over the lane before the flow moved; one ack came
    // back.
    b.receive(&on_lane[..2]).expect("ok");
    a.tx.on_ack(1).expect("ack");
    let mut main = a.tx.cursor();
    let on_main = a.tx.poll_transmit(&mut main);
    assert_eq!(seqs(&on_main), [1, 2, 3, 4, 5]);
    b.receive(&on_main).expect("ok");
    assert_eq!(b.app, [0, 1, 2, 3, 4, 5]);
    push_data(&mut a.tx, &[6]);
    assert_eq!(seqs(&a.tx.poll_transmit(&mut main)), [6]);
}

#[test]
fn a_stream_that_replays_old_records_delivers_nothing_twice() {
    let (mut a, mut b) = pair();
    push_data(&mut a.tx, b"a");
    push_data(&mut a.tx, b"b");
    let records = stream(&a.tx);
    let replayed = [
        records[0].clone(),
        records[0].clone(),
        records[1].clone(),
        records[0].clone(),
    ];
    b.receive(&replayed).expect("duplicates only");
    assert_eq!(b.app, b"ab");
}

// ---- many streams lost at random points ----

/// One direction's application data, fed to its side's window while it
/// has room (backpressure), then its `Fin`.
struct Source {
    chunks: Vec<Vec<u8>>,
    next: usize,
}

impl Source {
    fn feed(&mut self, tx: &mut SendCore) {
        while tx.has_room() && !tx.fin_sent() {
            match self.chunks.get(self.next) {
                Some(chunk) => {
                    push_data(tx, chunk);
                    self.next += 1;
                }
                None => push_kind(tx, RecordKind::Fin),
            }
        }
    }
}

fn source(rng: &mut impl rand::Rng, n: usize) -> (Source, Vec<u8>) {
    let chunks: Vec<Vec<u8>> = (0..n)
        .map(|_| {
            let len = rng.random_range(1..200);
            (0..len).map(|_| rng.random()).collect()
        })
        .collect();
    let all = chunks.concat();
    (Source { chunks, next: 0 }, all)
}

/// One stream of one direction: the relay passes the first `keep`
/// records, then the stream dies.
fn carry(from: &Side, to: &mut Side, keep: usize) {
    let records = stream(&from.tx);
    let keep = keep.min(records.len());
    to.receive(&records[..keep])
        .expect("a lossy relay never fails a flow");
}

#[test]
fn streams_lost_at_random_points_deliver_both_ways_exactly_once_and_complete() {
    use rand::{Rng, SeedableRng};
    for seed in 0..200 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (mut a, mut b) = pair();
        let (na, nb) = (rng.random_range(0..30), rng.random_range(0..30));
        let (mut a_src, a_sent) = source(&mut rng, na);
        let (mut b_src, b_sent) = source(&mut rng, nb);
        let mut rounds = 0;
        while !(completed(&a.tx, &a.rx) && completed(&b.tx, &b.rx)) {
            rounds += 1;
            assert!(rounds < 500, "seed {seed}: no progress");
            a_src.feed(&mut a.tx);
            b_src.feed(&mut b.tx);
            carry(&a, &mut b, rng.random_range(0..8));
            carry(&b, &mut a, rng.random_range(0..8));
            // Acks ride the control channel: some are lost.
            if rng.random_bool(0.7)
                && let Some(upto) = b.last_ack()
            {
                a.tx.on_ack(upto).expect("never beyond what was sent");
            }
            if rng.random_bool(0.7)
                && let Some(upto) = a.last_ack()
            {
                b.tx.on_ack(upto).expect("never beyond what was sent");
            }
        }
        assert_eq!(b.app, a_sent, "seed {seed}: a to b");
        assert_eq!(a.app, b_sent, "seed {seed}: b to a");
        assert_eq!(a.tx.held() + b.tx.held(), 0, "seed {seed}: all freed");
    }
}
