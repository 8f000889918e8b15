//! Every plugin the daemon can load. Each crate exports its registrations; add a line
//! here when a crate gains plugins.

use berth_plugin::Registration;

/// All registrations, in no particular order (the plugin system orders them by what they
/// require).
pub fn all_registrations() -> Vec<Registration> {
    let mut registrations = vec![crate::opt::registration(), berth_metadata::registration()];
    registrations.extend(berth_services::registrations());
    registrations.extend(berth_content::registrations());
    registrations.extend(berth_gc::registrations());
    registrations.extend(berth_snapshots::registrations());
    registrations.extend(berth_diff::registrations());
    registrations.extend(berth_runtime::registrations());
    registrations
}

/// Short ID → URI of every registration (used to read version 1 configs).
pub fn plugin_ids(registrations: &[Registration]) -> std::collections::BTreeMap<String, String> {
    registrations
        .iter()
        .map(|r| (r.id.to_string(), r.uri()))
        .collect()
}

/// Registrations that come from the config rather than from a crate: one snapshotter per
/// `[proxy_plugins.<name>]` with `type = "snapshot"`, forwarding to its `address`.
/// (Content proxies are not supported yet; they are skipped with a warning.)
pub fn proxy_registrations(config: &crate::config::Config) -> Vec<Registration> {
    let mut out = Vec::new();
    for (name, proxy) in &config.proxy_plugins {
        match proxy.r#type.as_str() {
            "snapshot" => out.push(berth_services::proxy::snapshot_registration(
                name,
                &proxy.address,
            )),
            other => tracing::warn!(
                plugin = %name,
                r#type = other,
                "proxy plugins of this type are not supported; skipped"
            ),
        }
    }
    out
}

/// `[stream_processors]` go to the walking differ, which reads them from its own section
/// (`stream_processors.<id>` with the same keys): merge this into the sections before
/// initialising the plugins.
pub fn stream_processor_section(config: &crate::config::Config) -> Option<(String, toml::Table)> {
    if config.stream_processors.is_empty() {
        return None;
    }
    let processors = toml::Table::try_from(&config.stream_processors).ok()?;
    let mut section = toml::Table::new();
    section.insert("stream_processors".into(), toml::Value::Table(processors));
    Some(("io.containerd.differ.v1.walking".into(), section))
}
