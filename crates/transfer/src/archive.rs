//! Image archives: reading one into the content store as containerd's
//! `archive.ImportIndex` does (OCI image layouts, and Docker `docker save` archives
//! turned into a Docker schema 2 manifest per image and an OCI index naming them), and
//! the reference helpers its importer and exporter use.
//!
//! Every regular file of the archive is stored as a blob, keyed by its cleaned path
//! (`blobs/<alg>/<hex>` entries checked against the digest their path names); symlinks
//! are remembered. At the end:
//! - with an `oci-layout` file (version 1.0.0), `index.json` is the image;
//! - else with a `manifest.json` (Docker's `[{Config, RepoTags, Layers}]`), each entry
//!   becomes a manifest: config `application/vnd.docker.container.image.v1+json`, layers
//!   found through their paths (symlinks followed), reusing a compressed blob an earlier
//!   import made of the same layer (`containerd.io/uncompressed`), typed
//!   `…rootfs.diff.tar` when uncompressed (gzipped first with `force_compress`) and
//!   `…rootfs.diff.tar.gzip` otherwise; its platform read from the config. The index
//!   lists each manifest once per `RepoTags` entry, annotated with the normalized name
//!   (`io.containerd.image.name`: `busybox:1` → `docker.io/library/busybox:1`) and its
//!   tag (`org.opencontainers.image.ref.name`), or once unnamed. Manifest and index are
//!   serialized byte for byte as containerd's Go code does, so their digests are
//!   containerd's.
//! - else the archive is refused.

use crate::LocalTransfer;
use berth_core::content::{Digest, Scope, WriterOpts};
use berth_core::error::ErrorKind;
use berth_core::labels::Labels;
use berth_core::{Error, Result};
use berth_diff::compression::{self, Compression};
use berth_remotes::{Platform, Reference, manifest};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::io::Read;

pub(crate) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(crate) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub(crate) const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar";
const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
const LABEL_UNCOMPRESSED: &str = "containerd.io/uncompressed";
/// containerd's `jsonLimit` for `oci-layout` and `manifest.json`.
const JSON_LIMIT: u64 = 20 << 20;
/// Largest `index.json` accepted.
const MAX_INDEX: u64 = 4 << 20;
/// Largest image configuration read for its platform.
const MAX_CONFIG: u64 = 16 << 20;

/// Go's `path.Clean` (lexical: `.`, `..`, repeated and trailing slashes).
pub(crate) fn clean_path(p: &str) -> String {
    let rooted = p.starts_with('/');
    let mut parts: Vec<&str> = vec![];
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|l| *l != "..") {
                    parts.pop();
                } else if !rooted {
                    parts.push("..");
                }
            }
            c => parts.push(c),
        }
    }
    let joined = parts.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".into(),
        (false, false) => joined,
    }
}

/// Go's `path.Join(path.Dir(name), target)`: where a symlink in the archive points.
fn link_target(name: &str, target: &str) -> String {
    if target.starts_with('/') {
        return clean_path(target);
    }
    let dir = match name.rfind('/') {
        Some(i) => &name[..i],
        None => ".",
    };
    clean_path(&format!("{dir}/{target}"))
}

/// `ocispec.Platform` as Go's `encoding/json` writes it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub(crate) struct GoPlatform {
    pub architecture: String,
    pub os: String,
    #[serde(rename = "os.version", skip_serializing_if = "String::is_empty")]
    pub os_version: String,
    #[serde(rename = "os.features", skip_serializing_if = "Vec::is_empty")]
    pub os_features: Vec<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub variant: String,
}

/// `ocispec.Descriptor` as Go's `encoding/json` writes it (field order, `omitempty`,
/// annotations sorted by key).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct GoDescriptor {
    #[serde(rename = "mediaType")]
    pub media_type: String,
    pub digest: String,
    pub size: i64,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub platform: Option<GoPlatform>,
}

