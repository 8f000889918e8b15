//! Proxy plugins (`[proxy_plugins]`):
//!
//! - `type = "snapshot"`: a snapshotter that forwards every call over the snapshots gRPC
//!   API to another process (how stargz and nydus plug in), and the other half —
//!   [`BackendSnapshotsService`], which serves one [`Snapshotter`] over that API without
//!   namespaces, as containerd's `snapshotservice.FromSnapshotter` does.
//! - `type = "content"`: a blob store ([`ProxyContentStore`]) that forwards to a content
//!   service in another process, as containerd's `content/proxy`; the other half is
//!   [`UnscopedContent`] behind `content::backend_server`.
//!
//! The `berth-snapshotter` binary serves either or both on one socket.

use crate::snapshots::{info_from_api, info_to_api, mount_from_api, mount_to_api};
use crate::{IntoStatus, status};
use berth_api::services::content::v1 as capi;
use berth_api::services::content::v1::content_client::ContentClient;
use berth_api::services::snapshots::v1 as api;
use berth_api::services::snapshots::v1::snapshots_client::SnapshotsClient;
use berth_api::services::snapshots::v1::snapshots_server;
use berth_core::content::{
    BlobStore, ContentStore, Digest, Info as ContentInfo, ReaderAt, Scope, Status as IngestStatus,
    Writer, WriterOpts, validate_ref, validate_total,
};
use berth_core::filters::Filter;
use berth_core::labels::Labels;
use berth_core::mount::Mount;
use berth_core::snapshot::{Info, Snapshotter, Usage};
use berth_core::{Error, Result};
use berth_plugin::{InitContext, Instance, Registration, types};
use std::path::PathBuf;
use std::sync::Arc;
use tonic::codegen::BoxStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Response, Status};

fn from_status(s: Status) -> Error {
    use berth_core::error::ErrorKind;
    let kind = match s.code() {
        tonic::Code::InvalidArgument => ErrorKind::InvalidArgument,
        tonic::Code::NotFound => ErrorKind::NotFound,
        tonic::Code::AlreadyExists => ErrorKind::AlreadyExists,
        tonic::Code::FailedPrecondition => ErrorKind::FailedPrecondition,
        tonic::Code::Unavailable => ErrorKind::Unavailable,
        tonic::Code::Unimplemented => ErrorKind::NotImplemented,
        tonic::Code::Cancelled => ErrorKind::Canceled,
        tonic::Code::DeadlineExceeded => ErrorKind::DeadlineExceeded,
        _ => ErrorKind::Unknown,
    };
    Error::with_message(kind, s.message().to_string())
}

/// A channel to a unix socket (`unix://` optional), connected on first use: a proxy
/// plugin may start after berthd. The integration tests reach berthd with it too.
pub fn unix_channel(address: &str) -> Result<Channel> {
    let path = PathBuf::from(address.strip_prefix("unix://").unwrap_or(address));
    let endpoint = Endpoint::try_from("http://proxy.local")
        .map_err(|e| Error::invalid_argument(format!("proxy address {address}: {e}")))?;
    Ok(
        endpoint.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let p = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        })),
    )
}

/// A snapshotter served by another process.
#[derive(Clone)]
pub struct ProxySnapshotter {
    client: SnapshotsClient<Channel>,
    name: String,
    namespace: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl ProxySnapshotter {
    pub fn new(channel: Channel, name: &str) -> ProxySnapshotter {
        ProxySnapshotter {
            client: SnapshotsClient::new(channel),
            name: name.to_string(),
            namespace: None,
        }
    }

    /// Sends every call in namespace `ns` (the `containerd-namespace` header): the
    /// snapshotter `name` of a daemon (Berth or containerd) as that namespace sees it,
    /// rather than a bare backend.
    pub fn with_namespace(mut self, ns: &str) -> Result<ProxySnapshotter> {
        self.namespace = Some(ns.parse().map_err(|_| {
            Error::invalid_argument(format!("namespace {ns:?} is not a valid header value"))
        })?);
        Ok(self)
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(ns) = &self.namespace {
            request
                .metadata_mut()
                .insert(berth_core::namespaces::GRPC_HEADER, ns.clone());
        }
        request
    }
}

#[async_trait::async_trait]
impl Snapshotter for ProxySnapshotter {
    async fn stat(&self, key: &str) -> Result<Info> {
        let r = self
            .client
            .clone()
            .stat(self.request(api::StatSnapshotRequest {
                snapshotter: self.name.clone(),
                key: key.into(),
            }))
            .await
            .map_err(from_status)?;
        Ok(info_from_api(r.into_inner().info.unwrap_or_default()))
    }

