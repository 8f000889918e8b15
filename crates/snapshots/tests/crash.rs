//! berthd killed (`kill -9`) in the middle of `ctr images import`, at several moments of
//! its ingest and unpack: the next start opens the store, the interrupted import (whose
//! ctr waits for the daemon and goes on) or a new one unpacks exactly, and once the
//! image and the imports' leases are gone the collector leaves no snapshot directory,
//! snapshot record or blob behind — a crash never leaves an orphan that only a manual
//! clean-up would find.

use berth_testkit::{Daemon, fixtures, tree_listing};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The name the fixture archive gives its image.
const IMAGE: &str = "import.local/layers:latest";

#[test]
fn a_crash_during_unpack_leaves_a_store_the_next_import_and_gc_repair() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let fx = fixtures();
    let tar = fx.join("layers.oci.tar");
    let expected = std::fs::read_to_string(fx.join("layers.expected")).unwrap();
    let mut d = Daemon::start();
    let snapshot_dirs = d
        .root
        .join("io.containerd.snapshotter.v1.overlayfs/snapshots");
    let blobs = d.root.join("io.containerd.content.v1.content/blobs/sha256");
    // Round n kills the daemon once the import has made n snapshot directories: during
    // the ingest (n = 0, after 100 ms), then as soon as the n-th layer's extraction
    // snapshot appears (while it is prepared or its files are written; the first layer
    // holds 9k files).
    for made in 0..4usize {
        let mut import = Command::new("ctr")
            .arg("--address")
            .arg(&d.socket)
            .args(["images", "import"])
            .arg(&tar)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("ctr images import");
        if made == 0 {
            std::thread::sleep(Duration::from_millis(100));
        } else {
            let deadline = Instant::now() + Duration::from_secs(60);
            while entries(&snapshot_dirs).len() < made {
                assert!(
                    import.try_wait().unwrap().is_none() && Instant::now() < deadline,
                    "round {made}: the import ended or stalled before its layer {made}"
                );
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        assert!(
            import.try_wait().unwrap().is_none(),
            "round {made}: the import finished before the crash"
        );
        d.kill9();
        // A ctr that was between two calls waits for the daemon to come back and then
        // goes on, so it is waited for only after the restart.
        d.spawn()
            .unwrap_or_else(|log| panic!("round {made}: berthd did not start again:\n{log}"));
        let finished = wait_or_kill(&mut import, Duration::from_secs(60));
        if !finished
            || !d
                .ctr_ok(&["images", "ls", "-q"])
                .lines()
                .any(|l| l == IMAGE)
        {
            let out = d.ctr_ok(&["images", "import", tar.to_str().unwrap()]);
            assert!(out.contains("done"), "round {made}: {out}");
        }
        let target = d.dir.path().join("mnt");
        std::fs::create_dir_all(&target).unwrap();
        d.ctr_ok(&["images", "mount", IMAGE, target.to_str().unwrap()]);
        let listing = tree_listing(&target);
        d.ctr_ok(&["images", "unmount", target.to_str().unwrap()]);
        assert!(
            listing == expected,
            "round {made}: the unpack after the crash differs from the reference"
        );

        // ctr's imports hold their work under leases (24 h expiry); an interrupted
        // one's stays until removed, as in containerd.
        for lease in d.ctr_ok(&["leases", "ls", "-q"]).lines() {
            d.ctr_ok(&["leases", "rm", "--sync", lease.trim()]);
        }
        d.ctr_ok(&["images", "rm", "--sync", IMAGE]);
        let deadline = Instant::now() + Duration::from_secs(10);
        let leftovers = || {
            let records = d.ctr_ok(&["snapshots", "ls"]);
            let records: Vec<String> = records.lines().skip(1).map(str::to_string).collect();
            (records, entries(&snapshot_dirs), entries(&blobs))
        };
        let mut left = leftovers();
        while left != Default::default() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            left = leftovers();
        }
        assert_eq!(
            left,
            Default::default(),
            "round {made}: left behind (snapshot records, snapshot directories, blobs); \
             log:\n{}",
            berth_testkit::tail(&d.log(), 40)
        );
    }
}

/// Waits for `child`; one still running after `timeout` is killed. Whether it ended
/// successfully.
fn wait_or_kill(child: &mut Child, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.success();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}
