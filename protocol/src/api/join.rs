//! Join tokens: everything a new node needs to enrol, in one string.

use std::fmt;

/// Prefix of every join token string.
pub const JOIN_TOKEN_PREFIX: &str = "comsat-join-v1";

/// Longest join token string parsed.
pub const MAX_JOIN_TOKEN_LEN: usize = 1024;

/// A join token: everything a new node needs to enrol.
///
/// Its string form is
/// `comsat-join-v1:<id>:<secret>:<ca-sha256>:<controller url>`, where `id`
/// is 16 and `secret` 64 lowercase hex digits and `ca-sha256` the 64-digit
/// SHA-256 of the controller CA certificate (DER). The controller stores
/// only a hash of the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// Looks the token up (not secret).
    pub id: String,
    /// The secret (hex).
    pub secret: String,
    /// SHA-256 of the controller CA certificate (DER).
    pub ca_sha256: [u8; 32],
    /// The controller's base URL (`https://host:port`).
    pub url: String,
}

impl Drop for JoinToken {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.secret);
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .field("ca_sha256", &hex::encode(self.ca_sha256))
            .field("url", &self.url)
            .finish()
    }
}

/// A join token string that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "not a comsat join token ({0}); expected `{JOIN_TOKEN_PREFIX}:ID:SECRET:CA_SHA256:URL` as printed by `comsat ctl token create`"
)]
pub struct JoinTokenError(pub &'static str);

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
}

impl JoinToken {
    /// Parses a token string (surrounding whitespace is ignored).
    pub fn parse(s: &str) -> Result<Self, JoinTokenError> {
        let s = s.trim();
        if s.len() > MAX_JOIN_TOKEN_LEN {
            return Err(JoinTokenError("too long"));
        }
        let mut parts = s.splitn(5, ':');
        if parts.next() != Some(JOIN_TOKEN_PREFIX) {
            return Err(JoinTokenError("wrong prefix"));
        }
        let (Some(id), Some(secret), Some(ca), Some(url)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JoinTokenError("missing fields"));
        };
        if !is_lower_hex(id, 16) {
            return Err(JoinTokenError("bad id"));
        }
        if !is_lower_hex(secret, 64) {
            return Err(JoinTokenError("bad secret"));
        }
        let ca_sha256 =
            crate::ids::parse_hex::<32>(ca).map_err(|_| JoinTokenError("bad CA fingerprint"))?;
        if !(url.starts_with("https://") && url.len() > "https://".len())
            || url
                .bytes()
                .any(|c| c.is_ascii_whitespace() || c.is_ascii_control())
        {
            return Err(JoinTokenError("bad controller URL (must be https://…)"));
        }
        Ok(Self {
            id: id.to_owned(),
            secret: secret.to_owned(),
            ca_sha256,
            url: url.to_owned(),
        })
    }

    /// The string form (a secret: never log it).
    pub fn encode(&self) -> String {
        format!(
            "{JOIN_TOKEN_PREFIX}:{}:{}:{}:{}",
            self.id,
            self.secret,
            hex::encode(self.ca_sha256),
            self.url
        )
    }
}