    async fn update(&self, info: Info, fieldpaths: &[String]) -> Result<Info> {
        let r = self
            .client
            .clone()
            .update(self.request(api::UpdateSnapshotRequest {
                snapshotter: self.name.clone(),
                info: Some(info_to_api(info)),
                update_mask: Some(prost_types::FieldMask {
                    paths: fieldpaths.to_vec(),
                }),
            }))
            .await
            .map_err(from_status)?;
        Ok(info_from_api(r.into_inner().info.unwrap_or_default()))
    }

    async fn usage(&self, key: &str) -> Result<Usage> {
        let r = self
            .client
            .clone()
            .usage(self.request(api::UsageRequest {
                snapshotter: self.name.clone(),
                key: key.into(),
            }))
            .await
            .map_err(from_status)?
            .into_inner();
        Ok(Usage {
            size: r.size,
            inodes: r.inodes,
        })
    }

    async fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let r = self
            .client
            .clone()
            .mounts(self.request(api::MountsRequest {
                snapshotter: self.name.clone(),
                key: key.into(),
            }))
            .await
            .map_err(from_status)?;
        Ok(r.into_inner()
            .mounts
            .into_iter()
            .map(mount_from_api)
            .collect())
    }

    async fn prepare(&self, key: &str, parent: &str, labels: Labels) -> Result<Vec<Mount>> {
        let r = self
            .client
            .clone()
            .prepare(self.request(api::PrepareSnapshotRequest {
                snapshotter: self.name.clone(),
                key: key.into(),
                parent: parent.into(),
                labels: labels.into_iter().collect(),
            }))
            .await
            .map_err(from_status)?;
        Ok(r.into_inner()
            .mounts
            .into_iter()
            .map(mount_from_api)
            .collect())
    }

    async fn view(&self, key: &str, parent: &str, labels: Labels) -> Result<Vec<Mount>> {
        let r = self
            .client
            .clone()
            .view(self.request(api::ViewSnapshotRequest {
                snapshotter: self.name.clone(),
                key: key.into(),
                parent: parent.into(),
                labels: labels.into_iter().collect(),
            }))
            .await
            .map_err(from_status)?;
        Ok(r.into_inner()
            .mounts
            .into_iter()
            .map(mount_from_api)
            .collect())
    }

    async fn commit(&self, name: &str, key: &str, labels: Labels) -> Result<()> {
        self.client
            .clone()
            .commit(self.request(api::CommitSnapshotRequest {
                snapshotter: self.name.clone(),
                name: name.into(),
                key: key.into(),
                labels: labels.into_iter().collect(),
            }))
            .await
            .map_err(from_status)?;
        Ok(())
    }

    async fn remove(&self, key: &str) -> Result<()> {
        self.client
            .clone()
            .remove(self.request(api::RemoveSnapshotRequest {
                snapshotter: self.name.clone(),
                key: key.into(),
            }))
            .await
            .map_err(from_status)?;
        Ok(())
    }

    async fn walk(&self, filters: &[String]) -> Result<Vec<Info>> {
        let mut stream = self
            .client
            .clone()
            .list(self.request(api::ListSnapshotsRequest {
                snapshotter: self.name.clone(),
                filters: filters.to_vec(),
            }))
            .await
            .map_err(from_status)?
            .into_inner();
        let mut out = Vec::new();
        while let Some(batch) = stream.message().await.map_err(from_status)? {
            out.extend(batch.info.into_iter().map(info_from_api));
        }
        Ok(out)
    }

