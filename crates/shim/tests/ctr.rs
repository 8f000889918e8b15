//! End-to-end tests of containerd-shim-berth-v2 under the real containerd 1.6, driven by
//! `ctr`, on the project's busybox fixture image (`tests/fixtures/build-images.sh`).
//!
//! Each test starts its own containerd ([`berth_testkit::refd::RefContainerd`]) on a private
//! temp dir, in a private mount namespace, and stops it and removes everything it made at the
//! end. The tests need root, containerd, ctr, runc, `script` and the fixture tools
//! (`scripts/install-deps`); when something is missing they fail and say what.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use berth_testkit::refd::RefContainerd;

const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-berth-v2");
const IMAGE: &str = "import.local/busybox:latest";

fn have(bin: &str) -> bool {
    berth_testkit::have(bin)
}

/// Fails the test, saying what to install, when the environment cannot run it.
fn require_env() {
    assert!(
        unsafe { libc::geteuid() } == 0,
        "the shim's ctr tests need root (run them as root, as CI does)"
    );
    for b in ["ctr", "runc", "timeout"] {
        assert!(
            have(b),
            "`{b}` not found in PATH: run scripts/install-deps (containerd, runc, coreutils)"
        );
    }
}

/// The fixture busybox archive, built once per target dir.
fn busybox_archive() -> PathBuf {
    static ARCHIVE: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut g = ARCHIVE.lock().unwrap_or_else(|e| e.into_inner());
    g.get_or_insert_with(|| berth_testkit::fixtures().join("busybox.oci.tar"))
        .clone()
}

struct Env {
    refd: RefContainerd,
    addr: String,
    fifo: String,
}

impl Env {
    fn new() -> Env {
        require_env();
        let archive = busybox_archive();
        // The daemon inherits PATH: put our shim first so that `io.containerd.berth.v2`
        // resolves to containerd-shim-berth-v2 from this build.
        let bindir = Path::new(SHIM).parent().unwrap();
        let refd = RefContainerd::start(&[bindir]);
        refd.import(&archive);
        Env {
            addr: refd.address(),
            fifo: refd.dir.path().join("fifo").to_string_lossy().into_owned(),
            refd,
        }
    }

    fn ctr_cmd(&self, args: &[&str]) -> Command {
        self.refd.ctr_command(args)
    }

    fn ctr(&self, args: &[&str]) -> Output {
        self.refd.ctr(args)
    }

    /// `ctr run --fifo-dir ... --runtime io.containerd.berth.v2 <extra> IMAGE id <cmd>`.
    fn run(&self, extra: &[&str], id: &str, cmd: &[&str]) -> Output {
        let mut a = vec![
            "run",
            "--fifo-dir",
            &self.fifo,
            "--runtime",
            "io.containerd.berth.v2",
        ];
        a.extend_from_slice(extra);
        a.push(IMAGE);
        a.push(id);
        a.extend_from_slice(cmd);
        self.ctr(&a)
    }

    /// `ctr task pause`, then `resume`, each seen in `task ls`.
    fn pause_and_resume(&self, id: &str) {
        for (action, status) in [("pause", "PAUSED"), ("resume", "RUNNING")] {
            let o = self.ctr(&["task", action, id]);
            assert!(o.status.success(), "{}", show(&o));
            assert_eq!(self.task_status(id).as_deref(), Some(status));
        }
    }

