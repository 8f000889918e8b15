//! The runtime v2 shim manager: creates bundles, starts shims (`<shim> … start`),
//! connects the ttrpc task client, watches each shim's process, cleans up after dead
//! shims (`<shim> … delete`), and on start-up reconnects to every shim left running.

use crate::bundle::Bundle;
use crate::shim::{SharedTask, ShimTask, shim_error};
use berth_api::any;
use berth_api::containerd::events::{TaskDelete, TaskExit};
use berth_core::events::EventPublisher;
use berth_core::runtime::{CreateOpts, Exit, Runtime, Task, TaskStatus};
use berth_core::{Error, Result};
use containerd_shim_protos::protobuf::Message as _;
use containerd_shim_protos::shim_async::{Client, TaskClient};
use containerd_shim_protos::{api, ttrpc};
use prost::Message as _;
use prost_types::Any;
use std::collections::HashMap;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

/// How long a shim's `start` or `delete` action may take.
const SHIM_ACTION_TIMEOUT: Duration = Duration::from_secs(30);
/// How long reconnecting to a shim on start-up may take.
const LOAD_TIMEOUT: Duration = Duration::from_secs(3);

/// Runtime names and where their shims come from.
pub const RUNC_V2: &str = "io.containerd.runc.v2";
pub const BERTH_V2: &str = "io.containerd.berth.v2";
pub const RUNTIME_V1_PREFIX: &str = "io.containerd.runtime.v1.";

/// What the runtime v1 config (`io.containerd.runtime.v1.linux`) maps onto: tasks of a
/// `io.containerd.runtime.v1.*` runtime run under the runc v2 shim with these options.
#[derive(Debug, Clone, Default)]
pub struct V1Mapping {
    /// runc options (`containerd.runc.v1.Options`) built from `runtime`/`runtime_root`.
    pub options: Option<Any>,
}

/// Daemon settings the manager needs.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// `{state}/io.containerd.runtime.v2.task`: bundles.
    pub state: PathBuf,
    /// `{root}/io.containerd.runtime.v2.task`: work directories.
    pub root: PathBuf,
    pub grpc_address: String,
    pub ttrpc_address: String,
    /// The binary shims call for `publish` (berthd itself).
    pub publish_binary: PathBuf,
    /// Directories searched for shim binaries before `PATH` (berthd's own directory).
    pub shim_dirs: Vec<PathBuf>,
    pub debug: bool,
    pub sched_core: bool,
    /// `io.containerd.runc.v2` is served by Berth's shim when it is installed.
    pub berth_serves_runc_v2: bool,
    pub v1: Option<V1Mapping>,
}

struct Inner {
    config: ManagerConfig,
    events: Arc<dyn EventPublisher>,
    tasks: Mutex<HashMap<String, SharedTask>>,
}

/// The `io.containerd.runtime.v2.task` plugin's [`Runtime`].
#[derive(Clone)]
pub struct ShimManager {
    inner: Arc<Inner>,
}

fn key(namespace: &str, id: &str) -> String {
    format!("{namespace}/{id}")
}

impl ShimManager {
    pub fn new(config: ManagerConfig, events: Arc<dyn EventPublisher>) -> ShimManager {
        ShimManager {
            inner: Arc::new(Inner {
                config,
                events,
                tasks: Mutex::new(HashMap::new()),
            }),
        }
    }

    fn config(&self) -> &ManagerConfig {
        &self.inner.config
    }

