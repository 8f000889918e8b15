//! Real-mount tests of the overlayfs and native snapshotters (run as root). Every test
//! works in a private temporary root and unmounts what it mounts.

use berth_core::error::ErrorKind;
use berth_core::labels::Labels;
use berth_core::mount::Mount;
use berth_core::snapshot::{Info, Kind, Snapshotter};
use berth_snapshots::mount::{TempMount, mount_all, unmount_all};
use berth_snapshots::native::Native;
use berth_snapshots::overlay::{Overlay, OverlayConfig, UPPERDIR_LABEL};
use std::path::Path;

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// Writes `files` into a mounted snapshot and commits it as `name`.
async fn layer(s: &dyn Snapshotter, tmp: &Path, name: &str, parent: &str, files: &[(&str, &str)]) {
    let key = format!("{name}-active");
    let mounts = s.prepare(&key, parent, Labels::new()).await.unwrap();
    let m = TempMount::new(&mounts, tmp, false).unwrap();
    for (path, content) in files {
        let p = m.path().join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        if content.is_empty() {
            std::fs::remove_file(&p).unwrap();
        } else {
            std::fs::write(&p, content).unwrap();
        }
    }
    m.close().unwrap();
    s.commit(name, &key, Labels::new()).await.unwrap();
}

async fn exercise(s: &dyn Snapshotter, tmp: &Path) {
    layer(s, tmp, "base", "", &[("a", "1"), ("dir/b", "2")]).await;
    layer(s, tmp, "second", "base", &[("a", "one"), ("c", "3")]).await;
    layer(s, tmp, "third", "second", &[("dir/b", "")]).await;

    // A view of the chain shows the merged tree and is read-only.
    let mounts = s.view("v", "third", Labels::new()).await.unwrap();
    let m = TempMount::new(&mounts, tmp, false).unwrap();
    assert_eq!(std::fs::read_to_string(m.path().join("a")).unwrap(), "one");
    assert_eq!(std::fs::read_to_string(m.path().join("c")).unwrap(), "3");
    assert!(!m.path().join("dir/b").exists());
    assert!(m.path().join("dir").is_dir());
    let err = std::fs::write(m.path().join("new"), "x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    m.close().unwrap();

    // Stat / kinds / parents.
    let info = s.stat("third").await.unwrap();
    assert_eq!(info.kind, Kind::Committed);
    assert_eq!(info.parent, "second");
    assert_eq!(s.stat("v").await.unwrap().kind, Kind::View);

    // Update labels with field paths, then walk with filters.
    let mut info = Info::new("base", Kind::Committed);
    info.labels.insert("x".into(), "y".into());
    let got = s.update(info, &["labels.x".into()]).await.unwrap();
    assert_eq!(got.labels.get("x").map(String::as_str), Some("y"));
    let found = s.walk(&["labels.x==y".into()]).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].name, "base");
    let committed = s.walk(&["kind==committed".into()]).await.unwrap();
    assert_eq!(committed.len(), 3);

    // Usage: recorded at commit.
    let usage = s.usage("base").await.unwrap();
    assert!(usage.inodes >= 3, "{usage:?}");

    // Errors.
    let err = s.remove("second").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    let err = s.prepare("v", "", Labels::new()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists);
    let err = s.prepare("x", "missing", Labels::new()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    let err = s.mounts("third").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    let err = s.commit("y", "v", Labels::new()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);

    // Removing top-down works and leaves nothing.
    for key in ["v", "third", "second", "base"] {
        s.remove(key).await.unwrap();
    }
    assert!(s.walk(&[]).await.unwrap().is_empty());
    s.cleanup().await.unwrap();
}

#[tokio::test]
async fn overlay_snapshotter_end_to_end() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = OverlayConfig {
        upperdir_label: true,
        sync_remove: true,
        ..Default::default()
    };
    let s = Overlay::new(&dir.path().join("root"), &config).unwrap();
    exercise(&s, &dir.path().join("mnt")).await;
    assert_eq!(
        std::fs::read_dir(dir.path().join("root/snapshots"))
            .unwrap()
            .count(),
        0
    );
}