impl GoDescriptor {
    pub(crate) fn new(media_type: &str, digest: &Digest, size: u64) -> GoDescriptor {
        GoDescriptor {
            media_type: media_type.into(),
            digest: digest.to_string(),
            size: size as i64,
            annotations: BTreeMap::new(),
            platform: None,
        }
    }
}

/// JSON as Go's `json.Marshal` writes it: `<`, `>`, `&`, U+2028 and U+2029 escaped
/// (they can only occur inside strings, so replacing them everywhere is exact).
pub(crate) fn go_json<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    let s = serde_json::to_string(v).map_err(|e| Error::unknown(format!("json: {e}")))?;
    Ok(s.replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
        .replace('\u{2028}', "\\u2028")
        .replace('\u{2029}', "\\u2029")
        .into_bytes())
}

/// containerd's `normalizeReference` (distribution's `ParseDockerRef`): the full name,
/// `:latest` when there is no tag, the tag dropped when there is a digest.
pub(crate) fn normalize_reference(name: &str) -> Result<String> {
    let mut r = Reference::parse_normalized(name)
        .map_err(|e| Error::invalid_argument(format!("normalize image ref {name:?}: {e}")))?;
    if r.digest.is_some() {
        r.tag = None;
    }
    Ok(r.to_string())
}

/// containerd's `ociReferenceName`: the part after the repository (`latest`, or
/// `1@sha256:…`), or the whole name when there is none or it is a bare digest.
pub(crate) fn oci_reference_name(name: &str) -> String {
    let Some((host, path)) = name.split_once('/') else {
        return name.to_string();
    };
    // Go's url.Parse refuses a non-numeric port.
    if let Some((_, port)) = host.rsplit_once(':')
        && !host.starts_with('[')
        && !port.bytes().all(|b| b.is_ascii_digit())
    {
        return name.to_string();
    }
    match path.find([':', '@']) {
        Some(i) => {
            let object = &path[i..];
            if object.starts_with('@') {
                name.to_string()
            } else {
                object[1..].to_string()
            }
        }
        None => name.to_string(),
    }
}

/// containerd's `familiarizeReference` (for `manifest.json` `RepoTags`): Docker Hub
/// names shortened (`docker.io/library/busybox:1` → `busybox:1`), `:latest` added when
/// there is no tag. Unparsable names are an error.
pub(crate) fn familiarize_reference(name: &str) -> Result<String> {
    let mut r = Reference::parse_normalized(name)
        .map_err(|e| Error::invalid_argument(format!("failed to parse {name:?}: {e}")))?;
    if r.tag.is_none() && r.digest.is_none() {
        r.tag = Some("latest".into());
    }
    let mut s = r.to_string();
    if r.host == "docker.io" {
        s = s["docker.io/".len()..].to_string();
        if let Some(rest) = s.strip_prefix("library/")
            && !rest.contains('/')
        {
            s = rest.to_string();
        }
    }
    Ok(s)
}

/// One entry of Docker's `manifest.json` (Go decodes field names case-insensitively).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default)]
struct DockerManifest {
    #[serde(rename = "Config", alias = "config")]
    config: String,
    #[serde(rename = "RepoTags", alias = "repoTags", alias = "repotags")]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers", alias = "layers")]
    layers: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default)]
struct ImageLayout {
    #[serde(rename = "imageLayoutVersion")]
    version: String,
}

/// A blob read from the archive: digest and size.
type Blob = (Digest, u64);