    /// The shim binary for a runtime name (or absolute path) and the options to give it.
    pub fn resolve(&self, runtime: &str, options: Option<Any>) -> Result<(PathBuf, Option<Any>)> {
        if runtime.is_empty() {
            return Err(Error::invalid_argument("no runtime name"));
        }
        if Path::new(runtime).is_absolute() {
            return match std::fs::metadata(runtime) {
                Ok(_) => Ok((PathBuf::from(runtime), options)),
                Err(e) => Err(Error::not_found(format!(
                    "invalid custom binary path {runtime:?}: {e}"
                ))),
            };
        }
        let (name, options) = if runtime.starts_with(RUNTIME_V1_PREFIX) {
            let mapped = self.config().v1.as_ref().ok_or_else(|| {
                Error::not_found(format!(
                    "runtime {runtime:?}: the runtime v1 plugin (io.containerd.runtime.v1.linux) is disabled"
                ))
            })?;
            (
                binary_name(RUNC_V2).unwrap(),
                options.or_else(|| mapped.options.clone()),
            )
        } else {
            let name = binary_name(runtime).ok_or_else(|| {
                Error::invalid_argument(format!(
                    "invalid runtime name {runtime}, correct runtime name should be either format like `io.containerd.runc.v1` or a full path to the binary"
                ))
            })?;
            (name, options)
        };
        // Berth's shim first when it serves runc v2 (it reads the same runc options), the
        // named shim after it: one place where a shim is found, with berthd's own
        // directory before PATH.
        let mut names = vec![name.clone()];
        if self.config().berth_serves_runc_v2 && name == binary_name(RUNC_V2).unwrap() {
            names.insert(0, binary_name(BERTH_V2).unwrap());
        }
        let dirs: Vec<PathBuf> = self
            .config()
            .shim_dirs
            .iter()
            .cloned()
            .chain(
                std::env::var_os("PATH")
                    .iter()
                    .flat_map(std::env::split_paths),
            )
            .collect();
        let candidates: Vec<PathBuf> = names
            .iter()
            .flat_map(|n| dirs.iter().map(move |d| d.join(n)))
            .collect();
        use std::os::unix::fs::PermissionsExt;
        candidates
            .into_iter()
            .find(|p| {
                std::fs::metadata(p)
                    .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                    .unwrap_or(false)
            })
            .map(|p| (p, options))
            .ok_or_else(|| {
                Error::not_found(format!(
                    "failed to resolve runtime path: runtime {runtime:?} binary not installed {name:?}"
                ))
            })
    }

    fn shim_command(
        &self,
        binary: &Path,
        bundle: &Bundle,
        args: &[&str],
    ) -> tokio::process::Command {
        let config = self.config();
        let mut cmd = tokio::process::Command::new(binary);
        cmd.arg("-namespace")
            .arg(&bundle.namespace)
            .arg("-address")
            .arg(&config.grpc_address)
            .arg("-publish-binary")
            .arg(&config.publish_binary)
            .args(args)
            .current_dir(&bundle.path)
            .env("GOMAXPROCS", "2")
            .env("TTRPC_ADDRESS", &config.ttrpc_address)
            .process_group(0)
            .kill_on_drop(false);
        if config.sched_core {
            cmd.env("SCHED_CORE", "1");
        }
        cmd
    }

    /// Runs `<shim> start` and returns the ttrpc address it printed.
    async fn start_shim(
        &self,
        binary: &Path,
        bundle: &Bundle,
        options: Option<&Any>,
    ) -> Result<String> {
        open_shim_log(bundle)?;
        let mut args = vec!["-id", bundle.id.as_str()];
        if self.config().debug {
            args.push("-debug");
        }
        args.push("start");
        let mut cmd = self.shim_command(binary, bundle, &args);
        cmd.stdin(if options.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| {
            Error::unknown(format!("failed to start shim {}: {e}", binary.display()))
        })?;
        if let (Some(mut stdin), Some(options)) = (child.stdin.take(), options) {
            let bytes = options.encode_to_vec();
            tokio::spawn(async move {
                let _ = stdin.write_all(&bytes).await;
            });
        }
        let (stdout, stderr) = collect_output(&mut child, SHIM_ACTION_TIMEOUT).await?;
        let status = child.wait().await?;
        if !status.success() {
            let mut message = String::from_utf8_lossy(&stderr).trim().to_string();
            if message.is_empty() {
                message = String::from_utf8_lossy(&stdout).trim().to_string();
            }
            return Err(Error::unknown(format!(
                "failed to start shim: start failed: {message}: {status}"
            )));
        }
        parse_address(&String::from_utf8_lossy(&stdout))
    }

