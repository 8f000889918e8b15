//! Content: digests, descriptors, and the two content-store interfaces.
//!
//! - [`BlobStore`] is the daemon-wide, un-namespaced store of blobs and ingests on disk
//!   (containerd's `content/local`), provided by the `io.containerd.content.v1.content`
//!   plugin.
//! - [`ContentStore`] is what clients see: every call names its namespace (and the lease
//!   it works under); the metadata layer records which namespace holds which blob and
//!   implements it on top of a [`BlobStore`].
//!
//! Both are synchronous (blocking file I/O); async callers run them on a blocking thread.

use crate::labels::Labels;
use crate::{Error, Result};
use std::collections::HashMap;
use std::fmt;
use std::sync::RwLock;
use std::time::SystemTime;

/// Largest blob a writer accepts as a declared total (1 TiB): a lying client cannot make
/// the store promise absurd sizes.
pub const MAX_BLOB_SIZE: i64 = 1 << 40;

/// A validated content digest, `algorithm:hex` (sha256, sha384 or sha512).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    /// Parses and validates `s` with go-digest's rules.
    pub fn parse(s: &str) -> Result<Digest> {
        let Some((alg, hex)) = s.split_once(':') else {
            return Err(Error::invalid_argument(format!(
                "{s:?}: invalid checksum digest format"
            )));
        };
        let len = match alg {
            "sha256" => 64,
            "sha384" => 96,
            "sha512" => 128,
            _ if alg.is_empty()
                || !alg.chars().all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || "+._-".contains(c)
                }) =>
            {
                return Err(Error::invalid_argument(format!(
                    "{s:?}: invalid checksum digest format"
                )));
            }
            _ => {
                return Err(Error::invalid_argument(format!(
                    "{s:?}: unsupported digest algorithm"
                )));
            }
        };
        if hex.len() != len || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(Error::invalid_argument(format!(
                "{s:?}: invalid checksum digest length or characters"
            )));
        }
        Ok(Digest(s.to_string()))
    }

    /// A sha256 digest from raw hash bytes.
    pub fn sha256_from_bytes(hash: &[u8]) -> Digest {
        let mut s = String::with_capacity(7 + hash.len() * 2);
        s.push_str("sha256:");
        for b in hash {
            s.push_str(&format!("{b:02x}"));
        }
        Digest(s)
    }

    pub fn algorithm(&self) -> &str {
        self.0.split_once(':').map(|(a, _)| a).unwrap_or_default()
    }

    pub fn hex(&self) -> &str {
        self.0.split_once(':').map(|(_, h)| h).unwrap_or_default()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An OCI descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Descriptor {
    pub media_type: String,
    /// Empty when unknown (a writer without an expected digest).
    pub digest: String,
    pub size: i64,
    pub annotations: HashMap<String, String>,
}

/// What the store knows about one blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    pub digest: Digest,
    pub size: i64,
    pub created_at: SystemTime,
    pub updated_at: SystemTime,
    pub labels: Labels,
}

impl Info {
    /// The fields a content filter sees (`digest`, `labels.<key>`), as containerd adapts them.
    pub fn field(&self, path: &[String]) -> Option<String> {
        match path.first().map(String::as_str) {
            Some("digest") => Some(self.digest.to_string()),
            Some("labels") => check_map(&path[1..], &self.labels),
            _ => None,
        }
    }
}

/// containerd's `checkMap`: a label path joins its components with `.`.
pub fn check_map(path: &[String], map: &HashMap<String, String>) -> Option<String> {
    if map.is_empty() {
        return None;
    }
    map.get(&path.join(".")).cloned()
}

/// The progress of one ingest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub r#ref: String,
    pub offset: i64,
    pub total: i64,
    /// Set when the write will commit without data (the blob already exists elsewhere).
    pub expected: String,
    pub started_at: SystemTime,
    pub updated_at: SystemTime,
}

/// An open write of one ingest. Dropping it closes it (keeping the progress); the lock on
/// its ref is released on close, commit or drop.
pub trait Writer: Send {
    /// Appends `data` at the current offset.
    fn write(&mut self, data: &[u8]) -> Result<()>;
    /// [`Writer::write`] of a buffer the writer may keep: a store that hashes off the
    /// write path (the local store) queues `data` for its hashing thread instead of
    /// copying it. Wrappers forward this so the buffer reaches the store.
    fn write_owned(&mut self, data: bytes::Bytes) -> Result<()> {
        self.write(&data)
    }
    fn status(&self) -> Result<Status>;
    /// The digest of what was written so far.
    fn digest(&self) -> Digest;
    /// Only `0` is supported: restart the ingest from scratch.
    fn truncate(&mut self, size: i64) -> Result<()>;
    /// Verifies `size` (if > 0) and `expected` (if any) and makes the blob available.
    fn commit(&mut self, size: i64, expected: Option<&Digest>, labels: Labels) -> Result<()>;
    /// Flushes and releases the ref, keeping the ingest for a later resume.
    fn close(&mut self) -> Result<()>;
}

/// Random access to a committed blob.
pub trait ReaderAt: Send + Sync {
    fn size(&self) -> i64;
    /// Reads at most `buf.len()` bytes at `offset`; returns 0 at the end.
    fn read_at(&self, buf: &mut [u8], offset: i64) -> Result<usize>;
}

