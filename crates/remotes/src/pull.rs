//! The pull pipeline: resolve, pick the platform's manifest, fetch config and layers in
//! parallel into a [`BlobSink`] with digests verified while streaming, report per-blob
//! progress, and notify a [`LayerHook`] of each layer in dependency order.
//!
//! # Where the content goes
//!
//! A [`BlobSink`] is anything that can hold blobs by digest with resumable writes: the
//! daemon implements it over the content store (an ingest per blob under the pull's
//! lease), [`DirSink`] over a plain directory. The pipeline only commits a blob after its
//! size and digest were checked; a blob whose bytes do not match is aborted (its partial
//! data discarded) so nothing half-written ever becomes visible. A blob interrupted by a
//! connection error or cancellation is closed, not aborted: the next pull resumes it with
//! an HTTP range request from the sink's offset, after re-hashing the bytes already held.
//!
//! Manifests are written last (child manifest, then index) so that a visible manifest
//! implies its config and layers are present.
//!
//! # Unpacking while pulling (the layer hook)
//!
//! [`LayerHook::layer_ready`] is called for layer 0, 1, 2, … strictly in order: the call
//! for layer *i* happens once layer *i* is committed to the sink **and** the call for
//! layer *i − 1* has returned. Downloads of later layers go on meanwhile, so an
//! implementation that applies the layer (decompress + unpack onto the snapshot of its
//! parent) gets pipelined unpacking for free. The hook should move CPU-heavy work to a
//! blocking thread; an error from it fails the pull (downloads are dropped, their ingests
//! kept for resume).

use crate::client::Resolver;
use crate::manifest::{self, ManifestFilter, descriptor_digest};
use crate::platform::Platform;
use crate::reference::Reference;
use crate::verify::Verifier;
use berth_core::error::ErrorKind;
use berth_core::{Error, Result};
use bytes::Bytes;
use futures::StreamExt;
use oci_spec::image::Descriptor;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::sync::mpsc::UnboundedSender;
pub use tokio_util::sync::CancellationToken;

/// An open, resumable write of one blob.
#[async_trait::async_trait]
pub trait BlobWriter: Send {
    /// Bytes already held from an earlier, interrupted write (0 for a fresh one).
    fn offset(&self) -> u64;
    /// The bytes already held, so the pipeline can hash them before resuming; `None`
    /// makes the pipeline truncate and start over.
    async fn read_written(&mut self) -> Result<Option<Box<dyn AsyncRead + Send + Unpin>>>;
    /// Whether `commit` checks the digest of everything written itself (a content store
    /// writer does). Such a writer can be resumed without [`BlobWriter::read_written`]:
    /// the pipeline then checks sizes and leaves the digest to the commit.
    fn verifies_digest_on_commit(&self) -> bool {
        false
    }
    /// Drops what was written (back to offset 0).
    async fn truncate(&mut self) -> Result<()>;
    async fn write(&mut self, data: Bytes) -> Result<()>;
    /// Makes the blob visible under `desc`'s digest. The pipeline has verified it.
    async fn commit(self: Box<Self>, desc: &Descriptor) -> Result<()>;
    /// Discards the write: its data was wrong.
    async fn abort(self: Box<Self>) -> Result<()>;
    /// Stops writing but keeps the data for a later resume.
    async fn close(self: Box<Self>) -> Result<()>;
}

/// Where pulled blobs go.
#[async_trait::async_trait]
pub trait BlobSink: Send + Sync {
    /// Opens a writer for `desc` (resuming an earlier one if the sink has it), or `None`
    /// when the blob is already present.
    async fn open(&self, desc: &Descriptor) -> Result<Option<Box<dyn BlobWriter>>>;
}

/// Notified of each layer, in order, as soon as it can be applied. See the module docs.
#[async_trait::async_trait]
pub trait LayerHook: Send + Sync {
    async fn layer_ready(&self, index: usize, layer: &Descriptor, image: &ImageInfo) -> Result<()>;
}

