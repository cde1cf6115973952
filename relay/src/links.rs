//! Per-link accounting and the rate limiter that enforces a grant's
//! `rate_bytes_per_sec`.
//!
//! Every granted link gets a [`LinkStats`] the first time it is used: bytes
//! per direction, open flows, buffered bytes, time spent throttled and
//! refusals. They are rendered on `/metrics` next to the relay-wide series,
//! with bounded cardinality: at most `limits.metrics_max_links` links get
//! series of their own (the first ones to carry traffic keep their place
//! while their grant lasts); all other links are summed under
//! `link="_other"`. A link's series go away with its grant.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use comsat_protocol::grant::Grant;
use comsat_protocol::{FlowId, LinkId, Side};
use tokio::time::Instant;

use crate::defaults;

/// Open streams per flow id of a link: a flow counts once, however many
/// streams (resumptions) carry it.
pub(crate) type FlowCounts = Arc<Mutex<HashMap<FlowId, u32>>>;

/// Locks `m`, going on with the data of a thread that panicked holding it
/// (every critical section here leaves the data consistent).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A byte-rate limiter (GCRA, the "virtual scheduling" form of a token
/// bucket) shared by every flow of one link direction. The relay asks it
/// before forwarding each chunk and sleeps for the answer; while it sleeps
/// it reads nothing more, so QUIC flow control slows the sender down and
/// nothing is dropped.
#[derive(Debug, Default)]
pub(crate) struct Throttle {
    /// Bytes per second; 0 means unlimited.
    rate: AtomicU64,
    /// When the bytes let through so far would have finished at `rate`.
    tat: Mutex<Option<Instant>>,
}

impl Throttle {
    /// Sets the rate (`None`: unlimited). Takes effect for the next chunk.
    pub(crate) fn set_rate(&self, rate: Option<u64>) {
        self.rate.store(rate.unwrap_or(0), Ordering::Relaxed);
    }

    /// The current rate, if limited.
    pub(crate) fn rate(&self) -> Option<u64> {
        Some(self.rate.load(Ordering::Relaxed)).filter(|r| *r > 0)
    }

    /// The largest chunk worth reading at once: a sixteenth of a second of
    /// the rate (so a slow link moves smoothly), at least 1 KiB.
    pub(crate) fn chunk(&self) -> usize {
        match self.rate() {
            None => defaults::SPLICE_CHUNK,
            Some(r) => (r / 16).clamp(1024, defaults::SPLICE_CHUNK as u64) as usize,
        }
    }

    /// Whether `n` bytes read at `now` may go on at once (and are then
    /// counted against the rate): what cannot wait, a datagram, is
    /// dropped instead, without using up the rate.
    pub(crate) fn admit(&self, n: usize, now: Instant) -> bool {
        let Some(rate) = self.rate() else {
            return true;
        };
        let mut tat = lock(&self.tat);
        let start = tat.map_or(now, |t| t.max(now));
        if start > now + defaults::THROTTLE_BURST {
            return false;
        }
        *tat = Some(start + Duration::from_secs_f64(n as f64 / rate as f64));
        true
    }

    /// How long to wait before forwarding `n` bytes read at `now`. A link
    /// that was idle may send `THROTTLE_BURST` worth of its rate at once.
    pub(crate) fn delay(&self, n: usize, now: Instant) -> Duration {
        let Some(rate) = self.rate() else {
            return Duration::ZERO;
        };
        let cost = Duration::from_secs_f64(n as f64 / rate as f64);
        let mut tat = lock(&self.tat);
        let start = tat.map_or(now, |t| t.max(now));
        let wait = start.saturating_duration_since(now + defaults::THROTTLE_BURST);
        *tat = Some(start + cost);
        wait
    }
}

