//! `containerd.services.content.v1.Content`: the service plugin
//! `io.containerd.service.v1.content-service` (the namespaced content store with events;
//! instance `Arc<dyn ContentStore>`) and the gRPC plugin `io.containerd.grpc.v1.content`.

use crate::{IntoStatus, lease, namespace, status};
use berth_api::any;
use berth_api::containerd::events::{ContentCreate, ContentDelete};
use berth_api::services::content::v1 as api;
use berth_api::services::content::v1::content_server;
use berth_api::timestamp;
use berth_core::content::{
    ContentStore, Digest, Info, ReaderAt, Scope, Status as IngestStatus, Writer, WriterOpts,
};
use berth_core::events::{EventPublisher, Exchange};
use berth_core::labels::Labels;
use berth_core::{Error, Result};
use berth_metadata::MetadataStore;
use berth_plugin::{GrpcService, InitContext, Instance, Registration, grpc_instance, types};
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::BoxStream;
use tonic::{Code, Request, Response, Status, Streaming};

/// The namespaced content store, publishing `/content/create` and `/content/delete`.
pub struct EventedContent {
    inner: Arc<dyn ContentStore>,
    events: Exchange,
}

impl EventedContent {
    pub fn new(inner: Arc<dyn ContentStore>, events: Exchange) -> EventedContent {
        EventedContent { inner, events }
    }
}

struct EventedWriter {
    inner: Box<dyn Writer>,
    namespace: String,
    events: Exchange,
}

impl Writer for EventedWriter {
    fn write(&mut self, data: &[u8]) -> Result<()> {
        self.inner.write(data)
    }
    fn write_owned(&mut self, data: bytes::Bytes) -> Result<()> {
        self.inner.write_owned(data)
    }
    fn status(&self) -> Result<IngestStatus> {
        self.inner.status()
    }
    fn digest(&self) -> Digest {
        self.inner.digest()
    }
    fn truncate(&mut self, size: i64) -> Result<()> {
        self.inner.truncate(size)
    }
    fn commit(&mut self, size: i64, expected: Option<&Digest>, labels: Labels) -> Result<()> {
        let offset = self.inner.status().map(|s| s.offset).unwrap_or(size);
        self.inner.commit(size, expected, labels)?;
        let event = ContentCreate {
            digest: self.inner.digest().to_string(),
            size: offset,
        };
        let _ = self
            .events
            .publish(&self.namespace, "/content/create", any::pack(&event));
        Ok(())
    }
    fn close(&mut self) -> Result<()> {
        self.inner.close()
    }
}

