//! Pod sandboxes as containerd 1.6's CRI runs them (`pkg/cri/server/sandbox_*.go`): the
//! network namespace and CNI set up first, the sandbox's files (hostname, hosts,
//! resolv.conf, a `/dev/shm` tmpfs), then the pause container's record, snapshot and
//! task, started in that namespace.

use crate::api;
use crate::cni::{self, PodRef};
use crate::spec;
use crate::store::{self, KIND_LABEL, KIND_SANDBOX, NS, SandboxMeta};
use crate::{CriService, to_status};
use berth_core::runtime::{CreateOpts, IoConfig, TaskStatus};
use berth_metadata::containers::{Container, ContainerRuntime};
use serde_json::json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tonic::Status;

pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
pub const SANDBOX_NAME: &str = "io.kubernetes.cri.sandbox-name";
pub const SANDBOX_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
pub const SANDBOX_UID: &str = "io.kubernetes.cri.sandbox-uid";
pub const SANDBOX_LOG_DIR: &str = "io.kubernetes.cri.sandbox-log-directory";
/// containerd's `defaultSandboxOOMAdj`.
const SANDBOX_OOM_SCORE_ADJ: i64 = -998;

/// A new 64-hex ID (containerd's `util.GenerateID`).
pub fn generate_id() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

pub fn sandbox_not_found(id: &str) -> Status {
    Status::not_found(format!(
        "an error occurred when try to find sandbox {id:?}: not found"
    ))
}

fn unknown(message: impl std::fmt::Display) -> Status {
    Status::unknown(message.to_string())
}

/// Label prefixes an image's `LABEL`s never bring onto a container record: those
/// Berth or containerd act on (`containerd.io/restart.loguri` would make the restart
/// monitor run a `binary://` logger named by the image, GHSA-xhf5-7wjv-pqxp) and the
/// CRI's own.
const RESERVED_LABEL_PREFIXES: &[&str] = &["containerd.io/", "io.cri-containerd."];

/// containerd's `buildLabels`: the image's labels (but reserved ones), the CRI's over
/// them, and the kind.
pub fn build_labels(
    config_labels: &HashMap<String, String>,
    image_config: &serde_json::Value,
    kind: &str,
) -> berth_core::labels::Labels {
    let mut labels = berth_core::labels::Labels::new();
    if let Some(map) = image_config["Labels"].as_object() {
        for (k, v) in map {
            if RESERVED_LABEL_PREFIXES.iter().any(|p| k.starts_with(p)) {
                tracing::warn!(label = %k, "an image label with a reserved prefix is not copied onto the container");
                continue;
            }
            if let Some(v) = v.as_str() {
                labels.insert(k.clone(), v.to_string());
            }
        }
    }
    for (k, v) in config_labels {
        labels.insert(k.clone(), v.clone());
    }
    labels.insert(KIND_LABEL.into(), kind.into());
    labels
}

/// The resolv.conf containerd writes from a `DNSConfig`.
fn resolv_conf(dns: &api::DnsConfig) -> String {
    let mut out = String::new();
    if !dns.searches.is_empty() {
        out.push_str(&format!("search {}\n", dns.searches.join(" ")));
    }
    for server in &dns.servers {
        out.push_str(&format!("nameserver {server}\n"));
    }
    if !dns.options.is_empty() {
        out.push_str(&format!("options {}\n", dns.options.join(" ")));
    }
    out
}

fn ns_options(config: &api::PodSandboxConfig) -> api::NamespaceOption {
    config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.clone())
        .unwrap_or_default()
}

pub fn host_network(config: &api::PodSandboxConfig) -> bool {
    ns_options(config).network == api::NamespaceMode::Node as i32
}

impl CriService {
    pub(crate) fn sandbox_root(&self, id: &str) -> PathBuf {
        self.inner.root.join("sandboxes").join(id)
    }

    pub(crate) fn sandbox_state(&self, id: &str) -> PathBuf {
        self.inner.state.join("sandboxes").join(id)
    }

