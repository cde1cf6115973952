//! The console against a running fleet (real processes): signing in with
//! the admin's API token and working through the session never puts the
//! token in a page, an answer or the controller's log; the session sees
//! the demo link ready with what it carried (as its relay reported), the
//! nodes' versions, changes the link (with its CSRF token), and signs out.

use anyhow::{Context, Result, ensure};
use comsat_protocol::api::{self, ConsoleSessionInfo, LinkInfo};
use comsat_tests::fleet::{controller_url, demo, http_client, round_trip_eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_works_through_its_session_and_never_shows_or_logs_the_token() -> Result<()> {
    let (c, listen, _) = demo().await?;
    round_trip_eventually(listen, 1 << 16)
        .await
        .with_context(|| c.logs())?;
    let url = controller_url(&c)?;
    let admin = std::fs::read_to_string(c.path("controller/admin.token"))?;
    let admin = admin.trim();
    let http = http_client(&c)?;
    // Everything the browser would be given.
    let mut shown = String::new();
    for path in [
        api::PATH_CONSOLE,
        api::PATH_CONSOLE_SCRIPT,
        api::PATH_CONSOLE_STYLE,
    ] {
        let resp = http.get(format!("{url}{path}")).send().await?;
        ensure!(resp.status() == 200, "{path}: {}", resp.status());
        shown.push_str(&resp.text().await?);
    }

    let resp = http
        .post(format!("{url}{}", api::PATH_CONSOLE_SESSION))
        .json(&serde_json::json!({ "token": admin }))
        .send()
        .await?;
    ensure!(resp.status() == 201, "sign-in: {}", resp.status());
    let set_cookie = resp.headers()["set-cookie"].to_str()?.to_owned();
    shown.push_str(&set_cookie);
    let cookie = set_cookie.split(';').next().context("cookie")?.to_owned();
    let body = resp.text().await?;
    shown.push_str(&body);
    let session: ConsoleSessionInfo = serde_json::from_str(&body)?;

    // The demo link turns ready once its agents report it (within a
    // second or so).
    let mut tries = 0;
    loop {
        let resp = http
            .get(format!("{url}{}", api::PATH_LINKS))
            .header("cookie", &cookie)
            .send()
            .await?;
        ensure!(resp.status() == 200, "links: {}", resp.status());
        let body = resp.text().await?;
        shown.push_str(&body);
        let links: Vec<LinkInfo> = serde_json::from_str(&body)?;
        let demo = links
            .iter()
            .find(|l| l.spec.name == "demo")
            .context("demo")?;
        // The relay reports what the link carried with its next heartbeat
        // (every 5 s): at least the 64 KiB sent, as ciphertext.
        let carried = demo
            .traffic
            .as_ref()
            .is_some_and(|t| t.relay == "relay-1" && t.bytes_a_to_b >= 1 << 16);
        if demo.status.state == api::LinkState::Ready && carried {
            break;
        }
        tries += 1;
        ensure!(
            tries < 200,
            "not ready: {:?} {:?}",
            demo.status,
            demo.traffic
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    let relays: Vec<api::RelayInfo> = http
        .get(format!("{url}{}", api::PATH_RELAYS))
        .header("cookie", &cookie)
        .send()
        .await?
        .json()
        .await?;
    ensure!(
        !relays.is_empty()
            && relays
                .iter()
                .all(|r| r.version.as_deref() == Some(env!("CARGO_PKG_VERSION"))),
        "{relays:?}"
    );

    let resp = http
        .patch(format!("{url}{}/demo", api::PATH_LINKS))
        .header("cookie", &cookie)
        .header("x-csrf-token", &session.csrf)
        .json(&serde_json::json!({ "max_flows": 50 }))
        .send()
        .await?;
    ensure!(resp.status() == 200, "update: {}", resp.status());
    shown.push_str(&resp.text().await?);
    let resp = http
        .delete(format!("{url}{}", api::PATH_CONSOLE_SESSION))
        .header("cookie", &cookie)
        .header("x-csrf-token", &session.csrf)
        .send()
        .await?;
    ensure!(resp.status() == 204, "sign-out: {}", resp.status());
    let resp = http
        .get(format!("{url}{}", api::PATH_LINKS))
        .header("cookie", &cookie)
        .send()
        .await?;
    ensure!(resp.status() == 401, "after sign-out: {}", resp.status());

    let audit = c.ctl_ok(&["audit", "list", "--subject", "user:admin", "-o", "json"])?;
    for action in ["session.create", "link.update", "session.delete"] {
        ensure!(audit.contains(action), "no {action} in {audit}");
    }
    ensure!(!shown.contains(admin), "the console showed the token");
    let secret = admin.rsplit(':').next().context("token")?;
    ensure!(
        !c.logs().contains(secret),
        "a log holds the token:\n{}",
        c.logs()
    );
    Ok(())
}
