//! Regression tests for the CVE-2023-25153 class (GHSA-259w-8hf6-59c2, "OCI image
//! importer memory exhaustion": containerd read a multi-GB `index.json` or manifest of
//! an imported archive whole into memory) against Berth's daemon-side importer.
//!
//! The stock `ctr` 1.6 imports client-side (containerd's own importer runs in the `ctr`
//! process and only writes blobs through the content service), so each archive goes to
//! a private berthd the way containerd 2.x's `ctr image import` sends it: a byte stream
//! opened through the Streaming service, then `Transfer(ImageImportStream →
//! ImageStore)`. Each oversized or lying archive must fail with InvalidArgument naming
//! the limit, the daemon must keep answering, nothing may be left behind (no image, no
//! lease, no ingest, `ctr content ls` as before once the collector ran) and the
//! daemon's peak resident memory (VmHWM, reset through `/proc/<pid>/clear_refs` before
//! each import) may not grow by more than [`MAX_GROWTH`], a fraction of the input.
//! Big entries are sparse files: they cost no disk in the test's directory.

mod common;

use berth_api::any;
use berth_api::services::transfer::v1::transfer_client::TransferClient;
use berth_api::services::transfer::v1::{TransferOptions, TransferRequest};
use berth_api::types::transfer as tt;
use berth_testkit::Daemon;
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::sync::{Mutex, MutexGuard};
use tonic::transport::Channel;
use tonic::{Code, Request};

const MIB: u64 = 1 << 20;
/// Berth's limits (crates/transfer): `index.json`, manifests and indexes read into
/// memory (`MAX_MANIFEST_SIZE`), `oci-layout` / `manifest.json` (containerd's
/// `jsonLimit`), image configs, tar extension entries, index nesting.
const MAX_INDEX: u64 = 4 * MIB;
const MAX_MANIFEST: u64 = 4 * MIB;
const JSON_LIMIT: u64 = 20 * MIB;
const MAX_CONFIG: u64 = 16 * MIB;
const MAX_TAR_EXTENSION: u64 = MIB;
const MAX_INDEX_DEPTH: usize = 8;
/// The most the daemon's peak RSS may grow during one rejected import.
const MAX_GROWTH: u64 = 16 * MIB;

const NS: &str = "import-limits";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

/// The tests run one at a time: each has a daemon, and the machine is shared.
static SERIAL: Mutex<()> = Mutex::const_new(());

// ---- archives ----------------------------------------------------------------------

/// A ustar archive written to a file; zero-filled entries are holes.
struct Tar {
    f: File,
    path: PathBuf,
}

impl Tar {
    fn create(path: PathBuf) -> Tar {
        Tar {
            f: File::create(&path).unwrap(),
            path,
        }
    }

    fn header(&mut self, name: &str, kind: u8, size: u64) {
        let mut h = [0u8; 512];
        assert!(name.len() < 100, "{name}");
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..108].copy_from_slice(b"0000644\0");
        h[108..116].copy_from_slice(b"0000000\0");
        h[116..124].copy_from_slice(b"0000000\0");
        if size < 1 << 33 {
            h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
        } else {
            // GNU's base-256 size, past what 11 octal digits hold.
            h[124] = 0x80;
            h[128..136].copy_from_slice(&size.to_be_bytes());
        }
        h[136..148].copy_from_slice(b"00000000000\0");
        h[148..156].copy_from_slice(b"        ");
        h[156] = kind;
        h[257..265].copy_from_slice(b"ustar\x0000");
        let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        self.f.write_all(&h).unwrap();
    }

    fn pad(&mut self, size: u64) {
        let pad = (512 - size % 512) % 512;
        self.f.seek(SeekFrom::Current(pad as i64)).unwrap();
    }

    fn file(&mut self, name: &str, data: &[u8]) -> &mut Tar {
        self.header(name, b'0', data.len() as u64);
        self.f.write_all(data).unwrap();
        self.pad(data.len() as u64);
        self
    }

    /// A regular file of `size` zero bytes (a hole).
    fn zeros(&mut self, name: &str, kind: u8, size: u64) -> &mut Tar {
        self.header(name, kind, size);
        self.f.seek(SeekFrom::Current(size as i64)).unwrap();
        self.pad(size);
        self
    }

    /// The end-of-archive blocks.
    fn finish(&mut self) -> PathBuf {
        self.f.seek(SeekFrom::Current(1024)).unwrap();
        let end = self.f.stream_position().unwrap();
        self.f.set_len(end).unwrap();
        self.path.clone()
    }

    /// Cut here, without the end blocks.
    fn cut(&mut self) -> PathBuf {
        let end = self.f.stream_position().unwrap();
        self.f.set_len(end).unwrap();
        self.path.clone()
    }
}

