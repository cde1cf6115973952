//! The live state of one link: its end-to-end session, the handshakes it
//! answered, its flows and the acknowledgements it owes, as the relay
//! session, the lane and the flows share it.

use comsat_protocol::workload::Rule;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use comsat_protocol::FlowId;
use comsat_protocol::link::{LinkControl, MAX_ACKS_PER_MESSAGE};
use comsat_protocol::msg::{AgentToRelay, PeerFrame};
use comsat_protocol::noise::{
    DatagramOpener, DatagramSealer, ExpectResponse, Opener, Sealer, Session,
};
use comsat_protocol::replay::PeerFlows;
use tokio::sync::{Notify, mpsc, watch};
use tracing::{debug, info, warn};

use crate::config::{LinkConfig, LocalRole};
use crate::core::ack::{AckQueue, AckWhen};
use crate::core::link::{Candidates, ControlReplay, Forgeries, Pending, SessionState, flow_id};
use crate::datagrams::UdpLink;
use crate::defaults;
use crate::group::{Busy, Runtimes};
use crate::metrics::Metrics;
use crate::status::{LocalEnd, RelayAt};
use crate::sync::lock;

/// What a link needs of the flows it carries (the flow driver implements
/// it).
pub(crate) trait LinkFlow: Send + Sync {
    /// Ends the flow with a reset.
    fn reset(&self);
    /// The peer delivered every record below `upto`.
    fn on_ack(&self, upto: u64);
    /// A stream the peer opened for the flow (on the lane or not).
    fn offer_stream(&self, send: quinn::SendStream, recv: quinn::RecvStream, on_lane: bool);
}

/// Handshakes side B answered and keeps until side A confirms one: a few,
/// so a retried or duplicated handshake still finds its answer.
const CANDIDATES: usize = 4;

/// A link's end-to-end session, its link-control keys and sequence
/// numbers, and the flows the peer opened in it.
pub(crate) struct LinkSession {
    pub(crate) noise: Session,
    pub(crate) control: Mutex<(Sealer, Opener)>,
    pub(crate) send_seq: AtomicU64,
    pub(crate) recv_last: Mutex<ControlReplay>,
    /// Flow ids the peer opened in this session, by generation: each is
    /// accepted once, so a recorded flow written again by a relay never
    /// dials the target a second time nor makes this side seal under a
    /// nonce it used.
    pub(crate) seen: Mutex<PeerFlows>,
    /// The link's flow counter when the session began: this side's flows
    /// count their generations from there.
    pub(crate) flow_base: u64,
    /// Messages that failed to decrypt under this session.
    pub(crate) forgeries: Mutex<Forgeries>,
    /// The keys and numbers of the datagrams of the link's UDP flows
    /// ([`crate::datagrams`]): one sealer per session, so no number is
    /// sealed twice under its key.
    pub(crate) datagram_sealer: Mutex<DatagramSealer>,
    pub(crate) datagram_opener: Mutex<DatagramOpener>,
}

impl LinkSession {
    pub(crate) fn new(noise: Session, flow_base: u64) -> Arc<Self> {
        let (datagram_sealer, datagram_opener) = noise.datagrams();
        Arc::new(Self {
            datagram_sealer: Mutex::new(datagram_sealer),
            datagram_opener: Mutex::new(datagram_opener),
            control: Mutex::new(noise.control()),
            noise,
            send_seq: AtomicU64::new(0),
            recv_last: Mutex::default(),
            seen: Mutex::default(),
            flow_base,
            forgeries: Mutex::default(),
        })
    }

    pub(crate) fn seal(&self, msg: &LinkControl) -> Option<PeerFrame> {
        let seq = self.send_seq.fetch_add(1, Ordering::Relaxed);
        let plain = msg.encode().ok()?;
        let ciphertext = lock(&self.control).0.seal_control(seq, &plain).ok()?;
        Some(PeerFrame::Sealed { seq, ciphertext })
    }

