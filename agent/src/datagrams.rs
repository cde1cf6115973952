//! A link's UDP flows: datagrams between local UDP sockets and the peer,
//! sealed end to end in the link's session and carried as QUIC datagrams
//! through the relay ([`comsat_protocol::datagram`]).
//!
//! Side A listens on one socket: each local source address is a flow
//! ([`crate::core::udp::Sources`]), and the peer's answers go back to the
//! address of their flow. Side B gives each flow a socket of its own,
//! connected to the target, so the target's answers come back on it. A
//! datagram goes out as it comes and is never held: one that cannot go on
//! at once (no session, the peer away, larger than the path takes, the
//! connection's datagram buffer full, the link at its most flows) is
//! dropped and counted by why, as is one that arrives replayed, too old,
//! forged, or for a flow forgotten. Nothing is fragmented: a datagram too
//! large for the path is dropped, as a router without fragmentation would.
//! No flow waits for another, nor for the link's streams: QUIC sends
//! datagrams ahead of stream data.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use comsat_protocol::LinkId;
use comsat_protocol::datagram::{self, LINK_TAG_LEN};
use comsat_protocol::noise::{DATAGRAM_OVERHEAD, DatagramError, UdpFlowId};
use socket2::SockRef;
use tokio::net::UdpSocket;
use tracing::{debug, warn};

use crate::config::{LocalRole, LocalSpec};
use crate::core::udp::{Flows, Full, Idle, Sources};
use crate::defaults;
use crate::link::{LinkRt, LinkSession};
use crate::metrics::{Metrics, UdpMetrics};
use crate::sync::lock;

/// Largest UDP payload read from a link's listening socket.
const MAX_UDP_PAYLOAD: usize = 65_535;

/// What side B reads from a flow's socket at once: more than any QUIC
/// datagram carries (jumbo frames included), so a larger answer, cut
/// short here, is still dropped as too large, never sent cut; and a
/// link's 1,024 flows hold at most 9 MiB of buffers.
const TARGET_READ: usize = 9 * 1024 + 1;

/// Why a datagram was dropped (the `reason` label of
/// `comsat_agent_udp_datagrams_dropped_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dropped {
    /// The link has no session or relay connection now.
    NotReady,
    /// The peer is not attached to the link's relay now.
    PeerAway,
    /// Larger than the path to the relay takes in one datagram.
    TooLarge,
    /// The connection's datagram send buffer is full (the path is busy).
    Congested,
    /// The link holds its most UDP flows.
    FlowsFull,
    /// An answer for a flow this side forgot (idle too long).
    UnknownFlow,
    /// Its number was delivered before: a replay.
    Replayed,
    /// Overtaken by more than the replay window.
    TooOld,
    /// It failed to decrypt: forged or altered.
    Forged,
    /// The local socket would not take it now.
    LocalSend,
    /// Side B: the target's address is unknown (not resolved yet) or no
    /// socket toward it could be made.
    NoTarget,
}

impl Dropped {
    pub(crate) const ALL: [Self; 11] = [
        Self::NotReady,
        Self::PeerAway,
        Self::TooLarge,
        Self::Congested,
        Self::FlowsFull,
        Self::UnknownFlow,
        Self::Replayed,
        Self::TooOld,
        Self::Forged,
        Self::LocalSend,
        Self::NoTarget,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::NotReady => "not_ready",
            Self::PeerAway => "peer_away",
            Self::TooLarge => "too_large",
            Self::Congested => "congested",
            Self::FlowsFull => "flows_full",
            Self::UnknownFlow => "unknown_flow",
            Self::Replayed => "replayed",
            Self::TooOld => "too_old",
            Self::Forged => "forged",
            Self::LocalSend => "local_send",
            Self::NoTarget => "no_target",
        }
    }
}

/// Side B's socket for one flow; its reader ends with it.
struct TargetFlow {
    socket: Arc<UdpSocket>,
    reader: tokio::task::AbortHandle,
}