    /// Connects a ttrpc client to a shim address.
    async fn connect(address: &str) -> Result<TaskClient> {
        let address = if address.starts_with("unix://") || address.starts_with("vsock://") {
            address.to_string()
        } else {
            format!("unix://{address}")
        };
        let client = tokio::time::timeout(LOAD_TIMEOUT, Client::connect(&address))
            .await
            .map_err(|_| Error::unavailable(format!("connecting to shim {address}: timed out")))?
            .map_err(|e| Error::unavailable(format!("connecting to shim {address}: {e}")))?;
        Ok(TaskClient::new(client))
    }

    async fn start_and_create(
        &self,
        bundle: &Bundle,
        binary: &Path,
        runtime: &str,
        opts: &CreateOpts,
        options: Option<Any>,
    ) -> Result<SharedTask> {
        let task_options = opts.task_options.clone().or(options);
        let address = self
            .start_shim(binary, bundle, task_options.as_ref())
            .await?;
        std::fs::write(
            bundle.path.join("shim-binary-path"),
            binary.as_os_str().as_encoded_bytes(),
        )?;
        std::fs::write(bundle.path.join("runtime"), runtime)?;
        let client = match Self::connect(&address).await {
            Ok(c) => c,
            Err(e) => {
                self.run_shim_delete(binary, bundle).await;
                return Err(e);
            }
        };
        let task = Arc::new(ShimTask {
            id: bundle.id.clone(),
            namespace: bundle.namespace.clone(),
            runtime: runtime.to_string(),
            bundle: bundle.path.clone(),
            client,
            deleted: AtomicBool::new(false),
            shim_pid: AtomicU32::new(0),
            init_pid: AtomicU32::new(0),
        });
        if let Ok((shim_pid, _)) = task.connect(LOAD_TIMEOUT).await {
            task.shim_pid.store(shim_pid, Ordering::SeqCst);
        }
        if let Err(err) = task
            .create_task(
                &opts.rootfs,
                &opts.io,
                &opts.checkpoint,
                task_options.as_ref(),
            )
            .await
        {
            task.deleted.store(true, Ordering::SeqCst);
            let _ = task.delete_task().await;
            task.shutdown().await;
            ensure_dead(task.shim_pid.load(Ordering::SeqCst)).await;
            return Err(err.context("failed to create shim task"));
        }
        Ok(task)
    }

