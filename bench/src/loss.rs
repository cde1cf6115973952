//! Throughput through random loss: agent A behind a NAT (network
//! namespaces made for the run, `comsat_tests::netns`) whose uplink drops
//! 1 % and then 5 % of the datagrams it forwards, each way, at random; the
//! relay, agent B and the sink in the public namespace. The baseline is the
//! same path without loss, measured in the same run (single datagrams on
//! the uplink in both: `gso_max_segs 1`).

use anyhow::Result;
use comsat_tests::netns::{self, NatTopology, PUBLIC_ADDR};

use crate::measure::{self, median};
use crate::path::{Path, link};
use crate::report::figure;

/// Loss levels, per mille, after the loss-free run.
const LOSS: [u16; 2] = [10, 50];

pub(crate) async fn loss(r: &mut crate::Run) -> Result<()> {
    if let Some(why) = netns::unavailable() {
        eprintln!("loss: skipped: {why}");
        r.notes.push(format!("loss: skipped: {why}"));
        return Ok(());
    }
    let (bin, quick) = (r.bin.clone(), r.quick);
    let runs = tokio::task::spawn_blocking(move || measure_loss(&bin, quick)).await??;
    let clean = median(runs.clean.clone());
    for (per_mille, rates) in &runs.lossy {
        r.figures.push(figure(
            "loss",
            &format!(
                "one flow, A to B, {} % random loss on A's uplink",
                per_mille / 10
            ),
            "MiB/s",
            median(rates.clone()),
            "the same path without loss",
            clean,
            rates.len(),
        ));
    }
    r.notes.push(format!(
        "loss: MiB/s of one flow of {} MiB behind a NAT: no loss {:?}; {}",
        runs.bytes >> 20,
        runs.clean,
        runs.lossy
            .iter()
            .map(|(p, v)| format!("{} %: {v:?}", p / 10))
            .collect::<Vec<_>>()
            .join("; ")
    ));
    Ok(())
}

/// What one run measured: MiB/s without loss and at each level.
struct Runs {
    bytes: u64,
    clean: Vec<f64>,
    lossy: Vec<(u16, Vec<f64>)>,
}

/// Runs the path in a NAT topology: this thread (and the runtime it
/// starts) in A's edge, the relay, agent B and the sink in the public
/// namespace.
fn measure_loss(bin: &str, quick: bool) -> Result<Runs> {
    let t = NatTopology::new(1)?;
    let edge = t.edges()[0].ns.clone();
    NatTopology::within(&edge, || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(run_path(&t, bin, quick))
    })?
}

async fn run_path(t: &NatTopology, bin: &str, quick: bool) -> Result<Runs> {
    let public = t.public().to_owned();
    let sink = NatTopology::within(&public, || std::net::TcpListener::bind("127.0.0.1:0"))??;
    sink.set_nonblocking(true)?;
    let sink = tokio::net::TcpListener::from_std(sink)?;
    let target = sink.local_addr()?;
    tokio::spawn(measure::sink(sink));
    let mut path = Path::prepare_on(bin, vec![link("lossy", target)], PUBLIC_ADDR.into())?;
    NatTopology::within(&public, || -> Result<()> {
        path.start_relay("relay")?;
        path.start_agent_b()
    })??;
    path.start_agent_a().await?;
    let (bytes, reps) = if quick { (32 << 20, 2) } else { (256 << 20, 3) };
    let listen = path.listen[0];
    let rates = |per_mille: u16| async move {
        t.set_loss(0, per_mille)?;
        let mut v = Vec::new();
        for _ in 0..reps {
            eprintln!("loss: {} % loss, {} MiB", per_mille / 10, bytes >> 20);
            v.push(measure::throughput(listen, 1, bytes).await?[0]);
        }
        anyhow::Ok(v)
    };
    // One flow first, not counted: the path's connections and their
    // congestion control warm up as they would before any measured run.
    t.set_loss(0, 0)?;
    measure::throughput(listen, 1, bytes).await?;
    let clean = rates(0).await?;
    let mut lossy = Vec::new();
    for per_mille in LOSS {
        lossy.push((per_mille, rates(per_mille).await?));
    }
    drop(path);
    Ok(Runs {
        bytes,
        clean,
        lossy,
    })
}
