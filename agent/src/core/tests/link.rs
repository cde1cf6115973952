//! The link core: flow ids, anti-replay, forgeries, handshake candidates
//! and confirmation, resume and renewal, reattach and hop decisions.

use std::time::Duration;

use comsat_protocol::limits::MAX_FLOW_ID;
use comsat_protocol::record::split_flow_id;
use comsat_protocol::{LinkId, Side};

use super::Clock;
use crate::core::link::{
    Candidates, ControlReplay, Establish, Forgeries, Idle, NewFlow, Pending, Presence, Reattach,
    SessionState, flow_id,
};

const RETRY: Duration = Duration::from_secs(2);

fn ids(side: Side, base: u64, per_generation: u64, n: std::ops::Range<u64>) -> Vec<NewFlow> {
    n.map(|n| flow_id(n, base, per_generation, side).expect("an id"))
        .collect()
}

// ---- flow id allocation ----

#[test]
fn side_a_opens_odd_flow_ids_and_side_b_even_ones() {
    let a: Vec<u32> = ids(Side::A, 0, 100, 0..4).iter().map(|f| f.id).collect();
    let b: Vec<u32> = ids(Side::B, 0, 100, 0..4).iter().map(|f| f.id).collect();
    assert_eq!(a, [1, 3, 5, 7]);
    assert_eq!(b, [2, 4, 6, 8]);
}

#[test]
fn used_up_flow_ids_start_a_new_generation_under_new_keys() {
    let flows = ids(Side::A, 0, 3, 0..7);
    let generations: Vec<u32> = flows.iter().map(|f| f.generation).collect();
    assert_eq!(generations, [0, 0, 0, 1, 1, 1, 2]);
    let new: Vec<bool> = flows.iter().map(|f| f.new_generation).collect();
    assert_eq!(new, [false, false, false, true, false, false, true]);
    // The same ids again, told apart by their generation tag.
    assert_eq!(split_flow_id(flows[3].id), (1, 1));
    assert_eq!(split_flow_id(flows[0].id), (0, 1));
}

#[test]
fn a_new_session_counts_its_generations_from_its_first_flow() {
    // Ids go on counting across sessions; generations start again.
    let f = flow_id(10, 10, 4, Side::B).expect("an id");
    assert_eq!(f.generation, 0);
    assert!(!f.new_generation);
    assert_eq!(split_flow_id(f.id).1, 2 * (10 % 4) + 2);
    let f = flow_id(14, 10, 4, Side::B).expect("an id");
    assert_eq!((f.generation, f.new_generation), (1, true));
}

#[test]
fn flow_ids_run_out_below_the_nonce_limit() {
    let per_generation = u64::from(MAX_FLOW_ID);
    let last = (u64::from(MAX_FLOW_ID) - 2) / 2;
    assert!(flow_id(last, 0, per_generation, Side::A).is_some());
    assert_eq!(flow_id(last + 1, 0, per_generation, Side::A), None);
}

// ---- sealed link control: anti-replay and forgeries ----

#[test]
fn a_control_sequence_number_not_above_the_last_is_a_replay() {
    let mut r = ControlReplay::default();
    assert!(r.fresh(0), "the first one is fresh");
    r.accept(5);
    assert!(!r.fresh(5));
    assert!(!r.fresh(3));
    assert!(r.fresh(6));
    assert!(r.fresh(1000), "gaps are allowed: the relay may drop some");
}

#[test]
fn forgeries_renew_the_session_exactly_once_at_the_limit() {
    let mut f = Forgeries::default();
    let renewals: Vec<bool> = (0..6).map(|_| f.count(4)).collect();
    assert_eq!(renewals, [false, false, false, true, false, false]);
    assert_eq!(f.get(), 6);
}

// ---- handshake candidates (side B) ----

