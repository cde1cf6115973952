use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use comsat_protocol::api::{FlowOutcome, FlowRecord};
use comsat_protocol::record::split_flow_id;
use comsat_protocol::record::{
    FLOW_HEADER_LEN, FlowHeader, RECORD_HEADER_LEN, RecordHeader, RecordKind,
};
use comsat_protocol::workload::{self, CallerIdentity, Needs, Rule};
use comsat_protocol::{FlowId, LinkId, Side};
use tokio::time::Instant;
use tracing::{Instrument, debug, info_span, warn};

use crate::attest::{self, Caller};
use crate::config::{LocalRole, LocalSpec};
use crate::defaults;
use crate::flow::{self, Flow};
use crate::local;
use crate::sync::lock;

use crate::link::{LinkFlow, LinkRt, LinkSession, Opening};
use crate::shared::Shared;

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

/// Why a stream the relay opened was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AcceptError {
    #[error("bad flow header")]
    Header,
    #[error("flow for a link not held on this relay")]
    UnknownLink,
    #[error("link {link}: flow {flow} was never set up")]
    NeverSetUp { link: String, flow: FlowId },
    #[error("link {link}: flow opened toward a listen side")]
    ListenSide { link: String },
    #[error("link {link}: no session yet")]
    NoSession { link: String },
    #[error("link {link}: stream for unknown flow {flow} did not start with Open")]
    NoOpen { link: String, flow: FlowId },
}

/// Resets both halves of a stream that carries no flow.
fn refuse(send: &mut quinn::SendStream, recv: &mut quinn::RecvStream) {
    let _ = send.reset(comsat_protocol::StreamCode::Failed.code().into());
    let _ = recv.stop(comsat_protocol::StreamCode::Failed.code().into());
}

/// What a stream the relay opened is for.
enum Stream<'a> {
    /// A flow that exists goes on on it.
    Resume(Arc<dyn LinkFlow>),
    /// A new flow, its id claimed while it is set up.
    New(Opening<'a>),
}