/// What a blob is in the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobKind {
    Index,
    Manifest,
    Config,
    Layer(usize),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProgressState {
    /// Queued behind `max_concurrent_downloads`.
    Waiting,
    Downloading,
    /// Continuing an earlier partial download from `offset`.
    Resuming,
    /// Already in the sink: nothing to download.
    Exists,
    Done,
    Failed(String),
    /// Being applied onto its parent's snapshot (reported by a [`LayerHook`] owner, e.g.
    /// the daemon's transfer service; the pipeline itself never sends it).
    Unpacking,
    /// Applied and committed as a snapshot (same).
    Unpacked,
}

/// One progress report of one blob.
#[derive(Debug, Clone)]
pub struct ProgressEvent {
    pub digest: String,
    pub media_type: String,
    pub kind: BlobKind,
    pub state: ProgressState,
    pub offset: u64,
    pub total: u64,
}

/// The pulled image.
#[derive(Debug, Clone)]
pub struct ImageInfo {
    /// The reference as pulled (`host/repo:tag`).
    pub name: String,
    /// What the reference resolved to (an index or a manifest).
    pub target: Descriptor,
    /// The platform's manifest.
    pub manifest: Descriptor,
    pub config: Descriptor,
    /// The image configuration (verified against `config`), fetched before the layers so
    /// a [`LayerHook`] has the diff IDs from the start.
    pub config_body: Vec<u8>,
    pub layers: Vec<Descriptor>,
}

/// Largest image configuration accepted (16 MiB).
pub const MAX_CONFIG_SIZE: u64 = 16 << 20;

#[derive(Clone)]
pub struct PullOptions {
    pub platform: Platform,
    pub max_concurrent_downloads: usize,
    /// Times one blob download is resumed after a connection error.
    pub download_retries: u32,
    pub progress: Option<UnboundedSender<ProgressEvent>>,
    pub cancel: CancellationToken,
    pub layer_hook: Option<Arc<dyn LayerHook>>,
    /// Called with each index or manifest and the children the pull takes from it
    /// (manifests of an index; config and layers of a manifest), before any progress
    /// event of those children: progress consumers learn every blob's parent.
    pub on_children: Option<ChildrenFn>,
}

/// See [`PullOptions::on_children`].
pub type ChildrenFn = Arc<dyn Fn(&Descriptor, &[Descriptor]) + Send + Sync>;

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            platform: Platform::host(),
            max_concurrent_downloads: 3,
            download_retries: 3,
            progress: None,
            cancel: CancellationToken::new(),
            layer_hook: None,
            on_children: None,
        }
    }
}

fn emit(opts: &PullOptions, desc: &Descriptor, kind: &BlobKind, state: ProgressState, offset: u64) {
    if let Some(tx) = &opts.progress {
        let _ = tx.send(ProgressEvent {
            digest: desc.digest().to_string(),
            media_type: desc.media_type().to_string(),
            kind: kind.clone(),
            state,
            offset,
            total: desc.size(),
        });
    }
}

/// Pulls `reference` into `sink`: the manifest that best serves `opts.platform` (an
/// index's entries without a platform and attestation manifests are never chosen; none
/// matching is `NotFound`, naming the platforms the index has). See the module docs for
/// the guarantees.
pub async fn pull(
    resolver: &Resolver,
    reference: &Reference,
    sink: &dyn BlobSink,
    opts: &PullOptions,
) -> Result<ImageInfo> {
    let mut pulled = pull_selected(resolver, reference, sink, opts, Selection::Best).await?;
    Ok(pulled.images.remove(0))
}

/// What [`pull_filtered`] pulled.
#[derive(Debug, Clone)]
pub struct Pulled {
    /// What the reference resolved to (an index or a manifest).
    pub target: Descriptor,
    /// The manifests pulled whole (config and layers), in the filter's order of
    /// preference (the best first).
    pub images: Vec<ImageInfo>,
    /// The manifests of which only the manifest and the config were pulled (the other
    /// platforms of an `all_metadata` pull).
    pub metadata_only: Vec<Descriptor>,
}

