//! Plugin registrations of the snapshotters (`io.containerd.snapshotter.v1.*`).

use crate::btrfs::{Btrfs, BtrfsConfig};
use crate::devmapper::{self, DevmapperConfig};
use crate::native::{Native, NativeConfig};
use crate::overlay::{Overlay, OverlayConfig};
use berth_core::snapshot::Snapshotter;
use berth_plugin::{InitContext, Instance, Registration, types};
use std::path::PathBuf;
use std::sync::Arc;

/// What a snapshotter plugin stores as its instance.
pub type SnapshotterInstance = Arc<dyn Snapshotter>;

fn root_of(ctx: &InitContext, root_path: &str) -> PathBuf {
    if root_path.is_empty() {
        ctx.root.clone()
    } else {
        PathBuf::from(root_path)
    }
}

/// overlayfs and native.
pub fn registrations() -> Vec<Registration> {
    vec![
        Registration::new(
            types::SNAPSHOT,
            "overlayfs",
            |ctx: InitContext| async move {
                ctx.platforms(ctx.daemon.platforms.clone());
                let config: OverlayConfig = ctx.config()?;
                let root = root_of(&ctx, &config.root_path);
                if !std::fs::read_to_string("/proc/filesystems")
                    .unwrap_or_default()
                    .contains("overlay")
                {
                    return Err(berth_plugin::skip("overlay is not supported by the kernel"));
                }
                let r = root.clone();
                let snapshotter = tokio::task::spawn_blocking(move || Overlay::new(&r, &config))
                    .await
                    .map_err(|e| berth_core::Error::unknown(e.to_string()))??;
                ctx.export("root", root.display().to_string());
                let instance: SnapshotterInstance = Arc::new(snapshotter);
                Ok(Arc::new(instance) as Instance)
            },
        )
        .with_config::<OverlayConfig>(),
        Registration::new(types::SNAPSHOT, "native", |ctx: InitContext| async move {
            ctx.platforms(ctx.daemon.platforms.clone());
            let config: NativeConfig = ctx.config()?;
            let root = root_of(&ctx, &config.root_path);
            let r = root.clone();
            let snapshotter = tokio::task::spawn_blocking(move || Native::new(&r))
                .await
                .map_err(|e| berth_core::Error::unknown(e.to_string()))??;
            ctx.export("root", root.display().to_string());
            let instance: SnapshotterInstance = Arc::new(snapshotter);
            Ok(Arc::new(instance) as Instance)
        })
        .with_config::<NativeConfig>(),
        Registration::new(types::SNAPSHOT, "btrfs", |ctx: InitContext| async move {
            ctx.platforms(ctx.daemon.platforms.clone());
            let config: BtrfsConfig = ctx.config()?;
            let root = root_of(&ctx, &config.root_path);
            let r = root.clone();
            let snapshotter = tokio::task::spawn_blocking(move || Btrfs::new(&r))
                .await
                .map_err(|e| berth_core::Error::unknown(e.to_string()))??;
            ctx.export("root", root.display().to_string());
            let instance: SnapshotterInstance = Arc::new(snapshotter);
            Ok(Arc::new(instance) as Instance)
        })
        .with_config::<BtrfsConfig>(),
        Registration::new(
            types::SNAPSHOT,
            "devmapper",
            |ctx: InitContext| async move {
                let config: DevmapperConfig = ctx.config()?;
                Err::<Instance, _>(devmapper::unavailable(
                    &config,
                    std::path::Path::new("/dev/mapper/control"),
                ))
            },
        )
        .with_config::<DevmapperConfig>(),
    ]
}
