//! Daemon-side image transfers: the logic behind containerd 2.x's transfer service
//! (`io.containerd.transfer.v1.local`), free of gRPC so CRI and tests can call it too.
//!
//! A transfer goes from a source object to a destination object:
//!
//! | source → destination | what happens |
//! |---|---|
//! | [`Registry`] → [`ImageStore`] | pull (module `pull`): [`berth_remotes::pull::pull_filtered`] into the namespaced content store under a lease, walking the image through the store's platform filter (`platforms`, `all_metadata`, `manifest_limit`); each image a supported unpack matches has each layer applied onto its parent's snapshot as soon as both are there; image records last |
//! | [`ImageStore`] → [`Registry`] | push: the image's blobs read from the content store, uploaded children first, the tag last |
//! | [`ImportStream`] → [`ImageStore`] | import: an OCI image layout or a Docker `docker save` archive (module `archive`: Docker manifests and an index made as containerd makes them, `force_compress` gzips uncompressed layers), read once into the content store under a lease, walked through the same filter (what it skips is collected), matching images unpacked |
//! | [`ImageStore`] → [`ExportStream`] | export: an OCI image layout tar as containerd's `archive.Export` writes it (`platforms` or this machine's, `all_platforms`, Docker's `manifest.json` unless `skip_compatibility_manifest`, `skip_non_distributable`) |
//! | [`ImageStore`] → [`ImageStore`] | tag (containerd 2.x's `ctr image tag`): the source image's target stored under the destination's naming (name, labels, extra references); an existing record of that name is updated |
//! | anything else (e.g. import stream → export stream) | `NotImplemented`, which the gRPC adapter turns into containerd's `Unimplemented` |
//!
//! Image records are named as containerd's image store names them (module `names`:
//! the store's name and labels, extra references with `is_prefix`, `add_digest`,
//! `allow_overwrite`, `skip_named_digest`, the `io.containerd.image.name` /
//! `org.opencontainers.image.ref.name` annotations of an imported index). Which images
//! are unpacked, and into which snapshotter, is containerd's choice
//! (module `unpack`: each requested unpack against the supported ones, each
//! image's config platform against the supported platform, by OS only unless
//! `check_platform_supported`).
//!
//! Registry credentials are asked from a [`CredentialsProvider`] with the host that
//! challenges, when it challenges (a mirror from `hosts.toml` under its own name), and
//! sent to that host only.
//!
//! Progress is reported as containerd's `transfer.Progress` events (same event names,
//! ref-key names and parents), through a callback; a cancelled [`TransferOptions::cancel`]
//! stops downloads and unpacking, removes the half-applied snapshot and the lease, and
//! writes no image record.

mod archive;
mod export;
mod import;
mod names;
mod progress;
mod pull;
mod push;
mod targuard;
mod unpack;

pub use progress::{Progress, ProgressFn, ref_key};

use berth_core::content::{ContentStore, Descriptor};
use berth_core::diff::Applier;
use berth_core::labels::Labels;
use berth_core::{Error, Result};
use berth_metadata::MetadataStore;
use berth_metadata::images::Image;
use berth_metadata::snapshots::Snapshotters;
use berth_remotes::Platform;
use berth_remotes::auth::CredentialsProvider;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
pub use tokio_util::sync::CancellationToken;

/// `[plugins."io.containerd.transfer.v1.local"]` (the keys of containerd 2.x Berth uses).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct TransferConfig {
    /// Layers downloaded at the same time by one pull.
    pub max_concurrent_downloads: usize,
    /// Blobs uploaded at the same time by one push.
    pub max_concurrent_uploaded_layers: usize,
    /// Directories of `<host>/hosts.toml` used when a request names none (`:`-separated).
    pub config_path: String,
    /// Snapshotter of an unpack request that names none (containerd's default).
    pub snapshotter: String,
    /// containerd's `check_platform_supported`: an unpack platform must match the
    /// supported platform exactly (architecture and variant too), not only its OS.
    pub check_platform_supported: bool,
    /// containerd's `[[unpack_config]]`: the platform and snapshotter pairs an unpack
    /// request may ask for. Unset: this machine's platform with any snapshotter Berth
    /// has loaded (containerd's default allows only its default snapshotter and erofs).
    pub unpack_config: Option<Vec<UnpackPlatformConfig>>,
}

