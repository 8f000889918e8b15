//! `berthd publish`: what containerd's `containerd publish` does, for shims that publish
//! through a binary. It reads one protobuf `Any` (the event) from stdin and calls
//! `containerd.services.events.v1.Events/Publish` on the daemon's gRPC socket
//! (`--address`), with the namespace in the `containerd-namespace` header.

use anyhow::{Context, bail};
use berth_api::containerd::services::events::v1::PublishRequest;
use berth_api::containerd::services::events::v1::events_client::EventsClient;
use prost::Message;
use std::io::Read;
use std::time::Duration;

/// containerd's publish gives up dialling after 2 s.
const DIAL_TIMEOUT: Duration = Duration::from_secs(2);

pub async fn publish(
    address: &str,
    namespace: &str,
    topic: &str,
    input: &mut dyn Read,
) -> anyhow::Result<()> {
    if topic.is_empty() {
        bail!("topic required to publish event: invalid argument");
    }
    let mut payload = Vec::new();
    input
        .read_to_end(&mut payload)
        .context("reading the event from stdin")?;
    let event = prost_types::Any::decode(payload.as_slice())
        .context("decoding the event from stdin (expected a protobuf Any)")?;

    let channel = connect(address).await?;
    let mut client = EventsClient::new(channel);
    let mut request = tonic::Request::new(PublishRequest {
        topic: topic.to_string(),
        event: Some(event),
    });
    request.metadata_mut().insert(
        berth_core::namespaces::GRPC_HEADER,
        namespace
            .parse()
            .with_context(|| format!("namespace {namespace:?} is not a valid header value"))?,
    );
    client
        .publish(request)
        .await
        .map_err(|status| anyhow::anyhow!("{}", status.message()))?;
    Ok(())
}

/// A gRPC channel over the daemon's unix socket.
pub async fn connect(address: &str) -> anyhow::Result<tonic::transport::Channel> {
    let path = crate::sockets::socket_path(address)?;
    // The URI is required by the API but unused: the connector dials the socket.
    let endpoint =
        tonic::transport::Endpoint::from_static("http://berthd").connect_timeout(DIAL_TIMEOUT);
    let connect = endpoint.connect_with_connector(tower::service_fn(move |_| {
        let path = path.clone();
        async move {
            let stream = tokio::net::UnixStream::connect(path).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    }));
    tokio::time::timeout(DIAL_TIMEOUT, connect)
        .await
        .map_err(|_| anyhow::anyhow!("failed to dial {address:?}: timed out"))?
        .with_context(|| format!("failed to dial {address:?}"))
}
