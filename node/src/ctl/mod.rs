//! `comsat ctl`: the operator's client of the controller API.
//!
//! Where the controller is and how to authenticate, first found wins:
//! `--controller URL --token-file F --ca F` (or `COMSAT_CONTROLLER`,
//! `COMSAT_TOKEN_FILE`, `COMSAT_CA`), then the context file given with
//! `--context F` / `COMSAT_CONTEXT`, then `./.comsat/context.toml`.
//! `comsat controller init` writes the context file into its data dir:
//!
//! ```toml
//! controller = "https://127.0.0.1:8443"
//! token_file = "admin.token"   # relative to this file
//! ca = "ca.pem"
//! ```

use std::path::{Path, PathBuf};

use crate::keys::read_secret_file;
use anyhow::{Context, anyhow, bail};
use comsat_protocol::api::{self, NodeKind};
use comsat_protocol::text::printable;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::client::{self, Auth, Client};

pub mod bundle;
mod links;
pub mod log;

pub use links::{
    RateError, format_rate, link_create, link_delete, link_list, link_show, link_update, parse_rate,
};

/// The default context file, relative to the working directory.
pub const DEFAULT_CONTEXT: &str = ".comsat/context.toml";

/// A context file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CtlContext {
    /// The controller's base URL.
    pub controller: String,
    /// The admin token file.
    pub token_file: PathBuf,
    /// The controller CA.
    pub ca: PathBuf,
}

/// Where `ctl` finds its controller, as given on the command line.
#[derive(Debug, Default, Clone)]
pub struct Target {
    /// `--controller`.
    pub controller: Option<String>,
    /// `--token-file`.
    pub token_file: Option<PathBuf>,
    /// `--ca`.
    pub ca: Option<PathBuf>,
    /// `--context`.
    pub context: Option<PathBuf>,
}

impl Target {
    /// Resolves the target into a client.
    pub fn client(&self) -> anyhow::Result<Client> {
        let ctx_path = self
            .context
            .clone()
            .or_else(|| Some(PathBuf::from(DEFAULT_CONTEXT)).filter(|p| p.exists()));
        let ctx = match &ctx_path {
            Some(p) => Some(load_context(p)?),
            None => None,
        };
        let controller = self
            .controller
            .clone()
            .or_else(|| ctx.as_ref().map(|c| c.controller.clone()));
        let token_file = self
            .token_file
            .clone()
            .or_else(|| ctx.as_ref().map(|c| c.token_file.clone()));
        let ca = self
            .ca
            .clone()
            .or_else(|| ctx.as_ref().map(|c| c.ca.clone()));
        let (Some(controller), Some(token_file), Some(ca)) = (controller, token_file, ca) else {
            bail!(
                "which controller? pass --controller URL --token-file FILE --ca FILE, or \
                 --context DIR/context.toml as written by `comsat controller init` \
                 (or set COMSAT_CONTROLLER, COMSAT_TOKEN_FILE, COMSAT_CA / COMSAT_CONTEXT)"
            );
        };
        let token = read_secret_file(&token_file)
            .with_context(|| format!("reading the admin token file {}", token_file.display()))?;
        let token = Zeroizing::new(token.trim().to_owned());
        let ca = client::read_ca(&ca)?;
        Client::new(&controller, &ca, Auth::Admin(token))
    }
}

fn load_context(path: &Path) -> anyhow::Result<CtlContext> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the ctl context {}", path.display()))?;
    let mut ctx: CtlContext = toml::from_str(&text)
        .with_context(|| format!("{} is not a valid ctl context file", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    for p in [&mut ctx.token_file, &mut ctx.ca] {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    }
    Ok(ctx)
}

/// Writes a context file (used by `controller init`).
pub fn write_context(path: &Path, ctx: &CtlContext) -> anyhow::Result<()> {
    std::fs::write(path, toml::to_string(ctx)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Aligned columns.
    Table,
    /// JSON, for scripts.
    Json,
}

/// Prints `rows` under `header` as aligned columns, with control
/// characters in the cells escaped (a cell cannot start a row of its own or
/// drive the terminal).
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| printable(c).into_owned()).collect())
        .collect();
    let rows = &rows;
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.iter().map(|h| (*h).to_owned()).collect());
    for r in rows {
        out.push_str(&line(r.clone()));
    }
    out
}

