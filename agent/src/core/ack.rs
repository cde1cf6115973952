//! Acknowledgements a link owes its peer, and when they go out, sans IO.
//!
//! Flows queue cumulative acks ([`AckQueue::queue`]) with how soon the
//! peer needs them ([`AckWhen`]); the relay session that carries the link
//! arms an [`AckTimer`] on each wake-up and flushes every link's queue when
//! [`AckTimer::handle_timeout`] says so.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use comsat_protocol::FlowId;

/// How soon an acknowledgement must reach the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AckWhen {
    /// The peer waits for it (its flow's end, a resend, a replay window
    /// filling up): within the short delay.
    Soon,
    /// It only lets the peer forget records it keeps for a resend: within
    /// the lazy delay, so a chatty flow costs a few control messages a
    /// second, not one per record.
    Lazy,
}

/// The highest acknowledged position per flow, not sent yet.
#[derive(Debug, Default)]
pub(crate) struct AckQueue {
    acks: HashMap<FlowId, u64>,
}

impl AckQueue {
    /// Every record of `flow` below `upto` was delivered; an older
    /// position changes nothing.
    pub(crate) fn queue(&mut self, flow: FlowId, upto: u64) {
        let e = self.acks.entry(flow).or_insert(upto);
        *e = (*e).max(upto);
    }

    /// Takes every pending ack.
    pub(crate) fn drain(&mut self) -> Vec<(FlowId, u64)> {
        self.acks.drain().collect()
    }

    /// Forgets every pending ack (a new session: its flows are new).
    pub(crate) fn clear(&mut self) {
        self.acks.clear();
    }

    /// The pending ack of `flow`.
    #[cfg(test)]
    pub(crate) fn get(&self, flow: FlowId) -> Option<u64> {
        self.acks.get(&flow).copied()
    }
}

/// When the acks of a relay session's links go out.
#[derive(Debug)]
pub(crate) struct AckTimer {
    delay: Duration,
    lazy: Duration,
    soon_due: Option<Instant>,
    lazy_due: Option<Instant>,
}

impl AckTimer {
    /// `delay` lets the acks of a burst of records gather into one
    /// message; `lazy` is the longest wait of an ack nobody waits for.
    pub(crate) fn new(delay: Duration, lazy: Duration) -> Self {
        Self {
            delay,
            lazy,
            soon_due: None,
            lazy_due: None,
        }
    }

    /// An ack was queued `when` at `now`.
    pub(crate) fn on_queued(&mut self, when: AckWhen, now: Instant) {
        match when {
            AckWhen::Soon => {
                self.soon_due.get_or_insert(now + self.delay);
            }
            AckWhen::Lazy => {
                self.lazy_due.get_or_insert(now + self.lazy);
            }
        }
    }

    /// Whether a lazy flush is due (later lazy acks join it).
    pub(crate) fn lazy_armed(&self) -> bool {
        self.lazy_due.is_some()
    }

    /// When [`Self::handle_timeout`] is to be called next.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        match (self.soon_due, self.lazy_due) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// What is due at `now`: `Some` to flush every pending ack, with
    /// whether the lazy timer fired (lazy acks queued from then on arm it
    /// anew).
    pub(crate) fn handle_timeout(&mut self, now: Instant) -> Option<Flush> {
        let soon = self.soon_due.is_some_and(|t| t <= now);
        let lazy = self.lazy_due.is_some_and(|t| t <= now);
        if soon {
            self.soon_due = None;
        }
        if lazy {
            self.lazy_due = None;
        }
        (soon || lazy).then_some(Flush { lazy })
    }
}

/// A flush [`AckTimer::handle_timeout`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Flush {
    /// The lazy timer fired.
    pub(crate) lazy: bool,
}
