//! `io.containerd.monitor.v1.cgroups`: task metrics from cgroups.
//!
//! The authoritative per-task metrics come from each shim's `Stats` (the `Metrics` RPC of
//! the tasks service, cgroup v1 `io.containerd.cgroups.v1.Metrics` or v2
//! `io.containerd.cgroups.v2.Metrics`); OOM events come from the shims as `/tasks/oom`.
//! This monitor adds a daemon-side reader that understands both cgroup layouts of a
//! process (v1 controllers under `/sys/fs/cgroup/<controller>`, v2 under
//! `/sys/fs/cgroup` or the hybrid `/sys/fs/cgroup/unified`) for collectors that cannot
//! ask a shim.

use berth_core::runtime::Runtime;
use berth_core::{Error, Result};
use berth_plugin::{InitContext, Instance, Registration, types};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A few headline numbers of one cgroup.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupStats {
    /// Bytes of memory in use.
    pub memory_usage: u64,
    /// Memory limit in bytes (`None` if unlimited).
    pub memory_limit: Option<u64>,
    /// CPU time used, nanoseconds.
    pub cpu_usage_ns: u64,
    /// Number of tasks (threads) in the cgroup.
    pub pids: u64,
    /// OOM kills recorded for the cgroup.
    pub oom_kills: u64,
    /// `v1` or `v2`.
    pub layout: &'static str,
}

/// Where a process's cgroups are, from `/proc/<pid>/cgroup`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupPaths {
    /// controller → absolute directory.
    V1(Vec<(String, PathBuf)>),
    V2(PathBuf),
}

