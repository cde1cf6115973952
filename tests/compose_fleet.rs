//! The Compose fleet of `deploy/compose`, run from the image built from
//! this binary: a controller, two relays and two agents, each in its own
//! container; the agents on two networks with no route to each other, each
//! reaching only the relays and the controller. The test plays the
//! applications: it connects to edge-a's Unix listener and serves edge-b's
//! target through the directories the agents' `/run/comsat` are. Three
//! transfers of 256 MiB (4 flows, 32 MiB each way each), every byte's
//! SHA-256 checked, go through:
//!
//! 1. `docker kill` of the relay carrying the link, mid-transfer;
//! 2. a rolling replacement of both relays with a newly tagged image
//!    (`docker compose up` of one relay, then the other: each drains on
//!    SIGTERM, its links move to the other relay, the new container is the
//!    same relay from its volume);
//! 3. edge-a cut off its network for 3 s (`docker network disconnect`).
//!
//! Each loses nothing and no application sees a reset (every flow ends
//! with all its bytes, and both agents count 0 failed flows). Runs where
//! `COMSAT_TEST_DOCKER_BASE` names a local base image, as the image test
//! does; every container, network, volume and image it makes is removed,
//! by name, when it ends.

mod common;
#[path = "common/transfer.rs"]
mod transfer;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use comsat_protocol::api;
use comsat_tests::docker::{Compose, build_image, docker};
use comsat_tests::fleet::wait_for;
use comsat_tests::metric;
use tokio::net::{UnixListener, UnixStream};
use transfer::Bulk;

const BIN: &str = env!("CARGO_BIN_EXE_comsat");
const RELAYS: [&str; 2] = ["relay-1", "relay-2"];
const AGENTS: [&str; 2] = ["edge-a", "edge-b"];
/// The image's user, which owns what the agents make.
const COMSAT_UID: u32 = 10001;
/// How long the fleet may take to come up or settle after a change.
const SETTLE: Duration = Duration::from_secs(120);

/// Runs blocking `f` (a docker command) without stalling the transfer's
/// tasks on this worker thread.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// `comsat ctl ARGS` in the controller's container (its context is the
/// admin's, from `controller init`).
fn ctl(c: &Compose, args: &[&str]) -> Result<String> {
    let mut all = vec!["comsat", "ctl"];
    all.extend_from_slice(args);
    c.exec("controller", &all)
}

/// `GET path` on `service`'s admin address (loopback in its container).
fn admin_get(c: &Compose, service: &str, path: &str) -> Result<String> {
    c.exec(
        service,
        &[
            "bash",
            "-c",
            &format!(
                "exec 3<>/dev/tcp/127.0.0.1/9101 && \
                 printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3"
            ),
        ],
    )
}

fn series(c: &Compose, service: &str, name: &str) -> Result<f64> {
    Ok(metric(&admin_get(c, service, "/metrics")?, name))
}

/// Waits until relay `service` answers `/readyz` with 200 and runs `image`.
fn wait_relay_ready(c: &Compose, service: &str, image: &str) -> Result<()> {
    wait_for(SETTLE, || {
        let id = c.container(service)?;
        let running = docker(&["inspect", "--format", "{{.Config.Image}}", &id])?;
        ensure!(running == image, "{service} runs {running}, not {image}");
        let ready = admin_get(c, service, "/readyz")?;
        ensure!(
            ready.starts_with("HTTP/1.0 200") || ready.starts_with("HTTP/1.1 200"),
            "{service}: {ready}"
        );
        Ok(())
    })
    .with_context(|| c.logs())
}

/// The relay the link is paired on.
fn carrying_relay(c: &Compose) -> Result<&'static str> {
    let mut found = None;
    wait_for(SETTLE, || {
        for relay in RELAYS {
            if series(c, relay, "comsat_relay_links_paired")? == 1.0 {
                found = Some(relay);
                return Ok(());
            }
        }
        bail!("no relay has the link paired")
    })?;
    found.context("no carrying relay")
}

/// Neither agent counted a failed flow (one the application saw reset).
fn assert_no_application_failures(c: &Compose) -> Result<()> {
    for agent in AGENTS {
        let failed = series(c, agent, "comsat_agent_flows_failed_total")?;
        ensure!(failed == 0.0, "{agent} counts {failed} failed flows");
    }
    Ok(())
}

/// A directory the agents (uid 10001 in their containers) can make
/// sockets in.
fn app_dir(root: &Path, name: &str) -> Result<String> {
    let dir = root.join(name);
    std::fs::create_dir(&dir)?;
    if std::os::unix::fs::chown(&dir, Some(COMSAT_UID), Some(COMSAT_UID)).is_err() {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))?;
    }
    Ok(dir.to_string_lossy().into_owned())
}