#[test]
fn answered_handshakes_beyond_the_cap_drop_the_oldest() {
    let mut c = Candidates::new(2);
    assert!(!c.propose(1));
    assert!(!c.propose(2));
    assert!(c.propose(3), "the oldest, never confirmed, goes");
    assert_eq!(c.len(), 2);
    assert_eq!(c.newest_first().copied().collect::<Vec<_>>(), [3, 2]);
}

#[test]
fn confirming_a_candidate_takes_it_and_forgets_the_others() {
    let mut c = Candidates::new(4);
    for i in 1..=3 {
        c.propose(i);
    }
    assert_eq!(c.confirm(|x| *x == 2), Some((2, 2)));
    assert_eq!(c.len(), 0);
}

#[test]
fn a_candidate_nobody_holds_confirms_nothing() {
    let mut c = Candidates::new(4);
    c.propose(1);
    assert_eq!(c.confirm(|x| *x == 9), None);
    assert_eq!(c.len(), 1, "the answered handshake stays");
}

// ---- resume, handshake and renewal decisions ----

#[test]
fn side_a_asks_a_returning_peer_to_resume_the_session_it_holds() {
    let clock = Clock::new();
    let mut s = SessionState::new(Side::A, RETRY);
    s.on_installed();
    assert_eq!(
        s.on_peer_present(true, clock.now()),
        Some(Establish::Resume)
    );
    assert!(!s.peer_confirmed(), "not until the peer answers");
    assert!(!s.needs_handshake(clock.now()), "a resume is pending");
}

#[test]
fn side_a_without_a_session_starts_a_handshake_when_the_peer_appears() {
    let clock = Clock::new();
    let mut s = SessionState::new(Side::A, RETRY);
    assert_eq!(
        s.on_peer_present(false, clock.now()),
        Some(Establish::Handshake)
    );
}

#[test]
fn side_b_waits_for_side_a_when_the_peer_appears() {
    let clock = Clock::new();
    let mut s = SessionState::new(Side::B, RETRY);
    s.on_installed();
    assert_eq!(s.on_peer_present(true, clock.now()), None);
    assert!(!s.needs_handshake(clock.now()), "side B never initiates");
}

#[test]
fn a_renewal_whose_answer_is_refused_is_tried_again_at_the_next_retry() {
    let clock = Clock::new();
    let mut s = SessionState::new(Side::A, RETRY);
    // A confirmed session meets too many forgeries: side A replaces it.
    s.on_installed();
    s.on_forgeries();
    assert_eq!(s.take_renew(), Some(Establish::Handshake));
    s.on_initiate(clock.now());
    assert!(
        !s.needs_handshake(clock.now()),
        "the old session still counts as confirmed while the new one is on its way"
    );
    // The answer that comes completes none of the handshakes pending (a
    // forgery): a retry starts another, not a wait forever.
    s.on_answer_refused();
    assert!(!s.needs_handshake(clock.now()), "one retry interval first");
    assert!(s.needs_handshake(clock.now() + RETRY));
}

#[test]
fn an_unanswered_resume_turns_into_a_handshake_after_the_retry_interval() {
    let mut clock = Clock::new();
    let mut s = SessionState::new(Side::A, RETRY);
    s.on_installed();
    s.on_peer_present(true, clock.now());
    assert!(!s.needs_handshake(clock.advance(Duration::from_millis(1999))));
    assert!(s.needs_handshake(clock.advance(Duration::from_millis(1))));
    s.on_initiate(clock.now());
    assert!(
        s.needs_handshake(clock.advance(RETRY)),
        "until answered, a retry starts another"
    );
}

