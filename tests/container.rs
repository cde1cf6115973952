//! The Dockerfile: its image builds on a base made on this machine (no
//! registry is reached), runs `comsat` as the non-root user `comsat`,
//! prints its version, and its `HEALTHCHECK` finds a relay in it healthy
//! through the relay's admin `/healthz`. Runs where
//! `COMSAT_TEST_DOCKER_BASE` names a local base image (CI makes one with
//! debootstrap and `docker import`); each image and container it makes is
//! removed, by name, when it ends.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

const BIN: &str = env!("CARGO_BIN_EXE_comsat");

/// Runs `docker ARGS`: its stdout, or why it failed.
fn docker(args: &[&str]) -> Result<String> {
    let out = Command::new("docker")
        .args(args)
        .env("DOCKER_BUILDKIT", "0")
        .output()
        .context("running docker")?;
    if !out.status.success() {
        bail!(
            "docker {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Removes an image or container by name when dropped.
struct Removed(&'static str, String);

impl Drop for Removed {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args([self.0, "-f", &self.1])
            .output();
    }
}

#[test]
fn the_image_builds_runs_as_comsat_and_checks_its_health() -> Result<()> {
    let Some(base) = comsat_tests::tools::from_env("COMSAT_TEST_DOCKER_BASE", "building the image")
    else {
        return Ok(());
    };
    let dockerfile = Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile");
    let context = tempfile::tempdir()?;
    std::fs::copy(BIN, context.path().join("comsat"))?;
    let tag = format!("comsat-test:{}", rand::random::<u32>());
    let _image = Removed("rmi", tag.clone());
    docker(&[
        "build",
        "--quiet",
        "--file",
        &dockerfile.to_string_lossy(),
        "--target",
        "prebuilt",
        "--build-arg",
        &format!("BASE={base}"),
        "--tag",
        &tag,
        &context.path().to_string_lossy(),
    ])?;

    let version = docker(&["run", "--rm", &tag, "--version"])?;
    ensure!(
        version == format!("comsat {}", env!("CARGO_PKG_VERSION")),
        "{version}"
    );
    ensure!(
        docker(&["image", "inspect", "--format", "{{.Config.User}}", &tag])? == "comsat:comsat",
        "the image's user"
    );
    let id = docker(&["run", "--rm", "--entrypoint", "id", &tag])?;
    ensure!(
        id.starts_with("uid=10001(comsat) gid=10001(comsat)"),
        "runs as {id}"
    );

    // A relay in the container (a static setup made there): the
    // health check reaches its admin /healthz.
    let name = format!("comsat-health-{}", rand::random::<u32>());
    let _container = Removed("rm", name.clone());
    docker(&[
        "run",
        "--detach",
        "--name",
        &name,
        "--entrypoint",
        "/bin/bash",
        &tag,
        "-c",
        "comsat dev init --dir /var/lib/comsat/dev >/dev/null \
         && exec comsat relay run --config /var/lib/comsat/dev/relay/relay.toml",
    ])?;
    let started = Instant::now();
    loop {
        let health = docker(&["inspect", "--format", "{{.State.Health.Status}}", &name])?;
        if health == "healthy" {
            eprintln!("healthy after {:?}", started.elapsed());
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(90) {
            let logs = docker(&["logs", &name]).unwrap_or_default();
            bail!("the relay's container is {health}, not healthy, after 90 s:\n{logs}");
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}
