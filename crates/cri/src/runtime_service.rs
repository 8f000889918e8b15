//! `runtime.v1.RuntimeService`: `Version` and `Status` answer as containerd 1.6's CRI
//! does (the network condition says why it is not ready); sandboxes and containers are
//! served by [`crate::sandbox`], [`crate::container`] and [`crate::stats`]; streaming, pod
//! sandbox stats and metrics, container events and checkpoints answer `Unimplemented`,
//! saying they are not built yet.

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

fn not_built(rpc: &str) -> Status {
    Status::unimplemented(format!(
        "{rpc} is not built yet in berthd: its CRI plugin serves images, pod sandboxes, containers and ExecSync (streaming, pod sandbox stats and metrics, container events and checkpoints are not built yet)"
    ))
}

/// Runs one of the hand-written RPCs.
macro_rules! rpc {
    ($e:expr) => {
        $e.map(Response::new)
    };
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
                let network = match crate::cni::load(&self.inner.config.cni) {
                    Ok(_) => api::RuntimeCondition {
                        r#type: "NetworkReady".into(),
                        status: true,
                        ..Default::default()
                    },
                    Err(e) => api::RuntimeCondition {
                        r#type: "NetworkReady".into(),
                        status: false,
                        reason: NETWORK_NOT_READY_REASON.into(),
                        message: format!("Network plugin returns error: {e}"),
                    },
                };
                let conditions = vec![
                    api::RuntimeCondition {
                        r#type: "RuntimeReady".into(),
                        status: true,
                        ..Default::default()
                    },
                    network,
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

            async fn run_pod_sandbox(
                &self,
                request: Request<api::RunPodSandboxRequest>,
            ) -> Result<Response<api::RunPodSandboxResponse>, Status> {
                rpc!(self.run_sandbox(request.into_inner()).await)
            }

            async fn stop_pod_sandbox(
                &self,
                request: Request<api::StopPodSandboxRequest>,
            ) -> Result<Response<api::StopPodSandboxResponse>, Status> {
                let id = request.into_inner().pod_sandbox_id;
                rpc!(self.stop_sandbox(&id).await.map(|()| api::StopPodSandboxResponse {}))
            }

            async fn remove_pod_sandbox(
                &self,
                request: Request<api::RemovePodSandboxRequest>,
            ) -> Result<Response<api::RemovePodSandboxResponse>, Status> {
                let id = request.into_inner().pod_sandbox_id;
                rpc!(self.remove_sandbox(&id).await.map(|()| api::RemovePodSandboxResponse {}))
            }

            async fn pod_sandbox_status(
                &self,
                request: Request<api::PodSandboxStatusRequest>,
            ) -> Result<Response<api::PodSandboxStatusResponse>, Status> {
                rpc!(self.sandbox_status(request.into_inner()).await)
            }

            async fn list_pod_sandbox(
                &self,
                request: Request<api::ListPodSandboxRequest>,
            ) -> Result<Response<api::ListPodSandboxResponse>, Status> {
                rpc!(self.list_sandboxes(request.into_inner()).await)
            }

            async fn create_container(
                &self,
                request: Request<api::CreateContainerRequest>,
            ) -> Result<Response<api::CreateContainerResponse>, Status> {
                rpc!(CriService::create_container(self, request.into_inner()).await)
            }

            async fn start_container(
                &self,
                request: Request<api::StartContainerRequest>,
            ) -> Result<Response<api::StartContainerResponse>, Status> {
                let id = request.into_inner().container_id;
                rpc!(CriService::start_container(self, &id).await.map(|()| api::StartContainerResponse {}))
            }

            async fn stop_container(
                &self,
                request: Request<api::StopContainerRequest>,
            ) -> Result<Response<api::StopContainerResponse>, Status> {
                rpc!(CriService::stop_container(self, request.into_inner()).await.map(|()| api::StopContainerResponse {}))
            }

            async fn remove_container(
                &self,
                request: Request<api::RemoveContainerRequest>,
            ) -> Result<Response<api::RemoveContainerResponse>, Status> {
                let id = request.into_inner().container_id;
                rpc!(CriService::remove_container(self, &id).await.map(|()| api::RemoveContainerResponse {}))
            }

            async fn list_containers(
                &self,
                request: Request<api::ListContainersRequest>,
            ) -> Result<Response<api::ListContainersResponse>, Status> {
                rpc!(CriService::list_containers(self, request.into_inner()).await)
            }

            async fn container_status(
                &self,
                request: Request<api::ContainerStatusRequest>,
            ) -> Result<Response<api::ContainerStatusResponse>, Status> {
                rpc!(CriService::container_status(self, request.into_inner()).await)
            }

            async fn update_container_resources(
                &self,
                request: Request<api::UpdateContainerResourcesRequest>,
            ) -> Result<Response<api::UpdateContainerResourcesResponse>, Status> {
                rpc!(self.update_resources(request.into_inner()).await.map(|()| api::UpdateContainerResourcesResponse {}))
            }

            async fn update_runtime_config(
                &self,
                request: Request<api::UpdateRuntimeConfigRequest>,
            ) -> Result<Response<api::UpdateRuntimeConfigResponse>, Status> {
                let cidrs = request
                    .into_inner()
                    .runtime_config
                    .and_then(|c| c.network_config)
                    .map(|n| n.pod_cidr)
                    .unwrap_or_default();
                rpc!(self.update_runtime_config_cidrs(&cidrs).map(|()| api::UpdateRuntimeConfigResponse {}))
            }

            async fn reopen_container_log(
                &self,
                request: Request<api::ReopenContainerLogRequest>,
            ) -> Result<Response<api::ReopenContainerLogResponse>, Status> {
                let id = request.into_inner().container_id;
                rpc!(self.reopen_log(&id).await.map(|()| api::ReopenContainerLogResponse {}))
            }

            async fn container_stats(
                &self,
                request: Request<api::ContainerStatsRequest>,
            ) -> Result<Response<api::ContainerStatsResponse>, Status> {
                rpc!(CriService::container_stats(self, request.into_inner()).await)
            }

            async fn list_container_stats(
                &self,
                request: Request<api::ListContainerStatsRequest>,
            ) -> Result<Response<api::ListContainerStatsResponse>, Status> {
                rpc!(CriService::list_container_stats(self, request.into_inner()).await)
            }

            async fn exec_sync(
                &self,
                request: Request<api::ExecSyncRequest>,
            ) -> Result<Response<api::ExecSyncResponse>, Status> {
                rpc!(CriService::exec_sync(self, request.into_inner()).await)
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
    exec => "Exec": ExecRequest -> ExecResponse,
    attach => "Attach": AttachRequest -> AttachResponse,
    port_forward => "PortForward": PortForwardRequest -> PortForwardResponse,
    pod_sandbox_stats => "PodSandboxStats": PodSandboxStatsRequest -> PodSandboxStatsResponse,
    list_pod_sandbox_stats => "ListPodSandboxStats": ListPodSandboxStatsRequest -> ListPodSandboxStatsResponse,
    checkpoint_container => "CheckpointContainer": CheckpointContainerRequest -> CheckpointContainerResponse,
    list_metric_descriptors => "ListMetricDescriptors": ListMetricDescriptorsRequest -> ListMetricDescriptorsResponse,
    list_pod_sandbox_metrics => "ListPodSandboxMetrics": ListPodSandboxMetricsRequest -> ListPodSandboxMetricsResponse,
    runtime_config => "RuntimeConfig": RuntimeConfigRequest -> RuntimeConfigResponse,
}

impl CriService {
    /// containerd's `UpdateRuntimeConfig`: with a pod CIDR and a `conf_template`, and no
    /// CNI config loaded yet, the template is rendered into `conf_dir`.
    fn update_runtime_config_cidrs(&self, pod_cidrs: &str) -> Result<(), Status> {
        let cni = &self.inner.config.cni;
        if pod_cidrs.is_empty() || cni.conf_template.is_empty() {
            return Ok(());
        }
        if crate::cni::load(cni).is_ok() {
            tracing::info!("network plugin is ready, skip generating cni config from template");
            return Ok(());
        }
        let cidrs: Vec<&str> = pod_cidrs.split(',').map(str::trim).collect();
        let template = std::fs::read_to_string(&cni.conf_template).map_err(|e| {
            Status::unknown(format!(
                "failed to read cni config template {:?}: {e}",
                cni.conf_template
            ))
        })?;
        let text = crate::cni::render_template(&template, &cidrs).map_err(Status::unimplemented)?;
        let dir = std::path::Path::new(&cni.conf_dir);
        std::fs::create_dir_all(dir).map_err(|e| {
            Status::unknown(format!(
                "failed to create cni conf dir {:?}: {e}",
                cni.conf_dir
            ))
        })?;
        let tmp = dir.join(format!(".{}.tmp", crate::cni::TEMPLATE_OUTPUT));
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, dir.join(crate::cni::TEMPLATE_OUTPUT)))
            .map_err(|e| Status::unknown(format!("failed to write cni config: {e}")))
    }
}
