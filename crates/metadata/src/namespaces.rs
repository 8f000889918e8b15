//! Namespaces: the top-level partition of every other record.
//!
//! As in containerd, a namespace exists implicitly for reads (its labels are empty), is
//! created explicitly by Create or implicitly by the first object stored in it, and can
//! only be deleted once no table holds records in it.

use crate::MetadataStore;
use crate::db::{db_error, get_json, namespace_has_records, to_json};
use berth_core::labels::{self, Labels};
use berth_core::{Error, Result, identifiers};
use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

const NAMESPACES: TableDefinition<&str, &[u8]> = TableDefinition::new("namespaces");

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct NamespaceRecord {
    labels: Labels,
}

/// A table whose records block a namespace's deletion, with the word containerd uses for
/// it in the error ("images", "blobs", "containers", …).
pub struct NamespacedTableInfo {
    pub table: crate::NamespacedTable,
    pub what: &'static str,
}

impl MetadataStore {
    pub fn create_namespace(&self, namespace: &str, labels: &Labels) -> Result<()> {
        identifiers::validate(namespace)?;
        labels::validate_all(labels).map_err(|e| e.context("namespace.Labels"))?;
        self.write(|tx| {
            let mut table = tx
                .open_table(NAMESPACES)
                .map_err(|e| db_error("namespaces", e))?;
            if table
                .get(namespace)
                .map_err(|e| db_error("get", e))?
                .is_some()
            {
                return Err(Error::already_exists(format!("namespace {namespace:?}")));
            }
            let record = NamespaceRecord {
                labels: labels.clone(),
            };
            table
                .insert(namespace, to_json(&record)?.as_slice())
                .map_err(|e| db_error("put", e))?;
            Ok(())
        })
    }

