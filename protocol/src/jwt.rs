//! Node JWTs: how an agent or relay authenticates to the controller.
//!
//! Every request a node makes carries a fresh JWT signed EdDSA (ed25519) by
//! its node key: `kid` = its node id, `sub` = the same, `aud` = the
//! controller deployment ([`EnrolResponse::audience`](crate::api::EnrolResponse)),
//! `exp - iat` ≤ [`MAX_LIFETIME_SECS`], and a random `jti` that the
//! controller records until `exp` and refuses to see twice.
//!
//! The verifier fixes the algorithm: a token whose header names any other
//! `alg` (`none`, `HS256`, …) is refused before any key is used.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::ids::NodeId;
use crate::keys::{SignPublicKey, SigningKey};

/// jsonwebtoken's cryptography for the one algorithm node JWTs use, EdDSA
/// (ed25519), done with ed25519-dalek as the rest of the protocol does.
/// Every other algorithm is refused here too, not only by the verifier's
/// [`Validation`].
mod eddsa {
    use ed25519_dalek::pkcs8::DecodePrivateKey;
    use ed25519_dalek::{Signature, SigningKey, VerifyingKey};
    use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils};
    use jsonwebtoken::errors::{Error, ErrorKind};
    use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};

    struct Signer(SigningKey);

    impl signature::Signer<Vec<u8>> for Signer {
        fn try_sign(&self, msg: &[u8]) -> Result<Vec<u8>, signature::Error> {
            Ok(ed25519_dalek::Signer::sign(&self.0, msg)
                .to_bytes()
                .to_vec())
        }
    }

    impl JwtSigner for Signer {
        fn algorithm(&self) -> Algorithm {
            Algorithm::EdDSA
        }
    }

    struct Verifier(VerifyingKey);

    impl signature::Verifier<Vec<u8>> for Verifier {
        fn verify(&self, msg: &[u8], sig: &Vec<u8>) -> Result<(), signature::Error> {
            let sig = Signature::from_slice(sig).map_err(|_| signature::Error::new())?;
            self.0
                .verify_strict(msg, &sig)
                .map_err(|_| signature::Error::new())
        }
    }

    impl JwtVerifier for Verifier {
        fn algorithm(&self) -> Algorithm {
            Algorithm::EdDSA
        }
    }

    fn signer(alg: &Algorithm, key: &EncodingKey) -> Result<Box<dyn JwtSigner>, Error> {
        if *alg != Algorithm::EdDSA {
            return Err(ErrorKind::InvalidAlgorithm.into());
        }
        let key =
            SigningKey::from_pkcs8_der(key.as_bytes()).map_err(|_| ErrorKind::InvalidEddsaKey)?;
        Ok(Box::new(Signer(key)))
    }

    fn verifier(alg: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>, Error> {
        if *alg != Algorithm::EdDSA {
            return Err(ErrorKind::InvalidAlgorithm.into());
        }
        let bytes: &[u8; 32] = key
            .try_get_as_bytes()?
            .try_into()
            .map_err(|_| ErrorKind::InvalidEddsaKey)?;
        let key = VerifyingKey::from_bytes(bytes).map_err(|_| ErrorKind::InvalidEddsaKey)?;
        Ok(Box::new(Verifier(key)))
    }

    static PROVIDER: CryptoProvider = CryptoProvider {
        signer_factory: signer,
        verifier_factory: verifier,
        key_utils: KeyUtils::new_unimplemented(),
    };

    /// Makes this jsonwebtoken's provider for the process, if none is yet.
    pub(super) fn install() {
        // Another provider already installed stays (none is, in comsat).
        let _ = PROVIDER.install_default();
    }
}

/// Longest lifetime (`exp - iat`) of a node JWT.
pub const MAX_LIFETIME_SECS: u64 = 60;

/// Lifetime nodes give their JWTs.
pub const DEFAULT_LIFETIME_SECS: u64 = 30;

/// Longest JWT string looked at.
pub const MAX_JWT_LEN: usize = 2048;

/// The claims of a node JWT.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The node id (hex), as in the header's `kid`.
    pub sub: String,
    /// The controller deployment.
    pub aud: String,
    /// Issued at (Unix seconds).
    pub iat: u64,
    /// Expires at (Unix seconds).
    pub exp: u64,
    /// Random, single use.
    pub jti: String,
}

