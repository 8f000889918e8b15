//! The `io.containerd.content.v1.content` plugin; its instance is an
//! `Arc<dyn BlobStore>` (get it with `ctx.get::<Arc<dyn BlobStore>>(types::CONTENT)`).

use crate::LocalStore;
use berth_core::content::BlobStore;
use berth_plugin::{InitContext, Instance, Registration, types};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// containerd's content plugin has no settings; the section is accepted and ignored.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ContentConfig {}

pub fn registration() -> Registration {
    Registration::new(types::CONTENT, "content", |ctx: InitContext| async move {
        let root = ctx.root.clone();
        let store = tokio::task::spawn_blocking(move || LocalStore::open(&root))
            .await
            .map_err(|e| berth_core::Error::unknown(format!("opening content store: {e}")))??;
        ctx.export("root", ctx.root.display().to_string());
        let store: Arc<dyn BlobStore> = Arc::new(store);
        Ok(Arc::new(store) as Instance)
    })
}

/// Every plugin of this crate.
pub fn registrations() -> Vec<Registration> {
    vec![registration()]
}
