//! The command line as a person meets it: help for every command,
//! completion scripts, and errors that say what to do.

use std::process::Command;

use anyhow::{Result, ensure};

const BIN: &str = env!("CARGO_BIN_EXE_comsat");

fn run(args: &[&str]) -> Result<(i32, String, String)> {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("COMSAT_CONTEXT")
        .output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn every_command_has_help() -> Result<()> {
    let commands: &[&[&str]] = &[
        &[],
        &["up"],
        &["controller", "init"],
        &["controller", "run"],
        &["relay", "enrol"],
        &["relay", "run"],
        &["agent", "enrol"],
        &["agent", "run"],
        &["ctl"],
        &["ctl", "token", "create"],
        &["ctl", "link", "create"],
        &["ctl", "link", "update"],
        &["ctl", "link", "delete"],
        &["ctl", "relay", "list"],
        &["completions"],
        &["dev", "init"],
    ];
    for cmd in commands {
        let mut args = cmd.to_vec();
        args.push("-h");
        let (code, out, err) = run(&args)?;
        ensure!(code == 0, "{args:?}: exit {code}: {err}");
        ensure!(out.contains("Usage: comsat"), "{args:?}: {out}");
        // Every option, argument and subcommand has a description: on its
        // own line after two spaces, or on the next, deeper indented line.
        let lines: Vec<&str> = out.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let indent = line.len() - line.trim_start().len();
            if !(2..=6).contains(&indent) {
                continue;
            }
            let entry = line.trim_start();
            let same_line = entry
                .split_once("  ")
                .is_some_and(|(_, d)| !d.trim().is_empty());
            let next_line = lines
                .get(i + 1)
                .is_some_and(|n| n.len() - n.trim_start().len() > indent && !n.trim().is_empty());
            ensure!(
                same_line || next_line,
                "{args:?}: undocumented {entry:?}\n{out}"
            );
        }
    }
    Ok(())
}

#[test]
fn completion_scripts_name_the_commands() -> Result<()> {
    for shell in ["bash", "zsh", "fish"] {
        let (code, out, err) = run(&["completions", shell])?;
        ensure!(code == 0, "{shell}: {err}");
        ensure!(
            out.contains("enrol") && out.contains("link"),
            "{shell}: no subcommands in the script"
        );
    }
    Ok(())
}

#[test]
fn errors_name_what_is_wrong_and_what_to_do() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let missing = dir.path().join("nowhere");
    let missing = missing.to_str().unwrap_or_default();

    let (code, _, err) = run(&["agent", "run", "--data-dir", missing])?;
    ensure!(
        code == 2 && err.contains("node.toml") && err.contains("comsat agent enrol"),
        "{code} {err}"
    );

    for node in ["relay", "agent"] {
        let (code, _, err) = run(&[node, "run", "--data-dir", missing, "--bulk-nice", "20"])?;
        ensure!(
            code == 2 && err.contains("--bulk-nice") && err.contains("0..=19"),
            "{node}: {code} {err}"
        );
    }

    let (code, _, err) = run(&["agent", "enrol", "not-a-token", "--data-dir", missing])?;
    ensure!(code == 2 && err.contains("join token"), "{code} {err}");

    let (code, _, err) = run(&["ctl", "link", "list"])?;
    ensure!(
        code == 2 && err.contains("--controller") && err.contains("--context"),
        "{code} {err}"
    );

    // `link update` takes exactly one of --max-flows and --unlimited-flows.
    let (code, _, err) = run(&["ctl", "link", "update", "db"])?;
    ensure!(
        code == 2 && err.contains("--max-flows") && err.contains("--unlimited-flows"),
        "{code} {err}"
    );
    let (code, _, err) = run(&[
        "ctl",
        "link",
        "update",
        "db",
        "--max-flows",
        "3",
        "--unlimited-flows",
    ])?;
    ensure!(
        code == 2 && err.contains("cannot be used with"),
        "{code} {err}"
    );

    let (code, _, err) = run(&["controller", "run", "--data-dir", missing])?;
    ensure!(code == 2 && err.contains("controller init"), "{code} {err}");
    Ok(())
}
