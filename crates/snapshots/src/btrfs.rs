//! `io.containerd.snapshotter.v1.btrfs`: snapshots are btrfs subvolumes under a root on
//! a btrfs file system — `{root}/active/{id}` (writable; views too, mounted `ro`) and
//! `{root}/snapshots/{id}` (read-only, committed). Prepare on a parent is a writable
//! snapshot of the parent's subvolume; Commit takes a read-only snapshot of the active
//! one and deletes it. Mounts are `btrfs` mounts of the root's device with `subvolid=`.
//! Subvolumes are made with the btrfs ioctls directly (no `btrfs` CLI needed at run time).

use crate::blocking::{Blocking, BlockingSnapshotter};
use crate::fsutil;
use crate::storage::{MetaStore, Snapshot};
use berth_core::filters::Filter;
use berth_core::labels::Labels;
use berth_core::mount::Mount;
use berth_core::snapshot::{Info, Kind, Usage};
use berth_core::{Error, Result};
use serde::{Deserialize, Serialize};
use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// `[plugins."io.containerd.snapshotter.v1.btrfs"]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct BtrfsConfig {
    /// Root directory (on btrfs); empty means the plugin's root.
    pub root_path: String,
}

const BTRFS_SUPER_MAGIC: i64 = 0x9123_683e;
const IOC_SUBVOL_CREATE: libc::c_ulong = 0x5000_940e;
const IOC_SNAP_DESTROY: libc::c_ulong = 0x5000_940f;
const IOC_SNAP_CREATE_V2: libc::c_ulong = 0x5000_9417;
const IOC_INO_LOOKUP: libc::c_ulong = 0xd000_9412;
const SUBVOL_RDONLY: u64 = 1 << 1;

#[repr(C)]
struct VolArgs {
    fd: i64,
    name: [u8; 4088],
}

#[repr(C)]
struct VolArgsV2 {
    fd: i64,
    transid: u64,
    flags: u64,
    unused: [u64; 4],
    name: [u8; 4040],
}

#[repr(C)]
struct InoLookupArgs {
    treeid: u64,
    objectid: u64,
    name: [u8; 4080],
}

fn open_dir(path: &Path) -> Result<std::fs::File> {
    std::fs::File::open(path).map_err(|e| Error::unknown(format!("open {}: {e}", path.display())))
}

fn split(path: &Path) -> Result<(std::fs::File, Vec<u8>)> {
    let parent = path
        .parent()
        .ok_or_else(|| Error::invalid_argument("subvolume without parent"))?;
    let name = path
        .file_name()
        .ok_or_else(|| Error::invalid_argument("subvolume without name"))?
        .as_bytes()
        .to_vec();
    Ok((open_dir(parent)?, name))
}

fn ioctl_err(what: &str, path: &Path) -> Error {
    Error::unknown(format!(
        "btrfs {what} {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    ))
}

/// Creates an empty subvolume at `path`.
pub fn subvolume_create(path: &Path) -> Result<()> {
    let (dir, name) = split(path)?;
    let mut args = VolArgs {
        fd: 0,
        name: [0; 4088],
    };
    args.name[..name.len()].copy_from_slice(&name);
    // SAFETY: args has the kernel's layout and lives across the call.
    if unsafe { libc::ioctl(dir.as_raw_fd(), IOC_SUBVOL_CREATE as _, &mut args) } != 0 {
        return Err(ioctl_err("subvolume create", path));
    }
    Ok(())
}

/// Snapshots subvolume `src` to `dst` (read-only when `readonly`).
pub fn subvolume_snapshot(src: &Path, dst: &Path, readonly: bool) -> Result<()> {
    let source = open_dir(src)?;
    let (dir, name) = split(dst)?;
    let mut args = VolArgsV2 {
        fd: source.as_raw_fd() as i64,
        transid: 0,
        flags: if readonly { SUBVOL_RDONLY } else { 0 },
        unused: [0; 4],
        name: [0; 4040],
    };
    args.name[..name.len()].copy_from_slice(&name);
    // SAFETY: as above.
    if unsafe { libc::ioctl(dir.as_raw_fd(), IOC_SNAP_CREATE_V2 as _, &mut args) } != 0 {
        return Err(ioctl_err("snapshot", dst));
    }
    Ok(())
}

/// Deletes the subvolume at `path`.
pub fn subvolume_delete(path: &Path) -> Result<()> {
    let (dir, name) = split(path)?;
    let mut args = VolArgs {
        fd: 0,
        name: [0; 4088],
    };
    args.name[..name.len()].copy_from_slice(&name);
    // SAFETY: as above.
    if unsafe { libc::ioctl(dir.as_raw_fd(), IOC_SNAP_DESTROY as _, &mut args) } != 0 {
        return Err(ioctl_err("subvolume delete", path));
    }
    Ok(())
}

/// The ID of the subvolume at `path`.
pub fn subvolume_id(path: &Path) -> Result<u64> {
    let dir = open_dir(path)?;
    let mut args = InoLookupArgs {
        treeid: 0,
        objectid: 256,
        name: [0; 4080],
    };
    // SAFETY: as above.
    if unsafe { libc::ioctl(dir.as_raw_fd(), IOC_INO_LOOKUP as _, &mut args) } != 0 {
        return Err(ioctl_err("subvolume id", path));
    }
    Ok(args.treeid)
}

fn is_btrfs(path: &Path) -> Result<bool> {
    let c =
        CString::new(path.as_os_str().as_bytes()).map_err(|_| Error::invalid_argument("path"))?;
    // SAFETY: zeroed statfs is a valid out-parameter.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out-parameter.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(Error::unknown(format!(
            "statfs {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        )));
    }
    Ok(st.f_type as i64 == BTRFS_SUPER_MAGIC)
}

/// The device of the mount that holds `path` (the longest matching mount point).
fn device_of(path: &Path) -> Result<String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let path = path.to_string_lossy();
    let mut best: Option<(usize, String)> = None;
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let (Some(mp), Some(fstype), Some(source)) =
            (fields.get(4), fields.get(sep + 1), fields.get(sep + 2))
        else {
            continue;
        };
        if *fstype != "btrfs" {
            continue;
        }
        let matches = path == *mp || path.starts_with(&format!("{}/", mp.trim_end_matches('/')));
        if matches && best.as_ref().is_none_or(|(len, _)| mp.len() > *len) {
            best = Some((mp.len(), source.to_string()));
        }
    }
    best.map(|(_, s)| s)
        .ok_or_else(|| Error::failed_precondition(format!("no btrfs mount holds {path}")))
}

