//! One flow's state, both directions, sans IO.
//!
//! [`SendCore`] seals what the local socket gives, keeps every record until
//! the peer acknowledges it and tells the driver what to write on the
//! current stream (from the oldest unacknowledged record on, on a new
//! stream). [`RecvCore`] opens what a stream carries, delivers each record
//! exactly once and in order, and decides when the acknowledgement goes
//! out. [`Delivery`] is a record being handed to the application: it
//! outlives streams. [`Resume`] decides how a flow goes on after a stream
//! ends and when it gives up; [`BulkMeter`] when a flow turns bulk.
//!
//! Call order, sending: [`SendCore::has_room`] before reading the local
//! socket, [`SendCore::push`] what was read (or a `Fin` at its end); on
//! each stream, [`SendCore::cursor`] once, then [`SendCore::poll_transmit`]
//! and write what it returns, again on every push or ack;
//! [`SendCore::on_ack`] for each acknowledgement. Receiving: on each
//! stream [`RecvCore::on_stream`] (an ack to send), then
//! [`RecvCore::handle_record`] for each whole record; what it delivers goes
//! into the [`Delivery`]; once written, [`RecvCore::on_delivered`] says
//! which ack to queue and how soon. The flow is complete when
//! [`SendCore::fin_acked`] and [`RecvCore::fin_delivered`] both hold.
//!
//! Nothing here reads a clock: the time is passed in.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use comsat_protocol::noise::{NoiseError, Opener, Sealer};
use comsat_protocol::record::{RECORD_HEADER_LEN, RecordKind};
use comsat_protocol::resume::{AckError, Reassembly, ReplayWindow, Verdict};

use super::ack::AckWhen;

/// How a flow ended, once it has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum End {
    Running,
    Completed,
    Reset,
}

/// Limits of one flow's buffers.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FlowLimits {
    /// Unacknowledged bytes the sender may hold; when full, the local
    /// socket is not read.
    pub(crate) window: usize,
    /// Bytes delivered before an acknowledgement goes out soon, not lazily.
    pub(crate) ack_bytes: usize,
    /// Records sealed under one key of a flow: a push at a multiple of it
    /// moves to the next key.
    pub(crate) records_per_key: u64,
}

/// What [`SendCore::push`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Pushed {
    pub(crate) seq: u64,
    /// The record is the first under a new key of the flow.
    pub(crate) rekeyed: bool,
}

/// The sending direction of a flow. `P` is what each record holds until
/// acknowledged (the agent keeps its share of the replay budget there).
pub(crate) struct SendCore<P = ()> {
    window: ReplayWindow<P>,
    fin_seq: Option<u64>,
    sealer: Sealer,
    limits: FlowLimits,
}

/// Where one stream stands in the send window: the next record to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Cursor(u64);

impl<P> SendCore<P> {
    pub(crate) fn new(sealer: Sealer, limits: FlowLimits) -> Self {
        Self {
            window: ReplayWindow::default(),
            fin_seq: None,
            sealer,
            limits,
        }
    }

    /// Whether the window has room for another local read.
    pub(crate) fn has_room(&self) -> bool {
        self.window.bytes() < self.limits.window
    }

    #[cfg(test)]
    /// Bytes held until acknowledged.
    pub(crate) fn held(&self) -> usize {
        self.window.bytes()
    }

    /// Seals `record` where it lies as the next record and keeps it until
    /// acknowledged. `record` holds
    /// [`RECORD_PREFIX_LEN`](comsat_protocol::noise::RECORD_PREFIX_LEN)
    /// bytes of room for the header, then the payload. A `Fin` ends what
    /// this side sends.
    pub(crate) fn push(
        &mut self,
        kind: RecordKind,
        mut record: Vec<u8>,
        token: P,
    ) -> Result<Pushed, NoiseError> {
        let seq = self.window.next_seq();
        self.sealer.seal_record_in_place(seq, kind, &mut record)?;
        let rekeyed = seq > 0 && seq.is_multiple_of(self.limits.records_per_key);
        if kind == RecordKind::Fin {
            self.fin_seq = Some(seq);
        }
        self.window.push(Bytes::from(record), token);
        Ok(Pushed { seq, rekeyed })
    }

    /// The peer delivered every record below `upto`: frees them (and their
    /// tokens); how many were freed.
    pub(crate) fn on_ack(&mut self, upto: u64) -> Result<usize, AckError> {
        self.window.ack(upto)
    }

