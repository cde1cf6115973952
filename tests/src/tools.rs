//! Outside tools some tests run (promtool, kubernetes-validate, a Docker
//! base image): named by an environment variable CI sets, so that a
//! machine without them skips those checks and says so.

use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, ensure};

/// The value of `var`, or `None` after saying on stderr that `what` does
/// not run without it.
pub fn from_env(var: &str, what: &str) -> Option<String> {
    let value = std::env::var(var).ok().filter(|v| !v.is_empty());
    if value.is_none() {
        eprintln!("{var} is not set: {what} does not run");
    }
    value
}

/// Runs `cmd` with `input` on its stdin (if any); fails with its output,
/// naming `what` it checked, unless it exits 0.
pub fn passes(mut cmd: Command, input: Option<&[u8]>, what: &str) -> Result<()> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cmd:?}"))?;
    let stdin = child.stdin.take().context("its stdin")?;
    if let Some(input) = input {
        let mut stdin = stdin;
        stdin.write_all(input)?;
    }
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "{cmd:?} finds fault with {what}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
