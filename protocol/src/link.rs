//! Link-control messages: what the two agents of a link tell each other
//! end to end, sealed with their Noise session on flow id 0 and carried as
//! [`crate::msg::PeerFrame::Sealed`] through the relay, which cannot read or
//! forge them.
//!
//! Each side numbers the link-control messages it seals from 0 within a
//! session (the Noise nonce is `(0 << 40) | seq`); a receiver accepts only a
//! `seq` above the last it accepted, so the relay cannot replay one.

use serde::{Deserialize, Serialize};

use crate::FlowId;
use crate::codec::{self, CodecError};
use crate::limits::MAX_CONTROL_FRAME_LEN;

/// Most acknowledgements in one message.
pub const MAX_ACKS_PER_MESSAGE: usize = 512;

/// A link-control message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LinkControl {
    /// Side A asks, after a reconnect, whether side B still holds this
    /// session. Only a peer holding it can open this message.
    Resume,
    /// Side B's answer: the session goes on; flows resume.
    ResumeOk,
    /// Cumulative acknowledgements: for each flow, every record with a
    /// sequence number below the value was delivered to the application.
    Acks(Vec<(FlowId, u64)>),
    /// Side B asks side A for a new handshake: it met so many messages
    /// that failed to decrypt under this session (forgeries, from the
    /// relay) that the session's keys must not meet more.
    Renew,
}

impl LinkControl {
    /// Encodes the message.
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        codec::encode(self)
    }

    /// Decodes a message, refusing more than [`MAX_ACKS_PER_MESSAGE`] acks.
    pub fn decode(bytes: &[u8]) -> Result<Self, CodecError> {
        let msg = codec::decode::<Self, MAX_CONTROL_FRAME_LEN>(bytes)?;
        if let Self::Acks(acks) = &msg
            && acks.len() > MAX_ACKS_PER_MESSAGE
        {
            return Err(CodecError::Malformed(format!(
                "{} acks in one message, more than {MAX_ACKS_PER_MESSAGE}",
                acks.len()
            )));
        }
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn hex_snapshots() {
        let hex = |m: &LinkControl| hex::encode(m.encode().expect("encode"));
        assert_eq!(hex(&LinkControl::Resume), "00");
        assert_eq!(hex(&LinkControl::ResumeOk), "01");
        assert_eq!(hex(&LinkControl::Renew), "03");
        assert_eq!(
            hex(&LinkControl::Acks(vec![(1, 2), (300, 70_000)])),
            "020201".to_owned() + "02" + "fb2c01" + "fc70110100"
        );
    }

    #[test]
    fn too_many_acks_refused() {
        let m = LinkControl::Acks(vec![(1, 1); MAX_ACKS_PER_MESSAGE + 1]);
        assert!(LinkControl::decode(&m.encode().expect("encode")).is_err());
    }

    proptest! {
        #[test]
        fn round_trip(acks in proptest::collection::vec(any::<(u32, u64)>(), 0..MAX_ACKS_PER_MESSAGE)) {
            let m = LinkControl::Acks(acks);
            prop_assert_eq!(LinkControl::decode(&m.encode().expect("encode")).expect("decode"), m);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = LinkControl::decode(&bytes);
        }
    }
}
