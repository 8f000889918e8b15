//! OCI runtime specs for sandboxes (the pause container) and containers, with
//! containerd 1.6's CRI defaults (`pkg/cri/server/sandbox_run_linux.go`,
//! `container_create_linux.go`, `pkg/cri/opts`), as JSON.

use crate::api;
use serde_json::{Value, json};
use std::collections::BTreeMap;

pub const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";
pub const PROCESS_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Process";
pub const RESOURCES_TYPE_URL: &str =
    "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources";

/// containerd's default capabilities.
pub const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Every capability (privileged containers), in kernel order.
pub const ALL_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// The image config's `config` object (Env, Entrypoint, Cmd, WorkingDir, User, …).
pub fn image_config(config: &[u8]) -> Value {
    serde_json::from_slice::<Value>(config)
        .ok()
        .map(|v| v["config"].clone())
        .unwrap_or(Value::Null)
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// containerd's `getCgroupsPath`: systemd slices as `slice:cri-containerd:id`.
pub fn cgroups_path(parent: &str, id: &str) -> String {
    if parent.ends_with(".slice") {
        format!("{parent}:cri-containerd:{id}")
    } else {
        format!("{}/{id}", parent.trim_end_matches('/'))
    }
}

/// The default spec containerd's `oci.GenerateSpec` makes (mounts, rlimits, masked and
/// read-only paths, default capabilities), before the CRI options.
pub fn base_spec(namespace: &str, id: &str) -> Value {
    let caps = json!(DEFAULT_CAPS);
    json!({
        "ociVersion": "1.0.2-dev",
        "process": {
            "user": {"uid": 0, "gid": 0},
            "cwd": "/",
            "args": [],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs"},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/run", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}
        ],
        "linux": {
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "cgroupsPath": format!("/{namespace}/{id}"),
            "namespaces": [
                {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network"}
            ],
            "maskedPaths": berth_core::oci::DEFAULT_MASKED_PATHS,
            "readonlyPaths": berth_core::oci::DEFAULT_READONLY_PATHS
        }
    })
}

/// Replaces (or adds, or with `path: None` for `Some`, removes) namespace `kind`.
pub fn set_namespace(spec: &mut Value, kind: &str, entry: Option<Option<String>>) {
    let list = spec["linux"]["namespaces"].as_array_mut().unwrap();
    list.retain(|n| n["type"] != kind);
    match entry {
        None => {}
        Some(None) => list.push(json!({"type": kind})),
        Some(Some(path)) => list.push(json!({"type": kind, "path": path})),
    }
}

fn remove_mount(spec: &mut Value, destination: &str) {
    if let Some(mounts) = spec["mounts"].as_array_mut() {
        mounts.retain(|m| m["destination"] != destination);
    }
}

/// Adds a bind mount (replacing one at the same destination).
pub fn bind_mount(spec: &mut Value, source: &str, destination: &str, options: Vec<String>) {
    remove_mount(spec, destination);
    spec["mounts"].as_array_mut().unwrap().push(
        json!({"destination": destination, "type": "bind", "source": source, "options": options}),
    );
}

/// `process.env` with `entries` set (replacing same-named ones, as containerd's `WithEnv`).
pub fn set_env(spec: &mut Value, entries: &[String]) {
    let mut env = strings(&spec["process"]["env"]);
    for entry in entries {
        let key = entry.split('=').next().unwrap_or(entry);
        env.retain(|e| e.split('=').next() != Some(key));
        env.push(entry.clone());
    }
    spec["process"]["env"] = json!(env);
}

/// A user from the image: `(uid, gid, additional gids)`.
#[derive(Debug, Clone, Default)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
}

