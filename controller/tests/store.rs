//! Store-level tests, each run on a temporary SQLite file and on a fresh
//! PostgreSQL database (when `COMSAT_TEST_POSTGRES_URL` names a server and
//! a role that may create databases; otherwise the PostgreSQL runs say
//! why they skip).

use std::sync::Arc;

use comsat_controller::store::{
    LinkGrantUpdate, LinkRecord, NewEvent, NewJoinToken, NewNode, NodeRecord, Redemption, SqlStore,
    Store, StoreError,
};
use comsat_node::keys::{Generate, RandomId};
use comsat_protocol::api::{self, NodeKind};
use comsat_protocol::{LinkId, NodeId, NoiseSecretKey, RelayId, SigningKey};

mod common;

use common::Db;

/// Unix time now, in seconds.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn open(db: &Db) -> SqlStore {
    db.open().await
}

/// Runs the test body `$name(db)` on SQLite and on PostgreSQL.
macro_rules! both {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                super::$name(super::Db::sqlite()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                let Some(db) = super::Db::postgres().await else {
                    return;
                };
                super::$name(db).await;
            }
        }
    };
}

async fn token(store: &dyn Store, kind: NodeKind, name: Option<&str>, expires_at: u64) -> String {
    let id = hex::encode(rand::random::<[u8; 8]>());
    store
        .create_join_token(&NewJoinToken {
            id: id.clone(),
            secret_hash: "hash".into(),
            kind,
            name: name.map(str::to_owned),
            expires_at,
            created_at: unix_now(),
        })
        .await
        .expect("create token");
    id
}

fn redemption(id: &str, kind: NodeKind) -> Redemption {
    Redemption {
        token_id: id.to_owned(),
        secret_hash: "hash".into(),
        kind,
        now: unix_now(),
    }
}

fn new_node(kind: NodeKind) -> NewNode {
    NewNode {
        node_id: NodeId::random(),
        sign_pub: SigningKey::generate().public(),
        noise_pub: (kind == NodeKind::Agent).then(|| NoiseSecretKey::generate().public()),
        public_addr: (kind == NodeKind::Relay).then(|| "127.0.0.1:4433".to_owned()),
        interactive_addr: (kind == NodeKind::Relay).then(|| "127.0.0.1:4434".to_owned()),
        spiffe_id: None,
    }
}

async fn enrol(store: &dyn Store, kind: NodeKind, name: &str) -> NodeRecord {
    let id = token(store, kind, Some(name), unix_now() + 60).await;
    store
        .redeem_join_token(&redemption(&id, kind), &new_node(kind))
        .await
        .expect("redeem")
}

both!(racing_redemptions_have_exactly_one_winner);
async fn racing_redemptions_have_exactly_one_winner(dir: Db) {
    let store: Arc<dyn Store> = Arc::new(open(&dir).await);
    for round in 0..25 {
        let id = token(&*store, NodeKind::Agent, None, unix_now() + 60).await;
        let tasks: Vec<_> = (0..3)
            .map(|_| {
                let store = store.clone();
                let id = id.clone();
                tokio::spawn(async move {
                    store
                        .redeem_join_token(
                            &redemption(&id, NodeKind::Agent),
                            &new_node(NodeKind::Agent),
                        )
                        .await
                })
            })
            .collect();
        let mut won = 0;
        for t in tasks {
            match t.await.expect("task") {
                Ok(node) => {
                    won += 1;
                    assert!(node.name.starts_with("agent-"), "{}", node.name);
                }
                Err(StoreError::TokenUsed) => {}
                Err(e) => panic!("round {round}: unexpected {e}"),
            }
        }
        assert_eq!(won, 1, "round {round}");
    }
    assert_eq!(store.nodes(NodeKind::Agent).await.expect("nodes").len(), 25);
}

both!(expired_token_is_refused_and_used_up);
async fn expired_token_is_refused_and_used_up(dir: Db) {
    let store = open(&dir).await;
    let id = token(&store, NodeKind::Agent, None, unix_now() - 1).await;
    let node = new_node(NodeKind::Agent);
    let err = store
        .redeem_join_token(&redemption(&id, NodeKind::Agent), &node)
        .await
        .expect_err("expired");
    assert!(matches!(err, StoreError::TokenExpired), "{err}");
    let err = store
        .redeem_join_token(&redemption(&id, NodeKind::Agent), &node)
        .await
        .expect_err("used up");
    assert!(matches!(err, StoreError::TokenUsed), "{err}");
    assert_eq!(err.to_string(), "join token already used");
    assert!(store.node(&node.node_id).await.expect("node").is_none());
}

