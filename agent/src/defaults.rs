//! Default values of the agent, with the reason for each.

use std::time::Duration;

/// First reconnect delay after a relay connection ended (a relay that
/// restarted resets its old connections at their next keep-alive, so a
/// fleet's first tries are spread over that interval already).
pub const RECONNECT_INITIAL: Duration = Duration::from_millis(50);

/// Longest reconnect delay. Each delay is drawn at random below a bound
/// that doubles up to this (full jitter): a fleet that keeps failing at a
/// relay spreads its tries over 10 s instead of coming back in waves, and
/// an agent is back at most 10 s after an outage of any length (5 s on
/// average).
pub const RECONNECT_MAX: Duration = Duration::from_secs(10);

/// How long after its links (re)appear a relay's refusal is logged as
/// expected (info) rather than as a failure (warn): a link the controller
/// just created reaches the agents and the relay at about the same time.
pub const NEW_LINK_GRACE: Duration = Duration::from_secs(10);

/// Time to establish a QUIC connection and be welcomed by the relay; after
/// it the next relay of the list is tried. QUIC resends its first packet
/// after 1 s and 2 s, so this leaves room for a lossy path.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(4);

/// How long every link of a relay group waits for its peers on a relay
/// before the group tries the next relay of its list: randomized between
/// this and twice this, and doubled for each hop in a row without meeting a
/// peer (up to 16 times), so two agents that missed each other meet and an
/// agent whose peer is simply down does not churn.
pub const PEER_DWELL: Duration = Duration::from_secs(3);

/// How long an accepted local connection waits for its link to become
/// ready (peer present, Noise session up) before it is closed.
pub const FLOW_OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Time to dial a local target for an incoming flow.
pub const TARGET_DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Interval at which side A retries a Noise handshake that got no answer.
pub const HANDSHAKE_RETRY: Duration = Duration::from_secs(2);

/// Messages that fail to decrypt under one session (forged `Open`s of
/// flows, forged link control: only a relay can send them) before the
/// session is replaced by a new handshake. Far below the AEADs' integrity
/// limits (2^36 forgery attempts for ChaCha20-Poly1305, 2^52 for AES-GCM),
/// far above the few stale messages a session change leaves behind.
pub const MAX_FORGERIES: u64 = 1 << 16;

/// Largest local read sealed into one record: a whole Noise message, so bulk
/// transfers pay the per-record costs (AEAD setup, header, ack) once per
/// 64 KiB. Small writes still go out at once as small records; the buffer is
/// allocated only while data is ready, never held by an idle flow.
pub const READ_CHUNK: usize = comsat_protocol::limits::MAX_RECORD_PAYLOAD_LEN;

/// STREAM frames taken from a flow's stream in one read: everything that
/// has arrived, up to this many, for one look at the connection's state
/// instead of one per frame. 16 empty handles (512 bytes) per open flow.
pub const READ_FRAMES: usize = 16;

/// QUIC connection receive window (bytes the relay can have in flight to
/// this agent across all flows).
pub const CONNECTION_RECEIVE_WINDOW: u32 = 16 * 1024 * 1024;

/// QUIC per-stream receive window.
pub const STREAM_RECEIVE_WINDOW: u32 = 2 * 1024 * 1024;

/// Concurrent flow streams the relay may open to this agent.
pub const MAX_INCOMING_FLOWS: u32 = 1024;

/// QUIC keep-alive interval (`--keep-alive`, `keep_alive_ms`): an idle
/// relay connection sends one small packet this often (and the relay
/// acknowledges it), which keeps the agent's NAT binding open. 25 s stays
/// inside the shortest UDP binding timeouts common NATs keep (30 s for a
/// new mapping on many home routers and carrier-grade NATs; Linux
/// conntrack keeps a replied one 120 s), as WireGuard's persistent
/// keep-alive does. About 0.4 MB a day on the wire.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(25);

/// Shortest and longest keep-alive an agent may be given.
pub const KEEP_ALIVE_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(300);

/// Idle timeout of a relay connection kept alive every `keep_alive`: two
/// keep-alives in a row may be lost before it fires (60 s at the default).
/// A dead relay is noticed long before, by the watchdog
/// ([`SILENCE_DATA`], [`SILENCE_PING`]); the relay's own idle timeout
/// (60 s by default) bounds this too.
pub fn idle_timeout(keep_alive: Duration) -> Duration {
    keep_alive * 2 + Duration::from_secs(10)
}

/// The watchdog of a relay connection: data (or anything the relay must
/// acknowledge) left unanswered this long, and [`SILENCE_RTTS`] round
/// trips, means the relay is gone or cut off; the links move to the next
/// relay of their list. About a second, where the idle timeout was the
/// only detector before; a live relay answers within a round trip or two.
pub const SILENCE_DATA: Duration = Duration::from_secs(1);

/// The same for a keep-alive left unanswered: longer, so a relay busy for
/// a moment does not send every idle agent reconnecting at once.
pub const SILENCE_PING: Duration = Duration::from_secs(3);

/// Round trips the relay has to answer in, at least.
pub const SILENCE_RTTS: u32 = 8;

/// The longest those round trips may stretch the watchdog's bound. A
/// relay's queues under bulk can swell the smoothed round-trip time to
/// seconds; eight of those would outlast the idle timeout, and a side
/// whose relay vanished would wait for that.
pub const SILENCE_MOST: Duration = Duration::from_secs(8);

/// Relays left for silence, queued for the controller to hear of (more
/// are dropped: the peers notice by themselves).
pub const SILENT_QUEUE: usize = 64;

/// How often the watchdog reads the connection's counters.
pub const SILENCE_TICK: Duration = Duration::from_millis(100);

