//! `berth` against a private berthd (started by the testkit) and a private
//! `docker-registry` on 127.0.0.1.

mod common;

use berth_testkit::registry::Registry;
use common::write_partial_ingest;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

fn berth(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(args)
        .env_remove("BERTH_ADDRESS")
        .env_remove("CONTAINERD_NAMESPACE")
        .env("HOME", "/nonexistent")
        .output()
        .expect("running berth")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

#[test]
fn help_and_completions() {
    let o = berth(&["--help"]);
    assert!(o.status.success());
    let (out, _) = text(&o);
    for cmd in [
        "version",
        "info",
        "images",
        "rmi",
        "pull",
        "push",
        "run",
        "exec",
        "ps",
        "logs",
        "stop",
        "rm",
        "completions",
    ] {
        assert!(out.contains(cmd), "{cmd} missing from help:\n{out}");
    }
    let o = berth(&["pull", "--help"]);
    let (out, _) = text(&o);
    assert!(
        out.contains("transfer service")
            && out.contains("--no-unpack")
            && out.contains("--local")
            && out.contains("client side"),
        "pull help must say what it does:\n{out}"
    );
    for shell in ["bash", "zsh", "fish"] {
        let o = berth(&["completions", shell]);
        assert!(o.status.success(), "{shell}");
        assert!(String::from_utf8_lossy(&o.stdout).contains("berth"));
    }
}

#[test]
fn a_missing_daemon_is_explained() {
    let o = berth(&["--address", "/nonexistent/berth.sock", "version"]);
    assert!(!o.status.success());
    let (_, err) = text(&o);
    assert!(err.contains("does not exist (is berthd running?"), "{err}");
}

struct Mem(bytes::Bytes);
impl berth_core::content::ReaderAt for Mem {
    fn size(&self) -> i64 {
        self.0.len() as i64
    }
    fn read_at(&self, buf: &mut [u8], offset: i64) -> berth_core::Result<usize> {
        let off = (offset as usize).min(self.0.len());
        let n = buf.len().min(self.0.len() - off);
        buf[..n].copy_from_slice(&self.0[off..off + n]);
        Ok(n)
    }
}

/// An uncompressed layer tar holding `files` (made by GNU tar, fixed owner and mtime).
fn tar_of(files: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    for (path, data) in files {
        let p = dir.path().join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }
    let out = Command::new("tar")
        .args([
            "--create",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--mtime=2024-01-01",
            "--sort=name",
            "-C",
        ])
        .arg(dir.path())
        .arg(".")
        .output()
        .unwrap();
    assert!(out.status.success());
    out.stdout
}

/// Pushes a two-layer image with Berth's own client; returns the manifest digest.
fn push_test_image(host: &str, name: &str) -> String {
    use berth_remotes::manifest::{OCI_MANIFEST, descriptor_for};
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let r = berth_remotes::Resolver::new(Default::default());
        let reference = berth_remotes::Reference::parse(&format!("{host}/{name}")).unwrap();
        let layers: Vec<Vec<u8>> = vec![
            tar_of(&[("etc/hello", vec![7u8; 300_000])]),
            tar_of(&[("etc/second", (0..50_000u32).map(|i| (i % 251) as u8).collect())]),
        ];
        let lt = "application/vnd.oci.image.layer.v1.tar";
        let ldescs: Vec<_> = layers.iter().map(|l| descriptor_for(lt, l)).collect();
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": ldescs.iter().map(|d| d.digest().to_string()).collect::<Vec<_>>()}
        }))
        .unwrap();
        let cdesc = descriptor_for("application/vnd.oci.image.config.v1+json", &config);
        let dj = |d: &oci_spec::image::Descriptor| serde_json::json!({"mediaType": d.media_type().to_string(), "digest": d.digest().to_string(), "size": d.size()});
        let m = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": dj(&cdesc),
            "layers": ldescs.iter().map(dj).collect::<Vec<_>>()
        }))
        .unwrap();
        let mdesc = descriptor_for(OCI_MANIFEST, &m);
        r.push_blob(&reference, &cdesc, Arc::new(Mem(config.into())), None).await.unwrap();
        for (d, l) in ldescs.iter().zip(layers) {
            r.push_blob(&reference, d, Arc::new(Mem(l.into())), None).await.unwrap();
        }
        r.push_manifest(&reference, &mdesc, m.into()).await.unwrap();
        mdesc.digest().to_string()
    })
}

