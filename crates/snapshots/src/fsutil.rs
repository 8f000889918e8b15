//! File-system helpers of the local snapshotters: disk usage (containerd's
//! `fs.DiskUsage`: allocated blocks, hard links counted once) and a metadata-preserving
//! tree copy that clones file data with `FICLONE` (reflink) where the file system can.

use berth_core::snapshot::Usage;
use berth_core::{Error, Result};
use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

fn io_err(what: &str, path: &Path, err: std::io::Error) -> Error {
    Error::unknown(format!("{what} {}: {err}", path.display()))
}

fn last_err(what: &str, path: &Path) -> Error {
    io_err(what, path, std::io::Error::last_os_error())
}

fn cpath(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::invalid_argument(format!("path {} contains NUL", path.display())))
}

/// Usage of the tree at `root`: inodes and allocated bytes, each inode once.
pub fn disk_usage(root: &Path) -> Result<Usage> {
    let mut seen = HashSet::new();
    let mut usage = Usage::default();
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = fs::symlink_metadata(&path).map_err(|e| io_err("stat", &path, e))?;
        if seen.insert((meta.dev(), meta.ino())) {
            usage.inodes += 1;
            usage.size += (meta.blocks() * 512) as i64;
        }
        if meta.is_dir() {
            for entry in fs::read_dir(&path).map_err(|e| io_err("read dir", &path, e))? {
                let entry = entry.map_err(|e| io_err("read dir", &path, e))?;
                stack.push(entry.path());
            }
        }
    }
    Ok(usage)
}

/// Lists the extended attributes of `path` (not following symlinks).
pub fn list_xattrs(path: &Path) -> Result<Vec<(CString, Vec<u8>)>> {
    let p = cpath(path)?;
    let mut names = vec![0u8; 1024];
    let len = loop {
        // SAFETY: the buffer is valid for its length.
        let n = unsafe { libc::llistxattr(p.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
        if n >= 0 {
            break n as usize;
        }
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::ERANGE) => names.resize(names.len() * 4, 0),
            Some(libc::ENOTSUP) => return Ok(Vec::new()),
            _ => return Err(last_err("listxattr", path)),
        }
    };
    let mut out = Vec::new();
    for name in names[..len].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let name = CString::new(name).expect("split at NUL");
        let mut value = vec![0u8; 256];
        loop {
            // SAFETY: the buffer is valid for its length.
            let n = unsafe {
                libc::lgetxattr(
                    p.as_ptr(),
                    name.as_ptr(),
                    value.as_mut_ptr().cast(),
                    value.len(),
                )
            };
            if n >= 0 {
                value.truncate(n as usize);
                break;
            }
            match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::ERANGE) => value.resize(value.len() * 4, 0),
                Some(libc::ENODATA) => {
                    value.clear();
                    break;
                }
                _ => return Err(last_err("getxattr", path)),
            }
        }
        out.push((name, value));
    }
    Ok(out)
}

fn copy_xattrs(src: &Path, dst: &Path) -> Result<()> {
    let d = cpath(dst)?;
    for (name, value) in list_xattrs(src)? {
        // SAFETY: valid strings and buffer.
        let rc = unsafe {
            libc::lsetxattr(
                d.as_ptr(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            // Xattrs the destination cannot hold (a namespace it does not support) are
            // skipped, as continuity's copier does for ENOTSUP.
            if err.raw_os_error() != Some(libc::ENOTSUP) {
                return Err(io_err("setxattr", dst, err));
            }
        }
    }
    Ok(())
}

fn set_times(path: &Path, meta: &fs::Metadata) -> Result<()> {
    let p = cpath(path)?;
    let times = [
        libc::timespec {
            tv_sec: meta.atime(),
            tv_nsec: meta.atime_nsec(),
        },
        libc::timespec {
            tv_sec: meta.mtime(),
            tv_nsec: meta.mtime_nsec(),
        },
    ];
    // SAFETY: valid path and two timespecs.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            p.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(last_err("utimensat", path));
    }
    Ok(())
}

fn lchown(path: &Path, uid: u32, gid: u32) -> Result<()> {
    let p = cpath(path)?;
    // SAFETY: valid path.
    if unsafe { libc::lchown(p.as_ptr(), uid, gid) } != 0 {
        return Err(last_err("lchown", path));
    }
    Ok(())
}

/// Copies file data, cloning the extents (`FICLONE`) when the file system supports it.
pub fn copy_file_data(src: &Path, dst: &Path, mode: u32) -> Result<()> {
    let input = File::open(src).map_err(|e| io_err("open", src, e))?;
    let mut output = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode_compat(mode)
        .open(dst)
        .map_err(|e| io_err("create", dst, e))?;
    const FICLONE: libc::c_ulong = 0x4004_9409;
    // SAFETY: both descriptors are open for the duration of the call.
    let rc = unsafe { libc::ioctl(output.as_raw_fd(), FICLONE as _, input.as_raw_fd()) };
    if rc == 0 {
        return Ok(());
    }
    let mut input = input;
    std::io::copy(&mut input, &mut output).map_err(|e| io_err("copy", dst, e))?;
    Ok(())
}

trait ModeCompat {
    fn mode_compat(&mut self, mode: u32) -> &mut Self;
}

impl ModeCompat for fs::OpenOptions {
    fn mode_compat(&mut self, mode: u32) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.mode(mode & 0o7777)
    }
}

