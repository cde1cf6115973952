//! `comsat dev init`'s static setup: the configs it writes load in the
//! relay and the agents, and its layout edits keep them loadable.

use std::net::SocketAddr;

use comsat_controller::dev::{DevLink, DevOptions, init};

#[test]
fn init_writes_loadable_configs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let layout = init(
        dir.path(),
        &DevOptions {
            relay_listen: "127.0.0.1:4433".parse().expect("addr"),
            relay_admin: None,
            agent_admin: [None, None],
            links: vec![DevLink {
                name: "demo".into(),
                listen: "tcp://127.0.0.1:7000".into(),
                target: "tcp://127.0.0.1:9000".into(),
                allowed_uids: vec![],
                allow: vec![],
                proxy_protocol: false,
            }],
            pin_sha256: false,
            extra_relays: vec![],
        },
    )
    .expect("init");
    let relay = comsat_relay::RelayConfig::load(&layout.relay_config).expect("relay config");
    assert_eq!(relay.relay_id, layout.relay_id);
    let a = comsat_agent::AgentConfig::load(&layout.agent_a.config).expect("agent a");
    let b = comsat_agent::AgentConfig::load(&layout.agent_b.config).expect("agent b");
    assert_eq!(a.links.len(), 1);
    assert_eq!(b.links[0].link_id, a.links[0].link_id);
    assert!(
        init(dir.path(), &DevOptions { ..layout_opts() }).is_err(),
        "second init refused"
    );
}

#[test]
fn links_kept_on_one_relay_or_given_a_connection_in_both_agents() {
    let dir = tempfile::tempdir().expect("tempdir");
    let link = |name: &str| DevLink {
        name: name.into(),
        listen: "tcp://127.0.0.1:0".into(),
        target: "tcp://127.0.0.1:9000".into(),
        allowed_uids: vec![],
        allow: vec![],
        proxy_protocol: false,
    };
    let layout = init(
        dir.path(),
        &DevOptions {
            links: vec![link("bulk"), link("ping")],
            extra_relays: vec![("127.0.0.1:4434".parse().expect("addr"), None)],
            ..layout_opts()
        },
    )
    .expect("init");
    layout.keep_link_on_relay("ping", 1).expect("keep ping");
    layout
        .set_link_connection("bulk", "files")
        .expect("name a connection");
    for config in [&layout.agent_a.config, &layout.agent_b.config] {
        let agent = comsat_agent::AgentConfig::load(config).expect("still loads");
        let find = |name: &str| agent.links.iter().find(|l| l.name == name).expect("link");
        let relays = |name: &str| -> Vec<String> {
            find(name).relays.iter().map(|r| r.addr.clone()).collect()
        };
        assert_eq!(relays("ping"), ["127.0.0.1:4434"]);
        assert_eq!(relays("bulk"), ["127.0.0.1:4433", "127.0.0.1:4434"]);
        assert_eq!(find("bulk").connection.as_deref(), Some("files"));
        assert_eq!(find("ping").connection, None);
    }
    let lane: SocketAddr = "127.0.0.1:4435".parse().expect("addr");
    layout
        .put_link_on_interactive_listener("ping", "rpc", 1, lane)
        .expect("interactive listener");
    let relay = comsat_relay::RelayConfig::load(&layout.relays[1].config).expect("relay 2");
    assert_eq!(relay.interactive_listen, Some(lane));
    for config in [&layout.agent_a.config, &layout.agent_b.config] {
        let agent = comsat_agent::AgentConfig::load(config).expect("still loads");
        let ping = agent.links.iter().find(|l| l.name == "ping").expect("ping");
        assert_eq!(ping.connection.as_deref(), Some("rpc"));
        let addrs: Vec<&str> = ping.relays.iter().map(|r| r.addr.as_str()).collect();
        assert_eq!(addrs, ["127.0.0.1:4435"]);
    }
    let err = layout
        .put_link_on_interactive_listener("bulk", "rpc", 5, lane)
        .expect_err("no sixth relay");
    assert!(err.to_string().contains("2 relays"), "{err}");
    let err = layout
        .keep_link_on_relay("ping", 2)
        .expect_err("no third relay");
    assert!(err.to_string().contains("2 relays"), "{err}");
    let err = layout
        .keep_link_on_relay("nope", 0)
        .expect_err("no such link");
    assert!(err.to_string().contains("nope"), "{err}");
}

fn layout_opts() -> DevOptions {
    DevOptions {
        relay_listen: "127.0.0.1:4433".parse().expect("addr"),
        relay_admin: None,
        agent_admin: [None, None],
        links: vec![],
        pin_sha256: true,
        extra_relays: vec![],
    }
}
