//! Relay sessions: one QUIC connection per relay, carrying all the links
//! this agent holds on it, reconnecting with jittered exponential backoff.
//!
//! Per link, the end-to-end Noise session outlives connections: after a
//! reconnect side A asks side B (sealed, so only B can answer) whether it
//! still holds the session; if so the link's flows resume on it, otherwise
//! a new handshake starts a new session and the old flows are reset (a
//! nonce is never reused). Side B takes the session of a handshake it
//! answered only once side A seals something under it, so a handshake
//! message replayed by a relay never replaces a working session.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use comsat_protocol::limits::MAX_FLOW_ID;
use comsat_protocol::link::{LinkControl, MAX_ACKS_PER_MESSAGE};
use comsat_protocol::msg::{
    AgentToRelay, ControlMessage, FrameDecoder, PeerFrame, RelayToAgent, make_hello,
};
use comsat_protocol::noise::{self, ExpectResponse, Opener, Sealer, Session};
use comsat_protocol::record::{
    FLOW_HEADER_LEN, FlowHeader, RECORD_HEADER_LEN, RecordHeader, RecordKind,
};
use comsat_protocol::record::{split_flow_id, wire_flow_id};
use comsat_protocol::replay::PeerFlows;
use comsat_protocol::{
    FlowId, HELLO_EXPORTER_LABEL, HELLO_EXPORTER_LEN, LinkId, NodeId, NoiseSecretKey, Side,
    SigningKey,
};
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio::time::Instant;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::config::{LinkConfig, LocalRole, RelayEndpoint};
use crate::defaults;
use crate::flow::{self, Flow, STREAM_FAILED};
use crate::lane::{Busy, Lane, Runtimes};
use crate::local;
use crate::lock;
use crate::metrics::Metrics;

/// Handshakes side B answered and keeps until side A confirms one: a few,
/// so a retried or duplicated handshake still finds its answer.
const CANDIDATES: usize = 4;

/// What the agent's tasks share.
pub(crate) struct Shared {
    pub(crate) node_id: NodeId,
    pub(crate) signing: SigningKey,
    pub(crate) noise: NoiseSecretKey,
    pub(crate) metrics: Metrics,
    /// Replay budget of the whole agent, in KiB of unacknowledged records.
    pub(crate) budget: Arc<Semaphore>,
    /// How long a lane stays up without flows.
    pub(crate) lane_idle: Duration,
    /// What this agent states in its Noise handshakes.
    pub(crate) noise_params: noise::Params,
    /// Messages that fail to decrypt under one session before it is
    /// replaced ([`defaults::MAX_FORGERIES`]).
    pub(crate) max_forgeries: u64,
}

/// A link's end-to-end session, its link-control keys and sequence
/// numbers, and the flows the peer opened in it.
pub(crate) struct LinkSession {
    pub(crate) noise: Session,
    control: Mutex<(Sealer, Opener)>,
    send_seq: AtomicU64,
    recv_last: Mutex<Option<u64>>,
    /// Flow ids the peer opened in this session, by generation: each is
    /// accepted once, so a recorded flow written again by a relay never
    /// dials the target a second time nor makes this side seal under a
    /// nonce it used.
    seen: Mutex<PeerFlows>,
    /// The link's flow counter when the session began: this side's flows
    /// count their generations from there.
    flow_base: u64,
    /// Messages that failed to decrypt under this session.
    forgeries: AtomicU64,
}

impl LinkSession {
    fn new(noise: Session, flow_base: u64) -> Arc<Self> {
        Arc::new(Self {
            control: Mutex::new(noise.control()),
            noise,
            send_seq: AtomicU64::new(0),
            recv_last: Mutex::new(None),
            seen: Mutex::default(),
            flow_base,
            forgeries: AtomicU64::new(0),
        })
    }

    fn seal(&self, msg: &LinkControl) -> Option<PeerFrame> {
        let seq = self.send_seq.fetch_add(1, Ordering::Relaxed);
        let plain = msg.encode().ok()?;
        let ciphertext = lock(&self.control).0.seal_control(seq, &plain).ok()?;
        Some(PeerFrame::Sealed { seq, ciphertext })
    }

    /// Opens a sealed message; refuses a `seq` not above the last one
    /// (`Ok(None)`: nothing was decrypted) and one that fails to decrypt
    /// (`Err`).
    fn open(&self, seq: u64, ciphertext: &[u8]) -> Result<Option<LinkControl>, ()> {
        let mut last = lock(&self.recv_last);
        if last.is_some_and(|l| seq <= l) {
            return Ok(None);
        }
        let plain = lock(&self.control)
            .1
            .open_control(seq, ciphertext)
            .map_err(|_| ())?;
        let Ok(msg) = LinkControl::decode(&plain) else {
            return Ok(None);
        };
        *last = Some(seq);
        Ok(Some(msg))
    }
}

/// A link that is ready to carry flows: attached on `conn` with an
/// end-to-end session (whose peer may be away for now: the relay then holds
/// what is sent until it is back).
#[derive(Clone)]
pub(crate) struct Ready {
    pub(crate) session: Arc<LinkSession>,
    pub(crate) conn: quinn::Connection,
    /// Increases every time the link becomes ready.
    pub(crate) epoch: u64,
}

/// The live state of one link.
pub(crate) struct LinkRt {
    pub(crate) cfg: LinkConfig,
    pub(crate) role: LocalRole,
    pub(crate) flow_timeout: Duration,
    pub(crate) ready: watch::Sender<Option<Ready>>,
    session: Mutex<Option<Arc<LinkSession>>>,
    /// Side B: the sessions of the last handshakes it answered (at most
    /// [`CANDIDATES`]), each until side A proves it holds it too (a sealed
    /// message or a flow's `Open` under it). Only then does one replace
    /// `session`: a handshake message replayed by a relay is answered,
    /// never confirmed, and tears nothing down. With the connection each
    /// arrived on.
    candidates: Mutex<VecDeque<(Arc<LinkSession>, quinn::Connection)>>,
    pending: Mutex<Option<ExpectResponse>>,
    resume_sent: Mutex<Option<Instant>>,
    epoch: AtomicU64,
    /// The peer confirmed the current session since it last (re)appeared.
    peer_confirmed: AtomicBool,
    /// The relay ended the link because its grant expired, and it was not
    /// attached since: local connections are refused at once.
    expired: AtomicBool,
    /// The session met too many forgeries: side A starts a new handshake,
    /// side B asks side A to, at the next handshake retry.
    renew: AtomicBool,
    /// Flows this side opened on the link, all sessions together.
    next_flow: AtomicU64,
    flows: Mutex<HashMap<FlowId, Arc<Flow>>>,
    acks: Mutex<HashMap<FlowId, u64>>,
    /// Wakes the relay session that carries the link (it changes when the
    /// link moves to another relay list).
    ack_notify: Mutex<Arc<AckWake>>,
    /// The grant generation attached with (it changes when the controller
    /// re-grants the link, e.g. on other relays; flows go on).
    generation: AtomicU64,
    /// The lane connection the link is attached on, if any: its flows
    /// start there, and move there when it comes up ([`crate::lane`]).
    pub(crate) lane: watch::Sender<Option<quinn::Connection>>,
    /// The flows of the link's group (its lane is up while it has some).
    busy: Mutex<Arc<Busy>>,
    /// Where the link's flows run, if it has a lane: on the lane's thread
    /// while their stream rides the lane, else on the main runtime.
    pub(crate) runtimes: Option<Runtimes>,
    /// Flows the peer opened that are being set up (their target dialled):
    /// another stream of one of them waits for it ([`accept_flow`]).
    opening: Mutex<std::collections::HashSet<FlowId>>,
}

