//! `comsat ctl apply -f FILE` and `comsat ctl get KIND NAME`: declarative
//! configuration in YAML, as kubectl users expect.
//!
//! A file holds one or more documents (separated by `---`), each:
//!
//! ```yaml
//! apiVersion: comsat.dev/v1
//! kind: Link            # Link, Role, RoleBinding, ServiceAccount, JoinToken
//! metadata:
//!   name: db
//! spec:
//!   from: edge-a
//!   listen: tcp://127.0.0.1:5432
//!   to: edge-b
//!   target: tcp://127.0.0.1:5432
//!   maxFlows: 100         # optional
//!   rateLimit: 10MiB/s    # optional
//! ---
//! apiVersion: comsat.dev/v1
//! kind: Role
//! metadata: {name: reader}
//! spec:
//!   rules:
//!     - resources: [links, agents]
//!       verbs: [get, list]
//! ---
//! apiVersion: comsat.dev/v1
//! kind: ServiceAccount
//! metadata: {name: ci}
//! ---
//! apiVersion: comsat.dev/v1
//! kind: RoleBinding
//! metadata: {name: ci-reads}
//! spec: {role: reader, subject: {kind: serviceaccount, name: ci}}
//! ---
//! apiVersion: comsat.dev/v1
//! kind: JoinToken
//! metadata: {name: edge-c}       # the name the node gets
//! spec: {nodeKind: agent, ttl: 1h}
//! ```
//!
//! The whole file is parsed and checked before anything changes; unknown
//! fields are refused with the document and field named. Documents are then
//! applied in order, one by one: one the controller refuses stops the run,
//! those before it stay applied (so a role binding comes after the service
//! account it names). Applying is
//! idempotent: what is already as the file says is left alone (`unchanged`),
//! so a second apply changes nothing. A link's endpoints cannot change in
//! place (delete it first); its limits can. A role or role binding that
//! differs is replaced. A new service account's token, and a new join token,
//! are printed once. A join token is created only while no node of that
//! name is enrolled and no unused token for it is open.

use std::path::Path;

use anyhow::{anyhow, bail};
use comsat_protocol::api::{self, NodeKind, PrincipalKind};
use serde::{Deserialize, Serialize};

use crate::client::Client;

/// The one API version.
pub const API_VERSION: &str = "comsat.dev/v1";

/// Largest file read.
const MAX_FILE: u64 = 4 * 1024 * 1024;

/// Most documents in a file.
const MAX_DOCUMENTS: usize = 1000;

/// One document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Document {
    /// `comsat.dev/v1`.
    pub api_version: String,
    /// What it describes.
    pub kind: Kind,
    /// Its name.
    pub metadata: Metadata,
    /// The kind's fields.
    #[serde(default, skip_serializing_if = "serde_yaml_ng::Value::is_null")]
    pub spec: serde_yaml_ng::Value,
}

/// The kinds `apply` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// A link.
    Link,
    /// A role.
    Role,
    /// A role binding.
    RoleBinding,
    /// A service account.
    ServiceAccount,
    /// A join token.
    JoinToken,
}

/// `metadata`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    /// The name.
    pub name: String,
}

/// `spec` of a Link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LinkSpec {
    from: String,
    listen: String,
    to: String,
    target: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    allowed_uids: Vec<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    allowed_gids: Vec<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    allow: Vec<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    proxy_protocol: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_flows: Option<u32>,
    /// Like `10MiB/s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rate_limit: Option<String>,
    /// The agents' connection of its own for the link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    connection: Option<String>,
}

/// `spec` of a Role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleSpec {
    rules: Vec<api::Rule>,
}

/// `spec` of a RoleBinding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleBindingSpec {
    role: String,
    subject: Subject,
}

/// Whom a role binding names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subject {
    kind: PrincipalKind,
    name: String,
}

/// `spec` of a ServiceAccount (none).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceAccountSpec {}

/// `spec` of a JoinToken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct JoinTokenSpec {
    node_kind: NodeKind,
    /// Like `1h` (default one hour).
    #[serde(default)]
    ttl: Option<String>,
}

/// A checked document, ready to apply.
#[derive(Debug, Clone, PartialEq)]
enum Item {
    Link(String, LinkSpec),
    Role(String, RoleSpec),
    RoleBinding(String, RoleBindingSpec),
    ServiceAccount(String),
    JoinToken(String, JoinTokenSpec),
}