    /// The sandbox `id` (or unique prefix).
    pub(crate) async fn find_sandbox(&self, id: &str) -> Result<(Container, SandboxMeta), Status> {
        let all = store::sandboxes(&self.inner.md).await.map_err(to_status)?;
        store::find(&all, id, |(c, _)| c.id.as_str())
            .cloned()
            .ok_or_else(|| sandbox_not_found(id))
    }

    /// The image (resolving, or pulling when missing), as containerd's `ensureImageExists`.
    pub(crate) async fn ensure_image(
        &self,
        image: &str,
    ) -> Result<crate::images::CriImage, Status> {
        if let Some(found) = self.resolve(image).await? {
            return Ok(found);
        }
        use api::image_service_server::ImageService;
        self.pull_image(tonic::Request::new(api::PullImageRequest {
            image: Some(api::ImageSpec {
                image: image.to_string(),
                ..Default::default()
            }),
            ..Default::default()
        }))
        .await
        .map_err(|s| {
            Status::new(
                s.code(),
                format!("failed to pull image {image:?}: {}", s.message()),
            )
        })?;
        self.resolve(image)
            .await?
            .ok_or_else(|| Status::not_found(format!("image {image:?} not found after pull")))
    }

    /// The state of a sandbox: ready while its pause task runs.
    pub(crate) async fn sandbox_ready(&self, id: &str) -> (bool, u32) {
        match self.inner.runtime.get(NS, id).await {
            Ok(task) => match task.state("").await {
                Ok(s) if s.status == TaskStatus::Running => (true, s.pid),
                Ok(s) => (false, s.pid),
                Err(_) => (false, 0),
            },
            Err(_) => (false, 0),
        }
    }

    pub(crate) async fn run_sandbox(
        &self,
        r: api::RunPodSandboxRequest,
    ) -> Result<api::RunPodSandboxResponse, Status> {
        let config = r
            .config
            .ok_or_else(|| Status::invalid_argument("sandbox config must not be nil"))?;
        let meta = config
            .metadata
            .clone()
            .ok_or_else(|| Status::invalid_argument("sandbox config must include metadata"))?;
        let name = format!(
            "{}_{}_{}_{}",
            meta.name, meta.namespace, meta.uid, meta.attempt
        );
        let id = generate_id();
        self.reserve_name("sandbox", &name, &id).await?;
        match self
            .run_reserved(&id, &name, &config, &r.runtime_handler)
            .await
        {
            Ok(()) => Ok(api::RunPodSandboxResponse { pod_sandbox_id: id }),
            Err(e) => {
                self.release_name("sandbox", &name);
                Err(e)
            }
        }
    }

    /// containerd's name registrars (one for sandboxes, one for containers): one ID per
    /// name, among live records and creations in progress.
    pub(crate) async fn reserve_name(
        &self,
        what: &str,
        name: &str,
        id: &str,
    ) -> Result<(), Status> {
        let existing = store::records(&self.inner.md).await.map_err(to_status)?;
        let mut names = self.inner.names.lock().unwrap();
        let key = format!("{what}/{name}");
        for c in &existing {
            let other = if what == "sandbox" {
                store::sandbox_meta(c).map(|m| m.name)
            } else {
                store::container_meta(c).map(|m| m.name)
            };
            if other.as_deref() == Some(name) {
                names.insert(key.clone(), c.id.clone());
            }
        }
        if let Some(holder) = names.get(&key) {
            return Err(unknown(format!(
                "failed to reserve {what} name {name:?}: name {name:?} is reserved for {holder:?}"
            )));
        }
        names.insert(key, id.to_string());
        Ok(())
    }

    pub(crate) fn release_name(&self, what: &str, name: &str) {
        self.inner
            .names
            .lock()
            .unwrap()
            .remove(&format!("{what}/{name}"));
    }

