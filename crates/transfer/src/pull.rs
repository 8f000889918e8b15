//! Registry → image store: containerd's local transferrer's pull, on Berth's pipeline.
//!
//! Order of work, and why:
//! 1. A lease (24 h expiry, as containerd's `withLease`) holds every blob, ingest and
//!    snapshot this pull creates, so the collector cannot take them before the image
//!    record refers to them; it is deleted at the end whatever happens (a cancelled or
//!    failed pull leaves nothing the collector would keep).
//! 2. [`berth_remotes::pull::pull_filtered`] walks the image as containerd's image store
//!    filter does (`platforms`: the manifests taken whole, every platform when empty;
//!    `all_metadata`: the others' manifests and configs too; `manifest_limit`: at most
//!    that many per index, preferred platforms first) and downloads configs and layers
//!    in parallel into the namespaced content store ([`ContentStoreSink`]). Each image
//!    whose config platform matches a supported unpack the destination asked for
//!    ([`crate::unpack`]) has each layer applied by [`Unpacker`] as soon as it and its
//!    parent are there, while later layers still download.
//! 3. Each unpacked image's config gets `containerd.io/gc.ref.snapshot.<snapshotter>` →
//!    its top chain ID (what containerd's unpacker does), then the image records are
//!    created or updated ([`crate::names`]): a visible record implies content and
//!    snapshots are complete.

use crate::progress::{Parents, Progress, Translator, ref_key};
use crate::unpack::{self, UnpackTarget};
use crate::{
    ImageStore, LocalTransfer, Registry, StoredImage, TransferOptions, blocking, core_desc,
    report_saved, under_temporary_lease,
};
use berth_core::content::{ContentStore, Info, Scope};
use berth_core::error::ErrorKind;
use berth_core::labels::Labels;
use berth_core::snapshot::Snapshotter;
use berth_core::{Error, Result};
use berth_diff::unpack::Unpacker;
use berth_remotes::manifest::ManifestFilter;
use berth_remotes::pull::{
    BlobKind, ChildrenFn, ImageInfo, LayerHook, ProgressEvent, ProgressState, PullOptions,
};
use berth_remotes::store_sink::ContentStoreSink;
use berth_remotes::{Platform, Reference};
use oci_spec::image::Descriptor as OciDescriptor;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;
use tokio::sync::mpsc::UnboundedSender;

