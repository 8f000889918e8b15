//! Subsystems the plugin wiring attaches to the metadata store, as containerd's
//! `metadata.NewDB(db, contentStore, snapshotters)` does: the local blob store (which the
//! namespaced content store wraps and the collector sweeps), the extra resources the
//! garbage collector marks and sweeps (snapshots, containers), and the mutation signal
//! that drives the GC scheduler.

use crate::MetadataStore;
use crate::gc::GcResource;
use berth_core::content::{BlobStore, ContentStore};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

#[derive(Default)]
pub(crate) struct Attachments {
    pub(crate) blobs: OnceLock<(Arc<dyn BlobStore>, bool)>,
    pub(crate) resources: RwLock<Vec<Arc<dyn GcResource>>>,
    mutations: AtomicU64,
    changed: tokio::sync::Notify,
}

impl Attachments {
    /// Called after every committed write transaction.
    pub(crate) fn mutated(&self) {
        self.mutations.fetch_add(1, Ordering::Relaxed);
        self.changed.notify_waiters();
        self.changed.notify_one();
    }
}

/// How content is shared between namespaces (`content_sharing_policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharingPolicy {
    Shared,
    Isolated,
}

impl MetadataStore {
    /// Attaches the local blob store; the namespaced content store and the collector use
    /// it. Only the first call has an effect.
    pub fn attach_blobs(&self, blobs: Arc<dyn BlobStore>, policy: SharingPolicy) {
        let _ = self.ext.blobs.set((blobs, policy == SharingPolicy::Shared));
    }

    pub fn blob_store(&self) -> Option<Arc<dyn BlobStore>> {
        self.ext.blobs.get().map(|(b, _)| b.clone())
    }

    pub fn sharing_policy(&self) -> SharingPolicy {
        match self.ext.blobs.get() {
            Some((_, false)) => SharingPolicy::Isolated,
            _ => SharingPolicy::Shared,
        }
    }

    /// The namespaced content store (containerd's `db.ContentStore()`), once a blob store
    /// is attached.
    pub fn content_store(self: &Arc<Self>) -> Option<Arc<dyn ContentStore>> {
        self.blob_store()?;
        Some(Arc::new(crate::content::NamespacedContent::new(
            self.clone(),
        )))
    }

    /// Adds a resource the garbage collector marks and sweeps (see [`crate::gc`]).
    pub fn register_gc_resource(&self, resource: Arc<dyn GcResource>) {
        self.ext.resources.write().unwrap().push(resource);
    }

    pub(crate) fn gc_resources(&self) -> Vec<Arc<dyn GcResource>> {
        self.ext.resources.read().unwrap().clone()
    }

    /// Committed write transactions since open.
    pub fn mutations(&self) -> u64 {
        self.ext.mutations.load(Ordering::Relaxed)
    }

    /// Resolves after the next committed write transaction.
    pub async fn changed(&self) {
        self.ext.changed.notified().await
    }
}
