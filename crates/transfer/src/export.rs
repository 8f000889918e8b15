//! Image store → OCI archive stream: containerd 2.x's `exportStream` (its
//! `archive.Export`).
//!
//! The images the source names (its name and plain extra references; prefix references
//! are refused as containerd refuses them) are written as one OCI image layout tar,
//! entries sorted by name as containerd writes them: `blobs/`, every blob once under
//! `blobs/<alg>/<hex>` (digest checked while copying), `index.json`, `manifest.json`,
//! `oci-layout`.
//! - A manifest image: the manifest, its config and layers.
//! - An index image: the index and the manifests (with their trees) of the requested
//!   platforms (`platforms`; none: this machine's), or every manifest with
//!   `all_platforms`. None matching the platforms is `NotFound`, with `all_platforms`
//!   too, as in containerd.
//! - `index.json` lists each image's target with `io.containerd.image.name` (its name),
//!   `org.opencontainers.image.ref.name` (the part after the repository) and the
//!   `containerd.io/distribution.source.*` labels of the target as annotations.
//! - `manifest.json` (unless `skip_compatibility_manifest`): Docker's
//!   `[{Config, RepoTags, Layers}]` for each manifest image, and for each index image
//!   its manifest that best matches the platforms, names familiarized
//!   (`docker.io/library/busybox:1` → `busybox:1`).
//! - `skip_non_distributable` leaves out non-distributable (foreign) layers.

use crate::archive;
use crate::names::{ANNOTATION_IMAGE_NAME, ANNOTATION_REF_NAME};
use crate::progress::Progress;
use crate::{ExportStream, ImageStore, LocalTransfer, TransferOptions, blocking, core_desc};
use berth_core::content::{Descriptor, Digest, Scope};
use berth_core::{Error, Result};
use berth_metadata::images::Image;
use berth_remotes::{Platform, manifest};
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

/// Every blob under `d` (itself first, then its children depth-first), containerd's
/// `getRecords` walk.
fn tree(
    t: &LocalTransfer,
    scope: &Scope,
    d: &Descriptor,
    depth: usize,
    out: &mut Vec<Descriptor>,
) -> Result<()> {
    if depth > 8 {
        return Err(Error::invalid_argument("indexes nested too deeply"));
    }
    Digest::parse(&d.digest)?;
    out.push(d.clone());
    if manifest::is_index(&d.media_type) {
        let body = read_small(t, scope, d)?;
        for m in manifest::parse_index(&body, &d.digest)?.manifests() {
            tree(t, scope, &core_desc(m), depth + 1, out)?;
        }
    } else if manifest::is_manifest(&d.media_type) {
        let body = read_small(t, scope, d)?;
        let m = manifest::parse_manifest(&body, &d.digest)?;
        out.push(core_desc(m.config()));
        for l in m.layers() {
            out.push(core_desc(l));
        }
    }
    Ok(())
}

/// containerd's `IsNonDistributable`.
fn non_distributable(media_type: &str) -> bool {
    media_type.starts_with("application/vnd.oci.image.layer.nondistributable.")
        || media_type.starts_with("application/vnd.docker.image.rootfs.foreign.")
}

/// The platform a manifest entry of an index says, as ours.
fn entry_platform(d: &oci_spec::image::Descriptor) -> Option<Platform> {
    manifest::descriptor_platform(d)
}

/// A manifest of Docker's `manifest.json` and the names it is listed under.
struct DockerEntry {
    manifest: Descriptor,
    names: Vec<String>,
}

