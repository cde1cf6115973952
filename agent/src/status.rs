//! What this agent can say of each link half it holds, for its controller
//! ([`crate::Agent::status_source`]): whether its listener is bound (one
//! that cannot bind is retried until it can), which relay it is attached
//! to, and whether its peer is there.

use std::sync::Arc;

use comsat_protocol::RelayId;
use comsat_protocol::api::{HalfReport, HalfState, MAX_STATUS_REASON_LEN};
use tracing::{info, warn};

use crate::config::LocalSpec;
use crate::link::LinkRt;
use crate::shared::Shared;
use crate::sync::lock;
use crate::{defaults, local, session};

/// The local end of a link half.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) enum LocalEnd {
    /// Nothing to bind (a target side), or not bound yet.
    #[default]
    Idle,
    /// Listening at this address.
    Bound(String),
    /// Cannot bind, for this reason (retried).
    Failed(String),
}

/// The relay a link half is connected to, or the last error connecting.
#[derive(Clone, Debug, Default)]
pub(crate) struct RelayAt {
    pub(crate) relay: Option<RelayId>,
    pub(crate) error: Option<String>,
}

impl LinkRt {
    /// Sets the local end; whether it changed.
    pub(crate) fn set_local(&self, end: LocalEnd) -> bool {
        let mut local = lock(&self.local);
        let changed = *local != end;
        *local = end;
        changed
    }

    /// Whether its local end is fine: not a listener that cannot bind.
    pub(crate) fn local_ok(&self) -> bool {
        !matches!(&*lock(&self.local), LocalEnd::Failed(_))
    }

    /// Where the listener is bound, if it is.
    pub(crate) fn bound(&self) -> Option<String> {
        match &*lock(&self.local) {
            LocalEnd::Bound(addr) => Some(addr.clone()),
            _ => None,
        }
    }

    /// Connected to `relay` now (`None`: not connected, after `error`).
    pub(crate) fn set_relay(&self, relay: Option<RelayId>, error: Option<String>) {
        *lock(&self.relay_at) = RelayAt { relay, error };
    }

    /// This half as its controller is told.
    pub(crate) fn half_report(&self) -> HalfReport {
        let at = lock(&self.relay_at).clone();
        let (state, reason) = if let LocalEnd::Failed(why) = &*lock(&self.local) {
            (HalfState::Failed, Some(why.clone()))
        } else if self.up() {
            (HalfState::Ready, None)
        } else if self.ready.borrow().is_some() {
            (
                HalfState::Waiting,
                Some("its peer is not attached to the relay".to_owned()),
            )
        } else if at.relay.is_some() {
            (
                HalfState::Connecting,
                Some("connected to the relay; attaching and meeting its peer".to_owned()),
            )
        } else {
            (HalfState::Connecting, at.error)
        };
        HalfReport {
            link_id: self.cfg.link_id,
            state,
            reason: reason.map(at_most),
            relay_id: at.relay,
        }
    }
}

/// `reason`, cut to what a report may carry ([`MAX_STATUS_REASON_LEN`]
/// bytes) at a character boundary.
fn at_most(mut reason: String) -> String {
    if reason.len() > MAX_STATUS_REASON_LEN {
        let mut end = MAX_STATUS_REASON_LEN - "…".len();
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
        reason.push('…');
    }
    reason
}

/// Serves `rt`'s listener after its first bind failed with `error`:
/// tries again every [`defaults::BIND_RETRY`] (the address may be freed:
/// another program stops, another link is deleted), then serves it. The
/// half shows `failed`, with the operating system's reason, meanwhile.
pub(crate) async fn listen_retrying(
    shared: Arc<Shared>,
    rt: Arc<LinkRt>,
    spec: LocalSpec,
    mut error: std::io::Error,
) {
    loop {
        let reason = format!("cannot listen on {spec}: {error}");
        if rt.set_local(LocalEnd::Failed(reason.clone())) {
            warn!(link = %rt.cfg.name, reason, "link cannot listen; trying again every {} s", defaults::BIND_RETRY.as_secs());
        }
        tokio::time::sleep(defaults::BIND_RETRY).await;
        match local::Listener::bind(&spec).await {
            Ok(listener) => {
                let addr = listener.describe();
                info!(link = %rt.cfg.name, listen = %addr, "listening");
                rt.set_local(LocalEnd::Bound(addr));
                return session::serve_listener(shared, rt, listener).await;
            }
            Err(e) => error = e,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_reason_is_cut_to_what_a_report_carries() {
        assert_eq!(at_most("short".into()), "short");
        let long = format!("cannot listen on unix:///{}: in use", "é".repeat(600));
        let cut = at_most(long.clone());
        assert!(cut.len() <= MAX_STATUS_REASON_LEN, "{}", cut.len());
        assert!(cut.ends_with('…') && long.starts_with(cut.trim_end_matches('…')));
        let exact = "x".repeat(MAX_STATUS_REASON_LEN);
        assert_eq!(at_most(exact.clone()), exact);
    }
}
