//! The garbage collector: containerd's tri-colour mark and sweep over the metadata store
//! (`metadata/gc.go` + `gc/gc.go`), then a sweep of the blob store.
//!
//! **Roots**: images (their target and label references), unexpired leases (their
//! content, ingests and snapshots; `containerd.io/gc.flat` makes those references flat),
//! unleased ingests before their expiry, content labelled `containerd.io/gc.root`, and
//! whatever registered [`GcResource`]s report (containers, snapshots labelled
//! `containerd.io/gc.root`, …).
//!
//! **References**: a content record's labels `containerd.io/gc.ref.content[.|/]*` (→
//! content) and `containerd.io/gc.ref.snapshot.<snapshotter>[/…]` (→ snapshot
//! `<snapshotter>/<key>`); an ingest's expected digest (→ content); references of other
//! kinds come from the [`GcResource`] that handles them. A flat node has no label
//! references (a flat snapshot still references its parent).
//!
//! **Sweep**: in the same write transaction as the mark (so nothing changes in between),
//! every unmarked lease, ingest and content record is removed, and every resource sweeps
//! its own records. After the commit, and while holding the blob store's `gc_lock`
//! exclusively (commits hold it shared from the rename of a blob to its record), blobs
//! that no namespace records and local ingests no record names are deleted; then each
//! resource that removed something runs its `cleanup` (e.g. a snapshotter removing
//! snapshots without records).
//!
//! ## The snapshot hook
//!
//! The snapshot records module implements [`GcResource`] for [`Kind::Snapshot`] nodes
//! (key `"<snapshotter>/<snapshot key>"`) and registers it with
//! [`MetadataStore::register_gc_resource`]:
//! - `scan_roots`: snapshots labelled `containerd.io/gc.root`;
//! - `references`: for a snapshot node, its parent (same flatness) and, unless flat, its
//!   label references ([`label_refs`]); return `true` for nodes it handles;
//! - `sweep`: remove snapshot records not in the marked set, return whether any was
//!   removed;
//! - `cleanup`: after the commit, make each dirty snapshotter remove what has no record.
//!
//! A containers module does the same for [`Kind::Container`] (roots: every container,
//! referencing its snapshot `"<snapshotter>/<key>"` and its label references).

use crate::MetadataStore;
use crate::content::{BlobRecord, IngestRecord, scan_blobs, scan_ingests};
use crate::leases::{Lease, Resource, scan_leases};
use crate::util::{nanos, open_read};
use berth_core::Result;
use berth_core::content::Digest;
use berth_core::labels::{GC_EXPIRE, GC_FLAT, GC_REF_CONTENT, GC_ROOT, Labels};
use redb::{ReadableTable, WriteTransaction};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// The kind of a collectable resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Content,
    Snapshot,
    Container,
    Task,
    Lease,
    Ingest,
    Image,
    /// A kind another module defines.
    Other(&'static str),
}

/// One resource in the reference graph.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Node {
    pub kind: Kind,
    pub namespace: String,
    pub key: String,
    /// Reached through a flat reference: follow no label references.
    pub flat: bool,
}

impl Node {
    pub fn new(kind: Kind, namespace: &str, key: impl Into<String>) -> Node {
        Node {
            kind,
            namespace: namespace.to_string(),
            key: key.into(),
            flat: false,
        }
    }

    pub fn flat(mut self, flat: bool) -> Node {
        self.flat = flat;
        self
    }

    /// A snapshot node: key `"<snapshotter>/<key>"`.
    pub fn snapshot(namespace: &str, snapshotter: &str, key: &str) -> Node {
        Node::new(Kind::Snapshot, namespace, format!("{snapshotter}/{key}"))
    }
}

