//! The `native` snapshotter, opened on first use.
//!
//! Each snapshotter keeps its records in a redb database, and an open redb database holds
//! its page allocator's bitmaps in memory (about 0.5 MiB, whatever the database's size).
//! Nodes use overlayfs; the native snapshotter serves only clients that ask for it by name.
//! So berthd registers it through this wrapper, which opens the store (creating its
//! directory and database) on the first call that needs it. Until a store exists, listing
//! it finds nothing and cleaning it up has nothing to do; once its database file exists
//! (from this or an earlier run), every call goes to the real snapshotter.

use berth_core::labels::Labels;
use berth_core::mount::Mount;
use berth_core::snapshot::{Info, Snapshotter, Usage};
use berth_core::{Error, Result};
use berth_plugin::{InitContext, Instance, Registration, types};
use berth_snapshots::SnapshotterInstance;
use berth_snapshots::native::{Native, NativeConfig};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::OnceCell;

/// `io.containerd.snapshotter.v1.native`, lazily opened; replaces the crate's own
/// registration (same URI, config and exports).
pub fn registration() -> Registration {
    Registration::new(types::SNAPSHOT, "native", |ctx: InitContext| async move {
        ctx.platforms(ctx.daemon.platforms.clone());
        let config: NativeConfig = ctx.config()?;
        let root = if config.root_path.is_empty() {
            ctx.root.clone()
        } else {
            PathBuf::from(&config.root_path)
        };
        ctx.export("root", root.display().to_string());
        let instance: SnapshotterInstance = Arc::new(LazyNative {
            root,
            native: OnceCell::new(),
        });
        Ok(Arc::new(instance) as Instance)
    })
    .with_config::<NativeConfig>()
}

struct LazyNative {
    root: PathBuf,
    native: OnceCell<Native>,
}

impl LazyNative {
    /// The snapshotter, opened now if it was not yet.
    async fn open(&self) -> Result<&Native> {
        self.native
            .get_or_try_init(|| async {
                let root = self.root.clone();
                tokio::task::spawn_blocking(move || Native::new(&root))
                    .await
                    .map_err(|e| Error::unknown(e.to_string()))?
            })
            .await
    }

    /// For calls that only read: the snapshotter if it is open or has a store to open;
    /// `None` while no store exists (nothing to read).
    async fn existing(&self) -> Result<Option<&Native>> {
        if self.native.get().is_none() && !self.root.join("metadata.db").exists() {
            return Ok(None);
        }
        self.open().await.map(Some)
    }
}

#[async_trait::async_trait]
impl Snapshotter for LazyNative {
    async fn stat(&self, key: &str) -> Result<Info> {
        self.open().await?.stat(key).await
    }
    async fn update(&self, info: Info, fieldpaths: &[String]) -> Result<Info> {
        self.open().await?.update(info, fieldpaths).await
    }
    async fn usage(&self, key: &str) -> Result<Usage> {
        self.open().await?.usage(key).await
    }
    async fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        self.open().await?.mounts(key).await
    }
    async fn prepare(&self, key: &str, parent: &str, labels: Labels) -> Result<Vec<Mount>> {
        self.open().await?.prepare(key, parent, labels).await
    }
    async fn view(&self, key: &str, parent: &str, labels: Labels) -> Result<Vec<Mount>> {
        self.open().await?.view(key, parent, labels).await
    }
    async fn commit(&self, name: &str, key: &str, labels: Labels) -> Result<()> {
        self.open().await?.commit(name, key, labels).await
    }
    async fn remove(&self, key: &str) -> Result<()> {
        self.open().await?.remove(key).await
    }
    async fn walk(&self, filters: &[String]) -> Result<Vec<Info>> {
        match self.existing().await? {
            Some(native) => native.walk(filters).await,
            None => Ok(Vec::new()),
        }
    }
    async fn cleanup(&self) -> Result<()> {
        match self.existing().await? {
            Some(native) => native.cleanup().await,
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lazy(root: &std::path::Path) -> LazyNative {
        LazyNative {
            root: root.join("native"),
            native: OnceCell::new(),
        }
    }

    #[tokio::test]
    async fn reading_an_unused_store_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = lazy(dir.path());
        assert!(s.walk(&[]).await.unwrap().is_empty());
        s.cleanup().await.unwrap();
        assert!(!dir.path().join("native").exists());
        assert!(s.native.get().is_none());
    }

    #[tokio::test]
    async fn first_write_opens_the_store_and_later_runs_find_it() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = lazy(dir.path());
            s.prepare("a", "", Labels::new()).await.unwrap();
            assert!(dir.path().join("native/metadata.db").exists());
            assert_eq!(s.walk(&[]).await.unwrap().len(), 1);
        }
        // A daemon started later opens the existing store to list it.
        let s = lazy(dir.path());
        assert_eq!(s.walk(&[]).await.unwrap().len(), 1);
        s.remove("a").await.unwrap();
        assert!(s.walk(&[]).await.unwrap().is_empty());
    }
}
