//! The grants a relay holds, and the `GrantSource` that feeds them.
//!
//! At this stage the source is a directory of signed grant files
//! (`*.grant`, as written by `comsat dev init`), polled for changes. The
//! controller will replace the source, not the store.
//!
//! Every grant is verified (authority signature, this relay named, not
//! expired, generation not older than one seen before) before it is used;
//! rejected files are logged with their name and reason and counted.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use comsat_protocol::grant::{Grant, GrantError, SignedGrant};
use comsat_protocol::limits::MAX_SIGNED_GRANT_LEN;
use comsat_protocol::{LinkId, NodeId, RelayId, SignPublicKey};

use crate::metrics::Metrics;

/// Most grant files read from a directory.
pub const MAX_GRANT_FILES: usize = 100_000;

/// An immutable snapshot of the valid grants.
#[derive(Debug, Default)]
pub struct GrantSet {
    links: HashMap<LinkId, Arc<Grant>>,
    nodes: HashMap<NodeId, SignPublicKey>,
    /// The earliest `not_after` of the set's grants.
    earliest_expiry: Option<u64>,
}

impl GrantSet {
    /// The grant of a link.
    pub fn link(&self, id: &LinkId) -> Option<&Arc<Grant>> {
        self.links.get(id)
    }

    /// The signing key of a node named in any grant.
    pub fn node_key(&self, id: &NodeId) -> Option<&SignPublicKey> {
        self.nodes.get(id)
    }

    /// Number of grants.
    pub fn len(&self) -> usize {
        self.links.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    /// The earliest `not_after` of the set's grants (Unix seconds).
    pub fn earliest_expiry(&self) -> Option<u64> {
        self.earliest_expiry
    }

    /// The set of `links`, with their nodes and earliest expiry.
    fn of(links: HashMap<LinkId, Arc<Grant>>) -> Self {
        let mut nodes = HashMap::new();
        for grant in links.values() {
            nodes.insert(grant.side_a.node_id, grant.side_a.sign_pub);
            nodes.insert(grant.side_b.node_id, grant.side_b.sign_pub);
        }
        let earliest_expiry = links.values().map(|g| g.not_after).min();
        Self {
            links,
            nodes,
            earliest_expiry,
        }
    }
}

/// The relay's grant store: a snapshot swapped whole on every change.
#[derive(Debug)]
pub struct GrantStore {
    relay_id: RelayId,
    authority: SignPublicKey,
    current: RwLock<Arc<GrantSet>>,
    generations: RwLock<HashMap<LinkId, u64>>,
}

/// Unix time now, in seconds.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl GrantStore {
    /// An empty store for `relay_id` trusting `authority`.
    pub fn new(relay_id: RelayId, authority: SignPublicKey) -> Self {
        Self {
            relay_id,
            authority,
            current: RwLock::new(Arc::default()),
            generations: RwLock::default(),
        }
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<GrantSet> {
        match self.current.read() {
            Ok(g) => Arc::clone(&g),
            Err(p) => Arc::clone(&p.into_inner()),
        }
    }

    /// Verifies `grants` and makes the valid ones the current set.
    /// Returns the links whose grant went away or changed generation.
    pub fn replace(&self, grants: Vec<(String, SignedGrant)>, metrics: &Metrics) -> Vec<LinkId> {
        let now = unix_now();
        let mut generations = match self.generations.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let mut links: HashMap<LinkId, Arc<Grant>> = HashMap::new();
        for (origin, signed) in grants {
            let known = signed
                .verify_signature(&self.authority)
                .ok()
                .and_then(|g| generations.get(&g.link_id).copied());
            match signed.verify(&self.authority, &self.relay_id, now, known) {
                Ok(grant) => {
                    if let Some(prev) = links.get(&grant.link_id)
                        && prev.generation >= grant.generation
                    {
                        continue;
                    }
                    links.insert(grant.link_id, Arc::new(grant));
                }
                Err(e) => {
                    tracing::warn!(grant = %origin, error = %e, "grant refused");
                    metrics.grant_rejected(grant_error_reason(&e));
                }
            }
        }
        let set = GrantSet::of(links);
        for (link, grant) in &set.links {
            let g = generations.entry(*link).or_insert(grant.generation);
            *g = (*g).max(grant.generation);
        }
        let old = self.snapshot();
        let changed = old
            .links
            .iter()
            .filter(|(id, g)| {
                set.links
                    .get(*id)
                    .is_none_or(|n| n.generation != g.generation)
            })
            .map(|(id, _)| *id)
            .collect();
        self.install(set, metrics);
        changed
    }

    /// Drops the grants whose `not_after` has come (`now`, Unix seconds),
    /// as they expire: without a new grant from the controller, their
    /// links end at that instant. Returns the links dropped.
    pub fn expire(&self, now: u64, metrics: &Metrics) -> Vec<LinkId> {
        let old = self.snapshot();
        if old.earliest_expiry.is_none_or(|t| t > now) {
            return Vec::new();
        }
        let mut kept = old.links.clone();
        kept.retain(|_, g| g.not_after > now);
        let expired: Vec<LinkId> = old
            .links
            .keys()
            .filter(|id| !kept.contains_key(id))
            .copied()
            .collect();
        metrics.grants_expired(expired.len());
        self.install(GrantSet::of(kept), metrics);
        expired
    }

    fn install(&self, set: GrantSet, metrics: &Metrics) {
        metrics.grants_loaded(set.len());
        match self.current.write() {
            Ok(mut c) => *c = Arc::new(set),
            Err(p) => *p.into_inner() = Arc::new(set),
        }
    }
}

fn grant_error_reason(e: &GrantError) -> &'static str {
    match e {
        GrantError::Malformed(_) | GrantError::Invalid(_) => "malformed",
        GrantError::BadSignature => "bad_signature",
        GrantError::NotForThisRelay { .. } => "other_relay",
        GrantError::Expired { .. } => "expired",
        GrantError::StaleGeneration { .. } => "stale_generation",
        _ => "other",
    }
}

