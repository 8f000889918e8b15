//! The task runtime as the tasks service and internal monitors see it: containerd's
//! `runtime.PlatformRuntime` and `runtime.Task`, without protobuf except the opaque `Any`
//! payloads (exec specs, resources, metrics, runtime options) that only the shim reads.
//!
//! The runtime v2 manager (`berth-runtime`, plugin `io.containerd.runtime.v2.task`) stores
//! an `Arc<dyn Runtime>` as its plugin instance.

use crate::Result;
use crate::mount::Mount;
use prost_types::Any;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

/// Lifecycle state of a process, containerd's `runtime.Status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TaskStatus {
    #[default]
    Unknown,
    Created,
    Running,
    Stopped,
    Paused,
    Pausing,
}

/// The standard streams of a process: fifo paths (or other URIs) the shim opens.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IoConfig {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// The state of the init process (`exec_id` empty) or of an exec'd process.
#[derive(Debug, Clone, Default)]
pub struct ProcessState {
    pub id: String,
    pub exec_id: String,
    pub pid: u32,
    pub status: TaskStatus,
    pub io: IoConfig,
    pub exit_status: u32,
    pub exited_at: Option<SystemTime>,
}

/// How a process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    pub pid: u32,
    pub status: u32,
    pub timestamp: SystemTime,
}

/// One process of a task (`ListPids`); `info` is runtime-specific (runc's `ProcessDetails`).
#[derive(Debug, Clone, Default)]
pub struct ProcessPid {
    pub pid: u32,
    pub info: Option<Any>,
}

/// Everything needed to create a task for a container.
#[derive(Debug, Clone, Default)]
pub struct CreateOpts {
    /// The OCI runtime spec as JSON (written to the bundle's `config.json`).
    pub spec: Vec<u8>,
    /// Mounts that make up the root file system (empty when the spec's root path is used).
    pub rootfs: Vec<Mount>,
    pub io: IoConfig,
    /// A checkpoint directory to restore from, if any.
    pub checkpoint: String,
    /// Runtime name (`io.containerd.runc.v2`) or an absolute path to a shim binary.
    pub runtime: String,
    /// The container's runtime options (e.g. `containerd.runc.v1.Options`).
    pub runtime_options: Option<Any>,
    /// The Create request's options, which take precedence over the runtime options.
    pub task_options: Option<Any>,
}

/// A running (or created, or stopped but not yet deleted) task.
#[async_trait::async_trait]
pub trait Task: Send + Sync {
    fn id(&self) -> &str;
    fn namespace(&self) -> &str;
    /// The runtime name the task was created with.
    fn runtime(&self) -> &str;
    /// The init process's PID.
    async fn pid(&self) -> Result<u32>;
    /// Starts the init process (`exec_id` empty) or an exec'd one; returns its PID.
    async fn start(&self, exec_id: &str) -> Result<u32>;
    async fn state(&self, exec_id: &str) -> Result<ProcessState>;
    async fn kill(&self, exec_id: &str, signal: u32, all: bool) -> Result<()>;
    async fn exec(&self, exec_id: &str, io: IoConfig, spec: Any) -> Result<()>;
    /// Deletes an exec'd process (not the init process, see [`Runtime::delete`]).
    async fn delete_process(&self, exec_id: &str) -> Result<Exit>;
    async fn resize_pty(&self, exec_id: &str, width: u32, height: u32) -> Result<()>;
    async fn close_io(&self, exec_id: &str, stdin: bool) -> Result<()>;
    async fn pause(&self) -> Result<()>;
    async fn resume(&self) -> Result<()>;
    async fn pids(&self) -> Result<Vec<ProcessPid>>;
    async fn checkpoint(&self, path: &str, options: Option<Any>) -> Result<()>;
    async fn update(
        &self,
        resources: Option<Any>,
        annotations: HashMap<String, String>,
    ) -> Result<()>;
    /// Runtime metrics (cgroup v1 `io.containerd.cgroups.v1.Metrics` or v2).
    async fn stats(&self) -> Result<Any>;
    /// Waits for the process to exit.
    async fn wait(&self, exec_id: &str) -> Result<Exit>;
}

/// A task runtime: creates tasks and keeps track of them per namespace.
#[async_trait::async_trait]
pub trait Runtime: Send + Sync {
    async fn create(&self, namespace: &str, id: &str, opts: CreateOpts) -> Result<Arc<dyn Task>>;
    /// The task of container `id`; `NotFound` if there is none.
    async fn get(&self, namespace: &str, id: &str) -> Result<Arc<dyn Task>>;
    /// Every task of `namespace`.
    async fn tasks(&self, namespace: &str) -> Result<Vec<Arc<dyn Task>>>;
    /// Every task of every namespace (monitors).
    async fn all_tasks(&self) -> Result<Vec<Arc<dyn Task>>>;
    /// Deletes the task (its init process must have exited) and its shim and bundle.
    async fn delete(&self, namespace: &str, id: &str) -> Result<Exit>;
}

impl std::fmt::Debug for dyn Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Task({}/{})", self.namespace(), self.id())
    }
}
