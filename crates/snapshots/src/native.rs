//! `io.containerd.snapshotter.v1.native`: every snapshot is a full directory
//! `{root}/snapshots/{id}`; Prepare and View copy the parent's tree (file data cloned
//! with reflinks where the file system supports them) and mount it with a bind mount.

use crate::blocking::{Blocking, BlockingSnapshotter};
use crate::fsutil;
use crate::storage::MetaStore;
use berth_core::filters::Filter;
use berth_core::labels::Labels;
use berth_core::mount::Mount;
use berth_core::snapshot::{Info, Kind, Usage};
use berth_core::{Error, Result};
use serde::{Deserialize, Serialize};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// `[plugins."io.containerd.snapshotter.v1.native"]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct NativeConfig {
    /// Root directory; empty means the plugin's root.
    pub root_path: String,
}

/// The native snapshotter's blocking implementation.
pub struct NativeStore {
    root: PathBuf,
    ms: MetaStore,
}

/// The native (copying) snapshotter.
pub type Native = Blocking<NativeStore>;

impl Native {
    pub fn new(root: &Path) -> Result<Native> {
        std::fs::create_dir_all(root.join("snapshots"))?;
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))?;
        let ms = MetaStore::open(&root.join("metadata.db"))?;
        Ok(Blocking::wrap(NativeStore {
            root: root.to_path_buf(),
            ms,
        }))
    }
}

impl NativeStore {
    fn path(&self, id: &str) -> PathBuf {
        self.root.join("snapshots").join(id)
    }
}

impl BlockingSnapshotter for NativeStore {
    fn create(&self, kind: Kind, key: &str, parent: &str, labels: Labels) -> Result<Vec<Mount>> {
        let snapshots = self.root.join("snapshots");
        let (snapshot, _) = self.ms.create(kind, key, parent, labels, |s| {
            let td = crate::mount::tempdir_in(&snapshots)?;
            let result = (|| -> Result<()> {
                std::fs::set_permissions(&td, std::fs::Permissions::from_mode(0o755))?;
                if let Some(parent_id) = s.parent_ids.first() {
                    fsutil::copy_dir(&self.path(parent_id), &td)
                        .map_err(|e| e.context("copying of parent failed"))?;
                }
                crate::clear_orphan_at(&self.path(&s.id))?;
                std::fs::rename(&td, self.path(&s.id))
                    .map_err(|e| Error::unknown(format!("failed to rename: {e}")))?;
                Ok(())
            })();
            if result.is_err() {
                let _ = std::fs::remove_dir_all(&td);
            }
            result
        })?;
        Ok(vec![Mount::bind(
            self.path(&snapshot.id).display().to_string(),
            kind == Kind::View,
        )])
    }

    fn stat(&self, key: &str) -> Result<Info> {
        Ok(self.ms.get_info(key)?.1)
    }

    fn update(&self, info: Info, fieldpaths: &[String]) -> Result<Info> {
        self.ms.update_info(&info, fieldpaths)
    }

    fn usage(&self, key: &str) -> Result<Usage> {
        let (id, info, usage) = self.ms.get_info(key)?;
        if info.kind == Kind::Active {
            return fsutil::disk_usage(&self.path(&id));
        }
        Ok(usage)
    }

    fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let s = self
            .ms
            .get_snapshot(key)
            .map_err(|e| e.context("failed to get snapshot mount"))?;
        Ok(vec![Mount::bind(
            self.path(&s.id).display().to_string(),
            s.kind == Kind::View,
        )])
    }

    fn commit(&self, name: &str, key: &str, labels: Labels) -> Result<()> {
        let (id, _, _) = self.ms.get_info(key)?;
        let usage = fsutil::disk_usage(&self.path(&id))?;
        self.ms
            .commit_active(key, name, usage, labels)
            .map_err(|e| e.context("failed to commit snapshot"))?;
        Ok(())
    }

    fn remove(&self, key: &str) -> Result<()> {
        // Rename inside the transaction so a failure keeps the record.
        let doomed = self.ms.remove(key, |id, _| {
            let doomed = self.root.join("snapshots").join(format!("rm-{id}"));
            std::fs::rename(self.path(id), &doomed)
                .map_err(|e| Error::unknown(format!("failed to rename: {e}")))?;
            Ok(doomed)
        })?;
        if let Err(err) = crate::remove_dir_all(&doomed) {
            tracing::warn!(path = %doomed.display(), error = %err, "failed to remove directory");
        }
        Ok(())
    }

    fn walk(&self, filter: &Filter) -> Result<Vec<Info>> {
        Ok(self.ms.walk(filter)?.into_iter().map(|(_, i)| i).collect())
    }

    fn cleanup(&self) -> Result<()> {
        crate::cleanup_unowned(&self.ms, &self.root.join("snapshots"))
    }
}
