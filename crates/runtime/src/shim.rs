//! One shim connection: the ttrpc task client (task API v2) behind [`berth_core::runtime::Task`].
//!
//! The wire types are rust-protobuf's (from `containerd-shim-protos`); this module is the
//! one place they are converted to and from Berth's core types.

use berth_core::error::ErrorKind;
use berth_core::mount::Mount;
use berth_core::runtime::{Exit, IoConfig, ProcessPid, ProcessState, Task, TaskStatus};
use berth_core::{Error, Result};
use containerd_shim_protos::api;
use containerd_shim_protos::protobuf::well_known_types::{any::Any as PbAny, timestamp::Timestamp};
use containerd_shim_protos::protobuf::{EnumOrUnknown, MessageField};
use containerd_shim_protos::shim_async::TaskClient;
use containerd_shim_protos::ttrpc;
use containerd_shim_protos::ttrpc::context::Context;
use prost_types::Any;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

/// A connected shim serving one task.
pub struct ShimTask {
    pub(crate) id: String,
    pub(crate) namespace: String,
    pub(crate) runtime: String,
    pub(crate) bundle: PathBuf,
    pub(crate) client: TaskClient,
    /// Set once the daemon deletes the task itself, so the shim's exit is not mistaken
    /// for a crash.
    pub(crate) deleted: AtomicBool,
    pub(crate) shim_pid: std::sync::atomic::AtomicU32,
    /// The init process's PID once known (the answer to `Create` or `Connect`); it never
    /// changes, so `pid()` needs no round trip to the shim.
    pub(crate) init_pid: std::sync::atomic::AtomicU32,
}

/// The call context: containerd sends the namespace in ttrpc metadata.
pub(crate) fn context(namespace: &str, timeout: Option<Duration>) -> Context {
    let mut ctx = ttrpc::context::with_metadata(HashMap::new());
    ctx.add(
        berth_core::namespaces::TTRPC_HEADER.to_string(),
        namespace.to_string(),
    );
    if let Some(t) = timeout {
        ctx.timeout_nano = t.as_nanos() as i64;
    }
    ctx
}

/// Maps a ttrpc error to containerd's class, keeping the shim's message.
pub(crate) fn shim_error(err: ttrpc::Error) -> Error {
    match err {
        ttrpc::Error::RpcStatus(status) => {
            use ttrpc::proto::Code;
            let kind = match status.code() {
                Code::NOT_FOUND => ErrorKind::NotFound,
                Code::ALREADY_EXISTS => ErrorKind::AlreadyExists,
                Code::INVALID_ARGUMENT => ErrorKind::InvalidArgument,
                Code::FAILED_PRECONDITION => ErrorKind::FailedPrecondition,
                Code::UNAVAILABLE => ErrorKind::Unavailable,
                Code::UNIMPLEMENTED => ErrorKind::NotImplemented,
                Code::DEADLINE_EXCEEDED => ErrorKind::DeadlineExceeded,
                Code::CANCELLED => ErrorKind::Canceled,
                _ => ErrorKind::Unknown,
            };
            Error::with_message(kind, status.message().to_string())
        }
        other => Error::unavailable(format!("ttrpc: {other}")),
    }
}

pub(crate) fn to_pb_any(any: &Any) -> PbAny {
    let mut pb = PbAny::new();
    pb.type_url = any.type_url.clone();
    pb.value = any.value.clone();
    pb
}

pub(crate) fn from_pb_any(any: &PbAny) -> Any {
    Any {
        type_url: any.type_url.clone(),
        value: any.value.clone(),
    }
}

pub(crate) fn to_time(ts: &MessageField<Timestamp>) -> SystemTime {
    match ts.as_ref() {
        Some(ts) => {
            SystemTime::UNIX_EPOCH
                + Duration::new(
                    ts.seconds.max(0) as u64,
                    ts.nanos.clamp(0, 999_999_999) as u32,
                )
        }
        None => SystemTime::UNIX_EPOCH,
    }
}

pub(crate) fn to_pb_mount(m: &Mount) -> api::Mount {
    let mut pb = api::Mount::new();
    pb.type_ = m.r#type.clone();
    pb.source = m.source.clone();
    pb.target = m.target.clone();
    pb.options = m.options.clone();
    pb
}

fn status(s: EnumOrUnknown<api::Status>) -> TaskStatus {
    match s.enum_value() {
        Ok(api::Status::CREATED) => TaskStatus::Created,
        Ok(api::Status::RUNNING) => TaskStatus::Running,
        Ok(api::Status::STOPPED) => TaskStatus::Stopped,
        Ok(api::Status::PAUSED) => TaskStatus::Paused,
        Ok(api::Status::PAUSING) => TaskStatus::Pausing,
        _ => TaskStatus::Unknown,
    }
}

