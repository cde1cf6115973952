//! The random source of a handshake: the caller's, never the OS's.
//!
//! A handshake draws its ephemeral key from the [`NoiseRng`] its caller
//! passes in (the OS random source from `comsat-node` on an agent, a
//! seeded one in tests). snow's own resolvers lend their Diffie-Hellman,
//! hashes and ciphers only: their random source is the OS's, which this
//! crate leaves to its callers.

use std::cell::Cell;

use snow::params::{CipherChoice, DHChoice, HashChoice, NoiseParams};
use snow::resolvers::{CryptoResolver, DefaultResolver, FallbackResolver, RingResolver};
use snow::types::{Cipher, Dh, Hash, Random};

/// The random source a handshake draws its ephemeral key from.
///
/// It must be a cryptographically secure source on a real link: the
/// secrecy of a session rests on its ephemeral keys.
pub trait NoiseRng: Send + Sync {
    /// Fills `out` with random bytes.
    fn fill(&mut self, out: &mut [u8]);
}

/// A [`NoiseRng`] as snow's random source.
struct Adapter(Box<dyn NoiseRng>);

impl Random for Adapter {
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), snow::Error> {
        self.0.fill(dest);
        Ok(())
    }
}

/// Resolves the random source to the caller's (once: a builder asks for
/// it once per handshake state) and everything else as snow's ring
/// resolver does, with its default resolver behind it (X25519, BLAKE2s).
struct Resolver {
    rng: Cell<Option<Box<dyn NoiseRng>>>,
    crypto: FallbackResolver,
}

impl CryptoResolver for Resolver {
    fn resolve_rng(&self) -> Option<Box<dyn Random>> {
        // A second request finds none and fails the build, rather than
        // falling back to another source.
        let rng = self.rng.take()?;
        Some(Box::new(Adapter(rng)))
    }

    fn resolve_dh(&self, choice: &DHChoice) -> Option<Box<dyn Dh>> {
        self.crypto.resolve_dh(choice)
    }

    fn resolve_hash(&self, choice: &HashChoice) -> Option<Box<dyn Hash>> {
        self.crypto.resolve_hash(choice)
    }

    fn resolve_cipher(&self, choice: &CipherChoice) -> Option<Box<dyn Cipher>> {
        self.crypto.resolve_cipher(choice)
    }
}

/// A snow builder for `params` whose handshake state draws from `rng`.
pub(super) fn builder_with_rng(
    params: NoiseParams,
    rng: Box<dyn NoiseRng>,
) -> snow::Builder<'static> {
    let resolver = Resolver {
        rng: Cell::new(Some(rng)),
        crypto: FallbackResolver::new(Box::new(RingResolver), Box::new(DefaultResolver)),
    };
    snow::Builder::with_resolver(params, Box::new(resolver))
}
