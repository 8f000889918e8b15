//! Performing the mounts snapshotters describe (containerd's `mount` package, Linux).
//!
//! - fstab-style options become `mount(2)` flags; the rest is the data string;
//! - `bind` + `ro` is a bind followed by a read-only remount (the kernel ignores
//!   `MS_RDONLY` on the first bind);
//! - **long overlay options**: when the options of an `overlay` mount come near a page
//!   (the kernel's limit for the data string), the lowerdirs are rewritten relative to
//!   their common parent directory and the mount is made by a forked child that first
//!   `chdir`s there, as containerd does. A forked child is used because the working
//!   directory is per process and the daemon is multi-threaded; the child only calls
//!   `chdir`, `mount` and `_exit` with strings prepared before the fork.

use berth_core::mount::Mount;
use berth_core::{Error, Result};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size <= 0 { 4096 } else { size as usize }
}

fn cstring(s: impl AsRef<[u8]>) -> Result<CString> {
    CString::new(s.as_ref()).map_err(|_| Error::invalid_argument("mount argument contains NUL"))
}

fn errno_error(what: impl std::fmt::Display) -> Error {
    let err = std::io::Error::last_os_error();
    Error::unknown(format!("{what}: {err}"))
}

/// Mount flags and data parsed from fstab-style options.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ParsedOptions {
    pub flags: libc::c_ulong,
    pub propagation: libc::c_ulong,
    pub data: Vec<String>,
}

/// containerd's `parseMountOptions`: known flag words set or clear flags; every other
/// option goes to the data string.
pub fn parse_options(options: &[String]) -> ParsedOptions {
    let mut parsed = ParsedOptions::default();
    for option in options {
        let (clear, flag): (bool, libc::c_ulong) = match option.as_str() {
            "async" => (true, libc::MS_SYNCHRONOUS),
            "atime" => (true, libc::MS_NOATIME),
            "bind" => (false, libc::MS_BIND),
            "defaults" => (false, 0),
            "dev" => (true, libc::MS_NODEV),
            "diratime" => (true, libc::MS_NODIRATIME),
            "dirsync" => (false, libc::MS_DIRSYNC),
            "exec" => (true, libc::MS_NOEXEC),
            "mand" => (false, libc::MS_MANDLOCK),
            "noatime" => (false, libc::MS_NOATIME),
            "nodev" => (false, libc::MS_NODEV),
            "nodiratime" => (false, libc::MS_NODIRATIME),
            "noexec" => (false, libc::MS_NOEXEC),
            "nomand" => (true, libc::MS_MANDLOCK),
            "norelatime" => (true, libc::MS_RELATIME),
            "nostrictatime" => (true, libc::MS_STRICTATIME),
            "nosuid" => (false, libc::MS_NOSUID),
            "rbind" => (false, libc::MS_BIND | libc::MS_REC),
            "relatime" => (false, libc::MS_RELATIME),
            "remount" => (false, libc::MS_REMOUNT),
            "ro" => (false, libc::MS_RDONLY),
            "rw" => (true, libc::MS_RDONLY),
            "strictatime" => (false, libc::MS_STRICTATIME),
            "suid" => (true, libc::MS_NOSUID),
            "sync" => (false, libc::MS_SYNCHRONOUS),
            "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave" | "unbindable"
            | "runbindable" => {
                let (rec, flag) = match option.trim_start_matches('r') {
                    "private" => (option.starts_with('r'), libc::MS_PRIVATE),
                    "shared" => (option.starts_with('r'), libc::MS_SHARED),
                    "slave" => (option.starts_with('r'), libc::MS_SLAVE),
                    _ => (option.starts_with('r'), libc::MS_UNBINDABLE),
                };
                parsed.propagation |= flag | if rec { libc::MS_REC } else { 0 };
                continue;
            }
            _ => {
                parsed.data.push(option.clone());
                continue;
            }
        };
        if clear {
            parsed.flags &= !flag;
        } else {
            parsed.flags |= flag;
        }
    }
    parsed
}

fn longest_common_dir(dirs: &[&str]) -> Option<String> {
    let first = dirs.first()?;
    let mut prefix_len = first.len();
    for dir in &dirs[1..] {
        prefix_len = first
            .bytes()
            .zip(dir.bytes())
            .take(prefix_len)
            .take_while(|(a, b)| a == b)
            .count();
    }
    let prefix = &first[..prefix_len];
    // Back up to a whole directory (IDs are digits: `snapshots/1` and `snapshots/12`
    // share `snapshots/1`), as containerd's `path.Dir` does.
    let dir = match prefix.strip_suffix('/') {
        Some(dir) => dir,
        None => Path::new(prefix).parent()?.to_str()?,
    };
    if dir.is_empty() || dir == "/" {
        return None;
    }
    Some(format!("{dir}/"))
}

