//! Writing the changes between two directory trees as a layer tar (containerd's
//! `archive.WriteDiff` over a double walk): entries added or changed in `upper` are
//! written with their metadata (PAX records for long names and xattrs), entries gone
//! from `upper` become `.wh.<name>` whiteouts, hard links within the layer stay links,
//! and the parent directories of every change are included.

use berth_core::{Error, Result};
use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

fn io_err(what: &str, path: &Path, err: std::io::Error) -> Error {
    Error::unknown(format!("{what} {}: {err}", path.display()))
}

fn sorted_names(dir: &Path) -> Result<Vec<std::ffi::OsString>> {
    let mut names: Vec<_> = fs::read_dir(dir)
        .map_err(|e| io_err("reading", dir, e))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<_>>()
        .map_err(|e| io_err("reading", dir, e))?;
    names.sort();
    Ok(names)
}

struct DiffWriter<'a, W: Write> {
    builder: tar::Builder<W>,
    upper: &'a Path,
    emitted_dirs: HashSet<PathBuf>,
    links: HashMap<(u64, u64), PathBuf>,
}

fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    // "<len> <key>=<value>\n" where len counts itself.
    let rest = key.len() + value.len() + 3;
    let mut len = rest + rest.to_string().len();
    if len.to_string().len() != rest.to_string().len() {
        len = rest + len.to_string().len();
    }
    let mut out = format!("{len} {key}=").into_bytes();
    out.extend_from_slice(value);
    out.push(b'\n');
    out
}