#[tokio::test]
async fn overlay_mount_shapes_and_labels() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = OverlayConfig {
        upperdir_label: true,
        mount_options: vec!["nfs_export=off".into()],
        ..Default::default()
    };
    let s = Overlay::new(&dir.path().join("root"), &config).unwrap();
    // No parent: a rw bind; a view of one layer: a ro bind.
    let m = s.prepare("a", "", Labels::new()).await.unwrap();
    assert_eq!(m[0].r#type, "bind");
    assert_eq!(m[0].options, vec!["rw", "rbind"]);
    s.commit("A", "a", Labels::new()).await.unwrap();
    let m = s.view("v", "A", Labels::new()).await.unwrap();
    assert_eq!(m[0].r#type, "bind");
    assert_eq!(m[0].options, vec!["ro", "rbind"]);
    let m = s.prepare("b", "A", Labels::new()).await.unwrap();
    assert_eq!(m[0].r#type, "overlay");
    assert_eq!(m[0].options[0], "nfs_export=off");
    assert!(m[0].option("upperdir").is_some() && m[0].option("workdir").is_some());
    let info = s.stat("b").await.unwrap();
    let upper = info.labels.get(UPPERDIR_LABEL).unwrap();
    assert_eq!(m[0].option("upperdir"), Some(upper.as_str()));
    // Async remove detaches at once; cleanup removes what is left.
    s.remove("b").await.unwrap();
    s.remove("v").await.unwrap();
    s.remove("A").await.unwrap();
    s.cleanup().await.unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(
        std::fs::read_dir(dir.path().join("root/snapshots"))
            .unwrap()
            .count(),
        0
    );
}

/// A chain so deep that the lowerdir option exceeds a page still mounts (the mount is
/// made from the snapshots directory with relative lowerdirs).
#[tokio::test]
async fn overlay_deep_chain_exceeds_a_page() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A long root path makes every lowerdir long.
    let root = dir.path().join("r".repeat(100)).join("root");
    let s = Overlay::new(&root, &OverlayConfig::default()).unwrap();
    let mut parent = String::new();
    for i in 0..40 {
        let key = format!("k{i}");
        let mounts = s.prepare(&key, &parent, Labels::new()).await.unwrap();
        // Write straight into the upper dir (no mount needed to build layers).
        let upper = match mounts[0].option("upperdir") {
            Some(u) => u.to_string(),
            None => mounts[0].source.clone(),
        };
        std::fs::write(Path::new(&upper).join(format!("f{i}")), i.to_string()).unwrap();
        let name = format!("l{i}");
        s.commit(&name, &key, Labels::new()).await.unwrap();
        parent = name;
    }
    let mounts = s.prepare("top", &parent, Labels::new()).await.unwrap();
    let size: usize = mounts[0].options.iter().map(|o| o.len() + 1).sum();
    assert!(size > 4096, "options are {size} bytes");
    let target = dir.path().join("mnt");
    std::fs::create_dir(&target).unwrap();
    mount_all(&mounts, &target).unwrap();
    let ok = (0..40).all(|i| target.join(format!("f{i}")).exists());
    unmount_all(&target).unwrap();
    assert!(ok, "every layer is visible");
    // Clean up.
    s.remove("top").await.unwrap();
    for i in (0..40).rev() {
        s.remove(&format!("l{i}")).await.unwrap();
    }
}

#[tokio::test]
async fn native_snapshotter_end_to_end() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = Native::new(&dir.path().join("root")).unwrap();
    exercise(&s, &dir.path().join("mnt")).await;
    assert_eq!(
        std::fs::read_dir(dir.path().join("root/snapshots"))
            .unwrap()
            .count(),
        0
    );
}

