//! Registry → image store: containerd's local transferrer's pull, on Berth's pipeline.
//!
//! Order of work, and why:
//! 1. A lease (24 h expiry, as containerd's `withLease`) holds every blob, ingest and
//!    snapshot this pull creates, so the collector cannot take them before the image
//!    record refers to them; it is deleted at the end whatever happens (a cancelled or
//!    failed pull leaves nothing the collector would keep).
//! 2. [`berth_remotes::pull::pull`] downloads config and layers in parallel into the
//!    namespaced content store ([`ContentStoreSink`]); each layer, once it and its parent
//!    are there, is applied by [`Unpacker`] (on the blocking pool) while later layers
//!    still download.
//! 3. The config gets `containerd.io/gc.ref.snapshot.<snapshotter>` → the top chain ID
//!    (what containerd's unpacker does), then the image record is created or updated:
//!    a visible record implies content and snapshots are complete.

use crate::progress::{Progress, Translator};
use crate::{
    ImageStore, LocalTransfer, Registry, StoredImage, TransferOptions, blocking, core_desc,
    report_saved, under_temporary_lease,
};
use berth_core::content::{Info, Scope};
use berth_core::error::ErrorKind;
use berth_core::labels::Labels;
use berth_core::snapshot::Snapshotter;
use berth_core::{Error, Result};
use berth_diff::unpack::Unpacker;
use berth_metadata::images::Image;
use berth_remotes::pull::{
    BlobKind, ImageInfo, LayerHook, ProgressEvent, ProgressState, PullOptions,
};
use berth_remotes::store_sink::ContentStoreSink;
use berth_remotes::{Platform, Reference};
use oci_spec::image::Descriptor as OciDescriptor;
use std::sync::{Arc, OnceLock};
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

/// The layer hook: builds the [`Unpacker`] from the config on the first layer, then
/// applies each layer in order, reporting `extracting` / `extracted`.
struct UnpackHook {
    snapshotter: Arc<dyn Snapshotter>,
    applier: Arc<dyn berth_core::diff::Applier>,
    scope: Scope,
    unpacker: OnceLock<Unpacker>,
    progress: UnboundedSender<ProgressEvent>,
}

impl UnpackHook {
    fn unpacker(&self, image: &ImageInfo) -> Result<&Unpacker> {
        if let Some(u) = self.unpacker.get() {
            return Ok(u);
        }
        let diffs = diff_ids(&image.config_body)?;
        if diffs.len() != image.layers.len() {
            return Err(Error::invalid_argument(format!(
                "{}: the image config has {} diff IDs for {} layers",
                image.name,
                diffs.len(),
                image.layers.len()
            )));
        }
        let u = Unpacker::new(
            self.snapshotter.clone(),
            self.applier.clone(),
            self.scope.clone(),
            diffs,
            Labels::new(),
        );
        // Layer hooks are called one at a time, so nobody else set it meanwhile.
        Ok(self.unpacker.get_or_init(|| u))
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
        let u = self.unpacker(image)?;
        self.report(index, layer, ProgressState::Unpacking);
        u.layer(index, &core_desc(layer)).await?;
        self.report(index, layer, ProgressState::Unpacked);
        Ok(())
    }
}

