//! File-system operations confined to a root directory, for untrusted input.
//!
//! Every path is resolved with `openat2(2)` and `RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS`
//! from a descriptor of the root: the kernel treats the root as `/` for `..` and for
//! absolute symlinks, so no component — whatever a symlink says, and even if it was
//! swapped since the last entry — can take the resolution outside. Only the *parent*
//! of an entry is resolved that way; the entry itself is then created, removed, chowned,
//! chmodded or linked with `*at` calls on that parent descriptor and a single name
//! component that is never `.`/`..`, and never followed (`O_NOFOLLOW`,
//! `AT_SYMLINK_NOFOLLOW`, or a no-follow open before an `f*` call).

use berth_core::{Error, Result};
use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
const RESOLVE_IN_ROOT: u64 = 0x10;

#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

fn cstr(bytes: &[u8]) -> Result<CString> {
    CString::new(bytes).map_err(|_| Error::invalid_argument("path contains NUL"))
}

/// A relative path inside the root, as validated name components.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RelPath(Vec<Vec<u8>>);

impl RelPath {
    /// Parses an archive name: `.` and empty components are dropped; `..` components
    /// and absolute names are refused, whatever follows them.
    pub fn parse(name: &[u8]) -> Result<RelPath> {
        let shown = || String::from_utf8_lossy(name).into_owned();
        if name.first() == Some(&b'/') {
            return Err(Error::invalid_argument(format!(
                "archive entry {:?}: absolute path not allowed",
                shown()
            )));
        }
        let mut parts = Vec::new();
        for part in name.split(|b| *b == b'/') {
            match part {
                b"" | b"." => {}
                b".." => {
                    return Err(Error::invalid_argument(format!(
                        "archive entry {:?}: path escapes the root (\"..\")",
                        shown()
                    )));
                }
                p => parts.push(p.to_vec()),
            }
        }
        Ok(RelPath(parts))
    }