impl Drop for TargetFlow {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

enum Side {
    Listen {
        socket: OnceLock<Arc<UdpSocket>>,
        flows: Mutex<Sources>,
    },
    Target {
        target: String,
        addr: Mutex<Option<SocketAddr>>,
        flows: Mutex<Flows<TargetFlow>>,
    },
}

/// The UDP side of a link whose local end is `udp://`.
pub(crate) struct UdpLink {
    link_id: LinkId,
    side: Side,
    metrics: UdpMetrics,
}

fn idle() -> Idle {
    Idle {
        unreplied: defaults::UDP_IDLE_UNREPLIED,
        replied: defaults::UDP_IDLE_REPLIED,
    }
}

impl UdpLink {
    /// The UDP side of link `name`, if its local end is `udp://`.
    pub(crate) fn new(name: &str, link_id: LinkId, role: &LocalRole) -> Option<Self> {
        let side = match role {
            LocalRole::Listen(LocalSpec::Udp(_)) => Side::Listen {
                socket: OnceLock::new(),
                flows: Mutex::new(Sources::new(defaults::MAX_UDP_FLOWS, idle())),
            },
            LocalRole::Target(LocalSpec::Udp(target)) => Side::Target {
                addr: Mutex::new(target.parse().ok()),
                target: target.clone(),
                flows: Mutex::new(Flows::new(defaults::MAX_UDP_FLOWS, idle())),
            },
            _ => return None,
        };
        Some(Self {
            link_id,
            side,
            metrics: UdpMetrics::new(name),
        })
    }

    fn dropped(&self, why: Dropped) {
        self.metrics.dropped(why);
    }

    /// Seals `payload` of `flow` and sends it to the peer, or counts why
    /// not.
    fn send(&self, link: &LinkRt, flow: UdpFlowId, payload: &[u8]) {
        match self.try_send(link, flow, payload) {
            Ok(()) => self.metrics.sent.increment(1),
            Err(why) => self.dropped(why),
        }
    }

    fn try_send(&self, link: &LinkRt, flow: UdpFlowId, payload: &[u8]) -> Result<(), Dropped> {
        let Some(ready) = link.ready.borrow().clone() else {
            return Err(Dropped::NotReady);
        };
        if !link.peer.load(Ordering::Relaxed) {
            return Err(Dropped::PeerAway);
        }
        let len = LINK_TAG_LEN + DATAGRAM_OVERHEAD + payload.len();
        let max = ready.conn.max_datagram_size().ok_or(Dropped::NotReady)?;
        if len > max {
            return Err(Dropped::TooLarge);
        }
        let mut out = Vec::with_capacity(len);
        datagram::tag(self.link_id, &mut out);
        lock(&ready.session.datagram_sealer)
            .seal(flow, payload, &mut out)
            .map_err(|e| match e {
                DatagramError::TooLong(_) => Dropped::TooLarge,
                _ => Dropped::NotReady,
            })?;
        // A full send buffer drops (and counts) the new datagram, never
        // an older one without a word.
        ready
            .conn
            .try_send_datagram(Bytes::from(out))
            .map_err(|e| match e {
                quinn::SendDatagramError::TooLarge => Dropped::TooLarge,
                quinn::SendDatagramError::Blocked => Dropped::Congested,
                _ => Dropped::NotReady,
            })
    }

    /// Forgets every flow (the link is gone).
    pub(crate) fn clear(&self) {
        match &self.side {
            Side::Listen { flows, .. } => {
                lock(flows).expire(far_future());
            }
            Side::Target { flows, .. } => drop(lock(flows).clear()),
        }
        self.metrics.flows_open.set(0.0);
    }
}

/// A moment after which every flow is idle.
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(365 * 24 * 3600)
}

/// Opens a datagram the peer sealed: under the link's session, else (side
/// B) under a handshake it answered, which the peer thereby confirms.
fn open(link: &LinkRt, sealed: &[u8], metrics: &Metrics) -> Result<(UdpFlowId, Vec<u8>), Dropped> {
    let mut buf = sealed.to_vec();
    let current = lock(&link.session).clone();
    let first = match &current {
        Some(session) => open_with(session, &mut buf),
        None => Err(Dropped::NotReady),
    };
    if first.is_ok() {
        return first;
    }
    // A datagram of a session side A started since (its numbers start
    // again from 0, so they may look replayed under the current one).
    for candidate in link.sessions().1 {
        let mut again = sealed.to_vec();
        if let Ok(opened) = open_with(&candidate, &mut again) {
            link.confirm(&candidate, metrics);
            return Ok(opened);
        }
    }
    first
}

