//! `berth pull`. By default through berthd's transfer service ([`daemon`]). With
//! `--local`, client side: the registry is contacted by this process (with berth-remotes,
//! honouring `hosts.toml`), blobs are streamed into berthd's content store through the
//! content API's `Write` stream under a lease ([`ContentSink`]), unpacked through the
//! snapshots and diff APIs (`crate::unpack`), and the image record is created through the
//! images API.

use crate::client::{Client, status_message};
use berth_api::services::content::v1::{
    AbortRequest, InfoRequest, WriteAction, WriteContentRequest, WriteContentResponse,
};
use berth_core::error::ErrorKind;
use berth_core::{Error, Result};
use berth_remotes::manifest;
use berth_remotes::pull::{BlobSink, BlobWriter};
use bytes::Bytes;
use futures::StreamExt;
use oci_spec::image::Descriptor;
use std::collections::HashMap;
use tokio::sync::mpsc;

const FLUSH_AT: usize = 1 << 20;

fn grpc_err(what: &str, s: tonic::Status) -> Error {
    let kind = match s.code() {
        tonic::Code::NotFound => ErrorKind::NotFound,
        tonic::Code::AlreadyExists => ErrorKind::AlreadyExists,
        tonic::Code::InvalidArgument => ErrorKind::InvalidArgument,
        tonic::Code::FailedPrecondition => ErrorKind::FailedPrecondition,
        tonic::Code::Unavailable => ErrorKind::Unavailable,
        tonic::Code::Unimplemented => ErrorKind::NotImplemented,
        tonic::Code::Cancelled => ErrorKind::Canceled,
        _ => ErrorKind::Unknown,
    };
    Error::with_message(kind, status_message(what, &s))
}

/// A [`BlobSink`] over berthd's content API.
pub struct ContentSink {
    pub client: Client,
    /// `containerd.io/distribution.source.<registry>` value for every blob.
    pub source: Option<(String, String)>,
}

struct ContentWriter {
    client: Client,
    r#ref: String,
    desc: Descriptor,
    tx: mpsc::Sender<WriteContentRequest>,
    responses: tonic::Streaming<WriteContentResponse>,
    /// Bytes the server holds.
    sent: u64,
    buf: Vec<u8>,
    /// Manifests and indexes are kept to label their children for the collector.
    keep: Option<Vec<u8>>,
    source: Option<(String, String)>,
    truncate_next: bool,
}

