//! `containerd.services.snapshots.v1.Snapshots`: `io.containerd.service.v1.snapshots-service`
//! (every snapshotter behind the metadata layer, registered with the garbage collector)
//! and `io.containerd.grpc.v1.snapshots` (the adapter, publishing `/snapshot/prepare`,
//! `/snapshot/commit` and `/snapshot/remove`).

use crate::{IntoStatus, lease, namespace, status};
use berth_api::containerd::events::{SnapshotCommit, SnapshotPrepare, SnapshotRemove};
use berth_api::services::snapshots::v1 as api;
use berth_api::services::snapshots::v1::snapshots_server;
use berth_api::{any, timestamp, types};
use berth_core::events::{EventPublisher, Exchange};
use berth_core::labels::Labels;
use berth_core::mount::Mount;
use berth_core::snapshot::{Info, Kind, Snapshotter};
use berth_metadata::MetadataStore;
use berth_metadata::snapshots::{NamespacedSnapshotter, SnapshotDb, SnapshotGc, Snapshotters};
use berth_plugin::{
    GrpcService, InitContext, Instance, Registration, grpc_instance, types as plugin_types,
};
use std::collections::BTreeMap;
use std::sync::Arc;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status};

/// The instance of a snapshotter plugin (as `berth-snapshots` and proxy plugins store it).
pub type SnapshotterInstance = Arc<dyn Snapshotter>;

pub fn mount_to_api(m: Mount) -> types::Mount {
    types::Mount {
        r#type: m.r#type,
        source: m.source,
        target: m.target,
        options: m.options,
    }
}

pub fn mount_from_api(m: types::Mount) -> Mount {
    Mount {
        r#type: m.r#type,
        source: m.source,
        target: m.target,
        options: m.options,
    }
}

pub fn info_to_api(i: Info) -> api::Info {
    api::Info {
        name: i.name,
        parent: i.parent,
        kind: match i.kind {
            Kind::Unknown => api::Kind::Unknown,
            Kind::View => api::Kind::View,
            Kind::Active => api::Kind::Active,
            Kind::Committed => api::Kind::Committed,
        } as i32,
        created_at: Some(timestamp::from_system_time(i.created)),
        updated_at: Some(timestamp::from_system_time(i.updated)),
        labels: i.labels.into_iter().collect(),
    }
}

pub fn info_from_api(i: api::Info) -> Info {
    Info {
        kind: match api::Kind::try_from(i.kind).unwrap_or(api::Kind::Unknown) {
            api::Kind::Unknown => Kind::Unknown,
            api::Kind::View => Kind::View,
            api::Kind::Active => Kind::Active,
            api::Kind::Committed => Kind::Committed,
        },
        name: i.name,
        parent: i.parent,
        labels: i.labels.into_iter().collect(),
        created: i
            .created_at
            .map(|t| timestamp::to_system_time(&t))
            .unwrap_or(std::time::UNIX_EPOCH),
        updated: i
            .updated_at
            .map(|t| timestamp::to_system_time(&t))
            .unwrap_or(std::time::UNIX_EPOCH),
    }
}

/// The gRPC adapter.
#[derive(Clone)]
pub struct SnapshotsService {
    snapshotters: Snapshotters,
    events: Exchange,
}

impl SnapshotsService {
    pub fn new(snapshotters: Snapshotters, events: Exchange) -> SnapshotsService {
        SnapshotsService {
            snapshotters,
            events,
        }
    }

    fn get<T>(
        &self,
        request: &Request<T>,
        name: &str,
    ) -> Result<(String, NamespacedSnapshotter), Status> {
        let ns = namespace(request)?;
        let db = self.snapshotters.get(name).or_status()?;
        let lease = lease(request);
        Ok((ns.clone(), db.namespaced(&ns, lease)))
    }

    fn publish<M: prost::Message + prost::Name>(&self, ns: &str, topic: &str, event: &M) {
        if let Err(err) = self.events.publish(ns, topic, any::pack(event)) {
            tracing::warn!(topic, error = %err, "publishing snapshot event");
        }
    }
}

#[tonic::async_trait]
impl snapshots_server::Snapshots for SnapshotsService {
    async fn prepare(
        &self,
        request: Request<api::PrepareSnapshotRequest>,
    ) -> Result<Response<api::PrepareSnapshotResponse>, Status> {
        let (ns, s) = self.get(&request, &request.get_ref().snapshotter.clone())?;
        let req = request.into_inner();
        let labels: Labels = req.labels.into_iter().collect();
        let mounts = s.prepare(&req.key, &req.parent, labels).await.or_status()?;
        self.publish(
            &ns,
            "/snapshot/prepare",
            &SnapshotPrepare {
                key: req.key,
                parent: req.parent,
                snapshotter: req.snapshotter,
            },
        );
        Ok(Response::new(api::PrepareSnapshotResponse {
            mounts: mounts.into_iter().map(mount_to_api).collect(),
        }))
    }

    async fn view(
        &self,
        request: Request<api::ViewSnapshotRequest>,
    ) -> Result<Response<api::ViewSnapshotResponse>, Status> {
        let (_, s) = self.get(&request, &request.get_ref().snapshotter.clone())?;
        let req = request.into_inner();
        let labels: Labels = req.labels.into_iter().collect();
        let mounts = s.view(&req.key, &req.parent, labels).await.or_status()?;
        Ok(Response::new(api::ViewSnapshotResponse {
            mounts: mounts.into_iter().map(mount_to_api).collect(),
        }))
    }