    /// Whether the peer acknowledged this side's `Fin`.
    pub(crate) fn fin_acked(&self) -> bool {
        self.fin_seq.is_some_and(|f| self.window.acked() > f)
    }

    #[cfg(test)]
    /// Whether this side sent its `Fin`.
    pub(crate) fn fin_sent(&self) -> bool {
        self.fin_seq.is_some()
    }

    /// Where a new stream starts: the oldest record not acknowledged.
    pub(crate) fn cursor(&self) -> Cursor {
        Cursor(self.window.acked())
    }

    /// The records to write on the stream at `cursor`, which moves past
    /// them (and past what was acknowledged meanwhile).
    pub(crate) fn poll_transmit(&self, cursor: &mut Cursor) -> Vec<Bytes> {
        let next = cursor.0.max(self.window.acked());
        let batch: Vec<Bytes> = self.window.from(next).map(|(_, r)| r.clone()).collect();
        cursor.0 = next + batch.len() as u64;
        batch
    }

    /// The newest record (a reset, when the flow fails).
    pub(crate) fn last(&self) -> Option<&Bytes> {
        self.window.last()
    }
}

/// Why a received record fails the flow.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RecvError {
    #[error("record failed to decrypt: {0}")]
    Noise(#[from] NoiseError),
    #[error("record {got} out of order (expected {want})")]
    Sequence { want: u64, got: u64 },
    #[error("unexpected {0:?} record")]
    Unexpected(RecordKind),
    #[error("peer reset the flow")]
    PeerReset,
}

/// What to do with a record that [`RecvCore::handle_record`] took.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Received {
    /// Already delivered (a resend after a reconnect): dropped; the ack
    /// goes out again soon, in case the first was lost.
    Duplicate { ack: u64 },
    /// Hand `payload` to the application (see [`Delivery::set`]), then
    /// acknowledge up to `ack`; `fin`: the peer sends no more.
    Deliver {
        payload: BytesMut,
        fin: bool,
        ack: u64,
    },
}

/// The receiving direction of a flow.
pub(crate) struct RecvCore {
    opener: Opener,
    reassembly: Reassembly,
    fin_delivered: bool,
    /// Bytes delivered since the last acknowledgement sent soon.
    unacked: usize,
    ack_bytes: usize,
}

impl RecvCore {
    pub(crate) fn new(opener: Opener, limits: FlowLimits) -> Self {
        Self {
            opener,
            reassembly: Reassembly::default(),
            fin_delivered: false,
            unacked: 0,
            ack_bytes: limits.ack_bytes,
        }
    }

    #[cfg(test)]
    /// The next record to deliver: everything below it was.
    pub(crate) fn expected(&self) -> u64 {
        self.reassembly.expected()
    }

    /// Whether the peer's `Fin` reached the application.
    pub(crate) fn fin_delivered(&self) -> bool {
        self.fin_delivered
    }

    /// The `Open` record (seq 0) was taken before the flow existed
    /// (accepting side): the ack to queue.
    pub(crate) fn opened_by_peer(&mut self) -> (u64, AckWhen) {
        self.reassembly.delivered();
        (self.reassembly.expected(), AckWhen::Lazy)
    }

    /// A new stream carries the flow: an ack to send soon, so the sender,
    /// which resends what it kept, learns what to skip.
    pub(crate) fn on_stream(&self) -> Option<u64> {
        let delivered = self.reassembly.expected();
        (delivered > 0).then_some(delivered)
    }

    /// Takes one whole record (`record`: header and ciphertext, `seq` from
    /// its header), decrypting it where it lies. A delivered record is
    /// this side's from here: it is never delivered twice, even if the
    /// stream dies before it is written.
    pub(crate) fn handle_record(
        &mut self,
        seq: u64,
        mut record: BytesMut,
    ) -> Result<Received, RecvError> {
        match self.reassembly.check(seq) {
            Verdict::Deliver => {}
            Verdict::Duplicate => {
                return Ok(Received::Duplicate {
                    ack: self.reassembly.expected(),
                });
            }
            Verdict::Gap => {
                return Err(RecvError::Sequence {
                    want: self.reassembly.expected(),
                    got: seq,
                });
            }
        }
        let (kind, payload) = self
            .opener
            .open_record_in_place(seq, &mut record[RECORD_HEADER_LEN..])?;
        let fin = match kind {
            RecordKind::Open if seq == 0 => false,
            RecordKind::Data => false,
            RecordKind::Fin => true,
            RecordKind::Reset => return Err(RecvError::PeerReset),
            other => return Err(RecvError::Unexpected(other)),
        };
        let _ = record.split_to(RECORD_HEADER_LEN + payload.start);
        record.truncate(payload.len());
        self.reassembly.delivered();
        Ok(Received::Deliver {
            payload: record,
            fin,
            ack: seq + 1,
        })
    }

