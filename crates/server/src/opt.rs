//! The opt plugin: a directory whose `bin/` and `lib/` the daemon (and so every shim
//! and runtime it starts) finds programs and libraries in.
//!
//! containerd registers it as `io.containerd.internal.v1.opt`, and that is the URI used
//! here so that containerd's config sections apply unchanged; a section under the name
//! `io.containerd.opt.v1.opt` is accepted too (see [`normalise_section`]).
//!
//! Changing `PATH`/`LD_LIBRARY_PATH` is only sound while the process has one thread, so
//! [`prepare_environment`] runs before the async runtime starts; the plugin's `init`
//! then only reports what was done.

use crate::config::Config;
use berth_plugin::{InitContext, Instance, Registration, types};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const ID: &str = "opt";
/// The URI containerd uses for this plugin.
pub const URI: &str = "io.containerd.internal.v1.opt";
/// Another name for the same section, accepted for configs written for Berth's issue 2.
pub const ALIAS_URI: &str = "io.containerd.opt.v1.opt";
pub const DEFAULT_PATH: &str = "/opt/berth";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct OptConfig {
    pub path: String,
}

impl Default for OptConfig {
    fn default() -> Self {
        OptConfig {
            path: DEFAULT_PATH.into(),
        }
    }
}

/// The plugin's instance: where the opt directory is.
#[derive(Debug, Clone)]
pub struct OptDirectory {
    pub path: PathBuf,
}

/// Moves an `io.containerd.opt.v1.opt` section onto containerd's URI (the latter wins on
/// conflicting keys).
pub fn normalise_section(config: &mut Config) {
    if let Some(alias) = config.plugins.remove(ALIAS_URI) {
        let section = config.plugins.entry(URI.to_string()).or_default();
        let mut merged = alias;
        berth_plugin::merge_tables(&mut merged, section);
        *section = merged;
    }
}

/// Whether the config disables the opt plugin.
fn disabled(config: &Config) -> bool {
    config
        .disabled_plugins
        .iter()
        .any(|p| p == URI || p == ALIAS_URI || p == ID)
}

/// The effective opt config (defaults overlaid with the file's section).
pub fn config_of(config: &Config) -> OptConfig {
    let mut table = toml::Table::try_from(OptConfig::default()).expect("serialises");
    if let Some(section) = config.plugins.get(URI) {
        berth_plugin::merge_tables(&mut table, section);
    }
    toml::Value::Table(table).try_into().unwrap_or_default()
}

/// Creates `{path}/bin` and `{path}/lib` and puts them first in `PATH` and
/// `LD_LIBRARY_PATH`. Must run while the process is single-threaded.
/// Returns the directory, or `None` when the plugin is disabled or its path is empty.
pub fn prepare_environment(config: &Config) -> std::io::Result<Option<PathBuf>> {
    if disabled(config) {
        return Ok(None);
    }
    let opt = config_of(config);
    if opt.path.is_empty() {
        return Ok(None);
    }
    let path = PathBuf::from(&opt.path);
    let bin = path.join("bin");
    let lib = path.join("lib");
    create_dir_0711(&bin)?;
    create_dir_0711(&lib)?;
    let path_var = prepend(&bin, std::env::var_os("PATH"));
    let lib_var = prepend(&lib, std::env::var_os("LD_LIBRARY_PATH"));
    // SAFETY: called from `main` before the tokio runtime (or any other thread) exists,
    // so no other thread can be reading the environment concurrently.
    unsafe {
        std::env::set_var("PATH", path_var);
        std::env::set_var("LD_LIBRARY_PATH", lib_var);
    }
    Ok(Some(path))
}

fn create_dir_0711(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(dir)
        .map_err(|e| std::io::Error::new(e.kind(), format!("creating {}: {e}", dir.display())))
}

fn prepend(dir: &Path, current: Option<std::ffi::OsString>) -> std::ffi::OsString {
    let mut value = dir.as_os_str().to_os_string();
    if let Some(current) = current.filter(|c| !c.is_empty()) {
        value.push(":");
        value.push(current);
    }
    value
}

/// The plugin: checks the directories [`prepare_environment`] made and exports `path`.
pub fn registration() -> Registration {
    Registration::new(types::INTERNAL, ID, |ctx: InitContext| async move {
        let config: OptConfig = ctx.config()?;
        let path = PathBuf::from(&config.path);
        for dir in [path.join("bin"), path.join("lib")] {
            if !dir.is_dir() {
                return Err(berth_core::Error::unknown(format!(
                    "opt directory {} could not be created",
                    dir.display()
                )));
            }
        }
        ctx.export("path", config.path.clone());
        Ok(Arc::new(OptDirectory { path }) as Instance)
    })
    .with_config::<OptConfig>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alias_section_moves_to_containerds_uri() {
        let mut config = Config::default();
        config
            .plugins
            .insert(ALIAS_URI.into(), toml::toml! { path = "/srv/opt" });
        normalise_section(&mut config);
        assert!(!config.plugins.contains_key(ALIAS_URI));
        assert_eq!(config_of(&config).path, "/srv/opt");
    }

    #[test]
    fn prepend_keeps_existing_entries() {
        assert_eq!(
            prepend(Path::new("/o/bin"), Some("/usr/bin".into())),
            "/o/bin:/usr/bin"
        );
        assert_eq!(prepend(Path::new("/o/lib"), None), "/o/lib");
    }
}
