//! Who called, what they did, and what they were refused.
//!
//! Every change made through the API and every refused authentication is
//! an audit record ([`comsat_protocol::api::AuditRecord`]) with the real
//! reason; the caller of a refused request only ever hears "unauthorized"
//! (or "join token refused"), so a prober learns nothing from the answer.
//! Records name tokens by id and never hold a secret, and hold text from
//! the network with its control characters escaped.
//!
//! Hostile callers are slowed per source (an IPv4 address, or an IPv6 /64,
//! which one machine usually holds whole): enrolment attempts and failed
//! authentications each draw from a token bucket per source (the table of
//! sources is bounded); an empty bucket answers 429, and is
//! recorded once each time it runs dry, so a flood cannot flood the log.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::HeaderMap;
use axum::http::request::Parts;
use comsat_protocol::api::AuditRecord;
use comsat_protocol::text::printable;

use crate::state::Shared;

/// The caller of a request: its headers and address.
pub(crate) struct Caller {
    pub(crate) headers: HeaderMap,
    pub(crate) method: axum::http::Method,
    pub(crate) addr: Option<SocketAddr>,
    /// The request path (at most [`MAX_PATH_RECORDED`] bytes of it).
    pub(crate) path: String,
}

/// Longest request path recorded.
const MAX_PATH_RECORDED: usize = 200;

impl Caller {
    pub(crate) fn source(&self) -> Option<String> {
        self.addr.map(|a| a.to_string())
    }

    pub(crate) fn ip(&self) -> Option<IpAddr> {
        self.addr.map(|a| a.ip())
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let path = parts.uri.path();
        let mut end = path.len().min(MAX_PATH_RECORDED);
        while !path.is_char_boundary(end) {
            end -= 1;
        }
        Ok(Self {
            path: path[..end].to_owned(),
            headers: parts.headers.clone(),
            method: parts.method.clone(),
            addr: parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0),
        })
    }
}

/// The outcome of an audited action.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Ok,
    Denied,
    /// Something a node reported that an operator should look at.
    Alarm,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Denied => "denied",
            Self::Alarm => "alarm",
        }
    }
}

impl Shared {
    /// Appends an audit record; a failure to write it is logged (the
    /// request's answer does not depend on it).
    pub(crate) async fn audit(
        &self,
        caller: &Caller,
        subject: &str,
        action: &str,
        resource: &str,
        outcome: Outcome,
        reason: Option<&str>,
    ) {
        // What a peer sent (a JWT header, a name) may hold control
        // characters: stored escaped, so no reader of the log sees them raw.
        if outcome == Outcome::Denied {
            metrics::counter!(crate::http::health::REFUSALS_TOTAL, "action" => printable(action).into_owned())
                .increment(1);
        }
        let clean = |s: &str| printable(s).into_owned();
        let record = AuditRecord {
            at_ms: now_ms(),
            subject: clean(subject),
            action: clean(action),
            resource: clean(resource),
            result: outcome.as_str().to_owned(),
            reason: reason.map(clean),
            source: caller.source(),
        };
        if let Err(e) = self.store.append_audit(&record).await {
            tracing::error!(error = %e, action, resource, "cannot write an audit record");
        }
    }
}

/// Unix time in milliseconds.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Most addresses a [`SourceLimiter`] remembers; when full, the ones whose
/// bucket is full again are forgotten first, then the oldest.
const MAX_SOURCES: usize = 10_000;

/// A token bucket per source address.
pub(crate) struct SourceLimiter {
    burst: f64,
    per_sec: f64,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
    /// Whether running dry was already reported.
    reported: bool,
}

/// What a [`SourceLimiter`] says about one more attempt.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Allowed,
    /// Refused; `first` when the bucket just ran dry (worth one record).
    Limited {
        first: bool,
    },
}

impl SourceLimiter {
    /// `burst` attempts at once, refilled at `per_sec`.
    pub(crate) fn new(burst: u32, per_sec: f64) -> Self {
        Self {
            burst: f64::from(burst),
            per_sec,
            buckets: Mutex::default(),
        }
    }

