//! `berth run/exec/ps/logs/stop/rm` against a private berthd (testkit), the busybox
//! fixture imported with the stock `ctr`, real runc under the stock
//! `containerd-shim-runc-v2` and Berth's own shim. What is left behind is checked with
//! the stock `ctr` (containers, tasks, snapshots).

use berth_testkit::Daemon;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const IMAGE: &str = "import.local/busybox:latest";

/// Fails the test, saying what to install, when the machine cannot run containers.
fn require_env() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "berth run tests need root (run them as root, as CI does)"
    );
    for tool in ["ctr", "runc", "containerd-shim-runc-v2", "timeout"] {
        assert!(
            berth_testkit::have(tool),
            "`{tool}` not found in PATH: run scripts/install-deps"
        );
    }
}

/// Builds Berth's shim next to berthd (where berthd looks for shims first).
fn build_berth_shim() {
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
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
        .expect("running cargo build for the shim");
    assert!(status.success(), "building containerd-shim-berth-v2 failed");
}

struct Env {
    daemon: Daemon,
    ns: String,
    fifo_dir: PathBuf,
    log_dir: PathBuf,
}

impl Env {
    fn start(tag: &str) -> Env {
        require_env();
        let daemon = Daemon::start();
        let ns = format!("cli{tag}{}", std::process::id());
        let archive = berth_testkit::fixtures().join("busybox.oci.tar");
        daemon.ctr_ok(&["-n", &ns, "images", "import", archive.to_str().unwrap()]);
        Env {
            fifo_dir: daemon.dir.path().join("fifo"),
            log_dir: daemon.dir.path().join("logs"),
            daemon,
            ns,
        }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        // `timeout` so that a hang fails the test instead of blocking the suite.
        let mut c = Command::new("timeout");
        c.args(["-k", "5", "60", env!("CARGO_BIN_EXE_berth"), "--address"])
            .arg(&self.daemon.socket)
            .args(["--namespace", &self.ns])
            .args(args)
            .env("BERTH_FIFO_DIR", &self.fifo_dir)
            .env("BERTH_LOG_DIR", &self.log_dir)
            .env_remove("BERTH_ADDRESS")
            .env_remove("CONTAINERD_SNAPSHOTTER")
            .stdin(Stdio::null());
        c
    }

    fn berth(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("running berth")
    }

