//! `containerd.services.tasks.v1.Tasks` (`io.containerd.grpc.v1.tasks`): the container's
//! record from the metadata store plus the task runtime (`io.containerd.runtime.v2.task`).
//!
//! Task events (`/tasks/create|start|exit|delete|oom|paused|resumed|exec-added|
//! exec-started`) are published by the shims themselves, as with containerd; the runtime
//! publishes the exit of shims that died.

use crate::{IntoStatus, namespace};
use berth_api::containerd::v1::types::{Process, ProcessInfo, Status as ProtoStatus};
use berth_api::services::tasks::v1::{
    CheckpointTaskRequest, CheckpointTaskResponse, CloseIoRequest, CreateTaskRequest,
    CreateTaskResponse, DeleteProcessRequest, DeleteResponse, DeleteTaskRequest,
    ExecProcessRequest, GetRequest, GetResponse, KillRequest, ListPidsRequest, ListPidsResponse,
    ListTasksRequest, ListTasksResponse, MetricsRequest, MetricsResponse, PauseTaskRequest,
    ResizePtyRequest, ResumeTaskRequest, StartRequest, StartResponse, UpdateTaskRequest,
    WaitRequest, WaitResponse, tasks_server,
};
use berth_api::timestamp;
use berth_api::types::Metric;
use berth_core::error::ErrorKind;
use berth_core::filters::Filter;
use berth_core::mount::Mount;
use berth_core::runtime::{CreateOpts, IoConfig, ProcessState, Runtime, Task, TaskStatus};
use berth_core::{Error, Result};
use berth_metadata::MetadataStore;
use berth_plugin::{GrpcService, InitContext, Instance, Registration, types};
use prost_types::Any;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// What a task is created with besides its container.
#[derive(Debug, Clone, Default)]
pub struct TaskCreate {
    pub io: IoConfig,
    pub rootfs: Vec<Mount>,
    pub options: Option<Any>,
    /// Overrides the container's runtime with a shim binary path.
    pub runtime_path: String,
}

/// Creates the task of container `id` (shared by the tasks service and the restart
/// monitor): the container's spec, runtime and runtime options go to the runtime.
pub async fn create_task(
    store: &Arc<MetadataStore>,
    runtime: &Arc<dyn Runtime>,
    ns: &str,
    id: &str,
    create: TaskCreate,
) -> Result<Arc<dyn Task>> {
    let container = {
        let (store, ns, id) = (store.clone(), ns.to_string(), id.to_string());
        tokio::task::spawn_blocking(move || store.get_container(&ns, &id))
            .await
            .map_err(|e| Error::unknown(format!("metadata task failed: {e}")))??
    };
    let name = container.runtime.name.clone();
    if name.starts_with("io.containerd.runtime.v1.") {
        tracing::warn!(
            "runtime v1 is deprecated since containerd v1.4, consider using runtime v2 ({name} runs under io.containerd.runc.v2)"
        );
    } else if name == "io.containerd.runc.v1" {
        tracing::warn!(
            "\"io.containerd.runc.v1\" is deprecated since containerd v1.4, consider using \"io.containerd.runc.v2\""
        );
    }
    match runtime.get(ns, id).await {
        Ok(_) => return Err(Error::already_exists(format!("task {id}"))),
        Err(e) if e.is(berth_core::error::ErrorKind::NotFound) => {}
        Err(e) => return Err(e),
    }
    let spec = container
        .spec
        .ok_or_else(|| Error::invalid_argument(format!("container {id:?} has no spec")))?;
    let opts = CreateOpts {
        spec: spec.value,
        rootfs: create.rootfs,
        io: create.io,
        checkpoint: String::new(),
        runtime: if create.runtime_path.is_empty() {
            name
        } else {
            create.runtime_path
        },
        runtime_options: container.runtime.options,
        task_options: create.options,
    };
    runtime.create(ns, id, opts).await
}

