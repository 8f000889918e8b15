//! Applying a layer tar to a directory, confined to it (see [`crate::confined`]).
//!
//! Handles regular files, directories, symlinks, hard links, character and block
//! devices and FIFOs; owners, modes (setuid/setgid/sticky included), PAX xattrs
//! (`SCHILY.xattr.*`) and access/modification times (directories last). Whiteouts
//! (`.wh.<name>`, opaque `.wh..wh..opq`) are either applied (the named entry is removed;
//! an opaque directory loses what earlier layers put in it) or, for an overlay upper
//! directory, translated (a 0/0 character device; `trusted.overlay.opaque=y`, or
//! `user.overlay.opaque` with `userxattr`).
//!
//! The archive is read in *raw* mode: GNU long names/links and PAX headers are parsed
//! here with bounded sizes instead of being read into memory whole.

use crate::confined::{self, RelPath, Root};
use berth_core::{Error, Result};
use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};

/// Longest GNU long name / long link accepted.
pub const MAX_LONG_NAME: u64 = 64 * 1024;
/// Largest PAX extended header accepted (Go's archive/tar uses the same 1 MiB).
pub const MAX_PAX_SIZE: u64 = 1024 * 1024;

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const WHITEOUT_OPAQUE: &[u8] = b".wh..wh..opq";

/// How whiteouts are handled.
#[derive(Debug, Clone, Default)]
pub enum Whiteouts {
    /// Remove what they name (the target is the whole file system of the snapshot).
    #[default]
    Apply,
    /// Write overlay whiteouts into an upper directory whose lower layers are `lowers`
    /// (nearest first; missing parent directories copy their owner/mode/times).
    Overlay {
        lowers: Vec<std::path::PathBuf>,
        userxattr: bool,
    },
}

#[derive(Debug, Clone, Default)]
pub struct ApplyOptions {
    pub whiteouts: Whiteouts,
}

/// What an apply did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub entries: u64,
    pub bytes: u64,
}

#[derive(Default)]
struct Extensions {
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax: HashMap<String, Vec<u8>>,
}

fn bad(msg: impl Into<String>) -> Error {
    Error::invalid_argument(msg.into())
}

fn read_bounded(entry: &mut impl Read, size: u64, max: u64, what: &str) -> Result<Vec<u8>> {
    if size > max {
        return Err(bad(format!(
            "archive {what} header of {size} bytes exceeds the limit of {max} bytes"
        )));
    }
    let mut buf = Vec::with_capacity(size as usize);
    entry
        .take(size)
        .read_to_end(&mut buf)
        .map_err(|e| bad(format!("reading archive {what} header: {e}")))?;
    Ok(buf)
}

fn parse_pax(data: &[u8], out: &mut HashMap<String, Vec<u8>>) -> Result<()> {
    let mut rest = data;
    while !rest.is_empty() {
        let space = rest
            .iter()
            .position(|b| *b == b' ')
            .ok_or_else(|| bad("malformed PAX record"))?;
        let len: usize = std::str::from_utf8(&rest[..space])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("malformed PAX record length"))?;
        if len <= space + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err(bad("malformed PAX record"));
        }
        let record = &rest[space + 1..len - 1];
        let eq = record
            .iter()
            .position(|b| *b == b'=')
            .ok_or_else(|| bad("malformed PAX record"))?;
        let key = String::from_utf8_lossy(&record[..eq]).into_owned();
        out.insert(key, record[eq + 1..].to_vec());
        rest = &rest[len..];
    }
    Ok(())
}

fn pax_number(pax: &HashMap<String, Vec<u8>>, key: &str) -> Option<u64> {
    std::str::from_utf8(pax.get(key)?).ok()?.parse().ok()
}