    fn berth_with_input(&self, args: &[&str], input: &[u8]) -> Output {
        let mut child = self
            .cmd(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running berth");
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    }

    /// Runs berth, asserts success, returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let o = self.berth(args);
        assert!(
            o.status.success(),
            "berth {args:?} failed ({}):\nstdout: {}\nstderr: {}\ndaemon log tail:\n{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr),
            berth_testkit::tail(&self.daemon.log(), 30),
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Runs berth, asserts failure, returns stderr.
    fn err(&self, args: &[&str]) -> String {
        let o = self.berth(args);
        assert!(
            !o.status.success(),
            "berth {args:?} should have failed but printed:\n{}",
            String::from_utf8_lossy(&o.stdout)
        );
        String::from_utf8_lossy(&o.stderr).into_owned()
    }

    fn ctr(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.ns.as_str()];
        all.extend_from_slice(args);
        self.daemon.ctr_ok(&all)
    }

    /// `berth ps -a` rows as (id, status, pid).
    fn ps(&self) -> Vec<(String, String, String)> {
        let out = self.ok(&["ps", "-a"]);
        let mut lines = out.lines();
        let header = lines.next().expect("ps header");
        let col = |name: &str| header.find(name).expect(name);
        let (status_at, pid_at) = (col("STATUS"), col("PID"));
        lines
            .map(|l| {
                let id = l.split_whitespace().next().unwrap().to_string();
                let status = l[status_at..pid_at].trim().to_string();
                let pid = l[pid_at..].trim().to_string();
                (id, status, pid)
            })
            .collect()
    }

    /// Asserts that container `id` left nothing: no container, task or snapshot in
    /// berthd (as the stock ctr sees it), no log file.
    fn assert_gone(&self, id: &str) {
        let containers = self.ctr(&["containers", "ls", "-q"]);
        assert!(
            !containers.lines().any(|l| l == id),
            "container {id} left:\n{containers}"
        );
        let tasks = self.ctr(&["tasks", "ls", "-q"]);
        assert!(!tasks.lines().any(|l| l == id), "task {id} left:\n{tasks}");
        let snaps = self.ctr(&["snapshots", "ls"]);
        assert!(
            !snaps
                .lines()
                .any(|l| l.split_whitespace().next() == Some(id)),
            "snapshot {id} left:\n{snaps}"
        );
        let log = self.log_dir.join(&self.ns).join(format!("{id}.log"));
        assert!(!log.exists(), "log {} left", log.display());
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // Whatever a failed test left running: our containers, by ID, then anything
        // still under the daemon's directories.
        if let Ok(o) = self.cmd(&["ps", "-a", "-q"]).output() {
            for id in String::from_utf8_lossy(&o.stdout).lines() {
                let _ = self.cmd(&["rm", "-f", id]).output();
            }
        }
        berth_testkit::kill_processes_under(self.daemon.dir.path());
        berth_testkit::remove_namespace_leftovers(&self.ns);
    }
}

/// Sends `signal` to the berth that `Env::cmd` runs under `timeout`.
fn signal_berth(timeout: &std::process::Child, signal: nix::sys::signal::Signal) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let pid = loop {
        let children =
            std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", timeout.id()))
                .unwrap_or_default();
        if let Some(pid) = children.split_whitespace().next() {
            break pid.parse().unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "berth did not start under timeout"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).unwrap();
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn run_in_the_foreground() {
    let env = Env::start("fg");

    // Output, exit status and --rm (first run: the image is unpacked on the way).
    let o = env.berth(&["run", "--rm", "--name", "hi", IMAGE, "echo", "hi"]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "hi\n");
    env.assert_gone("hi");

    let o = env.berth(&[
        "run",
        "--rm",
        "--name",
        "three",
        IMAGE,
        "sh",
        "-c",
        "echo to-err >&2; exit 3",
    ]);
    assert_eq!(o.status.code(), Some(3), "stderr: {}", text(&o.stderr));
    assert_eq!(text(&o.stderr), "to-err\n");
    env.assert_gone("three");

    // The image's config and the command line's overrides reach the process.
    let out = env.ok(&[
        "run",
        "--rm",
        "-e",
        "GREETING=hello",
        "-w",
        "/tmp",
        "--hostname",
        "box",
        IMAGE,
        "sh",
        "-c",
        "echo $GREETING $PATH $(pwd) $(hostname) $(id -u)",
    ]);
    assert_eq!(out, "hello /bin:/sbin:/usr/bin:/usr/sbin /tmp box 0\n");
    let out = env.ok(&["run", "--rm", "-u", "nobody", IMAGE, "id"]);
    assert!(out.starts_with("uid=65534(nobody) gid=65534"), "{out}");

    // An image not unpacked in the chosen snapshotter is unpacked first (the import
    // unpacked it into overlayfs only); the image's layer snapshot stays after --rm.
    let out = env.ok(&[
        "run",
        "--rm",
        "--snapshotter",
        "native",
        "--name",
        "nat",
        IMAGE,
        "echo",
        "native",
    ]);
    assert_eq!(out, "native\n");
    let snaps = env.ctr(&["snapshots", "--snapshotter", "native", "ls"]);
    let kinds: Vec<&str> = snaps
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().last())
        .collect();
    assert_eq!(kinds, ["Committed"], "{snaps}");

    // A signal to berth goes to the container (here: its trap decides the exit status).
    let mut child = env
        .cmd(&[
            "run",
            "--rm",
            "--name",
            "sig",
            IMAGE,
            "sh",
            "-c",
            "trap 'echo got-int; exit 7' INT; echo ready; while true; do sleep 0.1; done",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // "ready" comes after the trap is set (PID 1 ignores a signal it has no handler for).
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert_eq!(line, "ready\n");
    signal_berth(&child, nix::sys::signal::Signal::SIGINT);
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(7), "stderr: {}", text(&o.stderr));
    assert_eq!(rest, "got-int\n");
    env.assert_gone("sig");

    // -i: stdin forwarded, EOF delivered.
    let o = env.berth_with_input(
        &["run", "--rm", "-i", IMAGE, "sh", "-c", "cat; echo done"],
        b"line 1\nline 2\n",
    );
    assert_eq!(o.status.code(), Some(0), "stderr: {}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "line 1\nline 2\ndone\n");

    // Without --rm the container stays (its task is deleted) until rm.
    let o = env.berth(&["run", "--name", "kept", IMAGE, "true"]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", text(&o.stderr));
    let rows = env.ps();
    let kept = rows.iter().find(|r| r.0 == "kept").expect("kept in ps -a");
    assert_eq!((kept.1.as_str(), kept.2.as_str()), ("STOPPED", "-"));
    assert!(
        env.ok(&["ps"]).lines().nth(1).is_none(),
        "ps without -a lists only live ones"
    );
    assert_eq!(env.ok(&["rm", "kept"]), "kept\n");
    env.assert_gone("kept");
    assert!(env.ctr(&["containers", "ls", "-q"]).trim().is_empty());
}

#[test]
fn detached_lifecycle() {
    let env = Env::start("bg");
    build_berth_shim();
    for runtime in ["io.containerd.runc.v2", "io.containerd.berth.v2"] {
        let id = format!("web-{}", runtime.split('.').nth(2).unwrap());
        // TERM is trapped so that `stop` sees a clean exit (PID 1 ignores an untrapped
        // TERM); the `kill -9` case is covered by `rm -f` below.
        let script = "trap 'echo bye; exit 0' TERM; echo started; echo oops >&2; while true; do sleep 0.2; done";
        let out = env.ok(&[
            "run",
            "-d",
            "--name",
            &id,
            "--runtime",
            runtime,
            IMAGE,
            "sh",
            "-c",
            script,
        ]);
        assert_eq!(out, format!("{id}\n"));

        let rows = env.ps();
        let row = rows.iter().find(|r| r.0 == id).expect("in ps");
        assert_eq!(row.1, "RUNNING", "{rows:?}");
        let pid: i32 = row.2.parse().expect("a pid");
        assert!(Path::new(&format!("/proc/{pid}")).exists());
        assert!(
            env.ok(&["ps"]).contains(&id),
            "live containers show without -a"
        );

        // exec: output and exit status.
        let o = env.berth(&["exec", &id, "sh", "-c", "echo in-$(hostname); exit 4"]);
        assert_eq!(o.status.code(), Some(4), "stderr: {}", text(&o.stderr));
        assert_eq!(text(&o.stdout), format!("in-{id}\n"));
        let out = env.ok(&[
            "exec",
            "-u",
            "65534:65534",
            "-w",
            "/tmp",
            &id,
            "sh",
            "-c",
            "id -u; pwd",
        ]);
        assert_eq!(out, "65534\n/tmp\n");
        let o = env.berth_with_input(&["exec", "-i", &id, "cat"], b"via exec\n");
        assert_eq!(text(&o.stdout), "via exec\n", "stderr: {}", text(&o.stderr));

        // logs: what the container printed on both streams.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = env.ok(&["logs", &id]);
            if log.contains("started") && log.contains("oops") {
                break;
            }
            assert!(Instant::now() < deadline, "log so far: {log:?}");
            std::thread::sleep(Duration::from_millis(100));
        }

        // exec -t: a pty even when the caller has none.
        let out = env.ok(&["exec", "-t", &id, "tty"]);
        assert!(out.starts_with("/dev/pts/"), "{out:?}");

        // logs -f follows until the task ends. (The stock shim copies stdout and stderr
        // into the log from two pipes, so their relative order is not fixed.)
        let follower = env
            .cmd(&["logs", "-f", &id])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();

        // stop: TERM, the task ends and is deleted; logs -f then ends at once.
        let started = Instant::now();
        assert_eq!(env.ok(&["stop", "-t", "20", &id]), format!("{id}\n"));
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "TERM was not enough?"
        );
        let row = env
            .ps()
            .into_iter()
            .find(|r| r.0 == id)
            .expect("still listed");
        assert_eq!(row.1, "STOPPED");
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} survived stop"
        );
        let followed = follower.wait_with_output().unwrap();
        assert!(followed.status.success());
        let followed = text(&followed.stdout);
        assert!(
            followed.contains("started\n") && followed.ends_with("bye\n"),
            "{followed:?}"
        );
        let log = env.ok(&["logs", "-f", &id]);
        assert!(log.ends_with("bye\n"), "{log:?}");

        assert_eq!(env.ok(&["rm", &id]), format!("{id}\n"));
        env.assert_gone(&id);
    }

