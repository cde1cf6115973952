//! Relay assignment: weighted rendezvous hashing.
//!
//! Every (link, relay) pair gets a score from a hash of both ids, weighted
//! by the relay's reported load (fewer connections, higher weight); a link
//! goes to the relays with the highest scores. The result depends only on
//! the ids and the loads, so every controller computes the same answer,
//! and adding or removing one relay moves only the links it wins or held.
//!
//! Existing assignments are sticky: [`plan`] only changes a link's relay
//! list when one of its relays is unhealthy or the list is shorter (or
//! longer) than wanted and could be filled; a change of load alone never
//! moves a link.

use comsat_protocol::{LinkId, RelayId};
use sha2::{Digest, Sha256};

/// A healthy relay that may be assigned links.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Its id.
    pub relay_id: RelayId,
    /// Its reported agent connections.
    pub connections: u64,
}

/// The weight of a relay: 1 when idle, 1/2 at 1000 connections, …
pub fn weight(connections: u64) -> f64 {
    1.0 / (1.0 + connections as f64 / 1000.0)
}

/// The hash of (link, relay) mapped into the open interval (0, 1).
fn unit_hash(link: &LinkId, relay: &RelayId) -> f64 {
    let digest = Sha256::new()
        .chain_update(b"comsat rendezvous v1\0")
        .chain_update(link.0)
        .chain_update(relay.0)
        .finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    // The top 53 bits fit an f64 exactly; +0.5 keeps it off 0 and 1.
    let bits = u64::from_be_bytes(first) >> 11;
    (bits as f64 + 0.5) / (1u64 << 53) as f64
}

/// The score of `relay` for `link`: higher wins.
pub fn score(link: &LinkId, relay: &Candidate) -> f64 {
    -weight(relay.connections) / unit_hash(link, &relay.relay_id).ln()
}

/// The `n` best relays for `link` among `candidates`, best first.
pub fn rendezvous(link: &LinkId, candidates: &[Candidate], n: usize) -> Vec<RelayId> {
    let mut scored: Vec<(f64, RelayId)> = candidates
        .iter()
        .map(|c| (score(link, c), c.relay_id))
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    scored.dedup_by(|a, b| a.1 == b.1);
    scored.into_iter().take(n).map(|(_, r)| r).collect()
}

/// The new relay list for a link that has `current`, given the healthy
/// relays and the wanted count `n`; `None` if it stays as it is.
///
/// Healthy relays already carrying the link keep it, in their order;
/// unhealthy ones are dropped; free places are filled by rendezvous order
/// among the other healthy relays. A link is never left with no relay
/// because none is healthy.
pub fn plan(
    link: &LinkId,
    current: &[RelayId],
    healthy: &[Candidate],
    n: usize,
) -> Option<Vec<RelayId>> {
    let is_healthy = |r: &RelayId| healthy.iter().any(|c| c.relay_id == *r);
    let mut keep: Vec<RelayId> = current.iter().copied().filter(is_healthy).collect();
    keep.truncate(n);
    if keep.len() < n {
        let others: Vec<Candidate> = healthy
            .iter()
            .filter(|c| !keep.contains(&c.relay_id))
            .copied()
            .collect();
        let fill = rendezvous(link, &others, n - keep.len());
        keep.extend(fill);
    }
    // With no healthy relay at all, taking a link's relays away helps no
    // one (and a controller back from an outage has not heard the
    // heartbeats yet): leave it be.
    if keep.is_empty() {
        return None;
    }
    (keep != current).then_some(keep)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn relays(n: u8) -> Vec<Candidate> {
        (0..n)
            .map(|i| Candidate {
                relay_id: RelayId([i + 1; 16]),
                connections: 0,
            })
            .collect()
    }

    fn link(i: u32) -> LinkId {
        let mut id = [0u8; 16];
        id[..4].copy_from_slice(&i.to_be_bytes());
        LinkId(id)
    }

    #[test]
    fn deterministic_and_independent_of_candidate_order() {
        let rs = relays(5);
        let mut reversed = rs.clone();
        reversed.reverse();
        for i in 0..50 {
            let a = rendezvous(&link(i), &rs, 2);
            assert_eq!(a, rendezvous(&link(i), &rs, 2));
            assert_eq!(a, rendezvous(&link(i), &reversed, 2));
            assert_eq!(a.len(), 2);
            assert_ne!(a[0], a[1]);
        }
    }

    #[test]
    fn never_picks_a_relay_that_is_not_a_candidate() {
        let rs = relays(4);
        let unhealthy = rs[1].relay_id;
        let healthy: Vec<Candidate> = rs
            .iter()
            .copied()
            .filter(|c| c.relay_id != unhealthy)
            .collect();
        for i in 0..200 {
            let got = rendezvous(&link(i), &healthy, 2);
            assert!(!got.contains(&unhealthy));
            // Replanning a link that held the unhealthy relay drops it and
            // keeps its healthy one.
            let current = vec![unhealthy, healthy[0].relay_id];
            let planned = plan(&link(i), &current, &healthy, 2).expect("must change");
            assert!(!planned.contains(&unhealthy));
            assert_eq!(planned[0], healthy[0].relay_id);
            assert_eq!(planned.len(), 2);
        }
        assert!(rendezvous(&link(1), &[], 2).is_empty());
    }

    #[test]
    fn spreads_links_over_relays() {
        let rs = relays(4);
        let mut primaries: HashMap<RelayId, u32> = HashMap::new();
        for i in 0..4000 {
            *primaries
                .entry(rendezvous(&link(i), &rs, 1)[0])
                .or_default() += 1;
        }
        assert_eq!(primaries.len(), 4);
        for (r, n) in primaries {
            assert!((800..1200).contains(&n), "{r:?} got {n} of 4000");
        }
    }

    #[test]
    fn weight_matters() {
        let mut rs = relays(2);
        rs[0].connections = 3000; // weight 1/4 against 1
        let busy = rs[0].relay_id;
        let won = (0..4000)
            .filter(|i| rendezvous(&link(*i), &rs, 1)[0] == busy)
            .count();
        // With weights w1, w2 the busy relay wins w1 / (w1 + w2) = 20%.
        assert!((600..1000).contains(&won), "busy relay won {won} of 4000");
    }

    #[test]
    fn plan_is_sticky() {
        let rs = relays(3);
        let current = vec![rs[2].relay_id, rs[0].relay_id];
        // Load changes alone never move a link.
        let mut loaded = rs.clone();
        loaded[2].connections = 1_000_000;
        assert_eq!(plan(&link(7), &current, &loaded, 2), None);
        // A short list is filled while more healthy relays exist ...
        let short = vec![rs[1].relay_id];
        let filled = plan(&link(7), &short, &rs, 2).expect("fills");
        assert_eq!(filled[0], rs[1].relay_id);
        assert_eq!(filled.len(), 2);
        // ... and left alone when none does.
        assert_eq!(plan(&link(7), &short, &rs[1..2], 2), None);
        // An unassigned link is assigned as soon as one relay is healthy.
        assert_eq!(plan(&link(7), &[], &rs[..1], 2), Some(vec![rs[0].relay_id]));
        assert_eq!(plan(&link(7), &[], &[], 2), None);
        // With no healthy relay at all, a link keeps what it has.
        assert_eq!(plan(&link(7), &current, &[], 2), None);
    }
}