impl ContentStore for EventedContent {
    fn info(&self, scope: &Scope, digest: &Digest) -> Result<Info> {
        self.inner.info(scope, digest)
    }
    fn update(&self, scope: &Scope, info: Info, paths: &[String]) -> Result<Info> {
        self.inner.update(scope, info, paths)
    }
    fn walk(
        &self,
        scope: &Scope,
        filters: &[String],
        f: &mut dyn FnMut(Info) -> Result<()>,
    ) -> Result<()> {
        self.inner.walk(scope, filters, f)
    }
    fn delete(&self, scope: &Scope, digest: &Digest) -> Result<()> {
        self.inner.delete(scope, digest)?;
        let event = ContentDelete {
            digest: digest.to_string(),
        };
        let _ = self
            .events
            .publish(&scope.namespace, "/content/delete", any::pack(&event));
        Ok(())
    }
    fn reader_at(&self, scope: &Scope, digest: &Digest) -> Result<Box<dyn ReaderAt>> {
        self.inner.reader_at(scope, digest)
    }
    fn writer(&self, scope: &Scope, opts: WriterOpts) -> Result<Box<dyn Writer>> {
        Ok(Box::new(EventedWriter {
            inner: self.inner.writer(scope, opts)?,
            namespace: scope.namespace.clone(),
            events: self.events.clone(),
        }))
    }
    fn status(&self, scope: &Scope, r#ref: &str) -> Result<IngestStatus> {
        self.inner.status(scope, r#ref)
    }
    fn list_statuses(&self, scope: &Scope, filters: &[String]) -> Result<Vec<IngestStatus>> {
        self.inner.list_statuses(scope, filters)
    }
    fn abort(&self, scope: &Scope, r#ref: &str) -> Result<()> {
        self.inner.abort(scope, r#ref)
    }
}

#[derive(Clone)]
struct ContentService {
    store: Arc<dyn ContentStore>,
    /// Serving an un-namespaced backend store (a content proxy plugin's far end, see
    /// [`backend_server`]): a call without a namespace header is accepted, because a
    /// proxying daemon's metadata layer has already namespaced it.
    backend: bool,
}

impl ContentService {
    fn scope<T>(&self, request: &Request<T>) -> Result<Scope, Status> {
        let namespace = match namespace(request) {
            Err(_) if self.backend => String::new(),
            other => other?,
        };
        Ok(Scope::new(namespace).with_lease(lease(request)))
    }
}

/// The content API over `store` for a process serving a content proxy plugin
/// (`[proxy_plugins.<name>] type = "content"`): namespace headers are optional, the
/// store decides what a scope means (see `proxy::UnscopedContent`).
pub fn backend_server(
    store: Arc<dyn ContentStore>,
) -> content_server::ContentServer<impl content_server::Content> {
    content_server::ContentServer::new(ContentService {
        store,
        backend: true,
    })
}

fn info_to_api(info: Info) -> api::Info {
    api::Info {
        digest: info.digest.to_string(),
        size: info.size,
        created_at: Some(timestamp::from_system_time(info.created_at)),
        updated_at: Some(timestamp::from_system_time(info.updated_at)),
        labels: info.labels.into_iter().collect(),
    }
}

fn status_to_api(st: IngestStatus) -> api::Status {
    api::Status {
        started_at: Some(timestamp::from_system_time(st.started_at)),
        updated_at: Some(timestamp::from_system_time(st.updated_at)),
        r#ref: st.r#ref,
        offset: st.offset,
        total: st.total,
        expected: st.expected,
    }
}

fn parse_digest(s: &str) -> Result<Digest, Status> {
    Digest::parse(s).map_err(|_| Status::invalid_argument(format!("{s:?} failed validation")))
}

const READ_CHUNK: usize = 1 << 20;

#[tonic::async_trait]
impl content_server::Content for ContentService {
    async fn info(
        &self,
        request: Request<api::InfoRequest>,
    ) -> Result<Response<api::InfoResponse>, Status> {
        let scope = self.scope(&request)?;
        let digest = parse_digest(&request.get_ref().digest)?;
        let store = self.store.clone();
        let info = crate::blocking(move || store.info(&scope, &digest)).await?;
        Ok(Response::new(api::InfoResponse {
            info: Some(info_to_api(info)),
        }))
    }

    async fn update(
        &self,
        request: Request<api::UpdateRequest>,
    ) -> Result<Response<api::UpdateResponse>, Status> {
        let scope = self.scope(&request)?;
        let req = request.into_inner();
        let info = req.info.unwrap_or_default();
        let digest = parse_digest(&info.digest)?;
        let paths = req.update_mask.map(|m| m.paths).unwrap_or_default();
        let store = self.store.clone();
        let updated = crate::blocking(move || {
            let info = Info {
                digest,
                size: info.size,
                created_at: std::time::UNIX_EPOCH,
                updated_at: std::time::UNIX_EPOCH,
                labels: info.labels.into_iter().collect(),
            };
            store.update(&scope, info, &paths)
        })
        .await?;
        Ok(Response::new(api::UpdateResponse {
            info: Some(info_to_api(updated)),
        }))
    }

    async fn list(
        &self,
        request: Request<api::ListContentRequest>,
    ) -> Result<Response<BoxStream<api::ListContentResponse>>, Status> {
        let scope = self.scope(&request)?;
        let filters = request.into_inner().filters;
        let store = self.store.clone();
        let infos = crate::blocking(move || {
            let mut out = Vec::new();
            store.walk(&scope, &filters, &mut |info| {
                out.push(info);
                Ok(())
            })?;
            Ok(out)
        })
        .await?;
        let blocks: Vec<Result<api::ListContentResponse, Status>> = infos
            .chunks(100)
            .map(|chunk| {
                Ok(api::ListContentResponse {
                    info: chunk.iter().cloned().map(info_to_api).collect(),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(blocks))))
    }

    async fn delete(
        &self,
        request: Request<api::DeleteContentRequest>,
    ) -> Result<Response<()>, Status> {
        let scope = self.scope(&request)?;
        let digest = Digest::parse(&request.get_ref().digest)
            .map_err(|e| Status::invalid_argument(e.message().to_string()))?;
        let store = self.store.clone();
        crate::blocking(move || store.delete(&scope, &digest)).await?;
        Ok(Response::new(()))
    }

    async fn read(
        &self,
        request: Request<api::ReadContentRequest>,
    ) -> Result<Response<BoxStream<api::ReadContentResponse>>, Status> {
        let scope = self.scope(&request)?;
        let req = request.into_inner();
        let digest = Digest::parse(&req.digest)
            .map_err(|e| Status::invalid_argument(format!("{}: {}", req.digest, e.message())))?;
        let store = self.store.clone();
        let ra = crate::blocking(move || {
            store.info(&scope, &digest)?;
            store.reader_at(&scope, &digest)
        })
        .await?;
        let total = ra.size();
        let offset = req.offset.max(0);
        if offset > total {
            return Err(Status::out_of_range(format!(
                "read past object length {total} bytes"
            )));
        }
        let size = if req.size <= 0 || offset + req.size > total {
            total - offset
        } else {
            req.size
        };
        let (tx, rx) = mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            let mut off = offset;
            let end = offset + size;
            while off < end {
                let want = ((end - off) as usize).min(READ_CHUNK);
                let mut buf = vec![0u8; want];
                let n = match ra.read_at(&mut buf, off) {
                    Ok(0) => {
                        let _ = tx.blocking_send(Err(Status::data_loss("short read")));
                        return;
                    }
                    Ok(n) => n,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(status(e)));
                        return;
                    }
                };
                buf.truncate(n);
                let msg = api::ReadContentResponse {
                    offset: off - offset,
                    data: buf,
                };
                if tx.blocking_send(Ok(msg)).is_err() {
                    return;
                }
                off += n as i64;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn status(
        &self,
        request: Request<api::StatusRequest>,
    ) -> Result<Response<api::StatusResponse>, Status> {
        let scope = self.scope(&request)?;
        let r#ref = request.into_inner().r#ref;
        let store = self.store.clone();
        let reference = r#ref.clone();
        let st = crate::blocking(move || {
            store
                .status(&scope, &reference)
                .map_err(|e| e.context(format!("could not get status for ref {reference:?}")))
        })
        .await?;
        Ok(Response::new(api::StatusResponse {
            status: Some(status_to_api(st)),
        }))
    }

    async fn list_statuses(
        &self,
        request: Request<api::ListStatusesRequest>,
    ) -> Result<Response<api::ListStatusesResponse>, Status> {
        let scope = self.scope(&request)?;
        let filters = request.into_inner().filters;
        let store = self.store.clone();
        let statuses = crate::blocking(move || store.list_statuses(&scope, &filters)).await?;
        Ok(Response::new(api::ListStatusesResponse {
            statuses: statuses.into_iter().map(status_to_api).collect(),
        }))
    }

    async fn write(
        &self,
        request: Request<Streaming<api::WriteContentRequest>>,
    ) -> Result<Response<BoxStream<api::WriteContentResponse>>, Status> {
        let scope = self.scope(&request)?;
        let mut stream = request.into_inner();
        let first = match stream.message().await? {
            Some(m) => m,
            None => {
                return Err(Status::invalid_argument(
                    "first message must have a reference",
                ));
            }
        };
        if first.r#ref.is_empty() {
            return Err(Status::invalid_argument(
                "first message must have a reference",
            ));
        }
        let store = self.store.clone();
        let (tx, rx) = mpsc::channel(4);
        // Open the writer before answering, so open errors are the call's status.
        let expected = if first.expected.is_empty() {
            None
        } else {
            Some(parse_digest(&first.expected)?)
        };
        let opts = WriterOpts {
            r#ref: first.r#ref.clone(),
            total: first.total,
            expected: expected.clone(),
        };
        let (s2, sc) = (store.clone(), scope.clone());
        let writer = crate::blocking(move || s2.writer(&sc, opts)).await?;
        tokio::spawn(async move {
            let result =
                write_session(store, scope, writer, first, expected, &mut stream, &tx).await;
            if let Err(err) = result {
                if err.code() != Code::AlreadyExists {
                    tracing::debug!(error = %err, "content write failed");
                }
                let _ = tx.send(Err(err)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn abort(&self, request: Request<api::AbortRequest>) -> Result<Response<()>, Status> {
        let scope = self.scope(&request)?;
        let r#ref = request.into_inner().r#ref;
        let store = self.store.clone();
        crate::blocking(move || store.abort(&scope, &r#ref)).await?;
        Ok(Response::new(()))
    }
}

/// Runs `f` on the writer on a blocking thread, giving the writer back.
async fn with_writer<T: Send + 'static>(
    writer: &mut Option<Box<dyn Writer>>,
    f: impl FnOnce(&mut dyn Writer) -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    let mut w = writer.take().expect("writer present");
    let (w, result) = tokio::task::spawn_blocking(move || {
        let r = f(&mut *w);
        (w, r)
    })
    .await
    .map_err(|e| Status::internal(format!("content task failed: {e}")))?;
    *writer = Some(w);
    result
}

/// What one Write/Commit/Stat message asks of the writer, done in one trip to a blocking
/// thread (a 256 MiB ingest is 256 such messages from ctr).
struct Step {
    action: api::WriteAction,
    offset: i64,
    data: bytes::Bytes,
    /// For a commit: the size to verify, the expected digest and the labels.
    commit: Option<(i64, Option<Digest>, Labels)>,
}

/// The reply's offset, the digest for Stat and Commit replies, and the ingest's status
/// for a Stat reply.
struct StepDone {
    offset: i64,
    digest: Option<Digest>,
    status: Option<IngestStatus>,
}

fn run_step(w: &mut dyn Writer, step: Step) -> Result<StepDone, Status> {
    let status_now = w.status().or_status()?;
    if step.action == api::WriteAction::Stat {
        return Ok(StepDone {
            offset: status_now.offset,
            digest: Some(w.digest()),
            status: Some(status_now),
        });
    }
    if step.offset > 0 && step.offset != status_now.offset {
        return Err(Status::out_of_range(format!(
            "write @{} must occur at current offset {}",
            step.offset, status_now.offset
        )));
    }
    if step.offset < 0 {
        return Err(Status::invalid_argument(format!(
            "write offset {} must not be negative",
            step.offset
        )));
    }
    let mut offset = status_now.offset;
    if step.offset == 0 && offset > 0 {
        w.truncate(0).or_status()?;
        offset = 0;
    }
    if !step.data.is_empty() {
        offset += step.data.len() as i64;
        w.write_owned(step.data).or_status()?;
    }
    // The digest of a Write reply is optional ("implementation defined" in containerd's
    // API) and is left out, so the reply does not wait for the hashing thread; Stat and
    // Commit replies carry it.
    let digest = match step.commit {
        Some((total, expected, labels)) => {
            w.commit(total, expected.as_ref(), labels).or_status()?;
            Some(w.digest())
        }
        None => None,
    };
    Ok(StepDone {
        offset,
        digest,
        status: None,
    })
}

/// A write whose reply has already been sent, still being carried out on a blocking
/// thread; it holds the session's writer until it is settled.
type InFlightWrite = tokio::task::JoinHandle<(Box<dyn Writer>, Result<StepDone, Status>)>;

/// Waits for the write in flight (if any) and gives the writer back; its error, if it
/// failed, is the session's error from here on.
async fn settle(
    writer: &mut Option<Box<dyn Writer>>,
    in_flight: &mut Option<InFlightWrite>,
) -> Result<(), Status> {
    let Some(handle) = in_flight.take() else {
        return Ok(());
    };
    let (w, result) = handle
        .await
        .map_err(|e| Status::internal(format!("content task failed: {e}")))?;
    *writer = Some(w);
    result.map(|_| ())
}

async fn write_session(
    store: Arc<dyn ContentStore>,
    scope: Scope,
    writer: Box<dyn Writer>,
    first: api::WriteContentRequest,
    mut expected: Option<Digest>,
    stream: &mut Streaming<api::WriteContentRequest>,
    tx: &mpsc::Sender<Result<api::WriteContentResponse, Status>>,
) -> Result<(), Status> {
    let mut writer = Some(writer);
    // Write-behind: a plain Write at the offset the session already knows is answered
    // as soon as it is handed to a blocking thread, and carried out while the client
    // prepares its next message (ctr sends 1 MiB, then waits for the reply before it
    // reads the next MiB). At most one write is in flight; every other message waits
    // for it first. The reply promises nothing durable (only Commit's fsync does), and a
    // write that fails ends the session with its error at the next message, so the
    // ingest's stored offset, which a resuming client asks for, is always what was
    // really written.
    let mut in_flight: Option<InFlightWrite> = None;
    // The ingest's offset once a reply has told the client.
    let mut known_offset: Option<i64> = None;
    let mut total = first.total;
    let r#ref = first.r#ref.clone();
    let mut req = first;
    let result = loop {
        // Every message, a plain write too, first waits for the write in flight: it holds
        // the writer, and Stat and Commit must see every byte written.
        if let Err(err) = settle(&mut writer, &mut in_flight).await {
            break Err(err);
        }
        if !req.expected.is_empty() {
            let d = parse_digest(&req.expected)?;
            expected = Some(d.clone());
            let (s, sc) = (store.clone(), scope.clone());
            let exists = tokio::task::spawn_blocking(move || s.info(&sc, &d).is_ok())
                .await
                .unwrap_or(false);
            if exists {
                let _ = with_writer(&mut writer, |w| w.close().or_status()).await;
                let (s, sc, r) = (store.clone(), scope.clone(), r#ref.clone());
                let _ = tokio::task::spawn_blocking(move || s.abort(&sc, &r)).await;
                break Err(Status::already_exists(format!(
                    "blob with expected digest {} exists",
                    req.expected
                )));
            }
        }
        if req.total > 0 {
            total = req.total;
        }
        let action = api::WriteAction::try_from(req.action).map_err(|_| {
            Status::invalid_argument(format!("unknown write action {}", req.action))
        })?;
        let step = Step {
            action,
            offset: req.offset,
            data: std::mem::take(&mut req.data),
            commit: (action == api::WriteAction::Commit).then(|| {
                let labels: Labels = std::mem::take(&mut req.labels).into_iter().collect();
                (total, expected.clone(), labels)
            }),
        };
        let done = match plain_write_offset(&step, known_offset) {
            Some(offset_after) => {
                let mut w = writer.take().expect("writer present");
                in_flight = Some(tokio::task::spawn_blocking(move || {
                    let r = run_step(&mut *w, step);
                    (w, r)
                }));
                StepDone {
                    offset: offset_after,
                    digest: None,
                    status: None,
                }
            }
            None => match with_writer(&mut writer, move |w| run_step(w, step)).await {
                Ok(done) => done,
                Err(err) => break Err(err),
            },
        };
        known_offset = Some(done.offset);
        let mut msg = api::WriteContentResponse {
            action: req.action,
            offset: done.offset,
            digest: done.digest.map(|d| d.to_string()).unwrap_or_default(),
            ..Default::default()
        };
        if let Some(status) = done.status {
            msg.started_at = Some(timestamp::from_system_time(status.started_at));
            msg.updated_at = Some(timestamp::from_system_time(status.updated_at));
            msg.total = total;
        }
        if tx.send(Ok(msg)).await.is_err() {
            break Ok(());
        }
        if action == api::WriteAction::Commit {
            break Ok(());
        }
        match stream.message().await {
            Ok(Some(next)) => req = next,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    // A write still in flight is finished before the writer closes; its error matters
    // only if the session had none (the client may still be waiting for the status).
    let settled = settle(&mut writer, &mut in_flight).await;
    if writer.is_some() {
        let _ = with_writer(&mut writer, |w| w.close().or_status()).await;
    }
    match (result, settled) {
        (Ok(()), Err(err)) => Err(err),
        (result, _) => result,
    }
}

/// The offset after `step` if it is a plain write that may be answered before it is
/// carried out: data, no commit, at the offset the client was last told.
fn plain_write_offset(step: &Step, known_offset: Option<i64>) -> Option<i64> {
    let known = known_offset?;
    (step.action == api::WriteAction::Write
        && step.commit.is_none()
        && !step.data.is_empty()
        && step.offset == known)
        .then(|| known + step.data.len() as i64)
}

impl GrpcService for ContentService {
    fn register(
        &self,
        routes: &mut tonic::service::RoutesBuilder,
        limits: berth_plugin::MessageLimits,
    ) {
        routes.add_service(crate::limited!(
            content_server::ContentServer::new(self.clone()),
            limits
        ));
    }
}

/// `io.containerd.service.v1.content-service`: instance `Arc<dyn ContentStore>`.
pub fn service_registration() -> Registration {
    Registration::new(
        types::SERVICE,
        "content-service",
        |ctx: InitContext| async move {
            let md: Arc<MetadataStore> = ctx.get(types::METADATA)?;
            let inner = md.content_store().ok_or_else(|| {
                Error::failed_precondition("no content store is attached to the metadata store")
            })?;
            let store: Arc<dyn ContentStore> =
                Arc::new(EventedContent::new(inner, ctx.events.clone()));
            Ok::<Instance, _>(Arc::new(store))
        },
    )
    .requires(&[types::METADATA])
}

/// `io.containerd.grpc.v1.content`.
pub fn registration() -> Registration {
    Registration::new(types::GRPC, "content", |ctx: InitContext| async move {
        let store: Arc<dyn ContentStore> = ctx.get_by_id(types::SERVICE, "content-service")?;
        Ok::<Instance, _>(grpc_instance(Arc::new(ContentService {
            store,
            backend: false,
        })))
    })
    .requires(&[types::SERVICE])
}