/// `/etc/passwd` lookups: by name or by uid → `(uid, gid)`. A matching entry whose IDs
/// are not in 0..=2³¹−1 is an error, never wrapped (CVE-2024-40635).
pub fn passwd_lookup(
    passwd: &str,
    name: Option<&str>,
    uid: Option<u32>,
) -> Result<Option<(u32, u32)>, String> {
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 4 {
            continue;
        }
        let (Ok(u), Ok(g)) = (f[2].parse::<i64>(), f[3].parse::<i64>()) else {
            continue;
        };
        let hit = name.is_some_and(|n| n == f[0]) || uid.is_some_and(|x| i64::from(x) == u);
        if !hit {
            continue;
        }
        let range = 0..=i64::from(i32::MAX);
        if !range.contains(&u) || !range.contains(&g) {
            return Err(format!(
                "the image's /etc/passwd entry {:?} has IDs out of range ({u}:{g})",
                f[0]
            ));
        }
        return Ok(Some((u as u32, g as u32)));
    }
    Ok(None)
}

/// The groups of `/etc/group` naming `user` as a member.
pub fn member_groups(group: &str, user: &str) -> Vec<u32> {
    group
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            (f.len() >= 4 && f[3].split(',').any(|m| m == user)).then(|| f[2].parse().ok())?
        })
        .collect()
}

/// CRI `LinuxContainerResources` → OCI `LinuxResources` (the fields set).
/// containerd's `WithOOMScoreAdj`: `wanted`, or with `restrict_oom_score_adj` (for a
/// daemon that may not lower scores, e.g. without CAP_SYS_RESOURCE) never below the
/// daemon's own score, which the kernel would refuse.
pub fn oom_score_adj(wanted: i64, restrict: bool) -> i64 {
    if !restrict {
        return wanted;
    }
    let current = std::fs::read_to_string("/proc/self/oom_score_adj")
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
        .unwrap_or(0);
    wanted.max(current)
}

pub fn resources(r: &api::LinuxContainerResources) -> Value {
    let mut out = json!({});
    let mut cpu = serde_json::Map::new();
    if r.cpu_shares != 0 {
        cpu.insert("shares".into(), json!(r.cpu_shares));
    }
    if r.cpu_quota != 0 {
        cpu.insert("quota".into(), json!(r.cpu_quota));
    }
    if r.cpu_period != 0 {
        cpu.insert("period".into(), json!(r.cpu_period));
    }
    if !r.cpuset_cpus.is_empty() {
        cpu.insert("cpus".into(), json!(r.cpuset_cpus));
    }
    if !r.cpuset_mems.is_empty() {
        cpu.insert("mems".into(), json!(r.cpuset_mems));
    }
    if !cpu.is_empty() {
        out["cpu"] = Value::Object(cpu);
    }
    if r.memory_limit_in_bytes != 0 {
        out["memory"] = json!({"limit": r.memory_limit_in_bytes});
        if r.memory_swap_limit_in_bytes != 0 {
            out["memory"]["swap"] = json!(r.memory_swap_limit_in_bytes);
        }
    }
    if !r.hugepage_limits.is_empty() {
        out["hugepageLimits"] = r
            .hugepage_limits
            .iter()
            .map(|h| json!({"pageSize": h.page_size, "limit": h.limit}))
            .collect();
    }
    if !r.unified.is_empty() {
        out["unified"] = json!(r.unified.iter().collect::<BTreeMap<_, _>>());
    }
    out
}

/// Merges `update` into `spec.linux.resources` (keeps the device rules).
pub fn apply_resources(spec: &mut Value, update: &Value) {
    if let Some(map) = update.as_object() {
        for (k, v) in map {
            spec["linux"]["resources"][k] = v.clone();
        }
    }
}

/// Capabilities after CRI's add/drop (containerd's `WithCapabilities`: `ALL` first).
pub fn capabilities(add: &[String], drop: &[String]) -> Vec<String> {
    let norm = |c: &String| {
        let c = c.to_uppercase();
        if c.starts_with("CAP_") {
            c
        } else {
            format!("CAP_{c}")
        }
    };
    let mut caps: Vec<String> = DEFAULT_CAPS.iter().map(|s| s.to_string()).collect();
    if add.iter().any(|c| c.eq_ignore_ascii_case("ALL")) {
        caps = ALL_CAPS.iter().map(|s| s.to_string()).collect();
    }
    if drop.iter().any(|c| c.eq_ignore_ascii_case("ALL")) {
        caps.clear();
    }
    for c in add
        .iter()
        .filter(|c| !c.eq_ignore_ascii_case("ALL"))
        .map(norm)
    {
        if !caps.contains(&c) {
            caps.push(c);
        }
    }
    let dropped: Vec<String> = drop
        .iter()
        .filter(|c| !c.eq_ignore_ascii_case("ALL"))
        .map(norm)
        .collect();
    caps.retain(|c| !dropped.contains(c));
    caps
}

