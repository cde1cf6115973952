//! What the links of one relay group share with their flows: how many
//! flows they carry (their lane is up while there are some) and where
//! those flows run.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::Handle;
use tokio::sync::Notify;

/// Where a link with a lane runs: the lane's connection, and its flows
/// while they ride it, on the lane's runtime (thread `comsat-lane`); the
/// main connection and bulk flows on the main one.
#[derive(Clone)]
pub(crate) struct Runtimes {
    pub(crate) lane: Handle,
    pub(crate) main: Handle,
}

/// How many flows a group's links carry.
#[derive(Default)]
pub(crate) struct Busy {
    flows: AtomicUsize,
    changed: Notify,
}

impl Busy {
    /// Counts a flow until the guard drops.
    pub(crate) fn enter(self: &Arc<Self>) -> BusyGuard {
        self.flows.fetch_add(1, Ordering::Relaxed);
        self.changed.notify_waiters();
        BusyGuard(self.clone())
    }

    pub(crate) fn flows(&self) -> usize {
        self.flows.load(Ordering::Relaxed)
    }

    /// Returns once the group carries a flow.
    pub(crate) async fn wait_busy(&self) {
        loop {
            let changed = self.changed.notified();
            if self.flows() > 0 {
                return;
            }
            changed.await;
        }
    }
}

/// One flow counted in its group's [`Busy`].
pub(crate) struct BusyGuard(Arc<Busy>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.flows.fetch_sub(1, Ordering::Relaxed);
        self.0.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_lane_waits_for_the_first_flow_and_counts_them_to_zero() {
        let busy = Arc::new(Busy::default());
        let waiting = tokio::spawn({
            let busy = busy.clone();
            async move { busy.wait_busy().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "no flow yet");
        let one = busy.enter();
        let two = busy.enter();
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the first flow wakes the lane")
            .expect("task");
        assert_eq!(busy.flows(), 2);
        drop(one);
        assert_eq!(busy.flows(), 1);
        drop(two);
        assert_eq!(busy.flows(), 0);
        // Busy again: returns at once.
        let _three = busy.enter();
        tokio::time::timeout(Duration::from_secs(5), busy.wait_busy())
            .await
            .expect("a busy group does not wait");
    }
}
