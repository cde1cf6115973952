//! The console in a real browser: Debian's Chromium, headless, driven
//! through chromedriver by `tests/browser/console.py` (Selenium), against
//! a controller, a relay and two agents running as processes. It signs in
//! with the admin's token, finds the demo link ready, checks the session
//! cookie's flags and that the page holds no token, saves a screenshot of
//! the overview (under the target directory's `tmp/console-screenshots`),
//! watches the demo link's bytes per second rise while the test keeps a
//! flow going through it and saves a screenshot of that, creates a link and sees it ready, changes its limits and deletes it,
//! creates a join token, signs out; then, signed in as a viewer, finds
//! nothing to change, and a change forged from that session is refused
//! with 403.
//!
//! Runs where `COMSAT_TEST_SELENIUM_PYTHON` names a Python with Selenium
//! and `COMSAT_TEST_CHROMEDRIVER` and `COMSAT_TEST_CHROMIUM` the driver
//! and the browser (CI installs them from Debian's packages and PyPI).

use std::path::Path;
use std::process::Command;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use comsat_tests::fleet::{controller_url, demo, round_trip_eventually};
use comsat_tests::tools::from_env;
use tokio::io::AsyncWriteExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_chromium_signs_in_shows_the_fleet_and_lets_a_viewer_change_nothing()
-> Result<()> {
    let what = "the console's browser test";
    let (Some(python), Some(chromedriver), Some(chromium)) = (
        from_env("COMSAT_TEST_SELENIUM_PYTHON", what),
        from_env("COMSAT_TEST_CHROMEDRIVER", what),
        from_env("COMSAT_TEST_CHROMIUM", what),
    ) else {
        return Ok(());
    };
    let (c, listen, target) = demo().await?;
    round_trip_eventually(listen, 1 << 16)
        .await
        .with_context(|| c.logs())?;
    // A viewer: a service account bound to the built-in role `viewer`.
    let viewer = c.ctl_ok(&["serviceaccount", "create", "looker"])?;
    c.ctl_ok(&[
        "rolebinding",
        "create",
        "looker-views",
        "--role",
        "viewer",
        "--serviceaccount",
        "looker",
    ])?;
    let dir = tempfile::tempdir()?;
    let viewer_file = dir.path().join("viewer.token");
    std::fs::write(&viewer_file, viewer.trim())?;
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots");
    std::fs::create_dir_all(&shots)?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/console.py");

    let web = comsat_tests::fleet::free_tcp_port()?;
    // A flow through the demo link, about 3 MB/s, while the browser looks.
    let flowing = Arc::new(AtomicBool::new(true));
    let flow = tokio::spawn({
        let flowing = flowing.clone();
        async move {
            let mut sock = tokio::net::TcpStream::connect(listen).await?;
            let chunk = vec![7u8; 64 * 1024];
            let started = std::time::Instant::now();
            while flowing.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(120) {
                sock.write_all(&chunk).await?;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            sock.shutdown().await?;
            anyhow::Ok(())
        }
    });
    let out = tokio::task::spawn_blocking({
        let (url, admin) = (controller_url(&c)?, c.path("controller/admin.token"));
        let shots = shots.clone();
        move || {
            Command::new(python)
                .arg(script)
                .arg("--url")
                .arg(url)
                .arg("--admin-token-file")
                .arg(admin)
                .arg("--viewer-token-file")
                .arg(viewer_file)
                .arg("--screenshots")
                .arg(shots)
                .args(["--chromedriver", &chromedriver, "--chromium", &chromium])
                .arg("--listen")
                .arg(format!("tcp://127.0.0.1:{web}"))
                .arg("--target")
                .arg(format!("tcp://{target}"))
                .output()
        }
    })
    .await??;
    flowing.store(false, Ordering::Relaxed);
    flow.await?.context("the flow through the demo link")?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{said}");
    ensure!(out.status.success(), "the browser test failed:\n{said}");
    for shot in ["overview.png", "link-under-traffic.png"] {
        ensure!(
            shots.join(shot).metadata()?.len() > 1_000,
            "no screenshot {shot}"
        );
    }
    let admin = std::fs::read_to_string(c.path("controller/admin.token"))?;
    let secret = admin.trim().rsplit(':').next().context("token")?;
    ensure!(!c.logs().contains(secret), "a log holds the admin token");
    Ok(())
}
