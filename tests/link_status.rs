//! Link status from the edge, with the real `comsat` binary as processes:
//! a link whose listener cannot bind shows `failed` with the operating
//! system's reason in `ctl link list`, `show` and `-o json`, and turns
//! `ready` by itself once the address is free, carrying bytes, with no
//! restart.

#[path = "common/fleet.rs"]
mod fleet;

use std::time::Instant;

use anyhow::{Context, Result, ensure};
use comsat_protocol::api;
use fleet::*;

/// The row of link `name` in `ctl link list`: its cells.
fn row(c: &Fleet, name: &str) -> Result<Vec<String>> {
    let table = c.ctl_ok(&["link", "list"])?;
    ensure!(table.starts_with("NAME  "), "{table}");
    table
        .lines()
        .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .find(|cells| cells.first().is_some_and(|n| n == name))
        .with_context(|| format!("no link {name} in\n{table}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_that_cannot_listen_shows_failed_with_why_and_turns_ready_once_it_can() -> Result<()>
{
    let mut c = Fleet::builder().relays(1).agents(&["a", "b"]).start()?;
    let target = hash_server().await?;
    // Another program holds the address the link is to listen on.
    let held = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = held.local_addr()?;
    let created = Instant::now();
    c.ctl_ok(&[
        "link",
        "create",
        "busy",
        "--from",
        "a",
        "--listen",
        &format!("tcp://{addr}"),
        "--to",
        "b",
        "--target",
        &format!("tcp://{target}"),
    ])?;

    wait_for(CONVERGE, || {
        let cells = row(&c, "busy")?;
        ensure!(cells.get(1).is_some_and(|s| s == "failed"), "{cells:?}");
        Ok(())
    })
    .with_context(|| c.logs())?;
    eprintln!("shown failed {:?} after it was created", created.elapsed());
    let shown = c.ctl_ok(&["link", "show", "busy"])?;
    let first = shown.lines().next().unwrap_or_default();
    ensure!(
        first.starts_with("status:     failed since ")
            && first.contains(&format!(
                ": a: cannot listen on tcp://{addr}: Address already in use (os error 98)"
            )),
        "{shown}"
    );
    ensure!(shown.contains("\n  from      a failed since "), "{shown}");
    let json: api::LinkInfo =
        serde_json::from_str(&c.ctl_ok(&["link", "show", "busy", "-o", "json"])?)?;
    ensure!(json.status.state == api::LinkState::Failed, "{json:?}");
    let from = &json.status.halves[0];
    ensure!(
        from.agent == "a"
            && from.state == api::LinkState::Failed
            && from
                .reason
                .as_deref()
                .is_some_and(|r| r.contains("Address already in use"))
            && from.since.is_some(),
        "{from:?}"
    );

    // The address is freed: the agent binds it by itself, the link turns
    // ready and carries bytes.
    drop(held);
    let freed = Instant::now();
    wait_for(CONVERGE, || {
        let cells = row(&c, "busy")?;
        ensure!(cells.get(1).is_some_and(|s| s == "ready"), "{cells:?}");
        Ok(())
    })
    .with_context(|| c.logs())?;
    eprintln!(
        "shown ready {:?} after the address was freed",
        freed.elapsed()
    );
    round_trip_eventually(addr, 1 << 20)
        .await
        .with_context(|| c.logs())?;
    let shown = c.ctl_ok(&["link", "show", "busy"])?;
    ensure!(shown.starts_with("status:     ready since "), "{shown}");
    ensure!(
        shown.contains("\n  from      a ready since ") && shown.contains(" on relay-1\n"),
        "{shown}"
    );
    // Nothing was restarted: agent a logged its start once.
    let log = c.agent("a")?.log();
    ensure!(
        log.matches("agent started name=a").count() == 1,
        "agent a restarted:\n{log}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_that_never_bound_its_socket_leaves_the_socket_of_another_program_alone()
-> Result<()> {
    let mut c = Fleet::builder().relays(1).agents(&["a", "b"]).start()?;
    let sockets = tempfile::tempdir()?;
    std::fs::write(
        c.path("a").join("consent.toml"),
        format!("listen = [\"unix://{}/*\"]\n", sockets.path().display()),
    )?;
    c.agent("a")?.kill();
    c.run_agent("a")?;
    // Another program listens on the socket the link is to listen on.
    let sock = sockets.path().join("app.sock");
    let theirs = std::os::unix::net::UnixListener::bind(&sock)?;
    c.ctl_ok(&[
        "link",
        "create",
        "taken",
        "--from",
        "a",
        "--listen",
        &format!("unix://{}", sock.display()),
        "--to",
        "b",
        "--target",
        "tcp://127.0.0.1:1",
    ])?;
    wait_for(CONVERGE, || {
        let shown = c.ctl_ok(&["link", "show", "taken"])?;
        ensure!(
            shown.starts_with("status:     failed since ")
                && shown.contains("another process is listening on this socket"),
            "{shown}"
        );
        Ok(())
    })
    .with_context(|| c.logs())?;

    // Deleted: the agent lets go of the link, and of nothing else.
    c.ctl_ok(&["link", "delete", "taken"])?;
    c.agent("a")?
        .wait_line("comsat agent link taken removed", CONVERGE)
        .with_context(|| c.logs())?;
    ensure!(sock.exists(), "the agent removed another program's socket");
    let client = std::os::unix::net::UnixStream::connect(&sock)?;
    let (_accepted, _) = theirs.accept()?;
    drop(client);
    Ok(())
}
