//! The lane: a second QUIC connection to the relay a group of links is on,
//! to the relay's interactive listener (or, where it runs none, to its
//! main one), on which those links start their flows.
//!
//! A flow that moves little (a request, a reply, a keystroke) then never
//! queues behind the bytes a bulk flow keeps in flight on the main
//! connection: this agent drives the lane's connection, from a UDP socket
//! of its own, on a thread of its own (`comsat-lane`), and so does the
//! relay at its interactive listener. A flow that turns bulk (more than
//! [`defaults::BULK_BYTES`] within [`defaults::BULK_WINDOW`], either way)
//! moves to the main connection: the dialling agent gives up the lane
//! stream and resumes the flow on a new one there (the resume path: the
//! records not yet acknowledged are sent again, the receiver drops what it
//! already has), and it stays there.
//!
//! The lane attaches every link of the group with
//! [`AgentToRelay::AttachLane`]: it carries flows only; the main connection
//! keeps the links' attachments, peer frames and pairing. It is up only
//! while the group's links carry flows, and for `lane_idle_ms` after (idle
//! links cost one connection, as before lanes): the first flow of a burst
//! opens it and starts on the main connection; a flow that is not bulk
//! moves to the lane when one comes up. A lane that is down, refused or not
//! configured costs nothing but this: flows ride the main connection.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use comsat_protocol::LinkId;
use comsat_protocol::msg::{AgentToRelay, FrameDecoder, RelayToAgent};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{Instrument, debug, info, info_span};

use crate::config::RelayEndpoint;
use crate::core::link::{Idle, Reattach};
use crate::core::relay::Backoff;
use crate::defaults;
use crate::group::{Busy, Runtimes};
use crate::link::LinkRt;
use crate::shared::Shared;

use super::conn::{ControlTasks, Watchdog, connect, read_message};

/// The lane of one relay connection, for as long as this lives: dropping
/// it stops the lane and takes it from the links.
pub(crate) struct Lane {
    task: JoinHandle<()>,
    links: HashMap<LinkId, Arc<LinkRt>>,
}

impl Lane {
    /// Starts the lane to `relay.lane_addr` for `links`, if it has one;
    /// `silent` is notified when the relay stops answering on it (its
    /// main connection then gives up on the relay too).
    pub(crate) fn start(
        shared: &Arc<Shared>,
        relay: &RelayEndpoint,
        client: &quinn::ClientConfig,
        links: &HashMap<LinkId, Arc<LinkRt>>,
        (rt, busy): (&Runtimes, &Arc<Busy>),
        silent: Arc<Notify>,
    ) -> Option<Self> {
        let addr = relay.lane_addr.clone()?;
        let span = info_span!("lane", addr = %addr);
        let task = rt.lane.spawn(
            run(
                shared.clone(),
                addr,
                relay.server_name.clone(),
                client.clone(),
                links.clone(),
                (busy.clone(), silent),
            )
            .instrument(span),
        );
        Some(Self {
            task,
            links: links.clone(),
        })
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        self.task.abort();
        for link in self.links.values() {
            if let Some(conn) = link.lane.send_replace(None) {
                conn.close(0u32.into(), b"bye");
            }
        }
    }
}

/// Counts one lane in the `lanes_open` gauge while it lives (also when
/// the lane's task is stopped from outside).
struct Open<'a>(&'a metrics::Gauge);

