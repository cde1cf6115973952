//! The control loop of one relay connection: attaches, peer presence,
//! handshakes and sealed link control, acknowledgements, hops.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use comsat_protocol::link::LinkControl;
use comsat_protocol::msg::{AgentToRelay, ErrorCode, FrameDecoder, PeerFrame, RelayToAgent};
use comsat_protocol::{LinkId, RelayId};
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::core::ack::{AckTimer, AckWhen};
use crate::core::link::{Establish, Presence, Reattach};
use crate::defaults;
use crate::link::{AckWake, LinkRt};
use crate::shared::Shared;
use crate::sync::lock;

use super::conn::{ControlTasks, Watchdog, read_message};
use super::peer::{handle_handshake, handle_sealed, initiate};

/// The driver's time, for the cores.
fn now() -> std::time::Instant {
    Instant::now().into_std()
}

/// Sleeps until `at`, or forever without it.
async fn sleep_until(at: Option<std::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

/// How a relay connection ended.
pub(super) enum Ended {
    /// It closed or failed; start again from the first relay of the list.
    Closed,
    /// The relay went silent (idle timeout): it is probably gone, so start
    /// with the next relay of the list. Its peers, noticing the same
    /// silence, do the same.
    Silent,
    /// Every link's peer stayed away: try the next relay of the list.
    Hop,
    /// The peers left this relay, which stopped answering them (the
    /// controller said): follow them to the next relay of the list.
    PeerMoved,
    /// The relay is draining and told us to go: move every link to the
    /// next relay of the list at once (the peers were told the same).
    Drained,
}

/// What one relay connection's control loop knows.
struct Control<'a> {
    shared: &'a Arc<Shared>,
    conn: &'a quinn::Connection,
    links: &'a HashMap<LinkId, Arc<LinkRt>>,
    ctl: mpsc::Sender<AgentToRelay>,
    /// Where the links stand with their peers here (when to hop).
    presence: Presence,
    /// Links whose attach was refused for a reason that may pass.
    reattach: Reattach,
}

/// What else ends a relay connection: the peers leaving the relay (the
/// controller said), and its lane finding it silent.
pub(super) struct Moves<'a> {
    /// Relays the peers left.
    pub(super) left: &'a mut watch::Receiver<Option<RelayId>>,
    /// This relay's id, where known.
    pub(super) here: Option<RelayId>,
    /// Notified when the lane to this relay found it silent.
    pub(super) lane_silent: &'a Notify,
}

