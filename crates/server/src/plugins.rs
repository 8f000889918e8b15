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
    // The native snapshotter opens its store on first use (see lazy_native).
    registrations.extend(
        berth_snapshots::registrations()
            .into_iter()
            .filter(|r| !(r.r#type == berth_plugin::types::SNAPSHOT && r.id == "native")),
    );
    registrations.push(crate::lazy_native::registration());
    registrations.extend(berth_diff::registrations());
    registrations.extend(berth_runtime::registrations());
    registrations.push(berth_cri::registration());
    registrations
}

/// Short ID → URI of every registration (used to read version 1 configs).
pub fn plugin_ids(registrations: &[Registration]) -> std::collections::BTreeMap<String, String> {
    registrations
        .iter()
        .map(|r| (r.id.to_string(), r.uri()))
        .collect()
}

/// Registrations that come from the config rather than from a crate: one plugin per
/// `[proxy_plugins.<name>]` forwarding to its `address` — a snapshotter for `type =
/// "snapshot"`, a content store for `type = "content"` (the metadata plugin then wraps it
/// instead of the local store). The full type names containerd accepts
/// (`io.containerd.snapshotter.v1`, `io.containerd.content.v1`) work too.
pub fn proxy_registrations(config: &crate::config::Config) -> Vec<Registration> {
    let mut out = Vec::new();
    for (name, proxy) in &config.proxy_plugins {
        match proxy.r#type.as_str() {
            "snapshot" | "io.containerd.snapshotter.v1" => out.push(
                berth_services::proxy::snapshot_registration(name, &proxy.address),
            ),
            "content" | "io.containerd.content.v1" => out.push(
                berth_services::proxy::content_registration(name, &proxy.address),
            ),
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

/// The `[plugins."<uri>"]` sections the plugins are initialised with: the config's own,
/// plus the top-level `[stream_processors]` merged into the walking differ's
/// `stream_processors` (an entry the differ's own section gives for the same ID wins).
pub fn init_sections(
    config: &crate::config::Config,
) -> std::collections::HashMap<String, toml::Table> {
    let mut sections: std::collections::HashMap<String, toml::Table> = config
        .plugins
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if let Some((uri, extra)) = stream_processor_section(config) {
        let section = sections.entry(uri).or_default();
        for (key, value) in extra {
            match (section.get_mut(&key), value) {
                (Some(toml::Value::Table(own)), toml::Value::Table(top)) => {
                    for (id, processor) in top {
                        own.entry(id).or_insert(processor);
                    }
                }
                (Some(_), _) => {}
                (None, value) => {
                    section.insert(key, value);
                }
            }
        }
    }
    sections
}

/// Every registration the daemon initialises: the crates' and the config's proxies.
pub fn daemon_registrations(config: &crate::config::Config) -> Vec<Registration> {
    let mut registrations = all_registrations();
    registrations.extend(proxy_registrations(config));
    registrations
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, ProxyPlugin, StreamProcessor};

    fn processor(path: &str) -> StreamProcessor {
        StreamProcessor {
            accepts: vec!["application/x-custom".into()],
            returns: "application/vnd.oci.image.layer.v1.tar".into(),
            path: path.into(),
            ..Default::default()
        }
    }

    #[test]
    fn stream_processors_reach_the_walking_differ() {
        let mut config = Config::default();
        assert!(!init_sections(&config).contains_key("io.containerd.differ.v1.walking"));
        config
            .stream_processors
            .insert("top".into(), processor("/bin/top"));
        config
            .stream_processors
            .insert("both".into(), processor("/bin/top-both"));
        let own: toml::Table = toml::from_str(
            "other = 1\n[stream_processors.both]\naccepts = [\"x\"]\nreturns = \"y\"\npath = \"/bin/own\"\n",
        )
        .unwrap();
        config
            .plugins
            .insert("io.containerd.differ.v1.walking".into(), own);
        let sections = init_sections(&config);
        let walking = &sections["io.containerd.differ.v1.walking"];
        assert_eq!(walking["other"].as_integer(), Some(1));
        let processors = walking["stream_processors"].as_table().unwrap();
        assert_eq!(processors["top"]["path"].as_str(), Some("/bin/top"));
        assert_eq!(processors["both"]["path"].as_str(), Some("/bin/own"));
        // The differ decodes it.
        let decoded: berth_diff::DiffConfig = walking.clone().try_into().unwrap();
        assert_eq!(decoded.stream_processors.len(), 2);
    }

    #[test]
    fn proxies_become_snapshotter_and_content_registrations() {
        let mut config = Config::default();
        let base = daemon_registrations(&config).len();
        for (name, r#type) in [("myproxy", "snapshot"), ("cs", "content"), ("odd", "diff")] {
            config.proxy_plugins.insert(
                name.into(),
                ProxyPlugin {
                    r#type: r#type.into(),
                    address: "/run/x.sock".into(),
                    ..Default::default()
                },
            );
        }
        let registrations = daemon_registrations(&config);
        // The unknown type is skipped (with a warning), as containerd does.
        assert_eq!(registrations.len(), base + 2);
        for uri in [
            "io.containerd.snapshotter.v1.myproxy",
            "io.containerd.content.v1.cs",
        ] {
            assert!(registrations.iter().any(|r| r.uri() == uri), "{uri}");
        }
    }
}
