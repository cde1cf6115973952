//! The idle budget: what an idle agent costs on the wire. Agents A and B
//! enrolled with a controller (network namespaces made for the run,
//! `comsat_tests::netns`), each behind a NAT, with two links between them
//! and no flows; the controller and the relay in the public namespace, all
//! on default settings. Every IP byte A's NAT router forwards, both ways,
//! is counted (nftables counters: UDP is the relay connection, TCP the
//! controller's long polls) over a window and scaled to a day.

use std::time::Duration;

use anyhow::Result;
use comsat_tests::fleet::Fleet;
use comsat_tests::netns::{self, Forwarded, NatTopology};

use crate::report::figure;
use crate::{FLOOR, Run};

/// The target, MB (10^6 bytes) a day.
const TARGET_MB: f64 = 1.0;

/// After the links are ready: the enrolment's and the links' setup
/// exchanges end, and so does the lane a link brings up (30 s idle).
const SETTLE: Duration = Duration::from_secs(40);

pub(crate) async fn idle(r: &mut Run) -> Result<()> {
    if let Some(why) = netns::unavailable() {
        eprintln!("idle: skipped: {why}");
        r.notes.push(format!("idle: skipped: {why}"));
        return Ok(());
    }
    // Two controller polls (5 min each) and some in a full run; a quick
    // run sees the keep-alives and at most one poll.
    let window = if r.quick {
        Duration::from_secs(60)
    } else {
        Duration::from_secs(660)
    };
    let counted = tokio::task::spawn_blocking(move || measure(window)).await??;
    let per_day = |bytes: u64| bytes as f64 * 86_400.0 / window.as_secs_f64() / 1e6;
    let total = counted.udp.1 + counted.tcp.1 + counted.other.1;
    r.figures.push(figure(
        "idle",
        "an idle agent with two links behind a NAT: IP bytes a day on the wire, relay and controller together (target 1 MB)",
        "MB/day",
        per_day(total),
        FLOOR,
        TARGET_MB,
        1,
    ));
    r.notes.push(format!(
        "idle: over {} s, A's NAT forwarded UDP (relay) {} packets, {} bytes ({:.3} MB/day); TCP (controller) {} packets, {} bytes ({:.3} MB/day); other {} packets, {} bytes{}",
        window.as_secs(),
        counted.udp.0,
        counted.udp.1,
        per_day(counted.udp.1),
        counted.tcp.0,
        counted.tcp.1,
        per_day(counted.tcp.1),
        counted.other.0,
        counted.other.1,
        if window < Duration::from_secs(300) {
            " (a quick run's window is shorter than one controller poll: the controller's share is not measured well)"
        } else {
            ""
        }
    ));
    Ok(())
}

/// Sets the fleet up, lets it settle, and counts for `window`.
fn measure(window: Duration) -> Result<Forwarded> {
    let t = NatTopology::new(2)?;
    let mut fleet = Fleet::builder()
        .relays(1)
        .agents(&["a", "b"])
        .behind_nats(&t)
        .start()?;
    // Nothing listens at the targets: no flow ever opens.
    let discard = "127.0.0.1:9".parse()?;
    for link in ["idle-1", "idle-2"] {
        fleet.create_link(link, discard, &[])?;
        fleet.wait_link_ready("a", link)?;
        fleet.wait_link_ready("b", link)?;
    }
    eprintln!(
        "idle: links ready; settling {} s, then counting {} s",
        SETTLE.as_secs(),
        window.as_secs()
    );
    std::thread::sleep(SETTLE);
    t.count_forwarded(0)?;
    std::thread::sleep(window);
    t.forwarded(0)
}
