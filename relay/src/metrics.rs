//! Relay metrics. Names are `comsat_relay_<thing>_<unit|total>`.
//!
//! | name | type | meaning |
//! |---|---|---|
//! | `comsat_relay_connections_total` | counter | QUIC connections accepted |
//! | `comsat_relay_connections_open` | gauge | authenticated agent connections |
//! | `comsat_relay_node_clones_total` | counter | authenticated connections of a node key while another connection of the same key was held from another source (IPv4 address or IPv6 /64): a copied key, or an agent that moved networks (logged with both sources) |
//! | `comsat_relay_retries_total` | counter | new connections sent a QUIC Retry to prove their address (while `limits.retry_above` connections are unauthenticated) |
//! | `comsat_relay_auth_failures_total{reason}` | counter | connections refused, by reason: `unknown_node`, `bad_signature`, `timeout`, `protocol`, `too_many_unauthenticated`, `too_many_from_source`, `too_many_connections`, `too_many_for_node`, `handshake` |
//! | `comsat_relay_attach_refused_total{reason}` | counter | attaches refused: `not_granted`, `stale_generation`, `expired`, `draining`, `relay_full` (`limits.max_links` reached) |
//! | `comsat_relay_links_paired` | gauge | links with both sides attached |
//! | `comsat_relay_flows_total` | counter | flows spliced |
//! | `comsat_relay_flows_open` | gauge | flows being spliced |
//! | `comsat_relay_lane_flows_total` | counter | flow streams that came on a lane, counted as they arrive (an agent's second connection for flows that must not queue behind bulk; see the agent's `lane_addr`) |
//! | `comsat_relay_flows_refused_total` | counter | flow streams refused (link not paired on this connection) |
//! | `comsat_relay_flows_over_limit_total` | counter | new flows refused because their link had its grant's `max_flows` open (the application sees a reset) |
//! | `comsat_relay_forwarded_bytes_total` | counter | flow bytes forwarded, counted as they move |
//! | `comsat_relay_datagrams_forwarded_total` | counter | datagrams of links' UDP flows forwarded to the other side |
//! | `comsat_relay_datagrams_dropped_total{reason}` | counter | datagrams dropped: `malformed` (shorter than a link id), `not_attached` (the connection holds no side of the link named), `peer_away`, `rate_limit` (over the link's rate), `too_large` (more than the peer's connection takes at once), `congested` (the peer's connection holds as many unsent datagrams as it may), `overflow` (received, but dropped for room before the relay read them) |
//! | `comsat_relay_buffered_bytes` | gauge | bytes held for flows whose peer is away |
//! | `comsat_relay_flows_parked_total` | counter | flows held because their peer was away |
//! | `comsat_relay_grants_loaded` | gauge | valid grants held |
//! | `comsat_relay_grants_rejected_total{reason}` | counter | grant files refused: `malformed`, `bad_signature`, `other_relay`, `expired`, `stale_generation`, `unreadable` |
//! | `comsat_relay_grants_expired_total` | counter | grants dropped at their `not_after` (their links torn down at that instant, with or without the controller) |
//! | `comsat_relay_draining` | gauge | 1 while the relay drains (SIGTERM), else 0 |
//! | `comsat_relay_config_reloads_total{result}` | counter | config reloads (SIGHUP or file change): `applied`, `refused` (the old one stays; the log says why) |
//! | `comsat_relay_throttled_seconds_total` | counter | time flows waited for their link's rate limit, all links |
//! | `comsat_relay_udp_bytes_total{direction}` | counter | UDP payload bytes of agent connections, `rx` or `tx`: QUIC packets with their headers, acknowledgements and retransmissions, so `rx + tx` over twice the bytes forwarded is the wire overhead per hop |
//! | `comsat_relay_udp_datagrams_total{direction}` | counter | UDP datagrams of agent connections, `rx` or `tx` |
//!
//! Per link (label `link` = the link id in hex; at most
//! `limits.metrics_max_links` links get series of their own, the first to
//! carry traffic keeping their place while their grant lasts; all other
//! links are summed under `link="_other"`, so a scrape stays bounded
//! however many links the relay holds; a link's series go when its grant
//! goes):
//!
//! | name | type | meaning |
//! |---|---|---|
//! | `comsat_relay_link_bytes_total{link,direction}` | counter | bytes forwarded, `a_to_b` (sent by side A) or `b_to_a`, counted as they move |
//! | `comsat_relay_link_flows_open{link}` | gauge | open flows |
//! | `comsat_relay_link_buffered_bytes{link}` | gauge | bytes held while the peer is away |
//! | `comsat_relay_link_throttled_seconds_total{link}` | counter | time the link's flows waited for its rate limit |
//! | `comsat_relay_link_rate_limit_bytes_per_second{link}` | gauge | the grant's rate limit in force, per direction (0: none) |
//! | `comsat_relay_link_refused_total{link,reason}` | counter | `max_flows`: new flows refused over the limit; `attach`: refused attaches (wrong generation, draining, relay full) |

use metrics::counter;