/// What the relay counts for one link.
#[derive(Debug, Default)]
pub(crate) struct LinkStats {
    /// Bytes forwarded, indexed by the sending side (0: A to B, 1: B to A).
    bytes: [AtomicU64; 2],
    /// Rate limiters, indexed like `bytes`.
    throttle: [Throttle; 2],
    /// Nanoseconds flows of the link waited for their rate limit.
    throttled_ns: AtomicU64,
    /// Bytes held for the link's parked flows.
    pub(crate) buffered: AtomicU64,
    /// The link's open flows.
    pub(crate) flows: FlowCounts,
    /// New flows refused because `max_flows` were open.
    refused_max_flows: AtomicU64,
    /// Attaches refused although the link is granted (wrong node or
    /// generation, relay draining or full).
    refused_attach: AtomicU64,
}

fn index(from: Side) -> usize {
    match from {
        Side::A => 0,
        Side::B => 1,
    }
}

impl LinkStats {
    /// Counts `n` bytes sent by side `from`.
    pub(crate) fn add_bytes(&self, from: Side, n: u64) {
        self.bytes[index(from)].fetch_add(n, Ordering::Relaxed);
    }

    /// The limiter of the direction sent by `from`.
    pub(crate) fn throttle(&self, from: Side) -> &Throttle {
        &self.throttle[index(from)]
    }

    /// Counts time spent waiting for the rate limit.
    pub(crate) fn add_throttled(&self, d: Duration) {
        self.throttled_ns
            .fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Counts a flow refused over `max_flows`.
    pub(crate) fn refused_max_flows(&self) {
        self.refused_max_flows.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a refused attach.
    pub(crate) fn refused_attach(&self) {
        self.refused_attach.fetch_add(1, Ordering::Relaxed);
    }

    fn set_limits(&self, grant: &Grant) {
        for t in &self.throttle {
            t.set_rate(grant.limits.rate_bytes_per_sec);
        }
    }

    fn snapshot(&self) -> Sample {
        Sample {
            bytes: [
                self.bytes[0].load(Ordering::Relaxed),
                self.bytes[1].load(Ordering::Relaxed),
            ],
            flows_open: lock(&self.flows).len() as u64,
            buffered: self.buffered.load(Ordering::Relaxed),
            throttled_ns: self.throttled_ns.load(Ordering::Relaxed),
            refused_max_flows: self.refused_max_flows.load(Ordering::Relaxed),
            refused_attach: self.refused_attach.load(Ordering::Relaxed),
            rate: self.throttle[0].rate().unwrap_or(0),
        }
    }

    fn is_used(&self) -> bool {
        let s = self.snapshot();
        s.bytes != [0, 0] || s.flows_open > 0 || s.refused_max_flows > 0 || s.refused_attach > 0
    }
}

#[derive(Default, Clone, Copy)]
struct Sample {
    bytes: [u64; 2],
    flows_open: u64,
    buffered: u64,
    throttled_ns: u64,
    refused_max_flows: u64,
    refused_attach: u64,
    /// The rate limit in force (0: none); not summed.
    rate: u64,
}

impl Sample {
    fn add(&mut self, o: &Self) {
        self.bytes[0] += o.bytes[0];
        self.bytes[1] += o.bytes[1];
        self.flows_open += o.flows_open;
        self.buffered += o.buffered;
        self.throttled_ns += o.throttled_ns;
        self.refused_max_flows += o.refused_max_flows;
        self.refused_attach += o.refused_attach;
    }
}

/// What the traffic reports have said: each link's counters at its last
/// report, and where a report cut short by its bound stopped.
#[derive(Debug, Default)]
pub(crate) struct TrafficSeen {
    last: HashMap<LinkId, [u64; 2]>,
    stopped_after: Option<LinkId>,
}

/// The stats of every granted link, and which links have series of their
/// own on `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct LinkTable {
    stats: Mutex<HashMap<LinkId, Arc<LinkStats>>>,
    reported: Mutex<BTreeSet<LinkId>>,
}

impl LinkTable {
    /// The stats of a granted link, created with the grant's limits.
    pub(crate) fn get(&self, grant: &Grant) -> Arc<LinkStats> {
        lock(&self.stats)
            .entry(grant.link_id)
            .or_insert_with(|| {
                let s = LinkStats::default();
                s.set_limits(grant);
                Arc::new(s)
            })
            .clone()
    }

