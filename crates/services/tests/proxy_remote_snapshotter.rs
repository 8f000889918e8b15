//! Remote snapshotters (stargz, nydus) through berthd: the `berth-snapshotter`
//! stand-in (`--remote-layers`, an OCI layout playing the registry) serves as the
//! `[proxy_plugins]` snapshotter `remote`. Berth's unpacker, speaking to berthd's
//! snapshots and diff services over gRPC as containerd's client-side unpacker does,
//! prepares each layer with `containerd.io/snapshot.ref=<chainID>` and the
//! `containerd.io/snapshot/cri.*` labels. For the layer the stand-in has, the prepare
//! answers AlreadyExists, the metadata layer links the stand-in's snapshot, and no apply
//! happens; the image then mounts and runs with the stock `ctr`. Layers the stand-in
//! lacks are applied through berthd's diff service as usual.

use berth_api::services::diff::v1 as diff_api;
use berth_api::services::diff::v1::diff_client::DiffClient;
use berth_core::content::{Descriptor, Scope};
use berth_core::diff::{Applier, ApplyConfig};
use berth_core::labels::Labels;
use berth_core::mount::Mount;
use berth_core::snapshot::{LABEL_SNAPSHOT_REF, Snapshotter};
use berth_core::{Error, Result};
use berth_diff::unpack::{LayerOutcome, Unpacker, append_info_annotations};
use berth_services::proxy::{ProxySnapshotter, unix_channel};
use berth_testkit::{Daemon, NO_STARTUP_GC};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// The stand-in process and its private directory (root, registry, socket); all go on
/// drop.
struct Remote {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
}