/// Parses `/proc/<pid>/cgroup` content: a process has v1 paths when any named controller
/// line exists (hybrid hosts), else its v2 path under the unified mount.
pub fn parse_proc_cgroup(content: &str, mountpoint: &Path) -> Option<CgroupPaths> {
    let mut v1 = Vec::new();
    let mut v2 = None;
    for line in content.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let rel = path.trim_start_matches('/');
        if controllers.is_empty() {
            let unified = if mountpoint.join("unified").is_dir() {
                mountpoint.join("unified")
            } else {
                mountpoint.to_path_buf()
            };
            v2 = Some(unified.join(rel));
        } else {
            for c in controllers.split(',') {
                let c = c.trim_start_matches("name=");
                v1.push((c.to_string(), mountpoint.join(controllers).join(rel)));
            }
        }
    }
    if !v1.is_empty() {
        Some(CgroupPaths::V1(v1))
    } else {
        v2.map(CgroupPaths::V2)
    }
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn keyed(path: &Path, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// Reads the stats of the cgroups of `paths`.
pub fn read_stats(paths: &CgroupPaths) -> CgroupStats {
    match paths {
        CgroupPaths::V2(dir) => CgroupStats {
            memory_usage: read_u64(&dir.join("memory.current")).unwrap_or(0),
            memory_limit: read_u64(&dir.join("memory.max")),
            cpu_usage_ns: keyed(&dir.join("cpu.stat"), "usage_usec").unwrap_or(0) * 1000,
            pids: read_u64(&dir.join("pids.current")).unwrap_or(0),
            oom_kills: keyed(&dir.join("memory.events"), "oom_kill").unwrap_or(0),
            layout: "v2",
        },
        CgroupPaths::V1(controllers) => {
            let dir = |name: &str| {
                controllers
                    .iter()
                    .find(|(c, _)| c == name)
                    .map(|(_, p)| p.clone())
            };
            let memory = dir("memory");
            let limit = memory
                .as_ref()
                .and_then(|m| read_u64(&m.join("memory.limit_in_bytes")))
                .filter(|l| *l < (1 << 62));
            CgroupStats {
                memory_usage: memory
                    .as_ref()
                    .and_then(|m| read_u64(&m.join("memory.usage_in_bytes")))
                    .unwrap_or(0),
                memory_limit: limit,
                cpu_usage_ns: dir("cpuacct")
                    .and_then(|d| read_u64(&d.join("cpuacct.usage")))
                    .unwrap_or(0),
                pids: dir("pids")
                    .and_then(|d| read_u64(&d.join("pids.current")))
                    .unwrap_or(0),
                oom_kills: memory
                    .as_ref()
                    .and_then(|m| keyed(&m.join("memory.oom_control"), "oom_kill"))
                    .unwrap_or(0),
                layout: "v1",
            }
        }
    }
}

/// Stats of the cgroups process `pid` is in.
pub fn stats_of_pid(pid: u32) -> Result<CgroupStats> {
    let content = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .map_err(|e| Error::not_found(format!("cgroup of process {pid}: {e}")))?;
    let paths = parse_proc_cgroup(&content, Path::new("/sys/fs/cgroup"))
        .ok_or_else(|| Error::not_found(format!("cgroup of process {pid}")))?;
    Ok(read_stats(&paths))
}

/// The monitor: metrics of every task of the runtime.
pub struct CgroupsMonitor {
    runtime: Arc<dyn Runtime>,
}

/// One task's numbers.
#[derive(Debug, Clone)]
pub struct TaskCgroupStats {
    pub namespace: String,
    pub id: String,
    pub stats: CgroupStats,
}

impl CgroupsMonitor {
    pub fn new(runtime: Arc<dyn Runtime>) -> CgroupsMonitor {
        CgroupsMonitor { runtime }
    }

    /// Stats of every running task (tasks that are gone or stopped are left out).
    pub async fn collect(&self) -> Vec<TaskCgroupStats> {
        let mut out = Vec::new();
        for task in self.runtime.all_tasks().await.unwrap_or_default() {
            let Ok(pid) = task.pid().await else { continue };
            if pid == 0 {
                continue;
            }
            if let Ok(stats) = stats_of_pid(pid) {
                out.push(TaskCgroupStats {
                    namespace: task.namespace().to_string(),
                    id: task.id().to_string(),
                    stats,
                });
            }
        }
        out
    }
}

/// The instance is an `Arc<CgroupsMonitor>`.
pub fn registration() -> Registration {
    Registration::new(types::MONITOR, "cgroups", |ctx: InitContext| async move {
        ctx.platforms(ctx.daemon.platforms.clone());
        if !Path::new("/sys/fs/cgroup").is_dir() {
            return Err(berth_plugin::skip(
                "no cgroup file system at /sys/fs/cgroup",
            ));
        }
        let runtime: Arc<dyn Runtime> = ctx.get(types::RUNTIME_V2)?;
        Ok(Arc::new(Arc::new(CgroupsMonitor::new(runtime))) as Instance)
    })
    .requires(&[types::RUNTIME_V2])
}

/// Starts, in the background, the kernel wait that makes a container's cgroup attach slow.
///
/// Moving a process into a cgroup (a `cgroup.procs` write) takes the kernel's
/// cgroup_threadgroup_rwsem for writing, and the first writer after a quiet spell waits
/// for an RCU grace period (8–20 ms on the hosts measured: the largest single step of a
/// container start). Writers arriving during that wait share it. So the daemon moves
/// itself into the cgroup it is already in (a no-op) when a task is created, while the
/// bundle is written and the shim starts; by the time the OCI runtime attaches the
/// container, much of the wait is behind. Errors are ignored: it only saves time. Runs on
/// the blocking pool (a new thread would get a malloc arena of its own).
pub fn warm_up_cgroup_attach() {
    let me = std::process::id();
    tokio::task::spawn_blocking(move || {
        let Ok(content) = std::fs::read_to_string("/proc/self/cgroup") else {
            return;
        };
        let dir = match parse_proc_cgroup(&content, Path::new("/sys/fs/cgroup")) {
            Some(CgroupPaths::V1(dirs)) => dirs
                .iter()
                .find(|(c, _)| c == "pids")
                .or(dirs.first())
                .map(|(_, d)| d.clone()),
            Some(CgroupPaths::V2(dir)) => Some(dir),
            None => None,
        };
        if let Some(dir) = dir {
            let _ = std::fs::write(dir.join("cgroup.procs"), me.to_string());
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_layouts() {
        let v1 = "12:memory:/a/b\n11:cpu,cpuacct:/a/b\n0::/a/b\n";
        let root = Path::new("/nonexistent");
        match parse_proc_cgroup(v1, root).unwrap() {
            CgroupPaths::V1(c) => {
                assert!(c.contains(&("memory".into(), root.join("memory/a/b"))));
                assert!(c.contains(&("cpuacct".into(), root.join("cpu,cpuacct/a/b"))));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse_proc_cgroup("0::/x\n", root).unwrap(),
            CgroupPaths::V2(root.join("x"))
        );
    }

    #[test]
    fn reads_own_cgroup() {
        let stats = stats_of_pid(std::process::id()).unwrap();
        assert!(stats.layout == "v1" || stats.layout == "v2");
    }
}