fn ago(t: Option<u64>) -> String {
    match t {
        None => "never".into(),
        Some(t) => {
            let now = crate::unix_now();
            format!("{}s ago", now.saturating_sub(t))
        }
    }
}

fn json<T: Serialize>(v: &T) -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(v)? + "\n")
}

/// `token create`: prints only the token.
pub async fn token_create(
    c: &Client,
    kind: NodeKind,
    name: Option<String>,
    ttl: Option<std::time::Duration>,
) -> anyhow::Result<String> {
    if let Some(n) = &name
        && !api::valid_name(n)
    {
        bail!(
            "--name `{n}`: use 1 to {} lowercase letters, digits and `-`",
            api::MAX_NAME_LEN
        );
    }
    let body = api::TokenCreate {
        kind,
        name,
        ttl_secs: ttl.map(|d| d.as_secs().max(1)),
    };
    let t: api::TokenCreated = c.post(api::PATH_TOKENS, &body, "token create").await?;
    Ok(t.token + "\n")
}

/// `agent list`.
pub async fn agent_list(c: &Client, out: Output) -> anyhow::Result<String> {
    let v: Vec<api::AgentInfo> = c.get(api::PATH_AGENTS, &[], "agent list").await?;
    listed(
        &v,
        out,
        &["NAME", "SPIFFE ID", "ID", "LINKS", "LAST SEEN"],
        |a| {
            vec![
                a.name.clone(),
                a.spiffe_id.clone().unwrap_or_else(|| "-".into()),
                a.node_id.to_string(),
                a.links.to_string(),
                ago(a.last_seen),
            ]
        },
    )
}

/// `items` as JSON, or as a table of `header` and a row per item.
fn listed<T: Serialize>(
    items: &[T],
    out: Output,
    header: &[&str],
    row: impl Fn(&T) -> Vec<String>,
) -> anyhow::Result<String> {
    if out == Output::Json {
        return json(&items);
    }
    let rows = items.iter().map(row).collect::<Vec<_>>();
    Ok(table(header, &rows))
}

/// `relay list`.
pub async fn relay_list(c: &Client, out: Output) -> anyhow::Result<String> {
    let v: Vec<api::RelayInfo> = c.get(api::PATH_RELAYS, &[], "relay list").await?;
    let header = [
        "NAME",
        "SPIFFE ID",
        "ADDRESS",
        "INTERACTIVE",
        "STATE",
        "LINKS",
        "CONNECTIONS",
        "HEARTBEAT",
    ];
    listed(&v, out, &header, |r| {
        vec![
            r.name.clone(),
            r.spiffe_id.clone().unwrap_or_else(|| "-".into()),
            r.public_addr.clone(),
            r.interactive_addr.clone().unwrap_or_else(|| "-".into()),
            if r.healthy { "healthy" } else { "unhealthy" }.into(),
            r.links.to_string(),
            r.load.connections.to_string(),
            ago(r.last_heartbeat),
        ]
    })
}

fn checked_name<'a>(what: &str, name: &'a str) -> anyhow::Result<&'a str> {
    if api::valid_name(name) {
        Ok(name)
    } else {
        bail!(
            "{what} name `{name}`: use 1 to {} lowercase letters, digits and `-`",
            api::MAX_NAME_LEN
        )
    }
}

/// `DELETE PATH/NAME`.
pub async fn delete(c: &Client, path: &str, name: &str, what: &str) -> anyhow::Result<String> {
    let name = checked_name(what.split(' ').next().unwrap_or("object"), name)?;
    c.delete(&format!("{path}/{name}"), what).await?;
    Ok(String::new())
}

