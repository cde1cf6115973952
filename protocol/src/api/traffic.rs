//! What links carry: relays report each link's counters with their
//! heartbeats, and the controller shows the latest with a rate.

use serde::{Deserialize, Serialize};

use crate::LinkId;

/// Most links one heartbeat reports traffic for (a relay reports the
/// links that moved bytes or hold flows, up to this many).
pub const MAX_TRAFFIC_PER_HEARTBEAT: usize = 4096;

/// Longest version string a node reports.
pub const MAX_VERSION_LEN: usize = 64;

/// One link's counters at a relay, since the relay began carrying it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkTraffic {
    /// The link.
    pub link_id: LinkId,
    /// Bytes forwarded from side A (the listening agent) to side B.
    pub bytes_a_to_b: u64,
    /// Bytes forwarded from side B to side A.
    pub bytes_b_to_a: u64,
    /// Flows open now.
    pub flows_open: u64,
}

/// A link's traffic as the controller last heard it from a relay.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkTrafficInfo {
    /// The relay that reported it.
    pub relay: String,
    /// Bytes from side A to side B through that relay.
    pub bytes_a_to_b: u64,
    /// Bytes from side B to side A.
    pub bytes_b_to_a: u64,
    /// Flows open at the last report.
    pub flows_open: u64,
    /// Bytes per second from A to B between the last two reports (0 once
    /// the relay stops reporting the link: it moved nothing since).
    pub bytes_per_sec_a_to_b: u64,
    /// Bytes per second from B to A.
    pub bytes_per_sec_b_to_a: u64,
    /// Unix time of the last report.
    pub at: u64,
}