/// One `[[plugins."io.containerd.transfer.v1.local".unpack_config]]` entry.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct UnpackPlatformConfig {
    /// `os[/arch[/variant]]`.
    pub platform: String,
    pub snapshotter: String,
}

impl Default for TransferConfig {
    fn default() -> Self {
        TransferConfig {
            max_concurrent_downloads: 3,
            max_concurrent_uploaded_layers: 3,
            config_path: String::new(),
            snapshotter: "overlayfs".into(),
            check_platform_supported: false,
            unpack_config: None,
        }
    }
}

/// containerd's `OCIRegistry`: a reference and how to reach its registry.
#[derive(Clone, Default)]
pub struct Registry {
    pub reference: String,
    /// `hosts.toml` directories (`:`-separated); empty means the service's default.
    pub host_dir: String,
    /// Scheme for hosts without configuration (`http` for `--plain-http`).
    pub default_scheme: String,
    /// Headers sent with every registry request.
    pub headers: Vec<(String, String)>,
    /// Where credentials come from: asked with the host that challenged (the
    /// reference's host or a mirror from `hosts.toml`) when it challenges, as
    /// containerd's resolver asks its credentials callback. `None`: anonymous.
    pub credentials: Option<Arc<dyn CredentialsProvider>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("reference", &self.reference)
            .field("host_dir", &self.host_dir)
            .field("default_scheme", &self.default_scheme)
            .field("credentials", &self.credentials.is_some())
            .finish_non_exhaustive()
    }
}

/// One unpack of containerd's `ImageStore.unpacks`.
#[derive(Debug, Clone, Default)]
pub struct Unpack {
    /// `None`: this machine's platform (containerd skips an unpack without a platform).
    pub platform: Option<Platform>,
    /// Empty: [`TransferConfig::snapshotter`].
    pub snapshotter: String,
}

/// One of containerd's `ImageStore.extra_references`.
#[derive(Debug, Clone, Default)]
pub struct ImageReference {
    pub name: String,
    /// `name` is a prefix for names taken from an archive's annotations.
    pub is_prefix: bool,
    /// Names outside the prefix may be used.
    pub allow_overwrite: bool,
    /// Also (or, without a name, only) record `name@digest`.
    pub add_digest: bool,
    pub skip_named_digest: bool,
}

/// containerd's `ImageStore`: the local image store as source or destination.
#[derive(Debug, Clone, Default)]
pub struct ImageStore {
    pub name: String,
    pub labels: Labels,
    /// Platforms whose manifests a pull or import takes whole, in order of preference
    /// (empty: every platform, as containerd).
    pub platforms: Vec<Platform>,
    /// The other platforms' manifests and configs too (no layers).
    pub all_metadata: bool,
    /// At most this many manifests per index, preferred platforms first (0: no limit).
    pub manifest_limit: usize,
    pub unpacks: Vec<Unpack>,
    pub extra_references: Vec<ImageReference>,
}

/// containerd's `ImageImportStream`: an archive read from the client.
#[derive(Clone)]
pub struct ImportStream {
    /// Taken by the import (a stream is read once).
    pub reader: Arc<std::sync::Mutex<Option<Box<dyn std::io::Read + Send>>>>,
    /// Empty: detect the compression from the first bytes.
    pub media_type: String,
    /// Docker archives: gzip the uncompressed layers (containerd's `--compress-blobs`).
    pub force_compress: bool,
}

