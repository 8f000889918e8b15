//! Berth's snapshotters: overlayfs, native and btrfs (plus their shared metastore and
//! mount helpers). Each is a blocking store ([`blocking::BlockingSnapshotter`]) made an
//! async [`berth_core::snapshot::Snapshotter`] by the one adapter [`blocking::Blocking`];
//! the plugin instance of a snapshotter is an `Arc<dyn Snapshotter>` (see
//! [`registrations`]).

pub mod blocking;
pub mod btrfs;
pub mod devmapper;
pub mod fsutil;
pub mod mount;
pub mod native;
pub mod overlay;
pub mod storage;

mod plugin;

pub use plugin::{SnapshotterInstance, registrations};

use berth_core::Result;
use std::path::Path;

/// Removes every entry of `dir` whose name is not the ID of a snapshot in `ms` (what an
/// asynchronous remove or an interrupted create leaves behind). The decision is made
/// under the metastore's write lock, the deletion after it.
pub(crate) fn cleanup_unowned(ms: &storage::MetaStore, dir: &Path) -> Result<()> {
    let doomed = ms.with_ids_locked(|ids| {
        let mut doomed = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if !ids.contains(entry.file_name().to_string_lossy().as_ref()) {
                doomed.push(entry.path());
            }
        }
        Ok(doomed)
    })?;
    for path in doomed {
        if let Err(err) = crate::remove_dir_all(&path) {
            tracing::warn!(path = %path.display(), error = %err, "failed to remove directory");
        }
    }
    Ok(())
}

/// Makes way for a new snapshot's directory `path`. Its ID was just allocated in the
/// create's transaction, and IDs are never reused once committed, so a directory there
/// belongs to no snapshot: it is what a create interrupted by a crash left after its
/// rename but before its transaction committed (the ID went back to the sequence).
pub(crate) fn clear_orphan_at(path: &Path) -> Result<()> {
    if std::fs::symlink_metadata(path).is_ok() {
        tracing::warn!(path = %path.display(), "removing a directory an interrupted create left under the new snapshot's ID");
        remove_dir_all(path).map_err(|e| {
            berth_core::Error::unknown(format!(
                "failed to remove the leftover {}: {e}",
                path.display()
            ))
        })?;
    }
    Ok(())
}

/// `remove_dir_all` where "already gone" is success (an asynchronous remove and a
/// cleanup may race for the same directory).
pub(crate) fn remove_dir_all(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}
