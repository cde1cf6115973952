//! Users, service accounts, their API tokens, roles, role bindings and the
//! audit log: the bodies of the controller's access-control API.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::{PATH_SERVICE_ACCOUNTS, PATH_USERS};

/// Who may hold API tokens and be bound to roles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrincipalKind {
    /// A person.
    User,
    /// Automation.
    #[serde(rename = "serviceaccount")]
    ServiceAccount,
}

impl PrincipalKind {
    /// `user` or `serviceaccount`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::ServiceAccount => "serviceaccount",
        }
    }

    /// Where the API keeps them.
    pub fn path(self) -> &'static str {
        match self {
            Self::User => PATH_USERS,
            Self::ServiceAccount => PATH_SERVICE_ACCOUNTS,
        }
    }

    /// The resource roles name them by: `users` or `serviceaccounts`.
    pub fn resource(self) -> &'static str {
        match self {
            Self::User => "users",
            Self::ServiceAccount => "serviceaccounts",
        }
    }
}

impl fmt::Display for PrincipalKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A subject kind that is neither `user` nor `serviceaccount`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown subject kind `{0}` (user or serviceaccount)")]
pub struct UnknownPrincipalKind(pub String);

impl std::str::FromStr for PrincipalKind {
    type Err = UnknownPrincipalKind;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "user" => Ok(Self::User),
            "serviceaccount" => Ok(Self::ServiceAccount),
            other => Err(UnknownPrincipalKind(other.to_owned())),
        }
    }
}

/// `POST PATH_SERVICE_ACCOUNTS` / `PATH_USERS`, and their `/{name}/tokens`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrincipalCreate {
    /// The name (ignored when adding a token to an existing one).
    #[serde(default)]
    pub name: String,
    /// Lifetime of the token, seconds (default: no expiry).
    pub ttl_secs: Option<u64>,
}

/// The answer: the only time the token is shown.
#[derive(Clone, Serialize, Deserialize)]
pub struct PrincipalCreated {
    /// The subject, `serviceaccount:NAME` or `user:NAME`.
    pub subject: String,
    /// The token's id (to revoke it; not secret).
    pub token_id: String,
    /// The API token.
    pub token: String,
    /// Unix time it expires, if it does.
    pub expires_at: Option<u64>,
}

impl fmt::Debug for PrincipalCreated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrincipalCreated")
            .field("subject", &self.subject)
            .field("token_id", &self.token_id)
            .field("token", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// An API token as listed (never its value).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiTokenInfo {
    /// Its id.
    pub id: String,
    /// Unix time created.
    pub created_at: u64,
    /// Unix time it expires, if it does.
    pub expires_at: Option<u64>,
    /// Unix time it was revoked, if it was.
    pub revoked_at: Option<u64>,
}

/// A user or service account.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrincipalInfo {
    /// Which.
    pub kind: PrincipalKind,
    /// Its name.
    pub name: String,
    /// Unix time created.
    pub created_at: u64,
    /// Its tokens.
    pub tokens: Vec<ApiTokenInfo>,
}

/// One rule of a role: these verbs on these resources (`*` for all).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// `agents`, `relays`, `links`, `tokens` (or `tokens/agent`,
    /// `tokens/relay`), `roles`, `rolebindings`, `serviceaccounts`,
    /// `users`, `audit`, `status`, or `*`.
    pub resources: Vec<String>,
    /// `get`, `list`, `create`, `update`, `delete`, or `*`.
    pub verbs: Vec<String>,
}

/// `POST PATH_ROLES`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleCreate {
    /// Its name.
    pub name: String,
    /// What it allows.
    pub rules: Vec<Rule>,
}

/// A role as listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleInfo {
    /// Its name.
    pub name: String,
    /// What it allows.
    pub rules: Vec<Rule>,
    /// One of the four that come with the controller (not deletable).
    pub builtin: bool,
}

/// `POST PATH_ROLE_BINDINGS`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleBindingCreate {
    /// Its name.
    pub name: String,
    /// The role it grants.
    pub role: String,
    /// To whom.
    pub subject_kind: PrincipalKind,
    /// Their name.
    pub subject_name: String,
}

/// A role binding as listed.
pub type RoleBindingInfo = RoleBindingCreate;

/// One audit record: a change, or a refused authentication. Holds no
/// secret (tokens are named by id, never by value).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Unix time, milliseconds.
    pub at_ms: u64,
    /// Who: `user:NAME`, `agent:NAME`, `relay:NAME`, or `anonymous`
    /// (optionally with the node id a refused JWT claimed).
    pub subject: String,
    /// What: `link.create`, `token.create`, `enrol`, `authenticate`, …
    pub action: String,
    /// On what: `link/NAME`, `token/ID`, `agent/NAME`, an API path, …
    pub resource: String,
    /// `ok` or `denied`.
    pub result: String,
    /// Why it was denied or failed (the real reason, which the caller
    /// is not told).
    pub reason: Option<String>,
    /// The caller's address.
    pub source: Option<String>,
}