fn sha256_file(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success());
    format!("sha256:{}", &String::from_utf8(out.stdout).unwrap()[..64])
}

fn sha256(dir: &Path, data: &[u8]) -> String {
    let p = dir.join("digest-input");
    std::fs::write(&p, data).unwrap();
    sha256_file(&p)
}

/// The digest of `size` zero bytes.
fn sha256_zeros(dir: &Path, size: u64) -> String {
    let p = dir.join("zeros");
    File::create(&p).unwrap().set_len(size).unwrap();
    let d = sha256_file(&p);
    std::fs::remove_file(&p).unwrap();
    d
}

fn blob_path(digest: &str) -> String {
    format!("blobs/sha256/{}", &digest["sha256:".len()..])
}

fn descriptor(media_type: &str, digest: &str, size: u64) -> String {
    format!(r#"{{"mediaType":"{media_type}","digest":"{digest}","size":{size}}}"#)
}

fn index_of(descriptors: &[String]) -> Vec<u8> {
    format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{}]}}"#,
        descriptors.join(",")
    )
    .into_bytes()
}

// ---- the import, as containerd 2.x's ctr sends it ------------------------------------

async fn channel(socket: PathBuf) -> Channel {
    berth_services::proxy::unix_channel(&socket.to_string_lossy())
        .expect("a channel to berthd's socket")
}

fn namespaced<T>(message: T) -> Request<T> {
    common::namespaced(NS, message)
}

/// `ctr image import <archive>` of containerd 2.x into the image store `name`: the
/// archive is read from the file in 32 KiB `Data` messages within the windows the
/// server grants.
async fn import(ch: &Channel, archive: &Path, name: &str) -> Result<(), tonic::Status> {
    let (id, sender) = common::send_archive(ch, NS, archive).await;
    let source = tt::ImageImportStream {
        stream: id,
        ..Default::default()
    };
    let destination = tt::ImageStore {
        name: name.into(),
        ..Default::default()
    };
    let mut client = TransferClient::new(ch.clone());
    let call = client.transfer(namespaced(TransferRequest {
        source: Some(any::pack(&source)),
        destination: Some(any::pack(&destination)),
        options: Some(TransferOptions::default()),
    }));
    // Without a bound the walk of test 7 would not end: a timeout makes it a failure.
    let result = tokio::time::timeout(Duration::from_secs(120), call)
        .await
        .expect("the import did not end within 2 minutes");
    sender.abort();
    result.map(|_| ())
}

// ---- what the daemon holds -----------------------------------------------------------

fn vm_hwm(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM in /proc/<pid>/status");
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// Resets the peak RSS to the current one (Linux ≥ 4.0); false if not allowed.
fn reset_hwm(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// The lines `ctr -n NS <args>` prints, sorted, without the first `skip` (a header).
fn lines(d: &Daemon, skip: usize, args: &[&str]) -> Vec<String> {
    let mut full = vec!["-n", NS];
    full.extend_from_slice(args);
    let mut v: Vec<String> = d
        .ctr_ok(&full)
        .lines()
        .skip(skip)
        .map(String::from)
        .collect();
    v.sort();
    v
}

/// What a failed import must leave as it was.
#[derive(Debug, PartialEq)]
struct Held {
    content: Vec<String>,
    images: Vec<String>,
    leases: Vec<String>,
    active: Vec<String>,
}

fn held(d: &Daemon) -> Held {
    Held {
        // DIGEST SIZE AGE LABELS: the age changes, the rest may not.
        content: lines(d, 1, &["content", "ls"])
            .iter()
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                format!("{} {} {}", f[0], f[1], f.last().unwrap())
            })
            .collect(),
        images: lines(d, 0, &["images", "ls", "-q"]),
        leases: lines(d, 1, &["leases", "ls"]),
        active: lines(d, 1, &["content", "active"]),
    }
}