#[tokio::test]
async fn reopened_store_keeps_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    {
        let s = Native::new(&root).unwrap();
        s.prepare("a", "", Labels::new()).await.unwrap();
        s.commit("A", "a", Labels::new()).await.unwrap();
    }
    let s = Native::new(&root).unwrap();
    assert_eq!(s.stat("A").await.unwrap().kind, Kind::Committed);
    let m: Vec<Mount> = s.view("v", "A", Labels::new()).await.unwrap();
    assert!(m[0].is_readonly());
}

/// A create interrupted by a crash after its directory was renamed into place but
/// before its transaction committed leaves `snapshots/<id>` while the ID goes back to
/// the sequence: the next create gets that ID and must take its place (it failed with
/// "failed to rename: Directory not empty" before; found by `tests/crash.rs`).
#[tokio::test]
async fn a_directory_left_by_an_interrupted_create_makes_way() {
    let dir = tempfile::tempdir().unwrap();
    for (name, s) in [
        (
            "overlay",
            Box::new(Overlay::new(&dir.path().join("overlay"), &OverlayConfig::default()).unwrap())
                as Box<dyn Snapshotter>,
        ),
        (
            "native",
            Box::new(Native::new(&dir.path().join("native")).unwrap()),
        ),
    ] {
        let snapshots = dir.path().join(name).join("snapshots");
        s.prepare("first", "", Labels::new()).await.unwrap();
        let taken: Vec<u64> = std::fs::read_dir(&snapshots)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().parse().unwrap())
            .collect();
        let next = taken.iter().max().unwrap() + 1;
        let leftover = snapshots.join(next.to_string());
        std::fs::create_dir_all(leftover.join("fs/half-written")).unwrap();
        std::fs::write(leftover.join("fs/half-written/file"), "x").unwrap();

        s.prepare("second", "", Labels::new())
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            leftover.is_dir(),
            "{name}: the new snapshot is {leftover:?}"
        );
        let root = if name == "overlay" {
            leftover.join("fs")
        } else {
            leftover.clone()
        };
        assert_eq!(
            std::fs::read_dir(&root).unwrap().count(),
            0,
            "{name}: the new snapshot starts empty"
        );
        s.remove("second").await.unwrap();
        s.remove("first").await.unwrap();
    }
}

/// A loop-mounted btrfs file system for one test; unmounted (and its loop device
/// released) on drop.
struct LoopBtrfs {
    dir: tempfile::TempDir,
    mnt: std::path::PathBuf,
}

impl LoopBtrfs {
    fn new() -> Option<LoopBtrfs> {
        let have = |tool: &str| {
            std::process::Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false)
        };
        if !is_root() || !have("mkfs.btrfs") {
            eprintln!("skipped: needs root and btrfs-progs");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("btrfs.img");
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(256 << 20).unwrap();
        let ok = std::process::Command::new("mkfs.btrfs")
            .args(["-q", "-f"])
            .arg(&img)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mkfs.btrfs");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount -o loop");
        Some(LoopBtrfs { dir, mnt })
    }
}

impl Drop for LoopBtrfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.mnt).status();
        let _ = &self.dir;
    }
}

#[tokio::test]
async fn btrfs_snapshotter_end_to_end() {
    let Some(fs) = LoopBtrfs::new() else { return };
    let s = berth_snapshots::btrfs::Btrfs::new(&fs.mnt.join("root")).unwrap();
    let m = s.prepare("probe", "", Labels::new()).await.unwrap();
    assert_eq!(m[0].r#type, "btrfs");
    assert!(m[0].option("subvolid").is_some(), "{m:?}");
    s.remove("probe").await.unwrap();
    exercise(&s, &fs.dir.path().join("tmp")).await;
    s.cleanup().await.unwrap();
    let left: Vec<_> = std::fs::read_dir(fs.mnt.join("root/active"))
        .unwrap()
        .chain(std::fs::read_dir(fs.mnt.join("root/snapshots")).unwrap())
        .collect();
    assert!(left.is_empty(), "subvolumes left: {left:?}");
}

#[test]
fn btrfs_is_skipped_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    if let Err(err) = berth_snapshots::btrfs::Btrfs::new(dir.path()) {
        assert!(err.to_string().starts_with("skip plugin:"), "{err}");
    }
}
