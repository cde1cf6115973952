//! Relay sessions: one QUIC connection per relay, carrying all the links
//! this agent holds on it, reconnecting with jittered exponential backoff.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use comsat_protocol::limits::MAX_FLOW_ID;
use comsat_protocol::msg::{
    AgentToRelay, ControlMessage, FrameDecoder, PeerFrame, RelayToAgent, make_hello,
};
use comsat_protocol::noise::{self, ExpectResponse, Session};
use comsat_protocol::record::{FLOW_HEADER_LEN, FlowHeader, RecordKind};
use comsat_protocol::{
    FlowId, HELLO_EXPORTER_LABEL, HELLO_EXPORTER_LEN, LinkId, NodeId, NoiseSecretKey, Side,
    SigningKey,
};
use tokio::sync::{mpsc, watch};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::config::{LinkConfig, LocalRole, RelayEndpoint};
use crate::defaults;
use crate::flow::{self, Receiver, STREAM_FAILED, Sender};
use crate::local;
use crate::metrics::Metrics;

/// What the agent's tasks share.
pub(crate) struct Shared {
    pub(crate) node_id: NodeId,
    pub(crate) signing: SigningKey,
    pub(crate) noise: NoiseSecretKey,
    pub(crate) metrics: Metrics,
}

/// The live state of one link.
pub(crate) struct LinkRt {
    pub(crate) cfg: LinkConfig,
    pub(crate) role: LocalRole,
    /// The current end-to-end session and the relay connection it rides.
    pub(crate) ready: watch::Sender<Option<(Arc<Session>, quinn::Connection)>>,
    pending: Mutex<Option<ExpectResponse>>,
    next_flow: AtomicU32,
}

impl LinkRt {
    pub(crate) fn new(cfg: LinkConfig, role: LocalRole) -> Self {
        Self {
            cfg,
            role,
            ready: watch::channel(None).0,
            pending: Mutex::new(None),
            next_flow: AtomicU32::new(0),
        }
    }

    fn set_ready(&self, value: Option<(Arc<Session>, quinn::Connection)>, metrics: &Metrics) {
        let was = self.ready.borrow().is_some();
        let now = value.is_some();
        self.ready.send_replace(value);
        match (was, now) {
            (false, true) => {
                metrics.links_ready.increment(1.0);
                info!(link = %self.cfg.name, "link ready: end-to-end session up");
            }
            (true, false) => {
                metrics.links_ready.decrement(1.0);
                info!(link = %self.cfg.name, "link down");
            }
            _ => {}
        }
    }

    /// A flow id never used before by this agent for this link: side A
    /// uses odd ids, side B even ones, so both may open flows.
    fn alloc_flow_id(&self) -> Option<FlowId> {
        let n = self.next_flow.fetch_add(1, Ordering::Relaxed);
        let id = n.checked_mul(2)?.checked_add(match self.cfg.side {
            Side::A => 1,
            Side::B => 2,
        })?;
        (id < MAX_FLOW_ID).then_some(id)
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Option<ExpectResponse>> {
        match self.pending.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

/// Jittered exponential backoff.
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Self {
            next: defaults::RECONNECT_INITIAL,
        }
    }

    fn reset(&mut self) {
        self.next = defaults::RECONNECT_INITIAL;
    }

    /// A delay in [d/2, d], then doubles d up to the cap.
    fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (d * 2).min(defaults::RECONNECT_MAX);
        let half = d / 2;
        half + half.mul_f64(rand::random::<f64>())
    }
}

/// Keeps a connection to `relay` for `links`, forever.
pub(crate) async fn relay_loop(
    shared: Arc<Shared>,
    relay: RelayEndpoint,
    links: HashMap<LinkId, Arc<LinkRt>>,
) {
    let span = info_span!("relay", addr = %relay.addr);
    async move {
        let client = match crate::tls::client_config(&relay) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot configure TLS for relay; links on it stay down");
                return;
            }
        };
        let mut backoff = Backoff::new();
        loop {
            match connect_and_serve(&shared, &relay, &client, &links).await {
                Ok(()) => backoff.reset(),
                Err(e) => {
                    shared.metrics.connect_failures.increment(1);
                    warn!(error = %e, "relay connection failed");
                }
            }
            for link in links.values() {
                link.set_ready(None, &shared.metrics);
                *link.pending() = None;
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }
    .instrument(span)
    .await;
}

