//! `containerd.services.diff.v1.Diff`: `io.containerd.service.v1.diff-service` (the
//! configured differs, tried in order) and `io.containerd.grpc.v1.diff`.

use crate::IntoStatus;
use crate::snapshots::mount_from_api;
use berth_api::services::diff::v1 as api;
use berth_api::services::diff::v1::diff_server;
use berth_api::types;
use berth_core::content::{Descriptor, Scope};
use berth_core::diff::{ApplyConfig, DiffConfig, Differ};
use berth_core::error::ErrorKind;
use berth_plugin::{GrpcService, InitContext, Instance, Registration, types as plugin_types};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The instance of a differ plugin.
pub type DifferInstance = Arc<dyn Differ>;

fn desc_from_api(d: types::Descriptor) -> Descriptor {
    Descriptor {
        media_type: d.media_type,
        digest: d.digest,
        size: d.size,
        annotations: d.annotations.into_iter().collect(),
    }
}

fn desc_to_api(d: Descriptor) -> types::Descriptor {
    types::Descriptor {
        media_type: d.media_type,
        digest: d.digest,
        size: d.size,
        annotations: d.annotations.into_iter().collect(),
    }
}

/// `[plugins."io.containerd.service.v1.diff-service"]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct DiffServiceConfig {
    /// Differ IDs in order of preference (containerd's `default`).
    pub default: Vec<String>,
}

impl Default for DiffServiceConfig {
    fn default() -> Self {
        DiffServiceConfig {
            default: vec!["walking".into()],
        }
    }
}

/// The ordered differs.
#[derive(Clone)]
pub struct DiffService {
    differs: Vec<DifferInstance>,
}

impl DiffService {
    pub fn new(differs: Vec<DifferInstance>) -> DiffService {
        DiffService { differs }
    }

    fn scope<T>(request: &Request<T>) -> Result<Scope, Status> {
        Ok(Scope::new(crate::namespace(request)?).with_lease(crate::lease(request)))
    }
}

#[tonic::async_trait]
impl diff_server::Diff for DiffService {
    async fn apply(
        &self,
        request: Request<api::ApplyRequest>,
    ) -> Result<Response<api::ApplyResponse>, Status> {
        let scope = Self::scope(&request)?;
        let req = request.into_inner();
        let desc = desc_from_api(req.diff.unwrap_or_default());
        let mounts: Vec<_> = req.mounts.into_iter().map(mount_from_api).collect();
        let config = ApplyConfig {
            processor_payloads: req
                .payloads
                .into_iter()
                .map(|(k, v)| (k, (v.type_url, v.value)))
                .collect(),
            expected_diff_id: None,
        };
        let mut last = berth_core::Error::not_implemented("no differ configured");
        for differ in &self.differs {
            match differ.apply(&scope, &desc, &mounts, config.clone()).await {
                Ok(applied) => {
                    return Ok(Response::new(api::ApplyResponse {
                        applied: Some(desc_to_api(applied)),
                    }));
                }
                // Not this differ's media type: try the next, as containerd does.
                Err(e) if e.is(ErrorKind::NotImplemented) => last = e,
                Err(e) => return Err(crate::status(e)),
            }
        }
        Err(crate::status(last))
    }

    async fn diff(
        &self,
        request: Request<api::DiffRequest>,
    ) -> Result<Response<api::DiffResponse>, Status> {
        let scope = Self::scope(&request)?;
        let req = request.into_inner();
        let lower: Vec<_> = req.left.into_iter().map(mount_from_api).collect();
        let upper: Vec<_> = req.right.into_iter().map(mount_from_api).collect();
        let config = DiffConfig {
            media_type: req.media_type,
            reference: req.r#ref,
            labels: req.labels.into_iter().collect(),
        };
        let mut last = berth_core::Error::not_implemented("no differ configured");
        for differ in &self.differs {
            match differ.compare(&scope, &lower, &upper, config.clone()).await {
                Ok(desc) => {
                    return Ok(Response::new(api::DiffResponse {
                        diff: Some(desc_to_api(desc)),
                    }));
                }
                Err(e) if e.is(ErrorKind::NotImplemented) => last = e,
                Err(e) => return Err(crate::status(e)),
            }
        }
        Err(last).or_status()
    }
}

impl GrpcService for DiffService {
    fn register(
        &self,
        routes: &mut tonic::service::RoutesBuilder,
        limits: berth_plugin::MessageLimits,
    ) {
        routes.add_service(crate::limited!(
            diff_server::DiffServer::new(self.clone()),
            limits
        ));
    }
}

/// `io.containerd.service.v1.diff-service`: instance [`DiffService`].
pub fn service_registration() -> Registration {
    Registration::new(
        plugin_types::SERVICE,
        "diff-service",
        |ctx: InitContext| async move {
            let config: DiffServiceConfig = ctx.config()?;
            let mut differs = Vec::new();
            for id in &config.default {
                let differ: DifferInstance = ctx.get_by_id(plugin_types::DIFF, id)?;
                differs.push(differ);
            }
            Ok::<Instance, _>(Arc::new(DiffService::new(differs)))
        },
    )
    .requires(&[plugin_types::DIFF])
    .with_config::<DiffServiceConfig>()
}

/// `io.containerd.grpc.v1.diff`.
pub fn registration() -> Registration {
    crate::grpc_over_service::<DiffService>("diff", "diff-service")
}
