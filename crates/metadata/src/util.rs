//! Small helpers shared by the record modules (content, images, leases, gc).

use crate::db::db_error;
use berth_core::Result;
use redb::{ReadOnlyTable, ReadTransaction, TableDefinition};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub(crate) type Table = TableDefinition<'static, &'static str, &'static [u8]>;

/// Opens `table` for reading; `None` if nothing was ever stored in it.
pub(crate) fn open_read(
    tx: &ReadTransaction,
    table: Table,
) -> Result<Option<ReadOnlyTable<&'static str, &'static [u8]>>> {
    match tx.open_table(table) {
        Ok(t) => Ok(Some(t)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(db_error("open table", e)),
    }
}

pub(crate) fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
        .min(u64::MAX as u128) as u64
}

pub(crate) fn time(n: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(n)
}

/// Splits a namespaced key `"{ns}/{rest}"`.
pub(crate) fn split_key(key: &str) -> Option<(&str, &str)> {
    key.split_once('/')
}

pub(crate) fn e<E: std::fmt::Display>(context: &'static str) -> impl Fn(E) -> berth_core::Error {
    move |err| db_error(context, err)
}