fn open_with(session: &LinkSession, buf: &mut Vec<u8>) -> Result<(UdpFlowId, Vec<u8>), Dropped> {
    let (flow, range) = lock(&session.datagram_opener)
        .open_in_place(buf)
        .map_err(|e| match e {
            DatagramError::Replayed(_) => Dropped::Replayed,
            DatagramError::TooOld { .. } => Dropped::TooOld,
            _ => Dropped::Forged,
        })?;
    buf.truncate(range.end);
    buf.drain(..range.start);
    Ok((flow, std::mem::take(buf)))
}

/// Delivers a datagram of `link` that came from the peer through the
/// relay (`sealed`: what follows the link id) to its local flow.
pub(crate) fn deliver(link: &Arc<LinkRt>, sealed: &[u8], metrics: &Metrics) {
    let Some(udp) = &link.udp else {
        return;
    };
    match deliver_to(link, udp, sealed, metrics) {
        Ok(()) => udp.metrics.received.increment(1),
        Err(why) => udp.dropped(why),
    }
}

fn deliver_to(
    link: &Arc<LinkRt>,
    udp: &UdpLink,
    sealed: &[u8],
    metrics: &Metrics,
) -> Result<(), Dropped> {
    let (flow, payload) = open(link, sealed, metrics)?;
    let now = Instant::now();
    let sent = match &udp.side {
        Side::Listen { socket, flows } => {
            let to = lock(flows).inbound(flow, now).ok_or(Dropped::UnknownFlow)?;
            let socket = socket.get().ok_or(Dropped::NotReady)?;
            SockRef::from(&**socket).send_to(&payload, &to.into())
        }
        Side::Target { addr, flows, .. } => {
            let existing = lock(flows).touch(flow, now).map(|f| f.socket.clone());
            let socket = match existing {
                Some(s) => s,
                None => {
                    let to = (*lock(addr)).ok_or(Dropped::NoTarget)?;
                    start_target_flow(link, udp, flows, flow, to, now)?
                }
            };
            SockRef::from(&*socket).send(&payload)
        }
    };
    // Straight to the kernel (the sockets are non-blocking): tokio's
    // readiness of a socket made a moment ago is not known yet.
    sent.map(|_| ()).map_err(|_| Dropped::LocalSend)
}

/// Side B: a socket toward the target for new flow `flow`, and the task
/// that carries the target's answers back.
fn start_target_flow(
    link: &Arc<LinkRt>,
    udp: &UdpLink,
    flows: &Mutex<Flows<TargetFlow>>,
    flow: UdpFlowId,
    to: SocketAddr,
    now: Instant,
) -> Result<Arc<UdpSocket>, Dropped> {
    let mut flows = lock(flows);
    if flows.len() >= defaults::MAX_UDP_FLOWS {
        return Err(Dropped::FlowsFull);
    }
    let socket = Arc::new(connect(to).map_err(|e| {
        debug!(link = %link.cfg.name, error = %e, "no socket toward the UDP target");
        Dropped::NoTarget
    })?);
    let reader = tokio::spawn(read_target(Arc::downgrade(link), flow, socket.clone()));
    let started = flows.start(
        flow,
        TargetFlow {
            socket: socket.clone(),
            reader: reader.abort_handle(),
        },
        now,
    );
    match started {
        Ok(_) => {
            udp.metrics.flows_open.set(flows.len() as f64);
            Ok(socket)
        }
        Err(Full) => Err(Dropped::FlowsFull),
    }
}