pub fn set_capabilities(spec: &mut Value, caps: &[String]) {
    let caps = json!(caps);
    spec["process"]["capabilities"] =
        json!({"bounding": caps, "effective": caps, "permitted": caps});
}

/// The process args from the CRI command/args and the image (containerd's
/// `getProcessArgs`... in `WithProcessArgs`).
pub fn process_args(command: &[String], args: &[String], image: &Value) -> Vec<String> {
    let (mut command, mut args) = (command.to_vec(), args.to_vec());
    if command.is_empty() {
        if args.is_empty() {
            args = strings(&image["Cmd"]);
        }
        command = strings(&image["Entrypoint"]);
    }
    command.extend(args);
    command
}

pub fn image_env(image: &Value) -> Vec<String> {
    strings(&image["Env"])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_scores_are_restricted_to_the_daemons_own() {
        let own: i64 = std::fs::read_to_string("/proc/self/oom_score_adj")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(oom_score_adj(-998, false), -998);
        assert_eq!(oom_score_adj(-998, true), own.max(-998));
        assert_eq!(oom_score_adj(1000, true), 1000);
    }

    /// GHSA-7ww5-4wqc-m92c for CRI containers and pauses too: the default spec masks
    /// the RAPL powercap counters (`berth run`'s and the CRI's share the list).
    #[test]
    fn default_spec_masks_powercap() {
        let s = base_spec("k8s.io", "x");
        let masked: Vec<&str> = s["linux"]["maskedPaths"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap())
            .collect();
        assert!(
            masked.contains(&"/sys/devices/virtual/powercap"),
            "{masked:?}"
        );
        assert!(masked.contains(&"/proc/kcore"), "{masked:?}");
    }

    #[test]
    fn capabilities_add_drop_all() {
        let caps = capabilities(&["NET_ADMIN".into()], &["CAP_KILL".into()]);
        assert!(caps.contains(&"CAP_NET_ADMIN".to_string()));
        assert!(!caps.contains(&"CAP_KILL".to_string()));
        assert_eq!(capabilities(&[], &["ALL".into()]), Vec::<String>::new());
        assert_eq!(capabilities(&["ALL".into()], &[]).len(), ALL_CAPS.len());
    }

    #[test]
    fn args_follow_containerd() {
        let image = json!({"Entrypoint": ["/e"], "Cmd": ["c"]});
        assert_eq!(process_args(&[], &[], &image), ["/e", "c"]);
        assert_eq!(process_args(&[], &["a".into()], &image), ["/e", "a"]);
        assert_eq!(process_args(&["x".into()], &[], &image), ["x"]);
        assert_eq!(cgroups_path("/kubepods", "id"), "/kubepods/id");
        assert_eq!(cgroups_path("k.slice", "id"), "k.slice:cri-containerd:id");
    }

    #[test]
    fn users_from_passwd_and_group() {
        let passwd = "root:x:0:0::/:/bin/sh\nu:x:1000:100::/:/bin/sh\n";
        assert_eq!(
            passwd_lookup(passwd, Some("u"), None),
            Ok(Some((1000, 100)))
        );
        assert_eq!(passwd_lookup(passwd, None, Some(0)), Ok(Some((0, 0))));
        assert_eq!(passwd_lookup(passwd, Some("x"), None), Ok(None));
        // IDs beyond 2^31-1 are errors, never wrapped to root (CVE-2024-40635).
        let wide = "w:x:4294967296:0::/:/bin/sh\ng:x:1000:4294967296::/:/bin/sh\n";
        assert!(passwd_lookup(wide, Some("w"), None).is_err());
        assert!(passwd_lookup(wide, None, Some(1000)).is_err());
        assert_eq!(member_groups("g:x:5:u,v\nh:x:6:v\n", "u"), vec![5]);
    }
}