/// Serves the relay connection `conn` (its control stream `send`/`recv`)
/// for `links` until it ends; `can_hop`: the group may try the next relay
/// of its list after `hops` in a row without meeting a peer.
pub(super) async fn serve(
    shared: &Arc<Shared>,
    conn: &quinn::Connection,
    (send, mut recv, mut decoder): (quinn::SendStream, quinn::RecvStream, FrameDecoder),
    links: &HashMap<LinkId, Arc<LinkRt>>,
    ack_notify: &AckWake,
    (can_hop, hops): (bool, u32),
    moves: Moves<'_>,
) -> Ended {
    let tasks = ControlTasks::start(shared, conn, send, links, false).await;
    let mut retry = tokio::time::interval(defaults::HANDSHAKE_RETRY);
    retry.tick().await;
    let mut hop_check = tokio::time::interval(Duration::from_millis(500));
    let mut watchdog = Watchdog::new(conn);
    let mut st = Control {
        shared,
        conn,
        links,
        ctl: tasks.ctl.clone(),
        presence: Presence::new(defaults::PEER_DWELL, rand::random::<f64>(), hops),
        reattach: Reattach::new(defaults::REATTACH_INITIAL, defaults::REATTACH_MAX),
    };
    // When the acks queued since the last flush go out. A lazy flush armed
    // on an earlier connection died with it: the next lazy ack arms anew.
    let mut acks = AckTimer::new(defaults::ACK_DELAY, defaults::ACK_LAZY);
    ack_notify.lazy_armed.store(false, Ordering::Release);
    let ended = loop {
        let msg = tokio::select! {
            m = read_message(&mut recv, &mut decoder) => m,
            () = ack_notify.soon.notified() => {
                // Let acks of a burst of records gather into one message.
                acks.on_queued(AckWhen::Soon, now());
                continue;
            }
            () = ack_notify.lazy.notified(), if !acks.lazy_armed() => {
                acks.on_queued(AckWhen::Lazy, now());
                continue;
            }
            () = sleep_until(acks.poll_timeout()) => {
                if let Some(flush) = acks.handle_timeout(now()) {
                    if flush.lazy {
                        // Disarmed first: an ack queued from here on wakes
                        // anew.
                        ack_notify.lazy_armed.store(false, Ordering::Release);
                    }
                    st.flush_acks();
                }
                continue;
            }
            _ = hop_check.tick(), if can_hop => {
                if st.presence.stranded(links.keys(), now()) {
                    break Ended::Hop;
                }
                continue;
            }
            _ = retry.tick() => {
                st.on_retry();
                continue;
            }
            _ = watchdog.tick() => {
                if watchdog.silent(shared, conn) {
                    break Ended::Silent;
                }
                continue;
            }
            () = moves.lane_silent.notified() => break Ended::Silent,
            Ok(()) = moves.left.changed() => {
                if moves.here.is_some() && *moves.left.borrow_and_update() == moves.here {
                    break Ended::PeerMoved;
                }
                continue;
            }
        };
        let msg = match msg {
            Ok(Some(m)) => m,
            Ok(None) => break Ended::Closed,
            Err(e) => {
                debug!(error = %e, "control stream ended");
                break Ended::Closed;
            }
        };
        if let Some(ended) = st.handle(msg) {
            break ended;
        }
    };
    drop(st);
    tasks.finish().await;
    ended
}

