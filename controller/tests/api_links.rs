//! The HTTPS API in process: links' limits, their relays and their
//! connections.

mod common;

use std::time::{Duration, Instant};

use common::api::*;
use comsat_protocol::api::{self, LinkInfo, LinkSpec, RelayEventKind, RelayInfo};
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_max_flows_is_granted_and_updated_without_a_new_generation() {
    let mut api = start("grant_ttl_secs = 60\n").await;
    let a = api.enrol_agent("a").await;
    let b = api.enrol_agent("b").await;
    let r1 = api.enrol_relay("r1", "127.0.0.1:4431").await;
    let r2 = api.enrol_relay("r2", "127.0.0.1:4432").await;
    api.heartbeat(&r1).await;
    api.heartbeat(&r2).await;

    out_of_range_max_flows_create_nothing(&api).await;

    // Created with a limit: shown everywhere, and in every relay's grant.
    let mut body = link("db", "a", "b");
    body.max_flows = Some(8);
    let resp = api.create_link(&body).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let info: LinkInfo = resp.json().await.expect("json");
    assert_eq!((info.spec.max_flows, info.generation), (Some(8), 1));
    assert_eq!(info.relays.len(), 2);
    let one: LinkInfo = api.admin_get(&format!("{}/db", api::PATH_LINKS)).await;
    assert_eq!(one, info);
    let listed: Vec<LinkInfo> = api.admin_get(api::PATH_LINKS).await;
    assert_eq!(listed, vec![info.clone()]);
    // A link created without one is unlimited.
    let resp = api.create_link(&link("free", "b", "a")).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let free: LinkInfo = resp.json().await.expect("json");
    assert_eq!(free.spec.max_flows, None);

    let mut cursors = both_grants_carry_their_limits(&api, [&r1, &r2], &info, &free).await;
    let a_version = api.config(&a, 0, 0).await.version;
    let b_version = api.config(&b, 0, 0).await.version;

    // PATCH: same generation, new limit, one new grant per assigned relay;
    // the agents' desired state does not change.
    let resp = api.patch_link("db", &json!({ "max_flows": 3 })).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let patched: LinkInfo = resp.json().await.expect("json");
    assert_eq!(
        patched,
        LinkInfo {
            spec: LinkSpec {
                max_flows: Some(3),
                ..info.spec.clone()
            },
            ..info.clone()
        }
    );
    let one: LinkInfo = api.admin_get(&format!("{}/db", api::PATH_LINKS)).await;
    assert_eq!(one, patched);
    for (r, cursor) in [&r1, &r2].into_iter().zip(cursors.iter_mut()) {
        let (g, next) = one_grant(&api, r, *cursor).await;
        assert_eq!(g.link_id, info.link_id);
        assert_eq!(g.generation, 1);
        assert_eq!(g.limits.max_flows, Some(3));
        *cursor = next;
    }
    let started = Instant::now();
    let a_now = api.config(&a, a_version, 300).await;
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert_eq!(a_now.version, a_version);
    assert_eq!(api.config(&b, 0, 0).await.version, b_version);

    grant_renewal_keeps_the_limit(&api, [&r1, &r2], &info, &mut cursors).await;

    // A rate limit: the flow limit stays, the generation too.
    let resp = api
        .patch_link("db", &json!({ "rate_limit_bytes_per_sec": 1_048_576 }))
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let patched: LinkInfo = resp.json().await.expect("json");
    assert_eq!(
        (
            patched.spec.max_flows,
            patched.spec.rate_limit_bytes_per_sec,
            patched.generation
        ),
        (Some(3), Some(1_048_576), 1)
    );
    for (r, cursor) in [&r1, &r2].into_iter().zip(cursors.iter_mut()) {
        let (g, next) = one_grant(&api, r, *cursor).await;
        assert_eq!(g.generation, 1);
        assert_eq!(g.limits.max_flows, Some(3));
        assert_eq!(g.limits.rate_bytes_per_sec, Some(1_048_576));
        *cursor = next;
    }

    // Back to unlimited flows (0); the rate limit stays.
    let resp = api.patch_link("db", &json!({ "max_flows": 0 })).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let patched: LinkInfo = resp.json().await.expect("json");
    assert_eq!((patched.spec.max_flows, patched.generation), (None, 1));
    assert_eq!(patched.spec.rate_limit_bytes_per_sec, Some(1_048_576));
    for (r, cursor) in [&r1, &r2].into_iter().zip(cursors.iter_mut()) {
        let (g, next) = one_grant(&api, r, *cursor).await;
        assert_eq!((g.generation, g.limits.max_flows), (1, None));
        assert_eq!(g.limits.rate_bytes_per_sec, Some(1_048_576));
        *cursor = next;
    }

    bad_patches_push_nothing(&api, [&r1, &r2], &cursors).await;
    let one: LinkInfo = api.admin_get(&format!("{}/db", api::PATH_LINKS)).await;
    assert_eq!(one.spec.max_flows, None);
    assert_eq!(api.config(&a, 0, 0).await.version, a_version);

    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_move_off_a_relay_that_stops_heartbeating() {
    let mut api = start("heartbeat_interval_secs = 1\nheartbeat_timeout_secs = 2\n").await;
    let _a = api.enrol_agent("a").await;
    let _b = api.enrol_agent("b").await;
    let relays = vec![
        api.enrol_relay("r1", "127.0.0.1:4431").await,
        api.enrol_relay("r2", "127.0.0.1:4432").await,
        api.enrol_relay("r3", "127.0.0.1:4433").await,
    ];
    for r in &relays {
        api.heartbeat(r).await;
    }
    let mut body = link("db", "a", "b");
    body.max_flows = Some(4);
    let resp = api.create_link(&body).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let info: LinkInfo = resp.json().await.expect("json");
    assert_eq!(info.relays.len(), 2);
    let dead_name = info.relays[0].clone();
    let dead = relays
        .iter()
        .find(|r| r.enrolled.name == dead_name)
        .expect("dead relay");
    let dead_cursor = api.events(dead, 0, 0).await.next;

    let deadline = Instant::now() + Duration::from_secs(15);
    let moved = loop {
        assert!(
            Instant::now() < deadline,
            "link never moved off {dead_name}"
        );
        for r in relays.iter().filter(|r| r.enrolled.name != dead_name) {
            api.heartbeat(r).await;
        }
        let now: LinkInfo = api.admin_get(&format!("{}/db", api::PATH_LINKS)).await;
        if !now.relays.contains(&dead_name) {
            break now;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(moved.generation, 2);
    assert_eq!(moved.relays.len(), 2);
    // The surviving relay keeps its place as primary.
    assert_eq!(moved.relays[0], info.relays[1]);
    let ev = api.events(dead, dead_cursor, 0).await;
    assert_eq!(ev.events.len(), 1);
    assert_eq!(ev.events[0].kind, RelayEventKind::Revoke);
    let newcomer = relays
        .iter()
        .find(|r| r.enrolled.name == moved.relays[1])
        .expect("newcomer");
    let ev = api.events(newcomer, 0, 0).await;
    let RelayEventKind::Grant { grant } = &ev.events.last().expect("grant").kind else {
        panic!("expected a grant");
    };
    let g = verify_grant(
        grant,
        &newcomer.enrolled.authority_public_key,
        &newcomer.relay_id(),
    );
    assert_eq!(g.generation, 2);
    // Reassignment keeps the link's limits.
    assert_eq!(g.limits.max_flows, Some(4));
    assert_eq!(moved.spec.max_flows, Some(4));
    let relays_now: Vec<RelayInfo> = api.admin_get(api::PATH_RELAYS).await;
    let dead_info = relays_now
        .iter()
        .find(|r| r.name == dead_name)
        .expect("listed");
    assert!(!dead_info.healthy);
    assert_eq!(dead_info.links, 0);
    api.stop().await;
}

#[tokio::test]
async fn links_of_their_own_connection_reach_agents_with_the_interactive_listener() {
    let mut api = start("").await;
    // A relay's interactive listener is on the host its certificate names,
    // on a port of its own; anything else is refused, naming the field.
    for (bad, says) in [
        ("10.0.0.1:4434", "host of public_addr"),
        ("127.0.0.1:4433", "port of its own"),
        ("127.0.0.1", "HOST:PORT"),
    ] {
        let (_, resp) = api.try_enrol_relay("r0", "127.0.0.1:4433", Some(bad)).await;
        let (code, msg) = error_of(resp).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{bad}");
        assert!(
            msg.contains("interactive_addr") && msg.contains(says),
            "{bad}: {msg}"
        );
    }
    let (key, resp) = api
        .try_enrol_relay("r1", "127.0.0.1:4433", Some("127.0.0.1:4434"))
        .await;
    let r1 = api.enrolled_relay(key, resp).await;
    let r2 = api.enrol_relay("r2", "127.0.0.1:4435").await;
    api.heartbeat(&r1).await;
    api.heartbeat(&r2).await;
    let relays: Vec<RelayInfo> = api.admin_get(api::PATH_RELAYS).await;
    let lane = |name: &str| {
        relays
            .iter()
            .find(|r| r.name == name)
            .map(|r| r.interactive_addr.clone())
    };
    assert_eq!(lane("r1"), Some(Some("127.0.0.1:4434".into())));
    assert_eq!(lane("r2"), Some(None));

    let a = api.enrol_agent("a").await;
    let b = api.enrol_agent("b").await;
    let long = "x".repeat(api::MAX_CONNECTION_NAME_LEN + 1);
    for bad in ["", "has space", "a/b", long.as_str()] {
        let mut body = link("ssh", "a", "b");
        body.connection = Some(bad.into());
        let (code, msg) = error_of(api.create_link(&body).await).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{bad:?}");
        assert!(msg.starts_with("connection `"), "{msg}");
    }
    let mut body = link("ssh", "a", "b");
    body.connection = Some("interactive".into());
    let resp = api.create_link(&body).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let info: LinkInfo = resp.json().await.expect("json");
    assert_eq!(info.spec.connection.as_deref(), Some("interactive"));
    let shown: LinkInfo = api.admin_get(&format!("{}/ssh", api::PATH_LINKS)).await;
    assert_eq!(shown, info);
    let mut bulk = link("bulk", "a", "b");
    bulk.listen = "tcp://127.0.0.1:7001".into();
    let resp = api.create_link(&bulk).await;
    assert_eq!(resp.status(), StatusCode::CREATED);

    // Both agents get the link's connection and every relay's interactive
    // address where it has one; the shared link gets none.
    for agent in [&a, &b] {
        let desired = api.config(agent, 0, 0).await;
        let get = |name: &str| {
            desired
                .links
                .iter()
                .find(|l| l.name == name)
                .cloned()
                .expect("link")
        };
        let (ssh, bulk) = (get("ssh"), get("bulk"));
        assert_eq!(ssh.connection.as_deref(), Some("interactive"));
        assert_eq!(bulk.connection, None);
        let mut lanes: Vec<_> = ssh
            .relays
            .iter()
            .map(|r| (r.addr.as_str(), r.interactive_addr.as_deref()))
            .collect();
        lanes.sort();
        assert_eq!(
            lanes,
            [
                ("127.0.0.1:4433", Some("127.0.0.1:4434")),
                ("127.0.0.1:4435", None)
            ]
        );
    }

    // PATCH moves a link between connections, and both agents hear of it;
    // `""` is the shared one.
    let before = api.config(&a, 0, 0).await.version;
    let (code, msg) = error_of(
        api.patch_link("bulk", &serde_json::json!({"connection": "a b"}))
            .await,
    )
    .await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert!(msg.starts_with("connection `a b`"), "{msg}");
    let (code, msg) = error_of(api.patch_link("bulk", &serde_json::json!({})).await).await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert!(msg.contains("connection"), "{msg}");
    let resp = api
        .patch_link("ssh", &serde_json::json!({"connection": ""}))
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let info: LinkInfo = resp.json().await.expect("json");
    assert_eq!(info.spec.connection, None);
    let resp = api
        .patch_link("bulk", &serde_json::json!({"connection": "lane-2"}))
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    for agent in [&a, &b] {
        let desired = api.config(agent, 0, 0).await;
        assert!(desired.version > before, "the agents' config changed");
        let conn = |name: &str| {
            desired
                .links
                .iter()
                .find(|l| l.name == name)
                .map(|l| l.connection.clone())
        };
        assert_eq!(conn("ssh"), Some(None));
        assert_eq!(conn("bulk"), Some(Some("lane-2".into())));
    }
    api.stop().await;
}

/// Out of range: 400 with a message naming the field, nothing created;
/// checked before the agents are looked up.
async fn out_of_range_max_flows_create_nothing(api: &Api) {
    for bad in [0, 1_000_001, u32::MAX] {
        let mut body = link("db", "a", "b");
        body.max_flows = Some(bad);
        let (code, msg) = error_of(api.create_link(&body).await).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{bad}");
        assert!(
            msg.contains("max_flows") && msg.contains("1000000"),
            "{msg}"
        );
    }
    // Checked before the agents are looked up.
    let mut body = link("db", "a", "nobody");
    body.max_flows = Some(0);
    let (code, _) = error_of(api.create_link(&body).await).await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    let listed: Vec<LinkInfo> = api.admin_get(api::PATH_LINKS).await;
    assert!(listed.is_empty());
}

/// Every relay got the grants of `info` (max 8 flows) and `free` (no
/// limit), generation 1, no rate limit. Returns each relay's cursor.
async fn both_grants_carry_their_limits(
    api: &Api,
    relays: [&Node; 2],
    info: &LinkInfo,
    free: &LinkInfo,
) -> Vec<u64> {
    let mut cursors = Vec::new();
    for r in relays {
        let ev = api.events(r, 0, 0).await;
        assert_eq!(ev.events.len(), 2);
        let mut seen = 0;
        for e in &ev.events {
            let RelayEventKind::Grant { grant } = &e.kind else {
                panic!("expected a grant");
            };
            let g = verify_grant(grant, &r.enrolled.authority_public_key, &r.relay_id());
            let want = if g.link_id == info.link_id {
                Some(8)
            } else {
                assert_eq!(g.link_id, free.link_id);
                None
            };
            assert_eq!(g.limits.max_flows, want);
            assert_eq!(g.limits.rate_bytes_per_sec, None);
            assert_eq!(g.generation, 1);
            seen += 1;
        }
        assert_eq!(seen, 2);
        cursors.push(ev.next);
    }
    cursors
}

/// Grant renewal keeps the limit (and the generation): make the stored
/// grant nearly expired behind the controller's back.
async fn grant_renewal_keeps_the_limit(
    api: &Api,
    relays: [&Node; 2],
    info: &LinkInfo,
    cursors: &mut [u64],
) {
    use comsat_controller::store::{LinkGrantUpdate, SqliteStore, Store};
    let store = SqliteStore::open(&api.data.join("controller.db"))
        .await
        .expect("open store");
    let record = store.link_by_name("db").await.expect("link").expect("some");
    assert_eq!(record.max_flows, Some(3));
    let soon = unix_now() + 5;
    assert!(
        store
            .update_link_grant(
                &LinkGrantUpdate {
                    link_id: record.link_id,
                    expected_generation: record.generation,
                    generation: record.generation,
                    relays: record.relays.clone(),
                    grant_not_after: soon,
                    events: vec![],
                    bump_agents: false,
                },
                unix_now(),
            )
            .await
            .expect("update")
    );
    store.close().await;
    for (r, cursor) in relays.into_iter().zip(cursors.iter_mut()) {
        let (g, next) = one_grant(api, r, *cursor).await;
        assert_eq!(g.link_id, info.link_id);
        assert!(g.not_after > soon, "renewed");
        assert_eq!(g.generation, 1);
        assert_eq!(g.limits.max_flows, Some(3));
        *cursor = next;
    }
}

/// Errors: unknown link, out of range, bad JSON, no admin token. None of
/// them pushes anything to the relays (after `cursors`).
async fn bad_patches_push_nothing(api: &Api, relays: [&Node; 2], cursors: &[u64]) {
    let (code, msg) = error_of(api.patch_link("nope", &json!({ "max_flows": 3 })).await).await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert!(msg.contains("`nope`"), "{msg}");
    for bad in [
        json!({ "max_flows": 1_000_001 }),
        json!({ "max_flows": -1 }),
        json!({ "max_flows": "3" }),
        json!({ "max_flow": 3 }),
        json!({ "rate_limit_bytes_per_sec": 10 }),
        json!({ "rate_limit_bytes_per_sec": -1 }),
        json!({}),
        json!({ "max_flows": null }),
    ] {
        let (code, msg) = error_of(api.patch_link("db", &bad).await).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{bad}: {msg}");
    }
    let (code, msg) = error_of(api.patch_link("db", &json!({})).await).await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert!(msg.contains("nothing to change"), "{msg}");
    let (code, msg) = error_of(
        api.patch_link("db", &json!({ "rate_limit_bytes_per_sec": 10 }))
            .await,
    )
    .await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert!(msg.contains("rate_limit_bytes_per_sec 10"), "{msg}");
    let resp = api
        .client
        .patch(api.url(&format!("{}/db", api::PATH_LINKS)))
        .json(&json!({ "max_flows": 3 }))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    for (r, cursor) in relays.into_iter().zip(cursors) {
        assert!(api.events(r, *cursor, 0).await.events.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agents_refusals_show_with_the_link_and_in_the_audit_log() {
    let api = start("").await;
    let ([a, b, c, _], _) = db_between_a_and_b(&api).await;
    let refuse = async |agent: &Node, body: serde_json::Value| {
        let resp = api
            .client
            .post(api.url(api::PATH_AGENT_REFUSALS))
            .bearer_auth(agent.jwt())
            .json(&body)
            .send()
            .await
            .expect("send");
        (resp.status(), resp.text().await.unwrap_or_default())
    };
    let reason = "target tcp://169.254.169.254:80 is outside this agent's consent\n";
    let body = json!({ "refused": [{ "link": "db", "reason": reason }] });
    assert_eq!(refuse(&b, body.clone()).await.0, StatusCode::OK);
    // Said again: nothing new to audit.
    assert_eq!(refuse(&b, body).await.0, StatusCode::OK);
    // An agent that does not hold the link cannot mark it refused.
    let body = json!({ "refused": [{ "link": "db", "reason": "not mine" }] });
    assert_eq!(refuse(&c, body).await.0, StatusCode::OK);
    // Hostile bodies are refused whole.
    let long = json!({ "refused": [{ "link": "db", "reason": "x".repeat(api::MAX_REFUSAL_REASON_LEN + 1) }] });
    assert_eq!(refuse(&a, long).await.0, StatusCode::BAD_REQUEST);
    let many: Vec<_> = (0..=api::MAX_REFUSALS)
        .map(|_| json!({ "link": "db", "reason": "r" }))
        .collect();
    let many = json!({ "refused": many });
    assert_eq!(refuse(&a, many).await.0, StatusCode::BAD_REQUEST);
    let extra = json!({ "refused": [], "admin": true });
    assert_eq!(refuse(&a, extra).await.0, StatusCode::BAD_REQUEST);

    let info: LinkInfo = api.admin_get(&format!("{}/db", api::PATH_LINKS)).await;
    assert_eq!(info.refused.len(), 1, "{info:?}");
    assert_eq!(info.refused[0].agent, "b");
    assert_eq!(
        info.refused[0].reason,
        "target tcp://169.254.169.254:80 is outside this agent's consent\\n",
        "stored with its control characters escaped"
    );
    let listed: Vec<LinkInfo> = api.admin_get(api::PATH_LINKS).await;
    assert_eq!(listed[0].refused, info.refused);
    let audit: Vec<api::AuditRecord> = api.admin_get(api::PATH_AUDIT).await;
    let refusals: Vec<_> = audit.iter().filter(|r| r.action == "link.refuse").collect();
    assert_eq!(refusals.len(), 1, "audited once: {audit:#?}");
    assert_eq!(
        (
            &*refusals[0].subject,
            &*refusals[0].resource,
            &*refusals[0].result
        ),
        ("agent:b", "link/db", "denied")
    );
    assert!(
        refusals[0]
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("169.254.169.254"))
    );

    // Once the agent takes the link (its owner consented), the refusal goes.
    assert_eq!(refuse(&b, json!({ "refused": [] })).await.0, StatusCode::OK);
    let info: LinkInfo = api.admin_get(&format!("{}/db", api::PATH_LINKS)).await;
    assert!(info.refused.is_empty(), "{info:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_link_at_one_agents_listen_address_is_refused_naming_the_first() {
    let api = start("").await;
    api.enrol_agent("a").await;
    api.enrol_agent("b").await;
    let r1 = api.enrol_relay("r1", "127.0.0.1:4431").await;
    api.heartbeat(&r1).await;
    let resp = api.create_link(&link("db", "a", "b")).await;
    assert_eq!(resp.status(), StatusCode::CREATED);

    // The same address of agent a, however it is written: refused, naming
    // the link that holds it and a command that frees it.
    let mut again = link("db2", "a", "b");
    again.listen = "tcp://127.0.0.1:07000".into();
    let (code, msg) = error_of(api.create_link(&again).await).await;
    assert_eq!(code, StatusCode::CONFLICT, "{msg}");
    assert!(
        msg.contains("link `db`") && msg.contains("`comsat ctl link delete db`"),
        "{msg}"
    );
    let listed: Vec<LinkInfo> = api.admin_get(api::PATH_LINKS).await;
    assert_eq!(listed.len(), 1, "nothing was created: {listed:?}");

    // Another protocol at that port, another agent at that address: free.
    let mut udp = link("dns", "a", "b");
    (udp.listen, udp.target) = ("udp://127.0.0.1:7000".into(), "udp://127.0.0.1:53".into());
    assert_eq!(api.create_link(&udp).await.status(), StatusCode::CREATED);
    let reverse = link("back", "b", "a");
    assert_eq!(
        api.create_link(&reverse).await.status(),
        StatusCode::CREATED
    );

    // Once the first link is deleted, its address is free again.
    let (code, msg) = call(
        &api,
        &api.admin,
        reqwest::Method::DELETE,
        &format!("{}/db", api::PATH_LINKS),
        None,
    )
    .await;
    assert!(code.is_success(), "{code} {msg}");
    assert_eq!(api.create_link(&again).await.status(), StatusCode::CREATED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_shows_what_its_agents_report_worst_first() {
    let api = start("").await;
    let ([a, b, c, r1], created) = db_between_a_and_b(&api).await;
    let id = created.link_id.to_string();
    let relay = r1.relay_id().to_string();
    assert_eq!(created.status.state, api::LinkState::Unknown);
    let report = async |agent: &Node, body: serde_json::Value| {
        api.client
            .post(api.url(api::PATH_AGENT_LINK_STATUS))
            .bearer_auth(agent.jwt())
            .json(&body)
            .send()
            .await
            .expect("send")
            .status()
    };
    let show = async || -> api::LinkStatus {
        let info: LinkInfo = api.admin_get(&format!("{}/db", api::PATH_LINKS)).await;
        info.status
    };

    // The listening half cannot bind; the other waits on r1.
    let taken = "cannot listen on tcp://127.0.0.1:7000: Address already in use (os error 98)\n";
    let body = json!({ "links": [{ "link_id": id, "state": "failed", "reason": taken }] });
    assert_eq!(report(&a, body).await, StatusCode::OK);
    let body = json!({ "links": [{ "link_id": id, "state": "waiting", "relay_id": relay }] });
    assert_eq!(report(&b, body).await, StatusCode::OK);
    let s = show().await;
    assert_eq!(s.state, api::LinkState::Failed, "{s:?}");
    assert_eq!(
        s.reason.as_deref(),
        Some("a: cannot listen on tcp://127.0.0.1:7000: Address already in use (os error 98)\\n"),
        "named by its agent, its control characters escaped"
    );
    let failed_since = s.since.expect("since when");
    assert_eq!(s.halves.len(), 2);
    assert_eq!(
        (&*s.halves[1].side, s.halves[1].state),
        ("to", api::LinkState::Waiting)
    );
    assert_eq!(
        s.halves[1].relay.as_deref(),
        Some("r1"),
        "the relay by its name"
    );

    // Both ready: ready. Said again: it keeps its time.
    for agent in [&a, &b] {
        let body = json!({ "links": [{ "link_id": id, "state": "ready", "relay_id": relay }] });
        assert_eq!(report(agent, body).await, StatusCode::OK);
    }
    let s = show().await;
    assert_eq!(
        (s.state, s.reason.as_deref()),
        (api::LinkState::Ready, None),
        "{s:?}"
    );
    assert!(s.since.is_some_and(|t| t >= failed_since));
    let listed: Vec<LinkInfo> = api.admin_get(api::PATH_LINKS).await;
    assert_eq!(listed[0].status, s);

    // An agent that does not hold the link cannot change its status; one
    // that reports nothing of it any more leaves it unknown.
    let body = json!({ "links": [{ "link_id": id, "state": "failed", "reason": "not mine" }] });
    assert_eq!(report(&c, body).await, StatusCode::OK);
    assert_eq!(show().await.state, api::LinkState::Ready);
    assert_eq!(report(&b, json!({ "links": [] })).await, StatusCode::OK);
    let s = show().await;
    assert_eq!(s.state, api::LinkState::Unknown, "{s:?}");
    assert_eq!(s.reason.as_deref(), Some("b: has not reported this link"));

    // Hostile bodies are refused whole.
    let long = json!({ "links": [{ "link_id": id, "state": "failed", "reason": "x".repeat(api::MAX_STATUS_REASON_LEN + 1) }] });
    assert_eq!(report(&a, long).await, StatusCode::BAD_REQUEST);
    let many: Vec<_> = (0..=api::MAX_STATUS_LINKS)
        .map(|_| json!({ "link_id": id, "state": "ready" }))
        .collect();
    assert_eq!(
        report(&a, json!({ "links": many })).await,
        StatusCode::BAD_REQUEST
    );
    for bad in [
        json!({ "links": [{ "link_id": id, "state": "refused" }] }),
        json!({ "links": [{ "link_id": "zz", "state": "ready" }] }),
        json!({ "links": [], "admin": true }),
    ] {
        assert_eq!(report(&a, bad).await, StatusCode::BAD_REQUEST);
    }
    // Without a node's token: refused.
    let resp = api
        .client
        .post(api.url(api::PATH_AGENT_LINK_STATUS))
        .json(&json!({ "links": [] }))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn allow_rules_reach_both_agents_and_bad_ones_create_nothing() {
    let mut api = start("").await;
    let a = api.enrol_agent("a").await;
    let b = api.enrol_agent("b").await;
    let r1 = api.enrol_relay("r1", "127.0.0.1:4431").await;
    api.heartbeat(&r1).await;
    // A rule that does not parse, too many rules, or rules on a UDP
    // listener: 400 naming what is wrong and the forms, nothing created.
    let many = vec!["unix:uid:1".to_owned(); comsat_protocol::workload::MAX_RULES + 1];
    for (listen, allow, says) in [
        (
            "tcp://127.0.0.1:7000",
            vec!["unix:uid:me".to_owned()],
            "unix:uid:N",
        ),
        (
            "tcp://127.0.0.1:7000",
            vec!["unix:path:bin/app".to_owned()],
            "absolute",
        ),
        ("tcp://127.0.0.1:7000", vec![String::new()], "no selector"),
        ("tcp://127.0.0.1:7000", many, "more than 64"),
        (
            "udp://127.0.0.1:7000",
            vec!["unix:uid:1".to_owned()],
            "tcp:// and unix://",
        ),
        (
            "tcp://127.0.0.1:7000",
            vec!["spiffe://e.org unix:uid:1".to_owned()],
            "path",
        ),
    ] {
        let mut body = link("db", "a", "b");
        if listen.starts_with("udp://") {
            body.target = "udp://127.0.0.1:53".into();
        }
        body.listen = listen.into();
        body.allow = allow;
        let (code, msg) = error_of(api.create_link(&body).await).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{listen}");
        assert!(msg.contains(says), "{says}: {msg}");
    }
    let links: Vec<LinkInfo> = api.admin_get(api::PATH_LINKS).await;
    assert!(links.is_empty());

    let rules = vec![
        "unix:path:/usr/bin/psql unix:uid:1000".to_owned(),
        format!("unix:sha256:{}", "ab".repeat(32)),
    ];
    let mut body = link("db", "a", "b");
    body.allow = rules.clone();
    body.proxy_protocol = true;
    let resp = api.create_link(&body).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let info: LinkInfo = resp.json().await.expect("json");
    assert_eq!(info.spec.allow, rules);
    let shown: LinkInfo = api.admin_get(&format!("{}/db", api::PATH_LINKS)).await;
    assert_eq!(shown.spec.allow, rules);
    // Both agents get the rules (the target's checks each flow's caller
    // against them); only the target's writes the PROXY header.
    let half = |desired: api::AgentDesired| desired.links.into_iter().find(|l| l.name == "db");
    let at_a = half(api.config(&a, 0, 0).await).expect("a's half");
    assert_eq!(at_a.allow, rules);
    assert_eq!(at_a.allow_rules().expect("parse").len(), 2);
    assert!(!at_a.proxy_protocol);
    let at_b = half(api.config(&b, 0, 0).await).expect("b's half");
    assert_eq!(at_b.allow, rules);
    assert!(at_b.proxy_protocol);
    assert!(shown.spec.proxy_protocol);
    api.stop().await;
}
