//! Proxy snapshotters (`[proxy_plugins]` with `type = "snapshot"`): a snapshotter that
//! forwards every call over the snapshots gRPC API to another process (how stargz and
//! nydus plug in), and the other half — [`BackendSnapshotsService`], which serves one
//! [`Snapshotter`] over that API without namespaces, as containerd's
//! `snapshotservice.FromSnapshotter` does (used by the `berth-snapshotter` binary).

use crate::snapshots::{info_from_api, info_to_api, mount_from_api, mount_to_api};
use crate::{IntoStatus, status};
use berth_api::services::snapshots::v1 as api;
use berth_api::services::snapshots::v1::snapshots_client::SnapshotsClient;
use berth_api::services::snapshots::v1::snapshots_server;
use berth_core::labels::Labels;
use berth_core::mount::Mount;
use berth_core::snapshot::{Info, Snapshotter, Usage};
use berth_core::{Error, Result};
use berth_plugin::{InitContext, Instance, Registration, types};
use std::path::PathBuf;
use std::sync::Arc;
use tonic::codegen::BoxStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Response, Status};

fn from_status(s: Status) -> Error {
    use berth_core::error::ErrorKind;
    let kind = match s.code() {
        tonic::Code::InvalidArgument => ErrorKind::InvalidArgument,
        tonic::Code::NotFound => ErrorKind::NotFound,
        tonic::Code::AlreadyExists => ErrorKind::AlreadyExists,
        tonic::Code::FailedPrecondition => ErrorKind::FailedPrecondition,
        tonic::Code::Unavailable => ErrorKind::Unavailable,
        tonic::Code::Unimplemented => ErrorKind::NotImplemented,
        tonic::Code::Cancelled => ErrorKind::Canceled,
        tonic::Code::DeadlineExceeded => ErrorKind::DeadlineExceeded,
        _ => ErrorKind::Unknown,
    };
    Error::with_message(kind, s.message().to_string())
}

/// A channel to a unix socket, connected on first use (the proxy may start later).
pub fn unix_channel(address: &str) -> Result<Channel> {
    let path = PathBuf::from(address.strip_prefix("unix://").unwrap_or(address));
    let endpoint = Endpoint::try_from("http://proxy.local")
        .map_err(|e| Error::invalid_argument(format!("proxy address {address}: {e}")))?;
    Ok(
        endpoint.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let p = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        })),
    )
}

/// A snapshotter served by another process.
#[derive(Clone)]
pub struct ProxySnapshotter {
    client: SnapshotsClient<Channel>,
    name: String,
}

impl ProxySnapshotter {
    pub fn new(channel: Channel, name: &str) -> ProxySnapshotter {
        ProxySnapshotter {
            client: SnapshotsClient::new(channel),
            name: name.to_string(),
        }
    }
}

#[async_trait::async_trait]
impl Snapshotter for ProxySnapshotter {
    async fn stat(&self, key: &str) -> Result<Info> {
        let r = self
            .client
            .clone()
            .stat(api::StatSnapshotRequest {
                snapshotter: self.name.clone(),
                key: key.into(),
            })
            .await
            .map_err(from_status)?;
        Ok(info_from_api(r.into_inner().info.unwrap_or_default()))
    }

    async fn update(&self, info: Info, fieldpaths: &[String]) -> Result<Info> {
        let r = self
            .client
            .clone()
            .update(api::UpdateSnapshotRequest {
                snapshotter: self.name.clone(),
                info: Some(info_to_api(info)),
                update_mask: Some(prost_types::FieldMask {
                    paths: fieldpaths.to_vec(),
                }),
            })
            .await
            .map_err(from_status)?;
        Ok(info_from_api(r.into_inner().info.unwrap_or_default()))
    }

    async fn usage(&self, key: &str) -> Result<Usage> {
        let r = self
            .client
            .clone()
            .usage(api::UsageRequest {
                snapshotter: self.name.clone(),
                key: key.into(),
            })
            .await
            .map_err(from_status)?
            .into_inner();
        Ok(Usage {
            size: r.size,
            inodes: r.inodes,
        })
    }

