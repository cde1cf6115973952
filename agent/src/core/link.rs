//! One link's session decisions, sans IO: flow id allocation, the
//! anti-replay window of sealed link control, forgery counting, the
//! handshakes side B answered until side A confirms one, when side A
//! resumes or starts a handshake, and, per relay connection, which links
//! attach again, whether the group has waited long enough for its peers
//! and whether its lane is idle.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use comsat_protocol::limits::MAX_FLOW_ID;
use comsat_protocol::record::wire_flow_id;
use comsat_protocol::{FlowId, LinkId, Side};

/// A flow id this side may open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct NewFlow {
    /// The generation of flow ids (and of their keys) it belongs to.
    pub(crate) generation: u32,
    /// The id as stream headers carry it.
    pub(crate) id: FlowId,
    /// It is the first of a new generation (not the first one).
    pub(crate) new_generation: bool,
}

/// The `n`th flow this side opens on a link (all sessions together), in
/// a session that began at flow `flow_base`: side A uses odd ids, side B
/// even ones, so both may open flows; when a generation's
/// `per_generation` ids are used, the next generation takes them again
/// under new keys. `None` once ids run out.
pub(crate) fn flow_id(n: u64, flow_base: u64, per_generation: u64, side: Side) -> Option<NewFlow> {
    let in_session = n.saturating_sub(flow_base);
    let generation = u32::try_from(in_session / per_generation).ok()?;
    let k = u32::try_from(n % per_generation).ok()?;
    let id = k.checked_mul(2)?.checked_add(match side {
        Side::A => 1,
        Side::B => 2,
    })?;
    if id >= MAX_FLOW_ID {
        return None;
    }
    Some(NewFlow {
        generation,
        id: wire_flow_id(generation, id),
        new_generation: in_session.is_multiple_of(per_generation) && generation > 0,
    })
}

/// The sequence numbers of sealed link control received in one session:
/// each must be above the last one opened.
#[derive(Debug, Default)]
pub(crate) struct ControlReplay {
    last: Option<u64>,
}

impl ControlReplay {
    /// Whether `seq` may be opened (a number not above the last is a
    /// replay, refused before any decryption).
    pub(crate) fn fresh(&self, seq: u64) -> bool {
        self.last.is_none_or(|l| seq > l)
    }

    /// `seq` was opened and decoded.
    pub(crate) fn accept(&mut self, seq: u64) {
        self.last = Some(seq);
    }
}

/// Messages that failed to decrypt under one session.
#[derive(Debug, Default)]
pub(crate) struct Forgeries {
    n: u64,
}

impl Forgeries {
    /// Counts one; true when this one reaches `max` (the session is to be
    /// replaced, once).
    pub(crate) fn count(&mut self, max: u64) -> bool {
        self.n += 1;
        self.n == max
    }

    pub(crate) fn get(&self) -> u64 {
        self.n
    }
}

/// Side B: the handshakes it answered, oldest first, at most `cap`, each
/// until side A proves it holds it.
#[derive(Debug)]
pub(crate) struct Candidates<T> {
    cap: usize,
    q: VecDeque<T>,
}

impl<T> Candidates<T> {
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            cap,
            q: VecDeque::new(),
        }
    }

    /// Holds an answered handshake; true if the oldest one, never
    /// confirmed, was dropped for it.
    pub(crate) fn propose(&mut self, t: T) -> bool {
        let dropped = self.q.len() >= self.cap;
        if dropped {
            self.q.pop_front();
        }
        self.q.push_back(t);
        dropped
    }

    /// The candidates, newest first.
    pub(crate) fn newest_first(&self) -> impl Iterator<Item = &T> {
        self.q.iter().rev()
    }

    /// Side A proved it holds the first candidate `is` picks: it is taken,
    /// every other one forgotten; with how many were forgotten.
    pub(crate) fn confirm(&mut self, is: impl Fn(&T) -> bool) -> Option<(T, usize)> {
        let at = self.q.iter().position(is)?;
        let confirmed = self.q.remove(at)?;
        let others = self.q.len();
        self.q.clear();
        Some((confirmed, others))
    }

    pub(crate) fn clear(&mut self) {
        self.q.clear();
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.q.len()
    }
}

