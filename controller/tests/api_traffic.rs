//! What relays report of the links they carry, and what nodes report of
//! their versions, as operators then see it: bytes and a rate per link
//! from the relays that carry it (a relay's report of another relay's link
//! is ignored), versions in the relay and agent lists, and bounds on both.

mod common;

use std::time::Duration;

use common::api::*;
use comsat_protocol::LinkId;
use comsat_protocol::api::{
    self, AgentInfo, AgentLinkStatus, LinkInfo, LinkTraffic, RelayHeartbeat, RelayInfo, RelayLoad,
};
use reqwest::StatusCode;

async fn beat(
    api: &Api,
    relay: &Node,
    traffic: Vec<LinkTraffic>,
    version: Option<&str>,
) -> StatusCode {
    api.client
        .post(api.url(api::PATH_RELAY_HEARTBEAT))
        .bearer_auth(relay.jwt())
        .json(&RelayHeartbeat {
            load: RelayLoad::default(),
            traffic,
            version: version.map(str::to_owned),
            ..RelayHeartbeat::default()
        })
        .send()
        .await
        .expect("send")
        .status()
}

fn moved(link_id: LinkId, a_to_b: u64, b_to_a: u64) -> LinkTraffic {
    LinkTraffic {
        link_id,
        bytes_a_to_b: a_to_b,
        bytes_b_to_a: b_to_a,
        flows_open: 2,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_report_what_links_carry_and_nodes_their_versions() {
    let api = start("relays_per_link = 1\n").await;
    let a = api.enrol_agent("a").await;
    api.enrol_agent("b").await;
    let r1 = api.enrol_relay("r1", "127.0.0.1:4431").await;
    api.heartbeat(&r1).await;
    let resp = api.create_link(&link("db", "a", "b")).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let info: LinkInfo = resp.json().await.expect("json");
    assert_eq!(info.relays, ["r1"]);
    assert_eq!(info.traffic, None, "nothing reported yet");
    // Another relay, not the link's.
    let r2 = api.enrol_relay("r2", "127.0.0.1:4432").await;

    assert_eq!(
        beat(
            &api,
            &r1,
            vec![moved(info.link_id, 1000, 10)],
            Some("9.9.9")
        )
        .await,
        StatusCode::OK
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        beat(&api, &r1, vec![moved(info.link_id, 21_000, 4_010)], None).await,
        StatusCode::OK
    );
    // Relay r2 does not carry the link: what it says of it, later than
    // r1, is not taken.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        beat(&api, &r2, vec![moved(info.link_id, 999_999, 0)], None).await,
        StatusCode::OK
    );
    let info: LinkInfo = api.admin_get(&format!("{}/db", api::PATH_LINKS)).await;
    let t = info.traffic.expect("traffic");
    assert_eq!(
        (
            t.relay.as_str(),
            t.bytes_a_to_b,
            t.bytes_b_to_a,
            t.flows_open
        ),
        ("r1", 21_000, 4_010, 2)
    );
    // 20,000 and 4,000 bytes over the 2 or 3 s between the reports.
    assert!((6_666..=10_000).contains(&t.bytes_per_sec_a_to_b), "{t:?}");
    assert!((1_333..=2_000).contains(&t.bytes_per_sec_b_to_a), "{t:?}");

    let relays: Vec<RelayInfo> = api.admin_get(api::PATH_RELAYS).await;
    let r1_info = relays.iter().find(|r| r.name == "r1").expect("r1");
    assert_eq!(r1_info.version.as_deref(), Some("9.9.9"));
    assert_eq!(
        relays.iter().find(|r| r.name == "r2").expect("r2").version,
        None
    );

    // A draining relay says so with its load.
    let resp = api
        .client
        .post(api.url(api::PATH_RELAY_HEARTBEAT))
        .bearer_auth(r2.jwt())
        .json(&RelayHeartbeat {
            load: RelayLoad {
                draining: true,
                ..RelayLoad::default()
            },
            ..RelayHeartbeat::default()
        })
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::OK);
    let relays: Vec<RelayInfo> = api.admin_get(api::PATH_RELAYS).await;
    assert!(
        relays
            .iter()
            .find(|r| r.name == "r2")
            .expect("r2")
            .load
            .draining
    );
    assert!(
        !relays
            .iter()
            .find(|r| r.name == "r1")
            .expect("r1")
            .load
            .draining
    );

    // Agents report theirs with their link status.
    let resp = api
        .client
        .post(api.url(api::PATH_AGENT_LINK_STATUS))
        .bearer_auth(a.jwt())
        .json(&AgentLinkStatus {
            links: Vec::new(),
            version: Some("1.2.3".into()),
        })
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::OK);
    let agents: Vec<AgentInfo> = api.admin_get(api::PATH_AGENTS).await;
    assert_eq!(
        agents
            .iter()
            .find(|x| x.name == "a")
            .expect("a")
            .version
            .as_deref(),
        Some("1.2.3")
    );

    // Bounds: too many links, or a version that is not one, are refused.
    let many = vec![moved(info.link_id, 1, 1); api::MAX_TRAFFIC_PER_HEARTBEAT + 1];
    assert_eq!(beat(&api, &r1, many, None).await, StatusCode::BAD_REQUEST);
    for bad in ["", "1.0\n<script>", &"9".repeat(65)] {
        assert_eq!(
            beat(&api, &r1, Vec::new(), Some(bad)).await,
            StatusCode::BAD_REQUEST,
            "{bad:?}"
        );
    }
}