    /// Runs `<shim> … delete` for a shim that is gone and returns the exit it reports.
    async fn run_shim_delete(&self, binary: &Path, bundle: &Bundle) -> Option<Exit> {
        let path = bundle.path.display().to_string();
        let mut cmd = self.shim_command(
            binary,
            bundle,
            &[
                "-id",
                bundle.id.as_str(),
                "-bundle",
                path.as_str(),
                "delete",
            ],
        );
        if !bundle.path.exists() {
            cmd.current_dir("/");
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(id = %bundle.id, error = %e, "running shim delete");
                return None;
            }
        };
        let (stdout, stderr) = collect_output(&mut child, SHIM_ACTION_TIMEOUT).await.ok()?;
        let status = child.wait().await.ok()?;
        if !stderr.is_empty() {
            tracing::warn!(id = %bundle.id, "cleanup warnings {}", String::from_utf8_lossy(&stderr).trim());
        }
        if !status.success() {
            tracing::warn!(id = %bundle.id, %status, "shim delete failed");
            return None;
        }
        let response = api::DeleteResponse::parse_from_bytes(&stdout).ok()?;
        Some(Exit {
            pid: response.pid,
            status: response.exit_status,
            timestamp: crate::shim::to_time(&response.exited_at),
        })
    }

    /// Cleans up after a shim that went away without the daemon deleting its task:
    /// `<shim> delete`, removal of the bundle, then `/tasks/exit` and `/tasks/delete`.
    async fn cleanup_dead_shim(&self, bundle: &Bundle, binary: Option<&Path>) {
        tracing::warn!(id = %bundle.id, namespace = %bundle.namespace, "cleaning up after shim disconnected");
        let exit = match binary {
            Some(binary) => self.run_shim_delete(binary, bundle).await,
            None => None,
        };
        remove_shim_socket(bundle);
        bundle.delete();
        let exit = exit.unwrap_or(Exit {
            pid: 0,
            status: 255,
            timestamp: SystemTime::now(),
        });
        self.publish_exit(&bundle.namespace, &bundle.id, &exit, true);
    }

    fn publish_exit(&self, namespace: &str, id: &str, exit: &Exit, delete: bool) {
        let exited_at = Some(berth_api::timestamp::from_system_time(exit.timestamp));
        let event = TaskExit {
            container_id: id.to_string(),
            id: id.to_string(),
            pid: exit.pid,
            exit_status: exit.status,
            exited_at,
        };
        if let Err(e) = self
            .inner
            .events
            .publish(namespace, "/tasks/exit", any::pack(&event))
        {
            tracing::warn!(error = %e, "publishing /tasks/exit");
        }
        if delete {
            let event = TaskDelete {
                container_id: id.to_string(),
                pid: exit.pid,
                exit_status: exit.status,
                exited_at,
                id: String::new(),
            };
            if let Err(e) = self
                .inner
                .events
                .publish(namespace, "/tasks/delete", any::pack(&event))
            {
                tracing::warn!(error = %e, "publishing /tasks/delete");
            }
        }
    }

    /// Watches the shim's process; if it dies while its task is still registered, the
    /// task is cleaned up as containerd does after a disconnect.
    fn watch(&self, task: SharedTask) {
        let pid = task.shim_pid.load(Ordering::SeqCst);
        if pid == 0 {
            return;
        }
        let manager = self.clone();
        tokio::spawn(async move {
            wait_for_exit(pid).await;
            if task.is_deleted() {
                return;
            }
            let k = key(&task.namespace, &task.id);
            let removed = {
                let mut tasks = manager.inner.tasks.lock().unwrap();
                match tasks.get(&k) {
                    Some(t) if Arc::ptr_eq(t, &task) => tasks.remove(&k),
                    _ => None,
                }
            };
            if removed.is_none() {
                return;
            }
            let bundle = Bundle::paths(
                &manager.config().state,
                &manager.config().root,
                &task.namespace,
                &task.id,
            );
            let binary = std::fs::read(bundle.path.join("shim-binary-path"))
                .ok()
                .map(|b| PathBuf::from(String::from_utf8_lossy(&b).into_owned()));
            manager.cleanup_dead_shim(&bundle, binary.as_deref()).await;
        });
    }

    /// Reconnects to every shim whose bundle is in the state directory; cleans up the
    /// ones that are gone (publishing their exit) and work directories without a bundle.
    pub async fn load_existing(&self) {
        let state = self.config().state.clone();
        // Bundles a crash left half deleted (see `Bundle::delete_later`).
        Bundle::empty_trash(&state);
        Bundle::empty_trash(&self.config().root);
        let Ok(namespaces) = std::fs::read_dir(&state) else {
            return;
        };
        for ns in namespaces.flatten() {
            let namespace = ns.file_name().to_string_lossy().into_owned();
            if namespace.starts_with('.') || !ns.path().is_dir() {
                continue;
            }
            let Ok(entries) = std::fs::read_dir(ns.path()) else {
                continue;
            };
            for entry in entries.flatten() {
                let id = entry.file_name().to_string_lossy().into_owned();
                if id.starts_with('.') || !entry.path().is_dir() {
                    continue;
                }
                self.load_one(&namespace, &id).await;
            }
            self.cleanup_work_dirs(&namespace);
        }
    }

    async fn load_one(&self, namespace: &str, id: &str) {
        let config = self.config();
        let bundle = Bundle::paths(&config.state, &config.root, namespace, id);
        let empty = std::fs::read_dir(&bundle.path)
            .map(|mut d| d.next().is_none())
            .unwrap_or(true);
        if empty {
            bundle.delete();
            return;
        }
        let binary = std::fs::read(bundle.path.join("shim-binary-path"))
            .ok()
            .map(|b| PathBuf::from(String::from_utf8_lossy(&b).into_owned()));
        let runtime = std::fs::read_to_string(bundle.path.join("runtime"))
            .unwrap_or_else(|_| RUNC_V2.to_string());
        let address = std::fs::read_to_string(bundle.path.join("address")).unwrap_or_default();
        let loaded = async {
            let client = Self::connect(address.trim()).await?;
            let task = Arc::new(ShimTask {
                id: id.to_string(),
                namespace: namespace.to_string(),
                runtime: runtime.trim().to_string(),
                bundle: bundle.path.clone(),
                client,
                deleted: AtomicBool::new(false),
                shim_pid: AtomicU32::new(0),
                init_pid: AtomicU32::new(0),
            });
            let (shim_pid, task_pid) = task.connect(LOAD_TIMEOUT).await?;
            task.shim_pid.store(shim_pid, Ordering::SeqCst);
            task.init_pid.store(task_pid, Ordering::SeqCst);
            Ok::<_, Error>(task)
        }
        .await;
        match loaded {
            Ok(task) => {
                let _ = open_shim_log(&bundle);
                tracing::info!(id, namespace, "reconnected to shim");
                self.inner
                    .tasks
                    .lock()
                    .unwrap()
                    .insert(key(namespace, id), task.clone());
                // An exit that happened while the daemon was down is reported now (the
                // shim's own event may have been lost).
                if let Ok(state) = task.state("").await
                    && state.status == TaskStatus::Stopped
                {
                    let exit = Exit {
                        pid: state.pid,
                        status: state.exit_status,
                        timestamp: state.exited_at.unwrap_or_else(SystemTime::now),
                    };
                    self.publish_exit(namespace, id, &exit, false);
                }
                self.watch(task);
            }
            Err(e) => {
                tracing::warn!(id, namespace, error = %e, "shim is gone");
                self.cleanup_dead_shim(&bundle, binary.as_deref()).await;
            }
        }
    }

    fn cleanup_work_dirs(&self, namespace: &str) {
        let Ok(entries) = std::fs::read_dir(self.config().root.join(namespace)) else {
            return;
        };
        let tasks = self.inner.tasks.lock().unwrap();
        for entry in entries.flatten() {
            let id = entry.file_name().to_string_lossy().into_owned();
            if !tasks.contains_key(&key(namespace, &id)) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }

    fn lookup(&self, namespace: &str, id: &str) -> Result<SharedTask> {
        self.inner
            .tasks
            .lock()
            .unwrap()
            .get(&key(namespace, id))
            .cloned()
            .ok_or_else(|| Error::not_found(format!("task {id:?}")))
    }
}