/// The flow a stream carries on `link`: one that exists resumes on it.
/// One being set up from another stream (its lane and main streams can
/// arrive in either order) gets this one once it exists: it is never
/// opened twice.
async fn claim(link: &LinkRt, flow_id: FlowId) -> Result<Stream<'_>, AcceptError> {
    let deadline = Instant::now() + defaults::FLOW_OPEN_TIMEOUT;
    loop {
        let existing = lock(&link.flows).get(&flow_id).cloned();
        if let Some(flow) = existing {
            return Ok(Stream::Resume(flow));
        }
        if lock(&link.opening).insert(flow_id) {
            return Ok(Stream::New(Opening { link, id: flow_id }));
        }
        if Instant::now() >= deadline {
            return Err(AcceptError::NeverSetUp {
                link: link.cfg.name.clone(),
                flow: flow_id,
            });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Reads the first record of a new flow and finds the session and
/// generation of flow ids it is an authentic `Open` under: the current
/// session, then (side B) those of the handshakes it answered, which it
/// confirms; with its payload. `Ok(None)`: no record that could be an
/// `Open`; `Err`: one that decrypted under no key it could be sealed with
/// (a forgery).
async fn read_open(
    shared: &Shared,
    link: &LinkRt,
    flow_id: FlowId,
    recv: &mut quinn::RecvStream,
) -> Result<Option<(u32, Arc<LinkSession>, Vec<u8>)>, ()> {
    let (current, candidates) = link.sessions();
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
    // The generation of flow ids it belongs to: the peer's current one,
    // its next or the one before (keys differ for each).
    let (tag, id) = split_flow_id(flow_id);
    let opens = |s: &LinkSession| {
        let generations = lock(&s.seen).candidates();
        generations
            .into_iter()
            .filter(|g| *g as u8 == tag)
            .find_map(|g| {
                let mut plain = Vec::new();
                let (_, mut opener) = s.noise.flow(g, id);
                let kind = opener.open_record(0, &ct, &mut plain);
                matches!(kind, Ok(RecordKind::Open)).then_some((g, plain))
            })
    };
    if let Some(found) = current.and_then(|s| {
        let (g, payload) = opens(&s)?;
        Some((g, s, payload))
    }) {
        return Ok(Some(found));
    }
    let Some((g, c, payload)) = candidates.into_iter().find_map(|c| {
        let (g, payload) = opens(&c)?;
        Some((g, c, payload))
    }) else {
        return Err(());
    };
    link.confirm(&c, &shared.metrics);
    Ok(Some((g, c, payload)))
}

async fn accept_flow(
    shared: &Shared,
    links: &HashMap<LinkId, Arc<LinkRt>>,
    (mut send, mut recv): (quinn::SendStream, quinn::RecvStream),
    lane: bool,
) -> Result<(), AcceptError> {
    let asked = std::time::Instant::now();
    let started = open_flow(shared, links, &mut recv).await;
    let NewFlow {
        link,
        target,
        header: h,
        claim,
        generation,
        session,
        caller,
    } = match started {
        Ok(Opened::New(new)) => new,
        Ok(Opened::Resume(link, id, flow)) => {
            debug!(link = %link.cfg.name, flow = id, "flow resumes on a new stream");
            flow.offer_stream(send, recv, lane);
            return Ok(());
        }
        Ok(Opened::Replayed) => {
            refuse(&mut send, &mut recv);
            return Ok(());
        }
        Err(e) => {
            refuse(&mut send, &mut recv);
            return Err(e);
        }
    };
    let caller = match caller {
        Ok(caller) => caller,
        Err(why) => {
            shared.metrics.workload_refused(&link.cfg.name);
            warn!(link = %link.cfg.name, flow = h.flow_id, "flow refused: {why}");
            log_refused(shared, link, h.flow_id, Side::B, None);
            return reset_flow(shared, &session, generation, h.flow_id, send).await;
        }
    };
    let local = match local::dial(target, defaults::TARGET_DIAL_TIMEOUT).await {
        Ok(c) => {
            shared.metrics.flow_setup("dial", asked.elapsed());
            c
        }
        Err(e) => {
            warn!(link = %link.cfg.name, target = %target, error = %e, "cannot reach target");
            return reset_flow(shared, &session, generation, h.flow_id, send).await;
        }
    };
    let (reader, mut writer) = local.split();
    if link.cfg.proxy_protocol {
        let header = workload::proxy_v2_header(caller.as_ref());
        if let Err(e) = writer.write_all(&header).await {
            warn!(link = %link.cfg.name, target = %target, error = %e, "cannot write the PROXY header to the target");
            return reset_flow(shared, &session, generation, h.flow_id, send).await;
        }
    }
    let flow = Flow::new(
        (h.flow_id, generation),
        session,
        link.clone(),
        false,
        shared,
        caller,
    );
    flow.opened_by_peer();
    lock(&link.flows).insert(h.flow_id, flow.clone());
    drop(claim);
    shared.metrics.flows_total.increment(1);
    flow::run(flow, reader, writer, Some(((send, recv), lane)))
        .instrument(info_span!("flow", link = %link.cfg.name, id = h.flow_id))
        .await;
    Ok(())
}

/// Records a flow refused for its caller in the flow log (side A: no flow
/// id was taken, 0).
fn log_refused(
    shared: &Shared,
    link: &LinkRt,
    flow_id: FlowId,
    side: Side,
    caller: Option<CallerIdentity>,
) {
    let caller = caller.unwrap_or_default();
    let now = crate::flowlog::now_ms();
    shared.flow_log.record(
        &link.cfg.name,
        FlowRecord {
            link_id: link.cfg.link_id,
            flow_id,
            side,
            caller_id: caller.id,
            caller: caller.selectors,
            relay_id: lock(&link.relay_at).relay,
            started_ms: now,
            ended_ms: now,
            bytes_sent: 0,
            bytes_received: 0,
            outcome: FlowOutcome::Refused,
        },
    );
}

/// Ends a flow with a sealed reset (the peer resets its local
/// connection), and counts it failed.
async fn reset_flow(
    shared: &Shared,
    session: &LinkSession,
    generation: u32,
    flow_id: FlowId,
    mut send: quinn::SendStream,
) -> Result<(), AcceptError> {
    let mut out = Vec::new();
    if session
        .noise
        .flow(generation, split_flow_id(flow_id).1)
        .0
        .seal_record(0, RecordKind::Reset, &[], &mut out)
        .is_ok()
        && send.write_all(&out).await.is_ok()
    {
        let _ = send.finish();
    }
    shared.metrics.flows_failed.increment(1);
    Ok(())
}

/// A new flow, authenticated by its `Open` record.
struct NewFlow<'a> {
    link: &'a Arc<LinkRt>,
    /// What to dial for it.
    target: &'a LocalSpec,
    header: FlowHeader,
    /// Its id, claimed until the flow exists.
    claim: Opening<'a>,
    /// The generation of flow ids (and keys) it belongs to.
    generation: u32,
    session: Arc<LinkSession>,
    /// Who opened it, as its `Open` says, if the link admits them.
    caller: Result<Option<CallerIdentity>, &'static str>,
}

/// Side B: the caller a flow's `Open` names (`None`: it names none, as
/// agents that attest no callers send it), if the link admits it: where
/// the link has `allow` rules, a caller that one of them matches, with the
/// SPIFFE ID of the first that does. Side A checked the same rules; this
/// keeps an agent that does not (an older one) from letting anyone in.
fn caller_of(link: &LinkRt, payload: &[u8]) -> Result<Option<CallerIdentity>, &'static str> {
    let caller = match payload {
        [] => None,
        bytes => {
            Some(CallerIdentity::decode(bytes).map_err(|_| "its caller identity does not parse")?)
        }
    };
    if link.cfg.allow.is_empty() {
        return Ok(caller);
    }
    let rules = link
        .rules
        .as_deref()
        .ok_or("the link's rules do not parse")?;
    let Some(c) = &caller else {
        return Err("it names no caller (the peer agent attests none)");
    };
    let workload = c.workload()?;
    match workload::first_match(rules, &workload) {
        Some(rule) if rule.id() == c.id.as_deref() => Ok(caller),
        Some(_) => Err("its caller's SPIFFE ID is not its rule's"),
        None => Err("no allow rule of the link matches its caller"),
    }
}

