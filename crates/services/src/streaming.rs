//! `containerd.services.streaming.v1.Streaming`: client-opened byte/message streams other
//! services use by ID (the transfer service sends progress on one and asks for
//! credentials on another), as containerd 2.x: `io.containerd.streaming.v1.manager` (the
//! registry of open streams, per namespace) and `io.containerd.grpc.v1.streaming`.
//!
//! Protocol (what 2.x's client does): the client's first message is a `StreamInit{id}`;
//! the server registers the stream under `(namespace, id)` and answers with an empty
//! `google.protobuf.Empty`; then both sides exchange `Any` messages until the service
//! using the stream closes it (the client then sees the end of the stream) or the client
//! goes away (the stream is unregistered).

use crate::{namespace, status};
use berth_api::any;
use berth_api::services::streaming::v1::StreamInit;
use berth_api::services::streaming::v1::streaming_server;
use berth_core::{Error, Result};
use berth_plugin::{GrpcService, InitContext, Instance, Registration, grpc_instance, types};
use prost_types::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status, Streaming};

/// One registered stream, as a service using it sees it.
pub struct ManagedStream {
    out: Mutex<Option<mpsc::Sender<std::result::Result<Any, Status>>>>,
    incoming: tokio::sync::Mutex<mpsc::Receiver<Any>>,
    closed: CancellationToken,
}

impl ManagedStream {
    /// Sends `message` to the client (waits while the client is slow to read).
    pub async fn send(&self, message: Any) -> Result<()> {
        let tx = self.out.lock().unwrap().clone();
        match tx {
            Some(tx) => tx
                .send(Ok(message))
                .await
                .map_err(|_| Error::unavailable("stream closed by the client")),
            None => Err(Error::unavailable("stream closed")),
        }
    }

    /// The client's next message; `None` once the client stopped sending or went away.
    pub async fn recv(&self) -> Option<Any> {
        let mut rx = self.incoming.lock().await;
        tokio::select! {
            m = rx.recv() => m,
            _ = self.closed.cancelled() => None,
        }
    }

    /// Ends the stream: the client sees its end once everything sent was read.
    pub fn close(&self) {
        self.out.lock().unwrap().take();
        self.closed.cancel();
    }
}

/// Open streams by (namespace, ID).
type StreamMap = HashMap<(String, String), Arc<ManagedStream>>;

/// `io.containerd.streaming.v1.manager`: open streams by namespace and ID.
#[derive(Clone, Default)]
pub struct StreamManager {
    streams: Arc<Mutex<StreamMap>>,
}

impl StreamManager {
    fn register(&self, ns: &str, id: &str, stream: Arc<ManagedStream>) -> Result<()> {
        let mut streams = self.streams.lock().unwrap();
        let key = (ns.to_string(), id.to_string());
        if streams.contains_key(&key) {
            return Err(Error::already_exists(format!("stream {id}")));
        }
        streams.insert(key, stream);
        Ok(())
    }

    fn unregister(&self, ns: &str, id: &str, stream: &Arc<ManagedStream>) {
        let mut streams = self.streams.lock().unwrap();
        let key = (ns.to_string(), id.to_string());
        if streams.get(&key).is_some_and(|s| Arc::ptr_eq(s, stream)) {
            streams.remove(&key);
        }
    }

    /// The stream `id` of namespace `ns` (`NotFound` as containerd's manager).
    pub fn get(&self, ns: &str, id: &str) -> Result<Arc<ManagedStream>> {
        self.streams
            .lock()
            .unwrap()
            .get(&(ns.to_string(), id.to_string()))
            .cloned()
            .ok_or_else(|| Error::not_found(format!("stream {id}")))
    }
}

/// The gRPC adapter.
#[derive(Clone)]
pub struct StreamingService {
    manager: StreamManager,
}

/// What containerd acknowledges a `StreamInit` with.
fn empty_any() -> Any {
    Any {
        type_url: "google.protobuf.Empty".into(),
        value: vec![],
    }
}

#[tonic::async_trait]
impl streaming_server::Streaming for StreamingService {
    async fn stream(
        &self,
        request: Request<Streaming<Any>>,
    ) -> std::result::Result<Response<BoxStream<Any>>, Status> {
        let ns = namespace(&request)?;
        let mut inbound = request.into_inner();
        let (out_tx, out_rx) = mpsc::channel::<std::result::Result<Any, Status>>(64);
        let manager = self.manager.clone();
        // The reply starts at once; the init message is read by this task, so a client
        // that waits for response headers before sending works too.
        tokio::spawn(async move {
            let first = match inbound.message().await {
                Ok(Some(m)) => m,
                Ok(None) => return,
                Err(s) => {
                    tracing::debug!(error = %s, "stream ended before its init message");
                    return;
                }
            };
            let Some(init) = any::unpack::<StreamInit>(&first) else {
                let _ = out_tx
                    .send(Err(Status::invalid_argument(format!(
                        "first message of a stream must be a containerd.services.streaming.v1.StreamInit, got {}",
                        first.type_url
                    ))))
                    .await;
                return;
            };
            let (in_tx, in_rx) = mpsc::channel(16);
            let stream = Arc::new(ManagedStream {
                out: Mutex::new(Some(out_tx.clone())),
                incoming: tokio::sync::Mutex::new(in_rx),
                closed: CancellationToken::new(),
            });
            if let Err(e) = manager.register(&ns, &init.id, stream.clone()) {
                let _ = out_tx.send(Err(status(e))).await;
                return;
            }
            tracing::debug!(namespace = %ns, stream = %init.id, "stream registered");
            if out_tx.send(Ok(empty_any())).await.is_err() {
                manager.unregister(&ns, &init.id, &stream);
                return;
            }
            let mut in_tx = Some(in_tx);
            loop {
                tokio::select! {
                    _ = stream.closed.cancelled() => break,
                    _ = out_tx.closed() => break,
                    m = inbound.message(), if in_tx.is_some() => match m {
                        Ok(Some(m)) => {
                            if let Some(tx) = &in_tx {
                                // Nobody reading what the client sends: dropped.
                                let _ = tx.send(m).await;
                            }
                        }
                        // The client closed its sending side (it still reads): the
                        // service's `recv` sees the end.
                        Ok(None) => in_tx = None,
                        Err(_) => break,
                    },
                }
            }
            manager.unregister(&ns, &init.id, &stream);
            stream.closed.cancel();
            stream.out.lock().unwrap().take();
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out_rx),
        )))
    }
}

impl GrpcService for StreamingService {
    fn register(
        &self,
        routes: &mut tonic::service::RoutesBuilder,
        limits: berth_plugin::MessageLimits,
    ) {
        routes.add_service(crate::limited!(
            streaming_server::StreamingServer::new(self.clone()),
            limits
        ));
    }
}

/// `io.containerd.streaming.v1.manager`: instance [`StreamManager`].
pub fn manager_registration() -> Registration {
    Registration::new(
        types::STREAMING,
        "manager",
        |_ctx: InitContext| async move { Ok::<Instance, _>(Arc::new(StreamManager::default())) },
    )
    .requires(&[types::METADATA])
}

/// `io.containerd.grpc.v1.streaming`.
pub fn registration() -> Registration {
    Registration::new(types::GRPC, "streaming", |ctx: InitContext| async move {
        let manager: StreamManager = ctx.get_by_id(types::STREAMING, "manager")?;
        Ok::<Instance, _>(grpc_instance(Arc::new(StreamingService { manager })))
    })
    .requires(&[types::STREAMING])
}
