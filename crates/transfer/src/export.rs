//! Image store → OCI archive stream: containerd 2.x's `exportStream`.
//!
//! The images the source names (its name and plain extra references; prefix references
//! are refused as containerd refuses them) are written as one OCI image layout tar:
//! `oci-layout`, every blob once under `blobs/<alg>/<hex>` (for an index: the manifests
//! of the requested platforms, or all with `all_platforms`; non-distributable layers left
//! out on request), `index.json` listing each image's target with its
//! `io.containerd.image.name` and `org.opencontainers.image.ref.name` annotations, and,
//! unless skipped, Docker's `manifest.json` for the exported single-platform manifests.

use crate::progress::Progress;
use crate::{ExportStream, ImageStore, LocalTransfer, TransferOptions, blocking, core_desc};
use berth_core::content::{Descriptor, Digest, Scope};
use berth_core::{Error, Result};
use berth_metadata::images::Image;
use berth_remotes::{Platform, manifest};
use std::collections::HashSet;
use std::io::Write;

fn read_small(t: &LocalTransfer, scope: &Scope, d: &Descriptor) -> Result<Vec<u8>> {
    if d.size < 0 || d.size as u64 > manifest::MAX_MANIFEST_SIZE {
        return Err(Error::invalid_argument(format!(
            "{}: {} bytes is not a manifest size",
            d.digest, d.size
        )));
    }
    let mut out = Vec::with_capacity(d.size as usize);
    copy_blob(t, scope, d, &mut out)?;
    Ok(out)
}

fn copy_blob(t: &LocalTransfer, scope: &Scope, d: &Descriptor, out: &mut dyn Write) -> Result<()> {
    let digest = Digest::parse(&d.digest)?;
    let r = t
        .content
        .reader_at(scope, &digest)
        .map_err(|e| e.context(format!("blob {} of the image", d.digest)))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0i64;
    while off < d.size {
        let want = buf.len().min((d.size - off) as usize);
        let n = r.read_at(&mut buf[..want], off)?;
        if n == 0 {
            return Err(Error::unknown(format!("{}: short blob", d.digest)));
        }
        out.write_all(&buf[..n])
            .map_err(|e| Error::unavailable(format!("writing the archive: {e}")))?;
        off += n as i64;
    }
    Ok(())
}

/// What goes into the archive for one image.
struct Selected {
    blobs: Vec<Descriptor>,
    /// Single-platform manifests: (config, layers) for Docker's manifest.json.
    manifests: Vec<(Descriptor, Vec<Descriptor>)>,
}

fn select(
    t: &LocalTransfer,
    scope: &Scope,
    target: &Descriptor,
    dst: &ExportStream,
    out: &mut Selected,
) -> Result<()> {
    let body = read_small(t, scope, target)?;
    out.blobs.push(target.clone());
    if manifest::is_index(&target.media_type) {
        let index = manifest::parse_index(&body, &target.digest)?;
        let wanted = if dst.platforms.is_empty() {
            vec![Platform::host()]
        } else {
            dst.platforms.clone()
        };
        let mut any = false;
        for m in index.manifests() {
            let p = manifest::descriptor_platform(m);
            let take = dst.all_platforms
                || p.as_ref()
                    .is_none_or(|p| wanted.iter().any(|w| w.match_rank(p).is_some()));
            if take {
                select(t, scope, &core_desc(m), dst, out)?;
                any = true;
            }
        }
        if !any {
            return Err(Error::not_found(format!(
                "{}: no manifest for the requested platforms",
                target.digest
            )));
        }
    } else if manifest::is_manifest(&target.media_type) {
        let m = manifest::parse_manifest(&body, &target.digest)?;
        let config = core_desc(m.config());
        out.blobs.push(config.clone());
        let mut layers = vec![];
        for l in m.layers() {
            let l = core_desc(l);
            if dst.skip_non_distributable
                && (l.media_type.contains("nondistributable") || l.media_type.contains("foreign"))
            {
                continue;
            }
            out.blobs.push(l.clone());
            layers.push(l);
        }
        out.manifests.push((config, layers));
    } else {
        return Err(Error::invalid_argument(format!(
            "{}: cannot export a {}",
            target.digest, target.media_type
        )));
    }
    Ok(())
}

fn blob_path(d: &Descriptor) -> String {
    format!("blobs/{}", d.digest.replacen(':', "/", 1))
}

fn append(
    tar: &mut tar::Builder<&mut dyn Write>,
    path: &str,
    size: u64,
    data: &mut dyn std::io::Read,
) -> Result<()> {
    let mut h = tar::Header::new_ustar();
    h.set_size(size);
    h.set_mode(0o444);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut h, path, data)
        .map_err(|e| Error::unavailable(format!("writing the archive ({path}): {e}")))
}

/// `org.opencontainers.image.ref.name` of an image name: its tag, as containerd writes.
fn ref_name(name: &str) -> String {
    let without_digest = name.split('@').next().unwrap_or(name);
    match without_digest.rsplit_once(':') {
        Some((_, tag)) if !tag.contains('/') => tag.to_string(),
        _ => name.to_string(),
    }
}