    /// A delivery was written to the application (and, with a `Fin`, its
    /// write side shut): the ack to queue, and how soon. Soon at the
    /// peer's `Fin` (its flow ends when acknowledged) and once
    /// [`FlowLimits::ack_bytes`] were delivered since the last soon ack;
    /// lazily otherwise.
    pub(crate) fn on_delivered(&mut self, done: Delivered) -> Option<(u64, AckWhen)> {
        if done.fin {
            self.fin_delivered = true;
        }
        let upto = done.ack?;
        self.unacked += done.len;
        if done.fin || self.unacked >= self.ack_bytes {
            self.unacked = 0;
            Some((upto, AckWhen::Soon))
        } else {
            Some((upto, AckWhen::Lazy))
        }
    }
}

/// A delivery written out (see [`Delivery::complete`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Delivered {
    pub(crate) len: usize,
    pub(crate) fin: bool,
    pub(crate) ack: Option<u64>,
}

/// What the receiving side accepted from the peer but has not finished
/// handing to the application. It outlives streams: a write cut short by a
/// stream failure resumes on the next stream instead of starting over.
#[derive(Debug, Default)]
pub(crate) struct Delivery {
    buf: BytesMut,
    written: usize,
    fin: bool,
    ack: Option<u64>,
}

impl Delivery {
    /// Holds a delivered record until written.
    pub(crate) fn set(&mut self, payload: BytesMut, fin: bool, ack: u64) {
        self.buf = payload;
        self.written = 0;
        self.fin = fin;
        self.ack = Some(ack);
    }

    /// What is still to write.
    pub(crate) fn unwritten(&self) -> &[u8] {
        &self.buf[self.written..]
    }

    /// `n` more bytes were written.
    pub(crate) fn wrote(&mut self, n: usize) {
        self.written = (self.written + n).min(self.buf.len());
    }

    /// Whether a `Fin` waits for the write side to be shut.
    pub(crate) fn fin(&self) -> bool {
        self.fin
    }

    /// Everything was written (and the write side shut at a `Fin`):
    /// empties the delivery and says what it carried.
    pub(crate) fn complete(&mut self) -> Delivered {
        let done = Delivered {
            len: self.buf.len(),
            fin: self.fin,
            ack: self.ack.take(),
        };
        *self = Self::default();
        done
    }
}

/// How a stream of a flow ended, as far as going on is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lost {
    /// The stream or its connection failed.
    Failed,
    /// The connection went silent (idle timeout): it was down for that
    /// long already.
    Silent,
    /// The peer's side (the relay) finished the stream.
    Finished,
}

/// How a stream of a flow ended, as its driver saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StreamEnded {
    /// Lost: a new stream can carry the flow on.
    Lost(Lost),
    /// The peer reset the flow.
    PeerReset,
    /// Anything else (a local error, a bad record, the relay's refusal),
    /// or the flow ended elsewhere.
    Failed,
}

/// What the driver does once a stream ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Then {
    /// The flow is complete: finish the stream.
    Finish,
    /// Go on on the next stream ([`Resume::next`]).
    Next,
    /// The flow fails: reset it, and with `tell_peer` send it a `Reset`
    /// record first.
    Reset { tell_peer: bool },
}

/// How and when the next stream is opened (dialling side).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Next {
    /// At once, not on the link's next epoch.
    pub(crate) now: bool,
    /// It may ride the lane.
    pub(crate) lane: bool,
}

/// Timing of how a flow goes from stream to stream.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ResumeLimits {
    /// How long a flow waits for a new stream before it fails.
    pub(crate) flow_timeout: Duration,
    /// How long a silent connection was down before it was noticed.
    pub(crate) idle_timeout: Duration,
    /// Main streams lost in a row, each soon after it opened, that are
    /// followed by a new one at once.
    pub(crate) quick_retries: u32,
    /// A stream open this long is no longer lost "soon after it opened".
    pub(crate) settled: Duration,
}

/// Where a flow stands between streams.
#[derive(Debug)]
pub(crate) struct Resume {
    limits: ResumeLimits,
    /// Since when the flow has had no stream.
    outage: Option<Instant>,
    /// The next stream resumes the flow (it had one before).
    resumed: bool,
    next: Next,
    quick: u32,
    opened: Instant,
}

