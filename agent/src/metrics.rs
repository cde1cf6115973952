//! Agent metrics. Names are `comsat_agent_<thing>_<unit|total>`.
//!
//! | name | type | meaning |
//! |---|---|---|
//! | `comsat_agent_relay_connects_total` | counter | relay connections established |
//! | `comsat_agent_relay_connect_failures_total` | counter | failed connection attempts |
//! | `comsat_agent_relay_drains_total` | counter | times a draining relay told the agent to move its links to the next relay |
//! | `comsat_agent_relay_silences_total` | counter | relay connections given up because the relay left data (or a keep-alive) unanswered past the watchdog's bound: a relay host gone or cut off |
//! | `comsat_agent_relay_rebinds_total` | counter | relay connections (and lanes) moved to a new socket because this machine's address toward the relay changed (a new uplink): the connection migrates at once, without a new handshake |
//! | `comsat_agent_relay_offline_total` | counter | relay connections lost because this machine had no route toward the relay (its own network went down): the agent waited for a route and went back to the same relay, without moving its links or blaming the relay |
//! | `comsat_agent_peer_moves_total` | counter | relay connections left because the controller said the links' peers left that relay, which stopped answering them |
//! | `comsat_agent_links_ready` | gauge | links up: attached to a relay with an end-to-end session, the peer attached there too |
//! | `comsat_agent_flows_total` | counter | flows opened (both directions of dialling) |
//! | `comsat_agent_flows_open` | gauge | flows open |
//! | `comsat_agent_flows_failed_total` | counter | flows that ended in a reset |
//! | `comsat_agent_flows_resumed_total` | counter | times a flow moved to a new stream after an outage |
//! | `comsat_agent_flows_moved_total` | counter | flows this agent dialled that turned bulk on the lane and moved to the main connection |
//! | `comsat_agent_lane_connects_total` | counter | lane connections established (a second connection per relay, for flows that must not queue behind bulk) |
//! | `comsat_agent_lanes_open` | gauge | lane connections up now (each closes after `lane_idle_ms` without flows) |
//! | `comsat_agent_ack_messages_total` | counter | end-to-end acknowledgement messages sent to peers (each acknowledges what the link's flows delivered since the last; an interactive flow's go out within 100 ms, a bulk flow's every 512 KiB) |
//! | `comsat_agent_sent_bytes_total` | counter | application bytes sent into links, counted as they move |
//! | `comsat_agent_received_bytes_total` | counter | application bytes delivered from links |
//! | `comsat_agent_local_refused_total{reason}` | counter | local connections refused: `workload` (no `allow` rule of the link matches the caller; see `comsat_agent_workloads_refused_total`), `link_not_ready`, `grant_expired` (the relay ended the link at its grant's `not_after` and no renewed grant came) |
//! | `comsat_agent_workloads_refused_total{link}` | counter | local callers refused because no `allow` rule of the link matches them; the warning logged with each names the caller's pid and selectors |
//! | `comsat_agent_rekeys_total{kind}` | counter | end-to-end keys replaced: `records` (a flow sealed as many records as one key may, and moved to its next key), `flow_ids` (this agent used a generation of flow ids and started the next, under new keys) |
//! | `comsat_agent_udp_datagrams_sent_total{link}` | counter | datagrams of a `udp://` link's flows sealed and sent to the peer |
//! | `comsat_agent_udp_datagrams_received_total{link}` | counter | datagrams from the peer delivered to the link's local flows |
//! | `comsat_agent_udp_datagrams_dropped_total{link,reason}` | counter | datagrams dropped, either way: `not_ready` (no session or relay connection), `peer_away`, `too_large` (beyond what the path takes in one datagram: never fragmented), `congested` (the connection's datagram buffer is full), `flows_full` (the link holds 1,024 UDP flows), `unknown_flow` (an answer for a flow forgotten after its idle timeout), `replayed` (a number delivered before: a replay), `too_old` (overtaken by more than the 4,096-datagram window), `forged` (failed to decrypt), `local_send` (the local socket would not take it), `no_target` (side B: the target does not resolve or no socket toward it could be made) |
//! | `comsat_agent_udp_datagrams_overflow_total` | counter | datagrams from relays dropped for room before the agent read them (it read them slower than they came); their links are unknown |
//! | `comsat_agent_udp_flows_open{link}` | gauge | UDP flows alive (one per local source address; forgotten after 30 s unanswered, 120 s once answered) |
//! | `comsat_agent_relay_handshake_seconds` | histogram | time to connect to a relay: name lookup, QUIC and TLS handshakes, the agent's authentication |
//! | `comsat_agent_flow_setup_seconds{side}` | histogram | time to set up a flow: `listen` (a local connection accepted until its flow is opened to the peer, waiting for the link if it is down), `dial` (the peer's flow received until its target answered) |
//! | `comsat_agent_resume_pause_seconds` | histogram | how long a link was down (relay lost, peer away) before it was up again: the pause its open flows saw |
//! | `comsat_agent_peer_refused_total{reason}` | counter | what arrived through a relay and was refused because the relay (or whoever holds its keys) replayed or forged it: `replayed_flow` (a flow the session already opened), `unconfirmed_handshake` (a handshake this agent answered that the peer never confirmed by sealing under it: a replay, or a handshake the peer gave up), `forgeries` (a session met 65,536 messages that failed to decrypt and is replaced) |