impl ContentWriter {
    async fn roundtrip(&mut self, req: WriteContentRequest) -> Result<WriteContentResponse> {
        let what = format!("write {}", self.r#ref);
        self.tx
            .send(req)
            .await
            .map_err(|_| Error::unavailable(format!("{what}: stream closed")))?;
        match self.responses.next().await {
            Some(Ok(r)) => Ok(r),
            Some(Err(s)) => Err(grpc_err(&what, s)),
            None => Err(Error::unavailable(format!("{what}: stream ended"))),
        }
    }

    async fn flush(&mut self) -> Result<()> {
        if self.buf.is_empty() && !self.truncate_next {
            return Ok(());
        }
        let data = std::mem::take(&mut self.buf);
        let n = data.len() as u64;
        let req = WriteContentRequest {
            action: WriteAction::Write as i32,
            r#ref: self.r#ref.clone(),
            total: self.desc.size() as i64,
            expected: self.desc.digest().to_string(),
            offset: self.sent as i64,
            data: data.into(),
            labels: HashMap::new(),
        };
        self.truncate_next = false;
        let resp = self.roundtrip(req).await?;
        self.sent += n;
        if resp.offset as u64 != self.sent {
            return Err(Error::unknown(format!(
                "write {}: server is at offset {}, expected {}",
                self.r#ref, resp.offset, self.sent
            )));
        }
        Ok(())
    }

    fn gc_labels(&self) -> HashMap<String, String> {
        let mut labels = HashMap::new();
        if let Some((k, v)) = &self.source {
            labels.insert(k.clone(), v.clone());
        }
        if let Some(body) = &self.keep {
            labels.extend(manifest::gc_labels(self.desc.media_type().as_ref(), body));
        }
        labels
    }
}

#[async_trait::async_trait]
impl BlobSink for ContentSink {
    async fn open(&self, desc: &Descriptor) -> Result<Option<Box<dyn BlobWriter>>> {
        // Another pull of the same blob holds the ingest: wait for it (up to 5 minutes).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
        loop {
            match self.try_open(desc).await {
                Err(e)
                    if e.is(ErrorKind::Unavailable)
                        && e.message().contains("locked")
                        && std::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                r => return r,
            }
        }
    }
}

impl ContentSink {
    async fn try_open(&self, desc: &Descriptor) -> Result<Option<Box<dyn BlobWriter>>> {
        let digest = desc.digest().to_string();
        match self
            .client
            .content()
            .info(self.client.request(InfoRequest {
                digest: digest.clone(),
            }))
            .await
        {
            Ok(_) => return Ok(None),
            Err(s) if s.code() == tonic::Code::NotFound => {}
            Err(s) => return Err(grpc_err(&format!("content info {digest}"), s)),
        }
        let r#ref = format!("berth-pull-{digest}");
        let (tx, rx) = mpsc::channel(2);
        // The first message goes out before the call: a server may wait for it before
        // answering with headers.
        tx.send(WriteContentRequest {
            action: WriteAction::Stat as i32,
            r#ref: r#ref.clone(),
            total: desc.size() as i64,
            expected: digest.clone(),
            ..Default::default()
        })
        .await
        .map_err(|_| Error::unknown("write stream closed"))?;
        let mut responses = self
            .client
            .content()
            .write(
                self.client
                    .request(tokio_stream::wrappers::ReceiverStream::new(rx)),
            )
            .await
            .map_err(|s| grpc_err(&format!("write {ref}"), s))?
            .into_inner();
        let stat = match responses.next().await {
            Some(Ok(r)) => r,
            Some(Err(s)) => return Err(grpc_err(&format!("write {ref}"), s)),
            None => return Err(Error::unavailable(format!("write {ref}: stream ended"))),
        };
        let keep = manifest::is_manifest_like(desc.media_type().as_ref()).then(Vec::new);
        Ok(Some(Box::new(ContentWriter {
            client: self.client.clone(),
            r#ref,
            desc: desc.clone(),
            tx,
            responses,
            sent: stat.offset.max(0) as u64,
            buf: Vec::new(),
            keep,
            source: self.source.clone(),
            truncate_next: false,
        })))
    }
}

#[async_trait::async_trait]
impl BlobWriter for ContentWriter {
    fn offset(&self) -> u64 {
        self.sent
    }
    fn verifies_digest_on_commit(&self) -> bool {
        // berthd's commit checks the expected digest, so an ingest left by an interrupted
        // pull is continued from its offset without reading it back.
        true
    }
    async fn read_written(
        &mut self,
    ) -> Result<Option<Box<dyn tokio::io::AsyncRead + Send + Unpin>>> {
        // The content API cannot read an unfinished ingest back.
        Ok(None)
    }
    async fn truncate(&mut self) -> Result<()> {
        // A write at offset 0 makes the server truncate the ingest.
        self.buf.clear();
        self.sent = 0;
        self.truncate_next = true;
        if let Some(k) = &mut self.keep {
            k.clear();
        }
        Ok(())
    }
    async fn write(&mut self, data: Bytes) -> Result<()> {
        if let Some(k) = &mut self.keep {
            k.extend_from_slice(&data);
        }
        self.buf.extend_from_slice(&data);
        if self.buf.len() >= FLUSH_AT {
            self.flush().await?;
        }
        Ok(())
    }
    async fn commit(mut self: Box<Self>, desc: &Descriptor) -> Result<()> {
        self.flush().await?;
        let labels = self.gc_labels();
        let req = WriteContentRequest {
            action: WriteAction::Commit as i32,
            r#ref: self.r#ref.clone(),
            total: desc.size() as i64,
            expected: desc.digest().to_string(),
            offset: self.sent as i64,
            data: Bytes::new(),
            labels,
        };
        match self.roundtrip(req).await {
            Ok(_) => Ok(()),
            Err(e) if e.is(ErrorKind::AlreadyExists) => Ok(()),
            Err(e) => Err(e),
        }
    }
    async fn abort(self: Box<Self>) -> Result<()> {
        let ContentWriter {
            client, r#ref, tx, ..
        } = *self;
        drop(tx);
        // Closing the stream releases the ref a moment later: retry while it is locked.
        let mut attempts = 0;
        loop {
            match client
                .content()
                .abort(client.request(AbortRequest {
                    r#ref: r#ref.clone(),
                }))
                .await
            {
                Ok(_) => return Ok(()),
                Err(s) if s.code() == tonic::Code::NotFound => return Ok(()),
                Err(s) if s.code() == tonic::Code::Unavailable && attempts < 50 => {
                    attempts += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(s) => return Err(grpc_err(&format!("abort {ref}"), s)),
            }
        }
    }
    async fn close(mut self: Box<Self>) -> Result<()> {
        let r = self.flush().await;
        drop(self);
        r
    }
}

/// `berth pull` through berthd's transfer service (the default): the daemon contacts the
/// registry, writes the content and unpacks; this process opens a progress stream and an
/// auth stream through the streaming service (as containerd 2.x's `ctr image pull`
/// does), answers credential requests from `--user` / the Docker config, and shows the
/// daemon's progress events. Dropping the call (Ctrl-C) makes the daemon cancel the pull.
pub mod daemon {
    use crate::client::Client;
    use crate::progress;
    use berth_api::any;
    use berth_api::services::streaming::v1::StreamInit;
    use berth_api::services::streaming::v1::streaming_client::StreamingClient;
    use berth_api::services::transfer::v1::transfer_client::TransferClient;
    use berth_api::services::transfer::v1::{TransferOptions, TransferRequest};
    use berth_api::types::transfer as tt;
    use berth_core::{Error, Result};
    use berth_remotes::auth::{CredentialsProvider, StaticCredentials};
    use berth_remotes::pull::{BlobKind, ProgressEvent, ProgressState};
    use berth_remotes::{Platform, Reference};
    use prost_types::Any;
    use std::collections::HashMap;
    use std::time::Instant;
    use tokio::sync::mpsc;

