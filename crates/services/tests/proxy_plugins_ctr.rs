//! `[proxy_plugins]` through berthd, served by the standalone `berth-snapshotter` on a
//! private socket and driven with the stock `ctr`:
//! - a `type = "snapshot"` entry becomes the snapshotter
//!   `io.containerd.snapshotter.v1.<name>` (`ctr --snapshotter <name>`);
//! - a `type = "content"` entry becomes `io.containerd.content.v1.<name>`, which the
//!   metadata store wraps instead of the local store: every blob lives in the other
//!   process's root.

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
    /// Serves a snapshotter of `kind` rooted at `{dir}/root`.
    fn start(kind: &str) -> Snapshotter {
        Self::start_with(|dir| {
            vec![
                "--root".into(),
                dir.join("root").display().to_string(),
                "--snapshotter".into(),
                kind.into(),
            ]
        })
    }

    /// Serves a content store rooted at `{dir}/content`.
    fn start_content() -> Snapshotter {
        Self::start_with(|dir| {
            vec![
                "--content-root".into(),
                dir.join("content").display().to_string(),
            ]
        })
    }

    fn start_with(args: impl FnOnce(&Path) -> Vec<String>) -> Snapshotter {
        let dir = TempDir::new();
        let socket = dir.path().join("snap.sock");
        let log = std::fs::File::create(dir.path().join("snapshotter.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_berth-snapshotter"))
            .args(args(dir.path()))
            .arg("--address")
            .arg(&socket)
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
    typed_proxy_config(name, "snapshot", socket)
}

fn typed_proxy_config(name: &str, r#type: &str, socket: &Path) -> String {
    format!(
        "[proxy_plugins.{name}]\n  type = \"{}\"\n  address = {:?}\n\n{NO_STARTUP_GC}",
        r#type,
        socket.display().to_string()
    )
}

