//! Going from stream to stream, and turning bulk.

use std::time::Duration;

use super::Clock;
use crate::core::flow::{BulkMeter, End, Lost, Next, Resume, ResumeLimits, StreamEnded, Then};

// ---- going from stream to stream (Resume) ----

const RESUME: ResumeLimits = ResumeLimits {
    flow_timeout: Duration::from_secs(30),
    idle_timeout: Duration::from_secs(5),
    quick_retries: 3,
    settled: Duration::from_secs(1),
};

#[test]
fn the_flow_gives_up_a_flow_timeout_after_its_outage_began() {
    let mut clock = Clock::new();
    let mut r = Resume::new(RESUME, clock.now());
    let start = clock.now();
    assert_eq!(r.deadline(start), start + RESUME.flow_timeout);
    // Asking again later does not move the deadline.
    let later = clock.advance(Duration::from_secs(10));
    assert_eq!(r.deadline(later), start + RESUME.flow_timeout);
}

#[test]
fn a_silent_connection_counts_the_outage_from_its_idle_timeout_ago() {
    let mut clock = Clock::new();
    let mut r = Resume::new(RESUME, clock.now());
    r.on_stream(clock.now());
    let t = clock.advance(Duration::from_secs(20));
    r.on_lost(Lost::Silent, false, false, t);
    assert_eq!(r.deadline(t), t - RESUME.idle_timeout + RESUME.flow_timeout);
    let t = clock.advance(Duration::from_secs(1));
    r.on_stream(t);
    let t = clock.advance(Duration::from_secs(5));
    r.on_lost(Lost::Failed, false, false, t);
    assert_eq!(r.deadline(t), t + RESUME.flow_timeout);
}

#[test]
fn a_lost_lane_stream_goes_on_at_once_on_the_main_connection() {
    let clock = Clock::new();
    let mut r = Resume::new(RESUME, clock.now());
    assert_eq!(
        r.next(),
        Next {
            now: false,
            lane: true
        }
    );
    r.on_stream(clock.now());
    r.on_lost(Lost::Failed, true, false, clock.now());
    assert_eq!(
        r.next(),
        Next {
            now: true,
            lane: false
        }
    );
}

#[test]
fn a_main_stream_lost_soon_after_opening_retries_at_once_only_a_few_times() {
    let mut clock = Clock::new();
    let mut r = Resume::new(RESUME, clock.now());
    let mut at_once = Vec::new();
    for _ in 0..5 {
        let t = clock.advance(Duration::from_millis(100));
        r.on_stream(t);
        let t = clock.advance(Duration::from_millis(100));
        r.on_lost(Lost::Failed, false, false, t);
        at_once.push(r.next().now);
        assert!(r.next().lane, "a lost main stream may try the lane");
    }
    assert_eq!(at_once, [true, true, true, false, false]);
}

#[test]
fn a_stream_that_settled_restarts_the_count_of_quick_losses() {
    let mut clock = Clock::new();
    let mut r = Resume::new(RESUME, clock.now());
    for _ in 0..4 {
        r.on_stream(clock.advance(Duration::from_millis(10)));
        r.on_lost(
            Lost::Failed,
            false,
            false,
            clock.advance(Duration::from_millis(10)),
        );
    }
    assert!(!r.next().now, "four quick losses: wait for the link");
    r.on_stream(clock.advance(Duration::from_millis(10)));
    // This stream lives past `settled`; the next one opens, and is lost.
    r.on_stream(clock.advance(Duration::from_secs(2)));
    r.on_lost(
        Lost::Failed,
        false,
        false,
        clock.advance(Duration::from_millis(10)),
    );
    assert!(r.next().now, "the count started over");
}

#[test]
fn a_stream_finished_after_the_peers_fin_waits_for_the_link() {
    let clock = Clock::new();
    let mut r = Resume::new(RESUME, clock.now());
    r.on_stream(clock.now());
    r.on_lost(Lost::Finished, true, true, clock.now());
    assert!(!r.next().now, "the peer is done: no hurry");
    r.on_stream(clock.now());
    r.on_lost(Lost::Finished, true, false, clock.now());
    assert!(
        r.next().now,
        "finished before the peer's Fin: the relay ended it"
    );
}