/// Why a document is refused before anything is applied.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DocumentError {
    /// `apiVersion` is not this one.
    #[error("apiVersion `{0}` is not known here (use {API_VERSION})")]
    ApiVersion(String),
    /// `metadata.name` out of its grammar.
    #[error("metadata.name `{0}`: 1 to {max} characters of a-z, 0-9 and -", max = api::MAX_NAME_LEN)]
    Name(String),
    /// No `spec` where the kind needs one.
    #[error("spec is missing")]
    MissingSpec,
    /// `spec` does not fit the kind.
    #[error("spec: {0}")]
    Spec(serde_yaml_ng::Error),
    /// `spec.rateLimit` is no rate.
    #[error("spec.rateLimit: {0}")]
    Rate(crate::ctl::RateError),
    /// `spec.connection` out of its grammar.
    #[error(
        "spec.connection `{0}`: use 1 to {max} letters, digits, -, _ or .",
        max = api::MAX_CONNECTION_NAME_LEN
    )]
    Connection(String),
    /// `spec.ttl` is no duration.
    #[error("spec.ttl `{0}`: {1}")]
    Ttl(String, humantime::DurationError),
}

fn spec<T: serde::de::DeserializeOwned + Default>(
    v: serde_yaml_ng::Value,
) -> Result<T, DocumentError> {
    if v.is_null() {
        return Ok(T::default());
    }
    serde_yaml_ng::from_value(v).map_err(DocumentError::Spec)
}

fn required<T: serde::de::DeserializeOwned>(v: serde_yaml_ng::Value) -> Result<T, DocumentError> {
    if v.is_null() {
        return Err(DocumentError::MissingSpec);
    }
    serde_yaml_ng::from_value(v).map_err(DocumentError::Spec)
}

fn check(doc: Document) -> Result<Item, DocumentError> {
    if doc.api_version != API_VERSION {
        return Err(DocumentError::ApiVersion(doc.api_version));
    }
    let name = doc.metadata.name;
    if !api::valid_name(&name) {
        return Err(DocumentError::Name(name));
    }
    Ok(match doc.kind {
        Kind::Link => {
            let s: LinkSpec = required(doc.spec)?;
            if let Some(r) = &s.rate_limit {
                crate::ctl::parse_rate(r).map_err(DocumentError::Rate)?;
            }
            if let Some(c) = s.connection.as_deref()
                && !api::valid_connection_name(c)
            {
                return Err(DocumentError::Connection(c.escape_debug().to_string()));
            }
            Item::Link(name, s)
        }
        Kind::Role => Item::Role(name, required(doc.spec)?),
        Kind::RoleBinding => Item::RoleBinding(name, required(doc.spec)?),
        Kind::ServiceAccount => {
            let _: ServiceAccountSpec = spec(doc.spec)?;
            Item::ServiceAccount(name)
        }
        Kind::JoinToken => {
            let s: JoinTokenSpec = required(doc.spec)?;
            if let Some(t) = &s.ttl {
                humantime::parse_duration(t).map_err(|e| DocumentError::Ttl(t.clone(), e))?;
            }
            Item::JoinToken(name, s)
        }
    })
}

/// Parses and checks every document of `text` (named `file` in errors).
fn parse(file: &str, text: &str) -> anyhow::Result<Vec<Item>> {
    let mut items = Vec::new();
    for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let n = i + 1;
        if n > MAX_DOCUMENTS {
            bail!("{file}: more than {MAX_DOCUMENTS} documents");
        }
        let value = serde_yaml_ng::Value::deserialize(de)
            .map_err(|e| anyhow!("{file}: document {n}: not YAML: {e}"))?;
        if value.is_null() {
            continue; // an empty document (a trailing `---`)
        }
        let doc: Document =
            serde_yaml_ng::from_value(value).map_err(|e| anyhow!("{file}: document {n}: {e}"))?;
        let label = format!("{:?} {}", doc.kind, doc.metadata.name);
        let item = check(doc).map_err(|e| anyhow!("{file}: document {n} ({label}): {e}"))?;
        items.push(item);
    }
    if items.is_empty() {
        bail!("{file}: no document in it");
    }
    Ok(items)
}

/// `ctl apply -f FILE`: one line per document, `KIND/NAME created|updated|
/// unchanged|replaced`.
pub async fn apply(c: &Client, path: &Path) -> anyhow::Result<String> {
    let text = crate::state::read_at_most(path, MAX_FILE)?;
    let items = parse(&path.display().to_string(), &text)?;
    let mut out = String::new();
    for item in items {
        out.push_str(&apply_one(c, item).await?);
        out.push('\n');
    }
    Ok(out)
}