fn mknod(path: &Path, mode: u32, rdev: u64) -> Result<()> {
    let p = cpath(path)?;
    // SAFETY: valid path.
    if unsafe { libc::mknod(p.as_ptr(), mode, rdev) } != 0 {
        return Err(last_err("mknod", path));
    }
    Ok(())
}

/// Copies the tree `src` into the existing directory `dst`, keeping owners, modes,
/// times, xattrs, hard links, symlinks and device nodes.
pub fn copy_dir(src: &Path, dst: &Path) -> Result<()> {
    let mut links: HashMap<(u64, u64), std::path::PathBuf> = HashMap::new();
    let mut dirs = Vec::new();
    copy_tree(src, dst, &mut links, &mut dirs)?;
    // Directory times last: creating entries changes them.
    for (path, meta) in dirs.iter().rev() {
        set_times(path, meta)?;
    }
    Ok(())
}

fn copy_tree(
    src: &Path,
    dst: &Path,
    links: &mut HashMap<(u64, u64), std::path::PathBuf>,
    dirs: &mut Vec<(std::path::PathBuf, fs::Metadata)>,
) -> Result<()> {
    let meta = fs::symlink_metadata(src).map_err(|e| io_err("stat", src, e))?;
    lchown(dst, meta.uid(), meta.gid())?;
    fs::set_permissions(dst, fs::Permissions::from_mode(meta.mode() & 0o7777))
        .map_err(|e| io_err("chmod", dst, e))?;
    copy_xattrs(src, dst)?;
    dirs.push((dst.to_path_buf(), meta));
    for entry in fs::read_dir(src).map_err(|e| io_err("read dir", src, e))? {
        let entry = entry.map_err(|e| io_err("read dir", src, e))?;
        let from = entry.path();
        let to = dst.join(entry.file_name());
        let meta = fs::symlink_metadata(&from).map_err(|e| io_err("stat", &from, e))?;
        let ft = meta.file_type();
        if ft.is_dir() {
            fs::create_dir(&to).map_err(|e| io_err("mkdir", &to, e))?;
            copy_tree(&from, &to, links, dirs)?;
            continue;
        }
        if meta.nlink() > 1 {
            if let Some(first) = links.get(&(meta.dev(), meta.ino())) {
                fs::hard_link(first, &to).map_err(|e| io_err("link", &to, e))?;
                continue;
            }
            links.insert((meta.dev(), meta.ino()), to.clone());
        }
        if ft.is_symlink() {
            let target = fs::read_link(&from).map_err(|e| io_err("readlink", &from, e))?;
            std::os::unix::fs::symlink(&target, &to).map_err(|e| io_err("symlink", &to, e))?;
        } else if ft.is_file() {
            copy_file_data(&from, &to, meta.mode())?;
        } else if ft.is_char_device() || ft.is_block_device() || ft.is_fifo() || ft.is_socket() {
            mknod(&to, meta.mode(), meta.rdev())?;
        }
        lchown(&to, meta.uid(), meta.gid())?;
        if !ft.is_symlink() {
            fs::set_permissions(&to, fs::Permissions::from_mode(meta.mode() & 0o7777))
                .map_err(|e| io_err("chmod", &to, e))?;
        }
        copy_xattrs(&from, &to)?;
        set_times(&to, &meta)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_keeps_links_modes_and_times() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        let s = src.path();
        fs::create_dir(s.join("d")).unwrap();
        fs::write(s.join("d/f"), b"hello").unwrap();
        fs::set_permissions(s.join("d/f"), fs::Permissions::from_mode(0o640)).unwrap();
        fs::hard_link(s.join("d/f"), s.join("h")).unwrap();
        std::os::unix::fs::symlink("d/f", s.join("l")).unwrap();
        copy_dir(s, dst.path()).unwrap();
        let d = dst.path();
        assert_eq!(fs::read(d.join("d/f")).unwrap(), b"hello");
        let m = fs::metadata(d.join("d/f")).unwrap();
        assert_eq!(m.mode() & 0o777, 0o640);
        assert_eq!(m.ino(), fs::metadata(d.join("h")).unwrap().ino());
        assert_eq!(fs::read_link(d.join("l")).unwrap(), Path::new("d/f"));
        assert_eq!(
            fs::symlink_metadata(s.join("d")).unwrap().mtime(),
            fs::symlink_metadata(d.join("d")).unwrap().mtime()
        );
        let u = disk_usage(d).unwrap();
        assert_eq!(u.inodes, 4);
    }
}
