//! `containerd.services.containers.v1.Containers` (`io.containerd.grpc.v1.containers`):
//! container records in the metadata store, with `/containers/create|update|delete`
//! events.

use crate::{IntoStatus, namespace};
use berth_api::any;
use berth_api::containerd::events::{
    ContainerCreate, ContainerDelete, ContainerUpdate, container_create,
};
use berth_api::services::containers::v1::{
    Container, CreateContainerRequest, CreateContainerResponse, DeleteContainerRequest,
    GetContainerRequest, GetContainerResponse, ListContainerMessage, ListContainersRequest,
    ListContainersResponse, UpdateContainerRequest, UpdateContainerResponse, container,
    containers_server,
};
use berth_api::timestamp;
use berth_core::Error;
use berth_core::events::{EventPublisher, Exchange};
use berth_core::filters::Filter;
use berth_metadata::MetadataStore;
use berth_metadata::containers::{self as records, ContainerRuntime};
use berth_plugin::{GrpcService, InitContext, Instance, Registration, types};
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// Creates `record` in namespace `ns` and publishes `/containers/create`: the Create
/// call, and the CRI's sandbox and container records (containerd's CRI creates them
/// through this service).
pub async fn create_record(
    store: &Arc<MetadataStore>,
    events: &Exchange,
    ns: &str,
    record: records::Container,
) -> berth_core::Result<records::Container> {
    let (store, store_ns) = (store.clone(), ns.to_string());
    let created = tokio::task::spawn_blocking(move || store.create_container(&store_ns, record))
        .await
        .map_err(|e| Error::unknown(format!("metadata task failed: {e}")))??;
    let event = ContainerCreate {
        id: created.id.clone(),
        image: created.image.clone(),
        runtime: Some(container_create::Runtime {
            name: created.runtime.name.clone(),
            options: created.runtime.options.clone(),
        }),
    };
    events.publish(ns, "/containers/create", any::pack(&event))?;
    Ok(created)
}

/// Deletes record `id` of namespace `ns` and publishes `/containers/delete`.
pub async fn delete_record(
    store: &Arc<MetadataStore>,
    events: &Exchange,
    ns: &str,
    id: &str,
) -> berth_core::Result<()> {
    let (store, store_ns, store_id) = (store.clone(), ns.to_string(), id.to_string());
    tokio::task::spawn_blocking(move || store.delete_container(&store_ns, &store_id))
        .await
        .map_err(|e| Error::unknown(format!("metadata task failed: {e}")))??;
    events.publish(
        ns,
        "/containers/delete",
        any::pack(&ContainerDelete { id: id.to_string() }),
    )
}

/// API form → record.
pub fn from_proto(c: Container) -> records::Container {
    let runtime = c.runtime.unwrap_or_default();
    records::Container {
        id: c.id,
        labels: c.labels.into_iter().collect(),
        image: c.image,
        runtime: ContainerRuntime {
            name: runtime.name,
            options: runtime.options,
        },
        spec: c.spec,
        snapshotter: c.snapshotter,
        snapshot_key: c.snapshot_key,
        created_at: c
            .created_at
            .as_ref()
            .map(timestamp::to_system_time)
            .unwrap_or(std::time::UNIX_EPOCH),
        updated_at: c
            .updated_at
            .as_ref()
            .map(timestamp::to_system_time)
            .unwrap_or(std::time::UNIX_EPOCH),
        extensions: c.extensions.into_iter().collect(),
        sandbox: c.sandbox,
    }
}

/// Record → API form.
pub fn to_proto(c: records::Container) -> Container {
    Container {
        id: c.id,
        labels: c.labels.into_iter().collect(),
        image: c.image,
        runtime: Some(container::Runtime {
            name: c.runtime.name,
            options: c.runtime.options,
        }),
        spec: c.spec,
        snapshotter: c.snapshotter,
        snapshot_key: c.snapshot_key,
        created_at: Some(timestamp::from_system_time(c.created_at)),
        updated_at: Some(timestamp::from_system_time(c.updated_at)),
        extensions: c.extensions.into_iter().collect(),
        sandbox: c.sandbox,
    }
}

#[derive(Clone)]
struct ContainersService {
    store: Arc<MetadataStore>,
    events: Exchange,
}

impl ContainersService {
    async fn list_matching(
        &self,
        ns: String,
        filters: Vec<String>,
    ) -> Result<Vec<Container>, Status> {
        let filter = Filter::parse_all(&filters).or_status()?;
        let all =
            crate::with_metadata(&self.store, move |store| store.list_containers(&ns)).await?;
        Ok(all
            .into_iter()
            .filter(|c| filter.matches(&|path: &[String]| records::filter_field(c, path)))
            .map(to_proto)
            .collect())
    }
}

