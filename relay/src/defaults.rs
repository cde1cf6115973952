//! Default values of the relay configuration, with the reason for each and
//! what it costs.

use std::time::Duration;

/// Time an agent has from the first packet to a verified `Hello`. Long
/// enough for a slow edge link, short enough that idle half-open
/// connections do not pile up.
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(5);

/// Time from the end of the QUIC handshake to a verified `Hello`: an agent
/// sends it at once, so a peer silent this long gives back its place.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(2);

/// Unauthenticated connections from one source (an IPv4 address or an
/// IPv6 /64) at once: one source cannot take all of
/// [`MAX_UNAUTHENTICATED`].
pub const MAX_UNAUTHENTICATED_PER_SOURCE: usize = 32;

/// Unauthenticated connections at which a new connection must first prove
/// its source address with a QUIC Retry (one round trip): a flood of
/// Initials from spoofed addresses then costs the relay one stateless
/// packet each, and no connection state.
pub const RETRY_ABOVE: usize = 64;

/// QUIC connection receive window until a connection's `Hello` is
/// verified, and the one stream it may open (its control stream): what a
/// stranger can make the relay buffer. Raised to the configured windows
/// and stream credit once the agent is known.
pub const PRE_HELLO_WINDOW: u32 = 64 * 1024;

/// Bytes of datagrams a connection holds each way, received and not yet
/// forwarded, or waiting to be sent (beyond, the oldest are dropped): a
/// few milliseconds of a busy UDP flow, and all a stranger's datagrams
/// can take before its `Hello` (nothing reads them until then).
pub const DATAGRAM_BUFFER: usize = 64 * 1024;

/// Connections that have not yet authenticated, at once. Each costs a QUIC
/// connection state (a few KiB) plus its receive windows until it is
/// refused; beyond this, new connections wait for a place
/// ([`ACCEPT_WAIT`], [`MAX_WAITING`]), then are refused.
pub const MAX_UNAUTHENTICATED: usize = 256;

/// Authenticated connections of one node key at once: an agent holds one
/// per relay, its lane, and one per named connection.
pub const MAX_CONNECTIONS_PER_NODE: usize = 16;

/// Authenticated agent connections at once.
pub const MAX_CONNECTIONS: usize = 10_000;

/// QUIC connection receive window: the most one agent connection can make
/// the relay buffer across all its streams (16 MiB worst case per busy
/// connection; idle connections hold nothing).
pub const CONNECTION_RECEIVE_WINDOW: u32 = 16 * 1024 * 1024;

/// QUIC per-stream receive window: one flow direction's bytes in flight at
/// the relay. 2 MiB fills a 1 Gbit/s path with 16 ms RTT.
pub const STREAM_RECEIVE_WINDOW: u32 = 2 * 1024 * 1024;

/// QUIC send window per connection.
pub const SEND_WINDOW: u64 = 16 * 1024 * 1024;

/// Concurrent flows (bidirectional streams) one agent may open to the
/// relay, besides its control stream.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 1024;

/// Flow streams an agent may open at first; the relay doubles the credit
/// (up to `max_streams_per_connection`) as the agent uses three quarters
/// of it. QUIC keeps a slot for every stream it allows, so an idle agent
/// costs little and a busy one gets what it uses.
pub const INITIAL_STREAMS_PER_CONNECTION: u32 = 32;

/// A connection silent for this long is dead. The agents keep their idle
/// connections alive (every 25 s by default: they are the ones behind
/// NATs); the relay sends no keep-alives of its own, which would double
/// an idle agent's traffic and wake it more often. The agents notice a
/// dead relay with a watchdog, within about a second under traffic.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Under this idle timeout an idle agent that keeps alive every 25 s (the
/// agents' default) is cut off between its keep-alives: the relay warns.
pub const WARN_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// How often the relay looks for grants whose `not_after` has come: a
/// link ends within this much of its expiry (grants expire at whole
/// seconds).
pub const EXPIRY_CHECK: Duration = Duration::from_millis(100);

/// How often the grant directory is checked for changes.
pub const GRANT_POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Control messages queued for one agent before it is deemed stuck and
/// disconnected (each is at most 16 KiB, usually under 100 bytes; the queue
/// allocates as it fills). An agent attaching N links at once is sent about
/// 2N messages (attached, peer present), so this bounds the links one agent
/// can attach in one burst to a few thousand.
pub const CONTROL_QUEUE: usize = 8192;

