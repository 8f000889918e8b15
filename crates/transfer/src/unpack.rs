//! Which images a transfer unpacks, and into which snapshotter: containerd 2.x's
//! `getSupportedPlatform` (each `ImageStore.unpacks` entry against the platforms and
//! snapshotters the service supports) and its unpacker's choice per image (the image
//! config's platform against the supported platform: only its OS unless
//! `check_platform_supported`).

use crate::{ImageStore, LocalTransfer};
use berth_core::labels::Labels;
use berth_core::snapshot::Snapshotter;
use berth_core::{Error, Result};
use berth_remotes::Platform;
use std::sync::Arc;

/// One supported unpack an `ImageStore.unpacks` entry matched.
#[derive(Debug, Clone)]
pub(crate) struct UnpackTarget {
    /// The supported platform (what image platforms are matched against).
    pub platform: Platform,
    pub snapshotter: String,
    /// Only the OS must match (containerd's `platforms.OnlyOS` when
    /// `check_platform_supported` is off).
    pub os_only: bool,
}

impl UnpackTarget {
    pub(crate) fn matches(&self, image: &Platform) -> bool {
        if self.os_only {
            image.os == self.platform.os
        } else {
            self.platform.match_rank(image).is_some()
        }
    }
}

/// The supported unpacks the destination's `unpacks` select (containerd's
/// `getSupportedPlatform` for each, unsupported ones skipped with a warning).
pub(crate) fn targets(t: &LocalTransfer, dst: &ImageStore) -> Vec<UnpackTarget> {
    let os_only = !t.config.check_platform_supported;
    let host = Platform::host();
    let mut out: Vec<UnpackTarget> = vec![];
    for u in &dst.unpacks {
        // Berth: an unpack without a platform means this machine's.
        let wanted = u.platform.clone().unwrap_or_else(|| host.clone());
        let supported_matches = |p: &Platform| {
            if os_only {
                p.os == wanted.os
            } else {
                p.match_rank(&wanted).is_some()
            }
        };
        let chosen = match &t.config.unpack_config {
            // Berth's default: this machine's platform with any loaded snapshotter.
            None => supported_matches(&host).then(|| UnpackTarget {
                platform: host.clone(),
                snapshotter: if u.snapshotter.is_empty() {
                    t.config.snapshotter.clone()
                } else {
                    u.snapshotter.clone()
                },
                os_only,
            }),
            Some(list) => {
                let mut chosen: Option<UnpackTarget> = None;
                for sp in list {
                    let Ok(p) = Platform::parse(&sp.platform) else {
                        continue;
                    };
                    if !supported_matches(&p) {
                        continue;
                    }
                    let target = UnpackTarget {
                        platform: p,
                        snapshotter: sp.snapshotter.clone(),
                        os_only,
                    };
                    if u.snapshotter == sp.snapshotter {
                        chosen = Some(target);
                        break;
                    }
                    if u.snapshotter.is_empty() {
                        if sp.snapshotter == t.config.snapshotter {
                            chosen = Some(target);
                            break;
                        }
                        if chosen.is_none() {
                            chosen = Some(target);
                        }
                    }
                }
                chosen
            }
        };
        match chosen {
            Some(c) => {
                if t.snapshotters.get(&c.snapshotter).is_err() {
                    tracing::warn!(snapshotter = %c.snapshotter, "unpack configuration not supported (no such snapshotter), skipping");
                    continue;
                }
                out.push(c);
            }
            None => tracing::warn!(
                platform = %wanted,
                snapshotter = %u.snapshotter,
                "unpack configuration not supported, skipping"
            ),
        }
    }
    out
}

/// The platform and rootfs type of an image configuration (containerd's
/// `unpackConfig`), normalized.
pub(crate) fn config_platform(config: &[u8]) -> Result<(Platform, String)> {
    let v: serde_json::Value = serde_json::from_slice(config)
        .map_err(|e| Error::invalid_argument(format!("image config: {e}")))?;
    let s = |k: &str| {
        v.get(k)
            .and_then(|x| x.as_str())
            .unwrap_or_default()
            .to_string()
    };
    let rootfs = v
        .pointer("/rootfs/type")
        .and_then(|x| x.as_str())
        .unwrap_or_default()
        .to_string();
    Ok((
        Platform::new(&s("os"), &s("architecture"), &s("variant")),
        rootfs,
    ))
}

/// Whether a media type is a layer containerd's unpacker applies (`images.IsLayerType`).
pub(crate) fn is_layer_type(media_type: &str) -> bool {
    media_type.starts_with("application/vnd.oci.image.layer.")
        || media_type.starts_with("application/vnd.docker.image.rootfs.")
}

/// The target an image is unpacked with, if any: the first whose platform matches the
/// image's (containerd: "only the first match"), for images whose layers are all layer
/// types and whose rootfs is `layers`.
pub(crate) fn target_for<'a>(
    targets: &'a [UnpackTarget],
    config: &[u8],
    layer_types: &[&str],
) -> Result<Option<&'a UnpackTarget>> {
    if layer_types.is_empty() || !layer_types.iter().all(|m| is_layer_type(m)) {
        return Ok(None);
    }
    let (platform, rootfs) = config_platform(config)?;
    if !rootfs.is_empty() && rootfs != "layers" {
        return Ok(None);
    }
    Ok(targets.iter().find(|t| t.matches(&platform)))
}

/// A snapshotter of the namespace, under the transfer's lease.
pub(crate) fn snapshotter(
    t: &LocalTransfer,
    ns: &str,
    name: &str,
    lease_id: &str,
) -> Result<Arc<dyn Snapshotter>> {
    let db = t.snapshotters.get(name)?;
    Ok(Arc::new(db.namespaced(ns, Some(lease_id.to_string()))))
}

/// containerd's unpacker's last step: the config refers to the top snapshot, so the
/// collector keeps the chain while the image exists.
pub(crate) fn snapshot_label(snapshotter: &str, top: &str) -> (String, Labels) {
    let key = format!("containerd.io/gc.ref.snapshot.{snapshotter}");
    let mut labels = Labels::new();
    labels.insert(key.clone(), top.to_string());
    (key, labels)
}