/// Where a relay's grants come from. The relay polls its source and
/// replaces its whole grant set whenever the source reports a change; grants
/// that disappear or change generation are revoked.
pub trait GrantSource: Send + 'static {
    /// The full current set of signed grants, each with a name for logs, if
    /// it changed since the last call; `Ok(None)` when unchanged.
    fn poll(&mut self, metrics: &Metrics) -> std::io::Result<Option<Vec<(String, SignedGrant)>>>;

    /// What the source is, for logs.
    fn describe(&self) -> String;
}

/// Grants from a directory of `*.grant` files.
#[derive(Debug)]
pub struct DirGrantSource {
    dir: PathBuf,
    last: Option<DirStamp>,
}

impl DirGrantSource {
    /// A source reading `dir`.
    pub fn new(dir: PathBuf) -> Self {
        Self { dir, last: None }
    }
}

impl GrantSource for DirGrantSource {
    fn poll(&mut self, metrics: &Metrics) -> std::io::Result<Option<Vec<(String, SignedGrant)>>> {
        let stamp = stamp_dir(&self.dir)?;
        if self.last.as_ref() == Some(&stamp) {
            return Ok(None);
        }
        let files = read_grant_files(&stamp, metrics);
        self.last = Some(stamp);
        Ok(Some(files))
    }

    fn describe(&self) -> String {
        format!("grants_dir {}", self.dir.display())
    }
}

/// No grants of its own: those of a relay whose node's controller sync
/// hands them over in process ([`crate::Relay::bind_fed`]).
#[derive(Debug)]
pub struct FedGrantSource;

impl GrantSource for FedGrantSource {
    fn poll(&mut self, _: &Metrics) -> std::io::Result<Option<Vec<(String, SignedGrant)>>> {
        Ok(None)
    }