/// Why criu cannot take checkpoints on this host, if it cannot: not installed, or
/// installed but failing its own `criu check` (e.g. a kernel whose vDSO it cannot parse).
async fn criu_unusable() -> Option<String> {
    let criu = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("criu"))
            .find(|c| c.is_file())
    });
    let Some(criu) = criu else {
        return Some("criu is not installed on this host".into());
    };
    let out = tokio::process::Command::new(&criu)
        .arg("check")
        .stdin(std::process::Stdio::null())
        .output()
        .await;
    match out {
        Ok(out) if out.status.success() => None,
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stderr);
            let first_error = text
                .lines()
                .find(|l| l.contains("Error"))
                .or_else(|| text.lines().next())
                .unwrap_or("")
                .trim();
            Some(format!(
                "criu cannot run on this host (run `criu check`: {first_error})"
            ))
        }
        Err(e) => Some(format!(
            "criu cannot run on this host ({}: {e})",
            criu.display()
        )),
    }
}

fn proto_status(status: TaskStatus) -> i32 {
    (match status {
        TaskStatus::Unknown => ProtoStatus::Unknown,
        TaskStatus::Created => ProtoStatus::Created,
        TaskStatus::Running => ProtoStatus::Running,
        TaskStatus::Stopped => ProtoStatus::Stopped,
        TaskStatus::Paused => ProtoStatus::Paused,
        TaskStatus::Pausing => ProtoStatus::Pausing,
    }) as i32
}

fn process(container_id: &str, state: ProcessState) -> Process {
    Process {
        container_id: container_id.to_string(),
        id: if state.exec_id.is_empty() {
            container_id.to_string()
        } else {
            state.exec_id
        },
        pid: state.pid,
        status: proto_status(state.status),
        stdin: state.io.stdin,
        stdout: state.io.stdout,
        stderr: state.io.stderr,
        terminal: state.io.terminal,
        exit_status: state.exit_status,
        exited_at: state.exited_at.map(timestamp::from_system_time),
    }
}

#[derive(Clone)]
struct TasksService {
    store: Arc<MetadataStore>,
    runtime: Arc<dyn Runtime>,
}

impl TasksService {
    /// The task of a container that exists (containerd checks the container first).
    async fn task(&self, ns: &str, id: &str) -> Result<Arc<dyn Task>, Status> {
        let (store, cns, cid) = (self.store.clone(), ns.to_string(), id.to_string());
        tokio::task::spawn_blocking(move || store.get_container(&cns, &cid))
            .await
            .map_err(|e| Status::internal(format!("metadata task failed: {e}")))?
            .or_status()?;
        self.runtime
            .get(ns, id)
            .await
            .map_err(|_| Status::not_found(format!("task {id} not found")))
    }
}

#[tonic::async_trait]
impl tasks_server::Tasks for TasksService {
    async fn create(
        &self,
        request: Request<CreateTaskRequest>,
    ) -> Result<Response<CreateTaskResponse>, Status> {
        let ns = namespace(&request)?;
        let r = request.into_inner();
        if r.checkpoint.is_some() {
            return Err(crate::status(Error::not_implemented(
                "restoring a task from a checkpoint (needs criu and checkpoint images)",
            )));
        }
        let create = TaskCreate {
            io: IoConfig {
                stdin: r.stdin,
                stdout: r.stdout,
                stderr: r.stderr,
                terminal: r.terminal,
            },
            rootfs: r
                .rootfs
                .into_iter()
                .map(|m| Mount {
                    r#type: m.r#type,
                    source: m.source,
                    target: m.target,
                    options: m.options,
                })
                .collect(),
            options: r.options,
            runtime_path: r.runtime_path,
        };
        let task = create_task(&self.store, &self.runtime, &ns, &r.container_id, create)
            .await
            .or_status()?;
        let pid = task.pid().await.or_status()?;
        Ok(Response::new(CreateTaskResponse {
            container_id: r.container_id,
            pid,
        }))
    }

    async fn start(
        &self,
        request: Request<StartRequest>,
    ) -> Result<Response<StartResponse>, Status> {
        let ns = namespace(&request)?;
        let r = request.into_inner();
        let task = self.task(&ns, &r.container_id).await?;
        let pid = task.start(&r.exec_id).await.or_status()?;
        Ok(Response::new(StartResponse { pid }))
    }

    async fn delete(
        &self,
        request: Request<DeleteTaskRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let ns = namespace(&request)?;
        let id = request.into_inner().container_id;
        self.task(&ns, &id).await?;
        let exit = self.runtime.delete(&ns, &id).await.or_status()?;
        Ok(Response::new(DeleteResponse {
            id,
            pid: exit.pid,
            exit_status: exit.status,
            exited_at: Some(timestamp::from_system_time(exit.timestamp)),
        }))
    }