/// Connects, authenticates and serves until the connection ends. `Ok` if
/// it was established (the backoff restarts), `Err` if it never was.
async fn connect_and_serve(
    shared: &Arc<Shared>,
    relay: &RelayEndpoint,
    client: &quinn::ClientConfig,
    links: &HashMap<LinkId, Arc<LinkRt>>,
) -> Result<(), String> {
    let addr = tokio::net::lookup_host(relay.addr.as_str())
        .await
        .map_err(|e| format!("resolve {}: {e}", relay.addr))?
        .next()
        .ok_or_else(|| format!("resolve {}: no address", relay.addr))?;
    let bind: std::net::SocketAddr = if addr.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let endpoint = quinn::Endpoint::client(bind).map_err(|e| format!("bind {bind}: {e}"))?;
    let result = tokio::time::timeout(
        defaults::CONNECT_TIMEOUT,
        establish(shared, &endpoint, client, addr, &relay.server_name),
    )
    .await
    .map_err(|_| "timed out connecting".to_owned())?;
    let (conn, send, recv, decoder) = result?;
    shared.metrics.connects.increment(1);
    info!("connected to relay");
    serve(shared, &conn, send, recv, decoder, links).await;
    conn.close(0u32.into(), b"bye");
    endpoint.close(0u32.into(), b"bye");
    Ok(())
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
) -> Result<Established, String> {
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
        Ok(_) => Err("relay sent something other than Welcome".into()),
        Err(e) => Err(format!("relay refused the connection: {e}")),
    }
}

