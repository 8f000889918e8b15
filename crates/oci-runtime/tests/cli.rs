//! berth-runc driven the way a shim drives runc: a real bundle (busybox from Debian's
//! busybox-static, config.json from `runc spec`), real namespaces, mounts and cgroups.
//! Needs root.

use berth_testkit::process_gone;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BERTH_RUNC: &str = env!("CARGO_BIN_EXE_berth-runc");

struct Bundle {
    dir: tempfile::TempDir,
    cgroup: String,
}

impl Bundle {
    /// A bundle running `args`, with a private state root and cgroup.
    fn new(args: &[&str], edit: impl FnOnce(&mut serde_json::Value)) -> Bundle {
        assert!(
            nix_is_root(),
            "berth-runc's tests need root (namespaces, mounts, cgroups)"
        );
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("rootfs/bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::copy("/bin/busybox", bin.join("busybox")).expect("busybox-static installed");
        for applet in ["sh", "echo", "sleep", "cat", "grep", "true"] {
            std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
        }
        let o = Command::new("runc")
            .args(["spec", "--bundle"])
            .arg(dir.path())
            .output()
            .expect("runc installed (scripts/install-deps)");
        assert!(o.status.success(), "runc spec: {o:?}");
        let path = dir.path().join("config.json");
        let mut spec: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        // One level, unique to the bundle: deleting the container removes all of it.
        let cgroup = format!(
            "/berth-runc-test-{}",
            dir.path().file_name().unwrap().to_string_lossy()
        );
        spec["process"]["terminal"] = false.into();
        spec["process"]["args"] = args.into();
        spec["linux"]["cgroupsPath"] = cgroup.clone().into();
        edit(&mut spec);
        std::fs::write(&path, serde_json::to_vec(&spec).unwrap()).unwrap();
        Bundle { dir, cgroup }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `berth-runc --root STATE --log LOG --log-format json ARGS…` with `stdout` as the
    /// container's standard output when given.
    fn run(&self, args: &[&str], stdout: Option<File>) -> Output {
        let mut c = Command::new(BERTH_RUNC);
        c.arg("--root")
            .arg(self.path("state"))
            .arg("--log")
            .arg(self.path("log.json"))
            .args(["--log-format", "json"])
            .args(args)
            .stdin(Stdio::null());
        match stdout {
            Some(f) => {
                c.stdout(f).stderr(Stdio::null());
                let status = c.status().unwrap();
                Output {
                    status,
                    stdout: vec![],
                    stderr: vec![],
                }
            }
            None => c.output().unwrap(),
        }
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args, None);
        assert!(
            o.status.success(),
            "berth-runc {args:?}: {}\nlog: {}",
            String::from_utf8_lossy(&o.stderr),
            std::fs::read_to_string(self.path("log.json")).unwrap_or_default()
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn create(&self, id: &str, stdout: File) -> u32 {
        let bundle = self.dir.path().to_string_lossy().into_owned();
        let pid_file = self.path(&format!("{id}.pid"));
        let o = self.run(
            &[
                "create",
                "--bundle",
                &bundle,
                "--pid-file",
                &pid_file.to_string_lossy(),
                id,
            ],
            Some(stdout),
        );
        assert!(
            o.status.success(),
            "create: {}",
            std::fs::read_to_string(self.path("log.json")).unwrap_or_default()
        );
        std::fs::read_to_string(pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    fn cgroup_file(&self, controller: &str, file: &str) -> String {
        std::fs::read_to_string(format!("/sys/fs/cgroup/{controller}{}/{file}", self.cgroup))
            .unwrap_or_default()
    }
}

impl Drop for Bundle {
    fn drop(&mut self) {
        // Best effort for a failed test: whatever is left is removed like the shim would.
        if let Ok(dirs) = std::fs::read_dir(self.path("state")) {
            for d in dirs.flatten() {
                let id = d.file_name().to_string_lossy().into_owned();
                let _ = self.run(&["delete", "--force", &id], None);
            }
        }
    }
}

fn nix_is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let t = Instant::now();
    while !done() {
        assert!(t.elapsed() < Duration::from_secs(10), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn create_start_delete_like_runc() {
    let b = Bundle::new(&["sh", "-c", "echo hi from berth-runc"], |_| {});
    let out = b.path("out");
    let pid = b.create("c1", File::create(&out).unwrap());
    assert!(!process_gone(pid), "init {pid} must wait for start");
    assert!(
        b.cgroup_file("memory", "cgroup.procs")
            .contains(&pid.to_string()),
        "init {pid} not in its cgroup {}",
        b.cgroup
    );
    // Every hierarchy, as with runc: the v1 controllers, named ones (name=systemd) and a
    // hybrid host's unified one (`0::`).
    let placement = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    for line in placement.lines() {
        assert!(
            line.ends_with(&format!(":{}", b.cgroup)),
            "{line} in\n{placement}"
        );
    }
    b.ok(&["start", "c1"]);
    wait_until("the container's process exits", || process_gone(pid));
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "hi from berth-runc\n"
    );
    b.ok(&["delete", "c1"]);
    for hierarchy in ["systemd", "unified"] {
        let left = format!("/sys/fs/cgroup/{hierarchy}{}", b.cgroup);
        assert!(!Path::new(&left).exists(), "{left} left behind");
    }
    assert!(!b.path("state/c1").exists());
    assert!(
        !Path::new(&format!("/sys/fs/cgroup/memory{}", b.cgroup)).exists(),
        "cgroup left behind"
    );
}

/// runc brings `lo` up in the network namespace it creates, so a container can use
/// 127.0.0.1 from its first instruction; libcontainer leaves it down, berth-runc does
/// what runc does.
#[test]
fn the_new_network_namespace_has_loopback_up() {
    let b = Bundle::new(&["sh", "-c", "cat /sys/class/net/lo/flags"], |spec| {
        let namespaces = spec["linux"]["namespaces"].as_array().unwrap();
        assert!(
            namespaces.iter().any(|n| n["type"] == "network"),
            "runc spec's default has a network namespace"
        );
    });
    let out = b.path("out");
    let pid = b.create("lo1", File::create(&out).unwrap());
    b.ok(&["start", "lo1"]);
    wait_until("the container's process exits", || process_gone(pid));
    let flags = std::fs::read_to_string(&out).unwrap();
    let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap();
    assert_eq!(
        flags & libc::IFF_UP as u32,
        libc::IFF_UP as u32,
        "lo is down: {flags:#x}"
    );
    b.ok(&["delete", "lo1"]);
}

/// `state` and `list`, which operators run against a runtime's root, in runc's shapes.
#[test]
fn state_and_list_like_runc() {
    let b = Bundle::new(&["sleep", "30"], |_| {});
    let pid = b.create("s1", File::create(b.path("out")).unwrap());
    let state: serde_json::Value = serde_json::from_str(&b.ok(&["state", "s1"])).unwrap();
    assert_eq!(state["id"], "s1");
    assert_eq!(state["status"], "created");
    assert_eq!(state["pid"], pid);
    assert_eq!(state["bundle"], b.dir.path().to_string_lossy().as_ref());
    assert!(
        state["rootfs"].as_str().unwrap().ends_with("rootfs"),
        "{state}"
    );
    assert!(
        state["created"].as_str().is_some_and(|c| c.contains('T')),
        "{state}"
    );
    assert_eq!(state["owner"], "root");

    b.ok(&["start", "s1"]);
    let table = b.ok(&["list"]);
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER"]
    );
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        row[..3],
        ["s1", pid.to_string().as_str(), "running"],
        "{table}"
    );
    assert_eq!(b.ok(&["list", "-q"]), "s1\n");
    let json: serde_json::Value =
        serde_json::from_str(&b.ok(&["list", "--format", "json"])).unwrap();
    assert_eq!(json[0]["id"], "s1");
    assert_eq!(json[0]["status"], "running");

    b.ok(&["kill", "s1", "KILL"]);
    wait_until("the container's process exits", || process_gone(pid));
    b.ok(&["delete", "s1"]);
    assert_eq!(b.ok(&["list", "-q"]), "");
    let o = b.run(&["state", "s1"], None);
    assert!(!o.status.success(), "state of a deleted container");
}

#[test]
fn exec_ps_pause_resume_update_kill() {
    let b = Bundle::new(&["sleep", "1000"], |_| {});
    let pid = b.create("c2", File::create(b.path("out")).unwrap());
    b.ok(&["start", "c2"]);

    let ps = b.ok(&["ps", "--format", "json", "c2"]);
    assert!(ps.contains(&pid.to_string()), "{ps}");

    let process = b.path("exec.json");
    let spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(b.path("config.json")).unwrap()).unwrap();
    let mut p = spec["process"].clone();
    p["args"] = ["sh", "-c", "echo in-exec; cat /proc/self/cgroup"].into();
    std::fs::write(&process, serde_json::to_vec(&p).unwrap()).unwrap();
    let exec_out = b.path("exec.out");
    let o = b.run(
        &[
            "exec",
            "--detach",
            "--pid-file",
            &b.path("exec.pid").to_string_lossy(),
            "--process",
            &process.to_string_lossy(),
            "c2",
        ],
        Some(File::create(&exec_out).unwrap()),
    );
    assert!(o.status.success(), "exec failed");
    let exec_pid: u32 = std::fs::read_to_string(b.path("exec.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    wait_until("the exec'd process exits", || process_gone(exec_pid));
    let text = std::fs::read_to_string(&exec_out).unwrap();
    assert!(text.starts_with("in-exec\n"), "{text}");
    let placement: Vec<&str> = text.lines().skip(1).collect();
    assert!(
        !placement.is_empty()
            && placement
                .iter()
                .all(|l| l.ends_with(&format!(":{}", b.cgroup))),
        "exec not in the container's cgroup in every hierarchy: {text}"
    );

    b.ok(&["pause", "c2"]);
    assert_eq!(b.cgroup_file("freezer", "freezer.state").trim(), "FROZEN");
    b.ok(&["resume", "c2"]);
    assert_eq!(b.cgroup_file("freezer", "freezer.state").trim(), "THAWED");

    let resources = b.path("resources.json");
    std::fs::write(
        &resources,
        br#"{"memory":{"limit":67108864},"pids":{"limit":50}}"#,
    )
    .unwrap();
    b.ok(&["update", "--resources", &resources.to_string_lossy(), "c2"]);
    assert_eq!(
        b.cgroup_file("memory", "memory.limit_in_bytes").trim(),
        "67108864"
    );
    assert_eq!(b.cgroup_file("pids", "pids.max").trim(), "50");

    b.ok(&["kill", "c2", "9"]);
    wait_until("the container stops", || process_gone(pid));
    let o = b.run(&["kill", "c2", "KILL"], None);
    assert!(!o.status.success(), "killing a stopped container must fail");
    b.ok(&["delete", "c2"]);
}

/// CVE-2019-5736 (runc): a process in the container holds the init's /proc/PID/exe
/// (O_PATH) and, once the runtime has exited, reopens it for writing to replace the
/// host's runtime binary. Here the reopen must fail because the view is read-only (or a
/// sealed copy), not merely because something still runs it.
#[test]
fn the_init_cannot_be_used_to_overwrite_the_host_binary() {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let b = Bundle::new(&["true"], |_| {});
    let pid = b.create("c3", File::create(b.path("out")).unwrap());
    let handle = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(format!("/proc/{pid}/exe"))
        .unwrap();
    b.ok(&["delete", "--force", "c3"]);
    wait_until("the init is killed", || process_gone(pid));
    let reopen = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/self/fd/{}", handle.as_raw_fd()));
    let e = reopen.expect_err("the host's berth-runc could be opened for writing");
    assert!(
        matches!(e.raw_os_error(), Some(libc::EROFS) | Some(libc::EPERM)),
        "reopen failed for another reason: {e}"
    );
    let exe = std::fs::metadata(format!("/proc/self/fd/{}", handle.as_raw_fd())).unwrap();
    let host = std::fs::metadata(BERTH_RUNC).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_ne!((exe.dev(), exe.ino()), (host.dev(), host.ino()));
}

#[test]
fn what_it_cannot_enforce_is_refused_not_skipped() {
    let b = Bundle::new(&["true"], |spec| {
        spec["linux"]["seccomp"] = serde_json::json!({"defaultAction": "SCMP_ACT_ERRNO"});
    });
    let o = b.run(
        &["create", "--bundle", &b.dir.path().to_string_lossy(), "c4"],
        None,
    );
    assert_eq!(o.status.code(), Some(1));
    let log = std::fs::read_to_string(b.path("log.json")).unwrap();
    assert!(
        log.contains("\"level\":\"error\"") && log.contains("seccomp"),
        "{log}"
    );
    assert!(
        !b.path("state/c4").exists(),
        "state left for a refused create"
    );
}

/// libcontainer applies mount propagation differently from runc (the root's always
/// recursively, a mount option's not at all), so both kinds are refused.
#[test]
fn mount_propagation_is_refused_not_applied_differently() {
    for (id, edit) in [
        ("p1", serde_json::json!({"rootfs": "rslave"})),
        ("p2", serde_json::json!({"mount": "rshared"})),
    ] {
        let b = Bundle::new(&["true"], |spec| {
            if let Some(p) = edit.get("rootfs") {
                spec["linux"]["rootfsPropagation"] = p.clone();
            }
            if let Some(o) = edit.get("mount") {
                spec["mounts"]
                    .as_array_mut()
                    .unwrap()
                    .push(serde_json::json!({
                        "destination": "/mnt",
                        "type": "bind",
                        "source": "/tmp",
                        "options": ["rbind", o]
                    }));
            }
        });
        let o = b.run(
            &["create", "--bundle", &b.dir.path().to_string_lossy(), id],
            None,
        );
        assert_eq!(o.status.code(), Some(1), "{id}");
        let log = std::fs::read_to_string(b.path("log.json")).unwrap();
        assert!(log.contains("propagation"), "{id}: {log}");
        assert!(!b.path(&format!("state/{id}")).exists(), "{id}: state left");
    }
}

#[test]
fn errors_name_the_container_and_the_problem() {
    let b = Bundle::new(&["true"], |_| {});
    let o = b.run(&["start", "nope"], None);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("container nope does not exist"),
        "{o:?}"
    );
    let log = std::fs::read_to_string(b.path("log.json")).unwrap();
    let line: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert_eq!(line["level"], "error");
    assert_eq!(line["msg"], "container nope does not exist");
    let o = b.run(&["checkpoint", "x"], None);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not supported"),
        "{o:?}"
    );
    let o = b.run(&["--systemd-cgroup", "start", "x"], None);
    assert_eq!(o.status.code(), Some(2));
    let o = b.run(&["kill", "nope", "SIGNOPE"], None);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("SIGNOPE"),
        "{o:?}"
    );
}