    // -dt: the terminal's output is logged by Berth's shim; the stock shim cannot log a
    // terminal to a file (containerd 1.6), which is explained before anything is made.
    env.ok(&[
        "run",
        "-dt",
        "--name",
        "tty-log",
        "--runtime",
        "io.containerd.berth.v2",
        IMAGE,
        "sh",
        "-c",
        "tty; sleep 1000",
    ]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !env.ok(&["logs", "tty-log"]).starts_with("/dev/pts/") {
        assert!(Instant::now() < deadline, "no tty output logged");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(env.ok(&["rm", "-f", "tty-log"]), "tty-log\n");
    env.assert_gone("tty-log");
    let err = env.err(&["run", "-dt", "--name", "tty-stock", IMAGE, "sh"]);
    assert!(err.contains("cannot log a terminal to a file"), "{err}");
    env.assert_gone("tty-stock");

    // rm refuses a running container without -f, and kills it with -f.
    env.ok(&["run", "-d", "--name", "stubborn", IMAGE, "sleep", "1000"]);
    let err = env.err(&["rm", "stubborn"]);
    assert!(err.contains("running") && err.contains("rm -f"), "{err}");
    assert_eq!(env.ok(&["rm", "-f", "stubborn"]), "stubborn\n");
    env.assert_gone("stubborn");

    // A paused container is resumed to take its stop signal (sleep, as PID 1, ignores
    // TERM: SIGKILL after the timeout).
    env.ok(&["run", "-d", "--name", "frozen", IMAGE, "sleep", "1000"]);
    env.ctr(&["tasks", "pause", "frozen"]);
    let row = env.ps().into_iter().find(|r| r.0 == "frozen").unwrap();
    assert_eq!(row.1, "PAUSED");
    assert_eq!(env.ok(&["stop", "-t", "1", "frozen"]), "frozen\n");
    assert!(env.ctr(&["tasks", "ls", "-q"]).trim().is_empty());
    assert_eq!(env.ok(&["rm", "frozen"]), "frozen\n");
    env.assert_gone("frozen");
}

#[test]
fn errors_are_explained() {
    let env = Env::start("err");
    let err = env.err(&["run", "--rm", "example.com/nope:1", "true"]);
    assert!(
        err.contains("image \"example.com/nope:1\": not found"),
        "{err}"
    );
    env.ok(&["run", "-d", "--name", "dup", IMAGE, "sleep", "1000"]);
    let err = env.err(&["run", "-d", "--name", "dup", IMAGE, "true"]);
    assert!(err.contains("container \"dup\": already exists"), "{err}");
    let err = env.err(&["exec", "missing", "true"]);
    assert!(err.contains("container \"missing\": not found"), "{err}");
    let err = env.err(&["logs", "missing"]);
    assert!(err.contains("not found"), "{err}");
    let err = env.err(&["run", "-d", "-i", IMAGE, "sh"]);
    assert!(err.contains("-i with -d"), "{err}");
    let err = env.err(&["run", "--rm", IMAGE, "/no/such/binary"]);
    assert!(err.contains("no such file"), "{err}");
    env.assert_gone_after_failed_start();
    assert_eq!(env.ok(&["rm", "-f", "dup"]), "dup\n");
    env.assert_gone("dup");
}

/// The gids of the groups `/etc/group` (`text`) lists `user` as a member of, other than
/// the group named like it, plus `primary`: what the process should have.
fn member_gids(text: &str, user: &str, primary: u32) -> std::collections::BTreeSet<u32> {
    let mut gids: std::collections::BTreeSet<u32> = text
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 4 && f[0] != user && f[3].split(',').any(|m| m == user))
        .map(|f| f[2].parse().unwrap())
        .collect();
    gids.insert(primary);
    gids
}

fn id_groups(out: &str) -> std::collections::BTreeSet<u32> {
    out.split_whitespace().map(|g| g.parse().unwrap()).collect()
}

/// CVE-2023-25173 (GHSA-hmfx-3pcx-653p): the container's process has the
/// supplementary groups the image's /etc/group gives its user (root without `-u`),
/// with or without `-u`, and they are in the container's spec (the busybox fixture
/// lists nobody as a group member, so membership itself is covered by the unit tests
/// of `spec::resolve_user`); CVE-2024-40635 (GHSA-265r-hfxg-fhmg): a `-u` that does not
/// fit a 32-bit signed id fails the run (and leaves nothing) instead of running as root.
#[test]
fn users_get_their_groups_and_out_of_range_ids_fail() {
    let env = Env::start("grp");
    let etc_group = env.ok(&["run", "--rm", IMAGE, "cat", "/etc/group"]);
    let expect_root = member_gids(&etc_group, "root", 0);
    let out = env.ok(&["run", "--rm", IMAGE, "id", "-G"]);
    assert_eq!(id_groups(&out), expect_root, "{out}");
    let out = env.ok(&["run", "--rm", "-u", "0", IMAGE, "id", "-G"]);
    assert_eq!(id_groups(&out), expect_root, "{out}");
    let out = env.ok(&["run", "--rm", "-u", "nobody", IMAGE, "id", "-G"]);
    assert_eq!(
        id_groups(&out),
        member_gids(&etc_group, "nobody", 65534),
        "{out}"
    );
    env.ok(&[
        "run", "-d", "--name", "g", "-u", "nobody", IMAGE, "sleep", "1000",
    ]);
    let info: serde_json::Value =
        serde_json::from_str(&env.ctr(&["containers", "info", "g"])).unwrap();
    let spec_gids: std::collections::BTreeSet<u32> =
        info["Spec"]["process"]["user"]["additionalGids"]
            .as_array()
            .unwrap_or_else(|| panic!("no additionalGids in {info}"))
            .iter()
            .map(|g| g.as_u64().unwrap() as u32)
            .collect();
    assert_eq!(spec_gids, member_gids(&etc_group, "nobody", 65534));
    // exec --user by name, resolved in the running container's files (its snapshot
    // mounted read-only beside the container's own overlay), as `ctr task exec` does.
    let by_berth = env.ok(&["exec", "-u", "root", "g", "id"]);
    assert!(
        by_berth.starts_with("uid=0(root) gid=0(root)"),
        "{by_berth}"
    );
    let by_ctr = env.ctr(&[
        "tasks",
        "exec",
        "--exec-id",
        "u1",
        "--user",
        "root",
        "g",
        "id",
    ]);
    assert_eq!(by_berth, by_ctr);
    let out = env.ok(&["exec", "-u", "0:nogroup", "g", "id", "-g"]);
    assert_eq!(out.trim(), "65534", "the fixture's nogroup");
    let err = env.err(&["exec", "-u", "no-such-user", "g", "id"]);
    assert!(
        err.contains("no-such-user") && err.contains("/etc/passwd"),
        "{err}"
    );
    assert_eq!(env.ok(&["rm", "-f", "g"]), "g\n");
    let out = env.ok(&["run", "--rm", "-u", "1234:5678", IMAGE, "id", "-G"]);
    assert_eq!(id_groups(&out), [5678].into(), "{out}");

    for user in [
        "4294967296",
        "4294967296:4294967296",
        "-1",
        "2147483648:2147483648",
    ] {
        // `--user=` so that clap takes "-1" as the value, not as a flag.
        let err = env.err(&["run", "--rm", &format!("--user={user}"), IMAGE, "id", "-u"]);
        assert!(err.contains("out of range"), "{user}: {err}");
    }
    assert_eq!(env.ctr(&["containers", "ls", "-q"]).trim(), "");
}

impl Env {
    /// A run whose task failed to start removes its container and snapshot again.
    fn assert_gone_after_failed_start(&self) {
        let containers = self.ctr(&["containers", "ls", "-q"]);
        assert_eq!(containers.trim(), "dup", "only the running one is left");
        let snaps = self.ctr(&["snapshots", "ls"]);
        let active: Vec<&str> = snaps.lines().filter(|l| l.contains("Active")).collect();
        assert_eq!(active.len(), 1, "{snaps}");
    }
}

nix::ioctl_write_ptr_bad!(tiocswinsz, nix::libc::TIOCSWINSZ, nix::pty::Winsize);

/// `-t` on a real pty: the caller's terminal size (and its change) reaches the
/// container, keys typed go in (`-i`), the output comes back, and the exit status is the
/// container's.
#[test]
fn terminal() {
    let env = Env::start("tty");
    build_berth_shim();
    for runtime in ["io.containerd.runc.v2", "io.containerd.berth.v2"] {
        terminal_session(&env, runtime);
    }
}

fn terminal_session(env: &Env, runtime: &str) {
    use nix::pty::{Winsize, openpty};
    use std::sync::{Arc, Mutex};
    let size = Winsize {
        ws_row: 30,
        ws_col: 100,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = openpty(Some(&size), None).expect("openpty");
    let slave = std::fs::File::from(pty.slave);
    let mut child = env
        .cmd(&["run", "--rm", "-i", "-t", "--runtime", runtime, IMAGE, "sh"])
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave)
        .spawn()
        .expect("running berth");
    // Our copies of the slave are gone with the Command: reading the master ends (EIO)
    // when berth exits.
    let mut master = std::fs::File::from(pty.master);
    let mut writer = master.try_clone().unwrap();
    let master_fd = std::os::fd::AsRawFd::as_raw_fd(&writer);
    let seen = Arc::new(Mutex::new(String::new()));
    let reader = {
        let seen = seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = master.read(&mut buf) {
                if n == 0 {
                    break;
                }
                seen.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    // Types `input` (again every second: the machine may be slow) until `want` shows.
    let mut type_until = |input: &[u8], want: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            writer.write_all(input).unwrap();
            std::thread::sleep(Duration::from_secs(1));
            if seen.lock().unwrap().contains(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{want:?} never showed:\n{}",
                seen.lock().unwrap()
            );
        }
    };
    // `6*7` typed, 42 printed: the answer comes from the container's shell.
    type_until(b"stty size; tty; echo $((6*7))\n", "42");
    let out = seen.lock().unwrap().clone();
    assert!(out.contains("30 100"), "terminal size missing:\n{out}");
    assert!(out.contains("/dev/pts/"), "not a pty:\n{out}");

    // A resize: berth is not in the pty's session (no controlling terminal here), so
    // the SIGWINCH the kernel would send its foreground group is sent by hand.
    let bigger = Winsize {
        ws_row: 40,
        ws_col: 120,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer.
    unsafe { tiocswinsz(master_fd, &bigger) }.unwrap();
    signal_berth(&child, nix::sys::signal::Signal::SIGWINCH);
    type_until(b"stty size\n", "40 120");

    writer.write_all(b"exit 5\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "berth run -t did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    reader.join().unwrap();
    assert_eq!(
        status.code(),
        Some(5),
        "{runtime}: {}",
        seen.lock().unwrap()
    );
    assert!(env.ctr(&["containers", "ls", "-q"]).trim().is_empty());
}

/// What berth makes is an ordinary containerd container to the stock ctr, and the
/// other way round.
#[test]
fn interoperates_with_ctr() {
    let env = Env::start("ctr");
    env.ok(&["run", "-d", "--name", "b1", IMAGE, "sleep", "1000"]);
    let info = env.ctr(&["containers", "info", "b1"]);
    assert!(
        info.contains("\"ociVersion\"") && info.contains("\"sleep\""),
        "ctr cannot decode the spec:\n{info}"
    );
    let out = env.ctr(&["tasks", "exec", "--exec-id", "e1", "b1", "echo", "from-ctr"]);
    assert_eq!(out, "from-ctr\n");
    assert_eq!(env.ok(&["rm", "-f", "b1"]), "b1\n");
    env.assert_gone("b1");

    env.ctr(&["run", "-d", IMAGE, "c1", "sleep", "1000"]);
    let rows = env.ps();
    assert!(
        rows.iter().any(|r| r.0 == "c1" && r.1 == "RUNNING"),
        "{rows:?}"
    );
    assert_eq!(
        env.ok(&["exec", "c1", "echo", "from-berth"]),
        "from-berth\n"
    );
    assert_eq!(env.ok(&["stop", "-t", "1", "c1"]), "c1\n");
    assert_eq!(env.ok(&["rm", "c1"]), "c1\n");
    env.assert_gone("c1");
}