    async fn cleanup(&self) -> Result<()> {
        match self
            .client
            .clone()
            .cleanup(self.request(api::CleanupRequest {
                snapshotter: self.name.clone(),
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::Unimplemented => Ok(()),
            Err(s) => Err(from_status(s)),
        }
    }
}

/// `io.containerd.snapshotter.v1.<name>` forwarding to the snapshots service at
/// `address` (a `[proxy_plugins.<name>]` entry with `type = "snapshot"`). The instance
/// is an `Arc<dyn Snapshotter>` like every local snapshotter's.
pub fn snapshot_registration(name: &str, address: &str) -> Registration {
    let id: &'static str = Box::leak(name.to_string().into_boxed_str());
    let address = address.to_string();
    Registration::new(types::SNAPSHOT, id, move |ctx: InitContext| {
        let address = address.clone();
        async move {
            let channel = unix_channel(&address)?;
            ctx.export("address", address.clone());
            let snapshotter: Arc<dyn Snapshotter> = Arc::new(ProxySnapshotter::new(channel, id));
            Ok(Arc::new(snapshotter) as Instance)
        }
    })
}

/// Serves one snapshotter over the snapshots API, keys as they are (no namespaces; the
/// client's metadata layer namespaces them), whatever snapshotter name a request gives.
#[derive(Clone)]
pub struct BackendSnapshotsService {
    snapshotter: Arc<dyn Snapshotter>,
}

impl BackendSnapshotsService {
    pub fn new(snapshotter: Arc<dyn Snapshotter>) -> BackendSnapshotsService {
        BackendSnapshotsService { snapshotter }
    }

    pub fn into_server(self) -> snapshots_server::SnapshotsServer<BackendSnapshotsService> {
        snapshots_server::SnapshotsServer::new(self)
    }
}

#[tonic::async_trait]
impl snapshots_server::Snapshots for BackendSnapshotsService {
    async fn prepare(
        &self,
        request: Request<api::PrepareSnapshotRequest>,
    ) -> Result<Response<api::PrepareSnapshotResponse>, Status> {
        let r = request.into_inner();
        let mounts = self
            .snapshotter
            .prepare(&r.key, &r.parent, r.labels.into_iter().collect())
            .await
            .or_status()?;
        Ok(Response::new(api::PrepareSnapshotResponse {
            mounts: mounts.into_iter().map(mount_to_api).collect(),
        }))
    }

    async fn view(
        &self,
        request: Request<api::ViewSnapshotRequest>,
    ) -> Result<Response<api::ViewSnapshotResponse>, Status> {
        let r = request.into_inner();
        let mounts = self
            .snapshotter
            .view(&r.key, &r.parent, r.labels.into_iter().collect())
            .await
            .or_status()?;
        Ok(Response::new(api::ViewSnapshotResponse {
            mounts: mounts.into_iter().map(mount_to_api).collect(),
        }))
    }

    async fn mounts(
        &self,
        request: Request<api::MountsRequest>,
    ) -> Result<Response<api::MountsResponse>, Status> {
        let mounts = self
            .snapshotter
            .mounts(&request.get_ref().key)
            .await
            .or_status()?;
        Ok(Response::new(api::MountsResponse {
            mounts: mounts.into_iter().map(mount_to_api).collect(),
        }))
    }

    async fn commit(
        &self,
        request: Request<api::CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        self.snapshotter
            .commit(&r.name, &r.key, r.labels.into_iter().collect())
            .await
            .or_status()?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        request: Request<api::RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        self.snapshotter
            .remove(&request.get_ref().key)
            .await
            .or_status()?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        request: Request<api::StatSnapshotRequest>,
    ) -> Result<Response<api::StatSnapshotResponse>, Status> {
        let info = self
            .snapshotter
            .stat(&request.get_ref().key)
            .await
            .or_status()?;
        Ok(Response::new(api::StatSnapshotResponse {
            info: Some(info_to_api(info)),
        }))
    }

    async fn update(
        &self,
        request: Request<api::UpdateSnapshotRequest>,
    ) -> Result<Response<api::UpdateSnapshotResponse>, Status> {
        let r = request.into_inner();
        let info = r
            .info
            .ok_or_else(|| status(Error::invalid_argument("info must be set")))?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let info = self
            .snapshotter
            .update(info_from_api(info), &paths)
            .await
            .or_status()?;
        Ok(Response::new(api::UpdateSnapshotResponse {
            info: Some(info_to_api(info)),
        }))
    }

    async fn list(
        &self,
        request: Request<api::ListSnapshotsRequest>,
    ) -> Result<Response<BoxStream<api::ListSnapshotsResponse>>, Status> {
        let infos = self
            .snapshotter
            .walk(&request.get_ref().filters)
            .await
            .or_status()?;
        let batches: Vec<Result<api::ListSnapshotsResponse, Status>> = infos
            .chunks(100)
            .map(|c| {
                Ok(api::ListSnapshotsResponse {
                    info: c.iter().cloned().map(info_to_api).collect(),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(batches))))
    }

    async fn usage(
        &self,
        request: Request<api::UsageRequest>,
    ) -> Result<Response<api::UsageResponse>, Status> {
        let u = self
            .snapshotter
            .usage(&request.get_ref().key)
            .await
            .or_status()?;
        Ok(Response::new(api::UsageResponse {
            size: u.size,
            inodes: u.inodes,
        }))
    }

    async fn cleanup(
        &self,
        _request: Request<api::CleanupRequest>,
    ) -> Result<Response<()>, Status> {
        self.snapshotter.cleanup().await.or_status()?;
        Ok(Response::new(()))
    }
}

// ---------------------------------------------------------------------------------------
// Content proxies
// ---------------------------------------------------------------------------------------

/// Largest data chunk a proxy read or write moves per message: well under the 4 MiB
/// message limit a stock gRPC server applies.
const CONTENT_CHUNK: usize = 1 << 20;

/// Runs `call` (an RPC) on the daemon's runtime and waits for it on this thread.
/// [`BlobStore`] is synchronous and its callers run on the blocking pool (services,
/// collector, differ), so this thread may block; the call itself runs on the async
/// workers, which keeps it correct even if a caller forgets and blocks a worker.
fn wait_on<T: Send + 'static>(
    runtime: &tokio::runtime::Handle,
    call: impl std::future::Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    runtime.spawn(async move {
        let _ = tx.send(call.await);
    });
    rx.recv()
        .map_err(|_| Error::unavailable("content proxy: the call was dropped (shutting down)"))?
}

fn content_info_from_api(info: capi::Info) -> Result<ContentInfo> {
    Ok(ContentInfo {
        digest: Digest::parse(&info.digest)
            .map_err(|e| e.context("content proxy answered an invalid digest"))?,
        size: info.size,
        created_at: info
            .created_at
            .as_ref()
            .map(berth_api::timestamp::to_system_time)
            .unwrap_or(std::time::UNIX_EPOCH),
        updated_at: info
            .updated_at
            .as_ref()
            .map(berth_api::timestamp::to_system_time)
            .unwrap_or(std::time::UNIX_EPOCH),
        // The daemon's metadata layer keeps labels; a blob store has none.
        labels: Labels::new(),
    })
}

fn ingest_status_from_api(st: capi::Status) -> IngestStatus {
    IngestStatus {
        r#ref: st.r#ref,
        offset: st.offset,
        total: st.total,
        expected: st.expected,
        started_at: st
            .started_at
            .as_ref()
            .map(berth_api::timestamp::to_system_time)
            .unwrap_or(std::time::UNIX_EPOCH),
        updated_at: st
            .updated_at
            .as_ref()
            .map(berth_api::timestamp::to_system_time)
            .unwrap_or(std::time::UNIX_EPOCH),
    }
}

/// A blob store served by another process over containerd's content API (containerd's
/// `content/proxy`). The daemon's metadata layer wraps it exactly as it wraps the local
/// store: namespaces, labels, leases and garbage collection stay in the daemon; blobs and
/// ingests live in the other process.
pub struct ProxyContentStore {
    channel: Channel,
    client: ProxyClient,
    runtime: tokio::runtime::Handle,
    address: String,
    /// Shared with the per-namespace copies ([`BlobStore::for_namespace`]), so that the
    /// collector's sweep excludes their commits too.
    gc_lock: Arc<std::sync::RwLock<()>>,
}

/// Adds the `containerd-namespace` header of the request being served to every call.
#[derive(Clone, Default)]
struct NamespaceHeader(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for NamespaceHeader {
    fn call(&mut self, mut request: Request<()>) -> std::result::Result<Request<()>, Status> {
        if let Some(ns) = &self.0 {
            request
                .metadata_mut()
                .insert(berth_core::namespaces::GRPC_HEADER, ns.clone());
        }
        Ok(request)
    }
}

type ProxyClient =
    ContentClient<tonic::service::interceptor::InterceptedService<Channel, NamespaceHeader>>;

fn proxy_client(channel: Channel, namespace: NamespaceHeader) -> ProxyClient {
    ContentClient::with_interceptor(channel, namespace)
        .max_decoding_message_size(4 * CONTENT_CHUNK)
        .max_encoding_message_size(4 * CONTENT_CHUNK)
}

impl ProxyContentStore {
    /// `runtime` runs the RPCs (the daemon's); `address` names the proxy in errors.
    pub fn new(channel: Channel, runtime: tokio::runtime::Handle, address: &str) -> Self {
        ProxyContentStore {
            client: proxy_client(channel.clone(), NamespaceHeader::default()),
            channel,
            runtime,
            address: address.to_string(),
            gc_lock: Arc::new(std::sync::RwLock::new(())),
        }
    }

    fn wait<T: Send + 'static>(
        &self,
        call: impl std::future::Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        wait_on(&self.runtime, call)
    }

    fn client(&self) -> ProxyClient {
        self.client.clone()
    }
}

/// Maps a status from the proxy, naming the proxy when it is unreachable (the other
/// classes keep containerd's plain messages, which callers match on).
fn proxy_error(address: &str) -> impl Fn(Status) -> Error + '_ {
    move |s| {
        let err = from_status(s);
        if err.is(berth_core::error::ErrorKind::Unavailable) {
            err.context(format!("content proxy {address}"))
        } else {
            err
        }
    }
}

impl BlobStore for ProxyContentStore {
    fn info(&self, digest: &Digest) -> Result<ContentInfo> {
        let (mut client, address) = (self.client(), self.address.clone());
        let digest = digest.to_string();
        self.wait(async move {
            let r = client
                .info(capi::InfoRequest { digest })
                .await
                .map_err(proxy_error(&address))?;
            content_info_from_api(r.into_inner().info.unwrap_or_default())
        })
    }

