//! The daemon's ttrpc endpoint: runtime v2 shims call
//! `containerd.services.events.ttrpc.v1.Events/Forward` there to publish task events.
//! A forwarded envelope keeps its own namespace, topic and timestamp.

use async_trait::async_trait;
use berth_core::error::ErrorKind;
use berth_core::events::{Envelope, Exchange};
use containerd_shim_protos::api::{Empty, ForwardRequest};
use containerd_shim_protos::shim_async::{Events, create_events};
use std::os::fd::IntoRawFd;
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
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

/// A running ttrpc server.
pub struct TtrpcServer {
    server: Server,
}

impl TtrpcServer {
    /// Starts serving the events forwarder on an already bound listener.
    pub async fn start(listener: UnixListener, exchange: Exchange) -> std::io::Result<Self> {
        let service = create_events(Arc::new(EventsForwarder { exchange }));
        let fd = listener.into_raw_fd();
        // SAFETY: `fd` is a listening unix socket we own (`into_raw_fd` gave up ownership).
        let server = unsafe { Server::new().add_unix_listener(fd) }
            .map_err(|e| std::io::Error::other(format!("ttrpc listener: {e}")))?;
        let mut server = server.register_service(service);
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