/// What the start of a stream the relay opened asks for.
enum Opened<'a> {
    Resume(&'a Arc<LinkRt>, FlowId, Arc<dyn LinkFlow>),
    New(NewFlow<'a>),
    /// An authentic `Open` of a flow this session already took.
    Replayed,
}

/// Reads a stream's flow header and, for a new flow, its `Open` record;
/// nothing is dialled or sealed here.
async fn open_flow<'a>(
    shared: &Shared,
    links: &'a HashMap<LinkId, Arc<LinkRt>>,
    recv: &mut quinn::RecvStream,
) -> Result<Opened<'a>, AcceptError> {
    let mut header = [0u8; FLOW_HEADER_LEN];
    let read =
        tokio::time::timeout(defaults::FLOW_OPEN_TIMEOUT, recv.read_exact(&mut header)).await;
    let parsed = match read {
        Ok(Ok(())) => FlowHeader::decode(&header).ok().flatten(),
        _ => None,
    };
    let (h, _) = parsed.ok_or(AcceptError::Header)?;
    let link = links.get(&h.link_id).ok_or(AcceptError::UnknownLink)?;
    let claim = match claim(link, h.flow_id).await? {
        Stream::Resume(flow) => return Ok(Opened::Resume(link, h.flow_id, flow)),
        Stream::New(claim) => claim,
    };
    let name = || link.cfg.name.clone();
    let LocalRole::Target(target) = &link.role else {
        return Err(AcceptError::ListenSide { link: name() });
    };
    let (current, candidates) = link.sessions();
    if current.is_none() && candidates.is_empty() {
        return Err(AcceptError::NoSession { link: name() });
    }
    // A new flow must start with an authentic Open record (seq 0): only
    // then is the target dialled, so neither the relay nor anyone else can
    // make us dial. Side A may open flows under the session of its last
    // handshake before side B saw any other proof of it.
    let opened = tokio::time::timeout(
        defaults::FLOW_OPEN_TIMEOUT,
        read_open(shared, link, h.flow_id, recv),
    )
    .await;
    let Ok(Ok(Some((generation, session, payload)))) = opened else {
        if matches!(opened, Ok(Err(()))) {
            link.forged(shared.max_forgeries, &shared.metrics);
        }
        return Err(AcceptError::NoOpen {
            link: name(),
            flow: h.flow_id,
        });
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
    match accepted {
        Ok(true) => {
            debug!(link = %link.cfg.name, generation, "the peer started a new generation of flow ids");
        }
        Ok(false) => {}
        Err(e) => {
            shared.metrics.peer_refused("replayed_flow");
            warn!(link = %link.cfg.name, error = %e, "replayed flow refused: the relay wrote a flow again that this session already carried");
            return Ok(Opened::Replayed);
        }
    }
    Ok(Opened::New(NewFlow {
        link,
        target,
        header: h,
        claim,
        generation,
        session,
        caller: caller_of(link, &payload),
    }))
}