    pub fn from_components(parts: Vec<Vec<u8>>) -> RelPath {
        RelPath(parts)
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    pub fn components(&self) -> &[Vec<u8>] {
        &self.0
    }

    /// The last component.
    pub fn name(&self) -> Option<&[u8]> {
        self.0.last().map(Vec::as_slice)
    }

    pub fn parent(&self) -> RelPath {
        RelPath(self.0[..self.0.len().saturating_sub(1)].to_vec())
    }

    pub fn join(&self, name: &[u8]) -> RelPath {
        let mut parts = self.0.clone();
        parts.push(name.to_vec());
        RelPath(parts)
    }

    /// `a/b/c` (`.` for the root), for resolution and messages.
    pub fn to_bytes(&self) -> Vec<u8> {
        if self.0.is_empty() {
            return b".".to_vec();
        }
        self.0.join(&b'/')
    }

    pub fn display(&self) -> String {
        String::from_utf8_lossy(&self.to_bytes()).into_owned()
    }
}

/// Called for each directory [`Root::ensure_dir`] creates: (parent fd, name, path).
pub type OnCreate<'a> = dyn FnMut(&OwnedFd, &[u8], &RelPath) -> Result<()> + 'a;

/// A directory every operation is confined to.
pub struct Root {
    fd: OwnedFd,
    path: PathBuf,
}

/// `lstat` result of an entry.
pub type Stat = libc::stat;

impl Root {
    pub fn open(path: &Path) -> Result<Root> {
        let c = cstr(path.as_os_str().as_encoded_bytes())?;
        // SAFETY: valid path; the descriptor is owned below.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(Error::unknown(format!(
                "opening root {}: {}",
                path.display(),
                errno()
            )));
        }
        Ok(Root {
            // SAFETY: fd was just returned by open.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// openat2 of `rel` in the root; the raw OS error is kept for callers to inspect.
    pub fn resolve(&self, rel: &RelPath, flags: i32) -> std::io::Result<OwnedFd> {
        let c = CString::new(rel.to_bytes()).map_err(|_| std::io::ErrorKind::InvalidInput)?;
        let how = OpenHow {
            flags: (flags | libc::O_CLOEXEC) as u64,
            mode: 0,
            resolve: RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS,
        };
        loop {
            // SAFETY: valid descriptor, path and open_how of the size passed.
            let fd = unsafe {
                libc::syscall(
                    libc::SYS_openat2,
                    self.fd.as_raw_fd(),
                    c.as_ptr(),
                    &how as *const OpenHow,
                    std::mem::size_of::<OpenHow>(),
                )
            };
            if fd >= 0 {
                // SAFETY: the kernel returned a new descriptor.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
            }
            let err = errno();
            // EAGAIN: a concurrent rename raced the resolution; retry as the man page says.
            if err.raw_os_error() != Some(libc::EAGAIN) {
                return Err(err);
            }
        }
    }

    /// The directory `rel` (following symlinks inside the root), as an `O_PATH` fd.
    pub fn dir(&self, rel: &RelPath) -> std::io::Result<OwnedFd> {
        self.resolve(rel, libc::O_PATH | libc::O_DIRECTORY)
    }

    /// Like [`Root::dir`], creating missing directories (mode 0755, or what `on_create`
    /// sets) one component at a time, each resolved in the root. A component that is a
    /// symlink to a missing directory is followed the way the kernel would resolve it in
    /// the root (absolute targets from the root, `..` clamped at the root), and the
    /// missing directories are created there — inside the root, as containerd does.
    pub fn ensure_dir(&self, rel: &RelPath, on_create: &mut OnCreate<'_>) -> Result<OwnedFd> {
        let resolve_err = |p: &RelPath, e: std::io::Error| {
            Error::unknown(format!(
                "resolving {:?} in {}: {e}",
                p.display(),
                self.path.display()
            ))
        };
        let mut path = rel.0.clone();
        'hops: for _ in 0..40 {
            let full = RelPath(path.clone());
            match self.dir(&full) {
                Ok(fd) => return Ok(fd),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(resolve_err(&full, e)),
            }
            // One component at a time from the root: each step opens a single name in
            // the directory reached so far, so a chain of D missing directories costs D
            // steps, not the D²/2 of resolving every prefix from the root (a hostile
            // layer of deep chains made that quadratic, GHSA-rp3h-jf77-q9p4's class).
            // Only a symlink is resolved through the root, as the kernel would inside it.
            let mut current = self
                .dir(&RelPath(Vec::new()))
                .map_err(|e| resolve_err(&RelPath(Vec::new()), e))?;
            // The path walked so far, grown by one component per step (rebuilding it per
            // step would be quadratic again).
            let mut prefix = RelPath(Vec::with_capacity(path.len()));
            for i in 0..path.len() {
                let name = path[i].clone();
                prefix.0.push(name.clone());
                // A plain directory: stepped into without following anything (a symlink
                // or another non-directory fails with ENOTDIR under O_DIRECTORY).
                match open_nofollow(&current, &name, libc::O_PATH | libc::O_DIRECTORY, 0) {
                    Ok(fd) => {
                        current = fd;
                        continue;
                    }
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTDIR | libc::ELOOP)) => {
                        match self.dir(&prefix) {
                            Ok(fd) => {
                                current = fd;
                                continue;
                            }
                            // A dangling symlink: mkdirat below reports EEXIST.
                            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                            Err(e) => return Err(resolve_err(&prefix, e)),
                        }
                    }
                    Err(e) => return Err(resolve_err(&prefix, e)),
                }
                match mkdirat(&current, &name, 0o755) {
                    Ok(()) => {
                        on_create(&current, &name, &prefix)?;
                        current =
                            open_nofollow(&current, &name, libc::O_PATH | libc::O_DIRECTORY, 0)
                                .map_err(|e| resolve_err(&prefix, e))?;
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                        // Exists but does not resolve: a dangling symlink. Continue
                        // from its target, resolved as the kernel would in the root.
                        let target =
                            readlinkat(&current, &name).map_err(|e| resolve_err(&prefix, e))?;
                        let mut next: Vec<Vec<u8>> = if target.first() == Some(&b'/') {
                            Vec::new()
                        } else {
                            path[..i].to_vec()
                        };
                        for part in target.split(|b| *b == b'/') {
                            match part {
                                b"" | b"." => {}
                                b".." => {
                                    next.pop();
                                }
                                p => next.push(p.to_vec()),
                            }
                        }
                        next.extend_from_slice(&path[i + 1..]);
                        path = next;
                        continue 'hops;
                    }
                    Err(e) => {
                        return Err(Error::unknown(format!("mkdir {:?}: {e}", prefix.display())));
                    }
                }
            }
            return Ok(current);
        }
        Err(Error::invalid_argument(format!(
            "resolving {:?}: too many levels of symbolic links",
            rel.display()
        )))
    }
}