both!(wrong_kind_and_wrong_secret_leave_the_token_usable);
async fn wrong_kind_and_wrong_secret_leave_the_token_usable(dir: Db) {
    let store = open(&dir).await;
    let id = token(&store, NodeKind::Relay, Some("edge-relay"), unix_now() + 60).await;
    let err = store
        .redeem_join_token(
            &redemption(&id, NodeKind::Agent),
            &new_node(NodeKind::Agent),
        )
        .await
        .expect_err("wrong kind");
    assert!(
        matches!(
            err,
            StoreError::WrongKind {
                token_kind: NodeKind::Relay
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("comsat relay enrol"), "{err}");
    let mut bad_secret = redemption(&id, NodeKind::Relay);
    bad_secret.secret_hash = "other".into();
    let err = store
        .redeem_join_token(&bad_secret, &new_node(NodeKind::Relay))
        .await
        .expect_err("wrong secret");
    assert_eq!(err.to_string(), "unknown join token");
    let err = store
        .redeem_join_token(
            &redemption("0000000000000000", NodeKind::Relay),
            &new_node(NodeKind::Relay),
        )
        .await
        .expect_err("unknown id");
    assert!(matches!(err, StoreError::UnknownToken), "{err}");
    let relay = store
        .redeem_join_token(
            &redemption(&id, NodeKind::Relay),
            &new_node(NodeKind::Relay),
        )
        .await
        .expect("right kind redeems");
    assert_eq!(relay.name, "edge-relay");
    assert_eq!(relay.kind, NodeKind::Relay);
    // A second node may not take the same name.
    let id2 = token(&store, NodeKind::Relay, Some("edge-relay"), unix_now() + 60).await;
    let err = store
        .redeem_join_token(
            &redemption(&id2, NodeKind::Relay),
            &new_node(NodeKind::Relay),
        )
        .await
        .expect_err("name taken");
    assert!(matches!(err, StoreError::NodeNameTaken { .. }), "{err}");
}

both!(jti_replay_is_refused_across_reopen);
async fn jti_replay_is_refused_across_reopen(dir: Db) {
    let node = NodeId::random();
    let now = unix_now();
    {
        let store = open(&dir).await;
        assert!(
            store
                .record_jti("abc", &node, now + 60)
                .await
                .expect("first")
        );
        assert!(
            !store
                .record_jti("abc", &node, now + 60)
                .await
                .expect("second")
        );
        assert!(store.record_jti("old", &node, now - 10).await.expect("old"));
        store.close().await;
    }
    let store = open(&dir).await;
    assert!(
        !store
            .record_jti("abc", &node, now + 60)
            .await
            .expect("after reopen")
    );
    assert_eq!(store.purge_jtis(now).await.expect("purge"), 1);
    assert!(
        !store
            .record_jti("abc", &node, now + 60)
            .await
            .expect("still held")
    );
    assert!(
        store
            .record_jti("old", &node, now + 60)
            .await
            .expect("purged one")
    );
}

both!(link_events_go_only_to_assigned_relays);
async fn link_events_go_only_to_assigned_relays(dir: Db) {
    let store = open(&dir).await;
    let a = enrol(&store, NodeKind::Agent, "a").await;
    let b = enrol(&store, NodeKind::Agent, "b").await;
    let r1 = enrol(&store, NodeKind::Relay, "r1").await.relay_id();
    let r2 = enrol(&store, NodeKind::Relay, "r2").await.relay_id();
    let r3 = enrol(&store, NodeKind::Relay, "r3").await.relay_id();
    let stored = store.node(&NodeId(r1.0)).await.expect("get").expect("r1");
    assert_eq!(stored.interactive_addr.as_deref(), Some("127.0.0.1:4434"));
    let link = LinkRecord {
        link_id: LinkId::random(),
        name: "db".into(),
        generation: 1,
        from_node: a.node_id,
        listen: "tcp://127.0.0.1:7000".into(),
        to_node: b.node_id,
        target: "tcp://127.0.0.1:5432".into(),
        allowed_uids: vec![],
        allowed_gids: vec![],
        allow: vec![],
        proxy_protocol: false,
        relays: vec![r1, r2],
        created_at: unix_now(),
        grant_not_after: unix_now() + 3600,
        max_flows: None,
        rate_limit: None,
        connection: Some("interactive".into()),
    };
    let grant = |r: RelayId, g: &str| NewEvent {
        relay_id: r,
        link_id: link.link_id,
        grant_hex: Some(g.into()),
    };
    store
        .create_link(&link, &[grant(r1, "g1"), grant(r2, "g1")])
        .await
        .expect("create");
    assert_eq!(
        store.link_by_name("db").await.expect("get"),
        Some(link.clone())
    );
    let err = store.create_link(&link, &[]).await.expect_err("name taken");
    assert!(matches!(err, StoreError::LinkNameTaken(_)), "{err}");
    for agent in [&a, &b] {
        let now = store
            .node(&agent.node_id)
            .await
            .expect("node")
            .expect("some");
        assert_eq!(now.config_version, agent.config_version + 1);
    }
    let e1 = store.relay_events(&r1, 0, 100).await.expect("events");
    assert_eq!(e1.len(), 1);
    assert_eq!(e1[0].grant_hex.as_deref(), Some("g1"));
    assert_eq!(
        store.relay_events(&r2, 0, 100).await.expect("events").len(),
        1
    );
    assert!(
        store
            .relay_events(&r3, 0, 100)
            .await
            .expect("events")
            .is_empty()
    );

    // A stale update is skipped; a current one moves r2's place to r3.
    let mut update = LinkGrantUpdate {
        link_id: link.link_id,
        expected_generation: 7,
        generation: 2,
        relays: vec![r1, r3],
        grant_not_after: unix_now() + 3600,
        events: vec![
            grant(r1, "g2"),
            grant(r3, "g2"),
            NewEvent {
                relay_id: r2,
                link_id: link.link_id,
                grant_hex: None,
            },
        ],
        bump_agents: true,
    };
    assert!(
        !store
            .update_link_grant(&update, unix_now())
            .await
            .expect("stale")
    );
    let since = store.max_event_seq().await.expect("max");
    update.expected_generation = 1;
    assert!(
        store
            .update_link_grant(&update, unix_now())
            .await
            .expect("current")
    );
    let r2_events = store.relay_events(&r2, since, 100).await.expect("events");
    assert_eq!(r2_events.len(), 1);
    assert_eq!(r2_events[0].grant_hex, None);

    deleting_the_link_revokes_it_at_its_relays_only(&store, [r1, r2, r3]).await;
    let a_now = store.node(&a.node_id).await.expect("node").expect("some");
    assert_eq!(a_now.config_version, a.config_version + 3);
}

/// Deleting link `db` (on `r1` and `r3`) revokes it at those two relays
/// only, and a second delete finds nothing.
async fn deleting_the_link_revokes_it_at_its_relays_only(store: &dyn Store, relays: [RelayId; 3]) {
    let [r1, r2, r3] = relays;
    let max_before = store.max_event_seq().await.expect("max");
    let deleted = store.delete_link("db", unix_now()).await.expect("delete");
    assert_eq!(deleted.map(|l| l.relays), Some(vec![r1, r3]));
    let mut revoked = Vec::new();
    for r in [r1, r2, r3] {
        for e in store
            .relay_events(&r, max_before, 100)
            .await
            .expect("events")
        {
            assert_eq!(e.grant_hex, None);
            revoked.push(r);
        }
    }
    assert_eq!(revoked, vec![r1, r3]);
    assert!(store.link_by_name("db").await.expect("get").is_none());
    assert!(
        store
            .delete_link("db", unix_now())
            .await
            .expect("again")
            .is_none()
    );
}

async fn config_versions(store: &dyn Store, ids: &[NodeId]) -> Vec<u64> {
    let mut v = Vec::new();
    for id in ids {
        let node = store.node(id).await.expect("node").expect("some");
        v.push(node.config_version);
    }
    v
}

both!(link_limits_leave_agents_alone_and_a_new_connection_does_not);
async fn link_limits_leave_agents_alone_and_a_new_connection_does_not(dir: Db) {
    let store = open(&dir).await;
    let a = enrol(&store, NodeKind::Agent, "a").await;
    let b = enrol(&store, NodeKind::Agent, "b").await;
    let r1 = enrol(&store, NodeKind::Relay, "r1").await.relay_id();
    let r2 = enrol(&store, NodeKind::Relay, "r2").await.relay_id();
    let mut link = LinkRecord {
        link_id: LinkId::random(),
        name: "db".into(),
        generation: 3,
        from_node: a.node_id,
        listen: "tcp://127.0.0.1:7000".into(),
        to_node: b.node_id,
        target: "tcp://127.0.0.1:5432".into(),
        allowed_uids: vec![],
        allowed_gids: vec![],
        allow: vec![],
        proxy_protocol: false,
        relays: vec![r1],
        created_at: unix_now(),
        grant_not_after: unix_now() + 3600,
        max_flows: Some(1_000_000),
        rate_limit: Some(1 << 20),
        connection: None,
    };
    store.create_link(&link, &[]).await.expect("create");
    assert_eq!(
        store.link_by_name("db").await.expect("get"),
        Some(link.clone())
    );
    let before = config_versions(&store, &[a.node_id, b.node_id]).await;

    let grant = |r: RelayId| NewEvent {
        relay_id: r,
        link_id: link.link_id,
        grant_hex: Some("g".into()),
    };
    // A stale generation writes nothing.
    let since = store.max_event_seq().await.expect("max");
    assert!(
        !store
            .update_link_limits(&link.link_id, 2, Some(5), None, &[grant(r1)], unix_now())
            .await
            .expect("stale")
    );
    assert!(
        store
            .relay_events(&r1, since, 100)
            .await
            .expect("events")
            .is_empty()
    );
    assert!(
        !store
            .update_link_limits(&LinkId::random(), 3, Some(5), None, &[], unix_now())
            .await
            .expect("unknown")
    );
    // The current one sets the limit, keeps everything else and appends
    // the events; agents' config versions stay.
    assert!(
        store
            .update_link_limits(
                &link.link_id,
                3,
                Some(5),
                Some(4096),
                &[grant(r1)],
                unix_now()
            )
            .await
            .expect("current")
    );
    link.max_flows = Some(5);
    link.rate_limit = Some(4096);
    assert_eq!(store.links().await.expect("links"), vec![link.clone()]);
    assert_eq!(
        store
            .relay_events(&r1, since, 100)
            .await
            .expect("events")
            .len(),
        1
    );
    assert!(
        store
            .relay_events(&r2, since, 100)
            .await
            .expect("events")
            .is_empty()
    );
    assert_eq!(
        config_versions(&store, &[a.node_id, b.node_id]).await,
        before
    );
    // And back to unlimited (NULL).
    assert!(
        store
            .update_link_limits(&link.link_id, 3, None, None, &[], unix_now())
            .await
            .expect("unlimit")
    );
    link.max_flows = None;
    link.rate_limit = None;
    assert_eq!(
        store.link_by_name("db").await.expect("get"),
        Some(link.clone())
    );
    assert_eq!(
        config_versions(&store, &[a.node_id, b.node_id]).await,
        before
    );
    a_new_connection_moves_both_agents_config_versions(
        &store,
        link,
        &[a.node_id, b.node_id],
        &before,
    )
    .await;
}

/// A new connection, unlike a limit, is the agents' business: both
/// config versions move; an unknown link changes nothing.
async fn a_new_connection_moves_both_agents_config_versions(
    store: &dyn Store,
    mut link: LinkRecord,
    agents: &[NodeId],
    before: &[u64],
) {
    assert!(
        store
            .set_link_connection(&link.link_id, Some("interactive"))
            .await
            .expect("set")
    );
    link.connection = Some("interactive".into());
    assert_eq!(
        store.link_by_name("db").await.expect("get"),
        Some(link.clone())
    );
    let after = config_versions(store, agents).await;
    assert!(
        after.iter().zip(before).all(|(n, o)| n > o),
        "{after:?} {before:?}"
    );
    assert!(
        !store
            .set_link_connection(&LinkId::random(), None)
            .await
            .expect("unknown")
    );
    assert!(
        store
            .set_link_connection(&link.link_id, None)
            .await
            .expect("unset")
    );
    link.connection = None;
    assert_eq!(store.link_by_name("db").await.expect("get"), Some(link));
}

both!(two_controllers_on_one_database_behave_as_one);
/// Two stores (two controllers' pools) on one database: a token redeemed
/// through both at once has one winner, a `jti` seen by one is refused by
/// the other, and a relay reading events while both write never misses
/// one (numbers are committed in order).
async fn two_controllers_on_one_database_behave_as_one(db: Db) {
    let one: Arc<dyn Store> = Arc::new(open(&db).await);
    let two: Arc<dyn Store> = Arc::new(open(&db).await);

    for _ in 0..10 {
        let id = token(&*one, NodeKind::Agent, None, unix_now() + 60).await;
        let tasks: Vec<_> = [one.clone(), two.clone(), one.clone(), two.clone()]
            .into_iter()
            .map(|store| {
                let id = id.clone();
                tokio::spawn(async move {
                    store
                        .redeem_join_token(
                            &redemption(&id, NodeKind::Agent),
                            &new_node(NodeKind::Agent),
                        )
                        .await
                })
            })
            .collect();
        let mut won = 0;
        for t in tasks {
            match t.await.expect("task") {
                Ok(_) => won += 1,
                Err(StoreError::TokenUsed) => {}
                Err(e) => panic!("unexpected: {e}"),
            }
        }
        assert_eq!(won, 1);
    }

    let node = NodeId::random();
    assert!(
        one.record_jti("j1", &node, unix_now() + 60)
            .await
            .expect("one")
    );
    assert!(
        !two.record_jti("j1", &node, unix_now() + 60)
            .await
            .expect("two")
    );

    let a = enrol(&*one, NodeKind::Agent, "a").await;
    let b = enrol(&*two, NodeKind::Agent, "b").await;
    let relay = enrol(&*one, NodeKind::Relay, "r1").await.relay_id();
    const LINKS: usize = 40;
    let writers: Vec<_> = (0..LINKS)
        .map(|i| {
            let store = if i % 2 == 0 { one.clone() } else { two.clone() };
            let (a, b) = (a.node_id, b.node_id);
            tokio::spawn(async move {
                let link = LinkRecord {
                    link_id: LinkId::random(),
                    name: format!("l{i}"),
                    generation: 1,
                    from_node: a,
                    listen: "tcp://127.0.0.1:7000".into(),
                    to_node: b,
                    target: "tcp://127.0.0.1:5432".into(),
                    allowed_uids: vec![],
                    allowed_gids: vec![],
                    allow: vec![],
                    proxy_protocol: false,
                    relays: vec![relay],
                    created_at: unix_now(),
                    grant_not_after: unix_now() + 3600,
                    max_flows: None,
                    rate_limit: None,
                    connection: None,
                };
                let ev = NewEvent {
                    relay_id: relay,
                    link_id: link.link_id,
                    grant_hex: Some(format!("g{i}")),
                };
                store.create_link(&link, &[ev]).await.expect("create");
            })
        })
        .collect();
    // A relay long-polling meanwhile, from a cursor, as relays do.
    let reader = {
        let store = two.clone();
        tokio::spawn(async move {
            let (mut cursor, mut seen) = (0, Vec::new());
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            while seen.len() < LINKS {
                assert!(std::time::Instant::now() < deadline, "saw {}", seen.len());
                for e in store.relay_events(&relay, cursor, 7).await.expect("read") {
                    assert!(e.seq > cursor);
                    cursor = e.seq;
                    seen.push(e.link_id);
                }
                tokio::task::yield_now().await;
            }
            seen
        })
    };
    for w in writers {
        w.await.expect("writer");
    }
    let seen = reader.await.expect("reader");
    let all = one.relay_events(&relay, 0, 1000).await.expect("all");
    assert_eq!(all.len(), LINKS);
    assert_eq!(
        seen,
        all.iter().map(|e| e.link_id).collect::<Vec<_>>(),
        "the reader saw every event, in order"
    );
}

both!(the_audit_log_filters_by_time_and_subject_and_forgets_by_retention);
async fn the_audit_log_filters_by_time_and_subject_and_forgets_by_retention(db: Db) {
    use comsat_protocol::api::AuditRecord;
    let store = open(&db).await;
    let rec = |at_ms: u64, subject: &str, result: &str| AuditRecord {
        at_ms,
        subject: subject.into(),
        action: "link.create".into(),
        resource: "link/db".into(),
        result: result.into(),
        reason: (result != "ok").then(|| "because".to_owned()),
        source: Some("127.0.0.1:5000".into()),
    };
    for r in [
        rec(1_000, "user:admin", "ok"),
        rec(2_000, "agent:edge-a", "denied"),
        rec(3_000, "agent:edge-b", "ok"),
        rec(4_000, "user:admin", "denied"),
    ] {
        store.append_audit(&r).await.expect("append");
    }
    let all = store.audit(0, None, None, 100).await.expect("all");
    assert_eq!(
        all.iter().map(|r| r.at_ms).collect::<Vec<_>>(),
        [1_000, 2_000, 3_000, 4_000]
    );
    assert_eq!(all[1], rec(2_000, "agent:edge-a", "denied"));
    let agents = store
        .audit(0, Some("agent:"), None, 100)
        .await
        .expect("agents");
    assert_eq!(agents.len(), 2);
    let since = store
        .audit(2_500, Some("user:admin"), None, 100)
        .await
        .expect("since");
    assert_eq!(since, vec![rec(4_000, "user:admin", "denied")]);
    let denied = store
        .audit(0, None, Some("denied"), 100)
        .await
        .expect("denied");
    assert_eq!(
        denied.iter().map(|r| r.at_ms).collect::<Vec<_>>(),
        [2_000, 4_000]
    );
    let admin_ok = store
        .audit(0, Some("user:admin"), Some("ok"), 100)
        .await
        .expect("admin ok");
    assert_eq!(admin_ok, vec![rec(1_000, "user:admin", "ok")]);
    // A wildcard in the filter is a plain character.
    assert!(
        store
            .audit(0, Some("%"), None, 100)
            .await
            .expect("pct")
            .is_empty()
    );
    // The newest when limited.
    let newest = store.audit(0, None, None, 2).await.expect("limited");
    assert_eq!(
        newest.iter().map(|r| r.at_ms).collect::<Vec<_>>(),
        [3_000, 4_000]
    );
    assert_eq!(store.purge_audit(2_500).await.expect("purge"), 2);
    assert_eq!(
        store.audit(0, None, None, 100).await.expect("rest").len(),
        2
    );
}

both!(an_agents_refusals_replace_what_it_said_before);
async fn an_agents_refusals_replace_what_it_said_before(dir: Db) {
    let store = open(&dir).await;
    let (a, b) = (NodeId::random(), NodeId::random());
    let (l1, l2) = (LinkId::random(), LinkId::random());
    let said = |v: &[(LinkId, &str)]| -> Vec<(LinkId, String)> {
        v.iter().map(|(l, r)| (*l, (*r).to_owned())).collect()
    };
    let new = store
        .set_refusals(&a, &said(&[(l1, "outside"), (l2, "outside too")]), 100)
        .await
        .expect("set");
    assert_eq!(new.len(), 2);
    store
        .set_refusals(&b, &said(&[(l1, "b's own")]), 100)
        .await
        .expect("set");
    // Said again, one unchanged and one with a new reason: only that one is new,
    // and the unchanged one keeps its time.
    let new = store
        .set_refusals(&a, &said(&[(l1, "outside"), (l2, "another reason")]), 200)
        .await
        .expect("set");
    assert_eq!(new, said(&[(l2, "another reason")]));
    let mut all = store.refusals().await.expect("all");
    all.sort_by_key(|r| (r.at, r.reason.clone()));
    let seen: Vec<(NodeId, LinkId, &str, u64)> = all
        .iter()
        .map(|r| (r.agent, r.link_id, r.reason.as_str(), r.at))
        .collect();
    assert_eq!(
        seen,
        [
            (b, l1, "b's own", 100),
            (a, l1, "outside", 100),
            (a, l2, "another reason", 200)
        ]
    );
    // An empty list clears that agent's refusals only.
    assert!(
        store
            .set_refusals(&a, &[], 300)
            .await
            .expect("clear")
            .is_empty()
    );
    let all = store.refusals().await.expect("all");
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].agent, b);
}

