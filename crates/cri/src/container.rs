//! Containers of pod sandboxes, as containerd 1.6's CRI makes and runs them
//! (`pkg/cri/server/container_*.go`): the spec from the image config and the CRI
//! `ContainerConfig` joined to the pause task's namespaces, the log copied from the
//! shim's fifos into the kubelet's log file, exits recorded by a waiter per task.

use crate::api;
use crate::io;
use crate::sandbox::{self, CONTAINER_TYPE, SANDBOX_ID, SANDBOX_NAME, SANDBOX_NAMESPACE};
use crate::spec;
use crate::store::{self, ContainerMeta, KIND_CONTAINER, NS, Status as CStatus};
use crate::{CriService, to_status};
use berth_core::runtime::{CreateOpts, IoConfig, Task, TaskStatus};
use berth_metadata::containers::Container;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tonic::Status;

pub const CONTAINER_NAME: &str = "io.kubernetes.cri.container-name";
pub const IMAGE_NAME: &str = "io.kubernetes.cri.image-name";

/// containerd's exit code and reason for a container whose start failed.
const START_ERROR_CODE: i32 = 128;
const START_ERROR_REASON: &str = "StartError";
/// The reason of a container the OOM killer hit.
const OOM_REASON: &str = "OOMKilled";
/// Exit code of a container whose end nobody saw (containerd's `unknownExitCode`).
const UNKNOWN_EXIT_CODE: i32 = 255;

fn unknown(message: impl std::fmt::Display) -> Status {
    Status::unknown(message.to_string())
}

pub fn container_not_found(id: &str) -> Status {
    Status::not_found(format!(
        "an error occurred when try to find container {id:?}: not found"
    ))
}

fn state_name(state: api::ContainerState) -> &'static str {
    match state {
        api::ContainerState::ContainerCreated => "CONTAINER_CREATED",
        api::ContainerState::ContainerRunning => "CONTAINER_RUNNING",
        api::ContainerState::ContainerExited => "CONTAINER_EXITED",
        api::ContainerState::ContainerUnknown => "CONTAINER_UNKNOWN",
    }
}

/// The most of an image's /etc/passwd or /etc/group read (a hostile image must not
/// make the daemon exhaust its memory, GHSA-jpcc-p29g-p8mq): 4 MiB.
pub const USER_FILE_LIMIT: u64 = 4 << 20;

/// A file of the root file system the mounts make (`rel`, e.g. `etc/passwd`), read
/// without mounting them: the overlay's upper then lower directories in order (a bind's
/// source), the first that has it wins, a whiteout ends the search. In each layer the
/// path is resolved with `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`, so links
/// never lead outside it; it is opened non-blocking and must be a regular file of at
/// most [`USER_FILE_LIMIT`] bytes. Missing is empty.
fn read_rootfs_file(mounts: &[berth_core::mount::Mount], rel: &str) -> Result<String, Status> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for m in mounts {
        if m.r#type == "overlay" {
            if let Some(upper) = m.option("upperdir") {
                dirs.push(upper.into());
            }
            if let Some(lower) = m.option("lowerdir") {
                dirs.extend(lower.split(':').map(PathBuf::from));
            }
        } else if m.r#type == "bind" || m.options.iter().any(|o| o == "bind" || o == "rbind") {
            dirs.push(m.source.clone().into());
        }
    }
    for dir in dirs {
        match read_layer_file(&dir, rel)? {
            LayerFile::Missing => continue,
            LayerFile::Whiteout => return Ok(String::new()),
            LayerFile::Text(text) => return Ok(text),
        }
    }
    Ok(String::new())
}

enum LayerFile {
    Missing,
    Whiteout,
    Text(String),
}

fn read_layer_file(dir: &Path, rel: &str) -> Result<LayerFile, Status> {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
    use std::io::Read;
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
    let fail = |what: String| {
        Status::invalid_argument(format!(
            "reading the image's /{rel} to resolve the user: {what}"
        ))
    };
    let root = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_DIRECTORY | OFlag::O_PATH).bits())
        .open(dir)
    {
        Ok(root) => root,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(LayerFile::Missing),
        Err(e) => return Err(fail(format!("opening {}: {e}", dir.display()))),
    };
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let fd = match openat2(root.as_raw_fd(), rel, how) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ENOENT) | Err(nix::errno::Errno::ENOTDIR) => {
            return Ok(LayerFile::Missing);
        }
        // A whiteout (0/0 character device) cannot be opened on every kernel.
        Err(nix::errno::Errno::ENXIO) | Err(nix::errno::Errno::ENODEV) => {
            return Ok(LayerFile::Whiteout);
        }
        Err(e) => return Err(fail(format!("open: {e}"))),
    };
    // SAFETY: openat2 just returned this descriptor, which nothing else owns.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    let meta = file.metadata().map_err(|e| fail(format!("fstat: {e}")))?;
    let ft = meta.file_type();
    if ft.is_char_device() && meta.rdev() == 0 {
        return Ok(LayerFile::Whiteout);
    }
    if !ft.is_file() {
        return Err(fail("it is not a regular file".into()));
    }
    if meta.len() > USER_FILE_LIMIT {
        return Err(fail(format!(
            "it is larger than the limit of {USER_FILE_LIMIT} bytes"
        )));
    }
    let mut bytes = Vec::new();
    file.take(USER_FILE_LIMIT + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| fail(format!("read: {e}")))?;
    if bytes.len() as u64 > USER_FILE_LIMIT {
        return Err(fail(format!(
            "it is larger than the limit of {USER_FILE_LIMIT} bytes"
        )));
    }
    Ok(LayerFile::Text(
        String::from_utf8_lossy(&bytes).into_owned(),
    ))
}

/// A user or group ID from the CRI or the image: 0..=2³¹−1, never wrapped
/// (CVE-2024-40635: a value beyond 32 bits must not become root).
fn id_in_range(value: i64, what: &str) -> Result<u32, Status> {
    if (0..=i64::from(i32::MAX)).contains(&value) {
        Ok(value as u32)
    } else {
        Err(Status::invalid_argument(format!(
            "{what} {value} is out of range (0 to {})",
            i32::MAX
        )))
    }
}