comsat_node::metric_set! {
    /// Metric handles, resolved once.
    pub struct Metrics {
        /// Accepted QUIC connections.
        pub(crate) connections_total: Counter = CONNECTIONS_TOTAL(
            "comsat_relay_connections_total",
            "QUIC connections accepted"
        ),
        /// Authenticated connections open.
        pub(crate) connections_open: Gauge = CONNECTIONS_OPEN(
            "comsat_relay_connections_open",
            "Authenticated agent connections"
        ),
        /// Authenticated connections of a node key while another of the same key
        /// was held from another source.
        pub(crate) node_clones: Counter = NODE_CLONES_TOTAL(
            "comsat_relay_node_clones_total",
            "Connections of a node key while it was connected from another source"
        ),
        /// New connections sent a QUIC Retry (to prove their address) under load.
        pub(crate) retries: Counter = RETRIES_TOTAL(
            "comsat_relay_retries_total",
            "New connections sent a QUIC Retry to prove their address"
        ),
        /// Paired links.
        pub(crate) links_paired: Gauge = LINKS_PAIRED(
            "comsat_relay_links_paired",
            "Links with both sides attached"
        ),
        /// Flows spliced.
        pub(crate) flows_total: Counter = FLOWS_TOTAL(
            "comsat_relay_flows_total",
            "Flows spliced"
        ),
        /// Flow streams that came on a lane attachment.
        pub(crate) lane_flows: Counter = LANE_FLOWS_TOTAL(
            "comsat_relay_lane_flows_total",
            "Flow streams that came on a lane"
        ),
        /// Flows open.
        pub(crate) flows_open: Gauge = FLOWS_OPEN(
            "comsat_relay_flows_open",
            "Flows being spliced"
        ),
        /// Flow streams refused.
        pub(crate) flows_refused: Counter = FLOWS_REFUSED_TOTAL(
            "comsat_relay_flows_refused_total",
            "Flow streams refused"
        ),
        /// New flows refused over their link's `max_flows`.
        pub(crate) flows_over_limit: Counter = FLOWS_OVER_LIMIT_TOTAL(
            "comsat_relay_flows_over_limit_total",
            "New flows refused because their link had max_flows open"
        ),
        /// Bytes forwarded.
        pub(crate) forwarded_bytes: Counter = FORWARDED_BYTES_TOTAL(
            "comsat_relay_forwarded_bytes_total",
            "Flow bytes forwarded"
        ),
        /// Bytes held for parked flows.
        pub(crate) buffered_bytes: Gauge = BUFFERED_BYTES(
            "comsat_relay_buffered_bytes",
            "Bytes held for flows whose peer is away"
        ),
        /// Flows parked.
        pub(crate) flows_parked: Counter = FLOWS_PARKED_TOTAL(
            "comsat_relay_flows_parked_total",
            "Flows held because their peer was away"
        ),
        /// Grants held.
        grants_loaded: Gauge = GRANTS_LOADED(
            "comsat_relay_grants_loaded",
            "Valid grants held"
        ),
        /// Grants dropped at their expiry.
        grants_expired: Counter = GRANTS_EXPIRED_TOTAL(
            "comsat_relay_grants_expired_total",
            "Grants dropped at their not_after, their links torn down"
        ),
        /// 1 while draining.
        pub(crate) draining: Gauge = DRAINING(
            "comsat_relay_draining",
            "1 while the relay drains"
        ),
        /// Datagrams forwarded.
        pub(crate) datagrams_forwarded: Counter = DATAGRAMS_FORWARDED_TOTAL(
            "comsat_relay_datagrams_forwarded_total",
            "Datagrams of UDP flows forwarded between a link's sides"
        ),
    }
    labelled {
        /// Datagrams dropped, by reason.
        Counter DATAGRAMS_DROPPED_TOTAL(
            "comsat_relay_datagrams_dropped_total",
            "Datagrams of UDP flows dropped, by reason"
        ),
        /// Refused connections by reason.
        Counter AUTH_FAILURES_TOTAL(
            "comsat_relay_auth_failures_total",
            "Connections refused, by reason"
        ),
        /// Refused attaches by reason.
        Counter ATTACH_REFUSED_TOTAL(
            "comsat_relay_attach_refused_total",
            "Attaches refused, by reason"
        ),
        /// Grants refused by reason.
        Counter GRANTS_REJECTED_TOTAL(
            "comsat_relay_grants_rejected_total",
            "Grant files refused, by reason"
        ),
        /// Config reloads by result.
        Counter CONFIG_RELOADS_TOTAL(
            "comsat_relay_config_reloads_total",
            "Config reloads, by result"
        ),
    }
}

impl Metrics {
    /// Counts a refused connection.
    pub fn auth_failure(&self, reason: &'static str) {
        counter!(AUTH_FAILURES_TOTAL, "reason" => reason).increment(1);
    }

    /// Counts a dropped datagram.
    pub(crate) fn datagram_dropped(&self, reason: &'static str, n: u64) {
        counter!(DATAGRAMS_DROPPED_TOTAL, "reason" => reason).increment(n);
    }

    /// Counts a refused attach.
    pub fn attach_refused(&self, reason: &'static str) {
        counter!(ATTACH_REFUSED_TOTAL, "reason" => reason).increment(1);
    }

    /// Counts a config reload: `applied` or `refused`.
    pub fn config_reload(&self, result: &'static str) {
        counter!(CONFIG_RELOADS_TOTAL, "result" => result).increment(1);
    }

    /// Counts a refused grant.
    pub fn grant_rejected(&self, reason: &'static str) {
        counter!(GRANTS_REJECTED_TOTAL, "reason" => reason).increment(1);
    }

    /// Counts grants dropped at their expiry.
    pub fn grants_expired(&self, n: usize) {
        self.grants_expired.increment(n as u64);
    }

    /// Sets the number of grants held.
    pub fn grants_loaded(&self, n: usize) {
        self.grants_loaded.set(n as f64);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