fn pax_time(pax: &HashMap<String, Vec<u8>>, key: &str) -> Option<libc::timespec> {
    let s = std::str::from_utf8(pax.get(key)?).ok()?;
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = secs.parse().ok()?;
    let mut nanos = 0i64;
    for (i, c) in frac.chars().take(9).enumerate() {
        nanos += c.to_digit(10)? as i64 * 10i64.pow(8 - i as u32);
    }
    Some(libc::timespec {
        tv_sec: secs,
        tv_nsec: nanos,
    })
}

fn io_err(what: &str, path: &RelPath, err: std::io::Error) -> Error {
    Error::unknown(format!("{what} {:?}: {err}", path.display()))
}

fn last_err() -> std::io::Error {
    std::io::Error::last_os_error()
}

fn cname(name: &[u8]) -> Result<CString> {
    CString::new(name).map_err(|_| bad("archive name contains NUL"))
}

struct Applier<'a> {
    root: &'a Root,
    options: &'a ApplyOptions,
    lowers: Vec<Root>,
    /// Paths written by this layer (an opaque directory keeps them).
    written: HashSet<RelPath>,
    /// Directories whose times are set at the end.
    dir_times: Vec<(RelPath, [libc::timespec; 2])>,
    /// Last resolved parent directory; dropped whenever an entry removes or replaces
    /// something, so a swapped component is resolved again.
    cache: Option<(RelPath, OwnedFd)>,
}