/// A resource kind another module stores in the metadata database (snapshots,
/// containers): see the module documentation for the contract.
pub trait GcResource: Send + Sync {
    /// A name for logs.
    fn name(&self) -> &str;
    /// Emits this resource's roots.
    fn scan_roots(
        &self,
        tx: &WriteTransaction,
        now: SystemTime,
        emit: &mut dyn FnMut(Node),
    ) -> Result<()>;
    /// Emits the references of `node`; returns whether this resource handles its kind.
    fn references(
        &self,
        tx: &WriteTransaction,
        node: &Node,
        emit: &mut dyn FnMut(Node),
    ) -> Result<bool>;
    /// Removes this resource's records that are not in `marked` (nodes there have
    /// `flat == false`); returns whether anything was removed.
    fn sweep(&self, tx: &WriteTransaction, marked: &HashSet<Node>) -> Result<bool>;
    /// Runs after the sweep committed, when `sweep` returned `true`.
    fn cleanup(&self) -> Result<()>;
}

/// Emits the references that `labels` declare (containerd's `sendLabelRefs`).
pub fn label_refs(namespace: &str, labels: &Labels, emit: &mut dyn FnMut(Node)) {
    const SNAP: &str = "containerd.io/gc.ref.snapshot.";
    let mut keys: Vec<&String> = labels.keys().collect();
    keys.sort();
    for k in keys {
        let v = &labels[k];
        if let Some(rest) = k.strip_prefix(GC_REF_CONTENT) {
            if rest.is_empty() || rest.starts_with('.') || rest.starts_with('/') {
                emit(Node::new(Kind::Content, namespace, v.clone()));
            }
        } else if let Some(rest) = k.strip_prefix(SNAP) {
            let snapshotter = rest.split('/').next().unwrap_or_default();
            emit(Node::snapshot(namespace, snapshotter, v));
        }
    }
}

fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    // YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut i = 19;
    let mut nanos = 0i64;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        i = start;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let frac = &s[start..i];
        let padded = format!("{:0<9}", &frac[..frac.len().min(9)]);
        nanos = padded.parse().ok()?;
    }
    let offset = match b.get(i)? {
        b'Z' | b'z' => 0,
        sign @ (b'+' | b'-') => {
            let oh = num(i + 1..i + 3)?;
            let om = num(i + 4..i + 6)?;
            let o = oh * 3600 + om * 60;
            if *sign == b'+' { o } else { -o }
        }
        _ => return None,
    };
    // Days from civil (Howard Hinnant's algorithm).
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    let secs = days * 86400 + h * 3600 + mi * 60 + sec - offset;
    if secs < 0 {
        return Some(SystemTime::UNIX_EPOCH);
    }
    Some(SystemTime::UNIX_EPOCH + Duration::new(secs as u64, nanos as u32))
}

/// containerd's back reference from an image to the image it belongs with.
const GC_BREF_IMAGE: &str = "containerd.io/gc.bref.image";

/// Whether `labels`' `containerd.io/gc.expire` has passed (an unparsable value is
/// ignored, as containerd does; `what` names the object in that log line).
fn expired(labels: &Labels, what: std::fmt::Arguments<'_>, now: SystemTime) -> bool {
    match labels.get(GC_EXPIRE) {
        Some(v) => match parse_rfc3339(v) {
            Some(t) => now > t,
            None => {
                tracing::info!(object = %what, value = %v, "ignoring invalid expiration value");
                false
            }
        },
        None => false,
    }
}

fn image_expired(image: &crate::images::Image, now: SystemTime) -> bool {
    expired(&image.labels, format_args!("image {}", image.name), now)
}

/// Whether a lease's `containerd.io/gc.expire` label is in the past.
pub fn lease_expired(lease: &Lease, now: SystemTime) -> bool {
    expired(&lease.labels, format_args!("lease {}", lease.id), now)
}

/// What one collection did.
#[derive(Debug, Clone, Default)]
pub struct GcStats {
    /// Time the metadata was locked (mark and sweep of records).
    pub meta: Duration,
    /// Time spent deleting blobs and ingests.
    pub content: Duration,
    pub removed_records: usize,
    pub removed_blobs: usize,
    pub removed_ingests: usize,
}

/// Runs collections over one metadata store; one at a time.
pub struct Collector {
    md: Arc<MetadataStore>,
    running: Mutex<bool>,
}