/// Reads `data` (`size` bytes) into the store; `expected`: the digest its path names.
/// Returns the blob's digest.
fn ingest(
    t: &LocalTransfer,
    scope: &Scope,
    r#ref: &str,
    expected: Option<&Digest>,
    size: u64,
    data: &mut dyn Read,
    labels: Labels,
) -> Result<Digest> {
    let opened = t.content.writer(
        scope,
        WriterOpts {
            r#ref: r#ref.to_string(),
            total: size as i64,
            expected: expected.cloned(),
        },
    );
    let mut w = match opened {
        Ok(w) => w,
        Err(e) if e.is(ErrorKind::AlreadyExists) && expected.is_some() => {
            let n = std::io::copy(data, &mut std::io::sink())
                .map_err(|e| Error::invalid_argument(format!("reading the archive: {e}")))?;
            if n != size {
                return Err(truncated(expected.unwrap(), n, size));
            }
            return Ok(expected.unwrap().clone());
        }
        Err(e) => return Err(e),
    };
    if w.status()?.offset > 0 {
        w.truncate(0)?;
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = data
            .read(&mut buf)
            .map_err(|e| Error::invalid_argument(format!("reading {ref} from the archive: {e}")))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        w.write(&buf[..n])?;
    }
    if total != size {
        // A truncated archive: the partial blob is of no use to a later import.
        let digest = w.digest();
        drop(w);
        let _ = t.content.abort(scope, r#ref);
        return Err(truncated(expected.unwrap_or(&digest), total, size));
    }
    let digest = expected.cloned().unwrap_or_else(|| w.digest());
    match w.commit(size as i64, Some(&digest), labels) {
        Err(e) if e.is(ErrorKind::AlreadyExists) => Ok(digest),
        Err(e) => Err(e.context(format!("archive entry {ref}"))),
        Ok(()) => Ok(digest),
    }
}

fn truncated(what: &Digest, got: u64, size: u64) -> Error {
    Error::invalid_argument(format!(
        "the archive is truncated: blob {what} has {got} of {size} bytes"
    ))
}

/// Writes a small blob made here (a manifest, an index); returns its digest.
pub(crate) fn write_small(
    t: &LocalTransfer,
    scope: &Scope,
    body: &[u8],
    labels: Labels,
) -> Result<Digest> {
    let digest = Digest::parse(manifest::descriptor_for(OCI_INDEX, body).digest().as_ref())?;
    ingest(
        t,
        scope,
        &format!("manifest-{digest}"),
        Some(&digest),
        body.len() as u64,
        &mut &body[..],
        labels,
    )?;
    Ok(digest)
}

/// Reads a whole blob of at most `limit` bytes (the size is the stored blob's, checked
/// before anything is read; `what` names it in the error: "manifest", "image config").
pub(crate) fn read_blob(
    t: &LocalTransfer,
    scope: &Scope,
    digest: &Digest,
    what: &str,
    limit: u64,
) -> Result<Vec<u8>> {
    let r = t.content.reader_at(scope, digest)?;
    let size = r.size();
    if size < 0 || size as u64 > limit {
        return Err(Error::invalid_argument(format!(
            "{what} {digest} of {size} bytes is larger than the {limit} allowed"
        )));
    }
    let mut buf = vec![0u8; size as usize];
    let mut off = 0;
    while off < buf.len() {
        let n = r.read_at(&mut buf[off..], off as i64)?;
        if n == 0 {
            return Err(Error::invalid_argument(format!("{digest}: short blob")));
        }
        off += n;
    }
    Ok(buf)
}

/// What an archive turned out to be: the descriptor of its index (an OCI index blob in
/// the store).
pub(crate) struct ReadArchive {
    pub index: berth_core::content::Descriptor,
    pub index_body: Vec<u8>,
}

/// Reads the archive into the store (see the module docs).
pub(crate) fn read(
    t: &LocalTransfer,
    scope: &Scope,
    reader: Box<dyn Read + Send>,
    media_type: &str,
    force_compress: bool,
) -> Result<ReadArchive> {
    let reader: Box<dyn Read + Send> = if media_type.is_empty() {
        compression::decompress(reader, None)?
    } else {
        reader
    };
    // The tar crate reads extension entries whole into memory: bounded here.
    let mut archive = tar::Archive::new(crate::targuard::TarGuard::new(reader));
    let mut layout: Option<ImageLayout> = None;
    let mut docker: Option<Vec<DockerManifest>> = None;
    let mut index: Option<Vec<u8>> = None;
    let mut blobs: HashMap<String, Blob> = HashMap::new();
    let mut symlinks: Vec<(String, String)> = vec![];
    let import_id = uuid::Uuid::new_v4();
    let bad = |e: std::io::Error| Error::invalid_argument(format!("reading the archive: {e}"));
    for (n, entry) in archive.entries().map_err(bad)?.enumerate() {
        let mut entry = entry.map_err(bad)?;
        let raw = entry.path().map_err(bad)?.to_string_lossy().to_string();
        let name = clean_path(&raw);
        let kind = entry.header().entry_type();
        if kind.is_symlink() {
            if let Some(target) = entry.link_name().map_err(bad)? {
                symlinks.push((name, link_target(&raw, &target.to_string_lossy())));
            }
            continue;
        }
        if !kind.is_file() {
            continue;
        }
        let size = entry.size();
        let json_too_big = |what: &str, limit: u64| {
            Error::invalid_argument(format!("{what} of {size} bytes is larger than {limit}"))
        };
        match name.as_str() {
            "oci-layout" => {
                if size > JSON_LIMIT {
                    return Err(json_too_big("oci-layout", JSON_LIMIT));
                }
                let l: ImageLayout = serde_json::from_reader(&mut entry).map_err(|e| {
                    Error::invalid_argument(format!("untar oci layout {raw:?}: {e}"))
                })?;
                layout = Some(l);
            }
            "manifest.json" => {
                if size > JSON_LIMIT {
                    return Err(json_too_big("manifest.json", JSON_LIMIT));
                }
                let m: Vec<DockerManifest> = serde_json::from_reader(&mut entry)
                    .map_err(|e| Error::invalid_argument(format!("untar manifest {raw:?}: {e}")))?;
                docker = Some(m);
            }
            "index.json" => {
                if size > MAX_INDEX {
                    return Err(json_too_big("index.json", MAX_INDEX));
                }
                let mut body = Vec::with_capacity(size as usize);
                entry.read_to_end(&mut body).map_err(bad)?;
                if body.len() as u64 != size {
                    return Err(Error::invalid_argument(
                        "the archive is truncated (index.json)",
                    ));
                }
                index = Some(body);
            }
            p => {
                // A blob named by its digest is checked against it.
                let expected = p
                    .strip_prefix("blobs/")
                    .and_then(|rest| rest.split_once('/'))
                    .map(|(alg, hex)| Digest::parse(&format!("{alg}:{hex}")))
                    .transpose()
                    .map_err(|e| e.context(format!("archive entry {p}")))?;
                let r#ref = match &expected {
                    Some(d) => format!("import-{d}"),
                    None => format!("tar-{import_id}-{n}"),
                };
                let digest = ingest(
                    t,
                    scope,
                    &r#ref,
                    expected.as_ref(),
                    size,
                    &mut entry,
                    Labels::new(),
                )
                .map_err(|e| e.context(format!("failed to ingest {raw:?}")))?;
                blobs.insert(name, (digest, size));
            }
        }
    }

    let body = if let Some(layout) = layout {
        if layout.version != "1.0.0" {
            return Err(Error::invalid_argument(format!(
                "unsupported OCI version {}",
                layout.version
            )));
        }
        index.ok_or_else(|| Error::invalid_argument("missing index.json in OCI layout 1.0.0"))?
    } else if let Some(mfsts) = docker {
        for (name, target) in symlinks {
            let blob = blobs.get(&target).cloned().ok_or_else(|| {
                Error::invalid_argument(format!(
                    "no target for symlink layer from {name:?} to {target:?}"
                ))
            })?;
            blobs.insert(name, blob);
        }
        docker_index(t, scope, &mfsts, &blobs, force_compress)?
    } else {
        return Err(Error::invalid_argument(
            "unrecognized image format (neither an OCI image layout nor a Docker archive)",
        ));
    };
    let labels = manifest::gc_labels(OCI_INDEX, &body).into_iter().collect();
    let digest = write_small(t, scope, &body, labels)?;
    Ok(ReadArchive {
        index: berth_core::content::Descriptor {
            media_type: OCI_INDEX.into(),
            digest: digest.to_string(),
            size: body.len() as i64,
            annotations: Default::default(),
        },
        index_body: body,
    })
}

