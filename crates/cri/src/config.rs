//! `[plugins."io.containerd.grpc.v1.cri"]`: the keys of containerd 1.6's CRI config
//! Berth uses (images, sandbox image, runtimes, CNI). Every other key of containerd's
//! section is accepted and ignored, as containerd does not fail on them either.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct CriConfig {
    pub containerd: ContainerdConfig,
    pub registry: RegistryConfig,
    /// The pause image every sandbox runs (pulled when missing).
    pub sandbox_image: String,
    pub cni: CniConfig,
    /// Scores below the daemon's own `oom_score_adj` are raised to it (containerd's
    /// option for daemons that may not lower scores, such as rootless ones).
    pub restrict_oom_score_adj: bool,
}

impl Default for CriConfig {
    fn default() -> Self {
        CriConfig {
            containerd: ContainerdConfig::default(),
            registry: RegistryConfig::default(),
            sandbox_image: "registry.k8s.io/pause:3.6".into(),
            cni: CniConfig::default(),
            restrict_oom_score_adj: false,
        }
    }
}

/// `[plugins."io.containerd.grpc.v1.cri".cni]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct CniConfig {
    /// Where the plugin binaries are (`CNI_PATH`).
    pub bin_dir: String,
    /// Where the network configurations are.
    pub conf_dir: String,
    /// How many configuration files are loaded (0: all).
    pub max_conf_num: i64,
    /// containerd renders it into `conf_dir` on `UpdateRuntimeConfig` (not built here).
    pub conf_template: String,
}

impl Default for CniConfig {
    fn default() -> Self {
        CniConfig {
            bin_dir: "/opt/cni/bin".into(),
            conf_dir: "/etc/cni/net.d".into(),
            max_conf_num: 1,
            conf_template: String::new(),
        }
    }
}

/// `[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.<name>]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RuntimeConfig {
    pub runtime_type: String,
}

/// `[plugins."io.containerd.grpc.v1.cri".containerd]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ContainerdConfig {
    /// Where pulled images are unpacked (and whose usage `ImageFsInfo` reports).
    pub snapshotter: String,
    /// The runtime of sandboxes whose `runtime_handler` is empty.
    pub default_runtime_name: String,
    pub runtimes: BTreeMap<String, RuntimeConfig>,
}

impl Default for ContainerdConfig {
    fn default() -> Self {
        ContainerdConfig {
            snapshotter: "overlayfs".into(),
            default_runtime_name: "runc".into(),
            runtimes: BTreeMap::from([(
                "runc".to_string(),
                RuntimeConfig {
                    runtime_type: "io.containerd.runc.v2".into(),
                },
            )]),
        }
    }
}

impl ContainerdConfig {
    /// The runtime type (shim name) of a runtime handler, as containerd resolves it.
    pub fn runtime_type(&self, handler: &str) -> Option<String> {
        let name = if handler.is_empty() {
            self.default_runtime_name.as_str()
        } else {
            handler
        };
        self.runtimes.get(name).map(|r| {
            if r.runtime_type.is_empty() {
                "io.containerd.runc.v2".to_string()
            } else {
                r.runtime_type.clone()
            }
        })
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
        assert_eq!(config.sandbox_image, "registry.k8s.io/pause:3.6");
        assert_eq!(config.cni.bin_dir, "/opt/cni/bin");
        assert_eq!(config.cni.conf_dir, "/etc/cni/net.d");
        assert_eq!(
            config.containerd.runtime_type("").as_deref(),
            Some("io.containerd.runc.v2")
        );
        assert_eq!(config.containerd.runtime_type("kata"), None);
        let auth = config.registry.configs["r.example"].auth.as_ref().unwrap();
        assert_eq!((auth.username.as_str(), auth.password.as_str()), ("u", "p"));
    }
}