/// Signal numbers by name (`SIGTERM`, `TERM`, `15`).
fn parse_signal(name: &str) -> Option<i32> {
    if name.is_empty() {
        return None;
    }
    if let Ok(n) = name.parse() {
        return Some(n);
    }
    let upper = name.to_uppercase();
    let full = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    full.parse::<nix::sys::signal::Signal>()
        .ok()
        .map(|s| s as i32)
}

impl CriService {
    fn container_root(&self, id: &str) -> PathBuf {
        self.inner.root.join("containers").join(id)
    }

    fn container_io(&self, id: &str) -> PathBuf {
        self.inner.state.join("containers").join(id).join("io")
    }

    pub(crate) async fn find_container(
        &self,
        id: &str,
    ) -> Result<(Container, ContainerMeta), Status> {
        let all = store::containers(&self.inner.md).await.map_err(to_status)?;
        store::find(&all, id, |(c, _)| c.id.as_str())
            .cloned()
            .ok_or_else(|| container_not_found(id))
    }

    /// A per-object lock: one lifecycle change at a time.
    pub(crate) async fn lock(&self, id: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self
            .inner
            .locks
            .lock()
            .unwrap()
            .entry(id.to_string())
            .or_default()
            .clone();
        lock.lock_owned().await
    }

    pub(crate) async fn create_container(
        &self,
        r: api::CreateContainerRequest,
    ) -> Result<api::CreateContainerResponse, Status> {
        let (sb_record, sb_meta) = self.find_sandbox(&r.pod_sandbox_id).await.map_err(|_| {
            Status::not_found(format!(
                "failed to find sandbox id {:?}: not found",
                r.pod_sandbox_id
            ))
        })?;
        let config = r
            .config
            .ok_or_else(|| Status::invalid_argument("container config must not be nil"))?;
        let sb_config = r.sandbox_config.unwrap_or_else(|| sb_meta.config());
        let meta = config
            .metadata
            .clone()
            .ok_or_else(|| Status::invalid_argument("container config must include metadata"))?;
        let sb_pod = sb_meta.config().metadata.unwrap_or_default();
        let name = format!(
            "{}_{}_{}_{}_{}",
            meta.name, sb_pod.name, sb_pod.namespace, sb_pod.uid, meta.attempt
        );
        let (ready, pid) = self.sandbox_ready(&sb_record.id).await;
        if !ready || pid == 0 {
            return Err(unknown(format!(
                "failed to get sandbox container task: sandbox {:?} is not running",
                sb_record.id
            )));
        }
        if config.tty {
            return Err(Status::unimplemented(
                "tty containers are not built yet in berthd (no console socket for CRI containers)",
            ));
        }
        let image_name = config
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .unwrap_or_default();
        let image = self.resolve(&image_name).await?.ok_or_else(|| {
            Status::not_found(format!("failed to resolve image {image_name:?}: not found"))
        })?;
        let id = sandbox::generate_id();
        self.reserve_name("container", &name, &id).await?;
        let result = self
            .create_reserved(
                &id,
                &name,
                &config,
                &sb_record,
                &sb_meta,
                &sb_config,
                pid,
                &image,
                &image_name,
            )
            .await;
        if let Err(e) = result {
            self.release_name("container", &name);
            self.remove_snapshot(&self.inner.config.containerd.snapshotter, &id)
                .await;
            let _ = store::delete_record(&self.inner.md, &self.inner.events, &id).await;
            let _ = std::fs::remove_dir_all(self.container_root(&id));
            return Err(e);
        }
        Ok(api::CreateContainerResponse { container_id: id })
    }