/// The unpack the destination asks for on `platform`: (snapshotter name).
pub(crate) fn unpack_for(
    t: &LocalTransfer,
    dst: &ImageStore,
    platform: &Platform,
) -> Option<String> {
    let u = dst.unpacks.iter().find(|u| match &u.platform {
        None => true,
        Some(p) => p.match_rank(platform).is_some() || platform.match_rank(p).is_some(),
    })?;
    Some(if u.snapshotter.is_empty() {
        t.config.snapshotter.clone()
    } else {
        u.snapshotter.clone()
    })
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
    if dst.name.is_empty() {
        // containerd finds this out after downloading; nothing would keep the content.
        return Err(Error::not_found("no image name found"));
    }
    let platform = dst
        .platforms
        .first()
        .cloned()
        .unwrap_or_else(Platform::host);
    let resolver = t.resolver(src, &reference);

    let stored = under_temporary_lease(t, ns, "pull", |lease_id| async move {
        pull_leased(
            t, ns, src, dst, opts, &reference, &resolver, &platform, &lease_id,
        )
        .await
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
    platform: &Platform,
    lease_id: &str,
) -> Result<Vec<StoredImage>> {
    let scope = Scope::new(ns).with_lease(Some(lease_id.to_string()));
    let mut sink = ContentStoreSink::new(t.content.clone(), scope.clone());
    sink.extra_labels.insert(
        format!("containerd.io/distribution.source.{}", reference.host),
        reference.repository.clone(),
    );

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<ProgressEvent>();
    let forward = opts.progress.clone().map(|f| {
        let root = src.reference.clone();
        let source = format!("OCI Registry ({})", src.reference);
        tokio::spawn(async move {
            let mut tr = Translator::new(f.clone(), &root);
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

    let snapshotter = match unpack_for(t, dst, platform) {
        None => None,
        Some(name) => match t.snapshotters.get(&name) {
            Ok(db) => Some((
                name,
                Arc::new(db.namespaced(ns, Some(lease_id.to_string()))) as Arc<dyn Snapshotter>,
            )),
            Err(e) => {
                // containerd skips an unpack configuration it does not support.
                tracing::warn!(snapshotter = %name, error = %e, "unpack configuration not supported, skipping");
                None
            }
        },
    };
    let hook = snapshotter.as_ref().map(|(_, s)| {
        Arc::new(UnpackHook {
            snapshotter: s.clone(),
            applier: t.applier.clone(),
            scope: scope.clone(),
            unpacker: OnceLock::new(),
            progress: tx.clone(),
        })
    });
    let popts = PullOptions {
        platform: platform.clone(),
        max_concurrent_downloads: t.config.max_concurrent_downloads.max(1),
        progress: Some(tx),
        cancel: opts.cancel.child_token(),
        layer_hook: hook.clone().map(|h| h as Arc<dyn LayerHook>),
        ..Default::default()
    };
    let pulled = berth_remotes::pull::pull(resolver, reference, &sink, &popts).await;
    drop(popts);
    let top = hook
        .as_ref()
        .and_then(|h| h.unpacker.get())
        .and_then(|u| u.top().map(str::to_string));
    // The hook holds the last progress sender: without it the forwarder drains and ends.
    drop(hook);
    if let Some(f) = forward {
        let _ = f.await;
    }
    let image = pulled?;
    if opts.cancel.is_cancelled() {
        return Err(Error::new(ErrorKind::Canceled, format!("pull {reference}")));
    }

    if let (Some((name, _)), Some(top)) = (&snapshotter, top) {
        let key = format!("containerd.io/gc.ref.snapshot.{name}");
        let digest = berth_core::content::Digest::parse(image.config.digest().as_ref())?;
        let (content, scope, k) = (t.content.clone(), scope.clone(), key.clone());
        blocking(move || {
            let mut labels = Labels::new();
            labels.insert(k.clone(), top);
            let info = Info {
                digest,
                size: 0,
                created_at: SystemTime::UNIX_EPOCH,
                updated_at: SystemTime::UNIX_EPOCH,
                labels,
            };
            content.update(&scope, info, &[format!("labels.{k}")])
        })
        .await
        .map_err(|e| e.context("labelling the image config with its snapshots"))?;
    }

    let now = SystemTime::now();
    let record = Image {
        name: dst.name.clone(),
        labels: dst.labels.clone(),
        target: core_desc(&image.target),
        created_at: now,
        updated_at: now,
    };
    let (md, n) = (t.md.clone(), ns.to_string());
    let stored = blocking(move || match md.create_image(&n, &record) {
        Ok(image) => Ok(StoredImage {
            image,
            created: true,
        }),
        // containerd's image store: an existing name is updated (target and labels).
        Err(e) if e.is(ErrorKind::AlreadyExists) => {
            md.update_image(&n, &record, &[]).map(|image| StoredImage {
                image,
                created: false,
            })
        }
        Err(e) => Err(e),
    })
    .await?;
    Ok(vec![stored])
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
