//! Mounting the rootfs mounts of a Create request under `<bundle>/rootfs`.

use std::io;
use std::path::Path;

use containerd_shim_protos::api::Mount;

use crate::sys;

/// Splits mount options into MS_* flags, propagation flags and the data string.
pub fn parse_options(opts: &[String]) -> (libc::c_ulong, libc::c_ulong, String) {
    let mut flags: libc::c_ulong = 0;
    let mut prop: libc::c_ulong = 0;
    let mut data: Vec<&str> = Vec::new();
    for o in opts {
        let (clear, f) = match o.as_str() {
            "defaults" => (false, 0),
            "ro" => (false, libc::MS_RDONLY),
            "rw" => (true, libc::MS_RDONLY),
            "bind" => (false, libc::MS_BIND),
            "rbind" => (false, libc::MS_BIND | libc::MS_REC),
            "nosuid" => (false, libc::MS_NOSUID),
            "suid" => (true, libc::MS_NOSUID),
            "nodev" => (false, libc::MS_NODEV),
            "dev" => (true, libc::MS_NODEV),
            "noexec" => (false, libc::MS_NOEXEC),
            "exec" => (true, libc::MS_NOEXEC),
            "sync" => (false, libc::MS_SYNCHRONOUS),
            "async" => (true, libc::MS_SYNCHRONOUS),
            "noatime" => (false, libc::MS_NOATIME),
            "atime" => (true, libc::MS_NOATIME),
            "nodiratime" => (false, libc::MS_NODIRATIME),
            "relatime" => (false, libc::MS_RELATIME),
            "strictatime" => (false, libc::MS_STRICTATIME),
            "remount" => (false, libc::MS_REMOUNT),
            "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave" => {
                prop |= match o.as_str() {
                    "private" => libc::MS_PRIVATE,
                    "rprivate" => libc::MS_PRIVATE | libc::MS_REC,
                    "shared" => libc::MS_SHARED,
                    "rshared" => libc::MS_SHARED | libc::MS_REC,
                    "slave" => libc::MS_SLAVE,
                    _ => libc::MS_SLAVE | libc::MS_REC,
                };
                continue;
            }
            _ => {
                data.push(o);
                continue;
            }
        };
        if clear {
            flags &= !f;
        } else {
            flags |= f;
        }
    }
    (flags, prop, data.join(","))
}

pub fn mount_one(m: &Mount, target: &Path) -> io::Result<()> {
    let (flags, prop, data) = parse_options(&m.options);
    let fstype = if m.type_ == "bind" || m.type_ == "rbind" {
        ""
    } else {
        m.type_.as_str()
    };
    let mut flags = flags;
    if m.type_ == "bind" || m.type_ == "rbind" {
        flags |= libc::MS_BIND;
        if m.type_ == "rbind" {
            flags |= libc::MS_REC;
        }
    }
    let first = if flags & libc::MS_BIND != 0 {
        flags & !libc::MS_RDONLY
    } else {
        flags
    };
    sys::mount(&m.source, target, fstype, first, &data).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "mount {} ({}) on {}: {e}",
                m.source,
                m.type_,
                target.display()
            ),
        )
    })?;
    // A bind mount only becomes read-only with a remount.
    if flags & libc::MS_BIND != 0 && flags & libc::MS_RDONLY != 0 {
        sys::mount("", target, "", flags | libc::MS_REMOUNT, "")?;
    }
    if prop != 0 {
        sys::mount("", target, "", prop, "")?;
    }
    Ok(())
}

/// Mounts `mounts` in order on `rootfs`; on failure unmounts what was mounted.
pub fn mount_all(mounts: &[Mount], rootfs: &Path) -> io::Result<()> {
    if mounts.is_empty() {
        return Ok(());
    }
    std::fs::create_dir_all(rootfs)?;
    for m in mounts {
        if let Err(e) = mount_one(m, rootfs) {
            sys::unmount_all(rootfs);
            return Err(e);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options() {
        let o: Vec<String> = [
            "ro",
            "rbind",
            "nosuid",
            "lowerdir=/a:/b",
            "upperdir=/u",
            "rprivate",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (f, p, d) = parse_options(&o);
        assert_eq!(
            f,
            libc::MS_RDONLY | libc::MS_BIND | libc::MS_REC | libc::MS_NOSUID
        );
        assert_eq!(p, libc::MS_PRIVATE | libc::MS_REC);
        assert_eq!(d, "lowerdir=/a:/b,upperdir=/u");
    }
}