/// The on-disk, un-namespaced store (containerd's `content/local`).
pub trait BlobStore: Send + Sync {
    fn info(&self, digest: &Digest) -> Result<Info>;
    fn reader_at(&self, digest: &Digest) -> Result<Box<dyn ReaderAt>>;
    fn delete(&self, digest: &Digest) -> Result<()>;
    /// Every committed blob (labels are empty: the metadata layer keeps them).
    fn walk(&self, f: &mut dyn FnMut(Info) -> Result<()>) -> Result<()>;
    /// Opens (creating or resuming) the ingest `ref`; a second writer of the same ref gets
    /// `Unavailable`.
    fn writer(&self, r#ref: &str, total: i64) -> Result<Box<dyn Writer>>;
    fn status(&self, r#ref: &str) -> Result<Status>;
    fn list_statuses(&self) -> Result<Vec<Status>>;
    fn abort(&self, r#ref: &str) -> Result<()>;
    /// Held shared while a commit makes a blob visible and records it, and exclusively
    /// while the collector sweeps blobs, so a blob is never swept between the two.
    fn gc_lock(&self) -> &RwLock<()>;
    /// The same store, for the requests of `namespace`: a store in another process (a
    /// content proxy) tells it the namespace of the request, as containerd's proxy does
    /// through its context; `None` where the namespace makes no difference (the local
    /// store). The collector's walks and deletes use the store itself.
    fn for_namespace(&self, _namespace: &str) -> Option<std::sync::Arc<dyn BlobStore>> {
        None
    }
}

/// Who is asking: the namespace of the request and the lease it works under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    pub namespace: String,
    pub lease: Option<String>,
}

impl Scope {
    pub fn new(namespace: impl Into<String>) -> Scope {
        Scope {
            namespace: namespace.into(),
            lease: None,
        }
    }

    pub fn with_lease(mut self, lease: Option<String>) -> Scope {
        self.lease = lease;
        self
    }
}

/// What a writer is opened for.
#[derive(Debug, Clone, Default)]
pub struct WriterOpts {
    pub r#ref: String,
    /// Expected size, 0 if unknown.
    pub total: i64,
    /// Expected digest, if known.
    pub expected: Option<Digest>,
}

/// The namespaced content store clients use (containerd's `content.Store` behind the
/// metadata layer).
pub trait ContentStore: Send + Sync {
    fn info(&self, scope: &Scope, digest: &Digest) -> Result<Info>;
    fn update(&self, scope: &Scope, info: Info, paths: &[String]) -> Result<Info>;
    /// Blobs of the namespace that match `filters` (containerd's filter syntax).
    fn walk(
        &self,
        scope: &Scope,
        filters: &[String],
        f: &mut dyn FnMut(Info) -> Result<()>,
    ) -> Result<()>;
    fn delete(&self, scope: &Scope, digest: &Digest) -> Result<()>;
    fn reader_at(&self, scope: &Scope, digest: &Digest) -> Result<Box<dyn ReaderAt>>;
    fn writer(&self, scope: &Scope, opts: WriterOpts) -> Result<Box<dyn Writer>>;
    fn status(&self, scope: &Scope, r#ref: &str) -> Result<Status>;
    fn list_statuses(&self, scope: &Scope, filters: &[String]) -> Result<Vec<Status>>;
    fn abort(&self, scope: &Scope, r#ref: &str) -> Result<()>;
}

/// Validates an ingest ref: non-empty, bounded, no control characters. Refs are hashed
/// before they touch the file system, so `/` and `..` are harmless there.
pub fn validate_ref(r#ref: &str) -> Result<()> {
    if r#ref.is_empty() {
        return Err(Error::invalid_argument("ref must not be empty"));
    }
    if r#ref.len() > 1024 {
        return Err(Error::invalid_argument(format!(
            "ref {:?}…: longer than 1024 bytes",
            r#ref.chars().take(32).collect::<String>()
        )));
    }
    if r#ref.chars().any(|c| c.is_control()) {
        return Err(Error::invalid_argument(format!(
            "ref {ref:?}: must not contain control characters"
        )));
    }
    Ok(())
}

/// Validates a declared size. As in containerd, a total of zero or less means "unknown"
/// when a writer opens (a commit with a negative size then fails its size check with
/// FailedPrecondition); only totals over [`MAX_BLOB_SIZE`] are refused.
pub fn validate_total(total: i64) -> Result<()> {
    if total > MAX_BLOB_SIZE {
        return Err(Error::invalid_argument(format!(
            "declared size {total} exceeds the maximum blob size {MAX_BLOB_SIZE}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_validate_like_go_digest() {
        let ok = format!("sha256:{}", "a".repeat(64));
        let d = Digest::parse(&ok).unwrap();
        assert_eq!(d.algorithm(), "sha256");
        assert_eq!(d.hex(), "a".repeat(64));
        for bad in [
            "",
            "sha256",
            "sha256:",
            "sha256:abc",
            &format!("sha256:{}", "A".repeat(64)),
            &format!("md5:{}", "a".repeat(32)),
            &format!("sha256:{}/..", "a".repeat(62)),
        ] {
            let err = Digest::parse(bad).expect_err(bad);
            assert!(err.is(crate::error::ErrorKind::InvalidArgument));
        }
        assert_eq!(
            Digest::sha256_from_bytes(&[0xab; 32]).to_string(),
            format!("sha256:{}", "ab".repeat(32))
        );
    }

    #[test]
    fn refs_and_totals_are_bounded() {
        validate_ref("a/../b").unwrap();
        assert!(validate_ref("").is_err());
        assert!(validate_ref("a\nb").is_err());
        validate_total(-1).unwrap();
        assert!(validate_total(MAX_BLOB_SIZE + 1).is_err());
        validate_total(0).unwrap();
    }
}
