//! Failover: the relay host under a link vanishes (its process frozen with
//! SIGSTOP: every packet to it is lost, nothing answers, not even a QUIC
//! stateless reset) while a 64-byte ping-pong runs through the link; a
//! second relay is there. The figure is the longest round trip across the
//! failover: the pause an application sees, from the agents noticing the
//! silence to both meeting on the next relay and resuming the flow.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::measure::{Pinger, median};
use crate::path::{Path, link};
use crate::report::figure;
use crate::{FLOOR, Run};

/// Round trips after the relay vanished: the pause is the longest of them.
const AFTER: Duration = Duration::from_secs(4);

pub(crate) async fn failover(r: &mut Run) -> Result<()> {
    let reps = if r.quick { 2 } else { 5 };
    let mut pauses = Vec::new();
    for rep in 0..reps {
        let pause = once(r)
            .await
            .with_context(|| format!("failover {}", rep + 1))?;
        eprintln!("failover: the longest round trip was {pause:.3} s");
        pauses.push(pause);
    }
    r.figures.push(figure(
        "failover",
        "the longest pause of a ping-pong whose relay host vanished, a second relay present (target about 1 s)",
        "s",
        median(pauses.clone()),
        FLOOR,
        1.0,
        pauses.len(),
    ));
    r.notes.push(format!(
        "failover: longest round trip (s) of a 64-byte ping-pong across the loss of its relay host, each run: {pauses:?}"
    ));
    Ok(())
}

/// One failover; the longest round trip across it, in seconds.
async fn once(r: &Run) -> Result<f64> {
    let mut path = Path::start_with_backup(&r.bin, vec![link("failover", r.echo)]).await?;
    let mut pinger = Pinger::tcp(path.listen[0]).await?;
    let relay = path.relay_pid()?;
    comsat_tests::proc::signal(relay, "STOP")?;
    let frozen = Instant::now();
    let mut longest: f64 = 0.0;
    while frozen.elapsed() < AFTER {
        let round = tokio::time::timeout(Duration::from_secs(30), pinger.round())
            .await
            .context("no answer within 30 s of the relay vanishing")??;
        longest = longest.max(round / 1e6);
    }
    // A frozen process is killed as any other.
    if let Some(relay) = &mut path.relay {
        relay.kill();
    }
    Ok(longest)
}