impl<'a> Open<'a> {
    fn count(gauge: &'a metrics::Gauge) -> Self {
        gauge.increment(1.0);
        Self(gauge)
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// The driver's time, for the cores.
fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

/// Keeps a lane up while the group carries flows, reconnecting with
/// backoff (up to [`defaults::LANE_RETRY_MAX`]: a relay that refuses lanes
/// is asked again now and then, not hammered).
async fn run(
    shared: Arc<Shared>,
    addr: String,
    server_name: String,
    client: quinn::ClientConfig,
    links: HashMap<LinkId, Arc<LinkRt>>,
    (busy, silent): (Arc<Busy>, Arc<Notify>),
) {
    let mut backoff = Backoff::new(defaults::RECONNECT_INITIAL, defaults::LANE_RETRY_MAX);
    loop {
        busy.wait_busy().await;
        match connect(&shared, &addr, &server_name, &client).await {
            Ok((endpoint, conn, send, recv, decoder)) => {
                info!("lane connected");
                let _roaming =
                    super::conn::Roaming::start(&shared, &endpoint, conn.remote_address());
                shared.metrics.lane_connects.increment(1);
                let open = Open::count(&shared.metrics.lanes_open);
                let (attached, relay_silent) =
                    serve(&shared, &conn, (send, recv, decoder), &links, &busy).await;
                if relay_silent {
                    silent.notify_one();
                }
                drop(open);
                for link in links.values() {
                    link.lane.send_if_modified(|lane| {
                        let ours = lane
                            .as_ref()
                            .is_some_and(|c| c.stable_id() == conn.stable_id());
                        if ours {
                            *lane = None;
                        }
                        ours
                    });
                }
                conn.close(0u32.into(), b"bye");
                super::conn::close_endpoint(endpoint);
                info!("lane connection ended");
                if attached {
                    backoff.reset();
                }
            }
            Err(e) => debug!(error = %e, "lane connection failed"),
        }
        tokio::time::sleep(backoff.next_delay(rand::random::<f64>())).await;
    }
}

/// Attaches every link as a lane and accepts the flows the relay opens on
/// it, until the connection ends, the relay leaves what it is sent
/// unanswered for too long (the watchdog), or the group has carried no
/// flow for `lane_idle`; whether any link attached, and whether the relay
/// went silent.
async fn serve(
    shared: &Arc<Shared>,
    conn: &quinn::Connection,
    (send, mut recv, mut decoder): (quinn::SendStream, quinn::RecvStream, FrameDecoder),
    links: &HashMap<LinkId, Arc<LinkRt>>,
    busy: &Busy,
) -> (bool, bool) {
    let tasks = ControlTasks::start(shared, conn, send, links, true).await;
    let ctl = &tasks.ctl;
    let mut attached = false;
    // Links the relay refused a lane for now (the grant may still be on its
    // way, or was renewed): when to ask again, and the delay after that.
    let mut again = Reattach::new(defaults::REATTACH_INITIAL, defaults::REATTACH_MAX);
    let mut retry = tokio::time::interval(defaults::HANDSHAKE_RETRY);
    let mut idle_check = tokio::time::interval(shared.lane_idle.min(Duration::from_secs(1)));
    let mut idle = Idle::new(shared.lane_idle);
    let mut watchdog = Watchdog::new(conn);
    let mut silent = false;
    loop {
        let msg = tokio::select! {
            m = read_message(&mut recv, &mut decoder) => m,
            () = watchdog.tick() => {
                if watchdog.silent(shared, conn) {
                    silent = true;
                    break;
                }
                continue;
            }
            _ = idle_check.tick() => {
                if idle.check(busy.flows() > 0, now()) {
                    info!("lane idle: closing it until the next flow");
                    break;
                }
                continue;
            }
            _ = retry.tick() => {
                for link_id in again.due(now()) {
                    if let Some(link) = links.get(&link_id) {
                        let _ = ctl.try_send(AgentToRelay::AttachLane {
                            link_id,
                            generation: link.generation(),
                            side: link.cfg.side,
                        });
                    }
                }
                continue;
            }
        };
        match msg {
            Ok(Some(RelayToAgent::Attached { link_id })) => {
                if let Some(link) = links.get(&link_id) {
                    debug!(link = %link.cfg.name, "lane attached");
                    link.lane.send_replace(Some(conn.clone()));
                    again.on_attached(link_id);
                    attached = true;
                }
            }
            Ok(Some(RelayToAgent::Error { link_id, code })) => {
                // Its new flows ride the main connection meanwhile.
                if let Some(link) = links.get(&link_id) {
                    debug!(link = %link.cfg.name, ?code, "lane refused for the link");
                    link.lane.send_replace(None);
                    again.on_refused(link_id, now(), 1.0);
                }
            }
            // The main connection acts on a drain; the lane ends with it.
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => {
                debug!(error = %e, "lane control stream ended");
                break;
            }
        }
    }
    tasks.finish().await;
    (attached, silent)
}
