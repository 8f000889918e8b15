//! `berth-snapshotter`: serves Berth's stores over containerd's gRPC APIs on a unix
//! socket, for use as `[proxy_plugins]` of a daemon (Berth or containerd):
//!
//! - `--root DIR [--snapshotter overlayfs|native|btrfs]`: one snapshotter over the
//!   snapshots API (a `type = "snapshot"` proxy);
//! - `--content-root DIR`: a local content store over the content API (a `type =
//!   "content"` proxy); blobs and ingests live under DIR.
//!
//! - `--remote-layers DIR` (with `--snapshotter native`): a stand-in for a remote
//!   snapshotter such as stargz. DIR is an OCI image layout playing the registry; a
//!   prepare labelled `containerd.io/snapshot.ref=<chainID>` and
//!   `containerd.io/snapshot/cri.layer-digest=<digest>` whose blob is in DIR makes the
//!   layer a committed snapshot `<chainID>` here (extracted from DIR, where stargz
//!   would mount it lazily) and answers AlreadyExists, so the daemon skips the layer.
//!
//! Both APIs can be served on the same socket. Usage:
//! `berth-snapshotter --address SOCKET [--root DIR [--snapshotter KIND] [--remote-layers DIR]] [--content-root DIR]`

use berth_core::content::BlobStore;
use berth_core::error::ErrorKind;
use berth_core::labels::Labels;
use berth_core::mount::Mount;
use berth_core::snapshot::{Info, Kind, LABEL_SNAPSHOT_REF, Snapshotter, Usage};
use berth_core::{Error, Result};
use berth_diff::unpack::TARGET_LAYER_DIGEST_LABEL;
use berth_services::proxy::{BackendSnapshotsService, UnscopedContent};
use std::path::PathBuf;
use std::sync::Arc;

fn usage() -> ! {
    eprintln!(
        "usage: berth-snapshotter --address SOCKET [--root DIR [--snapshotter overlayfs|native|btrfs] [--remote-layers DIR]] [--content-root DIR]"
    );
    std::process::exit(2)
}

#[tokio::main]
async fn main() {
    let mut root = None;
    let mut content_root = None;
    let mut remote_layers = None;
    let mut address = None;
    let mut kind = "overlayfs".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--root" => root = args.next().map(PathBuf::from),
            "--content-root" => content_root = args.next().map(PathBuf::from),
            "--remote-layers" => remote_layers = args.next().map(PathBuf::from),
            "--address" => address = args.next().map(PathBuf::from),
            "--snapshotter" => kind = args.next().unwrap_or_else(|| usage()),
            _ => usage(),
        }
    }
    let Some(address) = address else { usage() };
    if root.is_none() && content_root.is_none() {
        usage()
    }
    let snapshots = root.map(|root| {
        let snapshotter: Arc<dyn Snapshotter> = match kind.as_str() {
            "overlayfs" => Arc::new(
                berth_snapshots::overlay::Overlay::new(&root, &Default::default())
                    .unwrap_or_else(|e| fail("snapshotter", &e)),
            ),
            "native" => Arc::new(
                berth_snapshots::native::Native::new(&root)
                    .unwrap_or_else(|e| fail("snapshotter", &e)),
            ),
            "btrfs" => Arc::new(
                berth_snapshots::btrfs::Btrfs::new(&root)
                    .unwrap_or_else(|e| fail("snapshotter", &e)),
            ),
            _ => usage(),
        };
        let snapshotter = match remote_layers {
            Some(_) if kind != "native" => {
                eprintln!("berth-snapshotter: --remote-layers needs --snapshotter native");
                std::process::exit(2)
            }
            Some(layers) => Arc::new(RemoteLayers {
                inner: snapshotter,
                layers,
            }),
            None => snapshotter,
        };
        BackendSnapshotsService::new(snapshotter).into_server()
    });
    let content = content_root.map(|content_root| {
        let blobs: Arc<dyn BlobStore> = Arc::new(
            berth_content::LocalStore::open(&content_root)
                .unwrap_or_else(|e| fail("content store", &e)),
        );
        berth_services::content::backend_server(Arc::new(UnscopedContent::new(blobs)))
            // The proxying daemon sends chunks of up to 1 MiB; leave room.
            .max_decoding_message_size(16 << 20)
            .max_encoding_message_size(16 << 20)
    });
    let router = tonic::transport::Server::builder()
        .add_optional_service(snapshots)
        .add_optional_service(content);
    let _ = std::fs::remove_file(&address);
    let listener = tokio::net::UnixListener::bind(&address).unwrap_or_else(|e| {
        eprintln!("berth-snapshotter: listening on {}: {e}", address.display());
        std::process::exit(1)
    });
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    let result = router
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    let _ = std::fs::remove_file(&address);
    if let Err(e) = result {
        eprintln!("berth-snapshotter: {e}");
        std::process::exit(1);
    }
}