/// What a link sends its peer to (re)establish the session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Establish {
    /// Ask (sealed) whether the peer still holds the session.
    Resume,
    /// Start a new handshake (side A).
    Handshake,
    /// Ask side A for a new handshake (side B).
    Renew,
}

/// Whether the peer holds the link's current session, and what this side
/// does about it.
#[derive(Debug)]
pub(crate) struct SessionState {
    side: Side,
    /// How long side A waits for an answer before starting anew.
    retry: Duration,
    /// The peer confirmed the current session since it last (re)appeared.
    peer_confirmed: bool,
    /// Side A: when it asked the peer to confirm the session.
    resume_sent: Option<Instant>,
    /// The session met too many forgeries: to be replaced at the next
    /// retry.
    renew: bool,
    /// Side A: since the peer last (re)appeared, it took the peer's word
    /// that it holds no session ([`SessionState::on_no_session`]).
    took_no_session: bool,
    /// Side A: when it started its last handshake still unanswered, and
    /// how many it started since the peer last (re)appeared or answered.
    initiated: Option<(Instant, u32)>,
}

/// Doublings of the retry interval between unanswered handshakes: side A
/// tries again after 2 s, 4 s, 8 s, 16 s, then every 32 s, so that a peer
/// or relay too busy to answer within the interval (thousands of links
/// at once) is not sent a new handshake for each one it has yet to answer.
const MAX_DOUBLINGS: u32 = 4;

impl SessionState {
    pub(crate) fn new(side: Side, retry: Duration) -> Self {
        Self {
            side,
            retry,
            peer_confirmed: false,
            resume_sent: None,
            renew: false,
            took_no_session: false,
            initiated: None,
        }
    }

    #[cfg(test)]
    pub(crate) fn peer_confirmed(&self) -> bool {
        self.peer_confirmed
    }

    /// The peer (re)joined, perhaps as a new incarnation: side A checks
    /// that it still holds the session (`Resume`), or starts a handshake
    /// without one; side B waits.
    pub(crate) fn on_peer_present(&mut self, has_session: bool, now: Instant) -> Option<Establish> {
        self.peer_confirmed = false;
        self.took_no_session = false;
        self.initiated = None;
        match (self.side, has_session) {
            (Side::A, true) => {
                self.resume_sent = Some(now);
                Some(Establish::Resume)
            }
            (Side::A, false) => Some(Establish::Handshake),
            (Side::B, _) => None,
        }
    }

    /// Side A starts a handshake at `now`: the pending resume is moot,
    /// and so is a pending renewal (this handshake replaces the session it
    /// was for).
    pub(crate) fn on_initiate(&mut self, now: Instant) {
        self.resume_sent = None;
        self.renew = false;
        let started = self.initiated.map_or(0, |(_, n)| n);
        self.initiated = Some((now, started.saturating_add(1)));
    }

    /// Side A could not send the handshake it started (its control queue
    /// was full): it starts one at the next retry, without waiting longer
    /// for it.
    pub(crate) fn on_initiate_deferred(&mut self) {
        if self.side == Side::A {
            self.renew = true;
        }
    }

    /// Side A took side B's answer: the session is installed but not
    /// confirmed until side B answers the `Resume` sent under it at `now`.
    pub(crate) fn on_answered(&mut self, now: Instant) {
        self.peer_confirmed = false;
        self.resume_sent = Some(now);
        self.initiated = None;
    }

    /// Side A: an answer completed none of its pending handshakes (a
    /// forgery, or the answer to one it forgot), and used them up:
    /// nothing is confirmed, and a retry starts another handshake rather
    /// than wait for an answer that can no longer be taken.
    pub(crate) fn on_answer_refused(&mut self) {
        self.peer_confirmed = false;
        self.resume_sent = None;
    }

    /// A new session was installed (side B: confirmed by side A). A
    /// renewal still pending was for the session it replaces: asking side
    /// A for another would only reset the flows opened since.
    pub(crate) fn on_installed(&mut self) {
        self.resume_sent = None;
        self.peer_confirmed = true;
        self.renew = false;
    }

