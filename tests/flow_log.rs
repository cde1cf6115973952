//! The flow log end to end, with the real `comsat` binary as processes:
//! both agents report every flow to the controller, and `comsat ctl flows`
//! lists them with the caller's identity and exact byte counts, filtered
//! by link and identity, as a table, JSON or JSON Lines.

#[path = "common/fleet.rs"]
mod fleet;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use comsat_protocol::Side;
use comsat_protocol::api::{FlowInfo, FlowOutcome};
use fleet::*;

const FLOWS: usize = 1000;
const ID: &str = "spiffe://example.org/tester";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_flows_lists_a_thousand_flows_with_their_callers_and_exact_bytes() -> Result<()> {
    let mut c = Fleet::builder().relays(1).agents(&["a", "b"]).start()?;
    let target = hash_server().await?;
    // This test's process is the caller, admitted by its uid as ID.
    let uid = rustix::process::geteuid().as_raw();
    let rule = format!("{ID} unix:uid:{uid}");
    let listen = c.create_link("logged", target, &["--allow", &rule])?;
    round_trip_eventually(listen, 1)
        .await
        .with_context(|| c.logs())?;
    // 1,000 flows, 20 at a time, flow n sending n bytes (the warm-up's
    // flows sent 1); the hash server answers each with 32.
    let mut sizes: BTreeMap<u64, usize> = BTreeMap::new();
    for chunk in (2..FLOWS as u64 + 2).collect::<Vec<_>>().chunks(20) {
        let mut set = tokio::task::JoinSet::new();
        for &n in chunk {
            *sizes.entry(n).or_default() += 1;
            set.spawn(round_trip(listen, n as usize, n as u8));
        }
        while let Some(done) = set.join_next().await {
            done??;
        }
    }

    // Both agents report them within seconds.
    let deadline = Instant::now() + Duration::from_secs(60);
    let flows = loop {
        let out = c.ctl_ok(&[
            "flows", "--link", "logged", "--limit", "10000", "-o", "json",
        ])?;
        let flows: Vec<FlowInfo> = serde_json::from_str(&out)?;
        let of = |n: u64| {
            flows
                .iter()
                .filter(|f| f.record.side == Side::A && f.record.bytes_sent == n)
                .count()
        };
        if sizes.iter().all(|(n, count)| of(*n) == *count) && flows.len() >= 2 * FLOWS {
            break flows;
        }
        if Instant::now() > deadline {
            bail!(
                "{} records of {} flows after 60 s\n{}",
                flows.len(),
                FLOWS,
                c.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let mine: Vec<&FlowInfo> = flows
        .iter()
        .filter(|f| f.record.bytes_sent != 1 && f.record.bytes_received != 1)
        .collect();
    for side in [Side::A, Side::B] {
        let of_side: Vec<_> = mine.iter().filter(|f| f.record.side == side).collect();
        ensure!(of_side.len() == FLOWS, "{side}: {} records", of_side.len());
        let mut by_size: BTreeMap<u64, usize> = BTreeMap::new();
        for f in &of_side {
            let r = &f.record;
            let (request, answer) = match side {
                Side::A => (r.bytes_sent, r.bytes_received),
                Side::B => (r.bytes_received, r.bytes_sent),
            };
            ensure!(
                answer == 32,
                "{side}: a flow answered {answer} bytes: {f:?}"
            );
            *by_size.entry(request).or_default() += 1;
            ensure!(r.caller_id.as_deref() == Some(ID), "{f:?}");
            ensure!(r.caller.contains(&format!("unix:uid:{uid}")), "{f:?}");
            ensure!(r.outcome == FlowOutcome::Completed, "{f:?}");
            ensure!(
                f.link == "logged" && f.relay.as_deref() == Some("relay-1"),
                "{f:?}"
            );
            ensure!(r.ended_ms >= r.started_ms, "{f:?}");
        }
        ensure!(by_size == sizes, "{side}: the bytes of each flow, exactly");
        let agent = if side == Side::A { "a" } else { "b" };
        ensure!(of_side.iter().all(|f| f.agent == agent));
    }

    // Filters: by identity (SPIFFE ID or selector), and none for another.
    let by_id: Vec<FlowInfo> = serde_json::from_str(&c.ctl_ok(&[
        "flows",
        "--identity",
        ID,
        "--limit",
        "10000",
        "-o",
        "json",
    ])?)?;
    ensure!(by_id.len() == flows.len(), "{} by ID", by_id.len());
    let selector = format!("unix:uid:{uid}");
    let by_selector: Vec<FlowInfo> = serde_json::from_str(&c.ctl_ok(&[
        "flows",
        "--identity",
        &selector,
        "--limit",
        "10000",
        "-o",
        "json",
    ])?)?;
    ensure!(by_selector.len() == flows.len());
    let other: Vec<FlowInfo> = serde_json::from_str(&c.ctl_ok(&[
        "flows",
        "--identity",
        "spiffe://example.org/other",
        "-o",
        "json",
    ])?)?;
    ensure!(other.is_empty());
    let (code, _, err) = c.ctl(&["flows", "--identity", "uid:1000"])?;
    ensure!(code != 0 && err.contains("selector"), "{err}");
    // JSON Lines export, and the table.
    let lines = c.ctl_ok(&["flows", "--limit", "5", "--jsonl"])?;
    ensure!(lines.lines().count() == 5, "{lines}");
    for line in lines.lines() {
        let _: FlowInfo = serde_json::from_str(line).context("a JSON line")?;
    }
    let table = c.ctl_ok(&["flows", "--limit", "3"])?;
    ensure!(table.starts_with("ENDED") && table.contains(ID), "{table}");
    Ok(())
}
