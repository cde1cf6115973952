//! The resume state of one flow direction, sans IO.
//!
//! The sender keeps every sealed record in a [`ReplayWindow`] until the
//! peer agent acknowledges it (cumulatively: "every record below `upto` was
//! delivered"); after any reconnect it sends again from the oldest record
//! not acknowledged. The receiver's [`Reassembly`] delivers each sequence
//! number exactly once and in order: a record it already delivered is a
//! duplicate to drop (and to acknowledge again, in case the first
//! acknowledgement was lost), a record beyond the next one means records
//! went missing on a path that must be ordered, and fails the flow.
//!
//! Call order, sender: [`ReplayWindow::next_seq`], seal the record with that
//! sequence number, [`ReplayWindow::push`]; write [`ReplayWindow::from`]
//! `(cursor)` on the current stream; on each acknowledgement
//! [`ReplayWindow::ack`]; on a new stream, restart the cursor at
//! [`ReplayWindow::acked`]. Receiver: [`Reassembly::check`] each record's
//! sequence number, deliver it if told to, then [`Reassembly::delivered`].

use std::collections::VecDeque;

use bytes::Bytes;

/// An acknowledgement that cannot be right.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("acknowledgement up to {upto} covers records never sent (next is {next})")]
pub struct AckError {
    /// The acknowledged position.
    pub upto: u64,
    /// The next sequence number the sender would use.
    pub next: u64,
}

/// Sealed records kept for resending until acknowledged, with a token per
/// record (the agent keeps a budget permit there, released on ack).
#[derive(Debug)]
pub struct ReplayWindow<T = ()> {
    next_seq: u64,
    acked: u64,
    records: VecDeque<(Bytes, T)>,
    bytes: usize,
}

impl<T> Default for ReplayWindow<T> {
    fn default() -> Self {
        Self {
            next_seq: 0,
            acked: 0,
            records: VecDeque::new(),
            bytes: 0,
        }
    }
}

impl<T> ReplayWindow<T> {
    /// An empty window; the first record is sequence number 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// The sequence number the next pushed record must carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Every record below this was delivered to the peer's application.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Records held.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Keeps `record`, sealed with sequence number [`Self::next_seq`].
    pub fn push(&mut self, record: Bytes, token: T) {
        self.bytes += record.len();
        self.records.push_back((record, token));
        self.next_seq += 1;
    }

    /// Frees every record below `upto`. An old or repeated acknowledgement
    /// changes nothing; one beyond what was sent is an error (a forged or
    /// confused peer).
    pub fn ack(&mut self, upto: u64) -> Result<usize, AckError> {
        if upto > self.next_seq {
            return Err(AckError {
                upto,
                next: self.next_seq,
            });
        }
        let mut freed = 0;
        while self.acked < upto {
            if let Some((r, _)) = self.records.pop_front() {
                self.bytes -= r.len();
                freed += 1;
            }
            self.acked += 1;
        }
        Ok(freed)
    }

    /// The records from sequence number `cursor` on (from the oldest held
    /// one if `cursor` is older), with their sequence numbers.
    pub fn from(&self, cursor: u64) -> impl Iterator<Item = (u64, &Bytes)> {
        let start = cursor.max(self.acked);
        let skip = usize::try_from(start - self.acked).unwrap_or(usize::MAX);
        self.records
            .iter()
            .enumerate()
            .skip(skip)
            .map(move |(i, (r, _))| (self.acked + i as u64, r))
    }

    /// The newest record, if any.
    pub fn last(&self) -> Option<&Bytes> {
        self.records.back().map(|(r, _)| r)
    }
}

/// What to do with a received record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The next record: open and deliver it, then call
    /// [`Reassembly::delivered`].
    Deliver,
    /// Already delivered: drop it and acknowledge [`Reassembly::expected`]
    /// again.
    Duplicate,
    /// Records before it are missing: fail the flow.
    Gap,
}

/// The receiving side of one flow direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reassembly {
    expected: u64,
}

impl Reassembly {
    /// Nothing delivered yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The next sequence number to deliver: what to acknowledge.
    pub fn expected(&self) -> u64 {
        self.expected
    }

    /// What to do with record `seq`.
    pub fn check(&self, seq: u64) -> Verdict {
        match seq.cmp(&self.expected) {
            std::cmp::Ordering::Less => Verdict::Duplicate,
            std::cmp::Ordering::Equal => Verdict::Deliver,
            std::cmp::Ordering::Greater => Verdict::Gap,
        }
    }