#[test]
fn unanswered_handshakes_are_retried_less_and_less_often_until_an_answer() {
    let mut clock = Clock::new();
    let mut s = SessionState::new(Side::A, RETRY);
    assert_eq!(
        s.on_peer_present(false, clock.now()),
        Some(Establish::Handshake)
    );
    // Each wait doubles, up to 16 retry intervals (2 s: 2, 4, 8, 16, 32,
    // 32 s), so a busy peer is not sent a handshake for each it has yet to
    // answer.
    for wait in [1, 2, 4, 8, 16, 16] {
        s.on_initiate(clock.now());
        let due = RETRY * wait;
        assert!(!s.needs_handshake(clock.advance(due - Duration::from_millis(1))));
        assert!(
            s.needs_handshake(clock.advance(Duration::from_millis(1))),
            "after {due:?}"
        );
    }
    // An answer starts the count anew: a later unanswered handshake is
    // retried after one interval.
    s.on_initiate(clock.now());
    s.on_answered(clock.now());
    s.on_answer_refused();
    s.on_initiate(clock.now());
    assert!(s.needs_handshake(clock.advance(RETRY)));
    // So does the peer's return.
    for _ in 0..5 {
        s.on_initiate(clock.now());
    }
    s.on_peer_present(false, clock.now());
    s.on_initiate(clock.now());
    assert!(s.needs_handshake(clock.advance(RETRY)));
}

#[test]
fn side_a_handshakes_at_once_when_the_returning_peer_holds_no_session() {
    let clock = Clock::new();
    let mut s = SessionState::new(Side::A, RETRY);
    s.on_installed();
    assert!(!s.on_no_session(), "no resume pending: the word is ignored");
    s.on_peer_present(true, clock.now());
    assert!(!s.needs_handshake(clock.now()), "the retry is 2 s away");
    assert!(s.on_no_session(), "the peer restarted: a handshake now");
    s.on_initiate(clock.now());
    s.on_answered(clock.now());
    assert!(
        !s.on_no_session(),
        "once per appearance: a relay repeating it gets no more handshakes"
    );
    s.on_peer_present(true, clock.now());
    assert!(s.on_no_session(), "the peer appeared again");
}

#[test]
fn side_a_ignores_no_session_once_the_peer_confirmed_and_side_b_always() {
    let clock = Clock::new();
    let mut a = SessionState::new(Side::A, RETRY);
    a.on_installed();
    a.on_peer_present(true, clock.now());
    assert!(a.on_resumed(true));
    assert!(!a.on_no_session(), "the session is confirmed: a forgery");
    let mut b = SessionState::new(Side::B, RETRY);
    b.on_peer_present(true, clock.now());
    assert!(!b.on_no_session(), "side B never initiates");
}

#[test]
fn a_resume_ok_confirms_the_session_on_side_a_only() {
    let clock = Clock::new();
    let mut a = SessionState::new(Side::A, RETRY);
    a.on_peer_present(true, clock.now());
    assert!(!a.on_resumed(false), "a Resume is side B's to answer");
    assert!(a.on_resumed(true));
    assert!(a.peer_confirmed());
    assert!(!a.needs_handshake(clock.now()));
    let mut b = SessionState::new(Side::B, RETRY);
    assert!(!b.on_resumed(true), "a ResumeOk is side A's");
    assert!(b.on_resumed(false));
    assert!(b.peer_confirmed());
}

#[test]
fn an_answered_handshake_is_unconfirmed_until_side_b_answers_its_resume() {
    let mut clock = Clock::new();
    let mut s = SessionState::new(Side::A, RETRY);
    s.on_initiate(clock.now());
    s.on_installed();
    s.on_answered(clock.now());
    assert!(!s.peer_confirmed());
    assert!(!s.needs_handshake(clock.advance(Duration::from_secs(1))));
    assert!(s.needs_handshake(clock.advance(Duration::from_secs(1))));
}

#[test]
fn too_many_forgeries_renew_the_session_at_the_next_retry_once() {
    let mut a = SessionState::new(Side::A, RETRY);
    let mut b = SessionState::new(Side::B, RETRY);
    assert_eq!(a.take_renew(), None);
    a.on_forgeries();
    b.on_forgeries();
    assert_eq!(a.take_renew(), Some(Establish::Handshake));
    assert_eq!(b.take_renew(), Some(Establish::Renew), "side B asks side A");
    assert_eq!(a.take_renew(), None);
    assert_eq!(b.take_renew(), None);
}