/// The target of the symlink `name` in `dir`.
pub fn readlinkat(dir: &OwnedFd, name: &[u8]) -> std::io::Result<Vec<u8>> {
    let c = CString::new(name).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: valid fd, name and buffer.
    let n = unsafe {
        libc::readlinkat(
            dir.as_raw_fd(),
            c.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(errno());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

pub fn lstatat(dir: &OwnedFd, name: &[u8]) -> std::io::Result<Option<Stat>> {
    let c = CString::new(name).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    // SAFETY: zeroed stat is a valid out-parameter.
    let mut st: Stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd, name and out-parameter.
    let rc = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            c.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc == 0 {
        return Ok(Some(st));
    }
    let err = errno();
    if err.raw_os_error() == Some(libc::ENOENT) {
        return Ok(None);
    }
    Err(err)
}

pub fn is_dir(st: &Stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

pub fn mkdirat(dir: &OwnedFd, name: &[u8], mode: u32) -> std::io::Result<()> {
    let c = CString::new(name).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    // SAFETY: valid fd and name.
    if unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), mode) } != 0 {
        return Err(errno());
    }
    Ok(())
}

/// Opens `name` in `dir` without following it (it may not be a symlink).
pub fn open_nofollow(
    dir: &OwnedFd,
    name: &[u8],
    flags: i32,
    mode: u32,
) -> std::io::Result<OwnedFd> {
    let c = CString::new(name).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    // SAFETY: valid fd and name.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            mode,
        )
    };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: new descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Removes `name` in `dir` and, if it is a directory, everything below it; a missing
/// entry is not an error. Nothing is followed.
pub fn remove_all_at(dir: &OwnedFd, name: &[u8]) -> std::io::Result<()> {
    let c = CString::new(name).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    // SAFETY: valid fd and name.
    if unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    let err = errno();
    match err.raw_os_error() {
        Some(libc::ENOENT) => return Ok(()),
        Some(libc::EISDIR) | Some(libc::EPERM) => {}
        _ => return Err(err),
    }
    let sub = open_nofollow(dir, name, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    for child in read_dir_names(&sub)? {
        remove_all_at(&sub, &child)?;
    }
    // SAFETY: valid fd and name.
    if unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), libc::AT_REMOVEDIR) } != 0 {
        let err = errno();
        if err.raw_os_error() != Some(libc::ENOENT) {
            return Err(err);
        }
    }
    Ok(())
}

/// The names in directory `dir` (an fd opened for reading), without `.` and `..`.
pub fn read_dir_names(dir: &OwnedFd) -> std::io::Result<Vec<Vec<u8>>> {
    // SAFETY: dup gives fdopendir its own descriptor, closed by closedir.
    let dup = unsafe { libc::fcntl(dir.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return Err(errno());
    }
    // SAFETY: dup is a directory descriptor we own.
    let dirp = unsafe { libc::fdopendir(dup) };
    if dirp.is_null() {
        let err = errno();
        unsafe { libc::close(dup) };
        return Err(err);
    }
    // SAFETY: rewind so a reused descriptor lists from the start.
    unsafe { libc::rewinddir(dirp) };
    let mut names = Vec::new();
    loop {
        // SAFETY: dirp is valid until closedir.
        let entry = unsafe { libc::readdir(dirp) };
        if entry.is_null() {
            break;
        }
        // SAFETY: d_name is NUL-terminated.
        let name = unsafe { CStr::from_ptr((*entry).d_name.as_ptr()) }.to_bytes();
        if name != b"." && name != b".." {
            names.push(name.to_vec());
        }
    }
    // SAFETY: closes dirp and dup.
    unsafe { libc::closedir(dirp) };
    Ok(names)
}

/// Path of `name` under `dir` through `/proc/self/fd` (for the few calls without an
/// `*at` form, e.g. `lsetxattr`); the final component is still not followed by `l*`
/// calls.
pub fn proc_path(dir: &OwnedFd, name: &[u8]) -> Result<CString> {
    let mut p = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    p.extend_from_slice(name);
    cstr(&p)
}