/// What containerd's `archive.Export` writes for `images` (see the module docs).
fn plan(
    t: &LocalTransfer,
    scope: &Scope,
    images: &[Image],
    dst: &ExportStream,
) -> Result<(Vec<Descriptor>, Vec<Descriptor>, Vec<DockerEntry>)> {
    let wanted = if dst.platforms.is_empty() {
        vec![Platform::host()]
    } else {
        dst.platforms.clone()
    };
    let matches = |p: &Platform| wanted.iter().any(|w| w.match_rank(p).is_some());
    let preference = |p: Option<Platform>| match p {
        None => usize::MAX,
        Some(p) => wanted
            .iter()
            .position(|w| w.match_rank(&p).is_some())
            .unwrap_or(wanted.len()),
    };
    let mut blobs: Vec<Descriptor> = vec![];
    let mut index_entries: Vec<Descriptor> = vec![];
    let mut docker: Vec<DockerEntry> = vec![];
    // The Docker manifest an index resolved to (none when no platform matched).
    let mut resolved: std::collections::HashMap<String, Option<String>> = Default::default();
    for image in images {
        let mut target = image.target.clone();
        target
            .annotations
            .insert(ANNOTATION_IMAGE_NAME.into(), image.name.clone());
        target.annotations.insert(
            ANNOTATION_REF_NAME.into(),
            archive::oci_reference_name(&image.name),
        );
        // containerd's copySourceLabels: where the content came from.
        let digest = Digest::parse(&target.digest)?;
        match t.content.info(scope, &digest) {
            Ok(info) => {
                for (k, v) in info.labels {
                    if k.starts_with("containerd.io/distribution.source") {
                        target.annotations.insert(k, v);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(digest = %target.digest, error = %e, "failed to copy distribution.source labels");
                continue;
            }
        }
        if manifest::is_manifest(&target.media_type) {
            if !docker.iter().any(|d| d.manifest.digest == target.digest) {
                tree(t, scope, &target, 0, &mut blobs)?;
                docker.push(DockerEntry {
                    manifest: target.clone(),
                    names: vec![],
                });
            }
            if let Some(d) = docker
                .iter_mut()
                .find(|d| d.manifest.digest == target.digest)
            {
                d.names.push(image.name.clone());
            }
        } else if manifest::is_index(&target.media_type) {
            if !resolved.contains_key(&target.digest) {
                blobs.push(target.clone());
                let body = read_small(t, scope, &target)?;
                let index = manifest::parse_index(&body, &target.digest)?;
                let mut candidates = vec![];
                for m in index.manifests() {
                    let p = entry_platform(m);
                    if p.as_ref().is_none_or(matches) {
                        candidates.push(m.clone());
                    } else if !dst.all_platforms {
                        continue;
                    }
                    tree(t, scope, &core_desc(m), 1, &mut blobs)?;
                }
                candidates.sort_by_key(|m| preference(entry_platform(m)));
                let Some(best) = candidates.first() else {
                    return Err(Error::not_found("no manifest found for platform"));
                };
                let best = core_desc(best);
                if !docker.iter().any(|d| d.manifest.digest == best.digest) {
                    docker.push(DockerEntry {
                        manifest: best.clone(),
                        names: vec![],
                    });
                }
                resolved.insert(target.digest.clone(), Some(best.digest));
            }
            if let Some(Some(d)) = resolved.get(&target.digest)
                && let Some(e) = docker.iter_mut().find(|e| e.manifest.digest == *d)
            {
                e.names.push(image.name.clone());
            }
        } else {
            return Err(Error::invalid_argument(format!(
                "only manifests may be exported: {} is a {}",
                target.digest, target.media_type
            )));
        }
        index_entries.push(target);
    }
    if dst.skip_non_distributable {
        blobs.retain(|b| !non_distributable(&b.media_type));
    }
    Ok((blobs, index_entries, docker))
}

fn blob_path(digest: &str) -> String {
    format!("blobs/{}", digest.replacen(':', "/", 1))
}

fn append(
    tar: &mut tar::Builder<&mut dyn Write>,
    path: &str,
    mode: u32,
    size: u64,
    data: &mut dyn std::io::Read,
) -> Result<()> {
    let mut h = tar::Header::new_ustar();
    h.set_size(size);
    h.set_mode(mode);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut h, path, data)
        .map_err(|e| Error::unavailable(format!("writing the archive ({path}): {e}")))
}

/// [`append`] of bytes held in memory.
fn append_bytes(
    tar: &mut tar::Builder<&mut dyn Write>,
    path: &str,
    mode: u32,
    bytes: &[u8],
) -> Result<()> {
    append(tar, path, mode, bytes.len() as u64, &mut &bytes[..])
}

fn append_dir(tar: &mut tar::Builder<&mut dyn Write>, path: &str) -> Result<()> {
    let mut h = tar::Header::new_ustar();
    h.set_size(0);
    h.set_mode(0o755);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Directory);
    tar.append_data(&mut h, path, std::io::empty())
        .map_err(|e| Error::unavailable(format!("writing the archive ({path}): {e}")))
}

/// `manifest.json`: Docker's `[{Config, RepoTags, Layers}]`, names familiarized.
fn docker_manifest(t: &LocalTransfer, scope: &Scope, entries: &[DockerEntry]) -> Result<Vec<u8>> {
    #[derive(serde::Serialize)]
    struct Entry {
        #[serde(rename = "Config")]
        config: String,
        #[serde(rename = "RepoTags")]
        repo_tags: Option<Vec<String>>,
        #[serde(rename = "Layers")]
        layers: Option<Vec<String>>,
    }
    let mut out = vec![];
    for e in entries {
        let body = read_small(t, scope, &e.manifest)?;
        let m = manifest::parse_manifest(&body, &e.manifest.digest)?;
        let layers: Vec<String> = m
            .layers()
            .iter()
            .map(|l| blob_path(l.digest().as_ref()))
            .collect();
        let names = e
            .names
            .iter()
            .map(|n| archive::familiarize_reference(n))
            .collect::<Result<Vec<_>>>()?;
        out.push(Entry {
            config: blob_path(m.config().digest().as_ref()),
            repo_tags: (!names.is_empty()).then_some(names),
            layers: (!layers.is_empty()).then_some(layers),
        });
    }
    archive::go_json(&out)
}

