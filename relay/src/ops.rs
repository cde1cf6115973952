//! The running relay process and its operator: signals, the pid file, and
//! `comsat relay drain`.
//!
//! | signal | effect |
//! |---|---|
//! | SIGTERM (`systemctl stop`, `comsat relay drain`) | drain: refuse new attaches, tell every agent to move its links to the next relay of their grants, exit 0 when none is attached or after the grace (`[drain] grace_secs`, default 30 s) |
//! | second SIGTERM, or SIGINT (Ctrl-C) | stop now: close every connection (agents resume elsewhere) |
//! | SIGHUP (`systemctl reload`) | reload: the config file (static relays) or the certificate files (enrolled relays); a bad file is refused and logged, the one in force stays |

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use std::io::Read;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use crate::{RelayHandle, Stop};

/// Why a relay's process could not be set up or drained.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpsError {
    /// A file or the process table could not be read or written, or a
    /// signal not sent or handled.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The pid file names no running relay: what to do is said.
    #[error("{0}")]
    PidFile(String),
    /// The relay did not exit within the time given.
    #[error("{0}")]
    StillRunning(String),
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> OpsError {
    move |source| OpsError::Io { what, source }
}

/// The file in a relay's data dir (or next to its config file) that holds
/// the PID of the relay serving it.
pub const PID_FILE: &str = "relay.pid";

/// Largest pid file read.
const MAX_PID_FILE: u64 = 64;

/// What SIGHUP reloads.
#[derive(Debug, Clone)]
pub enum Reload {
    /// A static relay: its config file (also when the file changes).
    Config(PathBuf),
    /// An enrolled relay: its certificate files (also reloaded on change).
    Certificate,
}

/// The relay's pid file, removed when dropped.
#[derive(Debug)]
pub struct PidFile(PathBuf);

impl PidFile {
    /// Writes this process's PID to `dir/relay.pid` (atomically).
    pub fn create(dir: &Path) -> Result<Self, OpsError> {
        let path = dir.join(PID_FILE);
        let tmp = dir.join(format!(".{PID_FILE}.tmp"));
        std::fs::write(&tmp, format!("{}\n", std::process::id()))
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(io(format!("writing {}", path.display())))?;
        Ok(Self(path))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        // Only our own: a newer relay may have replaced it.
        let ours = std::fs::read_to_string(&self.0)
            .is_ok_and(|t| t.trim() == std::process::id().to_string());
        if ours {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// Turns the process's signals into stops and reloads of the relay. The
/// returned receiver goes to [`crate::Relay::run_until`].
pub fn watch_signals(
    handle: RelayHandle,
    grace: Duration,
    reload: Reload,
) -> Result<mpsc::Receiver<Stop>, OpsError> {
    let mut term =
        signal(SignalKind::terminate()).map_err(io("installing the SIGTERM handler".into()))?;
    let mut int =
        signal(SignalKind::interrupt()).map_err(io("installing the SIGINT handler".into()))?;
    let mut hup =
        signal(SignalKind::hangup()).map_err(io("installing the SIGHUP handler".into()))?;
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let mut draining = false;
        let mut stamp = match &reload {
            Reload::Config(path) => modified(path),
            Reload::Certificate => None,
        };
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = term.recv() => {
                    let stop = if draining {
                        tracing::warn!("second SIGTERM: stopping now");
                        Stop::Now
                    } else {
                        tracing::info!(grace_secs = grace.as_secs_f64(), "SIGTERM: draining");
                        Stop::Drain { grace }
                    };
                    draining = true;
                    if tx.send(stop).await.is_err() {
                        return;
                    }
                }
                _ = int.recv() => {
                    if tx.send(Stop::Now).await.is_err() {
                        return;
                    }
                }
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading");
                    if let Reload::Config(path) = &reload {
                        stamp = modified(path);
                    }
                    apply_reload(&handle, &reload);
                }
                _ = tick.tick() => {
                    if let Reload::Config(path) = &reload {
                        let now = modified(path);
                        if now != stamp {
                            stamp = now;
                            tracing::info!(config = %path.display(), "config file changed: reloading");
                            apply_reload(&handle, &reload);
                        }
                    }
                }
            }
        }
    });
    Ok(rx)
}

