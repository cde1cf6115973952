//! Which flows of a session the peer has already opened.
//!
//! A flow id names one flow for the whole life of a Noise session: its
//! records are sealed under the nonces `(flow_id << 40) | seq`. If an agent
//! accepted a flow id twice in one session, a relay that recorded a
//! finished flow could write the same bytes again on a new stream: the
//! target would be dialled again, the recorded request delivered again, and
//! the accepting agent's answer sealed under nonces it already used (which,
//! under AES-GCM, gives away the authentication key). [`SeenFlows`] is the
//! accepting side's memory of the ids it took: an id is fresh at most once.
//!
//! Each agent allocates its flow ids in increasing order, so the ids a peer
//! opens arrive nearly in order (streams of concurrent flows may overtake
//! each other). The memory is a sliding window of [`SEEN_WINDOW`] ids below
//! the highest one seen, as in IPsec's anti-replay window (RFC 4303 §3.4.3):
//! an id inside it is fresh if its bit is clear, an id below it is refused
//! as too old. Memory stays fixed at `SEEN_WINDOW / 8` bytes per
//! generation, whatever the peer or the relay sends.
//!
//! A peer that used every id of a generation starts the next one, whose
//! flows are sealed under other keys ([`crate::noise::Session::flow`]).
//! [`PeerFlows`] keeps the window of the peer's current generation and of
//! the one before it (whose last `Open`s may still be on their way), and
//! refuses anything older.

use crate::ids::FlowId;

/// How many flow ids below the highest one seen are still remembered: a
/// flow whose `Open` arrives after this many newer ids were opened (by a
/// peer allocating every second id, half as many flows) is refused.
pub const SEEN_WINDOW: u32 = 1 << 16;

/// Why a flow id is not fresh.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotFresh {
    /// The session already accepted this id.
    #[error("flow {0} was already opened in this session (a replay)")]
    Seen(FlowId),
    /// The flow's generation is older than the two remembered.
    #[error(
        "flow {id} of generation {generation} is older than generation {current} and the one before"
    )]
    Generation {
        /// The refused id.
        id: FlowId,
        /// Its generation.
        generation: u32,
        /// The peer's newest generation.
        current: u32,
    },
    /// The id is so far below the highest one seen that it is no longer
    /// remembered, so it is refused as a possible replay.
    #[error("flow {id} is more than {SEEN_WINDOW} ids below the newest flow {highest}")]
    TooOld {
        /// The refused id.
        id: FlowId,
        /// The highest id accepted so far.
        highest: FlowId,
    },
}

/// A sliding window of the numbers accepted from a sender that numbers
/// what it sends in increasing order (flow ids, datagram sequence
/// numbers): a number is accepted at most once, and one `BITS` or more
/// below the highest accepted is refused as too old, in fixed memory
/// (`BITS / 8` bytes), as in IPsec's anti-replay window (RFC 4303 §3.4.3).
#[derive(Clone)]
pub struct Window<const BITS: u64> {
    highest: Option<u64>,
    /// Bit `n % BITS` is set when `n` (within the window) was accepted.
    bits: Box<[u64]>,
}

/// Why a number is not accepted by a [`Window`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stale {
    /// It was accepted before.
    Seen,
    /// It lies a whole window or more below `highest`, the highest one
    /// accepted.
    TooOld {
        /// The highest number accepted.
        highest: u64,
    },
}

impl<const BITS: u64> std::fmt::Debug for Window<BITS> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Window")
            .field("highest", &self.highest)
            .finish_non_exhaustive()
    }
}

impl<const BITS: u64> Default for Window<BITS> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const BITS: u64> Window<BITS> {
    const WORDS: usize = {
        assert!(
            BITS >= 64 && BITS.is_multiple_of(64),
            "a window is whole 64-bit words"
        );
        (BITS / 64) as usize
    };

    /// Nothing accepted yet.
    pub fn new() -> Self {
        Self {
            highest: None,
            bits: vec![0; Self::WORDS].into_boxed_slice(),
        }
    }

    /// Whether `n` may still be accepted, without accepting it.
    pub fn check(&self, n: u64) -> Result<(), Stale> {
        let Some(highest) = self.highest else {
            return Ok(());
        };
        if n > highest {
            return Ok(());
        }
        if highest - n >= BITS {
            return Err(Stale::TooOld { highest });
        }
        if self.bit(n) {
            return Err(Stale::Seen);
        }
        Ok(())
    }

