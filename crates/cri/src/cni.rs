//! CNI as containerd 1.6's CRI plugin drives it (go-cni/libcni, written here from the
//! CNI specification): network configurations loaded from `conf_dir` (`.conf`,
//! `.conflist`, `.json`, sorted by file name, at most `max_conf_num`), each plugin binary
//! of `bin_dir` run with `CNI_COMMAND`/`CNI_CONTAINERID`/`CNI_NETNS`/`CNI_IFNAME`/
//! `CNI_PATH`/`CNI_ARGS` and its configuration on stdin, a list chained through
//! `prevResult`; the loopback network on `lo` first (go-cni's `WithLoNetwork`), then the
//! loaded networks on `eth0`, `eth1`, …
//!
//! Network namespaces are made by berthd: a thread of its own `unshare`s a new one and
//! bind-mounts its `/proc/thread-self/ns/net` on a file `cni-<uuid>` under the plugin's
//! state directory (`{state}/io.containerd.grpc.v1.cri/netns`), which is private to
//! the daemon, so two daemons never share a name.

use crate::config::CniConfig;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

/// A loaded network configuration list.
#[derive(Debug, Clone)]
pub struct Network {
    pub name: String,
    pub cni_version: String,
    pub plugins: Vec<Value>,
    /// The file it came from.
    pub source: PathBuf,
}

/// go-cni's error when nothing is loaded, which containerd's `Status` reports.
pub const NOT_INITIALIZED: &str = "cni plugin not initialized";

/// Loads the configured networks, as go-cni's `Load(WithLoNetwork, WithDefaultConf)`.
pub fn load(config: &CniConfig) -> Result<Vec<Network>, String> {
    let dir = Path::new(&config.conf_dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| {
            format!(
                "{NOT_INITIALIZED}: failed to load cni config: reading {}: {e}",
                dir.display()
            )
        })?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("conf" | "conflist" | "json")
                )
        })
        .collect();
    files.sort();
    let mut networks = Vec::new();
    // containerd: 0 loads every file.
    let max = if config.max_conf_num <= 0 {
        usize::MAX
    } else {
        config.max_conf_num as usize
    };
    for file in files {
        if networks.len() >= max {
            break;
        }
        let text = std::fs::read(&file).map_err(|e| format!("reading {}: {e}", file.display()))?;
        let value: Value = match serde_json::from_slice(&text) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(file = %file.display(), error = %e, "CNI config is not JSON, skipped");
                continue;
            }
        };
        let is_list = file.extension().is_some_and(|e| e == "conflist");
        let (name, version, plugins) = if is_list {
            let plugins = value["plugins"].as_array().cloned().unwrap_or_default();
            (value["name"].clone(), value["cniVersion"].clone(), plugins)
        } else {
            // A single network config becomes a list of one (libcni's ConfListFromConf).
            (
                value["name"].clone(),
                value["cniVersion"].clone(),
                vec![value.clone()],
            )
        };
        let Some(name) = name.as_str().filter(|n| !n.is_empty()) else {
            tracing::warn!(file = %file.display(), "CNI config has no name, skipped");
            continue;
        };
        if plugins.is_empty() || plugins.iter().any(|p| p["type"].as_str().is_none()) {
            tracing::warn!(file = %file.display(), "CNI config has no plugins or one without type, skipped");
            continue;
        }
        networks.push(Network {
            name: name.to_string(),
            cni_version: version.as_str().unwrap_or("0.4.0").to_string(),
            plugins,
            source: file,
        });
    }
    if networks.is_empty() {
        return Err(format!(
            "{NOT_INITIALIZED}: failed to load cni config: no network config found in {}",
            dir.display()
        ));
    }
    Ok(networks)
}

/// go-cni's loopback network.
fn loopback() -> Network {
    Network {
        name: "cni-loopback".into(),
        cni_version: "0.3.1".into(),
        plugins: vec![json!({"type": "loopback"})],
        source: PathBuf::new(),
    }
}

/// Who the network is for (`CNI_ARGS`, `CNI_CONTAINERID`).
#[derive(Debug, Clone)]
pub struct PodRef {
    pub sandbox_id: String,
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub netns: String,
}

impl PodRef {
    fn args(&self) -> String {
        format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
            self.namespace, self.name, self.sandbox_id, self.uid
        )
    }
}