impl Collector {
    pub fn new(md: Arc<MetadataStore>) -> Collector {
        // The first collection always sweeps the blob store: after a crash, blobs can exist
        // whose record was never committed.
        Collector {
            md,
            running: Mutex::new(true),
        }
    }

    pub fn metadata(&self) -> &Arc<MetadataStore> {
        &self.md
    }

    /// One full collection (blocking).
    pub fn collect(&self) -> Result<GcStats> {
        let mut first = self.running.lock().unwrap();
        let t0 = Instant::now();
        let resources = self.md.gc_resources();
        let mut stats = GcStats::default();
        // Taken before the mark so that a deletion during this collection is seen by the
        // next one rather than lost.
        let deleted_outside = self.md.take_content_dirty();
        let (content_dirty, dirty_resources) = self.md.write_if_changed(|tx| {
            let (content_dirty, dirty) = mark_and_sweep(tx, &resources, &mut stats)?;
            let changed = stats.removed_records > 0 || !dirty.is_empty();
            Ok(((content_dirty, dirty), changed))
        })?;
        self.md.reset_dirty();
        stats.meta = t0.elapsed();
        if content_dirty || deleted_outside || *first {
            let t1 = Instant::now();
            self.sweep_blobs(&mut stats)?;
            stats.content = t1.elapsed();
        }
        *first = false;
        for r in dirty_resources {
            if let Err(err) = r.cleanup() {
                tracing::warn!(resource = r.name(), error = %err, "resource cleanup failed");
            }
        }
        tracing::debug!(?stats, "garbage collected");
        Ok(stats)
    }