/// A flow id claimed while its flow is being set up; released on drop.
struct Opening<'a> {
    link: &'a LinkRt,
    id: FlowId,
}

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        lock(&self.link.opening).remove(&self.id);
    }
}

impl LinkRt {
    pub(crate) fn new(
        cfg: LinkConfig,
        role: LocalRole,
        flow_timeout: Duration,
        ack_notify: Arc<AckWake>,
        runtimes: Option<Runtimes>,
    ) -> Self {
        Self {
            role,
            flow_timeout,
            ready: watch::channel(None).0,
            session: Mutex::new(None),
            candidates: Mutex::default(),
            pending: Mutex::new(None),
            resume_sent: Mutex::new(None),
            epoch: AtomicU64::new(0),
            peer_confirmed: AtomicBool::new(false),
            expired: AtomicBool::new(false),
            renew: AtomicBool::new(false),
            next_flow: AtomicU64::new(0),
            generation: AtomicU64::new(cfg.generation),
            flows: Mutex::default(),
            acks: Mutex::default(),
            ack_notify: Mutex::new(ack_notify),
            lane: watch::channel(None).0,
            busy: Mutex::default(),
            opening: Mutex::default(),
            runtimes,
            cfg,
        }
    }

    /// The grant generation to attach with.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// The link's lane, while it is up.
    pub(crate) fn lane_conn(&self) -> Option<quinn::Connection> {
        self.lane
            .borrow()
            .as_ref()
            .filter(|c| c.close_reason().is_none())
            .cloned()
    }

    /// The flow count of the link's group.
    pub(crate) fn busy(&self) -> Arc<Busy> {
        lock(&self.busy).clone()
    }

    /// Moves the link to the relay session woken by `notify` (whose flows
    /// `busy` counts), attaching with `generation` from now on.
    pub(crate) fn rebind(&self, notify: Arc<AckWake>, busy: &Arc<Busy>, generation: u64) {
        *lock(&self.ack_notify) = notify;
        *lock(&self.busy) = busy.clone();
        self.generation.store(generation, Ordering::Relaxed);
    }

    fn wake_acks(&self, when: AckWhen) {
        lock(&self.ack_notify).wake(when);
    }

    /// Marks the link down after its relay session was stopped from
    /// outside (reconfiguration), closing that session's connection.
    pub(crate) fn detach(&self, metrics: &Metrics) {
        if let Some(ready) = self.ready.borrow().clone() {
            ready.conn.close(0u32.into(), b"reconfigured");
        }
        self.set_ready(None, metrics);
        *self.pending() = None;
    }

    /// Ends the link for good (it was deleted): every flow is reset.
    pub(crate) fn shut(&self, metrics: &Metrics) {
        let flows: Vec<_> = lock(&self.flows).drain().map(|(_, f)| f).collect();
        for f in flows {
            f.reset();
        }
        self.detach(metrics);
    }

    fn set_ready(&self, conn: Option<&quinn::Connection>, metrics: &Metrics) {
        let value = match (conn, lock(&self.session).clone()) {
            (Some(conn), Some(session)) => Some(Ready {
                session,
                conn: conn.clone(),
                epoch: self.epoch.fetch_add(1, Ordering::Relaxed) + 1,
            }),
            _ => None,
        };
        let was = self.ready.borrow().is_some();
        let now = value.is_some();
        if now {
            self.expired.store(false, Ordering::Relaxed);
        }
        self.ready.send_replace(value);
        if now {
            // Acks that waited for the link go out now.
            self.wake_acks(AckWhen::Soon);
        }
        match (was, now) {
            (false, true) => {
                metrics.links_ready.increment(1.0);
                info!(link = %self.cfg.name, "link ready: attached, end-to-end session up");
            }
            (true, false) => {
                metrics.links_ready.decrement(1.0);
                info!(link = %self.cfg.name, "link down");
            }
            _ => {}
        }
    }

    /// Installs a new session: every flow of the old one is reset.
    fn install_session(
        &self,
        session: Arc<LinkSession>,
        conn: &quinn::Connection,
        metrics: &Metrics,
    ) {
        let old = lock(&self.session).replace(session);
        if old.is_some() {
            let flows: Vec<_> = lock(&self.flows).drain().map(|(_, f)| f).collect();
            if !flows.is_empty() {
                info!(link = %self.cfg.name, flows = flows.len(), "new session: resetting the old session's flows");
            }
            for f in flows {
                f.reset();
            }
            lock(&self.acks).clear();
        }
        *lock(&self.resume_sent) = None;
        self.peer_confirmed.store(true, Ordering::Relaxed);
        self.set_ready(Some(conn), metrics);
    }

    /// Side B: holds the session of a handshake it answered until side A
    /// confirms it ([`Self::confirm`]). The oldest of [`CANDIDATES`] never
    /// confirmed is dropped: a replayed handshake, or one side A gave up.
    fn propose_session(&self, session: Session, conn: &quinn::Connection, metrics: &Metrics) {
        let mut candidates = lock(&self.candidates);
        if candidates.len() >= CANDIDATES {
            candidates.pop_front();
            metrics.peer_refused("unconfirmed_handshake");
            debug!(link = %self.cfg.name, "an answered handshake was never confirmed by the peer");
        }
        let flow_base = self.next_flow.load(Ordering::Relaxed);
        candidates.push_back((LinkSession::new(session, flow_base), conn.clone()));
    }

    /// Side B: side A proved it holds `candidate` (it sealed something
    /// under it): it becomes the link's session, and every other answered
    /// handshake is forgotten.
    fn confirm(&self, candidate: &Arc<LinkSession>, metrics: &Metrics) {
        let mut candidates = lock(&self.candidates);
        let Some(at) = candidates
            .iter()
            .position(|(c, _)| Arc::ptr_eq(c, candidate))
        else {
            return;
        };
        let confirmed = candidates.remove(at);
        let unconfirmed = candidates.len();
        candidates.clear();
        drop(candidates);
        if unconfirmed > 0 {
            metrics.peer_refused("unconfirmed_handshake");
        }
        if let Some((session, conn)) = confirmed {
            self.install_session(session, &conn, metrics);
            info!(link = %self.cfg.name, "new end-to-end session confirmed by the peer");
        }
    }

