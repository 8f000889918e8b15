//! containerd's gRPC services. Each module decodes requests, calls a subsystem through
//! its `berth-core` trait or the metadata store, and encodes the reply; no service holds
//! logic another client (CRI, the CLI) would need again.
//!
//! This is the only place a [`berth_core::Error`] becomes a [`tonic::Status`]
//! ([`status`]), and the only place the namespace of a call is read ([`namespace`]).

pub mod containers;
pub mod content;
pub mod diff;
pub mod events;
pub mod health;
pub mod images;
pub mod introspection;
pub mod leases;
pub mod namespaces;
pub mod proxy;
pub mod restart;
pub mod snapshots;
pub mod streaming;
pub mod tasks;
pub mod transfer;
pub mod version;

/// Applies the daemon's message size limits to a generated tonic server.
macro_rules! limited {
    ($server:expr, $limits:expr) => {
        $server
            .max_decoding_message_size($limits.max_recv)
            .max_encoding_message_size($limits.max_send)
    };
}
pub(crate) use limited;

use berth_core::Error;
use berth_core::error::ErrorKind;
use berth_core::namespaces as ns_header;
use tonic::{Code, Request, Status};

/// Every gRPC service plugin of this crate.
pub fn registrations() -> Vec<berth_plugin::Registration> {
    vec![
        version::registration(),
        health::registration(),
        introspection::service_registration(),
        introspection::registration(),
        namespaces::service_registration(),
        namespaces::registration(),
        events::exchange_registration(),
        events::registration(),
        content::service_registration(),
        content::registration(),
        images::service_registration(),
        images::registration(),
        leases::service_registration(),
        leases::registration(),
        snapshots::service_registration(),
        snapshots::registration(),
        diff::service_registration(),
        diff::registration(),
        containers::service_registration(),
        containers::registration(),
        tasks::service_registration(),
        tasks::registration(),
        restart::registration(),
        streaming::manager_registration(),
        streaming::registration(),
        transfer::local_registration(),
        transfer::registration(),
    ]
}

/// `io.containerd.grpc.v1.<id>`, serving what the service plugin
/// `io.containerd.service.v1.<service_id>` provides: containerd's layering, where the
/// service plugin holds the logic and the gRPC plugin only exposes it.
fn grpc_over_service<S: berth_plugin::GrpcService + Clone + 'static>(
    id: &'static str,
    service_id: &'static str,
) -> berth_plugin::Registration {
    use berth_plugin::{InitContext, Instance, Registration, grpc_instance, types};
    Registration::new(types::GRPC, id, move |ctx: InitContext| async move {
        let service: S = ctx.get_by_id(types::SERVICE, service_id)?;
        Ok::<Instance, _>(grpc_instance(std::sync::Arc::new(service)))
    })
    .requires(&[types::SERVICE])
}

/// Maps an error to the gRPC status containerd's `errdefs.ToGRPC` would send; the message
/// is kept verbatim so `ctr` prints what containerd's would.
pub fn status(err: Error) -> Status {
    let code = match err.kind() {
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::FailedPrecondition => Code::FailedPrecondition,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::NotImplemented => Code::Unimplemented,
        ErrorKind::Canceled => Code::Cancelled,
        ErrorKind::DeadlineExceeded => Code::DeadlineExceeded,
        ErrorKind::Unknown => Code::Unknown,
    };
    Status::new(code, err.message().to_string())
}

/// The namespace of a call, from the `containerd-namespace` header; required, as in
/// containerd, for every namespaced service.
pub fn namespace<T>(request: &Request<T>) -> Result<String, Status> {
    let header = request
        .metadata()
        .get(ns_header::GRPC_HEADER)
        .map(|v| v.to_str());
    let value = match header {
        Some(Ok(value)) => Some(value),
        Some(Err(_)) => {
            return Err(Status::invalid_argument(
                "containerd-namespace header is not ASCII",
            ));
        }
        None => None,
    };
    ns_header::required(value).map_err(status)
}

/// The lease a call works under (`containerd-lease` header), if any.
pub fn lease<T>(request: &Request<T>) -> Option<String> {
    request
        .metadata()
        .get(ns_header::LEASE_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map(str::to_string)
}

/// Runs blocking subsystem work (database transactions, file I/O) on the blocking pool,
/// off the async workers.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> berth_core::Result<T> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("blocking task failed: {e}")))?
        .or_status()
}

/// [`blocking`] work on the metadata store.
pub(crate) async fn with_metadata<T: Send + 'static>(
    store: &std::sync::Arc<berth_metadata::MetadataStore>,
    f: impl FnOnce(&berth_metadata::MetadataStore) -> berth_core::Result<T> + Send + 'static,
) -> Result<T, Status> {
    let store = store.clone();
    blocking(move || f(&store)).await
}

/// Converts a subsystem result into a gRPC result.
pub trait IntoStatus<T> {
    fn or_status(self) -> Result<T, Status>;
}

impl<T> IntoStatus<T> for berth_core::Result<T> {
    fn or_status(self) -> Result<T, Status> {
        self.map_err(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_containerd_codes() {
        let s = status(Error::already_exists("namespace \"a\""));
        assert_eq!(s.code(), Code::AlreadyExists);
        assert_eq!(s.message(), "namespace \"a\": already exists");
        assert_eq!(
            status(Error::failed_precondition("x")).code(),
            Code::FailedPrecondition
        );
        assert_eq!(
            status(Error::not_implemented("x")).code(),
            Code::Unimplemented
        );
    }

    #[test]
    fn namespace_header_is_required_and_validated() {
        let mut request = Request::new(());
        assert_eq!(
            namespace(&request).unwrap_err().code(),
            Code::FailedPrecondition
        );
        request
            .metadata_mut()
            .insert(ns_header::GRPC_HEADER, "k8s.io".parse().unwrap());
        assert_eq!(namespace(&request).unwrap(), "k8s.io");
        request
            .metadata_mut()
            .insert(ns_header::GRPC_HEADER, "bad..ns".parse().unwrap());
        assert_eq!(
            namespace(&request).unwrap_err().code(),
            Code::InvalidArgument
        );
    }
}
