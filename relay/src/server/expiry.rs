//! The grant set in force: reloads from the grant source or the node's
//! sync, expiry at each grant's `not_after`, and ending a link whose grant
//! went away.

use std::sync::Arc;

use comsat_protocol::LinkId;
use comsat_protocol::SignedGrant;
use comsat_protocol::msg::{ErrorCode, RelayToAgent};
use tokio::sync::watch;
use tracing::{info, warn};

use super::{Attachment, FedGrants, State};
use crate::defaults;
use crate::grants::{GrantSource, unix_now};

/// Polls the grant source, and ends each link at its grant's `not_after`
/// (the two in one task, so neither overwrites the other's grant set).
pub(super) async fn watch_grants(
    state: Arc<State>,
    mut source: Box<dyn GrantSource>,
    mut fed: watch::Receiver<Option<FedGrants>>,
) {
    let mut tick = tokio::time::interval(defaults::GRANT_POLL_INTERVAL);
    let mut expiry = tokio::time::interval(defaults::EXPIRY_CHECK);
    loop {
        tokio::select! {
            _ = tick.tick() => reload_grants(&state, &mut *source),
            _ = expiry.tick() => expire_grants(&state),
            Ok(()) = fed.changed() => {
                let set = fed.borrow_and_update().clone();
                if let Some(set) = set {
                    install_grants(&state, (*set).clone());
                }
            }
        }
    }
}

fn reload_grants(state: &State, source: &mut dyn GrantSource) {
    state.cert.reload_if_changed();
    let files = match source.poll(&state.metrics) {
        Ok(Some(files)) => files,
        Ok(None) => return,
        Err(e) => {
            warn!(source = %source.describe(), error = %e, "cannot read grants; keeping the current ones");
            return;
        }
    };
    install_grants(state, files);
}

/// Makes `grants` the relay's set, ending the links whose grant went away
/// or changed generation.
fn install_grants(state: &State, grants: Vec<(String, SignedGrant)>) {
    let changed = state.grants.replace(grants, &state.metrics);
    let snapshot = state.grants.snapshot();
    state.stats.sync(&snapshot);
    info!(grants = snapshot.len(), "grants reloaded");
    for link in changed {
        end_link(state, link, ErrorCode::Revoked);
    }
}

/// Tears down the links whose grant expired: the relay enforces
/// `not_after` itself, whether or not the controller can reach it.
fn expire_grants(state: &State) {
    let expired = state.grants.expire(unix_now(), &state.metrics);
    if expired.is_empty() {
        return;
    }
    state.stats.sync(&state.grants.snapshot());
    for link in expired {
        info!(link = %link.fmt_short(), "grant expired: link torn down");
        end_link(state, link, ErrorCode::Expired);
    }
}

/// Ends a link at once: its flows stop, its buffers go, and each side is
/// told why (`code`: revoked or expired).
fn end_link(state: &State, link_id: LinkId, code: ErrorCode) {
    let (ended, told, buffered) = {
        let mut links = state.links();
        let Some(ended) = links.table.end(link_id) else {
            return;
        };
        let told: Vec<Attachment> = ended
            .conns
            .iter()
            .filter_map(|c| links.conn(Some(*c)).cloned())
            .collect();
        (ended, told, links.table.buffered())
    };
    info!(link = %link_id.fmt_short(), ?code, "link ended");
    let _ = ended.data.revoked.send(true);
    if ended.was_paired {
        state.metrics.links_paired.decrement(1.0);
    }
    if ended.released > 0 {
        state.set_parked(buffered);
    }
    for att in told {
        let _ = att
            .ctl
            .try_send(RelayToAgent::Error { link_id, code }, state.control_room());
    }
}
