//! Namespaced snapshots over the backend snapshotters (containerd's
//! `metadata/snapshot.go`).
//!
//! Every client-visible snapshot is a record in the `snapshots` table, keyed
//! `"{ns}/{snapshotter}/{key}"`, holding its kind, parent (a client name in the same
//! namespace), labels, times and the **backend key** `"{ns}/{seq}/{key}"` (`seq` a unique increasing number) under which
//! the backend snapshotter knows it: two namespaces may use the same key, and a
//! committed name never collides with the active key it came from. A second table,
//! `snapshot_children` (`"{ns}/{snapshotter}/{parent}\0{child}"`), makes "has
//! children" one range lookup.
//!
//! Ordering with the backend: creates and commits call the backend first and record
//! the result in one write transaction (undoing the backend step if the transaction
//! fails), so a record never points at a missing backend snapshot; removes delete the
//! record first and then the backend snapshot (a crash in between leaves an orphan that
//! the garbage collector's cleanup removes). Only labels with the
//! `containerd.io/snapshot/` prefix (and `containerd.io/snapshot.ref`) reach the backend;
//! a lease named by the caller gets the snapshot as a `snapshots/<snapshotter>`
//! resource. Snapshots take part in garbage collection through [`SnapshotGc`].
//!
//! Remote snapshotters (stargz, nydus): a prepare or view labelled
//! `containerd.io/snapshot.ref=<target>` that the backend answers with AlreadyExists
//! means the backend already has `<target>` as a committed snapshot (it can serve the
//! layer without it being applied). As containerd's `createSnapshot`, the record
//! `<target>` is then made in the namespace, naming that backend snapshot (a *linked*
//! record: several namespaces may name one backend snapshot, so only the collector
//! removes it), and the caller gets AlreadyExists so that it skips the layer.