/// The OCI layout `index.json` listing the exported images (Go's field order).
fn index_json(entries: &[Descriptor]) -> Result<Vec<u8>> {
    #[derive(serde::Serialize)]
    struct Index {
        #[serde(rename = "schemaVersion")]
        schema_version: u32,
        #[serde(rename = "mediaType")]
        media_type: &'static str,
        manifests: Vec<archive::GoDescriptor>,
    }
    let manifests = entries
        .iter()
        .map(|d| {
            let digest = Digest::parse(&d.digest)?;
            let mut g = archive::GoDescriptor::new(&d.media_type, &digest, d.size.max(0) as u64);
            g.annotations = d.annotations.clone().into_iter().collect();
            Ok(g)
        })
        .collect::<Result<Vec<_>>>()?;
    archive::go_json(&Index {
        schema_version: 2,
        media_type: archive::OCI_INDEX,
        manifests,
    })
}

fn write_archive(
    t: &LocalTransfer,
    scope: &Scope,
    images: &[Image],
    dst: &ExportStream,
    w: &mut dyn Write,
) -> Result<()> {
    let (blobs, index_entries, docker) = plan(t, scope, images, dst)?;
    let index = index_json(&index_entries)?;
    let docker = if !dst.skip_compatibility_manifest && !docker.is_empty() {
        Some(docker_manifest(t, scope, &docker)?)
    } else {
        None
    };
    // containerd's writeTar: records sorted by name, each once.
    let mut blob_paths: Vec<(String, &Descriptor)> =
        blobs.iter().map(|b| (blob_path(&b.digest), b)).collect();
    blob_paths.sort_by(|a, b| a.0.cmp(&b.0));
    blob_paths.dedup_by(|a, b| a.0 == b.0);
    let mut algorithms: Vec<String> = blobs
        .iter()
        .filter_map(|b| b.digest.split_once(':').map(|(a, _)| a.to_string()))
        .collect();
    algorithms.sort();
    algorithms.dedup();

    let mut tar = tar::Builder::new(w);
    if !algorithms.is_empty() {
        append_dir(&mut tar, "blobs/")?;
    }
    for alg in &algorithms {
        append_dir(&mut tar, &format!("blobs/{alg}/"))?;
        for (path, b) in blob_paths
            .iter()
            .filter(|(p, _)| p.starts_with(&format!("blobs/{alg}/")))
        {
            // Streamed, its digest checked on the way (containerd's blobRecord).
            let mut pipe = BlobReader::new(t, scope, b)?;
            append(&mut tar, path, 0o444, b.size.max(0) as u64, &mut pipe)?;
            pipe.verify()?;
        }
    }
    append_bytes(&mut tar, "index.json", 0o644, &index)?;
    if let Some(m) = docker {
        append_bytes(&mut tar, "manifest.json", 0o644, &m)?;
    }
    let layout = br#"{"imageLayoutVersion":"1.0.0"}"#;
    append_bytes(&mut tar, "oci-layout", 0o444, layout)?;
    let w = tar
        .into_inner()
        .map_err(|e| Error::unavailable(format!("finishing the archive: {e}")))?;
    w.flush()
        .map_err(|e| Error::unavailable(format!("writing the archive: {e}")))
}

/// Sequential reads of a content blob (the tar builder wants `Read`), hashed.
struct BlobReader {
    inner: Box<dyn berth_core::content::ReaderAt>,
    offset: i64,
    size: i64,
    digest: String,
    hasher: berth_diff::compression::HashingReader<std::io::Empty>,
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
            digest: d.digest.clone(),
            hasher: berth_diff::compression::HashingReader::new(std::io::empty()),
        })
    }

    /// The bytes read were the blob's (containerd checks each blob it exports).
    fn verify(self) -> Result<()> {
        let (got, n) = self.hasher.finish();
        if self.digest.starts_with("sha256:") && got != self.digest {
            return Err(Error::unknown(format!(
                "unexpected digest {got} copied for {} ({n} bytes)",
                self.digest
            )));
        }
        Ok(())
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
        self.hasher.update(&buf[..n]);
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
    fn non_distributable_types() {
        assert!(non_distributable(
            "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        ));
        assert!(non_distributable(
            "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
        ));
        assert!(!non_distributable("application/vnd.oci.image.layer.v1.tar"));
    }
}