#[async_trait::async_trait]
impl Runtime for ShimManager {
    async fn create(&self, namespace: &str, id: &str, opts: CreateOpts) -> Result<Arc<dyn Task>> {
        if self.lookup(namespace, id).is_ok() {
            return Err(Error::already_exists(format!("task {id}")));
        }
        serde_json::from_slice::<serde::de::IgnoredAny>(&opts.spec)
            .map_err(|e| Error::invalid_argument(format!("invalid OCI spec (config.json): {e}")))?;
        let (binary, options) = self.resolve(&opts.runtime, opts.runtime_options.clone())?;
        crate::cgroups::warm_up_cgroup_attach();
        let config = self.config();
        let bundle = Bundle::create(&config.state, &config.root, namespace, id, &opts.spec)?;
        match self
            .start_and_create(&bundle, &binary, &opts.runtime, &opts, options)
            .await
        {
            Ok(task) => {
                self.inner
                    .tasks
                    .lock()
                    .unwrap()
                    .insert(key(namespace, id), task.clone());
                self.watch(task.clone());
                Ok(task)
            }
            Err(e) => {
                bundle.delete();
                Err(e)
            }
        }
    }

    async fn get(&self, namespace: &str, id: &str) -> Result<Arc<dyn Task>> {
        Ok(self.lookup(namespace, id)?)
    }