#[tonic::async_trait]
impl containers_server::Containers for ContainersService {
    async fn get(
        &self,
        request: Request<GetContainerRequest>,
    ) -> Result<Response<GetContainerResponse>, Status> {
        let ns = namespace(&request)?;
        let id = request.into_inner().id;
        let c =
            crate::with_metadata(&self.store, move |store| store.get_container(&ns, &id)).await?;
        Ok(Response::new(GetContainerResponse {
            container: Some(to_proto(c)),
        }))
    }

    async fn list(
        &self,
        request: Request<ListContainersRequest>,
    ) -> Result<Response<ListContainersResponse>, Status> {
        let ns = namespace(&request)?;
        let containers = self.list_matching(ns, request.into_inner().filters).await?;
        Ok(Response::new(ListContainersResponse { containers }))
    }

    async fn list_stream(
        &self,
        request: Request<ListContainersRequest>,
    ) -> Result<Response<tonic::codegen::BoxStream<ListContainerMessage>>, Status> {
        let ns = namespace(&request)?;
        let containers = self.list_matching(ns, request.into_inner().filters).await?;
        let stream = futures::stream::iter(
            containers
                .into_iter()
                .map(|c| Ok(ListContainerMessage { container: Some(c) })),
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn create(
        &self,
        request: Request<CreateContainerRequest>,
    ) -> Result<Response<CreateContainerResponse>, Status> {
        let ns = namespace(&request)?;
        let requested = request
            .into_inner()
            .container
            .ok_or_else(|| crate::status(Error::invalid_argument("container must be set")))?;
        let created = create_record(&self.store, &self.events, &ns, from_proto(requested))
            .await
            .or_status()?;
        Ok(Response::new(CreateContainerResponse {
            container: Some(to_proto(created)),
        }))
    }

    async fn update(
        &self,
        request: Request<UpdateContainerRequest>,
    ) -> Result<Response<UpdateContainerResponse>, Status> {
        let ns = namespace(&request)?;
        let request = request.into_inner();
        let requested = request
            .container
            .ok_or_else(|| crate::status(Error::invalid_argument("container must be set")))?;
        let paths = request.update_mask.map(|m| m.paths).unwrap_or_default();
        let record = from_proto(requested);
        let store_ns = ns.clone();
        let updated = crate::with_metadata(&self.store, move |store| {
            store.update_container(&store_ns, record, &paths)
        })
        .await?;
        let event = ContainerUpdate {
            id: updated.id.clone(),
            image: updated.image.clone(),
            labels: updated.labels.clone().into_iter().collect(),
            snapshot_key: updated.snapshot_key.clone(),
        };
        self.events
            .publish(&ns, "/containers/update", any::pack(&event))
            .or_status()?;
        Ok(Response::new(UpdateContainerResponse {
            container: Some(to_proto(updated)),
        }))
    }

    async fn delete(
        &self,
        request: Request<DeleteContainerRequest>,
    ) -> Result<Response<()>, Status> {
        let ns = namespace(&request)?;
        let id = request.into_inner().id;
        delete_record(&self.store, &self.events, &ns, &id)
            .await
            .or_status()?;
        Ok(Response::new(()))
    }
}

impl GrpcService for ContainersService {
    fn register(
        &self,
        routes: &mut tonic::service::RoutesBuilder,
        limits: berth_plugin::MessageLimits,
    ) {
        routes.add_service(crate::limited!(
            containers_server::ContainersServer::new(self.clone()),
            limits
        ));
    }
}

/// `io.containerd.service.v1.containers-service`: the service the gRPC plugin serves.
pub fn service_registration() -> Registration {
    Registration::new(
        types::SERVICE,
        "containers-service",
        |ctx: InitContext| async move {
            let store: Arc<MetadataStore> = ctx.get(types::METADATA)?;
            // Containers are GC roots for their snapshot and label references.
            store.register_gc_resource(Arc::new(records::ContainerGc));
            Ok::<Instance, _>(Arc::new(ContainersService {
                store,
                events: ctx.events.clone(),
            }))
        },
    )
    .requires(&[types::METADATA])
}

/// `io.containerd.grpc.v1.containers`.
pub fn registration() -> Registration {
    crate::grpc_over_service::<ContainersService>("containers", "containers-service")
}
