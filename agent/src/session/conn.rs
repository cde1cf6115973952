//! One relay connection: connecting and authenticating (`Hello`), and
//! reading and writing its control stream.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use comsat_protocol::LinkId;
use comsat_protocol::codec::CodecError;
use comsat_protocol::msg::{
    AgentToRelay, ControlMessage, FrameDecoder, FrameError, RelayToAgent, make_hello,
};
use comsat_protocol::{HELLO_EXPORTER_LABEL, HELLO_EXPORTER_LEN};
use tokio::sync::mpsc;

use super::accept::accept_flows;
use crate::core::silence::{Bounds, Sample, Silence};
use crate::link::LinkRt;
use crate::udp::unspecified;

use crate::defaults;
use crate::shared::Shared;

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
    let resolved = tokio::net::lookup_host(addr)
        .await
        .map_err(|source| ConnectError::Resolve {
            addr: addr.to_owned(),
            source,
        })?
        .next()
        .ok_or_else(|| ConnectError::NoAddress {
            addr: addr.to_owned(),
        })?;
    let addr = resolved;
    let bind = unspecified(addr);
    let socket =
        crate::udp::bind(bind).map_err(|source| ConnectError::Bind { addr: bind, source })?;
    let runtime = quinn::default_runtime().ok_or(ConnectError::NoRuntime)?;
    let endpoint = quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime)
        .map_err(|source| ConnectError::Bind { addr: bind, source })?;
    let (conn, send, recv, decoder) = tokio::time::timeout(
        defaults::CONNECT_TIMEOUT,
        establish(shared, &endpoint, client, addr, server_name),
    )
    .await
    .map_err(|_| ConnectError::Timeout)??;
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
    addr: SocketAddr,
    server_name: &str,
) -> Result<Established, ConnectError> {
    let conn = endpoint
        .connect_with(client.clone(), addr, server_name)?
        .await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let mut exporter = [0u8; HELLO_EXPORTER_LEN];
    conn.export_keying_material(&mut exporter, HELLO_EXPORTER_LABEL, b"")
        .map_err(|_| ConnectError::Exporter)?;
    let mut buf = Vec::new();
    make_hello(shared.node_id, &shared.signing, &exporter).write_to(&mut buf)?;
    send.write_all(&buf).await?;
    let mut decoder = FrameDecoder::new();
    match read_message(&mut recv, &mut decoder).await {
        Ok(Some(RelayToAgent::Welcome)) => Ok((conn, send, recv, decoder)),
        // A refusing relay closes the connection; the end of its control
        // stream (dropped first) can arrive before the close does.
        Ok(None) => Err(ConnectError::Refused(Refusal::NoWelcome)),
        Ok(Some(_)) => Err(ConnectError::NotWelcome),
        Err(e) => Err(ConnectError::Refused(Refusal::Control(e))),
    }
}

