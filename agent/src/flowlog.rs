//! The flow log: a line per flow when it ends (its caller, relay, bytes
//! each way and outcome), and the same records queued, bounded, for
//! whoever reports them to the controller ([`crate::Agent::flow_records`]).
//! Recording never waits: a full queue drops its oldest record and counts
//! it.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use comsat_protocol::api::FlowRecord;
use tracing::info;

use crate::sync::lock;

/// Most records queued for the controller.
pub(crate) const MAX_QUEUED: usize = 10_000;

/// The agent's flow records, until taken.
#[derive(Debug, Default)]
pub(crate) struct FlowLog {
    queue: Mutex<VecDeque<FlowRecord>>,
    dropped: AtomicU64,
}

/// Now, in milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl FlowLog {
    /// Logs a flow of link `link` that ended, and queues its record.
    pub(crate) fn record(&self, link: &str, r: FlowRecord) {
        info!(
            link,
            flow = r.flow_id,
            side = %r.side,
            caller_id = r.caller_id.as_deref().unwrap_or("-"),
            caller = %r.caller.join(" "),
            relay = %r.relay_id.map_or_else(|| "-".to_owned(), |id| id.to_string()),
            bytes_sent = r.bytes_sent,
            bytes_received = r.bytes_received,
            ms = r.ended_ms.saturating_sub(r.started_ms),
            outcome = %r.outcome,
            "flow ended"
        );
        let mut queue = lock(&self.queue);
        if queue.len() >= MAX_QUEUED {
            queue.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        queue.push_back(r);
    }

    /// Takes up to `max` records, oldest first, and how many were dropped
    /// since the last take.
    pub(crate) fn take(&self, max: usize) -> (Vec<FlowRecord>, u64) {
        let mut queue = lock(&self.queue);
        let n = max.min(queue.len());
        let taken = queue.drain(..n).collect();
        (taken, self.dropped.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use comsat_protocol::api::FlowOutcome;
    use comsat_protocol::{LinkId, Side};

    use super::*;

    fn record(flow_id: u32) -> FlowRecord {
        FlowRecord {
            link_id: LinkId([1; 16]),
            flow_id,
            side: Side::A,
            caller_id: None,
            caller: vec![],
            relay_id: None,
            started_ms: 1,
            ended_ms: 2,
            bytes_sent: 0,
            bytes_received: 0,
            outcome: FlowOutcome::Completed,
        }
    }

    #[test]
    fn a_full_queue_drops_its_oldest_and_counts_them() {
        let log = FlowLog::default();
        for n in 0..(MAX_QUEUED as u32 + 5) {
            log.record("l", record(n));
        }
        let (taken, dropped) = log.take(3);
        assert_eq!(dropped, 5);
        assert_eq!(
            taken.iter().map(|r| r.flow_id).collect::<Vec<_>>(),
            [5, 6, 7]
        );
        let (rest, dropped) = log.take(usize::MAX);
        assert_eq!((rest.len(), dropped), (MAX_QUEUED - 3, 0));
    }
}