    async fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let r = self
            .client
            .clone()
            .mounts(api::MountsRequest {
                snapshotter: self.name.clone(),
                key: key.into(),
            })
            .await
            .map_err(from_status)?;
        Ok(r.into_inner()
            .mounts
            .into_iter()
            .map(mount_from_api)
            .collect())
    }

    async fn prepare(&self, key: &str, parent: &str, labels: Labels) -> Result<Vec<Mount>> {
        let r = self
            .client
            .clone()
            .prepare(api::PrepareSnapshotRequest {
                snapshotter: self.name.clone(),
                key: key.into(),
                parent: parent.into(),
                labels: labels.into_iter().collect(),
            })
            .await
            .map_err(from_status)?;
        Ok(r.into_inner()
            .mounts
            .into_iter()
            .map(mount_from_api)
            .collect())
    }

    async fn view(&self, key: &str, parent: &str, labels: Labels) -> Result<Vec<Mount>> {
        let r = self
            .client
            .clone()
            .view(api::ViewSnapshotRequest {
                snapshotter: self.name.clone(),
                key: key.into(),
                parent: parent.into(),
                labels: labels.into_iter().collect(),
            })
            .await
            .map_err(from_status)?;
        Ok(r.into_inner()
            .mounts
            .into_iter()
            .map(mount_from_api)
            .collect())
    }

    async fn commit(&self, name: &str, key: &str, labels: Labels) -> Result<()> {
        self.client
            .clone()
            .commit(api::CommitSnapshotRequest {
                snapshotter: self.name.clone(),
                name: name.into(),
                key: key.into(),
                labels: labels.into_iter().collect(),
            })
            .await
            .map_err(from_status)?;
        Ok(())
    }

    async fn remove(&self, key: &str) -> Result<()> {
        self.client
            .clone()
            .remove(api::RemoveSnapshotRequest {
                snapshotter: self.name.clone(),
                key: key.into(),
            })
            .await
            .map_err(from_status)?;
        Ok(())
    }

    async fn walk(&self, filters: &[String]) -> Result<Vec<Info>> {
        let mut stream = self
            .client
            .clone()
            .list(api::ListSnapshotsRequest {
                snapshotter: self.name.clone(),
                filters: filters.to_vec(),
            })
            .await
            .map_err(from_status)?
            .into_inner();
        let mut out = Vec::new();
        while let Some(batch) = stream.message().await.map_err(from_status)? {
            out.extend(batch.info.into_iter().map(info_from_api));
        }
        Ok(out)
    }

    async fn cleanup(&self) -> Result<()> {
        match self
            .client
            .clone()
            .cleanup(api::CleanupRequest {
                snapshotter: self.name.clone(),
            })
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::Unimplemented => Ok(()),
            Err(s) => Err(from_status(s)),
        }
    }
}

/// `io.containerd.snapshotter.v1.<name>` forwarding to the snapshots service at
/// `address` (a `[proxy_plugins.<name>]` entry with `type = "snapshot"`). The instance
/// is an `Arc<dyn Snapshotter>` like every local snapshotter's.
pub fn snapshot_registration(name: &str, address: &str) -> Registration {
    let id: &'static str = Box::leak(name.to_string().into_boxed_str());
    let address = address.to_string();
    Registration::new(types::SNAPSHOT, id, move |ctx: InitContext| {
        let address = address.clone();
        async move {
            let channel = unix_channel(&address)?;
            ctx.export("address", address.clone());
            let snapshotter: Arc<dyn Snapshotter> = Arc::new(ProxySnapshotter::new(channel, id));
            Ok(Arc::new(snapshotter) as Instance)
        }
    })
}

/// Serves one snapshotter over the snapshots API, keys as they are (no namespaces; the
/// client's metadata layer namespaces them), whatever snapshotter name a request gives.
#[derive(Clone)]
pub struct BackendSnapshotsService {
    snapshotter: Arc<dyn Snapshotter>,
}

impl BackendSnapshotsService {
    pub fn new(snapshotter: Arc<dyn Snapshotter>) -> BackendSnapshotsService {
        BackendSnapshotsService { snapshotter }
    }