    async fn mounts(
        &self,
        request: Request<api::MountsRequest>,
    ) -> Result<Response<api::MountsResponse>, Status> {
        let (_, s) = self.get(&request, &request.get_ref().snapshotter.clone())?;
        let mounts = s.mounts(&request.get_ref().key).await.or_status()?;
        Ok(Response::new(api::MountsResponse {
            mounts: mounts.into_iter().map(mount_to_api).collect(),
        }))
    }

    async fn commit(
        &self,
        request: Request<api::CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let (ns, s) = self.get(&request, &request.get_ref().snapshotter.clone())?;
        let req = request.into_inner();
        let labels: Labels = req.labels.into_iter().collect();
        s.commit(&req.name, &req.key, labels).await.or_status()?;
        self.publish(
            &ns,
            "/snapshot/commit",
            &SnapshotCommit {
                key: req.key,
                name: req.name,
                snapshotter: req.snapshotter,
            },
        );
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        request: Request<api::RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let (ns, s) = self.get(&request, &request.get_ref().snapshotter.clone())?;
        let req = request.into_inner();
        s.remove(&req.key).await.or_status()?;
        self.publish(
            &ns,
            "/snapshot/remove",
            &SnapshotRemove {
                key: req.key,
                snapshotter: req.snapshotter,
            },
        );
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        request: Request<api::StatSnapshotRequest>,
    ) -> Result<Response<api::StatSnapshotResponse>, Status> {
        let (_, s) = self.get(&request, &request.get_ref().snapshotter.clone())?;
        let info = s.stat(&request.get_ref().key).await.or_status()?;
        Ok(Response::new(api::StatSnapshotResponse {
            info: Some(info_to_api(info)),
        }))
    }

    async fn update(
        &self,
        request: Request<api::UpdateSnapshotRequest>,
    ) -> Result<Response<api::UpdateSnapshotResponse>, Status> {
        let (_, s) = self.get(&request, &request.get_ref().snapshotter.clone())?;
        let req = request.into_inner();
        let info = req
            .info
            .ok_or_else(|| status(berth_core::Error::invalid_argument("info must be set")))?;
        let paths = req.update_mask.map(|m| m.paths).unwrap_or_default();
        let info = s.update(info_from_api(info), &paths).await.or_status()?;
        Ok(Response::new(api::UpdateSnapshotResponse {
            info: Some(info_to_api(info)),
        }))
    }

    async fn list(
        &self,
        request: Request<api::ListSnapshotsRequest>,
    ) -> Result<Response<BoxStream<api::ListSnapshotsResponse>>, Status> {
        let (_, s) = self.get(&request, &request.get_ref().snapshotter.clone())?;
        let infos = s.walk(&request.get_ref().filters).await.or_status()?;
        // containerd sends batches of 100 infos per message.
        let batches: Vec<Result<api::ListSnapshotsResponse, Status>> = infos
            .chunks(100)
            .map(|chunk| {
                Ok(api::ListSnapshotsResponse {
                    info: chunk.iter().cloned().map(info_to_api).collect(),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(batches))))
    }

    async fn usage(
        &self,
        request: Request<api::UsageRequest>,
    ) -> Result<Response<api::UsageResponse>, Status> {
        let (_, s) = self.get(&request, &request.get_ref().snapshotter.clone())?;
        let usage = s.usage(&request.get_ref().key).await.or_status()?;
        Ok(Response::new(api::UsageResponse {
            size: usage.size,
            inodes: usage.inodes,
        }))
    }

    async fn cleanup(&self, request: Request<api::CleanupRequest>) -> Result<Response<()>, Status> {
        let (_, s) = self.get(&request, &request.get_ref().snapshotter.clone())?;
        s.cleanup().await.or_status()?;
        Ok(Response::new(()))
    }
}

impl GrpcService for SnapshotsService {
    fn register(
        &self,
        routes: &mut tonic::service::RoutesBuilder,
        limits: berth_plugin::MessageLimits,
    ) {
        routes.add_service(crate::limited!(
            snapshots_server::SnapshotsServer::new(self.clone()),
            limits
        ));
    }
}

/// `io.containerd.service.v1.snapshots-service`: instance [`Snapshotters`].
pub fn service_registration() -> Registration {
    Registration::new(
        plugin_types::SERVICE,
        "snapshots-service",
        |ctx: InitContext| async move {
            let md: Arc<MetadataStore> = ctx.get(plugin_types::METADATA)?;
            let mut map = BTreeMap::new();
            for (id, backend) in ctx.get_all::<SnapshotterInstance>(plugin_types::SNAPSHOT) {
                map.insert(id.clone(), SnapshotDb::new(&id, backend, md.clone()));
            }
            md.register_gc_resource(SnapshotGc::new(map.clone()));
            Ok::<Instance, _>(Arc::new(Snapshotters::new(map)))
        },
    )
    .requires(&[plugin_types::METADATA, plugin_types::SNAPSHOT])
}

/// `io.containerd.grpc.v1.snapshots`.
pub fn registration() -> Registration {
    Registration::new(
        plugin_types::GRPC,
        "snapshots",
        |ctx: InitContext| async move {
            let snapshotters: Snapshotters =
                ctx.get_by_id(plugin_types::SERVICE, "snapshots-service")?;
            let service = SnapshotsService::new(snapshotters, ctx.events.clone());
            Ok::<Instance, _>(grpc_instance(Arc::new(service)))
        },
    )
    .requires(&[plugin_types::SERVICE])
}
