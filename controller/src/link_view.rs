//! Links as the operator sees them: nodes by name, their agents'
//! refusals, and the status made of what both agents report.

use std::collections::HashMap;

use comsat_protocol::api::{
    self, HalfStatus, LinkInfo, LinkRefused, LinkSpec, LinkState, LinkStatus, NodeKind,
};
use comsat_protocol::{LinkId, NodeId};

use crate::state::Shared;
use crate::store::{HalfRecord, LinkRecord, RefusalRecord, StoreError, TrafficRecord};

/// A relay's report of a link older than this shows no rate: it moved
/// nothing since (relays report every 5 s the links that moved bytes).
const TRAFFIC_FRESH_SECS: u64 = 12;

/// A node as a link's view names it.
struct Seen {
    name: String,
    last_seen: Option<u64>,
}

/// What the views of links are made of, read once for all of them.
struct Known {
    nodes: HashMap<NodeId, Seen>,
    refusals: Vec<RefusalRecord>,
    halves: HashMap<(LinkId, NodeId), HalfRecord>,
    /// Each link's latest relay report.
    traffic: HashMap<LinkId, TrafficRecord>,
    now: u64,
}

impl Shared {
    /// Links as the operator sees them.
    pub(crate) async fn link_infos(
        &self,
        links: &[LinkRecord],
    ) -> Result<Vec<LinkInfo>, StoreError> {
        let mut nodes = HashMap::new();
        for kind in [NodeKind::Agent, NodeKind::Relay] {
            for n in self.store.nodes(kind).await? {
                nodes.insert(
                    n.node_id,
                    Seen {
                        name: n.name,
                        last_seen: n.last_seen,
                    },
                );
            }
        }
        let mut traffic: HashMap<LinkId, TrafficRecord> = HashMap::new();
        for t in self.store.traffic().await? {
            if traffic.get(&t.link_id).is_none_or(|old| old.at < t.at) {
                traffic.insert(t.link_id, t);
            }
        }
        let known = Known {
            traffic,
            nodes,
            refusals: self.store.refusals().await?,
            halves: self
                .store
                .link_statuses()
                .await?
                .into_iter()
                .map(|h| ((h.link_id, h.agent), h))
                .collect(),
            now: crate::unix_now(),
        };
        Ok(links.iter().map(|l| known.link_info(l)).collect())
    }

    /// One link as the operator sees it.
    pub(crate) async fn link_info_of(&self, link: &LinkRecord) -> Result<LinkInfo, StoreError> {
        let infos = self.link_infos(std::slice::from_ref(link)).await?;
        infos
            .into_iter()
            .next()
            .ok_or_else(|| StoreError::Corrupt("a link vanished while it was shown".into()))
    }
}

impl Known {
    fn name(&self, id: &NodeId) -> String {
        self.nodes
            .get(id)
            .map_or_else(|| id.to_string(), |n| n.name.clone())
    }

    fn link_info(&self, link: &LinkRecord) -> LinkInfo {
        let refused: Vec<LinkRefused> = self
            .refusals
            .iter()
            .filter(|r| r.link_id == link.link_id)
            .filter(|r| r.agent == link.from_node || r.agent == link.to_node)
            .map(|r| LinkRefused {
                agent: self.name(&r.agent),
                reason: r.reason.clone(),
                at: r.at,
            })
            .collect();
        let halves = [("from", &link.from_node), ("to", &link.to_node)]
            .into_iter()
            .map(|(side, agent)| self.half(link.link_id, side, agent))
            .collect();
        LinkInfo {
            spec: LinkSpec {
                name: link.name.clone(),
                from: self.name(&link.from_node),
                listen: link.listen.clone(),
                to: self.name(&link.to_node),
                target: link.target.clone(),
                allowed_uids: link.allowed_uids.clone(),
                allowed_gids: link.allowed_gids.clone(),
                allow: link.allow.clone(),
                proxy_protocol: link.proxy_protocol,
                max_flows: link.max_flows,
                rate_limit_bytes_per_sec: link.rate_limit,
                connection: link.connection.clone(),
            },
            link_id: link.link_id,
            generation: link.generation,
            relays: link
                .relays
                .iter()
                .map(|r| self.name(&NodeId(r.0)))
                .collect(),
            created_at: link.created_at,
            refused,
            status: LinkStatus::combine(halves, !link.relays.is_empty()),
            traffic: self.traffic.get(&link.link_id).map(|t| {
                let fresh = t.at + TRAFFIC_FRESH_SECS >= self.now;
                api::LinkTrafficInfo {
                    relay: self.name(&t.relay),
                    bytes_a_to_b: t.a_to_b,
                    bytes_b_to_a: t.b_to_a,
                    flows_open: if fresh { t.flows_open } else { 0 },
                    bytes_per_sec_a_to_b: if fresh { t.rate_a_to_b } else { 0 },
                    bytes_per_sec_b_to_a: if fresh { t.rate_b_to_a } else { 0 },
                    at: t.at,
                }
            }),
        }
    }

    /// One half: refused by its agent, as its agent last reported it, or
    /// `unknown` where that report is missing or its agent has not been
    /// heard from for [`api::STATUS_STALE_SECS`].
    fn half(&self, link: LinkId, side: &str, agent: &NodeId) -> HalfStatus {
        let mut half = HalfStatus {
            agent: self.name(agent),
            side: side.into(),
            state: LinkState::Unknown,
            reason: None,
            relay: None,
            since: None,
        };
        if let Some(r) = self
            .refusals
            .iter()
            .find(|r| r.link_id == link && r.agent == *agent)
        {
            half.state = LinkState::Refused;
            half.reason = Some(r.reason.clone());
            half.since = Some(r.at);
            return half;
        }
        let last_seen = self.nodes.get(agent).and_then(|n| n.last_seen);
        let Some(report) = self.halves.get(&(link, *agent)) else {
            half.reason = Some("has not reported this link".into());
            return half;
        };
        match last_seen {
            Some(t) if self.now.saturating_sub(t) <= api::STATUS_STALE_SECS => {}
            _ => {
                half.reason = Some(format!(
                    "not heard from for more than {} s",
                    api::STATUS_STALE_SECS
                ));
                half.since = last_seen;
                return half;
            }
        }
        half.state = report.state.into();
        half.reason.clone_from(&report.reason);
        half.relay = report.relay_id.map(|r| self.name(&NodeId(r.0)));
        half.since = Some(report.since);
        half
    }
}