    /// After the grants changed: forgets links without a grant and applies
    /// the current grants' limits to the others (open flows included).
    pub(crate) fn sync(&self, grants: &crate::grants::GrantSet) {
        let mut stats = lock(&self.stats);
        stats.retain(|id, s| match grants.link(id) {
            Some(g) => {
                s.set_limits(g);
                true
            }
            None => false,
        });
        lock(&self.reported).retain(|id| stats.contains_key(id));
    }

    /// The counters of the links that moved bytes since the last call
    /// (`seen` remembers what each had then) or hold flows now, at most
    /// `max`, by link id from where the last call stopped (so that with
    /// more links moving than `max`, each gets its turn).
    pub(crate) fn traffic(
        &self,
        seen: &Mutex<TrafficSeen>,
        max: usize,
    ) -> Vec<comsat_protocol::api::LinkTraffic> {
        let mut all: Vec<(LinkId, Sample)> = lock(&self.stats)
            .iter()
            .map(|(id, s)| (*id, s.snapshot()))
            .collect();
        all.sort_by_key(|(id, _)| *id);
        let mut seen = lock(seen);
        let granted: std::collections::HashSet<LinkId> = all.iter().map(|(id, _)| *id).collect();
        seen.last.retain(|id, _| granted.contains(id));
        if let Some(after) = seen.stopped_after.take() {
            let at = all.partition_point(|(id, _)| *id <= after);
            all.rotate_left(at);
        }
        let mut out = Vec::new();
        for (id, s) in all {
            let moved = s.bytes != [0, 0] && seen.last.get(&id) != Some(&s.bytes);
            if !(moved || s.flows_open > 0) {
                continue;
            }
            if out.len() >= max {
                seen.stopped_after = out
                    .last()
                    .map(|t: &comsat_protocol::api::LinkTraffic| t.link_id);
                break;
            }
            seen.last.insert(id, s.bytes);
            out.push(comsat_protocol::api::LinkTraffic {
                link_id: id,
                bytes_a_to_b: s.bytes[0],
                bytes_b_to_a: s.bytes[1],
                flows_open: s.flows_open,
            });
        }
        out
    }

