//! Which relay of its list a group tries next, and the backoff.

use std::time::Duration;

use crate::core::relay::{Backoff, Next, Outcome, RelayList};

fn next(relay: usize, reset_backoff: bool, wait: bool) -> Next {
    Next {
        relay,
        reset_backoff,
        wait,
    }
}

#[test]
fn a_closed_connection_goes_back_to_the_first_relay_after_a_fresh_backoff() {
    let mut l = RelayList::new(3);
    assert_eq!(l.on_ended(Outcome::Failed), next(1, false, false));
    assert_eq!(l.on_ended(Outcome::Closed), next(0, true, true));
}

#[test]
fn failed_connections_walk_the_list_and_wait_before_starting_over() {
    let mut l = RelayList::new(3);
    let steps: Vec<Next> = (0..4).map(|_| l.on_ended(Outcome::Failed)).collect();
    assert_eq!(
        steps,
        [
            next(1, false, false),
            next(2, false, false),
            next(0, false, true),
            next(1, false, false)
        ]
    );
}

#[test]
fn a_silent_relay_sends_the_group_to_the_next_one_at_once() {
    let mut l = RelayList::new(2);
    assert_eq!(l.on_ended(Outcome::Silent), next(1, true, false));
    let mut alone = RelayList::new(1);
    assert_eq!(
        alone.on_ended(Outcome::Silent),
        next(0, true, true),
        "with one relay it waits and tries it again"
    );
}

#[test]
fn losing_this_machines_network_keeps_the_relay_it_was_on() {
    let mut l = RelayList::new(3);
    assert_eq!(l.on_ended(Outcome::Failed), next(1, false, false));
    l.on_ended(Outcome::Hop);
    assert_eq!(l.hops(), 1);
    // Where silence would move the group on, its own network being down
    // does not: same relay, a fresh backoff, no backoff wait (the caller
    // waits for a route).
    assert_eq!(l.on_ended(Outcome::Offline), next(2, true, false));
    assert_eq!(l.on_ended(Outcome::Offline), next(2, true, false));
    assert_eq!(l.hops(), 0);
}

#[test]
fn hops_without_meeting_a_peer_are_counted_until_a_connection_closes() {
    let mut l = RelayList::new(2);
    assert!(l.can_hop());
    assert_eq!(l.on_ended(Outcome::Hop), next(1, false, false));
    assert_eq!(l.on_ended(Outcome::Hop), next(0, false, false));
    assert_eq!(l.hops(), 2);
    l.on_ended(Outcome::Closed);
    assert_eq!(l.hops(), 0);
    assert!(!RelayList::new(1).can_hop());
}

#[test]
fn draining_relays_move_the_group_on_until_every_relay_drained_then_it_waits() {
    let mut l = RelayList::new(3);
    l.on_ended(Outcome::Hop);
    assert_eq!(l.on_ended(Outcome::Drained), next(2, false, false));
    assert_eq!(l.hops(), 0);
    assert_eq!(l.on_ended(Outcome::Drained), next(0, false, false));
    assert_eq!(
        l.on_ended(Outcome::Drained),
        next(1, false, false),
        "the third drained in a row: it goes on, without resetting the backoff"
    );
    // The count started over: two more drains move on at once.
    assert_eq!(l.on_ended(Outcome::Drained), next(2, false, false));
}

#[test]
fn every_relay_drained_in_a_row_waits_when_back_at_the_first() {
    let mut l = RelayList::new(2);
    assert_eq!(l.on_ended(Outcome::Drained), next(1, false, false));
    assert_eq!(l.on_ended(Outcome::Drained), next(0, false, true));
}

#[test]
fn another_outcome_between_drains_restarts_their_count() {
    let mut l = RelayList::new(2);
    l.on_ended(Outcome::Drained);
    l.on_ended(Outcome::Failed);
    assert_eq!(l.on_ended(Outcome::Drained), next(1, false, false));
}

#[test]
fn the_backoff_doubles_up_to_its_cap_with_full_jitter() {
    let mut b = Backoff::new(Duration::from_millis(50), Duration::from_millis(300));
    let full: Vec<u128> = (0..5).map(|_| b.next_delay(1.0).as_millis()).collect();
    assert_eq!(full, [50, 100, 200, 300, 300]);
    b.reset();
    assert_eq!(b.next_delay(0.0), Duration::ZERO, "anywhere down to none");
    assert_eq!(b.next_delay(0.5), Duration::from_millis(50));
    assert_eq!(b.next_delay(2.0), Duration::from_millis(200), "clamped");
}