/// Accepts local connections on a listen link and opens a flow for each.
pub(crate) async fn serve_listener(
    shared: Arc<Shared>,
    link: Arc<LinkRt>,
    listener: local::Listener,
) {
    let listener = match listener {
        local::Listener::Udp(socket) => {
            return crate::datagrams::serve_listener(link, socket).await;
        }
        stream => stream,
    };
    // Checked when the link was taken; rules that fail here admit no one.
    let Some(rules) = link.rules.clone() else {
        warn!(link = %link.cfg.name, "listener closed: its allow rules do not parse");
        return;
    };
    let needs = Needs::of(&rules);
    let attesting = Arc::new(tokio::sync::Semaphore::new(defaults::MAX_ATTESTING));
    loop {
        let (conn, caller) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(link = %link.cfg.name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let shared = shared.clone();
        let link = link.clone();
        let rules = rules.clone();
        let attesting = attesting.clone();
        let accepted = std::time::Instant::now();
        tokio::spawn(async move {
            let mut identity = None;
            if !rules.is_empty() {
                let _turn = attesting.acquire().await;
                match admitted(&shared, &link, &rules, needs, caller).await {
                    Some(c) => identity = Some(c),
                    None => return refuse_local(conn),
                }
            }
            dial_flow(&shared, &link, conn, accepted, identity).await;
        });
    }
}

/// The identity of the workload behind `caller` if one of `rules` matches
/// it; a caller refused is logged with its selectors and counted.
async fn admitted(
    shared: &Shared,
    link: &LinkRt,
    rules: &[Rule],
    needs: Needs,
    caller: Caller,
) -> Option<CallerIdentity> {
    let workload = tokio::task::spawn_blocking(move || attest::attest(caller, needs))
        .await
        .unwrap_or_default();
    if let Some(rule) = workload::first_match(rules, &workload) {
        debug!(link = %link.cfg.name, %workload, id = rule.id().unwrap_or("-"), "local caller admitted");
        return Some(CallerIdentity::of(&workload, Some(rule)));
    }
    shared.metrics.local_refused("workload");
    shared.metrics.workload_refused(&link.cfg.name);
    let caller = CallerIdentity::of(&workload, None);
    log_refused(shared, link, 0, Side::A, Some(caller));
    warn!(link = %link.cfg.name, %workload, "local caller refused: no allow rule of the link matches it");
    None
}

/// Ends a local connection no flow carries with a reset, so the
/// application never takes it for a clean, empty answer.
fn refuse_local(conn: local::LocalConn) {
    let (reader, writer) = conn.split();
    writer.abort();
    drop(reader);
}

async fn dial_flow(
    shared: &Shared,
    link: &Arc<LinkRt>,
    conn: local::LocalConn,
    accepted: std::time::Instant,
    caller: Option<CallerIdentity>,
) {
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
    let payload = match caller.as_ref().map(CallerIdentity::encode) {
        None => Vec::new(),
        Some(Ok(bytes)) => bytes,
        Some(Err(e)) => {
            warn!(link = %link.cfg.name, error = %e, "caller identity not encoded; local connection reset");
            return refuse_local(conn);
        }
    };
    let flow = Flow::new(
        (flow_id, generation),
        current.session,
        link.clone(),
        true,
        shared,
        caller,
    );
    if flow.open(&payload).is_err() {
        return refuse_local(conn);
    }
    shared.metrics.flow_setup("listen", accepted.elapsed());
    lock(&link.flows).insert(flow_id, flow.clone());
    shared.metrics.flows_total.increment(1);
    let (reader, writer) = conn.split();
    flow::run(flow, reader, writer, None)
        .instrument(info_span!("flow", link = %link.cfg.name, id = flow_id))
        .await;
}