/// `serviceaccount|user create`: prints only the token.
pub async fn principal_create(
    c: &Client,
    kind: api::PrincipalKind,
    name: String,
    ttl: Option<std::time::Duration>,
) -> anyhow::Result<String> {
    checked_name(kind.as_str(), &name)?;
    let body = api::PrincipalCreate {
        name,
        ttl_secs: ttl.map(|d| d.as_secs().max(1)),
    };
    let created: api::PrincipalCreated = c
        .post(kind.path(), &body, &format!("{kind} create"))
        .await?;
    Ok(format!("{}\n", created.token))
}

/// `serviceaccount|user token NAME`: prints only the new token.
pub async fn principal_token(
    c: &Client,
    kind: api::PrincipalKind,
    name: &str,
    ttl: Option<std::time::Duration>,
) -> anyhow::Result<String> {
    let name = checked_name(kind.as_str(), name)?;
    let body = api::PrincipalCreate {
        name: String::new(),
        ttl_secs: ttl.map(|d| d.as_secs().max(1)),
    };
    let created: api::PrincipalCreated = c
        .post(
            &format!("{}/{name}/tokens", kind.path()),
            &body,
            &format!("{kind} token"),
        )
        .await?;
    Ok(format!("{}\n", created.token))
}

/// `serviceaccount|user revoke NAME --token-id ID`.
pub async fn principal_revoke(
    c: &Client,
    kind: api::PrincipalKind,
    name: &str,
    id: &str,
) -> anyhow::Result<String> {
    let name = checked_name(kind.as_str(), name)?;
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("token id `{id}`: expected the hex id `{kind} list` shows");
    }
    c.delete(
        &format!("{}/{name}/tokens/{id}", kind.path()),
        &format!("{kind} revoke"),
    )
    .await?;
    Ok(format!("revoked token {id} of {kind} {name}\n"))
}

/// `serviceaccount|user list`.
pub async fn principal_list(
    c: &Client,
    kind: api::PrincipalKind,
    out: Output,
) -> anyhow::Result<String> {
    let v: Vec<api::PrincipalInfo> = c.get(kind.path(), &[], &format!("{kind} list")).await?;
    if out == Output::Json {
        return json(&v);
    }
    let now = crate::unix_now();
    let rows = v
        .iter()
        .map(|p| {
            let tokens = p
                .tokens
                .iter()
                .map(|t| {
                    let state = if t.revoked_at.is_some() {
                        " (revoked)"
                    } else if t.expires_at.is_some_and(|e| e <= now) {
                        " (expired)"
                    } else {
                        ""
                    };
                    format!("{}{state}", t.id)
                })
                .collect::<Vec<_>>()
                .join(",");
            vec![p.name.clone(), tokens]
        })
        .collect::<Vec<_>>();
    Ok(table(&["NAME", "TOKENS"], &rows))
}

