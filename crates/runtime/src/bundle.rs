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

    /// Unmounts the rootfs (if the shim left it mounted) and removes the bundle and the
    /// work directory. Best effort: problems are logged.
    pub fn delete(&self) {
        let rootfs = self.path.join("rootfs");
        // Lazily detach anything still mounted (several layers may stack).
        for _ in 0..8 {
            if nix::mount::umount2(&rootfs, nix::mount::MntFlags::MNT_DETACH).is_err() {
                break;
            }
        }
        for dir in [&self.work, &self.path] {
            if let Err(e) = std::fs::remove_dir_all(dir)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(path = %dir.display(), error = %e, "removing bundle directory");
            }
        }
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
        assert!(Bundle::create(&state, &root, "ns", "../x", b"{}").is_err());
    }
}
