//! OCI archive stream → image store: containerd 2.x's `importStream`.
//!
//! The archive (an OCI image layout as a tar, gzip/zstd-compressed when the stream's media
//! type is empty and the bytes say so) is read once, in order: every `blobs/<alg>/<hex>`
//! entry goes straight into the content store under the import's lease, its digest
//! checked by the store on commit; `index.json` is kept and written as a blob last. Then
//! manifests and indexes get containerd's `gc.ref.content.*` labels, the manifests the
//! destination asks to unpack are unpacked (chain IDs as a pull's), and the image records
//! are named as containerd's image store names them (the index by the store's name,
//! each manifest by its `io.containerd.image.name` / `org.opencontainers.image.ref.name`
//! annotation through the store's prefix references). Docker `docker save` archives
//! (`manifest.json` without `index.json`) are not supported yet: `NotImplemented`.

use crate::progress::Progress;
use crate::pull::{diff_ids, unpack_for};
use crate::{
    ImageReference, ImageStore, ImportStream, LocalTransfer, StoredImage, TransferOptions,
    blocking, core_desc, report_saved, under_temporary_lease,
};
use berth_core::content::{Descriptor, Digest, Info, Scope, WriterOpts};
use berth_core::error::ErrorKind;
use berth_core::labels::{GC_EXPIRE, Labels};
use berth_core::snapshot::Snapshotter;
use berth_core::{Error, Result};
use berth_diff::unpack::Unpacker;
use berth_metadata::images::Image;
use berth_remotes::{Platform, manifest};
use std::io::Read;
use std::sync::Arc;
use std::time::SystemTime;

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Largest `index.json` accepted.
const MAX_INDEX: u64 = 4 << 20;