/// containerd's `ImageExportStream`: an archive written to the client.
#[derive(Clone)]
pub struct ExportStream {
    /// Taken by the export (a stream is written once).
    pub writer: Arc<std::sync::Mutex<Option<Box<dyn std::io::Write + Send>>>>,
    /// Platforms of an index to export (empty: this machine's).
    pub platforms: Vec<Platform>,
    pub all_platforms: bool,
    pub skip_compatibility_manifest: bool,
    pub skip_non_distributable: bool,
}

impl std::fmt::Debug for ExportStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportStream")
            .field("platforms", &self.platforms)
            .field("all_platforms", &self.all_platforms)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for ImportStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImportStream")
            .field("media_type", &self.media_type)
            .finish_non_exhaustive()
    }
}

/// A transfer's source or destination.
#[derive(Debug, Clone)]
pub enum Object {
    Registry(Registry),
    ImageStore(ImageStore),
    ImportStream(ImportStream),
    ExportStream(ExportStream),
    /// A type no transfer handles (its type URL).
    Other(String),
}

impl Object {
    fn describe(&self) -> String {
        match self {
            Object::Registry(r) => format!("OCI Registry ({})", r.reference),
            Object::ImageStore(s) => format!("Local Image Store ({})", s.name),
            Object::ImportStream(_) => "Image import stream".into(),
            Object::ExportStream(_) => "Image export stream".into(),
            Object::Other(t) => t.clone(),
        }
    }
}

/// Options of one transfer.
#[derive(Clone, Default)]
pub struct TransferOptions {
    pub progress: Option<ProgressFn>,
    /// Cancelled when the client goes away.
    pub cancel: CancellationToken,
}

/// An image record a transfer wrote.
#[derive(Debug, Clone)]
pub struct StoredImage {
    pub image: Image,
    /// `false`: an existing record was updated.
    pub created: bool,
}

/// The local transferrer: owns nothing but handles to the daemon's stores.
pub struct LocalTransfer {
    pub(crate) md: Arc<MetadataStore>,
    pub(crate) content: Arc<dyn ContentStore>,
    pub(crate) snapshotters: Snapshotters,
    pub(crate) applier: Arc<dyn Applier>,
    pub(crate) config: TransferConfig,
}

impl LocalTransfer {
    pub fn new(
        md: Arc<MetadataStore>,
        content: Arc<dyn ContentStore>,
        snapshotters: Snapshotters,
        applier: Arc<dyn Applier>,
        config: TransferConfig,
    ) -> LocalTransfer {
        LocalTransfer {
            md,
            content,
            snapshotters,
            applier,
            config,
        }
    }

    pub fn config(&self) -> &TransferConfig {
        &self.config
    }

    /// Runs one transfer in namespace `ns`. Returns the image records written (a push
    /// writes none).
    pub async fn transfer(
        &self,
        ns: &str,
        source: Object,
        destination: Object,
        opts: TransferOptions,
    ) -> Result<Vec<StoredImage>> {
        match (source, destination) {
            (Object::Registry(src), Object::ImageStore(dst)) => {
                pull::pull(self, ns, &src, &dst, &opts).await
            }
            (Object::ImageStore(src), Object::Registry(dst)) => {
                push::push(self, ns, &src, &dst, &opts).await?;
                Ok(vec![])
            }
            (Object::ImportStream(src), Object::ImageStore(dst)) => {
                import::import(self, ns, &src, &dst, &opts).await
            }
            (Object::ImageStore(src), Object::ExportStream(dst)) => {
                export::export(self, ns, &src, &dst, &opts).await?;
                Ok(vec![])
            }
            (Object::ImageStore(src), Object::ImageStore(dst)) => {
                // containerd reports no progress for a tag.
                self.tag(ns, &src, &dst).await
            }
            (s, d) => Err(Error::not_implemented(format!(
                "transfer from {} to {} is not implemented by Berth yet (supported: registry → image store, image store → registry, import stream → image store, image store → export stream, image store → image store)",
                s.describe(),
                d.describe()
            ))),
        }
    }