    #[allow(clippy::too_many_arguments)]
    async fn create_reserved(
        &self,
        id: &str,
        name: &str,
        config: &api::ContainerConfig,
        sb_record: &Container,
        sb_meta: &store::SandboxMeta,
        sb_config: &api::PodSandboxConfig,
        pause_pid: u32,
        image: &crate::images::CriImage,
        image_name: &str,
    ) -> Result<(), Status> {
        let image_config = spec::image_config(&image.facts.config);
        let snapshotter = self.inner.config.containerd.snapshotter.clone();
        // The record first: the snapshot is referenced from the moment it exists.
        let mut meta = ContainerMeta {
            id: id.to_string(),
            name: name.to_string(),
            sandbox_id: sb_record.id.clone(),
            image_ref: image.facts.id.clone(),
            stop_signal: image_config["StopSignal"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            ..Default::default()
        };
        meta.set_config(config);
        if !sb_config.log_directory.is_empty() && !config.log_path.is_empty() {
            meta.log_path = Path::new(&sb_config.log_directory)
                .join(&config.log_path)
                .display()
                .to_string();
        }
        let mut extensions = HashMap::new();
        let (k, v) = store::extension(false, &meta);
        extensions.insert(k, v);
        let record = Container {
            id: id.to_string(),
            labels: sandbox::build_labels(&config.labels, &image_config, KIND_CONTAINER),
            image: image
                .references
                .first()
                .cloned()
                .unwrap_or_else(|| image.facts.id.clone()),
            runtime: sb_record.runtime.clone(),
            // Replaced by the real spec once the snapshot (and the image's users) exist.
            spec: Some(prost_types::Any {
                type_url: spec::SPEC_TYPE_URL.into(),
                value: b"{}".to_vec(),
            }),
            snapshotter,
            snapshot_key: id.to_string(),
            extensions,
            sandbox: String::new(),
            ..Default::default()
        };
        store::create_record(&self.inner.md, &self.inner.events, record.clone())
            .await
            .map_err(to_status)?;
        let mounts = self
            .prepare_snapshot(id, &image.facts.chain_id)
            .await
            .map_err(|e| {
                unknown(format!(
                    "failed to create containerd container: {}",
                    e.message()
                ))
            })?;
        let s = self.container_spec(
            id,
            config,
            sb_record,
            sb_meta,
            sb_config,
            pause_pid,
            &image_config,
            &mounts,
            image_name,
        )?;
        let mut updated = record;
        updated.spec = Some(prost_types::Any {
            type_url: spec::SPEC_TYPE_URL.into(),
            value: serde_json::to_vec(&s).unwrap(),
        });
        store::blocking(&self.inner.md, move |md| {
            md.update_container(NS, updated, &["spec".to_string()])
        })
        .await
        .map_err(to_status)?;
        let status = CStatus {
            created_at: store::nanos(SystemTime::now()),
            ..Default::default()
        };
        store::write_status(&self.container_root(id), &status)
            .map_err(|e| unknown(format!("failed to write container status: {e}")))?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn container_spec(
        &self,
        id: &str,
        config: &api::ContainerConfig,
        sb_record: &Container,
        sb_meta: &store::SandboxMeta,
        sb_config: &api::PodSandboxConfig,
        pause_pid: u32,
        image_config: &Value,
        mounts: &[berth_core::mount::Mount],
        image_name: &str,
    ) -> Result<Value, Status> {
        let mut s = spec::base_spec(NS, id);
        let args = spec::process_args(&config.command, &config.args, image_config);
        if args.is_empty() {
            return Err(Status::invalid_argument("no command specified"));
        }
        s["process"]["args"] = json!(args);
        let cwd = if config.working_dir.is_empty() {
            image_config["WorkingDir"]
                .as_str()
                .unwrap_or("/")
                .to_string()
        } else {
            config.working_dir.clone()
        };
        s["process"]["cwd"] = json!(if cwd.is_empty() { "/".to_string() } else { cwd });
        let hostname = std::fs::read_to_string(self.sandbox_root(&sb_record.id).join("hostname"))
            .unwrap_or_default()
            .trim()
            .to_string();
        let mut env = spec::image_env(image_config);
        env.push(format!("HOSTNAME={hostname}"));
        env.extend(
            config
                .envs
                .iter()
                .map(|kv| format!("{}={}", kv.key, kv.value)),
        );
        spec::set_env(&mut s, &env);
        let linux = config.linux.clone().unwrap_or_default();
        let sc = linux.security_context.clone().unwrap_or_default();
        let sb_linux = sb_config.linux.clone().unwrap_or_default();
        let sb_sc = sb_linux.security_context.clone().unwrap_or_default();
        if sc.privileged && !sb_sc.privileged {
            return Err(unknown("no privileged container allowed in sandbox"));
        }
        let sb_ns = sb_sc.namespace_options.clone().unwrap_or_default();
        let ns = sc.namespace_options.clone().unwrap_or_default();
        // Mounts: the CRI's, then the sandbox's files unless the CRI mounted over them.
        let mut user_dests = Vec::new();
        for m in &config.mounts {
            let src = Path::new(&m.host_path);
            if !src.exists() {
                std::fs::create_dir_all(src)
                    .map_err(|e| unknown(format!("failed to mkdir {:?}: {e}", m.host_path)))?;
            }
            let src = std::fs::canonicalize(src).map_err(|e| {
                unknown(format!("failed to resolve symlink {:?}: {e}", m.host_path))
            })?;
            let propagation = match api::MountPropagation::try_from(m.propagation) {
                Ok(api::MountPropagation::PropagationBidirectional) => "rshared",
                Ok(api::MountPropagation::PropagationHostToContainer) => "rslave",
                _ => "rprivate",
            };
            let mut options = vec!["rbind".to_string(), propagation.to_string()];
            options.push(if m.readonly { "ro" } else { "rw" }.to_string());
            spec::bind_mount(
                &mut s,
                &src.display().to_string(),
                &m.container_path,
                options,
            );
            user_dests.push(m.container_path.clone());
        }
        let ro = if sc.readonly_rootfs { "ro" } else { "rw" };
        let sb_root = self.sandbox_root(&sb_record.id);
        for (file, dest) in [
            ("hostname", "/etc/hostname"),
            ("hosts", "/etc/hosts"),
            ("resolv.conf", "/etc/resolv.conf"),
        ] {
            if !user_dests.iter().any(|d| d == dest) {
                spec::bind_mount(
                    &mut s,
                    &sb_root.join(file).display().to_string(),
                    dest,
                    vec!["rbind".into(), "rprivate".into(), ro.into()],
                );
            }
        }
        if !user_dests.iter().any(|d| d == "/dev/shm") {
            let shm = if sb_ns.ipc == api::NamespaceMode::Node as i32 {
                "/dev/shm".to_string()
            } else {
                self.sandbox_state(&sb_record.id)
                    .join("shm")
                    .display()
                    .to_string()
            };
            spec::bind_mount(
                &mut s,
                &shm,
                "/dev/shm",
                vec!["rbind".into(), "rprivate".into(), "rw".into()],
            );
        }
        let cgroup_ro = if sc.privileged { "rw" } else { "ro" };
        s["mounts"].as_array_mut().unwrap().push(json!({
            "destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
            "options": ["nosuid", "noexec", "nodev", "relatime", cgroup_ro]
        }));
        if sc.readonly_rootfs {
            s["root"]["readonly"] = json!(true);
        }
        // Security.
        if sc.privileged {
            spec::set_capabilities(
                &mut s,
                &spec::ALL_CAPS
                    .iter()
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>(),
            );
            s["linux"]["maskedPaths"] = json!([]);
            s["linux"]["readonlyPaths"] = json!([]);
            for m in s["mounts"].as_array_mut().unwrap() {
                if m["type"] == "sysfs"
                    && let Some(opts) = m["options"].as_array_mut()
                {
                    opts.retain(|o| o != "ro");
                    opts.push(json!("rw"));
                }
            }
        } else {
            let caps = sc.capabilities.clone().unwrap_or_default();
            spec::set_capabilities(
                &mut s,
                &spec::capabilities(&caps.add_capabilities, &caps.drop_capabilities),
            );
            if !sc.masked_paths.is_empty() {
                s["linux"]["maskedPaths"] = json!(sc.masked_paths);
            }
            if !sc.readonly_paths.is_empty() {
                s["linux"]["readonlyPaths"] = json!(sc.readonly_paths);
            }
        }
        s["process"]["noNewPrivileges"] = json!(sc.no_new_privs);
        // The user: CRI's uid or name, else the image's; groups from the image's files.
        let passwd = read_rootfs_file(mounts, "etc/passwd")?;
        let group = read_rootfs_file(mounts, "etc/group")?;
        let (mut uid, mut gid, mut username) = (0u32, 0u32, String::new());
        if let Some(u) = &sc.run_as_user {
            uid = id_in_range(u.value, "run_as_user")?;
            gid = spec::passwd_lookup(&passwd, None, Some(uid))
                .map_err(Status::invalid_argument)?
                .map_or(0, |(_, g)| g);
            username = passwd_name(&passwd, uid).unwrap_or_default();
        } else if !sc.run_as_username.is_empty() {
            let (u, g) = spec::passwd_lookup(&passwd, Some(&sc.run_as_username), None)
                .map_err(Status::invalid_argument)?
                .ok_or_else(|| {
                    unknown(format!("no users found matching {:?}", sc.run_as_username))
                })?;
            (uid, gid, username) = (u, g, sc.run_as_username.clone());
        } else if let Some(user) = image_config["User"].as_str().filter(|u| !u.is_empty()) {
            let (u, g) = user
                .split_once(':')
                .map_or((user, None), |(u, g)| (u, Some(g)));
            match u.parse::<i64>() {
                Ok(n) => {
                    let n = id_in_range(n, "the image's user ID")?;
                    uid = n;
                    gid = spec::passwd_lookup(&passwd, None, Some(n))
                        .map_err(Status::invalid_argument)?
                        .map_or(0, |(_, g)| g);
                    username = passwd_name(&passwd, n).unwrap_or_default();
                }
                Err(_) => {
                    let (a, b) = spec::passwd_lookup(&passwd, Some(u), None)
                        .map_err(Status::invalid_argument)?
                        .ok_or_else(|| unknown(format!("no users found matching {u:?}")))?;
                    (uid, gid, username) = (a, b, u.to_string());
                }
            }
            if let Some(g) = g {
                gid = match g.parse::<i64>() {
                    Ok(n) => id_in_range(n, "the image's group ID")?,
                    Err(_) => group_id(&group, g)
                        .ok_or_else(|| unknown(format!("no groups found matching {g:?}")))?,
                };
            }
        }
        if let Some(g) = &sc.run_as_group {
            gid = id_in_range(g.value, "run_as_group")?;
        }
        let mut additional: Vec<u32> = if username.is_empty() {
            Vec::new()
        } else {
            spec::member_groups(&group, &username)
        };
        for g in &sc.supplemental_groups {
            additional.push(id_in_range(*g, "supplemental group")?);
        }
        additional.dedup();
        s["process"]["user"] = json!({"uid": uid, "gid": gid, "additionalGids": additional});
        // Namespaces of the pause task.
        let proc_ns = |kind: &str| Some(Some(format!("/proc/{pause_pid}/ns/{kind}")));
        let host_net = sb_ns.network == api::NamespaceMode::Node as i32;
        spec::set_namespace(
            &mut s,
            "network",
            if host_net { None } else { proc_ns("net") },
        );
        spec::set_namespace(&mut s, "uts", if host_net { None } else { proc_ns("uts") });
        spec::set_namespace(
            &mut s,
            "ipc",
            if sb_ns.ipc == api::NamespaceMode::Node as i32 {
                None
            } else {
                proc_ns("ipc")
            },
        );
        match api::NamespaceMode::try_from(ns.pid) {
            Ok(api::NamespaceMode::Pod) => spec::set_namespace(&mut s, "pid", proc_ns("pid")),
            Ok(api::NamespaceMode::Node) => spec::set_namespace(&mut s, "pid", None),
            _ => {}
        }
        if !sb_linux.cgroup_parent.is_empty() {
            s["linux"]["cgroupsPath"] = json!(spec::cgroups_path(&sb_linux.cgroup_parent, id));
        }
        if let Some(res) = &linux.resources {
            spec::apply_resources(&mut s, &spec::resources(res));
            s["process"]["oomScoreAdj"] = json!(spec::oom_score_adj(
                res.oom_score_adj,
                self.inner.config.restrict_oom_score_adj
            ));
        }
        for d in &config.devices {
            add_device(&mut s, d)?;
        }
        let mut annotations = serde_json::Map::new();
        for (k, v) in &config.annotations {
            annotations.insert(k.clone(), json!(v));
        }
        let sb_pod = sb_meta.config().metadata.unwrap_or_default();
        annotations.insert(CONTAINER_TYPE.into(), json!("container"));
        annotations.insert(SANDBOX_ID.into(), json!(sb_record.id));
        annotations.insert(SANDBOX_NAME.into(), json!(sb_pod.name));
        annotations.insert(SANDBOX_NAMESPACE.into(), json!(sb_pod.namespace));
        annotations.insert(
            CONTAINER_NAME.into(),
            json!(
                config
                    .metadata
                    .as_ref()
                    .map(|m| m.name.clone())
                    .unwrap_or_default()
            ),
        );
        annotations.insert(IMAGE_NAME.into(), json!(image_name));
        s["annotations"] = Value::Object(annotations);
        Ok(s)
    }

    pub(crate) async fn start_container(&self, id: &str) -> Result<(), Status> {
        let (record, meta) = self.find_container(id).await?;
        let id = record.id.clone();
        let _guard = self.lock(&id).await;
        let dir = self.container_root(&id);
        let mut status = store::read_status(&dir);
        if status.state() != api::ContainerState::ContainerCreated {
            return Err(unknown(format!(
                "failed to set starting state for container {id:?}: container is in {} state",
                state_name(status.state())
            )));
        }
        let (ready, _) = self.sandbox_ready(&meta.sandbox_id).await;
        if !ready {
            return Err(unknown(format!(
                "sandbox container {:?} is not running",
                meta.sandbox_id
            )));
        }
        match self.start_task(&record, &meta).await {
            Ok(pid) => {
                status.pid = pid;
                status.started_at = store::nanos(SystemTime::now());
                store::write_status(&dir, &status)
                    .map_err(|e| unknown(format!("writing status: {e}")))?;
                Ok(())
            }
            Err(e) => {
                status.finished_at = store::nanos(SystemTime::now());
                status.exit_code = START_ERROR_CODE;
                status.reason = START_ERROR_REASON.into();
                status.message = e.message().to_string();
                let _ = store::write_status(&dir, &status);
                Err(e)
            }
        }
    }

    async fn start_task(&self, record: &Container, meta: &ContainerMeta) -> Result<u32, Status> {
        use berth_core::snapshot::Snapshotter;
        let id = &record.id;
        let db = self
            .inner
            .snapshotters
            .get(&record.snapshotter)
            .map_err(to_status)?;
        let rootfs = db
            .namespaced(NS, None)
            .mounts(&record.snapshot_key)
            .await
            .map_err(|e| unknown(format!("failed to get container mounts: {}", e.message())))?;
        let io_dir = self.container_io(id);
        let log = (!meta.log_path.is_empty()).then(|| PathBuf::from(&meta.log_path));
        let (readers, shared) = io::start_logging(&io_dir, log.as_deref())
            .map_err(|e| unknown(format!("failed to create container loggers: {e}")))?;
        let spec = record
            .spec
            .as_ref()
            .map(|s| s.value.clone())
            .unwrap_or_default();
        let created = self
            .inner
            .runtime
            .create(
                NS,
                id,
                CreateOpts {
                    spec,
                    rootfs,
                    io: IoConfig {
                        stdin: String::new(),
                        stdout: io_dir.join("stdout").display().to_string(),
                        stderr: io_dir.join("stderr").display().to_string(),
                        terminal: false,
                    },
                    runtime: record.runtime.name.clone(),
                    ..Default::default()
                },
            )
            .await;
        let task = match created {
            Ok(task) => task,
            Err(e) => {
                readers.iter().for_each(io::FifoReader::cancel);
                return Err(unknown(format!(
                    "failed to create containerd task: {}",
                    e.message()
                )));
            }
        };
        let pid = match task.start("").await {
            Ok(pid) => pid,
            Err(e) => {
                let _ = self.inner.runtime.delete(NS, id).await;
                readers.iter().for_each(io::FifoReader::cancel);
                return Err(unknown(format!(
                    "failed to start containerd task {id:?}: {}",
                    e.message()
                )));
            }
        };
        if let Some(shared) = shared {
            self.inner.logs.lock().unwrap().insert(id.clone(), shared);
        }
        self.watch(id.clone(), task, readers);
        Ok(pid)
    }

    /// Records the exit of `id`'s task when it comes, then deletes the task.
    pub(crate) fn watch(&self, id: String, task: Arc<dyn Task>, readers: Vec<io::FifoReader>) {
        let this = self.clone();
        tokio::spawn(async move {
            let exit = task.wait("").await;
            let (code, at) = match exit {
                Ok(exit) => (exit.status as i32, exit.timestamp),
                Err(_) => (UNKNOWN_EXIT_CODE, SystemTime::now()),
            };
            this.record_exit(&id, code, at);
            // Under the container's lock: a removal in progress deletes the task itself.
            {
                let _guard = this.lock(&id).await;
                let _ = this.inner.runtime.delete(NS, &id).await;
            }
            this.inner.logs.lock().unwrap().remove(&id);
            // The shim closed the fifos: the copies end; wait so the log is complete.
            tokio::task::spawn_blocking(move || {
                for r in &readers {
                    if !r.wait(Duration::from_secs(5)) {
                        r.cancel();
                    }
                }
            });
        });
    }

    fn record_exit(&self, id: &str, code: i32, at: SystemTime) {
        let dir = self.container_root(id);
        let _lock = self.inner.status_lock.lock().unwrap();
        let mut status = store::read_status(&dir);
        if status.finished_at != 0 || !dir.exists() {
            return;
        }
        status.finished_at = store::nanos(at);
        status.exit_code = code;
        if status.reason.is_empty() {
            status.reason = if code == 0 { "Completed" } else { "Error" }.into();
        }
        let _ = store::write_status(&dir, &status);
    }

    /// containerd's `stopContainer`: the stop signal, `timeout` seconds, then SIGKILL.
    pub(crate) async fn stop_container_id(&self, id: &str, timeout: i64) -> Result<(), Status> {
        let (record, meta) = self.find_container(id).await?;
        let id = record.id.clone();
        let status = store::read_status(&self.container_root(&id));
        if status.state() != api::ContainerState::ContainerRunning {
            return Ok(());
        }
        let task = match self.inner.runtime.get(NS, &id).await {
            Ok(task) => task,
            Err(_) => {
                self.record_exit(&id, UNKNOWN_EXIT_CODE, SystemTime::now());
                return Ok(());
            }
        };
        let exited = |t: &Arc<dyn Task>| {
            let t = t.clone();
            async move { matches!(t.state("").await, Ok(s) if s.status == TaskStatus::Stopped) }
        };
        if timeout > 0 && !exited(&task).await {
            let signal = parse_signal(&meta.stop_signal).unwrap_or(15);
            if let Err(e) = task.kill("", signal as u32, false).await
                && !e.is(berth_core::error::ErrorKind::NotFound)
            {
                return Err(unknown(format!(
                    "failed to stop container {id:?}: {}",
                    e.message()
                )));
            }
            if let Ok(Ok(exit)) =
                tokio::time::timeout(Duration::from_secs(timeout as u64), task.wait("")).await
            {
                self.record_exit(&id, exit.status as i32, exit.timestamp);
                return Ok(());
            }
        }
        match task.kill("", 9, false).await {
            Ok(()) => {}
            Err(e) if e.is(berth_core::error::ErrorKind::NotFound) => {}
            Err(e) if exited(&task).await => tracing::debug!(error = %e, "kill of an exited task"),
            Err(e) => {
                return Err(unknown(format!(
                    "failed to kill container {id:?}: {}",
                    e.message()
                )));
            }
        }
        match tokio::time::timeout(Duration::from_secs(30), task.wait("")).await {
            Ok(Ok(exit)) => {
                self.record_exit(&id, exit.status as i32, exit.timestamp);
                Ok(())
            }
            Ok(Err(e)) if e.is(berth_core::error::ErrorKind::NotFound) => Ok(()),
            Ok(Err(e)) => Err(unknown(format!(
                "failed to wait for container {id:?}: {}",
                e.message()
            ))),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "an error occurs during waiting for container {id:?} to be killed: wait container {id:?}: context deadline exceeded"
            ))),
        }
    }

    pub(crate) async fn stop_container(&self, r: api::StopContainerRequest) -> Result<(), Status> {
        let (record, _) = self.find_container(&r.container_id).await?;
        let _guard = self.lock(&record.id).await;
        self.stop_container_id(&record.id, r.timeout).await
    }

    pub(crate) async fn remove_container_id(&self, id: &str) -> Result<(), Status> {
        let (record, meta) = match self.find_container(id).await {
            Ok(found) => found,
            Err(s) if s.code() == tonic::Code::NotFound => return Ok(()),
            Err(s) => return Err(s),
        };
        let id = record.id.clone();
        // containerd stops a running (or unknown) container first.
        self.stop_container_id(&id, 0).await?;
        self.kill_task(&id).await?;
        self.remove_snapshot(&record.snapshotter, &record.snapshot_key)
            .await;
        store::delete_record(&self.inner.md, &self.inner.events, &id)
            .await
            .map_err(to_status)?;
        {
            let _lock = self.inner.status_lock.lock().unwrap();
            let _ = std::fs::remove_dir_all(self.container_root(&id));
        }
        let _ = std::fs::remove_dir_all(self.inner.state.join("containers").join(&id));
        self.release_name("container", &meta.name);
        Ok(())
    }

    pub(crate) async fn remove_container(&self, id: &str) -> Result<(), Status> {
        // The full ID (a prefix may be given): the exit waiter locks by it.
        let id = match self.find_container(id).await {
            Ok((record, _)) => record.id,
            Err(s) if s.code() == tonic::Code::NotFound => return Ok(()),
            Err(s) => return Err(s),
        };
        let id = id.as_str();
        let guard = self.lock(id).await;
        let result = self.remove_container_id(id).await;
        drop(guard);
        if result.is_ok() {
            self.inner.locks.lock().unwrap().remove(id);
        }
        result
    }

    fn to_container_status(
        &self,
        record: &Container,
        meta: &ContainerMeta,
    ) -> api::ContainerStatus {
        let config = meta.config();
        let status = store::read_status(&self.container_root(&record.id));
        let image = config.image.clone();
        let mounts = config
            .mounts
            .iter()
            .map(|m| api::Mount {
                container_path: m.container_path.clone(),
                host_path: m.host_path.clone(),
                readonly: m.readonly,
                selinux_relabel: m.selinux_relabel,
                propagation: m.propagation,
                ..Default::default()
            })
            .collect();
        api::ContainerStatus {
            id: record.id.clone(),
            metadata: config.metadata.clone(),
            state: status.state() as i32,
            created_at: status.created_at,
            started_at: status.started_at,
            finished_at: status.finished_at,
            exit_code: status.exit_code,
            image,
            image_ref: meta.image_ref.clone(),
            reason: status.reason.clone(),
            message: status.message.clone(),
            labels: config.labels.clone(),
            annotations: config.annotations.clone(),
            mounts,
            log_path: meta.log_path.clone(),
            ..Default::default()
        }
    }

    pub(crate) async fn container_status(
        &self,
        r: api::ContainerStatusRequest,
    ) -> Result<api::ContainerStatusResponse, Status> {
        let (record, meta) = self.find_container(&r.container_id).await?;
        let status = self.to_container_status(&record, &meta);
        let mut info = HashMap::new();
        if r.verbose {
            let file = store::read_status(&self.container_root(&record.id));
            let spec: Value = record
                .spec
                .as_ref()
                .and_then(|s| serde_json::from_slice(&s.value).ok())
                .unwrap_or_default();
            let v = json!({
                "sandboxID": meta.sandbox_id,
                "pid": file.pid,
                "removing": file.removing,
                "snapshotKey": record.snapshot_key,
                "snapshotter": record.snapshotter,
                "runtimeType": record.runtime.name,
                "runtimeSpec": spec,
            });
            info.insert("info".to_string(), v.to_string());
        }
        Ok(api::ContainerStatusResponse {
            status: Some(status),
            info,
        })
    }

    pub(crate) async fn list_containers(
        &self,
        r: api::ListContainersRequest,
    ) -> Result<api::ListContainersResponse, Status> {
        let all = store::containers(&self.inner.md).await.map_err(to_status)?;
        let filter = r.filter.unwrap_or_default();
        let mut containers = Vec::new();
        for (record, meta) in &all {
            if !filter.id.is_empty() && !record.id.starts_with(&filter.id) {
                continue;
            }
            if !filter.pod_sandbox_id.is_empty()
                && !meta.sandbox_id.starts_with(&filter.pod_sandbox_id)
            {
                continue;
            }
            let status = self.to_container_status(record, meta);
            if let Some(state) = &filter.state
                && state.state != status.state
            {
                continue;
            }
            if !store::labels_match(&filter.label_selector, &status.labels) {
                continue;
            }
            containers.push(api::Container {
                id: status.id,
                pod_sandbox_id: meta.sandbox_id.clone(),
                metadata: status.metadata,
                image: status.image,
                image_ref: status.image_ref,
                state: status.state,
                created_at: status.created_at,
                labels: status.labels,
                annotations: status.annotations,
                ..Default::default()
            });
        }
        Ok(api::ListContainersResponse { containers })
    }

    pub(crate) async fn exec_sync(
        &self,
        r: api::ExecSyncRequest,
    ) -> Result<api::ExecSyncResponse, Status> {
        let (record, _) = self.find_container(&r.container_id).await?;
        let id = record.id.clone();
        let status = store::read_status(&self.container_root(&id));
        if status.state() != api::ContainerState::ContainerRunning {
            return Err(unknown(format!(
                "container is in {} state",
                state_name(status.state())
            )));
        }
        if r.cmd.is_empty() {
            return Err(Status::invalid_argument("ExecSync: cmd must not be empty"));
        }
        let task = self
            .inner
            .runtime
            .get(NS, &id)
            .await
            .map_err(|e| unknown(format!("failed to load task: {}", e.message())))?;
        let spec: Value = record
            .spec
            .as_ref()
            .and_then(|s| serde_json::from_slice(&s.value).ok())
            .unwrap_or_default();
        let mut process = spec["process"].clone();
        process["args"] = json!(r.cmd);
        process["terminal"] = json!(false);
        let exec_id = sandbox::generate_id();
        let dir = self.inner.state.join("exec").join(&exec_id);
        let result = self
            .exec_in(&task, &exec_id, &dir, process, r.timeout)
            .await;
        let _ = std::fs::remove_dir_all(&dir);
        result
    }

    async fn exec_in(
        &self,
        task: &Arc<dyn Task>,
        exec_id: &str,
        dir: &Path,
        process: Value,
        timeout: i64,
    ) -> Result<api::ExecSyncResponse, Status> {
        let out = Arc::new(std::sync::Mutex::new(io::CappedBuffer::new(
            io::EXEC_STREAM_LIMIT,
        )));
        let err = Arc::new(std::sync::Mutex::new(io::CappedBuffer::new(
            io::EXEC_STREAM_LIMIT,
        )));
        let mut readers = Vec::new();
        for (name, buf) in [("stdout", out.clone()), ("stderr", err.clone())] {
            let fifo = dir.join(name);
            io::mkfifo(&fifo).map_err(|e| unknown(format!("failed to create exec io: {e}")))?;
            let reader = io::FifoReader::start(&fifo, move |data| buf.lock().unwrap().write(data))
                .map_err(|e| unknown(format!("failed to create exec io: {e}")))?;
            readers.push(reader);
        }
        let cancel = |readers: &[io::FifoReader]| readers.iter().for_each(io::FifoReader::cancel);
        let io_config = IoConfig {
            stdin: String::new(),
            stdout: dir.join("stdout").display().to_string(),
            stderr: dir.join("stderr").display().to_string(),
            terminal: false,
        };
        let any = prost_types::Any {
            type_url: spec::PROCESS_TYPE_URL.into(),
            value: serde_json::to_vec(&process).unwrap(),
        };
        if let Err(e) = task.exec(exec_id, io_config, any).await {
            cancel(&readers);
            return Err(unknown(format!(
                "failed to exec in container: failed to create exec {exec_id:?}: {}",
                e.message()
            )));
        }
        if let Err(e) = task.start(exec_id).await {
            let _ = task.delete_process(exec_id).await;
            cancel(&readers);
            return Err(unknown(format!(
                "failed to exec in container: failed to start exec {exec_id:?}: {}",
                e.message()
            )));
        }
        let wait = task.wait(exec_id);
        let exit = if timeout > 0 {
            match tokio::time::timeout(Duration::from_secs(timeout as u64), wait).await {
                Ok(exit) => exit,
                Err(_) => {
                    let _ = task.kill(exec_id, 9, false).await;
                    let _ = tokio::time::timeout(Duration::from_secs(10), task.wait(exec_id)).await;
                    let _ = task.delete_process(exec_id).await;
                    cancel(&readers);
                    return Err(Status::deadline_exceeded(format!(
                        "failed to exec in container: timeout {timeout}s exceeded: context deadline exceeded"
                    )));
                }
            }
        } else {
            wait.await
        };
        let exit =
            exit.map_err(|e| unknown(format!("failed to exec in container: {}", e.message())))?;
        let _ = task.delete_process(exec_id).await;
        // The shim closed its ends: the readers finish with everything written.
        let readers = tokio::task::spawn_blocking(move || {
            for r in &readers {
                if !r.wait(Duration::from_secs(5)) {
                    r.cancel();
                }
            }
        });
        let _ = readers.await;
        let stdout = std::mem::take(&mut out.lock().unwrap().bytes);
        let stderr = std::mem::take(&mut err.lock().unwrap().bytes);
        Ok(api::ExecSyncResponse {
            stdout,
            stderr,
            exit_code: exit.status as i32,
        })
    }

    /// containerd's `ReopenContainerLog`: the log file is opened again at its path (the
    /// kubelet rotated it); only for a running container.
    pub(crate) async fn reopen_log(&self, id: &str) -> Result<(), Status> {
        let (record, meta) = self.find_container(id).await?;
        let status = store::read_status(&self.container_root(&record.id));
        if status.state() != api::ContainerState::ContainerRunning {
            return Err(unknown("container is not running"));
        }
        let shared = self.inner.logs.lock().unwrap().get(&record.id).cloned();
        match shared {
            Some(shared) => io::reopen(&shared, Path::new(&meta.log_path))
                .map_err(|e| unknown(format!("failed to create and open log file: {e}"))),
            None => Ok(()),
        }
    }

    pub(crate) async fn update_resources(
        &self,
        r: api::UpdateContainerResourcesRequest,
    ) -> Result<(), Status> {
        let (mut record, _) = self.find_container(&r.container_id).await?;
        let id = record.id.clone();
        let _guard = self.lock(&id).await;
        let Some(linux) = r.linux else {
            return Ok(());
        };
        let mut s: Value = record
            .spec
            .as_ref()
            .and_then(|s| serde_json::from_slice(&s.value).ok())
            .unwrap_or_default();
        spec::apply_resources(&mut s, &spec::resources(&linux));
        s["process"]["oomScoreAdj"] = json!(spec::oom_score_adj(
            linux.oom_score_adj,
            self.inner.config.restrict_oom_score_adj
        ));
        let resources = s["linux"]["resources"].clone();
        record.spec = Some(prost_types::Any {
            type_url: spec::SPEC_TYPE_URL.into(),
            value: serde_json::to_vec(&s).unwrap(),
        });
        store::blocking(&self.inner.md, move |md| {
            md.update_container(NS, record, &["spec".to_string()])
        })
        .await
        .map_err(to_status)?;
        if store::read_status(&self.container_root(&id)).state()
            == api::ContainerState::ContainerRunning
            && let Ok(task) = self.inner.runtime.get(NS, &id).await
        {
            let any = prost_types::Any {
                type_url: spec::RESOURCES_TYPE_URL.into(),
                value: serde_json::to_vec(&resources).unwrap(),
            };
            task.update(Some(any), HashMap::new())
                .await
                .map_err(|e| unknown(format!("failed to update resources: {}", e.message())))?;
        }
        Ok(())
    }

    /// Follows `/tasks/oom` events of `k8s.io`: a container the kernel's OOM killer hit
    /// ends with reason `OOMKilled` (containerd's event monitor does the same).
    pub(crate) fn watch_oom(&self, events: &berth_core::events::Exchange) {
        let mut rx = events.subscribe();
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let envelope = match rx.recv().await {
                    Ok(e) => e,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => return,
                };
                if envelope.topic != "/tasks/oom" || envelope.namespace != NS {
                    continue;
                }
                use prost::Message;
                let Ok(oom) =
                    berth_api::containerd::events::TaskOom::decode(envelope.event.value.as_slice())
                else {
                    continue;
                };
                let dir = this.container_root(&oom.container_id);
                let _lock = this.inner.status_lock.lock().unwrap();
                if !dir.join("status").exists() {
                    continue;
                }
                let mut status = store::read_status(&dir);
                status.reason = OOM_REASON.into();
                let _ = store::write_status(&dir, &status);
            }
        });
    }

    /// After a restart: running containers get their waiter and log copy back; those
    /// whose task is gone are recorded as exited with an unknown code.
    pub(crate) async fn recover(&self) {
        let Ok(all) = store::containers(&self.inner.md).await else {
            return;
        };
        for (record, meta) in all {
            let status = store::read_status(&self.container_root(&record.id));
            if status.state() != api::ContainerState::ContainerRunning {
                continue;
            }
            match self.inner.runtime.get(NS, &record.id).await {
                Ok(task) => {
                    let log = (!meta.log_path.is_empty()).then(|| PathBuf::from(&meta.log_path));
                    let (readers, shared) =
                        io::start_logging(&self.container_io(&record.id), log.as_deref())
                            .unwrap_or_default();
                    if let Some(shared) = shared {
                        self.inner
                            .logs
                            .lock()
                            .unwrap()
                            .insert(record.id.clone(), shared);
                    }
                    self.watch(record.id.clone(), task, readers);
                }
                Err(_) => self.record_exit(&record.id, UNKNOWN_EXIT_CODE, SystemTime::now()),
            }
        }
    }
}

