//! `containerd.services.transfer.v1.Transfer`: `io.containerd.transfer.v1.local` (the
//! [`LocalTransfer`] of `berth-transfer` over the metadata store, snapshotters and the
//! walking differ) and `io.containerd.grpc.v1.transfer`, the adapter: it decodes the
//! source and destination `Any`s as containerd 2.x's type registry does
//! (`containerd.types.transfer.OCIRegistry`, `.ImageStore`, …), sends progress on the
//! client's progress stream as `containerd.types.transfer.Progress`, asks the client's
//! auth stream for the credentials of a host when that host challenges (containerd's
//! `credCallback`: `AuthRequest{host, reference}`; a `HEADER` answer gives nothing, as in
//! containerd), answers with containerd's `Unimplemented` for pairs no transferrer
//! handles, and cancels the transfer when the client goes away.

use crate::streaming::{ManagedStream, StreamManager};
use crate::{namespace, status};
use berth_api::any;
use berth_api::services::images::v1 as images_api;
use berth_api::services::transfer::v1 as api;
use berth_api::services::transfer::v1::transfer_server;
use berth_api::types::transfer as tt;
use berth_core::events::{EventPublisher, Exchange};
use berth_core::{Error, Result};
use berth_metadata::MetadataStore;
use berth_metadata::snapshots::Snapshotters;
use berth_plugin::{GrpcService, InitContext, Instance, Registration, grpc_instance, types};
use berth_remotes::Platform;
use berth_remotes::auth::CredentialsProvider;
use berth_remotes::hosts::AuthConfig;
use berth_transfer::{
    ExportStream, ImageReference, ImageStore, ImportStream, LocalTransfer, Object, Progress,
    Registry, TransferConfig, TransferOptions, Unpack,
};
use prost_types::Any;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// How long the client's auth stream may take to answer a credentials request.
const AUTH_TIMEOUT: Duration = Duration::from_secs(10);

/// The gRPC adapter.
#[derive(Clone)]
pub struct TransferService {
    transfer: Arc<LocalTransfer>,
    streams: StreamManager,
    events: Exchange,
}

fn platform(p: &berth_api::types::Platform) -> Platform {
    Platform::new(&p.os, &p.architecture, &p.variant)
}

fn progress_to_api(p: Progress) -> tt::Progress {
    tt::Progress {
        event: p.event,
        name: p.name,
        parents: p.parents,
        progress: p.progress,
        total: p.total,
        desc: p.desc.map(|d| berth_api::types::Descriptor {
            media_type: d.media_type,
            digest: d.digest,
            size: d.size,
            annotations: d.annotations.into_iter().collect(),
        }),
    }
}

/// Credentials from the client's auth stream, as containerd's `credCallback`: asked with
/// the host that challenged, only when it challenges (so never for a registry that does
/// not ask, and for a mirror under the mirror's name), one question at a time; each
/// host's answer is kept for the rest of the transfer.
struct StreamCredentials {
    stream: Arc<ManagedStream>,
    reference: String,
    asking: tokio::sync::Mutex<std::collections::HashMap<String, Option<AuthConfig>>>,
}

impl StreamCredentials {
    async fn ask(&self, host: &str) -> Result<Option<AuthConfig>> {
        self.stream
            .send(any::pack(&tt::AuthRequest {
                host: host.to_string(),
                reference: self.reference.clone(),
                wwwauthenticate: vec![],
            }))
            .await?;
        let reply = tokio::time::timeout(AUTH_TIMEOUT, self.stream.recv())
            .await
            .map_err(|_| Error::unavailable(format!("no answer on the auth stream for {host}")))?
            .ok_or_else(|| {
                Error::unavailable(format!("auth stream closed before answering for {host}"))
            })?;
        let resp: tt::AuthResponse = any::unpack(&reply).ok_or_else(|| {
            Error::invalid_argument(format!(
                "auth stream answered with {}, expected containerd.types.transfer.AuthResponse",
                reply.type_url
            ))
        })?;
        // containerd's resolver takes a username and a secret from the callback: a
        // refresh token has no username, and a `HEADER` answer gives neither.
        Ok(match tt::AuthType::try_from(resp.auth_type) {
            Ok(tt::AuthType::Credentials) if !resp.username.is_empty() => Some(AuthConfig {
                username: resp.username,
                password: resp.secret,
                identity_token: String::new(),
            }),
            Ok(tt::AuthType::Refresh) if !resp.secret.is_empty() => Some(AuthConfig {
                identity_token: resp.secret,
                ..Default::default()
            }),
            _ => None,
        })
    }
}