/// containerd's `ConfigPlatform`: the config's platform fields, normalized.
fn config_platform(config: &[u8]) -> GoPlatform {
    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct P {
        architecture: String,
        os: String,
        #[serde(rename = "os.version")]
        os_version: String,
        #[serde(rename = "os.features")]
        os_features: Vec<String>,
        variant: String,
    }
    let p: P = serde_json::from_slice(config).unwrap_or_default();
    let n = Platform::new(&p.os, &p.architecture, &p.variant);
    GoPlatform {
        architecture: n.architecture,
        os: n.os,
        os_version: p.os_version,
        os_features: p.os_features,
        variant: n.variant,
    }
}

fn detect_compression(t: &LocalTransfer, scope: &Scope, digest: &Digest) -> Result<Compression> {
    let r = t.content.reader_at(scope, digest)?;
    let mut head = [0u8; 10];
    let n = r.read_at(&mut head, 0)?;
    Ok(compression::detect(&head[..n]))
}

/// Gzips an uncompressed layer into the store, labelled with the digest it came from.
fn compress_layer(t: &LocalTransfer, scope: &Scope, layer: &Blob) -> Result<Blob> {
    let (digest, size) = layer;
    let r#ref = format!("compress-blob-{}-{}", digest.algorithm(), digest.hex());
    let mut w = t.content.writer(
        scope,
        WriterOpts {
            r#ref: r#ref.clone(),
            total: 0,
            expected: None,
        },
    )?;
    w.truncate(0)?;
    let reader = t.content.reader_at(scope, digest)?;
    struct Out<'a>(&'a mut dyn berth_core::content::Writer, u64);
    impl std::io::Write for Out<'_> {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0
                .write(b)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            self.1 += b.len() as u64;
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut out = Out(&mut *w, 0);
    {
        let mut gz = flate2::write::GzEncoder::new(&mut out, flate2::Compression::default());
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 0u64;
        while off < *size {
            let n = reader.read_at(&mut buf, off as i64)?;
            if n == 0 {
                return Err(Error::unknown(format!("{digest}: short blob")));
            }
            std::io::Write::write_all(&mut gz, &buf[..n])
                .map_err(|e| Error::unknown(format!("compressing {digest}: {e}")))?;
            off += n as u64;
        }
        gz.finish()
            .map_err(|e| Error::unknown(format!("compressing {digest}: {e}")))?;
    }
    let written = out.1;
    let compressed = w.digest();
    let mut labels = Labels::new();
    labels.insert(LABEL_UNCOMPRESSED.into(), digest.to_string());
    match w.commit(written as i64, Some(&compressed), labels) {
        Err(e) if !e.is(ErrorKind::AlreadyExists) => {
            drop(w);
            let _ = t.content.abort(scope, &r#ref);
            return Err(e.context("failed to commit"));
        }
        _ => {}
    }
    Ok((compressed, written))
}

