//! Flows that survive reconnects.
//!
//! A flow is one local connection carried as records over a QUIC stream.
//! Records are sealed with the link's Noise session under the nonce
//! `(flow_id << 40) | seq`. The sender keeps every record until the peer
//! agent acknowledges it (cumulative acks, sealed end to end on the link's
//! control channel); only that ack frees it, never the relay's acceptance.
//! When the stream dies (relay restart, network outage) the flow waits for
//! the link to come back, gets a new stream, and resends everything not
//! acknowledged; the receiver drops what it already delivered. The local
//! socket stays open throughout, unless the outage outlasts the flow
//! timeout: then the application sees a reset.
//!
//! Memory: each flow buffers at most [`defaults::FLOW_WINDOW`] of
//! unacknowledged records, and all flows of the agent together at most its
//! replay budget; a full window stops reading the local socket
//! (backpressure, never unbounded growth).
//!
//! What a flow decides lives in [`crate::core::flow`] (sans IO); this is
//! its driver: the QUIC streams, the local socket, the runtimes and the
//! timers, calling the core with the current time.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use comsat_protocol::api::{FlowOutcome, FlowRecord};
use comsat_protocol::limits::NOISE_TAG_LEN;
use comsat_protocol::noise::{NoiseError, RECORD_PREFIX_LEN};
use comsat_protocol::quantum::Quantum;
use comsat_protocol::record::{
    FlowHeader, RECORD_HEADER_LEN, RecordError, RecordHeader, RecordKind, decode_record,
};
use comsat_protocol::workload::CallerIdentity;
use comsat_protocol::{FlowId, Side, StreamCode};
use tokio::runtime::Handle;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::time::Instant;
use tracing::{Instrument, debug};

use crate::core::ack::AckWhen;
use crate::core::flow::{
    BulkMeter, Delivery, End, FlowLimits, Lost, Received, RecvCore, RecvError, Resume,
    ResumeLimits, SendCore, StreamEnded, Then, completed,
};
use crate::defaults;
use crate::flowlog::{self, FlowLog};
use crate::group::BusyGuard;
use crate::link::{LinkFlow, LinkRt, LinkSession};
use crate::local::{LocalConn, LocalRead, LocalWrite};
use crate::metrics::Metrics;
use crate::shared::Shared;
use crate::sync::lock;

