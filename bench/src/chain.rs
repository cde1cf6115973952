//! A baseline made of peer processes (stunnel, rathole) in front of the
//! bench's sink and echo services: the processes, their files, and the two
//! entry addresses.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result};

/// Running peer processes with two services, `bulk` (to the sink) and
/// `ping` (to the echo).
pub(crate) struct Chain {
    dir: Option<tempfile::TempDir>,
    procs: Vec<Child>,
    pub(crate) bulk: SocketAddr,
    pub(crate) ping: SocketAddr,
}

impl Chain {
    pub(crate) fn new(dir: tempfile::TempDir, bulk: SocketAddr, ping: SocketAddr) -> Self {
        if std::env::var_os("COMSAT_BENCH_KEEP").is_some() {
            eprintln!("peer files in {}", dir.path().display());
        }
        Self {
            dir: Some(dir),
            procs: Vec::new(),
            bulk,
            ping,
        }
    }

    pub(crate) fn dir(&self) -> &Path {
        self.dir.as_ref().expect("dir is kept until drop").path()
    }

    /// Starts `program` with `args`, its stderr and stdout logged to
    /// `NAME.log` in the chain's directory.
    pub(crate) fn spawn(&mut self, name: &str, program: &str, args: &[&Path]) -> Result<()> {
        let log = std::fs::File::create(self.dir().join(format!("{name}.log")))?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {program}"))?;
        self.procs.push(child);
        Ok(())
    }

    /// Process ids, in the order started.
    pub(crate) fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(Child::id).collect()
    }
}

impl Drop for Chain {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.kill();
            let _ = p.wait();
        }
        if let Some(dir) = self.dir.take()
            && std::env::var_os("COMSAT_BENCH_KEEP").is_some()
        {
            let _ = dir.keep();
        }
    }
}

/// A free TCP port on loopback (another process may take it first; the
/// peer then fails to start and the bench says so).
pub(crate) fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Whether `program` can be run (`program ARG` starts).
pub(crate) fn available(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}