    fn sweep_blobs(&self, stats: &mut GcStats) -> Result<()> {
        let Some(blobs) = self.md.blob_store() else {
            return Ok(());
        };
        let _guard = blobs.gc_lock().write().unwrap();
        let (content_seen, ingest_seen) = self.md.read(|tx| {
            let mut content = HashSet::new();
            let mut ingests = HashSet::new();
            if let Some(t) = open_read(tx, crate::content::BLOBS)? {
                for entry in t.iter().map_err(crate::util::e("iterate"))? {
                    let (k, _) = entry.map_err(crate::util::e("iterate"))?;
                    if let Some((_, d)) = crate::util::split_key(k.value()) {
                        content.insert(d.to_string());
                    }
                }
            }
            if let Some(t) = open_read(tx, crate::content::INGESTS)? {
                for entry in t.iter().map_err(crate::util::e("iterate"))? {
                    let (_, v) = entry.map_err(crate::util::e("iterate"))?;
                    let r: IngestRecord = serde_json::from_slice(v.value())
                        .map_err(crate::util::e("decoding ingest"))?;
                    if let Some(x) = r.expected {
                        content.insert(x);
                    }
                    ingests.insert(r.bref);
                }
            }
            Ok((content, ingests))
        })?;
        let mut doomed = Vec::new();
        blobs.walk(&mut |info| {
            if !content_seen.contains(info.digest.as_str()) {
                doomed.push(info.digest);
            }
            Ok(())
        })?;
        for d in doomed {
            match blobs.delete(&d) {
                Ok(()) => {
                    stats.removed_blobs += 1;
                    tracing::debug!(digest = %d, "removed content");
                }
                Err(err) => tracing::warn!(digest = %d, error = %err, "removing content"),
            }
        }
        for st in blobs.list_statuses()? {
            if !ingest_seen.contains(&st.r#ref) {
                if blobs.abort(&st.r#ref).is_ok() {
                    stats.removed_ingests += 1;
                }
                tracing::debug!(r#ref = %st.r#ref, "cleanup aborting ingest");
            }
        }
        Ok(())
    }

    /// Start-up repair: removes content records whose blob is missing from the blob store
    /// (the store was damaged or restored from an older copy), logging each. Blobs without
    /// records are removed by the first collection.
    pub fn repair(&self) -> Result<usize> {
        let Some(blobs) = self.md.blob_store() else {
            return Ok(0);
        };
        let _guard = blobs.gc_lock().write().unwrap();
        self.md.write(|tx| {
            let mut missing = Vec::new();
            scan_blobs(tx, &mut |ns, d, _| {
                if blobs.info(d).is_err() {
                    missing.push((ns.to_string(), d.to_string()));
                }
                Ok(())
            })?;
            for (ns, d) in &missing {
                tracing::warn!(namespace = %ns, digest = %d, "content record without blob removed");
                crate::content::remove_blob_record(tx, ns, d)?;
            }
            Ok(missing.len())
        })
    }
}

/// The metadata phase: returns whether content or ingests were removed, and the
/// resources that removed something.
fn mark_and_sweep(
    tx: &WriteTransaction,
    resources: &[Arc<dyn GcResource>],
    stats: &mut GcStats,
) -> Result<(bool, Vec<Arc<dyn GcResource>>)> {
    let now = SystemTime::now();
    // Load this module's records (content labels are needed for references).
    let mut blob_labels: HashMap<(String, String), Labels> = HashMap::new();
    let mut roots: Vec<Node> = Vec::new();
    let mut blob_keys: Vec<(String, String)> = Vec::new();
    scan_blobs(tx, &mut |ns, d, r: &BlobRecord| {
        blob_keys.push((ns.to_string(), d.to_string()));
        if r.labels.contains_key(GC_ROOT) {
            roots.push(Node::new(Kind::Content, ns, d.to_string()));
        }
        if !r.labels.is_empty() {
            blob_labels.insert((ns.to_string(), d.to_string()), r.labels.clone());
        }
        Ok(())
    })?;
    let mut ingest_expected: HashMap<(String, String), String> = HashMap::new();
    let mut ingest_keys: Vec<(String, String)> = Vec::new();
    let now_n = nanos(now);
    scan_ingests(tx, &mut |ns, r, rec| {
        ingest_keys.push((ns.to_string(), r.to_string()));
        if let Some(x) = &rec.expected {
            ingest_expected.insert((ns.to_string(), r.to_string()), x.clone());
        }
        if let Some(exp) = rec.expire_at
            && now_n < exp
        {
            roots.push(Node::new(Kind::Ingest, ns, r));
        }
        Ok(())
    })?;
    let mut lease_keys: Vec<(String, String)> = Vec::new();
    scan_leases(tx, &mut |ns, lease, resources: &[Resource]| {
        lease_keys.push((ns.to_string(), lease.id.clone()));
        if lease_expired(lease, now) {
            return Ok(());
        }
        let flat = lease.labels.contains_key(GC_FLAT);
        roots.push(Node::new(Kind::Lease, ns, lease.id.clone()));
        for r in resources {
            match r.r#type.as_str() {
                "content" => roots.push(Node::new(Kind::Content, ns, r.id.clone()).flat(flat)),
                "ingests" => roots.push(Node::new(Kind::Ingest, ns, r.id.clone())),
                t => {
                    if let Some(ss) = t.strip_prefix("snapshots/") {
                        roots.push(Node::snapshot(ns, ss, &r.id).flat(flat));
                    }
                }
            }
        }
        Ok(())
    })?;
    // Images are nodes (containerd 2.x): every image is a root unless its
    // `containerd.io/gc.expire` has passed; an expired one stays while an image it names
    // in `containerd.io/gc.bref.image` exists (the extra names a transfer gives an import),
    // and is removed otherwise.
    let mut image_refs: HashMap<(String, String), Vec<Node>> = HashMap::new();
    let mut image_brefs: HashMap<(String, String), Vec<String>> = HashMap::new();
    let mut image_keys: Vec<(String, String)> = Vec::new();
    crate::images::scan_images(tx, &mut |ns, image| {
        let mut refs = Vec::new();
        if Digest::parse(&image.target.digest).is_ok() {
            refs.push(Node::new(Kind::Content, ns, image.target.digest.clone()));
        }
        label_refs(ns, &image.labels, &mut |n| refs.push(n));
        for (k, v) in &image.labels {
            if k == GC_BREF_IMAGE || k.starts_with(&format!("{GC_BREF_IMAGE}.")) {
                image_brefs
                    .entry((ns.to_string(), v.clone()))
                    .or_default()
                    .push(image.name.clone());
            }
        }
        image_refs.insert((ns.to_string(), image.name.clone()), refs);
        image_keys.push((ns.to_string(), image.name.clone()));
        if !image_expired(image, now) {
            roots.push(Node::new(Kind::Image, ns, image.name.clone()));
        }
        Ok(())
    })?;
    for r in resources {
        r.scan_roots(tx, now, &mut |n| roots.push(n))?;
    }

