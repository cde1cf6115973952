//! The watchdog of a relay connection: silence after a send, not silence
//! alone, and the bound stretched by the round-trip time.

use std::time::Duration;

use super::Clock;
use crate::core::silence::{Bounds, Sample, Silence};

const BOUNDS: Bounds = Bounds {
    data: Duration::from_secs(1),
    ping: Duration::from_secs(3),
    rtts: 8,
    most: Duration::from_secs(8),
};
const TICK: Duration = Duration::from_millis(100);
const RTT: Duration = Duration::from_millis(10);

fn sample(received: u64, sent: u64, pings: u64) -> Sample {
    Sample {
        received,
        sent,
        pings,
        rtt: RTT,
    }
}

/// Ticks until the watchdog fires, feeding the same counters; the time it
/// took, or `None` within `limit`.
fn ticks_until_silent(
    w: &mut Silence,
    clock: &mut Clock,
    s: Sample,
    limit: Duration,
) -> Option<Duration> {
    let start = clock.now();
    while clock.now() - start < limit {
        let now = clock.advance(TICK);
        if w.on_sample(now, s).is_some() {
            return Some(now - start);
        }
    }
    None
}

#[test]
fn a_quiet_connection_with_nothing_sent_is_never_silent() {
    let mut clock = Clock::new();
    let mut w = Silence::new(BOUNDS, sample(5, 5, 0));
    assert_eq!(
        ticks_until_silent(
            &mut w,
            &mut clock,
            sample(5, 5, 0),
            Duration::from_secs(600)
        ),
        None
    );
}

#[test]
fn data_left_unanswered_is_silence_after_the_data_bound() {
    let mut clock = Clock::new();
    let mut w = Silence::new(BOUNDS, sample(5, 5, 0));
    // Data goes out; nothing comes back.
    let took = ticks_until_silent(&mut w, &mut clock, sample(5, 9, 0), Duration::from_secs(10));
    let took = took.expect("the watchdog fires");
    // Seen on the first tick, then more than a second of silence.
    assert!(
        took > BOUNDS.data && took <= BOUNDS.data + 2 * TICK,
        "{took:?}"
    );
}

#[test]
fn an_answer_clears_the_wait() {
    let mut clock = Clock::new();
    let mut w = Silence::new(BOUNDS, sample(0, 0, 0));
    let mut received = 0;
    let mut sent = 0;
    // A busy connection: every tick sends and hears; it never fires.
    for _ in 0..200 {
        sent += 3;
        received += 2;
        assert_eq!(
            w.on_sample(clock.advance(TICK), sample(received, sent, 0)),
            None
        );
    }
    // Sends go on, answers stop: it fires after the bound, counted from
    // the last tick that heard something.
    let mut fired = None;
    for i in 1..=20u32 {
        sent += 1;
        if let Some(silent) = w.on_sample(clock.advance(TICK), sample(received, sent, 0)) {
            fired = Some((i, silent));
            break;
        }
    }
    let (i, silent) = fired.expect("fires");
    assert_eq!(
        i, 12,
        "the first tick past one second after the first unanswered one"
    );
    assert!(silent > BOUNDS.data, "{silent:?}");
}

#[test]
fn a_send_answered_in_the_same_sample_leaves_nothing_waiting() {
    let mut clock = Clock::new();
    let mut w = Silence::new(BOUNDS, sample(5, 5, 0));
    // The last exchange of a connection that goes quiet: a message and
    // its acknowledgement, both between two samples.
    assert_eq!(w.on_sample(clock.advance(TICK), sample(6, 6, 0)), None);
    assert_eq!(
        ticks_until_silent(
            &mut w,
            &mut clock,
            sample(6, 6, 0),
            Duration::from_secs(600)
        ),
        None
    );
}

#[test]
fn an_unanswered_keep_alive_gets_the_longer_bound() {
    let mut clock = Clock::new();
    let mut w = Silence::new(BOUNDS, sample(5, 5, 0));
    let took = ticks_until_silent(&mut w, &mut clock, sample(5, 5, 1), Duration::from_secs(10))
        .expect("fires");
    assert!(
        took > BOUNDS.ping && took <= BOUNDS.ping + 2 * TICK,
        "{took:?}"
    );
}

#[test]
fn data_after_an_unanswered_ping_counts_from_the_ping() {
    let mut clock = Clock::new();
    let mut w = Silence::new(BOUNDS, sample(5, 5, 0));
    // A keep-alive goes out and waits half a second...
    assert_eq!(w.on_sample(clock.advance(TICK), sample(5, 5, 1)), None);
    for _ in 0..4 {
        assert_eq!(w.on_sample(clock.advance(TICK), sample(5, 5, 1)), None);
    }
    // ...then data: the data bound applies, from the ping's tick.
    let took = ticks_until_silent(&mut w, &mut clock, sample(5, 6, 1), Duration::from_secs(10))
        .expect("fires");
    assert!(took <= BOUNDS.data, "{took:?}");
}

#[test]
fn a_long_round_trip_stretches_the_bound() {
    let mut clock = Clock::new();
    let slow = Sample {
        rtt: Duration::from_millis(400),
        ..sample(5, 5, 0)
    };
    let mut w = Silence::new(BOUNDS, slow);
    let took = ticks_until_silent(
        &mut w,
        &mut clock,
        Sample { sent: 6, ..slow },
        Duration::from_secs(10),
    )
    .expect("fires");
    // Eight round trips of 400 ms, not the one-second floor.
    assert!(took > Duration::from_millis(3200), "{took:?}");
    assert!(took <= Duration::from_millis(3400), "{took:?}");
}

#[test]
fn a_swollen_round_trip_stretches_the_bound_only_so_far() {
    let mut clock = Clock::new();
    // Queues under bulk swelled the smoothed round trip to 5 s: eight of
    // them would be 40 s, near the idle timeout.
    let swollen = Sample {
        rtt: Duration::from_secs(5),
        ..sample(5, 5, 7)
    };
    let mut w = Silence::new(BOUNDS, swollen);
    let took = ticks_until_silent(
        &mut w,
        &mut clock,
        Sample {
            pings: 8,
            ..swollen
        },
        Duration::from_secs(60),
    )
    .expect("fires");
    assert!(took > Duration::from_secs(8), "{took:?}");
    assert!(took <= Duration::from_millis(8200), "{took:?}");
}