    fn task_status(&self, id: &str) -> Option<String> {
        let out = self.ctr(&["task", "ls"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.first() == Some(&id))
            .and_then(|f| f.get(2).map(|s| s.to_string()))
    }

    fn wait_status(&self, id: &str, want: &str) -> bool {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if self.task_status(id).as_deref() == Some(want) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// PID of the running shim serving task `id` of this daemon.
    fn shim_pid(&self, binary: &str, id: &str) -> Option<u32> {
        for e in std::fs::read_dir("/proc").ok()?.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            let args: Vec<String> = cmd
                .split(|&b| b == 0)
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect();
            if args.first().map(|a| a.ends_with(binary)) != Some(true) {
                continue;
            }
            let has = |k: &str, v: &str| args.windows(2).any(|w| w[0] == k && w[1] == v);
            if has("-id", id)
                && has("-address", &self.addr)
                && !args.iter().any(|a| a == "start" || a == "delete")
            {
                return Some(pid);
            }
        }
        None
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn show(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        stdout(o),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn rss_kb(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[test]
fn run_rm_output_and_exit_codes() {
    let env = Env::new();
    let o = env.run(&["--rm"], "echo", &["echo", "hi"]);
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(stdout(&o), "hi\n");

    let o = env.run(
        &["--rm"],
        "exit3",
        &["sh", "-c", "echo out; echo err >&2; exit 3"],
    );
    assert_eq!(o.status.code(), Some(3), "{}", show(&o));
    assert_eq!(stdout(&o), "out\n");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("err"),
        "{}",
        show(&o)
    );

    // Killed by a signal: 128 + 9 (not as pid 1, which the kernel shields from SIGKILL
    // sent inside its own pid namespace).
    let o = env.run(
        &["--rm"],
        "sig",
        &["sh", "-c", "sh -c 'kill -9 $$'; exit $?"],
    );
    assert_eq!(o.status.code(), Some(137), "{}", show(&o));

    // Stdin reaches the container, and its EOF too.
    let mut c = env.ctr_cmd(&[
        "run",
        "--fifo-dir",
        &env.fifo,
        "--rm",
        "--runtime",
        "io.containerd.berth.v2",
        IMAGE,
        "cat",
        "cat",
    ]);
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut ch = c.spawn().unwrap();
    {
        use std::io::Write;
        let mut i = ch.stdin.take().unwrap();
        i.write_all(b"through stdin\n").unwrap();
    }
    let o = ch.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(stdout(&o), "through stdin\n");

    // The shims are gone once their tasks are deleted.
    std::thread::sleep(Duration::from_millis(300));
    assert!(env.shim_pid("containerd-shim-berth-v2", "echo").is_none());
}

/// Waits up to 10 s for `path` to exist; returns its contents.
fn wait_for_file(path: &Path) -> Option<String> {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        if let Ok(s) = std::fs::read_to_string(path) {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// `binary://` log URIs: containerd's shim logging protocol, which nerdctl's `run -d`
/// uses. The logger gets the query as arguments, only CONTAINER_ID and
/// CONTAINER_NAMESPACE in its environment, the container's stdout and stderr on fds 3
/// and 4, and says it is ready by closing fd 5. A logger that cannot start fails the
/// task create with an error that names it.
#[test]
fn binary_log_uri_runs_the_logger_with_the_output() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    // The logger writes into the directory its first argument pair names.
    let logger = env.refd.dir.path().join("logger.sh");
    std::fs::write(
        &logger,
        "#!/bin/sh\n\
         d=$2\n\
         echo \"$@\" > $d/args\n\
         /usr/bin/env > $d/env\n\
         exec 5>&-\n\
         /bin/cat <&3 > $d/stdout.part &\n\
         /bin/cat <&4 > $d/stderr.part &\n\
         wait\n\
         /bin/mv $d/stderr.part $d/stderr\n\
         /bin/mv $d/stdout.part $d/stdout\n",
    )
    .unwrap();
    std::fs::set_permissions(&logger, std::fs::Permissions::from_mode(0o755)).unwrap();
    let logged = |name: &str| {
        let dir = env.refd.dir.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let uri = format!(
            "binary://{}?dir={}&tag=a%20b",
            logger.display(),
            dir.display()
        );
        (dir, uri)
    };
    let (out, uri) = logged("logged");

    let o = env.run(
        &["--rm", "--log-uri", &uri],
        "blog",
        &["sh", "-c", "echo out; echo err >&2; exit 4"],
    );
    assert_eq!(o.status.code(), Some(4), "{}", show(&o));
    assert_eq!(wait_for_file(&out.join("stdout")).as_deref(), Some("out\n"));
    assert_eq!(
        std::fs::read_to_string(out.join("stderr")).unwrap(),
        "err\n"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("args")).unwrap(),
        format!("dir {} tag a b\n", out.display())
    );
    let logger_env = std::fs::read_to_string(out.join("env")).unwrap();
    assert!(
        logger_env.lines().any(|l| l == "CONTAINER_ID=blog"),
        "{logger_env}"
    );
    let ns_line = format!("CONTAINER_NAMESPACE={}", env.refd.namespace());
    assert!(logger_env.lines().any(|l| l == ns_line), "{logger_env}");
    assert!(
        !logger_env.contains("PATH="),
        "the shim's environment leaked: {logger_env}"
    );

    let o = env.run(
        &["--rm", "--log-uri", "binary:///nonexistent/logger"],
        "blog2",
        &["true"],
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("/nonexistent/logger"),
        "{}",
        show(&o)
    );
}

/// CVE-2020-15257 (GHSA-36xw-fx78-c5r4): containerd-shim listened on an abstract unix
/// socket, which any process in the host's network namespace (a host-network
/// container) could connect to and drive. The shim's socket must be a path in a
/// directory only root can enter, and nothing of it in the abstract namespace.
fn assert_shim_socket_is_private(shim: u32) {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let address = std::fs::read_to_string(format!("/proc/{shim}/cwd/address")).unwrap();
    let path = address
        .trim()
        .strip_prefix("unix://")
        .unwrap_or_else(|| panic!("the shim's address is not a unix path: {address:?}"));
    assert!(path.starts_with('/'), "{path}");
    // Seen from the shim's mount namespace (the reference containerd has a private /run).
    let in_shim_ns =
        |p: &std::path::Path| std::path::PathBuf::from(format!("/proc/{shim}/root{}", p.display()));
    let socket = std::path::Path::new(path);
    assert!(
        std::fs::metadata(in_shim_ns(socket))
            .unwrap()
            .file_type()
            .is_socket()
    );
    let dir = socket.parent().unwrap();
    let dir_meta = std::fs::metadata(in_shim_ns(dir)).unwrap();
    assert_eq!(
        (dir_meta.uid(), dir_meta.mode() & 0o777),
        (0, 0o700),
        "{}",
        dir.display()
    );
    // The shim's own sockets (by inode), and the names they are bound to.
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{shim}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let names: Vec<String> = std::fs::read_to_string("/proc/net/unix")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 8 && inodes.iter().any(|i| i == f[6])).then(|| f[7].to_string())
        })
        .collect();
    assert!(
        names.iter().any(|n| n == path),
        "{path} is not bound by the shim: {names:?}"
    );
    assert!(
        !names.iter().any(|n| n.starts_with('@')),
        "abstract: {names:?}"
    );
}

#[test]
fn detached_task_lifecycle() {
    let env = Env::new();
    let o = env.run(&["-d"], "d1", &["sleep", "1000"]);
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(env.task_status("d1").as_deref(), Some("RUNNING"));
    let shim = env
        .shim_pid("containerd-shim-berth-v2", "d1")
        .expect("shim process");
    assert_shim_socket_is_private(shim);

    let o = env.ctr(&["task", "ps", "d1"]);
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(stdout(&o).lines().count(), 2, "{}", show(&o));

    let o = env.ctr(&[
        "task",
        "exec",
        "--fifo-dir",
        &env.fifo,
        "--exec-id",
        "e1",
        "d1",
        "sh",
        "-c",
        "echo in-exec; exit 5",
    ]);
    assert_eq!(o.status.code(), Some(5), "{}", show(&o));
    assert_eq!(stdout(&o), "in-exec\n");

    // Quick execs whose client never feeds stdin leave no threads behind.
    for i in 0..5 {
        let id = format!("q{i}");
        let o = env.ctr(&[
            "task",
            "exec",
            "--fifo-dir",
            &env.fifo,
            "--exec-id",
            &id,
            "d1",
            "true",
        ]);
        assert!(o.status.success(), "{}", show(&o));
    }
    std::thread::sleep(Duration::from_millis(300));
    let stdin_threads = std::fs::read_dir(format!("/proc/{shim}/task"))
        .unwrap()
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .unwrap_or_default()
                .trim()
                == "stdin"
        })
        .count();
    assert!(
        stdin_threads <= 1,
        "{stdin_threads} stdin copier threads left (only init's may remain)"
    );

    // A long-running exec shows up in `task ps` with its exec id, and can be killed.
    let mut ex = env
        .ctr_cmd(&[
            "task",
            "exec",
            "--fifo-dir",
            &env.fifo,
            "--exec-id",
            "e2",
            "d1",
            "sleep",
            "1000",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !stdout(&env.ctr(&["task", "ps", "d1"])).contains("e2")
        && t.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(stdout(&env.ctr(&["task", "ps", "d1"])).contains("e2"));
    let o = env.ctr(&["task", "kill", "-s", "KILL", "--exec-id", "e2", "d1"]);
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(ex.wait().unwrap().code(), Some(137));

    env.pause_and_resume("d1");

    let o = env.ctr(&["task", "metrics", "d1"]);
    assert!(o.status.success(), "{}", show(&o));
    let m = stdout(&o);
    assert!(m.contains("pids.current") || m.contains("memory"), "{m}");

    // Not stopped yet: deleting must fail.
    let o = env.ctr(&["task", "delete", "d1"]);
    assert!(!o.status.success());

    let o = env.ctr(&["task", "kill", "-s", "KILL", "d1"]);
    assert!(o.status.success(), "{}", show(&o));
    assert!(env.wait_status("d1", "STOPPED"), "task did not stop");
    let o = env.ctr(&["task", "delete", "d1"]);
    assert!(o.status.success(), "{}", show(&o));
    let o = env.ctr(&["containers", "rm", "d1"]);
    assert!(o.status.success(), "{}", show(&o));
    let t = Instant::now();
    while Path::new(&format!("/proc/{shim}/cmdline")).exists()
        && rss_kb(shim).is_some()
        && t.elapsed() < Duration::from_secs(5)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        rss_kb(shim).is_none(),
        "shim {shim} still running after delete"
    );
}