/// containerd's `resolveLayers`.
fn resolve_layers(
    t: &LocalTransfer,
    scope: &Scope,
    files: &[String],
    blobs: &HashMap<String, Blob>,
    force_compress: bool,
) -> Result<Vec<GoDescriptor>> {
    let mut layers: Vec<(Blob, Option<&'static str>)> = vec![];
    for f in files {
        let blob = blobs.get(&clean_path(f)).cloned().ok_or_else(|| {
            Error::invalid_argument(format!("failed to resolve layers: layer {f:?} not found"))
        })?;
        layers.push((blob, None));
    }
    // A compressed copy an earlier import made (`--compress-blobs`) is used instead.
    if !layers.is_empty() {
        let filters: Vec<String> = layers
            .iter()
            .map(|((d, _), _)| format!("labels.\"{LABEL_UNCOMPRESSED}\"=={d}"))
            .collect();
        let mut found: HashMap<String, Blob> = HashMap::new();
        t.content.walk(scope, &filters, &mut |info| {
            if let Some(u) = info.labels.get(LABEL_UNCOMPRESSED) {
                found.insert(u.clone(), (info.digest.clone(), info.size.max(0) as u64));
            }
            Ok(())
        })?;
        for (blob, mt) in &mut layers {
            if let Some(c) = found.get(&blob.0.to_string()) {
                *blob = c.clone();
                *mt = Some(match detect_compression(t, scope, &blob.0)? {
                    Compression::Uncompressed => DOCKER_LAYER,
                    _ => DOCKER_LAYER_GZIP,
                });
            }
        }
    }
    let mut out = vec![];
    for (blob, mt) in layers {
        let (blob, mt) = match mt {
            Some(mt) => (blob, mt),
            None => match detect_compression(t, scope, &blob.0)? {
                Compression::Uncompressed if force_compress => {
                    (compress_layer(t, scope, &blob)?, DOCKER_LAYER_GZIP)
                }
                Compression::Uncompressed => (blob, DOCKER_LAYER),
                _ => (blob, DOCKER_LAYER_GZIP),
            },
        };
        out.push(GoDescriptor::new(mt, &blob.0, blob.1));
    }
    Ok(out)
}

/// Turns Docker's `manifest.json` into manifests and an index (see the module docs);
/// returns the index body.
fn docker_index(
    t: &LocalTransfer,
    scope: &Scope,
    mfsts: &[DockerManifest],
    blobs: &HashMap<String, Blob>,
    force_compress: bool,
) -> Result<Vec<u8>> {
    #[derive(Serialize)]
    struct Manifest<'a> {
        #[serde(rename = "schemaVersion")]
        schema_version: u32,
        #[serde(rename = "mediaType")]
        media_type: &'a str,
        config: GoDescriptor,
        layers: Vec<GoDescriptor>,
    }
    #[derive(Serialize)]
    struct Index {
        #[serde(rename = "schemaVersion")]
        schema_version: u32,
        manifests: Vec<GoDescriptor>,
    }
    let mut entries = vec![];
    for m in mfsts {
        let (config_digest, config_size) =
            blobs.get(&clean_path(&m.config)).cloned().ok_or_else(|| {
                Error::invalid_argument(format!("image config {:?} not found", m.config))
            })?;
        let layers = resolve_layers(t, scope, &m.layers, blobs, force_compress)?;
        let body = go_json(&Manifest {
            schema_version: 2,
            media_type: DOCKER_MANIFEST,
            config: GoDescriptor::new(DOCKER_CONFIG, &config_digest, config_size),
            layers,
        })?;
        let digest = write_small(t, scope, &body, Labels::new())
            .map_err(|e| e.context("write docker manifest"))?;
        let config = read_blob(t, scope, &config_digest, "image config", MAX_CONFIG)
            .map_err(|e| e.context("unable to resolve platform"))?;
        let mut desc = GoDescriptor::new(DOCKER_MANIFEST, &digest, body.len() as u64);
        desc.platform = Some(config_platform(&config));
        let tags = m.repo_tags.clone().unwrap_or_default();
        if tags.is_empty() {
            entries.push(desc);
            continue;
        }
        for tag in tags {
            let normalized = normalize_reference(&tag)?;
            let mut d = desc.clone();
            d.annotations.insert(
                crate::names::ANNOTATION_REF_NAME.into(),
                oci_reference_name(&normalized),
            );
            d.annotations
                .insert(crate::names::ANNOTATION_IMAGE_NAME.into(), normalized);
            entries.push(d);
        }
    }
    go_json(&Index {
        schema_version: 2,
        manifests: entries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_clean_as_go() {
        assert_eq!(clean_path("./a//b/"), "a/b");
        assert_eq!(clean_path("a/../b"), "b");
        assert_eq!(clean_path("../a"), "../a");
        assert_eq!(clean_path("/../a"), "/a");
        assert_eq!(clean_path(""), ".");
        assert_eq!(link_target("3db6/layer.tar", "../8160.tar"), "8160.tar");
        assert_eq!(link_target("layer.tar", "x/y.tar"), "x/y.tar");
    }

    #[test]
    fn references_as_containerd() {
        assert_eq!(
            normalize_reference("busybox").unwrap(),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(
            normalize_reference("user/app:1").unwrap(),
            "docker.io/user/app:1"
        );
        assert_eq!(
            normalize_reference("import.local/busybox:latest").unwrap(),
            "import.local/busybox:latest"
        );
        let d = format!("sha256:{}", "b".repeat(64));
        assert_eq!(
            normalize_reference(&format!("a.io/b:1@{d}")).unwrap(),
            format!("a.io/b@{d}")
        );
        assert!(normalize_reference("UPPER/case:1").is_err());
        assert_eq!(
            oci_reference_name("docker.io/library/busybox:latest"),
            "latest"
        );
        assert_eq!(oci_reference_name("127.0.0.1:5000/a/b:v1"), "v1");
        assert_eq!(
            oci_reference_name("127.0.0.1:5000/a/b"),
            "127.0.0.1:5000/a/b"
        );
        assert_eq!(
            oci_reference_name(&format!("a.io/b:1@{d}")),
            format!("1@{d}")
        );
        assert_eq!(
            oci_reference_name(&format!("a.io/b@{d}")),
            format!("a.io/b@{d}")
        );
        assert_eq!(oci_reference_name("import-x:latest"), "import-x:latest");
        assert_eq!(
            familiarize_reference("docker.io/library/busybox:latest").unwrap(),
            "busybox:latest"
        );
        assert_eq!(
            familiarize_reference("docker.io/user/app").unwrap(),
            "user/app:latest"
        );
        assert_eq!(
            familiarize_reference("127.0.0.1:5000/a/b:v1").unwrap(),
            "127.0.0.1:5000/a/b:v1"
        );
    }

    #[test]
    fn json_is_gos() {
        let d = Digest::parse(&format!("sha256:{}", "c".repeat(64))).unwrap();
        let mut desc = GoDescriptor::new(DOCKER_MANIFEST, &d, 42);
        desc.platform = Some(GoPlatform {
            architecture: "amd64".into(),
            os: "linux".into(),
            os_version: String::new(),
            os_features: vec![],
            variant: String::new(),
        });
        desc.annotations
            .insert("org.opencontainers.image.ref.name".into(), "<1>&".into());
        desc.annotations
            .insert("io.containerd.image.name".into(), "x".into());
        let json = String::from_utf8(go_json(&desc).unwrap()).unwrap();
        assert_eq!(
            json,
            format!(
                r#"{{"mediaType":"{DOCKER_MANIFEST}","digest":"{d}","size":42,"annotations":{{"io.containerd.image.name":"x","org.opencontainers.image.ref.name":"\u003c1\u003e\u0026"}},"platform":{{"architecture":"amd64","os":"linux"}}}}"#
            )
        );
        let p = config_platform(br#"{"os":"Linux","architecture":"aarch64","variant":"v8"}"#);
        assert_eq!(
            (p.os.as_str(), p.architecture.as_str(), p.variant.as_str()),
            ("linux", "arm64", "")
        );
    }
}
