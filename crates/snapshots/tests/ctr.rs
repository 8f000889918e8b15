//! The snapshots and diff services through the stock `ctr` against a private berthd:
//! every `ctr snapshots` subcommand, and `ctr images import` unpacking the multi-layer
//! fixture (whiteouts, opaque dir, symlink, hardlink) on each snapshotter, checked
//! against the reference unpack.

use berth_testkit::{Daemon, NO_STARTUP_GC, fixtures, tree_listing};
use std::time::{Duration, Instant};

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[test]
fn ctr_snapshot_commands() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    // The view `v1` is unreferenced (`ctr snapshots view` sets no gc.root label and uses
    // no lease), so any collection removes it, as containerd's does: keep the start-up
    // collection out of the way (see `unreferenced_view_is_collected_like_containerd`).
    let d = Daemon::start_with_config(NO_STARTUP_GC);
    d.ctr_ok(&["snapshots", "prepare", "base", ""]);
    let mounts = d.ctr_ok(&["snapshots", "mounts", "/mnt/x", "base"]);
    assert!(
        mounts.contains("mount -t bind") && mounts.contains("rw,rbind"),
        "{mounts}"
    );
    d.ctr_ok(&["snapshots", "commit", "base-c", "base"]);
    d.ctr_ok(&["snapshots", "prepare", "child", "base-c"]);
    d.ctr_ok(&["snapshots", "view", "v1", "base-c"]);
    let ls = d.ctr_ok(&["snapshots", "ls"]);
    assert!(ls.contains("child  base-c Active"), "{ls}");
    assert!(ls.contains("v1     base-c View"), "{ls}");
    let info = d.ctr_ok(&["snapshots", "info", "base-c"]);
    assert!(info.contains("\"Kind\": \"Committed\""), "{info}");
    let usage = d.ctr_ok(&["snapshots", "usage", "base-c"]);
    assert!(usage.contains("base-c"), "{usage}");
    let tree = d.ctr_ok(&["snapshots", "tree"]);
    assert!(
        tree.contains("\\_ child") && tree.contains("\\_ v1"),
        "{tree}"
    );
    d.ctr_ok(&["snapshots", "label", "base-c", "foo=bar"]);
    assert!(
        d.ctr_ok(&["snapshots", "info", "base-c"])
            .contains("\"foo\": \"bar\"")
    );
    let err = d.ctr_err(&["snapshots", "rm", "base-c"]);
    assert!(
        err.contains("cannot remove snapshot with child: failed precondition"),
        "{err}"
    );
    let err = d.ctr_err(&["snapshots", "prepare", "child", "base-c"]);
    assert!(err.contains("already exists"), "{err}");
    let err = d.ctr_err(&["snapshots", "--snapshotter", "nope", "ls"]);
    assert!(err.contains("snapshotter not loaded: nope"), "{err}");
    // Namespaces are isolated.
    assert!(
        !d.ctr_ok(&["--namespace", "other", "snapshots", "ls"])
            .contains("base-c")
    );
    // The view goes first: removing `child` is a deletion, which schedules a collection
    // right away (none is pending without the start-up one), and that collection would
    // take the unreferenced view before `rm` reaches it. `child` and `base-c` are roots.
    d.ctr_ok(&["snapshots", "rm", "v1", "child", "base-c"]);
    assert_eq!(d.ctr_ok(&["snapshots", "ls"]).lines().count(), 1);
    // Native too.
    d.ctr_ok(&["snapshots", "--snapshotter", "native", "prepare", "n", ""]);
    d.ctr_ok(&["snapshots", "--snapshotter", "native", "rm", "n"]);
}

