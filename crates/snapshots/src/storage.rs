//! The metastore every local snapshotter keeps under its root (containerd's
//! `snapshots/storage`): keys, numeric IDs, parents, kinds, labels, timestamps and the
//! usage recorded at commit, in one transactional redb file.
//!
//! Tables:
//! - `snapshots`: key → JSON [`Record`];
//! - `children`: `"{parent key}\0{child key}"` → `()`, so "has children" is one range
//!   lookup and Remove can refuse a parent;
//! - `meta`: `next_id` → u64, the ID sequence (IDs are never reused, so a directory
//!   named after an ID always belongs to at most one snapshot).
//!
//! Every operation runs in one write transaction; snapshotters pass a closure that does
//! their file-system work *inside* it, so a failure of either leaves no trace in the
//! other (the closure's directories are removed by the snapshotter on error).

use berth_core::fieldpath;
use berth_core::filters::Filter;
use berth_core::labels::{self, Labels};
use berth_core::snapshot::{Info, Kind, Usage};
use berth_core::{Error, Result};
use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
const CHILDREN: TableDefinition<&str, ()> = TableDefinition::new("children");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    id: u64,
    kind: String,
    #[serde(default)]
    parent: String,
    #[serde(default)]
    labels: Labels,
    created: (u64, u32),
    updated: (u64, u32),
    #[serde(default)]
    size: i64,
    #[serde(default)]
    inodes: i64,
}

fn encode_time(t: SystemTime) -> (u64, u32) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    (d.as_secs(), d.subsec_nanos())
}

fn decode_time((secs, nanos): (u64, u32)) -> SystemTime {
    UNIX_EPOCH + Duration::new(secs, nanos.min(999_999_999))
}

impl Record {
    fn kind(&self) -> Kind {
        Kind::parse(&self.kind).unwrap_or(Kind::Unknown)
    }

    fn info(&self, name: &str) -> Info {
        Info {
            kind: self.kind(),
            name: name.to_string(),
            parent: self.parent.clone(),
            labels: self.labels.clone(),
            created: decode_time(self.created),
            updated: decode_time(self.updated),
        }
    }
}

/// What a snapshotter needs to build mounts: its ID, kind and the IDs of its parents,
/// nearest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub id: String,
    pub kind: Kind,
    pub parent_ids: Vec<String>,
}

fn db_err(what: &str, err: impl std::fmt::Display) -> Error {
    Error::unknown(format!("snapshot metastore: {what}: {err}"))
}

fn child_key(parent: &str, child: &str) -> String {
    format!("{parent}\0{child}")
}

/// The metastore of one snapshotter.
pub struct MetaStore {
    db: redb::Database,
}

type Snapshots<'a> = redb::Table<'a, &'static str, &'static [u8]>;