/// Why a relay connection was never established.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    /// The relay closed it instead of welcoming us: it holds no grant
    /// naming this agent (yet), is full, or refused for another reason it
    /// does not tell.
    #[error("relay refused the connection: {0}")]
    Refused(Refusal),
    #[error("resolve {addr}: {source}")]
    Resolve {
        addr: String,
        source: std::io::Error,
    },
    #[error("resolve {addr}: no address")]
    NoAddress { addr: String },
    #[error("bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("no async runtime")]
    NoRuntime,
    #[error("timed out connecting")]
    Timeout,
    #[error(transparent)]
    Connect(#[from] quinn::ConnectError),
    #[error(transparent)]
    Connection(#[from] quinn::ConnectionError),
    #[error("TLS exporter unavailable")]
    Exporter,
    #[error(transparent)]
    Hello(#[from] CodecError),
    #[error(transparent)]
    Write(#[from] quinn::WriteError),
    #[error("relay sent something other than Welcome")]
    NotWelcome,
}

/// How a relay refused a connection.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refusal {
    #[error("it ended the control stream before its Welcome")]
    NoWelcome,
    #[error(transparent)]
    Control(ControlError),
}

/// Why the relay's control stream could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ControlError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Read(#[from] quinn::ReadError),
    #[error("stream ended inside a frame")]
    Truncated,
}

/// The next message on the relay's control stream; `None` at its end.
/// Reads whatever chunk quinn has (up to 4 KiB) straight into the decoder.
pub(crate) async fn read_message(
    recv: &mut quinn::RecvStream,
    decoder: &mut FrameDecoder,
) -> Result<Option<RelayToAgent>, ControlError> {
    loop {
        if let Some(msg) = decoder.next_message::<RelayToAgent>()? {
            return Ok(Some(msg));
        }
        let Some(chunk) = recv.read_chunk(4096, true).await? else {
            return if decoder.has_partial() {
                Err(ControlError::Truncated)
            } else {
                Ok(None)
            };
        };
        decoder.extend(&chunk.bytes);
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

/// How long the relay may leave sends unanswered.
const BOUNDS: Bounds = Bounds {
    data: defaults::SILENCE_DATA,
    ping: defaults::SILENCE_PING,
    rtts: defaults::SILENCE_RTTS,
    most: defaults::SILENCE_MOST,
};

/// The counters of `conn` the watchdog reads.
fn sample(conn: &quinn::Connection) -> Sample {
    let s = conn.stats();
    let f = &s.frame_tx;
    Sample {
        received: s.udp_rx.datagrams,
        sent: f.stream
            + f.datagram
            + f.reset_stream
            + f.stop_sending
            + f.max_data
            + f.max_stream_data
            + f.max_streams_bidi
            + f.path_challenge
            + f.path_response,
        pings: f.ping,
        rtt: s.path.rtt,
    }
}

/// The watchdog of one relay connection ([`crate::core::silence`]): reads
/// its counters every [`defaults::SILENCE_TICK`].
pub(super) struct Watchdog {
    tick: tokio::time::Interval,
    silence: Silence,
}

impl Watchdog {
    pub(super) fn new(conn: &quinn::Connection) -> Self {
        let mut tick = tokio::time::interval(defaults::SILENCE_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            tick,
            silence: Silence::new(BOUNDS, sample(conn)),
        }
    }

    /// The next tick.
    pub(super) async fn tick(&mut self) {
        self.tick.tick().await;
    }

    /// Whether the relay left what this agent sent on `conn` unanswered
    /// for too long (gone, or cut off): logged and counted.
    pub(super) fn silent(&mut self, shared: &Shared, conn: &quinn::Connection) -> bool {
        let now = tokio::time::Instant::now().into_std();
        let Some(silent) = self.silence.on_sample(now, sample(conn)) else {
            return false;
        };
        shared.metrics.relay_silences.increment(1);
        tracing::warn!(
            silent_ms = silent.as_millis() as u64,
            rtt_us = conn.rtt().as_micros() as u64,
            "the relay stopped answering: giving up on this connection"
        );
        true
    }
}

/// Moves a relay connection to a new socket when this machine's address
/// toward the relay changes (a new uplink: Wi-Fi to cellular, a renumbered
/// interface). The socket is bound to the unspecified address, so the
/// kernel would send from the new address anyway and the relay would
/// follow (QUIC path migration); rebinding makes the move at once and from
/// a fresh port, so the connection never leans on a NAT mapping of the old
/// uplink. Looks every [`defaults::LOCAL_ADDRESS_CHECK`], without a packet
/// on the wire. Stops when dropped.
pub(super) struct Roaming(tokio::task::JoinHandle<()>);

impl Drop for Roaming {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Roaming {
    pub(super) fn start(
        shared: &Arc<Shared>,
        endpoint: &quinn::Endpoint,
        remote: SocketAddr,
    ) -> Self {
        let (shared, endpoint) = (shared.clone(), endpoint.clone());
        Self(tokio::spawn(async move {
            let mut tick = tokio::time::interval(defaults::LOCAL_ADDRESS_CHECK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut was = local_ip_toward(remote);
            loop {
                tick.tick().await;
                let Some(now) = local_ip_toward(remote) else {
                    continue;
                };
                if was == Some(now) {
                    continue;
                }
                match crate::udp::bind(unspecified(remote)).and_then(|s| endpoint.rebind(s)) {
                    Ok(()) => {
                        shared.metrics.rebinds.increment(1);
                        tracing::info!(from = ?was, to = %now, "the local address toward the relay changed: the connection moved to a new socket");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the local address toward the relay changed, and no new socket could be bound")
                    }
                }
                was = Some(now);
            }
        }))
    }
}

/// Closes `endpoint` and its connection, and keeps the endpoint in the
/// background until the close has gone out (at most
/// [`defaults::CLOSE_FLUSH`]), so that the relay learns of it at once.
pub(super) fn close_endpoint(endpoint: quinn::Endpoint) {
    endpoint.close(0u32.into(), b"bye");
    tokio::spawn(async move {
        let _ = tokio::time::timeout(defaults::CLOSE_FLUSH, endpoint.wait_idle()).await;
    });
}

/// The address this machine sends from toward `remote` now (a connected
/// UDP socket sends nothing: the kernel only picks the route).
pub(super) fn local_ip_toward(remote: SocketAddr) -> Option<std::net::IpAddr> {
    let socket = std::net::UdpSocket::bind(unspecified(remote)).ok()?;
    socket.connect(remote).ok()?;
    Some(socket.local_addr().ok()?.ip())
}

/// What runs beside a control stream's loop: the writer of its messages
/// and the acceptor of the flow streams the relay opens on its connection.
pub(super) struct ControlTasks {
    /// Messages for the relay, in order.
    pub(super) ctl: mpsc::Sender<AgentToRelay>,
    writer: tokio::task::JoinHandle<()>,
    acceptor: tokio::task::JoinHandle<()>,
    /// Reads the datagrams of the links' UDP flows (main connections of
    /// links with any).
    datagrams: Option<tokio::task::JoinHandle<()>>,
}

impl ControlTasks {
    /// Starts both and attaches every link: on the main connection with
    /// `Attach`, on a lane with `AttachLane`. With more links than the
    /// queue holds it waits for the writer rather than drop an attach.
    pub(super) async fn start(
        shared: &Arc<Shared>,
        conn: &quinn::Connection,
        send: quinn::SendStream,
        links: &HashMap<LinkId, Arc<LinkRt>>,
        lane: bool,
    ) -> Self {
        let queue = defaults::CONTROL_QUEUE.max(links.len() * defaults::CONTROL_QUEUE_PER_LINK);
        let (ctl, rx) = mpsc::channel(queue);
        let writer = tokio::spawn(write_control(send, rx));
        for link in links.values() {
            let (link_id, generation, side) = (link.cfg.link_id, link.generation(), link.cfg.side);
            let attach = if lane {
                AgentToRelay::AttachLane {
                    link_id,
                    generation,
                    side,
                }
            } else {
                AgentToRelay::Attach {
                    link_id,
                    generation,
                    side,
                }
            };
            if ctl.send(attach).await.is_err() {
                break;
            }
        }
        let acceptor = tokio::spawn(accept_flows(
            shared.clone(),
            conn.clone(),
            links.clone(),
            lane,
        ));
        // The relay forwards datagrams on main connections only.
        let datagrams = (!lane && links.values().any(|l| l.udp.is_some())).then(|| {
            tokio::spawn(crate::datagrams::read_datagrams(
                shared.clone(),
                conn.clone(),
                links.clone(),
            ))
        });
        Self {
            ctl,
            writer,
            acceptor,
            datagrams,
        }
    }

    /// Stops accepting flows and waits for what was queued to be written
    /// (every other sender of `ctl` must be gone for the writer to end).
    pub(super) async fn finish(self) {
        self.acceptor.abort();
        if let Some(datagrams) = self.datagrams {
            datagrams.abort();
        }
        drop(self.ctl);
        let _ = self.writer.await;
    }
}
