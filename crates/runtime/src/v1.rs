//! `io.containerd.runtime.v1.linux`: the runtime v1 config section is accepted and mapped
//! onto runtime v2. There is no v1 shim: a container whose runtime is
//! `io.containerd.runtime.v1.linux` runs under `containerd-shim-runc-v2`, with runc options
//! built from `runtime` (`BinaryName`) and `runtime_root` (`Root`). `shim`, `no_shim` and
//! `shim_debug` have no v2 equivalent and are ignored with a warning.

use crate::manager::V1Mapping;
use berth_api::any;
use berth_api::containerd::runc::v1::Options;
use berth_plugin::{InitContext, Instance, Registration};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

pub const TYPE: &str = "io.containerd.runtime.v1";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct V1Config {
    pub shim: String,
    pub runtime: String,
    pub runtime_root: String,
    pub no_shim: bool,
    pub shim_debug: bool,
}

impl Default for V1Config {
    fn default() -> Self {
        V1Config {
            shim: "containerd-shim".into(),
            runtime: "runc".into(),
            runtime_root: String::new(),
            no_shim: false,
            shim_debug: false,
        }
    }
}

/// The v2 form of a v1 config and the warning that names the mapping.
pub fn map(config: &V1Config) -> (V1Mapping, String) {
    let options = Options {
        binary_name: if config.runtime == "runc" {
            String::new()
        } else {
            config.runtime.clone()
        },
        root: config.runtime_root.clone(),
        ..Default::default()
    };
    let mut ignored = Vec::new();
    if config.shim != "containerd-shim" {
        ignored.push(format!("shim={:?}", config.shim));
    }
    if config.no_shim {
        ignored.push("no_shim=true".to_string());
    }
    if config.shim_debug {
        ignored.push("shim_debug=true (use the daemon's debug level)".to_string());
    }
    let mut warning = format!(
        "runtime v1 is deprecated: io.containerd.runtime.v1.linux is mapped to runtime v2 \
         io.containerd.runc.v2 (containerd-shim-runc-v2) with runc options BinaryName={:?} Root={:?}",
        config.runtime, config.runtime_root
    );
    if !ignored.is_empty() {
        warning.push_str(&format!("; ignored: {}", ignored.join(", ")));
    }
    let has_options = options != Options::default();
    (
        V1Mapping {
            options: has_options.then(|| any::pack(&options)),
        },
        warning,
    )
}

/// The instance is an `Arc<V1Mapping>`, read by the v2 manager.
pub fn registration() -> Registration {
    Registration::new(TYPE, "linux", |ctx: InitContext| async move {
        ctx.platforms(ctx.daemon.platforms.clone());
        let config: V1Config = ctx.config()?;
        let (mapping, warning) = map(&config);
        tracing::warn!("{warning}");
        Ok(Arc::new(Arc::new(mapping)) as Instance)
    })
    .with_config::<V1Config>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_runtime_and_root() {
        let (m, w) = map(&V1Config::default());
        assert!(m.options.is_none());
        assert!(w.contains("io.containerd.runc.v2"), "{w}");
        let (m, w) = map(&V1Config {
            runtime: "crun".into(),
            runtime_root: "/run/crun".into(),
            no_shim: true,
            ..Default::default()
        });
        let opts: Options = any::unpack(m.options.as_ref().unwrap()).unwrap();
        assert_eq!(opts.binary_name, "crun");
        assert_eq!(opts.root, "/run/crun");
        assert!(w.contains("no_shim"), "{w}");
    }
}
