//! How a request names its containerd namespace.

use crate::{Error, Result, identifiers};

/// gRPC metadata key carrying the namespace (`containerd-namespace`).
pub const GRPC_HEADER: &str = "containerd-namespace";
/// ttrpc metadata key carrying the namespace (`containerd-namespace-ttrpc`).
pub const TTRPC_HEADER: &str = "containerd-namespace-ttrpc";
/// gRPC metadata key carrying the lease a request works under.
pub const LEASE_HEADER: &str = "containerd-lease";
pub const DEFAULT: &str = "default";

/// Validates the namespace a request carries; a missing one is an error, as in
/// containerd (`namespaces.NamespaceRequired`).
pub fn required(namespace: Option<&str>) -> Result<String> {
    match namespace {
        None | Some("") => Err(Error::failed_precondition("namespace is required")),
        Some(ns) => {
            identifiers::validate(ns).map_err(|e| e.context("namespace validation"))?;
            Ok(ns.to_string())
        }
    }
}
