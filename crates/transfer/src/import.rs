//! Archive stream → image store: containerd 2.x's `importStream`.
//!
//! Under a lease, the archive (gzip/zstd-compressed when the stream's media type is
//! empty and the bytes say so) is read once, in order, into the content store
//! ([`crate::archive`]: an OCI image layout, or a Docker `docker save` archive turned
//! into manifests and an index). Then the index is walked as containerd's image store
//! filter walks it (`platforms`, `all_metadata`, `manifest_limit`): each index and
//! manifest walked gets containerd's `gc.ref.content.*` labels, so what the walk skips
//! is collected once the lease is gone. The manifests taken whole whose config platform
//! matches a supported unpack the destination asked for are unpacked (chain IDs as a
//! pull's), then the records are written as containerd's image store names them
//! ([`crate::names`]): the index by the store's name and plain references, each
//! manifest listed in the index by its annotations through the prefix references.

use crate::archive::{self, ReadArchive};
use crate::progress::Progress;
use crate::pull::{diff_ids, filter_of};
use crate::{
    ImageStore, ImportStream, LocalTransfer, StoredImage, TransferOptions, blocking, core_desc,
    report_saved, under_temporary_lease, unpack,
};
use berth_core::content::{Descriptor, Digest, Info, Scope};
use berth_core::error::ErrorKind;
use berth_core::labels::Labels;
use berth_core::{Error, Result};
use berth_diff::unpack::Unpacker;
use berth_remotes::manifest::{self, ManifestFilter};
use std::collections::HashSet;
use std::io::Read;
use std::sync::Arc;
use std::time::SystemTime;

/// Largest image configuration read.
const MAX_CONFIG: u64 = 16 << 20;

fn read_small(t: &LocalTransfer, scope: &Scope, d: &Descriptor) -> Result<Vec<u8>> {
    let what = if manifest::is_index(&d.media_type) {
        "index"
    } else {
        "manifest"
    };
    if d.size < 0 || d.size as u64 > manifest::MAX_MANIFEST_SIZE {
        return Err(Error::invalid_argument(format!(
            "{what} {} of {} bytes is larger than the {} allowed",
            d.digest,
            d.size,
            manifest::MAX_MANIFEST_SIZE
        )));
    }
    let digest = Digest::parse(&d.digest)?;
    // The stored blob's size is checked too: the descriptor's may lie. Only a missing
    // blob is "not in the archive" (an oversized one is said to be so).
    let body =
        archive::read_blob(t, scope, &digest, what, manifest::MAX_MANIFEST_SIZE).map_err(|e| {
            if e.is(ErrorKind::NotFound) {
                e.context(format!("{} is referenced but not in the archive", d.digest))
            } else {
                e
            }
        })?;
    if body.len() as i64 != d.size {
        return Err(Error::invalid_argument(format!(
            "{}: {} bytes, the index says {}",
            d.digest,
            body.len(),
            d.size
        )));
    }
    Ok(body)
}

/// Sets containerd's `gc.ref.content.*` labels of a manifest or index.
fn label(t: &LocalTransfer, scope: &Scope, d: &Descriptor, body: &[u8]) -> Result<()> {
    let labels: Labels = manifest::gc_labels(&d.media_type, body)
        .into_iter()
        .collect();
    if labels.is_empty() {
        return Ok(());
    }
    let paths: Vec<String> = labels.keys().map(|k| format!("labels.{k}")).collect();
    let info = Info {
        digest: Digest::parse(&d.digest)?,
        size: 0,
        created_at: SystemTime::UNIX_EPOCH,
        updated_at: SystemTime::UNIX_EPOCH,
        labels,
    };
    t.content.update(scope, info, &paths)?;
    Ok(())
}

/// An image manifest the walk took whole.
struct Whole {
    desc: Descriptor,
    body: Vec<u8>,
}

/// Deepest nesting of indexes an import follows (the archive's index is depth 0).
/// containerd's `images.Walk` has no bound; digests make cycles impossible, but a chain
/// of distinct indexes is as long as the archive makes it.
pub(crate) const MAX_INDEX_DEPTH: usize = 8;

/// containerd's walk of the imported index through the image store's filter: labels
/// what it visits, collects the manifests taken whole.
///
/// Each (blob, taken whole or not) is walked once: containerd's `images.Walk` follows
/// every listing, so an index naming the same manifest thousands of times, or a few
/// levels of indexes each naming the next many times, costs reads (and here, manifest
/// bodies kept for the unpack) exponential in the archive's size — the
/// CVE-2023-25153 class of an import made to use memory no limit on a single blob
/// bounds. Walked once each, the work is bounded by the blobs the archive holds.
#[allow(clippy::too_many_arguments)]
fn walk(
    t: &LocalTransfer,
    scope: &Scope,
    filter: &ManifestFilter,
    d: &Descriptor,
    whole: bool,
    depth: usize,
    seen: &mut HashSet<(String, bool)>,
    out: &mut Vec<Whole>,
) -> Result<()> {
    if depth > MAX_INDEX_DEPTH {
        return Err(Error::invalid_argument(format!(
            "indexes nested more than {MAX_INDEX_DEPTH} deep ({})",
            d.digest
        )));
    }
    if !seen.insert((d.digest.clone(), whole)) {
        return Ok(());
    }
    if manifest::is_index(&d.media_type) {
        let body = read_small(t, scope, d)?;
        label(t, scope, d, &body)?;
        let index = manifest::parse_index(&body, &d.digest)?;
        for (m, whole) in filter.select(index.manifests(), &d.digest)? {
            walk(
                t,
                scope,
                filter,
                &core_desc(&m),
                whole,
                depth + 1,
                seen,
                out,
            )?;
        }
    } else if manifest::is_manifest(&d.media_type) {
        let body = read_small(t, scope, d)?;
        label(t, scope, d, &body)?;
        if whole {
            out.push(Whole {
                desc: d.clone(),
                body,
            });
        }
    }
    Ok(())
}