use metrics::{Counter, Gauge, counter, gauge, histogram};

use crate::datagrams::Dropped;

comsat_node::metric_set! {
    /// Metric handles, resolved once.
    pub(crate) struct Metrics {
        /// Relay connections established.
        pub(crate) connects: Counter = RELAY_CONNECTS_TOTAL(
            "comsat_agent_relay_connects_total",
            "Relay connections established"
        ),
        /// Failed relay connection attempts.
        pub(crate) connect_failures: Counter = RELAY_CONNECT_FAILURES_TOTAL(
            "comsat_agent_relay_connect_failures_total",
            "Failed relay connection attempts"
        ),
        /// Moves away from a draining relay.
        pub(crate) relay_drains: Counter = RELAY_DRAINS_TOTAL(
            "comsat_agent_relay_drains_total",
            "Times a draining relay told the agent to move its links"
        ),
        /// Relay connections given up on for silence.
        pub(crate) relay_silences: Counter = RELAY_SILENCES_TOTAL(
            "comsat_agent_relay_silences_total",
            "Relay connections given up because the relay left sends unanswered"
        ),
        /// Relay connections moved to a new socket.
        pub(crate) rebinds: Counter = RELAY_REBINDS_TOTAL(
            "comsat_agent_relay_rebinds_total",
            "Relay connections moved to a new socket because the local address toward the relay changed"
        ),
        /// Relay connections lost to this machine's own network.
        pub(crate) offline: Counter = RELAY_OFFLINE_TOTAL(
            "comsat_agent_relay_offline_total",
            "Relay connections lost because this machine had no route toward the relay"
        ),
        /// Relay connections left to follow the peers.
        pub(crate) peer_moves: Counter = PEER_MOVES_TOTAL(
            "comsat_agent_peer_moves_total",
            "Relay connections left to follow the peers off a relay that stopped answering them"
        ),
        /// Links attached with a session.
        pub(crate) links_ready: Gauge = LINKS_READY(
            "comsat_agent_links_ready",
            "Links attached to a relay with an end-to-end session"
        ),
        /// Flows opened.
        pub(crate) flows_total: Counter = FLOWS_TOTAL(
            "comsat_agent_flows_total",
            "Flows opened"
        ),
        /// Flows open.
        pub(crate) flows_open: Gauge = FLOWS_OPEN(
            "comsat_agent_flows_open",
            "Flows open"
        ),
        /// Flows reset.
        pub(crate) flows_failed: Counter = FLOWS_FAILED_TOTAL(
            "comsat_agent_flows_failed_total",
            "Flows that ended in a reset"
        ),
        /// Flow resumptions.
        pub(crate) flows_resumed: Counter = FLOWS_RESUMED_TOTAL(
            "comsat_agent_flows_resumed_total",
            "Times a flow moved to a new stream after an outage"
        ),
        /// Flows moved from the lane to the main connection.
        pub(crate) flows_moved: Counter = FLOWS_MOVED_TOTAL(
            "comsat_agent_flows_moved_total",
            "Flows that turned bulk on the lane and moved to the main connection"
        ),
        /// Lane connections established.
        pub(crate) lane_connects: Counter = LANE_CONNECTS_TOTAL(
            "comsat_agent_lane_connects_total",
            "Lane connections established"
        ),
        /// Lane connections up.
        pub(crate) lanes_open: Gauge = LANES_OPEN(
            "comsat_agent_lanes_open",
            "Lane connections up"
        ),
        /// Acknowledgement messages sent.
        pub(crate) ack_messages: Counter = ACK_MESSAGES_TOTAL(
            "comsat_agent_ack_messages_total",
            "End-to-end acknowledgement messages sent to peers"
        ),
        /// Bytes sent.
        pub(crate) sent_bytes: Counter = SENT_BYTES_TOTAL(
            "comsat_agent_sent_bytes_total",
            "Application bytes sent into links"
        ),
        /// Bytes received.
        pub(crate) received_bytes: Counter = RECEIVED_BYTES_TOTAL(
            "comsat_agent_received_bytes_total",
            "Application bytes delivered from links"
        ),
        /// Datagrams from relays dropped for room before they were read.
        pub(crate) udp_overflow: Counter = UDP_OVERFLOW_TOTAL(
            "comsat_agent_udp_datagrams_overflow_total",
            "Datagrams from relays dropped for room before the agent read them"
        ),
        /// Time to connect to a relay.
        pub(crate) relay_handshake: Histogram = RELAY_HANDSHAKE_SECONDS(
            "comsat_agent_relay_handshake_seconds",
            "Time to connect to a relay: name lookup, QUIC and TLS handshakes, and the agent's authentication"
        ),
        /// How long links were down before they were up again.
        pub(crate) resume_pause: Histogram = RESUME_PAUSE_SECONDS(
            "comsat_agent_resume_pause_seconds",
            "How long a link was down (relay lost, peer away) before it was up again and its flows went on"
        ),
    }
    labelled {
        /// Local connections refused, by `reason`: `workload`,
        /// `link_not_ready`, `grant_expired`.
        Counter LOCAL_REFUSED_TOTAL(
            "comsat_agent_local_refused_total",
            "Local connections refused, by reason"
        ),
        /// Local callers no `allow` rule matches, by `link`.
        Counter WORKLOADS_REFUSED_TOTAL(
            "comsat_agent_workloads_refused_total",
            "Local callers refused because no allow rule of the link matches them (the log line names their selectors), by link"
        ),
        /// End-to-end keys replaced, by `kind`: `records` (a key sealed the most
        /// records it may), `flow_ids` (a generation of flow ids ran out).
        Counter REKEYS_TOTAL(
            "comsat_agent_rekeys_total",
            "End-to-end keys replaced, by kind"
        ),
        /// Replays and forgeries from a relay, refused, by `reason` (see the
        /// module's table).
        Counter PEER_REFUSED_TOTAL(
            "comsat_agent_peer_refused_total",
            "Replayed or forged flows and handshakes from a relay, refused, by reason"
        ),
        /// Datagrams of a UDP link sent to the peer, by `link`.
        Counter UDP_SENT_TOTAL(
            "comsat_agent_udp_datagrams_sent_total",
            "Datagrams of a udp:// link's flows sealed and sent to the peer, by link"
        ),
        /// Datagrams from the peer delivered, by `link`.
        Counter UDP_RECEIVED_TOTAL(
            "comsat_agent_udp_datagrams_received_total",
            "Datagrams from the peer delivered to a udp:// link's flows, by link"
        ),
        /// Datagrams dropped, by `link` and `reason` (see the table).
        Counter UDP_DROPPED_TOTAL(
            "comsat_agent_udp_datagrams_dropped_total",
            "Datagrams of a udp:// link dropped, either way, by link and reason"
        ),
        /// Time to set up a flow, by `side`.
        Histogram FLOW_SETUP_SECONDS(
            "comsat_agent_flow_setup_seconds",
            "Time to set up a flow, by side: listen (a local connection accepted until its flow is opened to the peer, waiting for the link if it is down), dial (the peer's flow received until its target answered)"
        ),
        /// UDP flows alive, by `link`.
        Gauge UDP_FLOWS_OPEN(
            "comsat_agent_udp_flows_open",
            "UDP flows alive, by link"
        ),
    }
}