#[test]
fn terminal_mode() {
    assert!(
        have("script"),
        "`script` not found: the console-socket path needs a tty for ctr; \
         run scripts/install-deps (bsdutils)"
    );
    let env = Env::new();
    let run = |id: &str, cmd: &str| {
        let line = format!(
            "{} run --fifo-dir {} -t --rm --runtime io.containerd.berth.v2 {IMAGE} {id} sh -c '{cmd}'",
            env.refd.ctr_line(),
            env.fifo
        );
        Command::new("timeout")
            .args(["-k", "5", "60", "script", "-qec", &line, "/dev/null"])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let o = run("t1", "tty; exit 4");
    assert_eq!(o.status.code(), Some(4), "{}", show(&o));
    assert!(stdout(&o).contains("/dev/pts/"), "{}", show(&o));

    // Exec with a terminal in a detached task.
    let o = env.run(&["-d"], "t2", &["sleep", "1000"]);
    assert!(o.status.success(), "{}", show(&o));
    let line = format!(
        "{} task exec --fifo-dir {} -t --exec-id x t2 sh -c 'tty; exit 6'",
        env.refd.ctr_line(),
        env.fifo
    );
    let o = Command::new("timeout")
        .args(["-k", "5", "60", "script", "-qec", &line, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(6), "{}", show(&o));
    assert!(stdout(&o).contains("/dev/pts/"), "{}", show(&o));
    let o = env.ctr(&["task", "kill", "-s", "KILL", "t2"]);
    assert!(o.status.success(), "{}", show(&o));
    assert!(env.wait_status("t2", "STOPPED"));
    assert!(env.ctr(&["task", "delete", "t2"]).status.success());
}

#[test]
fn events_and_oom() {
    let env = Env::new();
    // Not under `timeout`: killing it must end ctr itself, or its stdout never closes.
    let mut events = Command::new("ctr")
        .args([
            "--address",
            &env.addr,
            "--namespace",
            env.refd.namespace(),
            "events",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));

    let o = env.run(
        &["--rm", "--memory-limit", "16777216"],
        "oom",
        &["sh", "-c", "tail /dev/zero"],
    );
    assert_eq!(o.status.code(), Some(137), "{}", show(&o));

    assert!(env.run(&["-d"], "ev", &["sleep", "1000"]).status.success());
    assert!(
        env.ctr(&[
            "task",
            "exec",
            "--fifo-dir",
            &env.fifo,
            "--exec-id",
            "x",
            "ev",
            "true"
        ])
        .status
        .success()
    );
    assert!(env.ctr(&["task", "pause", "ev"]).status.success());
    assert!(env.ctr(&["task", "resume", "ev"]).status.success());
    assert!(
        env.ctr(&["task", "kill", "-s", "KILL", "ev"])
            .status
            .success()
    );
    assert!(env.wait_status("ev", "STOPPED"));
    assert!(env.ctr(&["task", "delete", "ev"]).status.success());
    std::thread::sleep(Duration::from_millis(500));

    let _ = events.kill();
    let o = events.wait_with_output().unwrap();
    let ev = stdout(&o);
    for topic in [
        "/tasks/create",
        "/tasks/start",
        "/tasks/oom",
        "/tasks/exit",
        "/tasks/delete",
        "/tasks/exec-added",
        "/tasks/exec-started",
        "/tasks/paused",
        "/tasks/resumed",
    ] {
        assert!(ev.contains(topic), "no {topic} event in:\n{ev}");
    }
    assert!(ev.contains("\"exit_status\":137"), "{ev}");
}

#[test]
fn dead_shim_is_cleaned_up_by_delete_action() {
    let env = Env::new();
    assert!(env.run(&["-d"], "k1", &["sleep", "1000"]).status.success());
    let shim = env
        .shim_pid("containerd-shim-berth-v2", "k1")
        .expect("shim");
    let init: u32 = stdout(&env.ctr(&["task", "ls"]))
        .lines()
        .find(|l| l.starts_with("k1 "))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .expect("task pid");
    unsafe { libc::kill(shim as i32, libc::SIGKILL) };
    // containerd notices the disconnect and runs `containerd-shim-berth-v2 ... delete`,
    // which force-deletes the container with runc.
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(15) {
        let st = std::fs::read_to_string(format!("/proc/{init}/stat")).unwrap_or_default();
        if st.is_empty() || st.split_whitespace().nth(2) == Some("Z") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let st = std::fs::read_to_string(format!("/proc/{init}/stat")).unwrap_or_default();
    assert!(
        st.is_empty() || st.split_whitespace().nth(2) == Some("Z"),
        "container init {init} survived its shim"
    );
    assert!(env.task_status("k1").is_none(), "task still listed");
}

/// The release binary to measure: `$BERTH_SHIM_RELEASE_BIN` when set (CI or a developer
/// that already has the deployable build), else crates/shim/build-release.sh's deployable
/// build (static non-PIE, size-optimised) in `<target>/shim-static`, a target dir of its own so
/// as not to wait on this test run's build lock. That build costs minutes once in a fresh
/// target dir and is a no-op afterwards (cargo), so it runs at most once per test process.
fn release_shim() -> PathBuf {
    if let Some(p) = std::env::var_os("BERTH_SHIM_RELEASE_BIN") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "BERTH_SHIM_RELEASE_BIN={} is not a file",
            p.display()
        );
        return p;
    }
    static BUILT: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = built.as_ref() {
        return p.clone();
    }
    let target = Path::new(SHIM).parent().unwrap().parent().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("build-release.sh");
    let mut c = Command::new("bash");
    c.arg(&script)
        .env("CARGO_TARGET_DIR", target)
        .env_remove("RUSTFLAGS")
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    if let Ok(cargo) = std::env::var("CARGO") {
        // The same toolchain as this test run.
        let dir = Path::new(&cargo).parent().unwrap().to_path_buf();
        c.env(
            "PATH",
            format!(
                "{}:{}",
                dir.display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        );
    }
    let t = Instant::now();
    let out = c.output().expect("running crates/shim/build-release.sh");
    assert!(
        out.status.success(),
        "crates/shim/build-release.sh failed ({}); see its output above",
        out.status
    );
    let path = PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .expect("build-release.sh prints the binary's path")
            .trim(),
    );
    assert!(
        path.is_file(),
        "build-release.sh printed {}",
        path.display()
    );
    eprintln!(
        "release shim {} ready in {:.1}s",
        path.display(),
        t.elapsed().as_secs_f64()
    );
    *built = Some(path.clone());
    path
}

#[test]
fn shim_rss_release() {
    assert_eq!(
        std::env::consts::ARCH,
        "x86_64",
        "the static release build recipe (build-release.sh) and the RSS budget are for x86_64"
    );
    let bin = release_shim();
    let env = Env::new();
    let o = env.ctr(&[
        "run",
        "--fifo-dir",
        &env.fifo,
        "-d",
        "--runtime",
        &bin.to_string_lossy(),
        IMAGE,
        "r1",
        "sleep",
        "1000",
    ]);
    assert!(o.status.success(), "{}", show(&o));
    // An exec, so that the measurement includes a used shim, not only a fresh one.
    let o = env.ctr(&[
        "task",
        "exec",
        "--fifo-dir",
        &env.fifo,
        "--exec-id",
        "x",
        "r1",
        "true",
    ]);
    assert!(o.status.success(), "{}", show(&o));
    std::thread::sleep(Duration::from_millis(300));
    let pid = env
        .shim_pid("containerd-shim-berth-v2", "r1")
        .expect("shim pid");
    let rss = rss_kb(pid).expect("VmRSS");
    let mut line = format!("berth shim VmRSS: {rss} kB");
    if have("containerd-shim-runc-v2") {
        let o = env.ctr(&[
            "run",
            "--fifo-dir",
            &env.fifo,
            "-d",
            IMAGE,
            "g1",
            "sleep",
            "1000",
        ]);
        if o.status.success() {
            std::thread::sleep(Duration::from_millis(300));
            if let Some(g) = env
                .shim_pid("containerd-shim-runc-v2", "g1")
                .and_then(rss_kb)
            {
                line += &format!("; Go runc shim (io.containerd.runc.v2) VmRSS: {g} kB");
            }
        }
    }
    eprintln!("{line}");
    assert!(rss <= 2560, "{line}: over the 2.5 MB budget");
}

#[test]
fn tasks_survive_a_daemon_restart() {
    let mut env = Env::new();
    assert!(env.run(&["-d"], "rs", &["sleep", "1000"]).status.success());
    let shim = env
        .shim_pid("containerd-shim-berth-v2", "rs")
        .expect("shim");
    // Stop only containerd (not the shims, as dropping the daemon would), then start it
    // again: it must find the shim through the bundle's `address` file and reconnect.
    let pid = env.refd.pid().expect("containerd pid");
    env.refd.stop_daemon();
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "containerd {pid} did not stop"
    );
    assert!(rss_kb(shim).is_some(), "the shim must outlive the daemon");
    env.refd
        .spawn()
        .unwrap_or_else(|log| panic!("containerd restart:\n{log}"));
    assert_eq!(env.task_status("rs").as_deref(), Some("RUNNING"));
    let o = env.ctr(&[
        "task",
        "exec",
        "--fifo-dir",
        &env.fifo,
        "--exec-id",
        "x",
        "rs",
        "echo",
        "after-restart",
    ]);
    assert_eq!(stdout(&o), "after-restart\n", "{}", show(&o));
    // The exit reaches the new daemon (the shim reconnects its event forwarding).
    assert!(
        env.ctr(&["task", "kill", "-s", "KILL", "rs"])
            .status
            .success()
    );
    assert!(env.wait_status("rs", "STOPPED"));
    assert!(env.ctr(&["task", "delete", "rs"]).status.success());
}

