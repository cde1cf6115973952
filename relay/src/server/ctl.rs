//! One agent's control queue: the messages the relay has yet to write on
//! the agent's control stream. It is bounded in messages
//! ([`defaults::CONTROL_QUEUE`]) and in bytes
//! ([`defaults::CONTROL_QUEUE_BYTES`]), and what all queues hold counts
//! against the relay's `buffer_budget` together with the parked flows: an
//! agent that stops reading (a slow peer, or one that means harm) makes
//! its own queue fill, never the relay's memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use comsat_protocol::msg::{ControlMessage, RelayToAgent};
use tokio::sync::mpsc;

use crate::defaults;

/// The sending half: cloned wherever the relay tells the agent something.
/// Messages are queued encoded (as frames), so what is counted is what is
/// held, and each is encoded once.
#[derive(Clone, Debug)]
pub(super) struct Ctl {
    tx: mpsc::Sender<(Vec<u8>, u64)>,
    counts: Counts,
}

/// The writer's half.
pub(super) struct CtlRx {
    rx: mpsc::Receiver<(Vec<u8>, u64)>,
    counts: Counts,
}

/// Bytes queued on this connection, and on every connection.
#[derive(Clone, Debug)]
struct Counts {
    mine: Arc<AtomicU64>,
    all: Arc<AtomicU64>,
}

impl Counts {
    fn release(&self, n: u64) {
        self.mine.fetch_sub(n, Ordering::Relaxed);
        self.all.fetch_sub(n, Ordering::Relaxed);
    }
}

/// A new queue; `all` counts the bytes in every queue of the relay.
pub(super) fn channel(all: Arc<AtomicU64>) -> (Ctl, CtlRx) {
    let (tx, rx) = mpsc::channel(defaults::CONTROL_QUEUE);
    let counts = Counts {
        mine: Arc::default(),
        all,
    };
    (
        Ctl {
            tx,
            counts: counts.clone(),
        },
        CtlRx { rx, counts },
    )
}

/// Why a message was not queued: the agent does not read its control
/// stream fast enough.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Full;

impl Ctl {
    /// Queues `msg` if this queue has room for it in messages and bytes,
    /// and the relay in `room` (its budget less the parked flows' bytes)
    /// for what every queue holds. A queue that holds nothing always
    /// takes one message, so a budget that others filled never cuts an
    /// agent off that reads its stream.
    pub(super) fn try_send(&self, msg: RelayToAgent, room: u64) -> Result<(), Full> {
        let mut frame = Vec::new();
        if let Err(e) = msg.write_to(&mut frame) {
            // Never for what the relay sends (peer frames it forwards were
            // decoded within the same bound): dropped, as the writer would.
            tracing::debug!(error = %e, "control message not encoded; dropped");
            return Ok(());
        }
        let size = (frame.len() as u64).saturating_add(defaults::CONTROL_MESSAGE_OVERHEAD);
        let mine = self.counts.mine.load(Ordering::Relaxed);
        if mine.saturating_add(size) > defaults::CONTROL_QUEUE_BYTES {
            return Err(Full);
        }
        if mine > 0 && self.counts.all.load(Ordering::Relaxed).saturating_add(size) > room {
            return Err(Full);
        }
        self.counts.mine.fetch_add(size, Ordering::Relaxed);
        self.counts.all.fetch_add(size, Ordering::Relaxed);
        self.tx.try_send((frame, size)).map_err(|_| {
            self.counts.release(size);
            Full
        })
    }
}

impl CtlRx {
    /// The next message's frame, waiting for one; `None` once every
    /// sender is gone.
    pub(super) async fn recv(&mut self) -> Option<Vec<u8>> {
        let (frame, size) = self.rx.recv().await?;
        self.counts.release(size);
        Some(frame)
    }

    /// The next message's frame if one is queued.
    pub(super) fn try_recv(&mut self) -> Option<Vec<u8>> {
        let (frame, size) = self.rx.try_recv().ok()?;
        self.counts.release(size);
        Some(frame)
    }
}

impl Drop for CtlRx {
    fn drop(&mut self) {
        // What was never written is no longer held.
        self.rx.close();
        while let Ok((_, size)) = self.rx.try_recv() {
            self.counts.release(size);
        }
    }
}

#[cfg(test)]
mod tests {
    use comsat_protocol::LinkId;
    use comsat_protocol::msg::PeerFrame;

    use super::*;

    fn frame(len: usize) -> RelayToAgent {
        RelayToAgent::Peer {
            link_id: LinkId([1; 16]),
            frame: PeerFrame::Handshake(vec![0; len]),
        }
    }

    #[tokio::test]
    async fn queued_bytes_count_for_the_relay_until_written_or_dropped() {
        let all = Arc::new(AtomicU64::new(0));
        let (ctl, mut rx) = channel(all.clone());
        ctl.try_send(frame(1000), u64::MAX).expect("room");
        ctl.try_send(frame(1000), u64::MAX).expect("room");
        let held = all.load(Ordering::Relaxed);
        assert!(held > 2000, "{held}");
        assert!(rx.recv().await.is_some());
        assert!(all.load(Ordering::Relaxed) < held);
        drop(rx);
        assert_eq!(
            all.load(Ordering::Relaxed),
            0,
            "a dropped queue holds nothing"
        );
    }

    #[test]
    fn one_queue_cannot_pass_its_byte_bound() {
        let all = Arc::new(AtomicU64::new(0));
        let (ctl, _rx) = channel(all.clone());
        let big = 15 * 1024;
        let mut queued = 0;
        while ctl.try_send(frame(big), u64::MAX).is_ok() {
            queued += 1;
        }
        let bound = defaults::CONTROL_QUEUE_BYTES;
        assert!(queued >= bound / (big as u64 + 200), "{queued} fit");
        assert!(all.load(Ordering::Relaxed) <= bound);
    }

    #[test]
    fn the_relay_budget_bounds_every_queue_together_but_never_an_empty_one() {
        let all = Arc::new(AtomicU64::new(0));
        let (greedy, _g) = channel(all.clone());
        let (other, _o) = channel(all.clone());
        let room = 10_000;
        while greedy.try_send(frame(500), room).is_ok() {}
        assert!(all.load(Ordering::Relaxed) <= room + 1000);
        // Another agent still gets its first message, never a second.
        other.try_send(frame(500), room).expect("an empty queue");
        assert_eq!(other.try_send(frame(500), room), Err(Full));
    }
}
