//! Namespaced content: which namespace holds which blob, and the ingests in progress, as
//! containerd's `metadata/content.go`.
//!
//! Tables: `content_blobs` (`"{ns}/{digest}"` → size, times, labels) and
//! `content_ingests` (`"{ns}/{ref}"` → the local ingest's ref, the expected digest when the
//! write will commit without data, and an expiry when the ingest is not leased).
//!
//! Ordering for crash safety: a blob is renamed into place (fsynced) before its record is
//! committed, so a record always points at a complete blob; a blob without a record is
//! garbage the collector removes.

use crate::MetadataStore;
use crate::db::{get_json, to_json};
use crate::leases::{add_to_lease, remove_from_lease};
use crate::util::{Table, e, nanos, open_read, time};
use berth_core::content::{
    BlobStore, ContentStore, Digest, Info, ReaderAt, Scope, Status, Writer, WriterOpts,
    validate_ref, validate_total,
};
use berth_core::filters::Filter;
use berth_core::labels::{self, Labels};
use berth_core::{Error, Result, fieldpath};
use redb::{ReadableTable, WriteTransaction};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub(crate) const BLOBS: Table = Table::new("content_blobs");
pub(crate) const INGESTS: Table = Table::new("content_ingests");

/// How long an ingest that no lease holds survives the collector.
pub const INGEST_EXPIRY: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct BlobRecord {
    pub size: i64,
    pub created_at: u64,
    pub updated_at: u64,
    #[serde(default)]
    pub labels: Labels,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct IngestRecord {
    /// The ref of the ingest in the local store.
    pub bref: String,
    #[serde(default)]
    pub expected: Option<String>,
    #[serde(default)]
    pub expire_at: Option<u64>,
}

fn key(ns: &str, id: &str) -> String {
    format!("{ns}/{id}")
}

fn record_info(digest: &Digest, r: BlobRecord) -> Info {
    Info {
        digest: digest.clone(),
        size: r.size,
        created_at: time(r.created_at),
        updated_at: time(r.updated_at),
        labels: r.labels,
    }
}

/// The namespaced content store over the metadata store and the attached blob store.
pub struct NamespacedContent {
    md: Arc<MetadataStore>,
    blobs: Arc<dyn BlobStore>,
    shared: bool,
}

impl NamespacedContent {
    pub(crate) fn new(md: Arc<MetadataStore>) -> NamespacedContent {
        let (blobs, shared) = md.ext.blobs.get().cloned().expect("blob store attached");
        NamespacedContent { md, blobs, shared }
    }

    /// The blob store as requests of namespace `ns` see it (a content proxy is told the
    /// namespace; see [`BlobStore::for_namespace`]).
    fn blobs_in(&self, ns: &str) -> Arc<dyn BlobStore> {
        self.blobs
            .for_namespace(ns)
            .unwrap_or_else(|| self.blobs.clone())
    }

    fn not_found(digest: &Digest) -> Error {
        Error::not_found(format!("content digest {digest}"))
    }

    fn check_access(&self, ns: &str, digest: &Digest) -> Result<BlobRecord> {
        self.md.read(|tx| {
            let Some(t) = open_read(tx, BLOBS)? else {
                return Err(Self::not_found(digest));
            };
            get_json::<BlobRecord>(&t, &key(ns, digest.as_str()))?
                .ok_or_else(|| Self::not_found(digest))
        })
    }

    fn ingest(&self, ns: &str, r#ref: &str) -> Result<IngestRecord> {
        self.md.read(|tx| {
            let record = match open_read(tx, INGESTS)? {
                Some(t) => get_json::<IngestRecord>(&t, &key(ns, r#ref))?,
                None => None,
            };
            record.ok_or_else(|| Error::not_found(format!("reference {ref}")))
        })
    }

    fn ingest_status(&self, ns: &str, r#ref: &str, record: &IngestRecord) -> Result<Status> {
        let blobs = self.blobs_in(ns);
        if let Some(expected) = &record.expected {
            // A shared write that has not needed data yet.
            let digest = Digest::parse(expected)?;
            let info = blobs.info(&digest)?;
            return Ok(Status {
                r#ref: r#ref.to_string(),
                offset: info.size,
                total: info.size,
                expected: expected.clone(),
                started_at: info.created_at,
                updated_at: info.created_at,
            });
        }
        let mut st = blobs.status(&record.bref)?;
        st.r#ref = r#ref.to_string();
        Ok(st)
    }
}

fn status_field(st: &Status, path: &[String]) -> Option<String> {
    match path.first().map(String::as_str) {
        Some("ref") => Some(st.r#ref.clone()),
        _ => None,
    }
}

impl ContentStore for NamespacedContent {
    fn info(&self, scope: &Scope, digest: &Digest) -> Result<Info> {
        let r = self.check_access(&scope.namespace, digest)?;
        Ok(record_info(digest, r))
    }

    fn update(&self, scope: &Scope, info: Info, paths: &[String]) -> Result<Info> {
        let ns = &scope.namespace;
        let digest = info.digest.clone();
        self.md.write(|tx| {
            let mut t = tx.open_table(BLOBS).map_err(e("content"))?;
            let k = key(ns, digest.as_str());
            let mut r: BlobRecord = get_json(&t, &k)?.ok_or_else(|| Self::not_found(&digest))?;
            if paths.is_empty() {
                r.labels = info.labels.clone();
            } else {
                let others = fieldpath::apply_labels(&mut r.labels, &info.labels, paths);
                if let Some(path) = others.first() {
                    return Err(Error::invalid_argument(format!(
                        "cannot update {path:?} field on content info {:?}",
                        digest.as_str()
                    )));
                }
            }
            r.labels.retain(|_, v| !v.is_empty());
            labels::validate_all(&r.labels).map_err(|err| err.context("info.Labels"))?;
            r.updated_at = nanos(SystemTime::now());
            t.insert(k.as_str(), to_json(&r)?.as_slice())
                .map_err(e("put"))?;
            Ok(record_info(&digest, r))
        })
    }

    fn walk(
        &self,
        scope: &Scope,
        filters: &[String],
        f: &mut dyn FnMut(Info) -> Result<()>,
    ) -> Result<()> {
        let filter = Filter::parse_all(filters)?;
        let infos = self.md.read(|tx| {
            let Some(t) = open_read(tx, BLOBS)? else {
                return Ok(Vec::new());
            };
            let (start, end) = crate::namespace_range(&scope.namespace);
            let mut out = Vec::new();
            for entry in t.range(start.as_str()..end.as_str()).map_err(e("range"))? {
                let (k, v) = entry.map_err(e("range"))?;
                let Ok(digest) = Digest::parse(&k.value()[start.len()..]) else {
                    continue;
                };
                let r: BlobRecord =
                    serde_json::from_slice(v.value()).map_err(e("decoding content"))?;
                let info = record_info(&digest, r);
                if filter.matches(&|p: &[String]| info.field(p)) {
                    out.push(info);
                }
            }
            Ok(out)
        })?;
        infos.into_iter().try_for_each(f)
    }

    fn delete(&self, scope: &Scope, digest: &Digest) -> Result<()> {
        let ns = &scope.namespace;
        let _guard = self.blobs.gc_lock().read().unwrap();
        self.md.write(|tx| {
            let mut t = tx.open_table(BLOBS).map_err(e("content"))?;
            if t.remove(key(ns, digest.as_str()).as_str())
                .map_err(e("delete"))?
                .is_none()
            {
                return Err(Self::not_found(digest));
            }
            drop(t);
            if let Some(lease) = &scope.lease {
                remove_from_lease(tx, ns, lease, "content", digest.as_str())?;
            }
            Ok(()).inspect(|_| self.md.mark_content_dirty())
        })?;
        Ok(())
    }

    fn reader_at(&self, scope: &Scope, digest: &Digest) -> Result<Box<dyn ReaderAt>> {
        self.check_access(&scope.namespace, digest)?;
        self.blobs_in(&scope.namespace).reader_at(digest)
    }

    fn writer(&self, scope: &Scope, opts: WriterOpts) -> Result<Box<dyn Writer>> {
        validate_ref(&opts.r#ref)?;
        validate_total(opts.total)?;
        let ns = scope.namespace.clone();
        let mut total = opts.total;
        let _guard = self.blobs.gc_lock().read().unwrap();
        enum Outcome {
            Exists,
            Open(String, bool),
        }
        let outcome = self.md.write(|tx| {
            let mut shared = false;
            if let Some(expected) = &opts.expected {
                let t = tx.open_table(BLOBS).map_err(e("content"))?;
                let exists = t
                    .get(key(&ns, expected.as_str()).as_str())
                    .map_err(e("get"))?
                    .is_some();
                drop(t);
                if exists {
                    if let Some(lease) = &scope.lease {
                        add_to_lease(tx, &ns, lease, "content", expected.as_str())
                            .map_err(|err| err.context("unable to lease content"))?;
                    }
                    return Ok(Outcome::Exists);
                }
                if self.shared
                    && let Ok(info) = self.blobs_in(&ns).info(expected)
                    && (total == 0 || total == info.size)
                {
                    shared = true;
                    total = info.size;
                }
            }
            MetadataStore::ensure_namespace(tx, &ns)?;
            let mut t = tx.open_table(INGESTS).map_err(e("ingests"))?;
            let k = key(&ns, &opts.r#ref);
            let existing: Option<IngestRecord> = get_json(&t, &k)?;
            let leased = match &scope.lease {
                Some(lease) => {
                    add_to_lease(tx, &ns, lease, "ingests", &opts.r#ref)?;
                    true
                }
                None => false,
            };
            let mut record = existing.unwrap_or_else(|| IngestRecord {
                bref: format!("{ns}-{}-{}", nanos(SystemTime::now()), opts.r#ref),
                expected: None,
                expire_at: None,
            });
            if !leased {
                record.expire_at = Some(nanos(SystemTime::now() + INGEST_EXPIRY));
            }
            record.expected = if shared {
                opts.expected.as_ref().map(|d| d.to_string())
            } else {
                None
            };
            t.insert(k.as_str(), to_json(&record)?.as_slice())
                .map_err(e("put"))?;
            Ok(Outcome::Open(record.bref, shared))
        })?;
        let (bref, shared) = match outcome {
            Outcome::Exists => {
                let d = opts.expected.expect("exists implies expected");
                return Err(Error::already_exists(format!("content {d}")));
            }
            Outcome::Open(bref, shared) => (bref, shared),
        };
        let inner = if shared {
            None
        } else {
            Some(self.blobs_in(&ns).writer(&bref, total)?)
        };
        Ok(Box::new(NamespacedWriter {
            md: self.md.clone(),
            blobs: self.blobs_in(&ns),
            scope: scope.clone(),
            r#ref: opts.r#ref,
            bref,
            inner,
            total,
            expected: opts.expected,
            started: SystemTime::now(),
        }))
    }

    fn status(&self, scope: &Scope, r#ref: &str) -> Result<Status> {
        let record = self.ingest(&scope.namespace, r#ref)?;
        self.ingest_status(&scope.namespace, r#ref, &record)
    }

    fn list_statuses(&self, scope: &Scope, filters: &[String]) -> Result<Vec<Status>> {
        let filter = Filter::parse_all(filters)?;
        let records = self.md.read(|tx| {
            let Some(t) = open_read(tx, INGESTS)? else {
                return Ok(Vec::new());
            };
            let (start, end) = crate::namespace_range(&scope.namespace);
            let mut out = Vec::new();
            for entry in t.range(start.as_str()..end.as_str()).map_err(e("range"))? {
                let (k, v) = entry.map_err(e("range"))?;
                let r: IngestRecord =
                    serde_json::from_slice(v.value()).map_err(e("decoding ingest"))?;
                out.push((k.value()[start.len()..].to_string(), r));
            }
            Ok(out)
        })?;
        let mut statuses = Vec::new();
        for (r#ref, record) in records {
            match self.ingest_status(&scope.namespace, &r#ref, &record) {
                Ok(st) => {
                    if filter.matches(&|p: &[String]| status_field(&st, p)) {
                        statuses.push(st)
                    }
                }
                Err(err) if err.is(berth_core::error::ErrorKind::NotFound) => {}
                Err(err) => return Err(err),
            }
        }
        Ok(statuses)
    }

    fn abort(&self, scope: &Scope, r#ref: &str) -> Result<()> {
        let ns = &scope.namespace;
        let _guard = self.blobs.gc_lock().read().unwrap();
        let record = self.md.write(|tx| {
            let mut t = tx.open_table(INGESTS).map_err(e("ingests"))?;
            let record: IngestRecord = get_json(&t, &key(ns, r#ref))?
                .ok_or_else(|| Error::not_found(format!("reference {ref}")))?;
            t.remove(key(ns, r#ref).as_str()).map_err(e("delete"))?;
            drop(t);
            if let Some(lease) = &scope.lease {
                remove_from_lease(tx, ns, lease, "ingests", r#ref)?;
            }
            Ok(record)
        })?;
        if record.expected.is_none() {
            match self.blobs_in(ns).abort(&record.bref) {
                Err(err) if !err.is(berth_core::error::ErrorKind::NotFound) => return Err(err),
                _ => {}
            }
        }
        Ok(())
    }
}

struct NamespacedWriter {
    md: Arc<MetadataStore>,
    blobs: Arc<dyn BlobStore>,
    scope: Scope,
    r#ref: String,
    bref: String,
    inner: Option<Box<dyn Writer>>,
    total: i64,
    expected: Option<Digest>,
    started: SystemTime,
}

impl NamespacedWriter {
    /// Turns a shared (data-less) write into a real one, copying `size` bytes of the
    /// existing blob first.
    fn create_and_copy(&mut self, size: i64) -> Result<()> {
        let mut w = self.blobs.writer(&self.bref, size)?;
        if size > 0 {
            let digest = self.expected.clone().expect("shared write has a digest");
            let ra = self.blobs.reader_at(&digest)?;
            let mut buf = vec![0u8; 1 << 20];
            let mut off = 0i64;
            while off < size {
                let want = ((size - off) as usize).min(buf.len());
                let n = ra.read_at(&mut buf[..want], off)?;
                if n == 0 {
                    return Err(Error::unknown("short read copying shared content"));
                }
                w.write(&buf[..n])?;
                off += n as i64;
            }
        }
        self.md.write(|tx| {
            let mut t = tx.open_table(INGESTS).map_err(e("ingests"))?;
            let k = key(&self.scope.namespace, &self.r#ref);
            if let Some(mut r) = get_json::<IngestRecord>(&t, &k)? {
                r.expected = None;
                t.insert(k.as_str(), to_json(&r)?.as_slice())
                    .map_err(e("put"))?;
            }
            Ok(())
        })?;
        self.inner = Some(w);
        Ok(())
    }

    fn commit_in(
        &mut self,
        tx: &WriteTransaction,
        size: i64,
        expected: Option<&Digest>,
        labels: &Labels,
    ) -> Result<(Digest, bool)> {
        let (actual, size) = match &mut self.inner {
            None => {
                let d = self.expected.clone().expect("shared write has a digest");
                if size != 0 && size != self.total {
                    return Err(Error::failed_precondition(format!(
                        "{:?} failed size validation: {} != {size}",
                        self.r#ref, self.total
                    )));
                }
                if let Some(expected) = expected
                    && *expected != d
                {
                    return Err(Error::failed_precondition(format!(
                        "{:?} unexpected digest",
                        self.r#ref
                    )));
                }
                (d, self.total)
            }
            Some(w) => {
                let st = w.status()?;
                if size != 0 && size != st.offset {
                    let _ = w.close();
                    return Err(Error::failed_precondition(format!(
                        "{:?} failed size validation: {} != {size}",
                        self.r#ref, st.offset
                    )));
                }
                match w.commit(st.offset, expected, Labels::new()) {
                    Ok(()) => {}
                    Err(err) if err.is(berth_core::error::ErrorKind::AlreadyExists) => {}
                    Err(err) => return Err(err),
                }
                (w.digest(), st.offset)
            }
        };
        let ns = &self.scope.namespace;
        let mut blobs = tx.open_table(BLOBS).map_err(e("content"))?;
        let k = key(ns, actual.as_str());
        let exists = blobs.get(k.as_str()).map_err(e("get"))?.is_some();
        if !exists {
            let now = nanos(SystemTime::now());
            let record = BlobRecord {
                size,
                created_at: now,
                updated_at: now,
                labels: labels.clone(),
            };
            blobs
                .insert(k.as_str(), to_json(&record)?.as_slice())
                .map_err(e("put"))?;
        }
        drop(blobs);
        let mut ingests = tx.open_table(INGESTS).map_err(e("ingests"))?;
        ingests
            .remove(key(ns, &self.r#ref).as_str())
            .map_err(e("delete"))?;
        drop(ingests);
        if let Some(lease) = &self.scope.lease {
            remove_from_lease(tx, ns, lease, "ingests", &self.r#ref)?;
            add_to_lease(tx, ns, lease, "content", actual.as_str())?;
        }
        Ok((actual, exists))
    }
}

impl Writer for NamespacedWriter {
    fn write(&mut self, data: &[u8]) -> Result<()> {
        if self.inner.is_none() {
            if data.is_empty() {
                return Ok(());
            }
            self.create_and_copy(self.total)?;
        }
        self.inner.as_mut().expect("writer").write(data)
    }

    fn write_owned(&mut self, data: bytes::Bytes) -> Result<()> {
        if self.inner.is_none() {
            if data.is_empty() {
                return Ok(());
            }
            self.create_and_copy(self.total)?;
        }
        self.inner.as_mut().expect("writer").write_owned(data)
    }

    fn status(&self) -> Result<Status> {
        let mut st = match &self.inner {
            Some(w) => w.status()?,
            None => Status {
                r#ref: String::new(),
                offset: self.total,
                total: self.total,
                expected: self
                    .expected
                    .as_ref()
                    .map(|d| d.to_string())
                    .unwrap_or_default(),
                started_at: self.started,
                updated_at: self.started,
            },
        };
        st.r#ref = self.r#ref.clone();
        Ok(st)
    }

    fn digest(&self) -> Digest {
        match &self.inner {
            Some(w) => w.digest(),
            None => self.expected.clone().expect("shared write has a digest"),
        }
    }

    fn truncate(&mut self, size: i64) -> Result<()> {
        match &mut self.inner {
            Some(w) => w.truncate(size),
            None => {
                if size != 0 {
                    return Err(Error::invalid_argument("Truncate: unsupported size"));
                }
                self.create_and_copy(0)
            }
        }
    }

    fn commit(&mut self, size: i64, expected: Option<&Digest>, labels: Labels) -> Result<()> {
        labels::validate_all(&labels).map_err(|err| err.context("info.Labels"))?;
        let blobs = self.blobs.clone();
        let _guard = blobs.gc_lock().read().unwrap();
        let md = self.md.clone();
        let (actual, existed) = md.write(|tx| self.commit_in(tx, size, expected, &labels))?;
        if existed {
            return Err(Error::already_exists(format!("content {actual}")));
        }
        Ok(())
    }

    fn close(&mut self) -> Result<()> {
        match &mut self.inner {
            Some(w) => w.close(),
            None => Ok(()),
        }
    }
}

/// Every content record and ingest of every namespace, for the collector.
pub(crate) fn scan_blobs(
    tx: &WriteTransaction,
    f: &mut dyn FnMut(&str, &Digest, &BlobRecord) -> Result<()>,
) -> Result<()> {
    let t = tx.open_table(BLOBS).map_err(e("content"))?;
    for entry in t.iter().map_err(e("iterate"))? {
        let (k, v) = entry.map_err(e("iterate"))?;
        let Some((ns, d)) = crate::util::split_key(k.value()) else {
            continue;
        };
        let Ok(d) = Digest::parse(d) else { continue };
        let r: BlobRecord = serde_json::from_slice(v.value()).map_err(e("decoding content"))?;
        f(ns, &d, &r)?;
    }
    Ok(())
}

pub(crate) fn scan_ingests(
    tx: &WriteTransaction,
    f: &mut dyn FnMut(&str, &str, &IngestRecord) -> Result<()>,
) -> Result<()> {
    let t = tx.open_table(INGESTS).map_err(e("ingests"))?;
    for entry in t.iter().map_err(e("iterate"))? {
        let (k, v) = entry.map_err(e("iterate"))?;
        let Some((ns, r)) = crate::util::split_key(k.value()) else {
            continue;
        };
        let rec: IngestRecord = serde_json::from_slice(v.value()).map_err(e("decoding ingest"))?;
        f(ns, r, &rec)?;
    }
    Ok(())
}

pub(crate) fn remove_blob_record(tx: &WriteTransaction, ns: &str, digest: &str) -> Result<()> {
    let mut t = tx.open_table(BLOBS).map_err(e("content"))?;
    t.remove(key(ns, digest).as_str()).map_err(e("delete"))?;
    Ok(())
}

pub(crate) fn remove_ingest_record(tx: &WriteTransaction, ns: &str, r#ref: &str) -> Result<()> {
    let mut t = tx.open_table(INGESTS).map_err(e("ingests"))?;
    t.remove(key(ns, r#ref).as_str()).map_err(e("delete"))?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests;