both!(a_peer_move_tells_the_peer_once_per_spacing);
/// An agent that left a relay tells the peer of each link placed there
/// (its config version moves, the move is listed for it and not for the
/// agent itself); the same link again within the spacing changes nothing,
/// after it the move is replaced.
async fn a_peer_move_tells_the_peer_once_per_spacing(dir: Db) {
    let store = open(&dir).await;
    let a = enrol(&store, NodeKind::Agent, "a").await;
    let b = enrol(&store, NodeKind::Agent, "b").await;
    let r1 = enrol(&store, NodeKind::Relay, "r1").await.relay_id();
    let r2 = enrol(&store, NodeKind::Relay, "r2").await.relay_id();
    let link = LinkRecord {
        link_id: LinkId::random(),
        name: "db".into(),
        generation: 1,
        from_node: a.node_id,
        listen: "tcp://127.0.0.1:7000".into(),
        to_node: b.node_id,
        target: "tcp://127.0.0.1:5432".into(),
        allowed_uids: vec![],
        allowed_gids: vec![],
        allow: vec![],
        proxy_protocol: false,
        relays: vec![r1, r2],
        created_at: 1000,
        grant_not_after: unix_now() + 3600,
        max_flows: None,
        rate_limit: None,
        connection: None,
    };
    store.create_link(&link, &[]).await.expect("create");
    let ids = [a.node_id, b.node_id];
    let v0 = config_versions(&store, &ids).await;
    let moved = |relay: RelayId, now: u64| {
        let store = &store;
        let links = [link.link_id, LinkId::random()];
        async move {
            store
                .record_peer_moves(&a.node_id, &relay, &links, now)
                .await
                .expect("record")
        }
    };
    // The unknown link is passed over.
    assert_eq!(moved(r1, 2000).await, 1);
    let v1 = config_versions(&store, &ids).await;
    assert_eq!((v1[0], v1[1] > v0[1]), (v0[0], true), "{v0:?} {v1:?}");
    assert_eq!(
        store.peer_moves(&b.node_id, 0).await.expect("moves"),
        vec![(link.link_id, r1, 2000)]
    );
    assert!(
        store
            .peer_moves(&a.node_id, 0)
            .await
            .expect("own")
            .is_empty()
    );
    assert!(
        store
            .peer_moves(&b.node_id, 2001)
            .await
            .expect("old")
            .is_empty()
    );
    // Within the spacing, to either relay: nothing changes.
    let spacing = comsat_controller::store::PEER_MOVE_SPACING_SECS;
    for relay in [r1, r2] {
        assert_eq!(moved(relay, 2000 + spacing - 1).await, 0);
    }
    assert_eq!(config_versions(&store, &ids).await, v1);
    assert_eq!(
        store.peer_moves(&b.node_id, 0).await.expect("moves"),
        vec![(link.link_id, r1, 2000)]
    );
    // After it, the new move replaces the old.
    assert_eq!(moved(r2, 2000 + spacing).await, 1);
    assert!(config_versions(&store, &ids).await[1] > v1[1]);
    assert_eq!(
        store.peer_moves(&b.node_id, 0).await.expect("moves"),
        vec![(link.link_id, r2, 2000 + spacing)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_server_whose_certificate_does_not_name_the_host_is_refused() {
    use comsat_controller::store::testing::{fresh_database, postgres_server};
    let Some(server) = postgres_server() else {
        return;
    };
    if !server.contains("sslmode=verify-full") || !server.contains("@localhost:") {
        eprintln!("skipped: the test server's URL is not sslmode=verify-full to localhost");
        return;
    }
    // By the name its certificate holds: served over TLS.
    let url = fresh_database(&server).await.expect("database");
    let store = SqlStore::connect_postgres(&url)
        .await
        .expect("verify-full by its name");
    store.close().await;
    // By an address the certificate does not name: refused, saying why.
    let wrong = url.replace("@localhost:", "@127.0.0.1:");
    let Err(err) = SqlStore::connect_postgres(&wrong).await else {
        panic!("connected to a server whose certificate does not name 127.0.0.1");
    };
    assert!(matches!(err, StoreError::DbTls(_)), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("TLS was refused")
            && text.contains("sslrootcert")
            && text.contains("127.0.0.1"),
        "{text}"
    );
}

fn flow(link: LinkId, flow_id: u32, ended_ms: u64, caller_id: Option<&str>) -> api::FlowRecord {
    api::FlowRecord {
        link_id: link,
        flow_id,
        side: comsat_protocol::Side::A,
        caller_id: caller_id.map(str::to_owned),
        caller: vec!["unix:uid:7".into(), "unix:path:/usr/bin/app_1".into()],
        relay_id: None,
        started_ms: ended_ms - 1,
        ended_ms,
        bytes_sent: u64::from(flow_id) * 3,
        bytes_received: u64::from(flow_id) * 5,
        outcome: api::FlowOutcome::Completed,
    }
}

async fn the_flow_log_answers_queries_and_stays_bounded(db: Db) {
    let store = open(&db).await;
    let agent = NodeId::random();
    let (link, other) = (LinkId::random(), LinkId::random());
    const ID: &str = "spiffe://example.org/app";
    let records: Vec<_> = (1..=1500u32)
        .map(|n| flow(link, n, 10_000 + u64::from(n), (n % 2 == 0).then_some(ID)))
        .chain((1..=10u32).map(|n| flow(other, n, 5_000 + u64::from(n), None)))
        .collect();
    for batch in records.chunks(500) {
        store.add_flows(&agent, batch).await.expect("add");
    }
    // A batch sent again (its answer was lost) is kept once.
    store
        .add_flows(&agent, &records[..100])
        .await
        .expect("again");
    let q = |link: Option<LinkId>, identity: Option<&str>, since_ms: u64, until_ms: u64| {
        comsat_controller::store::FlowQuery {
            link,
            identity: identity.map(str::to_owned),
            since_ms,
            until_ms,
            limit: 10_000,
        }
    };
    let all = store
        .flows(&q(None, None, 0, u64::MAX >> 1))
        .await
        .expect("all");
    assert_eq!(all.len(), 1510);
    assert_eq!(all[0].1, records[1499], "the latest first, as reported");
    assert!(all.iter().all(|(a, _)| *a == agent));
    let of_link = store
        .flows(&q(Some(link), None, 0, u64::MAX >> 1))
        .await
        .expect("link");
    assert_eq!(of_link.len(), 1500);
    let by_id = store
        .flows(&q(None, Some(ID), 0, u64::MAX >> 1))
        .await
        .expect("id");
    assert_eq!(by_id.len(), 750);
    assert!(
        by_id
            .iter()
            .all(|(_, r)| r.caller_id.as_deref() == Some(ID))
    );
    let by_selector = store
        .flows(&q(None, Some("unix:uid:7"), 0, u64::MAX >> 1))
        .await
        .expect("selector");
    assert_eq!(by_selector.len(), 1510);
    // `_` and `%` are no wildcards here.
    for not_there in [
        "unix:path:/usr/bin/app%",
        "unix:path:/usr/bin/app_2",
        "unix:uid:",
    ] {
        let none = store
            .flows(&q(None, Some(not_there), 0, u64::MAX >> 1))
            .await
            .expect("selector");
        assert!(none.is_empty(), "{not_there}");
    }
    let window = store
        .flows(&q(None, None, 10_101, 10_200))
        .await
        .expect("window");
    assert_eq!(window.len(), 100);
    let mut limited = q(None, None, 0, u64::MAX >> 1);
    limited.limit = 7;
    assert_eq!(store.flows(&limited).await.expect("limit").len(), 7);

    // Bounded: beyond the newest 1000 the oldest go; then by age.
    let removed = store.purge_flows(0, 1000).await.expect("purge");
    assert_eq!(removed, 510);
    let kept = store
        .flows(&q(None, None, 0, u64::MAX >> 1))
        .await
        .expect("kept");
    assert_eq!(kept.len(), 1000);
    assert!(kept.iter().all(|(_, r)| r.ended_ms > 10_500));
    assert_eq!(store.purge_flows(11_001, 1000).await.expect("age"), 500);
    assert_eq!(
        store
            .flows(&q(None, None, 0, u64::MAX >> 1))
            .await
            .expect("left")
            .len(),
        500
    );
}
both!(the_flow_log_answers_queries_and_stays_bounded);

async fn traffic_reports_are_kept_until_purged(db: Db) {
    let store = open(&db).await;
    let a = enrol(&store, NodeKind::Agent, "a").await;
    let b = enrol(&store, NodeKind::Agent, "b").await;
    let relay = enrol(&store, NodeKind::Relay, "r1").await;
    let link = LinkRecord {
        link_id: LinkId::random(),
        name: "db".into(),
        generation: 1,
        from_node: a.node_id,
        listen: "tcp://127.0.0.1:7000".into(),
        to_node: b.node_id,
        target: "tcp://127.0.0.1:5432".into(),
        allowed_uids: vec![],
        allowed_gids: vec![],
        allow: vec![],
        proxy_protocol: false,
        relays: vec![relay.relay_id()],
        created_at: unix_now(),
        grant_not_after: unix_now() + 3600,
        max_flows: None,
        rate_limit: None,
        connection: None,
    };
    store.create_link(&link, &[]).await.expect("create");
    let report = api::LinkTraffic {
        link_id: link.link_id,
        bytes_a_to_b: 100,
        bytes_b_to_a: 200,
        flows_open: 1,
    };
    // Recording never forgets anything by itself: a report two hours old
    // stays until a purge.
    store
        .record_traffic(&relay.node_id, std::slice::from_ref(&report), 1_000)
        .await
        .expect("old report");
    assert_eq!(store.traffic().await.expect("traffic").len(), 1);
    assert_eq!(store.purge_traffic(999).await.expect("purge"), 0);
    assert_eq!(store.purge_traffic(1_001).await.expect("purge"), 1);
    assert!(store.traffic().await.expect("traffic").is_empty());
}
both!(traffic_reports_are_kept_until_purged);

async fn federated_bundles_are_set_replaced_and_removed_and_agents_hear_of_it(db: Db) {
    let store = open(&db).await;
    let agent = enrol(&store, NodeKind::Agent, "a").await;
    let relay = enrol(&store, NodeKind::Relay, "r1").await;
    let version = |id: NodeId| {
        let store = &store;
        async move {
            store
                .node(&id)
                .await
                .expect("node")
                .expect("there")
                .config_version
        }
    };
    let (a0, r0) = (version(agent.node_id).await, version(relay.node_id).await);
    let bundle = |pem: &str| api::TrustBundle {
        trust_domain: "site-b.example".into(),
        bundle_pem: pem.into(),
    };
    store.set_bundle(&bundle("one"), 1).await.expect("set");
    store.set_bundle(&bundle("two"), 2).await.expect("replace");
    assert_eq!(store.bundles().await.expect("list"), vec![bundle("two")]);
    assert_eq!(
        version(agent.node_id).await,
        a0 + 2,
        "agents hear of each change"
    );
    assert_eq!(version(relay.node_id).await, r0, "relays do not");
    assert!(store.delete_bundle("site-b.example").await.expect("delete"));
    assert!(!store.delete_bundle("site-b.example").await.expect("again"));
    assert!(store.bundles().await.expect("list").is_empty());
    assert_eq!(version(agent.node_id).await, a0 + 3);
}
both!(federated_bundles_are_set_replaced_and_removed_and_agents_hear_of_it);