    /// The sessions a message from the peer may be sealed under: the
    /// current one, then (side B) those of the handshakes it answered
    /// since, newest first.
    fn sessions(&self) -> (Option<Arc<LinkSession>>, Vec<Arc<LinkSession>>) {
        let current = lock(&self.session).clone();
        let candidates = lock(&self.candidates)
            .iter()
            .rev()
            .map(|(c, _)| c.clone())
            .collect();
        (current, candidates)
    }

    /// Counts a message that failed to decrypt under the current session;
    /// at `max` of them, the session is to be replaced.
    fn forged(&self, max: u64, metrics: &Metrics) {
        let Some(session) = lock(&self.session).clone() else {
            return;
        };
        let n = session.forgeries.fetch_add(1, Ordering::Relaxed) + 1;
        if n == max {
            metrics.peer_refused("forgeries");
            warn!(link = %self.cfg.name, forgeries = n, "messages that fail to decrypt keep coming through the relay: replacing the end-to-end session");
            self.renew.store(true, Ordering::Relaxed);
        }
    }

    /// Drops the session and resets its flows (revocation).
    fn drop_session(&self, metrics: &Metrics) {
        lock(&self.session).take();
        lock(&self.candidates).clear();
        for (_, f) in lock(&self.flows).drain() {
            f.reset();
        }
        self.set_ready(None, metrics);
    }

    /// A flow (generation, id) never used before in `session` by this
    /// side, with the id as stream headers carry it: side A uses odd ids,
    /// side B even ones, so both may open flows; when a generation's ids
    /// are used, the next generation takes them again under new keys. Ids
    /// go on counting across sessions, so a stream of an earlier session
    /// never meets a flow of this one.
    fn alloc_flow_id(&self, session: &LinkSession, metrics: &Metrics) -> Option<(u32, FlowId)> {
        let n = self.next_flow.fetch_add(1, Ordering::Relaxed);
        let per_generation = session.noise.params().flow_ids_per_generation();
        let generation =
            u32::try_from(n.saturating_sub(session.flow_base) / per_generation).ok()?;
        let k = u32::try_from(n % per_generation).ok()?;
        let id = k.checked_mul(2)?.checked_add(match self.cfg.side {
            Side::A => 1,
            Side::B => 2,
        })?;
        if id >= MAX_FLOW_ID {
            return None;
        }
        if n.saturating_sub(session.flow_base) % per_generation == 0 && generation > 0 {
            metrics.rekeyed("flow_ids");
            info!(link = %self.cfg.name, generation, "flow ids of the last generation used: a new generation starts, under new keys");
        }
        Some((generation, wire_flow_id(generation, id)))
    }

    /// Schedules a cumulative acknowledgement to the peer, sent `when`.
    pub(crate) fn queue_ack(&self, flow: FlowId, upto: u64, when: AckWhen) {
        merge_ack(&mut lock(&self.acks), flow, upto);
        self.wake_acks(when);
    }

    pub(crate) fn remove_flow(&self, id: FlowId) {
        lock(&self.flows).remove(&id);
    }

    /// Seals and sends pending acks, if the link is ready; counts the
    /// messages sent.
    fn flush_acks(&self, ctl: &mpsc::Sender<AgentToRelay>, metrics: &Metrics) {
        let Some(ready) = self.ready.borrow().clone() else {
            return;
        };
        let acks: Vec<(FlowId, u64)> = lock(&self.acks).drain().collect();
        for chunk in acks.chunks(MAX_ACKS_PER_MESSAGE) {
            if let Some(frame) = ready.session.seal(&LinkControl::Acks(chunk.to_vec())) {
                if ctl
                    .try_send(AgentToRelay::Peer {
                        link_id: self.cfg.link_id,
                        frame,
                    })
                    .is_ok()
                {
                    metrics.ack_messages.increment(1);
                } else {
                    // Put them back: a lazy flush retries (the queue is
                    // full now).
                    let mut pending = lock(&self.acks);
                    for (flow, upto) in chunk {
                        merge_ack(&mut pending, *flow, *upto);
                    }
                    drop(pending);
                    self.wake_acks(AckWhen::Lazy);
                }
            }
        }
    }

    fn send_sealed(&self, msg: &LinkControl, ctl: &mpsc::Sender<AgentToRelay>) {
        let Some(session) = lock(&self.session).clone() else {
            return;
        };
        if let Some(frame) = session.seal(msg) {
            let _ = ctl.try_send(AgentToRelay::Peer {
                link_id: self.cfg.link_id,
                frame,
            });
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Option<ExpectResponse>> {
        lock(&self.pending)
    }
}

/// How soon an acknowledgement must reach the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AckWhen {
    /// The peer waits for it (its flow's end, a resend, a replay window
    /// filling up): within [`defaults::ACK_DELAY`].
    Soon,
    /// It only lets the peer forget records it keeps for a resend: within
    /// [`defaults::ACK_LAZY`], so a chatty flow costs a few control
    /// messages a second, not one per record.
    Lazy,
}

/// Wakes a relay session to send its links' acknowledgements.
#[derive(Debug, Default)]
pub(crate) struct AckWake {
    soon: Notify,
    lazy: Notify,
    /// A lazy flush is due: later lazy acks join it without a wake-up.
    lazy_armed: AtomicBool,
}

impl AckWake {
    fn wake(&self, when: AckWhen) {
        match when {
            AckWhen::Soon => self.soon.notify_one(),
            AckWhen::Lazy => {
                if !self.lazy_armed.swap(true, Ordering::AcqRel) {
                    self.lazy.notify_one();
                }
            }
        }
    }
}

/// Keeps the highest acknowledged position per flow.
fn merge_ack(acks: &mut HashMap<FlowId, u64>, flow: FlowId, upto: u64) {
    let e = acks.entry(flow).or_insert(upto);
    *e = (*e).max(upto);
}

/// Jittered exponential backoff.
pub(crate) struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// Starts at [`defaults::RECONNECT_INITIAL`], up to `max`.
    pub(crate) fn new(max: Duration) -> Self {
        Self {
            next: defaults::RECONNECT_INITIAL,
            max,
        }
    }

    pub(crate) fn reset(&mut self) {
        self.next = defaults::RECONNECT_INITIAL;
    }

    /// A delay in [d/2, d], then doubles d up to the cap.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (d * 2).min(self.max);
        let half = d / 2;
        half + half.mul_f64(rand::random::<f64>())
    }
}

