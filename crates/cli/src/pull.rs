//! `berth pull`, client side: the registry is contacted by this process (with
//! berth-remotes, honouring `hosts.toml`), blobs are streamed into berthd's content store
//! through the content API's `Write` stream under a lease, and the image record is
//! created through the images API. Nothing is unpacked yet.

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
            data,
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
            data: vec![],
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
