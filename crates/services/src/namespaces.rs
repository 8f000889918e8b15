//! `containerd.services.namespaces.v1.Namespaces` (`io.containerd.grpc.v1.namespaces`).

use crate::IntoStatus;
use berth_api::any;
use berth_api::containerd::events::{NamespaceCreate, NamespaceDelete, NamespaceUpdate};
use berth_api::services::namespaces::v1::{
    CreateNamespaceRequest, CreateNamespaceResponse, DeleteNamespaceRequest, GetNamespaceRequest,
    GetNamespaceResponse, ListNamespacesRequest, ListNamespacesResponse, Namespace,
    UpdateNamespaceRequest, UpdateNamespaceResponse, namespaces_server,
};
use berth_core::events::{EventPublisher, Exchange};
use berth_core::filters::Filter;
use berth_core::labels::Labels;
use berth_core::{Error, fieldpath};
use berth_metadata::MetadataStore;
use berth_plugin::{GrpcService, InitContext, Instance, Registration, types};
use std::sync::Arc;
use tonic::{Request, Response, Status};

#[derive(Clone)]
struct NamespacesService {
    store: Arc<MetadataStore>,
    events: Exchange,
}

fn namespace_filter_field(namespace: &Namespace, path: &[String]) -> Option<String> {
    match path {
        [name] if name == "name" => Some(namespace.name.clone()),
        [labels, key] if labels == "labels" => namespace.labels.get(key).cloned(),
        _ => None,
    }
}

#[tonic::async_trait]
impl namespaces_server::Namespaces for NamespacesService {
    async fn get(
        &self,
        request: Request<GetNamespaceRequest>,
    ) -> Result<Response<GetNamespaceResponse>, Status> {
        let name = request.into_inner().name;
        let lookup = name.clone();
        let labels =
            crate::with_metadata(&self.store, move |store| store.namespace_labels(&lookup)).await?;
        Ok(Response::new(GetNamespaceResponse {
            namespace: Some(Namespace { name, labels }),
        }))
    }

    async fn list(
        &self,
        request: Request<ListNamespacesRequest>,
    ) -> Result<Response<ListNamespacesResponse>, Status> {
        let filter = Filter::parse(&request.into_inner().filter).or_status()?;
        let namespaces = crate::with_metadata(&self.store, |store| {
            store
                .list_namespaces()?
                .into_iter()
                .map(|name| {
                    let labels = store.namespace_labels(&name)?;
                    Ok(Namespace { name, labels })
                })
                .collect::<berth_core::Result<Vec<_>>>()
        })
        .await?
        .into_iter()
        .filter(|ns| filter.matches(&|path: &[String]| namespace_filter_field(ns, path)))
        .collect();
        Ok(Response::new(ListNamespacesResponse { namespaces }))
    }

    async fn create(
        &self,
        request: Request<CreateNamespaceRequest>,
    ) -> Result<Response<CreateNamespaceResponse>, Status> {
        let namespace = request.into_inner().namespace.unwrap_or_default();
        let (name, labels) = (namespace.name.clone(), namespace.labels.clone());
        crate::with_metadata(&self.store, move |store| {
            store.create_namespace(&name, &labels.into_iter().collect())
        })
        .await?;
        let event = NamespaceCreate {
            name: namespace.name.clone(),
            labels: namespace.labels.clone(),
        };
        self.events
            .publish(&namespace.name, "/namespaces/create", any::pack(&event))
            .or_status()?;
        Ok(Response::new(CreateNamespaceResponse {
            namespace: Some(namespace),
        }))
    }

    async fn update(
        &self,
        request: Request<UpdateNamespaceRequest>,
    ) -> Result<Response<UpdateNamespaceResponse>, Status> {
        let request = request.into_inner();
        let namespace = request.namespace.unwrap_or_default();
        let paths = request
            .update_mask
            .map(|mask| mask.paths)
            .unwrap_or_default();
        let (name, requested) = (namespace.name.clone(), namespace.labels.clone());
        let labels = crate::with_metadata(&self.store, move |store| {
            let requested: Labels = requested.into_iter().collect();
            let mut labels = store.namespace_labels(&name)?;
            if paths.is_empty() {
                labels = requested;
            } else {
                let label_paths: Vec<String> = paths
                    .iter()
                    .map(|p| match fieldpath::FieldPath::parse(p) {
                        fieldpath::FieldPath::Label(_) => Ok(p.clone()),
                        _ => Err(Error::invalid_argument(format!(
                            "cannot update {p:?} field"
                        ))),
                    })
                    .collect::<berth_core::Result<_>>()?;
                fieldpath::apply_labels(&mut labels, &requested, &label_paths);
            }
            store.replace_namespace_labels(&name, &labels)?;
            Ok(labels)
        })
        .await?;
        let updated = Namespace {
            name: namespace.name,
            labels: labels.into_iter().collect(),
        };
        let event = NamespaceUpdate {
            name: updated.name.clone(),
            labels: updated.labels.clone(),
        };
        self.events
            .publish(&updated.name, "/namespaces/update", any::pack(&event))
            .or_status()?;
        Ok(Response::new(UpdateNamespaceResponse {
            namespace: Some(updated),
        }))
    }

    async fn delete(
        &self,
        request: Request<DeleteNamespaceRequest>,
    ) -> Result<Response<()>, Status> {
        let name = request.into_inner().name;
        let target = name.clone();
        crate::with_metadata(&self.store, move |store| store.delete_namespace(&target)).await?;
        let event = NamespaceDelete { name: name.clone() };
        self.events
            .publish(&name, "/namespaces/delete", any::pack(&event))
            .or_status()?;
        Ok(Response::new(()))
    }
}

impl GrpcService for NamespacesService {
    fn register(
        &self,
        routes: &mut tonic::service::RoutesBuilder,
        limits: berth_plugin::MessageLimits,
    ) {
        routes.add_service(crate::limited!(
            namespaces_server::NamespacesServer::new(self.clone()),
            limits
        ));
    }
}

/// `io.containerd.service.v1.namespaces-service`: the service the gRPC plugin serves.
pub fn service_registration() -> Registration {
    Registration::new(
        types::SERVICE,
        "namespaces-service",
        |ctx: InitContext| async move {
            let store: Arc<MetadataStore> = ctx.get(types::METADATA)?;
            Ok::<Instance, _>(Arc::new(NamespacesService {
                store,
                events: ctx.events.clone(),
            }))
        },
    )
    .requires(&[types::METADATA])
}

/// `io.containerd.grpc.v1.namespaces`.
pub fn registration() -> Registration {
    crate::grpc_over_service::<NamespacesService>("namespaces", "namespaces-service")
}