    /// The peer confirmed the session (`Resume` on side B, `ResumeOk` on
    /// side A); whether this side acts on it: each side only on its own.
    pub(crate) fn on_resumed(&mut self, ok: bool) -> bool {
        let ours = match self.side {
            Side::A => ok,
            Side::B => !ok,
        };
        if ours {
            if self.side == Side::A {
                self.resume_sent = None;
            }
            self.peer_confirmed = true;
        }
        ours
    }

    /// Side B says it holds no session (it restarted) while side A waits
    /// for the answer to its `Resume`: whether side A starts a handshake
    /// now instead of at the end of its retry interval. Once each time the
    /// peer (re)appears: the word is not authenticated, and a relay that
    /// repeats it must not make side A handshake again and again.
    pub(crate) fn on_no_session(&mut self) -> bool {
        let take = self.side == Side::A
            && !self.peer_confirmed
            && self.resume_sent.is_some()
            && !self.took_no_session;
        self.took_no_session |= take;
        take
    }

    /// The session met its last tolerated forgery.
    pub(crate) fn on_forgeries(&mut self) {
        self.renew = true;
    }

    /// At a retry: the session is to be replaced (side A starts a
    /// handshake, side B asks it to), once.
    pub(crate) fn take_renew(&mut self) -> Option<Establish> {
        std::mem::take(&mut self.renew).then_some(match self.side {
            Side::A => Establish::Handshake,
            Side::B => Establish::Renew,
        })
    }

    /// At a retry with the peer present: side A starts a handshake when
    /// the peer has not confirmed the session and no resume is pending, or
    /// the pending one got no answer within the retry interval.
    /// A handshake still unanswered is started anew only after the retry
    /// interval doubled for each one started before it (up to
    /// [`MAX_DOUBLINGS`]).
    pub(crate) fn needs_handshake(&self, now: Instant) -> bool {
        self.side == Side::A
            && !self.peer_confirmed
            && self
                .resume_sent
                .is_none_or(|t| now.saturating_duration_since(t) >= self.retry)
            && self.initiated.is_none_or(|(t, n)| {
                now.saturating_duration_since(t)
                    >= self.retry * 2u32.pow(n.saturating_sub(1).min(MAX_DOUBLINGS))
            })
    }
}

/// Links whose attach the relay refused for a reason that may pass: when
/// to send it again, less and less often.
#[derive(Debug)]
pub(crate) struct Reattach {
    initial: Duration,
    max: Duration,
    due: HashMap<LinkId, (Instant, Duration)>,
}

impl Reattach {
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            due: HashMap::new(),
        }
    }

    /// The relay refused `link` at `now`: it is asked again after a delay
    /// that doubles each time, times `spread` (a jitter factor); when.
    pub(crate) fn on_refused(&mut self, link: LinkId, now: Instant, spread: f64) -> Instant {
        let next = self
            .due
            .get(&link)
            .map_or(self.initial, |(_, d)| (*d * 2).min(self.max));
        let at = now + next.mul_f64(spread);
        self.due.insert(link, (at, next));
        at
    }

    /// The relay took `link`.
    pub(crate) fn on_attached(&mut self, link: LinkId) {
        self.due.remove(&link);
    }

    /// The links to attach again at `now` (each again at every call until
    /// it is taken or refused anew).
    pub(crate) fn due(&self, now: Instant) -> Vec<LinkId> {
        self.due
            .iter()
            .filter(|(_, (at, _))| *at <= now)
            .map(|(id, _)| *id)
            .collect()
    }
}

/// How long a lane has carried no flow: it closes after `limit` of it.
#[derive(Debug)]
pub(crate) struct Idle {
    limit: Duration,
    since: Option<Instant>,
}

impl Idle {
    pub(crate) fn new(limit: Duration) -> Self {
        Self { limit, since: None }
    }

    /// A check at `now`, with whether the group carries flows: true once
    /// it has carried none for `limit`.
    pub(crate) fn check(&mut self, busy: bool, now: Instant) -> bool {
        if busy {
            self.since = None;
            return false;
        }
        now.saturating_duration_since(*self.since.get_or_insert(now)) >= self.limit
    }
}

/// Where a relay connection's links stand with their peers: when every
/// link's peer has been away for the dwell, the group tries the next relay
/// of its list (both agents follow the same list, and the randomized dwell
/// lets one of two agents that missed each other arrive first).
#[derive(Debug)]
pub(crate) struct Presence {
    dwell: Duration,
    absent_since: HashMap<LinkId, Instant>,
    present: HashMap<LinkId, bool>,
    attached: HashSet<LinkId>,
}

