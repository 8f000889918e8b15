//! Malicious layers through the daemon: the stock `ctr images import` of OCI archives
//! whose layer tries each escape class. Every import must fail with a clear error (or,
//! for symlink tricks that can only land inside the root, succeed harmlessly) and the
//! host file must stay untouched.

use berth_testkit::Daemon;
use sha2::Digest as _;
use std::io::Write;
use std::path::Path;

fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

/// One raw tar entry (names byte for byte, no sanitising).
fn entry(out: &mut Vec<u8>, name: &str, kind: tar::EntryType, link: &str, data: &[u8]) {
    let mut h = tar::Header::new_ustar();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    h.set_mtime(1_700_000_000);
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    out.extend(std::iter::repeat_n(0u8, (512 - data.len() % 512) % 512));
}

/// Writes an OCI archive holding one image whose single layer is `layer_tar`.
fn oci_archive(path: &Path, name: &str, layer_tar: &[u8]) {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(layer_tar).unwrap();
    let layer = gz.finish().unwrap();
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{}},"rootfs":{{"type":"layers","diff_ids":["{}"]}}}}"#,
        sha(layer_tar)
    );
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":{}}}]}}"#,
        sha(config.as_bytes()),
        config.len(),
        sha(&layer),
        layer.len()
    );
    let index = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{}","size":{},"annotations":{{"org.opencontainers.image.ref.name":"{name}"}},"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#,
        sha(manifest.as_bytes()),
        manifest.len()
    );
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    let mut add = |p: &str, data: &[u8]| {
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, p, data).unwrap();
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    add("index.json", index.as_bytes());
    for blob in [config.as_bytes(), manifest.as_bytes(), &layer[..]] {
        add(&format!("blobs/sha256/{}", &sha(blob)[7..]), blob);
    }
    b.finish().unwrap();
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

#[test]
fn malicious_layers_are_refused_through_ctr() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let d = Daemon::start();
    let outside = d.dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let victim = outside.join("victim");
    std::fs::write(&victim, "original").unwrap();
    let victim_s = victim.display().to_string();
    let outside_s = outside.display().to_string();
    let untouched = || {
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "original");
        let names: Vec<_> = std::fs::read_dir(&outside).unwrap().collect();
        assert_eq!(names.len(), 1, "nothing created next to the victim");
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&victim).unwrap().nlink(), 1);
    };
    // (name, layer, the error the user must see; None = must import harmlessly)
    let up = "../".repeat(12);
    let cases: Vec<(&str, Vec<u8>, Option<&str>)> = vec![
        (
            "dotdot",
            {
                let mut t = Vec::new();
                entry(
                    &mut t,
                    &format!("{up}{}", &victim_s[1..]),
                    tar::EntryType::Regular,
                    "",
                    b"pwned",
                );
                t
            },
            Some("path escapes the root"),
        ),
        (
            "absolute",
            {
                let mut t = Vec::new();
                entry(&mut t, &victim_s, tar::EntryType::Regular, "", b"pwned");
                t
            },
            Some("absolute path not allowed"),
        ),
        (
            "hardlink",
            {
                let mut t = Vec::new();
                entry(
                    &mut t,
                    "h",
                    tar::EntryType::Link,
                    &format!("{up}{}", &victim_s[1..]),
                    b"",
                );
                t
            },
            Some("path escapes the root"),
        ),
        (
            "device",
            {
                let mut t = Vec::new();
                entry(
                    &mut t,
                    &format!("{up}{}/dev", &outside_s[1..]),
                    tar::EntryType::Char,
                    "",
                    b"",
                );
                t
            },
            Some("path escapes the root"),
        ),
        (
            "symlink",
            {
                let mut t = Vec::new();
                entry(&mut t, "s", tar::EntryType::Symlink, &outside_s, b"");
                entry(&mut t, "s/victim", tar::EntryType::Regular, "", b"pwned");
                entry(&mut t, "d", tar::EntryType::Directory, "", b"");
                entry(&mut t, "d", tar::EntryType::Symlink, &outside_s, b"");
                entry(&mut t, "d/new", tar::EntryType::Regular, "", b"pwned");
                t
            },
            None,
        ),
    ];
    for (name, mut layer, expected) in cases {
        layer.extend(std::iter::repeat_n(0u8, 1024));
        let archive = d.dir.path().join(format!("{name}.tar"));
        oci_archive(&archive, &format!("evil/{name}:latest"), &layer);
        let a = archive.to_str().unwrap();
        match expected {
            Some(message) => {
                let err = d.ctr_err(&["images", "import", a]);
                assert!(err.contains(message), "{name}: {err}");
            }
            None => {
                d.ctr_ok(&["images", "import", a]);
            }
        }
        untouched();
    }
}
