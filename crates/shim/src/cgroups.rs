//! Best-effort cgroup metrics (v1 and v2) of a container, read straight from cgroupfs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use containerd_shim_protos::cgroups::metrics as v1;
use containerd_shim_protos::cgroups_v2::metrics as v2;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::{Message, MessageField};

/// Where a process's cgroups are: one directory per v1 controller, and/or the v2 directory.
#[derive(Clone, Debug, Default)]
pub struct Cgroups {
    pub v1: HashMap<String, PathBuf>,
    pub v2: Option<PathBuf>,
}

impl Cgroups {
    pub fn of_pid(pid: u32) -> Cgroups {
        let data = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        let mounts = cgroup_mounts();
        let mut cg = Cgroups::default();
        for line in data.lines() {
            let mut it = line.splitn(3, ':');
            let (Some(_), Some(ctrls), Some(path)) = (it.next(), it.next(), it.next()) else {
                continue;
            };
            if ctrls.is_empty() {
                if let Some((root, mp)) =
                    mounts.iter().find(|m| m.0.is_empty()).map(|m| (&m.1, &m.2))
                {
                    cg.v2 = Some(join_cg(mp, root, path));
                }
                continue;
            }
            for c in ctrls.split(',') {
                if let Some((_, root, mp)) = mounts.iter().find(|m| m.0.split(',').any(|x| x == c))
                {
                    cg.v1.insert(c.to_string(), join_cg(mp, root, path));
                }
            }
        }
        cg
    }

    pub fn memory_v1(&self) -> Option<&PathBuf> {
        self.v1.get("memory")
    }

    /// The metrics as an Any (`io.containerd.cgroups.v1.Metrics` or `...v2.Metrics`).
    pub fn metrics(&self) -> Option<Any> {
        let mut any = Any::new();
        if !self.v1.is_empty() && self.v1.contains_key("memory") {
            any.type_url = "io.containerd.cgroups.v1.Metrics".into();
            any.value = self.metrics_v1().write_to_bytes().ok()?;
        } else if let Some(d) = &self.v2 {
            any.type_url = "io.containerd.cgroups.v2.Metrics".into();
            any.value = metrics_v2(d).write_to_bytes().ok()?;
        } else {
            return None;
        }
        Some(any)
    }