impl ShimTask {
    fn ctx(&self) -> Context {
        context(&self.namespace, None)
    }

    pub(crate) fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::SeqCst)
    }

    /// Creates the task in the shim (the bundle and shim already exist).
    pub(crate) async fn create_task(
        &self,
        rootfs: &[Mount],
        io: &IoConfig,
        checkpoint: &str,
        options: Option<&Any>,
    ) -> Result<u32> {
        let mut req = api::CreateTaskRequest::new();
        req.id = self.id.clone();
        req.bundle = self.bundle.display().to_string();
        req.rootfs = rootfs.iter().map(to_pb_mount).collect();
        req.terminal = io.terminal;
        req.stdin = io.stdin.clone();
        req.stdout = io.stdout.clone();
        req.stderr = io.stderr.clone();
        req.checkpoint = checkpoint.to_string();
        if let Some(o) = options {
            req.options = MessageField::some(to_pb_any(o));
        }
        let resp = self
            .client
            .create(self.ctx(), &req)
            .await
            .map_err(shim_error)?;
        self.init_pid.store(resp.pid, Ordering::SeqCst);
        Ok(resp.pid)
    }

    /// Deletes the init process in the shim.
    pub(crate) async fn delete_task(&self) -> Result<Exit> {
        let mut req = api::DeleteRequest::new();
        req.id = self.id.clone();
        let resp = self
            .client
            .delete(self.ctx(), &req)
            .await
            .map_err(shim_error)?;
        Ok(Exit {
            pid: resp.pid,
            status: resp.exit_status,
            timestamp: to_time(&resp.exited_at),
        })
    }

    /// Asks the shim to exit (it does once it serves no task); errors are expected when
    /// the shim closes the connection first.
    pub(crate) async fn shutdown(&self) {
        let mut req = api::ShutdownRequest::new();
        req.id = self.id.clone();
        let ctx = context(&self.namespace, Some(Duration::from_secs(3)));
        if let Err(e) = self.client.shutdown(ctx, &req).await {
            tracing::debug!(id = %self.id, error = %e, "shim shutdown");
        }
    }

    /// The shim's own PID (`Connect`), which also checks that it answers.
    pub(crate) async fn connect(&self, timeout: Duration) -> Result<(u32, u32)> {
        let mut req = api::ConnectRequest::new();
        req.id = self.id.clone();
        let resp = self
            .client
            .connect(context(&self.namespace, Some(timeout)), &req)
            .await
            .map_err(shim_error)?;
        Ok((resp.shim_pid, resp.task_pid))
    }
}

pub(crate) type SharedTask = Arc<ShimTask>;

#[async_trait::async_trait]
impl Task for ShimTask {
    fn id(&self) -> &str {
        &self.id
    }
    fn namespace(&self) -> &str {
        &self.namespace
    }
    fn runtime(&self) -> &str {
        &self.runtime
    }

    async fn pid(&self) -> Result<u32> {
        match self.init_pid.load(Ordering::SeqCst) {
            0 => Ok(self.state("").await?.pid),
            pid => Ok(pid),
        }
    }

    async fn start(&self, exec_id: &str) -> Result<u32> {
        let mut req = api::StartRequest::new();
        req.id = self.id.clone();
        req.exec_id = exec_id.to_string();
        let resp = self
            .client
            .start(self.ctx(), &req)
            .await
            .map_err(shim_error)?;
        Ok(resp.pid)
    }

    async fn state(&self, exec_id: &str) -> Result<ProcessState> {
        let mut req = api::StateRequest::new();
        req.id = self.id.clone();
        req.exec_id = exec_id.to_string();
        let resp = self
            .client
            .state(self.ctx(), &req)
            .await
            .map_err(shim_error)?;
        let status = status(resp.status);
        Ok(ProcessState {
            id: self.id.clone(),
            exec_id: exec_id.to_string(),
            pid: resp.pid,
            status,
            io: IoConfig {
                stdin: resp.stdin,
                stdout: resp.stdout,
                stderr: resp.stderr,
                terminal: resp.terminal,
            },
            exit_status: resp.exit_status,
            exited_at: (status == TaskStatus::Stopped).then(|| to_time(&resp.exited_at)),
        })
    }

    async fn kill(&self, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let mut req = api::KillRequest::new();
        req.id = self.id.clone();
        req.exec_id = exec_id.to_string();
        req.signal = signal;
        req.all = all;
        self.client
            .kill(self.ctx(), &req)
            .await
            .map_err(shim_error)?;
        Ok(())
    }

