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

use berth_core::content::{Descriptor, Scope};
use berth_core::diff::{Applier, ApplyConfig};
use berth_core::error::ErrorKind;
use berth_core::labels::Labels;
use berth_core::snapshot::Snapshotter;
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

    /// The chain ID of the top layer (the image's snapshot name).
    pub fn top(&self) -> Option<&str> {
        self.chain.last().map(String::as_str)
    }

    /// Applies layer `index` (whose parent must already be unpacked).
    pub async fn layer(&self, index: usize, desc: &Descriptor) -> Result<()> {
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
                return Ok(());
            }
            Err(e) if e.is(ErrorKind::NotFound) => {}
            Err(e) => return Err(e),
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let key = format!("extract-{nanos}-{chain_id}");
        let mounts = self
            .snapshotter
            .prepare(&key, parent, Labels::new())
            .await?;
        let config = ApplyConfig {
            expected_diff_id: Some(diff_id.clone()),
            ..Default::default()
        };
        let applied = self.applier.apply(&self.scope, desc, &mounts, config).await;
        if let Err(e) = applied {
            let _ = self.snapshotter.remove(&key).await;
            return Err(e.context(format!("applying layer {}", desc.digest)));
        }
        let mut labels = self.labels.clone();
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
        Ok(())
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
