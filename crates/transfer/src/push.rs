//! Image store → registry: the image's blobs are read from the namespaced content store
//! and uploaded children first (config and layers, up to `max_concurrent_uploaded_layers`
//! at a time, each skipped when the registry has it or mounted from the repository its
//! `containerd.io/distribution.source.<host>` label names), then child manifests by
//! digest, then the top manifest or index under the tag, so a visible tag always points
//! at complete content. Progress: `pushing` / `complete` / `already exists` per blob
//! (ref-key names as containerd's pusher), `pushed` for the top.

use crate::progress::{Progress, ref_key};
use crate::{ImageStore, LocalTransfer, Registry, TransferOptions, blocking};
use berth_core::content::{Descriptor, Digest, ReaderAt, Scope};
use berth_core::error::ErrorKind;
use berth_core::{Error, Result};
use berth_remotes::client::PushOutcome;
use berth_remotes::{Reference, manifest};
use futures::StreamExt;
use oci_spec::image::Descriptor as OciDescriptor;
use std::sync::Arc;

fn oci(d: &Descriptor) -> Result<OciDescriptor> {
    let digest = oci_spec::image::Digest::try_from(d.digest.as_str())
        .map_err(|e| Error::invalid_argument(format!("digest {:?}: {e}", d.digest)))?;
    let mut o = OciDescriptor::new(
        oci_spec::image::MediaType::from(d.media_type.as_str()),
        d.size.max(0) as u64,
        digest,
    );
    if !d.annotations.is_empty() {
        o.set_annotations(Some(d.annotations.clone()));
    }
    Ok(o)
}

async fn read_manifest(t: &LocalTransfer, scope: &Scope, d: &OciDescriptor) -> Result<Vec<u8>> {
    if d.size() > manifest::MAX_MANIFEST_SIZE {
        return Err(Error::invalid_argument(format!(
            "{}: larger than a manifest may be",
            d.digest()
        )));
    }
    let (content, scope) = (t.content.clone(), scope.clone());
    let digest = Digest::parse(d.digest().as_ref())?;
    let size = d.size() as usize;
    blocking(move || {
        let r = content.reader_at(&scope, &digest)?;
        let mut buf = vec![0u8; size];
        let mut off = 0;
        while off < size {
            let n = r.read_at(&mut buf[off..], off as i64)?;
            if n == 0 {
                return Err(Error::unknown(format!("{digest}: short read at {off}")));
            }
            off += n;
        }
        Ok(buf)
    })
    .await
}

pub(crate) async fn push(
    t: &LocalTransfer,
    ns: &str,
    src: &ImageStore,
    dst: &Registry,
    opts: &TransferOptions,
) -> Result<()> {
    let send = |p: Progress| {
        if let Some(f) = &opts.progress {
            f(p)
        }
    };
    let (md, n, name) = (t.md.clone(), ns.to_string(), src.name.clone());
    let image = blocking(move || md.get_image(&n, &name)).await?;
    let target = Reference::parse(&dst.reference)
        .map_err(|e| e.context(format!("reference {:?}", dst.reference)))?;
    let resolver = t.resolver(dst);
    let scope = Scope::new(ns);
    let top = oci(&image.target)?;
    let body = read_manifest(t, &scope, &top).await?;
    let mt = top.media_type().to_string();
    let by_digest = Reference {
        tag: None,
        digest: None,
        ..target.clone()
    };
    let what = src.name.as_str();
    let mut manifests: Vec<(OciDescriptor, Vec<u8>)> = vec![];
    if manifest::is_index(&mt) {
        let idx = manifest::parse_index(&body, what)?;
        for m in idx.manifests() {
            let mb = read_manifest(t, &scope, m).await.map_err(|e| {
                e.context(format!(
                    "{what}: manifest {} of the index is not in the content store (pull every platform first)",
                    m.digest()
                ))
            })?;
            manifests.push((m.clone(), mb));
        }
    } else if manifest::is_manifest(&mt) {
        manifests.push((top.clone(), body.clone()));
    } else {
        return Err(Error::invalid_argument(format!(
            "{what}: cannot push a {mt}"
        )));
    }
    let mut blobs: Vec<OciDescriptor> = vec![];
    for (_, mb) in &manifests {
        let m = manifest::parse_manifest(mb, what)?;
        blobs.push(m.config().clone());
        // Foreign layers (with `urls`) stay where they are, as containerd's pusher does.
        blobs.extend(
            m.layers()
                .iter()
                .filter(|l| l.urls().as_ref().is_none_or(|u| u.is_empty()))
                .cloned(),
        );
    }
    blobs.dedup_by(|a, b| a.digest() == b.digest());
    let uploads = futures::stream::iter(blobs.into_iter().map(|d| {
        let (resolver, target, scope, send) = (&resolver, &target, &scope, &send);
        async move {
            let core = crate::core_desc(&d);
            let key = ref_key(&core);
            send(Progress {
                event: "pushing".into(),
                name: key.clone(),
                total: d.size() as i64,
                desc: Some(core.clone()),
                ..Default::default()
            });
            let digest = Digest::parse(d.digest().as_ref())?;
            let (content, sc, dg) = (t.content.clone(), scope.clone(), digest.clone());
            let (info, reader) = blocking(move || {
                let info = content.info(&sc, &dg)?;
                let reader: Arc<dyn ReaderAt> = Arc::from(content.reader_at(&sc, &dg)?);
                Ok((info, reader))
            })
            .await
            .map_err(|e| e.context(format!("blob {digest} of {what}")))?;
            let mount_from = info
                .labels
                .get(&target.distribution_source_label())
                .or_else(|| info.labels.get(&target.legacy_distribution_source_label()))
                .cloned();
            let outcome = resolver
                .push_blob(target, &d, reader, mount_from.as_deref())
                .await?;
            send(Progress {
                event: match outcome {
                    PushOutcome::Exists => "already exists",
                    PushOutcome::Mounted | PushOutcome::Uploaded => "complete",
                }
                .into(),
                name: key,
                progress: d.size() as i64,
                total: d.size() as i64,
                desc: Some(core),
                ..Default::default()
            });
            Ok::<(), Error>(())
        }
    }))
    .buffer_unordered(t.config.max_concurrent_uploaded_layers.max(1));
    futures::pin_mut!(uploads);
    while let Some(r) = uploads.next().await {
        if opts.cancel.is_cancelled() {
            return Err(Error::new(ErrorKind::Canceled, format!("push {target}")));
        }
        r?;
    }
    if manifest::is_index(&mt) {
        for (m, mb) in manifests {
            resolver.push_manifest(&by_digest, &m, mb.into()).await?;
        }
    }
    let tagged = if target.tag.is_some() {
        target.clone()
    } else {
        by_digest
    };
    resolver.push_manifest(&tagged, &top, body.into()).await?;
    send(Progress {
        event: "pushed".into(),
        name: target.to_string(),
        desc: Some(image.target.clone()),
        ..Default::default()
    });
    Ok(())
}