    /// The labels of `namespace`; empty (not an error) if it does not exist yet.
    pub fn namespace_labels(&self, namespace: &str) -> Result<Labels> {
        self.read(|tx| {
            let table = match tx.open_table(NAMESPACES) {
                Ok(table) => table,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Labels::new()),
                Err(e) => return Err(db_error("namespaces", e)),
            };
            Ok(get_json::<NamespaceRecord>(&table, namespace)?
                .unwrap_or_default()
                .labels)
        })
    }

    /// Sets (or with an empty value removes) one label, creating the namespace if needed.
    pub fn set_namespace_label(&self, namespace: &str, key: &str, value: &str) -> Result<()> {
        identifiers::validate(namespace)?;
        labels::validate(key, value).map_err(|e| e.context("namespace.Labels"))?;
        self.write(|tx| {
            let mut table = tx
                .open_table(NAMESPACES)
                .map_err(|e| db_error("namespaces", e))?;
            let mut record: NamespaceRecord = get_json(&table, namespace)?.unwrap_or_default();
            if value.is_empty() {
                record.labels.remove(key);
            } else {
                record.labels.insert(key.to_string(), value.to_string());
            }
            table
                .insert(namespace, to_json(&record)?.as_slice())
                .map_err(|e| db_error("put", e))?;
            Ok(())
        })
    }

    /// Replaces all labels of `namespace` (creating it if needed) in one transaction.
    pub fn replace_namespace_labels(&self, namespace: &str, labels: &Labels) -> Result<()> {
        identifiers::validate(namespace)?;
        labels::validate_all(labels).map_err(|e| e.context("namespace.Labels"))?;
        self.write(|tx| {
            let mut table = tx
                .open_table(NAMESPACES)
                .map_err(|e| db_error("namespaces", e))?;
            let record = NamespaceRecord {
                labels: labels.clone(),
            };
            table
                .insert(namespace, to_json(&record)?.as_slice())
                .map_err(|e| db_error("put", e))?;
            Ok(())
        })
    }

    pub fn list_namespaces(&self) -> Result<Vec<String>> {
        self.read(|tx| {
            let table = match tx.open_table(NAMESPACES) {
                Ok(table) => table,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(db_error("namespaces", e)),
            };
            let mut names = Vec::new();
            for entry in table.iter().map_err(|e| db_error("iterate", e))? {
                let (key, _) = entry.map_err(|e| db_error("iterate", e))?;
                names.push(key.value().to_string());
            }
            Ok(names)
        })
    }

    /// Deletes an empty namespace: no table of [`crate::NAMESPACED_TABLES`] may hold a
    /// record of it.
    pub fn delete_namespace(&self, namespace: &str) -> Result<()> {
        self.delete_namespace_checking(namespace, crate::NAMESPACED_TABLES)
    }

    fn delete_namespace_checking(
        &self,
        namespace: &str,
        tables: &[NamespacedTableInfo],
    ) -> Result<()> {
        self.write(|tx| {
            let mut blocking = Vec::new();
            for info in tables {
                match tx.open_table(info.table) {
                    Ok(table) => {
                        if namespace_has_records(&table, namespace)? {
                            blocking.push(info.what);
                        }
                    }
                    Err(e) => return Err(db_error(info.what, e)),
                }
            }
            if !blocking.is_empty() {
                return Err(Error::failed_precondition(format!(
                    "namespace {namespace:?} must be empty, but it still has {}",
                    blocking.join(", ")
                )));
            }
            let mut table = tx
                .open_table(NAMESPACES)
                .map_err(|e| db_error("namespaces", e))?;
            if table
                .remove(namespace)
                .map_err(|e| db_error("delete", e))?
                .is_none()
            {
                return Err(Error::not_found(format!("namespace {namespace:?}")));
            }
            Ok(())
        })
    }

    /// Creates `namespace` inside `tx` if it is not recorded yet: storing the first object
    /// of a namespace creates it, as in containerd.
    pub fn ensure_namespace(tx: &redb::WriteTransaction, namespace: &str) -> Result<()> {
        identifiers::validate(namespace)?;
        let mut table = tx
            .open_table(NAMESPACES)
            .map_err(|e| db_error("namespaces", e))?;
        if table
            .get(namespace)
            .map_err(|e| db_error("get", e))?
            .is_none()
        {
            let record = to_json(&NamespaceRecord::default())?;
            table
                .insert(namespace, record.as_slice())
                .map_err(|e| db_error("put", e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_core::error::ErrorKind;

    const THINGS: crate::NamespacedTable = TableDefinition::new("things");

    fn store() -> (tempfile::TempDir, MetadataStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = MetadataStore::open(&dir.path().join("meta.db")).unwrap();
        (dir, store)
    }

    #[test]
    fn create_label_list_delete() {
        let (_dir, store) = store();
        assert!(store.namespace_labels("default").unwrap().is_empty());
        store
            .create_namespace("a", &[("x".into(), "1".into())].into())
            .unwrap();
        let err = store.create_namespace("a", &Labels::new()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AlreadyExists);
        assert_eq!(err.to_string(), "namespace \"a\": already exists");
        store.set_namespace_label("a", "y", "2").unwrap();
        store.set_namespace_label("a", "x", "").unwrap();
        assert_eq!(
            store.namespace_labels("a").unwrap(),
            [("y".into(), "2".into())].into()
        );
        assert_eq!(store.list_namespaces().unwrap(), ["a"]);
        store.delete_namespace("a").unwrap();
        let err = store.delete_namespace("a").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
        assert!(store.create_namespace("bad name", &Labels::new()).is_err());
    }

    #[test]
    fn non_empty_namespace_cannot_be_deleted() {
        let (_dir, store) = store();
        store
            .write(|tx| {
                MetadataStore::ensure_namespace(tx, "busy")?;
                let mut t = tx.open_table(THINGS).unwrap();
                t.insert(
                    crate::namespaced_key("busy", "x").as_str(),
                    b"{}".as_slice(),
                )
                .unwrap();
                Ok(())
            })
            .unwrap();
        let tables = [NamespacedTableInfo {
            table: THINGS,
            what: "things",
        }];
        let err = store
            .delete_namespace_checking("busy", &tables)
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
        assert!(err.to_string().contains("still has things"), "{err}");
        // A namespace whose name is a prefix of the busy one is not blocked by it.
        store.create_namespace("bus", &Labels::new()).unwrap();
        store.delete_namespace_checking("bus", &tables).unwrap();
    }

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.db");
        MetadataStore::open(&path)
            .unwrap()
            .create_namespace("kept", &Labels::new())
            .unwrap();
        assert_eq!(
            MetadataStore::open(&path)
                .unwrap()
                .list_namespaces()
                .unwrap(),
            ["kept"]
        );
    }
}