fn fail(what: &str, e: &berth_core::Error) -> ! {
    eprintln!("berth-snapshotter: opening the {what}: {e}");
    std::process::exit(1)
}

/// The remote-snapshotter stand-in (`--remote-layers`): a native snapshotter that can
/// make a layer itself from its "registry" (an OCI layout), as stargz does from a real
/// one, when a prepare names the target chain ID and the layer digest.
struct RemoteLayers {
    inner: Arc<dyn Snapshotter>,
    layers: PathBuf,
}

impl RemoteLayers {
    /// The blob of `digest` in the layout, if it has it.
    fn blob(&self, digest: &str) -> Option<PathBuf> {
        let d = berth_core::content::Digest::parse(digest).ok()?;
        let path = self.layers.join("blobs").join(d.algorithm()).join(d.hex());
        path.is_file().then_some(path)
    }

    /// Makes the committed snapshot `target` on `parent` from the layer blob.
    async fn fetch(&self, target: &str, parent: &str, layer: &str, blob: PathBuf) -> Result<()> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let key = format!("remote-fetch-{nanos}-{target}");
        let mounts = self.inner.prepare(&key, parent, Labels::new()).await?;
        let applied = match mounts.as_slice() {
            [m] if m.r#type == "bind" => {
                let dir = PathBuf::from(&m.source);
                tokio::task::spawn_blocking(move || {
                    let file = std::fs::File::open(&blob)
                        .map_err(|e| Error::unknown(format!("opening {}: {e}", blob.display())))?;
                    let tar = berth_diff::compression::decompress(file, None)?;
                    berth_diff::apply::apply_tar(&dir, tar, &Default::default())
                })
                .await
                .map_err(|e| Error::unknown(format!("layer extraction task: {e}")))
                .and_then(|r| r)
            }
            other => Err(Error::failed_precondition(format!(
                "remote layers need a bind mount, got {other:?}"
            ))),
        };
        let committed = match applied {
            Ok(_) => {
                let labels: Labels = [
                    (LABEL_SNAPSHOT_REF.to_string(), target.to_string()),
                    (TARGET_LAYER_DIGEST_LABEL.to_string(), layer.to_string()),
                ]
                .into();
                self.inner.commit(target, &key, labels).await
            }
            Err(e) => Err(e.context(format!("extracting remote layer {layer}"))),
        };
        if committed.is_err() {
            let _ = self.inner.remove(&key).await;
        }
        committed
    }
}

#[async_trait::async_trait]
impl Snapshotter for RemoteLayers {
    async fn stat(&self, key: &str) -> Result<Info> {
        self.inner.stat(key).await
    }
    async fn update(&self, info: Info, fieldpaths: &[String]) -> Result<Info> {
        self.inner.update(info, fieldpaths).await
    }
    async fn usage(&self, key: &str) -> Result<Usage> {
        self.inner.usage(key).await
    }
    async fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        self.inner.mounts(key).await
    }

    async fn prepare(&self, key: &str, parent: &str, labels: Labels) -> Result<Vec<Mount>> {
        if let (Some(target), Some(layer)) = (
            labels.get(LABEL_SNAPSHOT_REF),
            labels.get(TARGET_LAYER_DIGEST_LABEL),
        ) && let Some(blob) = self.blob(layer)
        {
            let have = match self.inner.stat(target).await {
                Ok(info) => info.kind == Kind::Committed && info.parent == parent,
                Err(e) if e.is(ErrorKind::NotFound) => {
                    self.fetch(target, parent, layer, blob).await?;
                    eprintln!("berth-snapshotter: remote layer {layer} is snapshot {target}");
                    true
                }
                Err(e) => return Err(e),
            };
            if have {
                return Err(Error::already_exists(format!("target snapshot {target:?}")));
            }
        }
        self.inner.prepare(key, parent, labels).await
    }

    async fn view(&self, key: &str, parent: &str, labels: Labels) -> Result<Vec<Mount>> {
        self.inner.view(key, parent, labels).await
    }
    async fn commit(&self, name: &str, key: &str, labels: Labels) -> Result<()> {
        self.inner.commit(name, key, labels).await
    }
    async fn remove(&self, key: &str) -> Result<()> {
        self.inner.remove(key).await
    }
    async fn walk(&self, filters: &[String]) -> Result<Vec<Info>> {
        self.inner.walk(filters).await
    }
    async fn cleanup(&self) -> Result<()> {
        self.inner.cleanup().await
    }
}
