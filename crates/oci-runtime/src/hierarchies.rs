//! The cgroup hierarchies libcontainer does not manage.
//!
//! runc puts a container's processes into its cgroup path in every mounted hierarchy:
//! the v1 controllers, named v1 hierarchies such as `name=systemd`, and, on a hybrid
//! host, the v2 unified hierarchy. libcontainer handles the v1 controllers only, so
//! without this the processes stayed in the shim's cgroup of the others (where systemd
//! tracks services, and where tools read a process's `0::` path). berth-runc moves
//! itself there before libcontainer forks the container's process, which inherits the
//! membership from its first instruction (as runc's processes join before they exec),
//! and removes the directories at `delete`.

use std::path::{Path, PathBuf};

/// Mount points of the named v1 hierarchies and of a hybrid host's unified hierarchy.
fn unmanaged_mount_points() -> Vec<PathBuf> {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    mountinfo
        .lines()
        .filter_map(|line| {
            // id parent dev root mountpoint options [optional…] - fstype source superoptions
            let (before, after) = line.split_once(" - ")?;
            let mount_point = before.split(' ').nth(4)?;
            let mut fields = after.split(' ');
            let fstype = fields.next()?;
            let super_options = fields.nth(1).unwrap_or("");
            let named_v1 = fstype == "cgroup"
                && super_options.split(',').any(|o| o.starts_with("name="))
                && !super_options.split(',').any(is_v1_controller);
            (named_v1 || fstype == "cgroup2").then(|| PathBuf::from(unescape(mount_point)))
        })
        .collect()
}

/// The v1 controllers libcontainer manages (a named hierarchy has none of them).
fn is_v1_controller(option: &str) -> bool {
    matches!(
        option,
        "cpu"
            | "cpuacct"
            | "cpuset"
            | "memory"
            | "devices"
            | "freezer"
            | "net_cls"
            | "blkio"
            | "perf_event"
            | "net_prio"
            | "hugetlb"
            | "pids"
            | "rdma"
            | "misc"
    )
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(c as char);
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// `cgroup_path` under each unmanaged hierarchy (only absolute paths: a relative one is
/// libcontainer's business alone).
fn directories(cgroup_path: &Path) -> Vec<PathBuf> {
    let Ok(relative) = cgroup_path.strip_prefix("/") else {
        return Vec::new();
    };
    if relative.as_os_str().is_empty()
        || relative
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Vec::new();
    }
    unmanaged_mount_points()
        .into_iter()
        .map(|mount| mount.join(relative))
        .collect()
}

/// Moves `pid` into `cgroup_path` of every unmanaged hierarchy, creating it.
pub fn join(cgroup_path: &Path, pid: i32) -> Result<(), String> {
    for dir in directories(cgroup_path) {
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("creating cgroup {}: {e}", dir.display()))?;
        std::fs::write(dir.join("cgroup.procs"), pid.to_string())
            .map_err(|e| format!("moving {pid} into cgroup {}: {e}", dir.display()))?;
    }
    Ok(())
}

/// Moves `pid` back to the root cgroup of every unmanaged hierarchy (so that a failed
/// create can remove what it made).
pub fn leave(pid: i32) {
    for mount in unmanaged_mount_points() {
        let _ = std::fs::write(mount.join("cgroup.procs"), pid.to_string());
    }
}

/// Removes `cgroup_path` from every unmanaged hierarchy. A killed process may take a
/// moment to leave it (EBUSY): retried for up to 200 ms; one still busy after that is
/// left behind rather than failing the delete (these hierarchies limit nothing).
pub fn remove(cgroup_path: &Path) -> Result<(), String> {
    for dir in directories(cgroup_path) {
        for attempt in 0.. {
            match std::fs::remove_dir(&dir) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    if attempt == 20 {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => return Err(format!("removing cgroup {}: {e}", dir.display())),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape(r"/sys/fs/cgroup/a\040b"), "/sys/fs/cgroup/a b");
        assert_eq!(unescape(r"/plain"), "/plain");
    }

    #[test]
    fn only_plain_absolute_paths_are_placed() {
        assert!(directories(Path::new("relative/x")).is_empty());
        assert!(directories(Path::new("/")).is_empty());
        assert!(directories(Path::new("/a/../b")).is_empty());
    }
}
