//! The pull pipeline into a `ContentStore` (what berthd will use): an interrupted pull
//! leaves a resumable ingest, the next pull resumes it with a range request and the
//! store's digest check on commit, and a corrupted ingest is discarded, never committed.

mod common;

use berth_core::content::{
    ContentStore, Digest, Info, ReaderAt, Scope, Status, Writer, WriterOpts,
};
use berth_core::error::ErrorKind;
use berth_core::labels::Labels;
use berth_core::{Error, Result};
use berth_remotes::pull::{self, ProgressState, PullOptions};
use berth_remotes::store_sink::ContentStoreSink;
use berth_remotes::{Platform, Reference};
use common::*;
use sha2::Digest as _;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

type Blobs = Arc<Mutex<HashMap<String, (Vec<u8>, Labels)>>>;

/// A content store in memory that checks digests on commit, like the real one.
#[derive(Default)]
struct MemStore {
    blobs: Blobs,
    ingests: Arc<Mutex<HashMap<String, Vec<u8>>>>,
    locked: Arc<Mutex<std::collections::HashSet<String>>>,
}

struct MemWriter {
    r#ref: String,
    blobs: Blobs,
    ingests: Arc<Mutex<HashMap<String, Vec<u8>>>>,
    locked: Arc<Mutex<std::collections::HashSet<String>>>,
}

