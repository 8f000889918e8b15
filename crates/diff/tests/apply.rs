//! Layer apply: the tree a layer describes, whiteouts both ways, and the escape
//! classes a malicious layer may try (each must leave the host untouched and, where the
//! name itself is bad, fail with a clear error).

use berth_core::error::ErrorKind;
use berth_diff::apply::{ApplyOptions, Whiteouts, apply_tar};
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

/// Writes one raw tar entry; names are copied byte for byte (no sanitising), so tests
/// can express anything an attacker can.
struct Tar(Vec<u8>);

impl Tar {
    fn new() -> Tar {
        Tar(Vec::new())
    }

    fn raw(
        &mut self,
        name: &[u8],
        kind: tar::EntryType,
        link: &[u8],
        mode: u32,
        data: &[u8],
    ) -> &mut Self {
        let mut h = tar::Header::new_ustar();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_600_000_000);
        h.set_size(data.len() as u64);
        h.set_cksum();
        self.0.extend_from_slice(h.as_bytes());
        self.0.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.0.extend(std::iter::repeat_n(0u8, pad));
        self
    }

    fn file(&mut self, name: &str, data: &str) -> &mut Self {
        self.raw(
            name.as_bytes(),
            tar::EntryType::Regular,
            b"",
            0o644,
            data.as_bytes(),
        )
    }
    fn dir(&mut self, name: &str, mode: u32) -> &mut Self {
        self.raw(name.as_bytes(), tar::EntryType::Directory, b"", mode, b"")
    }
    fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.raw(
            name.as_bytes(),
            tar::EntryType::Symlink,
            target.as_bytes(),
            0o777,
            b"",
        )
    }
    fn hardlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.raw(
            name.as_bytes(),
            tar::EntryType::Link,
            target.as_bytes(),
            0o644,
            b"",
        )
    }
    fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        let mut data = Vec::new();
        for (k, v) in records {
            let rest = k.len() + v.len() + 3;
            let mut len = rest + rest.to_string().len();
            if len.to_string().len() != rest.to_string().len() {
                len = rest + len.to_string().len();
            }
            data.extend(format!("{len} {k}=").into_bytes());
            data.extend_from_slice(v);
            data.push(b'\n');
        }
        self.raw(b"PaxHeader", tar::EntryType::XHeader, b"", 0o644, &data)
    }
    fn done(&mut self) -> Vec<u8> {
        let mut out = self.0.clone();
        out.extend(std::iter::repeat_n(0u8, 1024));
        out
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    outside: std::path::PathBuf,
    victim: std::path::PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let outside = dir.path().join("outside");
    fs::create_dir(&root).unwrap();
    fs::create_dir(&outside).unwrap();
    fs::set_permissions(&outside, fs::Permissions::from_mode(0o755)).unwrap();
    let victim = outside.join("victim");
    fs::write(&victim, "original").unwrap();
    fs::set_permissions(&victim, fs::Permissions::from_mode(0o600)).unwrap();
    Fixture {
        root,
        outside,
        victim,
        _dir: dir,
    }
}

impl Fixture {
    fn apply(&self, tar: Vec<u8>) -> berth_core::Result<()> {
        apply_tar(&self.root, tar.as_slice(), &ApplyOptions::default()).map(|_| ())
    }

    fn assert_host_untouched(&self) {
        assert_eq!(fs::read_to_string(&self.victim).unwrap(), "original");
        let m = fs::symlink_metadata(&self.victim).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o600, "victim mode");
        assert_eq!(m.uid(), 0);
        assert_eq!(m.nlink(), 1, "no hard link to the victim");
        let names: Vec<_> = fs::read_dir(&self.outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from("victim")],
            "nothing created outside"
        );
        assert_eq!(fs::metadata(&self.outside).unwrap().mode() & 0o7777, 0o755);
    }
}