/// Why a stream or a flow ended.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FlowError {
    #[error("local socket: {0}")]
    Local(#[from] std::io::Error),
    #[error("relay stream lost: {0}")]
    Lost(String),
    #[error("relay connection went silent (idle timeout)")]
    Silent,
    /// The peer finished the stream: its end of the flow is done (the flow
    /// completes as soon as this side is), or it went on elsewhere.
    #[error("relay stream finished")]
    Finished,
    #[error("bad record: {0}")]
    Record(#[from] RecordError),
    #[error("record failed to seal: {0}")]
    Noise(#[from] NoiseError),
    #[error(transparent)]
    Recv(#[from] RecvError),
    #[error("the relay refused the flow: its link has the most concurrent flows its grant allows")]
    OverLimit,
}

impl FlowError {
    /// How the stream was lost, if a new stream can carry the flow on.
    fn lost(&self) -> Option<Lost> {
        match self {
            Self::Lost(_) => Some(Lost::Failed),
            Self::Silent => Some(Lost::Silent),
            Self::Finished => Some(Lost::Finished),
            _ => None,
        }
    }

    fn peer_reset(&self) -> bool {
        matches!(self, Self::Recv(RecvError::PeerReset))
    }
}

/// The driver's time, for the cores.
fn now() -> std::time::Instant {
    Instant::now().into_std()
}

/// How a write on a flow's stream failed.
fn write_error(e: quinn::WriteError) -> FlowError {
    match e {
        quinn::WriteError::ConnectionLost(quinn::ConnectionError::TimedOut) => FlowError::Silent,
        quinn::WriteError::Stopped(code) if code == StreamCode::PeerSilent.code().into() => {
            FlowError::Silent
        }
        quinn::WriteError::Stopped(code) if code == StreamCode::FlowLimit.code().into() => {
            FlowError::OverLimit
        }
        e => FlowError::Lost(e.to_string()),
    }
}

/// How a read on a flow's stream failed.
fn read_error(e: quinn::ReadError) -> FlowError {
    match e {
        quinn::ReadError::ConnectionLost(quinn::ConnectionError::TimedOut) => FlowError::Silent,
        quinn::ReadError::Reset(code) if code == StreamCode::PeerSilent.code().into() => {
            FlowError::Silent
        }
        quinn::ReadError::Reset(code) if code == StreamCode::FlowLimit.code().into() => {
            FlowError::OverLimit
        }
        e => FlowError::Lost(e.to_string()),
    }
}

type Stream = (quinn::SendStream, quinn::RecvStream);

/// One flow's state, shared by its tasks.
pub(crate) struct Flow {
    pub(crate) id: FlowId,
    pub(crate) session: Arc<LinkSession>,
    link: Arc<LinkRt>,
    dialer: bool,
    /// Sealed records until the peer acknowledges them, each holding its
    /// share of the agent's replay budget.
    tx: Mutex<SendCore<Option<OwnedSemaphorePermit>>>,
    tx_event: Notify,
    rx: Mutex<RecvCore>,
    /// Streams the peer opened for the flow, and whether on the lane.
    streams_in: mpsc::Sender<(Stream, bool)>,
    streams_out: tokio::sync::Mutex<mpsc::Receiver<(Stream, bool)>>,
    /// Set while the flow moves to another runtime: the local reader stops
    /// and hands its half of the socket back.
    handoff: watch::Sender<bool>,
    end: watch::Sender<End>,
    /// The flow turned bulk: its streams ride the main connection, never
    /// the lane (dialling side only).
    bulk: AtomicBool,
    meter: Mutex<BulkMeter>,
    /// Woken when the flow turns bulk.
    turned_bulk: Notify,
    budget: Arc<Semaphore>,
    metrics: Metrics,
    /// Where the flow's record goes when it ends.
    log: Arc<FlowLog>,
    caller: Option<CallerIdentity>,
    started_ms: u64,
    /// Bytes read from the local connection and sealed.
    bytes_sent: AtomicU64,
    /// Bytes written to the local connection.
    bytes_received: AtomicU64,
}

impl Flow {
    /// A new flow of `link` under `session`'s keys; `caller`: who opened
    /// it, as attested (side A) or as its `Open` says (side B).
    pub(crate) fn new(
        (id, generation): (FlowId, u32),
        session: Arc<LinkSession>,
        link: Arc<LinkRt>,
        dialer: bool,
        shared: &Shared,
        caller: Option<CallerIdentity>,
    ) -> Arc<Self> {
        let (streams_in, streams_out) = mpsc::channel(2);
        let (sealer, opener) = session
            .noise
            .flow(generation, comsat_protocol::record::split_flow_id(id).1);
        let limits = FlowLimits {
            window: defaults::FLOW_WINDOW,
            ack_bytes: defaults::ACK_BYTES,
            records_per_key: session.noise.params().records_per_key(),
        };
        Arc::new(Self {
            id,
            session,
            link,
            dialer,
            tx: Mutex::new(SendCore::new(sealer, limits)),
            tx_event: Notify::new(),
            rx: Mutex::new(RecvCore::new(opener, limits)),
            streams_in,
            streams_out: tokio::sync::Mutex::new(streams_out),
            handoff: watch::channel(false).0,
            end: watch::channel(End::Running).0,
            bulk: AtomicBool::new(false),
            meter: Mutex::new(BulkMeter::new(
                defaults::BULK_BYTES,
                defaults::BULK_WINDOW,
                now(),
            )),
            turned_bulk: Notify::new(),
            budget: shared.budget.clone(),
            metrics: shared.metrics.clone(),
            log: shared.flow_log.clone(),
            caller,
            started_ms: flowlog::now_ms(),
            bytes_sent: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
        })
    }

    /// Hands a stream the peer opened for this flow (on the lane or not)
    /// to the flow.
    pub(crate) fn offer_stream(
        &self,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        on_lane: bool,
    ) {
        if let Err(mpsc::error::TrySendError::Full(((mut s, mut r), _))) =
            self.streams_in.try_send(((send, recv), on_lane))
        {
            let _ = s.reset(StreamCode::Failed.code().into());
            let _ = r.stop(StreamCode::Failed.code().into());
        }
    }

    /// Ends the flow with a reset (the application sees a reset socket).
    pub(crate) fn reset(&self) {
        self.end.send_if_modified(|e| {
            if *e == End::Running {
                *e = End::Reset;
                true
            } else {
                false
            }
        });
        self.tx_event.notify_waiters();
    }

    fn complete_if_done(&self) {
        let done = {
            let tx = lock(&self.tx);
            let rx = lock(&self.rx);
            completed(&tx, &rx)
        };
        if done {
            self.end.send_if_modified(|e| {
                if *e == End::Running {
                    *e = End::Completed;
                    true
                } else {
                    false
                }
            });
        }
    }

    /// Seals one record where it lies and queues it. `record` holds
    /// [`RECORD_PREFIX_LEN`] bytes of room for the header, then the payload.
    fn push(
        &self,
        kind: RecordKind,
        record: Vec<u8>,
        budget: Option<OwnedSemaphorePermit>,
    ) -> Result<(), FlowError> {
        let pushed = lock(&self.tx).push(kind, record, budget)?;
        if pushed.rekeyed {
            // The flow moved to the next key of its own.
            self.metrics.rekeyed("records");
        }
        self.tx_event.notify_waiters();
        Ok(())
    }

    /// Seals and queues a record without payload.
    fn push_empty(&self, kind: RecordKind) -> Result<(), FlowError> {
        let mut record = Vec::with_capacity(RECORD_PREFIX_LEN + NOISE_TAG_LEN);
        record.resize(RECORD_PREFIX_LEN, 0);
        self.push(kind, record, None)
    }

    /// Queues the `Open` record that starts a flow (dialling side), with
    /// `payload` (the caller's identity, or nothing).
    pub(crate) fn open(&self, payload: &[u8]) -> Result<(), FlowError> {
        let mut record = Vec::with_capacity(RECORD_PREFIX_LEN + payload.len() + NOISE_TAG_LEN);
        record.resize(RECORD_PREFIX_LEN, 0);
        record.extend_from_slice(payload);
        self.push(RecordKind::Open, record, None)
    }

    /// Records that the `Open` record (seq 0) was received before the flow
    /// existed (accepting side).
    pub(crate) fn opened_by_peer(&self) {
        let (upto, when) = lock(&self.rx).opened_by_peer();
        self.link.queue_ack(self.id, upto, when);
    }

    /// The peer delivered every record below `upto`.
    pub(crate) fn on_ack(&self, upto: u64) {
        match lock(&self.tx).on_ack(upto) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) => {
                debug!(error = %e, "acknowledgement ignored");
                return;
            }
        }
        self.tx_event.notify_waiters();
        self.complete_if_done();
    }

    fn ended(&self) -> End {
        *self.end.borrow()
    }

    /// Counts `n` bytes carried (either way) toward turning bulk: more
    /// than [`defaults::BULK_BYTES`] in one [`defaults::BULK_WINDOW`].
    /// Only the dialling side moves a flow, so only it counts.
    fn meter(&self, n: usize) {
        if !self.dialer || self.bulk.load(Ordering::Relaxed) {
            return;
        }
        if lock(&self.meter).count(n, now()) {
            self.bulk.store(true, Ordering::Relaxed);
            self.turned_bulk.notify_one();
        }
    }

    /// Counts the flow's end and forgets it.
    fn closed(&self, how: End) {
        self.metrics.flows_open.decrement(1.0);
        if how == End::Reset {
            self.metrics.flows_failed.increment(1);
        }
        self.link.remove_flow(self.id);
        let caller = self.caller.clone().unwrap_or_default();
        self.log.record(
            &self.link.cfg.name,
            FlowRecord {
                link_id: self.link.cfg.link_id,
                flow_id: self.id,
                side: if self.dialer { Side::A } else { Side::B },
                caller_id: caller.id,
                caller: caller.selectors,
                relay_id: lock(&self.link.relay_at).relay,
                started_ms: self.started_ms,
                ended_ms: flowlog::now_ms(),
                bytes_sent: self.bytes_sent.load(Ordering::Relaxed),
                bytes_received: self.bytes_received.load(Ordering::Relaxed),
                outcome: match how {
                    End::Reset | End::Running => FlowOutcome::Reset,
                    End::Completed => FlowOutcome::Completed,
                },
            },
        );
    }

    /// The next stream the peer opened for this flow (accepting side).
    async fn offered(&self) -> Option<(Stream, bool)> {
        self.streams_out.lock().await.recv().await
    }

    /// Reads the local socket into records while the window has room;
    /// gives the reader back when the flow moves to another runtime.
    async fn read_local(self: Arc<Self>, mut reader: LocalRead) -> Option<LocalRead> {
        let mut quantum = Quantum::default();
        let mut handoff = self.handoff.subscribe();
        loop {
            loop {
                let notified = self.tx_event.notified();
                if self.ended() != End::Running {
                    return None;
                }
                if *handoff.borrow_and_update() {
                    return Some(reader);
                }
                if lock(&self.tx).has_room() {
                    break;
                }
                tokio::select! {
                    () = notified => {}
                    _ = handoff.changed() => {}
                }
            }
            let mut end = self.end.subscribe();
            // Nothing is read from the socket until `read_chunk` returns.
            let read = tokio::select! {
                r = reader.read_chunk(RECORD_PREFIX_LEN, defaults::READ_CHUNK, NOISE_TAG_LEN) => r,
                _ = end.wait_for(|e| *e != End::Running) => return None,
                _ = handoff.wait_for(|h| *h) => return Some(reader),
            };
            match read {
                Ok(Some(record)) => {
                    let len = record.len() - RECORD_PREFIX_LEN;
                    let kib = u32::try_from(len.div_ceil(1024)).unwrap_or(u32::MAX);
                    // A move waiting for the reader takes this record
                    // without its share of the budget (one record over it,
                    // at most), rather than wait for acks it may itself be
                    // holding up.
                    let permit = tokio::select! {
                        p = self.budget.clone().acquire_many_owned(kib) => p.ok(),
                        _ = end.wait_for(|e| *e != End::Running) => return None,
                        _ = handoff.wait_for(|h| *h) => None,
                    };
                    if self.push(RecordKind::Data, record, permit).is_err() {
                        self.reset();
                        return None;
                    }
                    self.metrics.sent_bytes.increment(len as u64);
                    self.bytes_sent.fetch_add(len as u64, Ordering::Relaxed);
                    self.meter(len);
                    if quantum.spend(len) {
                        tokio::task::yield_now().await;
                    }
                }
                Ok(None) => {
                    if self.push_empty(RecordKind::Fin).is_err() {
                        self.reset();
                    }
                    return None;
                }
                Err(e) => {
                    // `run` tells the peer.
                    debug!(error = %e, "local read failed");
                    self.reset();
                    return None;
                }
            }
        }
    }

    /// Writes every queued record from the oldest unacknowledged one on.
    async fn write_stream(&self, send: &mut quinn::SendStream) -> Result<(), FlowError> {
        let mut cursor = lock(&self.tx).cursor();
        loop {
            let notified = self.tx_event.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let batch = lock(&self.tx).poll_transmit(&mut cursor);
            if batch.is_empty() {
                notified.await;
                continue;
            }
            for bytes in batch {
                send.write_chunk(bytes).await.map_err(write_error)?;
            }
        }
    }

    /// Delivers records from the stream to the application, in order,
    /// dropping duplicates.
    async fn read_stream(
        &self,
        recv: &mut quinn::RecvStream,
        writer: &mut LocalWrite,
        delivery: &mut Delivery,
    ) -> Result<(), FlowError> {
        // A record an earlier stream left half written goes out first.
        self.finish_delivery(delivery, writer).await?;
        let mut pending = BytesMut::new();
        let mut frames: [Bytes; defaults::READ_FRAMES] = Default::default();
        let mut quantum = Quantum::default();
        let resend = lock(&self.rx).on_stream();
        if let Some(delivered) = resend {
            // The sender resends what it kept: it learns soon what to skip.
            self.link.queue_ack(self.id, delivered, AckWhen::Soon);
        }
        loop {
            while let Some((header, _, used)) = decode_record(&pending)? {
                // Decrypted where it lies; the plaintext is handed on as is.
                let record = pending.split_to(used);
                let received = lock(&self.rx).handle_record(header.seq, record)?;
                match received {
                    Received::Duplicate { ack } => {
                        // Already delivered: a resend after a reconnect.
                        // Ack again, in case the first ack was lost.
                        self.link.queue_ack(self.id, ack, AckWhen::Soon);
                    }
                    Received::Deliver { payload, fin, ack } => {
                        // The record is ours from here: if this stream dies
                        // while it is being written, the next one finishes
                        // the write; it is never delivered twice.
                        delivery.set(payload, fin, ack);
                        self.finish_delivery(delivery, writer).await?;
                        if quantum.spend(used) {
                            tokio::task::yield_now().await;
                        }
                    }
                }
            }
            // Room for the whole record in one allocation, so a 64 KiB
            // record is not copied again each time the buffer grows.
            if let Ok(Some(h)) = RecordHeader::decode(&pending) {
                pending.reserve((RECORD_HEADER_LEN + h.len).saturating_sub(pending.len()));
            }
            match recv.read_chunks(&mut frames).await {
                Ok(Some(n)) => {
                    for frame in &mut frames[..n] {
                        pending.extend_from_slice(frame);
                        *frame = Bytes::new();
                    }
                }
                Ok(None) => return Err(FlowError::Finished),
                Err(e) => return Err(read_error(e)),
            }
        }
    }

    /// Hands what `delivery` holds to the application, then acknowledges it.
    async fn finish_delivery(
        &self,
        delivery: &mut Delivery,
        writer: &mut LocalWrite,
    ) -> Result<(), FlowError> {
        while !delivery.unwritten().is_empty() {
            let n = writer.write(delivery.unwritten()).await?;
            if n == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into());
            }
            delivery.wrote(n);
            self.metrics.received_bytes.increment(n as u64);
            self.bytes_received.fetch_add(n as u64, Ordering::Relaxed);
            self.meter(n);
        }
        if delivery.fin() {
            writer.shutdown().await?;
        }
        let done = delivery.complete();
        let ack = lock(&self.rx).on_delivered(done);
        if let Some((upto, when)) = ack {
            // The peer's flow ends when its Fin is acknowledged.
            self.link.queue_ack(self.id, upto, when);
            self.complete_if_done();
        }
        Ok(())
    }

    /// A new stream for this flow, and whether it rides the lane. The
    /// dialer opens one on the link each time it becomes ready anew
    /// (`last_epoch` remembers the last try), or at once with `now`; on the
    /// link's lane unless the flow is bulk or `lane` is false (its last
    /// lane stream failed). The other side waits for the peer's.
    async fn next_stream(
        &self,
        last_epoch: &mut Option<u64>,
        now: bool,
        lane: bool,
    ) -> Option<(Stream, bool)> {
        if !self.dialer {
            return self.offered().await;
        }
        let mut ready = self.link.ready.subscribe();
        let mut now = now;
        loop {
            let current = ready
                .wait_for(|r| {
                    r.as_ref().is_some_and(|r| {
                        Arc::ptr_eq(&r.session, &self.session)
                            && (now || Some(r.epoch) != *last_epoch)
                    })
                })
                .await
                .ok()?
                .clone()?;
            *last_epoch = Some(current.epoch);
            now = false;
            let on_lane = lane && !self.bulk.load(Ordering::Relaxed);
            let conns = on_lane
                .then(|| self.link.lane_conn())
                .flatten()
                .map(|c| (c, true))
                .into_iter()
                .chain([(current.conn, false)]);
            for (conn, on_lane) in conns {
                let Ok((mut send, recv)) = conn.open_bi().await else {
                    continue;
                };
                let mut header = Vec::new();
                FlowHeader {
                    link_id: self.link.cfg.link_id,
                    flow_id: self.id,
                }
                .write_to(&mut header);
                if send.write_all(&header).await.is_ok() {
                    return Some(((send, recv), on_lane));
                }
            }
        }
    }
}

