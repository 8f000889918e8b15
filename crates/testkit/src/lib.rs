//! Test support shared by every crate's integration tests.
//!
//! [`Daemon`] starts the real `berthd` on a private root, state and socket (nothing under
//! `/var/lib/berth` or `/run/berth`), drives it with the stock `ctr` from Debian's
//! containerd package, and on drop stops it by PID and removes every mount and directory
//! it made. [`fixtures`] builds the project's own OCI test images once per target dir;
//! [`registry`] runs a private `docker-registry` (open or behind htpasswd), pushes
//! archives to it with skopeo and builds a two-platform image from the fixtures.

pub mod refd;
pub mod registry;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The workspace root (this crate lives in `crates/testkit`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

static BUILD_LOCK: Mutex<()> = Mutex::new(());

/// The `berthd` binary under test: `$BERTHD` if set, else the workspace's debug build,
/// built on demand so `cargo test -p <any crate>` works on its own.
pub fn berthd_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("BERTHD") {
        return PathBuf::from(path);
    }
    let _guard = BUILD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--quiet", "-p", "berth-server", "--bin", "berthd"])
        .current_dir(workspace_root())
        .status()
        .expect("running cargo build for berthd");
    assert!(status.success(), "building berthd failed");
    target_dir().join("debug/berthd")
}