/// The bundle's options.json names the OCI runtime the shim chose.
fn chosen_runtime(env: &Env, id: &str) -> String {
    let bundle = env
        .refd
        .state
        .join("io.containerd.runtime.v2.task")
        .join(env.refd.namespace())
        .join(id);
    std::fs::read_to_string(bundle.join("options.json")).expect("options.json")
}

#[test]
fn berth_runc_is_the_default_and_seccomp_goes_to_runc() {
    let berth_runc = Path::new(SHIM).parent().unwrap().join("berth-runc");
    assert!(
        berth_runc.is_file(),
        "{} is missing: build it with `cargo build -p berth-oci-runtime` (scripts/test does)",
        berth_runc.display()
    );
    let env = Env::new();
    let o = env.run(&["-d"], "br", &["sleep", "1000"]);
    assert!(o.status.success(), "{}", show(&o));
    let options = chosen_runtime(&env, "br");
    assert!(options.contains("berth-runc"), "{options}");
    // Seen through the shim: the reference containerd runs in a private mount namespace.
    let shim = env
        .shim_pid("containerd-shim-berth-v2", "br")
        .expect("shim");
    let state = PathBuf::from(format!(
        "/proc/{shim}/root/run/berth-runc/{}/br",
        env.refd.namespace()
    ));
    assert!(
        state.join("state.json").is_file(),
        "no {} ({options})",
        state.display()
    );
    // The whole task API works through it (the other tests here run on it too).
    env.pause_and_resume("br");

    // berth-runc has no seccomp: such a spec runs under runc instead, never unfiltered.
    let o = env.run(&["-d", "--seccomp"], "sc", &["sleep", "1000"]);
    assert!(o.status.success(), "{}", show(&o));
    let options = chosen_runtime(&env, "sc");
    assert!(options.contains("\"binary_name\":\"\""), "{options}");
    let o = env.ctr(&[
        "task",
        "exec",
        "--fifo-dir",
        &env.fifo,
        "--exec-id",
        "s",
        "sc",
        "grep",
        "Seccomp:",
        "/proc/self/status",
    ]);
    assert!(o.status.success(), "{}", show(&o));
    assert!(stdout(&o).contains('2'), "not filtered: {}", show(&o));

    // Mount propagation, which berth-runc cannot apply as runc does, goes to runc too:
    // an `rshared` bind mount is shared inside the container.
    let shared_src = env.refd.dir.path().join("shared-src");
    std::fs::create_dir_all(&shared_src).unwrap();
    let mount = format!(
        "type=bind,src={},dst=/mnt,options=rbind:rshared",
        shared_src.display()
    );
    let o = env.run(
        &["--rm", "--mount", &mount],
        "pr",
        &["sh", "-c", "grep ' /mnt ' /proc/self/mountinfo"],
    );
    assert!(o.status.success(), "{}", show(&o));
    assert!(stdout(&o).contains(" shared:"), "not shared: {}", show(&o));

    for id in ["br", "sc"] {
        let o = env.ctr(&["task", "kill", "-s", "SIGKILL", id]);
        assert!(o.status.success(), "{}", show(&o));
    }
    let sc_shim = env
        .shim_pid("containerd-shim-berth-v2", "sc")
        .expect("shim");
    for id in ["br", "sc"] {
        assert!(env.wait_status(id, "STOPPED"), "{id} did not stop");
        let o = env.ctr(&["task", "rm", id]);
        assert!(o.status.success(), "{}", show(&o));
        let o = env.ctr(&["container", "rm", id]);
        assert!(o.status.success(), "{}", show(&o));
        if id == "br" {
            // Seen through the shim that is still there.
            let left = PathBuf::from(format!(
                "/proc/{sc_shim}/root/run/berth-runc/{}/br",
                env.refd.namespace()
            ));
            assert!(!left.exists(), "berth-runc state left: {}", left.display());
        }
    }
}