/// Pulls `reference` into `sink` as containerd 2.x's transfer service does for an image
/// store with `filter`: every manifest of an index the filter takes (nested indexes
/// walked the same way), whole or for its metadata only. The layer hook is called for
/// each image pulled whole, in layer order per image; a layer several images share is
/// downloaded once. Manifests are written last: metadata-only ones, then the images
/// pulled whole (the preferred last), then indexes (inner first).
pub async fn pull_filtered(
    resolver: &Resolver,
    reference: &Reference,
    sink: &dyn BlobSink,
    opts: &PullOptions,
    filter: &ManifestFilter,
) -> Result<Pulled> {
    pull_selected(resolver, reference, sink, opts, Selection::Filter(filter)).await
}

#[derive(Clone, Copy)]
enum Selection<'a> {
    /// [`pull`]: one manifest, the best for `opts.platform`.
    Best,
    Filter(&'a ManifestFilter),
}

/// A manifest found by the walk.
struct Found {
    desc: Descriptor,
    body: Vec<u8>,
    whole: bool,
}

/// Indexes nested deeper than this are refused.
const MAX_INDEX_DEPTH: usize = 8;

/// Walks `index` (already fetched): fetches the manifests and nested indexes `sel`
/// takes, announcing each, and reports parents to `opts.on_children`.
#[allow(clippy::too_many_arguments)]
async fn walk_index(
    resolver: &Resolver,
    reference: &Reference,
    opts: &PullOptions,
    sel: Selection<'_>,
    index_desc: &Descriptor,
    body: &[u8],
    depth: usize,
    indexes: &mut Vec<(Descriptor, Vec<u8>)>,
    found: &mut Vec<Found>,
) -> Result<()> {
    let what = reference.to_string();
    if depth > MAX_INDEX_DEPTH {
        return Err(Error::invalid_argument(format!(
            "{what}: indexes nested too deeply"
        )));
    }
    let index = manifest::parse_index(body, &what)?;
    let taken: Vec<(Descriptor, bool)> = match sel {
        Selection::Best => vec![(
            manifest::select_platform(&index, &opts.platform, &what)?,
            true,
        )],
        Selection::Filter(f) => f
            .select(index.manifests(), &what)?
            .into_iter()
            .filter(|(d, _)| {
                manifest::is_manifest(d.media_type().as_ref())
                    || manifest::is_index(d.media_type().as_ref())
            })
            .collect(),
    };
    if let Some(cb) = &opts.on_children {
        let children: Vec<Descriptor> = taken.iter().map(|(d, _)| d.clone()).collect();
        cb(index_desc, &children);
    }
    for (d, whole) in taken {
        let body = resolver.fetch_manifest(reference, &d).await?;
        let mt = manifest::detect_media_type(&body, Some(d.media_type().as_ref()), &what)?;
        if manifest::is_index(&mt) {
            emit(opts, &d, &BlobKind::Index, ProgressState::Waiting, 0);
            Box::pin(walk_index(
                resolver,
                reference,
                opts,
                sel,
                &d,
                &body,
                depth + 1,
                indexes,
                found,
            ))
            .await?;
            indexes.push((d, body));
        } else if manifest::is_manifest(&mt) {
            emit(opts, &d, &BlobKind::Manifest, ProgressState::Waiting, 0);
            found.push(Found {
                desc: d,
                body,
                whole,
            });
        } else {
            return Err(Error::invalid_argument(format!(
                "{what}: expected an image manifest, got {mt}"
            )));
        }
    }
    Ok(())
}

/// Fetches a manifest's config (verified, bounded) into the sink; returns its bytes.
async fn fetch_config(
    resolver: &Resolver,
    reference: &Reference,
    sink: &dyn BlobSink,
    opts: &PullOptions,
    config: &Descriptor,
) -> Result<Vec<u8>> {
    emit(
        opts,
        config,
        &BlobKind::Config,
        ProgressState::Downloading,
        0,
    );
    let body = resolver
        .fetch_verified(reference, config, MAX_CONFIG_SIZE)
        .await?;
    match sink.open(config).await? {
        Some(mut w) => {
            if w.offset() > 0 {
                w.truncate().await?;
            }
            w.write(Bytes::from(body.clone())).await?;
            w.commit(config).await?;
            emit(
                opts,
                config,
                &BlobKind::Config,
                ProgressState::Done,
                config.size(),
            );
        }
        None => emit(
            opts,
            config,
            &BlobKind::Config,
            ProgressState::Exists,
            config.size(),
        ),
    }
    Ok(body)
}