    /// Prometheus text for the per-link series: links with a place of their
    /// own (at most `max_links`, first used first), then `_other`.
    pub(crate) fn render(&self, max_links: usize) -> String {
        let all: Vec<(LinkId, Arc<LinkStats>)> = lock(&self.stats)
            .iter()
            .map(|(id, s)| (*id, s.clone()))
            .collect();
        let mut reported = lock(&self.reported);
        for (id, s) in &all {
            if reported.len() >= max_links {
                break;
            }
            if !reported.contains(id) && s.is_used() {
                reported.insert(*id);
            }
        }
        let mut rows: Vec<(String, Sample)> = Vec::new();
        let mut other = Sample::default();
        let mut by_id: Vec<_> = all.iter().collect();
        by_id.sort_by_key(|(id, _)| *id);
        for (id, s) in by_id {
            let sample = s.snapshot();
            if reported.contains(id) {
                rows.push((hex::encode(id.0), sample));
            } else {
                other.add(&sample);
            }
        }
        drop(reported);
        if !all.is_empty() && rows.len() < all.len() {
            rows.push(("_other".into(), other));
        }
        render_rows(&rows)
    }
}

fn render_rows(rows: &[(String, Sample)]) -> String {
    let mut out = String::new();
    let mut family =
        |name: &str, kind: &str, help: &str, line: &dyn Fn(&str, &Sample, &mut String)| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (link, s) in rows {
                line(link, s, &mut out);
            }
        };
    family(
        "comsat_relay_link_bytes_total",
        "counter",
        "Bytes forwarded per link and direction (a_to_b: sent by side A), counted as they move",
        &|link, s, out| {
            for (dir, n) in [("a_to_b", s.bytes[0]), ("b_to_a", s.bytes[1])] {
                let _ = writeln!(
                    out,
                    "comsat_relay_link_bytes_total{{link=\"{link}\",direction=\"{dir}\"}} {n}"
                );
            }
        },
    );
    family(
        "comsat_relay_link_flows_open",
        "gauge",
        "Open flows per link",
        &|link, s, out| {
            let _ = writeln!(
                out,
                "comsat_relay_link_flows_open{{link=\"{link}\"}} {}",
                s.flows_open
            );
        },
    );
    family(
        "comsat_relay_link_buffered_bytes",
        "gauge",
        "Bytes held for a link's flows while its peer is away",
        &|link, s, out| {
            let _ = writeln!(
                out,
                "comsat_relay_link_buffered_bytes{{link=\"{link}\"}} {}",
                s.buffered
            );
        },
    );
    family(
        "comsat_relay_link_throttled_seconds_total",
        "counter",
        "Time a link's flows waited for its rate limit, summed over flows and directions",
        &|link, s, out| {
            let _ = writeln!(
                out,
                "comsat_relay_link_throttled_seconds_total{{link=\"{link}\"}} {}",
                s.throttled_ns as f64 / 1e9
            );
        },
    );
    family(
        "comsat_relay_link_rate_limit_bytes_per_second",
        "gauge",
        "The rate limit in force per direction (0: none); not reported for _other",
        &|link, s, out| {
            if link != "_other" {
                let _ = writeln!(
                    out,
                    "comsat_relay_link_rate_limit_bytes_per_second{{link=\"{link}\"}} {}",
                    s.rate
                );
            }
        },
    );
    family(
        "comsat_relay_link_refused_total",
        "counter",
        "Refusals per link: max_flows (a new flow over the limit), attach (a refused attach of a granted link)",
        &|link, s, out| {
            for (reason, n) in [
                ("max_flows", s.refused_max_flows),
                ("attach", s.refused_attach),
            ] {
                let _ = writeln!(
                    out,
                    "comsat_relay_link_refused_total{{link=\"{link}\",reason=\"{reason}\"}} {n}"
                );
            }
        },
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unlimited_throttle_never_waits() {
        let t = Throttle::default();
        let now = Instant::now();
        for _ in 0..1000 {
            assert_eq!(t.delay(64 * 1024, now), Duration::ZERO);
        }
        assert_eq!(t.chunk(), defaults::SPLICE_CHUNK);
    }

    #[test]
    fn a_throttle_spaces_bytes_at_its_rate_after_the_burst() {
        let t = Throttle::default();
        t.set_rate(Some(1024 * 1024));
        let now = Instant::now();
        // 4 MiB offered at once: the waits add up to the rate's time less
        // the burst allowance.
        let chunk = t.chunk();
        assert_eq!(chunk, 64 * 1024);
        let mut last = Duration::ZERO;
        for _ in 0..(4 * 1024 * 1024 / chunk) {
            let d = t.delay(chunk, now);
            assert!(d >= last, "waits only grow while the sender is ahead");
            last = d;
        }
        let expected = Duration::from_secs(4) - defaults::THROTTLE_BURST;
        let slack = Duration::from_millis(70);
        assert!(
            last + slack >= expected && last <= expected,
            "last wait {last:?}, expected about {expected:?}"
        );
    }

    #[test]
    fn datagrams_pass_within_the_rate_and_burst_and_drops_cost_nothing() {
        let t = Throttle::default();
        let now = Instant::now();
        assert!((0..1000).all(|_| t.admit(1200, now)), "unlimited");
        t.set_rate(Some(10_000));
        // The burst (100 ms at 10,000 B/s: 1,000 B) and one more go at
        // once; then nothing until the rate has paid for them.
        let passed = (0..100).filter(|_| t.admit(100, now)).count();
        assert_eq!(passed, 11);
        // Refused datagrams used none of the rate: 10 ms later, one more.
        assert!(t.admit(100, now + Duration::from_millis(10)));
        assert!(!t.admit(100, now + Duration::from_millis(10)));
        // Datagrams and stream chunks share the rate.
        let d = t.delay(1000, now + Duration::from_millis(10));
        assert!(d > Duration::ZERO, "{d:?}");
    }

    #[test]
    fn a_rate_change_applies_to_the_next_chunk() {
        let t = Throttle::default();
        t.set_rate(Some(1000));
        assert_eq!(t.chunk(), 1024);
        t.set_rate(None);
        assert_eq!(t.delay(1 << 20, Instant::now()), Duration::ZERO);
    }

    fn grant(id: u8) -> Grant {
        use comsat_protocol::grant::{GrantSide, LinkLimits};
        use comsat_protocol::{NodeId, RelayId, SigningKey};
        let side = GrantSide {
            node_id: NodeId([id; 16]),
            sign_pub: SigningKey::from_seed(&[id; 32]).public(),
        };
        Grant {
            link_id: LinkId([id; 16]),
            generation: 1,
            relays: vec![RelayId([0; 16])],
            side_a: side.clone(),
            side_b: side,
            not_after: u64::MAX,
            buffer_limit: 0,
            limits: LinkLimits::default(),
        }
    }

    #[test]
    fn per_link_series_are_bounded_and_the_rest_is_summed() {
        let table = LinkTable::default();
        for id in 1..=5u8 {
            let s = table.get(&grant(id));
            s.add_bytes(Side::A, u64::from(id) * 100);
        }
        let text = table.render(2);
        let own: BTreeSet<&str> = text
            .lines()
            .filter(|l| l.starts_with("comsat_relay_link_flows_open{"))
            .collect();
        assert_eq!(own.len(), 3, "two links of their own plus _other:\n{text}");
        assert!(text.contains("link=\"_other\""), "{text}");
        let total: u64 = text
            .lines()
            .filter(|l| l.contains("direction=\"a_to_b\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum();
        assert_eq!(total, 1500, "no byte is lost by summing:\n{text}");
        // The links that got a place keep it on the next scrape.
        let again = table.render(2);
        let firsts = |t: &str| -> Vec<String> {
            t.lines()
                .filter(|l| l.starts_with("comsat_relay_link_flows_open{") && !l.contains("_other"))
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(firsts(&text), firsts(&again));
    }

    #[test]
    fn traffic_reports_links_that_moved_since_the_last_report_up_to_a_bound() {
        let table = LinkTable::default();
        let last = Mutex::default();
        table.get(&grant(1));
        for id in 2..=4u8 {
            table.get(&grant(id)).add_bytes(Side::B, u64::from(id));
        }
        let ids = |t: &[comsat_protocol::api::LinkTraffic]| -> Vec<u8> {
            t.iter().map(|x| x.link_id.0[0]).collect()
        };
        // Link 1 moved nothing: not reported. At most 2 at once.
        let first = table.traffic(&last, 2);
        assert_eq!(ids(&first), [2, 3]);
        assert_eq!((first[0].bytes_a_to_b, first[0].bytes_b_to_a), (0, 2));
        // Link 4's turn comes next, before 2 and 3 again (which moved
        // more meanwhile).
        table.get(&grant(2)).add_bytes(Side::A, 1);
        table.get(&grant(3)).add_bytes(Side::A, 1);
        assert_eq!(ids(&table.traffic(&last, 2)), [4, 2]);
        assert_eq!(ids(&table.traffic(&last, 2)), [3]);
        assert!(table.traffic(&last, 2).is_empty());
        table.get(&grant(3)).add_bytes(Side::A, 10);
        let again = table.traffic(&last, 2);
        assert_eq!(ids(&again), [3]);
        assert_eq!((again[0].bytes_a_to_b, again[0].bytes_b_to_a), (11, 3));
    }

    #[test]
    fn unused_links_get_no_series_of_their_own() {
        let table = LinkTable::default();
        table.get(&grant(1));
        let text = table.render(10);
        assert!(!text.contains(&hex::encode([1u8; 16])), "{text}");
        assert!(text.contains("_other"), "{text}");
    }
}
