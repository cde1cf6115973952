//! Every command a message or a doc comment of the code names
//! (`` `comsat ctl link delete NAME` `` and the like) exists: the hints an
//! operator is given can be typed as they are. Each is found in the
//! sources as written between backticks, and its subcommand words (up to
//! the first argument placeholder or option) are run with `--help`.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, ensure};

const BIN: &str = env!("CARGO_BIN_EXE_comsat");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The sources whose messages and docs speak to operators.
const DIRS: &[&str] = &[
    "src",
    "node/src",
    "controller/src",
    "relay/src",
    "agent/src",
    "protocol/src",
];

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("{}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            rust_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// The subcommand words of each `` `comsat …` `` in `text`.
fn hinted(text: &str, out: &mut BTreeSet<Vec<String>>) {
    for (i, _) in text.match_indices("`comsat ") {
        let rest = &text[i + 1..];
        let Some(end) = rest.find('`') else {
            continue;
        };
        let words: Vec<String> = rest[..end]
            .split_whitespace()
            .skip(1)
            .take_while(|w| {
                !w.starts_with('-') && w.bytes().all(|b| b.is_ascii_lowercase() || b == b'-')
            })
            .map(str::to_owned)
            .collect();
        out.insert(words);
    }
}

#[test]
fn every_command_the_code_names_exists() -> Result<()> {
    let mut files = Vec::new();
    for dir in DIRS {
        rust_files(&Path::new(ROOT).join(dir), &mut files)?;
    }
    let mut commands = BTreeSet::new();
    for f in &files {
        hinted(&std::fs::read_to_string(f)?, &mut commands);
    }
    ensure!(
        commands.len() > 10,
        "found only {commands:?}: is the scan broken?"
    );
    let mut missing = Vec::new();
    for words in &commands {
        let out = Command::new(BIN).args(words).arg("--help").output()?;
        if !out.status.success() {
            missing.push(format!(
                "comsat {}: {}",
                words.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    ensure!(
        missing.is_empty(),
        "hints name commands that do not exist:\n{}",
        missing.join("\n")
    );
    Ok(())
}

#[test]
fn a_hint_is_read_up_to_its_first_placeholder() {
    let mut found = BTreeSet::new();
    hinted(
        "see `comsat ctl link delete {}` or `comsat relay run --admin ADDR`, not `comsat`",
        &mut found,
    );
    let want: BTreeSet<Vec<String>> = [vec!["ctl", "link", "delete"], vec!["relay", "run"]]
        .into_iter()
        .map(|w| w.into_iter().map(str::to_owned).collect())
        .collect();
    assert_eq!(found, want);
}
