//! Child processes with line-oriented stdout, and admin scraping.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The log filter children get (`COMSAT_LOG`): debug for the relay and the
/// agent unless [`set_log_filter`] chose another.
static LOG_FILTER: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Sets the log filter of every process started from now on (once; the
/// bench uses `info`, so debug logging does not weigh on its figures).
pub fn set_log_filter(filter: &str) {
    let _ = LOG_FILTER.set(filter.to_owned());
}

/// A running `comsat` process. Killed (by its PID) when dropped.
pub struct Proc {
    name: String,
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    log: std::path::PathBuf,
}

impl Proc {
    /// Starts `bin args…`; stderr goes to `log_dir/NAME.log`.
    pub fn spawn(bin: &str, name: &str, args: &[&str], log_dir: &Path) -> Result<Self> {
        let log = log_dir.join(format!("{name}.log"));
        let stderr = std::fs::File::create(&log)?;
        let mut child = Command::new(bin)
            .args(args)
            .env(
                "COMSAT_LOG",
                LOG_FILTER
                    .get()
                    .map_or("info,comsat_relay=debug,comsat_agent=debug", String::as_str),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("spawning {bin}"))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            name: name.to_owned(),
            child,
            lines,
            seen: Vec::new(),
            log,
        })
    }

    /// Waits for a stdout line starting with `prefix`; returns the line.
    pub fn wait_line(&mut self, prefix: &str, timeout: Duration) -> Result<String> {
        if let Some(l) = self.seen.iter().find(|l| l.starts_with(prefix)) {
            return Ok(l.clone());
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return Ok(line);
                    }
                }
                Err(_) => bail!(
                    "{}: no line starting with {prefix:?} within {timeout:?}; log:\n{}",
                    self.name,
                    self.log_tail()
                ),
            }
        }
    }

    /// The process's whole log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of the process's log.
    pub fn log_tail(&self) -> String {
        let text = self.log();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Kills it with SIGKILL (no chance to clean up) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends it SIGINT (what Ctrl-C sends), by its PID.
    pub fn interrupt(&self) -> Result<()> {
        let status = Command::new("kill")
            .args(["-s", "INT", &self.child.id().to_string()])
            .status()
            .context("running kill")?;
        if !status.success() {
            bail!("kill -s INT {} failed", self.child.id());
        }
        Ok(())
    }

    /// The name it was started with (also its log file's).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for it to exit, up to `timeout`; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<i32>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status.code());
            }
            if Instant::now() > deadline {
                bail!("{} did not exit within {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A UDP port on 127.0.0.1 that was free a moment ago.
/// Sends `SIG<sig>` to `pid` (a process the caller started).
pub fn signal(pid: u32, sig: &str) -> Result<()> {
    let status = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()?;
    if !status.success() {
        bail!("kill -{sig} {pid} failed");
    }
    Ok(())
}

pub fn free_udp_port() -> Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// How many threads of process `pid` are named `name` (Linux `/proc`).
pub fn threads_named(pid: u32, name: &str) -> Result<usize> {
    let mut n = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let comm = std::fs::read_to_string(task?.path().join("comm")).unwrap_or_default();
        n += usize::from(comm.trim_end() == name);
    }
    Ok(n)
}

/// Field `n` (1-based, as proc(5) numbers them: 1 is the pid, 2 the name)
/// of a `/proc/…/stat` line. The name, in parentheses, may hold spaces and
/// parentheses: fields are counted after its last `)`.
pub fn stat_field(stat: &str, n: usize) -> Option<&str> {
    let after = stat.rsplit_once(')')?.1;
    after.split_whitespace().nth(n.checked_sub(3)?)
}

/// Minor page faults of process `pid` so far, all threads (Linux `/proc`:
/// field 10 of its `stat`): pages the kernel handed it, zeroed, when it
/// touched memory it had not mapped.
pub fn minor_faults(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    stat_field(&stat, 10)
        .and_then(|f| f.parse().ok())
        .with_context(|| format!("no minflt in /proc/{pid}/stat: {stat}"))
}

/// The niceness of each thread of process `pid` named `name` (Linux
/// `/proc`: field 19 of a task's `stat`).
pub fn thread_nices(pid: u32, name: &str) -> Result<Vec<i32>> {
    let mut nices = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let task = task?.path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let stat = std::fs::read_to_string(task.join("stat"))?;
        let nice = stat_field(&stat, 19)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("no niceness in {}: {stat}", task.display()))?;
        nices.push(nice);
    }
    Ok(nices)
}

/// The niceness of process `pid` (its main thread, named after the
/// `comsat` binary) and of each of its threads named `name`.
fn nices_beside_the_process(pid: u32, name: &str) -> Result<(i32, Vec<i32>)> {
    let process = thread_nices(pid, "comsat")?;
    let [process] = process[..] else {
        bail!("process {pid}: {} main threads named comsat", process.len());
    };
    Ok((process, thread_nices(pid, name)?))
}