impl LinkFlow for Flow {
    fn reset(&self) {
        Self::reset(self);
    }

    fn on_ack(&self, upto: u64) {
        Self::on_ack(self, upto);
    }

    fn offer_stream(&self, send: quinn::SendStream, recv: quinn::RecvStream, on_lane: bool) {
        Self::offer_stream(self, send, recv, on_lane);
    }
}

/// How one stream of a flow ended.
enum StreamEnd {
    /// The stream failed (`Some`), or the flow ended.
    Done(Option<FlowError>),
    /// The flow moves to another stream at once: it turned bulk on the
    /// lane (`bulk`: to the main connection), or a lane came up while it
    /// rode the main connection, not bulk (to the lane).
    Move { bulk: bool },
}

/// Runs a flow to its end: the local reader in its own task, streams one
/// after another here. `first` is a stream already open for it (and
/// whether on the lane).
pub(crate) async fn run(
    flow: Arc<Flow>,
    reader: LocalRead,
    writer: LocalWrite,
    first: Option<(Stream, bool)>,
) {
    flow.metrics.flows_open.increment(1.0);
    let reading = tokio::spawn(flow.clone().read_local(reader));
    let limits = ResumeLimits {
        flow_timeout: flow.link.flow_timeout,
        idle_timeout: defaults::SILENCE_DATA,
        quick_retries: defaults::QUICK_RETRIES,
        settled: defaults::STREAM_SETTLED,
    };
    Driver {
        busy: flow.link.busy().enter(),
        flow,
        reading,
        writer,
        st: Progress {
            last_epoch: None,
            resume: Resume::new(limits, now()),
            delivery: Delivery::default(),
        },
    }
    .drive(first)
    .await;
}