/// Why a JWT was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwtError {
    /// Not a JWT, or too long.
    #[error("malformed JWT: {0}")]
    Malformed(String),
    /// The header names an algorithm other than EdDSA.
    #[error("JWT algorithm must be EdDSA")]
    WrongAlgorithm,
    /// No node id in `kid`, or `sub` differs from it.
    #[error("JWT names no node (kid and sub must be the node id)")]
    NoNode,
    /// The signature does not verify with the node's key.
    #[error("JWT signature does not verify with the key of node {0}")]
    BadSignature(String),
    /// `exp` has passed.
    #[error("JWT expired")]
    Expired,
    /// `aud` is not this controller.
    #[error("JWT audience is not this controller")]
    WrongAudience,
    /// `exp - iat` too long, or issued in the future.
    #[error("JWT lifetime must be at most {MAX_LIFETIME_SECS} s and not start in the future")]
    BadLifetime,
}

/// Signs a JWT for `node` with `key`, valid from `now` (Unix seconds) for
/// `lifetime` seconds, with the unique id `jti` (random: the controller
/// refuses a `jti` it has seen).
pub fn mint(
    key: &SigningKey,
    node: &NodeId,
    audience: &str,
    now: u64,
    lifetime: u64,
    jti: [u8; 16],
) -> Result<String, JwtError> {
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(node.to_string());
    let claims = Claims {
        sub: node.to_string(),
        aud: audience.to_owned(),
        iat: now,
        exp: now.saturating_add(lifetime),
        jti: hex::encode(jti),
    };
    eddsa::install();
    let der = key.to_pkcs8_der();
    jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ed_der(&der))
        .map_err(|e| JwtError::Malformed(e.to_string()))
}

/// The node a JWT claims to come from (its header's `kid`), read without
/// verifying anything, so the verifier can look up that node's key. Refuses
/// any algorithm but EdDSA.
pub fn claimed_node(token: &str) -> Result<NodeId, JwtError> {
    if token.len() > MAX_JWT_LEN {
        return Err(JwtError::Malformed(format!(
            "longer than {MAX_JWT_LEN} bytes"
        )));
    }
    let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
        jsonwebtoken::errors::ErrorKind::InvalidAlgorithm
        | jsonwebtoken::errors::ErrorKind::InvalidAlgorithmName => JwtError::WrongAlgorithm,
        _ => JwtError::Malformed(e.to_string()),
    })?;
    if header.alg != Algorithm::EdDSA {
        return Err(JwtError::WrongAlgorithm);
    }
    header
        .kid
        .as_deref()
        .and_then(|k| k.parse().ok())
        .ok_or(JwtError::NoNode)
}

