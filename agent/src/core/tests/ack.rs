//! Which acks a relay session owes, and when they go out.

use std::time::Duration;

use super::Clock;
use crate::core::ack::{AckQueue, AckTimer, AckWhen, Flush};

// ---- lazy acknowledgements: the delay triggers ----

#[test]
fn the_ack_queue_keeps_the_highest_position_per_flow() {
    let mut q = AckQueue::default();
    q.queue(1, 5);
    q.queue(1, 3);
    q.queue(2, 1);
    q.queue(1, 7);
    assert_eq!(q.get(1), Some(7));
    let mut all = q.drain();
    all.sort_unstable();
    assert_eq!(all, [(1, 7), (2, 1)]);
    assert!(q.drain().is_empty());
    q.queue(3, 1);
    q.clear();
    assert_eq!(q.get(3), None);
}

const DELAY: Duration = Duration::from_millis(2);
const LAZY: Duration = Duration::from_millis(100);

#[test]
fn nothing_is_due_before_an_ack_is_queued() {
    let clock = Clock::new();
    let mut t = AckTimer::new(DELAY, LAZY);
    assert_eq!(t.poll_timeout(), None);
    assert_eq!(t.handle_timeout(clock.now()), None);
}

#[test]
fn a_soon_ack_goes_out_after_the_short_delay() {
    let mut clock = Clock::new();
    let mut t = AckTimer::new(DELAY, LAZY);
    t.on_queued(AckWhen::Soon, clock.now());
    assert_eq!(t.poll_timeout(), Some(clock.now() + DELAY));
    assert_eq!(
        t.handle_timeout(clock.advance(Duration::from_millis(1))),
        None
    );
    assert_eq!(
        t.handle_timeout(clock.advance(Duration::from_millis(1))),
        Some(Flush { lazy: false })
    );
    assert_eq!(t.poll_timeout(), None);
}

#[test]
fn a_burst_of_soon_acks_goes_out_in_one_flush() {
    let mut clock = Clock::new();
    let mut t = AckTimer::new(DELAY, LAZY);
    let first = clock.now();
    for _ in 0..5 {
        t.on_queued(AckWhen::Soon, clock.advance(Duration::from_micros(300)));
    }
    assert_eq!(
        t.poll_timeout(),
        Some(first + Duration::from_micros(300) + DELAY)
    );
    assert!(t.handle_timeout(first + DELAY * 2).is_some());
    assert_eq!(t.handle_timeout(first + DELAY * 3), None, "one flush only");
}

#[test]
fn a_lazy_ack_waits_for_the_lazy_delay() {
    let mut clock = Clock::new();
    let mut t = AckTimer::new(DELAY, LAZY);
    t.on_queued(AckWhen::Lazy, clock.now());
    assert!(t.lazy_armed());
    assert_eq!(
        t.handle_timeout(clock.advance(Duration::from_millis(99))),
        None
    );
    assert_eq!(
        t.handle_timeout(clock.advance(Duration::from_millis(1))),
        Some(Flush { lazy: true })
    );
    assert!(!t.lazy_armed(), "the next lazy ack arms anew");
}

#[test]
fn later_lazy_acks_join_the_armed_flush_without_delaying_it() {
    let mut clock = Clock::new();
    let mut t = AckTimer::new(DELAY, LAZY);
    let first = clock.now();
    t.on_queued(AckWhen::Lazy, first);
    t.on_queued(AckWhen::Lazy, clock.advance(Duration::from_millis(60)));
    assert_eq!(t.poll_timeout(), Some(first + LAZY));
}

#[test]
fn a_soon_ack_goes_out_before_a_pending_lazy_flush() {
    let mut clock = Clock::new();
    let mut t = AckTimer::new(DELAY, LAZY);
    let start = clock.now();
    t.on_queued(AckWhen::Lazy, start);
    let soon = clock.advance(Duration::from_millis(10));
    t.on_queued(AckWhen::Soon, soon);
    assert_eq!(t.poll_timeout(), Some(soon + DELAY));
    assert_eq!(t.handle_timeout(soon + DELAY), Some(Flush { lazy: false }));
    assert!(t.lazy_armed(), "the lazy deadline stays");
    assert_eq!(t.poll_timeout(), Some(start + LAZY));
    assert_eq!(t.handle_timeout(start + LAZY), Some(Flush { lazy: true }));
}
