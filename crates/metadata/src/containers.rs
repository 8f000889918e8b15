//! Container records: `containers` table, key `"{namespace}/{id}"`.
//!
//! A container is metadata only (spec, runtime, image, snapshot); its task lives in the
//! runtime. Containers are GC roots: [`MetadataStore::container_references`] lists the
//! snapshot and image every container holds, for the collector to mark.
//!
//! Rules follow containerd's `metadata/containers.go`: the ID is an identifier, a runtime
//! name and a spec are required, a snapshot key needs a snapshotter, the snapshotter and
//! runtime name are immutable, and `created_at` never changes.

use crate::MetadataStore;
use crate::db::{NamespacedTable, db_error, get_json, namespace_range, namespaced_key, to_json};
use berth_core::labels::{self, Labels};
use berth_core::{Error, Result, fieldpath, identifiers};
use prost_types::Any;
use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::SystemTime;

/// The table of container records.
pub const CONTAINERS: NamespacedTable = TableDefinition::new("containers");

/// The runtime a container's task runs under and its options (e.g. runc's `Options`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ContainerRuntime {
    pub name: String,
    pub options: Option<Any>,
}

/// One container, as the containers service exposes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Container {
    pub id: String,
    pub labels: Labels,
    pub image: String,
    pub runtime: ContainerRuntime,
    /// The OCI runtime spec (type `types.containerd.io/opencontainers/runtime-spec/1/Spec`,
    /// JSON value).
    pub spec: Option<Any>,
    pub snapshotter: String,
    pub snapshot_key: String,
    pub created_at: SystemTime,
    pub updated_at: SystemTime,
    pub extensions: HashMap<String, Any>,
    pub sandbox: String,
}

impl Default for Container {
    fn default() -> Self {
        Container {
            id: String::new(),
            labels: Labels::new(),
            image: String::new(),
            runtime: ContainerRuntime::default(),
            spec: None,
            snapshotter: String::new(),
            snapshot_key: String::new(),
            created_at: SystemTime::UNIX_EPOCH,
            updated_at: SystemTime::UNIX_EPOCH,
            extensions: HashMap::new(),
            sandbox: String::new(),
        }
    }
}

/// What a container keeps alive for the garbage collector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerReferences {
    pub namespace: String,
    pub id: String,
    /// `(snapshotter, key)` when the container has a snapshot.
    pub snapshot: Option<(String, String)>,
    /// The image name, when set.
    pub image: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct AnyRecord {
    type_url: String,
    /// Hex of the value bytes.
    value: String,
}

