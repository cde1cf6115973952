//! Docker for the container tests: `docker` and Compose run as commands,
//! the image built from the binary under test on a base image made on this
//! machine (no registry is reached), and everything made removed by name
//! when its handle drops.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// Runs `cmd`: its stdout, or why it failed (naming `what`).
fn output(mut cmd: Command, what: &str) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Runs `docker ARGS` (the classic builder: no buildx here).
pub fn docker(args: &[&str]) -> Result<String> {
    let mut cmd = Command::new("docker");
    cmd.args(args).env("DOCKER_BUILDKIT", "0");
    output(cmd, &format!("docker {}", args.join(" ")))
}

/// Removes an image (`rmi`) or container (`rm`) by name when dropped.
pub struct Removed(pub &'static str, pub String);

impl Drop for Removed {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args([self.0, "-f", &self.1])
            .output();
    }
}

/// Builds the repository's Dockerfile, target `prebuilt`, around `bin` on
/// `base`, tagged `tag`; the image is removed when the handle drops.
pub fn build_image(base: &str, bin: &str, tag: &str) -> Result<Removed> {
    let dockerfile = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("Dockerfile");
    let context = tempfile::tempdir()?;
    std::fs::copy(bin, context.path().join("comsat"))?;
    let image = Removed("rmi", tag.to_owned());
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
        tag,
        &context.path().to_string_lossy(),
    ])?;
    Ok(image)
}

/// A Compose project of one file: `docker compose` where the plugin is
/// installed, else `docker-compose` (Compose v1). `down` (containers,
/// networks and volumes) when dropped.
pub struct Compose {
    tool: Vec<&'static str>,
    project: String,
    file: PathBuf,
    env: Vec<(String, String)>,
}

impl Compose {
    /// Project `project` of `file`, its variables `env`.
    pub fn new(project: &str, file: PathBuf, env: &[(&str, &str)]) -> Result<Self> {
        let plugin = Command::new("docker")
            .args(["compose", "version"])
            .output()
            .is_ok_and(|o| o.status.success());
        let tool = if plugin {
            vec!["docker", "compose"]
        } else {
            Command::new("docker-compose")
                .arg("version")
                .output()
                .context("neither `docker compose` nor `docker-compose` is installed")?;
            vec!["docker-compose"]
        };
        Ok(Self {
            tool,
            project: project.to_owned(),
            file,
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        })
    }

    /// Runs the Compose subcommand `args`, with `extra` variables set too.
    pub fn run(&self, args: &[&str], extra: &[(&str, &str)]) -> Result<String> {
        let mut cmd = Command::new(self.tool[0]);
        cmd.args(&self.tool[1..])
            .args(["--project-name", &self.project, "--file"])
            .arg(&self.file)
            .args(args)
            .env("DOCKER_BUILDKIT", "0");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        for (k, v) in extra {
            cmd.env(k, v);
        }
        output(cmd, &format!("{} {}", self.tool.join(" "), args.join(" ")))
    }

    /// The id of `service`'s container.
    pub fn container(&self, service: &str) -> Result<String> {
        let id = self.run(&["ps", "--quiet", service], &[])?;
        if id.is_empty() || id.contains('\n') {
            bail!("service {service} has no one container: `{id}`");
        }
        Ok(id)
    }

    /// Runs `args` in `service`'s container.
    pub fn exec(&self, service: &str, args: &[&str]) -> Result<String> {
        let id = self.container(service)?;
        let mut all = vec!["exec", id.as_str()];
        all.extend_from_slice(args);
        docker(&all)
    }

    /// The name Compose gives network `name` of this project.
    pub fn network(&self, name: &str) -> String {
        format!("{}_{name}", self.project)
    }

    /// Every service's log, for a failure message.
    pub fn logs(&self) -> String {
        self.run(&["logs", "--no-color", "--tail", "60"], &[])
            .unwrap_or_else(|e| format!("(no logs: {e:#})"))
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        let _ = self.run(
            &["down", "--volumes", "--remove-orphans", "--timeout", "1"],
            &[],
        );
    }
}
