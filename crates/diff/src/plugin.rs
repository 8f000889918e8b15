//! `io.containerd.differ.v1.walking`. Its instance is a [`DifferInstance`]
//! (`Arc<dyn Differ>`); it needs the namespaced content store of the metadata layer.

use crate::processor::StreamProcessor;
use crate::walking::WalkingDiff;
use berth_core::content::ContentStore;
use berth_core::diff::Differ;
use berth_plugin::{InitContext, Instance, Registration, types};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

/// What a differ plugin stores as its instance.
pub type DifferInstance = Arc<dyn Differ>;

/// `[plugins."io.containerd.differ.v1.walking"]`: Berth reads the stream processors
/// here too (the daemon's top-level `[stream_processors]` is merged in by the server).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct DiffConfig {
    pub stream_processors: BTreeMap<String, StreamProcessor>,
}

pub fn registrations() -> Vec<Registration> {
    vec![
        Registration::new(types::DIFF, "walking", |ctx: InitContext| async move {
            ctx.platforms(ctx.daemon.platforms.clone());
            let config: DiffConfig = ctx.config()?;
            // The namespaced content store of the metadata layer.
            let md: Arc<berth_metadata::MetadataStore> = ctx.get(types::METADATA)?;
            let content: Arc<dyn ContentStore> = md.content_store().ok_or_else(|| {
                berth_core::Error::failed_precondition(
                    "no content store is attached to the metadata store",
                )
            })?;
            let tmp = ctx.root.join("tmp");
            std::fs::create_dir_all(&tmp)?;
            let processors = config.stream_processors.into_values().collect();
            let differ: DifferInstance = Arc::new(WalkingDiff::new(content, tmp, processors));
            Ok(Arc::new(differ) as Instance)
        })
        .requires(&[types::METADATA]),
    ]
}
