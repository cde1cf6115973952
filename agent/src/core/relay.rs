//! Which relay of its list a group of links tries next, and how long it
//! waits first, sans IO (the jitter is passed in).

use std::time::Duration;

/// Exponential backoff with full jitter: each delay is drawn anywhere
/// below a bound that doubles up to the cap, which spreads a fleet's
/// retries better than a jitter around the bound (the tries of agents that
/// failed together do not stay together).
#[derive(Debug)]
pub struct Backoff {
    initial: Duration,
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// Starts at `initial`, up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            next: initial,
            max,
        }
    }

    /// Starts over at the initial delay (the connection had worked).
    pub fn reset(&mut self) {
        self.next = self.initial;
    }

    /// A delay in [0, d] (`jitter` in [0, 1] picks where), then doubles
    /// d up to the cap.
    pub fn next_delay(&mut self, jitter: f64) -> Duration {
        let d = self.next;
        self.next = (d * 2).min(self.max);
        d.mul_f64(jitter.clamp(0.0, 1.0))
    }
}

/// How a relay connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// It closed or failed after it was established.
    Closed,
    /// The relay went silent (idle timeout): it is probably gone.
    Silent,
    /// Every link's peer stayed away.
    Hop,
    /// The relay is draining and told us to go (the peers were told the
    /// same).
    Drained,
    /// It was never established.
    Failed,
    /// It went silent, or could not be established, while this machine
    /// had no route toward the relay: its own network is down, not the
    /// relay. The peers are still there; the group waits for a route and
    /// goes back to the same relay.
    Offline,
}

/// What the group does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Next {
    /// The relay of the list to try.
    pub(crate) relay: usize,
    /// Start the backoff over first (the connection had worked).
    pub(crate) reset_backoff: bool,
    /// Wait for the backoff's next delay first.
    pub(crate) wait: bool,
}

/// Where a group of links stands in its relay list.
#[derive(Debug)]
pub(crate) struct RelayList {
    len: usize,
    current: usize,
    /// Hops in a row without meeting a peer: each doubles the dwell.
    hops: u32,
    /// Relays in a row that told us to go away: once every relay of the
    /// list has, wait (with backoff) before trying them again.
    drained: usize,
}

impl RelayList {
    /// A list of `len` relays (at least one); the first is tried first.
    pub(crate) fn new(len: usize) -> Self {
        Self {
            len: len.max(1),
            current: 0,
            hops: 0,
            drained: 0,
        }
    }

    /// The relay to try now.
    pub(crate) fn current(&self) -> usize {
        self.current
    }

    /// Hops in a row without meeting a peer.
    pub(crate) fn hops(&self) -> u32 {
        self.hops
    }

    /// Whether the group may hop to another relay at all.
    pub(crate) fn can_hop(&self) -> bool {
        self.len > 1
    }

    fn advance(&mut self) -> usize {
        self.current = (self.current + 1) % self.len;
        self.current
    }

    /// The connection to the current relay ended so: which relay is next.
    /// A draining relay sends the group to the next one at once, unless
    /// every relay of the list drained in a row; a relay without peers
    /// too; a silent one (probably gone) as well, where there is another;
    /// one that closed sends it back to the first; a failed connection on
    /// to the next. Coming back to the first relay waits for the backoff.
    /// Losing this machine's own network keeps the relay it was on (the
    /// caller waits for a route instead of the backoff).
    pub(crate) fn on_ended(&mut self, how: Outcome) -> Next {
        if how != Outcome::Drained {
            self.drained = 0;
        }
        let mut reset_backoff = false;
        match how {
            Outcome::Drained => {
                self.drained += 1;
                let relay = self.advance();
                if self.drained < self.len {
                    self.hops = 0;
                    return self.go(relay, false, false);
                }
                self.drained = 0;
            }
            Outcome::Hop => {
                self.hops = self.hops.saturating_add(1);
                let relay = self.advance();
                return self.go(relay, false, false);
            }
            Outcome::Silent if self.len > 1 => {
                self.hops = 0;
                let relay = self.advance();
                return self.go(relay, true, false);
            }
            Outcome::Closed | Outcome::Silent => {
                reset_backoff = true;
                self.hops = 0;
                self.current = 0;
            }
            Outcome::Failed => {
                self.advance();
            }
            Outcome::Offline => {
                self.hops = 0;
                return self.go(self.current, true, false);
            }
        }
        let relay = self.current;
        self.go(relay, reset_backoff, relay == 0)
    }

    fn go(&self, relay: usize, reset_backoff: bool, wait: bool) -> Next {
        Next {
            relay,
            reset_backoff,
            wait,
        }
    }
}
