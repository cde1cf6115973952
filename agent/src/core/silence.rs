//! Noticing a relay that stopped answering, sans IO: the driver samples
//! its QUIC connection's counters now and then, and the watchdog says when
//! the relay has left something unanswered for too long.
//!
//! A QUIC idle timeout notices a dead relay only after a long silence, and
//! an idle budget wants that timeout long (keep-alives are what it costs).
//! The watchdog looks instead at what waits for an answer: a packet that
//! carries data (or any frame the relay must acknowledge) is answered
//! within a round trip or two by a live relay; a relay that sent nothing at
//! all for many round trips since is gone, or unreachable, even if the idle
//! timeout is far away. Pure acknowledgements are never counted: they need
//! no answer. A keep-alive ping is only a probe, so an unanswered one is
//! given longer (a relay busy for a moment must not send a fleet
//! reconnecting at once).

use std::time::{Duration, Instant};

/// One sample of a connection's counters (cumulative since it opened).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Sample {
    /// UDP datagrams received from the relay.
    pub(crate) received: u64,
    /// Frames sent that the relay must acknowledge, keep-alive pings aside
    /// (stream data, flow control, resets).
    pub(crate) sent: u64,
    /// Keep-alive pings sent.
    pub(crate) pings: u64,
    /// The smoothed round-trip time.
    pub(crate) rtt: Duration,
}

/// How long the relay may leave sends unanswered.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bounds {
    /// At least this long when data waits.
    pub(crate) data: Duration,
    /// At least this long when only a keep-alive waits.
    pub(crate) ping: Duration,
    /// And at least this many round trips, either way.
    pub(crate) rtts: u32,
    /// And at most this long, however long the round trips grew: a
    /// smoothed round-trip time swollen by queues before the relay
    /// vanished must not stretch the wait to the idle timeout.
    pub(crate) most: Duration,
}

/// What is waiting for the relay to answer, and since when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Waiting {
    since: Instant,
    data: bool,
}

/// The watchdog of one relay connection.
#[derive(Debug)]
pub(crate) struct Silence {
    bounds: Bounds,
    last: Sample,
    waiting: Option<Waiting>,
}

impl Silence {
    /// A watchdog of a connection whose counters read `first` now.
    pub(crate) fn new(bounds: Bounds, first: Sample) -> Self {
        Self {
            bounds,
            last: first,
            waiting: None,
        }
    }

    /// Takes the counters as they read at `now`; `Some(how long)` once the
    /// relay has left a send unanswered for longer than the bounds allow
    /// (how long: since the first such send was seen).
    ///
    /// A sample that saw the relay answer clears the wait, even if it saw
    /// sends too: the answer may have come after them, and on a quiet
    /// connection nothing else would ever come to clear it. A relay that
    /// vanished leaves the sends of the next samples unanswered (QUIC
    /// probes for what it did not acknowledge), so it is noticed a sample
    /// later.
    pub(crate) fn on_sample(&mut self, now: Instant, s: Sample) -> Option<Duration> {
        let heard = s.received > self.last.received;
        let data = s.sent > self.last.sent;
        let ping = s.pings > self.last.pings;
        self.last = s;
        if heard {
            self.waiting = None;
        } else if data || ping {
            let w = self.waiting.get_or_insert(Waiting { since: now, data });
            w.data |= data;
        }
        let w = self.waiting?;
        let floor = if w.data {
            self.bounds.data
        } else {
            self.bounds.ping
        };
        let stretched = s.rtt.saturating_mul(self.bounds.rtts).min(self.bounds.most);
        let bound = floor.max(stretched);
        let silent = now.saturating_duration_since(w.since);
        (silent > bound).then_some(silent)
    }
}