/// How a relay connection ended.
enum Ended {
    /// It closed or failed; start again from the first relay of the list.
    Closed,
    /// The relay went silent (idle timeout): it is probably gone, so start
    /// with the next relay of the list. Its peers, noticing the same
    /// silence, do the same.
    Silent,
    /// Every link's peer stayed away: try the next relay of the list.
    Hop,
    /// The relay is draining and told us to go: move every link to the
    /// next relay of the list at once (the peers were told the same).
    Drained,
}

/// Keeps `links` on the first relay of `relays` that answers, forever;
/// `connection` names their connection in logs (`default` when none).
/// With `lanes`, each relay connection has a lane beside it where the
/// relay offers one ([`crate::lane`]).
pub(crate) async fn relay_loop(
    shared: Arc<Shared>,
    relays: Vec<RelayEndpoint>,
    connection: Option<String>,
    links: HashMap<LinkId, Arc<LinkRt>>,
    ack_notify: Arc<AckWake>,
    lanes: Option<(Runtimes, Arc<Busy>)>,
) {
    let candidates: Vec<(RelayEndpoint, quinn::ClientConfig)> = relays
        .iter()
        .filter_map(|r| match crate::tls::client_config(r) {
            Ok(c) => Some((r.clone(), c)),
            Err(e) => {
                tracing::error!(relay = %r.addr, error = %e, "cannot configure TLS for relay; skipping it");
                None
            }
        })
        .collect();
    if candidates.is_empty() {
        tracing::error!("no usable relay for these links; they stay down");
        return;
    }
    let mut backoff = Backoff::new(defaults::RECONNECT_MAX);
    let started = Instant::now();
    let mut i = 0;
    // Hops in a row without meeting a peer: each doubles the dwell.
    let mut hops = 0u32;
    // Relays in a row that told us to go away: once every relay of the
    // list has, wait (with backoff) before trying them again.
    let mut drained = 0usize;
    loop {
        let (relay, client) = &candidates[i];
        let span = info_span!(
            "relay",
            addr = %relay.addr,
            connection = %connection.as_deref().unwrap_or("default")
        );
        let can_hop = candidates.len() > 1;
        let ended = connect_and_serve(
            &shared,
            relay,
            client,
            &links,
            &ack_notify,
            (can_hop, hops),
            lanes.as_ref(),
        )
        .instrument(span)
        .await;
        for link in links.values() {
            link.set_ready(None, &shared.metrics);
            *link.pending() = None;
        }
        if !matches!(ended, Ok(Ended::Drained)) {
            drained = 0;
        }
        match ended {
            Ok(Ended::Drained) => {
                drained += 1;
                i = (i + 1) % candidates.len();
                shared.metrics.relay_drains.increment(1);
                info!(from = %relay.addr, to = %candidates[i].0.addr, "relay is draining; moving to the next relay");
                if drained < candidates.len() {
                    hops = 0;
                    continue;
                }
                drained = 0;
            }
            Ok(Ended::Hop) => {
                hops = hops.saturating_add(1);
                i = (i + 1) % candidates.len();
                info!(from = %relay.addr, to = %candidates[i].0.addr, "peers absent here; trying the next relay");
                continue;
            }
            Ok(Ended::Silent) if candidates.len() > 1 => {
                backoff.reset();
                hops = 0;
                i = (i + 1) % candidates.len();
                info!(from = %relay.addr, to = %candidates[i].0.addr, "relay went silent; trying the next relay first");
                continue;
            }
            Ok(Ended::Closed | Ended::Silent) => {
                backoff.reset();
                hops = 0;
                i = 0;
            }
            Err(e) => {
                shared.metrics.connect_failures.increment(1);
                if matches!(e, ConnectError::Refused(_))
                    && started.elapsed() < defaults::NEW_LINK_GRACE
                {
                    // A link the controller just created races its grant
                    // to the relay; the retry finds it there.
                    info!(relay = %relay.addr, error = %e, "relay connection refused; a new link's grant may still be on its way to the relay: retrying");
                } else {
                    warn!(relay = %relay.addr, error = %e, "relay connection failed");
                }
                i = (i + 1) % candidates.len();
            }
        }
        if i == 0 {
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }
}

/// Connects, authenticates and serves until the connection ends. `Err` if
/// it was never established.
async fn connect_and_serve(
    shared: &Arc<Shared>,
    relay: &RelayEndpoint,
    client: &quinn::ClientConfig,
    links: &HashMap<LinkId, Arc<LinkRt>>,
    ack_notify: &AckWake,
    (can_hop, hops): (bool, u32),
    lanes: Option<&(Runtimes, Arc<Busy>)>,
) -> Result<Ended, ConnectError> {
    let (endpoint, conn, send, recv, decoder) =
        connect(shared, &relay.addr, &relay.server_name, client).await?;
    shared.metrics.connects.increment(1);
    info!("connected to relay");
    // Ends with this connection (dropped on return).
    let _lane = lanes.and_then(|(rt, busy)| Lane::start(shared, relay, client, links, rt, busy));
    let mut ended = serve(
        shared, &conn, send, recv, decoder, links, ack_notify, can_hop, hops,
    )
    .await;
    if matches!(ended, Ended::Closed)
        && matches!(conn.close_reason(), Some(quinn::ConnectionError::TimedOut))
    {
        ended = Ended::Silent;
    }
    let stats = conn.stats();
    info!(
        sent_packets = stats.path.sent_packets,
        lost_packets = stats.path.lost_packets,
        congestion_events = stats.path.congestion_events,
        rtt_us = stats.path.rtt.as_micros() as u64,
        "relay connection ended"
    );
    conn.close(0u32.into(), b"bye");
    endpoint.close(0u32.into(), b"bye");
    Ok(ended)
}

/// Connects to the relay at `addr` and authenticates (`Hello`).
pub(crate) async fn connect(
    shared: &Shared,
    addr: &str,
    server_name: &str,
    client: &quinn::ClientConfig,
) -> Result<
    (
        quinn::Endpoint,
        quinn::Connection,
        quinn::SendStream,
        quinn::RecvStream,
        FrameDecoder,
    ),
    ConnectError,
> {
    let addr = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| format!("resolve {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("resolve {addr}: no address"))?;
    let bind: std::net::SocketAddr = if addr.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let socket = crate::udp::bind(bind).map_err(|e| format!("bind {bind}: {e}"))?;
    let runtime = quinn::default_runtime().ok_or("no async runtime")?;
    let endpoint = quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime)
        .map_err(|e| format!("bind {bind}: {e}"))?;
    let (conn, send, recv, decoder) = tokio::time::timeout(
        defaults::CONNECT_TIMEOUT,
        establish(shared, &endpoint, client, addr, server_name),
    )
    .await
    .map_err(|_| ConnectError::from("timed out connecting"))??;
    Ok((endpoint, conn, send, recv, decoder))
}

type Established = (
    quinn::Connection,
    quinn::SendStream,
    quinn::RecvStream,
    FrameDecoder,
);

async fn establish(
    shared: &Shared,
    endpoint: &quinn::Endpoint,
    client: &quinn::ClientConfig,
    addr: std::net::SocketAddr,
    server_name: &str,
) -> Result<Established, ConnectError> {
    let conn = endpoint
        .connect_with(client.clone(), addr, server_name)
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let mut exporter = [0u8; HELLO_EXPORTER_LEN];
    conn.export_keying_material(&mut exporter, HELLO_EXPORTER_LABEL, b"")
        .map_err(|_| "TLS exporter unavailable".to_owned())?;
    let mut buf = Vec::new();
    make_hello(shared.node_id, &shared.signing, &exporter)
        .write_to(&mut buf)
        .map_err(|e| e.to_string())?;
    send.write_all(&buf).await.map_err(|e| e.to_string())?;
    let mut decoder = FrameDecoder::new();
    match read_message(&mut recv, &mut decoder).await {
        Ok(Some(RelayToAgent::Welcome)) => Ok((conn, send, recv, decoder)),
        // A refusing relay closes the connection; the end of its control
        // stream (dropped first) can arrive before the close does.
        Ok(None) => Err(ConnectError::Refused(
            "it ended the control stream before its Welcome".into(),
        )),
        Ok(Some(_)) => Err("relay sent something other than Welcome".into()),
        Err(e) => Err(ConnectError::Refused(e)),
    }
}

/// Why a relay connection was never established.
#[derive(Debug)]
pub(crate) enum ConnectError {
    /// The relay closed it instead of welcoming us: it holds no grant
    /// naming this agent (yet), is full, or refused for another reason it
    /// does not tell.
    Refused(String),
    /// Anything else: resolving, binding, TLS, a timeout.
    Other(String),
}

impl From<String> for ConnectError {
    fn from(e: String) -> Self {
        Self::Other(e)
    }
}

impl From<&str> for ConnectError {
    fn from(e: &str) -> Self {
        Self::Other(e.to_owned())
    }
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Refused(e) => write!(f, "relay refused the connection: {e}"),
            Self::Other(e) => f.write_str(e),
        }
    }
}

