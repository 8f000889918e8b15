//! `containerd.services.images.v1.Images`: `io.containerd.service.v1.images-service` and
//! `io.containerd.grpc.v1.images`; events `/images/create|update|delete`.

use crate::{IntoStatus, namespace};
use berth_api::any;
use berth_api::services::images::v1 as api;
use berth_api::services::images::v1::images_server;
use berth_api::timestamp;
use berth_api::types::Descriptor as ApiDescriptor;
use berth_core::content::Descriptor;
use berth_core::events::{EventPublisher, Exchange};
use berth_metadata::MetadataStore;
use berth_metadata::gc::GcScheduler;
use berth_metadata::images::Image;
use berth_plugin::{GrpcService, InitContext, Instance, Registration, types};
use std::sync::Arc;
use std::time::SystemTime;
use tonic::{Request, Response, Status};

/// What the images service plugin provides.
#[derive(Clone)]
pub struct ImagesService {
    store: Arc<MetadataStore>,
    gc: Option<Arc<dyn GcScheduler>>,
    events: Exchange,
}

fn to_api(image: Image) -> api::Image {
    api::Image {
        name: image.name,
        labels: image.labels.into_iter().collect(),
        target: Some(ApiDescriptor {
            media_type: image.target.media_type,
            digest: image.target.digest,
            size: image.target.size,
            annotations: image.target.annotations.into_iter().collect(),
        }),
        created_at: Some(timestamp::from_system_time(image.created_at)),
        updated_at: Some(timestamp::from_system_time(image.updated_at)),
    }
}

fn from_api(image: api::Image) -> Image {
    let t = image.target.unwrap_or_default();
    Image {
        name: image.name,
        labels: image.labels.into_iter().collect(),
        target: Descriptor {
            media_type: t.media_type,
            digest: t.digest,
            size: t.size,
            annotations: t.annotations.into_iter().collect(),
        },
        created_at: image
            .created_at
            .map(|t| timestamp::to_system_time(&t))
            .unwrap_or(SystemTime::UNIX_EPOCH),
        updated_at: image
            .updated_at
            .map(|t| timestamp::to_system_time(&t))
            .unwrap_or(SystemTime::UNIX_EPOCH),
    }
}

#[tonic::async_trait]
impl images_server::Images for ImagesService {
    async fn get(
        &self,
        request: Request<api::GetImageRequest>,
    ) -> Result<Response<api::GetImageResponse>, Status> {
        let ns = namespace(&request)?;
        let name = request.into_inner().name;
        let image = crate::with_metadata(&self.store, move |s| s.get_image(&ns, &name)).await?;
        Ok(Response::new(api::GetImageResponse {
            image: Some(to_api(image)),
        }))
    }

    async fn list(
        &self,
        request: Request<api::ListImagesRequest>,
    ) -> Result<Response<api::ListImagesResponse>, Status> {
        let ns = namespace(&request)?;
        let filters = request.into_inner().filters;
        let images =
            crate::with_metadata(&self.store, move |s| s.list_images(&ns, &filters)).await?;
        Ok(Response::new(api::ListImagesResponse {
            images: images.into_iter().map(to_api).collect(),
        }))
    }

    async fn create(
        &self,
        request: Request<api::CreateImageRequest>,
    ) -> Result<Response<api::CreateImageResponse>, Status> {
        let ns = namespace(&request)?;
        let image = request.into_inner().image.unwrap_or_default();
        if image.name.is_empty() {
            return Err(Status::invalid_argument("Image.Name required"));
        }
        let image = from_api(image);
        let n = ns.clone();
        let created =
            crate::with_metadata(&self.store, move |s| s.create_image(&n, &image)).await?;
        let event = api::ImageCreate {
            name: created.name.clone(),
            labels: created.labels.clone().into_iter().collect(),
        };
        self.events
            .publish(&ns, "/images/create", any::pack(&event))
            .or_status()?;
        Ok(Response::new(api::CreateImageResponse {
            image: Some(to_api(created)),
        }))
    }

    async fn update(
        &self,
        request: Request<api::UpdateImageRequest>,
    ) -> Result<Response<api::UpdateImageResponse>, Status> {
        let ns = namespace(&request)?;
        let req = request.into_inner();
        let image = req.image.unwrap_or_default();
        if image.name.is_empty() {
            return Err(Status::invalid_argument("Image.Name required"));
        }
        let paths = req.update_mask.map(|m| m.paths).unwrap_or_default();
        let image = from_api(image);
        let n = ns.clone();
        let updated =
            crate::with_metadata(&self.store, move |s| s.update_image(&n, &image, &paths)).await?;
        let event = api::ImageUpdate {
            name: updated.name.clone(),
            labels: updated.labels.clone().into_iter().collect(),
        };
        self.events
            .publish(&ns, "/images/update", any::pack(&event))
            .or_status()?;
        Ok(Response::new(api::UpdateImageResponse {
            image: Some(to_api(updated)),
        }))
    }

    async fn delete(
        &self,
        request: Request<api::DeleteImageRequest>,
    ) -> Result<Response<()>, Status> {
        let ns = namespace(&request)?;
        let req = request.into_inner();
        let name = req.name.clone();
        let n = ns.clone();
        crate::with_metadata(&self.store, move |s| s.delete_image(&n, &name)).await?;
        let event = api::ImageDelete { name: req.name };
        self.events
            .publish(&ns, "/images/delete", any::pack(&event))
            .or_status()?;
        if req.sync
            && let Some(gc) = &self.gc
        {
            gc.schedule_and_wait().await.or_status()?;
        }
        Ok(Response::new(()))
    }
}

impl GrpcService for ImagesService {
    fn register(
        &self,
        routes: &mut tonic::service::RoutesBuilder,
        limits: berth_plugin::MessageLimits,
    ) {
        routes.add_service(crate::limited!(
            images_server::ImagesServer::new(self.clone()),
            limits
        ));
    }
}

/// The GC scheduler if one loaded (`sync` deletes wait for it).
fn gc_of(ctx: &InitContext) -> Option<Arc<dyn GcScheduler>> {
    ctx.get::<Arc<dyn GcScheduler>>(types::GC).ok()
}

/// `io.containerd.service.v1.images-service`: instance `ImagesService`.
pub fn service_registration() -> Registration {
    Registration::new(
        types::SERVICE,
        "images-service",
        |ctx: InitContext| async move {
            let store: Arc<MetadataStore> = ctx.get(types::METADATA)?;
            let service = ImagesService {
                store,
                gc: gc_of(&ctx),
                events: ctx.events.clone(),
            };
            Ok::<Instance, _>(Arc::new(service))
        },
    )
    .requires(&[types::METADATA, types::GC])
}

/// `io.containerd.grpc.v1.images`.
pub fn registration() -> Registration {
    crate::grpc_over_service::<ImagesService>("images", "images-service")
}
