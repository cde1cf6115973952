//! An enrolled relay kept in step with its controller: grants (handed to
//! the relay in process and cached on disk), heartbeats and certificate
//! renewal.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::keys::read_secret_file;
use anyhow::{Context, bail};
use comsat_protocol::api::{self, NodeKind};
use comsat_protocol::grant::SignedGrant;
use comsat_protocol::limits::MAX_SIGNED_GRANT_LEN;
use comsat_protocol::{LinkId, RelayId};

use crate::client::Client;
use crate::retry::{Retry, long_poll};
use crate::state::{NodeState, csr, host_of, write_atomic};
use crate::svid;
use crate::unix_now;

/// How often a relay heartbeats.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
/// The most grant files read from the cache.
const MAX_GRANT_FILES: usize = 100_000;

/// What an enrolled relay's controller sync feeds: the relay itself, in
/// the same process.
pub trait RelaySink: Send + Sync + 'static {
    /// Replaces the relay's whole grant set (each grant with a name for
    /// logs).
    fn grants(&self, grants: Vec<(String, SignedGrant)>);
    /// The certificate file was renewed: serve it from now on.
    fn certificate_renewed(&self);
    /// The relay's load now, for heartbeats.
    fn load(&self) -> api::RelayLoad;
    /// Clone alarms for the controller's audit log, oldest first, at most
    /// `max`, and how many the relay dropped since the last call.
    fn clone_alarms(&self, max: usize) -> (Vec<api::NodeClone>, u64);
    /// The counters of the links that moved bytes since the last call or
    /// hold flows, at most `max`.
    fn link_traffic(&self, max: usize) -> Vec<api::LinkTraffic> {
        let _ = max;
        Vec::new()
    }
}

/// An enrolled relay's grants: verified ones from the controller, kept in
/// memory and handed to the relay whole on every change, and cached in
/// `grants/` (with the event cursor) so a relay restarts and serves
/// without the controller.
pub struct RelaySync<S> {
    dir: PathBuf,
    state: NodeState,
    sink: Arc<S>,
    grants: BTreeMap<LinkId, Vec<u8>>,
}

impl<S: RelaySink> RelaySync<S> {
    /// Reads the cached grants of `dir` and hands them to `sink` at once,
    /// before the relay serves.
    pub fn start(dir: PathBuf, state: NodeState, sink: Arc<S>) -> Self {
        let grants = cached_grants(&dir.join("grants"));
        let sync = Self {
            dir,
            state,
            sink,
            grants,
        };
        sync.hand_over();
        sync
    }

    fn hand_over(&self) {
        let set = self
            .grants
            .iter()
            .filter_map(|(link, bytes)| {
                let signed = SignedGrant::decode(bytes).ok()?;
                Some((format!("link {link}"), signed))
            })
            .collect();
        self.sink.grants(set);
    }