/// What carries a flow from stream to stream (see [`run`]); it moves to
/// the runtime that drives its current stream's connection.
struct Driver {
    flow: Arc<Flow>,
    /// The local reader's task; it gives the reader back for a move.
    reading: tokio::task::JoinHandle<Option<LocalRead>>,
    writer: LocalWrite,
    st: Progress,
    /// Counts the flow in its group's, which keeps the lane up.
    busy: BusyGuard,
}

/// Where a flow's [`Driver`] stands between streams.
struct Progress {
    /// The link's epoch the dialer last opened a stream in.
    last_epoch: Option<u64>,
    resume: Resume,
    delivery: Delivery,
}

type Boxed = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// What the driver does after a stream ended.
enum After {
    /// Waits for (or opens) the next stream.
    Next,
    /// The flow ended so.
    Ended(End),
}

impl Driver {
    fn drive_boxed(self, first: Option<(Stream, bool)>) -> Boxed {
        Box::pin(self.drive(first))
    }

    async fn drive(mut self, mut first: Option<(Stream, bool)>) {
        let flow = self.flow.clone();
        let result = loop {
            let stream = match first.take() {
                Some(s) => Some(s),
                None => self.wait_stream().await,
            };
            let Some(((send, recv), on_lane)) = stream else {
                if flow.ended() == End::Running {
                    debug!("flow timed out waiting for its link");
                    flow.reset();
                }
                break flow.ended();
            };
            // The flow runs where its stream's connection is driven: on
            // the lane's thread while it rides the lane.
            if let Some(rt) = &flow.link.runtimes {
                let to = if on_lane { &rt.lane } else { &rt.main };
                if Handle::current().id() != to.id() {
                    return self.move_to(to.clone(), ((send, recv), on_lane)).await;
                }
            }
            match self.carry((send, recv), on_lane).await {
                After::Next => {}
                After::Ended(end) => break end,
            }
        };
        self.reading.abort();
        flow.closed(result);
        if result == End::Reset {
            self.writer.abort();
        } else {
            debug!("flow closed");
        }
    }