async fn get_opt<T: serde::de::DeserializeOwned>(
    c: &Client,
    path: &str,
    what: &str,
) -> anyhow::Result<Option<T>> {
    match c.get::<T>(path, &[], what).await {
        Ok(v) => Ok(Some(v)),
        Err(e) if format!("{e:#}").contains("(404 Not Found)") => Ok(None),
        Err(e) => Err(e),
    }
}

async fn apply_one(c: &Client, item: Item) -> anyhow::Result<String> {
    match item {
        Item::Link(name, s) => apply_link(c, name, s).await,
        Item::Role(name, s) => apply_role(c, name, s).await,
        Item::RoleBinding(name, s) => apply_role_binding(c, name, s).await,
        Item::ServiceAccount(name) => apply_service_account(c, name).await,
        Item::JoinToken(name, s) => apply_join_token(c, name, s).await,
    }
}

/// Creates link `name`, or updates its limits and connection; its endpoints
/// cannot change in place.
async fn apply_link(c: &Client, name: String, s: LinkSpec) -> anyhow::Result<String> {
    let path = format!("{}/{name}", api::PATH_LINKS);
    let rate = s
        .rate_limit
        .as_deref()
        .map(crate::ctl::parse_rate)
        .transpose()
        .map_err(|e| anyhow!(e))?;
    let Some(have) = get_opt::<api::LinkInfo>(c, &path, "apply").await? else {
        let body = api::LinkSpec {
            name: name.clone(),
            from: s.from,
            listen: s.listen,
            to: s.to,
            target: s.target,
            allowed_uids: s.allowed_uids,
            allowed_gids: s.allowed_gids,
            allow: s.allow,
            proxy_protocol: s.proxy_protocol,
            max_flows: s.max_flows,
            rate_limit_bytes_per_sec: rate,
            connection: s.connection,
        };
        let _: api::LinkInfo = c.post(api::PATH_LINKS, &body, "apply").await?;
        return Ok(format!("link/{name} created"));
    };
    let fixed = [
        ("from", have.spec.from == s.from),
        ("listen", have.spec.listen == s.listen),
        ("to", have.spec.to == s.to),
        ("target", have.spec.target == s.target),
        ("allowedUids", have.spec.allowed_uids == s.allowed_uids),
        ("allowedGids", have.spec.allowed_gids == s.allowed_gids),
        ("allow", have.spec.allow == s.allow),
        (
            "proxyProtocol",
            have.spec.proxy_protocol == s.proxy_protocol,
        ),
    ];
    if let Some((field, _)) = fixed.iter().find(|(_, same)| !same) {
        bail!(
            "link/{name}: `{field}` differs from the link's; a link's endpoints cannot \
             change in place (`comsat ctl link delete {name}`, then apply)"
        );
    }
    let limits_same =
        have.spec.max_flows == s.max_flows && have.spec.rate_limit_bytes_per_sec == rate;
    let connection_same = have.spec.connection == s.connection;
    if limits_same && connection_same {
        return Ok(format!("link/{name} unchanged"));
    }
    // A new connection re-creates the agents' halves (open flows
    // reset), so it is sent only when it changes.
    let update = api::LinkUpdate {
        max_flows: (!limits_same).then(|| s.max_flows.unwrap_or(0)),
        rate_limit_bytes_per_sec: (!limits_same).then(|| rate.unwrap_or(0)),
        connection: (!connection_same).then(|| s.connection.unwrap_or_default()),
    };
    let _: api::LinkInfo = c.patch(&path, &update, "apply").await?;
    Ok(format!("link/{name} updated"))
}

/// Creates role `name`, or replaces it if its rules differ.
async fn apply_role(c: &Client, name: String, s: RoleSpec) -> anyhow::Result<String> {
    let path = format!("{}/{name}", api::PATH_ROLES);
    let have = get_opt::<api::RoleInfo>(c, &path, "apply").await?;
    if let Some(h) = &have {
        if h.builtin {
            bail!("role/{name} is built in; it cannot be changed");
        }
        if h.rules == s.rules {
            return Ok(format!("role/{name} unchanged"));
        }
        c.delete(&path, "apply").await?;
    }
    let body = api::RoleCreate {
        name: name.clone(),
        rules: s.rules,
    };
    let _: api::RoleInfo = c.post(api::PATH_ROLES, &body, "apply").await?;
    Ok(format!(
        "role/{name} {}",
        if have.is_some() {
            "replaced"
        } else {
            "created"
        }
    ))
}