/// A non-blocking UDP socket on an ephemeral port, connected to `to`.
fn connect(to: SocketAddr) -> io::Result<UdpSocket> {
    let socket = std::net::UdpSocket::bind(crate::udp::unspecified(to))?;
    socket.connect(to)?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

/// Side B: carries what the target answers on flow `flow`'s socket back
/// to the peer, until the flow is forgotten (which aborts it).
async fn read_target(link: Weak<LinkRt>, flow: UdpFlowId, socket: Arc<UdpSocket>) {
    let mut buf = vec![0u8; TARGET_READ];
    loop {
        let n = match socket.recv(&mut buf).await {
            Ok(n) => n,
            // An ICMP "port unreachable" for an earlier datagram: the
            // target was not listening then; it may be now.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
            Err(e) => {
                debug!(error = %e, "reading from the UDP target failed");
                return;
            }
        };
        let Some(link) = link.upgrade() else {
            return;
        };
        let Some(udp) = &link.udp else {
            return;
        };
        if let Side::Target { flows, .. } = &udp.side {
            lock(flows).reply(flow, Instant::now());
        }
        udp.send(&link, flow, &buf[..n]);
    }
}

/// Side A: reads the link's listening socket, each datagram into the flow
/// of its source address, and forgets idle flows.
pub(crate) async fn serve_listener(link: Arc<LinkRt>, socket: UdpSocket) {
    let Some(udp) = &link.udp else {
        return;
    };
    let Side::Listen {
        socket: slot,
        flows,
    } = &udp.side
    else {
        return;
    };
    let socket = slot.get_or_init(|| Arc::new(socket)).clone();
    let mut buf = vec![0u8; MAX_UDP_PAYLOAD];
    let mut sweep = sweep();
    loop {
        tokio::select! {
            read = socket.recv_from(&mut buf) => match read {
                Ok((n, from)) => {
                    let flow = lock(flows).outbound(from, Instant::now());
                    match flow {
                        Ok((id, new)) => {
                            if new {
                                udp.metrics.flows_open.set(lock(flows).len() as f64);
                            }
                            udp.send(&link, id, &buf[..n]);
                        }
                        Err(Full) => udp.dropped(Dropped::FlowsFull),
                    }
                }
                Err(e) => {
                    warn!(link = %link.cfg.name, error = %e, "reading the UDP listener failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = sweep.tick() => {
                let mut flows = lock(flows);
                if flows.expire(Instant::now()) > 0 {
                    udp.metrics.flows_open.set(flows.len() as f64);
                }
            }
        }
    }
}

/// Side B: resolves the target now and then (a name may move), and
/// forgets idle flows.
pub(crate) async fn serve_target(link: Arc<LinkRt>) {
    let Some(udp) = &link.udp else {
        return;
    };
    let Side::Target {
        target,
        addr,
        flows,
    } = &udp.side
    else {
        return;
    };
    let mut sweep = sweep();
    let mut next_lookup = tokio::time::Instant::now();
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next_lookup) => {
                match tokio::net::lookup_host(target.as_str()).await.map(|mut a| a.next()) {
                    Ok(Some(found)) => {
                        *lock(addr) = Some(found);
                        failing = false;
                        next_lookup += defaults::UDP_RESOLVE_EVERY;
                    }
                    result => {
                        if !failing {
                            let why = result.err().map_or_else(|| "no address".to_owned(), |e| e.to_string());
                            warn!(link = %link.cfg.name, target = %target, error = %why, "cannot resolve the UDP target; datagrams for it are dropped until it resolves");
                        }
                        failing = true;
                        next_lookup = tokio::time::Instant::now() + defaults::UDP_RESOLVE_RETRY;
                    }
                }
            }
            _ = sweep.tick() => {
                let mut flows = lock(flows);
                if !flows.expire(Instant::now()).is_empty() {
                    udp.metrics.flows_open.set(flows.len() as f64);
                }
            }
        }
    }
}

fn sweep() -> tokio::time::Interval {
    let mut sweep = tokio::time::interval(defaults::UDP_SWEEP);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    sweep
}

/// Reads the datagrams the relay forwards on `conn` and delivers each to
/// its link, until the connection ends.
pub(crate) async fn read_datagrams(
    shared: Arc<crate::shared::Shared>,
    conn: quinn::Connection,
    links: std::collections::HashMap<LinkId, Arc<LinkRt>>,
) {
    let mut overflow = 0;
    while let Ok(d) = conn.read_datagram().await {
        if let Some((link_id, sealed)) = datagram::split(&d)
            && let Some(link) = links.get(&link_id)
        {
            deliver(link, sealed, &shared.metrics);
        }
        count_overflow(&conn, &shared.metrics, &mut overflow);
    }
    count_overflow(&conn, &shared.metrics, &mut overflow);
}

/// Counts the datagrams `conn` dropped for room since `counted` of them
/// (which links they were for is unknown: they were never read).
fn count_overflow(conn: &quinn::Connection, metrics: &Metrics, counted: &mut u64) {
    let dropped = conn.datagrams_dropped();
    if dropped > *counted {
        metrics.udp_overflow.increment(dropped - *counted);
        *counted = dropped;
    }
}
