//! The shim manager against the stock `containerd-shim-runc-v2`, without a daemon: create,
//! start, wait, exec, kill, delete, reconnect after the manager is gone, cleanup after a
//! dead shim, and bad input.

mod common;

use berth_core::error::ErrorKind;
use berth_core::events::Exchange;
use berth_core::runtime::{CreateOpts, IoConfig, Runtime, TaskStatus};
use berth_runtime::{ManagerConfig, ShimManager};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

struct Fixture {
    dir: tempfile::TempDir,
    events: Exchange,
    ns: String,
    cgroup_parent: String,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::Builder::new()
            .prefix("brt-")
            .tempdir_in("/tmp")
            .unwrap();
        common::busybox_rootfs(dir.path());
        let ns = format!("brt{}", std::process::id());
        // Per fixture, not per process: a fixture's cleanup removes the whole tree while
        // the other tests of this process may be creating containers in theirs.
        let cgroup_parent = format!(
            "/berth-test-{}",
            dir.path().file_name().unwrap().to_string_lossy()
        );
        Fixture {
            dir,
            events: Exchange::new(),
            ns,
            cgroup_parent,
        }
    }

    fn manager(&self) -> ShimManager {
        let d = self.dir.path();
        ShimManager::new(
            ManagerConfig {
                state: d.join("state"),
                root: d.join("root"),
                // Unique per fixture: the stock shim hashes it into its socket path.
                grpc_address: d.join("nobody.sock").display().to_string(),
                ttrpc_address: d.join("nobody.sock.ttrpc").display().to_string(),
                publish_binary: "/bin/true".into(),
                shim_dirs: vec![],
                debug: false,
                sched_core: false,
                berth_serves_runc_v2: false,
                v1: None,
            },
            Arc::new(self.events.clone()),
        )
    }

    fn opts(&self, args: &[&str], name: &str) -> CreateOpts {
        let out = self.dir.path().join(format!("{name}.out"));
        CreateOpts {
            spec: common::spec(
                &self.dir.path().join("rootfs"),
                args,
                &format!("{}/{name}", self.cgroup_parent),
            ),
            io: IoConfig {
                stdin: String::new(),
                stdout: format!("file://{}", out.display()),
                stderr: format!("file://{}", out.display()),
                terminal: false,
            },
            runtime: "io.containerd.runc.v2".into(),
            ..Default::default()
        }
    }

    fn output(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.out"))).unwrap_or_default()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        berth_testkit::kill_processes_under(self.dir.path());
        for suffix in ["", "b", "d"] {
            berth_testkit::remove_runtime_leftovers(
                &format!("{}{suffix}", self.ns),
                &self.cgroup_parent,
            );
        }
    }
}