/// Creates role binding `name`, or replaces it if it differs.
async fn apply_role_binding(
    c: &Client,
    name: String,
    s: RoleBindingSpec,
) -> anyhow::Result<String> {
    let path = format!("{}/{name}", api::PATH_ROLE_BINDINGS);
    let want = api::RoleBindingCreate {
        name: name.clone(),
        role: s.role,
        subject_kind: s.subject.kind,
        subject_name: s.subject.name,
    };
    let have = get_opt::<api::RoleBindingInfo>(c, &path, "apply").await?;
    if let Some(h) = &have {
        if *h == want {
            return Ok(format!("rolebinding/{name} unchanged"));
        }
        c.delete(&path, "apply").await?;
    }
    let _: api::RoleBindingInfo = c.post(api::PATH_ROLE_BINDINGS, &want, "apply").await?;
    Ok(format!(
        "rolebinding/{name} {}",
        if have.is_some() {
            "replaced"
        } else {
            "created"
        }
    ))
}

/// Creates service account `name` unless it exists.
async fn apply_service_account(c: &Client, name: String) -> anyhow::Result<String> {
    let all: Vec<api::PrincipalInfo> = c.get(api::PATH_SERVICE_ACCOUNTS, &[], "apply").await?;
    if all.iter().any(|p| p.name == name) {
        return Ok(format!("serviceaccount/{name} unchanged"));
    }
    let body = api::PrincipalCreate {
        name: name.clone(),
        ttl_secs: None,
    };
    let created: api::PrincipalCreated = c.post(api::PATH_SERVICE_ACCOUNTS, &body, "apply").await?;
    Ok(format!(
        "serviceaccount/{name} created; its token (shown once): {}",
        created.token
    ))
}

/// Creates a join token for node `name` unless the node is enrolled or an
/// unused token for it is open.
async fn apply_join_token(c: &Client, name: String, s: JoinTokenSpec) -> anyhow::Result<String> {
    let nodes_path = match s.node_kind {
        NodeKind::Agent => api::PATH_AGENTS,
        NodeKind::Relay => api::PATH_RELAYS,
    };
    let enrolled = match s.node_kind {
        NodeKind::Agent => c
            .get::<Vec<api::AgentInfo>>(nodes_path, &[], "apply")
            .await?
            .iter()
            .any(|a| a.name == name),
        NodeKind::Relay => c
            .get::<Vec<api::RelayInfo>>(nodes_path, &[], "apply")
            .await?
            .iter()
            .any(|r| r.name == name),
    };
    if enrolled {
        return Ok(format!("jointoken/{name} unchanged (enrolled)"));
    }
    let open: Vec<api::JoinTokenInfo> = c.get(api::PATH_OPEN_TOKENS, &[], "apply").await?;
    if open
        .iter()
        .any(|t| t.kind == s.node_kind && t.name.as_deref() == Some(name.as_str()))
    {
        return Ok(format!(
            "jointoken/{name} unchanged (an unused one is open)"
        ));
    }
    let ttl = s
        .ttl
        .as_deref()
        .map(humantime::parse_duration)
        .transpose()?
        .map(|d| d.as_secs().max(1));
    let body = api::TokenCreate {
        kind: s.node_kind,
        name: Some(name.clone()),
        ttl_secs: ttl,
    };
    let created: api::TokenCreated = c.post(api::PATH_TOKENS, &body, "apply").await?;
    Ok(format!(
        "jointoken/{name} created (shown once): {}",
        created.token
    ))
}

fn document(kind: Kind, name: &str, spec: impl Serialize) -> anyhow::Result<Document> {
    Ok(Document {
        api_version: API_VERSION.into(),
        kind,
        metadata: Metadata { name: name.into() },
        spec: serde_yaml_ng::to_value(spec)?,
    })
}

