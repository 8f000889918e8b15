//! The daemon's top-level `[stream_processors]` through berthd: `ctr images import` of
//! an image whose layer has a custom media type is unpacked by the walking differ with
//! the configured external processor (a `gzip -dc` wrapper that records its calls).

use berth_testkit::Daemon;
use sha2::Digest as _;
use std::io::Write;
use std::path::Path;

const CUSTOM: &str = "application/vnd.example.layer.v1+gz";

fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// A tar with one regular file.
fn layer_tar(name: &str, data: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    h.set_mtime(1_700_000_000);
    h.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut h, name, data).unwrap();
    b.into_inner().unwrap()
}

/// Writes an OCI archive holding one image whose single layer is `layer_tar`, gzipped
/// and declared with `media_type`.
fn oci_archive(path: &Path, name: &str, layer_tar: &[u8], media_type: &str) {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(layer_tar).unwrap();
    let layer = gz.finish().unwrap();
    let arch = arch();
    let config = format!(
        r#"{{"architecture":"{arch}","os":"linux","config":{{}},"rootfs":{{"type":"layers","diff_ids":["{}"]}}}}"#,
        sha(layer_tar)
    );
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{{"mediaType":"{media_type}","digest":"{}","size":{}}}]}}"#,
        sha(config.as_bytes()),
        config.len(),
        sha(&layer),
        layer.len()
    );
    let index = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{}","size":{},"annotations":{{"org.opencontainers.image.ref.name":"{name}"}},"platform":{{"architecture":"{arch}","os":"linux"}}}}]}}"#,
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

/// Contents of `hello` in any overlayfs snapshot of `d`.
fn unpacked_hello(d: &Daemon) -> Option<String> {
    let dir = d
        .root
        .join("io.containerd.snapshotter.v1.overlayfs/snapshots");
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .find_map(|e| std::fs::read_to_string(e.path().join("fs/hello")).ok())
}

#[test]
fn top_level_stream_processor_unpacks_a_custom_media_type() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let tar = layer_tar("hello", b"world");
    let diff_id = sha(&tar);

    // Without a processor the layer type is not supported.
    let plain = Daemon::start();
    let archive = plain.dir.path().join("custom.tar");
    oci_archive(&archive, "localhost/custom:1", &tar, CUSTOM);
    let err = plain.ctr_err(&["images", "import", archive.to_str().unwrap()]);
    assert!(
        err.contains(&format!(
            "unsupported diff media type: {CUSTOM}: not implemented"
        )),
        "{err}"
    );
    assert!(unpacked_hello(&plain).is_none());
    drop(plain);

    // With a top-level [stream_processors] entry (not in the differ's own section).
    let tmp = tempfile::Builder::new()
        .prefix("bsp-")
        .tempdir_in("/tmp")
        .unwrap();
    let marker = tmp.path().join("calls");
    let script = tmp.path().join("processor.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$STREAM_PROCESSOR_MEDIATYPE $EXTRA\" >> {:?}\nexec gzip -dc\n",
            marker.display().to_string()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let d = Daemon::start_with_config(&format!(
        "[stream_processors]\n  [stream_processors.\"example\"]\n    accepts = [{CUSTOM:?}]\n    returns = \"application/vnd.oci.image.layer.v1.tar\"\n    path = {:?}\n    env = [\"EXTRA=from-config\"]\n",
        script.display().to_string()
    ));
    let archive = d.dir.path().join("custom.tar");
    oci_archive(&archive, "localhost/custom:1", &tar, CUSTOM);
    let out = d.ctr_ok(&["images", "import", archive.to_str().unwrap()]);
    assert!(out.contains("done"), "{out}");
    let calls = std::fs::read_to_string(&marker).unwrap_or_default();
    assert_eq!(calls.trim(), format!("{CUSTOM} from-config"), "{}", d.log());
    // Single layer: the snapshot's name is its diffID (= chainID).
    let ls = d.ctr_ok(&["snapshots", "ls"]);
    assert!(
        ls.lines()
            .any(|l| l.starts_with(&diff_id) && l.contains("Committed")),
        "{ls}"
    );
    assert_eq!(unpacked_hello(&d).as_deref(), Some("world"));
}
