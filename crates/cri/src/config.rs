//! `[plugins."io.containerd.grpc.v1.cri"]`: the keys of containerd 1.6's CRI config the
//! image service uses. Every other key of containerd's section (sandbox_image, cni,
//! runtimes, …) is accepted and ignored, as containerd does not fail on them either.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct CriConfig {
    pub containerd: ContainerdConfig,
    pub registry: RegistryConfig,
}

/// `[plugins."io.containerd.grpc.v1.cri".containerd]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ContainerdConfig {
    /// Where pulled images are unpacked (and whose usage `ImageFsInfo` reports).
    pub snapshotter: String,
}

impl Default for ContainerdConfig {
    fn default() -> Self {
        ContainerdConfig {
            snapshotter: "overlayfs".into(),
        }
    }
}

/// `[plugins."io.containerd.grpc.v1.cri".registry]`. The deprecated `mirrors` and
/// `configs.<host>.tls` never reach the plugin: the server converts them into a hosts
/// directory and points `config_path` at it before plugins start.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RegistryConfig {
    /// Directories of `<host>/hosts.toml` (`:`-separated).
    pub config_path: String,
    /// `configs.<host>.auth`: credentials used for a host when the request has none.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub configs: BTreeMap<String, RegistryHostConfig>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RegistryHostConfig {
    pub auth: Option<AuthConfig>,
}

/// containerd's `AuthConfig` of the CRI config (keys as containerd spells them).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct AuthConfig {
    pub username: String,
    pub password: String,
    pub auth: String,
    pub identitytoken: String,
}

impl CriConfig {
    /// Decodes the plugin's section; unknown keys are ignored silently (containerd's CRI
    /// section has many this plugin does not use yet).
    pub fn from_section(section: &toml::Table) -> berth_core::Result<CriConfig> {
        toml::Value::Table(section.clone()).try_into().map_err(|e| {
            berth_core::Error::invalid_argument(format!(
                "config of plugin io.containerd.grpc.v1.cri: {e}"
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containerd_keys_decode_and_unknown_ones_are_ignored() {
        let section: toml::Table = toml::from_str(
            r#"
sandbox_image = "registry.k8s.io/pause:3.6"
enable_selinux = false
[containerd]
  default_runtime_name = "runc"
[registry]
  config_path = "/etc/containerd/certs.d"
[registry.configs."r.example".auth]
  username = "u"
  password = "p"
[cni]
  bin_dir = "/opt/cni/bin"
"#,
        )
        .unwrap();
        let config = CriConfig::from_section(&section).unwrap();
        // A containerd table without `snapshotter` keeps the default.
        assert_eq!(config.containerd.snapshotter, "overlayfs");
        assert_eq!(config.registry.config_path, "/etc/containerd/certs.d");
        let auth = config.registry.configs["r.example"].auth.as_ref().unwrap();
        assert_eq!((auth.username.as_str(), auth.password.as_str()), ("u", "p"));
    }
}