async fn pull_selected(
    resolver: &Resolver,
    reference: &Reference,
    sink: &dyn BlobSink,
    opts: &PullOptions,
    sel: Selection<'_>,
) -> Result<Pulled> {
    let cancelled = || Error::new(ErrorKind::Canceled, format!("pull {reference}"));
    let resolved = tokio::select! {
        r = resolver.resolve(reference) => r?,
        _ = opts.cancel.cancelled() => return Err(cancelled()),
    };
    let target = resolved.descriptor.clone();
    let what = reference.to_string();
    let top = resolver.fetch_manifest(reference, &target).await?;
    let top_mt = target.media_type().to_string();
    let top_mt = if manifest::is_manifest_like(&top_mt) {
        manifest::detect_media_type(&top, Some(&top_mt), &what)?
    } else {
        manifest::detect_media_type(&top, None, &what)?
    };
    // Indexes in write order (inner first, the top last) and the manifests found.
    let mut indexes: Vec<(Descriptor, Vec<u8>)> = vec![];
    let mut found: Vec<Found> = vec![];
    if manifest::is_index(&top_mt) {
        // Announced now, written last (see the module docs): progress consumers learn
        // which manifest the config and layers belong to, the top first.
        emit(opts, &target, &BlobKind::Index, ProgressState::Waiting, 0);
        let walked = tokio::select! {
            r = walk_index(resolver, reference, opts, sel, &target, &top, 0, &mut indexes, &mut found) => r,
            _ = opts.cancel.cancelled() => return Err(cancelled()),
        };
        walked?;
        indexes.push((target.clone(), top));
    } else if manifest::is_manifest(&top_mt) {
        emit(
            opts,
            &target,
            &BlobKind::Manifest,
            ProgressState::Waiting,
            0,
        );
        found.push(Found {
            desc: target.clone(),
            body: top,
            whole: true,
        });
    } else {
        return Err(Error::invalid_argument(format!(
            "{what}: expected an image manifest, got {top_mt}"
        )));
    }

    // Configs first (a layer hook needs the diff IDs from the start), then the layers of
    // the images pulled whole.
    let mut images: Vec<ImageInfo> = vec![];
    let mut metadata_only: Vec<Descriptor> = vec![];
    for f in &found {
        let m = manifest::parse_manifest(&f.body, &what)?;
        let config = m.config().clone();
        let layers: Vec<Descriptor> = if f.whole { m.layers().clone() } else { vec![] };
        if let Some(cb) = &opts.on_children {
            let mut children = vec![config.clone()];
            children.extend(layers.iter().cloned());
            cb(&f.desc, &children);
        }
        for d in std::iter::once(&config).chain(layers.iter()) {
            descriptor_digest(d).map_err(|e| e.context(&what))?;
        }
        let config_body = tokio::select! {
            r = fetch_config(resolver, reference, sink, opts, &config) => r?,
            _ = opts.cancel.cancelled() => return Err(cancelled()),
        };
        if f.whole {
            images.push(ImageInfo {
                name: what.clone(),
                target: target.clone(),
                manifest: f.desc.clone(),
                config,
                config_body,
                layers,
            });
        } else {
            metadata_only.push(f.desc.clone());
        }
    }

    // One download per distinct layer; each image's hook chain waits for its layers.
    let mut blobs: Vec<(Descriptor, BlobKind)> = vec![];
    let mut done_rx: std::collections::HashMap<String, tokio::sync::watch::Receiver<bool>> =
        std::collections::HashMap::new();
    let mut done_tx: Vec<Option<tokio::sync::watch::Sender<bool>>> = vec![];
    for image in &images {
        for (i, l) in image.layers.iter().enumerate() {
            let key = l.digest().to_string();
            if done_rx.contains_key(&key) {
                continue;
            }
            let (tx, rx) = tokio::sync::watch::channel(false);
            done_rx.insert(key, rx);
            done_tx.push(Some(tx));
            blobs.push((l.clone(), BlobKind::Layer(i)));
        }
    }
    for (d, k) in &blobs {
        emit(opts, d, k, ProgressState::Waiting, 0);
    }
    let sem = Arc::new(tokio::sync::Semaphore::new(
        opts.max_concurrent_downloads.max(1),
    ));
    // Every download ends by itself (closing its writer) when `stop` fires: on the
    // caller's cancellation, or on the first failure of a download or of the hook.
    let stop = opts.cancel.child_token();
    let inner = PullOptions {
        cancel: stop.clone(),
        ..opts.clone()
    };
    let inner = &inner;
    let downloads = futures::future::join_all(blobs.into_iter().zip(done_tx.iter_mut()).map(
        |((d, kind), tx)| {
            let sem = sem.clone();
            let stop = stop.clone();
            let tx = tx.take();
            async move {
                let permit = tokio::select! {
                    p = sem.acquire() => p.map_err(|_| Error::unknown("semaphore closed"))?,
                    _ = stop.cancelled() => return Err(cancelled()),
                };
                let r = fetch_into(resolver, reference, &d, &kind, sink, inner).await;
                drop(permit);
                match r {
                    Ok(()) => {
                        if let Some(tx) = tx {
                            let _ = tx.send(true);
                        }
                        Ok(())
                    }
                    Err(e) => {
                        stop.cancel();
                        Err(e)
                    }
                }
            }
        },
    ));
    let hook_stop = stop.clone();
    let images_ref = &images;
    let done_ref = &done_rx;
    let notifiers = futures::future::join_all(images_ref.iter().map(|image| {
        let hook_stop = hook_stop.clone();
        async move {
            for (i, layer) in image.layers.iter().enumerate() {
                let mut rx = done_ref[&layer.digest().to_string()].clone();
                let ready = tokio::select! {
                    r = rx.wait_for(|done| *done) => r.is_ok(),
                    _ = hook_stop.cancelled() => false,
                };
                if !ready {
                    // That download failed (its error ends the pull) or the pull stops.
                    return Ok(());
                }
                if let Some(h) = &opts.layer_hook {
                    let r = tokio::select! {
                        r = h.layer_ready(i, layer, image) => r,
                        _ = hook_stop.cancelled() => return Ok(()),
                    };
                    if let Err(e) = r {
                        hook_stop.cancel();
                        return Err(e);
                    }
                }
            }
            Ok::<(), Error>(())
        }
    }));
    let (results, hooked) = futures::future::join(downloads, notifiers).await;
    drop(done_tx);
    let mut errors: Vec<Error> = results.into_iter().filter_map(|r| r.err()).collect();
    for e in hooked.into_iter().filter_map(|r| r.err()).rev() {
        errors.insert(0, e);
    }
    if !errors.is_empty() {
        // The cause, not the downloads it stopped.
        let pos = errors
            .iter()
            .position(|e| !e.is(ErrorKind::Canceled))
            .unwrap_or(0);
        let e = errors.swap_remove(pos);
        return Err(if e.is(ErrorKind::Canceled) {
            cancelled()
        } else {
            e
        });
    }
    if opts.cancel.is_cancelled() {
        return Err(cancelled());
    }
    // Children before parents: metadata-only manifests, the images pulled whole (the
    // preferred last), then the indexes.
    let mut writes: Vec<(Descriptor, Vec<u8>, BlobKind)> = vec![];
    let (meta, whole): (Vec<Found>, Vec<Found>) = found.into_iter().partition(|f| !f.whole);
    for f in meta.into_iter().chain(whole.into_iter().rev()) {
        writes.push((f.desc, f.body, BlobKind::Manifest));
    }
    for (d, body) in indexes {
        writes.push((d, body, BlobKind::Index));
    }
    for (d, body, kind) in writes {
        if let Some(mut w) = sink.open(&d).await? {
            if w.offset() > 0 {
                w.truncate().await?;
            }
            w.write(Bytes::from(body)).await?;
            w.commit(&d).await?;
        }
        emit(opts, &d, &kind, ProgressState::Done, d.size());
    }
    if images.is_empty() && matches!(sel, Selection::Best) {
        return Err(Error::not_found(format!("{what}: no image manifest")));
    }
    Ok(Pulled {
        target,
        images,
        metadata_only,
    })
}