    async fn run_reserved(
        &self,
        id: &str,
        name: &str,
        config: &api::PodSandboxConfig,
        handler: &str,
    ) -> Result<(), Status> {
        let cfg = &self.inner.config;
        let runtime_type = cfg.containerd.runtime_type(handler).ok_or_else(|| {
            unknown(format!(
                "failed to get sandbox runtime: no runtime for {handler:?} is configured"
            ))
        })?;
        let image = self.ensure_image(&cfg.sandbox_image).await.map_err(|s| {
            Status::new(
                s.code(),
                format!(
                    "failed to get sandbox image {:?}: {}",
                    cfg.sandbox_image,
                    s.message()
                ),
            )
        })?;
        let mut meta = SandboxMeta {
            id: id.to_string(),
            name: name.to_string(),
            runtime_handler: handler.to_string(),
            ..Default::default()
        };
        meta.set_config(config);
        // Everything made from here on is undone by `cleanup_sandbox` on failure.
        let result = self
            .start_sandbox(&mut meta, config, &image, &runtime_type)
            .await;
        if let Err(e) = result {
            if let Err(c) = self.cleanup_sandbox(&meta).await {
                tracing::warn!(id, error = %c.message(), "cleaning up a failed sandbox");
            }
            return Err(e);
        }
        Ok(())
    }

