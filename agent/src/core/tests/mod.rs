//! The cores under a virtual clock: time is an `Instant` advanced by hand;
//! nothing sleeps or touches a socket.

use std::time::{Duration, Instant};

mod ack;
mod flow;
mod link;
mod relay;
mod resume;
mod silence;
mod udp;

/// A hand-driven clock.
struct Clock(Instant);

impl Clock {
    fn new() -> Self {
        Self(Instant::now())
    }

    fn now(&self) -> Instant {
        self.0
    }

    fn advance(&mut self, by: Duration) -> Instant {
        self.0 += by;
        self.0
    }
}
