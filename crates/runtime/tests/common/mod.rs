//! Helpers shared by the runtime's integration tests: a busybox rootfs and OCI specs.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// Whether the tests can run here: root, runc and the stock runc shim.
pub fn can_run() -> bool {
    let root = nix::unistd::geteuid().is_root();
    let tools = berth_testkit::have("runc") && berth_testkit::have("containerd-shim-runc-v2");
    if !(root && tools) {
        eprintln!("SKIP: needs root, runc and containerd-shim-runc-v2");
    }
    root && tools
}

/// A minimal rootfs: a static busybox with its applets linked in /bin.
pub fn busybox_rootfs(dir: &Path) -> PathBuf {
    let rootfs = dir.join("rootfs");
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("busybox-static installed");
    std::fs::copy(busybox, rootfs.join("bin/busybox")).unwrap();
    for applet in ["sh", "echo", "sleep", "true", "false", "cat", "ls", "ps"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    rootfs
}

/// An OCI runtime spec running `args` in `rootfs` (PID/IPC/UTS/mount namespaces).
pub fn spec(rootfs: &Path, args: &[&str], cgroup: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "ociVersion": "1.0.2-dev",
        "process": {
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/bin"],
            "cwd": "/",
            "capabilities": {
                "bounding": ["CAP_KILL", "CAP_CHOWN"],
                "effective": ["CAP_KILL", "CAP_CHOWN"],
                "permitted": ["CAP_KILL", "CAP_CHOWN"]
            },
            "noNewPrivileges": true
        },
        "root": {"path": rootfs, "readonly": false},
        "hostname": "berth-test",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}
        ],
        "linux": {
            "cgroupsPath": cgroup,
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "maskedPaths": ["/proc/kcore"],
            "readonlyPaths": ["/proc/sys"]
        }
    }))
    .unwrap()
}