/// Verifies `token` as a JWT of `node` signed by `key` for `audience` at
/// time `now`, tolerating `leeway` seconds of clock skew. The caller still
/// has to record the `jti` and refuse a second use.
pub fn verify(
    token: &str,
    node: &NodeId,
    key: &SignPublicKey,
    audience: &str,
    now: u64,
    leeway: u64,
) -> Result<Claims, JwtError> {
    if claimed_node(token)? != *node {
        return Err(JwtError::NoNode);
    }
    eddsa::install();
    let mut v = Validation::new(Algorithm::EdDSA);
    v.set_audience(&[audience]);
    v.set_required_spec_claims(&["exp", "aud", "sub"]);
    // Time is checked below against the caller's `now`.
    v.validate_exp = false;
    v.leeway = 0;
    let data = jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_ed_der(&key.0), &v)
        .map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::InvalidSignature => {
                JwtError::BadSignature(node.to_string())
            }
            jsonwebtoken::errors::ErrorKind::InvalidAudience => JwtError::WrongAudience,
            jsonwebtoken::errors::ErrorKind::InvalidAlgorithm => JwtError::WrongAlgorithm,
            _ => JwtError::Malformed(e.to_string()),
        })?;
    let c = data.claims;
    if c.sub != node.to_string() {
        return Err(JwtError::NoNode);
    }
    if c.exp.saturating_add(leeway) < now {
        return Err(JwtError::Expired);
    }
    if c.exp < c.iat || c.exp - c.iat > MAX_LIFETIME_SECS || c.iat > now.saturating_add(leeway) {
        return Err(JwtError::BadLifetime);
    }
    if c.jti.is_empty() || c.jti.len() > 64 {
        return Err(JwtError::Malformed("jti must be 1 to 64 characters".into()));
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const AUD: &str = "comsat-controller:test";

    fn b64(bytes: &[u8]) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    #[test]
    fn a_minted_jwt_verifies_once_per_key_and_audience() {
        let key = SigningKey::from_seed(&[1; 32]);
        let node = NodeId([1; 16]);
        let now = 1_800_000_000;
        let t = mint(&key, &node, AUD, now, 30, [1; 16]).expect("mints");
        let c = verify(&t, &node, &key.public(), AUD, now + 5, 0).expect("verifies");
        assert_eq!((c.iat, c.exp, c.aud.as_str()), (now, now + 30, AUD));
        let other = SigningKey::from_seed(&[2; 32]);
        assert_eq!(
            verify(&t, &node, &other.public(), AUD, now, 0),
            Err(JwtError::BadSignature(node.to_string()))
        );
        assert_eq!(
            verify(&t, &node, &key.public(), "comsat-controller:other", now, 0),
            Err(JwtError::WrongAudience)
        );
        assert_eq!(
            verify(&t, &NodeId([2; 16]), &key.public(), AUD, now, 0),
            Err(JwtError::NoNode)
        );
    }

    #[test]
    fn expiry_lifetime_and_skew_are_enforced() {
        let key = SigningKey::from_seed(&[1; 32]);
        let node = NodeId([1; 16]);
        let now = 1_800_000_000;
        let t = mint(&key, &node, AUD, now, 30, [1; 16]).expect("mints");
        assert_eq!(
            verify(&t, &node, &key.public(), AUD, now + 31, 0),
            Err(JwtError::Expired)
        );
        assert!(verify(&t, &node, &key.public(), AUD, now + 31, 5).is_ok());
        let long = mint(&key, &node, AUD, now, MAX_LIFETIME_SECS + 1, [1; 16]).expect("mints");
        assert_eq!(
            verify(&long, &node, &key.public(), AUD, now, 0),
            Err(JwtError::BadLifetime)
        );
        let future = mint(&key, &node, AUD, now + 100, 30, [1; 16]).expect("mints");
        assert_eq!(
            verify(&future, &node, &key.public(), AUD, now, 10),
            Err(JwtError::BadLifetime)
        );
    }

    #[test]
    fn other_algorithms_are_refused_before_any_key_is_used() {
        let node = NodeId([1; 16]);
        let key = SigningKey::from_seed(&[1; 32]);
        let claims = format!(r#"{{"sub":"{node}","aud":"{AUD}","iat":1,"exp":30,"jti":"x"}}"#);
        for alg in ["none", "HS256", "RS256", "ES256", "eddsa"] {
            let header = format!(r#"{{"alg":"{alg}","kid":"{node}","typ":"JWT"}}"#);
            let t = format!(
                "{}.{}.{}",
                b64(header.as_bytes()),
                b64(claims.as_bytes()),
                b64(b"sig")
            );
            assert!(
                matches!(
                    claimed_node(&t),
                    Err(JwtError::WrongAlgorithm | JwtError::Malformed(_))
                ),
                "{alg}"
            );
            assert!(
                verify(&t, &node, &key.public(), AUD, 10, 0).is_err(),
                "{alg}"
            );
        }
        let hs = format!(r#"{{"alg":"HS256","kid":"{node}"}}"#);
        let t = format!(
            "{}.{}.{}",
            b64(hs.as_bytes()),
            b64(claims.as_bytes()),
            b64(b"sig")
        );
        assert_eq!(claimed_node(&t), Err(JwtError::WrongAlgorithm));
    }

    proptest! {
        #[test]
        fn arbitrary_strings_never_panic(s in ".{0,300}", parts in proptest::collection::vec("[A-Za-z0-9_-]{0,80}", 0..5)) {
            let _ = claimed_node(&s);
            let joined = parts.join(".");
            let key = SigningKey::from_seed(&[1; 32]);
            let _ = verify(&joined, &NodeId([0; 16]), &key.public(), AUD, 0, 0);
        }
    }
}