    pub fn into_server(self) -> snapshots_server::SnapshotsServer<BackendSnapshotsService> {
        snapshots_server::SnapshotsServer::new(self)
    }
}

#[tonic::async_trait]
impl snapshots_server::Snapshots for BackendSnapshotsService {
    async fn prepare(
        &self,
        request: Request<api::PrepareSnapshotRequest>,
    ) -> Result<Response<api::PrepareSnapshotResponse>, Status> {
        let r = request.into_inner();
        let mounts = self
            .snapshotter
            .prepare(&r.key, &r.parent, r.labels.into_iter().collect())
            .await
            .or_status()?;
        Ok(Response::new(api::PrepareSnapshotResponse {
            mounts: mounts.into_iter().map(mount_to_api).collect(),
        }))
    }

    async fn view(
        &self,
        request: Request<api::ViewSnapshotRequest>,
    ) -> Result<Response<api::ViewSnapshotResponse>, Status> {
        let r = request.into_inner();
        let mounts = self
            .snapshotter
            .view(&r.key, &r.parent, r.labels.into_iter().collect())
            .await
            .or_status()?;
        Ok(Response::new(api::ViewSnapshotResponse {
            mounts: mounts.into_iter().map(mount_to_api).collect(),
        }))
    }

    async fn mounts(
        &self,
        request: Request<api::MountsRequest>,
    ) -> Result<Response<api::MountsResponse>, Status> {
        let mounts = self
            .snapshotter
            .mounts(&request.get_ref().key)
            .await
            .or_status()?;
        Ok(Response::new(api::MountsResponse {
            mounts: mounts.into_iter().map(mount_to_api).collect(),
        }))
    }

    async fn commit(
        &self,
        request: Request<api::CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        self.snapshotter
            .commit(&r.name, &r.key, r.labels.into_iter().collect())
            .await
            .or_status()?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        request: Request<api::RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        self.snapshotter
            .remove(&request.get_ref().key)
            .await
            .or_status()?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        request: Request<api::StatSnapshotRequest>,
    ) -> Result<Response<api::StatSnapshotResponse>, Status> {
        let info = self
            .snapshotter
            .stat(&request.get_ref().key)
            .await
            .or_status()?;
        Ok(Response::new(api::StatSnapshotResponse {
            info: Some(info_to_api(info)),
        }))
    }

    async fn update(
        &self,
        request: Request<api::UpdateSnapshotRequest>,
    ) -> Result<Response<api::UpdateSnapshotResponse>, Status> {
        let r = request.into_inner();
        let info = r
            .info
            .ok_or_else(|| status(Error::invalid_argument("info must be set")))?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let info = self
            .snapshotter
            .update(info_from_api(info), &paths)
            .await
            .or_status()?;
        Ok(Response::new(api::UpdateSnapshotResponse {
            info: Some(info_to_api(info)),
        }))
    }

    async fn list(
        &self,
        request: Request<api::ListSnapshotsRequest>,
    ) -> Result<Response<BoxStream<api::ListSnapshotsResponse>>, Status> {
        let infos = self
            .snapshotter
            .walk(&request.get_ref().filters)
            .await
            .or_status()?;
        let batches: Vec<Result<api::ListSnapshotsResponse, Status>> = infos
            .chunks(100)
            .map(|c| {
                Ok(api::ListSnapshotsResponse {
                    info: c.iter().cloned().map(info_to_api).collect(),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(batches))))
    }

    async fn usage(
        &self,
        request: Request<api::UsageRequest>,
    ) -> Result<Response<api::UsageResponse>, Status> {
        let u = self
            .snapshotter
            .usage(&request.get_ref().key)
            .await
            .or_status()?;
        Ok(Response::new(api::UsageResponse {
            size: u.size,
            inodes: u.inodes,
        }))
    }

    async fn cleanup(
        &self,
        _request: Request<api::CleanupRequest>,
    ) -> Result<Response<()>, Status> {
        self.snapshotter.cleanup().await.or_status()?;
        Ok(Response::new(()))
    }
}
