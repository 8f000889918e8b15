//! A [`BlobSink`] over Berth's namespaced [`ContentStore`] (what the daemon pulls into).
//!
//! Each blob is written to the ingest `pull-<digest>` of the scope's namespace (under the
//! scope's lease), in 1 MiB batches on a blocking thread. The store's writer checks the
//! digest on commit, so an ingest left by an interrupted pull (a killed daemon) is
//! resumed from its offset without re-reading it. Manifests and indexes are committed with
//! containerd's `containerd.io/gc.ref.content.*` labels so the collector keeps their
//! children, plus any `extra_labels` (e.g. `containerd.io/distribution.source.*`).

use crate::manifest;
use crate::pull::{BlobSink, BlobWriter};
use berth_core::content::{ContentStore, Digest, Scope, Writer, WriterOpts};
use berth_core::error::ErrorKind;
use berth_core::labels::Labels;
use berth_core::{Error, Result};
use bytes::Bytes;
use oci_spec::image::Descriptor;
use std::sync::Arc;

const BATCH: usize = 1 << 20;
/// How long `open` waits for another writer of the same ingest.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(300);

pub struct ContentStoreSink {
    pub store: Arc<dyn ContentStore>,
    pub scope: Scope,
    pub extra_labels: Labels,
}

impl ContentStoreSink {
    pub fn new(store: Arc<dyn ContentStore>, scope: Scope) -> ContentStoreSink {
        ContentStoreSink {
            store,
            scope,
            extra_labels: Labels::new(),
        }
    }
}

struct StoreWriter {
    store: Arc<dyn ContentStore>,
    scope: Scope,
    r#ref: String,
    writer: Option<Box<dyn Writer>>,
    offset: u64,
    buf: Vec<u8>,
    keep: Option<Vec<u8>>,
    extra_labels: Labels,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::unknown(format!("blocking task: {e}")))?
}

impl StoreWriter {
    async fn flush(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let data = std::mem::take(&mut self.buf);
        let mut w = self
            .writer
            .take()
            .ok_or_else(|| Error::unknown("writer closed"))?;
        let (w, r) = tokio::task::spawn_blocking(move || {
            let r = w.write(&data);
            (w, r)
        })
        .await
        .map_err(|e| Error::unknown(format!("blocking task: {e}")))?;
        self.writer = Some(w);
        r
    }
}

#[async_trait::async_trait]
impl BlobSink for ContentStoreSink {
    async fn open(&self, desc: &Descriptor) -> Result<Option<Box<dyn BlobWriter>>> {
        let digest = Digest::parse(desc.digest().as_ref())?;
        let size = desc.size() as i64;
        let r#ref = format!("pull-{digest}");
        // Another pull of the same blob holds the ingest: wait for it to finish or give up.
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        let (writer, offset) = loop {
            let (store, scope, rf, digest) = (
                self.store.clone(),
                self.scope.clone(),
                r#ref.clone(),
                digest.clone(),
            );
            let opened = blocking(move || {
                match store.info(&scope, &digest) {
                    Ok(_) => return Ok(None),
                    Err(e) if e.is(ErrorKind::NotFound) => {}
                    Err(e) => return Err(e),
                }
                let w = store.writer(
                    &scope,
                    WriterOpts {
                        r#ref: rf,
                        total: size,
                        expected: Some(digest),
                    },
                )?;
                let offset = w.status()?.offset.max(0) as u64;
                Ok(Some((w, offset)))
            })
            .await;
            match opened {
                Ok(Some(x)) => break x,
                Ok(None) => return Ok(None),
                // Committed by someone else between the check and the writer.
                Err(e) if e.is(ErrorKind::AlreadyExists) => return Ok(None),
                Err(e) if e.is(ErrorKind::Unavailable) && std::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
            }
        };
        let keep = manifest::is_manifest_like(desc.media_type().as_ref()).then(Vec::new);
        Ok(Some(Box::new(StoreWriter {
            store: self.store.clone(),
            scope: self.scope.clone(),
            r#ref,
            writer: Some(writer),
            offset,
            buf: Vec::new(),
            keep,
            extra_labels: self.extra_labels.clone(),
        })))
    }
}

#[async_trait::async_trait]
impl BlobWriter for StoreWriter {
    fn offset(&self) -> u64 {
        self.offset
    }
    fn verifies_digest_on_commit(&self) -> bool {
        true
    }
    async fn read_written(
        &mut self,
    ) -> Result<Option<Box<dyn tokio::io::AsyncRead + Send + Unpin>>> {
        Ok(None)
    }
    async fn truncate(&mut self) -> Result<()> {
        self.buf.clear();
        if let Some(k) = &mut self.keep {
            k.clear();
        }
        let mut w = self
            .writer
            .take()
            .ok_or_else(|| Error::unknown("writer closed"))?;
        let (w, r) = tokio::task::spawn_blocking(move || {
            let r = w.truncate(0);
            (w, r)
        })
        .await
        .map_err(|e| Error::unknown(format!("blocking task: {e}")))?;
        self.writer = Some(w);
        self.offset = 0;
        r
    }
    async fn write(&mut self, data: Bytes) -> Result<()> {
        if let Some(k) = &mut self.keep {
            k.extend_from_slice(&data);
        }
        self.buf.extend_from_slice(&data);
        self.offset += data.len() as u64;
        if self.buf.len() >= BATCH {
            self.flush().await?;
        }
        Ok(())
    }
    async fn commit(mut self: Box<Self>, desc: &Descriptor) -> Result<()> {
        self.flush().await?;
        let mut labels = self.extra_labels.clone();
        if let Some(body) = &self.keep {
            labels.extend(manifest::gc_labels(desc.media_type().as_ref(), body));
        }
        let mut w = self
            .writer
            .take()
            .ok_or_else(|| Error::unknown("writer closed"))?;
        let digest = Digest::parse(desc.digest().as_ref())?;
        let size = desc.size() as i64;
        match blocking(move || w.commit(size, Some(&digest), labels)).await {
            Err(e) if e.is(ErrorKind::AlreadyExists) => Ok(()),
            r => r,
        }
    }
    async fn abort(mut self: Box<Self>) -> Result<()> {
        let w = self.writer.take();
        let (store, scope, r#ref) = (self.store.clone(), self.scope.clone(), self.r#ref.clone());
        blocking(move || {
            drop(w);
            match store.abort(&scope, &r#ref) {
                Err(e) if e.is(ErrorKind::NotFound) => Ok(()),
                r => r,
            }
        })
        .await
    }
    async fn close(mut self: Box<Self>) -> Result<()> {
        let r = self.flush().await;
        if let Some(mut w) = self.writer.take() {
            blocking(move || w.close()).await?;
        }
        r
    }
}