impl Remote {
    /// Serves a native snapshotter whose "registry" is the OCI layout `registry`.
    fn start(registry: &Path) -> Remote {
        let dir = PathBuf::from(format!("/tmp/brs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("remote.sock");
        let log = std::fs::File::create(dir.join("remote.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_berth-snapshotter"))
            .arg("--root")
            .arg(dir.join("root"))
            .args(["--snapshotter", "native", "--remote-layers"])
            .arg(registry)
            .arg("--address")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut r = Remote { child, dir, socket };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !r.socket.exists() {
            if let Some(status) = r.child.try_wait().unwrap() {
                panic!("berth-snapshotter exited with {status}: {}", r.log());
            }
            assert!(Instant::now() < deadline, "no socket: {}", r.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        r
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("remote.log")).unwrap_or_default()
    }

    /// Snapshot directories of the native backend.
    fn snapshot_dirs(&self) -> usize {
        std::fs::read_dir(self.dir.join("root/snapshots"))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// berthd's diff service as an [`Applier`], counting applies.
struct RemoteApplier {
    client: DiffClient<tonic::transport::Channel>,
    namespace: String,
    applied: AtomicUsize,
}

#[async_trait::async_trait]
impl Applier for RemoteApplier {
    async fn apply(
        &self,
        _scope: &Scope,
        desc: &Descriptor,
        mounts: &[Mount],
        _config: ApplyConfig,
    ) -> Result<Descriptor> {
        self.applied.fetch_add(1, Ordering::SeqCst);
        let mut request = tonic::Request::new(diff_api::ApplyRequest {
            diff: Some(berth_api::types::Descriptor {
                media_type: desc.media_type.clone(),
                digest: desc.digest.clone(),
                size: desc.size,
                annotations: desc.annotations.clone(),
            }),
            mounts: mounts
                .iter()
                .cloned()
                .map(berth_services::snapshots::mount_to_api)
                .collect(),
            ..Default::default()
        });
        request.metadata_mut().insert(
            berth_core::namespaces::GRPC_HEADER,
            self.namespace.parse().unwrap(),
        );
        let applied = self
            .client
            .clone()
            .apply(request)
            .await
            .map_err(|s| Error::unknown(format!("diff service apply: {}", s.message())))?
            .into_inner()
            .applied
            .unwrap_or_default();
        Ok(Descriptor {
            media_type: applied.media_type,
            digest: applied.digest,
            size: applied.size,
            annotations: applied.annotations,
        })
    }
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn blob_path(layout: &Path, digest: &str) -> PathBuf {
    let (alg, hex) = digest.split_once(':').unwrap();
    layout.join("blobs").join(alg).join(hex)
}

/// An image of an OCI layout: its manifest digest, layer descriptors and diffIDs.
struct Image {
    manifest: String,
    config: String,
    layers: Vec<Descriptor>,
    diff_ids: Vec<String>,
}

fn read_image(layout: &Path) -> Image {
    let index = json(&layout.join("index.json"));
    let manifest = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let m = json(&blob_path(layout, &manifest));
    let config = m["config"]["digest"].as_str().unwrap().to_string();
    let layers = m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| Descriptor {
            media_type: l["mediaType"].as_str().unwrap().into(),
            digest: l["digest"].as_str().unwrap().into(),
            size: l["size"].as_i64().unwrap(),
            annotations: Default::default(),
        })
        .collect();
    let c = json(&blob_path(layout, &config));
    let diff_ids = c["rootfs"]["diff_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().to_string())
        .collect();
    Image {
        manifest,
        config,
        layers,
        diff_ids,
    }
}

fn untar(archive: &Path, into: &Path) {
    std::fs::create_dir_all(into).unwrap();
    let status = Command::new("tar")
        .arg("-xf")
        .arg(archive)
        .arg("-C")
        .arg(into)
        .status()
        .unwrap();
    assert!(status.success(), "untar {}", archive.display());
}

/// Unpacks `image` (named `name`) into snapshotter `remote` of namespace `ns` through
/// berthd, as a containerd client's pull would; returns each layer's outcome and the
/// number of applies.
async fn unpack(d: &Daemon, ns: &str, name: &str, image: &Image) -> (Vec<LayerOutcome>, usize) {
    let socket = d.socket.display().to_string();
    let snapshotter: Arc<dyn Snapshotter> = Arc::new(
        ProxySnapshotter::new(unix_channel(&socket).unwrap(), "remote")
            .with_namespace(ns)
            .unwrap(),
    );
    let applier = Arc::new(RemoteApplier {
        client: DiffClient::new(unix_channel(&socket).unwrap()),
        namespace: ns.to_string(),
        applied: AtomicUsize::new(0),
    });
    let unpacker = Unpacker::new(
        snapshotter,
        applier.clone(),
        Scope::new(ns),
        image.diff_ids.clone(),
        Labels::new(),
    );
    let mut layers = image.layers.clone();
    append_info_annotations(name, &image.manifest, &mut layers);
    let mut outcomes = Vec::new();
    for (i, layer) in layers.iter().enumerate() {
        outcomes.push(unpacker.layer_outcome(i, layer).await.unwrap());
    }
    (outcomes, applier.applied.load(Ordering::SeqCst))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_layers_are_linked_not_applied() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let fixtures = berth_testkit::fixtures();
    let work = tempfile::Builder::new()
        .prefix("brs-")
        .tempdir_in("/tmp")
        .unwrap();
    // The stand-in's registry holds the busybox image (its one layer) only.
    let registry = work.path().join("registry");
    untar(&fixtures.join("busybox.oci.tar"), &registry);
    let layers_layout = work.path().join("layers");
    untar(&fixtures.join("layers.oci.tar"), &layers_layout);
    let remote = Remote::start(&registry);
    let d = Daemon::start_with_config(&format!(
        "[proxy_plugins.remote]\n  type = \"snapshot\"\n  address = {:?}\n\n{NO_STARTUP_GC}",
        remote.socket.display().to_string()
    ));
    let busybox = read_image(&registry);
    let name = "import.local/busybox:latest";
    let top = busybox.diff_ids[0].clone(); // one layer: its chain ID is its diffID
    d.ctr_ok(&[
        "images",
        "import",
        "--no-unpack",
        fixtures.join("busybox.oci.tar").to_str().unwrap(),
    ]);

    let (outcomes, applied) = unpack(&d, "default", name, &busybox).await;
    assert_eq!(outcomes, [LayerOutcome::Remote], "{}", remote.log());
    assert_eq!(applied, 0, "the remote layer is not applied");
    assert!(
        remote.log().contains("remote layer"),
        "the stand-in made the layer: {}",
        remote.log()
    );
    assert_eq!(remote.snapshot_dirs(), 1, "no extraction snapshot was made");
    let ls = d.ctr_ok(&["snapshots", "--snapshotter", "remote", "ls"]);
    assert!(ls.contains(&top) && ls.contains("Committed"), "{ls}");
    assert!(!ls.contains("extract-"), "{ls}");
    let info = d.ctr_ok(&["snapshots", "--snapshotter", "remote", "info", &top]);
    assert!(info.contains(LABEL_SNAPSHOT_REF), "{info}");
    assert!(info.contains("cri.layer-digest"), "{info}");
    // As containerd's image unpack, the config references the unpacked chain (the GC
    // root of the snapshots).
    d.ctr_ok(&[
        "content",
        "label",
        &busybox.config,
        &format!("containerd.io/gc.ref.snapshot.remote={top}"),
    ]);

    // A second namespace links the same backend snapshot.
    d.ctr_ok(&[
        "-n",
        "other",
        "images",
        "import",
        "--no-unpack",
        fixtures.join("busybox.oci.tar").to_str().unwrap(),
    ]);
    let (outcomes, applied) = unpack(&d, "other", name, &busybox).await;
    assert_eq!(
        (outcomes.as_slice(), applied),
        (&[LayerOutcome::Remote][..], 0)
    );
    assert_eq!(
        remote.snapshot_dirs(),
        1,
        "one backend snapshot for both namespaces"
    );
    d.ctr_ok(&["-n", "other", "images", "rm", "--sync", name]);
    assert_eq!(
        remote.snapshot_dirs(),
        1,
        "still named by the default namespace"
    );

    // The stock ctr sees the image as unpacked on `remote`: it mounts and runs.
    let mnt = work.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    d.ctr_ok(&[
        "images",
        "mount",
        "--snapshotter",
        "remote",
        name,
        mnt.to_str().unwrap(),
    ]);
    let has_busybox = mnt.join("bin/busybox").exists();
    d.ctr_ok(&["images", "unmount", "--rm", mnt.to_str().unwrap()]);
    assert!(has_busybox, "the linked layer holds bin/busybox");
    if berth_testkit::have("runc") && berth_testkit::have("containerd-shim-runc-v2") {
        // The runtime's state and the cgroup under this daemon's own names: the
        // namespace is `default`, which other daemons on the host may use too.
        let runc_root = d.dir.path().join("runc");
        let cgroup = format!("/berth-remote-{}/remote-run", std::process::id());
        let out = d.ctr_ok(&[
            "run",
            "--rm",
            "--runc-root",
            runc_root.to_str().unwrap(),
            "--cgroup",
            &cgroup,
            "--snapshotter",
            "remote",
            name,
            "remote-run",
            "echo",
            "hi",
        ]);
        berth_testkit::remove_runtime_leftovers(
            "",
            &format!("/berth-remote-{}", std::process::id()),
        );
        assert_eq!(out, "hi\n");
    } else {
        eprintln!("not running a container: needs runc and containerd-shim-runc-v2");
    }

    // An image sharing the base layer: the base exists, the others are applied as
    // usual (the stand-in does not have them).
    d.ctr_ok(&[
        "images",
        "import",
        "--no-unpack",
        fixtures.join("layers.oci.tar").to_str().unwrap(),
    ]);
    let layered = read_image(&layers_layout);
    assert_eq!(
        layered.diff_ids[0], top,
        "the fixture shares the busybox layer"
    );
    let (outcomes, applied) = unpack(&d, "default", "import.local/layers:latest", &layered).await;
    assert_eq!(outcomes[0], LayerOutcome::Existed);
    assert!(
        outcomes[1..].iter().all(|o| *o == LayerOutcome::Applied),
        "{outcomes:?}"
    );
    assert_eq!(applied, layered.layers.len() - 1);
    let view = d.ctr_ok(&[
        "snapshots",
        "--snapshotter",
        "remote",
        "view",
        "--mounts",
        "layered-view",
        berth_diff::unpack::chain_ids(&layered.diff_ids)
            .last()
            .unwrap(),
    ]);
    let mounts: serde_json::Value = serde_json::from_str(&view).unwrap();
    let source = mounts[0]["Source"]
        .as_str()
        .unwrap_or_else(|| panic!("{view}"));
    assert_eq!(
        std::fs::read_to_string(Path::new(source).join("data/mod.txt")).unwrap(),
        "v2\n"
    );
    assert!(Path::new(source).join("bin/busybox").exists());
    d.ctr_ok(&["snapshots", "--snapshotter", "remote", "rm", "layered-view"]);

    // Removing the image collects the linked snapshot in the backend too.
    d.ctr_ok(&["images", "rm", "--sync", name]);
    let chain = berth_diff::unpack::chain_ids(&layered.diff_ids);
    for c in chain.iter().rev() {
        let _ = d.ctr(&["snapshots", "--snapshotter", "remote", "rm", c]);
    }
    d.ctr_ok(&["images", "rm", "--sync", "import.local/layers:latest"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while remote.snapshot_dirs() > 0 {
        assert!(
            Instant::now() < deadline,
            "backend snapshots left: {}",
            d.ctr_ok(&["snapshots", "--snapshotter", "remote", "ls"])
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
