//! Serving the gRPC router on one listener, with graceful shutdown and a count of the
//! calls in flight (for state dumps and metrics).

use crate::state::DaemonState;
use futures::Stream;
use std::future::Future;
use tokio::io::{AsyncRead, AsyncWrite};
use tonic::transport::server::Connected;

/// Serves `routes` on `incoming` until `shutdown` completes; then stops accepting and
/// waits for open connections to finish their calls.
pub async fn serve<I, IO, IE, F>(
    routes: tonic::service::Routes,
    incoming: I,
    shutdown: F,
    state: DaemonState,
) -> Result<(), tonic::transport::Error>
where
    I: Stream<Item = Result<IO, IE>> + Send + 'static,
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
    F: Future<Output = ()> + Send,
{
    let count_calls = tower::ServiceBuilder::new().map_future(move |call| {
        let guard = state.call_started();
        async move {
            let response = call.await;
            drop(guard);
            response
        }
    });
    tonic::transport::Server::builder()
        // hyper answers more than 1024 streams reset on its side (e.g. a client that
        // cancels a content Write once Commit is answered, as Go clients do) with GOAWAY
        // `too_many_internal_resets`, failing every call of a long-lived client that
        // writes many blobs over one connection. containerd (grpc-go) has no such limit;
        // the socket is local and permission-checked.
        .http2_max_local_error_reset_streams(None)
        .layer(count_calls)
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}
