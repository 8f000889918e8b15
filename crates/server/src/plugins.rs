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