impl Resume {
    pub(crate) fn new(limits: ResumeLimits, now: Instant) -> Self {
        Self {
            limits,
            outage: None,
            resumed: false,
            next: Next {
                now: false,
                lane: true,
            },
            quick: 0,
            opened: now,
        }
    }

    /// How the next stream is to be opened.
    pub(crate) fn next(&self) -> Next {
        self.next
    }

    /// When the flow gives up waiting for a stream (the outage starts now
    /// if it had not).
    pub(crate) fn deadline(&mut self, now: Instant) -> Instant {
        *self.outage.get_or_insert(now) + self.limits.flow_timeout
    }

    /// A stream carries the flow from `now`: whether it resumes it.
    pub(crate) fn on_stream(&mut self, now: Instant) -> bool {
        if now.saturating_duration_since(self.opened) > self.limits.settled {
            self.quick = 0;
        }
        self.opened = now;
        std::mem::take(&mut self.resumed)
    }

    /// The flow leaves its stream for another at once (it turned bulk, or
    /// a lane came up).
    pub(crate) fn on_move(&mut self, now: Instant) {
        self.next = Next {
            now: true,
            lane: true,
        };
        self.outage = Some(now);
    }

    /// A stream (`on_lane` or not) ended `how` while the flow stood at
    /// `end`; whether the peer's `Fin` was delivered. A complete flow
    /// finishes; a running one whose stream was lost goes on on the next
    /// ([`Self::on_lost`]); anything else fails the flow, telling the peer
    /// unless it reset the flow itself.
    pub(crate) fn on_stream_end(
        &mut self,
        end: End,
        how: StreamEnded,
        on_lane: bool,
        peer_done: bool,
        now: Instant,
    ) -> Then {
        match (end, how) {
            (End::Completed, _) => Then::Finish,
            (End::Running, StreamEnded::Lost(lost)) => {
                self.on_lost(lost, on_lane, peer_done, now);
                Then::Next
            }
            (_, how) => Then::Reset {
                tell_peer: how != StreamEnded::PeerReset,
            },
        }
    }

    /// The stream (`on_lane` or not) was lost, the flow goes on; whether
    /// the peer's `Fin` was delivered. A lost lane stream goes on on the
    /// main connection at once; so does a lost main one, a few times in a
    /// row; then the dialer waits for the link to be ready anew. A stream
    /// the relay finished after the peer's `Fin` ended because the peer is
    /// done: no hurry.
    pub(crate) fn on_lost(&mut self, how: Lost, on_lane: bool, peer_done: bool, now: Instant) {
        self.resumed = true;
        let began = match how {
            Lost::Silent => now.checked_sub(self.limits.idle_timeout).unwrap_or(now),
            Lost::Failed | Lost::Finished => now,
        };
        self.outage = Some(began);
        self.next = Next {
            now: (how != Lost::Finished || !peer_done)
                && (on_lane || self.quick < self.limits.quick_retries),
            lane: !on_lane,
        };
        if !on_lane {
            self.quick += 1;
        }
    }
}

/// Counts the bytes a flow carries, both ways, to tell when it turns bulk:
/// more than `threshold` within one `window`.
#[derive(Debug)]
pub(crate) struct BulkMeter {
    threshold: u64,
    window: Duration,
    since: Instant,
    bytes: u64,
    bulk: bool,
}

impl BulkMeter {
    pub(crate) fn new(threshold: u64, window: Duration, now: Instant) -> Self {
        Self {
            threshold,
            window,
            since: now,
            bytes: 0,
            bulk: false,
        }
    }

    #[cfg(test)]
    /// Whether the flow turned bulk (it stays so).
    pub(crate) fn is_bulk(&self) -> bool {
        self.bulk
    }

    /// Counts `n` bytes carried at `now`; true when this turns the flow
    /// bulk.
    pub(crate) fn count(&mut self, n: usize, now: Instant) -> bool {
        if self.bulk {
            return false;
        }
        if now.saturating_duration_since(self.since) > self.window {
            self.since = now;
            self.bytes = 0;
        }
        self.bytes += n as u64;
        if self.bytes > self.threshold {
            self.bulk = true;
            return true;
        }
        false
    }
}

/// Whether a flow is complete: both sides' `Fin`s were delivered, this
/// side's acknowledged.
pub(crate) fn completed<P>(tx: &SendCore<P>, rx: &RecvCore) -> bool {
    tx.fin_acked() && rx.fin_delivered()
}