impl Presence {
    /// `base` randomized by `spread` (in [0, 1]: up to twice as long),
    /// doubled for each of `hops` in a row without meeting a peer (up to
    /// 16 times).
    pub(crate) fn new(base: Duration, spread: f64, hops: u32) -> Self {
        Self {
            dwell: base.mul_f64(1.0 + spread) * 2u32.pow(hops.min(4)),
            absent_since: HashMap::new(),
            present: HashMap::new(),
            attached: HashSet::new(),
        }
    }

    #[cfg(test)]
    pub(crate) fn dwell(&self) -> Duration {
        self.dwell
    }

    /// The relay took `link` at `now`.
    pub(crate) fn on_attached(&mut self, link: LinkId, now: Instant) {
        self.attached.insert(link);
        if !self.is_present(link) {
            self.absent_since.entry(link).or_insert(now);
        }
    }

    /// The relay refused `link` (it counts as one where its peer is away).
    pub(crate) fn on_refused(&mut self, link: LinkId, now: Instant) {
        self.absent_since.entry(link).or_insert(now);
        self.attached.remove(&link);
    }

    pub(crate) fn on_present(&mut self, link: LinkId) {
        self.present.insert(link, true);
        self.absent_since.remove(&link);
    }

    /// The peer of `link` left at `now`; whether the link is attached
    /// here (then its flows go on, the relay holds them for the peer).
    pub(crate) fn on_absent(&mut self, link: LinkId, now: Instant) -> bool {
        self.present.insert(link, false);
        self.absent_since.insert(link, now);
        self.attached.contains(&link)
    }

    pub(crate) fn is_present(&self, link: LinkId) -> bool {
        self.present.get(&link).copied().unwrap_or(false)
    }

    /// The links whose peer is present.
    pub(crate) fn present(&self) -> impl Iterator<Item = LinkId> + '_ {
        self.present.iter().filter(|(_, p)| **p).map(|(id, _)| *id)
    }

    /// Whether every one of `links` has waited for its peer for the dwell.
    pub(crate) fn stranded<'a>(
        &self,
        mut links: impl Iterator<Item = &'a LinkId>,
        now: Instant,
    ) -> bool {
        links.all(|id| {
            self.absent_since
                .get(id)
                .is_some_and(|t| now.saturating_duration_since(*t) >= self.dwell)
        })
    }
}

/// Side A's handshakes started and still unanswered, oldest first, at
/// most a few: so the late answer to a handshake it since retried (a busy
/// peer or relay answers after the retry interval) still completes one.
#[derive(Debug)]
pub(crate) struct Pending<H> {
    started: VecDeque<H>,
    cap: usize,
}

impl<H> Pending<H> {
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            started: VecDeque::new(),
            cap,
        }
    }

    /// Keeps `handshake` until it is answered, forgetting the oldest
    /// beyond the cap.
    pub(crate) fn start(&mut self, handshake: H) {
        if self.started.len() >= self.cap {
            self.started.pop_front();
        }
        self.started.push_back(handshake);
    }

    /// Offers an answer to each handshake, oldest first (`complete` uses
    /// one up, as Noise does), until one takes it: that one's result. The
    /// ones before it are forgotten (their answers came first, or never
    /// will), the later ones kept. `Err` with the last refusal when none
    /// takes it; `Ok(None)` when none was pending.
    pub(crate) fn complete<S, E>(
        &mut self,
        mut complete: impl FnMut(H) -> Result<S, E>,
    ) -> Result<Option<S>, E> {
        let mut refused = None;
        while let Some(started) = self.started.pop_front() {
            match complete(started) {
                Ok(session) => return Ok(Some(session)),
                Err(e) => refused = Some(e),
            }
        }
        refused.map_or(Ok(None), Err)
    }

    /// Forgets the newest (it was never sent).
    pub(crate) fn cancel_newest(&mut self) {
        self.started.pop_back();
    }

    pub(crate) fn clear(&mut self) {
        self.started.clear();
    }

    /// How many are pending.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.started.len()
    }
}
