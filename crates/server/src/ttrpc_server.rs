//! The daemon's ttrpc endpoint: runtime v2 shims call
//! `containerd.services.events.ttrpc.v1.Events/Forward` there to publish task events.
//! A forwarded envelope keeps its own namespace, topic and timestamp.
//!
//! As in containerd, only processes of the daemon's own user may connect: the socket's
//! group (0660) is meant for gRPC clients, while ttrpc is the shims' private channel.

use async_trait::async_trait;
use berth_core::error::ErrorKind;
use berth_core::events::{Envelope, Exchange};
use containerd_shim_protos::api::{Empty, ForwardRequest};
use containerd_shim_protos::shim_async::{Events, create_events};
use futures::StreamExt;
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use ttrpc::asynchronous::transport::Listener;
use ttrpc::asynchronous::{Server, TtrpcContext};

struct EventsForwarder {
    exchange: Exchange,
}

#[async_trait]
impl Events for EventsForwarder {
    async fn forward(&self, _ctx: &TtrpcContext, request: ForwardRequest) -> ttrpc::Result<Empty> {
        let envelope = request
            .envelope
            .into_option()
            .ok_or_else(|| status(ttrpc::Code::INVALID_ARGUMENT, "envelope is required"))?;
        let timestamp = envelope
            .timestamp
            .as_ref()
            .and_then(|t| {
                let since_epoch =
                    Duration::new(u64::try_from(t.seconds).ok()?, u32::try_from(t.nanos).ok()?);
                SystemTime::UNIX_EPOCH.checked_add(since_epoch)
            })
            .unwrap_or_else(SystemTime::now);
        let event = envelope.event.into_option().unwrap_or_default();
        self.exchange
            .forward(Envelope {
                timestamp,
                namespace: envelope.namespace,
                topic: envelope.topic,
                event: prost_types::Any {
                    type_url: event.type_url,
                    value: event.value,
                },
            })
            .map_err(|e| {
                let code = match e.kind() {
                    ErrorKind::InvalidArgument => ttrpc::Code::INVALID_ARGUMENT,
                    ErrorKind::NotFound => ttrpc::Code::NOT_FOUND,
                    ErrorKind::FailedPrecondition => ttrpc::Code::FAILED_PRECONDITION,
                    ErrorKind::Unavailable => ttrpc::Code::UNAVAILABLE,
                    _ => ttrpc::Code::UNKNOWN,
                };
                status(code, e.message())
            })?;
        Ok(Empty::new())
    }
}

fn status(code: ttrpc::Code, message: &str) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message.to_string()))
}

/// Keeps connections from processes running as `own_uid`; others are closed at once.
fn same_user_only(
    connection: std::io::Result<tokio::net::UnixStream>,
    own_uid: u32,
) -> Option<std::io::Result<tokio::net::UnixStream>> {
    let stream = match connection {
        Ok(stream) => stream,
        Err(e) => return Some(Err(e)),
    };
    match stream.peer_cred() {
        Ok(peer) if peer.uid() == own_uid => Some(Ok(stream)),
        Ok(peer) => {
            tracing::warn!(
                uid = peer.uid(),
                pid = ?peer.pid(),
                "ttrpc: refused a connection from another user"
            );
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "ttrpc: cannot read peer credentials; connection refused");
            None
        }
    }
}

/// A running ttrpc server.
pub struct TtrpcServer {
    server: Server,
}

impl TtrpcServer {
    /// Starts serving the events forwarder on an already bound listener.
    /// Must be called within the tokio runtime.
    pub async fn start(listener: UnixListener, exchange: Exchange) -> std::io::Result<Self> {
        let service = create_events(Arc::new(EventsForwarder { exchange }));
        listener.set_nonblocking(true)?;
        let listener = tokio::net::UnixListener::from_std(listener)?;
        let own_uid = nix::unistd::geteuid().as_raw();
        let connections = tokio_stream::wrappers::UnixListenerStream::new(listener)
            .filter_map(move |connection| async move { same_user_only(connection, own_uid) });
        let mut server = Server::new()
            .add_listener(Listener::new(connections))
            .register_service(service);
        server
            .start()
            .await
            .map_err(|e| std::io::Error::other(format!("starting the ttrpc server: {e}")))?;
        Ok(TtrpcServer { server })
    }

    /// Stops accepting and waits (ttrpc's own bound: 10 s) for open calls to finish.
    pub async fn shutdown(mut self) {
        if let Err(e) = self.server.shutdown().await {
            tracing::warn!(error = %e, "ttrpc server shutdown");
        }
    }
}