/// `ctl get KIND NAME`: the document `apply` takes back, as YAML (or JSON).
pub async fn get(c: &Client, kind: &str, name: &str, json: bool) -> anyhow::Result<String> {
    if !api::valid_name(name) {
        bail!("name `{name}` is not valid");
    }
    let doc = match kind.to_ascii_lowercase().as_str() {
        "link" | "links" => {
            let l: api::LinkInfo = c
                .get(&format!("{}/{name}", api::PATH_LINKS), &[], "get")
                .await?;
            document(
                Kind::Link,
                name,
                LinkSpec {
                    from: l.spec.from,
                    listen: l.spec.listen,
                    to: l.spec.to,
                    target: l.spec.target,
                    allowed_uids: l.spec.allowed_uids,
                    allowed_gids: l.spec.allowed_gids,
                    allow: l.spec.allow,
                    proxy_protocol: l.spec.proxy_protocol,
                    max_flows: l.spec.max_flows,
                    rate_limit: l.spec.rate_limit_bytes_per_sec.map(|r| r.to_string()),
                    connection: l.spec.connection,
                },
            )?
        }
        "role" | "roles" => {
            let r: api::RoleInfo = c
                .get(&format!("{}/{name}", api::PATH_ROLES), &[], "get")
                .await?;
            document(Kind::Role, name, RoleSpec { rules: r.rules })?
        }
        "rolebinding" | "rolebindings" => {
            let b: api::RoleBindingInfo = c
                .get(&format!("{}/{name}", api::PATH_ROLE_BINDINGS), &[], "get")
                .await?;
            document(
                Kind::RoleBinding,
                name,
                RoleBindingSpec {
                    role: b.role,
                    subject: Subject {
                        kind: b.subject_kind,
                        name: b.subject_name,
                    },
                },
            )?
        }
        "serviceaccount" | "serviceaccounts" => {
            let all: Vec<api::PrincipalInfo> =
                c.get(api::PATH_SERVICE_ACCOUNTS, &[], "get").await?;
            if !all.iter().any(|p| p.name == name) {
                bail!("no serviceaccount named `{name}`");
            }
            let mut d = document(Kind::ServiceAccount, name, ())?;
            d.spec = serde_yaml_ng::Value::Null;
            d
        }
        other => bail!(
            "cannot get `{other}`: use link, role, rolebinding or serviceaccount (join tokens \
             are secrets and are never shown again)"
        ),
    };
    if json {
        return Ok(format!("{}\n", serde_json::to_string_pretty(&doc)?));
    }
    Ok(serde_yaml_ng::to_string(&doc)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
apiVersion: comsat.dev/v1
kind: Link
metadata: {name: db}
spec:
  from: a
  listen: tcp://127.0.0.1:7000
  to: b
  target: tcp://127.0.0.1:5432
  rateLimit: 10MiB/s
  connection: interactive
---
apiVersion: comsat.dev/v1
kind: ServiceAccount
metadata: {name: ci}
---
";

    #[test]
    fn a_good_file_parses_into_its_documents() {
        let items = parse("f.yaml", GOOD).expect("parses");
        assert_eq!(items.len(), 2);
        assert!(
            matches!(&items[0], Item::Link(n, s) if n == "db" && s.rate_limit.as_deref() == Some("10MiB/s")
                && s.connection.as_deref() == Some("interactive"))
        );
        assert_eq!(items[1], Item::ServiceAccount("ci".into()));
    }

    #[test]
    fn bad_files_are_refused_naming_file_document_and_field() {
        let typo = GOOD.replace("target:", "tagret:");
        let e = format!("{:#}", parse("f.yaml", &typo).expect_err("typo"));
        assert!(
            e.contains("f.yaml") && e.contains("document 1") && e.contains("tagret"),
            "{e}"
        );
        let top = GOOD.replace("metadata: {name: ci}", "metadata: {name: ci}\nspecs: {}");
        let e = format!("{:#}", parse("f.yaml", &top).expect_err("top-level"));
        assert!(e.contains("document 2") && e.contains("specs"), "{e}");
        let version = GOOD.replace(
            "comsat.dev/v1\nkind: Service",
            "comsat.dev/v9\nkind: Service",
        );
        let e = format!("{:#}", parse("f.yaml", &version).expect_err("version"));
        assert!(
            e.contains("document 2") && e.contains("comsat.dev/v9"),
            "{e}"
        );
        let kind = GOOD.replace("kind: ServiceAccount", "kind: Gadget");
        let e = format!("{:#}", parse("f.yaml", &kind).expect_err("kind"));
        assert!(e.contains("document 2") && e.contains("Gadget"), "{e}");
        let rate = GOOD.replace("10MiB/s", "fast");
        let e = format!("{:#}", parse("f.yaml", &rate).expect_err("rate"));
        assert!(e.contains("rateLimit"), "{e}");
        let conn = GOOD.replace("connection: interactive", "connection: a/b");
        let e = format!("{:#}", parse("f.yaml", &conn).expect_err("connection"));
        assert!(e.contains("spec.connection `a/b`"), "{e}");
        let sa = GOOD.replace("metadata: {name: ci}", "metadata: {name: ci}\nspec: {x: 1}");
        let e = format!("{:#}", parse("f.yaml", &sa).expect_err("sa spec"));
        assert!(e.contains("document 2") && e.contains('x'), "{e}");
        assert!(parse("f.yaml", "").is_err());
        assert!(parse("f.yaml", "a: [unclosed").is_err());
    }
}