use crate::MetadataStore;
use crate::db::{db_error, get_json, to_json};
use crate::gc::{GcResource, Kind as GcKind, Node, label_refs};
use crate::util::{nanos, open_read, time};
use berth_core::filters::Filter;
use berth_core::labels::{self, GC_ROOT, Labels};
use berth_core::mount::Mount;
use berth_core::snapshot::{
    Info, Kind, LABEL_SNAPSHOT_PREFIX, LABEL_SNAPSHOT_REF, Snapshotter, Usage,
};
use berth_core::{Error, Result, fieldpath};
use redb::{ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

pub const SNAPSHOTS: crate::NamespacedTable = TableDefinition::new("snapshots");
const CHILDREN: TableDefinition<&str, ()> = TableDefinition::new("snapshot_children");

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SnapshotRecord {
    backend_key: String,
    kind: String,
    #[serde(default)]
    parent: String,
    #[serde(default)]
    labels: Labels,
    created: u64,
    updated: u64,
    /// The record names a backend snapshot the backend already had (a remote
    /// snapshotter's target, see [`NamespacedSnapshotter::create`]): other records, in
    /// any namespace, may name it too, so removing this record leaves the backend
    /// snapshot to the collector, which removes it once no record names it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    linked: bool,
}

impl SnapshotRecord {
    fn kind(&self) -> Kind {
        Kind::parse(&self.kind).unwrap_or(Kind::Unknown)
    }

    fn info(&self, name: &str) -> Info {
        Info {
            kind: self.kind(),
            name: name.to_string(),
            parent: self.parent.clone(),
            labels: self.labels.clone(),
            created: time(self.created),
            updated: time(self.updated),
        }
    }
}

fn record_key(ns: &str, snapshotter: &str, key: &str) -> String {
    format!("{ns}/{snapshotter}/{key}")
}

fn child_key(ns: &str, snapshotter: &str, parent: &str, child: &str) -> String {
    format!("{ns}/{snapshotter}/{parent}\0{child}")
}

/// The labels a backend sees (containerd's `FilterInheritedLabels`).
fn inherited(labels: &Labels) -> Labels {
    labels
        .iter()
        .filter(|(k, _)| k.starts_with(LABEL_SNAPSHOT_PREFIX) || k.as_str() == LABEL_SNAPSHOT_REF)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Backend info with the record laid over it (containerd's `overlayInfo`): kind and
/// backend labels from the backend, name, parent, times and client labels from the
/// record.
fn overlay(backend: Option<Info>, record: &SnapshotRecord, name: &str) -> Info {
    let local = record.info(name);
    match backend {
        None => local,
        Some(mut info) => {
            info.name = local.name;
            info.parent = local.parent;
            info.created = local.created;
            info.updated = local.updated;
            info.labels.extend(local.labels);
            info
        }
    }
}

/// A backend snapshotter with its namespaced records.
pub struct SnapshotDb {
    name: String,
    backend: Arc<dyn Snapshotter>,
    db: Arc<MetadataStore>,
    /// Held shared by operations that change the backend and then the records, and
    /// exclusively by the backend collection, so it never removes a backend snapshot
    /// whose record is about to be written (containerd's snapshotter lock).
    gc_lock: tokio::sync::RwLock<()>,
}

impl SnapshotDb {
    pub fn new(
        name: &str,
        backend: Arc<dyn Snapshotter>,
        db: Arc<MetadataStore>,
    ) -> Arc<SnapshotDb> {
        Arc::new(SnapshotDb {
            name: name.to_string(),
            backend,
            db,
            gc_lock: tokio::sync::RwLock::new(()),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn backend(&self) -> &Arc<dyn Snapshotter> {
        &self.backend
    }

    /// The snapshotter as namespace `ns` sees it; with `lease`, new snapshots are added
    /// to that lease.
    pub fn namespaced(self: &Arc<Self>, ns: &str, lease: Option<String>) -> NamespacedSnapshotter {
        NamespacedSnapshotter {
            db: self.clone(),
            ns: ns.to_string(),
            lease,
        }
    }

    fn get(&self, ns: &str, key: &str) -> Result<Option<SnapshotRecord>> {
        let rk = record_key(ns, &self.name, key);
        self.db.read(|tx| match open_read(tx, SNAPSHOTS)? {
            None => Ok(None),
            Some(table) => get_json(&table, &rk),
        })
    }

    fn must_get(&self, ns: &str, key: &str) -> Result<SnapshotRecord> {
        self.get(ns, key)?
            .ok_or_else(|| Error::not_found(format!("snapshot {key} does not exist")))
    }

    /// A number no backend key of this process or an earlier one has used: the clock
    /// in nanoseconds, forced to increase (no database write, so no fsync, per call).
    fn next_seq(&self) -> Result<u64> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static LAST: AtomicU64 = AtomicU64::new(0);
        let now = nanos(SystemTime::now());
        let mut last = LAST.load(Ordering::Relaxed);
        loop {
            let next = now.max(last + 1);
            match LAST.compare_exchange(last, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Ok(next),
                Err(seen) => last = seen,
            }
        }
    }

    /// Backend keys of every record of this snapshotter, in every namespace.
    fn backend_keys(&self) -> Result<HashSet<String>> {
        let marker = format!("/{}/", self.name);
        self.db.read(|tx| {
            let mut keys = HashSet::new();
            let Some(table) = open_read(tx, SNAPSHOTS)? else {
                return Ok(keys);
            };
            for entry in table.iter().map_err(|e| db_error("iterate", e))? {
                let (k, v) = entry.map_err(|e| db_error("iterate", e))?;
                if !k.value().contains(&marker) {
                    continue;
                }
                if let Ok(r) = serde_json::from_slice::<SnapshotRecord>(v.value()) {
                    keys.insert(r.backend_key);
                }
            }
            Ok(keys)
        })
    }

    /// Removes backend snapshots no record refers to (children before parents), then
    /// runs the backend's own cleanup.
    pub async fn collect_backend(&self) -> Result<()> {
        let _exclusive = self.gc_lock.write().await;
        let keep = self.backend_keys()?;
        let mut orphans: Vec<Info> = self
            .backend
            .walk(&[])
            .await?
            .into_iter()
            .filter(|i| !keep.contains(&i.name))
            .collect();
        // Remove leaves first: repeat while progress is made.
        while !orphans.is_empty() {
            let parents: HashSet<String> = orphans.iter().map(|i| i.parent.clone()).collect();
            let (leaves, rest): (Vec<Info>, Vec<Info>) = orphans
                .into_iter()
                .partition(|i| !parents.contains(&i.name));
            if leaves.is_empty() {
                break;
            }
            for leaf in leaves {
                if let Err(err) = self.backend.remove(&leaf.name).await
                    && !err.is(berth_core::error::ErrorKind::NotFound)
                {
                    tracing::warn!(snapshotter = %self.name, key = %leaf.name, error = %err, "removing orphaned snapshot");
                }
            }
            orphans = rest;
        }
        self.backend.cleanup().await
    }
}

/// One namespace's view of a [`SnapshotDb`]; implements the snapshotter trait with
/// client keys.
#[derive(Clone)]
pub struct NamespacedSnapshotter {
    db: Arc<SnapshotDb>,
    ns: String,
    lease: Option<String>,
}

impl NamespacedSnapshotter {
    async fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: Labels,
    ) -> Result<Vec<Mount>> {
        if key.is_empty() {
            return Err(Error::invalid_argument("snapshot key must not be empty"));
        }
        labels::validate_all(&labels).map_err(|e| e.context("info.Labels"))?;
        let s = &self.db;
        let _shared = s.gc_lock.read().await;
        // A remote snapshotter's target (containerd's `containerd.io/snapshot.ref`): if the
        // namespace has it already, the caller can use it as it is.
        let target = labels
            .get(LABEL_SNAPSHOT_REF)
            .filter(|t| !t.is_empty())
            .cloned();
        if let Some(target) = &target
            && s.get(&self.ns, target)?.is_some()
        {
            return Err(Error::already_exists(format!("target snapshot {target:?}")));
        }
        if s.get(&self.ns, key)?.is_some() {
            return Err(Error::already_exists(format!("snapshot {key:?}")));
        }
        let backend_parent = if parent.is_empty() {
            String::new()
        } else {
            let record = s.get(&self.ns, parent)?.ok_or_else(|| {
                Error::not_found(format!("parent snapshot {parent} does not exist"))
            })?;
            if record.kind() != Kind::Committed {
                return Err(Error::invalid_argument(format!(
                    "parent {parent:?} is not committed snapshot"
                )));
            }
            record.backend_key
        };
        let backend_key = format!("{}/{}/{key}", self.ns, s.next_seq()?);
        let backend_labels = inherited(&labels);
        let created = match kind {
            Kind::View => {
                s.backend
                    .view(&backend_key, &backend_parent, backend_labels)
                    .await
            }
            _ => {
                s.backend
                    .prepare(&backend_key, &backend_parent, backend_labels)
                    .await
            }
        };
        let mounts = match created {
            Ok(mounts) => mounts,
            // The backend already has the target (a remote snapshotter found the layer):
            // record it in this namespace under the target's name and tell the caller,
            // who then skips fetching and applying the layer.
            Err(err) if err.is(berth_core::error::ErrorKind::AlreadyExists) => {
                let Some(target) = target else {
                    // Backend keys are unique, so this is not the caller's conflict.
                    return Err(Error::unknown(format!(
                        "unexpected error from snapshotter: {}",
                        err.message()
                    )));
                };
                return self
                    .link_target(&target, parent, &backend_parent, labels)
                    .await;
            }
            Err(err) => return Err(err),
        };
        let now = nanos(SystemTime::now());
        let record = SnapshotRecord {
            backend_key: backend_key.clone(),
            kind: kind.as_str().to_string(),
            parent: parent.to_string(),
            labels,
            created: now,
            updated: now,
            linked: false,
        };
        let (ns, name, lease) = (self.ns.clone(), s.name.clone(), self.lease.clone());
        let written = s.db.write(|tx| {
            MetadataStore::ensure_namespace(tx, &ns)?;
            let mut table = tx
                .open_table(SNAPSHOTS)
                .map_err(|e| db_error("snapshots", e))?;
            let rk = record_key(&ns, &name, key);
            if table
                .get(rk.as_str())
                .map_err(|e| db_error("get", e))?
                .is_some()
            {
                return Err(Error::already_exists(format!("snapshot {key:?}")));
            }
            if !parent.is_empty() {
                let pk = record_key(&ns, &name, parent);
                if table
                    .get(pk.as_str())
                    .map_err(|e| db_error("get", e))?
                    .is_none()
                {
                    return Err(Error::not_found(format!(
                        "parent snapshot {parent} does not exist"
                    )));
                }
                let mut children = tx
                    .open_table(CHILDREN)
                    .map_err(|e| db_error("children", e))?;
                children
                    .insert(child_key(&ns, &name, parent, key).as_str(), ())
                    .map_err(|e| db_error("put", e))?;
            }
            table
                .insert(rk.as_str(), to_json(&record)?.as_slice())
                .map_err(|e| db_error("put", e))?;
            if let Some(lease) = &lease {
                crate::leases::add_to_lease(tx, &ns, lease, &format!("snapshots/{name}"), key)?;
            }
            Ok(())
        });
        if let Err(err) = written {
            let _ = s.backend.remove(&backend_key).await;
            return Err(err);
        }
        Ok(mounts)
    }

    /// After the backend answered a create with AlreadyExists for the target `target`
    /// (containerd's `createSnapshot`): finds the backend's committed snapshot labelled
    /// `containerd.io/snapshot.ref=<target>` on the same backend parent, records it as
    /// the committed snapshot `target` of this namespace (child of `parent`), and
    /// returns AlreadyExists — on success too, as containerd does, which is how the
    /// caller learns the layer is available without applying it.
    async fn link_target(
        &self,
        target: &str,
        parent: &str,
        backend_parent: &str,
        mut labels: Labels,
    ) -> Result<Vec<Mount>> {
        let s = &self.db;
        let filter = format!("labels.\"{LABEL_SNAPSHOT_REF}\"=={target:?}");
        let found = s
            .backend
            .walk(&[filter])
            .await
            .map_err(|e| e.context("failed walking backend snapshots"))?
            .into_iter()
            // Checked here too: a remote backend may not apply the filter.
            .find(|i| {
                i.kind == Kind::Committed
                    && i.labels.get(LABEL_SNAPSHOT_REF).map(String::as_str) == Some(target)
                    && i.parent == backend_parent
            })
            .ok_or_else(|| Error::not_found(format!("target snapshot {target:?} in backend")))?;
        for (k, v) in &found.labels {
            labels.entry(k.clone()).or_insert_with(|| v.clone());
        }
        let record = SnapshotRecord {
            backend_key: found.name.clone(),
            kind: Kind::Committed.as_str().to_string(),
            parent: parent.to_string(),
            labels,
            created: nanos(found.created),
            updated: nanos(found.updated),
            linked: true,
        };
        let (ns, name, lease) = (self.ns.clone(), s.name.clone(), self.lease.clone());
        s.db.write(|tx| {
            MetadataStore::ensure_namespace(tx, &ns)?;
            let mut table = tx
                .open_table(SNAPSHOTS)
                .map_err(|e| db_error("snapshots", e))?;
            let rk = record_key(&ns, &name, target);
            if table
                .get(rk.as_str())
                .map_err(|e| db_error("get", e))?
                .is_some()
            {
                // Linked meanwhile by another caller: the same answer.
                return Ok(());
            }
            if !parent.is_empty() {
                let pk = record_key(&ns, &name, parent);
                let parent_record: SnapshotRecord = get_json(&table, &pk)?.ok_or_else(|| {
                    Error::not_found(format!("parent snapshot {parent} does not exist"))
                })?;
                // The backend enforces which parent a target has; the records can only
                // refuse to disagree with it.
                if parent_record.backend_key != backend_parent {
                    return Err(Error::invalid_argument(format!(
                        "mismatched parent {parent} from target {target}"
                    )));
                }
                let mut children = tx
                    .open_table(CHILDREN)
                    .map_err(|e| db_error("children", e))?;
                children
                    .insert(child_key(&ns, &name, parent, target).as_str(), ())
                    .map_err(|e| db_error("put", e))?;
            }
            table
                .insert(rk.as_str(), to_json(&record)?.as_slice())
                .map_err(|e| db_error("put", e))?;
            if let Some(lease) = &lease {
                crate::leases::add_to_lease(tx, &ns, lease, &format!("snapshots/{name}"), target)?;
            }
            Ok(())
        })?;
        Err(Error::already_exists(format!(
            "target snapshot {target:?} from snapshotter"
        )))
    }
}

#[async_trait::async_trait]
impl Snapshotter for NamespacedSnapshotter {
    async fn stat(&self, key: &str) -> Result<Info> {
        let record = self.db.must_get(&self.ns, key)?;
        let backend = self.db.backend.stat(&record.backend_key).await?;
        Ok(overlay(Some(backend), &record, key))
    }

    async fn update(&self, info: Info, fieldpaths: &[String]) -> Result<Info> {
        if info.name.is_empty() {
            return Err(Error::invalid_argument("snapshot name must not be empty"));
        }
        let (ns, name) = (self.ns.clone(), self.db.name.clone());
        let key = info.name.clone();
        let record = self.db.db.write(|tx| {
            let mut table = tx
                .open_table(SNAPSHOTS)
                .map_err(|e| db_error("snapshots", e))?;
            let rk = record_key(&ns, &name, &key);
            let mut record: SnapshotRecord = get_json(&table, &rk)?
                .ok_or_else(|| Error::not_found(format!("snapshot {key} does not exist")))?;
            if fieldpaths.is_empty() {
                record.labels = info.labels.clone();
            } else {
                let others = fieldpath::apply_labels(&mut record.labels, &info.labels, fieldpaths);
                if let Some(path) = others.first() {
                    return Err(Error::invalid_argument(format!(
                        "cannot update {path:?} field on snapshot {key:?}"
                    )));
                }
            }
            labels::validate_all(&record.labels).map_err(|e| e.context("info.Labels"))?;
            record.updated = nanos(SystemTime::now());
            table
                .insert(rk.as_str(), to_json(&record)?.as_slice())
                .map_err(|e| db_error("put", e))?;
            Ok(record)
        })?;
        let backend = self.db.backend.stat(&record.backend_key).await.ok();
        Ok(overlay(backend, &record, &info.name))
    }

    async fn usage(&self, key: &str) -> Result<Usage> {
        let record = self.db.must_get(&self.ns, key)?;
        self.db.backend.usage(&record.backend_key).await
    }

    async fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let record = self.db.must_get(&self.ns, key)?;
        self.db.backend.mounts(&record.backend_key).await
    }

    async fn prepare(&self, key: &str, parent: &str, labels: Labels) -> Result<Vec<Mount>> {
        self.create(Kind::Active, key, parent, labels).await
    }

    async fn view(&self, key: &str, parent: &str, labels: Labels) -> Result<Vec<Mount>> {
        self.create(Kind::View, key, parent, labels).await
    }

    async fn commit(&self, name: &str, key: &str, labels: Labels) -> Result<()> {
        if name.is_empty() {
            return Err(Error::invalid_argument("snapshot name must not be empty"));
        }
        labels::validate_all(&labels).map_err(|e| e.context("info.Labels"))?;
        let s = &self.db;
        let _shared = s.gc_lock.read().await;
        if s.get(&self.ns, name)?.is_some() {
            return Err(Error::already_exists(format!("snapshot {name:?}")));
        }
        let record = s.must_get(&self.ns, key)?;
        if record.kind() != Kind::Active {
            return Err(Error::failed_precondition(format!(
                "snapshot {key:?} is not active"
            )));
        }
        let backend_name = format!("{}/{}/{name}", self.ns, s.next_seq()?);
        s.backend
            .commit(&backend_name, &record.backend_key, inherited(&labels))
            .await?;
        let now = nanos(SystemTime::now());
        let committed = SnapshotRecord {
            backend_key: backend_name.clone(),
            kind: Kind::Committed.as_str().to_string(),
            parent: record.parent.clone(),
            labels,
            created: now,
            updated: now,
            linked: false,
        };
        let (ns, sn, lease) = (self.ns.clone(), s.name.clone(), self.lease.clone());
        s.db.write(|tx| {
            let mut table = tx
                .open_table(SNAPSHOTS)
                .map_err(|e| db_error("snapshots", e))?;
            let nk = record_key(&ns, &sn, name);
            if table
                .get(nk.as_str())
                .map_err(|e| db_error("get", e))?
                .is_some()
            {
                return Err(Error::already_exists(format!("snapshot {name:?}")));
            }
            table
                .remove(record_key(&ns, &sn, key).as_str())
                .map_err(|e| db_error("delete", e))?;
            table
                .insert(nk.as_str(), to_json(&committed)?.as_slice())
                .map_err(|e| db_error("put", e))?;
            if !committed.parent.is_empty() {
                let mut children = tx
                    .open_table(CHILDREN)
                    .map_err(|e| db_error("children", e))?;
                children
                    .remove(child_key(&ns, &sn, &committed.parent, key).as_str())
                    .map_err(|e| db_error("delete", e))?;
                children
                    .insert(child_key(&ns, &sn, &committed.parent, name).as_str(), ())
                    .map_err(|e| db_error("put", e))?;
            }
            if let Some(lease) = &lease {
                crate::leases::add_to_lease(tx, &ns, lease, &format!("snapshots/{sn}"), name)?;
            }
            Ok(())
        })
    }

    async fn remove(&self, key: &str) -> Result<()> {
        let (ns, sn) = (self.ns.clone(), self.db.name.clone());
        let record = self.db.db.write(|tx| {
            let mut table = tx
                .open_table(SNAPSHOTS)
                .map_err(|e| db_error("snapshots", e))?;
            let rk = record_key(&ns, &sn, key);
            let record: SnapshotRecord = get_json(&table, &rk)?
                .ok_or_else(|| Error::not_found(format!("snapshot {key} does not exist")))?;
            let mut children = tx
                .open_table(CHILDREN)
                .map_err(|e| db_error("children", e))?;
            let start = format!("{rk}\0");
            let end = format!("{rk}\u{1}");
            if children
                .range(start.as_str()..end.as_str())
                .map_err(|e| db_error("range", e))?
                .next()
                .is_some()
            {
                return Err(Error::failed_precondition(
                    "cannot remove snapshot with child",
                ));
            }
            if !record.parent.is_empty() {
                children
                    .remove(child_key(&ns, &sn, &record.parent, key).as_str())
                    .map_err(|e| db_error("delete", e))?;
            }
            table
                .remove(rk.as_str())
                .map_err(|e| db_error("delete", e))?;
            Ok(record)
        })?;
        self.db.db.mark_dirty();
        if record.linked {
            // Maybe named by other records too: the collector removes it when none does.
            return Ok(());
        }
        // The backend snapshot goes now; if this fails, the collector's cleanup retries.
        if let Err(err) = self.db.backend.remove(&record.backend_key).await {
            tracing::warn!(snapshotter = %self.db.name, key = %record.backend_key, error = %err, "removing backend snapshot; left to garbage collection");
        }
        Ok(())
    }

    async fn walk(&self, filters: &[String]) -> Result<Vec<Info>> {
        let filter = Filter::parse_all(filters)?;
        let prefix = format!("{}/{}/", self.ns, self.db.name);
        let end = format!("{}/{}0", self.ns, self.db.name);
        let records: Vec<(String, SnapshotRecord)> = self.db.db.read(|tx| {
            let Some(table) = open_read(tx, SNAPSHOTS)? else {
                return Ok(Vec::new());
            };
            let mut out = Vec::new();
            for entry in table
                .range(prefix.as_str()..end.as_str())
                .map_err(|e| db_error("range", e))?
            {
                let (k, v) = entry.map_err(|e| db_error("iterate", e))?;
                let record: SnapshotRecord = serde_json::from_slice(v.value())
                    .map_err(|e| db_error("decoding snapshot", e))?;
                out.push((k.value()[prefix.len()..].to_string(), record));
            }
            Ok(out)
        })?;
        let mut infos = Vec::with_capacity(records.len());
        for (name, record) in records {
            let backend = self.db.backend.stat(&record.backend_key).await.ok();
            let info = overlay(backend, &record, &name);
            if filter.matches(&info) {
                infos.push(info);
            }
        }
        Ok(infos)
    }

    async fn cleanup(&self) -> Result<()> {
        self.db.collect_backend().await
    }
}

/// The garbage collector's view of snapshots (see [`crate::gc`]): roots are snapshots
/// labelled `containerd.io/gc.root`; a snapshot references its parent and what its
/// labels name; unmarked records are swept and their backends cleaned up afterwards.
pub struct SnapshotGc {
    snapshotters: BTreeMap<String, Arc<SnapshotDb>>,
    dirty: Mutex<HashSet<String>>,
    runtime: Option<tokio::runtime::Handle>,
}

impl SnapshotGc {
    pub fn new(snapshotters: BTreeMap<String, Arc<SnapshotDb>>) -> Arc<SnapshotGc> {
        Arc::new(SnapshotGc {
            snapshotters,
            dirty: Mutex::new(HashSet::new()),
            runtime: tokio::runtime::Handle::try_current().ok(),
        })
    }
}

fn split_record_key(key: &str) -> Option<(&str, &str, &str)> {
    let (ns, rest) = key.split_once('/')?;
    let (sn, k) = rest.split_once('/')?;
    Some((ns, sn, k))
}

impl GcResource for SnapshotGc {
    fn name(&self) -> &str {
        "snapshots"
    }

    fn scan_roots(
        &self,
        tx: &WriteTransaction,
        _now: SystemTime,
        emit: &mut dyn FnMut(Node),
    ) -> Result<()> {
        let table = tx
            .open_table(SNAPSHOTS)
            .map_err(|e| db_error("snapshots", e))?;
        for entry in table.iter().map_err(|e| db_error("iterate", e))? {
            let (k, v) = entry.map_err(|e| db_error("iterate", e))?;
            let record: SnapshotRecord =
                serde_json::from_slice(v.value()).map_err(|e| db_error("decoding snapshot", e))?;
            if record.labels.contains_key(GC_ROOT)
                && let Some((ns, sn, key)) = split_record_key(k.value())
            {
                emit(Node::snapshot(ns, sn, key));
            }
        }
        Ok(())
    }

    fn references(
        &self,
        tx: &WriteTransaction,
        node: &Node,
        emit: &mut dyn FnMut(Node),
    ) -> Result<bool> {
        if node.kind != GcKind::Snapshot {
            return Ok(false);
        }
        let Some((sn, key)) = node.key.split_once('/') else {
            return Ok(true);
        };
        let table = tx
            .open_table(SNAPSHOTS)
            .map_err(|e| db_error("snapshots", e))?;
        let Some(record): Option<SnapshotRecord> =
            get_json(&table, &record_key(&node.namespace, sn, key))?
        else {
            return Ok(true);
        };
        if !record.parent.is_empty() {
            emit(Node::snapshot(&node.namespace, sn, &record.parent).flat(node.flat));
        }
        if !node.flat {
            label_refs(&node.namespace, &record.labels, emit);
        }
        Ok(true)
    }

    fn sweep(&self, tx: &WriteTransaction, marked: &HashSet<Node>) -> Result<bool> {
        let mut table = tx
            .open_table(SNAPSHOTS)
            .map_err(|e| db_error("snapshots", e))?;
        let mut doomed = Vec::new();
        for entry in table.iter().map_err(|e| db_error("iterate", e))? {
            let (k, v) = entry.map_err(|e| db_error("iterate", e))?;
            let Some((ns, sn, key)) = split_record_key(k.value()) else {
                continue;
            };
            if !self.snapshotters.contains_key(sn) {
                continue; // a snapshotter not loaded now: keep its records
            }
            if !marked.contains(&Node::snapshot(ns, sn, key)) {
                let record: SnapshotRecord = serde_json::from_slice(v.value())
                    .map_err(|e| db_error("decoding snapshot", e))?;
                doomed.push((
                    k.value().to_string(),
                    ns.to_string(),
                    sn.to_string(),
                    key.to_string(),
                    record.parent,
                ));
            }
        }
        let mut children = tx
            .open_table(CHILDREN)
            .map_err(|e| db_error("children", e))?;
        let mut dirty = self.dirty.lock().unwrap();
        for (rk, ns, sn, key, parent) in &doomed {
            table
                .remove(rk.as_str())
                .map_err(|e| db_error("delete", e))?;
            if !parent.is_empty() {
                children
                    .remove(child_key(ns, sn, parent, key).as_str())
                    .map_err(|e| db_error("delete", e))?;
            }
            dirty.insert(sn.clone());
        }
        Ok(!doomed.is_empty())
    }

    fn cleanup(&self) -> Result<()> {
        let dirty: Vec<String> = self.dirty.lock().unwrap().drain().collect();
        let dbs: Vec<Arc<SnapshotDb>> = dirty
            .iter()
            .filter_map(|sn| self.snapshotters.get(sn).cloned())
            .collect();
        let work = async move {
            for db in dbs {
                if let Err(err) = db.collect_backend().await {
                    tracing::warn!(snapshotter = %db.name, error = %err, "snapshot cleanup failed");
                }
            }
        };
        match &self.runtime {
            // Synchronously, so a sync GC (`images rm --sync`) returns after the backend
            // snapshots are gone: the future is driven on a thread of its own, which
            // works whether the collector runs on a blocking thread or not.
            Some(handle) => {
                let handle = handle.clone();
                let joined = std::thread::spawn(move || handle.block_on(work)).join();
                if joined.is_err() {
                    tracing::warn!("snapshot cleanup panicked");
                }
            }
            None => {
                tracing::warn!("no runtime for snapshot cleanup");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_core::error::ErrorKind;

    /// A backend that records calls in memory (kinds and parents only).
    #[derive(Default)]
    struct Fake {
        snaps: Mutex<BTreeMap<String, Info>>,
    }

    #[async_trait::async_trait]
    impl Snapshotter for Fake {
        async fn stat(&self, key: &str) -> Result<Info> {
            self.snaps
                .lock()
                .unwrap()
                .get(key)
                .cloned()
                .ok_or_else(|| Error::not_found(key))
        }
        async fn update(&self, info: Info, _: &[String]) -> Result<Info> {
            Ok(info)
        }
        async fn usage(&self, _: &str) -> Result<Usage> {
            Ok(Usage::default())
        }
        async fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
            Ok(vec![Mount::bind(key, false)])
        }
        async fn prepare(&self, key: &str, parent: &str, labels: Labels) -> Result<Vec<Mount>> {
            // As a remote snapshotter: a committed snapshot carrying the requested
            // target on the same parent makes the prepare answer AlreadyExists.
            if let Some(target) = labels.get(LABEL_SNAPSHOT_REF)
                && self.snaps.lock().unwrap().values().any(|i| {
                    i.kind == Kind::Committed
                        && i.parent == parent
                        && i.labels.get(LABEL_SNAPSHOT_REF) == Some(target)
                })
            {
                return Err(Error::already_exists(format!("target {target}")));
            }
            let mut info = Info::new(key, Kind::Active);
            info.parent = parent.into();
            info.labels = labels;
            self.snaps.lock().unwrap().insert(key.into(), info);
            Ok(vec![Mount::bind(key, false)])
        }
        async fn view(&self, key: &str, parent: &str, labels: Labels) -> Result<Vec<Mount>> {
            self.prepare(key, parent, labels).await?;
            self.snaps.lock().unwrap().get_mut(key).unwrap().kind = Kind::View;
            Ok(vec![Mount::bind(key, true)])
        }
        async fn commit(&self, name: &str, key: &str, _: Labels) -> Result<()> {
            let mut s = self.snaps.lock().unwrap();
            let mut info = s.remove(key).ok_or_else(|| Error::not_found(key))?;
            info.name = name.into();
            info.kind = Kind::Committed;
            s.insert(name.into(), info);
            Ok(())
        }
        async fn remove(&self, key: &str) -> Result<()> {
            self.snaps
                .lock()
                .unwrap()
                .remove(key)
                .map(|_| ())
                .ok_or_else(|| Error::not_found(key))
        }
        async fn walk(&self, _: &[String]) -> Result<Vec<Info>> {
            Ok(self.snaps.lock().unwrap().values().cloned().collect())
        }
    }

    fn setup() -> (tempfile::TempDir, Arc<Fake>, Arc<SnapshotDb>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(MetadataStore::open(&dir.path().join("m.db")).unwrap());
        let fake = Arc::new(Fake::default());
        let db = SnapshotDb::new("fake", fake.clone(), store);
        (dir, fake, db)
    }

    #[tokio::test]
    async fn namespaces_are_isolated_and_keys_rewritten() {
        let (_d, fake, db) = setup();
        let a = db.namespaced("a", None);
        let b = db.namespaced("b", None);
        a.prepare("k", "", Labels::new()).await.unwrap();
        b.prepare("k", "", Labels::new()).await.unwrap();
        let keys: Vec<String> = fake.snaps.lock().unwrap().keys().cloned().collect();
        assert_eq!(keys.len(), 2);
        assert!(
            keys.iter()
                .all(|k| k.ends_with("/k") && (k.starts_with("a/") || k.starts_with("b/"))),
            "{keys:?}"
        );
        a.commit(
            "K",
            "k",
            [
                ("containerd.io/snapshot/x".to_string(), "1".to_string()),
                ("other".into(), "2".into()),
            ]
            .into(),
        )
        .await
        .unwrap();
        let info = a.stat("K").await.unwrap();
        assert_eq!(info.kind, Kind::Committed);
        assert_eq!(info.name, "K");
        assert_eq!(info.labels.get("other").map(String::as_str), Some("2"));
        assert_eq!(b.stat("K").await.unwrap_err().kind(), ErrorKind::NotFound);
        assert_eq!(b.walk(&[]).await.unwrap().len(), 1);
        // The backend only saw the inherited label.
        let backend = fake
            .snaps
            .lock()
            .unwrap()
            .values()
            .find(|i| i.kind == Kind::Committed)
            .unwrap()
            .clone();
        assert!(!backend.labels.contains_key("other"));
    }

    #[tokio::test]
    async fn children_block_remove_and_errors_match_containerd() {
        let (_d, fake, db) = setup();
        let s = db.namespaced("default", None);
        s.prepare("base-a", "", Labels::new()).await.unwrap();
        s.commit("base", "base-a", Labels::new()).await.unwrap();
        s.view("v", "base", Labels::new()).await.unwrap();
        let err = s.remove("base").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
        let err = s.prepare("v", "base", Labels::new()).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AlreadyExists);
        let err = s.prepare("x", "nope", Labels::new()).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
        let err = s.commit("y", "v", Labels::new()).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
        let mut info = Info::new("base", Kind::Committed);
        info.labels.insert("l".into(), "v".into());
        let got = s.update(info, &["labels.l".into()]).await.unwrap();
        assert_eq!(got.labels.get("l").map(String::as_str), Some("v"));
        assert_eq!(s.walk(&["labels.l==v".into()]).await.unwrap().len(), 1);
        s.remove("v").await.unwrap();
        s.remove("base").await.unwrap();
        assert!(s.walk(&[]).await.unwrap().is_empty());
        assert!(fake.snaps.lock().unwrap().is_empty());
        // The namespace cannot be deleted while it holds snapshots.
        s.prepare("z", "", Labels::new()).await.unwrap();
        let err = db.db.delete_namespace("default").unwrap_err();
        assert!(err.to_string().contains("snapshots"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn garbage_collection_sweeps_unreferenced_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(MetadataStore::open(&dir.path().join("m.db")).unwrap());
        let fake = Arc::new(Fake::default());
        let db = SnapshotDb::new("fake", fake.clone(), store.clone());
        store.register_gc_resource(SnapshotGc::new(
            [("fake".to_string(), db.clone())].into_iter().collect(),
        ));
        let s = db.namespaced("default", None);
        let root: Labels = [(GC_ROOT.to_string(), "x".to_string())].into();
        s.prepare("base-a", "", Labels::new()).await.unwrap();
        s.commit("base", "base-a", Labels::new()).await.unwrap();
        s.prepare("kept", "base", root).await.unwrap();
        s.prepare("garbage", "", Labels::new()).await.unwrap();
        let collector = crate::gc::Collector::new(store.clone());
        tokio::task::spawn_blocking(move || collector.collect())
            .await
            .unwrap()
            .unwrap();
        let mut names: Vec<String> = s
            .walk(&[])
            .await
            .unwrap()
            .into_iter()
            .map(|i| i.name)
            .collect();
        names.sort();
        // The root keeps its parent; the unreferenced snapshot is gone, backend too.
        assert_eq!(names, ["base", "kept"]);
        assert_eq!(fake.snaps.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn remote_targets_are_linked_not_created() {
        let (_d, fake, db) = setup();
        // The backend already has the layer (as a remote snapshotter would).
        let target = "sha256:1111";
        let remote: Labels = [(LABEL_SNAPSHOT_REF.to_string(), target.to_string())].into();
        fake.prepare("remote-a", "", Labels::new()).await.unwrap();
        fake.commit("remote", "remote-a", Labels::new())
            .await
            .unwrap();
        fake.snaps.lock().unwrap().get_mut("remote").unwrap().labels = remote.clone();
        let mut labels = remote.clone();
        labels.insert(
            "containerd.io/snapshot/cri.layer-digest".into(),
            "sha256:2222".into(),
        );
        labels.insert("containerd.io/gc.root".into(), "x".into());
        let a = db.namespaced("a", None);
        let b = db.namespaced("b", None);
        for s in [&a, &b] {
            let err = s
                .prepare("extract-1", "", labels.clone())
                .await
                .unwrap_err();
            assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{err}");
            assert!(err.to_string().contains("target snapshot"), "{err}");
            let info = s.stat(target).await.unwrap();
            assert_eq!(info.kind, Kind::Committed);
            assert_eq!(info.labels.get(GC_ROOT).map(String::as_str), Some("x"));
            // The extraction key was never created.
            assert_eq!(
                s.stat("extract-1").await.unwrap_err().kind(),
                ErrorKind::NotFound
            );
            // A second prepare of the same target is answered from the records.
            let err = s
                .prepare("extract-2", "", labels.clone())
                .await
                .unwrap_err();
            assert_eq!(err.kind(), ErrorKind::AlreadyExists);
        }
        assert_eq!(
            fake.snaps.lock().unwrap().len(),
            1,
            "nothing created in the backend"
        );
        // The linked snapshot works as a parent.
        a.view("rootfs", target, Labels::new()).await.unwrap();
        let backend_parent = fake
            .snaps
            .lock()
            .unwrap()
            .values()
            .find(|i| i.kind == Kind::View)
            .map(|i| i.parent.clone());
        assert_eq!(backend_parent.as_deref(), Some("remote"));
        // The backend has the target on no parent only: on another parent the prepare
        // is an ordinary one (the caller applies the layer).
        let c = db.namespaced("c", None);
        c.prepare("p-a", "", Labels::new()).await.unwrap();
        c.commit("p", "p-a", Labels::new()).await.unwrap();
        c.prepare("extract-3", "p", labels.clone()).await.unwrap();
        assert_eq!(c.stat("extract-3").await.unwrap().kind, Kind::Active);
        c.remove("extract-3").await.unwrap();
        c.remove("p").await.unwrap();
        // Removing one namespace's record keeps the backend snapshot for the other; the
        // collector removes it once no record names it.
        a.remove("rootfs").await.unwrap();
        a.remove(target).await.unwrap();
        a.cleanup().await.unwrap();
        assert!(fake.snaps.lock().unwrap().contains_key("remote"));
        b.remove(target).await.unwrap();
        a.cleanup().await.unwrap();
        assert!(!fake.snaps.lock().unwrap().contains_key("remote"));
    }

    #[tokio::test]
    async fn orphans_are_collected() {
        let (_d, fake, db) = setup();
        fake.prepare("orphan", "", Labels::new()).await.unwrap();
        let s = db.namespaced("default", None);
        s.prepare("kept", "", Labels::new()).await.unwrap();
        s.cleanup().await.unwrap();
        let keys: Vec<String> = fake.snaps.lock().unwrap().keys().cloned().collect();
        assert_eq!(keys.len(), 1);
        assert!(keys[0].ends_with("/kept"));
    }
}

/// Every loaded snapshotter with its namespaced records: the instance of
/// `io.containerd.service.v1.snapshots-service`, shared by the snapshots and diff
/// services, the unpacker and CRI.
#[derive(Clone, Default)]
pub struct Snapshotters {
    map: BTreeMap<String, Arc<SnapshotDb>>,
}

impl Snapshotters {
    pub fn new(map: BTreeMap<String, Arc<SnapshotDb>>) -> Snapshotters {
        Snapshotters { map }
    }

    /// The snapshotter `name` (containerd's errors for a missing or unknown name).
    pub fn get(&self, name: &str) -> Result<Arc<SnapshotDb>> {
        if name.is_empty() {
            return Err(Error::invalid_argument("snapshotter argument missing"));
        }
        self.map
            .get(name)
            .cloned()
            .ok_or_else(|| Error::invalid_argument(format!("snapshotter not loaded: {name}")))
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.map.keys()
    }

    pub fn all(&self) -> &BTreeMap<String, Arc<SnapshotDb>> {
        &self.map
    }
}
