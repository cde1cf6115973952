//! The `KK` handshake: side A initiates, side B responds.

use std::fmt;

use super::rng::builder_with_rng;
use super::{Cipher, NOISE_PARAMS, NoiseError, NoiseRng, PROLOGUE_LABEL, Params, Session};
use crate::ids::LinkId;
use crate::keys::{NoisePublicKey, NoiseSecretKey};
use crate::limits::MAX_HANDSHAKE_LEN;

pub(super) fn prologue(link_id: &LinkId) -> Vec<u8> {
    let mut p = PROLOGUE_LABEL.to_vec();
    p.extend_from_slice(&link_id.0);
    p
}

pub(super) fn builder<'a>(
    local: &'a NoiseSecretKey,
    remote: &'a NoisePublicKey,
    prologue: &'a [u8],
    rng: Box<dyn NoiseRng>,
) -> Result<snow::Builder<'a>, NoiseError> {
    let params = NOISE_PARAMS.parse()?;
    Ok(builder_with_rng(params, rng)
        .local_private_key(local.as_bytes())?
        .remote_public_key(&remote.0)?
        .prologue(prologue)?)
}

/// Side A after sending the first handshake message.
pub struct ExpectResponse {
    state: snow::HandshakeState,
    params: Params,
}

impl fmt::Debug for ExpectResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ExpectResponse")
    }
}

/// Starts a session as side A, stating this machine's cipher preference
/// and the default limits: returns the state and the message to send. The
/// ephemeral key is drawn from `rng`.
pub fn initiate(
    local: &NoiseSecretKey,
    remote: &NoisePublicKey,
    link_id: &LinkId,
    rng: Box<dyn NoiseRng>,
) -> Result<(ExpectResponse, Vec<u8>), NoiseError> {
    initiate_with_params(local, remote, link_id, Params::default(), rng)
}

/// [`initiate`] stating `preference` instead of this machine's.
pub fn initiate_preferring(
    local: &NoiseSecretKey,
    remote: &NoisePublicKey,
    link_id: &LinkId,
    preference: Cipher,
    rng: Box<dyn NoiseRng>,
) -> Result<(ExpectResponse, Vec<u8>), NoiseError> {
    initiate_with_params(local, remote, link_id, Params::with_cipher(preference), rng)
}

/// [`initiate`] stating `params`.
pub fn initiate_with_params(
    local: &NoiseSecretKey,
    remote: &NoisePublicKey,
    link_id: &LinkId,
    params: Params,
    rng: Box<dyn NoiseRng>,
) -> Result<(ExpectResponse, Vec<u8>), NoiseError> {
    initiate_with(
        builder(local, remote, &prologue(link_id), rng)?,
        params.check()?,
    )
}

pub(super) fn initiate_with(
    b: snow::Builder<'_>,
    params: Params,
) -> Result<(ExpectResponse, Vec<u8>), NoiseError> {
    let mut state = b.build_initiator()?;
    let mut msg = vec![0u8; MAX_HANDSHAKE_LEN];
    let n = state.write_message(&params.payload(), &mut msg)?;
    msg.truncate(n);
    Ok((ExpectResponse { state, params }, msg))
}

impl ExpectResponse {
    /// Completes the handshake with side B's answer.
    pub fn handle_response(mut self, msg: &[u8]) -> Result<Session, NoiseError> {
        if msg.len() > MAX_HANDSHAKE_LEN {
            return Err(NoiseError::HandshakeTooLong(msg.len()));
        }
        let mut payload = vec![0u8; MAX_HANDSHAKE_LEN];
        let n = self.state.read_message(msg, &mut payload)?;
        let theirs = Params::from_payload(&payload[..n])?;
        Session::from_handshake(self.state, self.params.agree(theirs))
    }
}

/// Answers side A's first message as side B, stating this machine's
/// cipher preference and the default limits: returns the session and the
/// message to send back. The ephemeral key is drawn from `rng`.
pub fn respond(
    local: &NoiseSecretKey,
    remote: &NoisePublicKey,
    link_id: &LinkId,
    msg: &[u8],
    rng: Box<dyn NoiseRng>,
) -> Result<(Session, Vec<u8>), NoiseError> {
    respond_with_params(local, remote, link_id, msg, Params::default(), rng)
}

/// [`respond`] stating `preference` instead of this machine's.
pub fn respond_preferring(
    local: &NoiseSecretKey,
    remote: &NoisePublicKey,
    link_id: &LinkId,
    msg: &[u8],
    preference: Cipher,
    rng: Box<dyn NoiseRng>,
) -> Result<(Session, Vec<u8>), NoiseError> {
    respond_with_params(
        local,
        remote,
        link_id,
        msg,
        Params::with_cipher(preference),
        rng,
    )
}

/// [`respond`] stating `params`.
pub fn respond_with_params(
    local: &NoiseSecretKey,
    remote: &NoisePublicKey,
    link_id: &LinkId,
    msg: &[u8],
    params: Params,
    rng: Box<dyn NoiseRng>,
) -> Result<(Session, Vec<u8>), NoiseError> {
    respond_with(
        builder(local, remote, &prologue(link_id), rng)?,
        msg,
        params.check()?,
    )
}

pub(super) fn respond_with(
    b: snow::Builder<'_>,
    msg: &[u8],
    params: Params,
) -> Result<(Session, Vec<u8>), NoiseError> {
    if msg.len() > MAX_HANDSHAKE_LEN {
        return Err(NoiseError::HandshakeTooLong(msg.len()));
    }
    let mut state = b.build_responder()?;
    let mut payload = vec![0u8; MAX_HANDSHAKE_LEN];
    let n = state.read_message(msg, &mut payload)?;
    let theirs = Params::from_payload(&payload[..n])?;
    let mut out = vec![0u8; MAX_HANDSHAKE_LEN];
    let n = state.write_message(&params.payload(), &mut out)?;
    out.truncate(n);
    Ok((Session::from_handshake(state, params.agree(theirs))?, out))
}