    fn describe(&self) -> String {
        "grants handed over in process".into()
    }
}

/// A fingerprint of a directory's grant files, to notice changes cheaply.
pub type DirStamp = Vec<(PathBuf, u64, Option<SystemTime>)>;

/// Lists the `*.grant` files of `dir` with their size and mtime.
pub fn stamp_dir(dir: &Path) -> std::io::Result<DirStamp> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "grant") {
            continue;
        }
        let meta = entry.metadata()?;
        out.push((path, meta.len(), meta.modified().ok()));
        if out.len() >= MAX_GRANT_FILES {
            tracing::warn!(dir = %dir.display(), "more than {MAX_GRANT_FILES} grant files; ignoring the rest");
            break;
        }
    }
    out.sort();
    Ok(out)
}

/// Reads the grant files named in `stamp`; unreadable or malformed files
/// are logged and counted, never fatal.
pub fn read_grant_files(stamp: &DirStamp, metrics: &Metrics) -> Vec<(String, SignedGrant)> {
    let mut out = Vec::new();
    for (path, len, _) in stamp {
        let name = path.display().to_string();
        if *len > MAX_SIGNED_GRANT_LEN as u64 {
            tracing::warn!(grant = %name, "grant file larger than {MAX_SIGNED_GRANT_LEN} bytes; ignored");
            metrics.grant_rejected("malformed");
            continue;
        }
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(grant = %name, error = %e, "cannot read grant file");
                metrics.grant_rejected("unreadable");
                continue;
            }
        };
        match SignedGrant::decode(&bytes) {
            Ok(g) => out.push((name, g)),
            Err(e) => {
                tracing::warn!(grant = %name, error = %e, "malformed grant file");
                metrics.grant_rejected("malformed");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use comsat_node::keys::{Generate, RandomId};
    use comsat_protocol::grant::{GrantSide, LinkLimits};
    use comsat_protocol::{NodeId, SigningKey};

    use super::*;

    fn signed(authority: &SigningKey, relay: RelayId, not_after: u64) -> (String, SignedGrant) {
        let side = |n: u8| GrantSide {
            node_id: NodeId([n; 16]),
            sign_pub: SigningKey::generate().public(),
        };
        let grant = Grant {
            link_id: LinkId::random(),
            generation: 1,
            relays: vec![relay],
            side_a: side(1),
            side_b: side(2),
            not_after,
            buffer_limit: 1 << 20,
            limits: LinkLimits::default(),
        };
        ("g".into(), grant.sign(authority).expect("sign"))
    }

    #[test]
    fn grants_leave_the_set_at_their_not_after_and_no_earlier() {
        let authority = SigningKey::generate();
        let relay = RelayId([9; 16]);
        let store = GrantStore::new(relay, authority.public());
        let metrics = Metrics::new();
        let now = unix_now();
        let soon = signed(&authority, relay, now + 100);
        let later = signed(&authority, relay, now + 200);
        let (soon_id, later_id) = (
            soon.1
                .verify_signature(&authority.public())
                .expect("sig")
                .link_id,
            later
                .1
                .verify_signature(&authority.public())
                .expect("sig")
                .link_id,
        );
        store.replace(vec![soon, later], &metrics);
        assert_eq!(store.snapshot().earliest_expiry(), Some(now + 100));
        assert!(store.expire(now + 99, &metrics).is_empty());
        assert_eq!(store.expire(now + 100, &metrics), vec![soon_id]);
        let left = store.snapshot();
        assert!(left.link(&soon_id).is_none() && left.link(&later_id).is_some());
        assert_eq!(left.earliest_expiry(), Some(now + 200));
        assert_eq!(store.expire(now + 1000, &metrics), vec![later_id]);
        assert!(store.snapshot().is_empty());
        assert_eq!(store.snapshot().earliest_expiry(), None);
    }
}