impl Applier<'_> {
    fn parent(&mut self, rel: &RelPath) -> Result<OwnedFd> {
        let parent = rel.parent();
        if let Some((cached, fd)) = &self.cache
            && *cached == parent
        {
            return fd.try_clone().map_err(|e| io_err("dup", &parent, e));
        }
        let lowers = &self.lowers;
        let fd = self.root.ensure_dir(&parent, &mut |dirfd, name, path| {
            copy_dir_info_from_lowers(lowers, dirfd, name, path)
        })?;
        self.cache = Some((
            parent.clone(),
            fd.try_clone().map_err(|e| io_err("dup", &parent, e))?,
        ));
        Ok(fd)
    }

    fn invalidate(&mut self) {
        self.cache = None;
    }

    fn apply(&mut self, reader: impl Read) -> Result<ApplyStats> {
        let mut archive = tar::Archive::new(reader);
        let mut stats = ApplyStats::default();
        let mut ext = Extensions::default();
        let entries = archive
            .entries()
            .map_err(|e| bad(format!("reading archive: {e}")))?
            .raw(true);
        for entry in entries {
            let mut entry = entry.map_err(|e| bad(format!("reading archive: {e}")))?;
            let header = entry.header().clone();
            let kind = header.entry_type();
            let size = header
                .entry_size()
                .map_err(|e| bad(format!("archive header size: {e}")))?;
            match kind {
                tar::EntryType::GNULongName => {
                    let mut name = read_bounded(&mut entry, size, MAX_LONG_NAME, "long name")?;
                    while name.last() == Some(&0) {
                        name.pop();
                    }
                    ext.long_name = Some(name);
                    continue;
                }
                tar::EntryType::GNULongLink => {
                    let mut name = read_bounded(&mut entry, size, MAX_LONG_NAME, "long link")?;
                    while name.last() == Some(&0) {
                        name.pop();
                    }
                    ext.long_link = Some(name);
                    continue;
                }
                tar::EntryType::XHeader => {
                    let data = read_bounded(&mut entry, size, MAX_PAX_SIZE, "PAX")?;
                    parse_pax(&data, &mut ext.pax)?;
                    continue;
                }
                tar::EntryType::XGlobalHeader => {
                    // Global headers carry nothing a layer needs; bounded and skipped.
                    read_bounded(&mut entry, size, MAX_PAX_SIZE, "PAX global")?;
                    continue;
                }
                tar::EntryType::GNUSparse => {
                    return Err(Error::not_implemented("archive: GNU sparse files"));
                }
                _ => {}
            }
            let ext = std::mem::take(&mut ext);
            if let Some(pax_size) = pax_number(&ext.pax, "size")
                && pax_size != size
            {
                return Err(Error::not_implemented(
                    "archive: entries larger than their header's size field",
                ));
            }
            let name = ext
                .pax
                .get("path")
                .cloned()
                .or(ext.long_name.clone())
                .unwrap_or_else(|| header.path_bytes().into_owned());
            let link = ext
                .pax
                .get("linkpath")
                .cloned()
                .or(ext.long_link.clone())
                .or_else(|| header.link_name_bytes().map(|l| l.into_owned()));
            stats.entries += 1;
            stats.bytes += size;
            self.entry(&header, &ext.pax, &name, link.as_deref(), &mut entry)?;
        }
        self.finish()?;
        Ok(stats)
    }

    fn entry(
        &mut self,
        header: &tar::Header,
        pax: &HashMap<String, Vec<u8>>,
        name: &[u8],
        link: Option<&[u8]>,
        data: &mut impl Read,
    ) -> Result<()> {
        let rel = RelPath::parse(name)?;
        let Some(base) = rel.name().map(<[u8]>::to_vec) else {
            // The root itself: its metadata belongs to the snapshot, not the layer.
            return Ok(());
        };
        let kind = header.entry_type();
        let uid = pax_number(pax, "uid").unwrap_or(header.uid().unwrap_or(0)) as u32;
        let gid = pax_number(pax, "gid").unwrap_or(header.gid().unwrap_or(0)) as u32;
        let mode = header.mode().unwrap_or(0o644) & 0o7777;
        let mtime = pax_time(pax, "mtime").unwrap_or(libc::timespec {
            tv_sec: header.mtime().unwrap_or(0) as i64,
            tv_nsec: 0,
        });
        let atime = pax_time(pax, "atime").unwrap_or(mtime);
        let times = [atime, mtime];

        // Whiteouts.
        if base.starts_with(WHITEOUT_PREFIX) {
            let parent_rel = rel.parent();
            let parent = self.parent(&rel)?;
            self.invalidate();
            if base == WHITEOUT_OPAQUE {
                return self.opaque(&parent, &parent_rel);
            }
            let target = &base[WHITEOUT_PREFIX.len()..];
            if target.is_empty() || target == b"." || target == b".." {
                return Err(bad(format!(
                    "archive entry {:?}: invalid whiteout",
                    rel.display()
                )));
            }
            let target_rel = parent_rel.join(target);
            confined::remove_all_at(&parent, target)
                .map_err(|e| io_err("removing", &target_rel, e))?;
            if let Whiteouts::Overlay { .. } = self.options.whiteouts {
                let c = cname(target)?;
                // SAFETY: valid fd and name.
                if unsafe { libc::mknodat(parent.as_raw_fd(), c.as_ptr(), libc::S_IFCHR, 0) } != 0 {
                    return Err(io_err("creating whiteout", &target_rel, last_err()));
                }
                chown_at(&parent, target, uid, gid, &target_rel)?;
                self.written.insert(target_rel);
            }
            return Ok(());
        }

        let parent = self.parent(&rel)?;
        let mut existing =
            confined::lstatat(&parent, &base).map_err(|e| io_err("stat", &rel, e))?;
        let is_dir = kind == tar::EntryType::Directory;
        if let Some(st) = &existing
            && !(is_dir && confined::is_dir(st))
        {
            if kind == tar::EntryType::Link
                && link.map(RelPath::parse).transpose()?.as_ref() == Some(&rel)
            {
                return Ok(());
            }
            confined::remove_all_at(&parent, &base).map_err(|e| io_err("replacing", &rel, e))?;
            self.invalidate();
            existing = None;
        }
        self.written.insert(rel.clone());

        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let file = confined::open_nofollow(
                    &parent,
                    &base,
                    libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
                    0o600,
                )
                .map_err(|e| io_err("creating", &rel, e))?;
                let mut file = std::fs::File::from(file);
                std::io::copy(data, &mut file).map_err(|e| io_err("writing", &rel, e))?;
                fchown(&file, uid, gid, &rel)?;
                fchmod(&file, mode, &rel)?;
                set_xattrs_fd(&file, pax, &rel)?;
                // SAFETY: valid fd and two timespecs.
                if unsafe { libc::futimens(file.as_raw_fd(), times.as_ptr()) } != 0 {
                    return Err(io_err("setting times of", &rel, last_err()));
                }
            }
            tar::EntryType::Directory => {
                if existing.is_none() {
                    confined::mkdirat(&parent, &base, 0o700)
                        .map_err(|e| io_err("mkdir", &rel, e))?;
                }
                let dir =
                    confined::open_nofollow(&parent, &base, libc::O_RDONLY | libc::O_DIRECTORY, 0)
                        .map_err(|e| io_err("opening", &rel, e))?;
                let dir = std::fs::File::from(dir);
                fchown(&dir, uid, gid, &rel)?;
                fchmod(&dir, mode, &rel)?;
                set_xattrs_fd(&dir, pax, &rel)?;
                self.dir_times.push((rel.clone(), times));
            }
            tar::EntryType::Symlink => {
                let target =
                    link.ok_or_else(|| bad(format!("symlink {:?} without target", rel.display())))?;
                let t = cname(target)?;
                let c = cname(&base)?;
                // The target is only data: it is resolved in the root whenever used.
                // SAFETY: valid strings and fd.
                if unsafe { libc::symlinkat(t.as_ptr(), parent.as_raw_fd(), c.as_ptr()) } != 0 {
                    return Err(io_err("symlink", &rel, last_err()));
                }
                self.invalidate();
                chown_at(&parent, &base, uid, gid, &rel)?;
                set_xattrs_path(&parent, &base, pax, &rel)?;
                utimens_at(&parent, &base, &times, &rel)?;
            }
            tar::EntryType::Link => {
                let target = link
                    .ok_or_else(|| bad(format!("hard link {:?} without target", rel.display())))?;
                let target_rel = RelPath::parse(target)
                    .map_err(|e| e.context(format!("hard link {:?}", rel.display())))?;
                let Some(target_name) = target_rel.name() else {
                    return Err(bad(format!("hard link {:?} to the root", rel.display())));
                };
                let target_parent = self
                    .root
                    .dir(&target_rel.parent())
                    .map_err(|e| io_err("resolving link target", &target_rel, e))?;
                let src = cname(target_name)?;
                let dst = cname(&base)?;
                // No AT_SYMLINK_FOLLOW: a link to a symlink links the symlink itself,
                // which lives in the root whatever it points at.
                // SAFETY: valid fds and names.
                if unsafe {
                    libc::linkat(
                        target_parent.as_raw_fd(),
                        src.as_ptr(),
                        parent.as_raw_fd(),
                        dst.as_ptr(),
                        0,
                    )
                } != 0
                {
                    return Err(io_err(
                        &format!("hard link to {:?}", target_rel.display()),
                        &rel,
                        last_err(),
                    ));
                }
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let file_type = match kind {
                    tar::EntryType::Char => libc::S_IFCHR,
                    tar::EntryType::Block => libc::S_IFBLK,
                    _ => libc::S_IFIFO,
                };
                let major = header.device_major().ok().flatten().unwrap_or(0);
                let minor = header.device_minor().ok().flatten().unwrap_or(0);
                let c = cname(&base)?;
                // SAFETY: valid fd and name.
                if unsafe {
                    libc::mknodat(
                        parent.as_raw_fd(),
                        c.as_ptr(),
                        file_type | mode,
                        libc::makedev(major, minor),
                    )
                } != 0
                {
                    return Err(io_err("mknod", &rel, last_err()));
                }
                chown_at(&parent, &base, uid, gid, &rel)?;
                // Set the mode explicitly (umask applied at mknod); the name is the
                // node just made, never a symlink (fchmodat does not follow a final
                // component that is not a symlink, and no one else writes here).
                // SAFETY: valid fd and name.
                if unsafe { libc::fchmodat(parent.as_raw_fd(), c.as_ptr(), mode, 0) } != 0 {
                    return Err(io_err("chmod", &rel, last_err()));
                }
                set_xattrs_path(&parent, &base, pax, &rel)?;
                utimens_at(&parent, &base, &times, &rel)?;
            }
            other => {
                tracing::debug!(entry = %rel.display(), kind = ?other, "skipping unsupported archive entry");
            }
        }
        Ok(())
    }

    fn opaque(&mut self, dir: &OwnedFd, dir_rel: &RelPath) -> Result<()> {
        match &self.options.whiteouts {
            Whiteouts::Overlay { userxattr, .. } => {
                let name: &[u8] = if *userxattr {
                    b"user.overlay.opaque\0"
                } else {
                    b"trusted.overlay.opaque\0"
                };
                let fd = self
                    .root
                    .resolve(
                        dir_rel,
                        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                    )
                    .map_err(|e| io_err("opening opaque directory", dir_rel, e))?;
                // SAFETY: valid fd, NUL-terminated name and 1-byte value.
                if unsafe {
                    libc::fsetxattr(
                        fd.as_raw_fd(),
                        name.as_ptr().cast(),
                        b"y".as_ptr().cast(),
                        1,
                        0,
                    )
                } != 0
                {
                    return Err(io_err("marking opaque", dir_rel, last_err()));
                }
            }
            Whiteouts::Apply => {
                let listing = self
                    .root
                    .resolve(
                        dir_rel,
                        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                    )
                    .map_err(|e| io_err("opening opaque directory", dir_rel, e))?;
                for child in
                    confined::read_dir_names(&listing).map_err(|e| io_err("listing", dir_rel, e))?
                {
                    if !self.written.contains(&dir_rel.join(&child)) {
                        confined::remove_all_at(dir, &child)
                            .map_err(|e| io_err("removing", &dir_rel.join(&child), e))?;
                    }
                }
            }
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        self.invalidate();
        for (rel, times) in std::mem::take(&mut self.dir_times).iter().rev() {
            let Some(name) = rel.name() else { continue };
            let Ok(parent) = self.root.dir(&rel.parent()) else {
                continue;
            };
            utimens_at(&parent, name, times, rel)?;
        }
        Ok(())
    }
}

