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
        // containerd's metadata DB wraps the content store: the local one, or a content
        // proxy plugin's when one is configured.
        if let Some((id, blobs)) = choose_content_store(
            ctx.get_all::<Arc<dyn berth_core::content::BlobStore>>(types::CONTENT),
        ) {
            ctx.export("content", format!("{}.{id}", types::CONTENT));
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

/// The content plugin the metadata store wraps. containerd 1.6 takes whichever content
/// plugin its plugin map yields first, so a `[proxy_plugins]` content store only wins
/// reliably there when `io.containerd.content.v1.content` is disabled. Berth makes the
/// choice that configuring a proxy asks for: any content plugin other than the built-in
/// `content` (they all come from `[proxy_plugins]`), the first by name if there are
/// several; the local store otherwise.
fn choose_content_store<T>(
    mut stores: std::collections::BTreeMap<String, T>,
) -> Option<(String, T)> {
    let proxies: Vec<String> = stores
        .keys()
        .filter(|id| *id != "content")
        .cloned()
        .collect();
    let id = match proxies.first() {
        Some(id) => {
            if proxies.len() > 1 {
                tracing::warn!(
                    chosen = %id,
                    ignored = ?&proxies[1..],
                    "several content proxy plugins; the metadata store wraps the first"
                );
            }
            tracing::info!(plugin = %id, "metadata store wraps the content proxy plugin");
            id.clone()
        }
        None => "content".to_string(),
    };
    stores.remove(&id).map(|store| (id, store))
}

#[cfg(test)]
mod tests {
    use super::choose_content_store;

    #[test]
    fn a_content_proxy_wins_over_the_local_store() {
        fn stores(ids: &[&'static str]) -> std::collections::BTreeMap<String, &'static str> {
            ids.iter().map(|id| (id.to_string(), *id)).collect()
        }
        assert_eq!(
            choose_content_store(stores(&["content"])),
            Some(("content".into(), "content"))
        );
        assert_eq!(
            choose_content_store(stores(&["content", "remote"])),
            Some(("remote".into(), "remote"))
        );
        assert_eq!(
            choose_content_store(stores(&["b", "content", "a"])),
            Some(("a".into(), "a"))
        );
        // The local store disabled, a proxy alone.
        assert_eq!(
            choose_content_store(stores(&["remote"])),
            Some(("remote".into(), "remote"))
        );
        assert_eq!(choose_content_store(stores(&[])), None);
    }
}
