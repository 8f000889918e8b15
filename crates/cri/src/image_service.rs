//! `runtime.v1.ImageService`, as containerd 1.6's CRI answers it, in the `k8s.io`
//! namespace: pulls go through the daemon-side transfer (`berth-transfer`) with unpack
//! into the configured snapshotter; the CRI's extra records (image ID, repo digest) and
//! removals go through the images service, so they publish containerd's image events and
//! a removal's collection runs as containerd's does.

use crate::api::{self, image_service_server::ImageService};
use crate::auth::PullCredentials;
use crate::images::{CriImage, user_of};
use crate::reference;
use crate::{CriService, K8S_NAMESPACE, MANAGED_LABEL, MANAGED_LABEL_VALUE};
use berth_api::any;
use berth_api::services::images::v1 as images_api;
use berth_api::services::images::v1::images_server::Images;
use berth_core::events::EventPublisher;
use berth_core::snapshot::Snapshotter;
use berth_remotes::Platform;
use berth_transfer::{CancellationToken, ImageStore, Object, Registry, TransferOptions, Unpack};
use std::collections::HashMap;
use std::sync::Arc;
use tonic::{Code, Request, Response, Status};

/// A request to Berth's own images service in the CRI's namespace.
fn in_namespace<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        berth_core::namespaces::GRPC_HEADER,
        tonic::metadata::MetadataValue::from_static(K8S_NAMESPACE),
    );
    request
}

/// A status with what the CRI call was doing in front of the cause's message.
fn context(status: Status, what: impl std::fmt::Display) -> Status {
    Status::new(status.code(), format!("{what}: {}", status.message()))
}

fn to_cri(image: &CriImage) -> api::Image {
    let (repo_tags, repo_digests) = reference::split_references(&image.references);
    let (uid, username) = user_of(&image.facts.user);
    api::Image {
        id: image.facts.id.clone(),
        repo_tags,
        repo_digests,
        size: image.facts.size,
        uid: uid.map(|value| api::Int64Value { value }),
        username,
        // containerd 1.6 has no pinned images (the pinned label came with 1.7).
        pinned: false,
        spec: None,
    }
}

/// containerd's verbose `ImageStatus` info: `{"chainID": …, "imageSpec": <config>}`.
fn verbose_info(image: &CriImage) -> HashMap<String, String> {
    let config = std::str::from_utf8(&image.facts.config)
        .ok()
        .filter(|c| serde_json::from_str::<serde_json::Value>(c).is_ok())
        .unwrap_or("null");
    let info = format!(
        "{{\"chainID\":{},\"imageSpec\":{}}}",
        serde_json::Value::String(image.facts.chain_id.clone()),
        config.trim()
    );
    HashMap::from([("info".to_string(), info)])
}

impl CriService {
    async fn view<T: Send + 'static>(
        &self,
        f: impl FnOnce(&crate::images::ImageView) -> berth_core::Result<T> + Send + 'static,
    ) -> Result<T, Status> {
        let view = self.inner.view.clone();
        tokio::task::spawn_blocking(move || f(&view))
            .await
            .map_err(|e| Status::internal(format!("image view task failed: {e}")))?
            .map_err(berth_services::status)
    }

    pub(crate) async fn resolve(&self, image: &str) -> Result<Option<CriImage>, Status> {
        let image = image.to_string();
        let shown = image.clone();
        self.view(move |v| v.resolve(&image))
            .await
            .map_err(|s| context(s, format_args!("can not resolve {shown:?} locally")))
    }

    /// containerd's `createImageReference`: a managed record `name` → `target`, created,
    /// or updated when it points elsewhere or lacks the label.
    async fn create_image_reference(
        &self,
        name: &str,
        target: &berth_core::content::Descriptor,
    ) -> Result<(), Status> {
        let labels = HashMap::from([(MANAGED_LABEL.to_string(), MANAGED_LABEL_VALUE.to_string())]);
        let image = images_api::Image {
            name: name.to_string(),
            labels,
            target: Some(berth_api::types::Descriptor {
                media_type: target.media_type.clone(),
                digest: target.digest.clone(),
                size: target.size,
                annotations: target.annotations.clone().into_iter().collect(),
            }),
            created_at: None,
            updated_at: None,
        };
        let images = &self.inner.images;
        let created = images
            .create(in_namespace(images_api::CreateImageRequest {
                image: Some(image.clone()),
                ..Default::default()
            }))
            .await;
        match created {
            Err(s) if s.code() == Code::AlreadyExists => {}
            other => return other.map(|_| ()),
        }
        let existing = images
            .get(in_namespace(images_api::GetImageRequest {
                name: name.to_string(),
            }))
            .await?
            .into_inner()
            .image
            .unwrap_or_default();
        let same_target =
            existing.target.as_ref().map(|t| t.digest.as_str()) == Some(target.digest.as_str());
        if same_target
            && existing.labels.get(MANAGED_LABEL).map(String::as_str) == Some(MANAGED_LABEL_VALUE)
        {
            return Ok(());
        }
        images
            .update(in_namespace(images_api::UpdateImageRequest {
                image: Some(image),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["target".into(), format!("labels.{MANAGED_LABEL}")],
                }),
                ..Default::default()
            }))
            .await
            .map(|_| ())
    }

    /// `/images/create|update` for the records a transfer wrote (what the transfer
    /// service publishes for its own pulls).
    fn publish_stored(&self, stored: &[berth_transfer::StoredImage]) {
        for s in stored {
            let labels = s.image.labels.clone().into_iter().collect();
            let name = s.image.name.clone();
            let published = if s.created {
                self.inner.events.publish(
                    K8S_NAMESPACE,
                    "/images/create",
                    any::pack(&images_api::ImageCreate { name, labels }),
                )
            } else {
                self.inner.events.publish(
                    K8S_NAMESPACE,
                    "/images/update",
                    any::pack(&images_api::ImageUpdate { name, labels }),
                )
            };
            if let Err(e) = published {
                tracing::warn!(error = %e, "publishing image event");
            }
        }
    }
}