    fn reader_at(&self, digest: &Digest) -> Result<Box<dyn ReaderAt>> {
        let info = self.info(digest)?;
        Ok(Box::new(ProxyReader {
            client: self.client(),
            runtime: self.runtime.clone(),
            address: self.address.clone(),
            digest: digest.to_string(),
            size: info.size,
            cache: std::sync::Mutex::new((0, Vec::new())),
        }))
    }

    fn delete(&self, digest: &Digest) -> Result<()> {
        let (mut client, address) = (self.client(), self.address.clone());
        let digest = digest.to_string();
        self.wait(async move {
            client
                .delete(capi::DeleteContentRequest { digest })
                .await
                .map_err(proxy_error(&address))?;
            Ok(())
        })
    }

    fn walk(&self, f: &mut dyn FnMut(ContentInfo) -> Result<()>) -> Result<()> {
        let (mut client, address) = (self.client(), self.address.clone());
        let infos = self.wait(async move {
            let mut stream = client
                .list(capi::ListContentRequest { filters: vec![] })
                .await
                .map_err(proxy_error(&address))?
                .into_inner();
            let mut out = Vec::new();
            while let Some(batch) = stream.message().await.map_err(proxy_error(&address))? {
                out.extend(batch.info);
            }
            Ok(out)
        })?;
        for info in infos {
            f(content_info_from_api(info)?)?;
        }
        Ok(())
    }

