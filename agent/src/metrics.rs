//! Agent metrics. Names are `comsat_agent_<thing>_<unit|total>`.
//!
//! | name | type | meaning |
//! |---|---|---|
//! | `comsat_agent_relay_connects_total` | counter | relay connections established |
//! | `comsat_agent_relay_connect_failures_total` | counter | failed connection attempts |
//! | `comsat_agent_relay_drains_total` | counter | times a draining relay told the agent to move its links to the next relay |
//! | `comsat_agent_relay_silences_total` | counter | relay connections given up because the relay left data (or a keep-alive) unanswered past the watchdog's bound: a relay host gone or cut off |
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
//! | `comsat_agent_local_refused_total{reason}` | counter | local connections refused: `peer_credentials`, `link_not_ready`, `grant_expired` (the relay ended the link at its grant's `not_after` and no renewed grant came) |
//! | `comsat_agent_rekeys_total{kind}` | counter | end-to-end keys replaced: `records` (a flow sealed as many records as one key may, and moved to its next key), `flow_ids` (this agent used a generation of flow ids and started the next, under new keys) |
//! | `comsat_agent_peer_refused_total{reason}` | counter | what arrived through a relay and was refused because the relay (or whoever holds its keys) replayed or forged it: `replayed_flow` (a flow the session already opened), `unconfirmed_handshake` (a handshake this agent answered that the peer never confirmed by sealing under it: a replay, or a handshake the peer gave up), `forgeries` (a session met 65,536 messages that failed to decrypt and is replaced) |

use metrics::{Counter, Gauge, counter, describe_counter, describe_gauge, gauge};

/// Relay connections established.
pub const RELAY_CONNECTS_TOTAL: &str = "comsat_agent_relay_connects_total";
/// Failed relay connection attempts.
pub const RELAY_CONNECT_FAILURES_TOTAL: &str = "comsat_agent_relay_connect_failures_total";
/// Moves away from a draining relay.
pub const RELAY_DRAINS_TOTAL: &str = "comsat_agent_relay_drains_total";
/// Relay connections given up on for silence.
pub const RELAY_SILENCES_TOTAL: &str = "comsat_agent_relay_silences_total";
/// Relay connections left to follow the peers.
pub const PEER_MOVES_TOTAL: &str = "comsat_agent_peer_moves_total";
/// Links attached with a session.
pub const LINKS_READY: &str = "comsat_agent_links_ready";
/// Flows opened.
pub const FLOWS_TOTAL: &str = "comsat_agent_flows_total";
/// Flows open.
pub const FLOWS_OPEN: &str = "comsat_agent_flows_open";
/// Flows reset.
pub const FLOWS_FAILED_TOTAL: &str = "comsat_agent_flows_failed_total";
/// Flow resumptions.
pub const FLOWS_RESUMED_TOTAL: &str = "comsat_agent_flows_resumed_total";
/// Flows moved from the lane to the main connection.
pub const FLOWS_MOVED_TOTAL: &str = "comsat_agent_flows_moved_total";
/// Lane connections established.
pub const LANE_CONNECTS_TOTAL: &str = "comsat_agent_lane_connects_total";
/// Lane connections up.
pub const LANES_OPEN: &str = "comsat_agent_lanes_open";
/// Acknowledgement messages sent.
pub const ACK_MESSAGES_TOTAL: &str = "comsat_agent_ack_messages_total";
/// Bytes sent.
pub const SENT_BYTES_TOTAL: &str = "comsat_agent_sent_bytes_total";
/// Bytes received.
pub const RECEIVED_BYTES_TOTAL: &str = "comsat_agent_received_bytes_total";
/// Local connections refused, by `reason`: `peer_credentials`,
/// `link_not_ready`, `grant_expired`.
pub const LOCAL_REFUSED_TOTAL: &str = "comsat_agent_local_refused_total";
/// End-to-end keys replaced, by `kind`: `records` (a key sealed the most
/// records it may), `flow_ids` (a generation of flow ids ran out).
pub const REKEYS_TOTAL: &str = "comsat_agent_rekeys_total";
/// Replays and forgeries from a relay, refused, by `reason` (see the
/// module's table).
pub const PEER_REFUSED_TOTAL: &str = "comsat_agent_peer_refused_total";

