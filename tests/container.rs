//! The Dockerfile: its image builds on a base made on this machine (no
//! registry is reached), runs `comsat` as the non-root user `comsat`,
//! prints its version, and its `HEALTHCHECK` finds a relay in it healthy
//! through the relay's admin `/healthz`. Runs where
//! `COMSAT_TEST_DOCKER_BASE` names a local base image (CI makes one with
//! debootstrap and `docker import`); each image and container it makes is
//! removed, by name, when it ends.

use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use comsat_tests::docker::{Removed, build_image, docker};

const BIN: &str = env!("CARGO_BIN_EXE_comsat");

#[test]
fn the_image_builds_runs_as_comsat_and_checks_its_health() -> Result<()> {
    let Some(base) = comsat_tests::tools::from_env("COMSAT_TEST_DOCKER_BASE", "building the image")
    else {
        return Ok(());
    };
    let tag = format!("comsat-test:{}", rand::random::<u32>());
    let _image = build_image(&base, BIN, &tag)?;

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
