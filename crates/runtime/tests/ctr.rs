//! End to end with the stock `ctr` against a private berthd: `ctr run --rootfs` with the
//! stock runc shim (and Berth's shim when it is built), task commands, errors, a daemon
//! crash with running containers, the restart monitor and the runtime v1 mapping.

mod common;

use berth_testkit::Daemon;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

struct Env {
    daemon: Daemon,
    ns: String,
    rootfs: PathBuf,
}

impl Env {
    fn start(tag: &str, extra_config: &str) -> Env {
        let daemon = Daemon::start_with_config(extra_config);
        let rootfs = common::busybox_rootfs(daemon.dir.path());
        Env {
            ns: format!("rt{tag}{}", std::process::id()),
            daemon,
            rootfs,
        }
    }

    fn args<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut all = vec!["-n", self.ns.as_str()];
        all.extend_from_slice(args);
        all
    }

    fn ok(&self, args: &[&str]) -> String {
        self.daemon.ctr_ok(&self.args(args))
    }

    fn err(&self, args: &[&str]) -> String {
        self.daemon.ctr_err(&self.args(args))
    }

    fn run_d(&self, id: &str, cmd: &[&str]) {
        let rootfs = self.rootfs.to_str().unwrap();
        let mut args = vec!["run", "-d", "--rootfs", rootfs, id];
        args.extend_from_slice(cmd);
        self.ok(&args);
    }

    /// `task ls` as (id, status) pairs.
    fn tasks(&self) -> Vec<(String, String)> {
        self.ok(&["task", "ls"])
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() >= 3).then(|| (f[0].to_string(), f[2].to_string()))
            })
            .collect()
    }

    fn status(&self, id: &str) -> Option<String> {
        self.tasks()
            .into_iter()
            .find(|(t, _)| t == id)
            .map(|(_, s)| s)
    }

    fn wait_status(&self, id: &str, want: Option<&str>, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.status(id);
            if got.as_deref() == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "task {id}: {got:?}, want {want:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn init_pid(&self, id: &str) -> i32 {
        self.ok(&["task", "ls"])
            .lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|p| p.parse().ok())
            .expect("task pid")
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        berth_testkit::kill_processes_under(self.daemon.dir.path());
        berth_testkit::remove_namespace_leftovers(&self.ns);
    }
}

fn no_leftovers(env: &Env) {
    let bundles = env
        .daemon
        .state
        .join("io.containerd.runtime.v2.task")
        .join(&env.ns);
    let left: Vec<_> = std::fs::read_dir(&bundles)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "bundles left: {left:?}");
    let shims = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read_link(e.path().join("cwd"))
                .map(|p| p.starts_with(&bundles))
                .unwrap_or(false)
        })
        .count();
    assert_eq!(shims, 0, "shim processes left");
}