/// Runs the collector now (a sync lease deletion waits for a collection).
fn collect(d: &Daemon) {
    let id = d.ctr_ok(&["-n", NS, "leases", "create"]);
    let id = id.split_whitespace().next().unwrap().to_string();
    d.ctr_ok(&["-n", NS, "leases", "delete", "--sync", &id]);
}

struct Setup {
    d: Daemon,
    ch: Channel,
    pid: u32,
    before: Held,
    _serial: MutexGuard<'static, ()>,
}

/// A daemon with one blob kept by a GC root in the namespace, so "as before" is not
/// trivially empty.
async fn setup() -> Setup {
    let serial = SERIAL.lock().await;
    let d = Daemon::start_with_config(berth_testkit::NO_STARTUP_GC);
    let pid = d.pid().expect("berthd's pid");
    d.ctr_ok(&["namespaces", "create", NS]);
    let kept = d.dir.path().join("kept");
    std::fs::write(&kept, b"kept across rejected imports\n").unwrap();
    let digest = sha256_file(&kept);
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ctr --address {} -n {NS} content ingest kept < {}",
            d.socket.display(),
            kept.display()
        ))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    d.ctr_ok(&[
        "-n",
        NS,
        "content",
        "label",
        &digest,
        "containerd.io/gc.root=import-limits",
    ]);
    collect(&d);
    let before = held(&d);
    assert_eq!(before.content.len(), 1, "{before:?}");
    let ch = channel(d.socket.clone()).await;
    Setup {
        d,
        ch,
        pid,
        before,
        _serial: serial,
    }
}

impl Setup {
    fn dir(&self) -> &Path {
        self.d.dir.path()
    }

    /// Imports `archive`, which must be refused with InvalidArgument and a message
    /// holding each of `needles`; then checks the daemon is alive, left nothing behind
    /// and did not grow its peak memory by more than [`MAX_GROWTH`].
    async fn refused(&self, what: &str, archive: &Path, needles: &[&str]) {
        let input = std::fs::metadata(archive).unwrap().len();
        let reset = reset_hwm(self.pid);
        let hwm = vm_hwm(self.pid);
        let started = Instant::now();
        let e = import(&self.ch, archive, "limits.local/refused:1")
            .await
            .expect_err(what);
        let took = started.elapsed();
        let grew = vm_hwm(self.pid).saturating_sub(hwm);
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
        for n in needles {
            assert!(e.message().contains(n), "{what}: {n:?} not in {e:?}");
        }
        // Alive and answering.
        assert!(Path::new(&format!("/proc/{}", self.pid)).exists(), "{what}");
        self.d.ctr_ok(&["version"]);
        assert!(
            grew <= MAX_GROWTH,
            "{what}: berthd's VmHWM grew by {grew} bytes (archive of {input}; reset: {reset})"
        );
        self.nothing_left(what);
        eprintln!(
            "{what}: {:?} ({input} byte archive, VmHWM +{} KiB, {took:?})",
            e.message(),
            grew >> 10
        );
    }

    /// No image, lease or ingest; content as before once collected.
    fn nothing_left(&self, what: &str) {
        collect(&self.d);
        let after = held(&self.d);
        assert_eq!(after, self.before, "{what}: left behind");
    }
}

// ---- the cases -----------------------------------------------------------------------

/// CVE-2023-25153 / GHSA-259w-8hf6-59c2: an `index.json` of 64 MiB (16× its 4 MiB
/// limit) is refused from its tar header, before it is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_index_json_is_refused_unread() {
    let s = setup().await;
    let archive = Tar::create(s.dir().join("a.tar"))
        .file("oci-layout", LAYOUT)
        .zeros("index.json", b'0', 16 * MAX_INDEX)
        .finish();
    s.refused(
        "64 MiB index.json",
        &archive,
        &["index.json", &MAX_INDEX.to_string()],
    )
    .await;
}