/// Writes one blob of known digest into the store (already present: skipped).
fn write_blob(
    t: &LocalTransfer,
    scope: &Scope,
    digest: &Digest,
    size: u64,
    data: &mut dyn Read,
    labels: Labels,
) -> Result<()> {
    let opened = t.content.writer(
        scope,
        WriterOpts {
            r#ref: format!("import-{digest}"),
            total: size as i64,
            expected: Some(digest.clone()),
        },
    );
    let mut w = match opened {
        Ok(w) => w,
        Err(e) if e.is(ErrorKind::AlreadyExists) => {
            std::io::copy(data, &mut std::io::sink())?;
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    if w.status()?.offset > 0 {
        w.truncate(0)?;
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = data.read(&mut buf).map_err(|e| {
            Error::invalid_argument(format!("reading {digest} from the archive: {e}"))
        })?;
        if n == 0 {
            break;
        }
        total += n as u64;
        w.write(&buf[..n])?;
    }
    if total != size {
        // A truncated archive: the partial blob is of no use to a later import.
        let r#ref = format!("import-{digest}");
        drop(w);
        let _ = t.content.abort(scope, &r#ref);
        return Err(Error::invalid_argument(format!(
            "the archive is truncated: blob {digest} has {total} of {size} bytes"
        )));
    }
    match w.commit(size as i64, Some(digest), labels) {
        Err(e) if e.is(ErrorKind::AlreadyExists) => Ok(()),
        r => r.map_err(|e| e.context(format!("archive blob {digest}"))),
    }
}

/// Reads the archive into the store; returns the `index.json` blob's descriptor.
fn read_archive(
    t: &LocalTransfer,
    scope: &Scope,
    reader: Box<dyn Read + Send>,
    media_type: &str,
) -> Result<Descriptor> {
    let reader: Box<dyn Read + Send> = if media_type.is_empty() {
        berth_diff::compression::decompress(reader, None)?
    } else {
        reader
    };
    let mut archive = tar::Archive::new(reader);
    let mut index: Option<Vec<u8>> = None;
    let mut docker = false;
    let bad = |e: std::io::Error| Error::invalid_argument(format!("reading the archive: {e}"));
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry.path().map_err(bad)?.to_string_lossy().to_string();
        let path = path.trim_start_matches("./").to_string();
        let size = entry.size();
        match path.as_str() {
            "index.json" => {
                if size > MAX_INDEX {
                    return Err(Error::invalid_argument(format!(
                        "index.json of {size} bytes is larger than {MAX_INDEX}"
                    )));
                }
                let mut body = Vec::with_capacity(size as usize);
                entry.read_to_end(&mut body).map_err(bad)?;
                index = Some(body);
            }
            "manifest.json" => docker = true,
            p => {
                let Some(rest) = p.strip_prefix("blobs/") else {
                    continue;
                };
                let Some((alg, hex)) = rest.split_once('/') else {
                    continue;
                };
                let digest = Digest::parse(&format!("{alg}:{hex}"))
                    .map_err(|e| e.context(format!("archive entry {p}")))?;
                write_blob(t, scope, &digest, size, &mut entry, Labels::new())?;
            }
        }
    }
    let Some(body) = index else {
        return Err(if docker {
            Error::not_implemented(
                "importing Docker archives (manifest.json without index.json) is not implemented by Berth's transfer service yet; use an OCI archive",
            )
        } else {
            Error::invalid_argument("the archive has no index.json (not an OCI image layout)")
        });
    };
    let desc = manifest::descriptor_for(OCI_INDEX, &body);
    let digest = Digest::parse(desc.digest().as_ref())?;
    let labels = manifest::gc_labels(OCI_INDEX, &body).into_iter().collect();
    write_blob(
        t,
        scope,
        &digest,
        body.len() as u64,
        &mut body.as_slice(),
        labels,
    )?;
    Ok(core_desc(&desc))
}

fn read_small(t: &LocalTransfer, scope: &Scope, d: &Descriptor) -> Result<Vec<u8>> {
    if d.size < 0 || d.size as u64 > manifest::MAX_MANIFEST_SIZE {
        return Err(Error::invalid_argument(format!(
            "{}: {} bytes is not a manifest size",
            d.digest, d.size
        )));
    }
    let digest = Digest::parse(&d.digest)?;
    let r = t
        .content
        .reader_at(scope, &digest)
        .map_err(|e| e.context(format!("{} is referenced but not in the archive", d.digest)))?;
    let mut buf = vec![0u8; d.size as usize];
    let mut off = 0;
    while off < buf.len() {
        let n = r.read_at(&mut buf[off..], off as i64)?;
        if n == 0 {
            return Err(Error::invalid_argument(format!("{}: short blob", d.digest)));
        }
        off += n;
    }
    Ok(buf)
}

/// Labels every manifest and index under `d` with its children (for the collector);
/// returns the image manifests found, with their platforms when the index says.
fn label_tree(
    t: &LocalTransfer,
    scope: &Scope,
    d: &Descriptor,
    depth: usize,
    out: &mut Vec<(Descriptor, Vec<u8>, Option<Platform>)>,
    platform: Option<Platform>,
) -> Result<()> {
    if depth > 8 {
        return Err(Error::invalid_argument("indexes nested too deeply"));
    }
    if !manifest::is_manifest_like(&d.media_type) {
        return Ok(());
    }
    let body = read_small(t, scope, d)?;
    let labels: Labels = manifest::gc_labels(&d.media_type, &body)
        .into_iter()
        .collect();
    if !labels.is_empty() {
        let paths: Vec<String> = labels.keys().map(|k| format!("labels.{k}")).collect();
        let info = Info {
            digest: Digest::parse(&d.digest)?,
            size: 0,
            created_at: SystemTime::UNIX_EPOCH,
            updated_at: SystemTime::UNIX_EPOCH,
            labels,
        };
        t.content.update(scope, info, &paths)?;
    }
    if manifest::is_index(&d.media_type) {
        let index = manifest::parse_index(&body, &d.digest)?;
        for m in index.manifests() {
            let p = manifest::descriptor_platform(m);
            label_tree(t, scope, &core_desc(m), depth + 1, out, p)?;
        }
    } else if manifest::is_manifest(&d.media_type) {
        out.push((d.clone(), body, platform));
    }
    Ok(())
}

/// containerd's `refTranslator`: a tag-only name gets `prefix:`; a full reference is
/// kept, or (with `check_prefix`) dropped unless it is under `prefix`.
fn translate(prefix: &str, check_prefix: bool, name: &str) -> String {
    if prefix.is_empty() {
        return String::new();
    }
    if name.contains(['/', ':', '@']) {
        let under = name
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(['/', ':', '@']));
        if check_prefix && !under {
            return String::new();
        }
        return name.to_string();
    }
    format!("{prefix}:{name}")
}

/// containerd's `imageName`: `io.containerd.image.name` (kept only if the translation
/// leaves it unchanged), else `org.opencontainers.image.ref.name` translated.
fn image_name(
    annotations: &std::collections::HashMap<String, String>,
    r: &ImageReference,
) -> String {
    let tr = |n: &str| translate(&r.name, !r.allow_overwrite, n);
    if let Some(name) = annotations
        .get("io.containerd.image.name")
        .filter(|n| !n.is_empty())
    {
        return if tr(name) == *name {
            name.clone()
        } else {
            String::new()
        };
    }
    annotations
        .get("org.opencontainers.image.ref.name")
        .filter(|n| !n.is_empty())
        .map(|n| tr(n))
        .unwrap_or_default()
}

/// The records containerd's image store writes for an import: `(name, target, labels)`.
fn names(
    dst: &ImageStore,
    index: &Descriptor,
    index_body: &[u8],
) -> Result<Vec<(String, Descriptor, Labels)>> {
    let extra_labels = || {
        let mut l = dst.labels.clone();
        if !dst.name.is_empty() {
            l.insert("containerd.io/gc.bref.image".into(), dst.name.clone());
            l.insert(GC_EXPIRE.into(), crate::rfc3339(SystemTime::now()));
        }
        l
    };
    let mut out = vec![];
    // The index itself: the store's name and its plain extra references.
    if !dst.name.is_empty() {
        out.push((dst.name.clone(), index.clone(), dst.labels.clone()));
    }
    for r in &dst.extra_references {
        if r.is_prefix && !r.add_digest {
            continue;
        }
        let name = if r.add_digest {
            format!("{}@{}", r.name, index.digest)
        } else {
            r.name.clone()
        };
        out.push((name, index.clone(), extra_labels()));
    }
    // Each manifest of the index, named from its annotations through prefix references.
    let parsed = manifest::parse_index(index_body, "index.json")?;
    for m in parsed.manifests() {
        let target = core_desc(m);
        let annotations = m.annotations().clone().unwrap_or_default();
        for r in dst.extra_references.iter().filter(|r| r.is_prefix) {
            let name = image_name(&annotations, r);
            if name.is_empty() {
                if r.add_digest {
                    out.push((
                        format!("{}@{}", r.name, target.digest),
                        target.clone(),
                        extra_labels(),
                    ));
                }
                continue;
            }
            out.push((name, target.clone(), extra_labels()));
            if r.add_digest && !r.skip_named_digest {
                out.push((
                    format!("{}@{}", r.name, target.digest),
                    target.clone(),
                    extra_labels(),
                ));
            }
        }
    }
    Ok(out)
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
            r = import_leased(t, ns, reader, &src.media_type, dst, opts, &lease_id) => r,
            _ = opts.cancel.cancelled() => Err(Error::new(ErrorKind::Canceled, "import")),
        }
    })
    .await?;
    report_saved(send, &stored);
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
    media_type: &str,
    dst: &ImageStore,
    opts: &TransferOptions,
    lease_id: &str,
) -> Result<Vec<StoredImage>> {
    let scope = Scope::new(ns).with_lease(Some(lease_id.to_string()));
    let this = LocalTransfer {
        md: t.md.clone(),
        content: t.content.clone(),
        snapshotters: t.snapshotters.clone(),
        applier: t.applier.clone(),
        config: t.config.clone(),
    };
    let this = Arc::new(this);
    let (th, sc, mt) = (this.clone(), scope.clone(), media_type.to_string());
    let (index, manifests, index_body) = blocking(move || {
        let index = read_archive(&th, &sc, reader, &mt)?;
        let mut manifests = vec![];
        label_tree(&th, &sc, &index, 0, &mut manifests, None)?;
        let body = read_small(&th, &sc, &index)?;
        Ok((index, manifests, body))
    })
    .await?;

    // Unpack the manifests the destination asks for.
    for (desc, body, platform) in &manifests {
        let m = manifest::parse_manifest(body, &desc.digest)?;
        let config = core_desc(m.config());
        let config_body = {
            let (th, sc, c) = (this.clone(), scope.clone(), config.clone());
            blocking(move || read_small(&th, &sc, &c)).await?
        };
        let platform = match platform {
            Some(p) => p.clone(),
            None => {
                let v: serde_json::Value = serde_json::from_slice(&config_body).unwrap_or_default();
                let s = |k: &str| {
                    v.get(k)
                        .and_then(|x| x.as_str())
                        .unwrap_or_default()
                        .to_string()
                };
                Platform::new(&s("os"), &s("architecture"), &s("variant"))
            }
        };
        if !dst.platforms.is_empty()
            && !dst
                .platforms
                .iter()
                .any(|p| p.match_rank(&platform).is_some())
        {
            continue;
        }
        let Some(sn_name) = unpack_for(t, dst, &platform) else {
            continue;
        };
        let db = match t.snapshotters.get(&sn_name) {
            Ok(db) => db,
            Err(e) => {
                tracing::warn!(snapshotter = %sn_name, error = %e, "unpack configuration not supported, skipping");
                continue;
            }
        };
        let sn: Arc<dyn Snapshotter> = Arc::new(db.namespaced(ns, Some(lease_id.to_string())));
        let diffs = diff_ids(&config_body)?;
        if diffs.len() != m.layers().len() {
            return Err(Error::invalid_argument(format!(
                "{}: the image config has {} diff IDs for {} layers",
                desc.digest,
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
                        parents: vec![crate::ref_key(desc)],
                        progress: l.size,
                        total: l.size,
                        desc: Some(l.clone()),
                    })
                }
            };
            report("extracting");
            u.layer(i, &l).await?;
            report("extracted");
        }
        if let Some(top) = u.top() {
            let key = format!("containerd.io/gc.ref.snapshot.{sn_name}");
            let mut labels = Labels::new();
            labels.insert(key.clone(), top.to_string());
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

    let records = names(dst, &index, &index_body)?;
    let (md, n) = (t.md.clone(), ns.to_string());
    blocking(move || {
        let now = SystemTime::now();
        let mut stored = vec![];
        for (name, target, labels) in records {
            let record = Image {
                name,
                labels,
                target,
                created_at: now,
                updated_at: now,
            };
            stored.push(match md.create_image(&n, &record) {
                Ok(image) => StoredImage {
                    image,
                    created: true,
                },
                Err(e) if e.is(ErrorKind::AlreadyExists) => StoredImage {
                    image: md.update_image(&n, &record, &[])?,
                    created: false,
                },
                Err(e) => return Err(e),
            });
        }
        Ok(stored)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(name: &str, overwrite: bool) -> ImageReference {
        ImageReference {
            name: name.into(),
            is_prefix: true,
            allow_overwrite: overwrite,
            ..Default::default()
        }
    }

    #[test]
    fn names_follow_containerds_ref_translation() {
        assert_eq!(translate("import-x", false, "latest"), "import-x:latest");
        assert_eq!(translate("import-x", false, "a.io/b:1"), "a.io/b:1");
        assert_eq!(translate("a.io/b", true, "a.io/b:1"), "a.io/b:1");
        assert_eq!(translate("a.io/b", true, "a.io/bc:1"), "");
        assert_eq!(translate("", false, "latest"), "");
        let mut a = std::collections::HashMap::new();
        a.insert(
            "org.opencontainers.image.ref.name".to_string(),
            "latest".to_string(),
        );
        a.insert(
            "io.containerd.image.name".to_string(),
            "import.local/busybox:latest".to_string(),
        );
        assert_eq!(
            image_name(&a, &r("import-2026", true)),
            "import.local/busybox:latest"
        );
        // Without overwrite, a full name outside the prefix is not used.
        assert_eq!(image_name(&a, &r("other.io/x", false)), "");
        a.remove("io.containerd.image.name");
        assert_eq!(image_name(&a, &r("base", true)), "base:latest");
    }
}
