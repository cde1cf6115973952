//! One flow: a local connection carried as records over a QUIC stream.
//!
//! Records are sealed with the link's Noise session under the nonce
//! `(flow_id << 40) | seq`. The receiver accepts only the next `seq` in
//! order, so a replayed, dropped or reordered record fails the flow.

use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use comsat_protocol::FlowId;
use comsat_protocol::noise::{NoiseError, Session};
use comsat_protocol::record::{RecordError, RecordKind, decode_record};

use crate::defaults;
use crate::local::{LocalRead, LocalWrite};
use crate::metrics::Metrics;

/// Stream error code sent when a flow fails.
pub(crate) const STREAM_FAILED: u32 = 2;

/// Why a flow failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FlowError {
    #[error("local socket: {0}")]
    Local(#[from] std::io::Error),
    #[error("relay stream: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("relay stream: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("relay stream ended without a FIN record")]
    Truncated,
    #[error("bad record: {0}")]
    Record(#[from] RecordError),
    #[error("record failed to decrypt: {0}")]
    Noise(#[from] NoiseError),
    #[error("record {got} out of order (expected {want})")]
    Sequence { want: u64, got: u64 },
    #[error("unexpected {0:?} record")]
    Unexpected(RecordKind),
    #[error("peer reset the flow")]
    PeerReset,
}

/// The sending half's state.
pub(crate) struct Sender {
    pub(crate) session: Arc<Session>,
    pub(crate) flow_id: FlowId,
    pub(crate) seq: u64,
    pub(crate) stream: quinn::SendStream,
}

impl Sender {
    /// Seals one record and writes it (with any `prefix`) to the stream.
    pub(crate) async fn send(
        &mut self,
        prefix: &[u8],
        kind: RecordKind,
        payload: &[u8],
    ) -> Result<(), FlowError> {
        let mut out = Vec::with_capacity(prefix.len() + payload.len() + 32);
        out.extend_from_slice(prefix);
        self.session
            .seal_record(self.flow_id, self.seq, kind, payload, &mut out)?;
        self.seq += 1;
        self.stream.write_chunk(Bytes::from(out)).await?;
        Ok(())
    }
}

/// The receiving half's state.
pub(crate) struct Receiver {
    pub(crate) session: Arc<Session>,
    pub(crate) flow_id: FlowId,
    pub(crate) seq: u64,
    pub(crate) stream: quinn::RecvStream,
    pub(crate) pending: BytesMut,
}

impl Receiver {
    /// The next record's kind and payload; `Ok(None)` at end of stream.
    pub(crate) async fn next(
        &mut self,
        plain: &mut Vec<u8>,
    ) -> Result<Option<RecordKind>, FlowError> {
        loop {
            if let Some((header, ct, used)) = decode_record(&self.pending)? {
                if header.seq != self.seq {
                    return Err(FlowError::Sequence {
                        want: self.seq,
                        got: header.seq,
                    });
                }
                plain.clear();
                let kind = self
                    .session
                    .open_record(self.flow_id, header.seq, ct, plain)?;
                self.pending.advance(used);
                self.seq += 1;
                return Ok(Some(kind));
            }
            match self.stream.read_chunk(usize::MAX, true).await? {
                Some(chunk) => self.pending.extend_from_slice(&chunk.bytes),
                None if self.pending.is_empty() => return Ok(None),
                None => return Err(FlowError::Truncated),
            }
        }
    }
}

async fn local_to_remote(
    reader: &mut LocalRead,
    tx: &mut Sender,
    metrics: &Metrics,
) -> Result<(), FlowError> {
    loop {
        match reader.read_chunk(defaults::READ_CHUNK).await? {
            Some(data) => {
                tx.send(&[], RecordKind::Data, &data).await?;
                metrics.sent_bytes.increment(data.len() as u64);
            }
            None => {
                tx.send(&[], RecordKind::Fin, &[]).await?;
                let _ = tx.stream.finish();
                return Ok(());
            }
        }
    }
}

async fn remote_to_local(
    rx: &mut Receiver,
    writer: &mut LocalWrite,
    metrics: &Metrics,
) -> Result<(), FlowError> {
    let mut plain = Vec::new();
    loop {
        match rx.next(&mut plain).await? {
            Some(RecordKind::Data) => {
                writer.write_all(&plain).await?;
                metrics.received_bytes.increment(plain.len() as u64);
            }
            Some(RecordKind::Fin) => {
                writer.shutdown().await?;
                return Ok(());
            }
            Some(RecordKind::Reset) => return Err(FlowError::PeerReset),
            Some(other) => return Err(FlowError::Unexpected(other)),
            None => return Err(FlowError::Truncated),
        }
    }
}

/// Runs both directions until both end cleanly or either fails; on failure
/// the peer gets a reset record and the application a reset socket.
pub(crate) async fn run(
    mut tx: Sender,
    mut rx: Receiver,
    mut reader: LocalRead,
    mut writer: LocalWrite,
    metrics: Metrics,
) {
    metrics.flows_open.increment(1.0);
    let failure = {
        let up = local_to_remote(&mut reader, &mut tx, &metrics);
        let down = remote_to_local(&mut rx, &mut writer, &metrics);
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            if up_done && down_done {
                break None;
            }
            tokio::select! {
                r = &mut up, if !up_done => {
                    up_done = true;
                    if let Err(e) = r { break Some(e) }
                }
                r = &mut down, if !down_done => {
                    down_done = true;
                    if let Err(e) = r { break Some(e) }
                }
            }
        }
    };
    metrics.flows_open.decrement(1.0);
    if let Some(e) = failure {
        tracing::debug!(error = %e, "flow failed");
        metrics.flows_failed.increment(1);
        let told = !matches!(e, FlowError::PeerReset)
            && tx.send(&[], RecordKind::Reset, &[]).await.is_ok();
        if told {
            let _ = tx.stream.finish();
        } else {
            let _ = tx.stream.reset(STREAM_FAILED.into());
        }
        let _ = rx.stream.stop(STREAM_FAILED.into());
        writer.abort();
    } else {
        tracing::debug!("flow closed");
    }
}
