//! `io.containerd.snapshotter.v1.overlayfs`: each snapshot is a directory
//! `{root}/snapshots/{id}` with `fs` (the layer's upper dir) and, when active, `work`.
//!
//! Mounts follow containerd: a snapshot without parents (or a view of a single layer) is
//! a bind mount of its `fs` (overlay needs at least one lower), a view of several layers
//! is a read-only overlay of lowers only, an active snapshot with parents is an overlay
//! with `upperdir`/`workdir` and `lowerdir` = parents' `fs`, nearest first.

use crate::blocking::{Blocking, BlockingSnapshotter};
use crate::fsutil;
use crate::storage::{MetaStore, Snapshot};
use berth_core::filters::Filter;
use berth_core::labels::Labels;
use berth_core::mount::Mount;
use berth_core::snapshot::{Info, Kind, Usage};
use berth_core::{Error, Result};
use serde::{Deserialize, Serialize};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Label naming the upper directory of a snapshot (with `upperdir_label = true`).
pub const UPPERDIR_LABEL: &str = "containerd.io/snapshot/overlay.upperdir";

/// `[plugins."io.containerd.snapshotter.v1.overlayfs"]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct OverlayConfig {
    /// Root directory; empty means the plugin's root.
    pub root_path: String,
    /// Adds [`UPPERDIR_LABEL`] to every snapshot's labels.
    pub upperdir_label: bool,
    /// Remove returns only once the snapshot's directory is gone; otherwise the
    /// directory is detached and deleted in the background (containerd's default).
    pub sync_remove: bool,
    /// Extra options for every overlay mount.
    pub mount_options: Vec<String>,
}

/// The overlayfs snapshotter's blocking implementation.
pub struct OverlayStore {
    root: PathBuf,
    ms: MetaStore,
    upperdir_label: bool,
    sync_remove: bool,
    mount_options: Vec<String>,
    index_off: bool,
    userxattr: bool,
}

/// The overlayfs snapshotter.
pub type Overlay = Blocking<OverlayStore>;

/// Whether overlay needs `userxattr` here: only outside the initial user namespace
/// (rootless), where `trusted.*` xattrs are unavailable.
pub fn needs_userxattr() -> bool {
    let uid_map = std::fs::read_to_string("/proc/self/uid_map").unwrap_or_default();
    let initial = uid_map
        .split_whitespace()
        .collect::<Vec<_>>()
        .eq(&["0", "0", "4294967295"]);
    !initial
}

/// Whether `root` is on a file system that fills `d_type` (overlay requires it).
fn supports_d_type(root: &Path) -> Result<bool> {
    let probe = root.join(".dtype-probe");
    let _ = std::fs::remove_dir(&probe);
    std::fs::create_dir(&probe)?;
    let ok = std::fs::read_dir(root)?
        .filter_map(|e| e.ok())
        .find(|e| e.file_name() == ".dtype-probe")
        .map(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .unwrap_or(false);
    std::fs::remove_dir(&probe)?;
    Ok(ok)
}

impl Overlay {
    pub fn new(root: &Path, config: &OverlayConfig) -> Result<Overlay> {
        std::fs::create_dir_all(root)?;
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))?;
        if !supports_d_type(root)? {
            return Err(Error::failed_precondition(format!(
                "{} does not support d_type. If the backing filesystem is xfs, please reformat with ftype=1 to enable d_type support",
                root.display()
            )));
        }
        let ms = MetaStore::open(&root.join("metadata.db"))?;
        std::fs::create_dir_all(root.join("snapshots"))?;
        Ok(Blocking::wrap(OverlayStore {
            root: root.to_path_buf(),
            ms,
            upperdir_label: config.upperdir_label,
            sync_remove: config.sync_remove,
            mount_options: config.mount_options.clone(),
            index_off: Path::new("/sys/module/overlay/parameters/index").exists(),
            userxattr: needs_userxattr(),
        }))
    }

    pub fn root(&self) -> &Path {
        &self.store().root
    }
}

impl OverlayStore {
    fn upper_path(&self, id: &str) -> PathBuf {
        self.root.join("snapshots").join(id).join("fs")
    }

    fn work_path(&self, id: &str) -> PathBuf {
        self.root.join("snapshots").join(id).join("work")
    }

    fn label(&self, id: &str, info: &mut Info) {
        if self.upperdir_label {
            info.labels.insert(
                UPPERDIR_LABEL.into(),
                self.upper_path(id).display().to_string(),
            );
        }
    }

    fn mounts_of(&self, s: &Snapshot) -> Vec<Mount> {
        let path = |id: &str| self.upper_path(id).display().to_string();
        if s.parent_ids.is_empty() {
            return vec![Mount::bind(path(&s.id), s.kind == Kind::View)];
        }
        let mut options = self.mount_options.clone();
        if self.index_off {
            options.push("index=off".into());
        }
        if self.userxattr {
            options.push("userxattr".into());
        }
        if s.kind == Kind::Active {
            options.push(format!("workdir={}", self.work_path(&s.id).display()));
            options.push(format!("upperdir={}", path(&s.id)));
        } else if s.parent_ids.len() == 1 {
            return vec![Mount::bind(path(&s.parent_ids[0]), true)];
        }
        let lowers: Vec<String> = s.parent_ids.iter().map(|id| path(id)).collect();
        options.push(format!("lowerdir={}", lowers.join(":")));
        vec![Mount {
            r#type: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options,
        }]
    }
}

