//! A task's bundle: `{state}/{ns}/{id}` with `config.json` (the spec), `rootfs/` (where
//! the shim mounts the rootfs mounts) and `work` → `{root}/{ns}/{id}` (the runtime's
//! persistent working directory); the shim adds `address`, `log` and its pid files.

use berth_core::{Error, Result, identifiers};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Bundle {
    pub id: String,
    pub namespace: String,
    pub path: PathBuf,
    pub work: PathBuf,
}

fn mkdir(path: &Path, mode: u32, recursive: bool) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(recursive)
        .mode(mode)
        .create(path)
}

impl Bundle {
    pub fn paths(state: &Path, root: &Path, namespace: &str, id: &str) -> Bundle {
        Bundle {
            id: id.to_string(),
            namespace: namespace.to_string(),
            path: state.join(namespace).join(id),
            work: root.join(namespace).join(id),
        }
    }

    /// Creates the bundle; `AlreadyExists` if there is one for this ID already.
    pub fn create(
        state: &Path,
        root: &Path,
        namespace: &str,
        id: &str,
        spec: &[u8],
    ) -> Result<Bundle> {
        identifiers::validate(id)?;
        let bundle = Bundle::paths(state, root, namespace, id);
        let io = |what: &str, e: std::io::Error| {
            Error::unknown(format!("bundle {}: {what}: {e}", bundle.path.display()))
        };
        mkdir(bundle.path.parent().unwrap(), 0o711, true).map_err(|e| io("creating", e))?;
        match mkdir(&bundle.path, 0o700, false) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(Error::already_exists(format!("bundle for task {id:?}")));
            }
            Err(e) => return Err(io("creating", e)),
        }
        let result = (|| {
            mkdir(bundle.work.parent().unwrap(), 0o711, true).map_err(|e| io("work dir", e))?;
            match mkdir(&bundle.work, 0o711, false) {
                Ok(()) => {}
                // A stale work dir of an earlier task with this ID is reused, as containerd does.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io("work dir", e)),
            }
            std::os::unix::fs::symlink(&bundle.work, bundle.path.join("work"))
                .map_err(|e| io("work link", e))?;
            mkdir(&bundle.path.join("rootfs"), 0o711, false).map_err(|e| io("rootfs", e))?;
            std::fs::write(bundle.path.join("config.json"), spec).map_err(|e| io("config.json", e))
        })();
        if let Err(e) = result {
            bundle.delete();
            return Err(e);
        }
        Ok(bundle)
    }

    /// Takes the bundle and the work directory out of their places at once, for a task
    /// deletion that should not wait for their removal: each is renamed into its base
    /// directory's `.trash` (one rename on each file system instead of an unlink or rmdir
    /// per entry, some of which waited tens of milliseconds on a busy disk's journal),
    /// and the returned function removes them. If a rename fails the directory is
    /// removed in place now. A crash in between leaves only trash, which
    /// [`Bundle::empty_trash`] removes at start-up.
    pub fn delete_later(&self) -> impl FnOnce() + Send + 'static {
        unmount_rootfs(&self.path);
        let mut doomed = Vec::new();
        for dir in [&self.path, &self.work] {
            let moved = trash_dir(dir).and_then(|trash| {
                mkdir(&trash, 0o700, true).ok()?;
                let name = format!(
                    "{}-{}-{}",
                    self.namespace,
                    self.id,
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap_or_default()
                        .as_nanos()
                );
                let target = trash.join(name);
                std::fs::rename(dir, &target).ok().map(|()| target)
            });
            match moved {
                Some(target) => doomed.push(target),
                None => remove_dir(dir),
            }
        }
        move || doomed.iter().for_each(|d| remove_dir(d))
    }

    /// Removes what [`Bundle::delete_later`] left under `base` (the state or root
    /// directory of the runtime), e.g. after a crash.
    pub fn empty_trash(base: &Path) {
        remove_dir(&base.join(TRASH));
    }

    /// Unmounts the rootfs (if the shim left it mounted) and removes the bundle and the
    /// work directory. Best effort: problems are logged.
    pub fn delete(&self) {
        unmount_rootfs(&self.path);
        for dir in [&self.work, &self.path] {
            remove_dir(dir);
        }
    }
}

/// Where [`Bundle::delete_later`] moves directories: `.trash` next to the namespaces
/// (start-up skips names starting with a dot).
const TRASH: &str = ".trash";

/// `{base}/.trash` for a bundle or work directory `{base}/{ns}/{id}`.
fn trash_dir(dir: &Path) -> Option<PathBuf> {
    Some(dir.parent()?.parent()?.join(TRASH))
}

/// Lazily detaches anything still mounted on the bundle's rootfs (several layers may
/// stack).
fn unmount_rootfs(bundle: &Path) {
    let rootfs = bundle.join("rootfs");
    for _ in 0..8 {
        if nix::mount::umount2(&rootfs, nix::mount::MntFlags::MNT_DETACH).is_err() {
            break;
        }
    }
}

/// Best effort: problems are logged.
fn remove_dir(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %dir.display(), error = %e, "removing bundle directory");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_and_delete() {
        let dir = tempfile::tempdir().unwrap();
        let (state, root) = (dir.path().join("state"), dir.path().join("root"));
        let b = Bundle::create(&state, &root, "ns", "c1", b"{}").unwrap();
        assert!(b.path.join("config.json").exists());
        assert!(b.path.join("rootfs").is_dir());
        assert!(b.path.join("work").is_dir());
        let err = Bundle::create(&state, &root, "ns", "c1", b"{}").unwrap_err();
        assert!(err.is(berth_core::error::ErrorKind::AlreadyExists));
        b.delete();
        assert!(!b.path.exists() && !b.work.exists());
        // Deleting later: the ID is free at once, the directories go with the returned
        // function, and a crash's leftovers with empty_trash.
        let b = Bundle::create(&state, &root, "ns", "c1", b"{}").unwrap();
        let remove = b.delete_later();
        assert!(!b.path.exists() && !b.work.exists());
        Bundle::create(&state, &root, "ns", "c1", b"{}").unwrap();
        remove();
        assert_eq!(std::fs::read_dir(state.join(".trash")).unwrap().count(), 0);
        let left = Bundle::create(&state, &root, "ns", "c2", b"{}").unwrap();
        let _not_run = left.delete_later();
        Bundle::empty_trash(&state);
        Bundle::empty_trash(&root);
        assert!(!state.join(".trash").exists() && !root.join(".trash").exists());
        assert!(Bundle::create(&state, &root, "ns", "../x", b"{}").is_err());
    }
}
