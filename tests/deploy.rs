//! The deployment files in `deploy/`.
//!
//! - The systemd units: each runs a command this build takes, the relay's
//!   stop timeout leaves it its whole drain grace, and systemd itself finds
//!   nothing wrong with them (`systemd-analyze verify`, where installed).
//! - The Kubernetes manifests: the relay's drain ends before its preStop
//!   hook gives up and that before Kubernetes kills it, and every object
//!   validates against the Kubernetes schemas (`kubernetes-validate`).
//! - The Compose fleet: Compose waits out a relay's drain before it kills
//!   it (the fleet itself runs in `tests/compose_fleet.rs`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

const BIN: &str = env!("CARGO_BIN_EXE_comsat");

fn units() -> Result<Vec<PathBuf>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/systemd");
    let mut units: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|e| Ok(e?.path()))
        .collect::<Result<_>>()?;
    units.retain(|p| p.extension().is_some_and(|e| e == "service"));
    units.sort();
    Ok(units)
}

/// The value of `key` in `unit`'s text (its last setting).
fn setting<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .next_back()
}

#[test]
fn every_unit_runs_a_command_this_build_takes() -> Result<()> {
    let units = units()?;
    let names: Vec<_> = units
        .iter()
        .filter_map(|p| p.file_name()?.to_str())
        .collect();
    ensure!(
        names
            == [
                "comsat-agent.service",
                "comsat-controller.service",
                "comsat-relay.service"
            ],
        "{names:?}"
    );
    for unit in &units {
        let text = std::fs::read_to_string(unit)?;
        let exec = setting(&text, "ExecStart").context("ExecStart")?;
        let args: Vec<&str> = exec.split_whitespace().collect();
        ensure!(args.first() == Some(&"/usr/local/bin/comsat"), "{exec}");
        // The arguments as written, then --help: clap refuses any it does
        // not know before it prints the help.
        let out = Command::new(BIN).args(&args[1..]).arg("--help").output()?;
        ensure!(
            out.status.success(),
            "{}: `{exec}` is not a command this build takes:\n{}",
            unit.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(
            setting(&text, "User") == Some("comsat"),
            "{}: runs as root",
            unit.display()
        );
        let data_dir = args
            .windows(2)
            .find(|w| w[0] == "--data-dir")
            .map(|w| w[1])
            .context("--data-dir")?;
        ensure!(
            setting(&text, "ReadWritePaths")
                .is_some_and(|p| p.split_whitespace().any(|d| d == data_dir)),
            "{}: its data dir {data_dir} is not writable under ProtectSystem=strict",
            unit.display()
        );
    }
    Ok(())
}

#[test]
fn the_relay_unit_waits_out_its_drain() -> Result<()> {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/systemd/comsat-relay.service"),
    )?;
    let stop: u64 = setting(&text, "TimeoutStopSec")
        .context("TimeoutStopSec")?
        .parse()?;
    let grace = comsat_relay::defaults::DRAIN_GRACE.as_secs();
    ensure!(
        stop > grace,
        "TimeoutStopSec={stop} would kill the relay before its {grace} s drain ends"
    );
    ensure!(
        setting(&text, "KillSignal") == Some("SIGTERM"),
        "stop drains on SIGTERM"
    );
    ensure!(
        setting(&text, "ExecReload") == Some("/bin/kill -HUP $MAINPID"),
        "reload is SIGHUP"
    );
    Ok(())
}

#[test]
fn systemd_verifies_every_unit() -> Result<()> {
    let Some(analyze) = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .into_iter()
        .find(|p| Path::new(p).exists())
    else {
        eprintln!("systemd-analyze is not installed: the units are not verified by systemd");
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let mut copies = Vec::new();
    for unit in units()? {
        // The same unit, with this build's binary where it would be
        // installed (systemd checks that the command exists).
        let text = std::fs::read_to_string(&unit)?.replace("/usr/local/bin/comsat", BIN);
        let copy = dir.path().join(unit.file_name().context("name")?);
        std::fs::write(&copy, text)?;
        copies.push(copy);
    }
    let out = Command::new(analyze).arg("verify").args(&copies).output()?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() || !said.trim().is_empty() {
        bail!("systemd-analyze verify finds fault with the units:\n{said}");
    }
    Ok(())
}

fn kubernetes_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes")
}

/// The seconds in a duration as the command line takes it (`30s`).
fn secs(d: &str) -> Result<u64> {
    d.trim_matches('"')
        .strip_suffix('s')
        .context("a duration in seconds")?
        .parse()
        .with_context(|| format!("`{d}`"))
}