fn get(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<Record>> {
    match table.get(key).map_err(|e| db_err("get", e))? {
        None => Ok(None),
        Some(v) => serde_json::from_slice(v.value())
            .map(Some)
            .map_err(|e| db_err(&format!("decoding {key:?}"), e)),
    }
}

fn put(table: &mut Snapshots<'_>, key: &str, record: &Record) -> Result<()> {
    let value = serde_json::to_vec(record).map_err(|e| db_err("encoding", e))?;
    table
        .insert(key, value.as_slice())
        .map_err(|e| db_err("put", e))?;
    Ok(())
}

fn parent_ids(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    mut parent: String,
) -> Result<Vec<String>> {
    let mut ids = Vec::new();
    while !parent.is_empty() {
        let record = get(table, &parent)?
            .ok_or_else(|| Error::not_found(format!("missing parent {parent:?}")))?;
        ids.push(record.id.to_string());
        parent = record.parent;
    }
    Ok(ids)
}

impl MetaStore {
    pub fn open(path: &Path) -> Result<MetaStore> {
        // A small page cache: the records are few and small, and every snapshotter has
        // its own file (redb's default cache would cost ~1 MiB of RSS each).
        let db = redb::Builder::new()
            .set_cache_size(256 * 1024)
            .create(path)
            .map_err(|e| db_err(&format!("opening {}", path.display()), e))?;
        // Create the tables only when missing: a write commit is an fsync.
        let exists = db
            .begin_read()
            .map_err(|e| db_err("begin read", e))?
            .open_table(META)
            .is_ok();
        if !exists {
            let tx = db.begin_write().map_err(|e| db_err("begin", e))?;
            {
                tx.open_table(SNAPSHOTS).map_err(|e| db_err("table", e))?;
                tx.open_table(CHILDREN).map_err(|e| db_err("table", e))?;
                tx.open_table(META).map_err(|e| db_err("table", e))?;
            }
            tx.commit().map_err(|e| db_err("commit", e))?;
        }
        Ok(MetaStore { db })
    }

    fn read<T>(
        &self,
        f: impl FnOnce(&redb::ReadOnlyTable<&'static str, &'static [u8]>) -> Result<T>,
    ) -> Result<T> {
        let tx = self.db.begin_read().map_err(|e| db_err("begin read", e))?;
        let table = tx.open_table(SNAPSHOTS).map_err(|e| db_err("table", e))?;
        f(&table)
    }

    fn write<T>(&self, f: impl FnOnce(&redb::WriteTransaction) -> Result<T>) -> Result<T> {
        let tx = self
            .db
            .begin_write()
            .map_err(|e| db_err("begin write", e))?;
        let value = f(&tx)?;
        tx.commit().map_err(|e| db_err("commit", e))?;
        Ok(value)
    }

    /// The snapshot `key` with its parent chain.
    pub fn get_snapshot(&self, key: &str) -> Result<Snapshot> {
        self.read(|table| {
            let record =
                get(table, key)?.ok_or_else(|| Error::not_found(format!("snapshot {key}")))?;
            let kind = record.kind();
            if !matches!(kind, Kind::Active | Kind::View) {
                return Err(Error::failed_precondition(format!(
                    "requested snapshot {key} not active or view"
                )));
            }
            Ok(Snapshot {
                id: record.id.to_string(),
                kind,
                parent_ids: parent_ids(table, record.parent)?,
            })
        })
    }

    /// ID, info and recorded usage of `key`.
    pub fn get_info(&self, key: &str) -> Result<(String, Info, Usage)> {
        self.read(|table| {
            let record =
                get(table, key)?.ok_or_else(|| Error::not_found(format!("snapshot {key}")))?;
            let usage = Usage {
                size: record.size,
                inodes: record.inodes,
            };
            Ok((record.id.to_string(), record.info(key), usage))
        })
    }

    /// Applies an update with containerd's field paths (only labels are mutable).
    pub fn update_info(&self, info: &Info, fieldpaths: &[String]) -> Result<Info> {
        self.write(|tx| {
            let mut table = tx.open_table(SNAPSHOTS).map_err(|e| db_err("table", e))?;
            let mut record = get(&table, &info.name)?
                .ok_or_else(|| Error::not_found(format!("snapshot {}", info.name)))?;
            if fieldpaths.is_empty() {
                record.labels = info.labels.clone();
            } else {
                let others = fieldpath::apply_labels(&mut record.labels, &info.labels, fieldpaths);
                if let Some(path) = others.first() {
                    return Err(Error::invalid_argument(format!(
                        "cannot update {path:?} field on snapshot {:?}",
                        info.name
                    )));
                }
            }
            labels::validate_all(&record.labels)?;
            record.updated = encode_time(SystemTime::now());
            put(&mut table, &info.name, &record)?;
            Ok(record.info(&info.name))
        })
    }

    /// Creates an active or view snapshot; `fs` runs inside the transaction with the new
    /// snapshot and decides whether it is kept.
    pub fn create<T>(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: Labels,
        fs: impl FnOnce(&Snapshot) -> Result<T>,
    ) -> Result<(Snapshot, T)> {
        if !matches!(kind, Kind::Active | Kind::View) {
            return Err(Error::invalid_argument(format!(
                "snapshot type {kind} invalid; only snapshots of type Active or View can be created"
            )));
        }
        if key.is_empty() {
            return Err(Error::invalid_argument("snapshot key must not be empty"));
        }
        labels::validate_all(&labels)?;
        self.write(|tx| {
            let mut table = tx.open_table(SNAPSHOTS).map_err(|e| db_err("table", e))?;
            let mut parent_chain = Vec::new();
            if !parent.is_empty() {
                let p = get(&table, parent)?
                    .ok_or_else(|| Error::not_found(format!("missing parent {parent:?} bucket")))?;
                if p.kind() != Kind::Committed {
                    return Err(Error::invalid_argument(format!(
                        "parent {parent:?} is not committed snapshot"
                    )));
                }
                parent_chain.push(p.id.to_string());
                parent_chain.extend(parent_ids(&table, p.parent)?);
            }
            if get(&table, key)?.is_some() {
                return Err(Error::already_exists(format!("snapshot {key}")));
            }
            let id = {
                let mut meta = tx.open_table(META).map_err(|e| db_err("table", e))?;
                let next = meta
                    .get("next_id")
                    .map_err(|e| db_err("get", e))?
                    .map(|v| v.value())
                    .unwrap_or(0)
                    + 1;
                meta.insert("next_id", next).map_err(|e| db_err("put", e))?;
                next
            };
            let now = encode_time(SystemTime::now());
            let record = Record {
                id,
                kind: kind.as_str().to_string(),
                parent: parent.to_string(),
                labels,
                created: now,
                updated: now,
                size: 0,
                inodes: 0,
            };
            put(&mut table, key, &record)?;
            if !parent.is_empty() {
                let mut children = tx.open_table(CHILDREN).map_err(|e| db_err("table", e))?;
                children
                    .insert(child_key(parent, key).as_str(), ())
                    .map_err(|e| db_err("put", e))?;
            }
            let snapshot = Snapshot {
                id: id.to_string(),
                kind,
                parent_ids: parent_chain,
            };
            let value = fs(&snapshot)?;
            Ok((snapshot, value))
        })
    }

    /// Commits active `key` as `name` with `usage`; `labels` replace the active's labels
    /// (containerd does not inherit them). Returns the ID.
    pub fn commit_active(
        &self,
        key: &str,
        name: &str,
        usage: Usage,
        labels: Labels,
    ) -> Result<String> {
        if name.is_empty() {
            return Err(Error::invalid_argument("snapshot name must not be empty"));
        }
        labels::validate_all(&labels)?;
        self.write(|tx| {
            let mut table = tx.open_table(SNAPSHOTS).map_err(|e| db_err("table", e))?;
            if get(&table, name)?.is_some() {
                return Err(Error::already_exists(format!("committed snapshot {name}")));
            }
            let mut record = get(&table, key)?.ok_or_else(|| {
                Error::not_found(format!("failed to get active snapshot {key:?}"))
            })?;
            if record.kind() != Kind::Active {
                return Err(Error::failed_precondition(format!(
                    "snapshot {key:?} is not active"
                )));
            }
            record.kind = Kind::Committed.as_str().to_string();
            let now = encode_time(SystemTime::now());
            record.created = now;
            record.updated = now;
            record.labels = labels;
            record.size = usage.size;
            record.inodes = usage.inodes;
            table.remove(key).map_err(|e| db_err("delete", e))?;
            put(&mut table, name, &record)?;
            if !record.parent.is_empty() {
                let mut children = tx.open_table(CHILDREN).map_err(|e| db_err("table", e))?;
                children
                    .remove(child_key(&record.parent, key).as_str())
                    .map_err(|e| db_err("delete", e))?;
                children
                    .insert(child_key(&record.parent, name).as_str(), ())
                    .map_err(|e| db_err("put", e))?;
            }
            Ok(record.id.to_string())
        })
    }

    /// Removes `key` (refused while it has children); `fs` runs inside the transaction
    /// with the removed snapshot's ID and kind.
    pub fn remove<T>(&self, key: &str, fs: impl FnOnce(&str, Kind) -> Result<T>) -> Result<T> {
        self.write(|tx| {
            let mut table = tx.open_table(SNAPSHOTS).map_err(|e| db_err("table", e))?;
            let record =
                get(&table, key)?.ok_or_else(|| Error::not_found(format!("snapshot {key}")))?;
            let mut children = tx.open_table(CHILDREN).map_err(|e| db_err("table", e))?;
            let start = format!("{key}\0");
            let end = format!("{key}\u{1}");
            if children
                .range(start.as_str()..end.as_str())
                .map_err(|e| db_err("range", e))?
                .next()
                .is_some()
            {
                return Err(Error::failed_precondition(
                    "cannot remove snapshot with child",
                ));
            }
            if !record.parent.is_empty() {
                children
                    .remove(child_key(&record.parent, key).as_str())
                    .map_err(|e| db_err("delete", e))?;
            }
            table.remove(key).map_err(|e| db_err("delete", e))?;
            fs(&record.id.to_string(), record.kind())
        })
    }

    /// Every snapshot whose info matches `filter`, by key.
    pub fn walk(&self, filter: &Filter) -> Result<Vec<(String, Info)>> {
        self.read(|table| {
            let mut out = Vec::new();
            for entry in table.iter().map_err(|e| db_err("iterate", e))? {
                let (key, value) = entry.map_err(|e| db_err("iterate", e))?;
                let record: Record =
                    serde_json::from_slice(value.value()).map_err(|e| db_err("decoding", e))?;
                let info = record.info(key.value());
                if filter.matches(&info) {
                    out.push((record.id.to_string(), info));
                }
            }
            Ok(out)
        })
    }

    /// Runs `f` with the IDs of every snapshot while holding the write lock, so no
    /// snapshot is created meanwhile (cleanups decide what to delete in `f`).
    pub fn with_ids_locked<T>(&self, f: impl FnOnce(&HashSet<String>) -> Result<T>) -> Result<T> {
        let tx = self
            .db
            .begin_write()
            .map_err(|e| db_err("begin write", e))?;
        let ids = {
            let table = tx.open_table(SNAPSHOTS).map_err(|e| db_err("table", e))?;
            let mut ids = HashSet::new();
            for entry in table.iter().map_err(|e| db_err("iterate", e))? {
                let (_, value) = entry.map_err(|e| db_err("iterate", e))?;
                let record: Record =
                    serde_json::from_slice(value.value()).map_err(|e| db_err("decoding", e))?;
                ids.insert(record.id.to_string());
            }
            ids
        };
        let value = f(&ids);
        tx.abort().map_err(|e| db_err("abort", e))?;
        value
    }

    /// The IDs of every snapshot (what a cleanup must keep).
    pub fn ids(&self) -> Result<HashSet<String>> {
        self.read(|table| {
            let mut ids = HashSet::new();
            for entry in table.iter().map_err(|e| db_err("iterate", e))? {
                let (_, value) = entry.map_err(|e| db_err("iterate", e))?;
                let record: Record =
                    serde_json::from_slice(value.value()).map_err(|e| db_err("decoding", e))?;
                ids.insert(record.id.to_string());
            }
            Ok(ids)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_core::error::ErrorKind;

    fn store() -> (tempfile::TempDir, MetaStore) {
        let dir = tempfile::tempdir().unwrap();
        let ms = MetaStore::open(&dir.path().join("metadata.db")).unwrap();
        (dir, ms)
    }

    fn ok(_: &Snapshot) -> Result<()> {
        Ok(())
    }

    #[test]
    fn chain_commit_remove() {
        let (_d, ms) = store();
        let (a, _) = ms.create(Kind::Active, "a", "", Labels::new(), ok).unwrap();
        assert!(a.parent_ids.is_empty());
        ms.commit_active("a", "A", Usage { size: 3, inodes: 1 }, Labels::new())
            .unwrap();
        assert_eq!(ms.get_info("a").unwrap_err().kind(), ErrorKind::NotFound);
        let (b, _) = ms
            .create(Kind::Active, "b", "A", Labels::new(), ok)
            .unwrap();
        assert_eq!(b.parent_ids, vec![a.id.clone()]);
        ms.commit_active("b", "B", Usage::default(), Labels::new())
            .unwrap();
        let (c, _) = ms.create(Kind::View, "c", "B", Labels::new(), ok).unwrap();
        assert_eq!(c.parent_ids, vec![b.id.clone(), a.id.clone()]);
        assert_eq!(ms.get_snapshot("c").unwrap(), c);
        let err = ms.remove("B", |_, _| Ok(())).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
        assert_eq!(
            err.to_string(),
            "cannot remove snapshot with child: failed precondition"
        );
        ms.remove("c", |_, _| Ok(())).unwrap();
        ms.remove("B", |_, _| Ok(())).unwrap();
        ms.remove("A", |_, _| Ok(())).unwrap();
        assert!(ms.ids().unwrap().is_empty());
    }

    #[test]
    fn errors_and_rollback() {
        let (_d, ms) = store();
        ms.create(Kind::Active, "a", "", Labels::new(), ok).unwrap();
        let err = ms
            .create(Kind::Active, "a", "", Labels::new(), ok)
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AlreadyExists);
        let err = ms
            .create(Kind::Active, "x", "a", Labels::new(), ok)
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        let err = ms
            .create(Kind::Active, "x", "nope", Labels::new(), ok)
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
        // A failing fs step leaves nothing behind.
        let err = ms
            .create(Kind::Active, "y", "", Labels::new(), |_| -> Result<()> {
                Err(Error::unknown("disk"))
            })
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unknown);
        assert_eq!(ms.get_info("y").unwrap_err().kind(), ErrorKind::NotFound);
        ms.create(Kind::View, "v", "", Labels::new(), ok).unwrap();
        let err = ms
            .commit_active("v", "V", Usage::default(), Labels::new())
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    }

    #[test]
    fn update_labels_and_walk() {
        let (_d, ms) = store();
        let labels: Labels = [("a".into(), "1".into()), ("b".into(), "2".into())].into();
        ms.create(Kind::Active, "k", "", labels, ok).unwrap();
        let mut info = Info::new("k", Kind::Active);
        info.labels.insert("a".into(), "9".into());
        let got = ms.update_info(&info, &["labels.a".into()]).unwrap();
        assert_eq!(got.labels.get("a").unwrap(), "9");
        assert_eq!(got.labels.get("b").unwrap(), "2");
        let err = ms.update_info(&info, &["parent".into()]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        let got = ms.update_info(&info, &[]).unwrap();
        assert_eq!(got.labels.len(), 1);
        let f = Filter::parse("labels.a==9").unwrap();
        assert_eq!(ms.walk(&f).unwrap().len(), 1);
        let f = Filter::parse("kind==committed").unwrap();
        assert!(ms.walk(&f).unwrap().is_empty());
    }
}