#[test]
fn a_move_opens_the_next_stream_at_once_and_may_take_the_lane() {
    let mut clock = Clock::new();
    let mut r = Resume::new(RESUME, clock.now());
    r.on_stream(clock.now());
    r.on_lost(Lost::Failed, true, false, clock.now());
    assert!(!r.next().lane);
    let t = clock.advance(Duration::from_secs(3));
    r.on_move(t);
    assert_eq!(
        r.next(),
        Next {
            now: true,
            lane: true
        }
    );
    assert_eq!(r.deadline(t), t + RESUME.flow_timeout);
}

#[test]
fn only_the_first_stream_after_a_loss_counts_as_a_resume() {
    let clock = Clock::new();
    let mut r = Resume::new(RESUME, clock.now());
    assert!(
        !r.on_stream(clock.now()),
        "the first stream resumes nothing"
    );
    r.on_lost(Lost::Failed, false, false, clock.now());
    assert!(r.on_stream(clock.now()));
    r.on_move(clock.now());
    assert!(!r.on_stream(clock.now()), "a move is not a resume");
}

#[test]
fn a_complete_flow_finishes_its_stream_whatever_ended_it() {
    let clock = Clock::new();
    let mut r = Resume::new(RESUME, clock.now());
    for how in [
        StreamEnded::Failed,
        StreamEnded::PeerReset,
        StreamEnded::Lost(Lost::Finished),
    ] {
        assert_eq!(
            r.on_stream_end(End::Completed, how, false, true, clock.now()),
            Then::Finish
        );
    }
}

#[test]
fn a_running_flow_whose_stream_was_lost_goes_on_on_the_next() {
    let clock = Clock::new();
    let mut r = Resume::new(RESUME, clock.now());
    r.on_stream(clock.now());
    let then = r.on_stream_end(
        End::Running,
        StreamEnded::Lost(Lost::Failed),
        true,
        false,
        clock.now(),
    );
    assert_eq!(then, Then::Next);
    assert_eq!(
        r.next(),
        Next {
            now: true,
            lane: false
        }
    );
    assert!(r.on_stream(clock.now()), "the next stream resumes the flow");
}

#[test]
fn a_failed_stream_resets_the_flow_and_tells_the_peer_unless_it_reset_first() {
    let clock = Clock::new();
    let mut r = Resume::new(RESUME, clock.now());
    assert_eq!(
        r.on_stream_end(End::Running, StreamEnded::Failed, false, false, clock.now()),
        Then::Reset { tell_peer: true }
    );
    assert_eq!(
        r.on_stream_end(
            End::Running,
            StreamEnded::PeerReset,
            false,
            false,
            clock.now()
        ),
        Then::Reset { tell_peer: false }
    );
    assert_eq!(
        r.on_stream_end(
            End::Reset,
            StreamEnded::Lost(Lost::Silent),
            false,
            false,
            clock.now()
        ),
        Then::Reset { tell_peer: true },
        "a flow reset elsewhere does not resume"
    );
}

// ---- turning bulk ----

#[test]
fn a_flow_turns_bulk_when_it_carries_more_than_the_threshold_in_a_window() {
    let mut clock = Clock::new();
    let mut m = BulkMeter::new(1000, Duration::from_millis(250), clock.now());
    assert!(!m.count(600, clock.advance(Duration::from_millis(50))));
    assert!(!m.count(400, clock.advance(Duration::from_millis(50))));
    assert!(m.count(1, clock.advance(Duration::from_millis(50))));
    assert!(m.is_bulk());
}

#[test]
fn bytes_spread_over_windows_never_turn_a_flow_bulk() {
    let mut clock = Clock::new();
    let mut m = BulkMeter::new(1000, Duration::from_millis(250), clock.now());
    for _ in 0..20 {
        assert!(!m.count(600, clock.advance(Duration::from_millis(300))));
    }
    assert!(!m.is_bulk());
}

#[test]
fn a_flow_turns_bulk_once_and_stays_so() {
    let mut clock = Clock::new();
    let mut m = BulkMeter::new(10, Duration::from_millis(250), clock.now());
    assert!(m.count(11, clock.now()));
    assert!(!m.count(11, clock.advance(Duration::from_secs(10))));
    assert!(m.is_bulk());
}