/// `ctr snapshots ls` keys.
fn snapshot_keys(d: &Daemon) -> Vec<String> {
    d.ctr_ok(&["snapshots", "ls"])
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// Regression for `ctr_snapshot_commands` losing its view: without the start-up
/// collection, an unreferenced view made right after start-up stays until a collection
/// runs (the start-up one is `startup_delay` = 100 ms after the GC plugin's init, i.e.
/// while a test's first commands run).
#[test]
fn unreferenced_view_survives_when_no_collection_runs() {
    if !is_root() {
        return;
    }
    let d = Daemon::start_with_config(NO_STARTUP_GC);
    d.ctr_ok(&["snapshots", "prepare", "base", ""]);
    d.ctr_ok(&["snapshots", "commit", "base-c", "base"]);
    d.ctr_ok(&["snapshots", "view", "v1", "base-c"]);
    // Well past the default start-up delay.
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(snapshot_keys(&d), ["base-c", "v1"]);
    d.ctr_ok(&["snapshots", "rm", "v1", "base-c"]);
}

/// containerd's GC semantics (metadata/gc.go): snapshots are roots only when labelled
/// `containerd.io/gc.root` (which `ctr snapshots prepare` and `commit` set) or leased;
/// a parent is kept by its children; a view without either is removed by the next
/// collection, here one a deletion triggers.
#[test]
fn unreferenced_view_is_collected_like_containerd() {
    if !is_root() {
        return;
    }
    let d = Daemon::start_with_config(NO_STARTUP_GC);
    d.ctr_ok(&["snapshots", "prepare", "base", ""]);
    d.ctr_ok(&["snapshots", "commit", "base-c", "base"]);
    d.ctr_ok(&["snapshots", "prepare", "child", "base-c"]);
    d.ctr_ok(&["snapshots", "view", "v1", "base-c"]);
    assert_eq!(snapshot_keys(&d), ["base-c", "child", "v1"]);
    // A deletion schedules a collection.
    d.ctr_ok(&["snapshots", "prepare", "tmp", ""]);
    d.ctr_ok(&["snapshots", "rm", "tmp"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut keys = snapshot_keys(&d);
    while keys.contains(&"v1".to_string()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        keys = snapshot_keys(&d);
    }
    assert_eq!(keys, ["base-c", "child"], "{}", d.log());
    d.ctr_ok(&["snapshots", "rm", "child", "base-c"]);
}

fn import_and_check(d: &Daemon, snapshotter: &str) {
    let fx = fixtures();
    let tar = fx.join("layers.oci.tar");
    let out = d.ctr_ok(&[
        "images",
        "import",
        "--snapshotter",
        snapshotter,
        "--base-name",
        "localhost/layers",
        tar.to_str().unwrap(),
    ]);
    assert!(out.contains("done"), "{out}");
    let image = d
        .ctr_ok(&["images", "ls", "-q"])
        .lines()
        .find(|l| l.contains("layers"))
        .expect("imported image")
        .to_string();
    let target = d.dir.path().join(format!("mnt-{snapshotter}"));
    std::fs::create_dir_all(&target).unwrap();
    d.ctr_ok(&[
        "images",
        "mount",
        "--snapshotter",
        snapshotter,
        &image,
        target.to_str().unwrap(),
    ]);
    let listing = tree_listing(&target);
    d.ctr_ok(&["images", "unmount", target.to_str().unwrap()]);
    let expected = std::fs::read_to_string(fx.join("layers.expected")).unwrap();
    if listing != expected {
        let a = d.dir.path().join("got");
        std::fs::write(&a, &listing).unwrap();
        let diff = std::process::Command::new("diff")
            .arg(fx.join("layers.expected"))
            .arg(&a)
            .output()
            .unwrap();
        panic!(
            "unpacked tree differs on {snapshotter}:\n{}",
            berth_testkit::tail(&String::from_utf8_lossy(&diff.stdout), 40)
        );
    }
}

#[test]
fn ctr_import_unpacks_exactly_on_overlayfs() {
    if !is_root() {
        return;
    }
    let d = Daemon::start();
    import_and_check(&d, "overlayfs");
}

#[test]
fn ctr_import_unpacks_exactly_on_native() {
    if !is_root() {
        return;
    }
    let d = Daemon::start();
    import_and_check(&d, "native");
}

/// btrfs needs its root on btrfs: a loop-mounted image, given to the plugin as
/// `root_path`.
#[test]
fn ctr_import_unpacks_exactly_on_btrfs() {
    if !is_root() || !berth_testkit::have("mkfs.btrfs") {
        eprintln!("skipped: needs root and btrfs-progs");
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("bb-")
        .tempdir_in("/tmp")
        .unwrap();
    let img = dir.path().join("btrfs.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let run = |cmd: &str, args: &[&std::ffi::OsStr]| {
        let ok = std::process::Command::new(cmd)
            .args(args)
            .status()
            .unwrap()
            .success();
        assert!(ok, "{cmd} {args:?}");
    };
    run(
        "mkfs.btrfs",
        &["-q".as_ref(), "-f".as_ref(), img.as_os_str()],
    );
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    run(
        "mount",
        &[
            "-o".as_ref(),
            "loop".as_ref(),
            img.as_os_str(),
            mnt.as_os_str(),
        ],
    );
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    {
        let d = Daemon::start_with_config(&format!(
            "[plugins.\"io.containerd.snapshotter.v1.btrfs\"]\n  root_path = {:?}\n",
            mnt.join("root").display().to_string()
        ));
        let plugins = d.ctr_ok(&["plugins", "ls"]);
        assert!(
            plugins
                .lines()
                .any(|l| l.contains("btrfs") && l.contains(" ok")),
            "{plugins}"
        );
        import_and_check(&d, "btrfs");
    }
}

/// Snapshot events reach `ctr events`, and removing an image lets the garbage collector
/// remove its unpacked snapshots, records and directories alike.
#[test]
fn ctr_events_and_garbage_collection() {
    if !is_root() {
        return;
    }
    let d = Daemon::start();
    let mut events = std::process::Command::new("ctr")
        .arg("--address")
        .arg(&d.socket)
        .arg("events")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    d.ctr_ok(&["snapshots", "prepare", "ev", ""]);
    d.ctr_ok(&["snapshots", "commit", "ev-c", "ev"]);
    d.ctr_ok(&["snapshots", "rm", "ev-c"]);
    std::thread::sleep(std::time::Duration::from_millis(300));
    events.kill().unwrap();
    let out = events.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.contains("/snapshot/prepare") && out.contains("\"key\":\"ev\""),
        "{out}"
    );
    assert!(
        out.contains("/snapshot/commit") && out.contains("\"name\":\"ev-c\""),
        "{out}"
    );
    assert!(out.contains("/snapshot/remove"), "{out}");

    let fx = fixtures();
    let tar = fx.join("busybox.oci.tar");
    d.ctr_ok(&["images", "import", tar.to_str().unwrap()]);
    assert!(d.ctr_ok(&["snapshots", "ls"]).lines().count() > 1);
    let images = d.ctr_ok(&["images", "ls", "-q"]);
    let mut args = vec!["images", "rm", "--sync"];
    args.extend(images.lines());
    d.ctr_ok(&args);
    assert_eq!(
        d.ctr_ok(&["snapshots", "ls"]).lines().count(),
        1,
        "records collected"
    );
    let dir = d
        .root
        .join("io.containerd.snapshotter.v1.overlayfs/snapshots");
    let mut left = 1;
    for _ in 0..50 {
        left = std::fs::read_dir(&dir).unwrap().count();
        if left == 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(left, 0, "snapshot directories removed");
}

/// A containerd configuration with a devmapper section loads unchanged. There is no
/// devmapper snapshotter in Berth (and no device-mapper driver in this machine's kernel),
/// so `ctr plugins ls` shows the plugin skipped without a pool, failed with one — and
/// the others still load.
#[test]
fn devmapper_configuration_is_accepted_and_reported() {
    if !is_root() {
        return;
    }
    let status_of = |d: &Daemon| {
        let plugins = d.ctr_ok(&["plugins", "ls"]);
        plugins
            .lines()
            .find(|l| l.contains("io.containerd.snapshotter.v1") && l.contains(" devmapper "))
            .map(|l| l.split_whitespace().last().unwrap_or_default().to_string())
            .unwrap_or_else(|| panic!("no devmapper plugin in:\n{plugins}"))
    };
    let d = Daemon::start();
    assert_eq!(status_of(&d), "skip");
    drop(d);
    let d = Daemon::start_with_config(
        "[plugins.\"io.containerd.snapshotter.v1.devmapper\"]\n  pool_name = \"berth-pool\"\n  base_image_size = \"8GB\"\n",
    );
    assert_eq!(status_of(&d), "error");
    let plugins = d.ctr_ok(&["plugins", "ls"]);
    assert!(
        plugins
            .lines()
            .any(|l| l.contains(" overlayfs ") && l.trim_end().ends_with(" ok")),
        "{plugins}"
    );
}