/// Downloads one blob into the sink, resuming where the sink left off, verifying size and
/// digest; commits on success, aborts on bad content, closes (keeps) on interruption.
pub async fn fetch_into(
    resolver: &Resolver,
    reference: &Reference,
    desc: &Descriptor,
    kind: &BlobKind,
    sink: &dyn BlobSink,
    opts: &PullOptions,
) -> Result<()> {
    let what = format!("{}@{}", reference.name(), desc.digest());
    let Some(mut w) = sink.open(desc).await? else {
        emit(opts, desc, kind, ProgressState::Exists, desc.size());
        return Ok(());
    };
    let mut v = Verifier::new(desc)?;
    let held = w.offset();
    if held > 0 {
        let mut prefix_ok = false;
        let reader = if held <= desc.size() {
            w.read_written().await?
        } else {
            None
        };
        if let Some(mut r) = reader {
            let mut buf = vec![0u8; 1 << 16];
            let mut total = 0u64;
            loop {
                let n = r.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                total += n as u64;
                v.update(&buf[..n])?;
            }
            prefix_ok = total == held;
        } else if held <= desc.size() && w.verifies_digest_on_commit() {
            v.assume_prefix(held);
            prefix_ok = true;
        }
        if prefix_ok {
            emit(opts, desc, kind, ProgressState::Resuming, held);
        } else {
            w.truncate().await?;
            v = Verifier::new(desc)?;
        }
    }
    if v.seen() == 0 {
        emit(opts, desc, kind, ProgressState::Downloading, 0);
    }
    let mut failures = 0u32;
    'fetch: while v.seen() < desc.size() {
        let opened = tokio::select! {
            r = resolver.fetch(reference, desc, v.seen()) => r,
            _ = opts.cancel.cancelled() => {
                w.close().await?;
                return Err(Error::new(ErrorKind::Canceled, &what));
            }
        };
        let mut bs = match opened {
            Ok(bs) => bs,
            Err(e) if e.is(ErrorKind::Unavailable) && failures < opts.download_retries => {
                failures += 1;
                continue;
            }
            Err(e) => {
                emit(
                    opts,
                    desc,
                    kind,
                    ProgressState::Failed(e.to_string()),
                    v.seen(),
                );
                w.close().await?;
                return Err(e);
            }
        };
        if bs.offset != v.seen() {
            // The server ignored the range: start over.
            w.truncate().await?;
            v = Verifier::new(desc)?;
        }
        loop {
            let next = tokio::select! {
                n = bs.stream.next() => n,
                _ = opts.cancel.cancelled() => {
                    w.close().await?;
                    return Err(Error::new(ErrorKind::Canceled, &what));
                }
            };
            match next {
                None => break 'fetch,
                Some(Ok(chunk)) => {
                    if let Err(e) = v.update(&chunk) {
                        let e = e.context(&what);
                        emit(
                            opts,
                            desc,
                            kind,
                            ProgressState::Failed(e.to_string()),
                            v.seen(),
                        );
                        w.abort().await?;
                        return Err(e);
                    }
                    w.write(chunk).await?;
                    emit(opts, desc, kind, ProgressState::Downloading, v.seen());
                }
                Some(Err(e)) => {
                    if failures < opts.download_retries {
                        failures += 1;
                        tracing::info!(blob = %what, offset = v.seen(), error = %e, "download interrupted; resuming");
                        emit(opts, desc, kind, ProgressState::Resuming, v.seen());
                        continue 'fetch;
                    }
                    emit(
                        opts,
                        desc,
                        kind,
                        ProgressState::Failed(e.to_string()),
                        v.seen(),
                    );
                    w.close().await?;
                    return Err(e);
                }
            }
        }
    }
    let seen = v.seen();
    let digest_checked = v.checks_digest();
    if let Err(e) = v.finish() {
        let e = e.context(&what);
        emit(opts, desc, kind, ProgressState::Failed(e.to_string()), seen);
        w.abort().await?;
        return Err(e);
    }
    if let Err(e) = w.commit(desc).await {
        emit(opts, desc, kind, ProgressState::Failed(e.to_string()), seen);
        if !digest_checked {
            // The sink's own check failed on a resumed write: drop it so the next pull
            // starts over instead of resuming bad bytes again.
            if let Ok(Some(w)) = sink.open(desc).await {
                let _ = w.abort().await;
            }
        }
        return Err(e.context(&what));
    }
    emit(opts, desc, kind, ProgressState::Done, seen);
    Ok(())
}