    /// Record [`Self::expected`] was delivered.
    pub fn delivered(&mut self) {
        self.expected += 1;
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::LinkId;
    use crate::keys::NoiseSecretKey;
    use crate::noise::tests::seeded;
    use crate::noise::{self, Session};
    use crate::record::{RecordKind, decode_record};

    #[test]
    fn window_frees_only_acknowledged_records() {
        let mut w = ReplayWindow::<()>::new();
        for i in 0..5u8 {
            assert_eq!(w.next_seq(), u64::from(i));
            w.push(Bytes::from(vec![i; 10]), ());
        }
        assert_eq!(w.bytes(), 50);
        assert_eq!(w.ack(2), Ok(2));
        assert_eq!(w.ack(1), Ok(0), "old ack is harmless");
        assert_eq!(w.ack(9), Err(AckError { upto: 9, next: 5 }));
        assert_eq!(w.from(0).map(|(s, _)| s).collect::<Vec<_>>(), [2, 3, 4]);
        assert_eq!(w.from(4).map(|(s, _)| s).collect::<Vec<_>>(), [4]);
        assert_eq!(w.from(5).count(), 0);
        assert_eq!(w.ack(5), Ok(3));
        assert!(w.is_empty());
        assert_eq!(w.bytes(), 0);
    }

    fn sessions() -> (Session, Session) {
        let a = NoiseSecretKey::from_bytes([1; 32]);
        let b = NoiseSecretKey::from_bytes([2; 32]);
        let link = LinkId([3; 16]);
        let (pending, m1) = noise::initiate(&a, &b.public(), &link, seeded(1)).expect("initiate");
        let (sb, m2) = noise::respond(&b, &a.public(), &link, &m1, seeded(2)).expect("respond");
        (pending.handle_response(&m2).expect("finish"), sb)
    }

    /// What the hostile relay does to one stream's records.
    #[derive(Clone, Copy, Debug)]
    enum Relay {
        /// Forwards faithfully until the connection drops after `n`
        /// records (the rest of that stream is lost).
        DropAfter(usize),
        /// Sends some records twice.
        Duplicate,
        /// Replays an old record, seen earlier, in the middle.
        Replay,
        /// Swaps two records.
        Reorder,
        /// Flips a bit in one ciphertext.
        Tamper,
    }

    /// One simulated flow direction: the sender writes `messages` through a
    /// series of streams, each mangled by the relay as `script` says; acks
    /// go back reliably after each stream. Returns what the receiver
    /// delivered and whether it detected an attack (failing the flow).
    fn simulate(seed: u64, messages: &[Vec<u8>], script: &[Relay]) -> (Vec<u8>, bool) {
        let (sa, sb) = sessions();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut window = ReplayWindow::<()>::new();
        for m in messages {
            let mut out = Vec::new();
            sa.seal_record(7, window.next_seq(), RecordKind::Data, m, &mut out)
                .expect("seal");
            window.push(Bytes::from(out), ());
        }
        let mut rx = Reassembly::new();
        let mut delivered = Vec::new();
        let mut seen: Vec<Bytes> = Vec::new();
        // Stream after stream until everything is acknowledged.
        for round in 0.. {
            if window.is_empty() || round > script.len() + 1 {
                break;
            }
            let mut stream: Vec<Bytes> = window
                .from(window.acked())
                .map(|(_, r)| r.clone())
                .collect();
            seen.extend(stream.iter().cloned());
            match script.get(round).copied() {
                Some(Relay::DropAfter(n)) => stream.truncate(n),
                Some(Relay::Duplicate) if !stream.is_empty() => {
                    let i = rng.random_range(0..stream.len());
                    stream.insert(i, stream[i].clone());
                }
                Some(Relay::Replay) if !seen.is_empty() => {
                    let old = seen[rng.random_range(0..seen.len())].clone();
                    let i = rng.random_range(0..=stream.len());
                    stream.insert(i, old);
                }
                Some(Relay::Reorder) if stream.len() >= 2 => {
                    let i = rng.random_range(0..stream.len() - 1);
                    stream.swap(i, i + 1);
                }
                Some(Relay::Tamper) if !stream.is_empty() => {
                    let i = rng.random_range(0..stream.len());
                    let mut bad = stream[i].to_vec();
                    let last = bad.len() - 1;
                    bad[last] ^= 1;
                    stream[i] = Bytes::from(bad);
                }
                _ => {}
            }
            for record in stream {
                let Ok(Some((header, ct, _))) = decode_record(&record) else {
                    return (delivered, true);
                };
                match rx.check(header.seq) {
                    Verdict::Duplicate => continue,
                    Verdict::Gap => return (delivered, true),
                    Verdict::Deliver => {}
                }
                let mut plain = Vec::new();
                if sb.open_record(7, header.seq, ct, &mut plain).is_err() {
                    return (delivered, true);
                }
                delivered.extend_from_slice(&plain);
                rx.delivered();
            }
            window
                .ack(rx.expected())
                .expect("the receiver never acks the unsent");
        }
        (delivered, false)
    }

    fn relay_action() -> impl Strategy<Value = Relay> {
        prop_oneof![
            (0usize..20).prop_map(Relay::DropAfter),
            Just(Relay::Duplicate),
            Just(Relay::Replay),
            Just(Relay::Reorder),
            Just(Relay::Tamper),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Whatever the relay does, the receiver delivers a prefix of what
        /// was sent, never a byte twice or out of place; and when the relay
        /// only loses records with dropped connections, everything arrives.
        #[test]
        fn exactly_once_in_order_or_detected(
            seed in any::<u64>(),
            messages in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..64), 1..40),
            script in proptest::collection::vec(relay_action(), 0..6),
        ) {
            let sent: Vec<u8> = messages.concat();
            let (delivered, attacked) = simulate(seed, &messages, &script);
            prop_assert!(sent.starts_with(&delivered), "delivered bytes that were not sent in that order");
            let merely_lossy = script.iter().all(|a| matches!(a, Relay::DropAfter(_) | Relay::Duplicate));
            if merely_lossy {
                prop_assert!(!attacked, "a lossy relay must not fail the flow");
            }
            if !attacked {
                prop_assert_eq!(delivered, sent, "not everything arrived");
            }
        }
    }
}
