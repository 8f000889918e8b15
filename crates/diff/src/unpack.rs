//! The daemon-side unpacker: applies an image's layers onto a snapshotter as snapshots
//! named by their chain IDs, the way containerd's unpacker does, for the pull pipeline's
//! layer hook (`berth-remotes`' `LayerHook::layer_ready` calls [`Unpacker::layer`] for
//! layer 0, 1, 2, … as each arrives, so downloads of later layers overlap the apply of
//! earlier ones), CRI and the CLI.
//!
//! For each layer: if the snapshot of its chain ID exists it is reused; otherwise an
//! active snapshot `extract-<nanos>-<chainID>` is prepared on the parent chain, the layer
//! applied (its uncompressed digest checked against the image config's diffID) and the
//! snapshot committed as the chain ID with the `containerd.io/uncompressed` label.
//!
//! Remote snapshotters (stargz, nydus), as containerd's unpacker: the prepare carries
//! `containerd.io/snapshot.ref=<chainID>` and the layer descriptor's
//! `containerd.io/snapshot/*` annotations as labels (the `cri.*` ones that
//! [`append_info_annotations`] adds tell the snapshotter which image and layer it is).
//! A snapshotter that can serve the layer itself answers AlreadyExists and the metadata
//! layer records the chain ID; the layer is then neither applied nor needed locally.

use berth_core::content::{Descriptor, Scope};
use berth_core::diff::{Applier, ApplyConfig};
use berth_core::error::ErrorKind;
use berth_core::labels::Labels;
use berth_core::snapshot::{LABEL_SNAPSHOT_PREFIX, LABEL_SNAPSHOT_REF, Snapshotter};
use berth_core::{Error, Result};
use sha2::{Digest as _, Sha256};
use std::sync::{Arc, Mutex};

/// containerd's chain ID: `chain[0] = diff[0]`, `chain[i] = sha256(chain[i-1] + " " + diff[i])`.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => format!(
                "sha256:{}",
                hex::encode(Sha256::digest(format!("{prev} {d}").as_bytes()))
            ),
        };
        out.push(next);
    }
    out
}

/// The image reference, passed to remote snapshotters (containerd's `TargetRefLabel`).
pub const TARGET_REF_LABEL: &str = "containerd.io/snapshot/cri.image-ref";
/// The manifest digest (`TargetManifestDigestLabel`).
pub const TARGET_MANIFEST_DIGEST_LABEL: &str = "containerd.io/snapshot/cri.manifest-digest";
/// The layer's digest (`TargetLayerDigestLabel`).
pub const TARGET_LAYER_DIGEST_LABEL: &str = "containerd.io/snapshot/cri.layer-digest";
/// This and the following layers' digests, comma-separated, as many as fit in a label
/// (`TargetImageLayersLabel`; a snapshotter may prefetch them).
pub const TARGET_IMAGE_LAYERS_LABEL: &str = "containerd.io/snapshot/cri.image-layers";

/// Annotates an image's layer descriptors for remote snapshotters, as containerd's
/// `snapshotters.AppendInfoHandlerWrapper` does during a pull: the unpacker passes a
/// layer's `containerd.io/snapshot/*` annotations to the snapshotter as labels.
pub fn append_info_annotations(image_ref: &str, manifest_digest: &str, layers: &mut [Descriptor]) {
    let digests: Vec<String> = layers.iter().map(|l| l.digest.clone()).collect();
    for (i, layer) in layers.iter_mut().enumerate() {
        let mut list = String::new();
        for d in &digests[i..] {
            let item = if list.is_empty() {
                d.clone()
            } else {
                format!("{list},{d}")
            };
            // As containerd: stop before the label would be too large.
            if berth_core::labels::validate(TARGET_IMAGE_LAYERS_LABEL, &item).is_err() {
                break;
            }
            list = item;
        }
        let a = &mut layer.annotations;
        a.insert(TARGET_REF_LABEL.into(), image_ref.into());
        a.insert(TARGET_LAYER_DIGEST_LABEL.into(), layer.digest.clone());
        a.insert(TARGET_IMAGE_LAYERS_LABEL.into(), list);
        a.insert(TARGET_MANIFEST_DIGEST_LABEL.into(), manifest_digest.into());
    }
}

