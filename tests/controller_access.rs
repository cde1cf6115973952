//! What the controller lets in and tells, end to end with the real
//! `comsat` binary as processes: the refusals it owes (join tokens, JWTs)
//! and audits, what each node learns, service accounts and their roles,
//! and `ctl apply`.

#[path = "common/fleet.rs"]
mod fleet;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use comsat_node::keys::Generate;
use comsat_protocol::api;
use comsat_protocol::msg::make_hello;
use comsat_protocol::{SigningKey, jwt};
use comsat_tests::proc::{metric, scrape};
use comsat_tests::raw::{Control, RawClient, exporter};
use fleet::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_jwts_are_refused_alike_and_audited_with_the_reason() -> Result<()> {
    let mut c = Fleet::start(|t| t)?;
    c.enrol_agent("a")?;
    let [used, expired, relay_token] = refuse_join_tokens(&c)?;
    let (node_id, jwts) = refuse_bad_jwts(&c).await?;
    audit_every_reason_and_no_secret(&c, &node_id, jwts, [used, expired, relay_token])
}

/// Enrolments with a used, an expired, a relay's and a wrongly pinned join
/// token are refused; returns the files of the first three.
fn refuse_join_tokens(c: &Fleet) -> Result<[PathBuf; 3]> {
    let dir = |n: &str| s(&c.path(n));

    // A used token.
    let used = c.path("a.agent.token");
    let (code, _, err) = comsat(&[
        "agent",
        "enrol",
        "--token-file",
        &s(&used),
        "--data-dir",
        &dir("again"),
    ])?;
    let refused = |code: i32, err: &str| code != 0 && err.contains("join token refused");
    ensure!(refused(code, &err), "used token: {code} {err}");

    // An expired token.
    let expired = c.token("agent", "late", &["--ttl", "1s"])?;
    std::thread::sleep(Duration::from_millis(2100));
    let (code, _, err) = comsat(&[
        "agent",
        "enrol",
        "--token-file",
        &s(&expired),
        "--data-dir",
        &dir("late"),
    ])?;
    ensure!(refused(code, &err), "expired token: {code} {err}");
    // ... and used up: it stays refused.
    let (code, _, err) = comsat(&[
        "agent",
        "enrol",
        "--token-file",
        &s(&expired),
        "--data-dir",
        &dir("late2"),
    ])?;
    ensure!(code != 0, "expired token, second try: {code} {err}");

    // A relay token used by an agent.
    let relay_token = c.token("relay", "relay-9", &[])?;
    let (code, _, err) = comsat(&[
        "agent",
        "enrol",
        "--token-file",
        &s(&relay_token),
        "--data-dir",
        &dir("x"),
    ])?;
    ensure!(
        refused(code, &err),
        "relay token used by an agent: {code} {err}"
    );

    // A token pinning another CA.
    let good = std::fs::read_to_string(c.token("agent", "pinned", &[])?)?;
    let mut t = api::JoinToken::parse(&good)?;
    t.ca_sha256[0] ^= 1;
    let (code, _, err) = comsat(&["agent", "enrol", &t.encode(), "--data-dir", &dir("pinned")])?;
    ensure!(
        code != 0 && err.contains("SHA-256"),
        "wrong CA pin: {code} {err}"
    );

    Ok([used, expired, relay_token])
}