    async fn start_sandbox(
        &self,
        meta: &mut SandboxMeta,
        config: &api::PodSandboxConfig,
        image: &crate::images::CriImage,
        runtime_type: &str,
    ) -> Result<(), Status> {
        let id = meta.id.clone();
        let pod = config.metadata.clone().unwrap_or_default();
        let host_net = host_network(config);
        let nsopts = ns_options(config);
        let image_config = spec::image_config(&image.facts.config);
        if !host_net {
            let netns = self
                .inner
                .state
                .join("netns")
                .join(format!("cni-{}", uuid::Uuid::new_v4()));
            meta.net_ns_path = netns.display().to_string();
            cni::create_netns(&netns).map_err(|e| {
                unknown(format!(
                    "failed to create network namespace for sandbox {id:?}: {e}"
                ))
            })?;
            let pod_ref = PodRef {
                sandbox_id: id.clone(),
                name: pod.name.clone(),
                namespace: pod.namespace.clone(),
                uid: pod.uid.clone(),
                netns: meta.net_ns_path.clone(),
            };
            let attachment = cni::setup(&self.inner.config.cni, &pod_ref)
                .await
                .map_err(unknown)?;
            let ips = attachment.ips();
            meta.ip = ips.first().cloned().unwrap_or_default();
            meta.additional_ips = ips.into_iter().skip(1).collect();
            meta.cni_result = Some(attachment);
        }
        // The sandbox's files.
        let root = self.sandbox_root(&id);
        std::fs::create_dir_all(&root)
            .map_err(|e| unknown(format!("creating {}: {e}", root.display())))?;
        let hostname = if config.hostname.is_empty() {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_default()
        } else {
            config.hostname.clone()
        };
        let write = |name: &str, text: &[u8]| {
            std::fs::write(root.join(name), text)
                .map_err(|e| unknown(format!("failed to write sandbox {name}: {e}")))
        };
        write("hostname", format!("{hostname}\n").as_bytes())?;
        write("hosts", &std::fs::read("/etc/hosts").unwrap_or_default())?;
        match &config.dns_config {
            Some(dns) => write("resolv.conf", resolv_conf(dns).as_bytes())?,
            None => write(
                "resolv.conf",
                &std::fs::read("/etc/resolv.conf").unwrap_or_default(),
            )?,
        }
        let host_ipc = nsopts.ipc == api::NamespaceMode::Node as i32;
        let shm = self.sandbox_state(&id).join("shm");
        if !host_ipc {
            std::fs::create_dir_all(&shm)
                .map_err(|e| unknown(format!("creating {}: {e}", shm.display())))?;
            nix::mount::mount(
                Some("shm"),
                &shm,
                Some("tmpfs"),
                nix::mount::MsFlags::MS_NOEXEC
                    | nix::mount::MsFlags::MS_NOSUID
                    | nix::mount::MsFlags::MS_NODEV,
                Some("mode=1777,size=65536k"),
            )
            .map_err(|e| unknown(format!("failed to mount sandbox shm: {e}")))?;
        }
        // The pause container's spec.
        let mut s = spec::base_spec(NS, &id);
        let args = spec::process_args(&[], &[], &image_config);
        if args.is_empty() {
            return Err(Status::invalid_argument("no command specified"));
        }
        s["process"]["args"] = json!(args);
        spec::set_env(&mut s, &spec::image_env(&image_config));
        if let Some(cwd) = image_config["WorkingDir"]
            .as_str()
            .filter(|w| !w.is_empty())
        {
            s["process"]["cwd"] = json!(cwd);
        }
        // Only the CRI's own (the kubelet sends none for host-network pods, whose UTS
        // namespace is the node's).
        if !config.hostname.is_empty() {
            s["hostname"] = json!(config.hostname);
        }
        s["root"]["readonly"] = json!(true);
        match &meta.net_ns_path {
            p if p.is_empty() => spec::set_namespace(&mut s, "network", None),
            p => spec::set_namespace(&mut s, "network", Some(Some(p.clone()))),
        }
        if host_net {
            spec::set_namespace(&mut s, "uts", None);
        }
        if nsopts.pid == api::NamespaceMode::Node as i32 {
            spec::set_namespace(&mut s, "pid", None);
        }
        if host_ipc {
            spec::set_namespace(&mut s, "ipc", None);
            spec::bind_mount(
                &mut s,
                "/dev/shm",
                "/dev/shm",
                vec!["rbind".into(), "ro".into()],
            );
        } else {
            spec::bind_mount(
                &mut s,
                &shm.display().to_string(),
                "/dev/shm",
                vec!["rbind".into(), "ro".into()],
            );
        }
        let linux = config.linux.clone().unwrap_or_default();
        if !linux.cgroup_parent.is_empty() {
            s["linux"]["cgroupsPath"] = json!(spec::cgroups_path(&linux.cgroup_parent, &id));
        }
        if !linux.sysctls.is_empty() {
            s["linux"]["sysctl"] = json!(linux.sysctls);
        }
        // The pause outlives memory pressure as long as possible (containerd's
        // defaultSandboxOOMAdj), unless the daemon may not lower scores.
        s["process"]["oomScoreAdj"] = json!(spec::oom_score_adj(
            SANDBOX_OOM_SCORE_ADJ,
            self.inner.config.restrict_oom_score_adj
        ));
        s["linux"]["resources"]["cpu"] = json!({"shares": 2});
        let mut annotations = serde_json::Map::new();
        for (k, v) in &config.annotations {
            annotations.insert(k.clone(), json!(v));
        }
        annotations.insert(CONTAINER_TYPE.into(), json!("sandbox"));
        annotations.insert(SANDBOX_ID.into(), json!(id));
        annotations.insert(SANDBOX_NAME.into(), json!(pod.name));
        annotations.insert(SANDBOX_NAMESPACE.into(), json!(pod.namespace));
        annotations.insert(SANDBOX_UID.into(), json!(pod.uid));
        annotations.insert(SANDBOX_LOG_DIR.into(), json!(config.log_directory));
        s["annotations"] = serde_json::Value::Object(annotations);

        // Record, snapshot, task.
        let snapshotter = self.inner.config.containerd.snapshotter.clone();
        let mut extensions = HashMap::new();
        let (k, v) = store::extension(true, meta);
        extensions.insert(k, v);
        let record = Container {
            id: id.clone(),
            labels: build_labels(&config.labels, &image_config, KIND_SANDBOX),
            image: image
                .references
                .first()
                .cloned()
                .unwrap_or_else(|| image.facts.id.clone()),
            runtime: ContainerRuntime {
                name: runtime_type.to_string(),
                options: None,
            },
            spec: Some(prost_types::Any {
                type_url: spec::SPEC_TYPE_URL.into(),
                value: serde_json::to_vec(&s).unwrap(),
            }),
            snapshotter,
            snapshot_key: id.clone(),
            extensions,
            ..Default::default()
        };
        store::create_record(&self.inner.md, &self.inner.events, record)
            .await
            .map_err(to_status)?;
        let mounts = self
            .prepare_snapshot(&id, &image.facts.chain_id)
            .await
            .map_err(|e| {
                unknown(format!(
                    "failed to create containerd container: {}",
                    e.message()
                ))
            })?;
        let task = self
            .inner
            .runtime
            .create(
                NS,
                &id,
                CreateOpts {
                    spec: serde_json::to_vec(&s).unwrap(),
                    rootfs: mounts,
                    io: IoConfig::default(),
                    runtime: runtime_type.to_string(),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| {
                tracing::debug!(id, spec = %s, "sandbox task create failed");
                unknown(format!("failed to create containerd task: {}", e.message()))
            })?;
        task.start("").await.map_err(|e| {
            unknown(format!(
                "failed to start sandbox container task {id:?}: {}",
                e.message()
            ))
        })?;
        Ok(())
    }

    pub(crate) async fn prepare_snapshot(
        &self,
        key: &str,
        parent: &str,
    ) -> berth_core::Result<Vec<berth_core::mount::Mount>> {
        use berth_core::snapshot::Snapshotter;
        let db = self
            .inner
            .snapshotters
            .get(&self.inner.config.containerd.snapshotter)?;
        db.namespaced(NS, None)
            .prepare(key, parent, Default::default())
            .await
    }

    pub(crate) async fn remove_snapshot(&self, snapshotter: &str, key: &str) {
        use berth_core::snapshot::Snapshotter;
        if let Ok(db) = self.inner.snapshotters.get(snapshotter) {
            match db.namespaced(NS, None).remove(key).await {
                Ok(()) => {}
                Err(e) if e.is(berth_core::error::ErrorKind::NotFound) => {}
                Err(e) => tracing::warn!(key, error = %e, "removing a CRI snapshot"),
            }
        }
    }

    /// Kills and deletes the task of `id` if there is one (SIGKILL to all).
    pub(crate) async fn kill_task(&self, id: &str) -> Result<(), Status> {
        let task = match self.inner.runtime.get(NS, id).await {
            Ok(task) => task,
            Err(_) => return Ok(()),
        };
        if let Ok(state) = task.state("").await
            && state.status != TaskStatus::Stopped
        {
            match task.kill("", 9, true).await {
                Ok(()) => {}
                Err(e) if e.is(berth_core::error::ErrorKind::NotFound) => {}
                Err(e) => tracing::debug!(id, error = %e, "kill"),
            }
            let _ = tokio::time::timeout(std::time::Duration::from_secs(10), task.wait("")).await;
        }
        match self.inner.runtime.delete(NS, id).await {
            Ok(_) => Ok(()),
            Err(e) if e.is(berth_core::error::ErrorKind::NotFound) => Ok(()),
            // Deleted meanwhile by the exit waiter: gone is what was wanted.
            Err(_) if self.inner.runtime.get(NS, id).await.is_err() => Ok(()),
            Err(e) => Err(unknown(format!(
                "failed to delete task {id:?}: {}",
                e.message()
            ))),
        }
    }

    /// Stops the pause task and tears the network down (idempotent). With
    /// `teardown_again` false the network is left alone once its namespace is gone
    /// (a previous stop tore it down).
    async fn stop_sandbox_parts(
        &self,
        meta: &SandboxMeta,
        teardown_again: bool,
    ) -> Result<(), Status> {
        let shm = self.sandbox_state(&meta.id).join("shm");
        let _ = nix::mount::umount2(&shm, nix::mount::MntFlags::MNT_DETACH);
        self.kill_task(&meta.id).await?;
        // As containerd: the network is torn down on every stop of a pod that had one
        // (CNI DEL is idempotent), with an empty netns once the namespace is gone (after
        // a reboot, or a previous stop).
        let network_up = Path::new(&meta.net_ns_path).exists();
        if !meta.net_ns_path.is_empty() && (teardown_again || network_up) {
            let netns = if Path::new(&meta.net_ns_path).exists() {
                meta.net_ns_path.clone()
            } else {
                String::new()
            };
            let config = meta.config();
            let pod = config.metadata.unwrap_or_default();
            let pod_ref = PodRef {
                sandbox_id: meta.id.clone(),
                name: pod.name,
                namespace: pod.namespace,
                uid: pod.uid,
                netns,
            };
            let attachment = meta.cni_result.clone().unwrap_or_default();
            cni::teardown(&self.inner.config.cni, &pod_ref, &attachment)
                .await
                .map_err(|e| {
                    unknown(format!(
                        "failed to destroy network for sandbox {:?}: {e}",
                        meta.id
                    ))
                })?;
            cni::remove_netns(Path::new(&meta.net_ns_path)).map_err(|e| {
                unknown(format!(
                    "failed to remove network namespace for sandbox {:?}: {e}",
                    meta.id
                ))
            })?;
        }
        Ok(())
    }

    /// Undoes everything of a sandbox: task, network, files, snapshot, record.
    async fn cleanup_sandbox(&self, meta: &SandboxMeta) -> Result<(), Status> {
        self.stop_sandbox_parts(meta, false).await?;
        let snapshotter = self.inner.config.containerd.snapshotter.clone();
        let record = {
            let id = meta.id.clone();
            store::blocking(&self.inner.md, move |md| md.get_container(NS, &id)).await
        };
        if let Ok(record) = record {
            self.remove_snapshot(&record.snapshotter, &record.snapshot_key)
                .await;
            store::delete_record(&self.inner.md, &self.inner.events, &meta.id)
                .await
                .map_err(to_status)?;
        } else {
            self.remove_snapshot(&snapshotter, &meta.id).await;
        }
        let _ = std::fs::remove_dir_all(self.sandbox_state(&meta.id));
        let _ = std::fs::remove_dir_all(self.sandbox_root(&meta.id));
        Ok(())
    }

    pub(crate) async fn stop_sandbox(&self, id: &str) -> Result<(), Status> {
        let (record, meta) = self.find_sandbox(id).await?;
        let _guard = self.lock(&record.id).await;
        for (c, cm) in store::containers(&self.inner.md).await.map_err(to_status)? {
            if cm.sandbox_id == record.id {
                self.stop_container_id(&c.id, 0).await?;
            }
        }
        self.stop_sandbox_parts(&meta, true).await
    }

    pub(crate) async fn remove_sandbox(&self, id: &str) -> Result<(), Status> {
        let (record, meta) = match self.find_sandbox(id).await {
            Ok(found) => found,
            // Removing what is not there succeeds (containerd: idempotent).
            Err(s) if s.code() == tonic::Code::NotFound => return Ok(()),
            Err(s) => return Err(s),
        };
        // containerd stops a sandbox that is still ready first (the kubelet has stopped
        // it already, so the network is not torn down a second time); Berth also stops
        // one whose network is still up (its pause died and nobody stopped it), which
        // containerd refuses to remove.
        let (ready, _) = self.sandbox_ready(&record.id).await;
        if ready || Path::new(&meta.net_ns_path).exists() {
            self.stop_sandbox(&record.id).await?;
        }
        let _guard = self.lock(&record.id).await;
        for (c, cm) in store::containers(&self.inner.md).await.map_err(to_status)? {
            if cm.sandbox_id == record.id {
                self.remove_container_id(&c.id).await?;
            }
        }
        self.cleanup_sandbox(&meta).await?;
        self.release_name("sandbox", &meta.name);
        drop(_guard);
        self.inner.locks.lock().unwrap().remove(&record.id);
        Ok(())
    }

    pub(crate) async fn sandbox_status(
        &self,
        r: api::PodSandboxStatusRequest,
    ) -> Result<api::PodSandboxStatusResponse, Status> {
        let (record, meta) = self.find_sandbox(&r.pod_sandbox_id).await?;
        let status = self.to_sandbox_status(&record, &meta).await;
        let mut info = HashMap::new();
        if r.verbose {
            let (_, pid) = self.sandbox_ready(&record.id).await;
            let spec: serde_json::Value = record
                .spec
                .as_ref()
                .and_then(|s| serde_json::from_slice(&s.value).ok())
                .unwrap_or_default();
            let v = json!({
                "pid": pid,
                "processStatus": if status.state == api::PodSandboxState::SandboxReady as i32 { "running" } else { "deleted" },
                "netNamespaceClosed": !Path::new(&meta.net_ns_path).exists(),
                "image": record.image,
                "snapshotKey": record.snapshot_key,
                "snapshotter": record.snapshotter,
                "runtimeHandler": meta.runtime_handler,
                "runtimeType": record.runtime.name,
                "cniResult": meta.cni_result,
                "runtimeSpec": spec,
            });
            info.insert("info".to_string(), v.to_string());
        }
        Ok(api::PodSandboxStatusResponse {
            status: Some(status),
            info,
            ..Default::default()
        })
    }

    async fn to_sandbox_status(
        &self,
        record: &Container,
        meta: &SandboxMeta,
    ) -> api::PodSandboxStatus {
        let config = meta.config();
        let (ready, _) = self.sandbox_ready(&record.id).await;
        let nsopts = ns_options(&config);
        api::PodSandboxStatus {
            id: record.id.clone(),
            metadata: config.metadata.clone(),
            state: if ready {
                api::PodSandboxState::SandboxReady
            } else {
                api::PodSandboxState::SandboxNotready
            } as i32,
            created_at: store::nanos(record.created_at),
            network: Some(api::PodSandboxNetworkStatus {
                ip: meta.ip.clone(),
                additional_ips: meta
                    .additional_ips
                    .iter()
                    .map(|ip| api::PodIp { ip: ip.clone() })
                    .collect(),
            }),
            linux: Some(api::LinuxPodSandboxStatus {
                namespaces: Some(api::Namespace {
                    options: Some(nsopts),
                }),
            }),
            labels: config.labels.clone(),
            annotations: config.annotations.clone(),
            runtime_handler: meta.runtime_handler.clone(),
        }
    }

    pub(crate) async fn list_sandboxes(
        &self,
        r: api::ListPodSandboxRequest,
    ) -> Result<api::ListPodSandboxResponse, Status> {
        let all = store::sandboxes(&self.inner.md).await.map_err(to_status)?;
        let filter = r.filter.unwrap_or_default();
        let wanted: Vec<_> = all
            .iter()
            .filter(|(record, _)| filter.id.is_empty() || record.id.starts_with(&filter.id))
            .collect();
        // Each status asks the pod's shim for its pause task's state: all shims at once,
        // not one round trip after another (the kubelet lists every second).
        let statuses = futures::future::join_all(
            wanted
                .iter()
                .map(|(record, meta)| self.to_sandbox_status(record, meta)),
        )
        .await;
        let mut items = Vec::new();
        for status in statuses {
            if let Some(state) = &filter.state
                && state.state != status.state
            {
                continue;
            }
            if !store::labels_match(&filter.label_selector, &status.labels) {
                continue;
            }
            items.push(api::PodSandbox {
                id: status.id,
                metadata: status.metadata,
                state: status.state,
                created_at: status.created_at,
                labels: status.labels,
                annotations: status.annotations,
                runtime_handler: status.runtime_handler,
            });
        }
        Ok(api::ListPodSandboxResponse { items })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_labels_never_bring_reserved_labels() {
        let image = json!({"Labels": {
            "containerd.io/restart.loguri": "binary:///bin/sh?-c=touch /pwned",
            "containerd.io/restart.status": "running",
            "io.cri-containerd.kind": "sandbox",
            "org.example/harmless": "yes",
            "app": "image"
        }});
        let labels = build_labels(
            &HashMap::from([("app".into(), "cri".into())]),
            &image,
            "container",
        );
        assert_eq!(
            labels.get("org.example/harmless").map(String::as_str),
            Some("yes")
        );
        assert_eq!(labels.get("app").map(String::as_str), Some("cri"));
        assert_eq!(
            labels.get(KIND_LABEL).map(String::as_str),
            Some("container")
        );
        assert!(
            !labels.keys().any(|k| k.starts_with("containerd.io/")),
            "{labels:?}"
        );
    }

    #[test]
    fn resolv_conf_from_dns_config() {
        let dns = api::DnsConfig {
            servers: vec!["1.1.1.1".into()],
            searches: vec!["a".into(), "b".into()],
            options: vec!["ndots:2".into()],
        };
        assert_eq!(
            resolv_conf(&dns),
            "search a b\nnameserver 1.1.1.1\noptions ndots:2\n"
        );
    }
}
