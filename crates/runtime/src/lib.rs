//! Runtime v2: the shim manager behind containerd's task API.
//!
//! - [`manager::ShimManager`] (plugin `io.containerd.runtime.v2.task`, config `platforms`)
//!   implements [`berth_core::runtime::Runtime`]: per task it creates a bundle
//!   (`{state}/io.containerd.runtime.v2.task/{ns}/{id}`), starts the shim binary named by
//!   the runtime (`io.containerd.runc.v2` → `containerd-shim-runc-v2`,
//!   `io.containerd.berth.v2` → `containerd-shim-berth-v2`, looked up next to berthd, then
//!   on `PATH`), talks task API v2 over ttrpc, watches the shim process and cleans up after
//!   it if it dies, and on start-up reconnects to every shim left running.
//! - [`v1`]: `io.containerd.runtime.v1.linux` is accepted and mapped onto the runc v2 shim.
//! - [`cgroups`]: `io.containerd.monitor.v1.cgroups`, metrics of every task from cgroup
//!   v1 or v2.
//!
//! Events: shims publish their own task events to the daemon's ttrpc Events service; the
//! manager publishes `/tasks/exit` and `/tasks/delete` for shims that died, and
//! `/tasks/exit` for tasks found stopped when it reconnects after a daemon restart.

pub mod bundle;
pub mod cgroups;
pub mod manager;
mod shim;
pub mod v1;

use berth_core::runtime::Runtime;
use berth_plugin::{InitContext, Instance, Registration, types};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

pub use manager::{ManagerConfig, ShimManager, V1Mapping};

/// `[plugins."io.containerd.runtime.v2.task"]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RuntimeV2Config {
    /// Platforms tasks may run for (`os/arch`).
    pub platforms: Vec<String>,
    /// Give every shim its own core-scheduling group (`SCHED_CORE=1`).
    pub sched_core: bool,
    /// Berth's: which shim serves `io.containerd.runc.v2`. `"berth"` (the default):
    /// Berth's own `containerd-shim-berth-v2`, which takes the same runc options and runs
    /// berth-runc (or runc) in a ~1.5 MiB shim, when it is installed (next to berthd or in
    /// PATH); `"containerd"`: containerd's `containerd-shim-runc-v2`, as containerd does.
    /// Either can always be asked for by name (`io.containerd.berth.v2`) or by path.
    pub runc_shim: RuncShim,
}

/// See [`RuntimeV2Config::runc_shim`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuncShim {
    #[default]
    Berth,
    Containerd,
}

/// This host's platform in containerd's form.
pub fn host_platform() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    };
    format!("linux/{arch}")
}

impl Default for RuntimeV2Config {
    fn default() -> Self {
        RuntimeV2Config {
            platforms: vec![host_platform()],
            sched_core: false,
            runc_shim: RuncShim::Berth,
        }
    }
}

/// The plugin's instance is an `Arc<dyn Runtime>`.
pub fn registration() -> Registration {
    Registration::new(types::RUNTIME_V2, "task", |ctx: InitContext| async move {
        let config: RuntimeV2Config = ctx.config()?;
        ctx.platforms(config.platforms.clone());
        let v1 = ctx
            .get::<Arc<V1Mapping>>(v1::TYPE)
            .ok()
            .map(|m| (*m).clone());
        let exe = std::env::current_exe()
            .map_err(|e| berth_core::Error::unknown(format!("locating berthd: {e}")))?;
        let daemon = &ctx.daemon;
        let ttrpc_address = if daemon.ttrpc_address.is_empty() {
            format!("{}.ttrpc", daemon.grpc_address)
        } else {
            daemon.ttrpc_address.clone()
        };
        let manager_config = ManagerConfig {
            state: ctx.state.clone(),
            root: ctx.root.clone(),
            grpc_address: daemon.grpc_address.clone(),
            ttrpc_address,
            shim_dirs: exe
                .parent()
                .map(|p| vec![p.to_path_buf()])
                .unwrap_or_default(),
            publish_binary: exe,
            debug: tracing::enabled!(tracing::Level::DEBUG),
            sched_core: config.sched_core,
            berth_serves_runc_v2: config.runc_shim == RuncShim::Berth,
            v1,
        };
        for dir in [&manager_config.state, &manager_config.root] {
            std::fs::create_dir_all(dir).map_err(|e| {
                berth_core::Error::unknown(format!("creating {}: {e}", dir.display()))
            })?;
        }
        let manager = ShimManager::new(manager_config, Arc::new(ctx.events.clone()));
        manager.load_existing().await;
        Ok(Arc::new(Arc::new(manager) as Arc<dyn Runtime>) as Instance)
    })
    .requires(&[v1::TYPE, types::EVENT])
    .with_config::<RuntimeV2Config>()
}

/// Every plugin of this crate.
pub fn registrations() -> Vec<Registration> {
    vec![v1::registration(), registration(), cgroups::registration()]
}
