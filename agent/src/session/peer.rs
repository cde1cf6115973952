use std::sync::atomic::Ordering;

use comsat_protocol::Side;
use comsat_protocol::link::LinkControl;
use comsat_protocol::msg::{AgentToRelay, PeerFrame};
use comsat_protocol::noise::{self};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::sync::lock;

use crate::link::{LinkRt, LinkSession};
use crate::shared::Shared;

pub(super) fn handle_sealed(
    shared: &Shared,
    link: &LinkRt,
    conn: &quinn::Connection,
    ctl: &mpsc::Sender<AgentToRelay>,
    seq: u64,
    ciphertext: &[u8],
) {
    let (current, candidates) = link.sessions();
    let none_held = current.is_none() && candidates.is_empty();
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
                if none_held && link.cfg.side == Side::B {
                    // Side A seals under a session this side never had (it
                    // restarted): it may start a handshake at once.
                    let _ = ctl.try_send(AgentToRelay::Peer {
                        link_id: link.cfg.link_id,
                        frame: PeerFrame::NoSession,
                    });
                }
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
        LinkControl::Resume | LinkControl::ResumeOk => {
            let ok = matches!(msg, LinkControl::ResumeOk);
            if lock(&link.state).on_resumed(ok) {
                if !ok {
                    link.send_sealed(&LinkControl::ResumeOk, ctl);
                }
                info!(link = %link.cfg.name, "session resumed");
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

pub(super) fn initiate(shared: &Shared, link: &LinkRt, ctl: &mpsc::Sender<AgentToRelay>) {
    match noise::initiate_with_params(
        &shared.noise,
        &link.cfg.peer_noise_public_key,
        &link.cfg.link_id,
        shared.noise_params,
        comsat_node::keys::os_rng(),
    ) {
        Ok((pending, msg)) => {
            // Pending before it is sent: its answer finds it, however soon.
            link.pending().start(pending);
            let queued = ctl.try_send(AgentToRelay::Peer {
                link_id: link.cfg.link_id,
                frame: PeerFrame::Handshake(msg),
            });
            if queued.is_ok() {
                lock(&link.state).on_initiate(Instant::now().into_std());
            } else {
                // The control queue is full (thousands of links at once):
                // nothing was sent, so nothing waits for an answer.
                link.pending().cancel_newest();
                debug!(link = %link.cfg.name, "control queue full: handshake at the next retry");
                lock(&link.state).on_initiate_deferred();
            }
        }
        Err(e) => warn!(link = %link.cfg.name, error = %e, "cannot start Noise handshake"),
    }
}

pub(super) fn handle_handshake(
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
                comsat_node::keys::os_rng(),
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
            let answered = link.pending().complete(|p| p.handle_response(msg));
            let session = match answered {
                Ok(Some(session)) => session,
                Ok(None) => {
                    debug!(link = %link.cfg.name, "unexpected handshake answer ignored");
                    return;
                }
                Err(e) => {
                    warn!(link = %link.cfg.name, error = %e, "Noise handshake answer refused");
                    lock(&link.state).on_answer_refused();
                    return;
                }
            };
            // The answer proves side B holds the session; the first message
            // sealed under it proves the same to side B.
            let flow_base = link.next_flow.load(Ordering::Relaxed);
            link.install_session(LinkSession::new(session, flow_base), conn, &shared.metrics);
            // Until side B answers it, the session is not confirmed: without
            // an answer the retry starts another handshake.
            lock(&link.state).on_answered(Instant::now().into_std());
            link.send_sealed(&LinkControl::Resume, ctl);
        }
    }
}