/// Parses `RESOURCES:VERBS`.
pub fn parse_rule(s: &str) -> anyhow::Result<api::Rule> {
    let (resources, verbs) = s.split_once(':').ok_or_else(|| {
        anyhow!("rule `{s}`: expected RESOURCES:VERBS, e.g. links,tokens:get,list,create")
    })?;
    let list = |x: &str| {
        x.split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    Ok(api::Rule {
        resources: list(resources),
        verbs: list(verbs),
    })
}

fn role_rows(v: &[api::RoleInfo]) -> String {
    let rows = v
        .iter()
        .map(|r| {
            vec![
                r.name.clone(),
                if r.builtin { "built-in" } else { "" }.to_owned(),
                r.rules
                    .iter()
                    .map(|x| format!("{}:{}", x.resources.join(","), x.verbs.join(",")))
                    .collect::<Vec<_>>()
                    .join(" "),
            ]
        })
        .collect::<Vec<_>>();
    table(&["NAME", "KIND", "RULES"], &rows)
}

/// `role create`.
pub async fn role_create(
    c: &Client,
    name: String,
    rules: &[String],
    out: Output,
) -> anyhow::Result<String> {
    checked_name("role", &name)?;
    let rules = rules
        .iter()
        .map(|r| parse_rule(r))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let r: api::RoleInfo = c
        .post(
            api::PATH_ROLES,
            &api::RoleCreate { name, rules },
            "role create",
        )
        .await?;
    if out == Output::Json {
        return json(&r);
    }
    Ok(role_rows(&[r]))
}

/// `role list`.
pub async fn role_list(c: &Client, out: Output) -> anyhow::Result<String> {
    let v: Vec<api::RoleInfo> = c.get(api::PATH_ROLES, &[], "role list").await?;
    if out == Output::Json {
        return json(&v);
    }
    Ok(role_rows(&v))
}

/// `role show`.
pub async fn role_show(c: &Client, name: &str, out: Output) -> anyhow::Result<String> {
    let name = checked_name("role", name)?;
    let r: api::RoleInfo = c
        .get(&format!("{}/{name}", api::PATH_ROLES), &[], "role show")
        .await?;
    if out == Output::Json {
        return json(&r);
    }
    Ok(role_rows(&[r]))
}

fn binding_rows(v: &[api::RoleBindingInfo]) -> String {
    let rows = v
        .iter()
        .map(|b| {
            vec![
                b.name.clone(),
                b.role.clone(),
                format!("{}:{}", b.subject_kind, b.subject_name),
            ]
        })
        .collect::<Vec<_>>();
    table(&["NAME", "ROLE", "SUBJECT"], &rows)
}

/// `rolebinding create`.
pub async fn binding_create(
    c: &Client,
    body: api::RoleBindingCreate,
    out: Output,
) -> anyhow::Result<String> {
    checked_name("role binding", &body.name)?;
    let b: api::RoleBindingInfo = c
        .post(api::PATH_ROLE_BINDINGS, &body, "rolebinding create")
        .await?;
    if out == Output::Json {
        return json(&b);
    }
    Ok(binding_rows(&[b]))
}

/// `rolebinding list`.
pub async fn binding_list(c: &Client, out: Output) -> anyhow::Result<String> {
    let v: Vec<api::RoleBindingInfo> = c
        .get(api::PATH_ROLE_BINDINGS, &[], "rolebinding list")
        .await?;
    if out == Output::Json {
        return json(&v);
    }
    Ok(binding_rows(&v))
}

/// `status`.
pub async fn status(c: &Client, out: Output) -> anyhow::Result<String> {
    let s: api::Status = c.get(api::PATH_STATUS, &[], "status").await?;
    if out == Output::Json {
        return json(&s);
    }
    let domain = s.trust_domain.as_deref().unwrap_or("-");
    Ok(format!(
        "controller:   {}\ntrust domain: spiffe://{domain}\nagents:       {}\nrelays:       {} ({} healthy)\nlinks:        {} ({} without a healthy relay)\n",
        c.base(),
        s.agents,
        s.relays,
        s.healthy_relays,
        s.links,
        s.unassigned_links
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let t = table(
            &["NAME", "ID"],
            &[
                vec!["a".into(), "1".into()],
                vec!["long-name".into(), "2".into()],
            ],
        );
        assert_eq!(t, "NAME       ID\na          1\nlong-name  2\n");
    }

    #[test]
    fn a_cell_cannot_add_a_row_or_drive_the_terminal() {
        let t = table(
            &["SUBJECT", "REASON"],
            &[vec!["x".into(), "\u{1b}[2Jgone\nfake  row".into()]],
        );
        assert_eq!(t, "SUBJECT  REASON\nx        \\u{1b}[2Jgone\\nfake  row\n");
    }
}