    fn metrics_v1(&self) -> v1::Metrics {
        let mut m = v1::Metrics::new();
        if let Some(d) = self.v1.get("pids") {
            let mut p = v1::PidsStat::new();
            p.current = read_u64(&d.join("pids.current"));
            p.limit = pids_limit(&d.join("pids.max"));
            m.pids = MessageField::some(p);
        }
        if let Some(d) = self.v1.get("cpuacct") {
            let mut u = v1::CPUUsage::new();
            u.total = read_u64(&d.join("cpuacct.usage"));
            u.per_cpu = read_to_string(&d.join("cpuacct.usage_percpu"))
                .split_whitespace()
                .filter_map(|s| s.parse().ok())
                .collect();
            let st = flat_keyed(&d.join("cpuacct.stat"));
            // USER_HZ ticks to nanoseconds.
            let tick = 1_000_000_000 / clk_tck();
            u.user = st.get("user").copied().unwrap_or(0) * tick;
            u.kernel = st.get("system").copied().unwrap_or(0) * tick;
            let mut c = v1::CPUStat::new();
            c.usage = MessageField::some(u);
            if let Some(cd) = self.v1.get("cpu") {
                let s = flat_keyed(&cd.join("cpu.stat"));
                let mut t = v1::Throttle::new();
                t.periods = s.get("nr_periods").copied().unwrap_or(0);
                t.throttled_periods = s.get("nr_throttled").copied().unwrap_or(0);
                t.throttled_time = s.get("throttled_time").copied().unwrap_or(0);
                c.throttling = MessageField::some(t);
            }
            m.cpu = MessageField::some(c);
        }
        if let Some(d) = self.v1.get("memory") {
            let s = flat_keyed(&d.join("memory.stat"));
            let g = |k: &str| s.get(k).copied().unwrap_or(0);
            let mut ms = v1::MemoryStat::new();
            ms.cache = g("cache");
            ms.rss = g("rss");
            ms.rss_huge = g("rss_huge");
            ms.mapped_file = g("mapped_file");
            ms.dirty = g("dirty");
            ms.writeback = g("writeback");
            ms.pg_pg_in = g("pgpgin");
            ms.pg_pg_out = g("pgpgout");
            ms.pg_fault = g("pgfault");
            ms.pg_maj_fault = g("pgmajfault");
            ms.inactive_anon = g("inactive_anon");
            ms.active_anon = g("active_anon");
            ms.inactive_file = g("inactive_file");
            ms.active_file = g("active_file");
            ms.unevictable = g("unevictable");
            ms.hierarchical_memory_limit = g("hierarchical_memory_limit");
            ms.hierarchical_swap_limit = g("hierarchical_memsw_limit");
            ms.total_cache = g("total_cache");
            ms.total_rss = g("total_rss");
            ms.total_rss_huge = g("total_rss_huge");
            ms.total_mapped_file = g("total_mapped_file");
            ms.total_dirty = g("total_dirty");
            ms.total_writeback = g("total_writeback");
            ms.total_pg_pg_in = g("total_pgpgin");
            ms.total_pg_pg_out = g("total_pgpgout");
            ms.total_pg_fault = g("total_pgfault");
            ms.total_pg_maj_fault = g("total_pgmajfault");
            ms.total_inactive_anon = g("total_inactive_anon");
            ms.total_active_anon = g("total_active_anon");
            ms.total_inactive_file = g("total_inactive_file");
            ms.total_active_file = g("total_active_file");
            ms.total_unevictable = g("total_unevictable");
            let entry = |prefix: &str| {
                let mut e = v1::MemoryEntry::new();
                e.usage = read_u64(&d.join(format!("{prefix}.usage_in_bytes")));
                e.limit = read_u64(&d.join(format!("{prefix}.limit_in_bytes")));
                e.max = read_u64(&d.join(format!("{prefix}.max_usage_in_bytes")));
                e.failcnt = read_u64(&d.join(format!("{prefix}.failcnt")));
                MessageField::some(e)
            };
            ms.usage = entry("memory");
            ms.swap = entry("memory.memsw");
            ms.kernel = entry("memory.kmem");
            ms.kernel_tcp = entry("memory.kmem.tcp");
            m.memory = MessageField::some(ms);
            let oc = flat_keyed(&d.join("memory.oom_control"));
            let mut o = v1::MemoryOomControl::new();
            o.oom_kill_disable = oc.get("oom_kill_disable").copied().unwrap_or(0);
            o.under_oom = oc.get("under_oom").copied().unwrap_or(0);
            o.oom_kill = oc.get("oom_kill").copied().unwrap_or(0);
            m.memory_oom_control = MessageField::some(o);
        }
        if let Some(d) = self.v1.get("blkio") {
            let mut b = v1::BlkIOStat::new();
            let pick = |names: &[&str]| {
                names
                    .iter()
                    .map(|n| blkio_entries(&d.join(n)))
                    .find(|v| !v.is_empty())
                    .unwrap_or_default()
            };
            b.io_service_bytes_recursive = pick(&[
                "blkio.io_service_bytes_recursive",
                "blkio.throttle.io_service_bytes_recursive",
                "blkio.throttle.io_service_bytes",
            ]);
            b.io_serviced_recursive = pick(&[
                "blkio.io_serviced_recursive",
                "blkio.throttle.io_serviced_recursive",
                "blkio.throttle.io_serviced",
            ]);
            m.blkio = MessageField::some(b);
        }
        m
    }
}

fn metrics_v2(d: &Path) -> v2::Metrics {
    let mut m = v2::Metrics::new();
    let mut p = v2::PidsStat::new();
    p.current = read_u64(&d.join("pids.current"));
    p.limit = pids_limit(&d.join("pids.max"));
    m.pids = MessageField::some(p);
    let s = flat_keyed(&d.join("cpu.stat"));
    let g = |k: &str| s.get(k).copied().unwrap_or(0);
    let mut c = v2::CPUStat::new();
    c.usage_usec = g("usage_usec");
    c.user_usec = g("user_usec");
    c.system_usec = g("system_usec");
    c.nr_periods = g("nr_periods");
    c.nr_throttled = g("nr_throttled");
    c.throttled_usec = g("throttled_usec");
    m.cpu = MessageField::some(c);
    let s = flat_keyed(&d.join("memory.stat"));
    let g = |k: &str| s.get(k).copied().unwrap_or(0);
    let mut ms = v2::MemoryStat::new();
    ms.anon = g("anon");
    ms.file = g("file");
    ms.kernel_stack = g("kernel_stack");
    ms.slab = g("slab");
    ms.sock = g("sock");
    ms.shmem = g("shmem");
    ms.file_mapped = g("file_mapped");
    ms.file_dirty = g("file_dirty");
    ms.file_writeback = g("file_writeback");
    ms.inactive_anon = g("inactive_anon");
    ms.active_anon = g("active_anon");
    ms.inactive_file = g("inactive_file");
    ms.active_file = g("active_file");
    ms.unevictable = g("unevictable");
    ms.pgfault = g("pgfault");
    ms.pgmajfault = g("pgmajfault");
    ms.usage = read_u64(&d.join("memory.current"));
    ms.usage_limit = read_u64(&d.join("memory.max"));
    ms.swap_usage = read_u64(&d.join("memory.swap.current"));
    ms.swap_limit = read_u64(&d.join("memory.swap.max"));
    ms.max_usage = read_u64(&d.join("memory.peak"));
    m.memory = MessageField::some(ms);
    let e = flat_keyed(&d.join("memory.events"));
    let g = |k: &str| e.get(k).copied().unwrap_or(0);
    let mut me = v2::MemoryEvents::new();
    me.low = g("low");
    me.high = g("high");
    me.max = g("max");
    me.oom = g("oom");
    me.oom_kill = g("oom_kill");
    m.memory_events = MessageField::some(me);
    m
}

