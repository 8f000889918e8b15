//! Digest and size verification, whole or while streaming.

use berth_core::content::Digest;
use berth_core::{Error, Result};
use oci_spec::image::Descriptor;
use sha2::Digest as _;

enum Hasher {
    Sha256(sha2::Sha256),
    Sha384(sha2::Sha384),
    Sha512(sha2::Sha512),
}

/// Hashes and counts bytes as they arrive and checks them against a descriptor.
pub struct Verifier {
    expected: Digest,
    size: u64,
    seen: u64,
    hasher: Hasher,
    /// Bytes counted but not hashed (held by a sink that verifies on commit).
    unhashed_prefix: bool,
}

impl Verifier {
    pub fn new(desc: &Descriptor) -> Result<Verifier> {
        let expected = Digest::parse(desc.digest().as_ref())?;
        let hasher = match expected.algorithm() {
            "sha256" => Hasher::Sha256(sha2::Sha256::new()),
            "sha384" => Hasher::Sha384(sha2::Sha384::new()),
            "sha512" => Hasher::Sha512(sha2::Sha512::new()),
            a => return Err(Error::not_implemented(format!("digest algorithm {a}"))),
        };
        Ok(Verifier {
            expected,
            size: desc.size(),
            seen: 0,
            hasher,
            unhashed_prefix: false,
        })
    }

    /// Counts `n` bytes already held elsewhere without hashing them: [`Verifier::finish`]
    /// then checks only the size, and whoever holds the bytes must check the digest.
    pub fn assume_prefix(&mut self, n: u64) {
        self.seen += n;
        self.unhashed_prefix = true;
    }

    /// Whether the digest is checked by [`Verifier::finish`] (no unhashed prefix).
    pub fn checks_digest(&self) -> bool {
        !self.unhashed_prefix
    }

    /// Adds `data`; fails as soon as more than the declared size arrived.
    pub fn update(&mut self, data: &[u8]) -> Result<()> {
        self.seen += data.len() as u64;
        if self.seen > self.size {
            return Err(Error::invalid_argument(format!(
                "{}: received more than the declared size of {} bytes",
                self.expected, self.size
            )));
        }
        match &mut self.hasher {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha384(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
        Ok(())
    }

    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// Checks the final size and digest.
    pub fn finish(self) -> Result<()> {
        if self.seen != self.size {
            return Err(Error::invalid_argument(format!(
                "{}: size mismatch: received {} bytes, expected {}",
                self.expected, self.seen, self.size
            )));
        }
        if self.unhashed_prefix {
            return Ok(());
        }
        let hex = match self.hasher {
            Hasher::Sha256(h) => hex::encode(h.finalize()),
            Hasher::Sha384(h) => hex::encode(h.finalize()),
            Hasher::Sha512(h) => hex::encode(h.finalize()),
        };
        if hex != self.expected.hex() {
            return Err(Error::invalid_argument(format!(
                "digest mismatch: expected {}, got {}:{hex}",
                self.expected,
                self.expected.algorithm()
            )));
        }
        Ok(())
    }
}

/// Checks a whole body against `desc`.
pub fn check(body: &[u8], desc: &Descriptor) -> Result<()> {
    let mut v = Verifier::new(desc)?;
    v.update(body)?;
    v.finish()
}
