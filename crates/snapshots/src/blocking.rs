//! The one async adapter over Berth's local snapshotters: each implements the blocking
//! [`BlockingSnapshotter`] (metastore transactions and file-system work), and
//! [`Blocking`] turns it into the async [`Snapshotter`] by running every call on the
//! blocking pool.

use berth_core::filters::Filter;
use berth_core::labels::Labels;
use berth_core::mount::Mount;
use berth_core::snapshot::{Info, Kind, Snapshotter, Usage};
use berth_core::{Error, Result};
use std::sync::Arc;

/// A snapshotter whose calls block; see [`Snapshotter`] for what each does.
pub trait BlockingSnapshotter: Send + Sync + 'static {
    fn stat(&self, key: &str) -> Result<Info>;
    fn update(&self, info: Info, fieldpaths: &[String]) -> Result<Info>;
    fn usage(&self, key: &str) -> Result<Usage>;
    fn mounts(&self, key: &str) -> Result<Vec<Mount>>;
    /// Prepare (`kind` Active) and View (`kind` View).
    fn create(&self, kind: Kind, key: &str, parent: &str, labels: Labels) -> Result<Vec<Mount>>;
    fn commit(&self, name: &str, key: &str, labels: Labels) -> Result<()>;
    fn remove(&self, key: &str) -> Result<()>;
    fn walk(&self, filter: &Filter) -> Result<Vec<Info>>;
    fn cleanup(&self) -> Result<()>;
}

/// Runs blocking snapshotter work on the blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::unknown(format!("snapshotter task failed: {e}")))?
}

/// A [`BlockingSnapshotter`] as an async [`Snapshotter`] (cheap to clone: the store is
/// shared).
pub struct Blocking<T> {
    store: Arc<T>,
}

impl<T> Clone for Blocking<T> {
    fn clone(&self) -> Self {
        Blocking {
            store: self.store.clone(),
        }
    }
}

impl<T: BlockingSnapshotter> Blocking<T> {
    pub fn wrap(store: T) -> Blocking<T> {
        Blocking {
            store: Arc::new(store),
        }
    }

    /// The blocking store itself.
    pub fn store(&self) -> &T {
        &self.store
    }

    async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&T) -> Result<R> + Send + 'static,
    ) -> Result<R> {
        let store = self.store.clone();
        blocking(move || f(&store)).await
    }
}

#[async_trait::async_trait]
impl<T: BlockingSnapshotter> Snapshotter for Blocking<T> {
    async fn stat(&self, key: &str) -> Result<Info> {
        let key = key.to_string();
        self.run(move |s| s.stat(&key)).await
    }

    async fn update(&self, info: Info, fieldpaths: &[String]) -> Result<Info> {
        let fieldpaths = fieldpaths.to_vec();
        self.run(move |s| s.update(info, &fieldpaths)).await
    }

    async fn usage(&self, key: &str) -> Result<Usage> {
        let key = key.to_string();
        self.run(move |s| s.usage(&key)).await
    }

    async fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let key = key.to_string();
        self.run(move |s| s.mounts(&key)).await
    }

    async fn prepare(&self, key: &str, parent: &str, labels: Labels) -> Result<Vec<Mount>> {
        let (key, parent) = (key.to_string(), parent.to_string());
        self.run(move |s| s.create(Kind::Active, &key, &parent, labels))
            .await
    }

    async fn view(&self, key: &str, parent: &str, labels: Labels) -> Result<Vec<Mount>> {
        let (key, parent) = (key.to_string(), parent.to_string());
        self.run(move |s| s.create(Kind::View, &key, &parent, labels))
            .await
    }

    async fn commit(&self, name: &str, key: &str, labels: Labels) -> Result<()> {
        let (name, key) = (name.to_string(), key.to_string());
        self.run(move |s| s.commit(&name, &key, labels)).await
    }

    async fn remove(&self, key: &str) -> Result<()> {
        let key = key.to_string();
        self.run(move |s| s.remove(&key)).await
    }

    async fn walk(&self, filters: &[String]) -> Result<Vec<Info>> {
        // A malformed filter fails before any blocking work.
        let filter = Filter::parse_all(filters)?;
        self.run(move |s| s.walk(&filter)).await
    }

    async fn cleanup(&self) -> Result<()> {
        self.run(|s| s.cleanup()).await
    }
}