#[tonic::async_trait]
impl CredentialsProvider for StreamCredentials {
    fn credentials(&self, host: &str) -> Option<AuthConfig> {
        // Only what was already asked (the resolver calls `credentials_for`).
        self.asking
            .try_lock()
            .ok()
            .and_then(|m| m.get(host).cloned().flatten())
    }

    async fn credentials_for(&self, host: &str) -> Option<AuthConfig> {
        let mut asked = self.asking.lock().await;
        if let Some(c) = asked.get(host) {
            return c.clone();
        }
        let c = match self.ask(host).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(host, error = %e, "no credentials from the auth stream");
                None
            }
        };
        asked.insert(host.to_string(), c.clone());
        c
    }
}

/// Closes a stream when dropped.
struct CloseOnDrop(Arc<ManagedStream>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Flow-control window of a received byte stream (containerd's `ReceiveStream`: the
/// receiver grants 64 KiB at a time; the sender sends `Data` only within the window).
const WINDOW: i32 = 64 << 10;

/// A blocking reader over a client's byte stream (`containerd.types.transfer.Data`
/// messages, credited with `WindowUpdate`s), for the import's blocking tar reader.
fn receive_stream(stream: Arc<ManagedStream>) -> impl std::io::Read + Send {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(16);
    tokio::spawn(async move {
        let mut window = 0i32;
        loop {
            if window < WINDOW {
                let update = tt::WindowUpdate { update: WINDOW };
                if stream.send(any::pack(&update)).await.is_err() {
                    break;
                }
                window += WINDOW;
            }
            let Some(m) = stream.recv().await else { break };
            let Some(data) = any::unpack::<tt::Data>(&m) else {
                tracing::warn!(type_url = %m.type_url, "ignoring a non-data message on an import stream");
                continue;
            };
            window -= data.data.len() as i32;
            let tx = tx.clone();
            // The reader runs on a blocking thread; a full channel waits here, off the
            // async workers.
            let sent = tokio::task::spawn_blocking(move || tx.send(data.data).is_ok()).await;
            if !matches!(sent, Ok(true)) {
                break;
            }
        }
        stream.close();
    });
    ChannelReader {
        rx,
        buf: Vec::new(),
        pos: 0,
    }
}

/// Largest `Data` message sent (containerd's `SendStream` reads 32 KiB at a time).
const MAX_DATA: usize = 32 << 10;

/// A blocking writer whose bytes go to the client as `Data` messages, never more than the
/// client's `WindowUpdate`s allow (containerd's `SendStream`). The task ends, closing the
/// stream, once the writer is dropped and everything was sent, or when the client leaves
/// (the writer's next write then fails).
fn send_stream(
    stream: Arc<ManagedStream>,
) -> (impl std::io::Write + Send, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    let task = tokio::spawn(async move {
        let mut window: i64 = 0;
        'chunks: while let Some(chunk) = rx.recv().await {
            let mut off = 0;
            while off < chunk.len() {
                while window <= 0 {
                    let Some(m) = stream.recv().await else {
                        break 'chunks;
                    };
                    match any::unpack::<tt::WindowUpdate>(&m) {
                        Some(u) => window += i64::from(u.update),
                        None => {
                            tracing::warn!(type_url = %m.type_url, "ignoring a message on an export stream")
                        }
                    }
                }
                let n = (chunk.len() - off).min(MAX_DATA).min(window as usize);
                let data = tt::Data {
                    data: chunk[off..off + n].to_vec(),
                };
                if stream.send(any::pack(&data)).await.is_err() {
                    break 'chunks;
                }
                off += n;
                window -= n as i64;
            }
        }
        stream.close();
    });
    (
        ChannelWriter {
            tx,
            buf: Vec::with_capacity(MAX_DATA),
        },
        task,
    )
}

struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    fn send_buf(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(MAX_DATA));
        // Called from the export's blocking thread.
        self.tx.blocking_send(chunk).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client went away")
        })
    }
}

impl std::io::Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= MAX_DATA {
            self.send_buf()?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.send_buf()
    }
}

