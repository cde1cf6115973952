//! Draining: refuse new attaches, send every agent on, and wait for the
//! links to leave.

use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{State, Stop};

/// Tells every agent to move on and waits until no link is attached here,
/// `grace` has passed, or a second stop asks for now.
pub(super) async fn drain(state: &State, grace: Duration, stop: &mut mpsc::Receiver<Stop>) {
    let started = tokio::time::Instant::now();
    let attached = state.links().table.drain();
    info!(
        links = attached,
        grace_secs = grace.as_secs_f64(),
        "draining: refusing new attaches and asking every agent to move to its next relay"
    );
    state.draining.send_replace(true);
    state.metrics.draining.set(1.0);
    let deadline = started + grace;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        let (left, drained) = {
            let links = state.links();
            (links.table.len(), links.table.is_drained())
        };
        if drained {
            info!(
                after_secs = started.elapsed().as_secs_f64(),
                "drained: every link has moved"
            );
            return;
        }
        tokio::select! {
            _ = tick.tick() => {}
            () = tokio::time::sleep_until(deadline) => {
                warn!(links = left, grace_secs = grace.as_secs_f64(), "drain grace over with links still attached; closing them");
                return;
            }
            again = stop.recv() => {
                if matches!(again, Some(Stop::Now) | None) {
                    warn!(links = left, "stop requested during drain; closing now");
                    return;
                }
            }
        }
    }
}
