//! `containerd.services.leases.v1.Leases`: `io.containerd.service.v1.leases-service`
//! and `io.containerd.grpc.v1.leases`.

use crate::{IntoStatus, namespace};
use berth_api::services::leases::v1 as api;
use berth_api::services::leases::v1::leases_server;
use berth_api::timestamp;
use berth_metadata::MetadataStore;
use berth_metadata::gc::GcScheduler;
use berth_metadata::leases::{Lease, Resource};
use berth_plugin::{GrpcService, InitContext, Instance, Registration, types};
use std::sync::Arc;
use tonic::{Request, Response, Status};

#[derive(Clone)]
pub struct LeasesService {
    store: Arc<MetadataStore>,
    gc: Option<Arc<dyn GcScheduler>>,
}

fn to_api(l: Lease) -> api::Lease {
    api::Lease {
        id: l.id,
        created_at: Some(timestamp::from_system_time(l.created_at)),
        labels: l.labels.into_iter().collect(),
    }
}

fn resource(r: Option<api::Resource>) -> Resource {
    let r = r.unwrap_or_default();
    Resource {
        id: r.id,
        r#type: r.r#type,
    }
}

#[tonic::async_trait]
impl leases_server::Leases for LeasesService {
    async fn create(
        &self,
        request: Request<api::CreateRequest>,
    ) -> Result<Response<api::CreateResponse>, Status> {
        let ns = namespace(&request)?;
        let req = request.into_inner();
        let labels = req.labels.into_iter().collect();
        let id = req.id;
        let lease = crate::with_metadata(&self.store, move |s| {
            s.create_lease(&ns, Some(&id), &labels)
        })
        .await?;
        Ok(Response::new(api::CreateResponse {
            lease: Some(to_api(lease)),
        }))
    }

    async fn delete(&self, request: Request<api::DeleteRequest>) -> Result<Response<()>, Status> {
        let ns = namespace(&request)?;
        let req = request.into_inner();
        let id = req.id;
        crate::with_metadata(&self.store, move |s| s.delete_lease(&ns, &id)).await?;
        if req.sync
            && let Some(gc) = &self.gc
        {
            gc.schedule_and_wait().await.or_status()?;
        }
        Ok(Response::new(()))
    }

    async fn list(
        &self,
        request: Request<api::ListRequest>,
    ) -> Result<Response<api::ListResponse>, Status> {
        let ns = namespace(&request)?;
        let filters = request.into_inner().filters;
        let leases =
            crate::with_metadata(&self.store, move |s| s.list_leases(&ns, &filters)).await?;
        Ok(Response::new(api::ListResponse {
            leases: leases.into_iter().map(to_api).collect(),
        }))
    }

    async fn add_resource(
        &self,
        request: Request<api::AddResourceRequest>,
    ) -> Result<Response<()>, Status> {
        let ns = namespace(&request)?;
        let req = request.into_inner();
        let r = resource(req.resource);
        let id = req.id;
        crate::with_metadata(&self.store, move |s| s.add_lease_resource(&ns, &id, &r)).await?;
        Ok(Response::new(()))
    }

    async fn delete_resource(
        &self,
        request: Request<api::DeleteResourceRequest>,
    ) -> Result<Response<()>, Status> {
        let ns = namespace(&request)?;
        let req = request.into_inner();
        let r = resource(req.resource);
        let id = req.id;
        crate::with_metadata(&self.store, move |s| s.delete_lease_resource(&ns, &id, &r)).await?;
        Ok(Response::new(()))
    }

    async fn list_resources(
        &self,
        request: Request<api::ListResourcesRequest>,
    ) -> Result<Response<api::ListResourcesResponse>, Status> {
        let ns = namespace(&request)?;
        let id = request.into_inner().id;
        let resources =
            crate::with_metadata(&self.store, move |s| s.list_lease_resources(&ns, &id)).await?;
        Ok(Response::new(api::ListResourcesResponse {
            resources: resources
                .into_iter()
                .map(|r| api::Resource {
                    id: r.id,
                    r#type: r.r#type,
                })
                .collect(),
        }))
    }
}

impl GrpcService for LeasesService {
    fn register(
        &self,
        routes: &mut tonic::service::RoutesBuilder,
        limits: berth_plugin::MessageLimits,
    ) {
        routes.add_service(crate::limited!(
            leases_server::LeasesServer::new(self.clone()),
            limits
        ));
    }
}

/// `io.containerd.service.v1.leases-service`: instance `LeasesService`.
pub fn service_registration() -> Registration {
    Registration::new(
        types::SERVICE,
        "leases-service",
        |ctx: InitContext| async move {
            let store: Arc<MetadataStore> = ctx.get(types::METADATA)?;
            let gc = ctx.get::<Arc<dyn GcScheduler>>(types::GC).ok();
            Ok::<Instance, _>(Arc::new(LeasesService { store, gc }))
        },
    )
    .requires(&[types::METADATA, types::GC])
}

/// `io.containerd.grpc.v1.leases`.
pub fn registration() -> Registration {
    crate::grpc_over_service::<LeasesService>("leases", "leases-service")
}
