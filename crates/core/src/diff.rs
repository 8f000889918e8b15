//! Layer application and comparison (containerd's `diff.Applier` / `diff.Comparer`).
//!
//! Both are async: they read or write the content store and the file system on tokio's
//! blocking pool, and the diff service calls them from async handlers.

use crate::Result;
use crate::content::{Descriptor, Scope};
use crate::labels::Labels;
use crate::mount::Mount;
use std::collections::HashMap;

/// Options of an apply.
#[derive(Debug, Clone, Default)]
pub struct ApplyConfig {
    /// Payloads for stream processors, by processor media type (the diff service's
    /// `payloads`), kept as raw `Any` values: type URL and bytes.
    pub processor_payloads: HashMap<String, (String, Vec<u8>)>,
    /// When set, the uncompressed digest (diffID) the applied stream must have; a
    /// mismatch fails the apply (`FailedPrecondition`).
    pub expected_diff_id: Option<String>,
}

/// Options of a compare.
#[derive(Debug, Clone, Default)]
pub struct DiffConfig {
    /// Media type of the produced layer; empty means OCI `tar+gzip`.
    pub media_type: String,
    /// Content-store ingest reference; empty means a generated one.
    pub reference: String,
    /// Labels of the committed blob (the differ adds `containerd.io/uncompressed`).
    pub labels: Labels,
}

/// Applies a layer blob to mounts.
#[async_trait::async_trait]
pub trait Applier: Send + Sync {
    /// Applies the content `desc` (read from the store in `scope`) to the file system
    /// described by `mounts`; returns the descriptor of the *uncompressed* stream
    /// (its digest is the diffID).
    async fn apply(
        &self,
        scope: &Scope,
        desc: &Descriptor,
        mounts: &[Mount],
        config: ApplyConfig,
    ) -> Result<Descriptor>;
}

/// Computes the difference of two file systems as a layer blob.
#[async_trait::async_trait]
pub trait Comparer: Send + Sync {
    /// Writes the changes from `lower` to `upper` as a layer into the content store and
    /// returns its descriptor.
    async fn compare(
        &self,
        scope: &Scope,
        lower: &[Mount],
        upper: &[Mount],
        config: DiffConfig,
    ) -> Result<Descriptor>;
}

/// Both halves, as the diff service needs them.
pub trait Differ: Applier + Comparer {}

impl<T: Applier + Comparer> Differ for T {}

/// Layer media types (OCI and Docker).
pub mod media_types {
    pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
    pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
    pub const OCI_LAYER_NONDIST: &str = "application/vnd.oci.image.layer.nondistributable.v1.tar";
    pub const OCI_LAYER_NONDIST_GZIP: &str =
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip";
    pub const OCI_LAYER_NONDIST_ZSTD: &str =
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd";
    pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar";
    pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
    pub const DOCKER_LAYER_FOREIGN_GZIP: &str =
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";
}
