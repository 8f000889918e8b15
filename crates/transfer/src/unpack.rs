//! Which images a transfer unpacks, and into which snapshotter: containerd 2.x's
//! `getSupportedPlatform` (each `ImageStore.unpacks` entry against the platforms and
//! snapshotters the service supports) and its unpacker's choice per image (the image
//! config's platform against the supported platform: only its OS unless
//! `check_platform_supported`).

use crate::{ImageStore, LocalTransfer, TransferConfig, Unpack, blocking};
use berth_core::content::{ContentStore, Digest, Info, Scope};
use berth_core::labels::Labels;
use berth_core::snapshot::Snapshotter;
use berth_core::{Error, Result};
use berth_diff::unpack::{LayerOutcome, Unpacker};
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
    select(&t.config, &Platform::host(), &dst.unpacks, &|name| {
        t.snapshotters.get(name).is_ok()
    })
}

/// [`targets`] for a configuration, this machine's platform and the snapshotters loaded.
pub(crate) fn select(
    config: &TransferConfig,
    host: &Platform,
    unpacks: &[Unpack],
    loaded: &dyn Fn(&str) -> bool,
) -> Vec<UnpackTarget> {
    let os_only = !config.check_platform_supported;
    let mut out: Vec<UnpackTarget> = vec![];
    for u in unpacks {
        // Berth: an unpack without a platform means this machine's.
        let wanted = u.platform.clone().unwrap_or_else(|| host.clone());
        let supported_matches = |p: &Platform| {
            if os_only {
                p.os == wanted.os
            } else {
                p.match_rank(&wanted).is_some()
            }
        };
        let chosen = match &config.unpack_config {
            // Berth's default: this machine's platform with any loaded snapshotter.
            None => supported_matches(host).then(|| UnpackTarget {
                platform: host.clone(),
                snapshotter: if u.snapshotter.is_empty() {
                    config.snapshotter.clone()
                } else {
                    u.snapshotter.clone()
                },
                os_only,
            }),
            Some(list) => {
                let mut chosen: Option<UnpackTarget> = None;
                for sp in list {
                    let Ok(p) = Platform::parse(&sp.platform) else {
                        tracing::warn!(platform = %sp.platform, "unpack_config: not a platform");
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
                        // The default snapshotter is the best match; else the first.
                        if sp.snapshotter == config.snapshotter {
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
            Some(c) if loaded(&c.snapshotter) => out.push(c),
            Some(c) => tracing::warn!(
                snapshotter = %c.snapshotter,
                "unpack configuration not supported (no such snapshotter), skipping"
            ),
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

/// Applies layer `index` of `unpacker` and, when it was applied here (not found unpacked
/// already, not served by a remote snapshotter), labels the layer blob
/// `containerd.io/uncompressed=<diffID>` as containerd's unpacker does once the apply
/// verified the diffID: later imports, conversions and pushes find the uncompressed
/// digest without reading the blob.
pub(crate) async fn apply_layer(
    unpacker: &Unpacker,
    index: usize,
    layer: &berth_core::content::Descriptor,
    content: &Arc<dyn ContentStore>,
    scope: &Scope,
) -> Result<()> {
    if unpacker.layer_outcome(index, layer).await? != LayerOutcome::Applied {
        return Ok(());
    }
    let Some(diff_id) = unpacker.diff_id(index) else {
        return Ok(());
    };
    let info = Info {
        digest: Digest::parse(&layer.digest)?,
        size: 0,
        created_at: std::time::SystemTime::UNIX_EPOCH,
        updated_at: std::time::SystemTime::UNIX_EPOCH,
        labels: [(
            berth_core::labels::UNCOMPRESSED.to_string(),
            diff_id.to_string(),
        )]
        .into_iter()
        .collect(),
    };
    let (content, scope) = (content.clone(), scope.clone());
    let field = format!("labels.{}", berth_core::labels::UNCOMPRESSED);
    blocking(move || content.update(&scope, info, &[field]).map(|_| ()))
        .await
        .map_err(|e| e.context(format!("labelling layer {} with its diffID", layer.digest)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::UnpackPlatformConfig;

    fn p(s: &str) -> Platform {
        Platform::parse(s).unwrap()
    }

    fn unpack(platform: &str, snapshotter: &str) -> Unpack {
        Unpack {
            platform: (!platform.is_empty()).then(|| p(platform)),
            snapshotter: snapshotter.into(),
        }
    }

    fn chosen(config: &TransferConfig, unpacks: &[Unpack]) -> Vec<(String, String, bool)> {
        let loaded = |n: &str| ["overlayfs", "native"].contains(&n);
        select(config, &p("linux/amd64"), unpacks, &loaded)
            .into_iter()
            .map(|t| (t.platform.to_string(), t.snapshotter, t.os_only))
            .collect()
    }

    #[test]
    fn supported_unpacks_as_containerd() {
        let default = TransferConfig::default();
        // Berth's default: this machine's platform, any loaded snapshotter, the default
        // one for an empty request; matched by OS only.
        assert_eq!(
            chosen(&default, &[unpack("linux/arm64", ""), unpack("", "native")]),
            [
                ("linux/amd64".into(), "overlayfs".into(), true),
                ("linux/amd64".into(), "native".into(), true)
            ]
        );
        assert!(chosen(&default, &[unpack("windows/amd64", "")]).is_empty());
        assert!(chosen(&default, &[unpack("linux/amd64", "zfs")]).is_empty());
        // check_platform_supported: the architecture must match too.
        let strict = TransferConfig {
            check_platform_supported: true,
            ..Default::default()
        };
        assert!(chosen(&strict, &[unpack("linux/arm64", "")]).is_empty());
        assert_eq!(chosen(&strict, &[unpack("linux/amd64", "")]).len(), 1);
        // An explicit unpack_config: only its pairs.
        let configured = TransferConfig {
            unpack_config: Some(vec![
                UnpackPlatformConfig {
                    platform: "linux/amd64".into(),
                    snapshotter: "native".into(),
                },
                UnpackPlatformConfig {
                    platform: "linux/amd64".into(),
                    snapshotter: "overlayfs".into(),
                },
            ]),
            ..Default::default()
        };
        assert_eq!(
            chosen(&configured, &[unpack("linux/amd64", "")]),
            [("linux/amd64".into(), "overlayfs".into(), true)]
        );
        assert_eq!(
            chosen(&configured, &[unpack("linux/amd64", "native")]),
            [("linux/amd64".into(), "native".into(), true)]
        );
        assert!(chosen(&configured, &[unpack("linux/amd64", "btrfs")]).is_empty());
        let only_native = TransferConfig {
            unpack_config: Some(vec![UnpackPlatformConfig {
                platform: "linux/amd64".into(),
                snapshotter: "native".into(),
            }]),
            ..Default::default()
        };
        // An empty request takes the first match when the default is not offered.
        assert_eq!(
            chosen(&only_native, &[unpack("linux/amd64", "")]),
            [("linux/amd64".into(), "native".into(), true)]
        );
    }

    #[test]
    fn images_match_the_supported_platform() {
        let os_only = UnpackTarget {
            platform: p("linux/amd64"),
            snapshotter: "overlayfs".into(),
            os_only: true,
        };
        let strict = UnpackTarget {
            os_only: false,
            ..os_only.clone()
        };
        let config = |arch: &str, rootfs: &str| {
            format!(
                r#"{{"os":"linux","architecture":"{arch}","rootfs":{{"type":"{rootfs}","diff_ids":[]}}}}"#
            )
        };
        let layer = ["application/vnd.oci.image.layer.v1.tar+gzip"];
        let arm = config("arm64", "layers");
        assert!(
            target_for(std::slice::from_ref(&os_only), arm.as_bytes(), &layer)
                .unwrap()
                .is_some()
        );
        assert!(
            target_for(std::slice::from_ref(&strict), arm.as_bytes(), &layer)
                .unwrap()
                .is_none()
        );
        // Not layers (an attestation manifest) or another rootfs type: not unpacked.
        let amd = config("amd64", "layers");
        assert!(
            target_for(
                std::slice::from_ref(&strict),
                amd.as_bytes(),
                &["application/vnd.in-toto+json"]
            )
            .unwrap()
            .is_none()
        );
        let other = config("amd64", "other");
        assert!(
            target_for(std::slice::from_ref(&strict), other.as_bytes(), &layer)
                .unwrap()
                .is_none()
        );
        assert!(
            target_for(std::slice::from_ref(&strict), amd.as_bytes(), &layer)
                .unwrap()
                .is_some()
        );
    }
}