    /// Opens a sealed message; refuses a `seq` not above the last one
    /// (`Ok(None)`: nothing was decrypted) and one that fails to decrypt
    /// (`Err`).
    pub(crate) fn open(&self, seq: u64, ciphertext: &[u8]) -> Result<Option<LinkControl>, ()> {
        let mut last = lock(&self.recv_last);
        if !last.fresh(seq) {
            return Ok(None);
        }
        let plain = lock(&self.control)
            .1
            .open_control(seq, ciphertext)
            .map_err(|_| ())?;
        let Ok(msg) = LinkControl::decode(&plain) else {
            return Ok(None);
        };
        last.accept(seq);
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
    /// The workloads the link admits, parsed once (`None`: its rules do
    /// not parse, and it admits no one; the agent checked them before).
    pub(crate) rules: Option<Arc<[Rule]>>,
    pub(crate) role: LocalRole,
    pub(crate) flow_timeout: Duration,
    pub(crate) ready: watch::Sender<Option<Ready>>,
    pub(crate) session: Mutex<Option<Arc<LinkSession>>>,
    /// Side B: the sessions of the last handshakes it answered (at most
    /// [`CANDIDATES`]), each until side A proves it holds it too (a sealed
    /// message or a flow's `Open` under it). Only then does one replace
    /// `session`: a handshake message replayed by a relay is answered,
    /// never confirmed, and tears nothing down. With the connection each
    /// arrived on.
    pub(crate) candidates: Mutex<Candidates<(Arc<LinkSession>, quinn::Connection)>>,
    /// Side A: the handshakes it started and that are still unanswered.
    pub(crate) pending: Mutex<Pending<ExpectResponse>>,
    pub(crate) epoch: AtomicU64,
    /// Whether the peer confirmed the current session, whether it is to be
    /// replaced (too many forgeries), and side A's pending `Resume`.
    pub(crate) state: Mutex<SessionState>,
    /// The relay ended the link because its grant expired, and it was not
    /// attached since: local connections are refused at once.
    pub(crate) expired: AtomicBool,
    /// The peer is attached to the relay this link is on now: with
    /// [`LinkRt::ready`], the link is up (what `/readyz`, the
    /// `links_ready` gauge and the "link ready" line say).
    pub(crate) peer: AtomicBool,
    /// Flows this side opened on the link, all sessions together.
    pub(crate) next_flow: AtomicU64,
    pub(crate) flows: Mutex<HashMap<FlowId, Arc<dyn LinkFlow>>>,
    pub(crate) acks: Mutex<AckQueue>,
    /// Wakes the relay session that carries the link (it changes when the
    /// link moves to another relay list).
    pub(crate) ack_notify: Mutex<Arc<AckWake>>,
    /// The grant generation attached with (it changes when the controller
    /// re-grants the link, e.g. on other relays; flows go on).
    pub(crate) generation: AtomicU64,
    /// The lane connection the link is attached on, if any: its flows
    /// start there, and move there when it comes up (see the session's lane).
    pub(crate) lane: watch::Sender<Option<quinn::Connection>>,
    /// The flows of the link's group (its lane is up while it has some).
    pub(crate) busy: Mutex<Arc<Busy>>,
    /// Where the link's flows run, if it has a lane: on the lane's thread
    /// while their stream rides the lane, else on the main runtime.
    pub(crate) runtimes: Option<Runtimes>,
    /// Flows the peer opened that are being set up (their target dialled):
    /// another stream of one of them waits for it (see the session's `accept_flow`).
    pub(crate) opening: Mutex<std::collections::HashSet<FlowId>>,
    /// The link's UDP flows, if its local end is `udp://`.
    pub(crate) udp: Option<UdpLink>,
    /// Its listener: bound, or why it cannot be.
    pub(crate) local: Mutex<LocalEnd>,
    /// The relay it is connected to, or the last error connecting.
    pub(crate) relay_at: Mutex<RelayAt>,
    /// When it went down, if it was up before and is not now.
    pub(crate) down_since: Mutex<Option<std::time::Instant>>,
}

/// A flow id claimed while its flow is being set up; released on drop.
pub(crate) struct Opening<'a> {
    pub(crate) link: &'a LinkRt,
    pub(crate) id: FlowId,
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
            rules: cfg.allow_rules().ok().map(Arc::from),
            udp: UdpLink::new(&cfg.name, cfg.link_id, &role),
            role,
            flow_timeout,
            ready: watch::channel(None).0,
            session: Mutex::new(None),
            candidates: Mutex::new(Candidates::new(CANDIDATES)),
            pending: Mutex::new(Pending::new(CANDIDATES)),
            epoch: AtomicU64::new(0),
            state: Mutex::new(SessionState::new(cfg.side, defaults::HANDSHAKE_RETRY)),
            expired: AtomicBool::new(false),
            peer: AtomicBool::new(false),
            next_flow: AtomicU64::new(0),
            generation: AtomicU64::new(cfg.generation),
            flows: Mutex::default(),
            acks: Mutex::default(),
            ack_notify: Mutex::new(ack_notify),
            lane: watch::channel(None).0,
            busy: Mutex::default(),
            opening: Mutex::default(),
            local: Mutex::default(),
            relay_at: Mutex::default(),
            down_since: Mutex::default(),
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