    /// Keeps the grants, heartbeat and certificate in step with the
    /// controller, forever.
    pub async fn run(mut self) {
        let client = match self.state.client(&self.dir) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot talk to the controller; serving cached grants only");
                return;
            }
        };
        let hb = {
            let client = client.clone();
            let sink = self.sink.clone();
            async move {
                let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
                // Alarms a failed heartbeat carried go with the next one.
                let mut body = api::RelayHeartbeat {
                    version: Some(env!("CARGO_PKG_VERSION").to_owned()),
                    ..api::RelayHeartbeat::default()
                };
                loop {
                    tick.tick().await;
                    body.load = sink.load();
                    body.traffic = sink.link_traffic(api::MAX_TRAFFIC_PER_HEARTBEAT);
                    let room = api::MAX_CLONES_PER_HEARTBEAT.saturating_sub(body.clones.len());
                    let (clones, dropped) = sink.clone_alarms(room);
                    body.clones.extend(clones);
                    body.clones_dropped += dropped;
                    match client
                        .post::<_, api::Empty>(api::PATH_RELAY_HEARTBEAT, &body, "heartbeat")
                        .await
                    {
                        Ok(_) => {
                            body.clones.clear();
                            body.clones_dropped = 0;
                            // The controller keeps the version: it goes
                            // with heartbeats until one was taken.
                            body.version = None;
                        }
                        Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
                    }
                }
            }
        };
        let dir = self.dir.clone();
        let sink = self.sink.clone();
        let path = format!("relay/{}", self.state.name);
        let cert = svid::Renewed {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
            current: |der: &[u8]| svid::is_svid_of(der, &path),
        };
        let own = self.state.own_certificate;
        let renewing = async {
            if own {
                // Its own certificate is renewed where it was issued.
                std::future::pending::<()>().await;
            }
            svid::renew(
                "relay certificate",
                cert,
                || request_cert(&client, &dir),
                || sink.certificate_renewed(),
            )
            .await;
        };
        tokio::join!(hb, self.events(&client), renewing);
    }

    async fn events(&mut self, client: &Client) {
        let grants = self.dir.join("grants");
        let cursor_file = grants.join("cursor");
        let mut since: u64 = std::fs::read_to_string(&cursor_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let relay_id = RelayId(self.state.node_id.0);
        let mut retry = Retry::new();
        loop {
            let events: api::RelayEvents = long_poll(
                client,
                &mut retry,
                (api::PATH_RELAY_EVENTS, "grants"),
                since,
                "serving cached ones",
            )
            .await;
            let mut changed = false;
            for ev in &events.events {
                changed |= self.event(ev, &grants, &relay_id);
            }
            if changed {
                self.hand_over();
            }
            if events.next != since {
                since = events.next;
                if let Err(e) = write_atomic(&cursor_file, since.to_string().as_bytes()) {
                    tracing::error!(error = %e, "cannot save the event cursor");
                }
            }
        }
    }

    /// Takes one event: a verified grant replaces the link's, a revocation
    /// drops it; the cache follows. Whether the set changed.
    fn event(&mut self, ev: &api::RelayEvent, grants: &Path, relay_id: &RelayId) -> bool {
        let file = grants.join(format!("{}.grant", ev.link_id));
        match &ev.kind {
            api::RelayEventKind::Grant { grant } => {
                let known = self.grants.get(&ev.link_id).map(Vec::as_slice);
                match check_grant(grant, &self.state, relay_id, &ev.link_id, known) {
                    Ok(bytes) => {
                        if let Err(e) = write_atomic(&file, &bytes) {
                            tracing::error!(error = %e, "cannot cache a grant");
                        }
                        self.grants.insert(ev.link_id, bytes);
                        true
                    }
                    Err(e) => {
                        tracing::warn!(link = %ev.link_id, error = %e, "controller sent a grant that does not verify; ignored");
                        false
                    }
                }
            }
            api::RelayEventKind::Revoke => {
                let _ = std::fs::remove_file(&file);
                tracing::info!(link = %ev.link_id, "link revoked");
                self.grants.remove(&ev.link_id).is_some()
            }
        }
    }
}

/// The grants cached in `dir` (`*.grant`, at most [`MAX_GRANT_FILES`] of
/// at most [`MAX_SIGNED_GRANT_LEN`] bytes each), by link; unreadable ones
/// are skipped with a warning (the relay verifies the rest).
fn cached_grants(dir: &Path) -> BTreeMap<LinkId, Vec<u8>> {
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for path in entries.flatten().map(|e| e.path()) {
        let link = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".grant"))
            .and_then(|id| id.parse::<LinkId>().ok());
        let Some(link) = link else { continue };
        let read = std::fs::File::open(&path).and_then(|f| {
            let mut bytes = Vec::new();
            f.take(MAX_SIGNED_GRANT_LEN as u64 + 1)
                .read_to_end(&mut bytes)?;
            Ok(bytes)
        });
        match read {
            Ok(bytes) if bytes.len() <= MAX_SIGNED_GRANT_LEN => {
                out.insert(link, bytes);
            }
            Ok(_) => tracing::warn!(file = %path.display(), "cached grant too large; ignored"),
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot read a cached grant")
            }
        }
        if out.len() >= MAX_GRANT_FILES {
            tracing::warn!(dir = %dir.display(), "more than {MAX_GRANT_FILES} cached grants; ignoring the rest");
            break;
        }
    }
    out
}