    /// What the daemon is asked to do.
    pub struct Request {
        pub reference: Reference,
        pub platform: Platform,
        pub hosts_dir: String,
        pub plain_http: bool,
        /// `None`: content only.
        pub snapshotter: Option<String>,
        pub credentials: StaticCredentials,
    }

    /// What the daemon reported about the pulled image.
    #[derive(Debug, Default)]
    pub struct Outcome {
        pub target: Option<berth_api::types::Descriptor>,
        pub manifest: Option<String>,
        pub size: i64,
    }

    /// Opens a stream as containerd 2.x's client does: `StreamInit{id}`, then the ack.
    async fn open_stream(
        client: &Client,
        id: &str,
    ) -> Result<(mpsc::Sender<Any>, tonic::Streaming<Any>)> {
        let (tx, rx) = mpsc::channel(16);
        tx.send(any::pack(&StreamInit { id: id.into() }))
            .await
            .map_err(|_| Error::unknown("stream closed"))?;
        let mut inbound = StreamingClient::new(client.channel())
            .stream(client.request(tokio_stream::wrappers::ReceiverStream::new(rx)))
            .await
            .map_err(|s| {
                super::grpc_err(
                    "open a stream (is berthd too old for daemon-side pulls? try --local)",
                    s,
                )
            })?
            .into_inner();
        inbound
            .message()
            .await
            .map_err(|s| super::grpc_err(&format!("stream {id}"), s))?
            .ok_or_else(|| Error::unavailable(format!("stream {id}: closed before its ack")))?;
        Ok((tx, inbound))
    }

    /// The blob kind of a ref key (`layer-sha256:…`); layers numbered by first sight
    /// (the daemon announces them in order).
    fn kind_of(name: &str, layers: &mut HashMap<String, usize>) -> Option<(BlobKind, String)> {
        let (prefix, digest) = name.split_once('-')?;
        let kind = match prefix {
            "index" => BlobKind::Index,
            "manifest" => BlobKind::Manifest,
            "config" => BlobKind::Config,
            "layer" => {
                let n = layers.len();
                BlobKind::Layer(*layers.entry(digest.to_string()).or_insert(n))
            }
            _ => return None,
        };
        Some((kind, digest.to_string()))
    }

    fn state_of(event: &str) -> Option<ProgressState> {
        Some(match event {
            "waiting" => ProgressState::Waiting,
            "downloading" => ProgressState::Downloading,
            "complete" => ProgressState::Done,
            "already exists" => ProgressState::Exists,
            "extracting" => ProgressState::Unpacking,
            "extracted" => ProgressState::Unpacked,
            _ => return None,
        })
    }