impl Metrics {
    /// A flow set up on `side` (`listen` or `dial`) in `took`.
    pub(crate) fn flow_setup(&self, side: &'static str, took: std::time::Duration) {
        histogram!(FLOW_SETUP_SECONDS, "side" => side).record(took.as_secs_f64());
    }

    pub(crate) fn local_refused(&self, reason: &'static str) {
        counter!(LOCAL_REFUSED_TOTAL, "reason" => reason).increment(1);
    }

    pub(crate) fn workload_refused(&self, link: &str) {
        counter!(WORKLOADS_REFUSED_TOTAL, "link" => link.to_owned()).increment(1);
    }

    pub(crate) fn rekeyed(&self, kind: &'static str) {
        counter!(REKEYS_TOTAL, "kind" => kind).increment(1);
    }

    pub(crate) fn peer_refused(&self, reason: &'static str) {
        counter!(PEER_REFUSED_TOTAL, "reason" => reason).increment(1);
    }
}

/// The counters of one `udp://` link, labelled with its name.
pub(crate) struct UdpMetrics {
    pub(crate) sent: Counter,
    pub(crate) received: Counter,
    pub(crate) flows_open: Gauge,
    dropped: [Counter; Dropped::ALL.len()],
}

impl UdpMetrics {
    pub(crate) fn new(link: &str) -> Self {
        let name = || link.to_owned();
        Self {
            sent: counter!(UDP_SENT_TOTAL, "link" => name()),
            received: counter!(UDP_RECEIVED_TOTAL, "link" => name()),
            flows_open: gauge!(UDP_FLOWS_OPEN, "link" => name()),
            dropped: Dropped::ALL
                .map(|why| counter!(UDP_DROPPED_TOTAL, "link" => name(), "reason" => why.label())),
        }
    }

    pub(crate) fn dropped(&self, why: Dropped) {
        self.dropped[why as usize].increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::Dropped;

    #[test]
    fn every_drop_reason_has_its_own_counter() {
        for (i, why) in Dropped::ALL.into_iter().enumerate() {
            assert_eq!(why as usize, i, "{why:?}");
        }
    }
}
