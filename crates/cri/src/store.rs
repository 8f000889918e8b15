//! Where the CRI keeps sandboxes and containers: container records of namespace
//! `k8s.io` (labelled `io.cri-containerd.kind=sandbox|container`, the CRI's own
//! metadata in an extension, as containerd keeps it), plus for containers a status file
//! under the plugin's root (`containers/<id>/status`: pid, start, exit). Nothing lives
//! only in memory, so a restarted berthd finds everything again.

use crate::api;
use crate::cni::Attachment;
use base64::Engine;
use berth_core::{Error, Result};
use berth_metadata::MetadataStore;
use berth_metadata::containers::Container;
use prost::Message;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

pub const NS: &str = crate::K8S_NAMESPACE;
pub const KIND_LABEL: &str = "io.cri-containerd.kind";
pub const KIND_SANDBOX: &str = "sandbox";
pub const KIND_CONTAINER: &str = "container";
pub const SANDBOX_EXT: &str = "io.cri-containerd.sandbox.metadata";
pub const CONTAINER_EXT: &str = "io.cri-containerd.container.metadata";
const SANDBOX_EXT_TYPE: &str = "github.com/containerd/cri/pkg/store/sandbox/Metadata";
const CONTAINER_EXT_TYPE: &str = "github.com/containerd/cri/pkg/store/container/Metadata";

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Versioned<T> {
    version: String,
    metadata: T,
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(text: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap_or_default()
}

/// A sandbox's CRI metadata.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct SandboxMeta {
    pub id: String,
    pub name: String,
    /// The `PodSandboxConfig`, protobuf-encoded (base64).
    pub config: String,
    pub net_ns_path: String,
    pub ip: String,
    pub additional_ips: Vec<String>,
    pub runtime_handler: String,
    pub cni_result: Option<Attachment>,
}

impl SandboxMeta {
    pub fn config(&self) -> api::PodSandboxConfig {
        api::PodSandboxConfig::decode(unb64(&self.config).as_slice()).unwrap_or_default()
    }
    pub fn set_config(&mut self, config: &api::PodSandboxConfig) {
        self.config = b64(&config.encode_to_vec());
    }
}

/// A container's CRI metadata.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct ContainerMeta {
    pub id: String,
    pub name: String,
    pub sandbox_id: String,
    pub config: String,
    /// The image ID (`sha256:<config digest>`).
    pub image_ref: String,
    pub log_path: String,
    pub stop_signal: String,
}

impl ContainerMeta {
    pub fn config(&self) -> api::ContainerConfig {
        api::ContainerConfig::decode(unb64(&self.config).as_slice()).unwrap_or_default()
    }
    pub fn set_config(&mut self, config: &api::ContainerConfig) {
        self.config = b64(&config.encode_to_vec());
    }
}

pub fn extension<T: Serialize>(kind_sandbox: bool, meta: &T) -> (String, prost_types::Any) {
    let value = serde_json::to_vec(&Versioned {
        version: "v1".into(),
        metadata: meta,
    })
    .unwrap();
    if kind_sandbox {
        (
            SANDBOX_EXT.into(),
            prost_types::Any {
                type_url: SANDBOX_EXT_TYPE.into(),
                value,
            },
        )
    } else {
        (
            CONTAINER_EXT.into(),
            prost_types::Any {
                type_url: CONTAINER_EXT_TYPE.into(),
                value,
            },
        )
    }
}

fn read_ext<T: DeserializeOwned>(c: &Container, key: &str) -> Option<T> {
    let any = c.extensions.get(key)?;
    serde_json::from_slice::<Versioned<T>>(&any.value)
        .ok()
        .map(|v| v.metadata)
}

pub fn sandbox_meta(c: &Container) -> Option<SandboxMeta> {
    (c.labels.get(KIND_LABEL).map(String::as_str) == Some(KIND_SANDBOX))
        .then(|| read_ext(c, SANDBOX_EXT))?
}