fn modified(path: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn apply_reload(handle: &RelayHandle, reload: &Reload) {
    match reload {
        Reload::Certificate => handle.reload_certificate(),
        Reload::Config(path) => match handle.reload_file(path) {
            Ok(()) => tracing::info!(config = %path.display(), "configuration reloaded"),
            Err(e) => tracing::error!(
                config = %path.display(),
                error = %e,
                "configuration reload refused; the configuration in force stays"
            ),
        },
    }
}

/// `comsat relay drain`: sends SIGTERM to the relay whose pid file is in
/// `dir` and waits until it has exited (at most `timeout`), reporting
/// progress on stderr.
pub fn drain(dir: &Path, timeout: Duration) -> Result<(), OpsError> {
    let path = dir.join(PID_FILE);
    let pid = read_pid(&path)?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).map_err(|_| {
        OpsError::PidFile(format!(
            "no relay is running with the PID in {} ({pid}): a stale pid file (remove it)",
            path.display()
        ))
    })?;
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let is_relay = args
        .first()
        .is_some_and(|a| a.ends_with(b"comsat") || a.ends_with(b"comsat (deleted)"))
        && args.iter().any(|a| *a == b"relay")
        && args.iter().any(|a| *a == b"run");
    if !is_relay {
        return Err(OpsError::PidFile(format!(
            "PID {pid} from {} is not a `comsat relay run` process: a stale pid file (remove it)",
            path.display()
        )));
    }
    let target = rustix::process::Pid::from_raw(pid as i32)
        .ok_or_else(|| OpsError::PidFile(format!("{}: PID {pid} is not valid", path.display())))?;
    rustix::process::kill_process(target, rustix::process::Signal::TERM)
        .map_err(|e| io(format!("sending SIGTERM to the relay (PID {pid})"))(e.into()))?;
    eprintln!("draining the relay (PID {pid}): its agents move to their next relays");
    let started = Instant::now();
    let mut last_report = started;
    while Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(pid) {
        if started.elapsed() > timeout {
            return Err(OpsError::StillRunning(format!(
                "the relay (PID {pid}) is still running after {}s; it exits at the end of its drain grace",
                timeout.as_secs()
            )));
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            last_report = Instant::now();
            eprintln!("still draining after {}s…", started.elapsed().as_secs());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "the relay has exited after {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('Z')))
        .unwrap_or(false)
}

fn read_pid(path: &Path) -> Result<u32, OpsError> {
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_PID_FILE).read_to_string(&mut text))
        .map_err(io(format!(
            "reading {} (is a relay running with this data dir? `comsat relay run` writes it)",
            path.display()
        )))?;
    let pid: u32 = text.trim().parse().map_err(|_| {
        OpsError::PidFile(format!(
            "{} does not hold a PID (found {:?}); remove it if no relay runs",
            path.display(),
            text.trim()
        ))
    })?;
    if pid <= 1 {
        return Err(OpsError::PidFile(format!(
            "{} holds PID {pid}, which is not a relay",
            path.display()
        )));
    }
    Ok(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pid_file_with_garbage_is_refused_with_its_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(PID_FILE), "not a pid").expect("write");
        let err = drain(dir.path(), Duration::from_secs(1)).expect_err("garbage");
        let msg = format!("{err:#}");
        assert!(
            msg.contains("relay.pid") && msg.contains("not a pid"),
            "{msg}"
        );
    }

    #[test]
    fn a_pid_that_is_not_a_relay_is_not_signalled() {
        let dir = tempfile::tempdir().expect("tempdir");
        // This test process is not `comsat relay run`.
        std::fs::write(dir.path().join(PID_FILE), std::process::id().to_string()).expect("write");
        let err = drain(dir.path(), Duration::from_secs(1)).expect_err("not a relay");
        assert!(
            format!("{err:#}").contains("not a `comsat relay run`"),
            "{err:#}"
        );
    }

    #[test]
    fn a_missing_pid_file_names_the_command() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = drain(dir.path(), Duration::from_secs(1)).expect_err("missing");
        assert!(format!("{err:#}").contains("comsat relay run"), "{err:#}");
    }

    #[test]
    fn the_pid_file_is_removed_only_by_its_owner() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = PidFile::create(dir.path()).expect("create");
        let path = dir.path().join(PID_FILE);
        assert_eq!(
            std::fs::read_to_string(&path).expect("read").trim(),
            std::process::id().to_string()
        );
        drop(f);
        assert!(!path.exists());
        let f = PidFile::create(dir.path()).expect("create");
        std::fs::write(&path, "12345\n").expect("another relay took it");
        drop(f);
        assert!(path.exists(), "a newer relay's pid file stays");
    }
}