fn daemon_or_skip() -> Option<berth_testkit::Daemon> {
    if !Path::new("/usr/bin/ctr").exists() && !berth_testkit::have("ctr") {
        eprintln!("SKIP: ctr missing");
        return None;
    }
    Some(berth_testkit::Daemon::start())
}

#[test]
fn version_info_images_pull_rmi_against_berthd() {
    let Some(d) = daemon_or_skip() else { return };
    let sock = d.socket.display().to_string();
    let run = |args: &[&str]| {
        let mut a = vec!["--address", sock.as_str()];
        a.extend_from_slice(args);
        berth(&a)
    };

    let o = run(&["version"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("Server:") && out.contains("Version:"), "{out}");

    let o = run(&["info"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        out.contains("TYPE") && out.contains("io.containerd."),
        "{out}"
    );

    let o = run(&["images"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.starts_with("REF"), "{out}");

    let o = run(&["rmi", "example.com/nope:latest"]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(err.contains("not found"), "{err}");

    let reg = Registry::start();
    let host = format!("127.0.0.1:{}", reg.port);
    let digest = push_test_image(&host, "cli/app:v1");
    let image = format!("{host}/cli/app:v1");

    // An ingest left by an interrupted pull (half of layer 0 written, then the client
    // went away) is continued, not restarted.
    let layer0 = tar_of(&[("etc/hello", vec![7u8; 300_000])]);
    let layer0_digest = berth_remotes::manifest::descriptor_for("x", &layer0)
        .digest()
        .to_string();
    write_partial_ingest(
        &d.socket,
        &format!("berth-pull-{layer0_digest}"),
        &layer0[..layer0.len() / 2],
        layer0.len(),
    );
    let o = run(&[
        "pull",
        "--local",
        "--json",
        "--hosts-dir",
        "/nonexistent",
        &image,
    ]);
    let (out, err) = text(&o);
    assert!(
        o.status.success(),
        "pull failed: {err}\n{out}\ndaemon log:\n{}",
        berth_testkit::tail(&d.log(), 40)
    );
    let last: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(last["status"], "done");
    assert_eq!(last["digest"], digest.as_str());
    assert!(
        out.lines()
            .any(|l| l.contains("\"state\":\"done\"") && l.contains("layer 1")),
        "{out}"
    );
    let resumed = format!("\"offset\":{},\"state\":\"resuming\"", layer0.len() / 2);
    assert!(
        out.lines()
            .any(|l| l.contains(&resumed) && l.contains("layer 0")),
        "{out}"
    );

    let o = run(&["images", "-q"]);
    assert!(text(&o).0.lines().any(|l| l == image), "{}", text(&o).0);
    // `info` counts what the pull left: one image, its blobs, two layer snapshots.
    let o = run(&["info"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let row = |what: &str| {
        out.lines()
            .find(|l| l.starts_with(what))
            .unwrap_or_else(|| panic!("no {what} row in\n{out}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert_eq!(row("images")[1], "1", "{out}");
    assert!(row("content")[1].parse::<u32>().unwrap() >= 4, "{out}");
    assert_eq!(row("snapshots (overlayfs)")[2], "2", "{out}");
    // Unpacked: one committed snapshot per layer, named by chain ID.
    let snaps = d.ctr_ok(&["snapshots", "--snapshotter", "overlayfs", "ls"]);
    assert_eq!(
        snaps.lines().filter(|l| l.contains("Committed")).count(),
        2,
        "{snaps}"
    );
    let listing = d.ctr_ok(&["content", "ls", "-q"]);
    assert!(listing.contains(&digest), "{listing}");

    // A second pull finds everything.
    let o = run(&[
        "pull",
        "--local",
        "--json",
        "--hosts-dir",
        "/nonexistent",
        &image,
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("\"state\":\"exists\""), "{out}");

    // Push it back under another name: blobs are mounted from the repository they came from.
    let copy = format!("{host}/cli/copy:v2");
    let o = run(&["push", &image, &copy]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "push failed: {err}\n{out}");
    assert!(out.contains(&format!("pushed {digest}")), "{out}");
    assert!(out.contains(": mounted"), "{out}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let resolved = rt
        .block_on(
            berth_remotes::Resolver::new(Default::default())
                .resolve(&berth_remotes::Reference::parse(&copy).unwrap()),
        )
        .unwrap();
    assert_eq!(resolved.descriptor.digest().to_string(), digest);
    let o = run(&["push", "example.com/none:v1"]);
    assert!(!o.status.success());
    assert!(text(&o).1.contains("not found"), "{}", text(&o).1);

    let o = run(&["rmi", &image]);
    assert!(o.status.success(), "{}", text(&o).1);
    let o = run(&["images", "-q"]);
    assert!(!text(&o).0.contains(&image));
}

#[test]
fn pull_goes_through_the_daemons_transfer_service() {
    let Some(d) = daemon_or_skip() else { return };
    let sock = d.socket.display().to_string();
    let run = |args: &[&str]| {
        let mut a = vec!["--address", sock.as_str()];
        a.extend_from_slice(args);
        berth(&a)
    };
    let reg = Registry::start();
    let host = format!("127.0.0.1:{}", reg.port);
    let digest = push_test_image(&host, "daemon/app:v1");
    let image = format!("{host}/daemon/app:v1");

    let o = run(&["pull", "--json", "--hosts-dir", "/nonexistent", &image]);
    let (out, err) = text(&o);
    assert!(
        o.status.success(),
        "pull failed: {err}\n{out}\ndaemon log:\n{}",
        berth_testkit::tail(&d.log(), 40)
    );
    let last: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(last["status"], "done");
    assert_eq!(last["digest"], digest.as_str());
    assert_eq!(last["manifest"], digest.as_str());
    // Per-layer progress from the daemon: downloaded, then unpacked, in order.
    for layer in ["layer 0", "layer 1"] {
        let states: Vec<String> = out
            .lines()
            .filter(|l| l.contains(&format!("\"kind\":\"{layer}\"")))
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["state"].to_string())
            .collect();
        let pos = |s: &str| states.iter().position(|x| x == &format!("\"{s}\""));
        assert!(
            pos("done").unwrap() < pos("unpacked").unwrap(),
            "{layer}: {states:?}"
        );
    }
    // The image is in berthd and unpacked by berthd (no client-side lease or ingest).
    let listed = d.ctr_ok(&["images", "ls"]);
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with(&image) && l.contains(&digest)),
        "{listed}"
    );
    let snaps = d.ctr_ok(&["snapshots", "--snapshotter", "overlayfs", "ls"]);
    assert_eq!(
        snaps.lines().filter(|l| l.contains("Committed")).count(),
        2,
        "{snaps}"
    );
    // The daemon's lease is gone with the pull.
    let leases = d.ctr_ok(&["leases", "ls"]);
    assert_eq!(leases.lines().count(), 1, "{leases}");

    // Again: everything exists; --quiet prints the name only.
    let o = run(&["pull", "--quiet", "--hosts-dir", "/nonexistent", &image]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert_eq!(out, format!("{image}\n"));
    let o = run(&["pull", "--json", "--hosts-dir", "/nonexistent", &image]);
    assert!(
        text(&o).0.contains("\"state\":\"exists\""),
        "{}",
        text(&o).0
    );

    // A missing image: the daemon's NotFound, no record.
    let missing = format!("{host}/daemon/none:v1");
    let o = run(&["pull", "--hosts-dir", "/nonexistent", &missing]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(err.contains("not found"), "{err}");
    assert!(!d.ctr_ok(&["images", "ls", "-q"]).contains(&missing));
}
