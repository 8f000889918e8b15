//! `runtime.v1.RuntimeService`: `Version` and `Status` answer as containerd 1.6's CRI
//! does (the network condition says why it is not ready); everything about sandboxes,
//! containers, streaming and stats answers `Unimplemented`, saying it is not built yet.

use crate::CriService;
use crate::api::{self, runtime_service_server::RuntimeService};
use tonic::{Request, Response, Status};

/// The CRI API version containerd 1.6 reports in `Version.version` (kubelet's "kube API
/// version", a constant there too).
const KUBE_API_VERSION: &str = "0.1.0";
/// containerd's runtime name: berthd is a drop-in containerd, and tools key on the name
/// (the kubelet shows `containerd://<runtime_version>` as the node's runtime).
const RUNTIME_NAME: &str = "containerd";
const RUNTIME_API_VERSION: &str = "v1";

/// Why the network is not ready, in containerd's words (`NetworkPluginNotReady`).
const NETWORK_NOT_READY_REASON: &str = "NetworkPluginNotReady";
const NETWORK_NOT_READY_MESSAGE: &str = "Network plugin returns error: CNI is not built yet in berthd (the CRI plugin serves images only so far)";

fn not_built(rpc: &str) -> Status {
    Status::unimplemented(format!(
        "{rpc} is not built yet in berthd: its CRI plugin serves the image service, Version and Status only (pod sandboxes, containers, streaming, stats and CNI are not built yet)"
    ))
}

/// The runtime version: Berth's, marked as such (`0.1.0+berth`: still a semantic
/// version for tools that parse it).
fn runtime_version() -> String {
    format!("{}+berth", berth_services::version::VERSION)
}

/// Writes the `RuntimeService` impl: `Version` and `Status` by hand, then one method per
/// `name(Request) -> Response` listed, answering `Unimplemented` (a macro so that
/// `async_trait` sees the methods already written out).
macro_rules! runtime_service {
    ($($method:ident => $rpc:literal : $req:ident -> $resp:ident),* $(,)?) => {
        #[tonic::async_trait]
        impl RuntimeService for CriService {
            async fn version(
                &self,
                _request: Request<api::VersionRequest>,
            ) -> Result<Response<api::VersionResponse>, Status> {
                Ok(Response::new(api::VersionResponse {
                    version: KUBE_API_VERSION.into(),
                    runtime_name: RUNTIME_NAME.into(),
                    runtime_version: runtime_version(),
                    runtime_api_version: RUNTIME_API_VERSION.into(),
                }))
            }

            async fn status(
                &self,
                request: Request<api::StatusRequest>,
            ) -> Result<Response<api::StatusResponse>, Status> {
                let conditions = vec![
                    api::RuntimeCondition {
                        r#type: "RuntimeReady".into(),
                        status: true,
                        ..Default::default()
                    },
                    api::RuntimeCondition {
                        r#type: "NetworkReady".into(),
                        status: false,
                        reason: NETWORK_NOT_READY_REASON.into(),
                        message: NETWORK_NOT_READY_MESSAGE.into(),
                    },
                ];
                let mut info = std::collections::HashMap::new();
                if request.into_inner().verbose {
                    // containerd's verbose `config` entry: the plugin's effective config.
                    let config = serde_json::to_string(&self.inner.config)
                        .unwrap_or_else(|e| e.to_string());
                    info.insert("config".to_string(), config);
                }
                Ok(Response::new(api::StatusResponse {
                    status: Some(api::RuntimeStatus { conditions }),
                    info,
                    ..Default::default()
                }))
            }

            type GetContainerEventsStream = std::pin::Pin<
                Box<
                    dyn tokio_stream::Stream<Item = Result<api::ContainerEventResponse, Status>>
                        + Send
                        + 'static,
                >,
            >;

            async fn get_container_events(
                &self,
                _request: Request<api::GetEventsRequest>,
            ) -> Result<Response<Self::GetContainerEventsStream>, Status> {
                Err(not_built("GetContainerEvents"))
            }

            $(
                async fn $method(
                    &self,
                    _request: Request<api::$req>,
                ) -> Result<Response<api::$resp>, Status> {
                    Err(not_built($rpc))
                }
            )*
        }
    };
}

runtime_service! {
    run_pod_sandbox => "RunPodSandbox": RunPodSandboxRequest -> RunPodSandboxResponse,
    stop_pod_sandbox => "StopPodSandbox": StopPodSandboxRequest -> StopPodSandboxResponse,
    remove_pod_sandbox => "RemovePodSandbox": RemovePodSandboxRequest -> RemovePodSandboxResponse,
    pod_sandbox_status => "PodSandboxStatus": PodSandboxStatusRequest -> PodSandboxStatusResponse,
    list_pod_sandbox => "ListPodSandbox": ListPodSandboxRequest -> ListPodSandboxResponse,
    create_container => "CreateContainer": CreateContainerRequest -> CreateContainerResponse,
    start_container => "StartContainer": StartContainerRequest -> StartContainerResponse,
    stop_container => "StopContainer": StopContainerRequest -> StopContainerResponse,
    remove_container => "RemoveContainer": RemoveContainerRequest -> RemoveContainerResponse,
    list_containers => "ListContainers": ListContainersRequest -> ListContainersResponse,
    container_status => "ContainerStatus": ContainerStatusRequest -> ContainerStatusResponse,
    update_container_resources => "UpdateContainerResources": UpdateContainerResourcesRequest -> UpdateContainerResourcesResponse,
    reopen_container_log => "ReopenContainerLog": ReopenContainerLogRequest -> ReopenContainerLogResponse,
    exec_sync => "ExecSync": ExecSyncRequest -> ExecSyncResponse,
    exec => "Exec": ExecRequest -> ExecResponse,
    attach => "Attach": AttachRequest -> AttachResponse,
    port_forward => "PortForward": PortForwardRequest -> PortForwardResponse,
    container_stats => "ContainerStats": ContainerStatsRequest -> ContainerStatsResponse,
    list_container_stats => "ListContainerStats": ListContainerStatsRequest -> ListContainerStatsResponse,
    pod_sandbox_stats => "PodSandboxStats": PodSandboxStatsRequest -> PodSandboxStatsResponse,
    list_pod_sandbox_stats => "ListPodSandboxStats": ListPodSandboxStatsRequest -> ListPodSandboxStatsResponse,
    update_runtime_config => "UpdateRuntimeConfig": UpdateRuntimeConfigRequest -> UpdateRuntimeConfigResponse,
    checkpoint_container => "CheckpointContainer": CheckpointContainerRequest -> CheckpointContainerResponse,
    list_metric_descriptors => "ListMetricDescriptors": ListMetricDescriptorsRequest -> ListMetricDescriptorsResponse,
    list_pod_sandbox_metrics => "ListPodSandboxMetrics": ListPodSandboxMetricsRequest -> ListPodSandboxMetricsResponse,
    runtime_config => "RuntimeConfig": RuntimeConfigRequest -> RuntimeConfigResponse,
}