pub(crate) async fn import(
    t: &LocalTransfer,
    ns: &str,
    src: &ImportStream,
    dst: &ImageStore,
    opts: &TransferOptions,
) -> Result<Vec<StoredImage>> {
    let send = |p: Progress| {
        if let Some(f) = &opts.progress {
            f(p)
        }
    };
    send(Progress {
        event: "Importing".into(),
        ..Default::default()
    });
    let reader = src
        .reader
        .lock()
        .unwrap()
        .take()
        .ok_or_else(|| Error::failed_precondition("the import stream was already read"))?;
    let stored = under_temporary_lease(t, ns, "import", |lease_id| async move {
        tokio::select! {
            r = import_leased(t, ns, reader, src, dst, opts, &lease_id) => r,
            _ = opts.cancel.cancelled() => Err(Error::new(ErrorKind::Canceled, "import")),
        }
    })
    .await?;
    for s in &stored {
        report_saved(send, std::slice::from_ref(s));
    }
    send(Progress {
        event: "Completed import".into(),
        ..Default::default()
    });
    Ok(stored)
}

async fn import_leased(
    t: &LocalTransfer,
    ns: &str,
    reader: Box<dyn Read + Send>,
    src: &ImportStream,
    dst: &ImageStore,
    opts: &TransferOptions,
    lease_id: &str,
) -> Result<Vec<StoredImage>> {
    let scope = Scope::new(ns).with_lease(Some(lease_id.to_string()));
    let this = Arc::new(LocalTransfer {
        md: t.md.clone(),
        content: t.content.clone(),
        snapshotters: t.snapshotters.clone(),
        applier: t.applier.clone(),
        config: t.config.clone(),
    });
    let (th, sc, mt, force) = (
        this.clone(),
        scope.clone(),
        src.media_type.clone(),
        src.force_compress,
    );
    let filter = filter_of(dst);
    let f = filter.clone();
    let (read, wholes) = blocking(move || {
        let read = archive::read(&th, &sc, reader, &mt, force)?;
        let mut wholes = vec![];
        walk(
            &th,
            &sc,
            &f,
            &read.index,
            true,
            0,
            &mut HashSet::new(),
            &mut wholes,
        )?;
        Ok((read, wholes))
    })
    .await?;
    let ReadArchive { index, index_body } = read;

    // Unpack the manifests taken whole that a supported unpack matches.
    let targets = unpack::targets(t, dst);
    for w in wholes.iter().filter(|_| !targets.is_empty()) {
        let m = manifest::parse_manifest(&w.body, &w.desc.digest)?;
        let config = core_desc(m.config());
        let config_body = {
            let (th, sc, c) = (this.clone(), scope.clone(), Digest::parse(&config.digest)?);
            blocking(move || archive::read_blob(&th, &sc, &c, "image config", MAX_CONFIG)).await?
        };
        let types: Vec<&str> = m.layers().iter().map(|l| l.media_type().as_ref()).collect();
        let Some(target) = unpack::target_for(&targets, &config_body, &types)? else {
            continue;
        };
        let sn = unpack::snapshotter(t, ns, &target.snapshotter, lease_id)?;
        let diffs = diff_ids(&config_body)?;
        if diffs.len() != m.layers().len() {
            return Err(Error::invalid_argument(format!(
                "{}: the image config has {} diff IDs for {} layers",
                w.desc.digest,
                diffs.len(),
                m.layers().len()
            )));
        }
        let u = Unpacker::new(sn, t.applier.clone(), scope.clone(), diffs, Labels::new());
        for (i, layer) in m.layers().iter().enumerate() {
            let l = core_desc(layer);
            let report = |event: &str| {
                if let Some(f) = &opts.progress {
                    f(Progress {
                        event: event.into(),
                        name: crate::ref_key(&l),
                        parents: vec![crate::ref_key(&w.desc)],
                        progress: l.size,
                        total: l.size,
                        desc: Some(l.clone()),
                    })
                }
            };
            report("extracting");
            crate::unpack::apply_layer(&u, i, &l, &t.content, &scope).await?;
            report("extracted");
        }
        if let Some(top) = u.top() {
            let (key, labels) = unpack::snapshot_label(&target.snapshotter, top);
            let info = Info {
                digest: Digest::parse(&config.digest)?,
                size: 0,
                created_at: SystemTime::UNIX_EPOCH,
                updated_at: SystemTime::UNIX_EPOCH,
                labels,
            };
            let (content, sc) = (t.content.clone(), scope.clone());
            blocking(move || content.update(&sc, info, &[format!("labels.{key}")])).await?;
        }
    }

    // The index under the store's names, then every manifest it lists under the names
    // its annotations give (whatever the platform filter took).
    let mut stored = vec![];
    let listed = manifest::parse_index(&index_body, "index.json")?;
    let descs = std::iter::once((index, false))
        .chain(listed.manifests().iter().map(|m| (core_desc(m), true)));
    for (desc, from_annotation) in descs {
        match crate::names::store(t, ns, dst, &desc, from_annotation).await {
            Ok(s) => stored.extend(s),
            Err(e) if e.is(ErrorKind::NotFound) => {
                tracing::info!(digest = %desc.digest, "no image name for it");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(stored)
}
