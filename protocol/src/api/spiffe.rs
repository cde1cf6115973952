//! SPIFFE: agents' X.509-SVIDs and the trust domain's bundle.

use serde::{Deserialize, Serialize};

/// `POST`: an agent's X.509-SVID for the key of its CSR
/// ([`super::CertRequest`] → [`super::CertResponse`]).
pub const PATH_AGENT_SVID: &str = "/v1/agent/svid";

/// `GET`, anyone: the trust domain's bundle in the SPIFFE bundle format
/// ([`SpiffeBundle`]), what another trust domain federates with.
pub const PATH_SPIFFE_BUNDLE: &str = "/v1/spiffe/bundle";

/// The bundles of federated trust domains (operators); one is
/// `PATH_BUNDLES/{trust domain}`.
pub const PATH_BUNDLES: &str = "/v1/bundles";

/// Most federated trust domains.
pub const MAX_FEDERATED: usize = 64;

/// Longest bundle accepted (PEM or SPIFFE bundle JSON), in bytes.
pub const MAX_BUNDLE_LEN: usize = 256 * 1024;

/// A federated trust domain's bundle: its X.509 authorities.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustBundle {
    /// The trust domain.
    pub trust_domain: String,
    /// Its X.509 authorities, PEM.
    pub bundle_pem: String,
}

/// `PUT PATH_BUNDLES/{trust domain}`: the domain's bundle, as its bundle
/// endpoint serves it (SPIFFE bundle JSON) or as PEM certificates.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleSet {
    /// The bundle.
    pub bundle: String,
}

/// Seconds a bundle consumer waits before it fetches the bundle again.
pub const SPIFFE_REFRESH_HINT_SECS: u64 = 300;

/// A SPIFFE bundle: a JWK set of the trust domain's X.509 authorities.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpiffeBundle {
    /// The authorities.
    pub keys: Vec<BundleKey>,
    /// Increases whenever the authorities change.
    pub spiffe_sequence: u64,
    /// Seconds before a consumer should fetch the bundle again.
    pub spiffe_refresh_hint: u64,
}

/// One X.509 authority of a [`SpiffeBundle`]: an EC or RSA JWK.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleKey {
    /// `EC` or `RSA`.
    pub kty: String,
    /// EC: `P-256`, `P-384` or `P-521`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crv: Option<String>,
    /// EC: the public point's x, base64url without padding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x: Option<String>,
    /// EC: the public point's y, base64url without padding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub y: Option<String>,
    /// RSA: the modulus, base64url without padding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<String>,
    /// RSA: the public exponent, base64url without padding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub e: Option<String>,
    /// `x509-svid`.
    #[serde(rename = "use")]
    pub use_: String,
    /// The authority's certificate, standard base64 DER, alone.
    pub x5c: Vec<String>,
}