    async fn tasks(&self, namespace: &str) -> Result<Vec<Arc<dyn Task>>> {
        let prefix = format!("{namespace}/");
        let tasks = self.inner.tasks.lock().unwrap();
        let mut out: Vec<(String, Arc<dyn Task>)> = tasks
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(k, t)| (k.clone(), t.clone() as Arc<dyn Task>))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out.into_iter().map(|(_, t)| t).collect())
    }

    async fn all_tasks(&self) -> Result<Vec<Arc<dyn Task>>> {
        let tasks = self.inner.tasks.lock().unwrap();
        Ok(tasks.values().map(|t| t.clone() as Arc<dyn Task>).collect())
    }

    async fn delete(&self, namespace: &str, id: &str) -> Result<Exit> {
        let task = self.lookup(namespace, id)?;
        let exit = match task.delete_task().await {
            Ok(exit) => exit,
            // The shim no longer knows the task: remove what is left of it.
            Err(e) if e.is(berth_core::error::ErrorKind::NotFound) => {
                tracing::warn!(id, error = %e, "shim does not know the task; removing it");
                Exit {
                    pid: 0,
                    status: 255,
                    timestamp: SystemTime::now(),
                }
            }
            // Anything else (including a dead shim, whose watcher reports the exit).
            Err(e) => return Err(e),
        };
        task.deleted.store(true, Ordering::SeqCst);
        self.inner.tasks.lock().unwrap().remove(&key(namespace, id));
        task.shutdown().await;
        // Like containerd, the reply does not wait for the shim process to be gone: once
        // Shutdown is answered (or its connection closed) the shim has removed its socket
        // and serves nothing, so a new task with this ID gets a new shim. A shim that does
        // not exit is still killed, in the background.
        tokio::spawn(ensure_dead(task.shim_pid.load(Ordering::SeqCst)));
        let remove =
            Bundle::paths(&self.config().state, &self.config().root, namespace, id).delete_later();
        tokio::task::spawn_blocking(remove);
        Ok(exit)
    }
}

/// Reads a child's stdout and stderr until it exits; a shim's daemonised child may keep
/// the pipes open, so reading stops shortly after the `start` process itself has exited.
async fn collect_output(
    child: &mut tokio::process::Child,
    timeout: Duration,
) -> Result<(Vec<u8>, Vec<u8>)> {
    let stdout = Arc::new(Mutex::new(Vec::new()));
    let stderr = Arc::new(Mutex::new(Vec::new()));
    let mut readers = Vec::new();
    for (pipe, sink) in [
        (
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
            stdout.clone(),
        ),
        (
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
            stderr.clone(),
        ),
    ] {
        if let Some(mut pipe) = pipe {
            readers.push(tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    sink.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            }));
        }
    }
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(_) => {}
        Err(_) => {
            let _ = child.start_kill();
            for r in &readers {
                r.abort();
            }
            return Err(Error::new(
                berth_core::error::ErrorKind::DeadlineExceeded,
                "shim action timed out",
            ));
        }
    }
    for r in readers {
        let abort = r.abort_handle();
        if tokio::time::timeout(Duration::from_millis(500), r)
            .await
            .is_err()
        {
            abort.abort();
        }
    }
    let out = stdout.lock().unwrap().clone();
    let err = stderr.lock().unwrap().clone();
    Ok((out, err))
}

/// The address a shim's `start` printed: a plain address (task API v2) or a JSON
/// bootstrap answer `{"version":3,"address":…,"protocol":"ttrpc"}`.
pub fn parse_address(output: &str) -> Result<String> {
    let text = output.trim();
    if text.starts_with('{') {
        #[derive(serde::Deserialize)]
        struct Bootstrap {
            #[serde(default)]
            version: u32,
            address: String,
            #[serde(default)]
            protocol: String,
        }
        let b: Bootstrap = serde_json::from_str(text)
            .map_err(|e| Error::unknown(format!("shim bootstrap answer {text:?}: {e}")))?;
        if !b.protocol.is_empty() && b.protocol != "ttrpc" {
            return Err(Error::not_implemented(format!(
                "shim protocol {:?} (version {})",
                b.protocol, b.version
            )));
        }
        return Ok(b.address);
    }
    let line = text.lines().last().unwrap_or_default().trim();
    if line.is_empty() {
        return Err(Error::unknown("shim start printed no address"));
    }
    Ok(line.to_string())
}