#[test]
fn a_renewal_pending_for_a_session_already_replaced_is_dropped() {
    // Side A met forgeries, but a handshake (side B's request, say) came
    // first: the next retry starts no second one.
    let clock = Clock::new();
    let mut a = SessionState::new(Side::A, RETRY);
    a.on_forgeries();
    a.on_initiate(clock.now());
    assert_eq!(a.take_renew(), None);
    // Side B met forgeries, then side A's new session was installed: side
    // B asks for no other.
    let mut b = SessionState::new(Side::B, RETRY);
    b.on_forgeries();
    b.on_installed();
    assert_eq!(b.take_renew(), None);
    // Forgeries under the new session renew it again.
    b.on_forgeries();
    assert_eq!(b.take_renew(), Some(Establish::Renew));
}

// ---- reattach and hop decisions, per relay connection ----

fn link(n: u8) -> LinkId {
    LinkId([n; 16])
}

#[test]
fn a_refused_attach_is_retried_after_a_delay_that_doubles_up_to_the_max() {
    let mut clock = Clock::new();
    let mut r = Reattach::new(Duration::from_secs(1), Duration::from_secs(5));
    let mut delays = Vec::new();
    for _ in 0..5 {
        let now = clock.now();
        let at = r.on_refused(link(1), now, 1.0);
        delays.push(at - now);
        clock.advance(at - now);
    }
    let secs: Vec<u64> = delays.iter().map(Duration::as_secs).collect();
    assert_eq!(secs, [1, 2, 4, 5, 5]);
}

#[test]
fn a_reattach_is_due_only_once_its_delay_passed_and_not_after_attaching() {
    let mut clock = Clock::new();
    let mut r = Reattach::new(Duration::from_secs(1), Duration::from_secs(30));
    r.on_refused(link(1), clock.now(), 0.5);
    assert!(r.due(clock.advance(Duration::from_millis(499))).is_empty());
    assert_eq!(r.due(clock.advance(Duration::from_millis(1))), [link(1)]);
    assert_eq!(r.due(clock.now()), [link(1)], "due until taken or refused");
    r.on_attached(link(1));
    assert!(r.due(clock.advance(Duration::from_secs(60))).is_empty());
}

#[test]
fn the_group_hops_once_every_peer_was_away_for_the_dwell() {
    let mut clock = Clock::new();
    let mut p = Presence::new(Duration::from_secs(3), 0.0, 0);
    let links = [link(1), link(2)];
    p.on_attached(link(1), clock.now());
    clock.advance(Duration::from_secs(1));
    p.on_attached(link(2), clock.now());
    assert!(!p.stranded(links.iter(), clock.advance(Duration::from_secs(2))));
    assert!(p.stranded(links.iter(), clock.advance(Duration::from_secs(1))));
}

#[test]
fn one_present_peer_keeps_the_group_on_its_relay() {
    let mut clock = Clock::new();
    let mut p = Presence::new(Duration::from_secs(3), 0.0, 0);
    let links = [link(1), link(2)];
    p.on_attached(link(1), clock.now());
    p.on_attached(link(2), clock.now());
    p.on_present(link(2));
    assert!(!p.stranded(links.iter(), clock.advance(Duration::from_secs(60))));
    assert_eq!(p.present().collect::<Vec<_>>(), [link(2)]);
    // Its peer leaves: the dwell counts from then.
    assert!(p.on_absent(link(2), clock.now()), "attached: flows go on");
    assert!(!p.stranded(links.iter(), clock.advance(Duration::from_secs(2))));
    assert!(p.stranded(links.iter(), clock.advance(Duration::from_secs(1))));
}