/// Builds (once) and returns the directory of the project's fixture images:
/// `busybox.oci.tar`, `layers.oci.tar` and `layers.expected` (see
/// `tests/fixtures/build-images.sh`).
pub fn fixtures() -> PathBuf {
    let out = target_dir().join("fixtures");
    let script = workspace_root().join("tests/fixtures/build-images.sh");
    let output = Command::new(&script)
        .arg(&out)
        .output()
        .expect("running build-images.sh");
    assert!(
        output.status.success(),
        "build-images.sh failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    out
}

/// The listing `tests/fixtures/tree-listing.sh` prints for `root`.
pub fn tree_listing(root: &Path) -> String {
    let script = workspace_root().join("tests/fixtures/tree-listing.sh");
    let output = Command::new(script)
        .arg(root)
        .output()
        .expect("running tree-listing.sh");
    assert!(
        output.status.success(),
        "tree-listing.sh: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("listing is UTF-8")
}

/// Whether a command exists on PATH (tests that need an optional tool skip loudly).
pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Config for [`Daemon::start_with_config`] that turns off the start-up garbage
/// collection (`startup_delay = "0s"`, as in containerd: no collection is scheduled).
///
/// As in containerd 1.6, a collection removes every snapshot and content record that
/// nothing references: `ctr snapshots prepare`/`commit` label theirs
/// `containerd.io/gc.root`, but a `ctr snapshots view` (no label, no lease) is
/// unreferenced from the moment it exists. The start-up collection runs
/// `startup_delay` (100 ms) after the GC plugin's init, which is about when berthd starts
/// answering, so it lands in the middle of a test's first commands. Tests that keep
/// unreferenced resources around use this. Deletions still trigger collections, and with
/// none pending the first deletion's runs right away (remove the unreferenced first).
pub const NO_STARTUP_GC: &str =
    "[plugins.\"io.containerd.gc.v1.scheduler\"]\n  startup_delay = \"0s\"\n";

/// A private `berthd` for one test.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
    pub state: PathBuf,
    pub socket: PathBuf,
    pub config: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    /// Starts berthd with the default test config.
    pub fn start() -> Daemon {
        Self::start_with_config("")
    }

    /// Starts berthd with `extra` appended to the generated config (plugin sections etc.).
    pub fn start_with_config(extra: &str) -> Daemon {
        let mut daemon = Self::prepare(extra);
        daemon
            .spawn()
            .unwrap_or_else(|log| panic!("berthd did not start:\n{log}"));
        daemon
    }

    /// Creates the directories and config without starting the daemon (for tests that
    /// expect start-up to fail); call [`Daemon::spawn`] to start it.
    pub fn prepare(extra: &str) -> Daemon {
        // Short base path: unix socket paths are limited to 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("bt-")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let root = dir.path().join("root");
        let state = dir.path().join("state");
        let socket = dir.path().join("s.sock");
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = {root:?}\nstate = {state:?}\n\n[grpc]\n  address = {socket:?}\n\n\
                 [ttrpc]\n  address = \"{}.ttrpc\"\n\n[debug]\n  level = \"debug\"\n\n{extra}\n",
                socket.display()
            ),
        )
        .expect("writing config");
        let log = dir.path().join("berthd.log");
        Daemon {
            root,
            state,
            socket,
            config,
            child: None,
            log,
            dir,
        }
    }

    /// Starts the daemon and waits until `ctr version` answers; on failure returns the
    /// daemon's log.
    pub fn spawn(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(berthd_binary())
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawning berthd: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Err(format!("berthd exited with {status}:\n{}", self.log()));
            }
            if self.socket.exists() && self.ctr(&["version"]).status.success() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!("berthd did not answer within 30s:\n{}", self.log()))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `ctr --address SOCKET args…`.
    pub fn ctr(&self, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running ctr (apt install containerd)")
    }

    /// Runs ctr with `stdin` as its input (ctr may fail and exit before reading it all).
    pub fn ctr_with_input(&self, args: &[&str], stdin: &[u8]) -> Output {
        let mut child = Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running ctr");
        match child.stdin.take().unwrap().write_all(stdin) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
            written => written.expect("writing ctr input"),
        }
        child.wait_with_output().expect("waiting for ctr")
    }

    /// Runs ctr, asserts success and returns stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let output = self.ctr(args);
        assert!(
            output.status.success(),
            "ctr {args:?} failed ({}):\nstdout: {}\nstderr: {}\ndaemon log tail:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            tail(&self.log(), 40),
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Runs ctr, asserts failure and returns stderr (what the user sees).
    pub fn ctr_err(&self, args: &[&str]) -> String {
        let output = self.ctr(args);
        assert!(
            !output.status.success(),
            "ctr {args:?} should have failed but printed:\n{}",
            String::from_utf8_lossy(&output.stdout)
        );
        String::from_utf8_lossy(&output.stderr).into_owned()
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        if let Some(pid) = self.pid() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal);
        }
    }

    /// Waits for the daemon to exit (after a signal) and returns its exit status.
    pub fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait().unwrap() {
                    self.child = None;
                    return Some(status);
                }
            } else {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// `kill -9` the daemon (crash tests), leaving its files as they are.
    pub fn kill9(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }

    /// Stops the daemon gracefully (SIGTERM, then SIGKILL after 10 s).
    pub fn stop(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        if self.wait(Duration::from_secs(10)).is_none() {
            self.kill9();
        }
    }

    /// Stops and starts the daemon on the same root/state (restart tests).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn()
            .unwrap_or_else(|log| panic!("berthd did not restart:\n{log}"));
    }

    /// Mount points under this daemon's directory, deepest first.
    fn mounts(&self) -> Vec<String> {
        let prefix = self.dir.path().to_string_lossy().into_owned();
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut mounts: Vec<String> = mountinfo
            .lines()
            .filter_map(|line| line.split(' ').nth(4))
            .filter(|m| m.starts_with(&prefix))
            .map(str::to_string)
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        mounts
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
        // Processes the daemon left behind (shims, containers) whose working directory is
        // inside our private dirs: only those, never anything else on the machine.
        kill_processes_under(self.dir.path());
        for mount in self.mounts() {
            let _ = nix::mount::umount2(mount.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
        // Make sure removal can't be blocked by read-only modes the tests created.
        let _ = std::fs::set_permissions(self.dir.path(), std::fs::Permissions::from_mode(0o755));
    }
}

/// Removes what the OCI runtimes leave on the host for a namespace `ns` once its
/// containers are gone, with ctr's default `cgroupsPath` (`/<ns>/<id>`): see
/// [`remove_runtime_leftovers`].
pub fn remove_namespace_leftovers(ns: &str) {
    if !ns.is_empty() && !ns.contains('/') && !ns.starts_with('.') {
        remove_runtime_leftovers(ns, ns);
    }
}

/// Removes the (empty) state roots runc and berth-runc keep for namespace `ns`
/// (`/run/containerd/runc/<ns>`, `/run/berth-runc/<ns>`) and the empty cgroup tree
/// `cgroup_parent` in every hierarchy (v1 controllers and the hybrid `unified`).
pub fn remove_runtime_leftovers(ns: &str, cgroup_parent: &str) {
    if !ns.is_empty() && !ns.contains('/') && !ns.starts_with('.') {
        let _ = std::fs::remove_dir(format!("/run/containerd/runc/{ns}"));
        let _ = std::fs::remove_dir(format!("/run/berth-runc/{ns}"));
    }
    let rel = cgroup_parent.trim_start_matches('/');
    if rel.is_empty() || rel.split('/').any(|c| c == "..") {
        return;
    }
    if let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") {
        for h in hierarchies.flatten() {
            for base in [h.path(), h.path().join("unified")] {
                remove_empty_tree(&base.join(rel));
            }
        }
    }
}

/// Removes `dir` and its subdirectories bottom-up; only empty ones go (cgroup
/// directories with processes refuse, as do directories with files).
fn remove_empty_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.path().is_dir() {
                remove_empty_tree(&e.path());
            }
        }
        let _ = std::fs::remove_dir(dir);
    }
}

/// Whether process `pid` has exited: no longer in /proc, or a zombie (a container's
/// init reparented to a PID 1 that is not ours to reap).
pub fn process_gone(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(true)
}

/// Kills every process whose cwd or executable lies under `dir`.
pub fn kill_processes_under(dir: &Path) {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let under = |link: &str| {
            std::fs::read_link(entry.path().join(link))
                .map(|p| p.starts_with(dir))
                .unwrap_or(false)
        };
        if under("cwd") || under("exe") {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