    /// The next stream, or `None` if the flow ended or timed out first.
    async fn wait_stream(&mut self) -> Option<(Stream, bool)> {
        let flow = &self.flow;
        let mut end = flow.end.subscribe();
        let deadline = Instant::from_std(self.st.resume.deadline(now()));
        let next = self.st.resume.next();
        tokio::select! {
            s = flow.next_stream(&mut self.st.last_epoch, next.now, next.lane) => s,
            _ = tokio::time::sleep_until(deadline) => None,
            _ = end.wait_for(|e| *e != End::Running) => None,
        }
    }

    /// Carries the flow on one stream until it ends, then decides what
    /// comes next.
    async fn carry(&mut self, (mut send, mut recv): Stream, on_lane: bool) -> After {
        let flow = self.flow.clone();
        let metrics = &flow.metrics;
        if self.st.resume.on_stream(now()) {
            metrics.flows_resumed.increment(1);
        }
        let mut end = flow.end.subscribe();
        // A lane that comes up from now on (not one that was up: the
        // flow may have left it because it failed).
        let mut lanes = flow.link.lane.subscribe();
        lanes.borrow_and_update();
        let may_move = flow.dialer && !on_lane && flow.link.runtimes.is_some();
        let lane_up = async {
            loop {
                if lanes.changed().await.is_err() {
                    return std::future::pending().await;
                }
                if !flow.bulk.load(Ordering::Relaxed) && flow.link.lane_conn().is_some() {
                    return;
                }
            }
        };
        let ended = tokio::select! {
            r = flow.write_stream(&mut send) => StreamEnd::Done(r.err()),
            r = flow.read_stream(&mut recv, &mut self.writer, &mut self.st.delivery) => StreamEnd::Done(r.err()),
            _ = end.wait_for(|e| *e != End::Running) => StreamEnd::Done(None),
            _ = flow.turned_bulk.notified(), if on_lane => StreamEnd::Move { bulk: true },
            () = lane_up, if may_move => StreamEnd::Move { bulk: false },
        };
        let err = match ended {
            StreamEnd::Done(err) => err,
            StreamEnd::Move { bulk } => {
                // Records on the old stream that the peer did not get
                // are sent again on the new one (not acknowledged yet);
                // the peer moves when the relay passes the reset on.
                // `next_stream` keeps a bulk flow off the lane.
                if bulk {
                    debug!("flow turned bulk: moving it from the lane to the main connection");
                    metrics.flows_moved.increment(1);
                } else {
                    debug!("a lane came up: moving the flow there");
                }
                let _ = send.reset(StreamCode::Moved.code().into());
                let _ = recv.stop(StreamCode::Moved.code().into());
                self.st.resume.on_move(now());
                return After::Next;
            }
        };
        let how = match &err {
            Some(e) if e.peer_reset() => StreamEnded::PeerReset,
            Some(e) => e.lost().map_or(StreamEnded::Failed, StreamEnded::Lost),
            None => StreamEnded::Failed,
        };
        // A stream that ended before the peer's Fin did not end because the
        // peer is done: the relay ended it. The other side waits for the
        // dialer's.
        let peer_done = lock(&flow.rx).fin_delivered();
        match self
            .st
            .resume
            .on_stream_end(flow.ended(), how, on_lane, peer_done, now())
        {
            Then::Finish => {
                let _ = send.finish();
                After::Ended(End::Completed)
            }
            Then::Next => {
                if let Some(e) = &err {
                    debug!(error = %e, "flow stream lost; waiting to resume");
                }
                if flow.dialer {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                After::Next
            }
            Then::Reset { tell_peer } => {
                // Reset here or elsewhere (local error, new session, …).
                if let Some(FlowError::OverLimit) = &err {
                    tracing::warn!(link = %flow.link.cfg.name, "flow refused by the relay: the link's max_flows are open");
                } else {
                    debug!(error = ?err, "flow failed");
                }
                flow.reset();
                // Tell the peer, best effort; it also times out on its own.
                if tell_peer {
                    let _ = flow.push_empty(RecordKind::Reset);
                    let _ = flow_tail(&flow, &mut send).await;
                }
                let _ = send.reset(StreamCode::Failed.code().into());
                let _ = recv.stop(StreamCode::Failed.code().into());
                After::Ended(End::Reset)
            }
        }
    }

    /// Goes on on runtime `to` with `stream`: the local reader stops, the
    /// socket is registered with `to`'s reactor, and both tasks are
    /// started there (nothing read is lost: the reader stops only between
    /// reads).
    async fn move_to(self, to: Handle, stream: (Stream, bool)) {
        let Self {
            flow,
            reading,
            writer,
            st,
            busy,
        } = self;
        flow.handoff.send_replace(true);
        let reader = reading.await.ok().flatten();
        flow.handoff.send_replace(false);
        let span = tracing::Span::current();
        to.spawn(
            async move {
                let (reader, writer) = match reader {
                    Some(r) => match LocalConn::into_std(r, writer).and_then(LocalConn::from_std) {
                        Ok(c) => {
                            let (r, w) = c.split();
                            (Some(r), w)
                        }
                        Err(e) => {
                            debug!(error = %e, "flow could not move its socket");
                            flow.reset();
                            return flow.closed(End::Reset);
                        }
                    },
                    // The reader had finished (end of input, or the flow
                    // ended): the writer stays where it is.
                    None => (None, writer),
                };
                debug!(
                    lane = stream.1,
                    "flow moved to the runtime of its new stream"
                );
                let reading = match reader {
                    Some(r) => tokio::spawn(flow.clone().read_local(r)),
                    None => tokio::spawn(async { None }),
                };
                Self {
                    flow,
                    reading,
                    writer,
                    st,
                    busy,
                }
                .drive_boxed(Some(stream))
                .await;
            }
            .instrument(span),
        );
    }
}

/// Writes the newest queued record (a reset) within a short time.
async fn flow_tail(flow: &Flow, send: &mut quinn::SendStream) -> Result<(), FlowError> {
    let last = lock(&flow.tx).last().cloned();
    if let Some(bytes) = last {
        tokio::time::timeout(Duration::from_millis(200), send.write_chunk(bytes))
            .await
            .map_err(|_| FlowError::Lost("timeout".into()))?
            .map_err(|e| FlowError::Lost(e.to_string()))?;
    }
    Ok(())
}