    async fn delete_process(
        &self,
        request: Request<DeleteProcessRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let ns = namespace(&request)?;
        let r = request.into_inner();
        if r.exec_id.is_empty() {
            return Err(Status::invalid_argument("exec id cannot be empty"));
        }
        let task = self.task(&ns, &r.container_id).await?;
        let exit = task.delete_process(&r.exec_id).await.or_status()?;
        Ok(Response::new(DeleteResponse {
            id: r.exec_id,
            pid: exit.pid,
            exit_status: exit.status,
            exited_at: Some(timestamp::from_system_time(exit.timestamp)),
        }))
    }

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let ns = namespace(&request)?;
        let r = request.into_inner();
        let task = self.task(&ns, &r.container_id).await?;
        let state = task.state(&r.exec_id).await.or_status()?;
        Ok(Response::new(GetResponse {
            process: Some(process(&r.container_id, state)),
        }))
    }

    async fn list(
        &self,
        request: Request<ListTasksRequest>,
    ) -> Result<Response<ListTasksResponse>, Status> {
        let ns = namespace(&request)?;
        let tasks = self.runtime.tasks(&ns).await.or_status()?;
        // A hung shim must not hang the listing: its task is left out after a while.
        let states = futures::future::join_all(tasks.iter().map(|t| async move {
            tokio::time::timeout(std::time::Duration::from_secs(10), t.state(""))
                .await
                .unwrap_or_else(|_| Err(Error::new(ErrorKind::DeadlineExceeded, "task state")))
        }))
        .await;
        let tasks = tasks
            .iter()
            .zip(states)
            .filter_map(|(task, state)| match state {
                Ok(state) => Some(process(task.id(), state)),
                Err(e) => {
                    tracing::warn!(id = task.id(), error = %e, "task state for list");
                    None
                }
            })
            .collect();
        Ok(Response::new(ListTasksResponse { tasks }))
    }

    async fn kill(&self, request: Request<KillRequest>) -> Result<Response<()>, Status> {
        let ns = namespace(&request)?;
        let r = request.into_inner();
        let task = self.task(&ns, &r.container_id).await?;
        task.kill(&r.exec_id, r.signal, r.all).await.or_status()?;
        Ok(Response::new(()))
    }

    async fn exec(&self, request: Request<ExecProcessRequest>) -> Result<Response<()>, Status> {
        let ns = namespace(&request)?;
        let r = request.into_inner();
        if r.exec_id.is_empty() {
            return Err(Status::invalid_argument("exec id cannot be empty"));
        }
        let spec = r
            .spec
            .ok_or_else(|| Status::invalid_argument("exec spec must be set"))?;
        let task = self.task(&ns, &r.container_id).await?;
        let io = IoConfig {
            stdin: r.stdin,
            stdout: r.stdout,
            stderr: r.stderr,
            terminal: r.terminal,
        };
        task.exec(&r.exec_id, io, spec).await.or_status()?;
        Ok(Response::new(()))
    }

    async fn resize_pty(&self, request: Request<ResizePtyRequest>) -> Result<Response<()>, Status> {
        let ns = namespace(&request)?;
        let r = request.into_inner();
        let task = self.task(&ns, &r.container_id).await?;
        task.resize_pty(&r.exec_id, r.width, r.height)
            .await
            .or_status()?;
        Ok(Response::new(()))
    }

    async fn close_io(&self, request: Request<CloseIoRequest>) -> Result<Response<()>, Status> {
        let ns = namespace(&request)?;
        let r = request.into_inner();
        let task = self.task(&ns, &r.container_id).await?;
        task.close_io(&r.exec_id, r.stdin).await.or_status()?;
        Ok(Response::new(()))
    }

    async fn pause(&self, request: Request<PauseTaskRequest>) -> Result<Response<()>, Status> {
        let ns = namespace(&request)?;
        let task = self.task(&ns, &request.into_inner().container_id).await?;
        task.pause().await.or_status()?;
        Ok(Response::new(()))
    }

    async fn resume(&self, request: Request<ResumeTaskRequest>) -> Result<Response<()>, Status> {
        let ns = namespace(&request)?;
        let task = self.task(&ns, &request.into_inner().container_id).await?;
        task.resume().await.or_status()?;
        Ok(Response::new(()))
    }

    async fn list_pids(
        &self,
        request: Request<ListPidsRequest>,
    ) -> Result<Response<ListPidsResponse>, Status> {
        let ns = namespace(&request)?;
        let task = self.task(&ns, &request.into_inner().container_id).await?;
        let processes = task
            .pids()
            .await
            .or_status()?
            .into_iter()
            .map(|p| ProcessInfo {
                pid: p.pid,
                info: p.info,
            })
            .collect();
        Ok(Response::new(ListPidsResponse { processes }))
    }

    async fn checkpoint(
        &self,
        request: Request<CheckpointTaskRequest>,
    ) -> Result<Response<CheckpointTaskResponse>, Status> {
        let ns = namespace(&request)?;
        let r = request.into_inner();
        self.task(&ns, &r.container_id).await?;
        let message = match criu_unusable().await {
            Some(reason) => format!("checkpoint: {reason}"),
            None => "checkpoint: checkpoint images are not supported by berthd yet".to_string(),
        };
        Err(Status::unimplemented(message))
    }

    async fn update(&self, request: Request<UpdateTaskRequest>) -> Result<Response<()>, Status> {
        let ns = namespace(&request)?;
        let r = request.into_inner();
        let task = self.task(&ns, &r.container_id).await?;
        task.update(r.resources, r.annotations).await.or_status()?;
        Ok(Response::new(()))
    }

    async fn metrics(
        &self,
        request: Request<MetricsRequest>,
    ) -> Result<Response<MetricsResponse>, Status> {
        let ns = namespace(&request)?;
        let filter = Filter::parse_all(&request.into_inner().filters).or_status()?;
        let tasks = self.runtime.tasks(&ns).await.or_status()?;
        let mut metrics = Vec::new();
        for task in tasks {
            let fields = |path: &[String]| match path {
                [f] if f == "id" => Some(task.id().to_string()),
                [f] if f == "namespace" => Some(task.namespace().to_string()),
                [f] if f == "runtime" => Some(task.runtime().to_string()),
                _ => None,
            };
            if !filter.matches(&fields) {
                continue;
            }
            match task.stats().await {
                Ok(data) => metrics.push(Metric {
                    timestamp: Some(timestamp::now()),
                    id: task.id().to_string(),
                    data: Some(data),
                }),
                Err(e) => tracing::warn!(id = task.id(), error = %e, "task metrics"),
            }
        }
        Ok(Response::new(MetricsResponse { metrics }))
    }

    async fn wait(&self, request: Request<WaitRequest>) -> Result<Response<WaitResponse>, Status> {
        let ns = namespace(&request)?;
        let r = request.into_inner();
        let task = self.task(&ns, &r.container_id).await?;
        let exit = task.wait(&r.exec_id).await.or_status()?;
        Ok(Response::new(WaitResponse {
            exit_status: exit.status,
            exited_at: Some(timestamp::from_system_time(exit.timestamp)),
        }))
    }
}

impl GrpcService for TasksService {
    fn register(
        &self,
        routes: &mut tonic::service::RoutesBuilder,
        limits: berth_plugin::MessageLimits,
    ) {
        routes.add_service(crate::limited!(
            tasks_server::TasksServer::new(self.clone()),
            limits
        ));
    }
}

/// `io.containerd.service.v1.tasks-service`: the service the gRPC plugin serves.
pub fn service_registration() -> Registration {
    Registration::new(
        types::SERVICE,
        "tasks-service",
        |ctx: InitContext| async move {
            let store: Arc<MetadataStore> = ctx.get(types::METADATA)?;
            let runtime: Arc<dyn Runtime> = ctx.get(types::RUNTIME_V2)?;
            Ok::<Instance, _>(Arc::new(TasksService { store, runtime }))
        },
    )
    .requires(&[types::METADATA, types::RUNTIME_V2])
}

/// `io.containerd.grpc.v1.tasks`.
pub fn registration() -> Registration {
    crate::grpc_over_service::<TasksService>("tasks", "tasks-service")
}