    pub async fn pull(client: &Client, req: Request, mode: progress::Mode) -> Result<Outcome> {
        let reference = req.reference.to_string();
        let progress_id = format!("progress-{}", uuid::Uuid::new_v4());
        let auth_id = format!("creds-{}", uuid::Uuid::new_v4());
        let (_keep_progress_open, mut progress_in) = open_stream(client, &progress_id).await?;
        let (auth_tx, mut auth_in) = open_stream(client, &auth_id).await?;
        let creds = req.credentials;
        tokio::spawn(async move {
            while let Ok(Some(m)) = auth_in.message().await {
                let Some(ask) = any::unpack::<tt::AuthRequest>(&m) else {
                    continue;
                };
                let resp = match creds.credentials(&ask.host) {
                    Some(c) if !c.identity_token.is_empty() => tt::AuthResponse {
                        auth_type: tt::AuthType::Refresh as i32,
                        secret: c.identity_token,
                        ..Default::default()
                    },
                    Some(c) => tt::AuthResponse {
                        auth_type: tt::AuthType::Credentials as i32,
                        username: c.username,
                        secret: c.password,
                        ..Default::default()
                    },
                    None => tt::AuthResponse {
                        auth_type: tt::AuthType::Refresh as i32,
                        ..Default::default()
                    },
                };
                if auth_tx.send(any::pack(&resp)).await.is_err() {
                    break;
                }
            }
        });
        let (etx, erx) = mpsc::unbounded_channel();
        let display = tokio::spawn(progress::display(erx, mode));
        let collector = tokio::spawn(async move {
            let mut outcome = Outcome::default();
            let mut layers = HashMap::new();
            let mut sizes: HashMap<String, i64> = HashMap::new();
            while let Ok(Some(m)) = progress_in.message().await {
                let Some(p) = any::unpack::<tt::Progress>(&m) else {
                    continue;
                };
                if p.event == "saved" {
                    outcome.target = p.desc.clone();
                    continue;
                }
                let (Some((kind, digest)), Some(state)) =
                    (kind_of(&p.name, &mut layers), state_of(&p.event))
                else {
                    continue;
                };
                match kind {
                    BlobKind::Manifest => outcome.manifest = Some(digest.clone()),
                    BlobKind::Config | BlobKind::Layer(_) => {
                        sizes.insert(digest.clone(), p.total);
                    }
                    BlobKind::Index => {}
                }
                let _ = etx.send(ProgressEvent {
                    digest,
                    media_type: p.desc.map(|d| d.media_type).unwrap_or_default(),
                    kind,
                    state,
                    offset: p.progress.max(0) as u64,
                    total: p.total.max(0) as u64,
                });
            }
            outcome.size = sizes.values().sum();
            outcome
        });

        let platform = berth_api::types::Platform {
            os: req.platform.os.clone(),
            architecture: req.platform.architecture.clone(),
            variant: req.platform.variant.clone(),
            ..Default::default()
        };
        let source = tt::OciRegistry {
            reference: reference.clone(),
            resolver: Some(tt::RegistryResolver {
                auth_stream: auth_id,
                host_dir: req.hosts_dir,
                default_scheme: if req.plain_http {
                    "http".into()
                } else {
                    String::new()
                },
                ..Default::default()
            }),
        };
        let destination = tt::ImageStore {
            name: reference.clone(),
            platforms: vec![platform.clone()],
            all_metadata: true,
            unpacks: req
                .snapshotter
                .map(|s| {
                    vec![tt::UnpackConfiguration {
                        platform: Some(platform),
                        snapshotter: s,
                    }]
                })
                .unwrap_or_default(),
            ..Default::default()
        };
        let result = TransferClient::new(client.channel())
            .transfer(client.request(TransferRequest {
                source: Some(any::pack(&source)),
                destination: Some(any::pack(&destination)),
                options: Some(TransferOptions {
                    progress_stream: progress_id,
                }),
            }))
            .await;
        // The daemon closes the progress stream once its last event is out.
        let outcome = collector
            .await
            .map_err(|e| Error::unknown(format!("progress task: {e}")))?;
        let _ = display.await;
        result.map_err(|s| super::grpc_err(&format!("pull {reference}"), s))?;
        Ok(outcome)
    }

    /// The closing line(s) of a successful pull.
    pub fn finish(mode: progress::Mode, name: &str, outcome: &Outcome, started: Instant) {
        let digest = outcome
            .target
            .as_ref()
            .map(|d| d.digest.clone())
            .unwrap_or_default();
        let secs = started.elapsed().as_secs_f64();
        match mode {
            progress::Mode::Quiet => println!("{name}"),
            progress::Mode::Json => println!(
                "{}",
                serde_json::json!({
                    "status": "done", "name": name, "digest": digest,
                    "manifest": outcome.manifest, "size": outcome.size, "seconds": secs,
                })
            ),
            progress::Mode::Bars => {
                println!(
                    "{name}: pulled {} in {secs:.1}s",
                    crate::table::human_size(outcome.size.max(0) as u64)
                );
                println!("digest: {digest}");
            }
        }
    }
}