    pub(crate) fn wake_acks(&self, when: AckWhen) {
        lock(&self.ack_notify).wake(when);
    }

    /// Marks the link down after its relay session was stopped from
    /// outside (reconfiguration), closing that session's connection.
    pub(crate) fn detach(&self, metrics: &Metrics) {
        if let Some(ready) = self.ready.borrow().clone() {
            ready.conn.close(0u32.into(), b"reconfigured");
        }
        self.set_ready(None, metrics);
        self.pending().clear();
    }

    /// Ends the link for good (it was deleted): every flow is reset.
    pub(crate) fn shut(&self, metrics: &Metrics) {
        let flows: Vec<_> = lock(&self.flows).drain().map(|(_, f)| f).collect();
        for f in flows {
            f.reset();
        }
        if let Some(udp) = &self.udp {
            udp.clear();
        }
        self.detach(metrics);
    }

    pub(crate) fn set_ready(&self, conn: Option<&quinn::Connection>, metrics: &Metrics) {
        let value = match (conn, lock(&self.session).clone()) {
            (Some(conn), Some(session)) => Some(Ready {
                session,
                conn: conn.clone(),
                epoch: self.epoch.fetch_add(1, Ordering::Relaxed) + 1,
            }),
            _ => None,
        };
        let (was, was_up) = (self.ready.borrow().is_some(), self.up());
        let now = value.is_some();
        if now {
            self.expired.store(false, Ordering::Relaxed);
        }
        self.ready.send_replace(value);
        if now {
            // Acks that waited for the link go out now.
            self.wake_acks(AckWhen::Soon);
        }
        if now && !was && !self.peer.load(Ordering::Relaxed) {
            info!(link = %self.cfg.name, "link attached, end-to-end session up; its peer is away: the relay holds new flows until it is back");
        }
        self.report(was_up, metrics);
    }

    /// Whether the link is up: ready to carry flows, its peer there.
    pub(crate) fn up(&self) -> bool {
        self.ready.borrow().is_some() && self.peer.load(Ordering::Relaxed)
    }

    /// Whether the peer is attached to the relay this link is on now.
    pub(crate) fn set_peer(&self, present: bool, metrics: &Metrics) {
        let was_up = self.up();
        self.peer.store(present, Ordering::Relaxed);
        self.report(was_up, metrics);
    }

    /// Says so where the link went up or down.
    fn report(&self, was_up: bool, metrics: &Metrics) {
        match (was_up, self.up()) {
            (false, true) => {
                if let Some(down) = lock(&self.down_since).take() {
                    metrics.resume_pause.record(down.elapsed().as_secs_f64());
                }
                metrics.links_ready.increment(1.0);
                info!(link = %self.cfg.name, "link ready: attached, end-to-end session up, peer present");
            }
            (true, false) => {
                *lock(&self.down_since) = Some(std::time::Instant::now());
                metrics.links_ready.decrement(1.0);
                info!(link = %self.cfg.name, "link down");
            }
            _ => {}
        }
    }

    /// Installs a new session: every flow of the old one is reset.
    pub(crate) fn install_session(
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
        lock(&self.state).on_installed();
        self.set_ready(Some(conn), metrics);
    }

    /// Side B: holds the session of a handshake it answered until side A
    /// confirms it ([`Self::confirm`]). The oldest of [`CANDIDATES`] never
    /// confirmed is dropped: a replayed handshake, or one side A gave up.
    pub(crate) fn propose_session(
        &self,
        session: Session,
        conn: &quinn::Connection,
        metrics: &Metrics,
    ) {
        let flow_base = self.next_flow.load(Ordering::Relaxed);
        let candidate = (LinkSession::new(session, flow_base), conn.clone());
        if lock(&self.candidates).propose(candidate) {
            metrics.peer_refused("unconfirmed_handshake");
            debug!(link = %self.cfg.name, "an answered handshake was never confirmed by the peer");
        }
    }