/// How long a flow waits for its link to come back after an outage before
/// it fails: shorter outages are invisible to the application (a pause);
/// longer ones reset its socket.
pub const FLOW_TIMEOUT: Duration = Duration::from_secs(30);

/// Unacknowledged bytes one flow may hold for resending; when full, the
/// local socket is not read (backpressure). 8 MiB covers a bandwidth-delay
/// product of 1 Gbit/s x 64 ms.
pub const FLOW_WINDOW: usize = 8 * 1024 * 1024;

/// Unacknowledged bytes all flows of the agent may hold together.
pub const REPLAY_BUDGET: usize = 256 * 1024 * 1024;

/// Delay that lets the acknowledgements of a burst of records travel as one
/// message.
pub const ACK_DELAY: Duration = Duration::from_millis(2);

/// Longest wait of an acknowledgement nobody waits for: one that only lets
/// the sender forget records it keeps for a resend. An interactive flow's
/// acks travel a few times a second, not once per record (each ack message
/// wakes both agents' and the relay's control tasks).
pub const ACK_LAZY: Duration = Duration::from_millis(100);

/// Bytes a flow delivers before its acknowledgement goes out
/// [`ACK_DELAY`] after, not [`ACK_LAZY`]: a bulk flow's replay window
/// ([`FLOW_WINDOW`]) is released long before it fills.
pub const ACK_BYTES: usize = FLOW_WINDOW / 16;

/// Control messages queued toward the relay, at least (attaches wait for
/// room; acks and handshakes are retried when it is full).
pub const CONTROL_QUEUE: usize = 1024;

/// Control messages queued toward the relay per link the connection
/// carries, beyond [`CONTROL_QUEUE`]: a connection coming up with
/// thousands of links sends each an attach, a handshake or its answer,
/// and a `Resume` or its answer at once, and none of them waits for a
/// retry because the queue was full.
pub const CONTROL_QUEUE_PER_LINK: usize = 4;

/// First delay before an attach the relay refused for a reason that may
/// pass (grant not there yet, relay full) is sent again on the same
/// connection; it doubles up to [`REATTACH_MAX`].
pub const REATTACH_INITIAL: Duration = Duration::from_secs(1);

/// Longest delay between attach retries on one connection.
pub const REATTACH_MAX: Duration = Duration::from_secs(30);

/// How long a lane stays up without flows (`lane_idle_ms`).
pub const LANE_IDLE: Duration = Duration::from_secs(30);

/// Longest wait between tries to bring a lane up (see the config docs): a
/// relay that refuses it is asked again now and then.
pub const LANE_RETRY_MAX: Duration = Duration::from_secs(30);

/// A flow that carries more than this, either way, within
/// [`BULK_WINDOW`] is bulk: it moves from the lane to the main connection.
/// A 64-byte ping-pong on loopback (~10,000 round trips a second) carries
/// ~330 KB in a window; a bulk flow at 200 MB/s reaches it in ~5 ms.
pub const BULK_BYTES: u64 = 1024 * 1024;

/// See [`BULK_BYTES`].
pub const BULK_WINDOW: Duration = Duration::from_millis(250);

/// Main-connection streams of a flow lost in a row, each within
/// [`STREAM_SETTLED`] of opening, after which the flow opens the next at
/// once; after more it waits for its link to be ready anew.
pub const QUICK_RETRIES: u32 = 3;

/// See [`QUICK_RETRIES`].
pub const STREAM_SETTLED: Duration = Duration::from_secs(1);

/// Niceness the main threads take above the process's own once a link has
/// a lane (`bulk_nice` in the agent config).
pub const BULK_NICE: u8 = 5;

/// How often a listener that cannot bind (its address is taken) is tried
/// again.
pub const BIND_RETRY: Duration = Duration::from_secs(1);

/// How long a closed relay connection's endpoint is kept to send the
/// close: one dropped at once may never send it, and the relay then holds
/// the connection (a draining relay waits its grace) until its idle
/// timeout.
pub const CLOSE_FLUSH: Duration = Duration::from_secs(1);

/// How often an agent without a route toward its relay (its own network
/// is down) looks whether it has one again: no packet goes on the wire
/// for it, so it looks often, and is back within this of its network.
pub const ROUTE_CHECK: Duration = Duration::from_millis(250);

/// How often an agent looks whether its address toward a relay changed
/// (a new uplink), to move the connection to a new socket at once. No
/// packet goes on the wire for it.
pub const LOCAL_ADDRESS_CHECK: Duration = Duration::from_secs(1);

/// Most UDP flows (local source addresses) one `udp://` link carries at
/// once; a datagram that would start another is dropped and counted.
pub const MAX_UDP_FLOWS: usize = 1024;

/// A UDP flow only one side has spoken on is forgotten after this long
/// without a datagram (conntrack's `nf_conntrack_udp_timeout`).
pub const UDP_IDLE_UNREPLIED: Duration = Duration::from_secs(30);

/// A UDP flow both sides have spoken on is forgotten after this long
/// without a datagram (conntrack's `nf_conntrack_udp_timeout_stream`).
pub const UDP_IDLE_REPLIED: Duration = Duration::from_secs(120);

/// How often idle UDP flows are looked for.
pub const UDP_SWEEP: Duration = Duration::from_secs(1);

/// How often side B resolves a `udp://` target given by name again.
pub const UDP_RESOLVE_EVERY: Duration = Duration::from_secs(30);

/// Local callers one listener attests at once (each reads `/proc`); more
/// wait their turn, so a flood of connections on one box costs the agent
/// a bounded share of the machine.
pub const MAX_ATTESTING: usize = 8;

/// How soon side B tries again a target name that did not resolve.
pub const UDP_RESOLVE_RETRY: Duration = Duration::from_secs(5);