/// Rewrites `lowerdir=` relative to the lowerdirs' common directory; returns that
/// directory and the new options, or `None` when nothing can be compacted.
pub fn compact_lowerdir(options: &[String]) -> Option<(PathBuf, Vec<String>)> {
    let idx = options.iter().position(|o| o.starts_with("lowerdir="))?;
    let dirs: Vec<&str> = options[idx]["lowerdir=".len()..].split(':').collect();
    if dirs.len() < 2 {
        return None;
    }
    let common = longest_common_dir(&dirs)?;
    let relative: Vec<&str> = dirs.iter().map(|d| &d[common.len()..]).collect();
    let mut out: Vec<String> = options.to_vec();
    out.remove(idx);
    out.push(format!("lowerdir={}", relative.join(":")));
    Some((PathBuf::from(common), out))
}

fn raw_mount(
    source: &CString,
    target: &CString,
    fstype: &CString,
    flags: libc::c_ulong,
    data: &CString,
) -> Result<()> {
    // SAFETY: all pointers are valid NUL-terminated strings for the call's duration.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr() as *const libc::c_void,
        )
    };
    if rc != 0 {
        return Err(errno_error(format!(
            "mount {:?} on {:?} (type {:?})",
            source, target, fstype
        )));
    }
    Ok(())
}

/// mount(2) from a forked child whose working directory is `dir`.
fn mount_in_dir(
    dir: &CString,
    source: &CString,
    target: &CString,
    fstype: &CString,
    flags: libc::c_ulong,
    data: &CString,
) -> Result<()> {
    // SAFETY: the child only makes async-signal-safe calls (chdir, mount, _exit) with
    // pointers prepared before the fork, and never returns into Rust code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(errno_error("fork for mount"));
    }
    if pid == 0 {
        unsafe {
            if libc::chdir(dir.as_ptr()) != 0 {
                libc::_exit(*libc::__errno_location() & 0x7f | 0x80);
            }
            let rc = libc::mount(
                source.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                flags,
                data.as_ptr() as *const libc::c_void,
            );
            if rc != 0 {
                libc::_exit(*libc::__errno_location() & 0x7f);
            }
            libc::_exit(0);
        }
    }
    let mut status = 0;
    loop {
        // SAFETY: waiting on our own child.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        if rc == pid {
            break;
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return Err(errno_error("waiting for mount child"));
        }
    }
    if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
        return Ok(());
    }
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        0
    };
    let what = if code & 0x80 != 0 { "chdir" } else { "mount" };
    Err(Error::unknown(format!(
        "mount {source:?} on {target:?} (type {fstype:?}, in {dir:?}): {what}: {}",
        std::io::Error::from_raw_os_error(code & 0x7f)
    )))
}

/// Mounts `m` on `target` (an existing directory).
pub fn mount(m: &Mount, target: &Path) -> Result<()> {
    let mut options = m.options.clone();
    let mut chdir = None;
    let size: usize = options.iter().map(|o| o.len() + 1).sum();
    if m.r#type == "overlay"
        && size >= page_size() - 512
        && let Some((dir, compacted)) = compact_lowerdir(&options)
    {
        chdir = Some(dir);
        options = compacted;
    }
    let parsed = parse_options(&options);
    let data = parsed.data.join(",");
    if data.len() > page_size() {
        return Err(Error::invalid_argument(format!(
            "mount options of {} are too long ({} bytes)",
            m.source,
            data.len()
        )));
    }
    let target_c = cstring(target.as_os_str().as_bytes())?;
    let source_c = cstring(&m.source)?;
    let fstype_c = cstring(&m.r#type)?;
    let data_c = cstring(&data)?;
    let flags = parsed.flags;
    if flags & libc::MS_REMOUNT == 0 || !data.is_empty() {
        match &chdir {
            Some(dir) => mount_in_dir(
                &cstring(dir.as_os_str().as_bytes())?,
                &source_c,
                &target_c,
                &fstype_c,
                flags,
                &data_c,
            )?,
            None => raw_mount(&source_c, &target_c, &fstype_c, flags, &data_c)?,
        }
    }
    let empty = cstring("")?;
    if parsed.propagation != 0 {
        raw_mount(
            &empty,
            &target_c,
            &empty,
            parsed.propagation | libc::MS_SILENT,
            &empty,
        )?;
    }
    let bind_ro = libc::MS_BIND | libc::MS_RDONLY;
    if flags & bind_ro == bind_ro {
        raw_mount(&empty, &target_c, &empty, flags | libc::MS_REMOUNT, &empty)?;
    }
    Ok(())
}

/// Mounts every mount on `target` in order (later ones stack on earlier ones); on
/// failure the ones already mounted are unmounted again.
pub fn mount_all(mounts: &[Mount], target: &Path) -> Result<()> {
    for (i, m) in mounts.iter().enumerate() {
        let dest = if m.target.is_empty() {
            target.to_path_buf()
        } else {
            target.join(m.target.trim_start_matches('/'))
        };
        if let Err(err) = mount(m, &dest) {
            if i > 0 {
                let _ = unmount_all(target);
            }
            return Err(err);
        }
    }
    Ok(())
}

/// Unmounts `target` once; "not mounted" is success.
pub fn unmount(target: &Path, flags: libc::c_int) -> Result<()> {
    let target_c = cstring(target.as_os_str().as_bytes())?;
    for _ in 0..50 {
        // SAFETY: valid NUL-terminated path.
        let rc = unsafe { libc::umount2(target_c.as_ptr(), flags) };
        if rc == 0 {
            return Ok(());
        }
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::EINVAL) | Some(libc::ENOENT) => return Ok(()),
            Some(libc::EBUSY) => std::thread::sleep(std::time::Duration::from_millis(50)),
            _ => return Err(errno_error(format!("unmount {}", target.display()))),
        }
    }
    Err(Error::unknown(format!(
        "unmount {}: device or resource busy",
        target.display()
    )))
}