    async fn exec(&self, exec_id: &str, io: IoConfig, spec: Any) -> Result<()> {
        let mut req = api::ExecProcessRequest::new();
        req.id = self.id.clone();
        req.exec_id = exec_id.to_string();
        req.terminal = io.terminal;
        req.stdin = io.stdin;
        req.stdout = io.stdout;
        req.stderr = io.stderr;
        req.spec = MessageField::some(to_pb_any(&spec));
        self.client
            .exec(self.ctx(), &req)
            .await
            .map_err(shim_error)?;
        Ok(())
    }

    async fn delete_process(&self, exec_id: &str) -> Result<Exit> {
        let mut req = api::DeleteRequest::new();
        req.id = self.id.clone();
        req.exec_id = exec_id.to_string();
        let resp = self
            .client
            .delete(self.ctx(), &req)
            .await
            .map_err(shim_error)?;
        Ok(Exit {
            pid: resp.pid,
            status: resp.exit_status,
            timestamp: to_time(&resp.exited_at),
        })
    }

    async fn resize_pty(&self, exec_id: &str, width: u32, height: u32) -> Result<()> {
        let mut req = api::ResizePtyRequest::new();
        req.id = self.id.clone();
        req.exec_id = exec_id.to_string();
        req.width = width;
        req.height = height;
        self.client
            .resize_pty(self.ctx(), &req)
            .await
            .map_err(shim_error)?;
        Ok(())
    }

    async fn close_io(&self, exec_id: &str, stdin: bool) -> Result<()> {
        let mut req = api::CloseIORequest::new();
        req.id = self.id.clone();
        req.exec_id = exec_id.to_string();
        req.stdin = stdin;
        self.client
            .close_io(self.ctx(), &req)
            .await
            .map_err(shim_error)?;
        Ok(())
    }

    async fn pause(&self) -> Result<()> {
        let mut req = api::PauseRequest::new();
        req.id = self.id.clone();
        self.client
            .pause(self.ctx(), &req)
            .await
            .map_err(shim_error)?;
        Ok(())
    }

    async fn resume(&self) -> Result<()> {
        let mut req = api::ResumeRequest::new();
        req.id = self.id.clone();
        self.client
            .resume(self.ctx(), &req)
            .await
            .map_err(shim_error)?;
        Ok(())
    }

    async fn pids(&self) -> Result<Vec<ProcessPid>> {
        let mut req = api::PidsRequest::new();
        req.id = self.id.clone();
        let resp = self
            .client
            .pids(self.ctx(), &req)
            .await
            .map_err(shim_error)?;
        Ok(resp
            .processes
            .iter()
            .map(|p| ProcessPid {
                pid: p.pid,
                info: p.info.as_ref().map(from_pb_any),
            })
            .collect())
    }

    async fn checkpoint(&self, path: &str, options: Option<Any>) -> Result<()> {
        let mut req = api::CheckpointTaskRequest::new();
        req.id = self.id.clone();
        req.path = path.to_string();
        if let Some(o) = options {
            req.options = MessageField::some(to_pb_any(&o));
        }
        self.client
            .checkpoint(self.ctx(), &req)
            .await
            .map_err(shim_error)?;
        Ok(())
    }

    async fn update(
        &self,
        resources: Option<Any>,
        annotations: HashMap<String, String>,
    ) -> Result<()> {
        let mut req = api::UpdateTaskRequest::new();
        req.id = self.id.clone();
        if let Some(r) = resources {
            req.resources = MessageField::some(to_pb_any(&r));
        }
        req.annotations = annotations;
        self.client
            .update(self.ctx(), &req)
            .await
            .map_err(shim_error)?;
        Ok(())
    }

    async fn stats(&self) -> Result<Any> {
        let mut req = api::StatsRequest::new();
        req.id = self.id.clone();
        let resp = self
            .client
            .stats(self.ctx(), &req)
            .await
            .map_err(shim_error)?;
        resp.stats
            .as_ref()
            .map(from_pb_any)
            .ok_or_else(|| Error::not_found(format!("stats of task {:?}", self.id)))
    }

    async fn wait(&self, exec_id: &str) -> Result<Exit> {
        let mut req = api::WaitRequest::new();
        req.id = self.id.clone();
        req.exec_id = exec_id.to_string();
        let resp = self
            .client
            .wait(self.ctx(), &req)
            .await
            .map_err(shim_error)?;
        Ok(Exit {
            pid: 0,
            status: resp.exit_status,
            timestamp: to_time(&resp.exited_at),
        })
    }
}
