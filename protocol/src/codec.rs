//! The one place bincode is used.
//!
//! bincode `=2.0.1` is pinned (3.x is an empty crate, and 2.x is marked
//! unmaintained: RUSTSEC-2025-0141). Every decode goes through [`decode`]
//! with an explicit byte limit and refuses trailing bytes; hex snapshot
//! tests of the wire bytes guard against a silent change of encoding.
//!
//! The configuration is bincode's standard one: little-endian, variable
//! length integers.

use serde::{Serialize, de::DeserializeOwned};

/// A value could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CodecError {
    /// The input is longer than the limit for this type.
    #[error("encoded value is {len} bytes, more than the limit of {limit}")]
    TooLong {
        /// Input length.
        len: usize,
        /// The limit in force.
        limit: usize,
    },
    /// The bytes do not form a valid value.
    #[error("malformed encoding: {0}")]
    Malformed(String),
    /// The value ended before the input did.
    #[error("{0} trailing bytes after the encoded value")]
    Trailing(usize),
    /// The value could not be encoded (never happens for our types).
    #[error("could not encode: {0}")]
    Encode(String),
}

/// Encodes `value`.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(value, bincode::config::standard())
        .map_err(|e| CodecError::Encode(e.to_string()))
}

/// Decodes exactly one `T` from all of `bytes`, which may be at most `LIMIT`
/// bytes long.
pub fn decode<T: DeserializeOwned, const LIMIT: usize>(bytes: &[u8]) -> Result<T, CodecError> {
    if bytes.len() > LIMIT {
        return Err(CodecError::TooLong {
            len: bytes.len(),
            limit: LIMIT,
        });
    }
    let config = bincode::config::standard().with_limit::<LIMIT>();
    let (value, used) = bincode::serde::decode_from_slice(bytes, config)
        .map_err(|e| CodecError::Malformed(e.to_string()))?;
    if used != bytes.len() {
        return Err(CodecError::Trailing(bytes.len() - used));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_trailing_bytes() {
        let mut bytes = encode(&7u32).expect("encode");
        bytes.push(0);
        assert_eq!(decode::<u32, 16>(&bytes), Err(CodecError::Trailing(1)));
    }

    #[test]
    fn refuses_over_limit() {
        let bytes = encode(&vec![0u8; 100]).expect("encode");
        assert!(matches!(
            decode::<Vec<u8>, 64>(&bytes),
            Err(CodecError::TooLong { limit: 64, .. })
        ));
    }

    #[test]
    fn length_prefix_larger_than_input_is_malformed_not_allocated() {
        // A Vec<u8> whose varint length claims 2^32 bytes.
        let bytes = [0xfc, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            decode::<Vec<u8>, 1024>(&bytes),
            Err(CodecError::Malformed(_))
        ));
    }
}
