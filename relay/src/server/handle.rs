//! [`RelayHandle`]: what an operator's signals and a node's grant sync do
//! to a running relay.

use std::path::Path;
use std::sync::Arc;

use comsat_protocol::msg::{PeerFrame, RelayToAgent};
use comsat_protocol::{LinkId, Side, SignedGrant};

use super::State;
use crate::config::RelayConfig;
use crate::error::RelayError;

/// Why a configuration reload was refused; the configuration in force
/// stays.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReloadError {
    /// The file does not load (it names the file and what is wrong).
    #[error(transparent)]
    Load(RelayError),
    /// Settings that are read only at start changed.
    #[error(
        "{} cannot change without a restart (restart the relay, or undo the change)",
        settings.join(", ")
    )]
    RestartOnly {
        /// The settings, as the config file names them.
        settings: Vec<&'static str>,
    },
    /// A limit that must allow at least one was set to 0.
    #[error(
        "limits.max_unauthenticated, limits.max_connections and limits.max_links \
         must be at least 1 (set each to 1 or more, then reload)"
    )]
    ZeroLimit,
    /// The certificate or key the file names does not load or does not
    /// make a TLS configuration.
    #[error("the new certificate pair is unusable: {0} (fix tls_cert and tls_key, then reload)")]
    Certificate(RelayError),
}

/// A handle on a running relay for its operator's signals: reload the
/// configuration or the certificate.
#[derive(Clone)]
pub struct RelayHandle {
    pub(super) state: Arc<State>,
    /// The main endpoint, then the interactive one if any.
    pub(super) endpoints: Vec<quinn::Endpoint>,
}

impl std::fmt::Debug for RelayHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayHandle").finish_non_exhaustive()
    }
}

impl RelayHandle {
    /// Clone alarms (one node key connected from two sources at once) for
    /// the controller's audit log, oldest first, at most `max`, and how
    /// many the relay dropped since the last call (it keeps
    /// [`crate::defaults::MAX_CLONE_ALARMS`]).
    pub fn take_clone_alarms(&self, max: usize) -> (Vec<comsat_protocol::api::NodeClone>, u64) {
        crate::links::lock(&self.state.clones).take(max)
    }

    /// Reads the config file at `path` (the one the relay started from) and
    /// applies it: the certificate pair, the limits and the QUIC transport
    /// settings. Refused as a whole, with the reason, if the file does not
    /// load, a restart-only setting changed or the certificate does not
    /// load; the configuration in force stays. Counted either way.
    pub fn reload_file(&self, path: &Path) -> Result<(), ReloadError> {
        let result = RelayConfig::load(path)
            .map_err(ReloadError::Load)
            .and_then(|new| self.try_reload(&new));
        self.counted(result)
    }

    fn counted(&self, result: Result<(), ReloadError>) -> Result<(), ReloadError> {
        let outcome = if result.is_ok() { "applied" } else { "refused" };
        self.state.metrics.config_reload(outcome);
        result
    }

    fn try_reload(&self, new: &RelayConfig) -> Result<(), ReloadError> {
        let fixed = self.state.config.restart_only_changes(new);
        if !fixed.is_empty() {
            return Err(ReloadError::RestartOnly { settings: fixed });
        }
        if new.limits.max_unauthenticated == 0
            || new.limits.max_connections == 0
            || new.limits.max_links == 0
        {
            return Err(ReloadError::ZeroLimit);
        }
        self.state
            .cert
            .set_files(&new.tls_cert, &new.tls_key)
            .map_err(ReloadError::Certificate)?;
        let server = crate::tls::server_config(new, self.state.cert.clone())
            .map_err(ReloadError::Certificate)?;
        for endpoint in &self.endpoints {
            endpoint.set_server_config(Some(server.clone()));
        }
        match self.state.limits.write() {
            Ok(mut l) => *l = Arc::new(new.limits.clone()),
            Err(p) => *p.into_inner() = Arc::new(new.limits.clone()),
        }
        Ok(())
    }

    /// The connection on which `side` of `link` is attached now, if any:
    /// a test's adversary opens streams of its own on it
    /// ([`crate::adversary`]).
    pub fn side_connection(&self, link: LinkId, side: Side) -> Option<quinn::Connection> {
        let links = self.state.links();
        Some(links.conn(links.table.attached(link, side))?.conn.clone())
    }

    /// Sends `frame` to `side` of `link` as if its peer had sent it: a
    /// test's adversary forges or replays messages with it
    /// ([`crate::adversary`]). `false` if the side is not attached or its
    /// queue is full.
    pub fn send_peer_frame(&self, link: LinkId, side: Side, frame: PeerFrame) -> bool {
        let ctl = {
            let links = self.state.links();
            let Some(att) = links.conn(links.table.attached(link, side)) else {
                return false;
            };
            att.ctl.clone()
        };
        ctl.try_send(
            RelayToAgent::Peer {
                link_id: link,
                frame,
            },
            self.state.control_room(),
        )
        .is_ok()
    }

    /// Replaces the relay's whole grant set with `grants` (each with a name
    /// for logs), as its node's controller sync hands them over in process
    /// ([`Relay::bind_fed`](super::Relay::bind_fed)). Applied by the task that also expires grants,
    /// at once and in order; grants that go away or change generation end
    /// their links.
    pub fn set_grants(&self, grants: Vec<(String, SignedGrant)>) {
        self.state.fed.send_replace(Some(Arc::new(grants)));
    }

    /// Reloads the certificate and key files now, if they changed.
    pub fn reload_certificate(&self) {
        self.state.cert.reload_if_changed();
    }
}

#[cfg(test)]
mod tests {
    use super::ReloadError;

    #[test]
    fn a_refused_reload_names_the_settings_and_what_to_do() {
        let e = ReloadError::RestartOnly {
            settings: vec!["listen", "relay_id"],
        };
        assert_eq!(
            e.to_string(),
            "listen, relay_id cannot change without a restart \
             (restart the relay, or undo the change)"
        );
        assert!(ReloadError::ZeroLimit.to_string().contains("at least 1"));
    }
}