#[test]
fn run_exec_signal_pause_and_delete_with_the_runc_shim() {
    if !common::can_run() {
        return;
    }
    let env = Env::start("a", CONTAINERDS_RUNC_SHIM);
    let rootfs = env.rootfs.to_str().unwrap();

    let out = env.ok(&[
        "run",
        "--rm",
        "--rootfs",
        rootfs,
        "hello",
        "/bin/echo",
        "hi",
    ]);
    assert_eq!(out, "hi\n");
    let status = env.daemon.ctr(&env.args(&[
        "run", "--rm", "--rootfs", rootfs, "three", "/bin/sh", "-c", "exit 3",
    ]));
    assert_eq!(status.status.code(), Some(3));

    // `run -t`: the process gets a pty (ctr needs a terminal of its own: `script`).
    if berth_testkit::have("script") {
        let command = format!(
            "ctr --address {} -n {} run --rm -t --rootfs {rootfs} tty1 /bin/sh -c tty",
            env.daemon.socket.display(),
            env.ns
        );
        let out = std::process::Command::new("script")
            .args(["-qec", &command, "/dev/null"])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("/dev/pts/"),
            "{out:?}"
        );
    } else {
        eprintln!("SKIP run -t: `script` (bsdutils) is not installed");
    }

    env.run_d("sleeper", &["/bin/sleep", "1000"]);
    assert_eq!(env.status("sleeper").as_deref(), Some("RUNNING"));
    let pid = env.init_pid("sleeper");
    assert!(
        env.ok(&["task", "ps", "sleeper"])
            .contains(&pid.to_string())
    );
    let out = env.ok(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        "sleeper",
        "/bin/echo",
        "from-exec",
    ]);
    assert_eq!(out, "from-exec\n");
    // A running exec ID cannot be reused.
    env.ok(&[
        "task",
        "exec",
        "-d",
        "--exec-id",
        "e2",
        "sleeper",
        "/bin/sleep",
        "1000",
    ]);
    let err = env.err(&["task", "exec", "--exec-id", "e2", "sleeper", "/bin/true"]);
    assert!(err.contains("already exists"), "{err}");
    env.ok(&["task", "kill", "--exec-id", "e2", "-s", "KILL", "sleeper"]);

    env.ok(&["task", "pause", "sleeper"]);
    assert_eq!(env.status("sleeper").as_deref(), Some("PAUSED"));
    env.ok(&["task", "resume", "sleeper"]);
    assert_eq!(env.status("sleeper").as_deref(), Some("RUNNING"));
    let metrics = env.ok(&["task", "metrics", "sleeper"]);
    assert!(metrics.contains("memory"), "{metrics}");

    env.ok(&["task", "kill", "-s", "KILL", "sleeper"]);
    env.wait_status("sleeper", Some("STOPPED"), Duration::from_secs(10));
    let err = env.err(&["task", "kill", "sleeper"]);
    assert!(err.contains("not found"), "{err}");
    let out = env.daemon.ctr(&env.args(&["task", "delete", "sleeper"]));
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("137"));
    env.ok(&["container", "rm", "sleeper"]);
    assert!(env.tasks().is_empty());
    no_leftovers(&env);
}

#[test]
fn bad_input_gives_containerd_errors_and_leaks_nothing() {
    if !common::can_run() {
        return;
    }
    let env = Env::start("b", "");
    let rootfs = env.rootfs.to_str().unwrap();

    let err = env.err(&[
        "run",
        "--rm",
        "--rootfs",
        "/nonexistent/rootfs",
        "norootfs",
        "/bin/true",
    ]);
    assert!(err.contains("failed to create shim task"), "{err}");

    let err = env.err(&[
        "run",
        "--rm",
        "--runtime",
        "io.containerd.nope.v1",
        "--rootfs",
        rootfs,
        "nort",
        "/bin/true",
    ]);
    assert!(err.contains("containerd-shim-nope-v1"), "{err}");

    env.run_d("dup", &["/bin/sleep", "1000"]);
    let err = env.err(&["run", "-d", "--rootfs", rootfs, "dup", "/bin/true"]);
    assert!(err.contains("already exists"), "{err}");
    env.ok(&["task", "kill", "-s", "KILL", "dup"]);
    env.wait_status("dup", Some("STOPPED"), Duration::from_secs(10));
    env.ok(&["task", "delete", "dup"]);

    let err = env.err(&["task", "start", "nosuch"]);
    assert!(err.contains("not found"), "{err}");
    let err = env.err(&["task", "checkpoint", "dup"]);
    assert!(err.contains("not found"), "{err}");

    for id in ["norootfs", "nort", "dup"] {
        let _ = env.daemon.ctr(&env.args(&["container", "rm", id]));
    }
    assert!(env.ok(&["container", "ls", "-q"]).trim().is_empty());
    no_leftovers(&env);
}