fn clk_tck() -> u64 {
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// (super options / controllers, mount root, mount point) of cgroup mounts; v2 has "" controllers.
fn cgroup_mounts() -> Vec<(String, String, String)> {
    let data = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out = Vec::new();
    for line in data.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let pf: Vec<&str> = pre.split(' ').collect();
        let qf: Vec<&str> = post.split(' ').collect();
        if pf.len() < 5 || qf.len() < 3 {
            continue;
        }
        match qf[0] {
            "cgroup" => out.push((qf[2].to_string(), pf[3].to_string(), pf[4].to_string())),
            "cgroup2" => out.push((String::new(), pf[3].to_string(), pf[4].to_string())),
            _ => {}
        }
    }
    out
}

fn join_cg(mountpoint: &str, root: &str, path: &str) -> PathBuf {
    let rel = path
        .strip_prefix(root)
        .unwrap_or(path)
        .trim_start_matches('/');
    Path::new(mountpoint).join(rel)
}

fn read_to_string(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

fn read_u64(p: &Path) -> u64 {
    let s = read_to_string(p);
    let s = s.trim();
    if s == "max" {
        u64::MAX
    } else {
        s.parse().unwrap_or(0)
    }
}

/// `pids.max`: "max" means no limit, reported as 0 (as containerd's cgroups library does).
fn pids_limit(p: &Path) -> u64 {
    match read_u64(p) {
        u64::MAX => 0,
        v => v,
    }
}

fn flat_keyed(p: &Path) -> HashMap<String, u64> {
    read_to_string(p)
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.parse().ok()?))
        })
        .collect()
}

fn blkio_entries(p: &Path) -> Vec<v1::BlkIOEntry> {
    read_to_string(p)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() != 3 {
                return None;
            }
            let (maj, min) = f[0].split_once(':')?;
            let mut e = v1::BlkIOEntry::new();
            e.major = maj.parse().ok()?;
            e.minor = min.parse().ok()?;
            e.op = f[1].to_string();
            e.value = f[2].parse().ok()?;
            Some(e)
        })
        .collect()
}

/// Starts, in the background, the wait that makes the runtime's cgroup attach slow.
///
/// Moving a process into a cgroup (a write to `cgroup.procs`) takes the kernel's
/// cgroup_threadgroup_rwsem for writing, and the first writer after a quiet spell waits
/// for an RCU grace period: 8–20 ms here, the largest single step of a container start.
/// Writers that come while that wait is under way share it. So the shim moves itself
/// into the cgroup it is already in (changing nothing) as soon as a Create arrives; by
/// the time the OCI runtime attaches the container, part or all of the wait is behind.
pub fn warm_up_cgroup_attach() {
    let _ = std::thread::Builder::new()
        .name("cgroup-warmup".into())
        .stack_size(64 * 1024)
        .spawn(|| {
            let me = std::process::id();
            let own = Cgroups::of_pid(me);
            let dir = own
                .v1
                .get("pids")
                .or_else(|| own.v1.values().next())
                .or(own.v2.as_ref());
            if let Some(dir) = dir {
                let _ = std::fs::write(dir.join("cgroup.procs"), me.to_string());
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_cgroups() {
        let cg = Cgroups::of_pid(std::process::id());
        // Whatever the host has, the paths found must exist.
        for p in cg.v1.values().chain(cg.v2.iter()) {
            assert!(p.exists(), "{}", p.display());
        }
        assert_eq!(
            join_cg("/sys/fs/cgroup/memory", "/", "/a/b"),
            PathBuf::from("/sys/fs/cgroup/memory/a/b")
        );
    }
}
