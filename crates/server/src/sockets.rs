//! Unix sockets the way containerd makes them: path-based (never abstract), mode 0660,
//! owned by the configured uid/gid, a stale socket file replaced.

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// `sun_path` holds 108 bytes including the terminating NUL.
pub const MAX_SOCKET_PATH: usize = 107;

/// The file path of a socket address (`unix://` prefix accepted); abstract addresses
/// (`@name`, or a leading NUL) are refused: anyone in the network namespace could bind
/// them first.
pub fn socket_path(address: &str) -> io::Result<PathBuf> {
    let path = address.strip_prefix("unix://").unwrap_or(address);
    if path.starts_with('@') || path.starts_with('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("abstract socket address {address:?} is not supported; use a file path"),
        ));
    }
    if path.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket address is empty",
        ));
    }
    if path.len() > MAX_SOCKET_PATH {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "socket path {path:?} is too long ({} bytes, at most {MAX_SOCKET_PATH})",
                path.len()
            ),
        ));
    }
    Ok(PathBuf::from(path))
}

/// Binds a listening socket at `address`, mode 0660, owned by `uid:gid`.
///
/// The socket is bound under a temporary name, given its mode and owner, then renamed
/// into place, so it is never reachable with the umask's looser mode. A socket file left
/// by a daemon that died is replaced; one that still answers is an error (two daemons on
/// one socket would steal each other's clients).
pub fn listen(address: &str, uid: u32, gid: u32) -> io::Result<(UnixListener, PathBuf)> {
    let path = socket_path(address)?;
    let context = |what: &str, e: io::Error| {
        io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
        && !parent.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o770)
            .create(parent)
            .map_err(|e| context("creating the directory of", e))?;
        std::os::unix::fs::chown(parent, Some(uid), Some(gid))
            .map_err(|e| context("changing the owner of the directory of", e))?;
    }
    remove_stale(&path)?;

    let mut temporary = path.clone().into_os_string();
    temporary.push("~");
    let temporary = PathBuf::from(temporary);
    let bind_path = if temporary.as_os_str().len() <= MAX_SOCKET_PATH {
        let _ = std::fs::remove_file(&temporary);
        &temporary
    } else {
        &path
    };
    let listener = UnixListener::bind(bind_path).map_err(|e| context("binding", e))?;
    let finish = || -> io::Result<()> {
        std::fs::set_permissions(bind_path, std::fs::Permissions::from_mode(0o660))?;
        std::os::unix::fs::chown(bind_path, Some(uid), Some(gid))?;
        if bind_path != &path {
            std::fs::rename(bind_path, &path)?;
        }
        Ok(())
    };
    if let Err(e) = finish() {
        let _ = std::fs::remove_file(bind_path);
        return Err(context("setting up", e));
    }
    Ok((listener, path))
}

fn remove_stale(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "another daemon is serving on {}; stop it first",
                        path.display()
                    ),
                ));
            }
            std::fs::remove_file(path)
        }
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn socket_has_mode_0660_and_replaces_a_stale_one() {
        let dir = tempfile::tempdir().unwrap();
        let address = dir.path().join("s.sock");
        let address = address.to_str().unwrap();
        let (listener, path) = listen(address, 0, 0).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o660);
        assert!(meta.file_type().is_socket());

        // Still served: refused.
        let err = listen(address, 0, 0).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        // Stale (nobody accepts any more): replaced.
        drop(listener);
        let (_listener, _) = listen(address, 0, 0).unwrap();
    }

    #[test]
    fn abstract_and_long_addresses_are_refused() {
        assert!(socket_path("@berth").is_err());
        assert!(socket_path(&format!("/tmp/{}", "x".repeat(120))).is_err());
        assert_eq!(
            socket_path("unix:///run/b.sock").unwrap(),
            PathBuf::from("/run/b.sock")
        );
    }

    #[test]
    fn regular_files_are_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "x").unwrap();
        assert!(listen(path.to_str().unwrap(), 0, 0).is_err());
    }
}