#[test]
fn applies_files_dirs_links_modes_and_times() {
    let f = fixture();
    let tar = Tar::new()
        .dir("etc/", 0o755)
        .file("etc/passwd", "root:x:0:0")
        .raw(b"bin/su", tar::EntryType::Regular, b"", 0o4755, b"x")
        .symlink("etc/link", "passwd")
        .hardlink("etc/hard", "etc/passwd")
        .raw(b"dev/null", tar::EntryType::Char, b"", 0o666, b"")
        .raw(b"fifo", tar::EntryType::Fifo, b"", 0o600, b"")
        .pax(&[
            ("SCHILY.xattr.user.test", b"v"),
            ("path", "long/".repeat(40).as_bytes()),
        ])
        .file("ignored-name", "long")
        .done();
    f.apply(tar).unwrap();
    let r = &f.root;
    assert_eq!(
        fs::read_to_string(r.join("etc/passwd")).unwrap(),
        "root:x:0:0"
    );
    assert_eq!(
        fs::read_link(r.join("etc/link")).unwrap(),
        Path::new("passwd")
    );
    assert_eq!(
        fs::metadata(r.join("etc/hard")).unwrap().ino(),
        fs::metadata(r.join("etc/passwd")).unwrap().ino()
    );
    assert_eq!(
        fs::metadata(r.join("bin/su")).unwrap().mode() & 0o7777,
        0o4755
    );
    assert_eq!(fs::metadata(r.join("etc")).unwrap().mtime(), 1_600_000_000);
    assert_eq!(
        fs::metadata(r.join("etc/passwd")).unwrap().mtime(),
        1_600_000_000
    );
    assert!(
        fs::metadata(r.join("dev/null"))
            .unwrap()
            .file_type()
            .is_char_device()
    );
    assert!(fs::metadata(r.join("fifo")).unwrap().file_type().is_fifo());
    let long = r.join("long/".repeat(40).trim_end_matches('/'));
    assert_eq!(fs::read_to_string(&long).unwrap(), "long");
    let xattrs = berth_snapshots::fsutil::list_xattrs(&long).unwrap();
    assert!(
        xattrs
            .iter()
            .any(|(k, v)| k.to_str() == Ok("user.test") && v == b"v"),
        "{xattrs:?}"
    );
}

#[test]
fn whiteouts_remove_and_opaque_dirs_keep_only_this_layer() {
    let f = fixture();
    f.apply(
        Tar::new()
            .file("a/x", "1")
            .file("a/y", "2")
            .file("b/z", "3")
            .file("keep", "k")
            .done(),
    )
    .unwrap();
    f.apply(
        Tar::new()
            .file(".wh.keep", "")
            .dir("a/", 0o755)
            .file(".wh.b", "")
            .file("a/.wh..wh..opq", "")
            .file("a/new", "n")
            .done(),
    )
    .unwrap();
    let r = &f.root;
    assert!(!r.join("keep").exists());
    assert!(!r.join("b").exists());
    assert!(!r.join("a/x").exists() && !r.join("a/y").exists());
    assert_eq!(fs::read_to_string(r.join("a/new")).unwrap(), "n");
}

#[test]
fn overlay_whiteouts_are_translated() {
    let f = fixture();
    let tar = Tar::new()
        .dir("a/", 0o755)
        .file("a/.wh..wh..opq", "")
        .file(".wh.gone", "")
        .done();
    let opts = ApplyOptions {
        whiteouts: Whiteouts::Overlay {
            lowers: vec![],
            userxattr: false,
        },
    };
    apply_tar(&f.root, tar.as_slice(), &opts).unwrap();
    let m = fs::symlink_metadata(f.root.join("gone")).unwrap();
    assert!(m.file_type().is_char_device());
    assert_eq!(m.rdev(), 0);
    let xattrs = berth_snapshots::fsutil::list_xattrs(&f.root.join("a")).unwrap();
    assert!(
        xattrs
            .iter()
            .any(|(k, v)| k.to_str() == Ok("trusted.overlay.opaque") && v == b"y")
    );
}

fn expect_invalid(result: berth_core::Result<()>, needle: &str) {
    let err = result.expect_err("the layer must be refused");
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    assert!(err.to_string().contains(needle), "{err}");
}

#[test]
fn dotdot_names_are_refused() {
    let f = fixture();
    expect_invalid(
        f.apply(Tar::new().file("../outside/victim", "pwned").done()),
        "path escapes the root",
    );
    expect_invalid(
        f.apply(Tar::new().file("a/../../outside/victim", "pwned").done()),
        "path escapes the root",
    );
    expect_invalid(
        f.apply(
            Tar::new()
                .raw(b"../outside/dev", tar::EntryType::Char, b"", 0o666, b"")
                .done(),
        ),
        "path escapes the root",
    );
    f.assert_host_untouched();
}