    /// Image store → image store (containerd 2.x's `ctr image tag`): the records of
    /// `dst`'s naming for the target of `src`'s image. No content moves, so no lease.
    async fn tag(&self, ns: &str, src: &ImageStore, dst: &ImageStore) -> Result<Vec<StoredImage>> {
        let (md, n, name) = (self.md.clone(), ns.to_string(), src.name.clone());
        let image = blocking(move || md.get_image(&n, &name)).await?;
        names::store(self, ns, dst, &image.target, false).await
    }

    /// Resolver for a registry object: its hosts directory (or the service's), default
    /// scheme, headers and credentials provider (asked per challenging host).
    pub(crate) fn resolver(&self, reg: &Registry) -> berth_remotes::Resolver {
        use berth_remotes::auth::StaticCredentials;
        use berth_remotes::hosts::HostOptions;
        let host_dir = if reg.host_dir.is_empty() {
            self.config.config_path.clone()
        } else {
            reg.host_dir.clone()
        };
        let host_opts = HostOptions {
            config_path: (!host_dir.is_empty()).then_some(host_dir),
            default_scheme: (!reg.default_scheme.is_empty()).then(|| reg.default_scheme.clone()),
        };
        let mut opts = berth_remotes::ResolverOptions::with_hosts(host_opts);
        if !reg.headers.is_empty() {
            let base = opts.hosts.clone();
            let headers = reg.headers.clone();
            opts.hosts = Arc::new(move |h: &str| {
                let mut hosts = base(h)?;
                for host in &mut hosts {
                    host.headers.extend(headers.iter().cloned());
                }
                Ok(hosts)
            });
        }
        opts.credentials = match &reg.credentials {
            Some(c) => c.clone(),
            None => Arc::new(StaticCredentials::default()),
        };
        berth_remotes::Resolver::new(opts)
    }
}

/// Runs store work on the blocking pool (redb transactions, file I/O).
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::unknown(format!("blocking task: {e}")))?
}

/// How long a transfer's lease outlives a daemon that died during the transfer: the
/// collector takes what it held once it expires.
const LEASE_EXPIRY: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Runs `work` (given the lease ID) under a fresh lease of the namespace, so nothing it
/// writes is collected before the image record refers to it; the lease is deleted when
/// `work` ends, whatever its outcome (`what` names the transfer in the warning if that
/// fails).
pub(crate) async fn under_temporary_lease<T, Fut>(
    t: &LocalTransfer,
    ns: &str,
    what: &str,
    work: impl FnOnce(String) -> Fut,
) -> Result<T>
where
    Fut: std::future::Future<Output = Result<T>>,
{
    let lease_id = format!("transfer-{}", uuid::Uuid::new_v4());
    let mut lease_labels = Labels::new();
    lease_labels.insert(
        berth_core::labels::GC_EXPIRE.into(),
        berth_core::time::rfc3339(std::time::SystemTime::now() + LEASE_EXPIRY),
    );
    {
        let (md, ns, id) = (t.md.clone(), ns.to_string(), lease_id.clone());
        blocking(move || md.create_lease(&ns, Some(&id), &lease_labels)).await?;
    }
    let result = work(lease_id.clone()).await;
    let (md, n, id) = (t.md.clone(), ns.to_string(), lease_id.clone());
    if let Err(e) = blocking(move || md.delete_lease(&n, &id)).await {
        tracing::warn!(lease = %lease_id, error = %e, "deleting the {what}'s lease");
    }
    result
}

/// containerd's `saved` progress event for each stored image.
pub(crate) fn report_saved(send: impl Fn(Progress), stored: &[StoredImage]) {
    for s in stored {
        send(Progress {
            event: "saved".into(),
            name: s.image.name.clone(),
            desc: Some(s.image.target.clone()),
            ..Default::default()
        });
    }
}

/// `oci_spec` descriptor → the core one (annotations kept).
pub(crate) fn core_desc(d: &oci_spec::image::Descriptor) -> Descriptor {
    berth_remotes::manifest::to_core_descriptor(d)
}