impl BlockingSnapshotter for OverlayStore {
    fn create(&self, kind: Kind, key: &str, parent: &str, labels: Labels) -> Result<Vec<Mount>> {
        let snapshots = self.root.join("snapshots");
        let (snapshot, _) = self.ms.create(kind, key, parent, labels, |s| {
            let td = crate::mount::tempdir_in(&snapshots)
                .map_err(|e| e.context("failed to create prepare snapshot dir"))?;
            let result = (|| -> Result<()> {
                std::fs::create_dir(td.join("fs"))?;
                std::fs::set_permissions(td.join("fs"), std::fs::Permissions::from_mode(0o755))?;
                if kind == Kind::Active {
                    std::fs::create_dir(td.join("work"))?;
                    std::fs::set_permissions(
                        td.join("work"),
                        std::fs::Permissions::from_mode(0o711),
                    )?;
                }
                if let Some(parent_id) = s.parent_ids.first() {
                    let meta = std::fs::metadata(self.upper_path(parent_id))
                        .map_err(|e| Error::unknown(format!("failed to stat parent: {e}")))?;
                    std::os::unix::fs::lchown(td.join("fs"), Some(meta.uid()), Some(meta.gid()))
                        .map_err(|e| Error::unknown(format!("failed to chown: {e}")))?;
                }
                crate::clear_orphan_at(&snapshots.join(&s.id))?;
                std::fs::rename(&td, snapshots.join(&s.id))
                    .map_err(|e| Error::unknown(format!("failed to rename: {e}")))?;
                Ok(())
            })();
            if result.is_err() {
                let _ = std::fs::remove_dir_all(&td);
            }
            result
        })?;
        Ok(self.mounts_of(&snapshot))
    }

    /// Removes every directory under `snapshots/` no snapshot owns.
    fn cleanup(&self) -> Result<()> {
        let dir = self.root.join("snapshots");
        crate::cleanup_unowned(&self.ms, &dir)
    }

    fn stat(&self, key: &str) -> Result<Info> {
        let (id, mut info, _) = self.ms.get_info(key)?;
        self.label(&id, &mut info);
        Ok(info)
    }

    fn update(&self, info: Info, fieldpaths: &[String]) -> Result<Info> {
        let mut info = self.ms.update_info(&info, fieldpaths)?;
        if self.upperdir_label {
            let (id, _, _) = self.ms.get_info(&info.name)?;
            self.label(&id, &mut info);
        }
        Ok(info)
    }

    fn usage(&self, key: &str) -> Result<Usage> {
        let (id, info, usage) = self.ms.get_info(key)?;
        if info.kind == Kind::Active {
            return fsutil::disk_usage(&self.upper_path(&id));
        }
        Ok(usage)
    }

    fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let s = self
            .ms
            .get_snapshot(key)
            .map_err(|e| e.context("failed to get active mount"))?;
        Ok(self.mounts_of(&s))
    }

    fn commit(&self, name: &str, key: &str, labels: Labels) -> Result<()> {
        let (id, _, _) = self.ms.get_info(key)?;
        let usage = fsutil::disk_usage(&self.upper_path(&id))?;
        self.ms
            .commit_active(key, name, usage, labels)
            .map_err(|e| e.context("failed to commit snapshot"))?;
        Ok(())
    }

    fn remove(&self, key: &str) -> Result<()> {
        let id = self
            .ms
            .remove(key, |id, _| Ok(id.to_string()))
            .map_err(|e| e.context("failed to remove"))?;
        let dir = self.root.join("snapshots").join(&id);
        if self.sync_remove {
            if let Err(err) = crate::remove_dir_all(&dir) {
                tracing::warn!(path = %dir.display(), error = %err, "failed to remove directory");
            }
        } else {
            // Detach the directory now (cheap), delete it in the background; a
            // crash in between leaves it to `cleanup`.
            let doomed = self.root.join("snapshots").join(format!("rm-{id}"));
            if std::fs::rename(&dir, &doomed).is_ok() {
                std::thread::spawn(move || {
                    if let Err(err) = crate::remove_dir_all(&doomed) {
                        tracing::warn!(path = %doomed.display(), error = %err, "failed to remove directory");
                    }
                });
            }
        }
        Ok(())
    }

    fn walk(&self, filter: &Filter) -> Result<Vec<Info>> {
        if !self.upperdir_label {
            return Ok(self.ms.walk(filter)?.into_iter().map(|(_, i)| i).collect());
        }
        // The label is part of what filters see.
        Ok(self
            .ms
            .walk(&Filter::default())?
            .into_iter()
            .map(|(id, mut info)| {
                self.label(&id, &mut info);
                info
            })
            .filter(|info| filter.matches(info))
            .collect())
    }
}