impl Drop for MemWriter {
    fn drop(&mut self) {
        self.locked.lock().unwrap().remove(&self.r#ref);
    }
}

fn sha(data: &[u8]) -> Digest {
    Digest::sha256_from_bytes(&sha2::Sha256::digest(data))
}

impl Writer for MemWriter {
    fn write(&mut self, data: &[u8]) -> Result<()> {
        self.ingests
            .lock()
            .unwrap()
            .get_mut(&self.r#ref)
            .unwrap()
            .extend_from_slice(data);
        Ok(())
    }
    fn status(&self) -> Result<Status> {
        let n = self.ingests.lock().unwrap()[&self.r#ref].len() as i64;
        Ok(Status {
            r#ref: self.r#ref.clone(),
            offset: n,
            total: 0,
            expected: String::new(),
            started_at: SystemTime::now(),
            updated_at: SystemTime::now(),
        })
    }
    fn digest(&self) -> Digest {
        sha(&self.ingests.lock().unwrap()[&self.r#ref])
    }
    fn truncate(&mut self, size: i64) -> Result<()> {
        assert_eq!(size, 0);
        self.ingests
            .lock()
            .unwrap()
            .get_mut(&self.r#ref)
            .unwrap()
            .clear();
        Ok(())
    }
    fn commit(&mut self, size: i64, expected: Option<&Digest>, labels: Labels) -> Result<()> {
        let data = self.ingests.lock().unwrap()[&self.r#ref].clone();
        if size > 0 && data.len() as i64 != size {
            return Err(Error::failed_precondition(format!(
                "unexpected commit size {}, expected {size}",
                data.len()
            )));
        }
        let d = sha(&data);
        if let Some(e) = expected
            && *e != d
        {
            return Err(Error::failed_precondition(format!(
                "unexpected commit digest {d}, expected {e}"
            )));
        }
        self.ingests.lock().unwrap().remove(&self.r#ref);
        self.blobs
            .lock()
            .unwrap()
            .insert(d.to_string(), (data, labels));
        Ok(())
    }
    fn close(&mut self) -> Result<()> {
        Ok(())
    }
}

impl ContentStore for MemStore {
    fn info(&self, _: &Scope, digest: &Digest) -> Result<Info> {
        let blobs = self.blobs.lock().unwrap();
        let (data, labels) = blobs
            .get(digest.as_str())
            .ok_or_else(|| Error::not_found(digest))?;
        Ok(Info {
            digest: digest.clone(),
            size: data.len() as i64,
            created_at: SystemTime::now(),
            updated_at: SystemTime::now(),
            labels: labels.clone(),
        })
    }
    fn update(&self, _: &Scope, _: Info, _: &[String]) -> Result<Info> {
        Err(Error::not_implemented("update"))
    }
    fn walk(&self, _: &Scope, _: &[String], _: &mut dyn FnMut(Info) -> Result<()>) -> Result<()> {
        Err(Error::not_implemented("walk"))
    }
    fn delete(&self, _: &Scope, _: &Digest) -> Result<()> {
        Err(Error::not_implemented("delete"))
    }
    fn reader_at(&self, _: &Scope, _: &Digest) -> Result<Box<dyn ReaderAt>> {
        Err(Error::not_implemented("reader_at"))
    }
    fn writer(&self, _: &Scope, opts: WriterOpts) -> Result<Box<dyn Writer>> {
        if !self.locked.lock().unwrap().insert(opts.r#ref.clone()) {
            return Err(Error::unavailable(format!("ref {} locked", opts.r#ref)));
        }
        self.ingests
            .lock()
            .unwrap()
            .entry(opts.r#ref.clone())
            .or_default();
        Ok(Box::new(MemWriter {
            r#ref: opts.r#ref,
            blobs: self.blobs.clone(),
            ingests: self.ingests.clone(),
            locked: self.locked.clone(),
        }))
    }
    fn status(&self, _: &Scope, r#ref: &str) -> Result<Status> {
        Err(Error::not_implemented(r#ref))
    }
    fn list_statuses(&self, _: &Scope, _: &[String]) -> Result<Vec<Status>> {
        Ok(vec![])
    }
    fn abort(&self, _: &Scope, r#ref: &str) -> Result<()> {
        self.ingests
            .lock()
            .unwrap()
            .remove(r#ref)
            .map(|_| ())
            .ok_or_else(|| Error::not_found(r#ref))
    }
}

fn opts() -> PullOptions {
    PullOptions {
        platform: Platform::parse("linux/amd64").unwrap(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_pull_resumes_into_the_content_store() {
    let reg = Registry::start(RegistryConfig::default());
    let r = resolver(None, &[]);
    let reference = Reference::parse(&format!("{}/store/app:v1", reg.host())).unwrap();
    let img = make_image("amd64", vec![noise(200, 6 << 20), noise(201, 1000)]);
    push_image(&r, &reference, &img, true).await;
    let store = Arc::new(MemStore::default());
    let sink = ContentStoreSink::new(store.clone(), Scope::new("default"));
    let layer = img.layers[0].0.clone();

    // Interrupted mid-layer (as when the daemon dies): the ingest stays.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut o = opts();
    o.progress = Some(tx);
    o.max_concurrent_downloads = 1;
    let cancel = o.cancel.clone();
    let watcher = tokio::spawn(async move {
        while let Some(ev) = rx.recv().await {
            if ev.kind == pull::BlobKind::Layer(0) && ev.offset > (2 << 20) {
                cancel.cancel();
                break;
            }
        }
    });
    let e = pull::pull(&r, &reference, &sink, &o).await.unwrap_err();
    assert!(e.is(ErrorKind::Canceled), "{e}");
    watcher.await.unwrap();
    drop(o);
    let ingest_ref = format!("pull-{}", layer.digest());
    let partial = store
        .ingests
        .lock()
        .unwrap()
        .get(&ingest_ref)
        .map(Vec::len)
        .unwrap_or(0) as u64;
    assert!(
        partial >= (1 << 20) && partial < layer.size(),
        "partial {partial}"
    );
    assert!(
        !store
            .blobs
            .lock()
            .unwrap()
            .contains_key(&layer.digest().to_string())
    );

    // The next pull resumes at the ingest's offset.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut o = opts();
    o.progress = Some(tx);
    pull::pull(&r, &reference, &sink, &o).await.unwrap();
    drop(o);
    let mut resumed = None;
    while let Some(ev) = rx.recv().await {
        if ev.state == ProgressState::Resuming {
            resumed = Some(ev.offset);
        }
    }
    assert_eq!(resumed, Some(partial));
    let blobs = store.blobs.lock().unwrap();
    assert_eq!(
        blobs[&layer.digest().to_string()].0,
        img.layers[0].1.as_ref()
    );
    // The manifest carries the collector's references to its children.
    let (_, labels) = &blobs[&img.manifest.0.digest().to_string()];
    assert_eq!(
        labels["containerd.io/gc.ref.content.config"],
        img.config.0.digest().to_string()
    );
    assert_eq!(
        labels["containerd.io/gc.ref.content.l.0"],
        layer.digest().to_string()
    );
    assert_eq!(
        labels["containerd.io/gc.ref.content.l.1"],
        img.layers[1].0.digest().to_string()
    );
    assert!(store.ingests.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_ingest_is_discarded_not_committed() {
    let reg = Registry::start(RegistryConfig::default());
    let r = resolver(None, &[]);
    let reference = Reference::parse(&format!("{}/store/bad:v1", reg.host())).unwrap();
    let img = make_image("amd64", vec![noise(210, 200_000)]);
    push_image(&r, &reference, &img, true).await;
    let store = Arc::new(MemStore::default());
    let layer = img.layers[0].0.clone();
    // An ingest with wrong bytes, as a crash during a write could leave.
    store
        .ingests
        .lock()
        .unwrap()
        .insert(format!("pull-{}", layer.digest()), vec![0xee; 50_000]);
    let sink = ContentStoreSink::new(store.clone(), Scope::new("default"));
    let e = pull::pull(&r, &reference, &sink, &opts())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("unexpected commit digest"), "{e}");
    assert!(
        store.ingests.lock().unwrap().is_empty(),
        "the bad ingest is aborted"
    );
    assert!(
        !store
            .blobs
            .lock()
            .unwrap()
            .contains_key(&layer.digest().to_string())
    );
    assert!(
        !store
            .blobs
            .lock()
            .unwrap()
            .contains_key(&img.manifest.0.digest().to_string())
    );
    // Then a fresh pull succeeds.
    pull::pull(&r, &reference, &sink, &opts()).await.unwrap();
    assert_eq!(
        store.blobs.lock().unwrap()[&layer.digest().to_string()].0,
        img.layers[0].1.as_ref()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pulls_of_shared_blobs_wait_for_each_other() {
    let reg = Registry::start(RegistryConfig::default());
    let r = resolver(None, &[]);
    let reference = Reference::parse(&format!("{}/store/twice:v1", reg.host())).unwrap();
    let img = make_image("amd64", vec![noise(220, 4 << 20), noise(221, 100)]);
    push_image(&r, &reference, &img, true).await;
    let store = Arc::new(MemStore::default());
    let sink = ContentStoreSink::new(store.clone(), Scope::new("default"));
    let (o1, o2) = (opts(), opts());
    let (a, b) = tokio::join!(
        pull::pull(&r, &reference, &sink, &o1),
        pull::pull(&r, &reference, &sink, &o2)
    );
    a.unwrap();
    b.unwrap();
    assert_eq!(
        store.blobs.lock().unwrap()[&img.layers[0].0.digest().to_string()].0,
        img.layers[0].1.as_ref()
    );
    assert!(store.ingests.lock().unwrap().is_empty());
}