/// A JWT is refused replayed, signed by another key, expired, HS256, with
/// alg none, and an agent's on a relay endpoint; returns agent a's node id
/// and the JWTs used.
async fn refuse_bad_jwts(c: &Fleet) -> Result<(String, Vec<String>)> {
    // JWTs.
    let (state, key) = node_key(c, "a")?;
    let now = comsat_node::unix_now();
    let good = jwt::mint(
        &key,
        &state.node_id,
        &state.audience,
        now,
        30,
        comsat_node::keys::random_jti(),
    )?;
    let (code, body) = raw_get(c, api::PATH_AGENT_CONFIG, &good).await?;
    ensure!(code == 200, "{code} {body}");
    let (code, body) = raw_get(c, api::PATH_AGENT_CONFIG, &good).await?;
    let unauthorized = |code: u16, body: &str| code == 401 && body.contains("unauthorized");
    ensure!(unauthorized(code, &body), "replayed JWT: {code} {body}");

    let other = SigningKey::generate();
    let forged = jwt::mint(
        &other,
        &state.node_id,
        &state.audience,
        now,
        30,
        comsat_node::keys::random_jti(),
    )?;
    let (code, body) = raw_get(c, api::PATH_AGENT_CONFIG, &forged).await?;
    ensure!(
        unauthorized(code, &body),
        "JWT signed by another key: {code} {body}"
    );

    let old = jwt::mint(
        &key,
        &state.node_id,
        &state.audience,
        now - 600,
        30,
        comsat_node::keys::random_jti(),
    )?;
    let (code, body) = raw_get(c, api::PATH_AGENT_CONFIG, &old).await?;
    ensure!(unauthorized(code, &body), "expired JWT: {code} {body}");

    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let header = format!(r#"{{"alg":"HS256","typ":"JWT","kid":"{}"}}"#, state.node_id);
    let claims = format!(
        r#"{{"sub":"{}","aud":"{}","iat":{now},"exp":{},"jti":"hs"}}"#,
        state.node_id,
        state.audience,
        now + 30
    );
    let hs = format!(
        "{}.{}.{}",
        b64(header.as_bytes()),
        b64(claims.as_bytes()),
        b64(&[0; 32])
    );
    let (code, body) = raw_get(c, api::PATH_AGENT_CONFIG, &hs).await?;
    ensure!(unauthorized(code, &body), "HS256 JWT: {code} {body}");
    let none = format!(
        "{}.{}.",
        b64(format!(r#"{{"alg":"none","kid":"{}"}}"#, state.node_id).as_bytes()),
        b64(claims.as_bytes())
    );
    let (code, body) = raw_get(c, api::PATH_AGENT_CONFIG, &none).await?;
    ensure!(code == 401, "alg none JWT: {code} {body}");
    // A header holding ESC and a newline, which the refusal's reason quotes.
    let escape = format!(
        "{}.{}.",
        b64(r#"{"alg":"\u001b[2J\nforged","kid":"x"}"#.as_bytes()),
        b64(claims.as_bytes())
    );
    let (code, body) = raw_get(c, api::PATH_AGENT_CONFIG, &escape).await?;
    ensure!(code == 401, "JWT with control characters: {code} {body}");

    // An agent's JWT does not open relay endpoints.
    let agent_jwt = jwt::mint(
        &key,
        &state.node_id,
        &state.audience,
        now,
        30,
        comsat_node::keys::random_jti(),
    )?;
    let (code, body) = raw_get(c, api::PATH_RELAY_EVENTS, &agent_jwt).await?;
    ensure!(
        unauthorized(code, &body),
        "agent JWT on relay events: {code} {body}"
    );

    Ok((
        state.node_id.to_string(),
        vec![good, forged, old, hs, agent_jwt],
    ))
}

/// The operator sees every real reason in the audit log, with the subject
/// and the source; no token used (`jwts`, the join tokens in `files`, the
/// admin token) is in it, nor in the controller's log.
fn audit_every_reason_and_no_secret(
    c: &Fleet,
    node_id: &str,
    jwts: Vec<String>,
    files: [PathBuf; 3],
) -> Result<()> {
    let audit: Vec<api::AuditRecord> =
        serde_json::from_str(&c.ctl_ok(&["audit", "list", "--since", "1h", "-o", "json"])?)?;
    for reason in [
        "already used",
        "expired",
        "comsat relay enrol",
        "replayed",
        "signature",
        "EdDSA",
        "this endpoint is for relays",
    ] {
        ensure!(
            audit.iter().any(|r| r.result == "denied"
                && r.reason.as_deref().is_some_and(|x| x.contains(reason))
                && r.source
                    .as_deref()
                    .is_some_and(|s| s.starts_with("127.0.0.1:"))),
            "no denied audit record for {reason:?}: {audit:#?}"
        );
    }
    ensure!(
        audit
            .iter()
            .any(|r| r.subject == format!("node:{node_id}") && r.action == "authenticate"),
        "{audit:#?}"
    );
    let table = c.ctl_ok(&["audit", "list", "--subject", "agent:"])?;
    ensure!(
        table.starts_with("TIME") && table.contains("agent:a") && table.contains("enrol"),
        "{table}"
    );
    // The JWT header's ESC and newline are stored and printed escaped: no
    // record holds them raw, and the table shows the refusal on one row.
    let escaped = r"\u{1b}[2J\nforged";
    ensure!(
        audit
            .iter()
            .any(|r| r.result == "denied"
                && r.reason.as_deref().is_some_and(|x| x.contains(escaped))),
        "no record of the JWT with control characters: {audit:#?}"
    );
    let raw = |t: &str| t.contains(['\u{1b}', '\n']);
    ensure!(
        !audit
            .iter()
            .any(|r| raw(&r.subject) || raw(&r.resource) || r.reason.as_deref().is_some_and(raw)),
        "a record holds a raw ESC or newline: {audit:#?}"
    );
    let table = c.ctl_ok(&["audit", "list"])?;
    ensure!(!table.contains('\u{1b}'), "raw ESC in the table: {table:?}");
    ensure!(
        table
            .lines()
            .any(|l| l.contains(escaped) && l.contains("denied") && l.contains("127.0.0.1:")),
        "the refusal is not one whole row: {table}"
    );
    let audit_text = serde_json::to_string(&audit)?;
    let controller_log = std::fs::read_to_string(c.path("controller.log"))?;
    ensure!(
        !controller_log.contains('\u{1b}') && controller_log.contains(escaped),
        "the controller's log holds a raw ESC or not the escaped refusal"
    );
    let admin = std::fs::read_to_string(c.path("controller/admin.token"))?;
    let mut secrets = vec![admin.trim().to_owned()];
    secrets.extend(jwts);
    for file in files {
        let t = api::JoinToken::parse(std::fs::read_to_string(file)?.trim())?;
        secrets.push(t.secret.clone());
    }
    for secret in &secrets {
        ensure!(
            !audit_text.contains(secret.as_str()),
            "a secret is in the audit log"
        );
        ensure!(
            !controller_log.contains(secret.as_str()),
            "a secret is in the controller's log"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_learn_only_their_part() -> Result<()> {
    // Two relays, one relay per link: the other relay must get nothing.
    let mut c = Fleet::builder()
        .controller_toml(|t| set_key(&t, "relays_per_link", "1"))
        .relays(2)
        .agents(&["a", "b"])
        .start()?;
    let target = hash_server().await?;
    let target_spec = format!("tcp://{target}");
    let listen_spec = format!("tcp://127.0.0.1:{}", free_tcp_port()?);
    c.ctl_ok(&[
        "link",
        "create",
        "demo",
        "--from",
        "a",
        "--listen",
        &listen_spec,
        "--to",
        "b",
        "--target",
        &target_spec,
    ])?;
    let listen = listen_addr(c.agent("a")?, "demo")?;
    round_trip_eventually(listen, 1 << 20)
        .await
        .with_context(|| c.logs())?;

    let link: api::LinkInfo =
        serde_json::from_str(&c.ctl_ok(&["link", "show", "demo", "-o", "json"])?)?;
    ensure!(link.relays.len() == 1, "{link:?}");
    let assigned = link.relays[0].clone();
    let other = if assigned == "relay-1" {
        "relay-2"
    } else {
        "relay-1"
    };

    // The unassigned relay's event log and grant cache hold nothing.
    let t = c.jwt(other, comsat_node::unix_now(), 30)?;
    let (code, body) = raw_get(
        &c,
        &format!("{}?since=0&wait_ms=0", api::PATH_RELAY_EVENTS),
        &t,
    )
    .await?;
    ensure!(code == 200, "{code} {body}");
    let events: api::RelayEvents = serde_json::from_str(&body)?;
    ensure!(
        events.events.is_empty(),
        "unassigned relay got events: {body}"
    );
    let cached = std::fs::read_dir(c.path(other).join("grants"))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "grant"))
        .count();
    ensure!(cached == 0, "unassigned relay cached {cached} grants");
    let m = scrape(c.relay_admin(other)?)?;
    ensure!(metric(&m, "comsat_relay_grants_loaded") == 0.0);
    let m = scrape(c.relay_admin(&assigned)?)?;
    ensure!(metric(&m, "comsat_relay_grants_loaded") == 1.0);

    // Each agent's desired state names its own half, never the peer's
    // socket.
    for (me, must_not) in [("a", target_spec.as_str()), ("b", listen_spec.as_str())] {
        let t = c.jwt(me, comsat_node::unix_now(), 30)?;
        let (code, body) = raw_get(
            &c,
            &format!("{}?since=0&wait_ms=0", api::PATH_AGENT_CONFIG),
            &t,
        )
        .await?;
        ensure!(code == 200, "{code} {body}");
        ensure!(
            !body.contains(must_not),
            "agent {me}'s config names its peer's socket: {body}"
        );
        let desired: api::AgentDesired = serde_json::from_str(&body)?;
        ensure!(desired.links.len() == 1);
        let l = &desired.links[0];
        ensure!(l.relays.len() == 1 && l.relays[0].addr.starts_with("127.0.0.1:"));
        // A poll that finds nothing new answers small: the version only.
        // (A node's JWT is good for one request.)
        let t = c.jwt(me, comsat_node::unix_now(), 30)?;
        let (code, unchanged) = raw_get(
            &c,
            &format!(
                "{}?since={}&wait_ms=0",
                api::PATH_AGENT_CONFIG,
                desired.version
            ),
            &t,
        )
        .await?;
        ensure!(code == 200, "{code} {unchanged}");
        let same: api::AgentDesired = serde_json::from_str(&unchanged)?;
        ensure!(
            same.version == desired.version
                && same.links.is_empty()
                && same.relay_ca_pem.is_empty(),
            "an unchanged poll answered {unchanged}"
        );
        ensure!(unchanged.len() < 100, "{unchanged}");
    }

    // The assigned relay stops heartbeating: the link moves to the other
    // one and carries bytes there.
    let idx = c
        .relays
        .iter()
        .position(|r| r.0 == assigned)
        .context("relay")?;
    c.relays[idx].1.kill();
    wait_for(Duration::from_secs(60), || {
        let link: api::LinkInfo =
            serde_json::from_str(&c.ctl_ok(&["link", "show", "demo", "-o", "json"])?)?;
        ensure!(link.relays == [other], "still on {:?}", link.relays);
        Ok(())
    })
    .with_context(|| c.logs())?;
    round_trip_eventually(listen, 1 << 20)
        .await
        .with_context(|| c.logs())?;
    let m = scrape(c.relay_admin(other)?)?;
    ensure!(
        metric(&m, "comsat_relay_grants_loaded") == 1.0,
        "the new relay holds the grant"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_account_gets_only_what_its_role_allows() -> Result<()> {
    let c = Fleet::start(|t| t)?;
    // `create` prints the token and nothing else.
    let token = c.ctl_ok(&["serviceaccount", "create", "deployer"])?;
    ensure!(
        token.lines().count() == 1 && token.starts_with("comsat-sa-v1:"),
        "{token}"
    );
    let token_file = c.path("deployer.token");
    comsat_node::keys::write_secret_file(&token_file, token.as_bytes())?;
    c.ctl_ok(&[
        "rolebinding",
        "create",
        "deployer-ops",
        "--role",
        "operator",
        "--serviceaccount",
        "deployer",
    ])?;
    let url = controller_url(&c)?;
    let ca = s(&c.path("controller/ca.pem"));
    let as_deployer = |args: &[&str]| {
        let tf = s(&token_file);
        let mut all = vec![
            "ctl",
            "--controller",
            &url,
            "--token-file",
            &tf,
            "--ca",
            &ca,
        ];
        all.extend_from_slice(args);
        comsat(&all)
    };
    // The operator role may create join tokens...
    let (code, out, err) = as_deployer(&["token", "create", "--kind", "agent"])?;
    ensure!(
        code == 0 && out.starts_with("comsat-join-v1:"),
        "{code} {out} {err}"
    );
    // ...but not read roles: refused, non-zero, naming the permission.
    let (code, _, err) = as_deployer(&["role", "list"])?;
    ensure!(
        code != 0 && err.contains("`list` on `roles`"),
        "{code} {err}"
    );
    // A custom role, bound in place of the operator one.
    c.ctl_ok(&[
        "role",
        "create",
        "reader",
        "--rule",
        "links,agents:get,list",
    ])?;
    let roles = c.ctl_ok(&["role", "list"])?;
    ensure!(
        roles.contains("reader") && roles.contains("built-in"),
        "{roles}"
    );
    c.ctl_ok(&["rolebinding", "delete", "deployer-ops"])?;
    c.ctl_ok(&[
        "rolebinding",
        "create",
        "deployer-read",
        "--role",
        "reader",
        "--serviceaccount",
        "deployer",
    ])?;
    let (code, _, err) = as_deployer(&["link", "list"])?;
    ensure!(code == 0, "{err}");
    let (code, _, err) = as_deployer(&["token", "create", "--kind", "agent"])?;
    ensure!(
        code != 0 && err.contains("`create` on `tokens/agent`"),
        "{code} {err}"
    );
    // Deleting the account ends its token.
    c.ctl_ok(&["serviceaccount", "delete", "deployer"])?;
    let (code, _, err) = as_deployer(&["link", "list"])?;
    ensure!(code != 0 && err.contains("unauthorized"), "{code} {err}");
    let audit = c.ctl_ok(&[
        "audit",
        "list",
        "--subject",
        "serviceaccount:deployer",
        "-o",
        "json",
    ])?;
    ensure!(audit.contains("`list` on `roles`"), "{audit}");
    Ok(())
}

/// The file `apply` is given: one of each kind it takes.
const FLEET_YAML: &str = "\
apiVersion: comsat.dev/v1
kind: ServiceAccount
metadata: {name: ci}
---
apiVersion: comsat.dev/v1
kind: Role
metadata: {name: reader}
spec:
  rules:
    - resources: [links, agents]
      verbs: [get, list]
---
apiVersion: comsat.dev/v1
kind: RoleBinding
metadata: {name: ci-reads}
spec: {role: reader, subject: {kind: serviceaccount, name: ci}}
---
apiVersion: comsat.dev/v1
kind: Link
metadata: {name: db}
spec:
  from: a
  listen: tcp://127.0.0.1:17432
  to: b
  target: tcp://127.0.0.1:5432
  maxFlows: 10
---
apiVersion: comsat.dev/v1
kind: JoinToken
metadata: {name: edge-c}
spec: {nodeKind: agent, ttl: 1h}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_is_idempotent_and_refuses_a_bad_file_whole() -> Result<()> {
    let mut c = Fleet::start(|t| t)?;
    c.enrol_agent("a")?;
    c.enrol_agent("b")?;
    let file = c.path("fleet.yaml");
    let text = FLEET_YAML;
    std::fs::write(&file, text)?;
    let f = s(&file);
    let first = c.ctl_ok(&["apply", "-f", &f])?;
    for line in [
        "serviceaccount/ci created",
        "role/reader created",
        "rolebinding/ci-reads created",
        "link/db created",
        "jointoken/edge-c created",
    ] {
        ensure!(first.contains(line), "{line}: {first}");
    }
    ensure!(first.contains("comsat-sa-v1:") && first.contains("comsat-join-v1:"));
    let second = c.ctl_ok(&["apply", "-f", &f])?;
    ensure!(
        second.lines().count() == 5 && second.lines().all(|l| l.contains(" unchanged")),
        "the second apply changed something:\n{second}"
    );
    let links: Vec<api::LinkInfo> =
        serde_json::from_str(&c.ctl_ok(&["link", "list", "-o", "json"])?)?;
    ensure!(links.len() == 1 && links[0].spec.max_flows == Some(10) && links[0].generation == 1);

    // What `get` prints, `apply` takes back unchanged.
    for (kind, name) in [
        ("link", "db"),
        ("role", "reader"),
        ("rolebinding", "ci-reads"),
        ("serviceaccount", "ci"),
    ] {
        let yaml = c.ctl_ok(&["get", kind, name, "-o", "yaml"])?;
        ensure!(yaml.contains("apiVersion: comsat.dev/v1"), "{yaml}");
        let back = c.path(&format!("{kind}.yaml"));
        std::fs::write(&back, &yaml)?;
        let again = c.ctl_ok(&["apply", "-f", &s(&back)])?;
        ensure!(
            again.trim() == format!("{kind}/{name} unchanged"),
            "{kind}: {again}\n{yaml}"
        );
    }

    // A limit changed in the file is an update of the same link.
    std::fs::write(&file, text.replace("maxFlows: 10", "maxFlows: 20"))?;
    let third = c.ctl_ok(&["apply", "-f", &f])?;
    ensure!(third.contains("link/db updated"), "{third}");
    let links: Vec<api::LinkInfo> =
        serde_json::from_str(&c.ctl_ok(&["link", "list", "-o", "json"])?)?;
    ensure!(links[0].spec.max_flows == Some(20) && links[0].generation == 1);

    // A bad document: refused with the file, document and field named, and
    // nothing of the file applied.
    let bad = format!(
        "apiVersion: comsat.dev/v1\nkind: ServiceAccount\nmetadata: {{name: fresh}}\n---\n{}",
        text.replace("target: tcp", "tagret: tcp")
    );
    std::fs::write(&file, bad)?;
    let (code, _, err) = c.ctl(&["apply", "-f", &f])?;
    ensure!(
        code != 0
            && err.contains("fleet.yaml")
            && err.contains("document 5")
            && err.contains("tagret"),
        "{code} {err}"
    );
    let sas = c.ctl_ok(&["serviceaccount", "list"])?;
    ensure!(
        !sas.contains("fresh"),
        "a document of a refused file was applied: {sas}"
    );

    // Decommissioning an agent: refused while it holds a link, then done;
    // its credentials stop working at once.
    let (code, _, err) = c.ctl(&["agent", "delete", "a"])?;
    ensure!(code != 0 && err.contains("db"), "{code} {err}");
    c.ctl_ok(&["link", "delete", "db"])?;
    c.ctl_ok(&["agent", "delete", "a"])?;
    let agents = c.ctl_ok(&["agent", "list"])?;
    ensure!(!agents.lines().any(|l| l.starts_with("a ")), "{agents}");
    let jwt = c.jwt("a", comsat_node::unix_now(), 30)?;
    let (code, _) = raw_get(&c, api::PATH_AGENT_CONFIG, &jwt).await?;
    ensure!(code == 401, "a decommissioned agent is refused: {code}");
    let audit = c.ctl_ok(&["audit", "list", "-o", "json"])?;
    ensure!(
        audit.contains("agents.delete") && audit.contains("not enrolled"),
        "{audit}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_key_connected_from_two_sources_at_once_is_audited_as_a_clone() -> Result<()> {
    let mut c = Fleet::builder().relays(1).agents(&["a", "b"]).start()?;
    // A link puts agent a's key in the relay's grants.
    c.create_link("cloned", "127.0.0.1:9".parse()?, &[])?;
    let (state, key) = node_key(&c, "a")?;
    let relay = c.relays[0].2;
    let ca = c.path("a").join("relay-ca.pem");
    let mut held_clients = Vec::new();
    // Agent a's key, copied to two machines (127.0.0.2 and 127.0.0.3),
    // each connection held open with its control stream (a connection
    // whose control stream ends is closed by the relay).
    let mut held = Vec::new();
    for source in ["127.0.0.2", "127.0.0.3"] {
        let client = RawClient::from_source(&ca, source.parse()?)?;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            // Until the grant reached the relay, the key is unknown there.
            let conn = client.connect_to(relay, "127.0.0.1").await?;
            let hello = make_hello(state.node_id, &key, &exporter(&conn)?);
            match Control::open(&conn, &hello).await {
                Ok(control) => {
                    held.push((conn, control));
                    break;
                }
                Err(e) => ensure!(
                    std::time::Instant::now() < deadline,
                    "{source}: {e:#}\n{}",
                    c.logs()
                ),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        held_clients.push(client);
    }
    // The relay's next heartbeat carries the alarm to the audit log.
    let mut table = String::new();
    wait_for(Duration::from_secs(30), || {
        table = c.ctl_ok(&["audit", "list", "--since", "1h"])?;
        ensure!(
            table
                .lines()
                .any(|l| l.contains("node.clone") && l.contains("from 127.0.0.3")),
            "no clone alarm for 127.0.0.3 yet"
        );
        Ok(())
    })
    .with_context(|| format!("{table}\n{}", c.logs()))?;
    // The real agent (127.0.0.1) holds the key too: each copy's alarm
    // names a source it met.
    let line = table
        .lines()
        .find(|l| l.contains("node.clone") && l.contains("from 127.0.0.3"))
        .context("the alarm")?;
    for want in [
        "relay/relay-1",
        "agent/a",
        "alarm",
        "while connected from 127.0.0.",
    ] {
        ensure!(line.contains(want), "{want} missing from {line:?}");
    }
    Ok(())
}
