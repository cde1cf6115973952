//! The console's sessions (`/ui/session`): an API token exchanged for a
//! session cookie, and what the page learns of its session.

use serde::{Deserialize, Serialize};

use super::Rule;

/// The console's page.
pub const PATH_CONSOLE: &str = "/ui";
/// Its script.
pub const PATH_CONSOLE_SCRIPT: &str = "/ui/console.js";
/// Its style sheet.
pub const PATH_CONSOLE_STYLE: &str = "/ui/console.css";
/// Signing in (`POST`, [`ConsoleSignIn`] → [`ConsoleSessionInfo`] and a
/// session cookie), the session (`GET` → [`ConsoleSessionInfo`]), and
/// signing out (`DELETE`).
pub const PATH_CONSOLE_SESSION: &str = "/ui/session";

/// Longest API token a sign-in takes.
pub const MAX_TOKEN_LEN: usize = 512;

/// `POST PATH_CONSOLE_SESSION`: the API token to sign in with.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleSignIn {
    /// A user's or service account's API token.
    pub token: String,
}

impl std::fmt::Debug for ConsoleSignIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConsoleSignIn { token: <redacted> }")
    }
}

/// A console session, as its page sees it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleSessionInfo {
    /// Who it acts as: `user:NAME` or `serviceaccount:NAME`.
    pub subject: String,
    /// The token every change request carries in `X-CSRF-Token`.
    pub csrf: String,
    /// Unix time it ends.
    pub expires_at: u64,
    /// What the subject's roles allow (the page offers only that; the API
    /// checks every request regardless).
    pub rules: Vec<Rule>,
}

impl std::fmt::Debug for ConsoleSessionInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleSessionInfo")
            .field("subject", &self.subject)
            .field("expires_at", &self.expires_at)
            .field("rules", &self.rules)
            .finish_non_exhaustive()
    }
}