/// Checks that the threads of process `pid`'s main runtime keep the
/// process's niceness (nothing to yield to).
pub fn main_threads_keep_the_process_niceness(pid: u32) -> Result<()> {
    let (process, workers) = nices_beside_the_process(pid, "tokio-rt-worker")?;
    if workers.is_empty() || workers.iter().any(|n| *n != process) {
        bail!("process {pid} at {process}: main threads {workers:?}");
    }
    Ok(())
}

/// Checks that where lanes run, the main threads that carry bulk are `by`
/// nicer than the lane's thread, which keeps the process's own: the kernel
/// runs a lane first when it wakes.
pub fn main_threads_yield_to_the_lane(pid: u32, by: i32) -> Result<()> {
    let (process, lane) = nices_beside_the_process(pid, "comsat-lane")?;
    if lane.is_empty() || lane.iter().any(|n| *n != process) {
        bail!("process {pid} at {process}: lane threads {lane:?}");
    }
    let want = (process + by).min(19);
    // The runtime's workers, one per CPU; its blocking threads share their
    // name and may not have run since (they take nothing).
    let cpus = std::thread::available_parallelism()?.get();
    let (_, threads) = nices_beside_the_process(pid, "tokio-rt-worker")?;
    let yielding = threads.iter().filter(|n| **n == want).count();
    if yielding < cpus {
        bail!("process {pid}: main threads {threads:?}; want {cpus} of them at {want}");
    }
    Ok(())
}

/// GETs `path` from an admin address; returns (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no HTTP status")?;
    let body = resp
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Ok((status, body))
}

/// The Prometheus text of an admin address.
pub fn scrape(addr: SocketAddr) -> Result<String> {
    let (status, body) = http_get(addr, "/metrics")?;
    if status != 200 {
        bail!("/metrics answered {status}");
    }
    Ok(body)
}

/// The value of the sample `series` (name plus labels exactly as rendered,
/// e.g. `comsat_relay_auth_failures_total{reason="unknown_node"}`); 0 when
/// absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

/// Polls `admin`'s `/metrics` until the sample `series` satisfies `pred`,
/// for at most `within`; returns the scrape that satisfied it, or an error
/// carrying the last scrape.
pub async fn wait_for_metric(
    admin: SocketAddr,
    series: &str,
    within: Duration,
    pred: impl Fn(f64) -> bool,
) -> Result<String> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let m = scrape(admin)?;
        let v = metric(&m, series);
        if pred(v) {
            return Ok(m);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{series} = {v} did not meet the condition within {within:?}; metrics:\n{m}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How long a started process has to print its ready line.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The address after `key` in a line like `... quic=1.2.3.4:5 admin=...`.
fn field(line: &str, key: &str) -> Result<SocketAddr> {
    let v = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .with_context(|| format!("no {key} in {line:?}"))?;
    Ok(v.parse()?)
}

/// Starts `bin relay run --config CONFIG`; returns it with its QUIC and
/// admin addresses once it listens.
pub fn start_relay(
    bin: &str,
    config: &Path,
    logs: &Path,
    name: &str,
) -> Result<(Proc, SocketAddr, SocketAddr)> {
    let mut relay = Proc::spawn(
        bin,
        name,
        &["relay", "run", "--config", &config.display().to_string()],
        logs,
    )?;
    let line = relay.wait_line("comsat relay listening", START_TIMEOUT)?;
    Ok((relay, field(&line, "quic=")?, field(&line, "admin=")?))
}

/// Starts `bin agent run --config CONFIG`; returns it with its admin
/// address once it has started (the config must name an admin address).
pub fn start_agent(
    bin: &str,
    config: &Path,
    logs: &Path,
    name: &str,
) -> Result<(Proc, SocketAddr)> {
    let mut agent = Proc::spawn(
        bin,
        name,
        &["agent", "run", "--config", &config.display().to_string()],
        logs,
    )?;
    let admin = agent.wait_line("comsat agent admin", START_TIMEOUT)?;
    agent.wait_line("comsat agent started", START_TIMEOUT)?;
    let addr = admin.rsplit(' ').next().context("admin line")?.parse()?;
    Ok((agent, addr))
}

/// The address an agent printed for link `name`, without its `tcp://`.
pub fn listen_addr(agent: &mut Proc, name: &str) -> Result<SocketAddr> {
    let line = agent.wait_line(
        &format!("comsat agent link {name} listening "),
        START_TIMEOUT,
    )?;
    Ok(line
        .rsplit(' ')
        .next()
        .context("listen line")?
        .trim_start_matches("tcp://")
        .trim_start_matches("udp://")
        .parse()?)
}