/// Bytes queued for one agent's control stream before it is deemed stuck
/// (see [`CONTROL_QUEUE`]); what all agents' queues hold counts against
/// `limits.buffer_budget` as well. 1 MiB holds a burst of 8,192 small
/// messages, or 64 of the largest.
pub const CONTROL_QUEUE_BYTES: u64 = 1024 * 1024;

/// Shortest interval between two stateless resets (quinn's default is
/// 20 ms: 50 a second). A restarted relay resets its previous connections
/// as their keep-alives arrive, and a fleet sends thousands a second then:
/// at 50 a second most agents would wait for their idle timeout instead. A
/// reset is always smaller than the packet that caused it, so a faster
/// rate amplifies nothing; it stays bounded (20,000 a second) against
/// reflection loops with other UDP services.
pub const MIN_RESET_INTERVAL: Duration = Duration::from_micros(50);

/// Longest a new connection waits for a place among the unauthenticated
/// ones (all [`MAX_UNAUTHENTICATED`] taken) before it is refused: below an
/// agent's connect timeout (4 s), so a fleet reconnecting at once is let in
/// as places free up instead of being refused and coming back.
pub const ACCEPT_WAIT: Duration = Duration::from_secs(3);

/// New connections that wait for such a place at most; more are refused
/// at once. Each waits as its first packet and quinn's state for it (a few
/// KiB: 4,096 hold about 12 MiB).
pub const MAX_WAITING: usize = 4_096;

/// Bytes quinn buffers for one new connection not yet taken (what arrives
/// beyond its first packet while it waits: a client's resent Initials).
pub const INCOMING_BUFFER: u64 = 16 * 1024;

/// Bytes quinn buffers for all new connections not yet taken together.
pub const INCOMING_BUFFER_TOTAL: u64 = 4 * 1024 * 1024;

/// Clone alarms kept for the controller between heartbeats; more are
/// counted as dropped (the metric and the log still have every one).
pub const MAX_CLONE_ALARMS: usize = 256;

/// Bytes a queued control message is counted beyond its encoding (its
/// place in the queue and its allocation).
pub const CONTROL_MESSAGE_OVERHEAD: u64 = 64;

/// Time a new flow stream has to deliver its header.
pub const FLOW_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest chunk read from a stream at once when splicing.
pub const SPLICE_CHUNK: usize = 64 * 1024;

/// Stream chunks (one per QUIC STREAM frame, at most a datagram each)
/// joined into one forwarded chunk when several are waiting. quinn looks
/// up outgoing data by scanning the unacknowledged chunks of a stream, so
/// forwarding datagram-sized pieces made that scan cost a fifth of the
/// relay's CPU; 32 frames of ~1.4 KB make chunks of up to ~45 KB. Costs
/// one copy of what is joined, and 32 empty handles (1 KiB) per flow
/// direction once it has carried bytes.
pub const SPLICE_JOIN_FRAMES: usize = 32;

/// Bytes the relay holds for parked flows (whose peer is away), all links
/// together; each link is further limited by its grant's `buffer_limit`.
pub const BUFFER_BUDGET: u64 = 256 * 1024 * 1024;

/// How often a parked flow that hit a buffer limit checks for room again.
pub const PARK_RECHECK: Duration = Duration::from_millis(100);

/// Links (granted links with a side attached) one relay serves at once.
/// Each costs a few hundred bytes while idle.
pub const MAX_LINKS: usize = 100_000;

/// Links with `/metrics` series of their own; the others are summed under
/// `link="_other"`, so a scrape stays small however many links there are.
pub const METRICS_MAX_LINKS: usize = 100;

/// What a rate-limited link that was idle may send at once: this long at
/// its rate. Short, so a limit is felt within a fraction of a second.
pub const THROTTLE_BURST: Duration = Duration::from_millis(100);

/// How long a draining relay waits for its links to move before it exits
/// anyway. Above the agents' reconnect time, well under systemd's default
/// `TimeoutStopSec` of 90 s.
pub const DRAIN_GRACE: Duration = Duration::from_secs(30);

/// Niceness the main threads take above the process's own while the relay
/// has an interactive listener ([`crate::RelayConfig::bulk_nice`]).
pub const BULK_NICE: u8 = 5;
