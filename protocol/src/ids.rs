//! Identifiers of nodes, relays, links and flows.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A string could not be parsed as an id or key.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("expected {expected} hex digits, got {got:?}")]
pub struct ParseHexError {
    expected: usize,
    got: String,
}

/// Parses exactly `2 * N` hex digits.
pub fn parse_hex<const N: usize>(s: &str) -> Result<[u8; N], ParseHexError> {
    let err = || ParseHexError {
        expected: N * 2,
        got: if s.len() > 80 {
            format!(
                "{}...",
                &s[..s.char_indices().nth(77).map_or(0, |(i, _)| i)]
            )
        } else {
            s.to_owned()
        },
    };
    let mut out = [0u8; N];
    hex::decode_to_slice(s.trim(), &mut out).map_err(|_| err())?;
    Ok(out)
}

/// Serializes fixed-size byte arrays as hex strings in human-readable
/// formats (TOML, JSON) and as raw bytes in bincode.
pub(crate) mod hex_bytes {
    use super::*;

    pub(crate) fn serialize<S: Serializer, const N: usize>(
        bytes: &[u8; N],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&hex::encode(bytes))
        } else {
            use serde::ser::SerializeTuple;
            let mut t = s.serialize_tuple(N)?;
            for b in bytes {
                t.serialize_element(b)?;
            }
            t.end()
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>, const N: usize>(
        d: D,
    ) -> Result<[u8; N], D::Error>
    where
        [u8; N]: Deserialize<'de>,
    {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            parse_hex::<N>(&s).map_err(serde::de::Error::custom)
        } else {
            <[u8; N]>::deserialize(d)
        }
    }
}

macro_rules! id_type {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub struct $name(#[serde(with = "hex_bytes")] pub [u8; 16]);

        impl $name {
            /// The first 8 hex digits, for logs.
            pub fn fmt_short(&self) -> String {
                hex::encode(&self.0[..4])
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&hex::encode(self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.fmt_short())
            }
        }

        impl FromStr for $name {
            type Err = ParseHexError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                parse_hex::<16>(s).map(Self)
            }
        }
    };
}

id_type!(
    /// The id of an agent or relay node.
    NodeId
);
id_type!(
    /// The id of a link between two agents.
    LinkId
);

id_type!(
    /// The id of a relay, as named in grants.
    RelayId
);

/// The id of one flow (one accepted local connection) within a link session.
///
/// Flow ids are the high 24 bits of every record nonce, so they are below
/// [`crate::limits::MAX_FLOW_ID`], and never reused within one generation of
/// a Noise session (a new generation takes them again under other keys; a
/// stream header carries the generation's low 8 bits above the id:
/// [`crate::record::wire_flow_id`]). Id 0 is reserved for the link's own
/// sealed control records.
pub type FlowId = u32;

/// Which half of a link a node holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// Side A: the Noise initiator.
    A,
    /// Side B: the Noise responder.
    B,
}

impl Side {
    /// The other side.
    pub fn peer(self) -> Self {
        match self {
            Self::A => Self::B,
            Self::B => Self::A,
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::A => "a",
            Self::B => "b",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_parses_its_display() {
        let id = LinkId([0x5a; 16]);
        assert_eq!(id.to_string().parse::<LinkId>(), Ok(id));
    }

    #[test]
    fn id_parse_error_names_expectation() {
        let err = "zz".parse::<NodeId>().expect_err("not hex");
        assert!(err.to_string().contains("32 hex digits"), "{err}");
    }
}