/// Brings the fleet up: the controller, then each node enrolled with the
/// join token the controller gives it, then a link `bulk` from a Unix
/// socket of edge-a to one of edge-b.
fn fleet_up(c: &Compose, tokens: &Path, image: &str) -> Result<()> {
    c.run(&["up", "--detach"], &[])?;
    wait_for(SETTLE, || ctl(c, &["status"]).map(drop)).with_context(|| c.logs())?;
    for (kind, names) in [("relay", RELAYS), ("agent", AGENTS)] {
        for name in names {
            let token = ctl(c, &["token", "create", "--kind", kind, "--name", name])?;
            // Readable by the nodes' user; one-time, and gone with the test.
            std::fs::write(tokens.join(name), token)?;
        }
    }
    for relay in RELAYS {
        wait_relay_ready(c, relay, image)?;
    }
    wait_for(SETTLE, || {
        let out = ctl(c, &["relay", "list", "-o", "json"])?;
        let relays: Vec<api::RelayInfo> = serde_json::from_str(&out)?;
        ensure!(relays.iter().filter(|r| r.healthy).count() == 2, "{out}");
        let out = ctl(c, &["agent", "list", "-o", "json"])?;
        let agents: Vec<api::AgentInfo> = serde_json::from_str(&out)?;
        ensure!(agents.iter().all(|a| a.last_seen.is_some()), "{out}");
        ensure!(agents.len() == 2, "{out}");
        Ok(())
    })
    .with_context(|| c.logs())?;
    ctl(
        c,
        &[
            "link",
            "create",
            "bulk",
            "--from",
            "edge-a",
            "--listen",
            "unix:///run/comsat/bulk.sock",
            "--to",
            "edge-b",
            "--target",
            "unix:///run/comsat/target.sock",
        ],
    )?;
    Ok(())
}

/// The agents' networks reach the relays and the controller, not each
/// other: edge-b's name does not resolve in edge-a, and its address is
/// not routed there (a connection is not refused by edge-b: it never
/// gets there).
fn assert_edges_apart(c: &Compose) -> Result<()> {
    c.exec("edge-a", &["getent", "hosts", "relay-1"])?;
    c.exec("edge-a", &["getent", "hosts", "controller"])?;
    ensure!(
        c.exec("edge-a", &["getent", "hosts", "edge-b"]).is_err(),
        "edge-b's name resolves in edge-a"
    );
    let b = c.container("edge-b")?;
    let ip = docker(&[
        "inspect",
        "--format",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        &b,
    ])?;
    let tried = c.exec(
        "edge-a",
        &[
            "timeout",
            "3",
            "bash",
            "-c",
            &format!("exec 3<>/dev/tcp/{ip}/9101"),
        ],
    );
    match tried {
        Ok(_) => bail!("edge-a connected to edge-b at {ip}"),
        Err(e) => ensure!(
            !format!("{e:#}").contains("refused"),
            "edge-b at {ip} answered edge-a: {e:#}"
        ),
    }
    Ok(())
}

/// The fleet and the test's two ends of link `bulk`: edge-a's listener
/// and edge-b's target, in the directories the agents' `/run/comsat` are.
struct Apps<'a> {
    c: &'a Compose,
    listen: PathBuf,
    target: PathBuf,
}