/// A [`BlobSink`] over a directory: committed blobs in `blobs/<alg>/<hex>` (the OCI
/// layout's place for them), partial ones in `ingest/<alg>-<hex>`, made visible by an
/// atomic rename after an fsync.
#[derive(Debug, Clone)]
pub struct DirSink {
    root: PathBuf,
}

impl DirSink {
    pub fn new(root: impl Into<PathBuf>) -> DirSink {
        DirSink { root: root.into() }
    }

    pub fn blob_path(&self, desc: &Descriptor) -> Result<PathBuf> {
        let d = descriptor_digest(desc)?;
        Ok(self.root.join("blobs").join(d.algorithm()).join(d.hex()))
    }

    pub fn ingest_path(&self, desc: &Descriptor) -> Result<PathBuf> {
        let d = descriptor_digest(desc)?;
        Ok(self
            .root
            .join("ingest")
            .join(format!("{}-{}", d.algorithm(), d.hex())))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

struct DirWriter {
    file: tokio::fs::File,
    ingest: PathBuf,
    target: PathBuf,
    offset: u64,
}

#[async_trait::async_trait]
impl BlobSink for DirSink {
    async fn open(&self, desc: &Descriptor) -> Result<Option<Box<dyn BlobWriter>>> {
        let target = self.blob_path(desc)?;
        if tokio::fs::metadata(&target).await.is_ok() {
            return Ok(None);
        }
        let ingest = self.ingest_path(desc)?;
        tokio::fs::create_dir_all(ingest.parent().expect("ingest dir")).await?;
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&ingest)
            .await?;
        let offset = file.metadata().await?.len();
        Ok(Some(Box::new(DirWriter {
            file,
            ingest,
            target,
            offset,
        })))
    }
}

#[async_trait::async_trait]
impl BlobWriter for DirWriter {
    fn offset(&self) -> u64 {
        self.offset
    }
    async fn read_written(&mut self) -> Result<Option<Box<dyn AsyncRead + Send + Unpin>>> {
        let f = tokio::fs::File::open(&self.ingest).await?;
        Ok(Some(Box::new(f.take(self.offset))))
    }
    async fn truncate(&mut self) -> Result<()> {
        self.file.set_len(0).await?;
        self.file.seek(std::io::SeekFrom::Start(0)).await?;
        self.offset = 0;
        Ok(())
    }
    async fn write(&mut self, data: Bytes) -> Result<()> {
        self.file.write_all(&data).await?;
        self.offset += data.len() as u64;
        Ok(())
    }
    async fn commit(mut self: Box<Self>, _desc: &Descriptor) -> Result<()> {
        self.file.flush().await?;
        self.file.sync_all().await?;
        tokio::fs::create_dir_all(self.target.parent().expect("blob dir")).await?;
        tokio::fs::rename(&self.ingest, &self.target).await?;
        Ok(())
    }
    async fn abort(self: Box<Self>) -> Result<()> {
        drop(self.file);
        match tokio::fs::remove_file(&self.ingest).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }
    async fn close(mut self: Box<Self>) -> Result<()> {
        self.file.flush().await?;
        Ok(())
    }
}