/// Metric handles, resolved once.
#[derive(Clone)]
pub(crate) struct Metrics {
    pub(crate) connects: Counter,
    pub(crate) connect_failures: Counter,
    pub(crate) relay_drains: Counter,
    pub(crate) relay_silences: Counter,
    pub(crate) peer_moves: Counter,
    pub(crate) links_ready: Gauge,
    pub(crate) flows_total: Counter,
    pub(crate) flows_open: Gauge,
    pub(crate) flows_failed: Counter,
    pub(crate) flows_resumed: Counter,
    pub(crate) flows_moved: Counter,
    pub(crate) lane_connects: Counter,
    pub(crate) lanes_open: Gauge,
    pub(crate) ack_messages: Counter,
    pub(crate) sent_bytes: Counter,
    pub(crate) received_bytes: Counter,
}

impl Metrics {
    pub(crate) fn new() -> Self {
        describe_counter!(RELAY_CONNECTS_TOTAL, "Relay connections established");
        describe_counter!(
            RELAY_CONNECT_FAILURES_TOTAL,
            "Failed relay connection attempts"
        );
        describe_counter!(
            RELAY_DRAINS_TOTAL,
            "Times a draining relay told the agent to move its links"
        );
        describe_counter!(
            RELAY_SILENCES_TOTAL,
            "Relay connections given up because the relay left sends unanswered"
        );
        describe_counter!(
            PEER_MOVES_TOTAL,
            "Relay connections left to follow the peers off a relay that stopped answering them"
        );
        describe_gauge!(
            LINKS_READY,
            "Links attached to a relay with an end-to-end session"
        );
        describe_counter!(FLOWS_TOTAL, "Flows opened");
        describe_gauge!(FLOWS_OPEN, "Flows open");
        describe_counter!(FLOWS_FAILED_TOTAL, "Flows that ended in a reset");
        describe_counter!(
            FLOWS_RESUMED_TOTAL,
            "Times a flow moved to a new stream after an outage"
        );
        describe_counter!(
            FLOWS_MOVED_TOTAL,
            "Flows that turned bulk on the lane and moved to the main connection"
        );
        describe_counter!(LANE_CONNECTS_TOTAL, "Lane connections established");
        describe_gauge!(LANES_OPEN, "Lane connections up");
        describe_counter!(
            ACK_MESSAGES_TOTAL,
            "End-to-end acknowledgement messages sent to peers"
        );
        describe_counter!(SENT_BYTES_TOTAL, "Application bytes sent into links");
        describe_counter!(
            RECEIVED_BYTES_TOTAL,
            "Application bytes delivered from links"
        );
        describe_counter!(LOCAL_REFUSED_TOTAL, "Local connections refused, by reason");
        describe_counter!(REKEYS_TOTAL, "End-to-end keys replaced, by kind");
        describe_counter!(
            PEER_REFUSED_TOTAL,
            "Replayed or forged flows and handshakes from a relay, refused, by reason"
        );
        Self {
            connects: counter!(RELAY_CONNECTS_TOTAL),
            connect_failures: counter!(RELAY_CONNECT_FAILURES_TOTAL),
            relay_drains: counter!(RELAY_DRAINS_TOTAL),
            relay_silences: counter!(RELAY_SILENCES_TOTAL),
            peer_moves: counter!(PEER_MOVES_TOTAL),
            links_ready: gauge!(LINKS_READY),
            flows_total: counter!(FLOWS_TOTAL),
            flows_open: gauge!(FLOWS_OPEN),
            flows_failed: counter!(FLOWS_FAILED_TOTAL),
            flows_resumed: counter!(FLOWS_RESUMED_TOTAL),
            flows_moved: counter!(FLOWS_MOVED_TOTAL),
            lane_connects: counter!(LANE_CONNECTS_TOTAL),
            lanes_open: gauge!(LANES_OPEN),
            ack_messages: counter!(ACK_MESSAGES_TOTAL),
            sent_bytes: counter!(SENT_BYTES_TOTAL),
            received_bytes: counter!(RECEIVED_BYTES_TOTAL),
        }
    }

    pub(crate) fn local_refused(&self, reason: &'static str) {
        counter!(LOCAL_REFUSED_TOTAL, "reason" => reason).increment(1);
    }

    pub(crate) fn rekeyed(&self, kind: &'static str) {
        counter!(REKEYS_TOTAL, "kind" => kind).increment(1);
    }

    pub(crate) fn peer_refused(&self, reason: &'static str) {
        counter!(PEER_REFUSED_TOTAL, "reason" => reason).increment(1);
    }
}
