//! `[proxy_plugins]` through berthd: a `type = "snapshot"` entry becomes the snapshotter
//! `io.containerd.snapshotter.v1.<name>`, served by the standalone `berth-snapshotter`
//! on a private socket and used with the stock `ctr --snapshotter <name>`.

use berth_testkit::{Daemon, NO_STARTUP_GC};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// A fresh directory under /tmp (short: socket paths), removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = PathBuf::from(format!(
            "/tmp/bps-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The `berth-snapshotter` process and its private directory; both go on drop.
struct Snapshotter {
    child: Child,
    dir: TempDir,
    socket: PathBuf,
}

impl Snapshotter {
    fn start(kind: &str) -> Snapshotter {
        let dir = TempDir::new();
        let socket = dir.path().join("snap.sock");
        let log = std::fs::File::create(dir.path().join("snapshotter.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_berth-snapshotter"))
            .arg("--root")
            .arg(dir.path().join("root"))
            .arg("--address")
            .arg(&socket)
            .args(["--snapshotter", kind])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut s = Snapshotter { child, dir, socket };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !s.socket.exists() {
            if let Some(status) = s.child.try_wait().unwrap() {
                panic!("berth-snapshotter exited with {status}: {}", s.log());
            }
            assert!(Instant::now() < deadline, "no socket: {}", s.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("snapshotter.log")).unwrap_or_default()
    }

    /// Snapshot directories of the native backend.
    fn snapshot_dirs(&self) -> usize {
        std::fs::read_dir(self.dir.path().join("root/snapshots"))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

impl Drop for Snapshotter {
    fn drop(&mut self) {
        // Our child, by its PID; `dir` (root and socket) goes after this.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn proxy_config(name: &str, socket: &Path) -> String {
    format!(
        "[proxy_plugins.{name}]\n  type = \"snapshot\"\n  address = {:?}\n\n{NO_STARTUP_GC}",
        socket.display().to_string()
    )
}

#[test]
fn snapshot_proxy_plugin_serves_ctr() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let server = Snapshotter::start("native");
    let d = Daemon::start_with_config(&proxy_config("myproxy", &server.socket));

    // Listed as a loaded snapshotter.
    let plugins = d.ctr_ok(&["plugins", "ls"]);
    let row: Vec<&str> = plugins
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cols| {
            cols.len() >= 3 && cols[0] == "io.containerd.snapshotter.v1" && cols[1] == "myproxy"
        })
        .unwrap_or_else(|| panic!("no myproxy row:\n{plugins}"));
    assert_eq!(row.last(), Some(&"ok"), "{plugins}");
    let detail = d.ctr_ok(&["plugins", "ls", "-d", "id==myproxy"]);
    assert!(
        detail.contains(&server.socket.display().to_string()),
        "{detail}"
    );

    // Snapshot calls go through the proxy to the backend process.
    fn with<'a>(rest: &[&'a str]) -> Vec<&'a str> {
        [&["snapshots", "--snapshotter", "myproxy"][..], rest].concat()
    }
    let mounts = d.ctr_ok(&with(&["prepare", "--mounts", "p1", ""]));
    assert!(mounts.contains("bind"), "{mounts}");
    assert!(
        mounts.contains(&server.dir.path().display().to_string()),
        "mounts point into the proxy's root: {mounts}"
    );
    assert_eq!(server.snapshot_dirs(), 1);
    d.ctr_ok(&with(&["commit", "c1", "p1"]));
    d.ctr_ok(&with(&["view", "v1", "c1"]));
    let ls = d.ctr_ok(&with(&["ls"]));
    assert!(ls.contains("c1") && ls.contains("Committed"), "{ls}");
    assert!(ls.contains("v1") && ls.contains("View"), "{ls}");
    let info = d.ctr_ok(&with(&["info", "c1"]));
    assert!(info.contains("\"Kind\": \"Committed\""), "{info}");
    // The default snapshotter does not see them; namespaces are isolated.
    assert!(!d.ctr_ok(&["snapshots", "ls"]).contains("c1"));
    assert!(
        !d.ctr_ok(&[
            "--namespace",
            "other",
            "snapshots",
            "--snapshotter",
            "myproxy",
            "ls"
        ])
        .contains("c1")
    );
    let err = d.ctr_err(&with(&["rm", "c1"]));
    assert!(err.contains("cannot remove snapshot with child"), "{err}");
    d.ctr_ok(&with(&["rm", "v1", "c1"]));
    assert_eq!(d.ctr_ok(&with(&["ls"])).lines().count(), 1);
    assert_eq!(server.snapshot_dirs(), 0, "removed in the backend too");
}

#[test]
fn unreachable_snapshot_proxy_fails_calls_not_the_daemon() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    // Nothing listens there: the plugin still loads (the connection is made on first
    // use, as containerd's), and its calls fail with an error.
    let dir = TempDir::new();
    let d = Daemon::start_with_config(&proxy_config("gone", &dir.path().join("none.sock")));
    let plugins = d.ctr_ok(&["plugins", "ls"]);
    assert!(
        plugins
            .lines()
            .any(|l| l.starts_with("io.containerd.snapshotter.v1") && l.contains(" gone ")),
        "{plugins}"
    );
    let err = d.ctr_err(&["snapshots", "--snapshotter", "gone", "prepare", "x", ""]);
    assert!(err.contains("unavailable"), "{err}");
    // The built-in snapshotters are unaffected.
    d.ctr_ok(&["snapshots", "prepare", "x", ""]);
    d.ctr_ok(&["snapshots", "rm", "x"]);
}
