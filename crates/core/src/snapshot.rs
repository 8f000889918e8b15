//! The snapshotter interface (containerd's `snapshots.Snapshotter`).
//!
//! A snapshotter manages a tree of file-system snapshots identified by string keys:
//! `Prepare`/`View` create an active (writable) or view (read-only) snapshot on top of a
//! committed parent and return the mounts that realise it; `Commit` turns an active
//! snapshot into a committed one under a new name, usable as a parent.
//!
//! The trait is **async** (via `async_trait`): the gRPC services and the proxy
//! snapshotter (a gRPC client) are async, and local snapshotters run their blocking file
//! system work on tokio's blocking pool. `walk` returns the matching infos instead of
//! calling back, so no lock or transaction is held while the caller works.
//!
//! Errors follow containerd: a missing key is `NotFound`, an existing key
//! `AlreadyExists`, removing a snapshot that still has children `FailedPrecondition`,
//! a parent that is not committed `InvalidArgument`.

use crate::filters::Adaptor;
use crate::labels::Labels;
use crate::mount::Mount;
use crate::{Error, Result};
use std::time::SystemTime;

/// Label on an unpacked layer naming the uncompressed digest it was made from (set by
/// unpackers; used by remote snapshotters).
pub const LABEL_SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";
/// Label prefix whose labels are handed to backend snapshotters by the metadata layer
/// (`containerd.io/snapshot/...`); other labels stay in the metadata store only.
pub const LABEL_SNAPSHOT_PREFIX: &str = "containerd.io/snapshot/";

/// What a snapshot is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Kind {
    #[default]
    Unknown,
    /// Read-only, made by `View`; cannot be committed.
    View,
    /// Writable, made by `Prepare`; can be committed.
    Active,
    /// Immutable; may be the parent of others.
    Committed,
}

impl Kind {
    /// containerd's names (`ctr snapshots ls` prints them, filters match them).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Unknown => "Unknown",
            Kind::View => "View",
            Kind::Active => "Active",
            Kind::Committed => "Committed",
        }
    }

    pub fn parse(s: &str) -> Result<Kind> {
        match s.to_ascii_lowercase().as_str() {
            "view" => Ok(Kind::View),
            "active" => Ok(Kind::Active),
            "committed" => Ok(Kind::Committed),
            "unknown" => Ok(Kind::Unknown),
            _ => Err(Error::invalid_argument(format!(
                "unknown snapshot kind {s:?}"
            ))),
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A snapshot's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    pub kind: Kind,
    /// The key (active/view) or name (committed).
    pub name: String,
    /// The parent's name; empty for a snapshot without parent.
    pub parent: String,
    pub labels: Labels,
    pub created: SystemTime,
    pub updated: SystemTime,
}

impl Info {
    pub fn new(name: impl Into<String>, kind: Kind) -> Info {
        Info {
            kind,
            name: name.into(),
            parent: String::new(),
            labels: Labels::new(),
            created: SystemTime::UNIX_EPOCH,
            updated: SystemTime::UNIX_EPOCH,
        }
    }
}

/// containerd's snapshot filter fields: `kind`, `name`, `parent`, `labels.<key>`.
impl Adaptor for Info {
    fn field(&self, path: &[String]) -> Option<String> {
        match path.first().map(String::as_str)? {
            "kind" => Some(self.kind.as_str().to_ascii_lowercase()),
            "name" => Some(self.name.clone()),
            "parent" => Some(self.parent.clone()),
            "labels" if path.len() > 1 => self.labels.get(&path[1..].join(".")).cloned(),
            _ => None,
        }
    }
}

/// Disk usage of a snapshot's own layer (not its parents').
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Number of inodes.
    pub inodes: i64,
    /// Bytes on disk.
    pub size: i64,
}

impl Usage {
    pub fn add(&mut self, other: Usage) {
        self.inodes += other.inodes;
        self.size += other.size;
    }
}

/// A snapshotter. See the module documentation for the semantics.
#[async_trait::async_trait]
pub trait Snapshotter: Send + Sync {
    async fn stat(&self, key: &str) -> Result<Info>;

    /// Updates the labels of `info.name` (containerd's field paths: empty = all labels,
    /// `labels`, `labels.<key>`); returns the updated record.
    async fn update(&self, info: Info, fieldpaths: &[String]) -> Result<Info>;

    /// Disk usage; for an active snapshot measured now, for a committed one as recorded
    /// at commit.
    async fn usage(&self, key: &str) -> Result<Usage>;

    /// The mounts of an active or view snapshot.
    async fn mounts(&self, key: &str) -> Result<Vec<Mount>>;

    /// Creates an active snapshot `key` on top of committed `parent` ("" for none).
    async fn prepare(&self, key: &str, parent: &str, labels: Labels) -> Result<Vec<Mount>>;

    /// Creates a read-only view `key` of committed `parent`.
    async fn view(&self, key: &str, parent: &str, labels: Labels) -> Result<Vec<Mount>>;

    /// Commits active snapshot `key` as `name`; the key is gone afterwards. `labels`
    /// replace the active snapshot's labels when not empty.
    async fn commit(&self, name: &str, key: &str, labels: Labels) -> Result<()>;

    /// Removes a snapshot; one with children is `FailedPrecondition`.
    async fn remove(&self, key: &str) -> Result<()>;

    /// Every snapshot matching `filters` (containerd's filter syntax; empty = all).
    async fn walk(&self, filters: &[String]) -> Result<Vec<Info>>;

    /// Releases resources no snapshot refers to any more (directories left by an
    /// asynchronous remove, an interrupted prepare). Snapshotters without such state
    /// keep the default.
    async fn cleanup(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filters::Filter;

    #[test]
    fn filters_match_snapshot_fields() {
        let mut info = Info::new("layer-1", Kind::Committed);
        info.parent = "layer-0".into();
        info.labels
            .insert("containerd.io/gc.root".into(), "x".into());
        for (filter, expected) in [
            ("kind==committed", true),
            ("kind==active", false),
            ("name~=layer", true),
            ("parent==layer-0", true),
            (r#"labels."containerd.io/gc.root""#, true),
            (r#"labels."other""#, false),
        ] {
            assert_eq!(
                Filter::parse(filter).unwrap().matches(&info),
                expected,
                "{filter}"
            );
        }
        assert_eq!(Kind::parse("Active").unwrap(), Kind::Active);
    }
}