#[test]
fn a_link_the_relay_refused_counts_as_one_whose_peer_is_away() {
    let mut clock = Clock::new();
    let mut p = Presence::new(Duration::from_secs(3), 0.0, 0);
    p.on_attached(link(1), clock.now());
    p.on_refused(link(1), clock.now());
    assert!(
        !p.on_absent(link(1), clock.now()),
        "no longer attached here"
    );
    assert!(p.stranded([link(1)].iter(), clock.advance(Duration::from_secs(3))));
}

#[test]
fn the_dwell_is_randomized_and_doubles_with_each_hop_up_to_sixteen_times() {
    let base = Duration::from_secs(3);
    assert_eq!(Presence::new(base, 0.0, 0).dwell(), base);
    assert_eq!(Presence::new(base, 1.0, 0).dwell(), base * 2);
    assert_eq!(Presence::new(base, 0.0, 2).dwell(), base * 4);
    assert_eq!(Presence::new(base, 0.0, 9).dwell(), base * 16);
}

#[test]
fn a_lane_closes_after_carrying_no_flow_for_its_idle_time() {
    let mut clock = Clock::new();
    let mut idle = Idle::new(Duration::from_secs(30));
    assert!(!idle.check(false, clock.now()), "idle starts counting now");
    assert!(!idle.check(false, clock.advance(Duration::from_secs(29))));
    assert!(idle.check(false, clock.advance(Duration::from_secs(1))));
}

#[test]
fn a_flow_restarts_the_lane_idle_time() {
    let mut clock = Clock::new();
    let mut idle = Idle::new(Duration::from_secs(30));
    idle.check(false, clock.now());
    assert!(!idle.check(true, clock.advance(Duration::from_secs(29))));
    assert!(!idle.check(false, clock.advance(Duration::from_secs(1))));
    assert!(!idle.check(false, clock.advance(Duration::from_secs(29))));
    assert!(idle.check(false, clock.advance(Duration::from_secs(1))));
}

#[test]
fn a_late_answer_completes_its_own_handshake_and_keeps_the_later_ones() {
    // Handshakes stand for themselves (an answer names the one it takes).
    let mut p = Pending::new(4);
    for h in 1..=3u32 {
        p.start(h);
    }
    let take = |want: u32| move |h: u32| if h == want { Ok(h) } else { Err(h) };
    // The answer to the first, arriving after two retries: it completes.
    assert_eq!(p.complete(take(1)), Ok(Some(1)));
    assert_eq!(p.len(), 2, "the retries are kept");
    // The answer to the third: the second, older, is forgotten.
    assert_eq!(p.complete(take(3)), Ok(Some(3)));
    assert_eq!(p.len(), 0);
    assert_eq!(p.complete(take(2)), Ok(None), "nothing pending");
    // A forgery takes none: each pending one is used up by the try.
    p.start(4);
    p.start(5);
    assert_eq!(p.complete(take(9)), Err(5));
    assert_eq!(p.len(), 0);
    // Beyond the cap, the oldest is forgotten.
    for h in 10..=14u32 {
        p.start(h);
    }
    assert_eq!(p.complete(take(10)), Err(14), "10 was forgotten");
    // One never sent is taken back; the rest stay.
    p.start(20);
    p.start(21);
    p.cancel_newest();
    assert_eq!(p.complete(take(21)), Err(20), "21 was taken back");
    p.start(20);
    p.clear();
    assert_eq!(p.len(), 0);
}

#[test]
fn a_handshake_that_could_not_be_sent_is_started_at_the_next_retry() {
    let clock = Clock::new();
    let mut a = SessionState::new(Side::A, RETRY);
    a.on_installed();
    a.on_forgeries();
    assert_eq!(a.take_renew(), Some(Establish::Handshake));
    // The control queue was full: the renewal stays due, once.
    a.on_initiate_deferred();
    assert_eq!(a.take_renew(), Some(Establish::Handshake));
    a.on_initiate(clock.now());
    assert_eq!(a.take_renew(), None);
    let mut b = SessionState::new(Side::B, RETRY);
    b.on_initiate_deferred();
    assert_eq!(b.take_renew(), None, "side B never initiates");
}