    /// Side B: side A proved it holds `candidate` (it sealed something
    /// under it): it becomes the link's session, and every other answered
    /// handshake is forgotten.
    pub(crate) fn confirm(&self, candidate: &Arc<LinkSession>, metrics: &Metrics) {
        let confirmed = lock(&self.candidates).confirm(|(c, _)| Arc::ptr_eq(c, candidate));
        let Some(((session, conn), unconfirmed)) = confirmed else {
            return;
        };
        if unconfirmed > 0 {
            metrics.peer_refused("unconfirmed_handshake");
        }
        self.install_session(session, &conn, metrics);
        info!(link = %self.cfg.name, "new end-to-end session confirmed by the peer");
    }

    /// The sessions a message from the peer may be sealed under: the
    /// current one, then (side B) those of the handshakes it answered
    /// since, newest first.
    pub(crate) fn sessions(&self) -> (Option<Arc<LinkSession>>, Vec<Arc<LinkSession>>) {
        let current = lock(&self.session).clone();
        let candidates = lock(&self.candidates)
            .newest_first()
            .map(|(c, _)| c.clone())
            .collect();
        (current, candidates)
    }

    /// Counts a message that failed to decrypt under the current session;
    /// at `max` of them, the session is to be replaced.
    pub(crate) fn forged(&self, max: u64, metrics: &Metrics) {
        let Some(session) = lock(&self.session).clone() else {
            return;
        };
        let mut forgeries = lock(&session.forgeries);
        if forgeries.count(max) {
            let n = forgeries.get();
            drop(forgeries);
            metrics.peer_refused("forgeries");
            warn!(link = %self.cfg.name, forgeries = n, "messages that fail to decrypt keep coming through the relay: replacing the end-to-end session");
            lock(&self.state).on_forgeries();
        }
    }

    /// Drops the session and resets its flows (revocation).
    pub(crate) fn drop_session(&self, metrics: &Metrics) {
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
    pub(crate) fn alloc_flow_id(
        &self,
        session: &LinkSession,
        metrics: &Metrics,
    ) -> Option<(u32, FlowId)> {
        let n = self.next_flow.fetch_add(1, Ordering::Relaxed);
        let per_generation = session.noise.params().flow_ids_per_generation();
        let new = flow_id(n, session.flow_base, per_generation, self.cfg.side)?;
        if new.new_generation {
            let generation = new.generation;
            metrics.rekeyed("flow_ids");
            info!(link = %self.cfg.name, generation, "flow ids of the last generation used: a new generation starts, under new keys");
        }
        Some((new.generation, new.id))
    }

    /// Schedules a cumulative acknowledgement to the peer, sent `when`.
    pub(crate) fn queue_ack(&self, flow: FlowId, upto: u64, when: AckWhen) {
        lock(&self.acks).queue(flow, upto);
        self.wake_acks(when);
    }

    pub(crate) fn remove_flow(&self, id: FlowId) {
        lock(&self.flows).remove(&id);
    }

    /// Seals and sends pending acks, if the link is ready; counts the
    /// messages sent.
    pub(crate) fn flush_acks(&self, ctl: &mpsc::Sender<AgentToRelay>, metrics: &Metrics) {
        let Some(ready) = self.ready.borrow().clone() else {
            return;
        };
        let acks = lock(&self.acks).drain();
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
                        pending.queue(*flow, *upto);
                    }
                    drop(pending);
                    self.wake_acks(AckWhen::Lazy);
                }
            }
        }
    }

    pub(crate) fn send_sealed(&self, msg: &LinkControl, ctl: &mpsc::Sender<AgentToRelay>) {
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

    pub(crate) fn pending(&self) -> std::sync::MutexGuard<'_, Pending<ExpectResponse>> {
        lock(&self.pending)
    }
}

/// Wakes a relay session to send its links' acknowledgements.
#[derive(Debug, Default)]
pub(crate) struct AckWake {
    pub(crate) soon: Notify,
    pub(crate) lazy: Notify,
    /// A lazy flush is due: later lazy acks join it without a wake-up.
    pub(crate) lazy_armed: AtomicBool,
}

impl AckWake {
    pub(crate) fn wake(&self, when: AckWhen) {
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
