//! Unpacking through the public API, as `ctr images pull` does, but pipelined: a
//! [`LayerHook`] that applies each layer as soon as it and its parent are ready, while
//! later layers are still downloading. For layer *i* with chain ID *c*: if snapshot *c*
//! exists it is reused; otherwise `Snapshots.Prepare(key, parent)`, `Diff.Apply(layer,
//! mounts)` (the applied digest must be the config's diff ID), `Snapshots.Commit(c, key)`.
//! The config is then labelled `containerd.io/gc.ref.snapshot.<snapshotter>=<top chain>`
//! so the collector keeps the snapshots while the image exists.

use crate::client::{Client, status_message};
use berth_api::services::content::v1::{Info, UpdateRequest};
use berth_api::services::diff::v1::ApplyRequest;
use berth_api::services::diff::v1::diff_client::DiffClient;
use berth_api::services::snapshots::v1::snapshots_client::SnapshotsClient;
use berth_api::services::snapshots::v1::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use berth_core::content::Digest;
use berth_core::{Error, Result};
use berth_remotes::pull::{ImageInfo, LayerHook};
use oci_spec::image::Descriptor;
use sha2::Digest as _;
use std::sync::Mutex;

/// containerd's chain IDs: `chain[0] = diff[0]`, `chain[i] = sha256(chain[i-1] + " " + diff[i])`.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => {
                Digest::sha256_from_bytes(&sha2::Sha256::digest(format!("{prev} {d}"))).to_string()
            }
        };
        out.push(next);
    }
    out
}

/// The `rootfs.diff_ids` of an image configuration.
pub fn diff_ids(config: &[u8]) -> Result<Vec<String>> {
    let v: serde_json::Value = serde_json::from_slice(config)
        .map_err(|e| Error::invalid_argument(format!("image config: {e}")))?;
    Ok(v.get("rootfs")
        .and_then(|r| r.get("diff_ids"))
        .and_then(|d| d.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

pub struct Unpacker {
    pub client: Client,
    pub snapshotter: String,
    /// The chain ID of the last applied layer.
    pub top: Mutex<Option<String>>,
}

fn err(what: &str, s: tonic::Status) -> Error {
    Error::unknown(status_message(what, &s))
}

impl Unpacker {
    fn snapshots(&self) -> SnapshotsClient<tonic::transport::Channel> {
        SnapshotsClient::new(self.client.channel())
    }

    async fn apply(
        &self,
        layer: &Descriptor,
        diff_id: &str,
        chain: &str,
        parent: &str,
    ) -> Result<()> {
        let c = &self.client;
        let stat = self
            .snapshots()
            .stat(c.request(StatSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                key: chain.to_string(),
            }))
            .await;
        match stat {
            Ok(_) => return Ok(()),
            Err(s) if s.code() == tonic::Code::NotFound => {}
            Err(s) => return Err(err(&format!("stat snapshot {chain}"), s)),
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let key = format!("extract-{nanos} {chain}");
        let mounts = self
            .snapshots()
            .prepare(c.request(PrepareSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                key: key.clone(),
                parent: parent.to_string(),
                labels: Default::default(),
            }))
            .await
            .map_err(|s| err(&format!("prepare snapshot for layer {}", layer.digest()), s))?
            .into_inner()
            .mounts;
        let result = async {
            let applied = DiffClient::new(c.channel())
                .apply(c.request(ApplyRequest {
                    diff: Some(crate::to_api_descriptor(layer)),
                    mounts,
                    payloads: Default::default(),
                    sync_fs: false,
                }))
                .await
                .map_err(|s| err(&format!("apply layer {}", layer.digest()), s))?
                .into_inner()
                .applied
                .unwrap_or_default();
            if applied.digest != diff_id {
                return Err(Error::invalid_argument(format!(
                    "layer {}: applied diff {} does not match the config's diff ID {diff_id}",
                    layer.digest(),
                    applied.digest
                )));
            }
            match self
                .snapshots()
                .commit(c.request(CommitSnapshotRequest {
                    snapshotter: self.snapshotter.clone(),
                    name: chain.to_string(),
                    key: key.clone(),
                    labels: Default::default(),
                }))
                .await
            {
                Ok(_) => Ok(()),
                Err(s) if s.code() == tonic::Code::AlreadyExists => {
                    Err(Error::already_exists(chain))
                }
                Err(s) => Err(err(&format!("commit snapshot {chain}"), s)),
            }
        }
        .await;
        if result.is_err() {
            let _ = self
                .snapshots()
                .remove(c.request(RemoveSnapshotRequest {
                    snapshotter: self.snapshotter.clone(),
                    key,
                }))
                .await;
        }
        match result {
            // Unpacked concurrently by someone else: theirs is as good.
            Err(e) if e.is(berth_core::error::ErrorKind::AlreadyExists) => Ok(()),
            r => r,
        }
    }

    /// Labels the config so the collector keeps the unpacked snapshots.
    pub async fn label_config(&self, image: &ImageInfo) -> Result<()> {
        let Some(top) = self.top.lock().unwrap().clone() else {
            return Ok(());
        };
        let key = format!("containerd.io/gc.ref.snapshot.{}", self.snapshotter);
        let c = &self.client;
        let mut labels = std::collections::HashMap::new();
        labels.insert(key.clone(), top);
        c.content()
            .update(c.request(UpdateRequest {
                info: Some(Info {
                    digest: image.config.digest().to_string(),
                    labels,
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec![format!("labels.{key}")],
                }),
            }))
            .await
            .map_err(|s| err("label image config", s))?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl LayerHook for Unpacker {
    async fn layer_ready(&self, index: usize, layer: &Descriptor, image: &ImageInfo) -> Result<()> {
        let diffs = diff_ids(&image.config_body)?;
        if diffs.len() != image.layers.len() {
            return Err(Error::invalid_argument(format!(
                "{}: config has {} diff IDs for {} layers",
                image.name,
                diffs.len(),
                image.layers.len()
            )));
        }
        let chains = chain_ids(&diffs);
        let parent = if index == 0 {
            String::new()
        } else {
            chains[index - 1].clone()
        };
        self.apply(layer, &diffs[index], &chains[index], &parent)
            .await?;
        *self.top.lock().unwrap() = Some(chains[index].clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_containerd() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let c = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(c[0], a);
        let want = Digest::sha256_from_bytes(&sha2::Sha256::digest(format!("{a} {b}"))).to_string();
        assert_eq!(c[1], want);
    }
}
