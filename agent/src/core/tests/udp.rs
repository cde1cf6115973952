//! UDP flows: one per source address, a cap per link, and conntrack's two
//! idle timeouts.

use std::net::SocketAddr;
use std::time::Duration;

use super::Clock;
use crate::core::udp::{Flows, Full, Idle, Sources};

const IDLE: Idle = Idle {
    unreplied: Duration::from_secs(30),
    replied: Duration::from_secs(120),
};

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[test]
fn each_source_address_is_a_flow_of_its_own() {
    let clock = Clock::new();
    let mut s = Sources::new(8, IDLE);
    let (a, new_a) = s.outbound(addr(1000), clock.now()).expect("room");
    let (b, new_b) = s.outbound(addr(1001), clock.now()).expect("room");
    let (a2, new_a2) = s.outbound(addr(1000), clock.now()).expect("room");
    assert!(new_a && new_b && !new_a2);
    assert_eq!(a, a2);
    assert_ne!(a, b);
    assert_eq!(s.inbound(a, clock.now()), Some(addr(1000)));
    assert_eq!(s.inbound(b, clock.now()), Some(addr(1001)));
    assert_eq!(s.inbound(b + 1, clock.now()), None, "a flow never started");
    assert_eq!(s.len(), 2);
}

#[test]
fn an_unanswered_flow_goes_after_the_short_timeout_an_answered_one_after_the_long() {
    let mut clock = Clock::new();
    let mut s = Sources::new(8, IDLE);
    let (quiet, _) = s.outbound(addr(1), clock.now()).expect("room");
    let (answered, _) = s.outbound(addr(2), clock.now()).expect("room");
    s.inbound(answered, clock.now()).expect("alive");

    let now = clock.advance(Duration::from_secs(30));
    assert_eq!(s.expire(now), 0, "not past the timeout yet");
    let now = clock.advance(Duration::from_millis(1));
    assert_eq!(s.expire(now), 1);
    assert_eq!(s.inbound(quiet, now), None, "the unanswered flow is gone");
    assert_eq!(s.inbound(answered, now), Some(addr(2)));

    // Traffic keeps a flow alive; silence past 120 s ends it.
    let now = clock.advance(Duration::from_secs(100));
    s.outbound(addr(2), now).expect("room");
    let now = clock.advance(Duration::from_secs(110));
    assert_eq!(s.expire(now), 0);
    let now = clock.advance(Duration::from_secs(11));
    assert_eq!(s.expire(now), 1);
    assert_eq!(s.len(), 0);

    // The same source later is a new flow, with a new number.
    let (again, new) = s.outbound(addr(2), now).expect("room");
    assert!(new);
    assert_ne!(again, answered);
}

#[test]
fn a_link_holds_at_most_its_flows_and_has_room_again_once_one_expires() {
    let mut clock = Clock::new();
    let mut s = Sources::new(2, IDLE);
    s.outbound(addr(1), clock.now()).expect("room");
    s.outbound(addr(2), clock.now()).expect("room");
    assert_eq!(s.outbound(addr(3), clock.now()), Err(Full));
    // Flows that exist go on.
    assert!(s.outbound(addr(1), clock.now()).is_ok());
    let now = clock.advance(Duration::from_secs(31));
    assert_eq!(s.expire(now), 2);
    assert!(s.outbound(addr(3), now).is_ok());
}

#[test]
fn numbers_wrap_around_without_taking_one_in_use() {
    let clock = Clock::new();
    let mut s = Sources::new(8, IDLE);
    // Numbers 0 and 1 stay in use while the counter goes round.
    assert_eq!(s.outbound(addr(1), clock.now()), Ok((0, true)));
    assert_eq!(s.outbound(addr(2), clock.now()), Ok((1, true)));
    s.set_next(u32::MAX);
    assert_eq!(s.outbound(addr(3), clock.now()), Ok((u32::MAX, true)));
    assert_eq!(s.outbound(addr(4), clock.now()), Ok((2, true)));
    assert_eq!(s.inbound(0, clock.now()), Some(addr(1)));
}

#[test]
fn the_target_side_starts_flows_the_peer_names_and_forgets_them_alike() {
    let mut clock = Clock::new();
    let mut f: Flows<&str> = Flows::new(1, IDLE);
    assert_eq!(f.touch(7, clock.now()), None);
    assert_eq!(f.start(7, "socket 7", clock.now()), Ok(&"socket 7"));
    assert_eq!(f.start(8, "socket 8", clock.now()), Err(Full));
    assert_eq!(f.reply(7, clock.now()), Some(&"socket 7"));
    let now = clock.advance(Duration::from_secs(119));
    assert!(f.expire(now).is_empty(), "answered: the long timeout");
    let now = clock.advance(Duration::from_secs(2));
    assert_eq!(f.expire(now), vec![(7, "socket 7")]);
    assert_eq!(f.clear(), Vec::<&str>::new());
}