impl Control<'_> {
    fn flush_acks(&self) {
        for link in self.links.values() {
            link.flush_acks(&self.ctl, &self.shared.metrics);
        }
    }

    /// Replaces the sessions that met too many forgeries, attaches again
    /// where it is due, and (side A) starts a handshake where the present
    /// peer has not confirmed the session.
    fn on_retry(&mut self) {
        for link in self.links.values() {
            let renew = lock(&link.state).take_renew();
            match renew {
                Some(Establish::Handshake) => initiate(self.shared, link, &self.ctl),
                Some(Establish::Renew) => link.send_sealed(&LinkControl::Renew, &self.ctl),
                Some(Establish::Resume) | None => {}
            }
        }
        for id in self.reattach.due(now()) {
            if let Some(link) = self.links.get(&id) {
                debug!(link = %link.cfg.name, "attaching again");
                let _ = self.ctl.try_send(AgentToRelay::Attach {
                    link_id: id,
                    generation: link.generation(),
                    side: link.cfg.side,
                });
            }
        }
        for id in self.presence.present() {
            if let Some(link) = self.links.get(&id)
                && lock(&link.state).needs_handshake(now())
            {
                initiate(self.shared, link, &self.ctl);
            }
        }
    }

    /// Acts on one message from the relay; `Some` when the connection is
    /// to end.
    fn handle(&mut self, msg: RelayToAgent) -> Option<Ended> {
        match msg {
            RelayToAgent::Welcome => {}
            RelayToAgent::GoAway => return Some(Ended::Drained),
            RelayToAgent::Attached { link_id } => {
                if let Some(link) = self.links.get(&link_id) {
                    debug!(link = %link.cfg.name, "attached");
                    self.presence.on_attached(link_id, now());
                    self.reattach.on_attached(link_id);
                    // With a session from before, flows can go on (the
                    // relay holds them until the peer is back).
                    link.set_ready(Some(self.conn), &self.shared.metrics);
                }
            }
            RelayToAgent::PeerPresent { link_id } => self.on_peer_present(link_id),
            RelayToAgent::PeerAbsent { link_id } => self.on_peer_absent(link_id),
            RelayToAgent::Peer { link_id, frame } => {
                if let Some(link) = self.links.get(&link_id) {
                    match frame {
                        PeerFrame::Handshake(msg) => {
                            handle_handshake(self.shared, link, self.conn, &self.ctl, &msg);
                        }
                        PeerFrame::NoSession => {
                            if lock(&link.state).on_no_session() {
                                debug!(link = %link.cfg.name, "the peer holds no session: a handshake now");
                                initiate(self.shared, link, &self.ctl);
                            }
                        }
                        PeerFrame::Sealed { seq, ciphertext } => {
                            handle_sealed(
                                self.shared,
                                link,
                                self.conn,
                                &self.ctl,
                                seq,
                                &ciphertext,
                            );
                        }
                    }
                }
            }
            RelayToAgent::Error { link_id, code } => self.on_refused(link_id, code),
        }
        None
    }

    /// The peer (re)joined, perhaps as a new incarnation: side A checks
    /// that it still holds the session (`Resume`) and replaces it
    /// (handshake) if it does not answer.
    fn on_peer_present(&mut self, link_id: LinkId) {
        let Some(link) = self.links.get(&link_id) else {
            return;
        };
        self.presence.on_present(link_id);
        debug!(link = %link.cfg.name, "peer present");
        link.set_peer(true, &self.shared.metrics);
        let has_session = lock(&link.session).is_some();
        let establish = lock(&link.state).on_peer_present(has_session, now());
        match establish {
            Some(Establish::Resume) => link.send_sealed(&LinkControl::Resume, &self.ctl),
            Some(Establish::Handshake) => initiate(self.shared, link, &self.ctl),
            Some(Establish::Renew) | None => {}
        }
    }

    /// The peer of `link_id` left.
    fn on_peer_absent(&mut self, link_id: LinkId) {
        let Some(link) = self.links.get(&link_id) else {
            return;
        };
        let attached = self.presence.on_absent(link_id, now());
        link.set_peer(false, &self.shared.metrics);
        link.pending().clear();
        // Flows whose streams died with the peer's connection open new
        // ones (a new epoch), which the relay holds for it.
        if attached {
            link.set_ready(Some(self.conn), &self.shared.metrics);
        }
    }

    /// The relay refused (or ended) `link_id`.
    fn on_refused(&mut self, link_id: LinkId, code: ErrorCode) {
        let name = self
            .links
            .get(&link_id)
            .map_or("?", |l| l.cfg.name.as_str());
        if code == ErrorCode::Expired {
            warn!(link = %name, "the link's grant expired: the relay ended it; its flows are reset and new connections refused until the controller renews the grant");
        } else {
            warn!(link = %name, ?code, "relay refused the link");
        }
        // A relay that will not carry the link counts as one where its
        // peer is away.
        self.presence.on_refused(link_id, now());
        let Some(link) = self.links.get(&link_id) else {
            return;
        };
        link.set_peer(false, &self.shared.metrics);
        if matches!(code, ErrorCode::Revoked | ErrorCode::Expired) {
            link.drop_session(&self.shared.metrics);
            link.expired
                .store(code == ErrorCode::Expired, Ordering::Relaxed);
        } else {
            link.set_ready(None, &self.shared.metrics);
        }
        // The grant may not have reached the relay yet (or a newer one
        // reached us first), or the relay may have room again later: ask
        // again, less and less often.
        if matches!(
            code,
            ErrorCode::NotGranted
                | ErrorCode::StaleGeneration
                | ErrorCode::RelayFull
                | ErrorCode::Expired
        ) {
            let spread = 0.5 + rand::random::<f64>() / 2.0;
            self.reattach.on_refused(link_id, now(), spread);
        }
    }
}
