//! `containerd.services.version.v1.Version` (`io.containerd.grpc.v1.version`).

use berth_api::services::version::v1::{VersionResponse, version_server};
use berth_plugin::{GrpcService, InitContext, Instance, Registration, grpc_instance, types};
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The version `ctr version` prints for the server.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The source revision, when the build knows it.
pub const REVISION: &str = match option_env!("BERTH_REVISION") {
    Some(revision) => revision,
    None => "",
};

struct VersionService;

#[tonic::async_trait]
impl version_server::Version for VersionService {
    async fn version(&self, _: Request<()>) -> Result<Response<VersionResponse>, Status> {
        Ok(Response::new(VersionResponse {
            version: format!("berth {VERSION}"),
            revision: REVISION.to_string(),
        }))
    }
}

impl GrpcService for VersionService {
    fn register(
        &self,
        routes: &mut tonic::service::RoutesBuilder,
        limits: berth_plugin::MessageLimits,
    ) {
        routes.add_service(crate::limited!(
            version_server::VersionServer::new(VersionService),
            limits
        ));
    }
}

pub fn registration() -> Registration {
    Registration::new(types::GRPC, "version", |_ctx: InitContext| async {
        Ok::<Instance, _>(grpc_instance(Arc::new(VersionService)))
    })
}