/// CVE-2023-25153 / GHSA-259w-8hf6-59c2: Docker's `manifest.json` and the
/// `oci-layout` file, 96 MiB each (over containerd's 20 MiB `jsonLimit`), are refused
/// before they are parsed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_manifest_json_and_oci_layout_are_refused_unread() {
    let s = setup().await;
    let big = JSON_LIMIT * 24 / 5;
    let docker = Tar::create(s.dir().join("docker.tar"))
        .file("layer.tar", &[0u8; 1024])
        .zeros("manifest.json", b'0', big)
        .finish();
    s.refused(
        "96 MiB manifest.json",
        &docker,
        &["manifest.json", &JSON_LIMIT.to_string()],
    )
    .await;
    let layout = Tar::create(s.dir().join("layout.tar"))
        .zeros("oci-layout", b'0', big)
        .file("index.json", &index_of(&[]))
        .finish();
    s.refused(
        "96 MiB oci-layout",
        &layout,
        &["oci-layout", &JSON_LIMIT.to_string()],
    )
    .await;
}

/// CVE-2023-25153 / GHSA-259w-8hf6-59c2: a 64 MiB blob the index names as a manifest
/// (with its true size, with a small lying size, and as a nested index) is stored as a
/// blob but never read into memory: the 4 MiB manifest limit refuses it, and the blob
/// goes with the import's lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_manifest_blobs_are_not_read_into_memory() {
    let s = setup().await;
    let size = 16 * MAX_MANIFEST;
    let digest = sha256_zeros(s.dir(), size);
    for (what, media_type, declared) in [
        ("manifest of its true size", OCI_MANIFEST, size),
        ("manifest declared small", OCI_MANIFEST, 500),
        ("nested index declared small", OCI_INDEX, 500),
    ] {
        let index = index_of(&[descriptor(media_type, &digest, declared)]);
        let archive = Tar::create(s.dir().join("m.tar"))
            .file("oci-layout", LAYOUT)
            .zeros(&blob_path(&digest), b'0', size)
            .file("index.json", &index)
            .finish();
        s.refused(what, &archive, &["larger than", &MAX_MANIFEST.to_string()])
            .await;
    }
}

/// CVE-2023-25153 / GHSA-259w-8hf6-59c2: a Docker archive whose image config is
/// 32 MiB (twice the 16 MiB the importer reads for the platform) is refused without
/// reading it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_config_is_not_read_into_memory() {
    let s = setup().await;
    let manifest = br#"[{"Config":"config.json","RepoTags":["limits.local/config:1"],"Layers":["layer.tar"]}]"#;
    let archive = Tar::create(s.dir().join("c.tar"))
        .file("layer.tar", &[0u8; 1024])
        .zeros("config.json", b'0', 2 * MAX_CONFIG)
        .file("manifest.json", manifest)
        .finish();
    s.refused(
        "32 MiB config",
        &archive,
        &["image config", &MAX_CONFIG.to_string()],
    )
    .await;
}

/// CVE-2023-25153 / GHSA-259w-8hf6-59c2 (the tar layer): GNU long-name / long-link and
/// PAX extended-header entries, which the `tar` crate reads whole into memory, of
/// 64 MiB each are refused from their header (Go's `archive/tar` allows 1 MiB); so are
/// GNU sparse entries, whose extension blocks the crate keeps in memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_tar_extension_entries_are_refused_unread() {
    let s = setup().await;
    for (what, kind) in [
        ("64 MiB GNU long name", b'L'),
        ("64 MiB GNU long link", b'K'),
        ("64 MiB PAX header", b'x'),
    ] {
        let archive = Tar::create(s.dir().join("x.tar"))
            .file("oci-layout", LAYOUT)
            .zeros("././@LongLink", kind, 64 * MAX_TAR_EXTENSION)
            .file("index.json", &index_of(&[]))
            .finish();
        s.refused(what, &archive, &[&MAX_TAR_EXTENSION.to_string()])
            .await;
    }
    let archive = Tar::create(s.dir().join("s.tar"))
        .file("oci-layout", LAYOUT)
        .zeros("sparse", b'S', 0)
        .file("index.json", &index_of(&[]))
        .finish();
    s.refused("GNU sparse entry", &archive, &["sparse"]).await;
}