impl Apps<'_> {
    /// A transfer through the link, slowed until [`Bulk::full_speed`].
    fn bulk(&self) -> Result<Bulk> {
        let _ = std::fs::remove_file(&self.target);
        let target = UnixListener::bind(&self.target)?;
        // Open to the agent's user.
        std::fs::set_permissions(&self.target, std::fs::Permissions::from_mode(0o777))?;
        let listen = self.listen.clone();
        Ok(Bulk::over(
            move || UnixStream::connect(listen.clone()),
            target,
            true,
        ))
    }

    /// Lets `transfer` finish at full speed; nothing may be lost, and no
    /// agent counts a failed flow.
    async fn finish(&self, transfer: Bulk, what: &str) -> Result<()> {
        transfer.full_speed();
        transfer
            .finish()
            .await
            .with_context(|| format!("{what}: {}", self.c.logs()))?;
        blocking(|| assert_no_application_failures(self.c))
    }

    /// 1. The relay carrying the link killed mid-transfer; it is started
    ///    again after.
    async fn killed_relay(&self, image: &str) -> Result<()> {
        let c = self.c;
        let transfer = self.bulk()?;
        transfer.reach(Bulk::TOTAL / 16).await?;
        let carrying = blocking(|| carrying_relay(c))?;
        let id = blocking(|| c.container(carrying))?;
        blocking(|| docker(&["kill", &id]))?;
        eprintln!(
            "killed {carrying} at {} of {} bytes",
            transfer.progress.load(Ordering::Relaxed),
            Bulk::TOTAL
        );
        transfer.reach(Bulk::TOTAL / 8).await?;
        self.finish(transfer, "through a killed relay").await?;
        blocking(|| {
            c.run(&["start", carrying], &[])?;
            wait_relay_ready(c, carrying, image)
        })
    }

    /// 2. Both relays replaced by the image `next`, one after the other.
    async fn rolling_upgrade(&self, next: &str) -> Result<()> {
        let c = self.c;
        let transfer = self.bulk()?;
        transfer.reach(Bulk::TOTAL / 16).await?;
        for relay in RELAYS {
            let took = Instant::now();
            blocking(|| {
                c.run(
                    &["up", "--detach", "--no-deps", relay],
                    &[("COMSAT_RELAY_IMAGE", next)],
                )?;
                wait_relay_ready(c, relay, next)
            })?;
            eprintln!("{relay} replaced in {:?}", took.elapsed());
        }
        ensure!(
            transfer.progress.load(Ordering::Relaxed) < Bulk::TOTAL,
            "the transfer ended before both relays were replaced"
        );
        self.finish(transfer, "through a rolling upgrade").await?;
        for agent in AGENTS {
            let drains = blocking(|| series(c, agent, "comsat_agent_relay_drains_total"))?;
            ensure!(drains >= 1.0, "{agent} saw no relay drain");
        }
        Ok(())
    }

    /// 3. edge-a cut off its network for 3 s.
    async fn cut_network(&self) -> Result<()> {
        let c = self.c;
        let transfer = self.bulk()?;
        transfer.reach(Bulk::TOTAL / 16).await?;
        let edge_a = blocking(|| c.container("edge-a"))?;
        let network = c.network("edge-a");
        blocking(|| docker(&["network", "disconnect", &network, &edge_a]))?;
        let cut_at = transfer.progress.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(3)).await;
        blocking(|| docker(&["network", "connect", &network, &edge_a]))?;
        let back_at = transfer.progress.load(Ordering::Relaxed);
        eprintln!(
            "edge-a cut off for 3 s: {} bytes arrived meanwhile",
            back_at - cut_at
        );
        self.finish(transfer, "through a cut network").await?;
        // edge-a knew its own network was down (no route toward its
        // relay): it waited for it and went back to the same relay, where
        // edge-b still was, rather than blaming the relay and moving.
        let offline = blocking(|| series(c, "edge-a", "comsat_agent_relay_offline_total"))?;
        ensure!(offline >= 1.0, "edge-a did not see its network down");
        let offline = blocking(|| series(c, "edge-b", "comsat_agent_relay_offline_total"))?;
        ensure!(offline == 0.0, "edge-b, never cut off, counts {offline}");
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn a_compose_fleet_loses_nothing_to_a_killed_relay_a_rolling_upgrade_or_a_cut_network()
-> Result<()> {
    let Some(base) = comsat_tests::tools::from_env(
        "COMSAT_TEST_DOCKER_BASE",
        "the Compose fleet test (it builds the image)",
    ) else {
        return Ok(());
    };
    let run = format!("{:08x}", rand::random::<u32>());
    let image = format!("comsat-fleet-test:{run}");
    let next = format!("comsat-fleet-test:{run}-next");
    let _image = build_image(&base, BIN, &image)?;
    docker(&["tag", &image, &next])?;
    let _next = comsat_tests::docker::Removed("rmi", next.clone());

    let dir = tempfile::tempdir()?;
    let tokens = dir.path().join("tokens");
    std::fs::create_dir(&tokens)?;
    let (a, b) = (app_dir(dir.path(), "a")?, app_dir(dir.path(), "b")?);
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/compose/compose.yaml");
    let tokens_dir = tokens.to_string_lossy().into_owned();
    let c = Compose::new(
        &format!("comsat-fleet-{run}"),
        file,
        &[
            ("COMSAT_IMAGE", image.as_str()),
            ("COMSAT_RELAY_IMAGE", image.as_str()),
            ("COMSAT_TOKENS", tokens_dir.as_str()),
            ("COMSAT_APP_A", a.as_str()),
            ("COMSAT_APP_B", b.as_str()),
        ],
    )?;
    let started = Instant::now();
    blocking(|| fleet_up(&c, &tokens, &image))?;
    blocking(|| assert_edges_apart(&c))?;
    let apps = Apps {
        c: &c,
        listen: Path::new(&a).join("bulk.sock"),
        target: Path::new(&b).join("target.sock"),
    };
    blocking(|| {
        wait_for(SETTLE, || {
            let out = ctl(&c, &["link", "show", "bulk", "-o", "json"])?;
            let link: serde_json::Value = serde_json::from_str(&out)?;
            ensure!(link["status"]["state"] == "ready", "{out}");
            ensure!(apps.listen.exists(), "no {}", apps.listen.display());
            Ok(())
        })
    })
    .with_context(|| c.logs())?;
    eprintln!("fleet up, link ready, in {:?}", started.elapsed());

    apps.killed_relay(&image).await?;
    apps.rolling_upgrade(&next).await?;
    apps.cut_network().await?;
    eprintln!("all of it in {:?}", started.elapsed());
    Ok(())
}