    /// Accepts `n` if it may be; from then on it never may again.
    pub fn accept(&mut self, n: u64) -> Result<(), Stale> {
        self.check(n)?;
        match self.highest {
            Some(highest) if n <= highest => {}
            Some(highest) => {
                // Slide the window up: numbers that fall out of it are
                // forgotten, so their bits serve the new ones.
                if n - highest >= BITS {
                    self.bits.fill(0);
                } else {
                    for forgotten in highest + 1..=n {
                        self.set(forgotten, false);
                    }
                }
                self.highest = Some(n);
            }
            None => self.highest = Some(n),
        }
        self.set(n, true);
        Ok(())
    }

    /// The highest number accepted so far.
    pub fn highest(&self) -> Option<u64> {
        self.highest
    }

    fn bit(&self, n: u64) -> bool {
        let i = (n % BITS) as usize;
        self.bits[i / 64] & (1 << (i % 64)) != 0
    }

    fn set(&mut self, n: u64, on: bool) {
        let i = (n % BITS) as usize;
        if on {
            self.bits[i / 64] |= 1 << (i % 64);
        } else {
            self.bits[i / 64] &= !(1 << (i % 64));
        }
    }
}

/// The flow ids a session has accepted from its peer (see the module docs).
#[derive(Clone, Debug, Default)]
pub struct SeenFlows(Window<{ SEEN_WINDOW as u64 }>);

impl SeenFlows {
    /// Nothing seen yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `id` may still be accepted, without accepting it.
    pub fn check(&self, id: FlowId) -> Result<(), NotFresh> {
        self.0.check(id.into()).map_err(|e| Self::not_fresh(id, e))
    }

    /// Accepts `id` if it is fresh; from then on it never is again.
    pub fn accept(&mut self, id: FlowId) -> Result<(), NotFresh> {
        self.0.accept(id.into()).map_err(|e| Self::not_fresh(id, e))
    }

    /// The highest id accepted so far.
    pub fn highest(&self) -> Option<FlowId> {
        // Only flow ids are accepted.
        self.0.highest().map(|h| h as FlowId)
    }

    fn not_fresh(id: FlowId, why: Stale) -> NotFresh {
        match why {
            Stale::Seen => NotFresh::Seen(id),
            Stale::TooOld { highest } => NotFresh::TooOld {
                id,
                highest: highest as FlowId,
            },
        }
    }
}

/// The flows a peer opened in one session, across generations of flow
/// ids (see the module docs).
#[derive(Clone, Debug, Default)]
pub struct PeerFlows {
    generation: u32,
    current: SeenFlows,
    previous: Option<SeenFlows>,
}

impl PeerFlows {
    /// The generations a new flow's `Open` may belong to, most likely
    /// first: the peer's current one, the next, the one before.
    pub fn candidates(&self) -> Vec<u32> {
        let g = self.generation;
        let mut out = vec![g];
        out.extend(g.checked_add(1));
        if self.previous.is_some() {
            out.extend(g.checked_sub(1));
        }
        out
    }

