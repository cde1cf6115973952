//! Deterministic streams and their hashes: what was sent can be recomputed
//! from a seed, so the receiver's SHA-256 and byte count prove that nothing
//! was lost, duplicated, reordered or altered.

use std::sync::atomic::{AtomicU64, Ordering};

use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Chunk size of generated writes.
pub const CHUNK: usize = 64 * 1024;

/// A deterministic pseudo-random byte stream.
#[derive(Debug)]
pub struct Oracle {
    rng: rand::rngs::SmallRng,
    left: u64,
}

impl Oracle {
    /// `len` bytes from `seed`.
    pub fn new(seed: u64, len: u64) -> Self {
        Self {
            rng: rand::rngs::SmallRng::seed_from_u64(seed),
            left: len,
        }
    }

    /// The next chunk, empty at the end.
    pub fn next_chunk(&mut self, buf: &mut Vec<u8>) {
        let n = (self.left as usize).min(CHUNK);
        buf.resize(n, 0);
        self.rng.fill_bytes(buf);
        self.left -= n as u64;
    }

    /// The SHA-256 of the whole stream of `len` bytes from `seed`.
    pub fn digest(seed: u64, len: u64) -> [u8; 32] {
        let mut o = Self::new(seed, len);
        let mut h = Sha256::new();
        let mut buf = Vec::new();
        loop {
            o.next_chunk(&mut buf);
            if buf.is_empty() {
                return h.finalize().into();
            }
            h.update(&buf);
        }
    }

    /// Writes the stream of `len` bytes from `seed` to `w`.
    pub async fn write_to<W: AsyncWrite + Unpin>(
        seed: u64,
        len: u64,
        w: &mut W,
    ) -> std::io::Result<()> {
        let mut o = Self::new(seed, len);
        let mut buf = Vec::new();
        loop {
            o.next_chunk(&mut buf);
            if buf.is_empty() {
                return Ok(());
            }
            w.write_all(&buf).await?;
        }
    }
}

/// What a receiver got: byte count, SHA-256, and the longest pause between
/// two reads (how long an outage stalled it: the resume time).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    /// Bytes read.
    pub bytes: u64,
    /// Their SHA-256.
    pub sha256: [u8; 32],
    /// The longest time between two reads.
    pub longest_stall: std::time::Duration,
}

impl Received {
    /// Compares with the stream of `len` bytes from `seed`: `None` when
    /// equal, else what is wrong (bytes lost, duplicated, or altered).
    pub fn verdict(&self, seed: u64, len: u64) -> Option<String> {
        if self.bytes < len {
            Some(format!(
                "{} bytes lost ({} of {len} arrived)",
                len - self.bytes,
                self.bytes
            ))
        } else if self.bytes > len {
            Some(format!(
                "{} bytes duplicated ({} for {len} sent)",
                self.bytes - len,
                self.bytes
            ))
        } else if self.sha256 != Oracle::digest(seed, len) {
            Some(format!(
                "{len} bytes arrived but differ from what was sent (SHA-256)"
            ))
        } else {
            None
        }
    }
}

/// Reads `r` to its end; returns the byte count and SHA-256.
pub async fn hash_to_end<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<(u64, [u8; 32])> {
    let got = hash_counting(r, &AtomicU64::new(0)).await?;
    Ok((got.bytes, got.sha256))
}

/// Like [`hash_to_end`], adding every byte read to `progress` as it comes
/// and measuring the longest pause.
pub async fn hash_counting<R: AsyncRead + Unpin>(
    r: &mut R,
    progress: &AtomicU64,
) -> std::io::Result<Received> {
    let mut h = Sha256::new();
    let mut n = 0u64;
    let mut buf = vec![0u8; CHUNK];
    let mut last = std::time::Instant::now();
    let mut longest_stall = std::time::Duration::ZERO;
    loop {
        let k = r.read(&mut buf).await?;
        let now = std::time::Instant::now();
        longest_stall = longest_stall.max(now - last);
        last = now;
        if k == 0 {
            return Ok(Received {
                bytes: n,
                sha256: h.finalize().into(),
                longest_stall,
            });
        }
        n += k as u64;
        progress.fetch_add(k as u64, Ordering::Relaxed);
        h.update(&buf[..k]);
    }
}