impl AnyRecord {
    fn from_any(any: &Any) -> AnyRecord {
        AnyRecord {
            type_url: any.type_url.clone(),
            value: hex::encode(&any.value),
        }
    }
    fn to_any(&self) -> Result<Any> {
        Ok(Any {
            type_url: self.type_url.clone(),
            value: hex::decode(&self.value)
                .map_err(|e| db_error("decoding container record value", e))?,
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ContainerRecord {
    #[serde(default)]
    labels: Labels,
    #[serde(default)]
    image: String,
    runtime_name: String,
    #[serde(default)]
    runtime_options: Option<AnyRecord>,
    spec: Option<AnyRecord>,
    #[serde(default)]
    snapshotter: String,
    #[serde(default)]
    snapshot_key: String,
    /// Nanoseconds since the epoch.
    created_at: u128,
    updated_at: u128,
    #[serde(default)]
    extensions: HashMap<String, AnyRecord>,
    #[serde(default)]
    sandbox: String,
}

fn nanos(time: SystemTime) -> u128 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn from_nanos(n: u128) -> SystemTime {
    SystemTime::UNIX_EPOCH
        + std::time::Duration::new((n / 1_000_000_000) as u64, (n % 1_000_000_000) as u32)
}

impl ContainerRecord {
    fn from_container(c: &Container) -> ContainerRecord {
        ContainerRecord {
            labels: c.labels.clone(),
            image: c.image.clone(),
            runtime_name: c.runtime.name.clone(),
            runtime_options: c.runtime.options.as_ref().map(AnyRecord::from_any),
            spec: c.spec.as_ref().map(AnyRecord::from_any),
            snapshotter: c.snapshotter.clone(),
            snapshot_key: c.snapshot_key.clone(),
            created_at: nanos(c.created_at),
            updated_at: nanos(c.updated_at),
            extensions: c
                .extensions
                .iter()
                .map(|(k, v)| (k.clone(), AnyRecord::from_any(v)))
                .collect(),
            sandbox: c.sandbox.clone(),
        }
    }

    fn into_container(self, id: &str) -> Result<Container> {
        Ok(Container {
            id: id.to_string(),
            labels: self.labels,
            image: self.image,
            runtime: ContainerRuntime {
                name: self.runtime_name,
                options: self
                    .runtime_options
                    .as_ref()
                    .map(AnyRecord::to_any)
                    .transpose()?,
            },
            spec: self.spec.as_ref().map(AnyRecord::to_any).transpose()?,
            snapshotter: self.snapshotter,
            snapshot_key: self.snapshot_key,
            created_at: from_nanos(self.created_at),
            updated_at: from_nanos(self.updated_at),
            extensions: self
                .extensions
                .iter()
                .map(|(k, v)| Ok((k.clone(), v.to_any()?)))
                .collect::<Result<_>>()?,
            sandbox: self.sandbox,
        })
    }
}

fn validate(container: &Container) -> Result<()> {
    identifiers::validate(&container.id).map_err(|e| e.context("container.ID"))?;
    if container.extensions.keys().any(String::is_empty) {
        return Err(Error::invalid_argument(
            "container.Extension keys must not be zero-length",
        ));
    }
    labels::validate_all(&container.labels).map_err(|e| e.context("containers.Labels"))?;
    if container.runtime.name.is_empty() {
        return Err(Error::invalid_argument(
            "container.Runtime.Name must be set",
        ));
    }
    if container.spec.is_none() {
        return Err(Error::invalid_argument("container.Spec must be set"));
    }
    if !container.snapshot_key.is_empty() && container.snapshotter.is_empty() {
        return Err(Error::invalid_argument(
            "container.Snapshotter must be set if container.SnapshotKey is set",
        ));
    }
    Ok(())
}

/// Whether `container` matches a containers filter field path (containerd's adaptor:
/// `id`, `runtime.name`, `image`, `labels.<key>`).
pub fn filter_field(container: &Container, path: &[String]) -> Option<String> {
    let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_string());
    match path {
        [f] if f == "id" => non_empty(&container.id),
        [f] if f == "image" => non_empty(&container.image),
        [f, n] if f == "runtime" && n == "name" => non_empty(&container.runtime.name),
        [f, key] if f == "labels" => container.labels.get(key).cloned(),
        [f, rest @ ..] if f == "labels" && !rest.is_empty() => {
            container.labels.get(&rest.join(".")).cloned()
        }
        _ => None,
    }
}

fn read_container(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    namespace: &str,
    id: &str,
) -> Result<Option<Container>> {
    get_json::<ContainerRecord>(table, &namespaced_key(namespace, id))?
        .map(|r| r.into_container(id))
        .transpose()
}

impl MetadataStore {
    /// Stores a new container; `created_at`/`updated_at` are set here.
    pub fn create_container(&self, namespace: &str, mut container: Container) -> Result<Container> {
        validate(&container).map_err(|e| e.context("create container failed validation"))?;
        container.created_at = SystemTime::now();
        container.updated_at = container.created_at;
        self.write(|tx| {
            MetadataStore::ensure_namespace(tx, namespace)?;
            let mut table = tx
                .open_table(CONTAINERS)
                .map_err(|e| db_error("containers", e))?;
            let key = namespaced_key(namespace, &container.id);
            if table
                .get(key.as_str())
                .map_err(|e| db_error("get", e))?
                .is_some()
            {
                return Err(Error::already_exists(format!(
                    "container {:?}",
                    container.id
                )));
            }
            let record = to_json(&ContainerRecord::from_container(&container))?;
            table
                .insert(key.as_str(), record.as_slice())
                .map_err(|e| db_error("put", e))?;
            Ok(())
        })?;
        Ok(container)
    }

    pub fn get_container(&self, namespace: &str, id: &str) -> Result<Container> {
        if id.is_empty() {
            return Err(Error::invalid_argument("container id must not be empty"));
        }
        self.read(|tx| {
            let table = match tx.open_table(CONTAINERS) {
                Ok(table) => table,
                Err(redb::TableError::TableDoesNotExist(_)) => {
                    return Err(Error::not_found(format!(
                        "container \"{id}\" in namespace \"{namespace}\""
                    )));
                }
                Err(e) => return Err(db_error("containers", e)),
            };
            read_container(&table, namespace, id)?.ok_or_else(|| {
                Error::not_found(format!("container \"{id}\" in namespace \"{namespace}\""))
            })
        })
    }

    /// Every container of `namespace`, in ID order.
    pub fn list_containers(&self, namespace: &str) -> Result<Vec<Container>> {
        self.read(|tx| {
            let table = match tx.open_table(CONTAINERS) {
                Ok(table) => table,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(db_error("containers", e)),
            };
            let (start, end) = namespace_range(namespace);
            let mut out = Vec::new();
            for entry in table
                .range(start.as_str()..end.as_str())
                .map_err(|e| db_error("range", e))?
            {
                let (key, value) = entry.map_err(|e| db_error("range", e))?;
                let id = &key.value()[start.len()..];
                let record: ContainerRecord = serde_json::from_slice(value.value())
                    .map_err(|e| db_error(&format!("decoding container {id:?}"), e))?;
                out.push(record.into_container(id)?);
            }
            Ok(out)
        })
    }

    /// Applies `paths` (containerd's field mask; empty = replace every mutable field) from
    /// `requested` to the stored container.
    pub fn update_container(
        &self,
        namespace: &str,
        requested: Container,
        paths: &[String],
    ) -> Result<Container> {
        if requested.id.is_empty() {
            return Err(Error::invalid_argument("must specify a container id"));
        }
        self.write(|tx| {
            let mut table = tx
                .open_table(CONTAINERS)
                .map_err(|e| db_error("containers", e))?;
            let mut updated = read_container(&table, namespace, &requested.id)?
                .ok_or_else(|| Error::not_found(format!("container {:?}", requested.id)))?;
            let created_at = updated.created_at;
            let default_paths;
            let paths = if paths.is_empty() {
                if updated.snapshotter != requested.snapshotter {
                    return Err(Error::invalid_argument(
                        "container.Snapshotter field is immutable",
                    ));
                }
                if updated.runtime.name != requested.runtime.name {
                    return Err(Error::invalid_argument(
                        "container.Runtime.Name field is immutable",
                    ));
                }
                default_paths = ["labels", "spec", "extensions", "image", "snapshotkey"]
                    .map(String::from)
                    .to_vec();
                &default_paths[..]
            } else {
                paths
            };
            let others = fieldpath::apply_labels(&mut updated.labels, &requested.labels, paths);
            for path in others {
                if let Some(key) = path.strip_prefix("extensions.") {
                    match requested.extensions.get(key) {
                        Some(v) => updated.extensions.insert(key.to_string(), v.clone()),
                        None => updated.extensions.remove(key),
                    };
                    continue;
                }
                match path.as_str() {
                    "spec" => updated.spec = requested.spec.clone(),
                    "extensions" => updated.extensions = requested.extensions.clone(),
                    "image" => updated.image = requested.image.clone(),
                    "snapshotkey" => updated.snapshot_key = requested.snapshot_key.clone(),
                    _ => {
                        return Err(Error::invalid_argument(format!(
                            "cannot update {path:?} field on {:?}",
                            requested.id
                        )));
                    }
                }
            }
            validate(&updated).map_err(|e| e.context("update failed validation"))?;
            updated.created_at = created_at;
            updated.updated_at = SystemTime::now();
            let key = namespaced_key(namespace, &updated.id);
            let record = to_json(&ContainerRecord::from_container(&updated))?;
            table
                .insert(key.as_str(), record.as_slice())
                .map_err(|e| db_error("put", e))?;
            Ok(updated)
        })
    }

    pub fn delete_container(&self, namespace: &str, id: &str) -> Result<()> {
        self.write(|tx| {
            let mut table = tx
                .open_table(CONTAINERS)
                .map_err(|e| db_error("containers", e))?;
            let key = namespaced_key(namespace, id);
            if table
                .remove(key.as_str())
                .map_err(|e| db_error("delete", e))?
                .is_none()
            {
                return Err(Error::not_found(format!(
                    "container \"{id}\" in namespace \"{namespace}\""
                )));
            }
            Ok(())
        })?;
        self.mark_dirty();
        Ok(())
    }

    /// GC roots held by containers, in every namespace: each container keeps its snapshot
    /// (`snapshotter`, `snapshot_key`) and its image alive.
    pub fn container_references(&self) -> Result<Vec<ContainerReferences>> {
        self.read(|tx| {
            let table = match tx.open_table(CONTAINERS) {
                Ok(table) => table,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(db_error("containers", e)),
            };
            let mut out = Vec::new();
            for entry in table.iter().map_err(|e| db_error("iterate", e))? {
                let (key, value) = entry.map_err(|e| db_error("iterate", e))?;
                let Some((namespace, id)) = key.value().split_once('/') else {
                    continue;
                };
                let record: ContainerRecord = serde_json::from_slice(value.value())
                    .map_err(|e| db_error(&format!("decoding container {id:?}"), e))?;
                out.push(ContainerReferences {
                    namespace: namespace.to_string(),
                    id: id.to_string(),
                    snapshot: (!record.snapshot_key.is_empty())
                        .then(|| (record.snapshotter.clone(), record.snapshot_key.clone())),
                    image: (!record.image.is_empty()).then(|| record.image.clone()),
                });
            }
            Ok(out)
        })
    }
}

/// The containers' part of garbage collection: every container is a root and references
/// its snapshot (`"<snapshotter>/<key>"`) and whatever its labels reference
/// (`containerd.io/gc.ref.*`). Containers themselves are never collected. Register it with
/// [`MetadataStore::register_gc_resource`] (the containers service does at start-up).
pub struct ContainerGc;

impl crate::gc::GcResource for ContainerGc {
    fn name(&self) -> &str {
        "containers"
    }

    fn scan_roots(
        &self,
        tx: &redb::WriteTransaction,
        _now: SystemTime,
        emit: &mut dyn FnMut(crate::gc::Node),
    ) -> Result<()> {
        let table = tx
            .open_table(CONTAINERS)
            .map_err(|e| db_error("containers", e))?;
        for entry in table.iter().map_err(|e| db_error("iterate", e))? {
            let (key, _) = entry.map_err(|e| db_error("iterate", e))?;
            if let Some((namespace, id)) = key.value().split_once('/') {
                emit(crate::gc::Node::new(
                    crate::gc::Kind::Container,
                    namespace,
                    id,
                ));
            }
        }
        Ok(())
    }

    fn references(
        &self,
        tx: &redb::WriteTransaction,
        node: &crate::gc::Node,
        emit: &mut dyn FnMut(crate::gc::Node),
    ) -> Result<bool> {
        if node.kind != crate::gc::Kind::Container {
            return Ok(false);
        }
        let table = tx
            .open_table(CONTAINERS)
            .map_err(|e| db_error("containers", e))?;
        let Some(record) =
            get_json::<ContainerRecord>(&table, &namespaced_key(&node.namespace, &node.key))?
        else {
            return Ok(true);
        };
        if !record.snapshot_key.is_empty() {
            emit(crate::gc::Node::snapshot(
                &node.namespace,
                &record.snapshotter,
                &record.snapshot_key,
            ));
        }
        crate::gc::label_refs(&node.namespace, &record.labels, emit);
        Ok(true)
    }

    fn sweep(
        &self,
        _tx: &redb::WriteTransaction,
        _marked: &std::collections::HashSet<crate::gc::Node>,
    ) -> Result<bool> {
        Ok(false)
    }

    fn cleanup(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_core::error::ErrorKind;

    fn store() -> (tempfile::TempDir, MetadataStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = MetadataStore::open(&dir.path().join("meta.db")).unwrap();
        (dir, store)
    }

    fn container(id: &str) -> Container {
        Container {
            id: id.into(),
            runtime: ContainerRuntime {
                name: "io.containerd.runc.v2".into(),
                options: None,
            },
            spec: Some(Any {
                type_url: "types.containerd.io/opencontainers/runtime-spec/1/Spec".into(),
                value: br#"{"ociVersion":"1.0.2"}"#.to_vec(),
            }),
            image: "busybox".into(),
            snapshotter: "overlayfs".into(),
            snapshot_key: id.into(),
            labels: [("a".to_string(), "1".to_string())].into(),
            ..Default::default()
        }
    }

    #[test]
    fn create_get_list_update_delete() {
        let (_dir, store) = store();
        let created = store.create_container("ns", container("c1")).unwrap();
        assert!(created.created_at > SystemTime::UNIX_EPOCH);
        let err = store.create_container("ns", container("c1")).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AlreadyExists);
        assert_eq!(err.to_string(), "container \"c1\": already exists");
        store.create_container("ns", container("c2")).unwrap();
        store.create_container("other", container("c1")).unwrap();
        let got = store.get_container("ns", "c1").unwrap();
        assert_eq!(got, created);
        assert_eq!(store.list_containers("ns").unwrap().len(), 2);

        let mut req = container("c1");
        req.labels = [("b".to_string(), "2".to_string())].into();
        req.image = "other".into();
        let updated = store
            .update_container("ns", req.clone(), &["labels.b".into(), "image".into()])
            .unwrap();
        assert_eq!(updated.labels.len(), 2);
        assert_eq!(updated.image, "other");
        assert_eq!(updated.created_at, created.created_at);
        let err = store
            .update_container("ns", req.clone(), &["runtime".into()])
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        req.snapshotter = "native".into();
        assert!(store.update_container("ns", req, &[]).is_err());

        let refs = store.container_references().unwrap();
        assert_eq!(refs.len(), 3);
        assert!(refs.iter().any(
            |r| r.namespace == "other" && r.snapshot == Some(("overlayfs".into(), "c1".into()))
        ));

        let err = store.delete_namespace("ns").unwrap_err();
        assert!(err.to_string().contains("containers"), "{err}");
        store.delete_container("ns", "c1").unwrap();
        assert_eq!(
            store.delete_container("ns", "c1").unwrap_err().kind(),
            ErrorKind::NotFound
        );
        assert_eq!(
            store.get_container("ns", "c1").unwrap_err().kind(),
            ErrorKind::NotFound
        );
    }

    #[test]
    fn containers_are_gc_roots_for_their_snapshot() {
        use crate::gc::{GcResource, Kind, Node};
        let (_dir, store) = store();
        let mut c = container("c1");
        c.labels
            .insert("containerd.io/gc.ref.content.x".into(), "sha256:00".into());
        store.create_container("ns", c).unwrap();
        store
            .write(|tx| {
                let mut roots = Vec::new();
                ContainerGc.scan_roots(tx, SystemTime::now(), &mut |n| roots.push(n))?;
                assert_eq!(roots, vec![Node::new(Kind::Container, "ns", "c1")]);
                let mut refs = Vec::new();
                assert!(ContainerGc.references(tx, &roots[0], &mut |n| refs.push(n))?);
                assert!(
                    refs.contains(&Node::snapshot("ns", "overlayfs", "c1")),
                    "{refs:?}"
                );
                assert!(refs.iter().any(|n| n.kind == Kind::Content), "{refs:?}");
                let other = Node::snapshot("ns", "overlayfs", "c1");
                assert!(!ContainerGc.references(tx, &other, &mut |_| {})?);
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn validation() {
        let (_dir, store) = store();
        let mut c = container("x");
        c.runtime.name.clear();
        let err = store.create_container("ns", c).unwrap_err();
        assert_eq!(
            err.to_string(),
            "create container failed validation: container.Runtime.Name must be set: invalid argument"
        );
        let mut c = container("x");
        c.spec = None;
        assert!(store.create_container("ns", c).is_err());
        let mut c = container("x");
        c.snapshotter.clear();
        assert!(store.create_container("ns", c).is_err());
        assert!(store.create_container("ns", container("bad id")).is_err());
    }

    #[test]
    fn filters() {
        let c = container("c1");
        let f = |p: &[&str]| filter_field(&c, &p.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(f(&["id"]).as_deref(), Some("c1"));
        assert_eq!(
            f(&["runtime", "name"]).as_deref(),
            Some("io.containerd.runc.v2")
        );
        assert_eq!(f(&["labels", "a"]).as_deref(), Some("1"));
        assert_eq!(f(&["snapshotter"]), None);
    }
}