fn bundle_count(dir: &Path, ns: &str) -> usize {
    std::fs::read_dir(dir.join("state").join(ns))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_wait_exec_kill_delete_and_reconnect() {
    if !common::can_run() {
        return;
    }
    let f = Fixture::new();
    let m = f.manager();
    let ns = f.ns.clone();

    // A short task: its output and exit code come back.
    let t = m
        .create(
            &ns,
            "hello",
            f.opts(&["sh", "-c", "echo hi; exit 3"], "hello"),
        )
        .await
        .unwrap();
    let pid = t.start("").await.unwrap();
    assert!(pid > 0);
    let exit = t.wait("").await.unwrap();
    assert_eq!(exit.status, 3);
    assert_eq!(f.output("hello"), "hi\n");
    assert_eq!(t.state("").await.unwrap().status, TaskStatus::Stopped);
    let exit = m.delete(&ns, "hello").await.unwrap();
    assert_eq!(exit.status, 3);
    assert_eq!(bundle_count(f.dir.path(), &ns), 0);
    assert!(
        m.get(&ns, "hello")
            .await
            .unwrap_err()
            .is(ErrorKind::NotFound)
    );

    // A long-running task: exec, pids, pause/resume, kill.
    let t = m
        .create(&ns, "sleeper", f.opts(&["sleep", "1000"], "sleeper"))
        .await
        .unwrap();
    t.start("").await.unwrap();
    let dup = m
        .create(&ns, "sleeper", f.opts(&["sleep", "1"], "dup"))
        .await
        .unwrap_err();
    assert!(dup.is(ErrorKind::AlreadyExists), "{dup}");
    let exec_spec = prost_types::Any {
        type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".into(),
        value: serde_json::to_vec(&serde_json::json!({
            "args": ["sh", "-c", "echo from-exec"], "cwd": "/", "env": ["PATH=/bin"],
            "user": {"uid": 0, "gid": 0}
        }))
        .unwrap(),
    };
    let exec_io = IoConfig {
        stdout: format!("file://{}", f.dir.path().join("exec.out").display()),
        stderr: format!("file://{}", f.dir.path().join("exec.out").display()),
        ..Default::default()
    };
    t.exec("e1", exec_io.clone(), exec_spec.clone())
        .await
        .unwrap();
    let reuse = t.exec("e1", exec_io, exec_spec).await.unwrap_err();
    assert!(reuse.is(ErrorKind::AlreadyExists), "{reuse}");
    t.start("e1").await.unwrap();
    assert_eq!(t.wait("e1").await.unwrap().status, 0);
    t.delete_process("e1").await.unwrap();
    assert_eq!(f.output("exec"), "from-exec\n");
    assert!(!t.pids().await.unwrap().is_empty());
    t.pause().await.unwrap();
    assert_eq!(t.state("").await.unwrap().status, TaskStatus::Paused);
    t.resume().await.unwrap();
    assert!(t.stats().await.unwrap().type_url.contains("cgroups"));

    // The manager goes away (daemon crash); a new one reconnects to the live shim.
    drop(t);
    drop(m);
    let m = f.manager();
    m.load_existing().await;
    let t = m.get(&ns, "sleeper").await.unwrap();
    assert_eq!(t.state("").await.unwrap().status, TaskStatus::Running);
    t.kill("", 9, false).await.unwrap();
    assert_eq!(t.wait("").await.unwrap().status, 137);
    let killed = t.kill("", 9, false).await.unwrap_err();
    assert!(killed.is(ErrorKind::NotFound), "{killed}");
    m.delete(&ns, "sleeper").await.unwrap();
    assert_eq!(bundle_count(f.dir.path(), &ns), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_shims_are_cleaned_up_and_their_exit_reported() {
    if !common::can_run() {
        return;
    }
    let f = Fixture::new();
    let m = f.manager();
    let ns = format!("{}d", f.ns);
    let mut events = f.events.subscribe();
    let t = m
        .create(&ns, "victim", f.opts(&["sleep", "1000"], "victim"))
        .await
        .unwrap();
    t.start("").await.unwrap();
    let task_pid = t.pid().await.unwrap();
    let bundle = f.dir.path().join("state").join(&ns).join("victim");
    let shim_pid: i32 = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .find(|pid| {
            std::fs::read_link(format!("/proc/{pid}/cwd"))
                .ok()
                .as_deref()
                == Some(bundle.as_path())
                && std::fs::read_link(format!("/proc/{pid}/exe"))
                    .map(|e| e.ends_with("containerd-shim-runc-v2"))
                    .unwrap_or(false)
        })
        .expect("the shim process");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // The watcher runs `shim delete` (which kills the container) and reports the exit.
    let envelope = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let e = events.recv().await.unwrap();
            if e.topic == "/tasks/exit" {
                return e;
            }
        }
    })
    .await
    .expect("a /tasks/exit event");
    assert_eq!(envelope.namespace, ns);
    let exit: berth_api::containerd::events::TaskExit =
        berth_api::any::unpack(&envelope.event).unwrap();
    assert_eq!(exit.container_id, "victim");
    // Give the cleanup a moment to remove the bundle.
    for _ in 0..50 {
        if bundle_count(f.dir.path(), &ns) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(bundle_count(f.dir.path(), &ns), 0);
    assert!(m.get(&ns, "victim").await.is_err());
    // The container's process was killed by `shim delete` (it may linger as a zombie of
    // PID 1, which is not ours to reap).
    let gone = || berth_testkit::process_gone(task_pid);
    for _ in 0..50 {
        if gone() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone(), "container process {task_pid} still running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_without_leaks() {
    if !common::can_run() {
        return;
    }
    let f = Fixture::new();
    let m = f.manager();
    let ns = format!("{}b", f.ns);

    let mut opts = f.opts(&["true"], "badjson");
    opts.spec = b"{not json".to_vec();
    let err = m.create(&ns, "badjson", opts).await.unwrap_err();
    assert!(err.is(ErrorKind::InvalidArgument), "{err}");

    let mut opts = f.opts(&["true"], "nort");
    opts.runtime = "io.containerd.nope.v9".into();
    let err = m.create(&ns, "nort", opts).await.unwrap_err();
    assert!(err.is(ErrorKind::NotFound), "{err}");
    assert!(err.to_string().contains("containerd-shim-nope-v9"), "{err}");

    let mut opts = f.opts(&["true"], "norootfs");
    opts.spec = common::spec(
        &f.dir.path().join("missing"),
        &["true"],
        &format!("{}/x", f.cgroup_parent),
    );
    let err = m.create(&ns, "norootfs", opts).await.unwrap_err();
    assert!(!err.to_string().is_empty());
    assert_eq!(bundle_count(f.dir.path(), &ns), 0);
    assert!(m.tasks(&ns).await.unwrap().is_empty());
}
