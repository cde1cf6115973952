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

/// Reads `r` to its end; returns the byte count and SHA-256.
pub async fn hash_to_end<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<(u64, [u8; 32])> {
    hash_counting(r, &AtomicU64::new(0)).await
}

/// Like [`hash_to_end`], adding every byte read to `progress` as it comes.
pub async fn hash_counting<R: AsyncRead + Unpin>(
    r: &mut R,
    progress: &AtomicU64,
) -> std::io::Result<(u64, [u8; 32])> {
    let mut h = Sha256::new();
    let mut n = 0u64;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let k = r.read(&mut buf).await?;
        if k == 0 {
            return Ok((n, h.finalize().into()));
        }
        n += k as u64;
        progress.fetch_add(k as u64, Ordering::Relaxed);
        h.update(&buf[..k]);
    }
}