/// Verifies a grant the controller sent for `link`: signed by the
/// authority, naming this relay and that link, and not older than the one
/// held now (`cached`) (a late event never rolls a link back).
fn check_grant(
    hex_grant: &str,
    state: &NodeState,
    relay: &RelayId,
    link: &LinkId,
    cached: Option<&[u8]>,
) -> anyhow::Result<Vec<u8>> {
    if hex_grant.len() > 2 * MAX_SIGNED_GRANT_LEN {
        bail!("grant too long");
    }
    let bytes = hex::decode(hex_grant)?;
    let signed = SignedGrant::decode(&bytes)?;
    let known = cached
        .and_then(|b| SignedGrant::decode(b).ok())
        .and_then(|g| g.verify_signature(&state.authority_public_key).ok())
        .map(|g| g.generation);
    let grant = signed.verify(&state.authority_public_key, relay, unix_now(), known)?;
    if grant.link_id != *link {
        bail!(
            "the grant is for link {}, but came as an event for link {link}",
            grant.link_id
        );
    }
    Ok(bytes)
}

async fn request_cert(client: &Client, dir: &Path) -> anyhow::Result<String> {
    let state = NodeState::load(dir, NodeKind::Relay)?;
    let key_pem = read_secret_file(&dir.join("tls.key"))?;
    let key = rcgen::KeyPair::from_pem(&key_pem).context("tls.key")?;
    let host = host_of(state.public_addr.as_deref().unwrap_or_default())?;
    let body = api::CertRequest {
        csr_pem: csr(&key, vec![host])?,
    };
    let resp: api::CertResponse = client
        .post(api::PATH_RELAY_CERT, &body, "certificate renewal")
        .await?;
    Ok(resp.cert_pem)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Generate;
    use comsat_protocol::grant::{Grant, GrantSide, LinkLimits};
    use comsat_protocol::{NodeId, SigningKey};

    fn state(authority: &SigningKey) -> NodeState {
        NodeState {
            kind: NodeKind::Relay,
            node_id: NodeId([1; 16]),
            name: "r1".into(),
            controller: "https://127.0.0.1:1".into(),
            fallback_controllers: vec![],
            audience: "comsat-controller:x".into(),
            authority_public_key: authority.public(),
            public_addr: Some("127.0.0.1:4433".into()),
            interactive_addr: None,
            own_certificate: false,
        }
    }

    fn signed(authority: &SigningKey, link: LinkId, relay: RelayId, generation: u64) -> String {
        let side = |n: u8| GrantSide {
            node_id: NodeId([n; 16]),
            sign_pub: SigningKey::generate().public(),
        };
        let g = Grant {
            link_id: link,
            generation,
            relays: vec![relay],
            side_a: side(2),
            side_b: side(3),
            not_after: unix_now() + 3600,
            buffer_limit: 0,
            limits: LinkLimits::default(),
        };
        hex::encode(g.sign(authority).and_then(|s| s.encode()).expect("sign"))
    }

    #[test]
    fn a_cached_grant_is_never_replaced_by_an_older_one_or_another_links() {
        let authority = SigningKey::generate();
        let st = state(&authority);
        let relay = RelayId([1; 16]);
        let link = LinkId([3; 16]);
        let g2 = check_grant(
            &signed(&authority, link, relay, 2),
            &st,
            &relay,
            &link,
            None,
        )
        .expect("first");
        // The same generation again (a renewal or a limit change) is taken.
        check_grant(
            &signed(&authority, link, relay, 2),
            &st,
            &relay,
            &link,
            Some(&g2),
        )
        .expect("same generation");
        let err = check_grant(
            &signed(&authority, link, relay, 1),
            &st,
            &relay,
            &link,
            Some(&g2),
        )
        .expect_err("older");
        assert!(err.to_string().contains("generation"), "{err}");
        let other = LinkId([4; 16]);
        let err = check_grant(
            &signed(&authority, other, relay, 3),
            &st,
            &relay,
            &link,
            Some(&g2),
        )
        .expect_err("another link's grant");
        assert!(
            err.to_string().contains("came as an event for link"),
            "{err}"
        );
        let stranger = SigningKey::generate();
        assert!(
            check_grant(
                &signed(&stranger, link, relay, 3),
                &st,
                &relay,
                &link,
                Some(&g2)
            )
            .is_err()
        );
    }
}