    // Tri-colour mark: `seen` is grey or black, `reachable` black.
    let mut grays = roots;
    let mut seen: HashSet<Node> = HashSet::new();
    let mut reachable: HashSet<Node> = HashSet::new();
    while let Some(node) = grays.pop() {
        if !seen.insert(node.clone()) {
            continue;
        }
        let mut refs = Vec::new();
        match node.kind {
            Kind::Content => {
                if !node.flat
                    && let Some(labels) =
                        blob_labels.get(&(node.namespace.clone(), node.key.clone()))
                {
                    label_refs(&node.namespace, labels, &mut |n| refs.push(n));
                }
            }
            Kind::Ingest => {
                if let Some(x) = ingest_expected.get(&(node.namespace.clone(), node.key.clone())) {
                    refs.push(Node::new(Kind::Content, &node.namespace, x.clone()));
                }
            }
            Kind::Lease => {}
            Kind::Image => {
                let key = (node.namespace.clone(), node.key.clone());
                refs.extend(image_refs.get(&key).into_iter().flatten().cloned());
                for name in image_brefs.get(&key).into_iter().flatten() {
                    refs.push(Node::new(Kind::Image, &node.namespace, name.clone()));
                }
            }
            _ => {
                for r in resources {
                    if r.references(tx, &node, &mut |n| refs.push(n))? {
                        break;
                    }
                }
            }
        }
        grays.extend(refs.into_iter().filter(|n| !seen.contains(n)));
        reachable.insert(node.flat(false));
    }

    // Sweep.
    let mut content_dirty = false;
    for (ns, id) in lease_keys {
        if !reachable.contains(&Node::new(Kind::Lease, &ns, id.clone())) {
            crate::leases::remove_lease_in(tx, &ns, &id)?;
            stats.removed_records += 1;
        }
    }
    for (ns, r) in ingest_keys {
        if !reachable.contains(&Node::new(Kind::Ingest, &ns, r.clone())) {
            crate::content::remove_ingest_record(tx, &ns, &r)?;
            stats.removed_records += 1;
            content_dirty = true;
        }
    }
    for (ns, name) in image_keys {
        if !reachable.contains(&Node::new(Kind::Image, &ns, name.clone())) {
            crate::images::remove_image_record(tx, &ns, &name)?;
            stats.removed_records += 1;
        }
    }
    for (ns, d) in blob_keys {
        if !reachable.contains(&Node::new(Kind::Content, &ns, d.clone())) {
            crate::content::remove_blob_record(tx, &ns, &d)?;
            stats.removed_records += 1;
            content_dirty = true;
        }
    }
    let mut dirty = Vec::new();
    for r in resources {
        if r.sweep(tx, &reachable)? {
            dirty.push(r.clone());
        }
    }
    Ok((content_dirty, dirty))
}

#[cfg(test)]
mod tests;

/// The future [`GcScheduler::schedule_and_wait`] returns.
pub type GcFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Result<GcStats>> + Send>>;

/// What the `io.containerd.gc.v1.scheduler` plugin provides (its instance is an
/// `Arc<dyn GcScheduler>`): services that delete with `sync` wait for a collection.
pub trait GcScheduler: Send + Sync {
    /// Schedules a collection (after `schedule_delay`) and resolves when one has run.
    fn schedule_and_wait(&self) -> GcFuture;
}