struct ChannelReader {
    rx: std::sync::mpsc::Receiver<Vec<u8>>,
    buf: Vec<u8>,
    pos: usize,
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.buf.len() {
            match self.rx.recv() {
                Ok(b) => {
                    self.buf = b;
                    self.pos = 0;
                }
                // The client finished (or went away: the archive reader reports it
                // truncated).
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl TransferService {
    /// Decodes one side of a transfer. Types Berth knows but cannot transfer yet become
    /// [`Object::Other`], unknown ones too (both end as `Unimplemented`).
    async fn convert(
        &self,
        ns: &str,
        a: &Any,
        finishers: &mut Vec<tokio::task::JoinHandle<()>>,
    ) -> std::result::Result<Object, Status> {
        let bad =
            |what: &str| Status::invalid_argument(format!("{what}: cannot decode {}", a.type_url));
        let name = a.type_url.rsplit('/').next().unwrap_or_default();
        if name == any::type_url::<tt::OciRegistry>() {
            let r: tt::OciRegistry = any::unpack(a).ok_or_else(|| bad("source"))?;
            let resolver = r.resolver.unwrap_or_default();
            let mut reg = Registry {
                reference: r.reference.clone(),
                host_dir: resolver.host_dir,
                default_scheme: resolver.default_scheme,
                headers: resolver.headers.into_iter().collect(),
                credentials: None,
            };
            if !resolver.auth_stream.is_empty() {
                let stream = self
                    .streams
                    .get(ns, &resolver.auth_stream)
                    .map_err(status)?;
                reg.credentials = Some(Arc::new(StreamCredentials {
                    stream,
                    reference: r.reference.clone(),
                    asking: Default::default(),
                }));
            }
            return Ok(Object::Registry(reg));
        }
        if name == any::type_url::<tt::ImageStore>() {
            let s: tt::ImageStore = any::unpack(a).ok_or_else(|| bad("image store"))?;
            return Ok(Object::ImageStore(ImageStore {
                name: s.name,
                labels: s.labels.into_iter().collect(),
                platforms: s.platforms.iter().map(platform).collect(),
                all_metadata: s.all_metadata,
                manifest_limit: s.manifest_limit as usize,
                unpacks: s
                    .unpacks
                    .into_iter()
                    .map(|u| Unpack {
                        platform: u.platform.as_ref().map(platform),
                        snapshotter: u.snapshotter,
                    })
                    .collect(),
                extra_references: s
                    .extra_references
                    .into_iter()
                    .map(|r| ImageReference {
                        name: r.name,
                        is_prefix: r.is_prefix,
                        allow_overwrite: r.allow_overwrite,
                        add_digest: r.add_digest,
                        skip_named_digest: r.skip_named_digest,
                    })
                    .collect(),
            }));
        }
        if name == any::type_url::<tt::ImageExportStream>() {
            let s: tt::ImageExportStream = any::unpack(a).ok_or_else(|| bad("export stream"))?;
            let stream = self.streams.get(ns, &s.stream).map_err(status)?;
            if !s.media_type.is_empty() && !s.media_type.contains("tar") {
                return Err(Status::unimplemented(format!(
                    "export media type {:?} is not implemented by Berth (an uncompressed tar is)",
                    s.media_type
                )));
            }
            let (writer, sender) = send_stream(stream);
            finishers.push(sender);
            return Ok(Object::ExportStream(ExportStream {
                writer: Arc::new(std::sync::Mutex::new(Some(Box::new(writer)))),
                platforms: s.platforms.iter().map(platform).collect(),
                all_platforms: s.all_platforms,
                skip_compatibility_manifest: s.skip_compatibility_manifest,
                skip_non_distributable: s.skip_non_distributable,
            }));
        }
        if name == any::type_url::<tt::ImageImportStream>() {
            let s: tt::ImageImportStream = any::unpack(a).ok_or_else(|| bad("import stream"))?;
            let stream = self.streams.get(ns, &s.stream).map_err(status)?;
            return Ok(Object::ImportStream(ImportStream {
                reader: Arc::new(std::sync::Mutex::new(Some(Box::new(receive_stream(
                    stream,
                ))))),
                media_type: s.media_type,
                force_compress: s.force_compress,
            }));
        }
        Ok(Object::Other(a.type_url.clone()))
    }

    fn publish_stored(&self, ns: &str, stored: &[berth_transfer::StoredImage]) {
        for s in stored {
            let labels = s.image.labels.clone().into_iter().collect();
            let name = s.image.name.clone();
            let r = if s.created {
                self.events.publish(
                    ns,
                    "/images/create",
                    any::pack(&images_api::ImageCreate { name, labels }),
                )
            } else {
                self.events.publish(
                    ns,
                    "/images/update",
                    any::pack(&images_api::ImageUpdate { name, labels }),
                )
            };
            if let Err(e) = r {
                tracing::warn!(error = %e, "publishing image event");
            }
        }
    }
}

#[tonic::async_trait]
impl transfer_server::Transfer for TransferService {
    async fn transfer(
        &self,
        request: Request<api::TransferRequest>,
    ) -> std::result::Result<Response<()>, Status> {
        let ns = namespace(&request)?;
        let req = request.into_inner();
        // Closed however this call ends (containerd's `defer stream.Close()`), so the
        // client's progress reader always sees the end of the stream.
        let progress_stream = match req.options.as_ref().map(|o| o.progress_stream.as_str()) {
            Some(id) if !id.is_empty() => {
                Some(CloseOnDrop(self.streams.get(&ns, id).map_err(status)?))
            }
            _ => None,
        };
        let (Some(src_any), Some(dst_any)) = (&req.source, &req.destination) else {
            return Err(Status::invalid_argument(
                "transfer needs a source and a destination",
            ));
        };
        let unimplemented = || {
            Status::unimplemented(format!(
                "method Transfer not implemented for {} to {}",
                src_any.type_url, dst_any.type_url
            ))
        };
        // Tasks still sending to the client after the transfer (an export's last bytes).
        let mut finishers = vec![];
        let source = self.convert(&ns, src_any, &mut finishers).await?;
        let destination = self.convert(&ns, dst_any, &mut finishers).await?;

        // Progress goes through a queue so a slow client never stalls the transfer; one
        // task sends in order and closes the stream after the last event.
        let (ptx, mut prx) = tokio::sync::mpsc::unbounded_channel::<Progress>();
        let forwarder = progress_stream.map(|stream| {
            tokio::spawn(async move {
                while let Some(p) = prx.recv().await {
                    if stream.0.send(any::pack(&progress_to_api(p))).await.is_err() {
                        break;
                    }
                }
            })
        });
        let cancel = CancellationToken::new();
        let opts = TransferOptions {
            progress: forwarder.is_some().then(|| {
                let ptx = ptx.clone();
                Arc::new(move |p: Progress| {
                    let _ = ptx.send(p);
                }) as berth_transfer::ProgressFn
            }),
            cancel: cancel.clone(),
        };
        drop(ptx);
        // The transfer runs in its own task so that, when the client goes away and tonic
        // drops this handler, it is cancelled (the guard) and still cleans up its lease.
        let guard = cancel.drop_guard();
        let transfer = self.transfer.clone();
        let n = ns.clone();
        let result =
            tokio::spawn(async move { transfer.transfer(&n, source, destination, opts).await })
                .await
                .map_err(|e| Status::internal(format!("transfer task failed: {e}")))?;
        drop(guard.disarm());
        for f in finishers {
            let _ = f.await;
        }
        if let Some(f) = forwarder {
            let _ = f.await;
        }
        match result {
            Ok(stored) => {
                self.publish_stored(&ns, &stored);
                Ok(Response::new(()))
            }
            Err(e) if e.is(berth_core::error::ErrorKind::NotImplemented) => {
                tracing::debug!(error = %e, "transfer not implemented");
                Err(unimplemented())
            }
            Err(e) => Err(status(e)),
        }
    }
}

impl GrpcService for TransferService {
    fn register(
        &self,
        routes: &mut tonic::service::RoutesBuilder,
        limits: berth_plugin::MessageLimits,
    ) {
        routes.add_service(crate::limited!(
            transfer_server::TransferServer::new(self.clone()),
            limits
        ));
    }
}

/// `io.containerd.transfer.v1.local`: instance `Arc<LocalTransfer>`.
pub fn local_registration() -> Registration {
    Registration::new(types::TRANSFER, "local", |ctx: InitContext| async move {
        let config: TransferConfig = ctx.config()?;
        let md: Arc<MetadataStore> = ctx.get(types::METADATA)?;
        let content = md.content_store().ok_or_else(|| {
            Error::failed_precondition("no content store is attached to the metadata store")
        })?;
        let snapshotters: Snapshotters = ctx.get_by_id(types::SERVICE, "snapshots-service")?;
        let differ: crate::diff::DifferInstance = ctx.get_by_id(types::DIFF, "walking")?;
        let transfer = LocalTransfer::new(md, content, snapshotters, differ, config);
        Ok::<Instance, _>(Arc::new(Arc::new(transfer)))
    })
    .requires(&[types::METADATA, types::SERVICE, types::DIFF])
    .with_config::<TransferConfig>()
}

/// `io.containerd.grpc.v1.transfer`.
pub fn registration() -> Registration {
    Registration::new(types::GRPC, "transfer", |ctx: InitContext| async move {
        let transfer: Arc<LocalTransfer> = ctx.get_by_id(types::TRANSFER, "local")?;
        let streams: StreamManager = ctx.get_by_id(types::STREAMING, "manager")?;
        let service = TransferService {
            transfer,
            streams,
            events: ctx.events.clone(),
        };
        Ok::<Instance, _>(grpc_instance(Arc::new(service)))
    })
    .requires(&[types::TRANSFER, types::STREAMING])
}