impl<W: Write> DiffWriter<'_, W> {
    #[allow(clippy::too_many_arguments)]
    fn append(
        &mut self,
        rel: &Path,
        meta: Option<&fs::Metadata>,
        kind: tar::EntryType,
        link: Option<&[u8]>,
        xattrs: &[(std::ffi::CString, Vec<u8>)],
        data: &mut dyn std::io::Read,
        size: u64,
    ) -> Result<()> {
        let mut name = rel.as_os_str().as_bytes().to_vec();
        if kind == tar::EntryType::Directory {
            name.push(b'/');
        }
        let mut pax = Vec::new();
        if name.len() > 100 {
            pax.extend(pax_record("path", &name));
        }
        if let Some(link) = link
            && link.len() > 100
        {
            pax.extend(pax_record("linkpath", link));
        }
        for (k, v) in xattrs {
            let key = format!("SCHILY.xattr.{}", k.to_string_lossy());
            pax.extend(pax_record(&key, v));
        }
        if !pax.is_empty() {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::XHeader);
            h.set_size(pax.len() as u64);
            h.set_mode(0o644);
            let _ = h.set_path("PaxHeader");
            h.set_cksum();
            self.builder
                .append(&h, pax.as_slice())
                .map_err(|e| Error::unknown(format!("writing diff: {e}")))?;
        }
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        let short = &name[..name.len().min(100)];
        // ustar name field set directly (set_path refuses some names we carry in PAX).
        h.as_old_mut().name[..short.len()].copy_from_slice(short);
        if let Some(link) = link {
            let short = &link[..link.len().min(100)];
            h.as_old_mut().linkname[..short.len()].copy_from_slice(short);
        }
        match meta {
            Some(m) => {
                h.set_mode(m.mode() & 0o7777);
                h.set_uid(m.uid() as u64);
                h.set_gid(m.gid() as u64);
                h.set_mtime(m.mtime().max(0) as u64);
                if kind == tar::EntryType::Char || kind == tar::EntryType::Block {
                    let rdev = m.rdev();
                    let _ = h.set_device_major(libc::major(rdev));
                    let _ = h.set_device_minor(libc::minor(rdev));
                }
            }
            None => {
                h.set_mode(0);
                h.set_mtime(0);
            }
        }
        h.set_size(size);
        h.set_cksum();
        self.builder
            .append(&h, data)
            .map_err(|e| Error::unknown(format!("writing diff: {e}")))?;
        Ok(())
    }

    fn include_parents(&mut self, rel: &Path) -> Result<()> {
        let mut missing = Vec::new();
        let mut p = rel.parent();
        while let Some(dir) = p {
            if dir.as_os_str().is_empty() || self.emitted_dirs.contains(dir) {
                break;
            }
            missing.push(dir.to_path_buf());
            p = dir.parent();
        }
        for dir in missing.into_iter().rev() {
            let full = self.upper.join(&dir);
            let meta = fs::symlink_metadata(&full).map_err(|e| io_err("stat", &full, e))?;
            let xattrs = berth_snapshots::fsutil::list_xattrs(&full)?;
            self.append(
                &dir,
                Some(&meta),
                tar::EntryType::Directory,
                None,
                &xattrs,
                &mut std::io::empty(),
                0,
            )?;
            self.emitted_dirs.insert(dir);
        }
        Ok(())
    }

    fn emit(&mut self, rel: &Path, meta: &fs::Metadata) -> Result<()> {
        self.include_parents(rel)?;
        let full = self.upper.join(rel);
        let ft = meta.file_type();
        let xattrs = berth_snapshots::fsutil::list_xattrs(&full)?;
        if ft.is_dir() {
            self.append(
                rel,
                Some(meta),
                tar::EntryType::Directory,
                None,
                &xattrs,
                &mut std::io::empty(),
                0,
            )?;
            self.emitted_dirs.insert(rel.to_path_buf());
        } else if ft.is_symlink() {
            let target = fs::read_link(&full).map_err(|e| io_err("readlink", &full, e))?;
            self.append(
                rel,
                Some(meta),
                tar::EntryType::Symlink,
                Some(target.as_os_str().as_bytes()),
                &xattrs,
                &mut std::io::empty(),
                0,
            )?;
        } else if ft.is_file() {
            if meta.nlink() > 1 {
                if let Some(first) = self.links.get(&(meta.dev(), meta.ino())).cloned() {
                    return self.append(
                        rel,
                        Some(meta),
                        tar::EntryType::Link,
                        Some(first.as_os_str().as_bytes()),
                        &[],
                        &mut std::io::empty(),
                        0,
                    );
                }
                self.links
                    .insert((meta.dev(), meta.ino()), rel.to_path_buf());
            }
            // The tree may be a container's: never follow a symlink swapped in since the
            // lstat above.
            let mut file = {
                use std::os::unix::fs::OpenOptionsExt;
                fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&full)
                    .map_err(|e| io_err("open", &full, e))?
            };
            self.append(
                rel,
                Some(meta),
                tar::EntryType::Regular,
                None,
                &xattrs,
                &mut file,
                meta.len(),
            )?;
        } else {
            let kind = if ft.is_char_device() {
                tar::EntryType::Char
            } else if ft.is_block_device() {
                tar::EntryType::Block
            } else if ft.is_fifo() {
                tar::EntryType::Fifo
            } else {
                return Ok(()); // sockets are not archived
            };
            self.append(
                rel,
                Some(meta),
                kind,
                None,
                &xattrs,
                &mut std::io::empty(),
                0,
            )?;
        }
        Ok(())
    }

    fn whiteout(&mut self, rel: &Path) -> Result<()> {
        self.include_parents(rel)?;
        let name = rel.file_name().expect("whiteouts name an entry");
        let mut wh = std::ffi::OsString::from(".wh.");
        wh.push(name);
        let path = rel.with_file_name(wh);
        self.append(
            &path,
            None,
            tar::EntryType::Regular,
            None,
            &[],
            &mut std::io::empty(),
            0,
        )
    }

    fn walk(&mut self, lower: &Path, rel: &Path) -> Result<()> {
        let upper_dir = self.upper.join(rel);
        let lower_dir = lower.join(rel);
        let upper_names = sorted_names(&upper_dir)?;
        let upper_set: HashSet<_> = upper_names.iter().cloned().collect();
        let lower_is_dir = fs::symlink_metadata(&lower_dir)
            .map(|m| m.is_dir())
            .unwrap_or(false);
        if lower_is_dir {
            for name in sorted_names(&lower_dir)? {
                if !upper_set.contains(&name) {
                    self.whiteout(&rel.join(&name))?;
                }
            }
        }
        for name in upper_names {
            let child = rel.join(&name);
            let um = fs::symlink_metadata(self.upper.join(&child))
                .map_err(|e| io_err("stat", &self.upper.join(&child), e))?;
            let lm = if lower_is_dir {
                fs::symlink_metadata(lower.join(&child)).ok()
            } else {
                None
            };
            let changed = match &lm {
                None => true,
                Some(lm) => differs(lm, &um, &lower.join(&child), &self.upper.join(&child)),
            };
            if changed {
                self.emit(&child, &um)?;
            }
            if um.is_dir() {
                self.walk(lower, &child)?;
            }
        }
        Ok(())
    }
}

fn differs(l: &fs::Metadata, u: &fs::Metadata, lp: &Path, up: &Path) -> bool {
    if l.mode() != u.mode() || l.uid() != u.uid() || l.gid() != u.gid() || l.rdev() != u.rdev() {
        return true;
    }
    if u.is_dir() {
        // Directory times change with their entries; only metadata counts.
        return false;
    }
    if l.len() != u.len() || l.mtime() != u.mtime() || l.mtime_nsec() != u.mtime_nsec() {
        return true;
    }
    if u.file_type().is_symlink() {
        return fs::read_link(lp).ok() != fs::read_link(up).ok();
    }
    false
}

/// Writes the tar of changes from `lower` to `upper` into `out`.
pub fn write_diff<W: Write>(lower: &Path, upper: &Path, out: W) -> Result<W> {
    let mut writer = DiffWriter {
        builder: tar::Builder::new(out),
        upper,
        emitted_dirs: HashSet::new(),
        links: HashMap::new(),
    };
    writer.walk(lower, Path::new(""))?;
    writer
        .builder
        .into_inner()
        .map_err(|e| Error::unknown(format!("finishing diff: {e}")))
}
