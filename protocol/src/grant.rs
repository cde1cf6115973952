//! Grants: the authority's signed statement that two nodes may form a link
//! through a set of relays.
//!
//! A grant is encoded canonically (bincode, versioned enum) and the
//! authority signs [`DOMAIN_SEP_GRANT`] followed by those exact bytes. A
//! relay keeps the signed bytes and only trusts what it decoded from them
//! after [`SignedGrant::verify`].

use serde::{Deserialize, Serialize};

use crate::codec::{self, CodecError};
use crate::ids::{LinkId, NodeId, RelayId, Side};
use crate::keys::{SignPublicKey, Signature, SigningKey};
use crate::limits::{MAX_GRANT_RELAYS, MAX_SIGNED_GRANT_LEN};

/// Signature domain of grants, version 1.
pub const DOMAIN_SEP_GRANT: &[u8] = b"comsat grant v1\0";

/// One side of a link as the relay must see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantSide {
    /// The agent holding this side.
    pub node_id: NodeId,
    /// Its ed25519 public key, which signs its `Hello`.
    pub sign_pub: SignPublicKey,
}

/// Limits the relay enforces on a link. `None` is unlimited.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkLimits {
    /// Bytes per second in each direction.
    pub rate_bytes_per_sec: Option<u64>,
    /// Concurrent flows.
    pub max_flows: Option<u32>,
}

/// The content of a grant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// The link.
    pub link_id: LinkId,
    /// Bumped on every change of the link; a relay refuses a lower one.
    pub generation: u64,
    /// The relays that may carry the link, in order of preference.
    pub relays: Vec<RelayId>,
    /// Side A (Noise initiator).
    pub side_a: GrantSide,
    /// Side B (Noise responder).
    pub side_b: GrantSide,
    /// Unix time (seconds) after which the grant is void.
    pub not_after: u64,
    /// Bytes the relay may buffer for this link while one side is away.
    pub buffer_limit: u64,
    /// Rate and flow limits.
    pub limits: LinkLimits,
}

/// The versioned wire form of a grant. New fields go into a new variant.
#[derive(Serialize, Deserialize)]
enum VersionedGrant {
    V1(Grant),
}

/// A grant that failed verification.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum GrantError {
    /// The bytes could not be decoded.
    #[error("malformed grant: {0}")]
    Malformed(#[from] CodecError),
    /// The signature is not the authority's.
    #[error("grant signature does not verify against the authority key")]
    BadSignature,
    /// The grant does not name this relay.
    #[error("grant for link {link} does not name this relay")]
    NotForThisRelay {
        /// The link.
        link: LinkId,
    },
    /// The grant has expired.
    #[error("grant for link {link} expired at {not_after} (now {now})")]
    Expired {
        /// The link.
        link: LinkId,
        /// Its expiry.
        not_after: u64,
        /// The time of the check.
        now: u64,
    },
    /// A newer generation of the link is already known.
    #[error("grant for link {link} has generation {got}, older than the known {known}")]
    StaleGeneration {
        /// The link.
        link: LinkId,
        /// The known generation.
        known: u64,
        /// The generation of this grant.
        got: u64,
    },
    /// The grant itself is inconsistent.
    #[error("invalid grant: {0}")]
    Invalid(&'static str),
}

impl Grant {
    /// The side `node` holds in this link, if any.
    pub fn side_of(&self, node: &NodeId) -> Option<Side> {
        if self.side_a.node_id == *node {
            Some(Side::A)
        } else if self.side_b.node_id == *node {
            Some(Side::B)
        } else {
            None
        }
    }

    /// The given side.
    pub fn side(&self, side: Side) -> &GrantSide {
        match side {
            Side::A => &self.side_a,
            Side::B => &self.side_b,
        }
    }

    /// Encodes and signs the grant with the authority key.
    pub fn sign(&self, authority: &SigningKey) -> Result<SignedGrant, CodecError> {
        let body = codec::encode(&VersionedGrant::V1(self.clone()))?;
        let signature = authority.sign(DOMAIN_SEP_GRANT, &body);
        Ok(SignedGrant { body, signature })
    }

    fn check_shape(&self) -> Result<(), GrantError> {
        if self.relays.is_empty() {
            return Err(GrantError::Invalid("names no relay"));
        }
        if self.relays.len() > MAX_GRANT_RELAYS {
            return Err(GrantError::Invalid("names too many relays"));
        }
        if self.side_a.node_id == self.side_b.node_id {
            return Err(GrantError::Invalid("both sides are the same node"));
        }
        Ok(())
    }
}

/// A grant as the authority signed it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedGrant {
    /// The canonical encoding of a `VersionedGrant`.
    pub body: Vec<u8>,
    /// The authority's signature over `DOMAIN_SEP_GRANT || body`.
    pub signature: Signature,
}