/// `containerd-shim-<name>-<version>` for `<prefix>.<name>.<version>`.
pub fn binary_name(runtime: &str) -> Option<String> {
    let parts: Vec<&str> = runtime.split('.').collect();
    if parts.len() < 2 || parts.iter().any(|p| p.is_empty()) {
        return None;
    }
    Some(format!(
        "containerd-shim-{}-{}",
        parts[parts.len() - 2],
        parts[parts.len() - 1]
    ))
}

/// Creates the bundle's `log` fifo (shims write their log to it) and copies it into the
/// daemon's log.
fn open_shim_log(bundle: &Bundle) -> Result<()> {
    let path = bundle.path.join("log");
    match nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o700)) {
        Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
        Err(e) => {
            return Err(Error::unknown(format!(
                "open shim log pipe {}: {e}",
                path.display()
            )));
        }
    }
    let receiver = tokio::net::unix::pipe::OpenOptions::new()
        .read_write(true)
        .open_receiver(&path)
        .map_err(|e| Error::unknown(format!("open shim log pipe {}: {e}", path.display())))?;
    let id = bundle.id.clone();
    tokio::spawn(async move {
        // One reader lives as long as its shim and shims log little: a small buffer (the
        // default is 8 KiB per shim) keeps the daemon's memory per container down.
        let mut lines = tokio::io::BufReader::with_capacity(512, receiver).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            tracing::debug!(target: "shim", id = %id, "{line}");
        }
    });
    Ok(())
}

/// Removes the socket of a dead shim (named in the bundle's `address` file): a killed
/// shim cannot remove it itself.
fn remove_shim_socket(bundle: &Bundle) {
    let Ok(address) = std::fs::read_to_string(bundle.path.join("address")) else {
        return;
    };
    if let Some(path) = address.trim().strip_prefix("unix://")
        && path.starts_with('/')
    {
        let _ = std::fs::remove_file(path);
    }
}

/// Waits until process `pid` has exited (pidfd where available, else polling).
async fn wait_for_exit(pid: u32) {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd >= 0 {
        // SAFETY: the fd was just returned by the kernel and is owned by nobody else.
        let owned = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // SAFETY: the AsyncFd owns the fd, which stays open for its whole lifetime.
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE)
        };
        if let Ok(async_fd) = registered {
            let _ = async_fd.readable().await;
            return;
        }
    }
    while alive(pid) {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn alive(pid: u32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(true)
}

/// After a Shutdown, makes sure the shim process is gone (SIGKILL after 2 s).
async fn ensure_dead(pid: u32) {
    if pid == 0 {
        return;
    }
    if tokio::time::timeout(Duration::from_secs(2), wait_for_exit(pid))
        .await
        .is_err()
    {
        tracing::warn!(pid, "shim did not exit after shutdown; killing it");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// ttrpc errors for callers that need them.
pub fn ttrpc_error(err: ttrpc::Error) -> Error {
    shim_error(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_names() {
        assert_eq!(binary_name(RUNC_V2).unwrap(), "containerd-shim-runc-v2");
        assert_eq!(binary_name(BERTH_V2).unwrap(), "containerd-shim-berth-v2");
        assert!(binary_name("runc").is_none());
    }

    #[test]
    fn addresses() {
        assert_eq!(parse_address("unix:///run/x\n").unwrap(), "unix:///run/x");
        assert_eq!(
            parse_address(r#"{"version":3,"address":"unix:///s/a","protocol":"ttrpc"}"#).unwrap(),
            "unix:///s/a"
        );
        assert!(parse_address(r#"{"version":3,"address":"x","protocol":"grpc"}"#).is_err());
        assert!(parse_address("").is_err());
    }
}