#[tonic::async_trait]
impl ImageService for CriService {
    async fn list_images(
        &self,
        request: Request<api::ListImagesRequest>,
    ) -> Result<Response<api::ListImagesResponse>, Status> {
        let wanted = request
            .into_inner()
            .filter
            .and_then(|f| f.image)
            .map(|spec| spec.image)
            .filter(|image| !image.is_empty());
        let images = match wanted {
            Some(image) => self.resolve(&image).await?.into_iter().collect(),
            None => self.view(|v| v.list()).await?,
        };
        Ok(Response::new(api::ListImagesResponse {
            images: images.iter().map(to_cri).collect(),
        }))
    }

    async fn image_status(
        &self,
        request: Request<api::ImageStatusRequest>,
    ) -> Result<Response<api::ImageStatusResponse>, Status> {
        let request = request.into_inner();
        let image = request.image.map(|spec| spec.image).unwrap_or_default();
        // An unknown image is no error: the kubelet asks before it pulls.
        let Some(found) = self.resolve(&image).await? else {
            return Ok(Response::new(api::ImageStatusResponse::default()));
        };
        Ok(Response::new(api::ImageStatusResponse {
            image: Some(to_cri(&found)),
            info: if request.verbose {
                verbose_info(&found)
            } else {
                HashMap::new()
            },
        }))
    }

    async fn pull_image(
        &self,
        request: Request<api::PullImageRequest>,
    ) -> Result<Response<api::PullImageResponse>, Status> {
        let request = request.into_inner();
        let given = request.image.map(|spec| spec.image).unwrap_or_default();
        let parsed = reference::normalize(&given).map_err(|e| {
            Status::invalid_argument(format!(
                "failed to parse image reference {given:?}: {}",
                e.message()
            ))
        })?;
        let name = parsed.to_string();
        let config = &self.inner.config;
        let credentials = PullCredentials {
            request: request.auth,
            configured: config.registry.configs.clone(),
        };
        let source = Object::Registry(Registry {
            reference: name.clone(),
            host_dir: config.registry.config_path.clone(),
            credentials: Some(Arc::new(credentials)),
            ..Default::default()
        });
        let destination = Object::ImageStore(ImageStore {
            name: name.clone(),
            labels: [(MANAGED_LABEL.to_string(), MANAGED_LABEL_VALUE.to_string())]
                .into_iter()
                .collect(),
            // containerd's CRI pulls this machine's platform only.
            platforms: vec![Platform::host()],
            unpacks: vec![Unpack {
                platform: None,
                snapshotter: config.containerd.snapshotter.clone(),
            }],
            ..Default::default()
        });
        // The pull runs in its own task so that, when the kubelet gives up and tonic drops
        // this handler, it is cancelled (the guard) and still removes its lease.
        let cancel = CancellationToken::new();
        let guard = cancel.clone().drop_guard();
        let transfer = self.inner.transfer.clone();
        let options = TransferOptions {
            progress: None,
            cancel,
        };
        let pulled = tokio::spawn(async move {
            transfer
                .transfer(K8S_NAMESPACE, source, destination, options)
                .await
        })
        .await
        .map_err(|e| Status::internal(format!("pull task failed: {e}")))?;
        drop(guard.disarm());
        let failed =
            |s: Status| context(s, format_args!("failed to pull and unpack image {name:?}"));
        let stored = pulled.map_err(|e| failed(berth_services::status(e)))?;
        self.publish_stored(&stored);
        let target = stored
            .iter()
            .find(|s| s.image.name == name)
            .map(|s| s.image.target.clone())
            .ok_or_else(|| failed(Status::internal("the pull wrote no image record")))?;

        let target_for_view = target.clone();
        let facts = self
            .view(move |v| v.facts_for(&target_for_view))
            .await
            .map_err(|s| context(s, format_args!("failed to get image config of {name:?}")))?;
        let (repo_digest, repo_tag) = reference::repo_digest_and_tag(&parsed, &target.digest);
        for record in [Some(facts.id.clone()), repo_tag, Some(repo_digest)]
            .into_iter()
            .flatten()
        {
            self.create_image_reference(&record, &target)
                .await
                .map_err(|s| {
                    context(
                        s,
                        format_args!("failed to create image reference {record:?}"),
                    )
                })?;
        }
        tracing::debug!(image = %name, id = %facts.id, "CRI pull done");
        Ok(Response::new(api::PullImageResponse {
            image_ref: facts.id.clone(),
        }))
    }