/// The flow log over the API: an agent's records of its own links are
/// kept, those of links it does not hold and those out of their limits are
/// left out (the rest of the batch is kept), and a batch over the limit is
/// refused whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_report_flows_of_their_own_links_only() {
    let api = start("").await;
    let ([a, b, c, _], db) = db_between_a_and_b(&api).await;
    let record = |flow_id: u32, caller_id: Option<&str>| api::FlowRecord {
        link_id: db.link_id,
        flow_id,
        side: comsat_protocol::Side::A,
        caller_id: caller_id.map(str::to_owned),
        caller: vec!["unix:uid:1000".into()],
        relay_id: None,
        started_ms: 1_000,
        ended_ms: 2_000 + u64::from(flow_id),
        bytes_sent: 10,
        bytes_received: 20,
        outcome: api::FlowOutcome::Completed,
    };
    let report = async |agent: &Node, flows: Vec<api::FlowRecord>| {
        api.client
            .post(api.url(api::PATH_AGENT_FLOWS))
            .bearer_auth(agent.jwt())
            .json(&api::AgentFlows { flows, dropped: 0 })
            .send()
            .await
            .expect("send")
            .status()
    };
    let good = record(1, Some("spiffe://example.org/app"));
    let bad = record(2, Some("spiffe://Not Valid/x"));
    assert_eq!(report(&a, vec![good.clone(), bad]).await, StatusCode::OK);
    // Agent c holds no half of `db`: its records are left out.
    assert_eq!(report(&c, vec![record(3, None)]).await, StatusCode::OK);
    let too_many = vec![record(4, None); api::MAX_FLOWS_PER_REPORT + 1];
    assert_eq!(report(&b, too_many).await, StatusCode::BAD_REQUEST);
    let flows: Vec<api::FlowInfo> = api.admin_get(api::PATH_FLOWS).await;
    assert_eq!(flows.len(), 1, "{flows:?}");
    assert_eq!(flows[0].record, good);
    assert_eq!(
        (flows[0].link.as_str(), flows[0].agent.as_str()),
        ("db", "a")
    );
    let by_id: Vec<api::FlowInfo> = api
        .admin_get(&format!(
            "{}?identity=spiffe://example.org/app&link=db",
            api::PATH_FLOWS
        ))
        .await;
    assert_eq!(by_id.len(), 1);
    let none: Vec<api::FlowInfo> = api
        .admin_get(&format!("{}?link=nosuchlink", api::PATH_FLOWS))
        .await;
    assert!(none.is_empty());
    let resp = api
        .client
        .get(api.url(&format!("{}?identity=uid:1", api::PATH_FLOWS)))
        .bearer_auth(&api.admin)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
}