    fn writer(&self, r#ref: &str, total: i64) -> Result<Box<dyn Writer>> {
        let (mut client, address) = (self.client(), self.address.clone());
        let first = capi::WriteContentRequest {
            action: capi::WriteAction::Stat as i32,
            r#ref: r#ref.to_string(),
            total,
            ..Default::default()
        };
        let session = self.wait(async move {
            // The server answers the call once it has the first message (the ref), so
            // it is queued before the call is made.
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            tx.send(first)
                .await
                .map_err(|_| Error::unknown("content proxy: write stream closed"))?;
            let mut replies = client
                .write(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .map_err(proxy_error(&address))?
                .into_inner();
            let stat = replies
                .message()
                .await
                .map_err(proxy_error(&address))?
                .ok_or_else(|| Error::unknown("content proxy: write stream ended at open"))?;
            Ok(WriteSession { tx, replies, stat })
        })?;
        let stat = session.stat.clone();
        Ok(Box::new(ProxyWriter {
            runtime: self.runtime.clone(),
            address: self.address.clone(),
            r#ref: r#ref.to_string(),
            offset: stat.offset,
            total: stat.total,
            digest: Digest::parse(&stat.digest).ok(),
            digest_stale: false,
            started_at: stat
                .started_at
                .as_ref()
                .map(berth_api::timestamp::to_system_time)
                .unwrap_or_else(std::time::SystemTime::now),
            updated_at: stat
                .updated_at
                .as_ref()
                .map(berth_api::timestamp::to_system_time)
                .unwrap_or_else(std::time::SystemTime::now),
            session: Some(Arc::new(tokio::sync::Mutex::new(session))),
        }))
    }

    fn status(&self, r#ref: &str) -> Result<IngestStatus> {
        let (mut client, address) = (self.client(), self.address.clone());
        let r#ref = r#ref.to_string();
        self.wait(async move {
            let r = client
                .status(capi::StatusRequest { r#ref })
                .await
                .map_err(proxy_error(&address))?;
            Ok(ingest_status_from_api(
                r.into_inner().status.unwrap_or_default(),
            ))
        })
    }

    fn list_statuses(&self) -> Result<Vec<IngestStatus>> {
        let (mut client, address) = (self.client(), self.address.clone());
        self.wait(async move {
            let r = client
                .list_statuses(capi::ListStatusesRequest { filters: vec![] })
                .await
                .map_err(proxy_error(&address))?;
            Ok(r.into_inner()
                .statuses
                .into_iter()
                .map(ingest_status_from_api)
                .collect())
        })
    }

    fn abort(&self, r#ref: &str) -> Result<()> {
        let (mut client, address) = (self.client(), self.address.clone());
        let r#ref = r#ref.to_string();
        self.wait(async move {
            client
                .abort(capi::AbortRequest { r#ref })
                .await
                .map_err(proxy_error(&address))?;
            Ok(())
        })
    }

    fn gc_lock(&self) -> &std::sync::RwLock<()> {
        &self.gc_lock
    }

    fn for_namespace(&self, namespace: &str) -> Option<Arc<dyn BlobStore>> {
        // A namespace is validated before any request reaches the store; one that is not
        // a valid header value is sent without the header rather than failing here.
        let header = NamespaceHeader(namespace.parse().ok());
        Some(Arc::new(ProxyContentStore {
            channel: self.channel.clone(),
            client: proxy_client(self.channel.clone(), header),
            runtime: self.runtime.clone(),
            address: self.address.clone(),
            gc_lock: self.gc_lock.clone(),
        }))
    }
}

/// Reads a remote blob in chunks of [`CONTENT_CHUNK`], keeping the last chunk: readers
/// such as the differ's decompressor ask for a few KiB at a time, which would otherwise
/// be one round trip each.
struct ProxyReader {
    client: ProxyClient,
    runtime: tokio::runtime::Handle,
    address: String,
    digest: String,
    size: i64,
    /// (offset of the cached chunk, its bytes)
    cache: std::sync::Mutex<(i64, Vec<u8>)>,
}

impl ProxyReader {
    fn fetch(&self, offset: i64, size: i64) -> Result<Vec<u8>> {
        let (mut client, address) = (self.client.clone(), self.address.clone());
        let digest = self.digest.clone();
        wait_on(&self.runtime, async move {
            let mut stream = client
                .read(capi::ReadContentRequest {
                    digest,
                    offset,
                    size,
                })
                .await
                .map_err(proxy_error(&address))?
                .into_inner();
            let mut out = Vec::with_capacity(size as usize);
            while let Some(msg) = stream.message().await.map_err(proxy_error(&address))? {
                if msg.offset != out.len() as i64 {
                    return Err(Error::unknown(format!(
                        "content proxy {address}: read reply at offset {} where {} was expected",
                        msg.offset,
                        out.len()
                    )));
                }
                out.extend_from_slice(&msg.data);
            }
            Ok(out)
        })
    }
}

impl ReaderAt for ProxyReader {
    fn size(&self) -> i64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: i64) -> Result<usize> {
        if offset < 0 {
            return Err(Error::invalid_argument(format!(
                "read at negative offset {offset}"
            )));
        }
        if offset >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let (start, data) = &*cache;
        let hit = offset >= *start && offset < *start + data.len() as i64;
        if !hit {
            let want = (self.size - offset).min(CONTENT_CHUNK.max(buf.len()) as i64);
            let data = self.fetch(offset, want)?;
            if data.is_empty() {
                return Err(Error::unknown(format!(
                    "content proxy {}: short read of {} at {offset}",
                    self.address, self.digest
                )));
            }
            *cache = (offset, data);
        }
        let (start, data) = &*cache;
        let from = (offset - start) as usize;
        let n = buf.len().min(data.len() - from);
        buf[..n].copy_from_slice(&data[from..from + n]);
        Ok(n)
    }
}

/// One open Write call: requests go out through `tx`, replies come back in order.
struct WriteSession {
    tx: tokio::sync::mpsc::Sender<capi::WriteContentRequest>,
    replies: tonic::Streaming<capi::WriteContentResponse>,
    stat: capi::WriteContentResponse,
}

impl WriteSession {
    async fn round_trip(
        &mut self,
        request: capi::WriteContentRequest,
        address: &str,
    ) -> Result<capi::WriteContentResponse> {
        if self.tx.send(request).await.is_err() {
            // The server ended the call; its status says why.
            return Err(match self.replies.message().await {
                Err(s) => proxy_error(address)(s),
                Ok(_) => Error::unknown(format!("content proxy {address}: write stream closed")),
            });
        }
        self.replies
            .message()
            .await
            .map_err(proxy_error(address))?
            .ok_or_else(|| Error::unknown(format!("content proxy {address}: write stream ended")))
    }
}

/// An ingest written through the proxy. Each operation is one request and its reply on
/// the open Write call, as containerd's remote writer; the offset and digest of the last
/// reply answer `status` and `digest` without a round trip, unless that reply carried no
/// digest (berthd's Write replies do not): then `digest` asks with a Stat.
struct ProxyWriter {
    runtime: tokio::runtime::Handle,
    address: String,
    r#ref: String,
    offset: i64,
    total: i64,
    digest: Option<Digest>,
    /// Data was written since the last reply that carried a digest.
    digest_stale: bool,
    started_at: std::time::SystemTime,
    updated_at: std::time::SystemTime,
    session: Option<Arc<tokio::sync::Mutex<WriteSession>>>,
}

impl ProxyWriter {
    fn send(&mut self, request: capi::WriteContentRequest) -> Result<capi::WriteContentResponse> {
        let session = self.session.clone().ok_or_else(|| {
            Error::failed_precondition(format!("writer for {:?} is closed", self.r#ref))
        })?;
        let address = self.address.clone();
        let reply = wait_on(&self.runtime, async move {
            session.lock().await.round_trip(request, &address).await
        })?;
        self.offset = reply.offset;
        match Digest::parse(&reply.digest) {
            Ok(d) => {
                self.digest = Some(d);
                self.digest_stale = false;
            }
            Err(_) => self.digest_stale = true,
        }
        if let Some(t) = &reply.updated_at {
            self.updated_at = berth_api::timestamp::to_system_time(t);
        } else {
            self.updated_at = std::time::SystemTime::now();
        }
        Ok(reply)
    }
}

impl Writer for ProxyWriter {
    fn write(&mut self, data: &[u8]) -> Result<()> {
        for chunk in data.chunks(CONTENT_CHUNK) {
            let offset = self.offset;
            let reply = self.send(capi::WriteContentRequest {
                action: capi::WriteAction::Write as i32,
                offset,
                data: bytes::Bytes::copy_from_slice(chunk),
                ..Default::default()
            })?;
            if reply.offset != offset + chunk.len() as i64 {
                return Err(Error::unknown(format!(
                    "content proxy {}: short write of {:?} at {offset}: now at {}",
                    self.address, self.r#ref, reply.offset
                )));
            }
        }
        Ok(())
    }

    fn status(&self) -> Result<IngestStatus> {
        Ok(IngestStatus {
            r#ref: self.r#ref.clone(),
            offset: self.offset,
            total: self.total,
            expected: String::new(),
            started_at: self.started_at,
            updated_at: self.updated_at,
        })
    }

    fn digest(&self) -> Digest {
        if self.digest_stale
            && let Some(session) = self.session.clone()
        {
            let address = self.address.clone();
            let asked = wait_on(&self.runtime, async move {
                let stat = capi::WriteContentRequest {
                    action: capi::WriteAction::Stat as i32,
                    ..Default::default()
                };
                session.lock().await.round_trip(stat, &address).await
            });
            match asked.map(|reply| Digest::parse(&reply.digest)) {
                Ok(Ok(d)) => return d,
                Ok(Err(e)) => {
                    tracing::warn!(r#ref = %self.r#ref, error = %e, "content proxy: Stat reply without a digest")
                }
                Err(e) => {
                    tracing::warn!(r#ref = %self.r#ref, error = %e, "content proxy: asking for the digest")
                }
            }
        }
        // Before any reply carried one, nothing was written: the empty blob's digest.
        self.digest.clone().unwrap_or_else(|| {
            Digest::parse("sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
                .expect("valid digest")
        })
    }

    fn truncate(&mut self, size: i64) -> Result<()> {
        if size != 0 {
            return Err(Error::invalid_argument("Truncate: unsupported size"));
        }
        // The server restarts the ingest when the next write (or commit) is at offset 0.
        self.offset = 0;
        Ok(())
    }

    fn commit(&mut self, size: i64, expected: Option<&Digest>, labels: Labels) -> Result<()> {
        let offset = self.offset;
        let result = self.send(capi::WriteContentRequest {
            action: capi::WriteAction::Commit as i32,
            offset,
            total: size,
            expected: expected.map(|d| d.to_string()).unwrap_or_default(),
            labels: labels.into_iter().collect(),
            ..Default::default()
        });
        // A commit ends the call either way.
        self.session = None;
        let reply = result?;
        if size > 0 && reply.offset != size {
            return Err(Error::failed_precondition(format!(
                "{:?} failed size validation: {} != {size}",
                self.r#ref, reply.offset
            )));
        }
        if let Some(expected) = expected
            && reply.digest != expected.as_str()
        {
            return Err(Error::failed_precondition(format!(
                "{:?} unexpected digest {} != {expected}",
                self.r#ref, reply.digest
            )));
        }
        Ok(())
    }

    fn close(&mut self) -> Result<()> {
        // Ending the request stream makes the server close its writer, keeping the
        // ingest for a resume.
        self.session = None;
        Ok(())
    }
}

/// `io.containerd.content.v1.<name>` forwarding to the content service at `address` (a
/// `[proxy_plugins.<name>]` entry with `type = "content"`). The instance is an
/// `Arc<dyn BlobStore>` like the local store's; the metadata plugin prefers it over the
/// local one (see `berth_metadata::plugin`).
pub fn content_registration(name: &str, address: &str) -> Registration {
    let id: &'static str = Box::leak(name.to_string().into_boxed_str());
    let address = address.to_string();
    Registration::new(types::CONTENT, id, move |ctx: InitContext| {
        let address = address.clone();
        async move {
            let channel = unix_channel(&address)?;
            ctx.export("address", address.clone());
            let store: Arc<dyn BlobStore> = Arc::new(ProxyContentStore::new(
                channel,
                tokio::runtime::Handle::current(),
                &address,
            ));
            Ok(Arc::new(store) as Instance)
        }
    })
}

/// A [`BlobStore`] seen as a [`ContentStore`] that ignores scopes: what a content proxy's
/// far end serves (the proxying daemon namespaces, labels and collects). As containerd's
/// local store without a label store, `update` is refused.
pub struct UnscopedContent {
    blobs: Arc<dyn BlobStore>,
}

impl UnscopedContent {
    pub fn new(blobs: Arc<dyn BlobStore>) -> UnscopedContent {
        UnscopedContent { blobs }
    }
}

impl ContentStore for UnscopedContent {
    fn info(&self, _scope: &Scope, digest: &Digest) -> Result<ContentInfo> {
        self.blobs.info(digest)
    }

    fn update(&self, _scope: &Scope, info: ContentInfo, _paths: &[String]) -> Result<ContentInfo> {
        Err(Error::failed_precondition(format!(
            "update of {}: not supported on an immutable content store",
            info.digest
        )))
    }

    fn walk(
        &self,
        _scope: &Scope,
        filters: &[String],
        f: &mut dyn FnMut(ContentInfo) -> Result<()>,
    ) -> Result<()> {
        let filter = Filter::parse_all(filters)?;
        self.blobs.walk(&mut |info| {
            if filter.matches(&|p: &[String]| info.field(p)) {
                f(info)
            } else {
                Ok(())
            }
        })
    }

    fn delete(&self, _scope: &Scope, digest: &Digest) -> Result<()> {
        self.blobs.delete(digest)
    }

    fn reader_at(&self, _scope: &Scope, digest: &Digest) -> Result<Box<dyn ReaderAt>> {
        self.blobs.reader_at(digest)
    }

    fn writer(&self, _scope: &Scope, opts: WriterOpts) -> Result<Box<dyn Writer>> {
        validate_ref(&opts.r#ref)?;
        validate_total(opts.total)?;
        self.blobs.writer(&opts.r#ref, opts.total)
    }

    fn status(&self, _scope: &Scope, r#ref: &str) -> Result<IngestStatus> {
        self.blobs.status(r#ref)
    }

    fn list_statuses(&self, _scope: &Scope, filters: &[String]) -> Result<Vec<IngestStatus>> {
        let filter = Filter::parse_all(filters)?;
        Ok(self
            .blobs
            .list_statuses()?
            .into_iter()
            .filter(|st| {
                filter.matches(&|p: &[String]| match p.first().map(String::as_str) {
                    Some("ref") => Some(st.r#ref.clone()),
                    _ => None,
                })
            })
            .collect())
    }

    fn abort(&self, _scope: &Scope, r#ref: &str) -> Result<()> {
        self.blobs.abort(r#ref)
    }
}
