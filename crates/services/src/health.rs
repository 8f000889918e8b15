//! `grpc.health.v1.Health` (`io.containerd.grpc.v1.healthcheck`): serving as soon as the
//! gRPC listener is up, like containerd.

use berth_plugin::{GrpcService, InitContext, Instance, Registration, grpc_instance, types};
use std::sync::Arc;

struct HealthService {
    service: tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>,
}

impl GrpcService for HealthService {
    fn register(
        &self,
        routes: &mut tonic::service::RoutesBuilder,
        limits: berth_plugin::MessageLimits,
    ) {
        routes.add_service(crate::limited!(self.service.clone(), limits));
    }
}

pub fn registration() -> Registration {
    Registration::new(types::GRPC, "healthcheck", |_ctx: InitContext| async {
        let reporter = tonic_health::server::HealthReporter::new();
        // The empty service name is the whole server, which containerd reports.
        reporter
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        let service = tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(reporter),
        );
        Ok::<Instance, _>(grpc_instance(Arc::new(HealthService { service })))
    })
}
