//! The relay forwards the datagrams of a link's UDP flows from one side's
//! connection to the other's, unchanged, and drops (and counts) what it
//! must not forward: a datagram naming a link its connection does not
//! hold, one too short to name a link, one whose peer is away. The agents
//! are raw protocol clients holding the real agents' keys, so the test
//! controls every datagram.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use comsat_controller::dev::DevLink;
use comsat_node::keys::{KeyFile, RandomId};
use comsat_protocol::msg::{AgentToRelay, RelayToAgent, make_hello};
use comsat_protocol::{LinkId, Side, SigningKey, datagram};
use comsat_tests::metric;
use comsat_tests::raw::{Control, RawClient, exporter};

/// One side of the link, attached from a raw connection.
async fn attach(
    relay: SocketAddr,
    ca: &std::path::Path,
    agent: &comsat_controller::dev::DevAgent,
    link_id: LinkId,
    side: Side,
) -> Result<(quinn::Connection, Control)> {
    let key = SigningKey::read_file(&agent.dir.join("node.key"))?;
    let conn = RawClient::new(ca)?.connect(relay).await?;
    let mut ctl = Control::open(&conn, &make_hello(agent.node_id, &key, &exporter(&conn)?)).await?;
    ctl.send(&AgentToRelay::Attach {
        link_id,
        generation: 1,
        side,
    })
    .await?;
    loop {
        match ctl.next().await? {
            RelayToAgent::Attached { link_id: l } if l == link_id => return Ok((conn, ctl)),
            RelayToAgent::Error { code, .. } => bail!("attach refused: {code:?}"),
            _ => {}
        }
    }
}

fn tagged(link: LinkId, payload: &[u8]) -> Bytes {
    let mut d = Vec::new();
    datagram::tag(link, &mut d);
    d.extend_from_slice(payload);
    d.into()
}

async fn next_datagram(conn: &quinn::Connection) -> Result<Bytes> {
    tokio::time::timeout(Duration::from_secs(5), conn.read_datagram())
        .await
        .context("no datagram within 5 s")?
        .context("connection lost")
}

/// Waits (at most 10 s) until `series` on the relay's admin reads `want`.
async fn relay_counts(admin: SocketAddr, series: &str, want: f64) -> Result<String> {
    comsat_tests::wait_for_metric(admin, series, Duration::from_secs(10), |v| v == want).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_forwards_a_links_datagrams_unchanged_and_drops_what_it_must_not() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let layout = common::dev_layout(
        dir.path(),
        &common::Options::one(DevLink {
            name: "dns".into(),
            listen: "tcp://127.0.0.1:0".into(),
            target: "tcp://127.0.0.1:9".into(),
            allowed_uids: vec![],
            allow: vec![],
            proxy_protocol: false,
        }),
        false,
    )?;
    let (_relay, quic, admin) = common::start_relay(&layout.relay_config, dir.path(), "relay")?;
    let link = layout.links[0].1;
    let (a, _ctl_a) = attach(quic, &layout.ca_pem, &layout.agent_a, link, Side::A).await?;
    let (b, _ctl_b) = attach(quic, &layout.ca_pem, &layout.agent_b, link, Side::B).await?;

    // Both ways, each datagram as it was sent (the relay never reads
    // past the link id: these bytes are no sealed datagram at all).
    for i in 0..20u32 {
        let query = tagged(link, format!("query {i}").as_bytes());
        a.send_datagram(query.clone())?;
        assert_eq!(next_datagram(&b).await?, query);
        let answer = tagged(link, &vec![u8::try_from(i)?; 1000]);
        b.send_datagram(answer.clone())?;
        assert_eq!(next_datagram(&a).await?, answer);
    }
    relay_counts(admin, "comsat_relay_datagrams_forwarded_total", 40.0).await?;

    // Another link (granted or not, A's connection does not hold it), and
    // a datagram too short to name one: dropped and counted; what follows
    // still goes through, and is the next thing B reads.
    a.send_datagram(tagged(LinkId::random(), b"elsewhere"))?;
    a.send_datagram(Bytes::from_static(b"short"))?;
    relay_counts(
        admin,
        "comsat_relay_datagrams_dropped_total{reason=\"not_attached\"}",
        1.0,
    )
    .await?;
    relay_counts(
        admin,
        "comsat_relay_datagrams_dropped_total{reason=\"malformed\"}",
        1.0,
    )
    .await?;
    let after = tagged(link, b"after");
    a.send_datagram(after.clone())?;
    assert_eq!(next_datagram(&b).await?, after);

    // B gone (once the relay has seen it leave): nothing is held for
    // it; each of A's datagrams is dropped and counted for a peer away.
    b.close(0u32.into(), b"bye");
    let m = relay_counts(admin, "comsat_relay_links_paired", 0.0).await?;
    let forwarded = metric(&m, "comsat_relay_datagrams_forwarded_total");
    for _ in 0..5 {
        a.send_datagram(tagged(link, b"anyone?"))?;
    }
    let m = relay_counts(
        admin,
        "comsat_relay_datagrams_dropped_total{reason=\"peer_away\"}",
        5.0,
    )
    .await?;
    assert_eq!(
        metric(&m, "comsat_relay_datagrams_forwarded_total"),
        forwarded,
        "{m}"
    );
    Ok(())
}