pub fn container_meta(c: &Container) -> Option<ContainerMeta> {
    (c.labels.get(KIND_LABEL).map(String::as_str) == Some(KIND_CONTAINER))
        .then(|| read_ext(c, CONTAINER_EXT))?
}

/// Runs metadata work off the async threads.
pub async fn blocking<T: Send + 'static>(
    md: &Arc<MetadataStore>,
    f: impl FnOnce(&MetadataStore) -> Result<T> + Send + 'static,
) -> Result<T> {
    let md = md.clone();
    tokio::task::spawn_blocking(move || f(&md))
        .await
        .map_err(|e| Error::unknown(format!("metadata task failed: {e}")))?
}

/// Creates a record and publishes `/containers/create` through the containers service
/// (containerd's CRI creates its records through it).
pub async fn create_record(
    md: &Arc<MetadataStore>,
    events: &berth_core::events::Exchange,
    record: Container,
) -> Result<Container> {
    berth_services::containers::create_record(md, events, NS, record).await
}

/// Deletes a record (absent is fine) and publishes `/containers/delete`.
pub async fn delete_record(
    md: &Arc<MetadataStore>,
    events: &berth_core::events::Exchange,
    id: &str,
) -> Result<()> {
    match berth_services::containers::delete_record(md, events, NS, id).await {
        Err(e) if e.is(berth_core::error::ErrorKind::NotFound) => Ok(()),
        other => other,
    }
}

pub async fn records(md: &Arc<MetadataStore>) -> Result<Vec<Container>> {
    blocking(md, |md| md.list_containers(NS)).await
}

/// Every sandbox, with its record.
pub async fn sandboxes(md: &Arc<MetadataStore>) -> Result<Vec<(Container, SandboxMeta)>> {
    Ok(records(md)
        .await?
        .into_iter()
        .filter_map(|c| sandbox_meta(&c).map(|m| (c, m)))
        .collect())
}

pub async fn containers(md: &Arc<MetadataStore>) -> Result<Vec<(Container, ContainerMeta)>> {
    Ok(records(md)
        .await?
        .into_iter()
        .filter_map(|c| container_meta(&c).map(|m| (c, m)))
        .collect())
}

/// Whether `labels` has every `key=value` of a CRI filter's `label_selector`.
pub fn labels_match(
    selector: &std::collections::HashMap<String, String>,
    labels: &std::collections::HashMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// containerd's truncindex: a full ID, or a prefix matching exactly one.
pub fn find<'a, T>(items: &'a [T], id: &str, id_of: impl Fn(&T) -> &str) -> Option<&'a T> {
    if id.is_empty() {
        return None;
    }
    if let Some(exact) = items.iter().find(|i| id_of(i) == id) {
        return Some(exact);
    }
    let mut hits = items.iter().filter(|i| id_of(i).starts_with(id));
    let first = hits.next()?;
    hits.next().is_none().then_some(first)
}

/// A container's status file (containerd's `container.Status`, times in nanoseconds).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase", default)]
pub struct Status {
    pub pid: u32,
    pub created_at: i64,
    pub started_at: i64,
    pub finished_at: i64,
    pub exit_code: i32,
    pub reason: String,
    pub message: String,
    /// Set while a removal is in progress.
    pub removing: bool,
}

impl Status {
    pub fn state(&self) -> api::ContainerState {
        if self.finished_at != 0 {
            api::ContainerState::ContainerExited
        } else if self.started_at != 0 {
            api::ContainerState::ContainerRunning
        } else if self.created_at != 0 {
            api::ContainerState::ContainerCreated
        } else {
            api::ContainerState::ContainerUnknown
        }
    }
}

pub fn nanos(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

pub fn read_status(dir: &Path) -> Status {
    std::fs::read(dir.join("status"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Writes the status file atomically.
pub fn write_status(dir: &Path, status: &Status) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(".status.tmp");
    std::fs::write(&tmp, serde_json::to_vec(status).unwrap())?;
    std::fs::rename(tmp, dir.join("status"))
}
