use berth_core::{Error, Result};
use redb::{ReadableTable, TableDefinition};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// redb's page cache for the metadata file (see [`MetadataStore::open`]).
const CACHE_SIZE: usize = 512 * 1024;

/// Bumped when a record's encoding changes incompatibly.
pub const SCHEMA_VERSION: u64 = 1;

const SCHEMA: TableDefinition<&str, u64> = TableDefinition::new("schema");

/// A table of namespaced records: key `"{namespace}/{id}"`, value a JSON document.
pub type NamespacedTable = TableDefinition<'static, &'static str, &'static [u8]>;

pub fn namespaced_key(namespace: &str, id: &str) -> String {
    format!("{namespace}/{id}")
}

/// The key range holding every record of `namespace` (`'0'` follows `'/'`).
pub fn namespace_range(namespace: &str) -> (String, String) {
    (format!("{namespace}/"), format!("{namespace}0"))
}

pub(crate) fn db_error(context: &str, err: impl std::fmt::Display) -> Error {
    Error::unknown(format!("metadata: {context}: {err}"))
}

/// The daemon's metadata database.
pub struct MetadataStore {
    db: redb::Database,
    /// Count of deletions since the last garbage collection (drives the GC scheduler).
    dirty: AtomicU64,
    /// A content record was deleted outside a collection since the last blob sweep: the
    /// next collection must look for blobs no namespace references any more (as
    /// containerd's `dirtyCS`), or `ctr content rm` would leave the file until a restart.
    content_dirty: AtomicBool,
    /// Attached subsystems and the mutation signal (see `attach.rs`).
    pub(crate) ext: crate::attach::Attachments,
}

impl MetadataStore {
    /// Opens (or creates) the database at `path` and checks its schema version.
    pub fn open(path: &Path) -> Result<MetadataStore> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| db_error(&format!("creating {}", parent.display()), e))?;
        }
        // redb keeps every page it has touched up to its cache size (1 GiB by default),
        // which for a fresh file is ~1 MiB of resident memory; reads beyond this cache are
        // served by the kernel's page cache, so a small one costs little.
        let db = redb::Builder::new()
            .set_cache_size(CACHE_SIZE)
            .create(path)
            .map_err(|e| db_error(&format!("opening {}", path.display()), e))?;
        let store = MetadataStore {
            db,
            dirty: AtomicU64::new(0),
            content_dirty: AtomicBool::new(false),
            ext: Default::default(),
        };
        store.check_schema(path)?;
        Ok(store)
    }

    fn check_schema(&self, path: &Path) -> Result<()> {
        let tx = self.db.begin_write().map_err(|e| db_error("begin", e))?;
        {
            let mut schema = tx
                .open_table(SCHEMA)
                .map_err(|e| db_error("schema table", e))?;
            let found = schema
                .get("version")
                .map_err(|e| db_error("schema", e))?
                .map(|v| v.value());
            match found {
                None => {
                    schema
                        .insert("version", SCHEMA_VERSION)
                        .map_err(|e| db_error("schema", e))?;
                }
                Some(v) if v == SCHEMA_VERSION => {}
                Some(v) => {
                    return Err(Error::failed_precondition(format!(
                        "metadata database {} has schema version {v}, this berthd reads {SCHEMA_VERSION}",
                        path.display()
                    )));
                }
            }
        }
        tx.commit().map_err(|e| db_error("commit", e))
    }

    /// Runs `f` in a read transaction.
    pub fn read<T>(&self, f: impl FnOnce(&redb::ReadTransaction) -> Result<T>) -> Result<T> {
        let tx = self
            .db
            .begin_read()
            .map_err(|e| db_error("begin read", e))?;
        f(&tx)
    }

    /// Runs `f` in a write transaction and commits it if `f` succeeds; on error nothing
    /// of `f`'s writes is kept.
    pub fn write<T>(&self, f: impl FnOnce(&redb::WriteTransaction) -> Result<T>) -> Result<T> {
        let tx = self
            .db
            .begin_write()
            .map_err(|e| db_error("begin write", e))?;
        let value = f(&tx)?;
        tx.commit().map_err(|e| db_error("commit", e))?;
        self.ext.mutated();
        Ok(value)
    }

    /// Like [`MetadataStore::write`], for a transaction that may turn out to change
    /// nothing: `f` returns its value and whether it wrote anything, and a transaction
    /// that wrote nothing is aborted instead of committed. A redb commit is an fdatasync
    /// even when empty, and a garbage collection after a deletion usually finds nothing
    /// to remove (ctr's `run --rm` ran two such collections, one fdatasync each).
    pub fn write_if_changed<T>(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<(T, bool)>,
    ) -> Result<T> {
        let tx = self
            .db
            .begin_write()
            .map_err(|e| db_error("begin write", e))?;
        let (value, changed) = f(&tx)?;
        if !changed {
            tx.abort().map_err(|e| db_error("abort", e))?;
            return Ok(value);
        }
        tx.commit().map_err(|e| db_error("commit", e))?;
        self.ext.mutated();
        Ok(value)
    }

    /// Records a deletion for the GC scheduler.
    pub fn mark_dirty(&self) {
        self.dirty.fetch_add(1, Ordering::Relaxed);
    }

    /// Deletions since the last collection.
    pub fn dirty(&self) -> u64 {
        self.dirty.load(Ordering::Relaxed)
    }

    pub fn reset_dirty(&self) {
        self.dirty.store(0, Ordering::Relaxed);
    }

    /// Records that a content record went away outside a collection.
    pub fn mark_content_dirty(&self) {
        self.content_dirty.store(true, Ordering::Relaxed);
        self.mark_dirty();
    }

    /// Whether content records went away since the last call (clears the flag).
    pub fn take_content_dirty(&self) -> bool {
        self.content_dirty.swap(false, Ordering::Relaxed)
    }
}

/// Reads a JSON record from a table (read or write transaction).
pub(crate) fn get_json<T: serde::de::DeserializeOwned>(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<T>> {
    let Some(value) = table.get(key).map_err(|e| db_error("get", e))? else {
        return Ok(None);
    };
    serde_json::from_slice(value.value())
        .map(Some)
        .map_err(|e| db_error(&format!("decoding record {key:?}"), e))
}

pub(crate) fn to_json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| db_error("encoding record", e))
}

/// Whether `table` has any record in `namespace`.
pub(crate) fn namespace_has_records(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    namespace: &str,
) -> Result<bool> {
    let (start, end) = namespace_range(namespace);
    let mut range = table
        .range(start.as_str()..end.as_str())
        .map_err(|e| db_error("range", e))?;
    Ok(range.next().is_some())
}