fn fchown(file: &std::fs::File, uid: u32, gid: u32, rel: &RelPath) -> Result<()> {
    // SAFETY: valid fd.
    if unsafe { libc::fchown(file.as_raw_fd(), uid, gid) } != 0 {
        return Err(io_err("chown", rel, last_err()));
    }
    Ok(())
}

fn fchmod(file: &std::fs::File, mode: u32, rel: &RelPath) -> Result<()> {
    // SAFETY: valid fd.
    if unsafe { libc::fchmod(file.as_raw_fd(), mode) } != 0 {
        return Err(io_err("chmod", rel, last_err()));
    }
    Ok(())
}

fn chown_at(dir: &OwnedFd, name: &[u8], uid: u32, gid: u32, rel: &RelPath) -> Result<()> {
    let c = cname(name)?;
    // SAFETY: valid fd and name.
    if unsafe {
        libc::fchownat(
            dir.as_raw_fd(),
            c.as_ptr(),
            uid,
            gid,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    } != 0
    {
        return Err(io_err("chown", rel, last_err()));
    }
    Ok(())
}

fn utimens_at(
    dir: &OwnedFd,
    name: &[u8],
    times: &[libc::timespec; 2],
    rel: &RelPath,
) -> Result<()> {
    let c = cname(name)?;
    // SAFETY: valid fd, name and two timespecs.
    if unsafe {
        libc::utimensat(
            dir.as_raw_fd(),
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    } != 0
    {
        return Err(io_err("setting times of", rel, last_err()));
    }
    Ok(())
}

fn xattrs(pax: &HashMap<String, Vec<u8>>) -> impl Iterator<Item = (&str, &Vec<u8>)> {
    pax.iter()
        .filter_map(|(k, v)| k.strip_prefix("SCHILY.xattr.").map(|name| (name, v)))
}

fn xattr_error(rel: &RelPath, name: &str) -> Result<()> {
    let err = last_err();
    match err.raw_os_error() {
        // A file system that cannot hold the attribute: skipped, as containerd does
        // for ENOTSUP; anything else is an error.
        Some(libc::ENOTSUP) => {
            tracing::debug!(entry = %rel.display(), xattr = name, "xattr not supported; skipped");
            Ok(())
        }
        _ => Err(io_err(&format!("setting xattr {name} on"), rel, err)),
    }
}

fn set_xattrs_fd(
    file: &std::fs::File,
    pax: &HashMap<String, Vec<u8>>,
    rel: &RelPath,
) -> Result<()> {
    for (name, value) in xattrs(pax) {
        let c = cname(name.as_bytes())?;
        // SAFETY: valid fd, name and buffer.
        if unsafe {
            libc::fsetxattr(
                file.as_raw_fd(),
                c.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        } != 0
        {
            xattr_error(rel, name)?;
        }
    }
    Ok(())
}

fn set_xattrs_path(
    dir: &OwnedFd,
    base: &[u8],
    pax: &HashMap<String, Vec<u8>>,
    rel: &RelPath,
) -> Result<()> {
    let mut it = xattrs(pax).peekable();
    if it.peek().is_none() {
        return Ok(());
    }
    let path = confined::proc_path(dir, base)?;
    for (name, value) in it {
        let c = cname(name.as_bytes())?;
        // SAFETY: valid path, name and buffer; lsetxattr does not follow the final
        // component.
        if unsafe {
            libc::lsetxattr(
                path.as_ptr(),
                c.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        } != 0
        {
            xattr_error(rel, name)?;
        }
    }
    Ok(())
}

/// A parent directory created in an overlay upper takes owner, mode and times from the
/// same directory in the nearest lower layer that has one (else it stays 0755 root).
fn copy_dir_info_from_lowers(
    lowers: &[Root],
    dirfd: &OwnedFd,
    name: &[u8],
    path: &RelPath,
) -> Result<()> {
    for lower in lowers {
        let Ok(parent) = lower.dir(&path.parent()) else {
            continue;
        };
        match confined::lstatat(&parent, name) {
            Ok(Some(st)) if confined::is_dir(&st) => {
                chown_at(dirfd, name, st.st_uid, st.st_gid, path)?;
                let c = cname(name)?;
                // SAFETY: valid fd and name (a directory we just created).
                if unsafe { libc::fchmodat(dirfd.as_raw_fd(), c.as_ptr(), st.st_mode & 0o7777, 0) }
                    != 0
                {
                    return Err(io_err("chmod", path, last_err()));
                }
                let times = [
                    libc::timespec {
                        tv_sec: st.st_atime,
                        tv_nsec: st.st_atime_nsec,
                    },
                    libc::timespec {
                        tv_sec: st.st_mtime,
                        tv_nsec: st.st_mtime_nsec,
                    },
                ];
                return utimens_at(dirfd, name, &times, path);
            }
            Ok(Some(_)) => return Ok(()),
            _ => continue,
        }
    }
    Ok(())
}

/// Applies the tar stream `reader` to the directory `root`.
pub fn apply_tar(
    root: &std::path::Path,
    reader: impl Read,
    options: &ApplyOptions,
) -> Result<ApplyStats> {
    let root_dir = Root::open(root)?;
    let lowers = match &options.whiteouts {
        Whiteouts::Overlay { lowers, .. } => {
            lowers.iter().filter_map(|p| Root::open(p).ok()).collect()
        }
        Whiteouts::Apply => Vec::new(),
    };
    let mut applier = Applier {
        root: &root_dir,
        options,
        lowers,
        written: HashSet::new(),
        dir_times: Vec::new(),
        cache: None,
    };
    applier.apply(reader)
}