/// Runs one plugin; returns its stdout parsed (empty for DEL).
async fn exec_plugin(
    bin_dir: &str,
    command: &str,
    pod: &PodRef,
    ifname: &str,
    conf: &Value,
) -> Result<Value, String> {
    let kind = conf["type"].as_str().unwrap_or_default();
    let binary = bin_dir
        .split(':')
        .map(|d| Path::new(d).join(kind))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("failed to find plugin {kind:?} in path [{bin_dir}]"))?;
    let mut child = tokio::process::Command::new(&binary)
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &pod.sandbox_id)
        .env("CNI_NETNS", &pod.netns)
        .env("CNI_IFNAME", ifname)
        .env("CNI_PATH", bin_dir)
        .env("CNI_ARGS", pod.args())
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
        )
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("running {}: {e}", binary.display()))?;
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().unwrap();
        let bytes = serde_json::to_vec(conf).unwrap();
        stdin
            .write_all(&bytes)
            .await
            .map_err(|e| format!("writing to {}: {e}", binary.display()))?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| format!("running {}: {e}", binary.display()))?;
    if !out.status.success() {
        // The spec's error object: {"code", "msg", "details"}.
        let err: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        let msg = err["msg"].as_str().map(str::to_string).unwrap_or_else(|| {
            format!(
                "{} {}",
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            )
        });
        let details = err["details"].as_str().unwrap_or_default();
        return Err(if details.is_empty() {
            format!("plugin type={kind:?} failed ({command}): {msg}")
        } else {
            format!("plugin type={kind:?} failed ({command}): {msg}: {details}")
        });
    }
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("plugin type={kind:?} returned an unreadable result: {e}"))
}

/// The configuration a plugin of `network` reads (libcni's `buildOneConfig`).
fn plugin_conf(network: &Network, plugin: &Value, prev: &Value) -> Value {
    let mut conf = plugin.clone();
    conf["name"] = json!(network.name);
    conf["cniVersion"] = json!(network.cni_version);
    if !prev.is_null() {
        conf["prevResult"] = prev.clone();
    }
    conf
}

async fn add_network(
    bin_dir: &str,
    pod: &PodRef,
    network: &Network,
    ifname: &str,
) -> Result<Value, String> {
    let mut prev = Value::Null;
    for plugin in &network.plugins {
        let conf = plugin_conf(network, plugin, &prev);
        let result = exec_plugin(bin_dir, "ADD", pod, ifname, &conf).await?;
        if !result.is_null() {
            prev = result;
        }
    }
    Ok(prev)
}

async fn del_network(
    bin_dir: &str,
    pod: &PodRef,
    network: &Network,
    ifname: &str,
    prev: &Value,
) -> Result<(), String> {
    for plugin in network.plugins.iter().rev() {
        let conf = plugin_conf(network, plugin, prev);
        exec_plugin(bin_dir, "DEL", pod, ifname, &conf).await?;
    }
    Ok(())
}

/// What a set-up left: each network with its interface and result (kept for DEL).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Attachment {
    pub networks: Vec<AttachedNetwork>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct AttachedNetwork {
    pub name: String,
    pub cni_version: String,
    pub plugins: Vec<Value>,
    pub ifname: String,
    pub result: Value,
}

impl Attachment {
    /// The pod's IPs: those of `eth0` first (containerd's default interface), IPv4
    /// before IPv6.
    pub fn ips(&self) -> Vec<String> {
        let mut ips = Vec::new();
        for net in self.networks.iter().filter(|n| n.ifname == "eth0") {
            let result = &net.result;
            if let Some(list) = result["ips"].as_array() {
                for ip in list {
                    if let Some(addr) = ip["address"].as_str() {
                        ips.push(addr.split('/').next().unwrap_or(addr).to_string());
                    }
                }
            }
            for key in ["ip4", "ip6"] {
                if let Some(addr) = result[key]["ip"].as_str() {
                    ips.push(addr.split('/').next().unwrap_or(addr).to_string());
                }
            }
        }
        ips.sort_by_key(|ip| ip.contains(':'));
        ips
    }
}

/// CNI ADD of the loopback and every loaded network (undone on failure).
pub async fn setup(config: &CniConfig, pod: &PodRef) -> Result<Attachment, String> {
    let networks = load(config)?;
    let mut all = vec![(loopback(), "lo".to_string())];
    all.extend(
        networks
            .into_iter()
            .enumerate()
            .map(|(i, n)| (n, format!("eth{i}"))),
    );
    let mut attachment = Attachment::default();
    for (network, ifname) in all {
        match add_network(&config.bin_dir, pod, &network, &ifname).await {
            Ok(result) => attachment.networks.push(AttachedNetwork {
                name: network.name,
                cni_version: network.cni_version,
                plugins: network.plugins,
                ifname,
                result,
            }),
            Err(e) => {
                let _ = teardown(config, pod, &attachment).await;
                return Err(format!(
                    "failed to setup network for sandbox {:?}: {e}",
                    pod.sandbox_id
                ));
            }
        }
    }
    Ok(attachment)
}