/// CVE-2023-25153 / GHSA-259w-8hf6-59c2 (lying sizes): tar headers declaring far more
/// than the archive holds (a 512 GiB blob after 1 MiB, a 1 MiB `index.json` after
/// 1 KiB, a file without a digest path) end in a clean "truncated" error: nothing
/// committed, no ingest left open, no preallocation of the declared size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_archives_commit_nothing() {
    let s = setup().await;
    let digest = sha256_zeros(s.dir(), MIB);
    for (what, name, declared) in [
        (
            "512 GiB blob cut after 1 MiB",
            blob_path(&digest),
            512 << 30,
        ),
        ("1 MiB index.json cut after 1 KiB", "index.json".into(), MIB),
        ("1 GiB file cut after 1 MiB", "layer.tar".into(), 1 << 30),
    ] {
        let mut tar = Tar::create(s.dir().join("t.tar"));
        tar.file("oci-layout", LAYOUT);
        tar.header(&name, b'0', declared);
        let present = if name == "index.json" { 1024 } else { MIB };
        tar.f.seek(SeekFrom::Current(present as i64)).unwrap();
        let archive = tar.cut();
        s.refused(what, &archive, &["truncated"]).await;
    }
}

/// CVE-2023-25153 / GHSA-259w-8hf6-59c2 (nesting): a chain of indexes deeper than
/// Berth's bound is refused naming it (containerd's `images.Walk` has none).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_indexes_are_refused() {
    let s = setup().await;
    let mut tar = Tar::create(s.dir().join("n.tar"));
    tar.file("oci-layout", LAYOUT);
    // index.json → idx[depth 1] → … → idx[MAX_INDEX_DEPTH + 1] → (empty)
    let mut next = index_of(&[]);
    for _ in 0..=MAX_INDEX_DEPTH {
        let digest = sha256(s.dir(), &next);
        tar.file(&blob_path(&digest), &next);
        next = index_of(&[descriptor(OCI_INDEX, &digest, next.len() as u64)]);
    }
    tar.file("index.json", &next);
    let archive = tar.finish();
    s.refused(
        "indexes nested too deep",
        &archive,
        &["nested", &MAX_INDEX_DEPTH.to_string()],
    )
    .await;
}

/// CVE-2023-25153 / GHSA-259w-8hf6-59c2 (amplification): a small archive whose
/// indexes each list the next one many times, ending in one 1 MiB manifest listed
/// 2000 times, asks a walk that follows every listing for 64 × 64 × 2000 manifest
/// reads (≈ 8 TB); Berth walks each blob once, so the import ends quickly with its
/// memory bounded, and the record it makes is removable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_listings_are_walked_once() {
    let s = setup().await;
    let dir = s.dir().to_path_buf();
    let mut tar = Tar::create(dir.join("f.tar"));
    tar.file("oci-layout", LAYOUT);
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_digest = sha256(&dir, config);
    tar.file(&blob_path(&config_digest), config);
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{},"layers":[],"annotations":{{"pad":"{}"}}}}"#,
        descriptor(OCI_CONFIG, &config_digest, config.len() as u64),
        "p".repeat(MIB as usize)
    )
    .into_bytes();
    let digest = sha256(&dir, &manifest);
    tar.file(&blob_path(&digest), &manifest);
    let mut child = descriptor(OCI_MANIFEST, &digest, manifest.len() as u64);
    for copies in [2000, 64, 64] {
        let body = index_of(&vec![child.clone(); copies]);
        assert!(body.len() as u64 <= MAX_MANIFEST);
        let digest = sha256(&dir, &body);
        tar.file(&blob_path(&digest), &body);
        child = descriptor(OCI_INDEX, &digest, body.len() as u64);
    }
    tar.file("index.json", &index_of(&[child]));
    let archive = tar.finish();

    let reset = reset_hwm(s.pid);
    let hwm = vm_hwm(s.pid);
    let started = Instant::now();
    let name = "limits.local/fanout:1";
    import(&s.ch, &archive, name)
        .await
        .expect("an archive of repeated listings imports");
    let took = started.elapsed();
    let grew = vm_hwm(s.pid).saturating_sub(hwm);
    assert!(
        took < Duration::from_secs(60),
        "the import took {took:?}: listings walked more than once?"
    );
    assert!(
        grew <= MAX_GROWTH,
        "berthd's VmHWM grew by {grew} bytes (reset: {reset})"
    );
    assert_eq!(lines(&s.d, 0, &["images", "ls", "-q"]), [name]);
    eprintln!("fan-out import: {took:?}, VmHWM +{} KiB", grew >> 10);
    s.d.ctr_ok(&["-n", NS, "images", "rm", "--sync", name]);
    s.nothing_left("after removing the fan-out image");
}