#[test]
fn containers_survive_a_daemon_crash() {
    if !common::can_run() {
        return;
    }
    const N: usize = 10;
    let mut env = Env::start("c", "");
    for i in 0..N {
        env.run_d(&format!("c{i}"), &["/bin/sleep", "1000"]);
    }
    let victim = env.init_pid("c0");
    env.daemon.kill9();
    // An exit while the daemon is down.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    env.daemon
        .spawn()
        .unwrap_or_else(|log| panic!("berthd did not restart:\n{log}"));

    let tasks = env.tasks();
    assert_eq!(tasks.len(), N, "{tasks:?}");
    for (id, status) in &tasks {
        let want = if id == "c0" { "STOPPED" } else { "RUNNING" };
        assert_eq!(status, want, "{id}");
    }
    let out = env.daemon.ctr(&env.args(&["task", "delete", "c0"]));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("137"),
        "{out:?}"
    );
    assert_eq!(
        env.ok(&["task", "exec", "--exec-id", "x", "c1", "/bin/echo", "ok"]),
        "ok\n"
    );
    for i in 1..N {
        env.ok(&["task", "kill", "-s", "KILL", &format!("c{i}")]);
    }
    for i in 1..N {
        let id = format!("c{i}");
        env.wait_status(&id, Some("STOPPED"), Duration::from_secs(10));
        env.ok(&["task", "delete", &id]);
    }
    for i in 0..N {
        env.ok(&["container", "rm", &format!("c{i}")]);
    }
    no_leftovers(&env);
}