/// The argument after `flag` in the first line of `text` (a YAML flow
/// list, `["relay", "run", "--flag", "value"]`) that holds both `within`
/// and `flag`.
fn arg_after(text: &str, within: &str, flag: &str) -> Result<String> {
    let line = text
        .lines()
        .find(|l| l.contains(within) && l.contains(flag))
        .with_context(|| format!("no line with {within} and {flag}"))?;
    let items: Vec<&str> = line
        .split(['[', ']', ','])
        .map(|s| s.trim().trim_matches('"'))
        .collect();
    let at = items.iter().position(|s| *s == flag).context("flag")?;
    items
        .get(at + 1)
        .map(|s| (*s).to_owned())
        .context("a value after the flag")
}

#[test]
fn the_relays_drain_ends_before_kubernetes_kills_it() -> Result<()> {
    let text = std::fs::read_to_string(kubernetes_dir().join("relay.yaml"))?;
    let grace = secs(&arg_after(&text, "\"run\"", "--drain-grace")?)?;
    let wait = secs(&arg_after(&text, "\"drain\"", "--timeout")?)?;
    let killed: u64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("terminationGracePeriodSeconds:"))
        .context("terminationGracePeriodSeconds")?
        .trim()
        .parse()?;
    ensure!(
        grace < wait && wait < killed,
        "the relay drains for {grace} s, preStop waits {wait} s, Kubernetes kills it after {killed} s: \
         each must be below the next"
    );
    // The drain waited for is the relay's own: its data dir.
    ensure!(
        arg_after(&text, "\"drain\"", "--data-dir")? == arg_after(&text, "\"run\"", "--data-dir")?,
        "preStop drains another data dir than the relay runs"
    );
    ensure!(
        text.contains("kind: PodDisruptionBudget"),
        "a PodDisruptionBudget"
    );
    ensure!(text.contains("path: /readyz"), "ready on /readyz");
    Ok(())
}

/// Every manifest is in the kustomization, and every object in them
/// validates against the Kubernetes schemas (`kubernetes-validate --strict`,
/// from PyPI, where `COMSAT_TEST_KUBERNETES_VALIDATE` names it: CI does).
#[test]
fn the_kubernetes_manifests_validate() -> Result<()> {
    let dir = kubernetes_dir();
    let kustomization = std::fs::read_to_string(dir.join("kustomization.yaml"))?;
    let listed: Vec<String> = kustomization
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- "))
        .filter(|f| f.ends_with(".yaml"))
        .map(str::to_owned)
        .collect();
    let mut files: Vec<String> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|f| f.ends_with(".yaml") && f != "kustomization.yaml")
        .collect();
    files.sort();
    let mut sorted = listed.clone();
    sorted.sort();
    ensure!(
        sorted == files,
        "kustomization lists {listed:?}, the directory holds {files:?}"
    );
    let Some(validate) = comsat_tests::tools::from_env(
        "COMSAT_TEST_KUBERNETES_VALIDATE",
        "validating the manifests",
    ) else {
        return Ok(());
    };
    for file in &files {
        let mut cmd = Command::new(&validate);
        cmd.args(["--strict", "--kubernetes-version", "1.30.0"])
            .arg(dir.join(file));
        comsat_tests::tools::passes(cmd, None, file)?;
    }
    Ok(())
}

/// Compose's stop (SIGTERM, then SIGKILL after `stop_grace_period`) leaves
/// a relay of `deploy/compose` its whole drain.
#[test]
fn compose_waits_out_the_relays_drain() -> Result<()> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/compose/compose.yaml");
    let text = std::fs::read_to_string(path)?;
    let run = text
        .lines()
        .find(|l| l.contains("comsat relay run"))
        .context("no `comsat relay run` in compose.yaml")?;
    let words: Vec<&str> = run.split_whitespace().collect();
    let at = words
        .iter()
        .position(|w| *w == "--drain-grace")
        .context("the relay's --drain-grace")?;
    let grace = secs(words.get(at + 1).context("a value after --drain-grace")?)?;
    let stops: Vec<u64> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("stop_grace_period:"))
        .map(|v| secs(v.trim()))
        .collect::<Result<_>>()?;
    ensure!(
        stops.len() == 1,
        "one stop_grace_period, the nodes': {stops:?}"
    );
    ensure!(
        grace < stops[0],
        "the relay drains for {grace} s, Compose kills it after {} s",
        stops[0]
    );
    Ok(())
}
