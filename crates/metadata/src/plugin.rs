//! `io.containerd.metadata.v1.bolt`: the metadata plugin. The ID stays `bolt` so that
//! containerd's config sections apply unchanged, although the file is a redb database.

use crate::MetadataStore;
use berth_plugin::{InitContext, Instance, Registration, types};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct MetadataConfig {
    /// `shared`: content in one namespace is visible to another after a write of the same
    /// digest, without re-upload; `isolated`: every namespace uploads its own.
    pub content_sharing_policy: String,
}

impl Default for MetadataConfig {
    fn default() -> Self {
        MetadataConfig {
            content_sharing_policy: "shared".into(),
        }
    }
}

/// The file holding all metadata, under the plugin's root.
pub const DATABASE_FILE: &str = "meta.redb";

/// The plugin's instance is an `Arc<MetadataStore>`.
pub fn registration() -> Registration {
    Registration::new(types::METADATA, "bolt", |ctx: InitContext| async move {
        let config: MetadataConfig = ctx.config()?;
        if !matches!(
            config.content_sharing_policy.as_str(),
            "shared" | "isolated"
        ) {
            return Err(berth_core::Error::invalid_argument(format!(
                "unknown content_sharing_policy {:?} (expected \"shared\" or \"isolated\")",
                config.content_sharing_policy
            )));
        }
        let path = ctx.root.join(DATABASE_FILE);
        let store = tokio::task::spawn_blocking(move || MetadataStore::open(&path))
            .await
            .map_err(|e| berth_core::Error::unknown(format!("opening metadata: {e}")))??;
        // containerd's metadata DB wraps the content store: attach the local one.
        if let Ok(blobs) = ctx.get::<Arc<dyn berth_core::content::BlobStore>>(types::CONTENT) {
            let policy = match config.content_sharing_policy.as_str() {
                "isolated" => crate::SharingPolicy::Isolated,
                _ => crate::SharingPolicy::Shared,
            };
            store.attach_blobs(blobs, policy);
        }
        ctx.export(
            "database",
            ctx.root.join(DATABASE_FILE).display().to_string(),
        );
        Ok(Arc::new(Arc::new(store)) as Instance)
    })
    .requires(&[types::CONTENT, types::SNAPSHOT])
    .with_config::<MetadataConfig>()
}