/// The btrfs snapshotter's blocking implementation.
pub struct BtrfsStore {
    root: PathBuf,
    device: String,
    ms: MetaStore,
}

/// The btrfs snapshotter.
pub type Btrfs = Blocking<BtrfsStore>;

impl Btrfs {
    pub fn new(root: &Path) -> Result<Btrfs> {
        std::fs::create_dir_all(root)?;
        let root = root.canonicalize()?;
        if !is_btrfs(&root)? {
            return Err(berth_plugin_skip(format!(
                "path {} must be a btrfs filesystem to be used with the btrfs snapshotter",
                root.display()
            )));
        }
        let device = device_of(&root)?;
        for dir in ["active", "snapshots"] {
            std::fs::create_dir_all(root.join(dir))?;
        }
        let ms = MetaStore::open(&root.join("metadata.db"))?;
        Ok(Blocking::wrap(BtrfsStore { root, device, ms }))
    }
}

/// The error a plugin init turns into "skipped".
fn berth_plugin_skip(msg: String) -> Error {
    Error::with_message(
        berth_core::error::ErrorKind::FailedPrecondition,
        format!("skip plugin: {msg}"),
    )
}

impl BtrfsStore {
    fn active(&self, id: &str) -> PathBuf {
        self.root.join("active").join(id)
    }

    fn committed(&self, id: &str) -> PathBuf {
        self.root.join("snapshots").join(id)
    }

    fn path(&self, id: &str, kind: Kind) -> PathBuf {
        if kind == Kind::Committed {
            self.committed(id)
        } else {
            self.active(id)
        }
    }

    fn mounts_of(&self, s: &Snapshot) -> Result<Vec<Mount>> {
        let id = subvolume_id(&self.active(&s.id))?;
        Ok(vec![Mount {
            r#type: "btrfs".into(),
            source: self.device.clone(),
            target: String::new(),
            options: vec![
                format!("subvolid={id}"),
                if s.kind == Kind::View { "ro" } else { "rw" }.into(),
            ],
        }])
    }
}

impl BlockingSnapshotter for BtrfsStore {
    fn create(&self, kind: Kind, key: &str, parent: &str, labels: Labels) -> Result<Vec<Mount>> {
        let (snapshot, mounts) = self.ms.create(kind, key, parent, labels, |s| {
            let target = self.active(&s.id);
            match s.parent_ids.first() {
                Some(p) => subvolume_snapshot(&self.committed(p), &target, false)?,
                None => subvolume_create(&target)?,
            }
            match self.mounts_of(s) {
                Ok(m) => Ok(m),
                Err(e) => {
                    let _ = subvolume_delete(&target);
                    Err(e)
                }
            }
        })?;
        let _ = snapshot;
        Ok(mounts)
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
            return fsutil::disk_usage(&self.active(&id));
        }
        Ok(usage)
    }

    fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        self.mounts_of(&self.ms.get_snapshot(key)?)
    }

    fn commit(&self, name: &str, key: &str, labels: Labels) -> Result<()> {
        let (id, info, _) = self.ms.get_info(key)?;
        if info.kind != Kind::Active {
            return Err(Error::failed_precondition(format!(
                "snapshot {key:?} is not active"
            )));
        }
        let usage = fsutil::disk_usage(&self.active(&id))?;
        subvolume_snapshot(&self.active(&id), &self.committed(&id), true)?;
        if let Err(e) = self.ms.commit_active(key, name, usage, labels) {
            let _ = subvolume_delete(&self.committed(&id));
            return Err(e.context("failed to commit snapshot"));
        }
        if let Err(err) = subvolume_delete(&self.active(&id)) {
            tracing::warn!(error = %err, "removing the active subvolume after commit");
        }
        Ok(())
    }

    fn remove(&self, key: &str) -> Result<()> {
        self.ms.remove(key, |id, kind| {
            subvolume_delete(&self.path(id, kind)).map_err(|e| e.context("failed to remove"))
        })
    }

    fn walk(&self, filter: &Filter) -> Result<Vec<Info>> {
        Ok(self.ms.walk(filter)?.into_iter().map(|(_, i)| i).collect())
    }

    fn cleanup(&self) -> Result<()> {
        let doomed = self.ms.with_ids_locked(|ids| {
            let mut doomed = Vec::new();
            for dir in ["active", "snapshots"] {
                for entry in std::fs::read_dir(self.root.join(dir))? {
                    let entry = entry?;
                    if !ids.contains(entry.file_name().to_string_lossy().as_ref()) {
                        doomed.push(entry.path());
                    }
                }
            }
            Ok(doomed)
        })?;
        for path in doomed {
            if subvolume_delete(&path).is_err() {
                let _ = std::fs::remove_dir_all(&path);
            }
        }
        Ok(())
    }
}