pub(crate) async fn read_message(
    recv: &mut quinn::RecvStream,
    decoder: &mut FrameDecoder,
) -> Result<Option<RelayToAgent>, String> {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(msg) = decoder
            .next_message::<RelayToAgent>()
            .map_err(|e| e.to_string())?
        {
            return Ok(Some(msg));
        }
        match recv.read(&mut buf).await.map_err(|e| e.to_string())? {
            Some(n) => decoder.extend(&buf[..n]),
            None if decoder.has_partial() => return Err("stream ended inside a frame".into()),
            None => return Ok(None),
        }
    }
}

pub(crate) async fn write_control(
    mut send: quinn::SendStream,
    mut rx: mpsc::Receiver<AgentToRelay>,
) {
    let mut buf = Vec::new();
    while let Some(msg) = rx.recv().await {
        buf.clear();
        let _ = msg.write_to(&mut buf);
        while let Ok(more) = rx.try_recv() {
            let _ = more.write_to(&mut buf);
        }
        if send.write_all(&buf).await.is_err() {
            return;
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    shared: &Arc<Shared>,
    conn: &quinn::Connection,
    send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    mut decoder: FrameDecoder,
    links: &HashMap<LinkId, Arc<LinkRt>>,
    ack_notify: &AckWake,
    can_hop: bool,
    hops: u32,
) -> Ended {
    let (ctl, rx) = mpsc::channel(defaults::CONTROL_QUEUE);
    let writer = tokio::spawn(write_control(send, rx));
    // Every link attaches; with more links than the queue holds, wait for
    // the writer rather than drop an attach.
    for link in links.values() {
        let attach = AgentToRelay::Attach {
            link_id: link.cfg.link_id,
            generation: link.generation.load(Ordering::Relaxed),
            side: link.cfg.side,
        };
        if ctl.send(attach).await.is_err() {
            break;
        }
    }
    let acceptor = tokio::spawn(accept_flows(
        shared.clone(),
        conn.clone(),
        links.clone(),
        false,
    ));
    let mut retry = tokio::time::interval(defaults::HANDSHAKE_RETRY);
    retry.tick().await;
    // Links whose peer is away on this relay, since when. When all of them
    // have waited longer than the dwell, the group tries the next relay of
    // its list: both agents follow the same list, and the randomized dwell
    // lets one of two agents that missed each other arrive first.
    let mut absent_since: HashMap<LinkId, Instant> = HashMap::new();
    let dwell = defaults::PEER_DWELL.mul_f64(1.0 + rand::random::<f64>()) * 2u32.pow(hops.min(4));
    let mut hop_check = tokio::time::interval(Duration::from_millis(500));
    let mut ended = Ended::Closed;
    // Links whose peer is present on this connection.
    let mut present: HashMap<LinkId, bool> = HashMap::new();
    // Links the relay accepted on this connection.
    let mut attached: std::collections::HashSet<LinkId> = std::collections::HashSet::new();
    // Links whose attach was refused for a reason that may pass: when to
    // send it again, and the delay after that.
    let mut reattach: HashMap<LinkId, (Instant, Duration)> = HashMap::new();
    // When the lazy acks queued since the last flush go out. One armed on
    // an earlier connection died with it: the next lazy ack arms anew.
    let mut lazy_due: Option<Instant> = None;
    ack_notify.lazy_armed.store(false, Ordering::Release);
    loop {
        let msg = tokio::select! {
            m = read_message(&mut recv, &mut decoder) => m,
            () = ack_notify.soon.notified() => {
                // Let acks of a burst of records gather into one message.
                tokio::time::sleep(defaults::ACK_DELAY).await;
                for link in links.values() {
                    link.flush_acks(&ctl, &shared.metrics);
                }
                continue;
            }
            () = ack_notify.lazy.notified(), if lazy_due.is_none() => {
                lazy_due = Some(Instant::now() + defaults::ACK_LAZY);
                continue;
            }
            () = tokio::time::sleep_until(lazy_due.unwrap_or_else(Instant::now)),
                if lazy_due.is_some() =>
            {
                lazy_due = None;
                // Disarmed first: an ack queued from here on wakes anew.
                ack_notify.lazy_armed.store(false, Ordering::Release);
                for link in links.values() {
                    link.flush_acks(&ctl, &shared.metrics);
                }
                continue;
            }
            _ = hop_check.tick(), if can_hop => {
                let stranded = links.keys().all(|id| {
                    absent_since.get(id).is_some_and(|t| t.elapsed() >= dwell)
                });
                if stranded {
                    ended = Ended::Hop;
                    break;
                }
                continue;
            }
            _ = retry.tick() => {
                for link in links.values() {
                    if link.renew.swap(false, Ordering::Relaxed) {
                        match link.cfg.side {
                            Side::A => initiate(shared, link, &ctl),
                            Side::B => link.send_sealed(&LinkControl::Renew, &ctl),
                        }
                    }
                }
                for (id, (due, _)) in &reattach {
                    if *due <= Instant::now() {
                        if let Some(link) = links.get(id) {
                            debug!(link = %link.cfg.name, "attaching again");
                            let _ = ctl.try_send(AgentToRelay::Attach {
                                link_id: *id,
                                generation: link.generation(),
                                side: link.cfg.side,
                            });
                        }
                    }
                }
                for (id, _) in present.iter().filter(|(_, p)| **p) {
                    if let Some(link) = links.get(id) {
                        if link.cfg.side == Side::A && !link.peer_confirmed.load(Ordering::Relaxed) {
                            let stale_resume = lock(&link.resume_sent)
                                .is_some_and(|t| t.elapsed() >= defaults::HANDSHAKE_RETRY);
                            let no_resume = lock(&link.resume_sent).is_none();
                            if stale_resume || no_resume {
                                initiate(shared, link, &ctl);
                            }
                        }
                    }
                }
                continue;
            }
        };
        let msg = match msg {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(e) => {
                debug!(error = %e, "control stream ended");
                break;
            }
        };
        match msg {
            RelayToAgent::Welcome => {}
            RelayToAgent::GoAway => {
                ended = Ended::Drained;
                break;
            }
            RelayToAgent::Attached { link_id } => {
                if let Some(link) = links.get(&link_id) {
                    debug!(link = %link.cfg.name, "attached");
                    attached.insert(link_id);
                    reattach.remove(&link_id);
                    if !present.get(&link_id).copied().unwrap_or(false) {
                        absent_since.entry(link_id).or_insert_with(Instant::now);
                    }
                    // With a session from before, flows can go on (the
                    // relay holds them until the peer is back).
                    link.set_ready(Some(conn), &shared.metrics);
                }
            }
            RelayToAgent::PeerPresent { link_id } => {
                let Some(link) = links.get(&link_id) else {
                    continue;
                };
                present.insert(link_id, true);
                absent_since.remove(&link_id);
                debug!(link = %link.cfg.name, "peer present");
                // The peer (re)joined, perhaps as a new incarnation: side A
                // checks that it still holds the session (Resume) and
                // replaces it (handshake) if it does not answer.
                link.peer_confirmed.store(false, Ordering::Relaxed);
                if link.cfg.side == Side::A {
                    if lock(&link.session).is_some() {
                        *lock(&link.resume_sent) = Some(Instant::now());
                        link.send_sealed(&LinkControl::Resume, &ctl);
                    } else {
                        initiate(shared, link, &ctl);
                    }
                }
            }
            RelayToAgent::PeerAbsent { link_id } => {
                let Some(link) = links.get(&link_id) else {
                    continue;
                };
                present.insert(link_id, false);
                absent_since.insert(link_id, Instant::now());
                *link.pending() = None;
                // Flows whose streams died with the peer's connection open
                // new ones (a new epoch), which the relay holds for it.
                if attached.contains(&link_id) {
                    link.set_ready(Some(conn), &shared.metrics);
                }
            }
            RelayToAgent::Peer { link_id, frame } => {
                let Some(link) = links.get(&link_id) else {
                    continue;
                };
                match frame {
                    PeerFrame::Handshake(msg) => handle_handshake(shared, link, conn, &ctl, &msg),
                    PeerFrame::Sealed { seq, ciphertext } => {
                        handle_sealed(shared, link, conn, &ctl, seq, &ciphertext);
                    }
                }
            }
            RelayToAgent::Error { link_id, code } => {
                use comsat_protocol::msg::ErrorCode;
                let name = links.get(&link_id).map_or("?", |l| l.cfg.name.as_str());
                if code == ErrorCode::Expired {
                    warn!(link = %name, "the link's grant expired: the relay ended it; its flows are reset and new connections refused until the controller renews the grant");
                } else {
                    warn!(link = %name, ?code, "relay refused the link");
                }
                // A relay that will not carry the link counts as one where
                // its peer is away.
                absent_since.entry(link_id).or_insert_with(Instant::now);
                if let Some(link) = links.get(&link_id) {
                    attached.remove(&link_id);
                    if matches!(code, ErrorCode::Revoked | ErrorCode::Expired) {
                        link.drop_session(&shared.metrics);
                        link.expired
                            .store(code == ErrorCode::Expired, Ordering::Relaxed);
                    } else {
                        link.set_ready(None, &shared.metrics);
                    }
                    // The grant may not have reached the relay yet (or a
                    // newer one reached us first), or the relay may have
                    // room again later: ask again, less and less often.
                    if matches!(
                        code,
                        ErrorCode::NotGranted
                            | ErrorCode::StaleGeneration
                            | ErrorCode::RelayFull
                            | ErrorCode::Expired
                    ) {
                        let next = reattach
                            .get(&link_id)
                            .map_or(defaults::REATTACH_INITIAL, |(_, d)| {
                                (*d * 2).min(defaults::REATTACH_MAX)
                            });
                        let wait = next.mul_f64(0.5 + rand::random::<f64>() / 2.0);
                        reattach.insert(link_id, (Instant::now() + wait, next));
                    }
                }
            }
        }
    }
    acceptor.abort();
    drop(ctl);
    let _ = writer.await;
    ended
}

fn handle_sealed(
    shared: &Shared,
    link: &LinkRt,
    conn: &quinn::Connection,
    ctl: &mpsc::Sender<AgentToRelay>,
    seq: u64,
    ciphertext: &[u8],
) {
    let (current, candidates) = link.sessions();
    let opened = current.map(|s| s.open(seq, ciphertext));
    let msg = match opened {
        Some(Ok(Some(msg))) => msg,
        _ => {
            // Side A seals under the session of its last handshake at once
            // (numbering from 0 again): the proof side B waits for before
            // it takes that session.
            let Some(msg) = candidates.into_iter().find_map(|c| {
                let msg = c.open(seq, ciphertext).ok().flatten()?;
                link.confirm(&c, &shared.metrics);
                Some(msg)
            }) else {
                debug!(link = %link.cfg.name, "sealed message refused (a replay, another session, or forged)");
                // Only what failed to decrypt counts (a replayed number is
                // refused before any decryption).
                if matches!(opened, Some(Err(()))) {
                    link.forged(shared.max_forgeries, &shared.metrics);
                }
                return;
            };
            msg
        }
    };
    match msg {
        LinkControl::Resume => {
            if link.cfg.side == Side::B {
                link.send_sealed(&LinkControl::ResumeOk, ctl);
                info!(link = %link.cfg.name, "session resumed");
                link.peer_confirmed.store(true, Ordering::Relaxed);
                link.set_ready(Some(conn), &shared.metrics);
            }
        }
        LinkControl::ResumeOk => {
            if link.cfg.side == Side::A {
                *lock(&link.resume_sent) = None;
                info!(link = %link.cfg.name, "session resumed");
                link.peer_confirmed.store(true, Ordering::Relaxed);
                link.set_ready(Some(conn), &shared.metrics);
            }
        }
        LinkControl::Renew => {
            if link.cfg.side == Side::A {
                info!(link = %link.cfg.name, "the peer asks for a new session");
                initiate(shared, link, ctl);
            }
        }
        LinkControl::Acks(acks) => {
            let flows = lock(&link.flows);
            for (id, upto) in acks {
                if let Some(f) = flows.get(&id) {
                    f.on_ack(upto);
                }
            }
        }
    }
}

fn initiate(shared: &Shared, link: &LinkRt, ctl: &mpsc::Sender<AgentToRelay>) {
    *lock(&link.resume_sent) = None;
    match noise::initiate_with_params(
        &shared.noise,
        &link.cfg.peer_noise_public_key,
        &link.cfg.link_id,
        shared.noise_params,
    ) {
        Ok((pending, msg)) => {
            *link.pending() = Some(pending);
            let _ = ctl.try_send(AgentToRelay::Peer {
                link_id: link.cfg.link_id,
                frame: PeerFrame::Handshake(msg),
            });
        }
        Err(e) => warn!(link = %link.cfg.name, error = %e, "cannot start Noise handshake"),
    }
}

fn handle_handshake(
    shared: &Shared,
    link: &LinkRt,
    conn: &quinn::Connection,
    ctl: &mpsc::Sender<AgentToRelay>,
    msg: &[u8],
) {
    match link.cfg.side {
        Side::B => {
            let (session, reply) = match noise::respond_with_params(
                &shared.noise,
                &link.cfg.peer_noise_public_key,
                &link.cfg.link_id,
                msg,
                shared.noise_params,
            ) {
                Ok(answered) => answered,
                Err(e) => {
                    warn!(link = %link.cfg.name, error = %e, "Noise handshake from peer refused");
                    return;
                }
            };
            let _ = ctl.try_send(AgentToRelay::Peer {
                link_id: link.cfg.link_id,
                frame: PeerFrame::Handshake(reply),
            });
            // Anyone who recorded side A's message can have it answered
            // again: the session counts once side A proves it holds it.
            link.propose_session(session, conn, &shared.metrics);
        }
        Side::A => {
            let Some(pending) = link.pending().take() else {
                debug!(link = %link.cfg.name, "unexpected handshake answer ignored");
                return;
            };
            let session = match pending.handle_response(msg) {
                Ok(session) => session,
                Err(e) => {
                    warn!(link = %link.cfg.name, error = %e, "Noise handshake answer refused");
                    return;
                }
            };
            // The answer proves side B holds the session; the first message
            // sealed under it proves the same to side B.
            let flow_base = link.next_flow.load(Ordering::Relaxed);
            link.install_session(LinkSession::new(session, flow_base), conn, &shared.metrics);
            // Until side B answers it, the session is not confirmed: without
            // an answer the retry starts another handshake.
            link.peer_confirmed.store(false, Ordering::Relaxed);
            *lock(&link.resume_sent) = Some(Instant::now());
            link.send_sealed(&LinkControl::Resume, ctl);
        }
    }
}

/// Accepts flows the peer opened (through the relay) on this connection
/// (a lane or not).
pub(crate) async fn accept_flows(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    links: HashMap<LinkId, Arc<LinkRt>>,
    lane: bool,
) {
    while let Ok((send, recv)) = conn.accept_bi().await {
        let shared = shared.clone();
        let links = links.clone();
        tokio::spawn(async move {
            if let Err(e) = accept_flow(&shared, &links, (send, recv), lane).await {
                debug!(error = %e, "incoming flow refused");
            }
        });
    }
}

async fn accept_flow(
    shared: &Shared,
    links: &HashMap<LinkId, Arc<LinkRt>>,
    (mut send, mut recv): (quinn::SendStream, quinn::RecvStream),
    lane: bool,
) -> Result<(), String> {
    let refuse = |send: &mut quinn::SendStream, recv: &mut quinn::RecvStream| {
        let _ = send.reset(STREAM_FAILED.into());
        let _ = recv.stop(STREAM_FAILED.into());
    };
    let mut header = [0u8; FLOW_HEADER_LEN];
    let read =
        tokio::time::timeout(defaults::FLOW_OPEN_TIMEOUT, recv.read_exact(&mut header)).await;
    let parsed = match read {
        Ok(Ok(())) => FlowHeader::decode(&header).ok().flatten(),
        _ => None,
    };
    let Some((h, _)) = parsed else {
        refuse(&mut send, &mut recv);
        return Err("bad flow header".into());
    };
    let Some(link) = links.get(&h.link_id) else {
        refuse(&mut send, &mut recv);
        return Err("flow for a link not held on this relay".into());
    };
    // A flow that exists resumes on this stream. One being set up from
    // another stream (its lane and main streams can arrive in either
    // order) gets this one once it exists: it is never opened twice.
    let deadline = Instant::now() + defaults::FLOW_OPEN_TIMEOUT;
    let claim = loop {
        let existing = lock(&link.flows).get(&h.flow_id).cloned();
        if let Some(flow) = existing {
            debug!(link = %link.cfg.name, flow = h.flow_id, "flow resumes on a new stream");
            flow.offer_stream(send, recv, lane);
            return Ok(());
        }
        if lock(&link.opening).insert(h.flow_id) {
            break Opening {
                link,
                id: h.flow_id,
            };
        }
        if Instant::now() >= deadline {
            refuse(&mut send, &mut recv);
            return Err(format!(
                "link {}: flow {} was never set up",
                link.cfg.name, h.flow_id
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let LocalRole::Target(target) = &link.role else {
        refuse(&mut send, &mut recv);
        return Err(format!(
            "link {}: flow opened toward a listen side",
            link.cfg.name
        ));
    };
    let (current, candidates) = link.sessions();
    if current.is_none() && candidates.is_empty() {
        refuse(&mut send, &mut recv);
        return Err(format!("link {}: no session yet", link.cfg.name));
    }
    // A new flow must start with an authentic Open record (seq 0): only
    // then is the target dialled, so neither the relay nor anyone else can
    // make us dial. Side A may open flows under the session of its last
    // handshake before side B saw any other proof of it.
    // `Ok(None)`: no record that could be an `Open`; `Err`: one that
    // decrypted under no key it could be sealed with (a forgery).
    let opened = tokio::time::timeout(defaults::FLOW_OPEN_TIMEOUT, async {
        let mut rh = [0u8; RECORD_HEADER_LEN];
        let Ok(()) = recv.read_exact(&mut rh).await else {
            return Ok(None);
        };
        let Ok(Some(header)) = RecordHeader::decode(&rh) else {
            return Ok(None);
        };
        let mut ct = vec![0u8; header.len];
        if recv.read_exact(&mut ct).await.is_err() || header.seq != 0 {
            return Ok(None);
        }
        // The generation of flow ids it belongs to: the peer's current
        // one, its next or the one before (keys differ for each).
        let (tag, id) = split_flow_id(h.flow_id);
        let opens = |s: &LinkSession| {
            let generations = lock(&s.seen).candidates();
            generations
                .into_iter()
                .filter(|g| *g as u8 == tag)
                .find(|g| {
                    let mut plain = Vec::new();
                    let (_, mut opener) = s.noise.flow(*g, id);
                    let kind = opener.open_record(0, &ct, &mut plain);
                    matches!(kind, Ok(RecordKind::Open))
                })
        };
        if let Some(found) = current.and_then(|s| Some((opens(&s)?, s))) {
            return Ok(Some(found));
        }
        let Some((g, c)) = candidates.into_iter().find_map(|c| Some((opens(&c)?, c))) else {
            return Err(());
        };
        link.confirm(&c, &shared.metrics);
        Ok(Some((g, c)))
    })
    .await;
    let Ok(Ok(Some((generation, session)))) = opened else {
        if matches!(opened, Ok(Err(()))) {
            link.forged(shared.max_forgeries, &shared.metrics);
        }
        refuse(&mut send, &mut recv);
        return Err(format!(
            "link {}: stream for unknown flow {} did not start with Open",
            link.cfg.name, h.flow_id
        ));
    };
    // An authentic Open of a flow this session already took is a recording
    // written again (only a relay can do that): refused before anything is
    // dialled or sealed.
    let accepted = {
        let mut seen = lock(&session.seen);
        let before = seen.generation();
        seen.accept(generation, split_flow_id(h.flow_id).1)
            .map(|()| generation > before)
    };
    let new_generation = match accepted {
        Ok(new_generation) => new_generation,
        Err(e) => {
            refuse(&mut send, &mut recv);
            shared.metrics.peer_refused("replayed_flow");
            warn!(link = %link.cfg.name, error = %e, "replayed flow refused: the relay wrote a flow again that this session already carried");
            return Ok(());
        }
    };
    if new_generation {
        debug!(link = %link.cfg.name, generation, "the peer started a new generation of flow ids");
    }
    let local = match local::dial(target, defaults::TARGET_DIAL_TIMEOUT).await {
        Ok(c) => c,
        Err(e) => {
            warn!(link = %link.cfg.name, target = %target, error = %e, "cannot reach target");
            let mut out = Vec::new();
            if session
                .noise
                .flow(generation, split_flow_id(h.flow_id).1)
                .0
                .seal_record(0, RecordKind::Reset, &[], &mut out)
                .is_ok()
                && send.write_all(&out).await.is_ok()
            {
                let _ = send.finish();
            }
            shared.metrics.flows_failed.increment(1);
            return Ok(());
        }
    };
    let flow = Flow::new(
        h.flow_id,
        generation,
        session,
        link.clone(),
        false,
        shared.budget.clone(),
        shared.metrics.clone(),
    );
    flow.opened_by_peer();
    lock(&link.flows).insert(h.flow_id, flow.clone());
    drop(claim);
    shared.metrics.flows_total.increment(1);
    let (reader, writer) = local.split();
    flow::run(flow, reader, writer, Some(((send, recv), lane)))
        .instrument(info_span!("flow", link = %link.cfg.name, id = h.flow_id))
        .await;
    Ok(())
}

/// Accepts local connections on a listen link and opens a flow for each.
pub(crate) async fn serve_listener(
    shared: Arc<Shared>,
    link: Arc<LinkRt>,
    listener: local::Listener,
) {
    loop {
        let (conn, cred) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(link = %link.cfg.name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if !local::peer_allowed(cred, &link.cfg.allowed_uids, &link.cfg.allowed_gids) {
            shared.metrics.local_refused("peer_credentials");
            let (uid, gid) = cred.unwrap_or((u32::MAX, u32::MAX));
            warn!(link = %link.cfg.name, uid, gid, "local peer refused: not an allowed workload");
            drop(conn);
            continue;
        }
        let shared = shared.clone();
        let link = link.clone();
        tokio::spawn(async move {
            dial_flow(&shared, &link, conn).await;
        });
    }
}

/// Ends a local connection no flow carries with a reset, so the
/// application never takes it for a clean, empty answer.
fn refuse_local(conn: local::LocalConn) {
    let (reader, writer) = conn.split();
    writer.abort();
    drop(reader);
}

async fn dial_flow(shared: &Shared, link: &Arc<LinkRt>, conn: local::LocalConn) {
    if link.expired.load(Ordering::Relaxed) && link.ready.borrow().is_none() {
        shared.metrics.local_refused("grant_expired");
        warn!(link = %link.cfg.name, "local connection refused: the link's grant expired and the controller has not renewed it");
        return refuse_local(conn);
    }
    let mut ready = link.ready.subscribe();
    let current =
        match tokio::time::timeout(defaults::FLOW_OPEN_TIMEOUT, ready.wait_for(|r| r.is_some()))
            .await
        {
            Ok(Ok(current)) => current.clone(),
            _ => None,
        };
    let Some(current) = current else {
        shared.metrics.local_refused("link_not_ready");
        warn!(link = %link.cfg.name, "link not ready; local connection reset");
        return refuse_local(conn);
    };
    let Some((generation, flow_id)) = link.alloc_flow_id(&current.session, &shared.metrics) else {
        warn!(link = %link.cfg.name, "flow ids exhausted for this session");
        return refuse_local(conn);
    };
    let flow = Flow::new(
        flow_id,
        generation,
        current.session,
        link.clone(),
        true,
        shared.budget.clone(),
        shared.metrics.clone(),
    );
    if flow.open().is_err() {
        return refuse_local(conn);
    }
    lock(&link.flows).insert(flow_id, flow.clone());
    shared.metrics.flows_total.increment(1);
    let (reader, writer) = conn.split();
    flow::run(flow, reader, writer, None)
        .instrument(info_span!("flow", link = %link.cfg.name, id = flow_id))
        .await;
}