/// What [`Unpacker::layer`] did with a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerOutcome {
    /// Its chain ID's snapshot existed in the namespace already.
    Existed,
    /// The snapshotter had it (a remote snapshotter): nothing was applied.
    Remote,
    /// Applied and committed.
    Applied,
}

/// Unpacks one image's layers in order.
pub struct Unpacker {
    snapshotter: Arc<dyn Snapshotter>,
    applier: Arc<dyn Applier>,
    scope: Scope,
    diff_ids: Vec<String>,
    chain: Vec<String>,
    /// Labels added to every committed layer snapshot (e.g. a GC reference or lease hint).
    labels: Labels,
    done: Mutex<usize>,
}

impl Unpacker {
    pub fn new(
        snapshotter: Arc<dyn Snapshotter>,
        applier: Arc<dyn Applier>,
        scope: Scope,
        diff_ids: Vec<String>,
        labels: Labels,
    ) -> Unpacker {
        let chain = chain_ids(&diff_ids);
        Unpacker {
            snapshotter,
            applier,
            scope,
            diff_ids,
            chain,
            labels,
            done: Mutex::new(0),
        }
    }

    /// The uncompressed digest (diffID) the image config gives layer `index`.
    pub fn diff_id(&self, index: usize) -> Option<&str> {
        self.diff_ids.get(index).map(String::as_str)
    }

    /// The chain ID of the top layer (the image's snapshot name).
    pub fn top(&self) -> Option<&str> {
        self.chain.last().map(String::as_str)
    }

    /// Applies layer `index` (whose parent must already be unpacked).
    pub async fn layer(&self, index: usize, desc: &Descriptor) -> Result<()> {
        self.layer_outcome(index, desc).await.map(|_| ())
    }

    /// [`Unpacker::layer`], saying whether the layer was applied.
    pub async fn layer_outcome(&self, index: usize, desc: &Descriptor) -> Result<LayerOutcome> {
        let done = *self.done.lock().unwrap();
        if index != done {
            return Err(Error::failed_precondition(format!(
                "layer {index} unpacked out of order (next is {done})"
            )));
        }
        let diff_id = self.diff_ids.get(index).ok_or_else(|| {
            Error::invalid_argument(format!("layer {index}: the image config has no diffID"))
        })?;
        let chain_id = &self.chain[index];
        let parent = if index == 0 {
            ""
        } else {
            self.chain[index - 1].as_str()
        };
        match self.snapshotter.stat(chain_id).await {
            Ok(_) => {
                *self.done.lock().unwrap() += 1;
                return Ok(LayerOutcome::Existed);
            }
            Err(e) if e.is(ErrorKind::NotFound) => {}
            Err(e) => return Err(e),
        }
        // What a remote snapshotter needs to find the layer itself.
        let mut prepare_labels: Labels = desc
            .annotations
            .iter()
            .filter(|(k, _)| k.starts_with(LABEL_SNAPSHOT_PREFIX))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        prepare_labels.insert(LABEL_SNAPSHOT_REF.into(), chain_id.clone());
        let mut prepared = None;
        for _ in 0..3 {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let key = format!("extract-{nanos}-{chain_id}");
            match self
                .snapshotter
                .prepare(&key, parent, prepare_labels.clone())
                .await
            {
                Ok(mounts) => {
                    prepared = Some((key, mounts));
                    break;
                }
                // The snapshotter has the chain (remote), or another unpack made it
                // meanwhile; if the chain ID is not there after all, the key collided:
                // try another.
                Err(e) if e.is(ErrorKind::AlreadyExists) => {
                    match self.snapshotter.stat(chain_id).await {
                        Ok(_) => {
                            *self.done.lock().unwrap() += 1;
                            return Ok(LayerOutcome::Remote);
                        }
                        Err(e) if e.is(ErrorKind::NotFound) => continue,
                        Err(e) => {
                            return Err(e.context(format!("failed to stat snapshot {chain_id}")));
                        }
                    }
                }
                Err(e) => {
                    return Err(e.context(format!("failed to prepare extraction snapshot {key:?}")));
                }
            }
        }
        let Some((key, mounts)) = prepared else {
            return Err(Error::already_exists(format!(
                "unable to prepare extraction snapshot for {chain_id}"
            )));
        };
        let config = ApplyConfig {
            expected_diff_id: Some(diff_id.clone()),
            ..Default::default()
        };
        let applied = self.applier.apply(&self.scope, desc, &mounts, config).await;
        if let Err(e) = applied {
            let _ = self.snapshotter.remove(&key).await;
            return Err(e.context(format!("applying layer {}", desc.digest)));
        }
        // As containerd's, the committed layer keeps the target labels too.
        let mut labels = prepare_labels;
        labels.extend(self.labels.clone());
        labels.insert(berth_core::labels::UNCOMPRESSED.into(), diff_id.clone());
        match self.snapshotter.commit(chain_id, &key, labels).await {
            Ok(()) => {}
            // Someone else unpacked the same chain meanwhile: theirs is as good.
            Err(e) if e.is(ErrorKind::AlreadyExists) => {
                let _ = self.snapshotter.remove(&key).await;
            }
            Err(e) => {
                let _ = self.snapshotter.remove(&key).await;
                return Err(e);
            }
        }
        *self.done.lock().unwrap() += 1;
        Ok(LayerOutcome::Applied)
    }