fn write_archive(
    t: &LocalTransfer,
    scope: &Scope,
    images: &[Image],
    dst: &ExportStream,
    w: &mut dyn Write,
) -> Result<()> {
    let mut index_entries = vec![];
    let mut docker = vec![];
    let mut blobs = vec![];
    let mut seen = HashSet::new();
    for image in images {
        let mut sel = Selected {
            blobs: vec![],
            manifests: vec![],
        };
        select(t, scope, &image.target, dst, &mut sel)?;
        for b in sel.blobs {
            if seen.insert(b.digest.clone()) {
                blobs.push(b);
            }
        }
        let mut target = serde_json::json!({
            "mediaType": image.target.media_type,
            "digest": image.target.digest,
            "size": image.target.size,
        });
        let mut annotations = image.target.annotations.clone();
        annotations.insert("io.containerd.image.name".into(), image.name.clone());
        annotations.insert(
            "org.opencontainers.image.ref.name".into(),
            ref_name(&image.name),
        );
        target["annotations"] = serde_json::to_value(&annotations).unwrap_or_default();
        index_entries.push(target);
        if let [(config, layers)] = sel.manifests.as_slice() {
            docker.push(serde_json::json!({
                "Config": blob_path(config),
                "RepoTags": [image.name],
                "Layers": layers.iter().map(blob_path).collect::<Vec<_>>(),
            }));
        }
    }
    let mut tar = tar::Builder::new(w);
    let layout = br#"{"imageLayoutVersion":"1.0.0"}"#;
    append(
        &mut tar,
        "oci-layout",
        layout.len() as u64,
        &mut layout.as_slice(),
    )?;
    for b in &blobs {
        // The blob is streamed into the archive; its size is known from the descriptor.
        let mut pipe = BlobReader::new(t, scope, b)?;
        append(&mut tar, &blob_path(b), b.size.max(0) as u64, &mut pipe)?;
    }
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": index_entries,
    }))
    .map_err(|e| Error::unknown(format!("index.json: {e}")))?;
    append(
        &mut tar,
        "index.json",
        index.len() as u64,
        &mut index.as_slice(),
    )?;
    if !dst.skip_compatibility_manifest && !docker.is_empty() {
        let m = serde_json::to_vec(&docker)
            .map_err(|e| Error::unknown(format!("manifest.json: {e}")))?;
        append(&mut tar, "manifest.json", m.len() as u64, &mut m.as_slice())?;
    }
    let w = tar
        .into_inner()
        .map_err(|e| Error::unavailable(format!("finishing the archive: {e}")))?;
    w.flush()
        .map_err(|e| Error::unavailable(format!("writing the archive: {e}")))
}

/// Sequential reads of a content blob (the tar builder wants `Read`).
struct BlobReader {
    inner: Box<dyn berth_core::content::ReaderAt>,
    offset: i64,
    size: i64,
}

impl BlobReader {
    fn new(t: &LocalTransfer, scope: &Scope, d: &Descriptor) -> Result<BlobReader> {
        let digest = Digest::parse(&d.digest)?;
        Ok(BlobReader {
            inner: t
                .content
                .reader_at(scope, &digest)
                .map_err(|e| e.context(format!("blob {} of the image", d.digest)))?,
            offset: 0,
            size: d.size,
        })
    }
}

impl std::io::Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.offset >= self.size {
            return Ok(0);
        }
        let want = buf.len().min((self.size - self.offset) as usize);
        let n = self
            .inner
            .read_at(&mut buf[..want], self.offset)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        self.offset += n as i64;
        Ok(n)
    }
}

pub(crate) async fn export(
    t: &LocalTransfer,
    ns: &str,
    src: &ImageStore,
    dst: &ExportStream,
    opts: &TransferOptions,
) -> Result<()> {
    let send = |p: Progress| {
        if let Some(f) = &opts.progress {
            f(p)
        }
    };
    send(Progress {
        event: "Exporting".into(),
        ..Default::default()
    });
    let mut names = vec![];
    if !src.name.is_empty() {
        names.push(src.name.clone());
    }
    for r in &src.extra_references {
        if r.is_prefix {
            return Err(Error::not_implemented(
                "prefix lookup on export not implemented",
            ));
        }
        names.push(r.name.clone());
    }
    let (md, n) = (t.md.clone(), ns.to_string());
    let images: Vec<Image> =
        blocking(move || names.iter().map(|name| md.get_image(&n, name)).collect()).await?;
    let mut writer = dst
        .writer
        .lock()
        .unwrap()
        .take()
        .ok_or_else(|| Error::failed_precondition("the export stream was already written"))?;
    let this = LocalTransfer {
        md: t.md.clone(),
        content: t.content.clone(),
        snapshotters: t.snapshotters.clone(),
        applier: t.applier.clone(),
        config: t.config.clone(),
    };
    let (scope, d) = (Scope::new(ns), dst.clone());
    let written = blocking(move || write_archive(&this, &scope, &images, &d, &mut *writer));
    tokio::select! {
        r = written => r?,
        _ = opts.cancel.cancelled() => return Err(Error::new(berth_core::error::ErrorKind::Canceled, "export")),
    }
    send(Progress {
        event: "Completed export".into(),
        ..Default::default()
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ref_names_are_tags() {
        assert_eq!(ref_name("docker.io/library/busybox:latest"), "latest");
        assert_eq!(ref_name("127.0.0.1:5000/a/b:v1"), "v1");
        assert_eq!(ref_name("127.0.0.1:5000/a/b"), "127.0.0.1:5000/a/b");
        assert_eq!(ref_name("a.io/b:1@sha256:00"), "1");
    }
}