    async fn remove_image(
        &self,
        request: Request<api::RemoveImageRequest>,
    ) -> Result<Response<api::RemoveImageResponse>, Status> {
        let image = request
            .into_inner()
            .image
            .map(|spec| spec.image)
            .unwrap_or_default();
        let Some(found) = self.resolve(&image).await? else {
            return Ok(Response::new(api::RemoveImageResponse {}));
        };
        let last = found.references.len().saturating_sub(1);
        for (i, name) in found.references.iter().enumerate() {
            // The last removal waits for the collection, so the image's content and
            // snapshots are gone when the call returns (containerd's synchronous delete).
            let deleted = self
                .inner
                .images
                .delete(in_namespace(images_api::DeleteImageRequest {
                    name: name.clone(),
                    sync: i == last,
                    ..Default::default()
                }))
                .await;
            match deleted {
                Ok(_) => {}
                Err(s) if s.code() == Code::NotFound => {}
                Err(s) => {
                    return Err(context(
                        s,
                        format_args!(
                            "failed to delete image reference {name:?} for {:?}",
                            found.facts.id
                        ),
                    ));
                }
            }
        }
        Ok(Response::new(api::RemoveImageResponse {}))
    }

    async fn image_fs_info(
        &self,
        _request: Request<api::ImageFsInfoRequest>,
    ) -> Result<Response<api::ImageFsInfoResponse>, Status> {
        let name = &self.inner.config.containerd.snapshotter;
        let snapshotter = self
            .inner
            .snapshotters
            .get(name)
            .map_err(berth_services::status)?
            .namespaced(K8S_NAMESPACE, None);
        let snapshots = snapshotter
            .walk(&[])
            .await
            .map_err(|e| context(berth_services::status(e), "walking the snapshots"))?;
        let (mut used_bytes, mut inodes_used) = (0u64, 0u64);
        for snapshot in snapshots {
            // A snapshot removed meanwhile is simply not counted (containerd's syncer
            // skips what it cannot measure too).
            match snapshotter.usage(&snapshot.name).await {
                Ok(usage) => {
                    used_bytes += u64::try_from(usage.size).unwrap_or(0);
                    inodes_used += u64::try_from(usage.inodes).unwrap_or(0);
                }
                Err(e) => tracing::debug!(snapshot = %snapshot.name, error = %e, "no usage"),
            }
        }
        // containerd reports the time of its last usage sync; Berth measures now.
        let timestamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
        Ok(Response::new(api::ImageFsInfoResponse {
            image_filesystems: vec![api::FilesystemUsage {
                timestamp,
                fs_id: Some(api::FilesystemIdentifier {
                    mountpoint: self.inner.image_fs_path.display().to_string(),
                }),
                used_bytes: Some(api::UInt64Value { value: used_bytes }),
                inodes_used: Some(api::UInt64Value { value: inodes_used }),
            }],
            container_filesystems: vec![],
        }))
    }
}