/// The image configuration's `rootfs.diff_ids`.
pub(crate) fn diff_ids(config: &[u8]) -> Result<Vec<String>> {
    let v: serde_json::Value = serde_json::from_slice(config)
        .map_err(|e| Error::invalid_argument(format!("image config: {e}")))?;
    Ok(v.pointer("/rootfs/diff_ids")
        .and_then(|d| d.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

/// One image's unpack: its unpacker and snapshotter name (`None`: not unpacked).
type ImageUnpack = Option<(Arc<Unpacker>, String)>;

/// The layer hook: decides on an image's first layer whether (and into which
/// snapshotter) it is unpacked, then applies its layers in order, reporting
/// `extracting` / `extracted`.
struct UnpackHook {
    targets: Vec<UnpackTarget>,
    snapshotters: HashMap<String, Arc<dyn Snapshotter>>,
    applier: Arc<dyn berth_core::diff::Applier>,
    /// Where applied layers get their `containerd.io/uncompressed` label.
    content: Arc<dyn ContentStore>,
    scope: Scope,
    /// By manifest digest.
    unpacks: Mutex<HashMap<String, ImageUnpack>>,
    progress: UnboundedSender<ProgressEvent>,
}

impl UnpackHook {
    fn unpack_of(&self, image: &ImageInfo) -> Result<ImageUnpack> {
        let key = image.manifest.digest().to_string();
        if let Some(u) = self.unpacks.lock().unwrap().get(&key) {
            return Ok(u.clone());
        }
        let types: Vec<&str> = image
            .layers
            .iter()
            .map(|l| l.media_type().as_ref())
            .collect();
        let chosen = match unpack::target_for(&self.targets, &image.config_body, &types)? {
            None => None,
            Some(target) => {
                let diffs = diff_ids(&image.config_body)?;
                if diffs.len() != image.layers.len() {
                    return Err(Error::invalid_argument(format!(
                        "{}: the image config has {} diff IDs for {} layers",
                        image.manifest.digest(),
                        diffs.len(),
                        image.layers.len()
                    )));
                }
                let sn = self.snapshotters[&target.snapshotter].clone();
                let u = Unpacker::new(
                    sn,
                    self.applier.clone(),
                    self.scope.clone(),
                    diffs,
                    Labels::new(),
                );
                Some((Arc::new(u), target.snapshotter.clone()))
            }
        };
        // Layer hooks of one image are called one at a time: nobody set it meanwhile.
        self.unpacks.lock().unwrap().insert(key, chosen.clone());
        Ok(chosen)
    }

    fn report(&self, index: usize, layer: &OciDescriptor, state: ProgressState) {
        let _ = self.progress.send(ProgressEvent {
            digest: layer.digest().to_string(),
            media_type: layer.media_type().to_string(),
            kind: BlobKind::Layer(index),
            state,
            offset: layer.size(),
            total: layer.size(),
        });
    }
}

#[async_trait::async_trait]
impl LayerHook for UnpackHook {
    async fn layer_ready(
        &self,
        index: usize,
        layer: &OciDescriptor,
        image: &ImageInfo,
    ) -> Result<()> {
        let Some((u, _)) = self.unpack_of(image)? else {
            return Ok(());
        };
        self.report(index, layer, ProgressState::Unpacking);
        unpack::apply_layer(&u, index, &core_desc(layer), &self.content, &self.scope).await?;
        self.report(index, layer, ProgressState::Unpacked);
        Ok(())
    }
}

/// containerd's image store filter of a destination.
pub(crate) fn filter_of(dst: &ImageStore) -> ManifestFilter {
    ManifestFilter {
        platforms: dst.platforms.clone(),
        all_metadata: dst.all_metadata,
        manifest_limit: dst.manifest_limit,
    }
}

pub(crate) async fn pull(
    t: &LocalTransfer,
    ns: &str,
    src: &Registry,
    dst: &ImageStore,
    opts: &TransferOptions,
) -> Result<Vec<StoredImage>> {
    let send = |p: Progress| {
        if let Some(f) = &opts.progress {
            f(p)
        }
    };
    let source = format!("OCI Registry ({})", src.reference);
    send(Progress {
        event: format!("Resolving from {source}"),
        ..Default::default()
    });
    let reference = Reference::parse(&src.reference)
        .map_err(|e| e.context(format!("reference {:?}", src.reference)))?;
    if !crate::names::names_target(dst) {
        // containerd finds this out after downloading; nothing would keep the content.
        return Err(Error::not_found("no image name found"));
    }
    let resolver = t.resolver(src);

    let stored = under_temporary_lease(t, ns, "pull", |lease_id| async move {
        pull_leased(t, ns, src, dst, opts, &reference, &resolver, &lease_id).await
    })
    .await?;
    report_saved(send, &stored);
    send(Progress {
        event: format!("Completed pull from {source}"),
        ..Default::default()
    });
    Ok(stored)
}

#[allow(clippy::too_many_arguments)]
async fn pull_leased(
    t: &LocalTransfer,
    ns: &str,
    src: &Registry,
    dst: &ImageStore,
    opts: &TransferOptions,
    reference: &Reference,
    resolver: &berth_remotes::Resolver,
    lease_id: &str,
) -> Result<Vec<StoredImage>> {
    let scope = Scope::new(ns).with_lease(Some(lease_id.to_string()));
    let mut sink = ContentStoreSink::new(t.content.clone(), scope.clone());
    sink.extra_labels.insert(
        reference.distribution_source_label(),
        reference.repository.clone(),
    );

    // Each blob's parent, learnt from the pipeline before the blob's first event.
    let parents: Parents = Arc::new(Mutex::new(HashMap::new()));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<ProgressEvent>();
    let forward = opts.progress.clone().map(|f| {
        let root = src.reference.clone();
        let source = format!("OCI Registry ({})", src.reference);
        let parents = parents.clone();
        tokio::spawn(async move {
            let mut tr = Translator::new(f.clone(), &root).with_parents(parents);
            let mut started = false;
            while let Some(ev) = rx.recv().await {
                if !started && matches!(ev.kind, BlobKind::Index | BlobKind::Manifest) {
                    // The first announced manifest (or index) is what the name resolved to.
                    started = true;
                    f(Progress {
                        event: format!("Pulling from {source}"),
                        ..Default::default()
                    });
                    f(Progress {
                        event: "fetching image content".into(),
                        name: root.clone(),
                        desc: Some(berth_core::content::Descriptor {
                            media_type: ev.media_type.clone(),
                            digest: ev.digest.clone(),
                            size: ev.total as i64,
                            annotations: Default::default(),
                        }),
                        ..Default::default()
                    });
                }
                tr.event(&ev);
            }
        })
    });

    let targets = unpack::targets(t, dst);
    let hook = if targets.is_empty() {
        None
    } else {
        let mut snapshotters = HashMap::new();
        for target in &targets {
            if !snapshotters.contains_key(&target.snapshotter) {
                let sn = unpack::snapshotter(t, ns, &target.snapshotter, lease_id)?;
                snapshotters.insert(target.snapshotter.clone(), sn);
            }
        }
        Some(Arc::new(UnpackHook {
            targets,
            snapshotters,
            applier: t.applier.clone(),
            content: t.content.clone(),
            scope: scope.clone(),
            unpacks: Mutex::new(HashMap::new()),
            progress: tx.clone(),
        }))
    };
    let on_children: ChildrenFn = {
        let parents = parents.clone();
        Arc::new(move |parent: &OciDescriptor, children: &[OciDescriptor]| {
            let key = ref_key(&core_desc(parent));
            let mut p = parents.lock().unwrap();
            for c in children {
                p.entry(c.digest().to_string())
                    .or_insert_with(|| key.clone());
            }
        })
    };
    let filter = filter_of(dst);
    let popts = PullOptions {
        platform: dst
            .platforms
            .first()
            .cloned()
            .unwrap_or_else(Platform::host),
        max_concurrent_downloads: t.config.max_concurrent_downloads.max(1),
        progress: Some(tx),
        cancel: opts.cancel.child_token(),
        layer_hook: hook.clone().map(|h| h as Arc<dyn LayerHook>),
        on_children: Some(on_children),
        ..Default::default()
    };
    let pulled =
        berth_remotes::pull::pull_filtered(resolver, reference, &sink, &popts, &filter).await;
    drop(popts);
    let unpacked: Vec<(String, String, String)> = match (&hook, &pulled) {
        (Some(h), Ok(p)) => {
            let unpacks = h.unpacks.lock().unwrap();
            p.images
                .iter()
                .filter_map(|i| {
                    let (u, sn) = unpacks.get(&i.manifest.digest().to_string())?.as_ref()?;
                    let top = u.top()?.to_string();
                    Some((i.config.digest().to_string(), sn.clone(), top))
                })
                .collect()
        }
        _ => vec![],
    };
    // The hook holds the last progress sender: without it the forwarder drains and ends.
    drop(hook);
    if let Some(f) = forward {
        let _ = f.await;
    }
    let pulled = pulled?;
    if opts.cancel.is_cancelled() {
        return Err(Error::new(ErrorKind::Canceled, format!("pull {reference}")));
    }
    if pulled.images.is_empty() && !filter.platforms.is_empty() {
        // containerd would store an image none of whose content is there for these
        // platforms; Berth says so instead.
        let wanted: Vec<String> = filter.platforms.iter().map(|p| p.to_string()).collect();
        return Err(Error::not_found(format!(
            "{reference}: no manifest for platform {} in the image",
            wanted.join(", ")
        )));
    }

    for (config, sn, top) in unpacked {
        let digest = berth_core::content::Digest::parse(&config)?;
        let (content, scope) = (t.content.clone(), scope.clone());
        blocking(move || {
            let (key, labels) = unpack::snapshot_label(&sn, &top);
            let info = Info {
                digest,
                size: 0,
                created_at: SystemTime::UNIX_EPOCH,
                updated_at: SystemTime::UNIX_EPOCH,
                labels,
            };
            content.update(&scope, info, &[format!("labels.{key}")])
        })
        .await
        .map_err(|e| e.context("labelling the image config with its snapshots"))?;
    }

    let target = core_desc(&pulled.target);
    let stored = crate::names::store(t, ns, dst, &target, false).await?;
    Ok(stored)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_ids_come_from_rootfs() {
        let c = br#"{"rootfs":{"type":"layers","diff_ids":["sha256:a","sha256:b"]}}"#;
        assert_eq!(diff_ids(c).unwrap(), ["sha256:a", "sha256:b"]);
        assert!(diff_ids(b"{}").unwrap().is_empty());
        assert!(diff_ids(b"not json").is_err());
    }
}
