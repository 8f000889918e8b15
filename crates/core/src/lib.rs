//! The vocabulary every Berth subsystem shares.
//!
//! Nothing here knows about gRPC: subsystems return [`Error`], and only the API edge
//! (`berth-services`) turns it into a status. Traits that subsystems implement for one
//! another (`ContentStore`, `Snapshotter`, …) live here so that crates depend on
//! interfaces, never on each other's concrete types.

pub mod content;
pub mod diff;
pub mod error;
pub mod events;
pub mod fieldpath;
pub mod filters;
pub mod identifiers;
pub mod labels;
pub mod mount;
pub mod namespaces;
pub mod oci;
pub mod runtime;
pub mod snapshot;
pub mod time;

pub use error::{Error, Result};
