//! Manifests and indexes: media types, parsing (OCI and Docker schema 2, schema 1
//! refused), and platform selection.

use crate::platform::Platform;
use berth_core::content::Digest;
use berth_core::error::ErrorKind;
use berth_core::{Error, Result};
use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
pub const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";

/// The `Accept` header for manifest requests (`*/*` last, so that a registry with only a
/// schema 1 manifest answers and we can say so clearly).
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, */*";

/// Largest manifest or index accepted (4 MiB, containerd's limit).
pub const MAX_MANIFEST_SIZE: u64 = 4 << 20;

pub fn is_index(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST
}

pub fn is_manifest(media_type: &str) -> bool {
    media_type == OCI_MANIFEST || media_type == DOCKER_MANIFEST
}

/// Whether a blob of this media type is fetched from the `manifests` endpoint.
pub fn is_manifest_like(media_type: &str) -> bool {
    is_index(media_type)
        || is_manifest(media_type)
        || media_type == DOCKER_SCHEMA1
        || media_type == DOCKER_SCHEMA1_SIGNED
}

fn schema1_error(what: &str) -> Error {
    Error::with_message(
        ErrorKind::NotImplemented,
        format!(
            "{what}: Docker Image Format v1 and Docker Image manifest version 2, schema 1 are not supported; push the image again with a current client (schema 2 or OCI)"
        ),
    )
}

/// Determines the media type of a fetched manifest body: the declared `mediaType` field
/// wins, then the Content-Type, then the shape (`manifests` → index).
pub fn detect_media_type(body: &[u8], content_type: Option<&str>, what: &str) -> Result<String> {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "schemaVersion", default)]
        schema_version: Option<i64>,
        #[serde(rename = "mediaType", default)]
        media_type: Option<String>,
        #[serde(default)]
        manifests: Option<serde_json::Value>,
        #[serde(default)]
        layers: Option<serde_json::Value>,
        #[serde(rename = "fsLayers", default)]
        fs_layers: Option<serde_json::Value>,
    }
    let ct = content_type
        .map(|c| c.split(';').next().unwrap_or_default().trim().to_string())
        .unwrap_or_default();
    if ct == DOCKER_SCHEMA1 || ct == DOCKER_SCHEMA1_SIGNED {
        return Err(schema1_error(what));
    }
    let p: Probe = serde_json::from_slice(body)
        .map_err(|e| Error::invalid_argument(format!("{what}: manifest is not valid JSON: {e}")))?;
    if p.schema_version == Some(1) || p.fs_layers.is_some() {
        return Err(schema1_error(what));
    }
    if let Some(mt) = p.media_type.filter(|m| !m.is_empty()) {
        if mt == DOCKER_SCHEMA1 || mt == DOCKER_SCHEMA1_SIGNED {
            return Err(schema1_error(what));
        }
        return Ok(mt);
    }
    if is_manifest_like(&ct) {
        return Ok(ct);
    }
    if p.manifests.is_some() {
        return Ok(OCI_INDEX.into());
    }
    if p.layers.is_some() {
        return Ok(OCI_MANIFEST.into());
    }
    Err(Error::invalid_argument(format!(
        "{what}: unknown manifest media type {ct:?}"
    )))
}

pub fn parse_manifest(body: &[u8], what: &str) -> Result<ImageManifest> {
    ImageManifest::from_reader(body)
        .map_err(|e| Error::invalid_argument(format!("{what}: invalid image manifest: {e}")))
}

pub fn parse_index(body: &[u8], what: &str) -> Result<ImageIndex> {
    ImageIndex::from_reader(body)
        .map_err(|e| Error::invalid_argument(format!("{what}: invalid image index: {e}")))
}

/// The descriptor's platform as ours.
pub fn descriptor_platform(d: &Descriptor) -> Option<Platform> {
    d.platform().as_ref().map(|p| {
        Platform::new(
            &p.os().to_string(),
            &p.architecture().to_string(),
            p.variant().as_deref().unwrap_or_default(),
        )
    })
}

/// Picks the manifest of `index` that best serves `want` (first best in index order).
/// Entries without a platform are skipped, as are attestation manifests
/// (`vnd.docker.reference.type`).
pub fn select_platform(index: &ImageIndex, want: &Platform, what: &str) -> Result<Descriptor> {
    let mut best: Option<(usize, &Descriptor)> = None;
    let mut seen = vec![];
    for d in index.manifests() {
        if !is_manifest(d.media_type().as_ref()) && !is_index(d.media_type().as_ref()) {
            continue;
        }
        let Some(p) = descriptor_platform(d) else {
            continue;
        };
        seen.push(p.to_string());
        if let Some(rank) = want.match_rank(&p)
            && best.is_none_or(|(r, _)| rank < r)
        {
            best = Some((rank, d));
        }
    }
    best.map(|(_, d)| d.clone()).ok_or_else(|| {
        Error::not_found(format!(
            "{what}: no match for platform {want} in manifest list (has: {})",
            if seen.is_empty() {
                "none".to_string()
            } else {
                seen.join(", ")
            }
        ))
    })
}

/// Which manifests of an index a walk takes: containerd 2.x's image store filter
/// (`ImageStore.platforms`, `all_metadata`, `manifest_limit`; its `ImageFilter`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ManifestFilter {
    /// Platforms taken whole, in order of preference; empty: every platform.
    pub platforms: Vec<Platform>,
    /// The other platforms' manifests are taken too, for their metadata only (manifest
    /// and config, no layers): containerd's `FilterManifestByPlatformHandler`.
    pub all_metadata: bool,
    /// At most this many manifests of each index, preferred platforms first (0: no
    /// limit): containerd's `LimitManifests`.
    pub manifest_limit: usize,
}

impl ManifestFilter {
    /// Whether a manifest of platform `p` is taken whole (no platform: always, as
    /// containerd's platform filters let such entries through).
    pub fn matches(&self, p: Option<&Platform>) -> bool {
        match p {
            None => true,
            Some(p) => {
                self.platforms.is_empty()
                    || self.platforms.iter().any(|w| w.match_rank(p).is_some())
            }
        }
    }

    /// containerd's `platforms.Ordered(...).Less` as a sort key: the first wanted
    /// platform an entry matches; entries matching none after those, entries without a
    /// platform last.
    fn preference(&self, p: Option<&Platform>) -> usize {
        match p {
            None => usize::MAX,
            Some(p) => self
                .platforms
                .iter()
                .position(|w| w.match_rank(p).is_some())
                .unwrap_or(self.platforms.len()),
        }
    }

    /// The entries of an index the walk continues with, each with whether it is taken
    /// whole (`true`) or for its metadata only, in the order containerd walks them.
    pub fn select(&self, manifests: &[Descriptor], what: &str) -> Result<Vec<(Descriptor, bool)>> {
        let mut out: Vec<(Descriptor, bool)> = vec![];
        for m in manifests {
            let p = descriptor_platform(m);
            if self.matches(p.as_ref()) {
                out.push((m.clone(), true));
            } else if self.all_metadata {
                out.push((m.clone(), false));
            }
        }
        if self.manifest_limit > 0 {
            if !self.platforms.is_empty() {
                out.sort_by_key(|(m, _)| self.preference(descriptor_platform(m).as_ref()));
            } else {
                // `platforms.All` orders nothing; entries without a platform still last.
                out.sort_by_key(|(m, _)| descriptor_platform(m).is_none());
            }
            if out.is_empty() {
                return Err(Error::not_found(format!(
                    "{what}: no match for platform in manifest"
                )));
            }
            out.truncate(self.manifest_limit);
        }
        Ok(out)
    }
}

/// Our digest type from an oci-spec descriptor.
pub fn descriptor_digest(d: &Descriptor) -> Result<Digest> {
    Digest::parse(d.digest().as_ref())
}

/// The core descriptor (what the content store and image records carry).
pub fn to_core_descriptor(d: &Descriptor) -> berth_core::content::Descriptor {
    berth_core::content::Descriptor {
        media_type: d.media_type().to_string(),
        digest: d.digest().to_string(),
        size: d.size() as i64,
        annotations: d.annotations().clone().unwrap_or_default(),
    }
}

/// A descriptor for `body` of `media_type`.
pub fn descriptor_for(media_type: &str, body: &[u8]) -> Descriptor {
    use sha2::Digest as _;
    let d = Digest::sha256_from_bytes(&sha2::Sha256::digest(body));
    Descriptor::new(
        oci_spec::image::MediaType::from(media_type),
        body.len() as u64,
        oci_spec::image::Digest::try_from(d.as_str()).expect("valid sha256 digest"),
    )
}

/// containerd's garbage-collection labels for a manifest or index body: the children it
/// references (`containerd.io/gc.ref.content.config`, `.l.<i>` for layers, `.m.<i>` for
/// an index's manifests). Empty for other media types or unparsable bodies.
pub fn gc_labels(media_type: &str, body: &[u8]) -> std::collections::HashMap<String, String> {
    let mut labels = std::collections::HashMap::new();
    if is_index(media_type) {
        if let Ok(idx) = parse_index(body, "index") {
            for (i, m) in idx.manifests().iter().enumerate() {
                labels.insert(
                    format!("containerd.io/gc.ref.content.m.{i}"),
                    m.digest().to_string(),
                );
            }
        }
    } else if is_manifest(media_type)
        && let Ok(m) = parse_manifest(body, "manifest")
    {
        labels.insert(
            "containerd.io/gc.ref.content.config".into(),
            m.config().digest().to_string(),
        );
        for (i, l) in m.layers().iter().enumerate() {
            labels.insert(
                format!("containerd.io/gc.ref.content.l.{i}"),
                l.digest().to_string(),
            );
        }
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema1_is_refused_clearly() {
        let s1 = br#"{"schemaVersion":1,"name":"x","tag":"y","fsLayers":[]}"#;
        let e = detect_media_type(s1, Some("application/json"), "x").unwrap_err();
        assert!(e.is(ErrorKind::NotImplemented));
        assert!(e.to_string().contains("schema 1"), "{e}");
        let e = detect_media_type(b"{}", Some(DOCKER_SCHEMA1_SIGNED), "x").unwrap_err();
        assert!(e.is(ErrorKind::NotImplemented));
    }

    #[test]
    fn media_types() {
        let idx = br#"{"schemaVersion":2,"manifests":[]}"#;
        assert_eq!(detect_media_type(idx, None, "x").unwrap(), OCI_INDEX);
        let m = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{},"layers":[]}"#;
        assert_eq!(
            detect_media_type(m, Some(OCI_MANIFEST), "x").unwrap(),
            DOCKER_MANIFEST
        );
    }

    #[test]
    fn platform_selection() {
        let idx = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[
              {{"mediaType":"{OCI_MANIFEST}","digest":"sha256:{a}","size":1,"platform":{{"os":"linux","architecture":"arm","variant":"v6"}}}},
              {{"mediaType":"{OCI_MANIFEST}","digest":"sha256:{b}","size":1,"platform":{{"os":"linux","architecture":"arm","variant":"v7"}}}},
              {{"mediaType":"{OCI_MANIFEST}","digest":"sha256:{c}","size":1,"platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#,
            a = "a".repeat(64),
            b = "b".repeat(64),
            c = "c".repeat(64)
        );
        let idx = parse_index(idx.as_bytes(), "t").unwrap();
        let d = select_platform(&idx, &Platform::parse("linux/arm/v7").unwrap(), "t").unwrap();
        assert!(d.digest().to_string().contains("bbbb"));
        let d = select_platform(&idx, &Platform::parse("linux/amd64").unwrap(), "t").unwrap();
        assert!(d.digest().to_string().contains("cccc"));
        let e = select_platform(&idx, &Platform::parse("linux/s390x").unwrap(), "t").unwrap_err();
        assert!(e.is(ErrorKind::NotFound));
        assert!(e.to_string().contains("linux/arm/v7"), "{e}");
    }

    #[test]
    fn manifest_filter_as_containerds_image_store() {
        let e = |d: char, p: Option<&str>| {
            let platform = p
                .map(|p| {
                    let (os, arch) = p.split_once('/').unwrap();
                    format!(r#","platform":{{"os":"{os}","architecture":"{arch}"}}"#)
                })
                .unwrap_or_default();
            format!(
                r#"{{"mediaType":"{OCI_MANIFEST}","digest":"sha256:{}","size":1{platform}}}"#,
                d.to_string().repeat(64)
            )
        };
        let idx = format!(
            r#"{{"schemaVersion":2,"manifests":[{},{},{},{}]}}"#,
            e('a', Some("linux/amd64")),
            e('b', Some("linux/arm64")),
            e('c', None),
            e('d', Some("linux/s390x")),
        );
        let idx = parse_index(idx.as_bytes(), "t").unwrap();
        let pick = |f: &ManifestFilter| -> Vec<(char, bool)> {
            f.select(idx.manifests(), "t")
                .unwrap()
                .iter()
                .map(|(d, whole)| (d.digest().to_string().chars().nth(7).unwrap(), *whole))
                .collect()
        };
        let amd = Platform::parse("linux/amd64").unwrap();
        let arm = Platform::parse("linux/arm64").unwrap();
        // Every platform.
        let all = ManifestFilter::default();
        assert_eq!(
            pick(&all),
            [('a', true), ('b', true), ('c', true), ('d', true)]
        );
        // One platform: entries without a platform pass.
        let one = ManifestFilter {
            platforms: vec![amd.clone()],
            ..Default::default()
        };
        assert_eq!(pick(&one), [('a', true), ('c', true)]);
        // all_metadata: the others for their metadata.
        let meta = ManifestFilter {
            all_metadata: true,
            ..one.clone()
        };
        assert_eq!(
            pick(&meta),
            [('a', true), ('b', false), ('c', true), ('d', false)]
        );
        // A limit: preferred platforms first, entries without a platform last.
        let limited = ManifestFilter {
            platforms: vec![arm.clone(), amd.clone()],
            manifest_limit: 2,
            ..Default::default()
        };
        assert_eq!(pick(&limited), [('b', true), ('a', true)]);
        let limited_meta = ManifestFilter {
            platforms: vec![arm],
            all_metadata: true,
            manifest_limit: 3,
        };
        assert_eq!(
            pick(&limited_meta),
            [('b', true), ('a', false), ('d', false)]
        );
        // Nothing left under a limit: NotFound.
        let none = ManifestFilter {
            platforms: vec![Platform::parse("linux/ppc64le").unwrap()],
            manifest_limit: 1,
            ..Default::default()
        };
        let only_platformed = parse_index(
            format!(
                r#"{{"schemaVersion":2,"manifests":[{}]}}"#,
                e('a', Some("linux/amd64"))
            )
            .as_bytes(),
            "t",
        )
        .unwrap();
        let err = none.select(only_platformed.manifests(), "t").unwrap_err();
        assert!(err.is(ErrorKind::NotFound), "{err}");
    }
}