#[test]
fn absolute_names_are_refused() {
    let f = fixture();
    let name = f.victim.display().to_string();
    expect_invalid(
        f.apply(Tar::new().file(&name, "pwned").done()),
        "absolute path",
    );
    f.assert_host_untouched();
}

#[test]
fn symlink_escapes_stay_in_the_root() {
    let f = fixture();
    let outside = f.outside.display().to_string();
    // An absolute symlink to the host directory, then a write through it.
    f.apply(
        Tar::new()
            .symlink("abs", &outside)
            .file("abs/victim", "pwned")
            .done(),
    )
    .unwrap();
    // A relative one climbing past the root.
    f.apply(
        Tar::new()
            .symlink("up", "../../../../../../..")
            .file(&format!("up{outside}/victim"), "pwned2")
            .done(),
    )
    .unwrap();
    // A symlink as the final component is replaced, never written through.
    f.apply(
        Tar::new()
            .symlink("direct", &f.victim.display().to_string())
            .file("direct", "pwned3")
            .done(),
    )
    .unwrap();
    // A directory entry over a symlink to a host dir must not chmod the host dir.
    f.apply(
        Tar::new()
            .symlink("hostdir", &outside)
            .dir("hostdir/", 0o777)
            .done(),
    )
    .unwrap();
    f.assert_host_untouched();
    // The writes landed inside the root, where the layer's own paths point.
    let inside = f.root.join(outside.trim_start_matches('/')).join("victim");
    assert_eq!(fs::read_to_string(&inside).unwrap(), "pwned2");
    assert_eq!(fs::read_to_string(f.root.join("direct")).unwrap(), "pwned3");
    assert!(
        fs::symlink_metadata(f.root.join("hostdir"))
            .unwrap()
            .is_dir()
    );
}

#[test]
fn symlink_swapped_between_entries_stays_in_the_root() {
    let f = fixture();
    let outside = f.outside.display().to_string();
    let tar = Tar::new()
        .dir("d/", 0o755)
        .file("d/a", "1")
        .symlink("d", &outside) // replaces the directory
        .file("d/victim", "pwned")
        .raw(b"d/dev", tar::EntryType::Block, b"", 0o600, b"")
        .done();
    f.apply(tar).unwrap();
    f.assert_host_untouched();
    assert!(
        f.root
            .join(outside.trim_start_matches('/'))
            .join("victim")
            .exists()
    );
}

#[test]
fn hardlink_escapes_are_refused() {
    let f = fixture();
    expect_invalid(
        f.apply(Tar::new().hardlink("h", "../outside/victim").done()),
        "path escapes the root",
    );
    let victim = f.victim.display().to_string();
    expect_invalid(
        f.apply(Tar::new().hardlink("h", &victim).done()),
        "absolute path",
    );
    // Through a symlinked directory: resolved in the root, where there is no victim.
    let err = f
        .apply(
            Tar::new()
                .symlink("s", &f.outside.display().to_string())
                .hardlink("h", "s/victim")
                .done(),
        )
        .unwrap_err();
    assert!(err.to_string().contains("link target"), "{err}");
    // A hard link to a symlink links the symlink, not its target.
    f.apply(
        Tar::new()
            .symlink("sl", &victim)
            .hardlink("h2", "sl")
            .done(),
    )
    .unwrap();
    assert!(
        fs::symlink_metadata(f.root.join("h2"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    f.assert_host_untouched();
}

#[test]
fn oversized_headers_are_refused() {
    let f = fixture();
    // A GNU long name claiming 1 GiB: refused before anything is read into memory.
    let mut t = Tar::new();
    let mut h = tar::Header::new_gnu();
    h.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"././@LongLink");
    h.set_entry_type(tar::EntryType::GNULongName);
    h.set_size(1 << 30);
    h.set_cksum();
    t.0.extend_from_slice(h.as_bytes());
    let err = f.apply(t.done()).unwrap_err();
    assert!(err.to_string().contains("exceeds the limit"), "{err}");
    let big = vec![b'a'; 2 << 20];
    let err = f
        .apply(Tar::new().pax(&[("comment", &big)]).file("x", "y").done())
        .unwrap_err();
    assert!(err.to_string().contains("exceeds the limit"), "{err}");
    f.assert_host_untouched();
}
