//! `io.containerd.snapshotter.v1.native`: every snapshot is a full directory
//! `{root}/snapshots/{id}`; Prepare and View copy the parent's tree (file data cloned
//! with reflinks where the file system supports them) and mount it with a bind mount.

use crate::fsutil;
use crate::overlay::blocking;
use crate::storage::MetaStore;
use berth_core::filters::Filter;
use berth_core::labels::Labels;
use berth_core::mount::Mount;
use berth_core::snapshot::{Info, Kind, Snapshotter, Usage};
use berth_core::{Error, Result};
use serde::{Deserialize, Serialize};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// `[plugins."io.containerd.snapshotter.v1.native"]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct NativeConfig {
    /// Root directory; empty means the plugin's root.
    pub root_path: String,
}

struct Inner {
    root: PathBuf,
    ms: MetaStore,
}

/// The native (copying) snapshotter.
#[derive(Clone)]
pub struct Native {
    inner: Arc<Inner>,
}

impl Native {
    pub fn new(root: &Path) -> Result<Native> {
        std::fs::create_dir_all(root.join("snapshots"))?;
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))?;
        let ms = MetaStore::open(&root.join("metadata.db"))?;
        Ok(Native {
            inner: Arc::new(Inner {
                root: root.to_path_buf(),
                ms,
            }),
        })
    }
}

impl Inner {
    fn path(&self, id: &str) -> PathBuf {
        self.root.join("snapshots").join(id)
    }

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
}

#[async_trait::async_trait]
impl Snapshotter for Native {
    async fn stat(&self, key: &str) -> Result<Info> {
        let inner = self.inner.clone();
        let key = key.to_string();
        blocking(move || Ok(inner.ms.get_info(&key)?.1)).await
    }

    async fn update(&self, info: Info, fieldpaths: &[String]) -> Result<Info> {
        let inner = self.inner.clone();
        let fieldpaths = fieldpaths.to_vec();
        blocking(move || inner.ms.update_info(&info, &fieldpaths)).await
    }

    async fn usage(&self, key: &str) -> Result<Usage> {
        let inner = self.inner.clone();
        let key = key.to_string();
        blocking(move || {
            let (id, info, usage) = inner.ms.get_info(&key)?;
            if info.kind == Kind::Active {
                return fsutil::disk_usage(&inner.path(&id));
            }
            Ok(usage)
        })
        .await
    }

    async fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let inner = self.inner.clone();
        let key = key.to_string();
        blocking(move || {
            let s = inner
                .ms
                .get_snapshot(&key)
                .map_err(|e| e.context("failed to get snapshot mount"))?;
            Ok(vec![Mount::bind(
                inner.path(&s.id).display().to_string(),
                s.kind == Kind::View,
            )])
        })
        .await
    }

    async fn prepare(&self, key: &str, parent: &str, labels: Labels) -> Result<Vec<Mount>> {
        let inner = self.inner.clone();
        let (key, parent) = (key.to_string(), parent.to_string());
        blocking(move || inner.create(Kind::Active, &key, &parent, labels)).await
    }

    async fn view(&self, key: &str, parent: &str, labels: Labels) -> Result<Vec<Mount>> {
        let inner = self.inner.clone();
        let (key, parent) = (key.to_string(), parent.to_string());
        blocking(move || inner.create(Kind::View, &key, &parent, labels)).await
    }

    async fn commit(&self, name: &str, key: &str, labels: Labels) -> Result<()> {
        let inner = self.inner.clone();
        let (name, key) = (name.to_string(), key.to_string());
        blocking(move || {
            let (id, _, _) = inner.ms.get_info(&key)?;
            let usage = fsutil::disk_usage(&inner.path(&id))?;
            inner
                .ms
                .commit_active(&key, &name, usage, labels)
                .map_err(|e| e.context("failed to commit snapshot"))?;
            Ok(())
        })
        .await
    }

    async fn remove(&self, key: &str) -> Result<()> {
        let inner = self.inner.clone();
        let key = key.to_string();
        blocking(move || {
            // Rename inside the transaction so a failure keeps the record.
            let doomed = inner.ms.remove(&key, |id, _| {
                let doomed = inner.root.join("snapshots").join(format!("rm-{id}"));
                std::fs::rename(inner.path(id), &doomed)
                    .map_err(|e| Error::unknown(format!("failed to rename: {e}")))?;
                Ok(doomed)
            })?;
            if let Err(err) = crate::remove_dir_all(&doomed) {
                tracing::warn!(path = %doomed.display(), error = %err, "failed to remove directory");
            }
            Ok(())
        })
        .await
    }

    async fn walk(&self, filters: &[String]) -> Result<Vec<Info>> {
        let filter = Filter::parse_all(filters)?;
        let inner = self.inner.clone();
        blocking(move || {
            Ok(inner
                .ms
                .walk(&filter)?
                .into_iter()
                .map(|(_, i)| i)
                .collect())
        })
        .await
    }

    async fn cleanup(&self) -> Result<()> {
        let inner = self.inner.clone();
        blocking(move || crate::cleanup_unowned(&inner.ms, &inner.root.join("snapshots"))).await
    }
}