    /// The peer's newest generation.
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// Accepts flow `id` of `generation` if it is fresh; from then on it
    /// never is again. The next generation becomes the current one (the
    /// current one stays remembered as the one before).
    pub fn accept(&mut self, generation: u32, id: FlowId) -> Result<(), NotFresh> {
        let current = self.generation;
        if generation == current {
            self.current.accept(id)
        } else if Some(generation) == current.checked_add(1) {
            let mut next = SeenFlows::new();
            next.accept(id)?;
            self.previous = Some(std::mem::replace(&mut self.current, next));
            self.generation = generation;
            Ok(())
        } else if Some(generation) == current.checked_sub(1) && self.previous.is_some() {
            match &mut self.previous {
                Some(previous) => previous.accept(id),
                None => unreachable!("checked above"),
            }
        } else {
            Err(NotFresh::Generation {
                id,
                generation,
                current,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn an_id_is_fresh_once() {
        let mut seen = SeenFlows::new();
        assert_eq!(seen.accept(3), Ok(()));
        assert_eq!(seen.accept(3), Err(NotFresh::Seen(3)));
        assert_eq!(seen.check(3), Err(NotFresh::Seen(3)));
        assert_eq!(seen.accept(7), Ok(()));
        // Overtaken by a newer flow, an older one is still fresh once.
        assert_eq!(seen.accept(5), Ok(()));
        assert_eq!(seen.accept(5), Err(NotFresh::Seen(5)));
        assert_eq!(seen.highest(), Some(7));
    }

    #[test]
    fn ids_below_the_window_are_refused() {
        let mut seen = SeenFlows::new();
        seen.accept(1).expect("fresh");
        let far = 1 + SEEN_WINDOW + 10;
        seen.accept(far).expect("fresh");
        // Never seen, but no longer remembered either.
        assert_eq!(
            seen.accept(5),
            Err(NotFresh::TooOld {
                id: 5,
                highest: far
            })
        );
        assert_eq!(seen.accept(far - SEEN_WINDOW + 1), Ok(()));
        assert_eq!(
            seen.accept(1),
            Err(NotFresh::TooOld {
                id: 1,
                highest: far
            })
        );
    }

    #[test]
    fn a_window_slid_by_one_forgets_only_what_left_it() {
        let mut seen = SeenFlows::new();
        for id in 1..=SEEN_WINDOW {
            seen.accept(id).expect("fresh");
        }
        seen.accept(SEEN_WINDOW + 1).expect("fresh");
        // Bit of id 1 now serves id SEEN_WINDOW + 1: id 1 is too old, and
        // id 2 is still remembered.
        assert!(matches!(seen.check(1), Err(NotFresh::TooOld { .. })));
        assert_eq!(seen.check(2), Err(NotFresh::Seen(2)));
        assert_eq!(
            seen.check(SEEN_WINDOW + 1),
            Err(NotFresh::Seen(SEEN_WINDOW + 1))
        );
    }

    #[test]
    fn generations_take_the_same_ids_once_each() {
        let mut peer = PeerFlows::default();
        assert_eq!(peer.candidates(), vec![0, 1]);
        peer.accept(0, 1).expect("fresh");
        peer.accept(0, 3).expect("fresh");
        assert_eq!(peer.accept(0, 3), Err(NotFresh::Seen(3)));
        // The next generation starts with the same ids, fresh again.
        peer.accept(1, 1).expect("fresh in generation 1");
        assert_eq!(peer.generation(), 1);
        assert_eq!(peer.candidates(), vec![1, 2, 0]);
        assert_eq!(peer.accept(1, 1), Err(NotFresh::Seen(1)));
        // A late Open of the generation before is still taken, once.
        peer.accept(0, 5).expect("late, fresh");
        assert_eq!(peer.accept(0, 1), Err(NotFresh::Seen(1)));
        peer.accept(2, 1).expect("fresh in generation 2");
        // Generation 0 is forgotten: refused, never taken again.
        assert_eq!(
            peer.accept(0, 7),
            Err(NotFresh::Generation {
                id: 7,
                generation: 0,
                current: 2
            })
        );
        // A generation far ahead is refused too.
        assert!(matches!(
            peer.accept(9, 1),
            Err(NotFresh::Generation { .. })
        ));
    }

    proptest! {
        /// Against a model that remembers every id: an id is accepted
        /// only if never accepted before, and is refused only if it was
        /// accepted before or lies a whole window below the highest.
        #[test]
        fn matches_a_model_that_remembers_everything(
            ids in proptest::collection::vec(
                prop_oneof![0u32..64, 0u32..(3 * SEEN_WINDOW), Just(u32::MAX - 1)],
                1..400,
            )
        ) {
            let mut seen = SeenFlows::new();
            let mut model: HashSet<u32> = HashSet::new();
            let mut highest: Option<u32> = None;
            for id in ids {
                let got = seen.accept(id);
                let old = highest.is_some_and(|h| id < h && h - id >= SEEN_WINDOW);
                if model.contains(&id) {
                    prop_assert!(got.is_err(), "id {} accepted twice", id);
                } else if old {
                    prop_assert_eq!(got, Err(NotFresh::TooOld { id, highest: highest.unwrap_or(0) }));
                } else {
                    prop_assert_eq!(got, Ok(()));
                }
                if got.is_ok() {
                    model.insert(id);
                    highest = Some(highest.map_or(id, |h| h.max(id)));
                }
            }
        }
    }
}
