//! `io.containerd.snapshotter.v1.devmapper`: its configuration, and why it does not load.
//!
//! Berth has no devmapper snapshotter yet. The machines it is developed on have no
//! device-mapper driver in their kernel (`/dev/mapper/control` answers ENODEV), so a
//! thin-pool implementation could not be tested here, and an untested one is not
//! shipped. The plugin is registered all the same, so that a containerd configuration
//! with a `[plugins."io.containerd.snapshotter.v1.devmapper"]` section loads unchanged
//! and `ctr plugins ls` says exactly why the snapshotter is missing — as containerd does,
//! which skips the plugin when no pool is configured.

use serde::{Deserialize, Serialize};
use std::path::Path;

/// containerd's devmapper keys, accepted so that its configurations parse.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct DevmapperConfig {
    pub root_path: String,
    pub pool_name: String,
    pub base_image_size: String,
    pub async_remove: bool,
    pub discard_blocks: bool,
    pub fs_type: String,
    pub fs_options: String,
}

/// Why the plugin does not load with `config` on a host whose device-mapper control
/// node is `control`: skipped when no pool is configured (containerd's behaviour), an
/// error naming the cause otherwise.
pub fn unavailable(config: &DevmapperConfig, control: &Path) -> berth_core::Error {
    if config.pool_name.is_empty() {
        return berth_plugin::skip("devmapper not configured (no pool_name)");
    }
    if let Err(e) = std::fs::File::open(control) {
        return berth_core::Error::failed_precondition(format!(
            "devmapper pool {:?}: the kernel's device-mapper driver is not available \
             (open {}: {e})",
            config.pool_name,
            control.display()
        ));
    }
    berth_core::Error::not_implemented(format!(
        "devmapper pool {:?}: Berth has no devmapper snapshotter yet \
         (use overlayfs, native or btrfs)",
        config.pool_name
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_core::error::ErrorKind;

    fn configured() -> DevmapperConfig {
        DevmapperConfig {
            pool_name: "containerd-pool".into(),
            ..DevmapperConfig::default()
        }
    }

    #[test]
    fn skipped_without_a_pool() {
        let e = unavailable(
            &DevmapperConfig::default(),
            Path::new("/dev/mapper/control"),
        );
        assert!(e.to_string().contains("not configured"), "{e}");
    }

    #[test]
    fn a_missing_driver_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = unavailable(&configured(), &dir.path().join("control"));
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
        assert!(
            e.to_string()
                .contains("device-mapper driver is not available"),
            "{e}"
        );
    }

    #[test]
    fn a_present_driver_still_reports_unimplemented() {
        let dir = tempfile::tempdir().unwrap();
        let control = dir.path().join("control");
        std::fs::write(&control, b"").unwrap();
        let e = unavailable(&configured(), &control);
        assert_eq!(e.kind(), ErrorKind::NotImplemented);
    }
}