fn is_mount_point(target: &Path) -> bool {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let Some(target) = target.to_str() else {
        return false;
    };
    mountinfo
        .lines()
        .any(|line| line.split(' ').nth(4).map(unescape_mountinfo).as_deref() == Some(target))
}

fn unescape_mountinfo(field: &str) -> String {
    let mut out = String::new();
    let bytes = field.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 4 <= bytes.len()
            && let Ok(v) = u8::from_str_radix(&field[i + 1..i + 4], 8)
        {
            out.push(v as char);
            i += 4;
            continue;
        }
        out.push(bytes[i] as char);
        i += 1;
    }
    out
}

/// Unmounts everything stacked on `target`.
pub fn unmount_all(target: &Path) -> Result<()> {
    for _ in 0..64 {
        if !is_mount_point(target) {
            return Ok(());
        }
        unmount(target, 0)?;
    }
    Ok(())
}

/// A directory with the mounts of a snapshot on it, unmounted and removed on drop.
pub struct TempMount {
    dir: PathBuf,
    mounted: bool,
}

impl TempMount {
    /// Mounts `mounts` on a fresh directory under `parent` (created if missing).
    pub fn new(mounts: &[Mount], parent: &Path, readonly: bool) -> Result<TempMount> {
        std::fs::create_dir_all(parent)?;
        let dir = tempdir_in(parent)?;
        let mounts: Vec<Mount> = if readonly {
            mounts
                .iter()
                .map(|m| {
                    let mut m = m.clone();
                    m.options.retain(|o| o != "rw");
                    if m.r#type == "overlay" {
                        // A read-only overlay needs no upper/work dir: the upper becomes
                        // the top lower.
                        let upper = m.option("upperdir").map(str::to_string);
                        m.options
                            .retain(|o| !o.starts_with("upperdir=") && !o.starts_with("workdir="));
                        if let Some(upper) = upper {
                            for o in m.options.iter_mut() {
                                if let Some(lower) = o.strip_prefix("lowerdir=") {
                                    *o = format!("lowerdir={upper}:{lower}");
                                }
                            }
                        }
                    }
                    m.options.push("ro".into());
                    m
                })
                .collect()
        } else {
            mounts.to_vec()
        };
        let mut tm = TempMount {
            dir,
            mounted: false,
        };
        mount_all(&mounts, &tm.dir)?;
        tm.mounted = true;
        Ok(tm)
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Unmounts and removes the directory, reporting errors (drop ignores them).
    pub fn close(mut self) -> Result<()> {
        self.release()
    }

    fn release(&mut self) -> Result<()> {
        if self.mounted {
            unmount_all(&self.dir)?;
            self.mounted = false;
        }
        match std::fs::remove_dir(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

impl Drop for TempMount {
    fn drop(&mut self) {
        if let Err(err) = self.release() {
            tracing::warn!(dir = %self.dir.display(), error = %err, "leaving temporary mount");
        }
    }
}

/// Creates a uniquely named private directory in `parent`.
pub fn tempdir_in(parent: &Path) -> Result<PathBuf> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    for _ in 0..100 {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = parent.join(format!("m-{}-{n}-{nanos:x}", std::process::id()));
        match std::fs::create_dir(&dir) {
            Ok(()) => {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
                return Ok(dir);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::unknown(format!(
        "cannot create a directory in {}",
        parent.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_into_flags_and_data() {
        let opts: Vec<String> = ["ro", "rbind", "nosuid", "lowerdir=/a", "rprivate"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let p = parse_options(&opts);
        assert_eq!(
            p.flags,
            libc::MS_RDONLY | libc::MS_BIND | libc::MS_REC | libc::MS_NOSUID
        );
        assert_eq!(p.data, vec!["lowerdir=/a".to_string()]);
        assert_eq!(p.propagation, libc::MS_PRIVATE | libc::MS_REC);
        let p = parse_options(&["ro".to_string(), "rw".to_string()]);
        assert_eq!(p.flags, 0);
    }

    #[test]
    fn lowerdirs_compact_to_their_common_parent() {
        let opts = vec![
            "workdir=/r/snapshots/13/work".to_string(),
            "lowerdir=/r/snapshots/12/fs:/r/snapshots/1/fs".to_string(),
        ];
        let (dir, out) = compact_lowerdir(&opts).unwrap();
        assert_eq!(dir, PathBuf::from("/r/snapshots/"));
        assert_eq!(out[1], "lowerdir=12/fs:1/fs");
        assert_eq!(out[0], opts[0]);
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
    }
}