    /// Applies every layer in order.
    pub async fn unpack_all(&self, layers: &[Descriptor]) -> Result<String> {
        for (i, layer) in layers.iter().enumerate() {
            self.layer(i, layer).await?;
        }
        self.top()
            .map(str::to_string)
            .ok_or_else(|| Error::invalid_argument("image without layers"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_are_annotated_for_remote_snapshotters() {
        let layer = |d: &str| Descriptor {
            digest: d.into(),
            ..Default::default()
        };
        let mut layers = vec![layer("sha256:a"), layer("sha256:b")];
        append_info_annotations("example.com/i:1", "sha256:m", &mut layers);
        let a = &layers[0].annotations;
        assert_eq!(a[TARGET_REF_LABEL], "example.com/i:1");
        assert_eq!(a[TARGET_MANIFEST_DIGEST_LABEL], "sha256:m");
        assert_eq!(a[TARGET_LAYER_DIGEST_LABEL], "sha256:a");
        assert_eq!(a[TARGET_IMAGE_LAYERS_LABEL], "sha256:a,sha256:b");
        assert_eq!(layers[1].annotations[TARGET_IMAGE_LAYERS_LABEL], "sha256:b");
        // The list stops before the label would exceed containerd's size limit.
        let mut many: Vec<Descriptor> = (0..100)
            .map(|i| layer(&format!("sha256:{i:064}")))
            .collect();
        append_info_annotations("r", "sha256:m", &mut many);
        let list = &many[0].annotations[TARGET_IMAGE_LAYERS_LABEL];
        assert!(TARGET_IMAGE_LAYERS_LABEL.len() + list.len() <= berth_core::labels::MAX_LABEL_SIZE);
        assert!(list.split(',').count() > 40 && list.split(',').count() < 100);
    }

    #[test]
    fn chain_ids_match_containerd() {
        // The chain of busybox-like single and double layer images.
        let a = "sha256:aaaa".to_string();
        let b = "sha256:bbbb".to_string();
        let chain = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(chain[0], a);
        let expected = format!(
            "sha256:{}",
            hex::encode(Sha256::digest(b"sha256:aaaa sha256:bbbb"))
        );
        assert_eq!(chain[1], expected);
    }
}