    fn refill(&self, b: &mut Bucket, now: Instant) {
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.per_sec).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.reported = false;
        }
    }

    /// Takes one attempt for `ip` (no address: never limited).
    pub(crate) fn take(&self, ip: Option<IpAddr>) -> Verdict {
        self.take_at(ip, Instant::now())
    }

    fn take_at(&self, ip: Option<IpAddr>, now: Instant) -> Verdict {
        let Some(ip) = ip.map(comsat_protocol::endpoint::source_of) else {
            return Verdict::Allowed;
        };
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !buckets.contains_key(&ip) && buckets.len() >= MAX_SOURCES {
            self.evict(&mut buckets, now);
        }
        let b = buckets.entry(ip).or_insert(Bucket {
            tokens: self.burst,
            at: now,
            reported: false,
        });
        self.refill(b, now);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Verdict::Allowed;
        }
        let first = !b.reported;
        b.reported = true;
        Verdict::Limited { first }
    }

    /// Whether `ip` has attempts left, without taking one.
    pub(crate) fn exhausted(&self, ip: Option<IpAddr>) -> bool {
        let Some(ip) = ip.map(comsat_protocol::endpoint::source_of) else {
            return false;
        };
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match buckets.get_mut(&ip) {
            Some(b) => {
                self.refill(b, Instant::now());
                b.tokens < 1.0
            }
            None => false,
        }
    }

    fn evict(&self, buckets: &mut HashMap<IpAddr, Bucket>, now: Instant) {
        let full = self.burst;
        let per_sec = self.per_sec;
        buckets.retain(|_, b| {
            let t = b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * per_sec;
            t < full
        });
        if buckets.len() >= MAX_SOURCES
            && let Some(oldest) = buckets.iter().min_by_key(|(_, b)| b.at).map(|(ip, _)| *ip)
        {
            buckets.remove(&oldest);
        }
    }
}

/// Enrolment attempts per source: 20 at once, then one every 3 s.
pub(crate) fn enrol_limiter() -> SourceLimiter {
    SourceLimiter::new(20, 1.0 / 3.0)
}

/// Failed authentications per source: `burst` at once (the controller's
/// `auth_failures_per_source`), then one a second. While a source has none
/// left, even a correct credential is refused.
pub(crate) fn auth_failure_limiter(burst: u32) -> SourceLimiter {
    SourceLimiter::new(burst, 1.0)
}

/// How long a limited caller is told to wait.
pub(crate) const RETRY_AFTER: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_gets_its_burst_then_is_limited_and_reported_once() {
        let l = SourceLimiter::new(3, 1.0);
        let ip = Some(IpAddr::from([10, 0, 0, 1]));
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(l.take_at(ip, t0), Verdict::Allowed);
        }
        assert_eq!(l.take_at(ip, t0), Verdict::Limited { first: true });
        assert_eq!(l.take_at(ip, t0), Verdict::Limited { first: false });
        // Another source is not affected.
        assert_eq!(
            l.take_at(Some(IpAddr::from([10, 0, 0, 2])), t0),
            Verdict::Allowed
        );
        // Refilled at the rate.
        let t1 = t0 + Duration::from_millis(1100);
        assert_eq!(l.take_at(ip, t1), Verdict::Allowed);
        assert_eq!(l.take_at(ip, t1), Verdict::Limited { first: true });
        assert_eq!(l.take_at(None, t1), Verdict::Allowed);
    }

    #[test]
    fn an_ipv6_64_is_one_source() {
        let l = SourceLimiter::new(2, 0.001);
        let t0 = Instant::now();
        let ip = |s: &str| Some(s.parse::<IpAddr>().expect("ip"));
        assert_eq!(l.take_at(ip("2001:db8:0:1::1"), t0), Verdict::Allowed);
        assert_eq!(l.take_at(ip("2001:db8:0:1::2"), t0), Verdict::Allowed);
        assert_eq!(
            l.take_at(ip("2001:db8:0:1:ffff::3"), t0),
            Verdict::Limited { first: true },
            "every address of the /64 draws from one bucket"
        );
        assert_eq!(l.take_at(ip("2001:db8:0:2::1"), t0), Verdict::Allowed);
    }

    #[test]
    fn the_table_of_sources_stays_bounded() {
        let l = SourceLimiter::new(2, 0.001);
        let t0 = Instant::now();
        for i in 0..(MAX_SOURCES as u32 + 500) {
            let ip = Some(IpAddr::from(i.to_be_bytes()));
            let _ = l.take_at(ip, t0);
        }
        let n = l.buckets.lock().expect("lock").len();
        assert!(n <= MAX_SOURCES, "{n} sources remembered");
    }
}
