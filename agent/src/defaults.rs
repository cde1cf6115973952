//! Default values of the agent, with the reason for each.

use std::time::Duration;

/// First reconnect delay after a relay connection fails.
pub const RECONNECT_INITIAL: Duration = Duration::from_millis(50);

/// Longest reconnect delay: low, so recovery after an outage is quick; the
/// jitter spreads a fleet's reconnects.
pub const RECONNECT_MAX: Duration = Duration::from_secs(1);

/// Time to establish a QUIC connection and be welcomed by the relay.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an accepted local connection waits for its link to become
/// ready (peer present, Noise session up) before it is closed.
pub const FLOW_OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Time to dial a local target for an incoming flow.
pub const TARGET_DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Interval at which side A retries a Noise handshake that got no answer.
pub const HANDSHAKE_RETRY: Duration = Duration::from_secs(2);

/// Largest local read sealed into one record. 16 KiB keeps latency low and
/// is allocated only while data is ready, never held by an idle flow.
pub const READ_CHUNK: usize = 16 * 1024;

/// QUIC connection receive window (bytes the relay can have in flight to
/// this agent across all flows).
pub const CONNECTION_RECEIVE_WINDOW: u32 = 16 * 1024 * 1024;

/// QUIC per-stream receive window.
pub const STREAM_RECEIVE_WINDOW: u32 = 2 * 1024 * 1024;

/// Concurrent flow streams the relay may open to this agent.
pub const MAX_INCOMING_FLOWS: u32 = 1024;

/// Idle timeout of the relay connection.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// QUIC keep-alive interval: keeps NAT bindings open, costs one small
/// packet per interval on an idle link.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// Control messages queued toward the relay.
pub const CONTROL_QUEUE: usize = 256;