/// CNI DEL of what [`setup`] attached, last first.
pub async fn teardown(
    config: &CniConfig,
    pod: &PodRef,
    attachment: &Attachment,
) -> Result<(), String> {
    let mut first_error = None;
    for net in attachment.networks.iter().rev() {
        let network = Network {
            name: net.name.clone(),
            cni_version: net.cni_version.clone(),
            plugins: net.plugins.clone(),
            source: PathBuf::new(),
        };
        if let Err(e) = del_network(&config.bin_dir, pod, &network, &net.ifname, &net.result).await
        {
            first_error.get_or_insert(e);
        }
    }
    match first_error {
        Some(e) => Err(format!(
            "failed to teardown network for sandbox {:?}: {e}",
            pod.sandbox_id
        )),
        None => Ok(()),
    }
}

/// Creates a network namespace bound at `path`.
pub fn create_netns(path: &Path) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::File::create(path)?;
    let target = path.to_path_buf();
    let result = std::thread::spawn(move || -> std::io::Result<()> {
        // This thread only: it ends right after, so nothing else ever runs in the new
        // namespace.
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
        let tid = nix::unistd::gettid();
        nix::mount::mount(
            Some(format!("/proc/self/task/{tid}/ns/net").as_str()),
            &target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(std::io::Error::from)
    })
    .join()
    .map_err(|_| std::io::Error::other("netns thread panicked"))?;
    if result.is_err() {
        let _ = std::fs::remove_file(path);
    }
    result
}

/// Unmounts and removes a namespace file made by [`create_netns`] (absent is fine).
pub fn remove_netns(path: &Path) -> std::io::Result<()> {
    if !path.exists() {
        return Ok(());
    }
    match nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => return Err(e.into()),
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ips_of_eth0_from_current_and_old_results() {
        let a = Attachment {
            networks: vec![
                AttachedNetwork {
                    name: "lo".into(),
                    cni_version: "0.3.1".into(),
                    plugins: vec![],
                    ifname: "lo".into(),
                    result: json!({"ips":[{"address":"127.0.0.1/8"}]}),
                },
                AttachedNetwork {
                    name: "n".into(),
                    cni_version: "1.0.0".into(),
                    plugins: vec![],
                    ifname: "eth0".into(),
                    result: json!({"ips":[{"address":"fd00::2/64"},{"address":"10.1.2.3/24"}]}),
                },
            ],
        };
        assert_eq!(a.ips(), vec!["10.1.2.3", "fd00::2"]);
    }

    #[test]
    fn conf_and_conflist_load_sorted_and_limited() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("20-b.conf"),
            r#"{"cniVersion":"0.4.0","name":"b","type":"bridge"}"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("10-a.conflist"),
            r#"{"cniVersion":"1.0.0","name":"a","plugins":[{"type":"bridge"},{"type":"portmap"}]}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("05-bad.conf"), "not json").unwrap();
        let mut config = CniConfig {
            conf_dir: dir.path().display().to_string(),
            ..Default::default()
        };
        let nets = load(&config).unwrap();
        assert_eq!(nets.len(), 1);
        assert_eq!((nets[0].name.as_str(), nets[0].plugins.len()), ("a", 2));
        config.max_conf_num = 2;
        let nets = load(&config).unwrap();
        assert_eq!(nets[1].name, "b");
        let empty = tempfile::tempdir().unwrap();
        config.conf_dir = empty.path().display().to_string();
        assert!(load(&config).unwrap_err().starts_with(NOT_INITIALIZED));
    }
}

/// containerd's `UpdateRuntimeConfig` file: the rendered `conf_template`.
pub const TEMPLATE_OUTPUT: &str = "10-containerd-net.conflist";

/// Renders `conf_template` for the pod CIDR(s): the `{{.PodCIDR}}` substitution (the
/// first CIDR) that containerd's Go template offers; templates using other actions are
/// refused with the action named.
pub fn render_template(template: &str, cidrs: &[&str]) -> Result<String, String> {
    let first = cidrs.first().copied().unwrap_or_default();
    let text = template
        .replace("{{.PodCIDR}}", first)
        .replace("{{ .PodCIDR }}", first);
    if let Some(start) = text.find("{{") {
        let action: String = text[start..].chars().take(40).collect();
        return Err(format!(
            "conf_template uses a Go template action berthd does not render ({action}…): only {{{{.PodCIDR}}}} is supported"
        ));
    }
    Ok(text)
}

#[cfg(test)]
mod template_tests {
    use super::*;

    #[test]
    fn pod_cidr_is_substituted_and_other_actions_refused() {
        let t = r#"{"ipam":{"subnet":"{{.PodCIDR}}"}}"#;
        assert_eq!(
            render_template(t, &["10.1.0.0/24", "fd00::/64"]).unwrap(),
            r#"{"ipam":{"subnet":"10.1.0.0/24"}}"#
        );
        assert!(render_template("{{range .Routes}}x{{end}}", &["a"]).is_err());
    }
}