/// Committed blobs under a content store root (`blobs/sha256/*`).
fn blobs_under(root: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(root.join("blobs/sha256"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| format!("sha256:{}", e.file_name().to_string_lossy()))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn sha256_of(data: &[u8]) -> String {
    use std::io::Write;
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    format!(
        "sha256:{}",
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap()
    )
}

#[test]
fn content_proxy_plugin_holds_every_blob() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let server = Snapshotter::start_content();
    let remote_root = server.dir.path().join("content");
    let d = Daemon::start_with_config(&typed_proxy_config("remote", "content", &server.socket));
    let local_root = d.root.join("io.containerd.content.v1.content");

    let plugins = d.ctr_ok(&["plugins", "ls"]);
    let row: Vec<&str> = plugins
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cols| {
            cols.len() >= 3 && cols[0] == "io.containerd.content.v1" && cols[1] == "remote"
        })
        .unwrap_or_else(|| panic!("no remote content row:\n{plugins}"));
    assert_eq!(row.last(), Some(&"ok"), "{plugins}");
    let detail = d.ctr_ok(&["plugins", "ls", "-d", "id==bolt"]);
    assert!(
        detail.contains("io.containerd.content.v1.remote"),
        "{detail}"
    );

    // ingest / ls / get / rm through the proxy; 3 MiB so the data crosses several chunks.
    let data: Vec<u8> = (0..3 * (1 << 20) + 17).map(|i| (i % 251) as u8).collect();
    let digest = sha256_of(&data);
    let out = d.ctr_with_input(&["content", "ingest", "ingest-1"], &data);
    assert!(out.status.success(), "{out:?}\n{}", server.log());
    assert_eq!(blobs_under(&remote_root), vec![digest.clone()]);
    assert!(
        blobs_under(&local_root).is_empty(),
        "the local store stays empty"
    );
    let ls = d.ctr_ok(&["content", "ls"]);
    assert!(ls.contains(&digest) && ls.contains("3.146MB"), "{ls}");
    let got = d.ctr(&["content", "get", &digest]);
    assert!(got.status.success(), "{got:?}");
    assert!(got.stdout == data, "content get returns the ingested bytes");
    // A second namespace does not see it (the daemon keeps namespaces).
    assert!(
        !d.ctr_ok(&["-n", "other", "content", "ls"])
            .contains(&digest)
    );
    d.ctr_ok(&["content", "rm", &digest]);
    assert!(!d.ctr_ok(&["content", "ls"]).contains(&digest));
    // The deletion schedules a collection, which deletes the blob in the proxy's root.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !blobs_under(&remote_root).is_empty() {
        assert!(
            Instant::now() < deadline,
            "blob not collected in the proxy:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // A whole image: import (with unpack, reading the layer back through the proxy).
    let tar = berth_testkit::fixtures().join("busybox.oci.tar");
    d.ctr_ok(&["images", "import", tar.to_str().unwrap()]);
    let image = "import.local/busybox:latest";
    assert!(d.ctr_ok(&["images", "ls", "-q"]).contains(image));
    let check = d.ctr_ok(&["images", "check"]);
    assert!(check.contains("complete"), "{check}");
    let remote = blobs_under(&remote_root);
    let listed = d.ctr_ok(&["content", "ls", "-q"]);
    assert!(
        remote.len() >= 3,
        "index/manifest/config/layer in the proxy: {remote:?}"
    );
    for digest in listed.lines() {
        assert!(
            remote.contains(&digest.to_string()),
            "{digest} not in {remote:?}"
        );
    }
    assert!(
        blobs_under(&local_root).is_empty(),
        "the local store stays empty"
    );
    // The layer was applied: the image's snapshot exists and holds busybox.
    let snapshots = d.ctr_ok(&["snapshots", "ls"]);
    assert!(snapshots.contains("Committed"), "{snapshots}");
    let mnt = server.dir.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    d.ctr_ok(&["images", "mount", image, mnt.to_str().unwrap()]);
    let has_busybox = mnt.join("bin/busybox").exists();
    d.ctr_ok(&["images", "unmount", "--rm", mnt.to_str().unwrap()]);
    assert!(has_busybox, "the unpacked image holds bin/busybox");
    // A diff written back through the proxy: the differ takes the writer's digest before
    // it commits, so the proxy's writer must know it although berthd's Write replies
    // leave it out.
    let key = snapshots
        .lines()
        .skip(1)
        .find(|l| l.contains("Committed"))
        .and_then(|l| l.split_whitespace().next())
        .expect("a committed snapshot");
    let diff = d.ctr(&[
        "snapshots",
        "diff",
        "--media-type",
        "application/vnd.oci.image.layer.v1.tar",
        key,
    ]);
    assert!(
        diff.status.success(),
        "snapshots diff through the proxy: {}\n{}",
        String::from_utf8_lossy(&diff.stderr),
        server.log()
    );
    assert!(
        diff.stdout.windows(11).any(|w| w == b"bin/busybox"),
        "the diff holds bin/busybox"
    );
    d.ctr_ok(&["images", "rm", "--sync", image]);
    assert!(
        blobs_under(&remote_root).is_empty(),
        "image blobs collected in the proxy"
    );
}

/// A content proxy whose far end is namespaced — another berthd, as it would be a
/// containerd — gets each request's namespace in the `containerd-namespace` header, as
/// containerd's proxy sends it: the blobs land in the far end's namespace of the request.
#[test]
fn content_proxy_sends_the_namespace_of_the_request() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let backend = Daemon::start_with_config(NO_STARTUP_GC);
    let d = Daemon::start_with_config(&typed_proxy_config("far", "content", &backend.socket));
    let data: Vec<u8> = (0..(1 << 20) + 5).map(|i| (i % 241) as u8).collect();
    let digest = sha256_of(&data);
    let out = d.ctr_with_input(&["-n", "team", "content", "ingest", "in-team"], &data);
    assert!(
        out.status.success(),
        "{out:?}\nfront:\n{}\nbackend:\n{}",
        berth_testkit::tail(&d.log(), 30),
        berth_testkit::tail(&backend.log(), 30)
    );
    let listed = |daemon: &Daemon, ns: &str| daemon.ctr_ok(&["-n", ns, "content", "ls", "-q"]);
    assert!(listed(&backend, "team").contains(&digest));
    assert!(!listed(&backend, "default").contains(&digest));
    let got = d.ctr(&["-n", "team", "content", "get", &digest]);
    assert!(got.status.success(), "{got:?}");
    assert!(got.stdout == data, "content get through the proxy differs");
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