/// A group's ID by name in /etc/group.
fn group_id(group: &str, name: &str) -> Option<u32> {
    group.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 2 && f[0] == name).then(|| f[2].parse().ok())?
    })
}

fn passwd_name(passwd: &str, uid: u32) -> Option<String> {
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 2 && f[2].parse() == Ok(uid)).then(|| f[0].to_string())
    })
}

/// A host device for the container (containerd's `WithDevices`): node and cgroup rule.
fn add_device(s: &mut Value, d: &api::Device) -> Result<(), Status> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let md = std::fs::metadata(&d.host_path)
        .map_err(|e| unknown(format!("failed to generate device {:?}: {e}", d.host_path)))?;
    let kind = if md.file_type().is_char_device() {
        "c"
    } else if md.file_type().is_block_device() {
        "b"
    } else {
        return Err(unknown(format!("{:?} is not a device node", d.host_path)));
    };
    let rdev = md.rdev();
    let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    let perms = if d.permissions.is_empty() {
        "rwm".to_string()
    } else {
        d.permissions.clone()
    };
    if !s["linux"]["devices"].is_array() {
        s["linux"]["devices"] = json!([]);
    }
    s["linux"]["devices"].as_array_mut().unwrap().push(json!({
        "path": d.container_path, "type": kind, "major": major, "minor": minor,
        "fileMode": md.mode() & 0o777, "uid": md.uid(), "gid": md.gid()
    }));
    s["linux"]["resources"]["devices"]
        .as_array_mut()
        .unwrap()
        .push(json!({
            "allow": true, "type": kind, "major": major, "minor": minor, "access": perms
        }));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_core::mount::Mount;

    fn layer(dir: &Path) -> Vec<Mount> {
        vec![Mount::bind(dir.display().to_string(), true)]
    }

    #[test]
    fn user_files_stay_in_the_layer_and_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc");
        std::fs::create_dir(&etc).unwrap();
        // A link to a host file resolves inside the layer: nothing there, so empty.
        std::os::unix::fs::symlink("/etc/hostname", etc.join("passwd")).unwrap();
        assert_eq!(
            read_rootfs_file(&layer(dir.path()), "etc/passwd").unwrap(),
            ""
        );
        // `etc` itself a link to `/`: still inside.
        let dir2 = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/", dir2.path().join("etc")).unwrap();
        assert_eq!(
            read_rootfs_file(&layer(dir2.path()), "etc/passwd").unwrap(),
            ""
        );
        // A FIFO is refused at once, never waited for.
        nix::unistd::mkfifo(
            &etc.join("group"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        let err = read_rootfs_file(&layer(dir.path()), "etc/group").unwrap_err();
        assert!(err.message().contains("not a regular file"), "{err:?}");
        // Oversized files are refused.
        std::fs::remove_file(etc.join("passwd")).unwrap();
        let f = std::fs::File::create(etc.join("passwd")).unwrap();
        f.set_len(USER_FILE_LIMIT + 1).unwrap();
        let err = read_rootfs_file(&layer(dir.path()), "etc/passwd").unwrap_err();
        assert!(err.message().contains("larger than the limit"), "{err:?}");
    }

    #[test]
    fn upper_layers_win_and_whiteouts_hide() {
        let upper = tempfile::tempdir().unwrap();
        let lower = tempfile::tempdir().unwrap();
        std::fs::create_dir(upper.path().join("etc")).unwrap();
        std::fs::create_dir(lower.path().join("etc")).unwrap();
        std::fs::write(lower.path().join("etc/passwd"), "lower").unwrap();
        std::fs::write(lower.path().join("etc/group"), "lower").unwrap();
        std::fs::write(upper.path().join("etc/passwd"), "upper").unwrap();
        nix::sys::stat::mknod(
            &upper.path().join("etc/group"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            0,
        )
        .unwrap();
        let mounts = vec![Mount {
            r#type: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options: vec![
                format!("upperdir={}", upper.path().display()),
                format!("lowerdir={}", lower.path().display()),
            ],
        }];
        assert_eq!(read_rootfs_file(&mounts, "etc/passwd").unwrap(), "upper");
        assert_eq!(read_rootfs_file(&mounts, "etc/group").unwrap(), "");
    }

    #[test]
    fn ids_out_of_range_are_invalid_never_wrapped() {
        assert_eq!(id_in_range(1000, "x").unwrap(), 1000);
        for bad in [-1, i64::from(i32::MAX) + 1, 1 << 32] {
            assert_eq!(
                id_in_range(bad, "x").unwrap_err().code(),
                tonic::Code::InvalidArgument
            );
        }
    }
}