async fn read_message(
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

async fn write_control(mut send: quinn::SendStream, mut rx: mpsc::Receiver<AgentToRelay>) {
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

async fn serve(
    shared: &Arc<Shared>,
    conn: &quinn::Connection,
    send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    mut decoder: FrameDecoder,
    links: &HashMap<LinkId, Arc<LinkRt>>,
) {
    let (ctl, rx) = mpsc::channel(defaults::CONTROL_QUEUE);
    let writer = tokio::spawn(write_control(send, rx));
    for link in links.values() {
        let _ = ctl.try_send(AgentToRelay::Attach {
            link_id: link.cfg.link_id,
            generation: link.cfg.generation,
            side: link.cfg.side,
        });
    }
    let acceptor = tokio::spawn(accept_flows(shared.clone(), conn.clone(), links.clone()));
    let mut retry = tokio::time::interval(defaults::HANDSHAKE_RETRY);
    retry.tick().await;
    // Links whose peer is present on this connection.
    let mut present: HashMap<LinkId, bool> = HashMap::new();
    loop {
        let msg = tokio::select! {
            m = read_message(&mut recv, &mut decoder) => m,
            _ = retry.tick() => {
                for (id, _) in present.iter().filter(|(_, p)| **p) {
                    if let Some(link) = links.get(id) {
                        if link.cfg.side == Side::A && link.ready.borrow().is_none() {
                            initiate(shared, link, &ctl);
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
            RelayToAgent::Attached { link_id } => {
                if let Some(link) = links.get(&link_id) {
                    debug!(link = %link.cfg.name, "attached");
                }
            }
            RelayToAgent::PeerPresent { link_id } => {
                let Some(link) = links.get(&link_id) else {
                    continue;
                };
                present.insert(link_id, true);
                debug!(link = %link.cfg.name, "peer present");
                if link.cfg.side == Side::A {
                    initiate(shared, link, &ctl);
                }
            }
            RelayToAgent::PeerAbsent { link_id } => {
                let Some(link) = links.get(&link_id) else {
                    continue;
                };
                present.insert(link_id, false);
                link.set_ready(None, &shared.metrics);
                *link.pending() = None;
            }
            RelayToAgent::Peer { link_id, frame } => {
                let Some(link) = links.get(&link_id) else {
                    continue;
                };
                if let PeerFrame::Handshake(msg) = frame {
                    handle_handshake(shared, link, conn, &ctl, &msg);
                }
            }
            RelayToAgent::Error { link_id, code } => {
                let name = links.get(&link_id).map_or("?", |l| l.cfg.name.as_str());
                warn!(link = %name, ?code, "relay refused the link");
                if let Some(link) = links.get(&link_id) {
                    link.set_ready(None, &shared.metrics);
                }
            }
        }
    }
    acceptor.abort();
    drop(ctl);
    let _ = writer.await;
}

fn initiate(shared: &Shared, link: &LinkRt, ctl: &mpsc::Sender<AgentToRelay>) {
    match noise::initiate(
        &shared.noise,
        &link.cfg.peer_noise_public_key,
        &link.cfg.link_id,
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
    let session = match link.cfg.side {
        Side::B => {
            match noise::respond(
                &shared.noise,
                &link.cfg.peer_noise_public_key,
                &link.cfg.link_id,
                msg,
            ) {
                Ok((session, reply)) => {
                    let _ = ctl.try_send(AgentToRelay::Peer {
                        link_id: link.cfg.link_id,
                        frame: PeerFrame::Handshake(reply),
                    });
                    session
                }
                Err(e) => {
                    warn!(link = %link.cfg.name, error = %e, "Noise handshake from peer refused");
                    return;
                }
            }
        }
        Side::A => {
            let Some(pending) = link.pending().take() else {
                debug!(link = %link.cfg.name, "unexpected handshake answer ignored");
                return;
            };
            match pending.handle_response(msg) {
                Ok(session) => session,
                Err(e) => {
                    warn!(link = %link.cfg.name, error = %e, "Noise handshake answer refused");
                    return;
                }
            }
        }
    };
    link.set_ready(Some((Arc::new(session), conn.clone())), &shared.metrics);
}

/// Accepts flows the peer opened (through the relay) on this connection.
async fn accept_flows(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    links: HashMap<LinkId, Arc<LinkRt>>,
) {
    while let Ok((send, recv)) = conn.accept_bi().await {
        let shared = shared.clone();
        let links = links.clone();
        tokio::spawn(async move {
            if let Err(e) = accept_flow(&shared, &links, send, recv).await {
                debug!(error = %e, "incoming flow refused");
            }
        });
    }
}

async fn accept_flow(
    shared: &Shared,
    links: &HashMap<LinkId, Arc<LinkRt>>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Result<(), String> {
    let mut header = [0u8; FLOW_HEADER_LEN];
    let refuse = |send: &mut quinn::SendStream, recv: &mut quinn::RecvStream| {
        let _ = send.reset(STREAM_FAILED.into());
        let _ = recv.stop(STREAM_FAILED.into());
    };
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
    let LocalRole::Target(target) = &link.role else {
        refuse(&mut send, &mut recv);
        return Err(format!(
            "link {}: flow opened toward a listen side",
            link.cfg.name
        ));
    };
    let Some((session, _)) = link.ready.borrow().clone() else {
        refuse(&mut send, &mut recv);
        return Err(format!("link {}: no session yet", link.cfg.name));
    };
    let mut rx = Receiver {
        session: session.clone(),
        flow_id: h.flow_id,
        seq: 0,
        stream: recv,
        pending: BytesMut::new(),
    };
    let mut tx = Sender {
        session,
        flow_id: h.flow_id,
        seq: 0,
        stream: send,
    };
    // The first record must be an authentic Open: only then is the target
    // dialled, so neither the relay nor anyone else can make us dial.
    let mut plain = Vec::new();
    let first = tokio::time::timeout(defaults::FLOW_OPEN_TIMEOUT, rx.next(&mut plain)).await;
    match first {
        Ok(Ok(Some(RecordKind::Open))) => {}
        _ => {
            refuse(&mut tx.stream, &mut rx.stream);
            return Err(format!(
                "link {}: flow did not start with Open",
                link.cfg.name
            ));
        }
    }
    let local = match local::dial(target, defaults::TARGET_DIAL_TIMEOUT).await {
        Ok(c) => c,
        Err(e) => {
            warn!(link = %link.cfg.name, target = %target, error = %e, "cannot reach target");
            if tx.send(&[], RecordKind::Reset, &[]).await.is_ok() {
                let _ = tx.stream.finish();
            }
            shared.metrics.flows_failed.increment(1);
            return Ok(());
        }
    };
    shared.metrics.flows_total.increment(1);
    let (reader, writer) = local.split();
    flow::run(tx, rx, reader, writer, shared.metrics.clone())
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

async fn dial_flow(shared: &Shared, link: &LinkRt, conn: local::LocalConn) {
    let mut ready = link.ready.subscribe();
    let current =
        match tokio::time::timeout(defaults::FLOW_OPEN_TIMEOUT, ready.wait_for(|r| r.is_some()))
            .await
        {
            Ok(Ok(current)) => current.clone(),
            _ => None,
        };
    let Some((session, relay_conn)) = current else {
        shared.metrics.local_refused("link_not_ready");
        warn!(link = %link.cfg.name, "link not ready; local connection closed");
        return;
    };
    let Some(flow_id) = link.alloc_flow_id() else {
        warn!(link = %link.cfg.name, "flow ids exhausted for this session");
        return;
    };
    let Ok((send, recv)) = relay_conn.open_bi().await else {
        shared.metrics.flows_failed.increment(1);
        return;
    };
    let mut tx = Sender {
        session: session.clone(),
        flow_id,
        seq: 0,
        stream: send,
    };
    let rx = Receiver {
        session,
        flow_id,
        seq: 0,
        stream: recv,
        pending: BytesMut::new(),
    };
    let mut header = Vec::with_capacity(FLOW_HEADER_LEN);
    FlowHeader {
        link_id: link.cfg.link_id,
        flow_id,
    }
    .write_to(&mut header);
    if tx.send(&header, RecordKind::Open, &[]).await.is_err() {
        shared.metrics.flows_failed.increment(1);
        return;
    }
    shared.metrics.flows_total.increment(1);
    let (reader, writer) = conn.split();
    flow::run(tx, rx, reader, writer, shared.metrics.clone())
        .instrument(info_span!("flow", link = %link.cfg.name, id = flow_id))
        .await;
}
