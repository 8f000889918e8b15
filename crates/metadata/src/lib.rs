//! The metadata store: one redb file holding every namespaced record of the daemon.
//!
//! Invariants:
//! - every mutation happens in one write transaction ([`MetadataStore::write`]); redb
//!   commits are atomic and durable, so a crash leaves either the old or the new state;
//! - records of namespaced tables are keyed `"{namespace}/{id}"` (namespaces are
//!   identifiers and never contain `/`), so a namespace's records are one key range;
//! - the schema version is stored in the file; tables are created on open, so later
//!   subsystems add tables without a migration, and an incompatible file is refused.

mod attach;
pub mod containers;
pub mod content;
mod db;
pub mod gc;
pub mod images;
pub mod leases;
pub mod namespaces;
pub mod snapshots;
mod util;

mod plugin;

pub use attach::SharingPolicy;
pub use plugin::{MetadataConfig, registration};

/// Every namespaced table, in the order containerd names them when a namespace that still
/// holds records is deleted. A module that adds a namespaced table lists it here.
pub const NAMESPACED_TABLES: &[namespaces::NamespacedTableInfo] = &[
    namespaces::NamespacedTableInfo {
        table: images::IMAGES,
        what: "images",
    },
    namespaces::NamespacedTableInfo {
        table: content::BLOBS,
        what: "blobs",
    },
    namespaces::NamespacedTableInfo {
        table: containers::CONTAINERS,
        what: "containers",
    },
    namespaces::NamespacedTableInfo {
        table: snapshots::SNAPSHOTS,
        what: "snapshots",
    },
];

pub use db::{MetadataStore, NamespacedTable, SCHEMA_VERSION, namespace_range, namespaced_key};
