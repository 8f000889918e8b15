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
    tls: Option<tonic::transport::ServerTlsConfig>,
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
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    builder
        .layer(count_calls)
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}