#[test]
fn restart_monitor_brings_labelled_containers_to_their_state() {
    if !common::can_run() {
        return;
    }
    let env = Env::start(
        "d",
        "[plugins.\"io.containerd.internal.v1.restart\"]\n  interval = \"300ms\"\n",
    );
    let rootfs = env.rootfs.to_str().unwrap();
    env.ok(&[
        "run",
        "-d",
        "--label",
        "containerd.io/restart.status=running",
        "--rootfs",
        rootfs,
        "r1",
        "/bin/sleep",
        "1000",
    ]);
    let first = env.init_pid("r1");
    env.ok(&["task", "kill", "-s", "KILL", "r1"]);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if env.status("r1").as_deref() == Some("RUNNING") && env.init_pid("r1") != first {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "r1 was not restarted: {:?}",
            env.tasks()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    env.ok(&[
        "container",
        "label",
        "r1",
        "containerd.io/restart.status=stopped",
    ]);
    env.wait_status("r1", None, Duration::from_secs(15));
    env.ok(&["container", "rm", "r1"]);
    no_leftovers(&env);
}

#[test]
fn runtime_v1_config_maps_onto_the_runc_v2_shim() {
    if !common::can_run() {
        return;
    }
    let env = Env::start(
        "e",
        "[plugins.\"io.containerd.runtime.v1.linux\"]\n  runtime = \"runc\"\n  no_shim = true\n",
    );
    let log = env.daemon.log();
    assert!(
        log.contains("runtime v1 is deprecated") && log.contains("io.containerd.runc.v2"),
        "{log}"
    );
    let rootfs = env.rootfs.to_str().unwrap();
    let out = env.ok(&[
        "run",
        "--rm",
        "--runtime",
        "io.containerd.runtime.v1.linux",
        "--rootfs",
        rootfs,
        "v1",
        "/bin/echo",
        "v1",
    ]);
    assert_eq!(out, "v1\n");
    no_leftovers(&env);
}

/// berthd's config selecting containerd's `containerd-shim-runc-v2` for
/// `io.containerd.runc.v2` (by default Berth's shim serves it when installed).
const CONTAINERDS_RUNC_SHIM: &str =
    "[plugins.\"io.containerd.runtime.v2.task\"]\n  runc_shim = \"containerd\"\n";

#[test]
fn runc_v2_is_served_by_berths_shim_unless_configured() {
    if !common::can_run() {
        return;
    }
    assert!(
        berth_shim().is_some(),
        "containerd-shim-berth-v2 does not build"
    );
    for (tag, config, shim) in [
        ("h", "", "containerd-shim-berth-v2"),
        ("i", CONTAINERDS_RUNC_SHIM, "containerd-shim-runc-v2"),
    ] {
        let env = Env::start(tag, config);
        env.run_d("s", &["/bin/sleep", "1000"]);
        let recorded = std::fs::read_to_string(
            env.daemon
                .state
                .join("io.containerd.runtime.v2.task")
                .join(&env.ns)
                .join("s")
                .join("shim-binary-path"),
        )
        .unwrap();
        assert!(recorded.ends_with(shim), "{tag}: {recorded}");
        let info = env.ok(&["container", "info", "s"]);
        assert!(info.contains("io.containerd.runc.v2"), "{info}");
        env.ok(&["task", "kill", "-s", "KILL", "s"]);
        env.wait_status("s", Some("STOPPED"), Duration::from_secs(10));
        env.ok(&["task", "delete", "s"]);
        env.ok(&["container", "rm", "s"]);
        no_leftovers(&env);
    }
}

/// Builds Berth's shim next to berthd (where the runtime manager looks first).
fn berth_shim() -> Option<PathBuf> {
    let berthd = berth_testkit::berthd_binary();
    let status =
        std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args([
                "build",
                "--quiet",
                "-p",
                "berth-shim",
                "--bin",
                "containerd-shim-berth-v2",
            ])
            .current_dir(berth_testkit::workspace_root())
            .status()
            .ok()?;
    let shim = berthd.parent()?.join("containerd-shim-berth-v2");
    (status.success() && Path::new(&shim).exists()).then_some(shim)
}

#[test]
fn berth_shim_runs_tasks_under_berthd() {
    if !common::can_run() {
        return;
    }
    let Some(_shim) = berth_shim() else {
        eprintln!("SKIP: containerd-shim-berth-v2 does not build yet");
        return;
    };
    let env = Env::start("f", "");
    let rootfs = env.rootfs.to_str().unwrap();
    let rt = "io.containerd.berth.v2";
    let out = env.ok(&[
        "run",
        "--rm",
        "--runtime",
        rt,
        "--rootfs",
        rootfs,
        "b1",
        "/bin/echo",
        "hi",
    ]);
    assert_eq!(out, "hi\n");
    let status = env.daemon.ctr(&env.args(&[
        "run",
        "--rm",
        "--runtime",
        rt,
        "--rootfs",
        rootfs,
        "b2",
        "/bin/sh",
        "-c",
        "exit 3",
    ]));
    assert_eq!(status.status.code(), Some(3), "{status:?}");
    let rootfs_arg = rootfs.to_string();
    env.ok(&[
        "run",
        "-d",
        "--runtime",
        rt,
        "--rootfs",
        &rootfs_arg,
        "b3",
        "/bin/sleep",
        "1000",
    ]);
    assert_eq!(
        env.ok(&["task", "exec", "--exec-id", "x", "b3", "/bin/echo", "ok"]),
        "ok\n"
    );
    env.ok(&["task", "kill", "-s", "KILL", "b3"]);
    env.wait_status("b3", Some("STOPPED"), Duration::from_secs(10));
    env.ok(&["task", "delete", "b3"]);
    env.ok(&["container", "rm", "b3"]);
    no_leftovers(&env);
}

#[test]
fn images_from_the_fixture_builder_run() {
    if !common::can_run() {
        return;
    }
    let env = Env::start("g", "");
    let tar = berth_testkit::fixtures().join("busybox.oci.tar");
    env.ok(&["images", "import", tar.to_str().unwrap()]);
    let image = "import.local/busybox:latest";
    assert_eq!(
        env.ok(&["run", "--rm", image, "img1", "echo", "hi"]),
        "hi\n"
    );
    let out = env
        .daemon
        .ctr(&env.args(&["run", "--rm", image, "img2", "sh", "-c", "exit 3"]));
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    env.ok(&["run", "-d", image, "img3", "sleep", "1000"]);
    assert_eq!(
        env.ok(&[
            "task",
            "exec",
            "--exec-id",
            "x",
            "img3",
            "cat",
            "/proc/1/cmdline"
        ]),
        "sleep\u{0}1000\u{0}"
    );
    env.ok(&["task", "kill", "-s", "KILL", "img3"]);
    env.wait_status("img3", Some("STOPPED"), Duration::from_secs(10));
    env.ok(&["task", "delete", "img3"]);
    env.ok(&["container", "rm", "img3"]);
    // The containers' active snapshots are gone with them.
    let snapshots = env.ok(&["snapshots", "ls"]);
    assert!(!snapshots.contains("img"), "{snapshots}");
    env.ok(&["images", "rm", image]);
    no_leftovers(&env);
}