impl SignedGrant {
    /// Encodes for a file or the wire.
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        codec::encode(self)
    }

    /// Decodes bytes made by [`Self::encode`]; does not verify.
    pub fn decode(bytes: &[u8]) -> Result<Self, CodecError> {
        codec::decode::<Self, MAX_SIGNED_GRANT_LEN>(bytes)
    }

    /// Checks the signature, then decodes the body, then checks that the
    /// grant names `relay`, has not expired at `now` (Unix seconds), and is
    /// not older than `known_generation`.
    pub fn verify(
        &self,
        authority: &SignPublicKey,
        relay: &RelayId,
        now: u64,
        known_generation: Option<u64>,
    ) -> Result<Grant, GrantError> {
        let grant = self.verify_signature(authority)?;
        if !grant.relays.contains(relay) {
            return Err(GrantError::NotForThisRelay {
                link: grant.link_id,
            });
        }
        if now >= grant.not_after {
            return Err(GrantError::Expired {
                link: grant.link_id,
                not_after: grant.not_after,
                now,
            });
        }
        if let Some(known) = known_generation
            && grant.generation < known
        {
            return Err(GrantError::StaleGeneration {
                link: grant.link_id,
                known,
                got: grant.generation,
            });
        }
        Ok(grant)
    }

    /// Checks only the signature and the shape, not relay, time or
    /// generation.
    pub fn verify_signature(&self, authority: &SignPublicKey) -> Result<Grant, GrantError> {
        if !authority.verify(DOMAIN_SEP_GRANT, &self.body, &self.signature) {
            return Err(GrantError::BadSignature);
        }
        let VersionedGrant::V1(grant) =
            codec::decode::<VersionedGrant, MAX_SIGNED_GRANT_LEN>(&self.body)?;
        grant.check_shape()?;
        Ok(grant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(relay: RelayId) -> Grant {
        Grant {
            link_id: LinkId([1; 16]),
            generation: 3,
            relays: vec![relay],
            side_a: GrantSide {
                node_id: NodeId([2; 16]),
                sign_pub: SigningKey::from_seed(&[2; 32]).public(),
            },
            side_b: GrantSide {
                node_id: NodeId([3; 16]),
                sign_pub: SigningKey::from_seed(&[3; 32]).public(),
            },
            not_after: 2_000_000_000,
            buffer_limit: 1 << 20,
            limits: LinkLimits::default(),
        }
    }

    #[test]
    fn verify_accepts_good_grant() {
        let authority = SigningKey::from_seed(&[9; 32]);
        let relay = RelayId([7; 16]);
        let signed = sample(relay).sign(&authority).expect("sign");
        let bytes = signed.encode().expect("encode");
        let back = SignedGrant::decode(&bytes).expect("decode");
        let grant = back
            .verify(&authority.public(), &relay, 1_000, Some(3))
            .expect("verify");
        assert_eq!(grant, sample(relay));
    }

    #[test]
    fn verify_refuses_each_bad_case() {
        let authority = SigningKey::from_seed(&[9; 32]);
        let other = SigningKey::from_seed(&[8; 32]);
        let relay = RelayId([7; 16]);
        let signed = sample(relay).sign(&authority).expect("sign");
        assert_eq!(
            signed.verify(&other.public(), &relay, 1_000, None),
            Err(GrantError::BadSignature)
        );
        assert!(matches!(
            signed.verify(&authority.public(), &RelayId([6; 16]), 1_000, None),
            Err(GrantError::NotForThisRelay { .. })
        ));
        assert!(matches!(
            signed.verify(&authority.public(), &relay, 2_000_000_000, None),
            Err(GrantError::Expired { .. })
        ));
        assert!(matches!(
            signed.verify(&authority.public(), &relay, 1_000, Some(4)),
            Err(GrantError::StaleGeneration {
                known: 4,
                got: 3,
                ..
            })
        ));
        let mut tampered = signed.clone();
        tampered.body[20] ^= 1;
        assert_eq!(
            tampered.verify(&authority.public(), &relay, 1_000, None),
            Err(GrantError::BadSignature)
        );
    }

    #[test]
    fn hex_snapshot_of_grant_body() {
        let authority = SigningKey::from_seed(&[9; 32]);
        let signed = sample(RelayId([7; 16])).sign(&authority).expect("sign");
        // Pinned wire bytes: a change here is a wire-format change and needs
        // a new grant version.
        assert_eq!(
            hex::encode(&signed.body),
            concat!(
                "00",                               // VersionedGrant::V1
                "01010101010101010101010101010101", // link_id
                "03",                               // generation
                "01",                               // one relay
                "07070707070707070707070707070707", // relay id
                "02020202020202020202020202020202", // side_a.node_id
                "8139770ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b394",
                "03030303030303030303030303030303", // side_b.node_id
                "ed4928c628d1c2c6eae90338905995612959273a5c63f93636c14614ac8737d1",
                "fc00943577", // not_after 2e9 (varint: 0xfc, u32 LE)
                "fc00001000", // buffer_limit 1 MiB
                "0000"        // limits: None, None
            )
        );
    }
}
